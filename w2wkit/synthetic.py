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
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from w2wkit.adapter import Adapter, LoraLayer
from w2wkit.edits import calibrate, unit_vector
from w2wkit.errors import DirectionError

__all__ = [
    "PlantedCollection",
    "PlantedWorld",
    "make_planted",
    "planted_collection",
    "qv_shapes",
    "sd15_qv_shapes",
    "sdxl_qv_shapes",
    "spillover",
]

DEFAULT_ATTRIBUTES = ("male", "beard", "old", "glasses")


def qv_shapes(family: str = "sd1") -> dict[str, tuple[int, int]]:
    """Weight shapes of ``to_q``/``to_v`` of every UNet attention module of a family.

    Parameters
    ----------
    family : {"sd1", "sdxl"}
        ``"sd1"``: 64 modules, 99,648 numbers per rank-1 model; ``"sdxl"``: 280
        modules (70 transformer blocks x attn1/attn2 x q/v), 725,760 numbers.

    Returns
    -------
    dict of str to tuple of int
        ``unet.<module> -> (out, in)`` in model order (diffusers module names).
    """
    from w2wkit.names import module_table

    return {
        path: (int(shape[0]), int(shape[1]))
        for path, shape in module_table(family).items()
        if path.startswith("unet.") and path.endswith((".to_q", ".to_v"))
    }


def sd15_qv_shapes() -> dict[str, tuple[int, int]]:
    """Weight shapes of ``to_q``/``to_v`` of every attention module of SD1.5.

    Returns
    -------
    dict of str to tuple of int
        ``unet.<module> -> (out, in)``, 64 entries in model order.
    """
    return qv_shapes("sd1")


def sdxl_qv_shapes() -> dict[str, tuple[int, int]]:
    """Weight shapes of ``to_q``/``to_v`` of every attention module of the SDXL UNet.

    Returns
    -------
    dict of str to tuple of int
        ``unet.<module> -> (out, in)``, 280 entries in model order; a rank-1
        LoRA on them holds 725,760 numbers.
    """
    return qv_shapes("sdxl")


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
    from w2wkit.progress import Bar

    with Bar(
        n_models, "writing planted LoRAs", enabled=progress, unit="models", transient=True
    ) as bar:
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
            bar.advance(1)
    labels_path = out.parent / f"{out.name}-labels.csv"
    with open(labels_path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["file", *attributes])
        for i, path in enumerate(files):
            writer.writerow([path.name, *(int(labels[a][i]) for a in attributes)])
    return PlantedCollection(files, labels_path, latent, labels, dirs, basis)


# ---------------------------------------------------------------------------
# planted data and the spill-over measurement
# ---------------------------------------------------------------------------


@dataclass
class PlantedWorld:
    """Synthetic coefficients with attributes planted in known directions.

    Attributes
    ----------
    P : numpy.ndarray
        Coefficients, shape ``(N, k)``.
    labels : dict of str to numpy.ndarray
        Attribute -> labels ``(N,)`` (binary 0/1 or continuous).
    readouts : dict of str to numpy.ndarray
        Attribute -> unit planted direction ``(k,)``: the attribute's
        (noise-free) score of a model ``p`` is ``p @ readout``.
    world : str
        ``"readout"`` or ``"generative"``.
    loadings : numpy.ndarray or None
        ``(n_attributes, k)`` generating directions of a generative world.
    """

    P: np.ndarray
    labels: dict[str, np.ndarray]
    readouts: dict[str, np.ndarray]
    world: str
    loadings: np.ndarray | None = None

    def true_scores(self, P: np.ndarray) -> dict[str, np.ndarray]:
        """Noise-free attribute scores of models ``P`` (n, k) -> name -> (n,).

        Readout world: ``P @ readout``. Generative world: the least-squares
        amounts of each attribute's loading in ``P`` (``P @ pinv(loadings)``).
        """
        P = np.atleast_2d(P)
        if self.world == "readout":
            return {n: P @ d for n, d in self.readouts.items()}
        amounts = P @ np.linalg.pinv(self.loadings)
        return {n: amounts[:, i] for i, n in enumerate(self.readouts)}


