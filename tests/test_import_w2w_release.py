"""The weights2weights release as downloaded: ``files/`` + ``weights_datasets/identities/``.

The miniature release is written the way their code writes one: torch pickles
under their file names (``mean.pt``, ``std.pt``, ``V.pt``, ``proj_1000pc.pt``,
``weight_dimensions.pt`` as ``key -> [flattened shape, shape]`` in PEFT
state-dict order, ``identity_df.pt`` a pandas DataFrame with CelebA attributes
and a numeric ``file`` column), ``all_weights.pt`` in
``weights_datasets/identities/``, and no ``adapter_config.json``.
"""

from __future__ import annotations

import shutil
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pd = pytest.importorskip("pandas")

from click.testing import CliRunner  # noqa: E402

from w2wkit.cli.main import cli  # noqa: E402
from w2wkit.errors import SpaceError  # noqa: E402
from w2wkit.importers.w2w import DEFAULT_ALPHA, import_w2w  # noqa: E402
from w2wkit.space import WeightSpace  # noqa: E402

N, K, KV = 24, 5, 9
UNET = "down_blocks.1.attentions.0.transformer_blocks.0"
MODULES = [
    (f"{UNET}.attn1.to_q", 16, 16),
    (f"{UNET}.attn1.to_v", 16, 16),
    (f"{UNET}.attn2.to_q", 16, 16),
    (f"{UNET}.attn2.to_v", 16, 12),
    ("mid_block.attentions.0.transformer_blocks.0.attn2.to_v", 16, 12),
]


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("w2w") / "weights2weights"
    files = root / "files"
    ident = root / "weights_datasets" / "identities"
    files.mkdir(parents=True)
    ident.mkdir(parents=True)
    dims = {}
    for name, out_f, in_f in MODULES:
        dims[f"base_model.model.{name}.lora_A.weight"] = [
            torch.Size([in_f]),
            torch.Size([1, in_f]),
        ]
        dims[f"base_model.model.{name}.lora_B.weight"] = [
            torch.Size([out_f]),
            torch.Size([out_f, 1]),
        ]
    d = sum(v[0][0] for v in dims.values())
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((N, 6)) @ rng.standard_normal((6, d))) * 0.01
    x = (x + 0.001 * rng.standard_normal((N, d))).astype(np.float32)
    mean, std = x.mean(0), x.std(0)
    z = (x - mean) / std
    _, _, vt = np.linalg.svd(z.astype(np.float64), full_matrices=False)
    v = vt[:KV].T.astype(np.float32)
    proj = (z @ v[:, :K]).astype(np.float32)
    t = torch.from_numpy
    torch.save(t(mean), files / "mean.pt")
    torch.save(t(std), files / "std.pt")
    torch.save(t(v), files / "V.pt")
    torch.save(t(proj), files / "proj_1000pc.pt")
    torch.save(dims, files / "weight_dimensions.pt")
    male = np.where(rng.random(N) > 0.5, 1, -1)
    df = pd.DataFrame(
        {
            "file": np.arange(N) * 7,  # numeric: identifies the row, never a label
            "Male": male,
            "Young": np.where(rng.random(N) > 0.5, 1, -1),
            "Eyeglasses": -male,
        }
    )
    torch.save(df, files / "identity_df.pt")
    torch.save(t(x), ident / "all_weights.pt")
    return root, x, z, v, proj


def test_imports_from_the_release_root(release, monkeypatch):
    root, _x, _z, _v, proj = release
    notes: list[str] = []
    monkeypatch.setitem(sys.modules, "pandas", None)  # the label table is read without pandas
    space = import_w2w(root, allow_pickle=True, warn=notes.append)
    assert space.n_components_ == K and len(space.manifest_) == N
    np.testing.assert_array_equal(space.coefficients_, proj)
    assert space.layout_.alphas[f"unet.{MODULES[0][0]}"] == DEFAULT_ALPHA
    assert any("adapter_config.json" in n and "27" in n for n in notes)
    assert set(space.labels_) == {"Male", "Young", "Eyeglasses"}  # not "file"
    assert not any("labels skipped" in n for n in notes)
    assert space.info_["source"]["all_weights"].endswith("all_weights.pt")
    # the total variance comes from all_weights.pt: ratios are fractions of it
    assert 0 < space.explained_variance_ratio_.sum() <= 1 + 1e-6


