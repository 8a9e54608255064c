"""Planted collections of LoRA files with known structure.

A *planted* collection is a folder of real LoRA files (kohya, diffusers or
PEFT) whose flattened factors lie near a known low-dimensional subspace, with
binary attributes that are linear in known latent directions, two of them
correlated. It is what the demo, the examples and the benchmarks use before a
collection of trained models exists, and what tests use to check that the
space and the probes recover what was planted.

The default layout is the paper's: rank 1 on ``to_q`` and ``to_v`` of every
attention module of the full-size SD1.5 UNet (64 modules, 99,648 numbers per
model), alpha 27, with every model starting from one shared initialisation.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from w2wkit.adapter import Adapter, LoraLayer

__all__ = ["PlantedCollection", "planted_collection", "sd15_qv_shapes"]

DEFAULT_ATTRIBUTES = ("male", "beard", "old", "glasses")


def sd15_qv_shapes() -> dict[str, tuple[int, int]]:
    """Weight shapes of ``to_q``/``to_v`` of every attention module of SD1.5.

    Returns
    -------
    dict of str to tuple of int
        ``unet.<module> -> (out, in)``, 64 entries in model order.
    """
    from w2wkit.names import module_table

    return {
        path: (int(shape[0]), int(shape[1]))
        for path, shape in module_table("sd1").items()
        if path.startswith("unet.") and path.endswith((".to_q", ".to_v"))
    }


@dataclass
class PlantedCollection:
    """What :func:`planted_collection` wrote and planted.

    Attributes
    ----------
    files : list of pathlib.Path
        One LoRA file (or PEFT folder) per model, ``N`` entries.
    labels_path : pathlib.Path
        CSV: ``file`` column then one 0/1 column per attribute.
    latent : numpy.ndarray
        ``(N, n_latent)`` latent codes of the models.
    attributes : dict of str to numpy.ndarray
        Attribute name -> ``(N,)`` 0/1 labels.
    attribute_directions : dict of str to numpy.ndarray
        Attribute name -> ``(n_latent,)`` unit direction the label is
        thresholded on.
    basis : numpy.ndarray
        ``(n_latent, d)`` map from latent codes to flattened factors.
    """

    files: list[Path]
    labels_path: Path
    latent: np.ndarray
    attributes: dict[str, np.ndarray]
    attribute_directions: dict[str, np.ndarray]
    basis: np.ndarray


def planted_collection(
    out_dir: str | Path,
    n_models: int = 200,
    *,
    shapes: dict[str, tuple[int, int]] | None = None,
    n_latent: int = 24,
    attributes: tuple[str, ...] = DEFAULT_ATTRIBUTES,
    correlated: tuple[str, str] | None = ("beard", "male"),
    correlation: float = 0.6,
    noise: float = 0.02,
    alpha: float = 27.0,
    fmt: str = "kohya",
    seed: int = 0,
    progress: bool = False,
) -> PlantedCollection:
    """Write a folder of rank-1 LoRAs near a planted subspace.

    Parameters
    ----------
    out_dir : str or pathlib.Path
        Folder to create (must not hold files of another collection).
    n_models : int
        ``N``, the number of LoRA files.
    shapes : dict, optional
        ``module -> (out, in)``; default :func:`sd15_qv_shapes`.
    n_latent : int
        Dimension of the planted subspace; its spectrum decays as ``1/i``.
    attributes : tuple of str
        Binary attributes, each ``1[latent @ u + small noise > 0]``.
    correlated : tuple of str, optional
        ``(a, b)``: the direction of ``a`` is made to have cosine
        ``correlation`` with the direction of ``b``.
    correlation : float
        Cosine between the correlated attributes' directions.
    noise : float
        Isotropic noise relative to the planted signal.
    alpha : float
        LoRA alpha of every layer.
    fmt : str
        Output format (``"kohya"``, ``"diffusers"``, ``"peft"``).
    seed : int
        Everything is deterministic given the seed.
    progress : bool
        Show a rich progress bar.

    Returns
    -------
    PlantedCollection
    """
    from w2wkit.formats import provenance_metadata, write_adapter

    shapes = shapes or sd15_qv_shapes()
    rng = np.random.default_rng(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sizes = [out_f + in_f for out_f, in_f in shapes.values()]
    d = int(sum(sizes))
    # Shared initialisation: every model starts from the same factors.
    init = rng.standard_normal(d).astype(np.float32) * 0.05
    spectrum = 1.0 / np.arange(1, n_latent + 1)
    basis = rng.standard_normal((n_latent, d)).astype(np.float32) * 0.02
    latent = rng.standard_normal((n_models, n_latent)) * spectrum
    dirs: dict[str, np.ndarray] = {}
    for name in attributes:
        u = rng.standard_normal(n_latent) * spectrum
        dirs[name] = u / np.linalg.norm(u)
    if correlated is not None:
        a, b = correlated
        other = dirs[a] - (dirs[a] @ dirs[b]) * dirs[b]
        other /= np.linalg.norm(other)
        dirs[a] = correlation * dirs[b] + np.sqrt(1 - correlation**2) * other
    labels = {
        name: (latent @ u + 0.02 * rng.standard_normal(n_models) > 0).astype(np.int64)
        for name, u in dirs.items()
    }
    signal = float(np.sqrt((spectrum**2).sum()) * 0.02)
    files: list[Path] = []
    suffix = "" if fmt == "peft" else ".safetensors"
    bar = None
    if progress:
        from rich.progress import Progress

        bar = Progress(transient=True)
        bar.start()
        task = bar.add_task("writing planted LoRAs", total=n_models)
    try:
        for i in range(n_models):
            flat = init + (latent[i] @ basis).astype(np.float32)
            flat += rng.standard_normal(d).astype(np.float32) * (noise * signal)
            layers: dict[str, LoraLayer] = {}
            offset = 0
            for module, (out_f, in_f) in shapes.items():
                down = flat[offset : offset + in_f].reshape(1, in_f).copy()
                offset += in_f
                up = flat[offset : offset + out_f].reshape(out_f, 1).copy()
                offset += out_f
                layers[module] = LoraLayer(down=down, up=up, alpha=alpha)
            path = out / f"model_{i:05d}{suffix}"
            prov = provenance_metadata("w2wkit.synthetic.planted_collection", seed=seed, row=i)
            write_adapter(Adapter(layers), path, format=fmt, overwrite=True, provenance=prov)
            files.append(path)
            if bar is not None:
                bar.advance(task)
    finally:
        if bar is not None:
            bar.stop()
    labels_path = out.parent / f"{out.name}-labels.csv"
    with open(labels_path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["file", *attributes])
        for i, path in enumerate(files):
            writer.writerow([path.name, *(int(labels[a][i]) for a in attributes)])
    return PlantedCollection(files, labels_path, latent, labels, dirs, basis)
