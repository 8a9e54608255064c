"""Library errors speak of API parameters and calls; the command line of its flags and commands.

Each case raises one message twice: through the library, where it must name
the parameter in backticks (`` `allow_pickle=True` ``) and no flag, and through
the command that can raise it, where the one printed line names that
command's flag (``--allow-pickle``). A last test reads the library's source:
no message or hint there spells a flag or a command line.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from _spacehelpers import random_models
from click.testing import CliRunner

from w2wkit.cli.main import cli
from w2wkit.errors import OUTPUT_EXISTS, W2WError
from w2wkit.formats import write_adapter

#: A command-line flag inside a message.
FLAG = re.compile(r"(?<![\w-])--[a-z]")


@dataclass
class Case:
    """One message: the library call and the command line that raise it, and what each says."""

    api: Callable[[], object]
    cli: list
    api_says: list[str]
    cli_says: list[str]


def _write_models(folder: Path, models) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, ad in enumerate(models):
        write_adapter(ad, folder / f"m{i:02d}.safetensors", format="kohya")
    return folder


@pytest.fixture(scope="module")
def space_dir(tmp_path_factory) -> Path:
    """A small factors space (k=2, four rank-2 models, no labels, no directions)."""
    from w2wkit.space import WeightSpace

    root = tmp_path_factory.mktemp("wording")
    loras = _write_models(root / "loras", random_models(4, seed=1))
    WeightSpace(2).fit(loras).save(root / "space")
    return root / "space"


def _no_gpu(monkeypatch) -> None:
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def _pickle(tmp, space, mp) -> Case:
    from w2wkit.formats import read_adapter

    (tmp / "old.pt").write_bytes(b"not really a pickle")
    return Case(
        lambda: read_adapter(tmp / "old.pt"),
        ["inspect", tmp / "old.pt"],
        ["pass `allow_pickle=True` if you trust it"],
        ["pass --allow-pickle if you trust it"],
    )


def _release_pickles(tmp, space, mp) -> Case:
    from w2wkit.importers.w2w import import_w2w

    (tmp / "release").mkdir()
    return Case(
        lambda: import_w2w(tmp / "release"),
        ["import-w2w", tmp / "release", "-o", tmp / "out"],
        ["pass `allow_pickle=True` if you trust these files"],
        ["pass --allow-pickle if you trust these files"],
    )


def _mixed_ranks(tmp, space, mp) -> Case:
    from w2wkit.collection import Collection

    folder = _write_models(tmp / "mixed", random_models(2, rank=2) + random_models(1, rank=3))
    return Case(
        lambda: Collection(folder).scan_factors(),
        ["fit", folder, "-o", tmp / "out"],
        ['use `representation="delta"`'],
        ["use --representation delta"],
    )


def _too_many_components(tmp, space, mp) -> Case:
    from w2wkit.space import WeightSpace

    folder = _write_models(tmp / "three", random_models(3))
    return Case(
        lambda: WeightSpace(50).fit(folder),
        ["fit", folder, "-k", "50", "-o", tmp / "out"],
        ["parameter n_components: 50 exceeds N-1=2", "use `n_components=2` or fewer"],
        ["option -k/--components: 50 exceeds N-1=2", "use --components 2 or fewer"],
    )


def _no_space(tmp, space, mp) -> Case:
    from w2wkit.space import WeightSpace

    return Case(
        lambda: WeightSpace.load(tmp / "nope"),
        ["info", tmp / "nope"],
        ["no such space folder", "fit one with `WeightSpace.fit()`"],
        ["no such space folder", "fit one with `w2wkit fit`"],
    )


def _damaged_arrays(tmp, space, mp) -> Case:
    import shutil

    from w2wkit.space import WeightSpace

    copy = Path(shutil.copytree(space, tmp / "space"))
    arrays = copy / "arrays.safetensors"
    data = bytearray(arrays.read_bytes())
    data[-1] ^= 0xFF  # same size, another hash
    arrays.write_bytes(bytes(data))
    return Case(
        lambda: WeightSpace.load(copy),
        ["info", copy],
        ["SHA-256 mismatch", "`verify=False` skips this check"],
        ["SHA-256 mismatch", "--no-verify skips this check"],
    )


def _no_labels(tmp, space, mp) -> Case:
    from w2wkit.directions import fit_directions
    from w2wkit.space import WeightSpace

    return Case(
        lambda: fit_directions(WeightSpace.load(space), None),
        ["directions", space],
        ["no labels", "pass them as `labels`"],
        ["no labels", "pass them as --labels"],
    )


def _no_directions(tmp, space, mp) -> Case:
    from w2wkit.directions import get_direction
    from w2wkit.space import WeightSpace

    return Case(
        lambda: get_direction(WeightSpace.load(space), "age"),
        ["apply", "--space", space, "--direction", "age", "--strength", "1"],
        ["the space has no directions", "fit some with `fit_directions()`"],
        ["the space has no directions", "fit some with `w2wkit directions --labels FILE`"],
    )


def _probe_needs_binary(tmp, space, mp) -> Case:
    from w2wkit.directions import fit_directions
    from w2wkit.space import WeightSpace

    labels = tmp / "labels.csv"
    labels.write_text("name,age\nm00,0.1\nm01,0.7\nm02,1.3\nm03,2.9\n")
    return Case(
        lambda: fit_directions(WeightSpace.load(space), labels, method="logistic"),
        ["directions", space, "--labels", labels, "--method", "logistic"],
        ["parameter method: probe 'logistic' needs a binary label", '`method="lstsq"`'],
        ["option --method: probe 'logistic'", "use --method lstsq or --method ridge"],
    )


def _no_world(tmp, space, mp) -> Case:
    from w2wkit.world.shipped import world_dir

    (tmp / "empty").mkdir()
    return Case(
        lambda: world_dir(tmp / "empty"),
        ["world", "info", "--world", tmp / "empty"],
        ["no shipped world here", "build one with `build_world(install=True)`"],
        ["no shipped world here", "build one with `w2wkit world build --install`"],
    )


def _interrupted_revision(tmp, space, mp) -> Case:
    from w2wkit.world.shipped import BACKUP, JOURNAL, MANIFEST, verify_world

    world = tmp / "world"
    (world / BACKUP).mkdir(parents=True)
    (world / MANIFEST).write_text(json.dumps({"files": {}}))
    (world / BACKUP / JOURNAL).write_text("{}")
    return Case(
        lambda: verify_world(world),
        ["world", "verify", "--world", world],
        ["was interrupted", "`repair_world()` keeps it"],
        ["was interrupted", "`w2wkit world verify --repair` keeps it"],
    )


def _zoo_device(tmp, space, mp) -> Case:
    from w2wkit.render import resolve_device

    _no_gpu(mp)
    return Case(
        lambda: resolve_device("cuda"),
        ["world", "retrain-zoo", "--device", "cuda"],
        ["parameter device: 'cuda' asked for but torch sees no CUDA GPU", 'use `device="cpu"`'],
        ["option --device: 'cuda' asked for but torch sees no CUDA GPU", "use --device cpu"],
    )


def _render_device(tmp, space, mp) -> Case:
    from w2wkit.render import resolve_device

    _no_gpu(mp)
    lora = write_adapter(random_models(1)[0], tmp / "a.safetensors", format="kohya")
    return Case(
        lambda: resolve_device("cuda"),
        ["render", "--base", tmp, lora, "-o", tmp / "grid.png", "--device", "cuda"],
        ["parameter device: 'cuda' asked for", 'use `device="cpu"`'],
        ["option --device: 'cuda' asked for", "use --device cpu"],
    )


def _work_folder(tmp, space, mp) -> Case:
    from w2wkit.world.retrain import retrain_zoo

    (tmp / "work").mkdir()
    (tmp / "work" / "recipe.json").write_text('{"another": "recipe"}')
    return Case(
        lambda: retrain_zoo(None, "dog", work=tmp / "work"),
        ["world", "retrain-zoo", "--work", tmp / "work"],
        ["models of another world or recipe", "pass another `work` folder"],
        ["models of another world or recipe", "pass another --work folder"],
    )


def _inversion_output(tmp, space, mp) -> Case:
    from w2wkit.invert import _check_output

    (tmp / "out").mkdir()
    (tmp / "out" / "x.txt").write_text("old")
    return Case(
        lambda: _check_output(tmp / "out", overwrite=False),
        ["invert", tmp / "img.png", "--base", tmp, "-o", tmp / "out"],
        [OUTPUT_EXISTS],
        ["output exists (pass --force to replace it)"],
    )


def _layout_in_project(tmp, space, mp) -> Case:
    """``project`` has no ``--representation``: the reference stays as the library wrote it."""
    from w2wkit.space import WeightSpace

    lora = write_adapter(random_models(1, rank=3)[0], tmp / "r3.safetensors", format="kohya")
    from w2wkit.formats import read_adapter

    return Case(
        lambda: WeightSpace.load(space).transform(read_adapter(lora)),
        ["project", lora, "--space", space],
        ['use `representation="delta"` for collections'],
        ['use `representation="delta"` for collections'],
    )


def _measure_candidates(tmp, space, mp) -> Case:
    from w2wkit.world.measure import FidelitySettings

    return Case(
        lambda: FidelitySettings(candidates=1).check(),
        ["world", "measure", "--candidates", "1"],
        ["parameter candidates: must be >= 2, got 1"],
        ["option --candidates: must be >= 2, got 1"],
    )


CASES = {
    f.__name__.lstrip("_"): f
    for f in (
        _pickle,
        _release_pickles,
        _mixed_ranks,
        _too_many_components,
        _no_space,
        _damaged_arrays,
        _no_labels,
        _no_directions,
        _probe_needs_binary,
        _no_world,
        _interrupted_revision,
        _zoo_device,
        _render_device,
        _work_folder,
        _inversion_output,
        _layout_in_project,
        _measure_candidates,
    )
}


@pytest.mark.parametrize("name", list(CASES))
def test_the_library_names_parameters_and_the_cli_its_flags(name, tmp_path, space_dir, monkeypatch):
    case = CASES[name](tmp_path, space_dir, monkeypatch)
    with pytest.raises(W2WError) as info:
        case.api()
    text = str(info.value)
    for words in case.api_says:
        assert words in text, text
    assert not FLAG.search(text), text  # the library never spells a flag
    res = CliRunner().invoke(cli, [str(a) for a in case.cli])
    assert res.exit_code == 1, (res.output, res.exception)
    line = res.stderr.strip()
    assert line.startswith("error: ") and "\n" not in line, line
    for words in case.cli_says:
        assert words in line, line


def test_a_world_command_is_worded_in_its_own_flags(monkeypatch, tmp_path):
    """``world build`` has no ``--force`` (``world export-loras`` has): the reference stays."""
    import w2wkit.world.builder as wb

    def refuse(*_a, **_k):
        raise W2WError(OUTPUT_EXISTS, path=tmp_path)

    monkeypatch.setattr(wb, "build_world", refuse)
    res = CliRunner().invoke(cli, ["world", "build", "--out", str(tmp_path)])
    assert res.exit_code == 1
    assert "pass `overwrite=True` to replace it" in res.stderr and "--force" not in res.stderr


# ------------------------------------------------------------------ the source

#: Messages of the library that may still spell a flag, each with the reason.
ALLOWED: set[tuple[str, str]] = set()

PACKAGE = Path(__file__).resolve().parents[1] / "w2wkit"


def _message_strings(tree: ast.AST):
    """``(line, text)`` of every string in a ``raise`` or a ``hint=``/``message=`` argument."""
    for node in ast.walk(tree):
        spots = []
        if isinstance(node, ast.Raise) and node.exc is not None:
            spots.append(node.exc)
        if isinstance(node, ast.Call):
            spots += [k.value for k in node.keywords if k.arg in ("hint", "message")]
        for spot in spots:
            for n in ast.walk(spot):
                if isinstance(n, ast.Constant) and isinstance(n.value, str):
                    yield n.lineno, n.value


def test_no_library_message_spells_a_flag_or_a_command_line():
    commands = "|".join(re.escape(c) for c in cli.list_commands(None))
    command_line = re.compile(rf"\bw2wkit ({commands})\b")
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for line, text in _message_strings(ast.parse(path.read_text(), str(path))):
            if FLAG.search(text) or command_line.search(text):
                if not any(path.name == f and snip in text for f, snip in ALLOWED):
                    found.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {text!r}")
    assert not found, "library messages that name CLI flags or commands:\n" + "\n".join(found)


def test_the_source_check_finds_a_flag():
    """The check above is not vacuous: it sees a flag in a raise and in a hint."""
    tree = ast.parse('raise W2WError("use --force")\nf(hint=f"pass --labels {x}")')
    texts = [t for _, t in _message_strings(tree)]
    assert len([t for t in texts if FLAG.search(t)]) == 2


def test_cli_wording_of_calls_and_of_parameters_the_command_lacks():
    import click

    from w2wkit.cli.common import API_COMMANDS, cli_wording

    ctx = click.Context(cli)
    ctx.invoked_subcommand = "fit"  # no --device, no --method
    assert cli_wording("parameter device: no GPU", ctx, "device") == "parameter device: no GPU"
    assert cli_wording("run `repair_world()` first", ctx) == (
        "run `w2wkit world verify --repair` first"
    )
    assert cli_wording("see `something_else()`", ctx) == "see `something_else()`"
    ctx.invoked_subcommand = "invert"  # its --mask sets `masks`, --steps sets `steps`
    assert cli_wording("parameter mask: 3 masks", ctx, "mask") == "option --mask: 3 masks"
    assert cli_wording("parameter steps: must be >= 1", ctx, "steps") == (
        "option --steps: must be >= 1"
    )
    ctx.invoked_subcommand = "render"
    assert cli_wording("needs both `edited` models and `inject_t`", ctx, "inject_t") == (
        "needs both --edited models and --inject-after"
    )
    for call, command in API_COMMANDS.items():  # every mapped call names a real command
        words = command.split()
        assert words[0] == "w2wkit" and cli.get_command(None, words[1]) is not None, call


def _all_flags(group) -> set[str]:
    import click

    flags = set()
    for name in group.list_commands(None):
        cmd = group.get_command(None, name)
        if isinstance(cmd, click.Group):
            flags |= _all_flags(cmd)
        flags |= {o for p in cmd.params for o in getattr(p, "opts", []) + p.secondary_opts}
    return flags


@pytest.mark.parametrize(
    "exc", [MemoryError("12 GiB"), OSError(17, "File exists", "out"), OSError(28, "No space")]
)
def test_the_clis_own_hints_name_flags_that_exist(exc):
    from w2wkit.cli.common import error_message

    text = error_message(exc)
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", text))
    assert named <= _all_flags(cli), (text, named - _all_flags(cli))