def test_more_components_than_stored_are_recomputed(release):
    root, _x, z, v, proj = release
    space = import_w2w(root, allow_pickle=True, n_components=KV)
    assert space.n_components_ == KV
    np.testing.assert_allclose(space.coefficients_, z @ v, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(space.coefficients_[:, :K], proj, rtol=1e-3, atol=1e-4)


def test_two_folders_and_the_missing_weights_file(release, tmp_path):
    root, *_ = release
    files = tmp_path / "files"
    shutil.copytree(root / "files", files)
    with pytest.raises(SpaceError, match=r"holds the coefficients of 5.*all_weights\.pt") as err:
        import_w2w(files, allow_pickle=True, n_components=K + 1)
    assert err.value.param == "n_components"
    with pytest.raises(SpaceError, match=r"V\.pt holds 9"):
        import_w2w(root, allow_pickle=True, n_components=KV + 1)
    space = import_w2w(
        files, allow_pickle=True, n_components=K + 1, weights=root / "weights_datasets/identities"
    )
    assert space.n_components_ == K + 1
    # only the small files: the stored projection
    assert import_w2w(files, allow_pickle=True).n_components_ == K


def test_cli_from_the_root_and_clear_line_without_weights(release, tmp_path):
    root, *_ = release
    out = tmp_path / "space"
    res = CliRunner().invoke(
        cli, ["import-w2w", str(root), "-o", str(out), "--allow-pickle", "-k", str(KV)]
    )
    assert res.exit_code == 0, res.output
    assert WeightSpace.load(out).n_components_ == KV
    res = CliRunner().invoke(
        cli,
        [
            "import-w2w",
            str(root / "files"),
            "-o",
            str(tmp_path / "s2"),
            "--allow-pickle",
            "-k",
            "7",
        ],
    )
    assert res.exit_code == 1 and not (tmp_path / "s2").exists()
    line = res.stderr.strip().splitlines()[-1]
    assert line.startswith("error:") and "-k/--components" in line and "all_weights.pt" in line
    assert "with --weights" in line
    assert "AssertionError" not in res.output


def test_unreadable_label_table_imports_without_labels(release, tmp_path):
    root, *_ = release
    copy = tmp_path / "w2w"
    shutil.copytree(root, copy)
    torch.save({"Male": [object] * 3}, copy / "files" / "identity_df.pt")  # names a global
    notes: list[str] = []
    space = import_w2w(copy, allow_pickle=True, warn=notes.append)
    assert space.labels_ is None and any("labels skipped" in n for n in notes)


def test_saved_w2wmodel_reads_in_inspect_convert_and_project(release, tmp_path):
    """``w2wmodel.pt`` (their LoRAw2w state: proj, mean, std, v) behind --allow-pickle."""
    from collections import OrderedDict

    from w2wkit.formats import read_adapter

    root, _x, _z, v, proj = release
    rel = tmp_path / "weights2weights"
    shutil.copytree(root, rel)
    (rel / "outputs").mkdir()
    model = rel / "outputs" / "w2wmodel.pt"
    coef = proj[3:4]
    t = torch.from_numpy
    state = OrderedDict(
        proj=t(coef.copy()),
        mean=torch.load(rel / "files" / "mean.pt"),
        std=torch.load(rel / "files" / "std.pt"),
        v=t(v[:, :K].copy()),
    )
    torch.save(state, model)
    space = import_w2w(rel, allow_pickle=True)
    expected = space.inverse_transform(coef)[0]
    ad = read_adapter(model, allow_pickle=True)
    assert ad.format == "w2w-model" and set(ad.layers) == set(expected.layers)
    for m, la in expected.items():
        np.testing.assert_allclose(ad[m].delta(), la.delta(), rtol=1e-4, atol=1e-7)
    run = CliRunner().invoke
    res = run(cli, ["inspect", str(model)])
    assert res.exit_code == 1 and "pickle" in res.stderr and "--allow-pickle" in res.stderr
    res = run(cli, ["inspect", str(model), "--allow-pickle", "--json"])
    assert res.exit_code == 0, res.output
    assert '"format": "w2w-model"' in res.output
    out = tmp_path / "for_comfy.safetensors"
    res = run(cli, ["convert", str(model), "--for", "comfyui", "-o", str(out), "--allow-pickle"])
    assert res.exit_code == 0, res.output
    back = read_adapter(out)
    for m, la in expected.items():
        np.testing.assert_allclose(back[m].delta(), la.delta(), rtol=1e-4, atol=1e-7)
    space.save(tmp_path / "space")
    res = run(cli, ["project", str(model), "--space", str(tmp_path / "space"), "--allow-pickle"])
    assert res.exit_code == 0, res.output
    assert "relative reconstruction error 0.0000" in res.output
