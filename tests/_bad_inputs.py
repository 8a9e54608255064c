"""A catalogue of damaged and hostile inputs, one per class of bad input w2wkit refuses.

Each case builds its input in a fresh folder and names the command a user
would run on it. ``tests/test_bad_inputs.py`` runs every case and checks the
promise (exit 1 with one plain-text line that names the file/key/value, no
output, no traceback, no code run); ``scripts/reliability_table.py`` runs the
same cases and writes the table of docs/reliability.md from what the commands
actually print.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from _spacehelpers import SHAPES, random_models

from w2wkit.formats import write_adapter
from w2wkit.stio import write_safetensors


@dataclass(frozen=True)
class Case:
    """One bad input.

    Attributes
    ----------
    name : str
        Short id.
    group : str
        The class of bad input (a heading of the issue it came from).
    what : str
        The input, in words.
    build : callable
        ``build(folder) -> (args, outputs)``: the CLI arguments (``w2wkit`` left
        out) and the paths that must not exist afterwards.
    expect : tuple of str
        Fragments the error line must contain.
    exit_code : int
        1 for a refusal; 0 for a case that succeeds with a warning (``warn``).
    warn : str
        For ``exit_code == 0``: a fragment of the warning printed.
    """

    name: str
    group: str
    what: str
    build: Callable[[Path], tuple[list[str], list[Path]]]
    expect: tuple[str, ...] = ()
    exit_code: int = 1
    warn: str = ""


# ----------------------------------------------------------------------------- builders


def _lora(folder: Path, name: str = "m.safetensors", seed: int = 0) -> Path:
    return write_adapter(random_models(1, seed=seed)[0], folder / name, format="kohya")


def _raw(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _write_raw(path: Path, header: dict | str, body: bytes) -> Path:
    head = (header if isinstance(header, str) else json.dumps(header)).encode()
    head += b" " * (-len(head) % 8)
    path.write_bytes(struct.pack("<Q", len(head)) + head + body)
    return path


def _first_tensor(header: dict) -> str:
    return next(k for k in header if k != "__metadata__")


def _loras(folder: Path, n: int = 6) -> Path:
    out = folder / "loras"
    out.mkdir(exist_ok=True)
    for i, ad in enumerate(random_models(n, seed=4)):
        write_adapter(ad, out / f"m{i}.safetensors", format="kohya")
    return out


def _space(folder: Path) -> Path:
    from w2wkit.collection import Collection
    from w2wkit.space import WeightSpace

    space = WeightSpace(3).fit(Collection(_loras(folder)))
    return space.save(folder / "space")


_PLANT = "open({!r}, 'w').close()"


class _Plant:
    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (exec, (_PLANT.format(self.target),))


def _release(folder: Path, *, n: int = 12, k: int = 4) -> Path:
    """A small release with the official layout (PEFT keys, rank 1) from random numbers."""
    import torch

    root = folder / "release"
    root.mkdir()
    dims: dict[str, list] = {}
    for m, (o, i) in SHAPES.items():
        path = m.split(".", 1)[1]
        dims[f"base_model.model.{path}.lora_A.weight"] = [torch.Size([i]), torch.Size([1, i])]
        dims[f"base_model.model.{path}.lora_B.weight"] = [torch.Size([o]), torch.Size([o, 1])]
    d = sum(v[0][0] for v in dims.values())
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, d)).astype(np.float32)
    mean, std = x.mean(0), x.std(0, ddof=1)
    v = np.linalg.svd((x - mean) / std, full_matrices=False)[2][:k].T.astype(np.float32)
    t = torch.from_numpy
    torch.save(dims, root / "weight_dimensions.pt")
    torch.save(t(mean), root / "mean.pt")
    torch.save(t(std), root / "std.pt")
    torch.save(t(v), root / "V.pt")
    torch.save(t(((x - mean) / std) @ v), root / "proj_1000pc.pt")
    (root / "adapter_config.json").write_text(json.dumps({"r": 1, "lora_alpha": 1}))
    return root


def _world_copy(folder: Path) -> Path:
    from w2wkit.world.shipped import world_dir

    dest = folder / "world"
    shutil.copytree(world_dir(None), dest)
    return dest


# ----------------------------------------------------------------------------- cases


def _c_release_pickle(f: Path):
    import torch

    root = _release(f)
    torch.save(_Plant(str(f / "PWNED")), root / "V.pt")
    return ["import-w2w", root, "-o", f / "space", "--allow-pickle"], [f / "space", f / "PWNED"]


def _c_label_pickle(f: Path):
    import torch

    root = _release(f)
    torch.save({"Male": _Plant(str(f / "PWNED"))}, root / "identity_df.pt")
    return ["import-w2w", root, "-o", f / "space", "--allow-pickle"], [f / "PWNED"]


def _c_lora_pickle(f: Path):
    import torch

    torch.save(_Plant(str(f / "PWNED")), f / "evil.pt")
    out = f / "out.safetensors"
    return ["convert", f / "evil.pt", "--to", "kohya", "-o", out, "--allow-pickle"], [
        out,
        f / "PWNED",
    ]


def _c_markup_name(f: Path):
    bad = f / "x[" / "b]y.safetensors"
    bad.parent.mkdir()
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{[/b]}")
    return ["inspect", bad], []


def _c_deep_header(f: Path):
    hdr, body = _raw(_lora(f))
    hdr["__metadata__"] = {"deep": "@"}
    text = json.dumps(hdr).replace('"@"', "[" * 5000 + "]" * 5000, 1)
    return ["inspect", _write_raw(f / "deep.safetensors", text, body)], []


def _c_deep_peft(f: Path):
    ad = write_adapter(random_models(1)[0], f / "adapter", format="peft")
    cfg = json.loads((ad / "adapter_config.json").read_text())
    text = json.dumps({**cfg, "x": "@"}).replace('"@"', "[" * 5000 + "]" * 5000)
    (ad / "adapter_config.json").write_text(text)
    return ["inspect", ad], []


def _c_deep_labels(f: Path):
    space = _space(f)
    (f / "labels.json").write_text("[" * 5000 + "]" * 5000)
    return ["directions", space, "--labels", f / "labels.json"], []


def _c_deep_space_json(f: Path):
    space = _space(f)
    meta = json.loads((space / "space.json").read_text())
    text = json.dumps({**meta, "x": "@"}).replace('"@"', "[" * 5000 + "]" * 5000)
    (space / "space.json").write_text(text)
    return ["info", space], []


def _space_field(f: Path, mutate: Callable[[dict], str]) -> list[str]:
    space = _space(f)
    meta = json.loads((space / "space.json").read_text())
    (space / "space.json").write_text(mutate(meta))
    return ["info", space]


def _c_space_infinity(f: Path):
    def mutate(meta: dict) -> str:
        meta["n_components"] = "@"
        return json.dumps(meta).replace('"@"', "Infinity")

    return _space_field(f, mutate), []


def _c_space_1e400(f: Path):
    def mutate(meta: dict) -> str:
        meta["n_components"] = "@"
        return json.dumps(meta).replace('"@"', "1e400")

    return _space_field(f, mutate), []


def _c_space_type(f: Path):
    def mutate(meta: dict) -> str:
        meta["arrays"] = 3.5
        return json.dumps(meta)

    return _space_field(f, mutate), []


def _c_shape_overflow(f: Path):
    hdr, body = _raw(_lora(f))
    text = json.dumps(hdr).replace("[2, 8]", "[1e400, 8]", 1)
    return ["inspect", _write_raw(f / "big.safetensors", text, body)], []


def _rank0_tensors(alpha: bool = True) -> dict[str, np.ndarray]:
    """kohya tensors of rank-0 layers (down ``(0, in)``, up ``(out, 0)``) over SHAPES."""
    tensors = {}
    for m, (o, i) in SHAPES.items():
        stem = "lora_unet_" + m.split(".", 1)[1].replace(".", "_")
        tensors[f"{stem}.lora_down.weight"] = np.zeros((0, i), np.float32)
        tensors[f"{stem}.lora_up.weight"] = np.zeros((o, 0), np.float32)
        if alpha:
            tensors[f"{stem}.alpha"] = np.asarray(1.0, np.float32)
    return tensors


def _c_rank0_fit(f: Path):
    loras = f / "loras"
    loras.mkdir()
    for i in range(3):
        write_safetensors(loras / f"r{i}.safetensors", _rank0_tensors())
    return ["fit", loras, "-o", f / "space"], [f / "space"]


def _c_exists_file(f: Path):
    space = _space(f)
    (f / "samples").write_text("I am a file")
    return ["sample", "-n", "2", "--space", space, "-o", f / "samples"], []


def _c_verify_manifest(f: Path):
    world = _world_copy(f)
    (world / "manifest.json").write_text('{"files": {"loras.safetensors": ')
    return ["world", "verify", "--world", world], []


def _c_fp16(f: Path):
    ad = random_models(1)[0]
    layer = next(iter(ad.layers.values()))
    layer.up[0, 0] = 1e6
    src = write_adapter(ad, f / "big.safetensors", format="kohya")
    out = f / "out.safetensors"
    return ["convert", src, "--to", "kohya", "--dtype", "fp16", "-o", out], [out]


def _c_edit_overflow(f: Path):
    from w2wkit.space import WeightSpace

    space_dir = _space(f)
    (f / "labels.csv").write_text("file,male\n" + "".join(f"m{i},{i % 2}\n" for i in range(6)))
    from click.testing import CliRunner

    from w2wkit.cli.main import cli

    res = CliRunner().invoke(cli, ["directions", str(space_dir), "--labels", str(f / "labels.csv")])
    assert res.exit_code == 0, res.output
    WeightSpace.load(space_dir)
    out = f / "out.safetensors"
    return ["apply", "--space", space_dir, "--edit", "male=1e300", "-o", out], [out]


def _c_import_k(f: Path):
    root = _release(f)
    return ["import-w2w", root, "-o", f / "space", "--allow-pickle", "-k", "-2"], [f / "space"]


def _c_import_k_over(f: Path):
    root = _release(f)  # 4 stored components, no all_weights.pt to recompute more from
    return ["import-w2w", root, "-o", f / "space", "--allow-pickle", "-k", "10"], [f / "space"]


def _c_import_nan(f: Path):
    import torch

    root = _release(f)
    proj = torch.load(root / "proj_1000pc.pt")
    proj[2, 1] = float("nan")
    torch.save(proj, root / "proj_1000pc.pt")
    return ["import-w2w", root, "-o", f / "space", "--allow-pickle"], [f / "space"]


def _c_sample_rank0(f: Path):
    from w2wkit.collection import Collection
    from w2wkit.space import WeightSpace

    space = WeightSpace(3, representation="delta").fit(Collection(_loras(f)))
    space_dir = space.save(f / "space")
    return ["sample", "--space", space_dir, "--rank", "0", "-o", f / "samples"], [f / "samples"]


def _c_rank0_file(f: Path):
    src = f / "rank0.safetensors"
    write_safetensors(src, _rank0_tensors(alpha=False))
    out = f / "out.safetensors"
    return ["convert", src, "--to", "diffusers", "-o", out], [out]


def _c_overlap(f: Path):
    hdr, body = _raw(_lora(f))
    keys = [k for k in hdr if k != "__metadata__" and not k.endswith(".alpha")]
    a, b = keys[0], keys[1]
    if hdr[a]["shape"] == hdr[b]["shape"]:
        hdr[b]["data_offsets"] = list(hdr[a]["data_offsets"])
    else:
        start = hdr[a]["data_offsets"][0]
        n = hdr[b]["data_offsets"][1] - hdr[b]["data_offsets"][0]
        hdr[b]["data_offsets"] = [start, start + n]
    return ["inspect", _write_raw(f / "alias.safetensors", hdr, body)], []


def _c_trailing(f: Path):
    hdr, body = _raw(_lora(f))
    return ["inspect", _write_raw(f / "tail.safetensors", hdr, body + b"\x00" * 16)], []


def _c_gap(f: Path):
    hdr, body = _raw(_lora(f))
    for k, v in hdr.items():
        if k != "__metadata__":
            v["data_offsets"] = [v["data_offsets"][0] + 8, v["data_offsets"][1] + 8]
    return ["inspect", _write_raw(f / "gap.safetensors", hdr, b"\x00" * 8 + body)], []


def _c_duplicate(f: Path):
    hdr, body = _raw(_lora(f))
    key = _first_tensor(hdr)
    text = json.dumps(hdr)
    entry = json.dumps({key: hdr[key]})[1:-1]
    text = text[:-1] + ", " + entry + "}"
    return ["inspect", _write_raw(f / "dup.safetensors", text, body)], []


def _c_lokr_bomb(f: Path):
    stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    tensors = {  # kron(50 x 50, 500 x 500 of rank 1): a 25,000 x 25,000 delta (2.5 GB)
        f"{stem}.lokr_w1": np.ones((50, 50), np.float16),
        f"{stem}.lokr_w2_a": np.ones((500, 1), np.float16),
        f"{stem}.lokr_w2_b": np.ones((1, 500), np.float16),
        f"{stem}.alpha": np.asarray(1.0, np.float16),
    }
    src = f / "bomb.safetensors"
    write_safetensors(src, tensors)
    return ["inspect", src], []


def _c_fifo(f: Path):
    fifo = f / "pipe.safetensors"
    os.mkfifo(fifo)
    out = f / "out.safetensors"
    return ["convert", fifo, "--to", "kohya", "-o", out], [out]


def _c_outside(f: Path):
    space = _space(f)
    meta = json.loads((space / "space.json").read_text())
    shutil.copy(space / meta["arrays"]["file"], f / "elsewhere.safetensors")
    meta["arrays"]["file"] = "../elsewhere.safetensors"
    (space / "space.json").write_text(json.dumps(meta))
    return ["info", space], []


def _c_flipped(f: Path):
    space = _space(f)
    meta = json.loads((space / "space.json").read_text())
    arr = space / meta["arrays"]["file"]
    raw = bytearray(arr.read_bytes())
    raw[-3] ^= 0x01
    arr.write_bytes(bytes(raw))
    return ["sample", "--space", space, "-o", f / "samples"], [f / "samples"]


def _c_verify_unlisted(f: Path):
    world = _world_copy(f)
    man = json.loads((world / "manifest.json").read_text())
    rel = "labels_identity.csv"
    with open(world / rel, "a") as fh:
        fh.write("tampered,1\n")
    del man["files"][rel]
    (world / "manifest.json").write_text(json.dumps(man))
    return ["world", "verify", "--world", world], []


def _c_mixed_family(f: Path):
    from w2wkit.adapter import Adapter, LoraLayer
    from w2wkit.names import module_to_kohya

    rng = np.random.default_rng(0)
    sd1 = {  # SD1.5 shapes (down_blocks.0 is 320 wide only in SD1)
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (320, 320),
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": (640, 640),
    }
    loras = f / "loras"
    loras.mkdir()
    for i in range(3):
        ad = Adapter(
            {
                m: LoraLayer(
                    down=rng.standard_normal((1, n_in)).astype(np.float32),
                    up=rng.standard_normal((n_out, 1)).astype(np.float32),
                    alpha=1.0,
                )
                for m, (n_out, n_in) in sd1.items()
            }
        )
        write_adapter(ad, loras / f"sd1_{i}.safetensors", format="kohya")
    tensors = {}  # an SDXL file as kohya-ss writes it: sgm UNet names
    for m in ["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"]:
        k = module_to_kohya(m, sgm=True)
        tensors[f"{k}.lora_down.weight"] = np.full((1, 640), 0.01, np.float32)
        tensors[f"{k}.lora_up.weight"] = np.full((640, 1), 0.01, np.float32)
        tensors[f"{k}.alpha"] = np.asarray(1.0, np.float32)
    write_safetensors(loras / "xl.safetensors", tensors)
    return ["fit", loras, "-o", f / "space", "--representation", "delta"], [f / "space"]


def _labels_case(text: str, suffix: str = "csv"):
    def build(f: Path):
        space = _space(f)
        (f / f"labels.{suffix}").write_text(text)
        return ["directions", space, "--labels", f / f"labels.{suffix}"], []

    return build


CASES: list[Case] = [
    # code execution
    Case(
        "release-pickle",
        "code execution",
        "import-w2w: V.pt is a pickle that runs code",
        _c_release_pickle,
        ("V.pt", "weights_only", "builtins.exec"),
    ),
    Case(
        "label-pickle",
        "code execution",
        "import-w2w: identity_df.pt runs code",
        _c_label_pickle,
        exit_code=0,
        warn="labels skipped",
    ),
    Case(
        "lora-pickle",
        "code execution",
        "convert --allow-pickle: a .pt LoRA that runs code",
        _c_lora_pickle,
        ("evil.pt", "weights_only"),
    ),
    # tracebacks
    Case("markup-name", "tracebacks", "a file whose name holds `[/b]`", _c_markup_name, ("[/b]",)),
    Case(
        "deep-header",
        "tracebacks",
        "safetensors header nested 5,000 deep",
        _c_deep_header,
        ("deep.safetensors",),
    ),
    Case(
        "deep-peft",
        "tracebacks",
        "PEFT adapter_config.json nested 5,000 deep",
        _c_deep_peft,
        ("adapter_config.json",),
    ),
    Case(
        "deep-labels",
        "tracebacks",
        "labels JSON nested 5,000 deep",
        _c_deep_labels,
        ("labels.json",),
    ),
    Case(
        "deep-space-json",
        "tracebacks",
        "space.json nested 5,000 deep",
        _c_deep_space_json,
        ("space.json",),
    ),
    Case(
        "space-infinity",
        "tracebacks",
        "space.json: `Infinity` where an integer is expected",
        _c_space_infinity,
        ("space.json",),
    ),
    Case(
        "space-1e400",
        "tracebacks",
        "space.json: `1e400` where an integer is expected",
        _c_space_1e400,
        ("space.json",),
    ),
    Case(
        "space-type",
        "tracebacks",
        "space.json: a number where an object is expected",
        _c_space_type,
        ("space.json", "arrays"),
    ),
    Case(
        "shape-1e400",
        "tracebacks",
        "safetensors shape `1e400`",
        _c_shape_overflow,
        ("big.safetensors",),
    ),
    Case(
        "rank0-fit", "tracebacks", "fit over rank-0 LoRA files", _c_rank0_fit, ("r0.safetensors",)
    ),
    Case(
        "sample-onto-file",
        "tracebacks",
        "sample -o onto an existing file",
        _c_exists_file,
        ("samples",),
    ),
    Case(
        "verify-manifest",
        "tracebacks",
        "world verify with a damaged manifest",
        _c_verify_manifest,
        ("manifest.json",),
    ),
    # garbage written
    Case(
        "fp16-overflow",
        "garbage written",
        "convert --dtype fp16 of a value above 65504",
        _c_fp16,
        ("--dtype", "65504"),
    ),
    Case("edit-1e300", "garbage written", "apply --edit male=1e300", _c_edit_overflow, ("male",)),
    Case("import-k", "garbage written", "import-w2w -k -2", _c_import_k, ("-k/--components",)),
    Case(
        "import-k-over",
        "garbage written",
        "import-w2w -k 10 of a release that stores 4 components and no weights file",
        _c_import_k_over,
        ("-k/--components", "V.pt", "holds 4"),
    ),
    Case(
        "import-nan",
        "garbage written",
        "a release with NaN in its projections",
        _c_import_nan,
        ("proj_1000pc.pt", "NaN"),
    ),
    Case("sample-rank0", "garbage written", "sample --rank 0", _c_sample_rank0, ("--rank",)),
    Case(
        "rank0-file",
        "garbage written",
        "convert of a rank-0 file",
        _c_rank0_file,
        ("rank0.safetensors",),
    ),
    # laxer parser
    Case(
        "overlap",
        "parser",
        "tensor data offsets that overlap (aliased data)",
        _c_overlap,
        ("alias.safetensors",),
    ),
    Case(
        "trailing",
        "parser",
        "trailing bytes after the last tensor",
        _c_trailing,
        ("tail.safetensors",),
    ),
    Case("gap", "parser", "a gap before the first tensor", _c_gap, ("gap.safetensors",)),
    Case("duplicate", "parser", "a duplicated tensor key", _c_duplicate, ("dup.safetensors",)),
    Case(
        "lokr-bomb",
        "parser",
        "a small LoKr whose delta expands out of proportion",
        _c_lokr_bomb,
        ("bomb.safetensors",),
    ),
    Case("fifo", "parser", "a FIFO given as the input", _c_fifo, ("pipe.safetensors",)),
    # silent acceptance
    Case(
        "outside-folder",
        "silent acceptance",
        "space.json names an arrays file outside",
        _c_outside,
        ("space.json",),
    ),
    Case(
        "flipped-byte",
        "silent acceptance",
        "one flipped byte in the space's arrays",
        _c_flipped,
        ("arrays",),
    ),
    Case(
        "verify-unlisted",
        "silent acceptance",
        "world verify: a tampered file taken off the manifest",
        _c_verify_unlisted,
        ("labels_identity.csv",),
    ),
    Case(
        "mixed-family",
        "silent acceptance",
        "SD1 and SDXL files in one fit",
        _c_mixed_family,
        ("sdxl",),
    ),
    Case(
        "labels-dup",
        "silent acceptance",
        "labels with a duplicated column",
        _labels_case("file,beard,beard\nm0,1,0\nm1,0,1\n"),
        ("beard",),
    ),
    Case(
        "labels-inf",
        "silent acceptance",
        "labels holding `inf`",
        _labels_case("file,beard\nm0,inf\nm1,0\nm2,1\n"),
        ("inf",),
    ),
    Case(
        "labels-unknown",
        "silent acceptance",
        "labels naming a model not in the space",
        _labels_case("file,beard\nm0,1\nnobody,0\nm2,1\n"),
        ("nobody",),
    ),
]
