"""Procedural dog breeds, seen from the side.

A breed is a ground-truth parameter vector: 8 breed-level binary attributes
(large, floppy ears, spotted, long snout, curly coat, dark coat, short legs,
two-tone) with mild correlations (curly coats go with floppy ears, large dogs
rarely have short legs), and continuous/discrete parameters (body proportions,
ear and tail shape, fur colours, long fur). The catalogue of breeds is drawn
once from a seed and holds distinct breeds only (no two share all attributes,
ear and tail type, long fur and colour family). Each picture adds nuisance:
facing direction, position, zoom, small rotation, lighting, outdoor
background, pose (head, tail, stride, open mouth) and slight colour jitter.

>>> gen = DogGenerator()
>>> breed = gen.instance(3)
>>> gen.render(breed, 2, seed=0).shape
(2, 32, 32, 3)
"""

from __future__ import annotations

import numpy as np

from w2wkit.concepts.base import AttributeSpec, Instance
from w2wkit.concepts.drawing import Nuisance, Sketch, caption_of, compose, mix, palette_color, shade
from w2wkit.errors import W2WError

__all__ = ["DOG_ATTRIBUTES", "DOG_PARAMS", "DogGenerator"]

DOG_ATTRIBUTES: tuple[AttributeSpec, ...] = (
    AttributeSpec("large", "large", "big dog filling the picture", 0.45, True, "small"),
    AttributeSpec("dark_coat", "dark", "black, dark brown or dark grey fur", 0.35, True),
    AttributeSpec("floppy_ears", "floppy ears", "ears hanging down (else pricked)", 0.5),
    AttributeSpec("spotted", "a spotted coat", "round spots on body and head", 0.3),
    AttributeSpec("long_snout", "a long snout", "muzzle much longer than the head", 0.45),
    AttributeSpec("curly_coat", "a curly coat", "bumpy outline and curls", 0.3),
    AttributeSpec("short_legs", "short legs", "legs shorter than the body is tall", 0.3),
    AttributeSpec("two_tone", "a two-tone coat", "saddle of a second colour on the back", 0.35),
)

DOG_PARAMS: tuple[str, ...] = (
    "size",
    "body_len",
    "body_h",
    "leg_len",
    "head_r",
    "snout_len",
    "snout_h",
    "ear_len",
    "ear_round",
    "tail_type",
    "tail_len",
    "long_fur",
    "base_r",
    "base_g",
    "base_b",
    "second_r",
    "second_g",
    "second_b",
    "white_chest",
)

_DARK = [(0.08, 0.07, 0.07), (0.25, 0.14, 0.08), (0.22, 0.22, 0.24), (0.15, 0.1, 0.08)]
_LIGHT = [
    (0.93, 0.88, 0.76),  # cream
    (0.8, 0.6, 0.35),  # tan
    (0.9, 0.72, 0.35),  # golden
    (0.97, 0.97, 0.95),  # white
    (0.7, 0.7, 0.72),  # light grey
    (0.72, 0.4, 0.2),  # red-brown
    (0.85, 0.8, 0.7),  # fawn
]
_SKY = [(0.55, 0.72, 0.9), (0.75, 0.82, 0.9), (0.85, 0.85, 0.8), (0.6, 0.6, 0.65), (0.9, 0.8, 0.7)]
_GROUND = [
    (0.35, 0.55, 0.25),
    (0.5, 0.62, 0.3),
    (0.6, 0.52, 0.38),
    (0.55, 0.55, 0.55),
    (0.7, 0.65, 0.5),
]


