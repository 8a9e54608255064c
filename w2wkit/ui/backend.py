"""What the ``w2wkit ui`` page does, without Gradio: one :class:`Backend` per server.

The backend holds what every browser session shares and never changes (the
space, the renderer, the classifier); a :class:`Session` holds what one browser
session works on (its current model and the pictures of it already rendered).
Every method raises :class:`~w2wkit.errors.W2WError` with one line for bad
input; the page shows that line.

Rendering and inversion use the one pipeline, so they run one at a time (a
lock); Gradio's queue orders the jobs of all sessions.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import threading
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from w2wkit.errors import FormatError, W2WError

__all__ = ["Backend", "Session", "check_picture", "check_upload"]

#: Largest upload accepted by default (pictures and LoRA files), in bytes.
MAX_UPLOAD_BYTES = 32 * 2**20
#: Largest picture accepted, in pixels (a decompression bomb is refused before decoding).
MAX_PIXELS = 4096 * 4096
#: Pictures are shown this many times larger than rendered (nearest neighbour).
MIN_SHOWN = 128
#: Edited pictures kept per session (a slider moved back shows them at once).
EDIT_CACHE = 16


def check_upload(path: str | os.PathLike[str] | None, limit: int, what: str) -> Path:
    """An uploaded file that exists and is at most ``limit`` bytes (one line otherwise)."""
    if path is None or not str(path):
        raise W2WError(f"no {what} uploaded")
    p = Path(path)
    if not p.is_file():
        raise FormatError(f"the uploaded {what} is not a file", path=p.name)
    size = p.stat().st_size
    if size > limit:
        raise FormatError(
            f"the uploaded {what} is {size / 2**20:.1f} MB; at most {limit / 2**20:.1f} MB "
            "is accepted",
            path=p.name,
        )
    return p


def check_picture(path: str | os.PathLike[str] | None, limit: int = MAX_UPLOAD_BYTES) -> Path:
    """An uploaded picture: size-limited, decodable by Pillow, not oversized in pixels."""
    from PIL import Image, UnidentifiedImageError

    p = check_upload(path, limit, "picture")
    try:
        with Image.open(p) as im:
            w, h = im.size
            if w * h > MAX_PIXELS:
                raise FormatError(
                    f"the picture is {w}x{h} pixels; at most {MAX_PIXELS:,} pixels are accepted",
                    path=p.name,
                )
            im.verify()
    except FormatError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        raise FormatError(
            "this is not a picture Pillow can read (PNG, JPEG...)", path=p.name
        ) from None
    return p


def _upscale(strip: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` uint8 enlarged by an integer factor to at least :data:`MIN_SHOWN` px tall."""
    f = max(1, math.ceil(MIN_SHOWN / strip.shape[0]))
    return np.repeat(np.repeat(strip, f, axis=0), f, axis=1)