def make_planted(
    n: int = 2000,
    k: int = 40,
    *,
    n_attributes: int = 4,
    correlation: float = 0.35,
    spectrum: float = 0.5,
    label_noise: float = 0.3,
    binary: bool | Sequence[bool] = True,
    world: str = "readout",
    orthogonal_loadings: bool = True,
    seed: int = 0,
) -> PlantedWorld:
    """Plant attributes in synthetic space coefficients.

    Coefficients are Gaussian with a power-law spectrum (variance of
    component ``i`` is ``(i + 1) ** -spectrum``), like PCA scores; the
    variation that no attribute reads is nuisance (identity). Attributes
    ``a0``, ``a1`` ... are planted in random directions; ``a0`` and ``a1``
    are correlated in the population (correlation ``correlation``), all other
    pairs are uncorrelated.

    ``world="readout"``: an attribute is a noisy linear readout of the
    model, ``y = p @ d / std + label_noise * e`` (thresholded at 0 when
    binary); the readouts ``d`` are orthonormal in the population's whitened
    coordinates except for the a0/a1 mix. ``world="generative"``: models are
    made from their attributes, ``p = nuisance + sum_j s_j * loading_j``
    with orthogonal loadings and latent scores ``s`` that are independent
    except ``corr(s_0, s_1) = correlation``; labels are the latent scores
    plus noise (thresholded when binary).

    Parameters
    ----------
    n, k : int
        Models and coefficients.
    n_attributes : int
        At least 2.
    correlation : float
        Population correlation of ``a0`` and ``a1``.
    spectrum : float
        Power-law exponent of the nuisance variance.
    label_noise : float
        Label noise, in units of the attribute score's std.
    binary : bool or sequence of bool
        Per attribute.
    world : str
        ``"readout"`` or ``"generative"``.
    orthogonal_loadings : bool
        Generative world: orthonormal loadings (default) or independent
        random unit loadings (which overlap each other and the nuisance).
    seed : int
        Random seed.

    Returns
    -------
    PlantedWorld
    """
    if n_attributes < 2:
        raise DirectionError("make_planted needs at least 2 attributes")
    if n_attributes > k:
        raise DirectionError(f"make_planted needs k >= n_attributes, got k={k}")
    rng = np.random.default_rng(seed)
    flags = [binary] * n_attributes if isinstance(binary, bool) else list(binary)
    names = [f"a{i}" for i in range(n_attributes)]
    sd = (np.arange(1, k + 1, dtype=np.float64)) ** (-spectrum / 2)
    X = rng.standard_normal((n, k)) * sd
    # Orthonormal directions in the population's whitened coordinates, so
    # that attributes other than a0/a1 are exactly uncorrelated.
    U = np.linalg.qr(rng.standard_normal((k, n_attributes)))[0].T  # (m, k)
    U[1] = correlation * U[0] + math.sqrt(1 - correlation**2) * U[1]
    labels: dict[str, np.ndarray] = {}
    if world == "readout":
        D = U / sd  # d = Sigma^-1/2 u: d_i @ Sigma @ d_j = u_i @ u_j
        D /= np.linalg.norm(D, axis=1, keepdims=True)
        for i, name in enumerate(names):
            s = X @ D[i]
            s = (s - s.mean()) / s.std()
            y = s + label_noise * rng.standard_normal(n)
            labels[name] = (y > 0).astype(np.float64) if flags[i] else y
        return PlantedWorld(X, labels, {nm: D[i] for i, nm in enumerate(names)}, world)
    if world != "generative":
        raise DirectionError(f"unknown planted world {world!r}; choose readout or generative")
    D = rng.standard_normal((n_attributes, k))
    if orthogonal_loadings:
        D = np.linalg.qr(D.T)[0].T
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    cov = np.eye(n_attributes)
    cov[0, 1] = cov[1, 0] = correlation
    S = rng.standard_normal((n, n_attributes)) @ np.linalg.cholesky(cov).T
    loadings = D * (2.0 * sd.max())
    P = X + S @ loadings
    for i, name in enumerate(names):
        y = S[:, i] + label_noise * rng.standard_normal(n)
        labels[name] = (y > 0).astype(np.float64) if flags[i] else y
    return PlantedWorld(
        P, labels, {nm: D[i] for i, nm in enumerate(names)}, world, loadings=loadings
    )


def spillover(
    world: PlantedWorld,
    target: str,
    vector: np.ndarray,
    *,
    independent: Sequence[str] | None = None,
) -> dict[str, float]:
    """Measure what a calibrated edit along ``vector`` does in a planted world.

    Every training model is moved by strength 1.0 (one std of the training
    projections on ``vector``); the change of each attribute's true score
    (:meth:`PlantedWorld.true_scores`) is expressed in standard deviations
    of that score over the training population.

    Parameters
    ----------
    world : PlantedWorld
    target : str
        The attribute the direction is meant to change.
    vector : numpy.ndarray
        Direction, shape ``(k,)``.
    independent : sequence of str, optional
        Attributes independent of the target (default: all except the
        target and, for ``a0``/``a1``, its correlated partner).

    Returns
    -------
    dict
        ``target_std`` (target change per unit strength, in target stds),
        ``spill_mean`` / ``spill_max`` (mean / max |change| of the independent
        attributes per *one std of target change*), ``distance`` (size of the
        edit in the population's Mahalanobis metric per one std of target
        change).
    """
    v = unit_vector(vector)
    P = world.P
    _, std = calibrate(P, v)
    step = std * v
    base = world.true_scores(P)
    moved = world.true_scores(P[:1] + step)
    before = world.true_scores(P[:1])
    change = {n: float((moved[n] - before[n])[0] / base[n].std(ddof=1)) for n in base}
    if independent is None:
        pair = {"a0": "a1", "a1": "a0"}
        independent = [n for n in base if n not in (target, pair.get(target))]
    t = change[target]
    spills = np.abs([change[n] / t for n in independent]) if independent else np.zeros(1)
    Pc = P - P.mean(axis=0)
    cov = Pc.T @ Pc / (P.shape[0] - 1)
    maha = float(np.sqrt(step @ np.linalg.solve(cov, step)))
    return {
        "target_std": t,
        "spill_mean": float(spills.mean()),
        "spill_max": float(spills.max()),
        "distance": maha / abs(t),
    }