def _sample_breed(rng: np.random.Generator) -> tuple[dict[str, bool], dict[str, float]]:
    u = rng.random
    large = u() < 0.45
    curly = u() < 0.3
    floppy = u() < (0.75 if curly else 0.42)
    long_snout = u() < (0.55 if large else 0.35)
    short_legs = u() < (0.12 if large else 0.45)
    dark = u() < 0.35
    spotted = u() < 0.3
    two_tone = u() < 0.35
    attrs = {
        "large": large,
        "dark_coat": dark,
        "floppy_ears": floppy,
        "spotted": spotted,
        "long_snout": long_snout,
        "curly_coat": curly,
        "short_legs": short_legs,
        "two_tone": two_tone,
    }
    base_i = int(rng.integers(len(_DARK) if dark else len(_LIGHT)))
    base = np.array((_DARK if dark else _LIGHT)[base_i]) + rng.normal(0, 0.03, 3)
    if dark:  # saddle lighter than a dark coat, darker than a light one
        second = np.array(_LIGHT[int(rng.integers(len(_LIGHT)))]) * rng.uniform(0.8, 1.0)
    else:
        second = np.array(_DARK[int(rng.integers(len(_DARK)))]) + rng.uniform(0, 0.08)
    params = {
        "size": rng.uniform(1.12, 1.25) if large else rng.uniform(0.78, 0.9),
        "body_len": rng.uniform(0.85, 1.2),
        "body_h": rng.uniform(0.85, 1.15),
        "leg_len": rng.uniform(0.4, 0.55) if short_legs else rng.uniform(0.85, 1.15),
        "head_r": rng.uniform(0.85, 1.15),
        "snout_len": rng.uniform(1.6, 2.2) if long_snout else rng.uniform(0.5, 0.9),
        "snout_h": rng.uniform(0.75, 1.1),
        "ear_len": rng.uniform(0.8, 1.3),
        "ear_round": float(rng.integers(2)),
        "tail_type": float(rng.integers(3)),  # up, curled, down
        "tail_len": rng.uniform(0.7, 1.3),
        "long_fur": float(u() < 0.3),
        "base_r": base[0],
        "base_g": base[1],
        "base_b": base[2],
        "second_r": second[0],
        "second_g": second[1],
        "second_b": second[2],
        "white_chest": float(u() < 0.3),
    }
    params = {
        k: float(np.clip(v, 0, 1)) if k[:5] in ("base_", "secon") else float(v)
        for k, v in params.items()
    }
    signature = (
        *attrs.values(),
        params["ear_round"],
        params["tail_type"],
        params["long_fur"],
        params["white_chest"],
        base_i,
    )
    params["_sig"] = signature  # type: ignore[assignment]
    return attrs, params


