"""Edit a LoRA in a weight space and hand its deltas to another tool's merge.

w2wkit edits models; merging them into base weights or into other adapters is
the business of the tool you already use (diffusers' fuse_lora, ComfyUI,
peft's ``add_weighted_adapter``, mergekit...). This example shows the hand-off
with the Python API, on a synthetic collection it writes itself:

1. write 120 planted rank-1 LoRAs (kohya files + a labels CSV),
2. fit a space, fit calibrated directions and save/load the space,
3. edit one adapter: ``{"beard": 1.5, "old": -0.5}`` (strength 1.0 = one
   standard deviation of the training models along that direction),
4. hand the per-layer deltas to two kinds of merge:
   a. a plain weighted sum into base weights ``W' = W + w * delta`` (what
      ``fuse_lora`` does), with numpy arrays keyed by diffusers module name;
   b. a peft ``add_weighted_adapter``-style "cat" merge of low-rank factors
      (``(down, up)`` per layer, concatenated along the rank), checked to equal
      the weighted sum of the deltas.

Run: ``python examples/merge_api.py`` (about 10 s; writes to a temp folder).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from w2wkit import directions as D
from w2wkit.formats import read_adapter, write_adapter
from w2wkit.space import WeightSpace
from w2wkit.synthetic import planted_collection, sd15_qv_shapes


def lora_factors(adapter) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``module -> (down (r, in), up (out, r))`` with the LoRA scale folded into ``up``."""
    return {m: (layer.down, layer.up * layer.scale) for m, layer in adapter.items()}


def weighted_sum_into_base(
    base: dict[str, np.ndarray], adapters: list, weights: list[float]
) -> dict[str, np.ndarray]:
    """Merge a) ``W' = W + sum_i w_i * delta_i`` per module (numpy, any tool's base weights)."""
    merged = {m: w.astype(np.float64).copy() for m, w in base.items()}
    for adapter, w in zip(adapters, weights, strict=True):
        for module, delta in adapter.deltas().items():
            merged[module] += w * delta
    return merged


def cat_merge(adapters: list, weights: list[float]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Merge b) one LoRA of rank sum(r_i) whose delta is ``sum_i w_i * delta_i``.

    The factors are concatenated along the rank (the "cat" combination of
    peft's ``add_weighted_adapter``); nothing is approximated.
    """
    out = {}
    for module in adapters[0].layers:
        downs, ups = [], []
        for adapter, w in zip(adapters, weights, strict=True):
            down, up = lora_factors(adapter)[module]
            downs.append(down)
            ups.append(w * up)
        out[module] = (np.concatenate(downs, axis=0), np.concatenate(ups, axis=1))
    return out


def main(workdir: Path) -> None:
    shapes = dict(list(sd15_qv_shapes().items())[:8])  # a slice of SD1.5's to_q/to_v
    col = planted_collection(workdir / "loras", 120, shapes=shapes, n_latent=12, seed=0)

    space = WeightSpace(n_components=12).fit(workdir / "loras")
    D.fit_directions(space, col.labels_path)  # probes: lstsq, kind: pattern (the defaults)
    space.save(workdir / "space")
    space = WeightSpace.load(workdir / "space")
    for name, d in space.directions_.items():
        print(f"{name:8s} score {d.score:.3f}  1 std = {d.proj_std:.4g} coefficient units")

    mine = read_adapter(col.files[0])
    edited = D.edit(space, mine, {"beard": 1.5, "old": -0.5})
    write_adapter(edited, workdir / "edited.safetensors", format="kohya")
    print("edit recorded in the file:", edited.metadata[D.EDIT_METADATA_KEY])

    # a) plain weighted sum into base weights (here random stand-ins for the UNet's)
    rng = np.random.default_rng(0)
    base = {m: rng.standard_normal(s) for m, s in shapes.items()}
    fused = weighted_sum_into_base(base, [edited, read_adapter(col.files[1])], [1.0, 0.5])
    m0 = next(iter(shapes))
    print(f"{m0}: |W' - W| = {np.linalg.norm(fused[m0] - base[m0]):.4g}")

    # b) "cat" merge of the factors: exact, so it equals the weighted sum of deltas
    other = read_adapter(col.files[1])
    cat = cat_merge([edited, other], [1.0, 0.5])
    for module, (down, up) in cat.items():
        expect = edited[module].delta() + 0.5 * other[module].delta()
        assert np.allclose(up @ down, expect, atol=1e-6), module
    print(f"cat merge: rank {cat[m0][0].shape[0]} per layer, equals the weighted delta sum")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        main(Path(tmp))
