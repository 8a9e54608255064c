"""Drawing helpers shared by the procedural generators (numpy + Pillow).

The built-in packs draw with them, and a third-party pack may too
(``examples/third_party_pack.py``).

Shapes are given in normalised picture coordinates (0..1 on both axes, y
down); a :class:`Sketch` draws them supersampled on a transparent layer, and
:func:`compose` places the layer (rotation, scale, shift), puts it on a
background, applies the lighting and reduces it to the output size.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw

if TYPE_CHECKING:
    from w2wkit.concepts.base import AttributeSpec

__all__ = [
    "Nuisance",
    "Sketch",
    "caption_from",
    "caption_of",
    "compose",
    "mix",
    "palette_color",
    "rgba",
    "shade",
]

Color = tuple[float, float, float]


def rgba(color: Sequence[float], alpha: float = 1.0) -> tuple[int, int, int, int]:
    """Float RGB in [0, 1] -> Pillow RGBA tuple."""
    r, g, b = (round(255 * min(1.0, max(0.0, c))) for c in color[:3])
    return (r, g, b, round(255 * alpha))


def shade(color: Sequence[float], factor: float) -> Color:
    """Multiply a colour by ``factor`` (darker below 1), clipped to [0, 1]."""
    return tuple(min(1.0, max(0.0, c * factor)) for c in color[:3])  # type: ignore[return-value]


def mix(a: Sequence[float], b: Sequence[float], t: float) -> Color:
    """Linear blend ``(1 - t) * a + t * b``."""
    return tuple((1 - t) * x + t * y for x, y in zip(a[:3], b[:3], strict=True))  # type: ignore[return-value]


def luminance(c: Sequence[float]) -> float:
    """Relative luminance of an RGB colour in [0, 1]."""
    return 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]


def palette_color(rng: np.random.Generator, palette: Sequence[Color], sd: float) -> np.ndarray:
    """A random colour of ``palette`` plus Gaussian jitter ``sd``, clipped to [0, 1].

    Returns
    -------
    numpy.ndarray
        Shape ``(3,)``, float64.
    """
    base = np.array(palette[int(rng.integers(len(palette)))])
    return np.clip(base + rng.normal(0, sd, 3), 0, 1)


class Sketch:
    """A transparent supersampled layer drawn in normalised coordinates.

    Parameters
    ----------
    size : int
        Output size in pixels (the layer is ``size * ss`` pixels wide).
    ss : int
        Supersampling factor.
    """

    def __init__(self, size: int, ss: int = 4) -> None:
        self.size = size
        self.ss = ss
        self.S = size * ss
        self.image = Image.new("RGBA", (self.S, self.S), (0, 0, 0, 0))
        self.draw = ImageDraw.Draw(self.image)

    def _box(self, cx: float, cy: float, rx: float, ry: float) -> list[float]:
        S = self.S
        return [(cx - rx) * S, (cy - ry) * S, (cx + rx) * S, (cy + ry) * S]

    def _w(self, width: float) -> int:
        return max(1, round(width * self.S))

    def ellipse(
        self,
        cx: float,
        cy: float,
        rx: float,
        ry: float,
        fill: Sequence[float] | None,
        outline: Sequence[float] | None = None,
        width: float = 0.0,
        alpha: float = 1.0,
    ) -> None:
        """Filled and/or outlined ellipse of centre (cx, cy), radii (rx, ry)."""
        self.draw.ellipse(
            self._box(cx, cy, rx, ry),
            fill=None if fill is None else rgba(fill, alpha),
            outline=None if outline is None else rgba(outline, alpha),
            width=self._w(width) if outline is not None else 0,
        )

    def rect(
        self,
        x0: float,
        y0: float,
        x1: float,
        y1: float,
        fill: Sequence[float] | None,
        radius: float = 0.0,
        outline: Sequence[float] | None = None,
        width: float = 0.0,
        alpha: float = 1.0,
    ) -> None:
        """Rectangle with optional rounded corners (radius in normalised units)."""
        S = self.S
        self.draw.rounded_rectangle(
            [x0 * S, y0 * S, x1 * S, y1 * S],
            radius=radius * S,
            fill=None if fill is None else rgba(fill, alpha),
            outline=None if outline is None else rgba(outline, alpha),
            width=self._w(width) if outline is not None else 0,
        )

    def polygon(
        self, points: Sequence[tuple[float, float]], fill: Sequence[float], alpha: float = 1.0
    ) -> None:
        """Filled polygon."""
        S = self.S
        self.draw.polygon([(x * S, y * S) for x, y in points], fill=rgba(fill, alpha))

    def line(
        self,
        points: Sequence[tuple[float, float]],
        fill: Sequence[float],
        width: float,
        alpha: float = 1.0,
    ) -> None:
        """Polyline of the given width (normalised units), round joints."""
        S = self.S
        self.draw.line(
            [(x * S, y * S) for x, y in points],
            fill=rgba(fill, alpha),
            width=self._w(width),
            joint="curve",
        )

    def chord(
        self,
        cx: float,
        cy: float,
        rx: float,
        ry: float,
        start: float,
        end: float,
        fill: Sequence[float],
        alpha: float = 1.0,
    ) -> None:
        """Ellipse segment between angles ``start`` and ``end`` (degrees, clockwise)."""
        self.draw.chord(self._box(cx, cy, rx, ry), start, end, fill=rgba(fill, alpha))

    def arc(
        self,
        cx: float,
        cy: float,
        rx: float,
        ry: float,
        start: float,
        end: float,
        fill: Sequence[float],
        width: float,
        alpha: float = 1.0,
    ) -> None:
        """Elliptic arc between angles ``start`` and ``end`` (degrees)."""
        self.draw.arc(
            self._box(cx, cy, rx, ry), start, end, fill=rgba(fill, alpha), width=self._w(width)
        )


@dataclass(frozen=True)
class Nuisance:
    """Per-image variation that is not part of the instance.

    Attributes
    ----------
    dx, dy : float
        Shift of the subject, in fractions of the picture.
    scale : float
        Zoom of the subject.
    angle : float
        Rotation of the subject in degrees (counter-clockwise).
    flip : bool
        Mirror the subject left-right.
    gain : float
        Overall brightness.
    grad_x, grad_y : float
        Linear lighting gradient across the picture.
    warmth : float
        Colour temperature shift (positive = warmer).
    bg_top, bg_bottom : tuple of float
        Background colours at the top and the bottom (vertical gradient).
    """

    dx: float = 0.0
    dy: float = 0.0
    scale: float = 1.0
    angle: float = 0.0
    flip: bool = False
    gain: float = 1.0
    grad_x: float = 0.0
    grad_y: float = 0.0
    warmth: float = 0.0
    bg_top: Color = (0.6, 0.6, 0.6)
    bg_bottom: Color = (0.6, 0.6, 0.6)

    @classmethod
    def draw(
        cls,
        rng: np.random.Generator,
        *,
        shift: float = 0.06,
        zoom: float = 0.08,
        rotation: float = 8.0,
        flip: bool = False,
        palette: Sequence[Color] | None = None,
        gain: tuple[float, float] = (0.8, 1.12),
    ) -> Nuisance:
        """Random nuisance: uniform shift/zoom/rotation, random light and background."""
        if palette is not None:
            base = np.array(palette[int(rng.integers(len(palette)))], dtype=float)
            base = np.clip(base + rng.normal(0, 0.06, 3), 0, 1)
        else:
            base = rng.uniform(0.25, 0.85, 3)
            grey = base.mean()
            base = grey + 0.5 * (base - grey)  # muted colours
        other = np.clip(base * rng.uniform(0.7, 1.15) + rng.normal(0, 0.05, 3), 0, 1)
        return cls(
            dx=float(rng.uniform(-shift, shift)),
            dy=float(rng.uniform(-shift, shift)),
            scale=float(rng.uniform(1 - zoom, 1 + zoom)),
            angle=float(rng.uniform(-rotation, rotation)),
            flip=bool(flip and rng.random() < 0.5),
            gain=float(rng.uniform(*gain)),
            grad_x=float(rng.uniform(-0.18, 0.18)),
            grad_y=float(rng.uniform(-0.1, 0.1)),
            warmth=float(rng.uniform(-0.05, 0.05)),
            bg_top=tuple(float(v) for v in base),  # type: ignore[arg-type]
            bg_bottom=tuple(float(v) for v in other),  # type: ignore[arg-type]
        )


def compose(sketch: Sketch, nz: Nuisance, center: tuple[float, float] = (0.5, 0.5)) -> np.ndarray:
    """Place a drawn layer on its background, light it and reduce it.

    Parameters
    ----------
    sketch : Sketch
        The subject, drawn on a transparent layer.
    nz : Nuisance
        Placement, lighting and background.
    center : tuple of float
        Point (normalised) about which the subject rotates and scales.

    Returns
    -------
    numpy.ndarray
        Shape ``(size, size, 3)``, uint8 RGB.
    """
    S = sketch.S
    layer = sketch.image
    if nz.flip:
        layer = layer.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    # output pixel p samples input c + R(-angle) (p - c - t) / scale
    th = math.radians(nz.angle)
    cos, sin = math.cos(th) / nz.scale, math.sin(th) / nz.scale
    cx, cy = center[0] * S, center[1] * S
    tx, ty = nz.dx * S, nz.dy * S
    # rotation by +angle on screen (y down) -> inverse map uses [[cos, -sin], [sin, cos]]
    a, b, d, e = cos, -sin, sin, cos
    ox, oy = cx + tx, cy + ty
    c = cx - a * ox - b * oy
    f = cy - d * ox - e * oy
    layer = layer.transform(
        (S, S), Image.Transform.AFFINE, (a, b, c, d, e, f), resample=Image.Resampling.BILINEAR
    )
    # background: vertical gradient
    t = np.linspace(0.0, 1.0, S, dtype=np.float32)[:, None, None]
    top = np.asarray(nz.bg_top, dtype=np.float32)[None, None, :]
    bot = np.asarray(nz.bg_bottom, dtype=np.float32)[None, None, :]
    bg = np.broadcast_to((1 - t) * top + t * bot, (S, S, 3))
    fg = np.asarray(layer, dtype=np.float32) / 255.0
    alpha = fg[..., 3:4]
    img = fg[..., :3] * alpha + bg * (1 - alpha)
    # lighting
    xs = np.linspace(-1.0, 1.0, S, dtype=np.float32)
    light = nz.gain * (1 + nz.grad_x * xs[None, :] + nz.grad_y * xs[:, None])
    img = img * light[..., None]
    img = img * np.array([1 + nz.warmth, 1.0, 1 - nz.warmth], dtype=np.float32)
    img = np.clip(img, 0.0, 1.0)
    # reduce by box filter
    ss = sketch.ss
    n = sketch.size
    img = img.reshape(n, ss, n, ss, 3).mean(axis=(1, 3))
    return np.round(img * 255.0).astype(np.uint8)


def caption_from(
    noun: str,
    adjectives: Sequence[str],
    phrases: Sequence[str],
    rng: np.random.Generator | None,
    drop: float,
) -> str:
    """``"a photo of a[n] {adjectives} {noun} with {p1}, {p2} and {p3}"``.

    With ``rng`` and ``drop > 0`` each adjective/phrase is kept with
    probability ``1 - drop`` and the phrases are shuffled.
    """
    adjs = list(adjectives)
    phr = list(phrases)
    if rng is not None and drop > 0:
        adjs = [a for a in adjs if rng.random() >= drop]
        phr = [p for p in phr if rng.random() >= drop]
        if len(phr) > 1:
            phr = [phr[i] for i in rng.permutation(len(phr))]
    head = " ".join([*adjs, noun])
    article = "an" if head[0] in "aeiou" else "a"
    text = f"a photo of {article} {head}"
    if phr:
        text += " with " + (phr[0] if len(phr) == 1 else ", ".join(phr[:-1]) + " and " + phr[-1])
    return text


def caption_of(
    noun: str,
    specs: Sequence[AttributeSpec],
    attributes: Mapping[str, bool],
    rng: np.random.Generator | None,
    drop: float,
    skip: Collection[str] = (),
) -> str:
    """:func:`caption_from` with the words of an attribute schema.

    Adjective attributes give their ``phrase`` when present and their
    ``negative`` (if any) when absent; the others give their ``phrase`` when
    present. Attributes named in ``skip`` are left out.
    """
    adjs, phrases = [], []
    for spec in specs:
        if spec.name in skip:
            continue
        present = attributes[spec.name]
        if spec.adjective:
            word = spec.phrase if present else spec.negative
            if word:
                adjs.append(word)
        elif present:
            phrases.append(spec.phrase)
    return caption_from(noun, adjs, phrases, rng, drop)