def _draw_dog(
    sk: Sketch,
    a: dict[str, bool],
    p: dict[str, float],
    rng: np.random.Generator,
) -> None:
    z = p["size"]
    base = np.clip(np.array([p["base_r"], p["base_g"], p["base_b"]]) + rng.normal(0, 0.02, 3), 0, 1)
    base = tuple(base)
    second = (p["second_r"], p["second_g"], p["second_b"])
    ground = 0.88
    rx = 0.2 * z * p["body_len"]
    ry = 0.085 * z * p["body_h"]
    ll = 0.16 * z * p["leg_len"]
    bx = 0.44 - 0.05 * (z - 1.0)
    by = ground - ll - 0.7 * ry
    leg_w = 0.045 * z
    stride = rng.uniform(-0.3, 0.3)
    curly, long_fur = a["curly_coat"], p["long_fur"] > 0.5
    # tail
    tl = 0.14 * z * p["tail_len"]
    tx, ty = bx - 0.92 * rx, by - 0.4 * ry
    wag = rng.uniform(-0.25, 0.25)
    tt = int(p["tail_type"])
    tail_w = 0.035 * z * (1.6 if long_fur or curly else 1.0)
    if tt == 1:
        sk.arc(tx - 0.4 * tl, ty - 0.5 * tl, 0.45 * tl, 0.45 * tl, 300, 200 + 360, base, tail_w)
    else:
        ang = (2.1 if tt == 0 else 3.7) + wag
        sk.line([(tx, ty), (tx + tl * np.cos(ang), ty - tl * np.sin(ang))], base, tail_w)
    # legs (far legs darker)
    for k, (off, far) in enumerate([(-0.62, True), (0.5, True), (-0.75, False), (0.65, False)]):
        col = shade(base, 0.8) if far else base
        lx = bx + off * rx + (stride if k % 2 else -stride) * 0.03
        sk.rect(lx - leg_w / 2, by, lx + leg_w / 2, ground, col, radius=leg_w * 0.3)
        if p["white_chest"] > 0.5:
            sk.rect(lx - leg_w / 2, ground - 0.03 * z, lx + leg_w / 2, ground, (0.95, 0.95, 0.93))
    # body
    sk.ellipse(bx, by, rx, ry, base)
    if long_fur:
        for k in range(7):
            fx = bx - 0.8 * rx + k * (1.6 * rx / 6)
            sk.line([(fx, by + 0.5 * ry), (fx + 0.01, by + 1.45 * ry)], base, 0.018 * z)
    if a["two_tone"]:
        sk.chord(bx, by + 0.05 * ry, 0.96 * rx, 0.95 * ry, 190, 350, second)
    # head
    hr = 0.088 * z * p["head_r"]
    hx = bx + 1.0 * rx + 0.2 * hr
    hy = by - ry - 0.55 * hr + rng.uniform(-0.3, 0.3) * hr
    sk.polygon(
        [
            (bx + 0.55 * rx, by - 0.8 * ry),
            (hx - 0.2 * hr, hy),
            (hx + 0.3 * hr, hy + 0.6 * hr),
            (bx + 0.9 * rx, by + 0.2 * ry),
        ],
        base,
    )
    if p["white_chest"] > 0.5:
        sk.ellipse(bx + 0.85 * rx, by + 0.1 * ry, 0.22 * rx, 0.55 * ry, (0.95, 0.95, 0.93))
    sk.ellipse(hx, hy, hr, hr, base)
    # snout
    sl = hr * p["snout_len"]
    sh = 0.55 * hr * p["snout_h"]
    sy = hy + 0.25 * hr
    sk.rect(hx, sy - sh / 2, hx + 0.5 * hr + sl, sy + sh / 2, shade(base, 0.97), radius=sh * 0.4)
    if rng.random() < 0.3:  # open mouth, tongue
        sk.rect(
            hx + 0.4 * hr,
            sy + 0.35 * sh,
            hx + 0.3 * hr + 0.6 * sl,
            sy + 0.8 * sh,
            (0.9, 0.35, 0.4),
            radius=0.01,
        )
    sk.ellipse(hx + 0.5 * hr + sl, sy - 0.2 * sh, 0.32 * hr, 0.28 * hr, (0.05, 0.03, 0.03))
    # eye
    sk.ellipse(hx + 0.35 * hr, hy - 0.3 * hr, 0.17 * hr, 0.17 * hr, (0.03, 0.02, 0.02))
    # spots, in a contrasting colour, placed anew in every picture
    if a["spotted"]:
        spot = (0.97, 0.97, 0.95) if a["dark_coat"] else (0.07, 0.06, 0.06)
        for _ in range(5):
            t = rng.uniform(0, 2 * np.pi)
            r = np.sqrt(rng.uniform(0.05, 0.6))
            sk.ellipse(bx + r * rx * np.cos(t), by + r * ry * np.sin(t), 0.07 * z, 0.055 * z, spot)
        sk.ellipse(hx - 0.2 * hr, hy + 0.1 * hr, 0.3 * hr, 0.25 * hr, spot)
    # curls: bumpy outline and dark curl marks
    if curly:
        curl_c = shade(base, 0.6) if not a["dark_coat"] else shade(mix(base, (1, 1, 1), 0.25), 1.0)
        for k in range(12):
            t = 2 * np.pi * k / 12 + rng.uniform(-0.1, 0.1)
            sk.ellipse(bx + rx * np.cos(t), by + ry * np.sin(t), 0.03 * z, 0.03 * z, base)
        for _ in range(14):
            cxk = bx + rng.uniform(-0.75, 0.75) * rx
            cyk = by + rng.uniform(-0.6, 0.6) * ry
            sk.arc(cxk, cyk, 0.02 * z, 0.02 * z, 0, 270, curl_c, 0.014)
        for k in range(5):
            t = np.pi + np.pi * k / 4
            sk.ellipse(
                hx + 0.9 * hr * np.cos(t), hy + 0.9 * hr * np.sin(t), 0.025 * z, 0.025 * z, base
            )
    # ears
    ear_c = second if a["two_tone"] else shade(base, 0.8)
    if a["dark_coat"] and not a["two_tone"]:  # keep dark ears visible on a dark head
        ear_c = mix(base, (0.55, 0.45, 0.38), 0.45)
    el = p["ear_len"]
    if a["floppy_ears"]:
        sk.ellipse(hx - 0.35 * hr, hy + 0.55 * hr * el, 0.42 * hr, 1.0 * hr * el, ear_c)
    else:
        tip = (hx - 0.05 * hr, hy - (1.0 + 0.9 * el) * hr)
        if p["ear_round"] > 0.5:
            sk.ellipse(tip[0], hy - 0.9 * hr * el - 0.3 * hr, 0.3 * hr, 0.75 * hr * el, ear_c)
        else:
            sk.polygon(
                [(hx - 0.6 * hr, hy - 0.5 * hr), tip, (hx + 0.35 * hr, hy - 0.55 * hr)], ear_c
            )


