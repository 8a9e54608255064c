"""The weights2weights release importer, on small files of the release's structure."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from w2wkit.errors import SpaceError  # noqa: E402
from w2wkit.formats import read_adapter, write_adapter  # noqa: E402
from w2wkit.importers.w2w import import_w2w, parse_release_key  # noqa: E402
from w2wkit.space import WeightSpace  # noqa: E402
from w2wkit.stio import read_safetensors  # noqa: E402
from w2wkit.testing import (  # noqa: E402
    attention_modules,
    module_shapes,
    relative_error,
    unet_weights,
)

N, K = 30, 6


@pytest.fixture(scope="module")
def release(tmp_path_factory, tiny_pipe):
    """A miniature release: rank 1, alpha 27, to_q/to_v, PEFT key names."""
    root = tmp_path_factory.mktemp("w2w_release")
    mods = attention_modules(tiny_pipe, ("to_q", "to_v"))
    shapes = module_shapes(tiny_pipe, mods)
    order = sorted(mods, key=lambda m: ("down" not in m, "mid" not in m, m))  # down, mid, up
    dims = {}
    for m in order:
        out_f, in_f = shapes[m]
        path = m.split(".", 1)[1]
        dims[f"base_model.model.{path}.lora_A.weight"] = [torch.Size([in_f]), torch.Size([1, in_f])]
        dims[f"base_model.model.{path}.lora_B.weight"] = [
            torch.Size([out_f]),
            torch.Size([out_f, 1]),
        ]
    d = sum(v[0][0] for v in dims.values())
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((N, 5)) * [5, 4, 3, 2, 1]) @ rng.standard_normal((5, d))
    x = (0.01 * (x + 0.1 * rng.standard_normal((N, d))) + rng.standard_normal(d) * 0.02).astype(
        np.float32
    )
    mean = x.mean(0)
    std = x.std(0, ddof=1)
    std[3] = -std[3]  # the release's bug: a negative std entry
    z = (x - mean) / std  # the release's own (signed) standardisation
    _, _, vt = np.linalg.svd(z.astype(np.float64), full_matrices=False)
    v = vt[:10].T.astype(np.float32)  # (d, 10)
    proj = (z @ v[:, :K]).astype(np.float32)
    t = torch.from_numpy
    torch.save(t(x), root / "all_weights.pt")
    torch.save(dims, root / "weight_dimensions.pt")
    torch.save(t(mean), root / "mean.pt")
    torch.save(t(std), root / "std.pt")
    torch.save(t(v), root / "V.pt")
    torch.save(t(proj), root / "proj_1000pc.pt")
    male = np.where(rng.random(N) > 0.5, 1, -1)
    try:
        import pandas as pd

        df = pd.DataFrame({"Male": male, "Young": -male, "name": [f"id{i}" for i in range(N)]})
    except ImportError:  # pandas not installed: a dict of columns
        df = {"Male": t(male), "Young": t(-male), "name": [f"id{i}" for i in range(N)]}
    torch.save(df, root / "identity_df.pt")
    config = {"r": 1, "lora_alpha": 27, "target_modules": ["to_q", "to_v"], "peft_type": "LORA"}
    (root / "adapter_config.json").write_text(json.dumps(config))
    return root, x, proj, mods


def test_import_needs_opt_in(release):
    root = release[0]
    with pytest.raises(SpaceError, match=r"pickles.*`allow_pickle=True`"):
        import_w2w(root)


def test_imported_space_reproduces_the_release(release, tmp_path):
    root, x, proj, mods = release
    space = import_w2w(root, allow_pickle=True)
    assert space.n_components_ == K and len(space.manifest_) == N
    assert space.layout_.modules == sorted(mods, key=lambda m: ("down" not in m, "mid" not in m, m))
    assert all(m.startswith("unet.") for m in space.layout_.modules)
    assert space.layout_.alphas[mods[0]] == 27.0 and space.layout_.rank(mods[0]) == 1
    # negative std handled: positive scale, and projections equal the release's
    assert np.all(space.scale_ > 0)
    assert space.info_["source"]["negative_std_entries"] == 1
    models = [space.layout_.unflatten(row) for row in x[:4]]
    np.testing.assert_allclose(space.transform(models), proj[:4], rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(space.coefficients_, proj)
    # unproject as the research code does: c @ V^T * std + mean
    c = proj[:2].astype(np.float64)
    v = torch.load(root / "V.pt").numpy()[:, :K].astype(np.float64)
    std = torch.load(root / "std.pt").numpy().astype(np.float64)
    ref = c @ v.T * std + x.mean(0)
    ours = np.stack([space.layout_.flatten(a) for a in space.inverse_transform(c)])
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-6)
    # labels: CelebA -1/1 -> 0/1, names from the table
    np.testing.assert_array_equal(space.labels_["Male"] + space.labels_["Young"], 1.0)
    assert space.manifest_[2]["name"] == "id2"
    # persisted like any space
    loaded = WeightSpace.load(space.save(tmp_path / "imported"))
    np.testing.assert_allclose(loaded.transform(models), proj[:4], rtol=1e-4, atol=1e-4)


def test_exported_models_use_paper_peft_names_and_load_in_diffusers(release, tmp_path, tiny_pipe):
    root, _, _, mods = release
    space = import_w2w(root, allow_pickle=True)
    ad = space.inverse_transform(space.sample(1, seed=3))[0]
    out = write_adapter(ad, tmp_path / "peft_model", format="peft")
    keys = list(read_safetensors(out / "adapter_model.safetensors").tensors)
    path = mods[0].split(".", 1)[1]
    assert f"base_model.model.{path}.lora_A.weight" in keys
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 1 and cfg["lora_alpha"] == 27
    back = read_adapter(out)
    for m in ad:
        np.testing.assert_allclose(back[m].delta(), ad[m].delta(), rtol=1e-6)
    # and the diffusers loader applies exactly these deltas
    f = write_adapter(ad, tmp_path / "sample.safetensors", format="diffusers")
    pipe = copy.deepcopy(tiny_pipe)
    pipe.load_lora_weights(str(f))
    pipe.fuse_lora()
    before, after = unet_weights(tiny_pipe, mods), unet_weights(pipe, mods)
    for m in mods:
        assert relative_error(after[m] - before[m], ad[m].delta().astype(np.float64)) < 1e-4


def test_parse_release_keys():
    assert parse_release_key(
        "base_model.model.down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_v.lora_B.weight"
    ) == ("unet.down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_v", "up")
    assert parse_release_key(
        "mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.identity1.weight"
    ) == (
        "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q",
        "down",
    )
    assert parse_release_key(
        "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn1_to_q.lora_A.weight"
    ) == ("unet.up_blocks.1.attentions.2.transformer_blocks.0.attn1.to_q", "down")


def test_incomplete_release(tmp_path):
    (tmp_path / "mean.pt").write_bytes(b"")
    with pytest.raises(SpaceError, match=r"missing weight_dimensions\.pt"):
        import_w2w(tmp_path, allow_pickle=True)


# --------------------------------------------------------------------- pickles never run code


class _Plant:
    """A pickle payload that would create ``target`` if its code ever ran."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (exec, (f"open({self.target!r}, 'w').close()",))


