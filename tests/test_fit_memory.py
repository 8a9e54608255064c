"""A factors fit of a collection larger than the process's memory cap (RLIMIT_AS) succeeds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from w2wkit.collection import Collection
from w2wkit.space import WeightSpace
from w2wkit.synthetic import planted_collection

#: one rank-1 module of 2 x 90,000 numbers: 240 models are 173 MB of float32 rows
SHAPES = {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (90_000, 90_000)}
N = 240
CAP_EXTRA = 80 << 20  # address space allowed beyond what the imports took: < half the data

CHILD = textwrap.dedent(
    """
    import json, resource, sys
    import numpy as np, scipy.linalg, scipy.linalg.blas
    from w2wkit.collection import Collection
    from w2wkit.space import WeightSpace
    from w2wkit.solvers import memory_budget

    # BLAS libraries take their buffers at their first call: before the cap
    a = np.ones((300, 300))
    a @ a
    a.astype(np.float32) @ a.astype(np.float32)
    np.linalg.eigh(a)
    scipy.linalg.eigh(a, driver="evd")
    scipy.linalg.blas.sgemm(1.0, a.astype(np.float32), a.astype(np.float32))

    def vm():
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024

    cap = vm() + int(sys.argv[2])
    resource.setrlimit(resource.RLIMIT_AS, (cap, resource.RLIM_INFINITY))
    try:
        np.empty(int(sys.argv[3]), dtype=np.uint8).fill(1)  # the data at once: refused
        refused = False
    except MemoryError:
        refused = True
    rep = sys.argv[5] if len(sys.argv) > 5 else "factors"
    space = WeightSpace(int(sys.argv[4]), representation=rep).fit(Collection(sys.argv[1]))
    extra = {}
    if len(sys.argv) > 6:  # save, load and use the space under the same cap
        from pathlib import Path
        from w2wkit.formats.registry import read_adapter
        space.save(sys.argv[6])
        back = WeightSpace.load(sys.argv[6])
        first = read_adapter(sorted(Path(sys.argv[1]).glob("*.safetensors"))[0])
        extra = {"loaded": back.transform([first])[0, :2].tolist()}
    print(json.dumps({"refused": refused, "sv": space.singular_values_.tolist(),
                      "solver": space.info_["solver_used"], "passes": space.info_["n_passes"],
                      "budget": memory_budget(),
                      "coefficients": space.coefficients_[:, :2].tolist(), **extra}))
    """
)


@pytest.mark.slow
def test_factors_fit_larger_than_the_memory_cap(tmp_path):
    folder = tmp_path / "loras"
    planted_collection(folder, N, shapes=SHAPES, n_latent=6)
    data_bytes = 4 * N * 2 * 90_000
    assert data_bytes > 1.9 * CAP_EXTRA
    k = 5
    env = {**os.environ, "MALLOC_ARENA_MAX": "1", "OPENBLAS_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(folder), str(CAP_EXTRA), str(data_bytes), str(k)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["refused"]  # the cap is real: the rows at once do not fit under it
    assert got["passes"] > 1  # streamed from the files, more than one pass
    ref = WeightSpace(k).fit(Collection(folder))
    np.testing.assert_allclose(got["sv"], ref.singular_values_, rtol=1e-5)


#: two 1,000 x 1,000 modules (the second missing from every fifth model), ranks 4-64
DELTA_MODULES = (
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k",
)
DELTA_N = 300
DELTA_CAP_EXTRA = 48 << 20


def _write_delta_collection(folder):
    from w2wkit.adapter import Adapter, LoraLayer
    from w2wkit.formats import write_adapter

    rng = np.random.default_rng(5)
    latent = rng.standard_normal((4, 1000, 8)).astype(np.float32)  # shared structure
    folder.mkdir()
    total = 0
    for i in range(DELTA_N):
        layers = {}
        for j, m in enumerate(DELTA_MODULES):
            if j == 1 and i % 5 == 0:
                continue
            r = int(rng.choice([4, 8, 16, 32, 64]))
            w = rng.standard_normal(4).astype(np.float32)
            up = np.einsum("l,lor->or", w, latent)[:, : min(r, 8)]
            up = np.concatenate([up, 0.1 * rng.standard_normal((1000, r - up.shape[1]))], 1)
            down = rng.standard_normal((r, 1000)).astype(np.float32) / 30
            alpha = float(rng.choice([1.0, r / 2, float(r)]))
            layers[m] = LoraLayer(down=down, up=up.astype(np.float32), alpha=alpha)
            total += 4 * r * 2000
        write_adapter(Adapter(layers), folder / f"m{i:03d}.safetensors", format="kohya")
    return total


@pytest.mark.slow
def test_delta_fit_larger_than_the_memory_cap(tmp_path):
    folder = tmp_path / "loras"
    data_bytes = _write_delta_collection(folder)
    assert data_bytes > 2 * DELTA_CAP_EXTRA
    k = 6
    env = {
        **os.environ,
        "MALLOC_ARENA_MAX": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "TMPDIR": str(tmp_path),
    }
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            CHILD,
            str(folder),
            str(DELTA_CAP_EXTRA),
            str(data_bytes),
            str(k),
            "delta",
            str(tmp_path / "space"),
        ],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["refused"]  # the factors at once do not fit under the cap
    assert got["solver"] == "gram"
    ref = WeightSpace(k, representation="delta").fit(Collection(folder))
    np.testing.assert_allclose(got["sv"], ref.singular_values_, rtol=1e-6)
    np.testing.assert_allclose(
        got["coefficients"],
        ref.coefficients_[:, :2],
        atol=1e-5 * float(np.abs(ref.coefficients_).max()),
    )
    # saved, loaded and used under the cap: the factors streamed to and from the file
    np.testing.assert_allclose(
        got["loaded"], ref.coefficients_[0, :2], atol=1e-5 * float(np.abs(ref.coefficients_).max())
    )
    # the spill file went with the child
    assert not list(tmp_path.glob("w2wkit-deltas-*"))
