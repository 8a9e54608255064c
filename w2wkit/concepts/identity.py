"""Built-in concept pack: people's identities (the paper's main concept)."""

from __future__ import annotations

import numpy as np

from w2wkit.concepts.base import SimplePack
from w2wkit.world.identity import IDENTITY_ATTRIBUTES, IdentityGenerator, face_box, plausible

__all__ = ["PACK", "face_mask"]


def face_mask(images: np.ndarray) -> np.ndarray:
    """Soft elliptic mask of the face region of centred portraits.

    Parameters
    ----------
    images : numpy.ndarray
        Shape ``(n, H, W, 3)`` (or ``(n, H, W)``); only the shape is used.

    Returns
    -------
    numpy.ndarray
        Shape ``(n, H, W)``, float32 in [0, 1]: 1 inside the face (hair and
        beard included), falling to 0 over a few pixels.
    """
    n, h, w = images.shape[:3]
    x0, y0, x1, y1 = face_box(100)
    cx, cy = (x0 + x1) / 200.0, (y0 + y1) / 200.0
    rx, ry = (x1 - x0) / 200.0, (y1 - y0) / 200.0
    ys = (np.arange(h) + 0.5) / h
    xs = (np.arange(w) + 0.5) / w
    r = np.sqrt(((xs[None, :] - cx) / rx) ** 2 + ((ys[:, None] - cy) / ry) ** 2)
    soft = 3.0 / max(h, w) / min(rx, ry)  # about 3 pixels of fall-off
    m = np.clip((1.0 + soft - r) / soft, 0.0, 1.0).astype(np.float32)
    return np.broadcast_to(m, (n, h, w)).copy()


PACK = SimplePack(
    name="identity",
    instance_prompt="sks person",
    class_prompt="person",
    attributes=IDENTITY_ATTRIBUTES,
    n_components=1000,
    n_components_inversion=10000,
    description="people's identities (faces) with CelebA-like attributes",
    make_generator=IdentityGenerator,
    mask_maker=face_mask,
    plausible_rule=plausible,
)