def _evil_release(release, tmp_path, name, *, legacy=False):
    import shutil

    root = tmp_path / "release"
    shutil.copytree(release[0], root)
    target = tmp_path / "PWNED"
    payload = {"Male": _Plant(target)} if name == "identity_df.pt" else _Plant(target)
    torch.save(payload, root / name, _use_new_zipfile_serialization=not legacy)
    return root, target


@pytest.mark.parametrize(
    "name", ["weight_dimensions.pt", "mean.pt", "V.pt", "proj_1000pc.pt", "all_weights.pt"]
)
@pytest.mark.parametrize("legacy", [False, True])
def test_crafted_release_pickle_never_runs(release, tmp_path, name, legacy):
    from click.testing import CliRunner

    from w2wkit.cli.main import cli

    root, target = _evil_release(release, tmp_path, name, legacy=legacy)
    res = CliRunner().invoke(
        cli, ["import-w2w", str(root), "-o", str(tmp_path / "space"), "--allow-pickle"]
    )
    assert res.exit_code == 1, res.output
    assert not target.exists()
    assert not (tmp_path / "space").exists()
    line = res.stderr.strip()
    assert "\n" not in line and name in line and "weights_only" in line
    assert "exec" in line  # says what the pickle names


def test_crafted_label_table_is_skipped_not_loaded(release, tmp_path):
    from click.testing import CliRunner

    from w2wkit.cli.main import cli

    root, target = _evil_release(release, tmp_path, "identity_df.pt")
    res = CliRunner().invoke(
        cli, ["import-w2w", str(root), "-o", str(tmp_path / "space"), "--allow-pickle"]
    )
    assert res.exit_code == 0, res.output
    assert not target.exists()
    assert "labels skipped" in res.stderr and "builtins.exec" in res.stderr
    assert WeightSpace.load(tmp_path / "space").labels_ is None


def test_label_dataframe_loads_through_the_allow_list(release, tmp_path):
    pd = pytest.importorskip("pandas")
    import shutil

    root = tmp_path / "release"
    shutil.copytree(release[0], root)
    male = np.where(np.arange(N) % 3 == 0, 1, -1)
    df = pd.DataFrame(
        {"Male": male, "Age": np.linspace(20, 60, N), "name": [f"p{i}" for i in range(N)]}
    )
    torch.save(df, root / "identity_df.pt")
    space = import_w2w(root, allow_pickle=True)
    np.testing.assert_array_equal(space.labels_["Male"], (male + 1) / 2)
    np.testing.assert_allclose(space.labels_["Age"], np.linspace(20, 60, N))
    assert space.manifest_[4]["name"] == "p4"


@pytest.mark.parametrize("k", ["-2", "0"])
def test_import_refuses_bad_component_counts(release, tmp_path, k):
    from click.testing import CliRunner

    from w2wkit.cli.main import cli

    out = tmp_path / "space"
    res = CliRunner().invoke(
        cli, ["import-w2w", str(release[0]), "-o", str(out), "--allow-pickle", "-k", k]
    )
    assert res.exit_code == 1 and not out.exists()
    assert "-k/--components" in res.stderr and k in res.stderr


def test_import_refuses_non_finite_projections(release, tmp_path):
    import shutil

    root = tmp_path / "release"
    shutil.copytree(release[0], root)
    proj = torch.load(root / "proj_1000pc.pt")
    proj[3, 1] = float("nan")
    torch.save(proj, root / "proj_1000pc.pt")
    with pytest.raises(SpaceError, match=r"proj_1000pc\.pt.*NaN"):
        import_w2w(root, allow_pickle=True)
