"""What the sections of one evaluation run share: :class:`EvalContext` and :func:`fit_space`."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from w2wkit.errors import W2WError
from w2wkit.evaluation.calibration import calibration_pool_size, check_calibration_pool
from w2wkit.evaluation.metrics import to_uint8
from w2wkit.evaluation.settings import EvalSettings
from w2wkit.evaluation.worlds import PHOTO_PROMPT, EvalWorld

__all__ = ["EvalContext", "fit_space", "torch_threads"]


class EvalContext:
    """State and tools shared by the sections of one evaluation run.

    Parameters
    ----------
    world : EvalWorld
    s : EvalSettings
    out : pathlib.Path
        Output folder; grids go to ``out/images``.
    progress : w2wkit.progress.Tasks or None
        From :func:`~w2wkit.evaluation.progress.progress_bar` (None: silent).

    Attributes
    ----------
    w : EvalWorld
    s : EvalSettings
    out : pathlib.Path
    p : w2wkit.progress.Tasks or None
    images : dict of str to pathlib.Path
        Grids saved by :meth:`save_grid`, by key.
    plots : dict of str to pathlib.Path
    prompt : str
        The rendering prompt, ``PHOTO_PROMPT`` around the pack's instance prompt.
    space, space_inv : WeightSpace or None
        The space of editing and sampling, and the (larger) one of inversion;
        set by the runner.
    heldout : list of Instance
        The evaluated held-out identities; set by the runner.
    multi, multi_seconds : list
        Multi-image DreamBooth adapters of ``heldout`` and their training
        seconds (:func:`~w2wkit.evaluation.runner.train_heldout_models`).
    inversion_settings : dict or None
        The settings of the last :meth:`invert`.
    """

    def __init__(self, world: EvalWorld, s: EvalSettings, out: Path, progress: Any) -> None:
        self.w, self.s, self.out, self.p = world, s, out, progress
        self.images: dict[str, Path] = {}
        self.plots: dict[str, Path] = {}
        (out / "images").mkdir(parents=True, exist_ok=True)
        self.prompt = PHOTO_PROMPT.format(world.pack.instance_prompt)
        self.space: Any = None
        self.space_inv: Any = None
        self.heldout: list[Any] = []
        self.multi: list[Any] = []
        self.multi_seconds: list[float] = []
        self.inversion_settings: dict[str, Any] | None = None
        self._renderer: Any = None
        self._models: Any = None
        self._calib: list[tuple[Any, str, Any]] | None = None

    # ---- shared tools
    def say(self, text: str) -> None:
        """Print a dim line above the progress bars (nothing without progress)."""
        if self.p is not None:
            self.p.console.print(text, style="dim", markup=False)

    def task(self, desc: str, total: int) -> Callable[[int, int], None]:
        """A progress task of ``total`` steps; returns ``callback(done, total)``.

        The task disappears when ``done`` reaches ``total``; without progress the
        callback does nothing.
        """
        if self.p is None:
            return lambda done, tot: None
        return self.p.task(desc, total)

    def calibration_models(self) -> list[tuple[Any, str, Any]]:
        """``(instance, name, adapter)`` of the held-out calibration pool, trained once.

        The last ``edit_calibration_identities`` held-out identities, trained
        like the edited ones (multi-image DreamBooth, zoo recipe); never among
        the ``n_heldout`` evaluated identities.
        """
        if self._calib is None:
            s, held = self.s, self.w.heldout
            check_calibration_pool(s, len(held))
            k = calibration_pool_size(s, len(held))
            pool = held[len(held) - k :]
            cb = self.task("DreamBooth (multi-image) on calibration identities", k)
            n_img = s.n_train_images or int(getattr(self.w.lora_settings, "n_images", 10))
            self._calib = []
            for j, inst in enumerate(pool):
                imgs = self.real(inst, n_img, seed=s.seed + 11)
                ad, _ = self.models.dreambooth(
                    imgs, self.w.instance_prompt, seed=s.seed * 31 + 7919 + j
                )
                self._calib.append((inst, f"heldout-{inst.index}", ad))
                cb(j + 1, k)
        return self._calib

    @property
    def renderer(self) -> Any:
        """The :class:`w2wkit.render.Renderer` of the world's base pipeline (made once)."""
        if self._renderer is None:
            from w2wkit.render import Renderer

            self._renderer = Renderer(self.w.base, device=self.s.device)
        return self._renderer

    @property
    def models(self) -> Any:
        """The :class:`w2wkit.baselines.BaselineModels` (DreamBooth with the zoo recipe)."""
        if self._models is None:
            from w2wkit.baselines import BaselineModels

            ls = self.w.lora_settings
            if self.s.dreambooth_steps is not None:
                ls = replace(ls, steps=int(self.s.dreambooth_steps))
            ls = replace(ls, threads=torch_threads())
            self._models = BaselineModels(self.w.base, ls, device=self.s.device)
        return self._models

    def render(
        self,
        models: Sequence[Any],
        prompts: Any = None,
        seeds: Any = None,
        desc: str = "rendering",
        **kw: Any,
    ) -> np.ndarray:
        """``(n_models, n_prompts, n_seeds, H, W, 3)`` floats."""
        prompts = prompts or [self.prompt]
        seeds = list(range(self.s.seeds)) if seeds is None else list(seeds)
        n = len(models) * len(prompts) * len(seeds)
        res = self.renderer.render(
            list(models),
            prompts,
            seeds,
            steps=self.s.render_steps,
            guidance=self.s.guidance,
            batch_size=self.s.batch_size,
            progress=self.task(desc, n),
            **kw,
        )
        return res.images

    def embed(self, images: np.ndarray) -> np.ndarray:
        """Identity embeddings of pictures ``(..., H, W, 3)`` -> ``(..., D)``."""
        flat = np.asarray(images).reshape(-1, *np.asarray(images).shape[-3:])
        return self.w.evaluators.embed(to_uint8(flat)).reshape(*np.asarray(images).shape[:-3], -1)

    def save_grid(
        self, key: str, images: np.ndarray, rows: Sequence[str], cols: Sequence[str]
    ) -> None:
        """Save ``images`` ``(rows, cols, H, W, 3)`` as ``out/images/<key>.png``."""
        from w2wkit.render import make_grid

        path = self.out / "images" / f"{key}.png"
        make_grid(np.asarray(images), list(rows), list(cols)).save(path, format="PNG")
        self.images[key] = path

    def invert(
        self,
        space: Any,
        images: np.ndarray,
        *,
        ood: bool = False,
        k: int | None = None,
        seed: int = 0,
    ) -> tuple[np.ndarray, float, Any]:
        """Invert ``images`` ``(n, H, W, 3)`` uint8 in one batch with :func:`w2wkit.invert.invert`.

        Returns
        -------
        (numpy.ndarray, float, InversionResult)
            Coefficients ``(n, k_space)``, wall seconds per image (the batch's
            time divided by ``n``), the full result.
        """
        from w2wkit.invert import invert

        s = self.s
        if ood:
            n_comp, steps, lr = s.ood_components, s.ood_steps, s.ood_lr
        else:
            n_comp, steps, lr = s.inversion_components, s.inversion_steps, s.inversion_lr
        if k is not None:
            n_comp = k
        if n_comp is not None:
            n_comp = max(1, min(int(n_comp), int(space.n_components_)))
        imgs = np.asarray(images)
        res = invert(
            space,
            self.renderer.pipe,
            imgs,
            n_components=n_comp,
            steps=steps,
            lr=lr,
            mask=self.w.pack.mask(imgs),
            concept=self.w.pack,
            prompt=self.w.instance_prompt,
            ood=ood,
            device=self.renderer.device,
            seed=seed,
            progress=False,
            notice=lambda m: None,
        )
        self.inversion_settings = dict(res.settings)
        return res.coefficients, float(res.seconds) / len(imgs), res

    def real(self, inst: Any, n: int, seed: int) -> np.ndarray:
        """``n`` procedural pictures of ``inst`` ``(n, size, size, 3)`` uint8 (the ground truth)."""
        return self.w.generator.render(inst, n, seed=seed, size=self.w.image_size)


