"""Procedural identities: faces with CelebA-like attributes.

An identity is a ground-truth parameter vector: 13 binary attributes (sampled
with realistic correlations: beards go with men and wide jaws, baldness with
age and men, grey hair with age, lipstick with women...) and continuous
parameters (skin tone, hair and eye colour, geometry of the features). Each
picture adds nuisance: position, zoom, small rotation, lighting, background,
clothing and expression (smile, raised eyebrows).

>>> gen = IdentityGenerator()
>>> person = gen.instance(7, seed=0)
>>> images = gen.render(person, 4, seed=1)   # (4, 32, 32, 3) uint8
>>> gen.caption(person)                       # doctest: +SKIP
'a photo of a young male person with glasses and a beard'
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from w2wkit.concepts.base import AttributeSpec, Instance
from w2wkit.concepts.drawing import (
    Nuisance,
    Sketch,
    caption_of,
    compose,
    luminance,
    mix,
    palette_color,
    shade,
)

__all__ = [
    "IDENTITY_ATTRIBUTES",
    "IDENTITY_PARAMS",
    "TRANSIENT_ATTRIBUTES",
    "IdentityGenerator",
    "face_box",
    "plausible",
]

IDENTITY_ATTRIBUTES: tuple[AttributeSpec, ...] = (
    AttributeSpec("old", "old", "grey hair, forehead and cheek wrinkles", 0.25, True, "young"),
    AttributeSpec(
        "male", "male", "man (short hair, no lipstick, broader neck)", 0.5, True, "female"
    ),
    AttributeSpec("beard", "a beard", "full beard and moustache in a dark hair colour", 0.17),
    AttributeSpec("glasses", "glasses", "dark-framed glasses", 0.24),
    AttributeSpec("bald", "a bald head", "no hair on top of the head", 0.09),
    AttributeSpec("long_hair", "long hair", "hair falling to the shoulders", 0.4),
    AttributeSpec("dark_hair", "dark hair", "black or dark-brown hair", 0.45),
    AttributeSpec("pale_skin", "pale skin", "very light skin", 0.22),
    AttributeSpec("big_nose", "a big nose", "large, shaded nose", 0.33),
    AttributeSpec("narrow_eyes", "narrow eyes", "slit-like eyes", 0.3),
    AttributeSpec("wide_face", "a wide face", "broad face with a square jaw", 0.35),
    AttributeSpec("bushy_eyebrows", "bushy eyebrows", "thick dark eyebrows", 0.24),
    AttributeSpec("lipstick", "lipstick", "bright red lips", 0.27),
)

IDENTITY_PARAMS: tuple[str, ...] = (
    "skin_light",
    "skin_warm",
    "hair_r",
    "hair_g",
    "hair_b",
    "eye_r",
    "eye_g",
    "eye_b",
    "face_w",
    "face_h",
    "jaw",
    "eye_y",
    "eye_sep",
    "eye_size",
    "nose_len",
    "mouth_w",
    "lip_full",
    "brow_tilt",
    "ear_size",
    "hair_len",
    "hair_volume",
    "fringe",
    "parting",
    "glasses_round",
    "frame_r",
    "frame_g",
    "frame_b",
)

#: Attributes one person shows in some photos and not in others (grooming,
#: accessories, make-up, age): a face recogniser should see the same identity
#: through them. ``render(..., vary=p)`` toggles each with probability ``p``.
#: Toggling ``old`` there changes the drawing only (wrinkles); the grey hair of
#: old identities is a hair-colour parameter, which :meth:`IdentityGenerator.edited`
#: changes and the variation (which trained world v1.1's embedder) does not.
TRANSIENT_ATTRIBUTES: tuple[str, ...] = ("beard", "glasses", "lipstick", "old")

_EYES = [
    (0.25, 0.45, 0.75),
    (0.3, 0.55, 0.35),
    (0.35, 0.2, 0.1),
    (0.5, 0.4, 0.2),
    (0.45, 0.5, 0.55),
]
_FRAMES = [(0.05, 0.05, 0.05), (0.2, 0.1, 0.05), (0.1, 0.1, 0.3), (0.35, 0.05, 0.05)]
_CLOTHES = [
    (0.15, 0.2, 0.45),
    (0.55, 0.1, 0.1),
    (0.2, 0.45, 0.25),
    (0.9, 0.9, 0.9),
    (0.12, 0.12, 0.12),
    (0.7, 0.55, 0.2),
    (0.45, 0.2, 0.5),
    (0.3, 0.55, 0.65),
]
_GREY = (0.78, 0.78, 0.76)


def _sample_identity(rng: np.random.Generator) -> tuple[dict[str, bool], dict[str, float]]:
    """Attributes (correlated like CelebA's) and continuous parameters."""
    u = rng.random
    male = u() < 0.5
    old = u() < 0.25
    beard = male and u() < (0.4 if not old else 0.3)
    wide_face = u() < (0.75 if beard else (0.3 if male else 0.15))
    bald = u() < ((0.45 if old else 0.07) if male else 0.01)
    long_hair = (not bald) and u() < (0.1 if male else 0.75)
    pale_skin = u() < 0.22
    dark_hair = u() < (0.12 if old else (0.35 if pale_skin else 0.62))
    glasses = u() < (0.45 if old else 0.17)
    big_nose = u() < (0.45 if male else 0.15) + (0.15 if old else 0.0)
    narrow_eyes = u() < 0.3
    bushy = u() < (0.4 if male else 0.08)
    lipstick = (not male) and u() < 0.55
    attrs = {
        "male": male,
        "old": old,
        "beard": beard,
        "glasses": glasses,
        "bald": bald,
        "long_hair": long_hair,
        "dark_hair": dark_hair,
        "pale_skin": pale_skin,
        "big_nose": big_nose,
        "narrow_eyes": narrow_eyes,
        "wide_face": wide_face,
        "bushy_eyebrows": bushy,
        "lipstick": lipstick,
    }
    attrs = {spec.name: attrs[spec.name] for spec in IDENTITY_ATTRIBUTES}
    skin_light = rng.uniform(0.9, 1.0) if pale_skin else rng.uniform(0.2, 0.72)
    skin_warm = rng.uniform(0.0, 1.0)
    if dark_hair:
        hair = np.array([0.16, 0.1, 0.06]) * rng.uniform(0.4, 1.2) + rng.uniform(0, 0.03, 3)
    else:
        kind = rng.choice(3, p=[0.45, 0.15, 0.4])  # blond, red, light brown
        hair = [
            np.array([0.9, 0.75, 0.4]),
            np.array([0.7, 0.33, 0.15]),
            np.array([0.6, 0.42, 0.25]),
        ][kind] * rng.uniform(0.85, 1.1)
    if old:  # grey hair; dark hair stays dark (but greying a little)
        hair = np.asarray(
            mix(hair, _GREY, rng.uniform(0.1, 0.2) if dark_hair else rng.uniform(0.75, 0.95))
        )
    hair = np.clip(hair, 0, 1)
    eye = palette_color(rng, _EYES, 0.04)
    frame = np.clip(np.array(_FRAMES[int(rng.integers(len(_FRAMES)))]) + rng.uniform(0, 0.05), 0, 1)
    params = {
        "skin_light": skin_light,
        "skin_warm": skin_warm,
        "hair_r": hair[0],
        "hair_g": hair[1],
        "hair_b": hair[2],
        "eye_r": eye[0],
        "eye_g": eye[1],
        "eye_b": eye[2],
        "face_w": (rng.uniform(1.12, 1.22) if wide_face else rng.uniform(0.86, 0.96))
        * (1.03 if male else 1.0),
        "face_h": rng.uniform(0.94, 1.06),
        "jaw": rng.uniform(0.65, 1.0)
        if (wide_face or (beard and u() < 0.6))
        else rng.uniform(0, 0.35),
        "eye_y": rng.uniform(-0.03, 0.03),
        "eye_sep": rng.uniform(0.9, 1.1),
        "eye_size": rng.uniform(0.9, 1.15),
        "nose_len": rng.uniform(0.9, 1.1),
        "mouth_w": rng.uniform(0.85, 1.15),
        "lip_full": rng.uniform(0.0, 1.0),
        "brow_tilt": rng.uniform(-1.0, 1.0),
        "ear_size": rng.uniform(0.8, 1.25),
        "hair_len": rng.uniform(0.0, 1.0),
        "hair_volume": rng.uniform(0.0, 1.0),
        "fringe": rng.uniform(0.0, 1.0),
        "parting": rng.uniform(-1.0, 1.0),
        "glasses_round": rng.uniform(0.0, 1.0),
        "frame_r": frame[0],
        "frame_g": frame[1],
        "frame_b": frame[2],
    }
    return attrs, {k: float(params[k]) for k in IDENTITY_PARAMS}


def _skin(p: dict[str, float]) -> tuple[float, float, float]:
    light = p["skin_light"]
    dark = np.array([0.36, 0.22, 0.14])
    lightc = np.array([0.98, 0.86, 0.76])
    base = dark + light * (lightc - dark)
    warm = p["skin_warm"]
    base = base * np.array([1 + 0.04 * warm, 1.0, 1 - 0.06 * warm])
    return tuple(float(v) for v in np.clip(base, 0, 1))  # type: ignore[return-value]


# geometry of a face at zoom 1: centre and half-sizes (normalised picture units)
_CX, _CY, _FW, _FH = 0.5, 0.45, 0.215, 0.275


def face_box(size: int = 32) -> tuple[int, int, int, int]:
    """Pixel box ``(x0, y0, x1, y1)`` that holds the face (hair and beard) at zoom 1."""
    return (
        int((_CX - 1.45 * _FW) * size),
        int((_CY - 1.3 * _FH) * size),
        int(np.ceil((_CX + 1.45 * _FW) * size)),
        int(np.ceil((_CY + 1.25 * _FH) * size)),
    )


def _draw_face(
    sk: Sketch,
    a: dict[str, bool],
    p: dict[str, float],
    clothes: Sequence[float],
    smile: float,
    raise_: float,
) -> None:
    cx, cy = _CX, _CY
    fw, fh = _FW * p["face_w"], _FH * p["face_h"]
    skin = _skin(p)
    hair = (p["hair_r"], p["hair_g"], p["hair_b"])
    male, old = a["male"], a["old"]
    # torso and neck
    sk.ellipse(cx, cy + 2.25 * fh, 2.4 * _FW, 1.15 * fh, clothes)
    # long hair behind the head, falling on the shoulders
    if a["long_hair"]:
        bottom = cy + fh * (1.35 + 0.35 * p["hair_len"])
        sk.rect(cx - 1.3 * fw, cy - 0.9 * fh, cx + 1.3 * fw, bottom, hair, radius=0.6 * fw)
    neck_w = fw * (0.5 if male else 0.4)
    sk.rect(cx - neck_w, cy + 0.5 * fh, cx + neck_w, cy + 1.45 * fh, shade(skin, 0.82))
    # ears
    er = 0.16 * _FW * p["ear_size"]
    for side in (-1, 1):
        sk.ellipse(cx + side * 0.97 * fw, cy + 0.02 * fh, er, 1.6 * er, shade(skin, 0.92))
    # face: ellipse, squared off at the jaw for wide faces
    sk.ellipse(cx, cy, fw, fh, skin)
    jaw = p["jaw"]
    if jaw > 0.5:
        jw = fw * (0.55 + 0.4 * jaw)
        sk.rect(cx - jw, cy, cx + jw, cy + 0.97 * fh, skin, radius=0.35 * fw)
    if male:  # stubble shadow on the jaw
        sk.chord(cx, cy + 0.2 * fh, 0.95 * fw, 0.78 * fh, 10, 170, shade(skin, 0.88))
    else:  # rosy cheeks
        for side in (-1, 1):
            sk.ellipse(
                cx + side * 0.55 * fw,
                cy + 0.3 * fh,
                0.18 * fw,
                0.1 * fh,
                (0.9, 0.45, 0.45),
                alpha=0.45,
            )
    # wrinkles of age
    wrinkle = shade(skin, 0.62)
    if old:
        for k in range(2):
            y = cy - fh * (0.5 - 0.14 * k)
            sk.line([(cx - 0.5 * fw, y), (cx + 0.5 * fw, y)], wrinkle, 0.018)
        for side in (-1, 1):
            sk.line(
                [(cx + side * 0.33 * fw, cy + 0.15 * fh), (cx + side * 0.5 * fw, cy + 0.6 * fh)],
                wrinkle,
                0.018,
            )
            sk.line(
                [(cx + side * 0.75 * fw, cy - 0.2 * fh), (cx + side * 0.9 * fw, cy - 0.05 * fh)],
                wrinkle,
                0.014,
            )
    # beard (lower face) in a colour that contrasts with the skin
    if a["beard"]:
        bc = shade(hair, 0.7)
        if luminance(skin) - luminance(bc) < 0.3:
            bc = shade(bc, max(0.15, (luminance(skin) - 0.3) / max(luminance(bc), 1e-3)))
        sk.chord(cx, cy + 0.1 * fh, 1.0 * fw, 0.98 * fh, 0, 180, bc)
        if jaw > 0.5:
            jw = fw * (0.55 + 0.4 * jaw)
            sk.rect(cx - jw, cy + 0.15 * fh, cx + jw, cy + 1.05 * fh, bc, radius=0.35 * fw)
        sk.ellipse(cx, cy + 0.38 * fh, 0.45 * fw, 0.13 * fh, bc)  # moustache
    # hair on top
    hairline = cy - fh * (0.5 - 0.28 * p["fringe"] * (0 if a["bald"] else 1))
    top = cy - fh * (1.05 + 0.12 * p["hair_volume"])
    if not a["bald"]:
        sk.chord(cx, hairline, 1.1 * fw, hairline - top, 180, 360, hair)
        if not a["long_hair"]:  # sideburns
            for side in (-1, 1):
                sk.rect(
                    cx + side * 0.98 * fw - 0.1 * fw,
                    hairline - 0.02,
                    cx + side * 0.98 * fw + 0.1 * fw,
                    cy - 0.05 * fh,
                    hair,
                )
        else:  # hair framing the face
            for side in (-1, 1):
                sk.rect(
                    cx + side * 1.02 * fw - 0.12 * fw,
                    hairline - 0.02,
                    cx + side * 1.02 * fw + 0.14 * fw,
                    cy + 0.9 * fh,
                    hair,
                    radius=0.1 * fw,
                )
        # parting
        px = cx + 0.4 * fw * p["parting"]
        sk.line([(px, top + 0.25 * (hairline - top)), (px, hairline)], shade(hair, 0.7), 0.01)
    else:
        # shiny scalp and a rim of hair above the ears
        sk.ellipse(cx - 0.2 * fw, cy - 0.72 * fh, 0.3 * fw, 0.12 * fh, shade(skin, 1.15))
        for side in (-1, 1):
            sk.ellipse(cx + side * 0.93 * fw, cy - 0.22 * fh, 0.14 * fw, 0.25 * fh, hair)
    # eyes
    ey = cy - fh * (0.1 - p["eye_y"])
    ex = 0.42 * fw * p["eye_sep"]
    erx = 0.19 * _FW * p["eye_size"]
    ery = erx * (0.3 if a["narrow_eyes"] else 0.78)
    iris = (p["eye_r"], p["eye_g"], p["eye_b"])
    brow_c = shade(hair, 0.55) if a["bushy_eyebrows"] else mix(shade(hair, 0.8), skin, 0.25)
    brow_w = 0.055 if a["bushy_eyebrows"] else 0.02
    for side in (-1, 1):
        x = cx + side * ex
        if a["narrow_eyes"]:
            sk.ellipse(x, ey, erx * 1.05, ery, (0.15, 0.1, 0.1))
        else:
            sk.ellipse(x, ey, erx, ery, (0.96, 0.96, 0.96))
            sk.ellipse(x, ey, 0.62 * ery, 0.9 * ery, iris)
            sk.ellipse(x, ey, 0.3 * ery, 0.4 * ery, (0.02, 0.02, 0.02))
        if not male:  # lashes
            sk.arc(x, ey, erx * 1.05, ery * 1.1, 200, 340, (0.05, 0.03, 0.03), 0.014)
        by = ey - 0.23 * fh - 0.06 * fh * raise_
        tilt = 0.03 * fh * p["brow_tilt"]
        sk.line(
            [(x - side * 1.2 * erx, by + tilt), (x + side * 1.25 * erx, by - tilt)],
            brow_c,
            brow_w,
        )
    # nose
    big = a["big_nose"]
    nw = fw * (0.3 if big else 0.14)
    nl = fh * (0.42 if big else 0.3) * p["nose_len"]
    ny = ey + 0.08 * fh
    nose_c = shade(skin, 0.68 if big else 0.84)
    sk.polygon([(cx, ny), (cx - nw, ny + nl), (cx + nw, ny + nl)], nose_c)
    if big:
        sk.ellipse(cx, ny + nl * 0.9, nw * 0.85, 0.09 * fh, nose_c)
    # mouth
    my = cy + 0.62 * fh
    mw = 0.36 * fw * p["mouth_w"]
    lip = (0.85, 0.05, 0.15) if a["lipstick"] else mix(shade(skin, 0.6), (0.6, 0.2, 0.2), 0.4)
    thick = (0.045 if a["lipstick"] else 0.022) * (1 + 0.3 * p["lip_full"])
    if smile > 0.15:
        sk.arc(cx, my - 0.1 * fh * smile, mw, 0.14 * fh * smile, 15, 165, lip, thick)
    else:
        sk.line([(cx - mw, my), (cx + mw, my)], lip, thick)
    # glasses
    if a["glasses"]:
        frame = (p["frame_r"], p["frame_g"], p["frame_b"])
        gr = 0.32 * fw
        width = 0.035
        for side in (-1, 1):
            x = cx + side * ex
            if p["glasses_round"] > 0.5:
                sk.ellipse(x, ey, gr, 0.8 * gr, None, outline=frame, width=width)
            else:
                sk.rect(x - gr, ey - 0.7 * gr, x + gr, ey + 0.7 * gr, None, 0.2 * gr, frame, width)
            sk.line([(x + side * gr, ey), (cx + side * 1.0 * fw, ey - 0.02)], frame, width * 0.7)
        sk.line([(cx - ex + gr, ey), (cx + ex - gr, ey)], frame, width * 0.8)


def plausible(attributes: dict[str, bool], name: str) -> bool:
    """Whether attribute ``name`` may be toggled on this identity (no beards on women,
    no lipstick on men: the population never shows them)."""
    if name == "beard":
        return bool(attributes["male"])
    if name == "lipstick":
        return not attributes["male"]
    return True


def _toggles(a: dict[str, bool], rng: np.random.Generator, p: float) -> list[str]:
    """The transient attributes to toggle on one picture (each with probability ``p``,
    where plausible)."""
    toggle = rng.random(len(TRANSIENT_ATTRIBUTES)) < p  # always drawn: a fixed stream
    return [
        name
        for name, t in zip(TRANSIENT_ATTRIBUTES, toggle, strict=True)
        if t and plausible(a, name)
    ]


class IdentityGenerator:
    """Procedural identities (faces) with CelebA-like attributes.

    Parameters
    ----------
    supersample : int
        Supersampling factor of the drawing (4 is plenty).
    """

    concept = "identity"
    attributes = IDENTITY_ATTRIBUTES
    param_names = IDENTITY_PARAMS

    def __init__(self, supersample: int = 4) -> None:
        self.supersample = supersample

    def instance(self, index: int, seed: int = 0) -> Instance:
        """Identity number ``index`` of the population drawn with ``seed``."""
        rng = np.random.default_rng([int(seed), int(index), 0x1D])
        attrs, params = _sample_identity(rng)
        return Instance(self.concept, int(index), int(seed), attrs, params)

    def edited(self, instance: Instance, name: str, value: bool = True) -> Instance:
        """The same identity with attribute ``name`` set to ``value``.

        Where the population ties a parameter to the attribute, it follows:
        growing old greys the hair as in sampling (to the middle of the
        sampled range: 15% grey for dark hair, 85% otherwise); becoming young
        again inverts that. Other attributes change the drawing only.
        """
        a = {**instance.attributes, name: bool(value)}
        p = dict(instance.params)
        if name == "old" and bool(value) != bool(instance.attributes["old"]):
            t = 0.15 if a["dark_hair"] else 0.85
            hair = np.array([p["hair_r"], p["hair_g"], p["hair_b"]])
            grey = np.asarray(_GREY)
            hair = hair + t * (grey - hair) if value else (hair - t * grey) / (1.0 - t)
            p.update(zip(("hair_r", "hair_g", "hair_b"), np.clip(hair, 0, 1).tolist(), strict=True))
        return Instance(instance.concept, instance.index, instance.seed, a, p)

    def instances(self, n: int, seed: int = 0, start: int = 0) -> list[Instance]:
        """Identities ``start`` .. ``start + n - 1``."""
        return [self.instance(i, seed) for i in range(start, start + n)]

    def render(
        self,
        instance: Instance,
        n_images: int,
        seed: int = 0,
        size: int = 32,
        canonical: bool = False,
        vary: float = 0.0,
        vary_tied: bool = True,
    ) -> np.ndarray:
        """Pictures of one identity, shape ``(n_images, size, size, 3)`` uint8.

        ``canonical=True`` removes the nuisance (centred, upright, even grey
        light and background, neutral expression, grey clothes).
        ``vary > 0`` toggles each of :data:`TRANSIENT_ATTRIBUTES` per picture
        with that probability (beards only on men, lipstick only on women), as
        photos of one person differ: the training set of an identity embedder
        that should not call a shaved or bespectacled person someone else. The
        nuisance of each picture is the same as with ``vary=0``. With
        ``vary_tied`` (default) a toggle is :meth:`edited`'s, so that ageing
        also greys the hair as in the population; ``vary_tied=False`` toggles
        the flag only (wrinkles), as world v1.1's embedder was trained.
        """
        rng = np.random.default_rng([int(seed), int(instance.index), int(instance.seed), 0xFACE])
        vrng = np.random.default_rng([int(seed), int(instance.index), int(instance.seed), 0x7A47])
        out = np.empty((n_images, size, size, 3), dtype=np.uint8)
        for i in range(n_images):
            a, p = dict(instance.attributes), dict(instance.params)
            if vary > 0:
                inst = instance
                for name in _toggles(a, vrng, vary):
                    if vary_tied:
                        inst = self.edited(inst, name, not inst.attributes[name])
                    else:
                        flags = {**inst.attributes, name: not inst.attributes[name]}
                        inst = dataclasses.replace(inst, attributes=flags)
                a, p = dict(inst.attributes), dict(inst.params)
            nz = Nuisance.draw(rng, shift=0.05, zoom=0.07, rotation=7.0, gain=(0.88, 1.1))
            clothes = palette_color(rng, _CLOTHES, 0.05)
            smile = float(rng.uniform(-0.2, 1.0))
            raise_ = float(rng.uniform(0.0, 1.0))
            if canonical:
                nz, clothes, smile, raise_ = Nuisance(), np.array([0.4, 0.4, 0.45]), 0.0, 0.3
            sk = Sketch(size, self.supersample)
            _draw_face(sk, a, p, clothes, smile, raise_)
            out[i] = compose(sk, nz, center=(_CX, _CY))
        return out

    def caption(
        self, instance: Instance, rng: np.random.Generator | None = None, drop: float = 0.0
    ) -> str:
        """E.g. ``"a photo of an old male person with glasses and a beard"``."""
        a = instance.attributes
        skip = ("dark_hair",) if a["bald"] else ()
        return caption_of("person", self.attributes, a, rng, drop, skip)