def _strip(images: np.ndarray) -> np.ndarray:
    """``(n, H, W, 3)`` floats in [0, 1] -> one uint8 picture, side by side with 2 px gaps."""
    u8 = (np.clip(images, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    n, h, w, _ = u8.shape
    out = np.full((h, n * w + 2 * (n - 1), 3), 255, np.uint8)
    for i in range(n):
        out[:, i * (w + 2) : i * (w + 2) + w] = u8[i]
    return _upscale(out)


def _active(strengths: Mapping[str, float]) -> tuple[tuple[str, float], ...]:
    """The non-zero strengths, sorted by name (a cache key)."""
    return tuple(sorted((n, float(s)) for n, s in strengths.items() if float(s) != 0.0))


@dataclass
class Session:
    """One browser session's state (kept in ``gr.State``; deep-copied per session).

    Attributes
    ----------
    model : Adapter or None
        The model being edited (``None`` until one is sampled, inverted or loaded).
    source : str
        Where it came from, for the page ("sample seed 3, temperature 1.0").
    originals : dict
        Render settings -> pictures of the unedited model, ``(seeds, H, W, 3)``.
    edits : dict
        ``(render settings, strengths, keep, injection)`` -> pictures of the
        edited model, the last :data:`EDIT_CACHE` ones (moving a slider back
        to a value shown before renders nothing).
    probs0 : dict
        Render settings -> classifier probabilities of the original's pictures.
    workdir : str
        This session's download folder (created on first download).
    """

    model: Any = None
    source: str = ""
    originals: dict[Any, np.ndarray] = field(default_factory=dict)
    edits: dict[Any, np.ndarray] = field(default_factory=dict)
    probs0: dict[Any, np.ndarray] = field(default_factory=dict)
    workdir: str = ""

    def set_model(self, model: Any, source: str) -> None:
        """Make ``model`` the session's model (forgets the pictures of the previous one)."""
        self.model = model
        self.source = source
        self.originals = {}
        self.edits = {}
        self.probs0 = {}


@dataclass
class View:
    """Render settings of the pictures on the page."""

    prompt: str
    seeds: tuple[int, ...] = (0, 1, 2, 3)
    steps: int = 20
    guidance: float = 3.0

    def key(self) -> tuple[Any, ...]:
        return (self.prompt, self.seeds, self.steps, self.guidance)


class Backend:
    """Everything the page offers, for one space and one pipeline.

    Parameters
    ----------
    space : WeightSpace
        Fitted, with directions (calibrated or not).
    renderer : w2wkit.render.Renderer
    prompt : str
        Default prompt of the pictures.
    pack : ConceptPack, optional
        Mask of inversion, plausibility; ``None`` for a space of no known concept.
    classifier : Classifier, optional
        Shows the attribute probabilities before and after an edit.
    max_upload_bytes : int
    workroot : path, optional
        Where session download folders go (default: a new temporary folder).
    """

    def __init__(
        self,
        space: Any,
        renderer: Any,
        *,
        prompt: str,
        pack: Any = None,
        classifier: Any = None,
        max_upload_bytes: int = MAX_UPLOAD_BYTES,
        workroot: str | os.PathLike[str] | None = None,
        description: str = "",
    ) -> None:
        self.space = space
        self.renderer = renderer
        self.prompt = prompt
        self.pack = pack
        self.classifier = classifier
        self.max_upload_bytes = int(max_upload_bytes)
        self.workroot = Path(workroot or tempfile.mkdtemp(prefix="w2wkit-ui-"))
        self.description = description
        self.lock = threading.Lock()

    # ------------------------------------------------------------------ directions
    def directions(self) -> list[tuple[str, dict[str, Any]]]:
        """``(name, strength_range)`` of every direction, in the space's order."""
        from w2wkit.edits import strength_range

        return [(n, strength_range(d)) for n, d in self.space.directions_.items()]

    # ------------------------------------------------------------------ models
    def sample(self, session: Session, seed: int, temperature: float) -> str:
        """A new model drawn from the space; returns a line for the page."""
        seed = int(seed)
        coef = self.space.sample(1, seed=seed, temperature=float(temperature))
        model = self.space.inverse_transform(coef)[0]
        session.set_model(model, f"sampled model (seed {seed}, temperature {float(temperature):g})")
        return session.source

    def load_lora(self, session: Session, path: Any) -> str:
        """A LoRA file made the session's model (edits keep its part outside the space)."""
        from w2wkit.formats.registry import read_adapter

        p = check_upload(path, self.max_upload_bytes, "LoRA file")
        ad = read_adapter(p)
        coef = self.space.transform(ad)
        err = float(np.asarray(self.space.residual(ad)).reshape(-1)[0])
        session.set_model(ad, f"LoRA file {Path(str(path)).name}")
        return (
            f"{session.source}: projected onto {coef.shape[1]} components "
            f"(relative residual outside the space {err:.3f}; edits keep it)"
        )

    def invert(
        self,
        session: Session,
        path: Any,
        *,
        steps: int | None = None,
        n_components: int | None = None,
        use_mask: bool = True,
        progress: Callable[[int, int, float], None] | None = None,
    ) -> str:
        """Invert an uploaded picture into a model of the space."""
        from w2wkit.invert import invert, load_images

        p = check_picture(path, self.max_upload_bytes)
        notes: list[str] = []
        pipe = self.renderer.pipe
        vsf = getattr(pipe, "vae_scale_factor", 8)
        side = int(pipe.unet.config.sample_size * vsf)
        img, _, _ = load_images(p, (side, side), notice=notes.append)
        mask = None
        if use_mask and self.pack is not None:
            mask = self.pack.mask((img * 255).astype(np.uint8))
        with self.lock:
            res = invert(
                self.space,
                pipe,
                img,
                n_components=int(n_components) if n_components else None,
                steps=int(steps) if steps else None,
                mask=mask,
                prompt=self.prompt,
                concept=self.pack,
                device=self.renderer.device,
                dtype=self.renderer.dtype,  # the renderer's pipeline keeps its dtype
                progress=progress or False,
                notice=notes.append,
            )
        session.set_model(res.adapters[0], f"inverted picture {p.name}")
        k = int(res.settings["n_components"])
        note = f" ({'; '.join(notes)})" if notes else ""
        return (
            f"{session.source}: {int(res.steps_run[0])} steps, {k} components, "
            f"{res.seconds:.1f} s{note}"
        )

    # ------------------------------------------------------------------ edits
    def edited(
        self, session: Session, strengths: Mapping[str, float], keep: Sequence[str] = ()
    ) -> Any:
        """The session's model edited (``None`` strengths all zero -> the model itself)."""
        if session.model is None:
            raise W2WError("no model yet: sample one, upload a picture or load a LoRA file")
        active = {n: float(s) for n, s in strengths.items() if float(s) != 0.0}
        if not active:
            return session.model
        return self.space.edit(session.model, active, orthogonal_to=list(keep))

    def pictures(
        self,
        session: Session,
        strengths: Mapping[str, float],
        keep: Sequence[str] = (),
        *,
        view: View,
        inject_t: float | None = None,
    ) -> tuple[np.ndarray, np.ndarray, str]:
        """Original and edited pictures over ``view.seeds``, side by side strips, and a note.

        The original's pictures are rendered once per view and kept in the
        session: moving a slider renders only the edited model.
        """
        orig, new = self._render(session, strengths, keep, view=view, inject_t=inject_t)
        return _strip(orig), _strip(new), self.probabilities(session, strengths, view=view)

    def edited_strip(
        self,
        session: Session,
        strengths: Mapping[str, float],
        keep: Sequence[str] = (),
        *,
        view: View,
        inject_t: float | None = None,
    ) -> np.ndarray:
        """Only the edited pictures (a slider moved): one strip, ``(H', W', 3)`` uint8.

        What a slider's move waits for; the probabilities and the nearest
        models follow in a second event (:meth:`probabilities`, :meth:`nearest`).
        """
        _, new = self._render(session, strengths, keep, view=view, inject_t=inject_t)
        return _strip(new)

    def _render(
        self,
        session: Session,
        strengths: Mapping[str, float],
        keep: Sequence[str],
        *,
        view: View,
        inject_t: float | None,
    ) -> tuple[np.ndarray, np.ndarray]:
        edited = self.edited(session, strengths, keep)
        kw = {
            "prompts": view.prompt,
            "seeds": list(view.seeds),
            "steps": int(view.steps),
            "guidance": float(view.guidance),
        }
        inj = None if inject_t is None or inject_t >= 1000 else float(inject_t)
        with self.lock:
            key = view.key()
            if key not in session.originals:
                res = self.renderer.render([session.model], **kw)
                session.originals = {key: res.images[0, 0]}
                session.probs0 = {}
            orig = session.originals[key]
            if edited is session.model:
                return orig, orig
            ekey = (key, _active(strengths), tuple(sorted(keep)), inj)
            new = session.edits.pop(ekey, None)
            if new is None:
                if inj is not None:
                    res = self.renderer.render([session.model], edited=[edited], inject_t=inj, **kw)
                else:
                    res = self.renderer.render([edited], **kw)
                new = res.images[0, 0]
            session.edits[ekey] = new  # most recent last
            while len(session.edits) > EDIT_CACHE:
                session.edits.pop(next(iter(session.edits)))
        return orig, new

    def probabilities(
        self,
        session: Session,
        strengths: Mapping[str, float],
        keep: Sequence[str] = (),
        *,
        view: View,
        inject_t: float | None = None,
    ) -> str:
        """The classifier's probabilities of the moved attributes, original -> edited.

        Uses the pictures already rendered (renders them when they are not).
        """
        names = [n for n, s in strengths.items() if float(s) != 0.0]
        clf = self.classifier
        if clf is None or not names:
            return ""
        cols = [(n, clf.attributes.index(n)) for n in names if n in clf.attributes]
        if not cols:
            return ""
        orig, new = self._render(session, strengths, keep, view=view, inject_t=inject_t)
        u8 = lambda x: (np.clip(x, 0, 1) * 255 + 0.5).astype(np.uint8)  # noqa: E731
        key = view.key()
        if key not in session.probs0:
            session.probs0[key] = clf.attribute_probs(u8(orig))
        p0, p1 = session.probs0[key], clf.attribute_probs(u8(new))
        parts = [f"{n} {p0[:, j].mean():.2f} -> {p1[:, j].mean():.2f}" for n, j in cols]
        return "classifier probability, original -> edited: " + ", ".join(parts)

    def nearest(
        self, session: Session, strengths: Mapping[str, float], keep: Sequence[str] = (), n: int = 5
    ) -> list[tuple[str, float]]:
        """Training models nearest the edited model (coefficient cosine)."""
        ad = self.edited(session, strengths, keep)
        coef = self.space.transform(ad)
        return [(name, float(sim)) for _, name, sim in self.space.nearest(coef, n=n)[0]]

    def export(
        self,
        session: Session,
        strengths: Mapping[str, float],
        keep: Sequence[str] = (),
        *,
        format: str = "diffusers",
        target: str | None = None,
    ) -> list[str]:
        """Write the edited model and its coefficients; the file paths.

        ``target`` (a loader of :data:`w2wkit.formats.targets.TARGETS`: comfyui, a1111,
        kohya-scripts, diffusers, peft) picks the format that loader reads completely
        and overrides ``format``.
        """
        from w2wkit.formats.registry import write_adapter
        from w2wkit.formats.targets import target_format

        if target:
            format = target_format(target)
        ad = self.edited(session, strengths, keep)
        notes: list[str] = []
        if not session.workdir:
            session.workdir = tempfile.mkdtemp(prefix="session-", dir=self.workroot)
        folder = Path(tempfile.mkdtemp(prefix="download-", dir=session.workdir))
        active = {n: float(s) for n, s in strengths.items() if float(s) != 0.0}
        stem = "model" + "".join(f"_{n}{s:+.2f}" for n, s in active.items())
        out = write_adapter(
            ad,
            folder / (stem if format == "peft" else f"{stem}.safetensors"),
            format=format,
            target=target or None,
            warn=notes.append,  # folded alphas, what a named loader would drop
        )
        if out.is_dir():  # a folder (PEFT) travels as one zip
            zpath = folder / f"{stem}_peft.zip"
            with zipfile.ZipFile(zpath, "w") as z:
                for f in sorted(out.rglob("*")):
                    if f.is_file():
                        z.write(f, f.relative_to(out.parent))
            out = zpath
        coef = self.space.transform(ad)[0]
        meta = {
            "source": session.source,
            "edits": active,
            "orthogonal_to": list(keep),
            "format": format,
            "for": target,
            "notes": notes,
            "n_components": int(coef.shape[0]),
            "coefficients": [float(x) for x in coef],
        }
        cpath = folder / f"{stem}_coefficients.json"
        cpath.write_text(json.dumps(meta, allow_nan=False))
        return [str(out), str(cpath)]