def torch_threads() -> int:
    """torch's current number of CPU threads."""
    import torch

    return int(torch.get_num_threads())


def fit_space(
    adapters: Sequence[Any], names: Sequence[str], k: int, labels: dict[str, np.ndarray]
) -> Any:
    """Fit a :class:`~w2wkit.space.WeightSpace` on the models and its attribute directions.

    Parameters
    ----------
    adapters : sequence
        ``Adapter`` objects or LoRA file paths (all of one kind), ``N`` of them.
    names : sequence of str
        Model names (used with adapters; files name themselves).
    k : int
        Components, capped to ``[1, N - 1]``.
    labels : dict of str to numpy.ndarray
        ``attribute -> (N,)`` 0/1 labels; binary ones set the space's labels and
        get directions (cross-validated with up to 5 folds). A direction fit
        that fails leaves the space without directions.

    Returns
    -------
    WeightSpace
    """
    from w2wkit.collection import Collection
    from w2wkit.directions import fit_directions
    from w2wkit.space import WeightSpace

    items = list(adapters)
    if items and not isinstance(items[0], (str, os.PathLike)):
        coll = Collection.from_adapters(items, names=list(names))
    else:
        coll = Collection([Path(p) for p in items])
    k = max(1, min(int(k), len(items) - 1))
    space = WeightSpace(n_components=k, random_state=0).fit(coll)
    usable = {a: v for a, v in labels.items() if len(np.unique(v[np.isfinite(v)])) == 2}
    if usable:
        space.set_labels(usable)
        try:
            fit_directions(
                space,
                usable,
                cv=min(
                    5, max(2, int(min(np.bincount(v.astype(int)).min() for v in usable.values())))
                ),
            )
        except W2WError:
            pass
    return space