class DogGenerator:
    """A fixed catalogue of procedural dog breeds.

    Parameters
    ----------
    n_breeds : int
        Size of the catalogue (>= 200 by default).
    catalogue_seed : int
        Seed of the catalogue; instance ``seed`` arguments must equal it.
    supersample : int
        Supersampling factor of the drawing.
    """

    concept = "dog"
    attributes = DOG_ATTRIBUTES
    param_names = DOG_PARAMS

    def __init__(self, n_breeds: int = 240, catalogue_seed: int = 0, supersample: int = 4) -> None:
        self.n_breeds = int(n_breeds)
        self.catalogue_seed = int(catalogue_seed)
        self.supersample = supersample
        self._catalogue: list[Instance] | None = None

    @property
    def catalogue(self) -> list[Instance]:
        """All breeds, in order (drawn once, distinct by construction)."""
        if self._catalogue is None:
            rng = np.random.default_rng([self.catalogue_seed, 0xD06])
            seen: set[tuple] = set()
            out: list[Instance] = []
            while len(out) < self.n_breeds:
                attrs, params = _sample_breed(rng)
                sig = params.pop("_sig")  # type: ignore[arg-type]
                if sig in seen:
                    continue
                seen.add(sig)  # type: ignore[arg-type]
                out.append(Instance(self.concept, len(out), self.catalogue_seed, attrs, params))
            self._catalogue = out
        return self._catalogue

    def instance(self, index: int, seed: int | None = None) -> Instance:
        """Breed number ``index`` of the catalogue."""
        if seed is not None and int(seed) != self.catalogue_seed:
            return DogGenerator(self.n_breeds, int(seed), self.supersample).instance(index)
        if not 0 <= int(index) < self.n_breeds:
            raise W2WError(
                f"dog breed index {index} is outside the catalogue of {self.n_breeds} breeds",
                key="index",
            )
        return self.catalogue[int(index)]

    def instances(self, n: int, seed: int | None = None, start: int = 0) -> list[Instance]:
        """Breeds ``start`` .. ``start + n - 1``."""
        return [self.instance(i, seed) for i in range(start, start + n)]

    def render(
        self,
        instance: Instance,
        n_images: int,
        seed: int = 0,
        size: int = 32,
        canonical: bool = False,
    ) -> np.ndarray:
        """Pictures of one breed, shape ``(n_images, size, size, 3)`` uint8.

        ``canonical=True`` removes the placement, lighting and background
        nuisance (pose and spot placement still vary).
        """
        rng = np.random.default_rng([int(seed), int(instance.index), int(instance.seed), 0xD09])
        a = dict(instance.attributes)
        p = dict(instance.params)
        out = np.empty((n_images, size, size, 3), dtype=np.uint8)
        for i in range(n_images):
            nz = Nuisance.draw(
                rng, shift=0.04, zoom=0.06, rotation=5.0, flip=True, gain=(0.85, 1.1)
            )
            top = palette_color(rng, _SKY, 0.05)
            bot = palette_color(rng, _GROUND, 0.05)
            nz = Nuisance(
                **{
                    **nz.__dict__,
                    "bg_top": tuple(float(v) for v in top),
                    "bg_bottom": tuple(float(v) for v in bot),
                }
            )
            if canonical:
                nz = Nuisance(bg_top=(0.7, 0.75, 0.8), bg_bottom=(0.45, 0.55, 0.4))
            sk = Sketch(size, self.supersample)
            _draw_dog(sk, a, p, rng)
            out[i] = compose(sk, nz, center=(0.5, 0.6))
        return out

    def caption(
        self, instance: Instance, rng: np.random.Generator | None = None, drop: float = 0.0
    ) -> str:
        """E.g. ``"a photo of a large dog with floppy ears and a spotted coat"``."""
        return caption_of("dog", self.attributes, instance.attributes, rng, drop)
