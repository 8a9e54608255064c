"""``w2wkit directions`` and ``w2wkit apply``: named directions and calibrated edits."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from w2wkit.cli.cmd_space import no_verify_option
from w2wkit.cli.common import (
    DEFAULT_SPACE,
    DTYPES,
    EditType,
    StrengthType,
    allow_pickle_option,
    console,
    energy_option,
    err_console,
    for_option,
    force_option,
    keep_alphas_option,
    output_format,
    output_option,
    space_option,
    space_path_from,
    storage_dtype_option,
    write_options,
)
from w2wkit.directions import KINDS, PROBES
from w2wkit.errors import OUTPUT_EXISTS, DirectionError, FormatError, SpaceError
from w2wkit.formats.registry import writable_formats

WRITE_FORMATS = writable_formats()


def _load_space(path: Path | None, no_verify: bool = False):
    from w2wkit.space import WeightSpace

    p = Path(path) if path is not None else Path(DEFAULT_SPACE)
    if not p.exists():
        if path is None:
            raise SpaceError(
                f"no space given and no ./{DEFAULT_SPACE} here",
                hint="run `w2wkit fit DIR` first or pass --space SPACE",
            )
        raise SpaceError("no such space", path=p)
    return p, WeightSpace.load(p, verify=not no_verify)


def _parse_pairs(values: tuple[str, ...], option: str) -> list[tuple[str, str]]:
    out = []
    for v in values:
        name, sep, rest = v.partition("=")
        if not sep or not name.strip() or not rest.strip():
            raise DirectionError(f"{option} expects NAME=VALUE, got {v!r}")
        out.append((name.strip(), rest.strip()))
    return out


def _split_names(text: str | None) -> list[str]:
    return [n.strip() for n in (text or "").split(",") if n.strip()]


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def directions_table(space: Any, title: str, names: list[str] | None = None) -> Table:
    """A rich table of a space's directions: method, kind, score, calibration."""
    dirs = space.directions_
    names = names if names is not None else list(dirs)
    table = Table(title=title)
    from w2wkit.edits import describe_strength

    for col in ("name", "method", "kind", "task", "n", "score", "std", "orthogonal to", "strength"):
        table.add_column(col, justify="right" if col in ("n", "score", "std") else "left")
    for n in names:
        d = dirs[n]
        table.add_row(
            n,
            d.method,
            d.kind,
            str(d.info.get("task", "-")),
            str(d.info.get("n_labelled", "-")),
            _fmt(d.score),
            _fmt(d.proj_std, ".4g"),
            ", ".join(d.info.get("orthogonal_to", [])) or "-",
            describe_strength(d),
        )
    return table


def cosine_table(space: Any) -> Table:
    """The cosine matrix of the space's directions (their stored vectors)."""
    from w2wkit.directions import cosine_matrix

    names = list(space.directions_)
    cos = cosine_matrix([space.directions_[n].vector for n in names])
    table = Table(title="cosines between directions")
    table.add_column("")
    for n in names:
        table.add_column(n, justify="right")
    for i, n in enumerate(names):
        table.add_row(n, *[f"{c:+.2f}" for c in cos[i]])
    return table


@click.command("directions")
@click.argument("space_arg", metavar="[SPACE]", required=False, type=click.Path(path_type=Path))
@space_option(f"The space (default: ./{DEFAULT_SPACE}, where `w2wkit fit` writes).", default=None)
@click.option(
    "--labels",
    type=click.Path(path_type=Path),
    help="CSV/JSON labels: a file/name column then one column per attribute "
    "(0/1 or numbers; empty = missing). Default: the labels stored by `w2wkit fit --labels`.",
)
@click.option(
    "--method",
    type=click.Choice(PROBES),
    default="lstsq",
    show_default=True,
    help="Probe: least squares (the paper's), ridge, logistic regression, linear SVM.",
)
@click.option(
    "--kind",
    type=click.Choice(sorted(KINDS, reverse=True)),
    default="pattern",
    show_default=True,
    help="Edit along the population's pattern (less spill-over, see docs/directions.md) "
    "or the probe's weights (the paper's filter).",
)
@click.option("--names", help="Comma-separated attributes to fit (default: all labelled).")
@click.option(
    "--disentangle",
    "disentangle_opts",
    multiple=True,
    metavar="NAME=OTHER,OTHER",
    help="Make NAME leave the scores of OTHER... unchanged (all at once). Repeatable.",
)
@click.option(
    "--groups",
    nargs=2,
    type=click.Path(path_type=Path),
    metavar="A B",
    help="Label-free: a direction from folder A (without) to folder B (with); needs --name.",
)
@click.option("--name", "group_name", help="Name of the --groups direction.")
@click.option("--cv", default=5, show_default=True, help="Folds of the cross-validated score.")
@click.option("--list", "list_only", is_flag=True, help="Only list the space's directions.")
@click.option(
    "--calibrate",
    "calibrate",
    is_flag=True,
    help="Measure each direction's visible strength: the smallest strength at which the "
    "world's attribute classifier sees the attribute on >= --target of the pictures of "
    "training models lacking it, as a lower confidence bound of a monotone fit over a "
    "grid of strengths (renders; stored in the space).",
)
@click.option(
    "--world",
    "world_path",
    type=click.Path(path_type=Path),
    help="World whose classifier (and pipeline) --calibrate uses (default: the shipped one).",
)
@click.option(
    "--base",
    type=click.Path(path_type=Path),
    help="Pipeline folder to render with for --calibrate (default: the world's).",
)
@click.option(
    "--concept",
    help="Concept pack (classifier, plausibility rule); default: the world's concept "
    "whose models the space was fitted on.",
)
@click.option("--target", default=0.8, show_default=True, help="Success --calibrate asks for.")
@click.option(
    "--calibration-models",
    default=48,
    show_default=True,
    help="Training models lacking the attribute that --calibrate edits (drawn from all of them; "
    "the rest stay held out).",
)
@click.option(
    "--confidence",
    default=0.9,
    show_default=True,
    help="One-sided confidence of the lower bound that must reach --target (--calibrate).",
)
@click.option("--seeds", default=1, show_default=True, help="Pictures per model (--calibrate).")
@click.option("--steps", default=20, show_default=True, help="Sampler steps (--calibrate).")
@click.option("--device", default="auto", show_default=True, help="Device for --calibrate.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@allow_pickle_option
@no_verify_option
def directions_cmd(
    space_arg: Path | None,
    space_path: Path | None,
    labels: Path | None,
    method: str,
    kind: str,
    names: str | None,
    disentangle_opts: tuple[str, ...],
    groups: tuple[Path, Path] | None,
    group_name: str | None,
    cv: int,
    list_only: bool,
    calibrate: bool,
    world_path: Path | None,
    base: Path | None,
    concept: str | None,
    target: float,
    calibration_models: int,
    confidence: float,
    seeds: int,
    steps: int,
    device: str,
    as_json: bool,
    allow_pickle: bool,
    no_verify: bool,
) -> None:
    """Fit named directions (age, beard, ...) in a space, or list them.

    Each labelled attribute gets a linear probe on the space coefficients, a
    cross-validated score (accuracy or R^2) and a calibration: strength 1.0 =
    one standard deviation of the training models along the direction. The
    directions are saved into the space.

    \b
    Examples:
      w2wkit directions --labels labels.csv
      w2wkit directions --space my-space --labels labels.csv --method logistic
      w2wkit directions --labels labels.csv --disentangle beard=male,age
      w2wkit directions --groups plain/ bearded/ --name beard
      w2wkit directions --list
      w2wkit directions --calibrate              # visible strengths, with the world's classifier
    """
    from w2wkit import directions as D

    space_path = space_path_from(space_arg, space_path)
    path, space = _load_space(space_path, no_verify)
    if list_only:
        if labels or groups or disentangle_opts:
            raise DirectionError("--list cannot be combined with --labels/--groups/--disentangle")
        if not space.directions_:
            raise DirectionError(
                "the space has no directions",
                path=path,
                hint="fit some with `w2wkit directions --space SPACE --labels FILE`",
            )
        if as_json:
            click.echo(json.dumps({n: d.to_dict() for n, d in space.directions_.items()}))
            return
        console.print(directions_table(space, f"directions in {path}"))
        console.print(cosine_table(space))
        return
    if calibrate:
        if labels or groups or disentangle_opts:
            raise DirectionError(
                "--calibrate cannot be combined with --labels/--groups/--disentangle",
                hint="fit the directions first, then calibrate them",
            )
        from w2wkit.cli.calibration import calibrate_space

        results = calibrate_space(
            space,
            path,
            world_path=world_path,
            base=base,
            concept=concept,
            names=_split_names(names) or None,
            target=target,
            n_models=calibration_models,
            confidence=confidence,
            seeds=seeds,
            steps=steps,
            device=device,
        )
        if as_json:
            click.echo(json.dumps(results))
            return
        console.print(directions_table(space, f"calibrated directions in {path}"))
        for n, r in results.items():
            if isinstance(r, str):
                console.print(f"{n}: {r}")
        return
    dis: dict[str, list[str]] = {}
    for name, others in _parse_pairs(disentangle_opts, "--disentangle"):
        dis.setdefault(name, []).extend(_split_names(others))
    fitted: dict[str, Any] = {}
    if groups:
        if not group_name:
            raise DirectionError("--groups needs --name NAME for the new direction")
        from w2wkit.formats.registry import discover_lora_files, read_adapter

        sets = []
        for folder in groups:
            files = discover_lora_files(folder, allow_pickle=allow_pickle)
            sets.append([read_adapter(f, allow_pickle=allow_pickle) for f in files])
        fitted[group_name] = D.group_direction_in_space(
            space, group_name, sets[0], sets[1], kind=kind, cv=cv
        )
    if labels is not None or not (groups or dis):
        fitted.update(
            D.fit_directions(
                space,
                labels,
                method=method,
                kind=kind,
                names=_split_names(names) or None,
                disentangle=None,
                cv=cv,
            )
        )
    reports = {}
    for target, others in dis.items():
        if target not in space.directions_:
            raise DirectionError(
                f"cannot disentangle unknown direction {target!r}; available: {D.available(space)}"
            )
        y = None
        if labels is not None:
            from w2wkit.labels import read_labels

            table = read_labels(labels, list(space.names_))
            y = table.get(target)
        d, _ = D.disentangle_direction(space, target, others, labels=y, cv=cv)
        fitted[target] = d
        reports[target] = d.info["disentangled"]
    from w2wkit.persist import save_directions

    folder = path.parent if path.is_file() else path  # a space folder or its space.json
    save_directions(space, folder)
    if as_json:
        click.echo(json.dumps({n: d.to_dict() for n, d in fitted.items()}))
        return
    console.print(
        directions_table(space, f"fitted {len(fitted)} direction(s) into {path}", list(fitted))
    )
    for target, rec in reports.items():
        names_ = rec["names"]
        table = Table(title=f"disentangled {target}: cosines to the others' probe weights")
        table.add_column("")
        for n in names_:
            table.add_column(n, justify="right")
        for label, mat in (("before", rec["cosines_before"]), ("after", rec["cosines_after"])):
            table.add_row(f"{target} {label}", *[f"{c:+.3f}" for c in mat[0]])
        console.print(table)
        console.print(
            f"{target}: score {_fmt(rec['score_before'])} -> {_fmt(rec['score_after'])}, "
            f"cosine to the original {rec['cos_to_original']:.3f}"
        )


def _edit_slug(strengths: dict[str, float]) -> str:
    parts = []
    for name, s in strengths.items():
        safe = re.sub(r"[^A-Za-z0-9._-]+", "-", name)
        parts.append(f"{safe}{s:+g}")
    return "_".join(parts)


@click.command("apply")
@click.argument("input_path", metavar="[INPUT]", required=False, type=click.Path(path_type=Path))
@click.option("--direction", "direction", help="Direction to edit along (see `directions --list`).")
@click.option(
    "--strength",
    "strength",
    type=StrengthType(),
    help="Strength: 1.0 = one standard deviation of the training models. Default for a "
    "calibrated direction: its calibrated strength (`directions --calibrate`).",
)
@click.option(
    "--edit",
    "edits",
    type=EditType(),
    multiple=True,
    help="More edits, applied together (repeatable).",
)
@space_option(f"The space (default: ./{DEFAULT_SPACE}, where `w2wkit fit` writes).", default=None)
@output_option(
    "Output file (folder for peft). Default: ./<input stem>_<edits>.safetensors, "
    "e.g. me_age+1.5.safetensors (mean_age+1.5... without INPUT)."
)
@click.option(
    "--project",
    is_flag=True,
    help="Drop the part of the model outside the space (default: keep it).",
)
@click.option(
    "--keep-orthogonal-to",
    "keep_orthogonal",
    metavar="NAME,NAME",
    help="Leave these directions' scores unchanged (disentangle the edit on the fly).",
)
@click.option(
    "--format",
    "out_format",
    type=click.Choice(WRITE_FORMATS),
    help="Output format (default: the --for loader's; else the input's; the space's for "
    "the mean model).",
)
@for_option
@keep_alphas_option
@storage_dtype_option("Storage dtype of the output.")
@click.option("--rank", type=int, help="Output rank per layer (delta spaces).")
@energy_option
@force_option
@allow_pickle_option
@no_verify_option
def apply_cmd(
    input_path: Path | None,
    direction: str | None,
    strength: float | None,
    edits: tuple[tuple[str, float], ...],
    space_path: Path | None,
    out: Path | None,
    project: bool,
    keep_orthogonal: str | None,
    out_format: str | None,
    target: str | None,
    keep_alphas: bool,
    dtype: str | None,
    rank: int | None,
    energy: float | None,
    force: bool,
    allow_pickle: bool,
    no_verify: bool,
) -> None:
    """Edit a LoRA along named directions with calibrated strengths.

    Strength 1.0 moves the model by one standard deviation of the space's
    training models along the direction, for every direction. Without INPUT
    the space's mean model is edited. The part of the model outside the space
    is kept unless --project. The output is written in the input's format
    with the edit recorded in its metadata (`w2wkit.edits`).

    \b
    Examples:
      w2wkit apply --direction age --strength 1.5
      w2wkit apply me.safetensors --direction age --strength 1.5 -o older.safetensors
      w2wkit apply me.safetensors --edit age=1.5 --edit beard=-1 --space faces-space
      w2wkit apply me.safetensors --direction beard --strength 2 --keep-orthogonal-to age
      w2wkit apply me.safetensors --direction age --strength 1.5 --energy 0.999  # delta space
    """
    from w2wkit.directions import edit, get_direction
    from w2wkit.formats.registry import (
        FORMATS,
        _ensure_loaded,
        provenance_metadata,
        read_adapter,
        write_adapter,
    )
    from w2wkit.space import validate_energy

    if direction is None and strength is not None:
        raise DirectionError("--strength needs --direction NAME")
    if direction is not None and strength is None:
        # a calibrated direction's default strength is its calibrated one
        from w2wkit.edits import calibration_of

        _, probe = _load_space(space_path, no_verify)
        found = probe.directions_.get(direction)
        rec = calibration_of(found) if found is not None else None
        if rec is None:
            raise DirectionError(
                f"--direction {direction} needs --strength S (e.g. 1.5)",
                hint="or calibrate it once: `w2wkit directions --calibrate`",
            )
        strength = float(rec["strength"])
        console.print(
            f"{direction}: the calibrated strength {strength:g} "
            f"({float(rec['success']):.0%} success when calibrated)",
            highlight=False,
        )
    pairs = [(direction, strength)] if direction is not None else []
    pairs += list(edits)
    if not pairs:
        raise DirectionError(
            "nothing to apply: give --direction NAME --strength S or --edit NAME=S"
        )
    strengths: dict[str, float] = {}
    for name, value in pairs:
        strengths[name] = strengths.get(name, 0.0) + value
    if rank is not None and rank < 1:
        raise DirectionError(f"--rank must be positive, got {rank}")
    if input_path is not None and not input_path.exists():
        raise FormatError("no such file or folder", path=input_path)
    spath, space = _load_space(space_path, no_verify)
    validate_energy(energy, space.representation)
    for name in strengths:
        get_direction(space, name)  # unknown names fail before any work
    orth = _split_names(keep_orthogonal)
    for name in orth:
        get_direction(space, name)
    _ensure_loaded()
    adapter = None
    if out_format is None and target is not None:
        out_format = output_format(None, target)
    if input_path is not None:
        adapter = read_adapter(input_path, allow_pickle=allow_pickle)
        fmt = out_format or adapter.format or "kohya"
        stem = input_path.stem if input_path.is_file() else input_path.name
    else:
        manifest = getattr(space, "manifest_", None) or [{}]
        fmt = out_format or manifest[0].get("format") or "kohya"
        stem = "mean"
    if fmt not in FORMATS or not FORMATS[fmt].writable:
        err_console.print(f"note: cannot write {fmt!r}; writing kohya (use --format to choose)")
        fmt = "kohya"
    if out is None:
        out = Path(f"{stem}_{_edit_slug(strengths)}" + ("" if fmt == "peft" else ".safetensors"))
    if out.exists() and not force:
        raise FormatError(OUTPUT_EXISTS, path=out)
    if input_path is not None and out.resolve() == input_path.resolve():
        raise FormatError("output is the input; choose another output path", path=out)
    edited = edit(
        space,
        adapter,
        strengths,
        keep_residual=not project,
        rank=rank,
        orthogonal_to=orth,
        energy=energy,
    )
    prov = provenance_metadata(
        "w2wkit apply",
        [str(input_path)] if input_path is not None else [],
        space=spath.name,
    )
    written = write_adapter(
        edited,
        out,
        format=fmt,
        dtype=DTYPES.get(dtype or ""),
        overwrite=force,
        provenance=prov,
        **write_options(target, keep_alphas),
    )
    what = input_path.name if input_path is not None else "the mean model"
    desc = ", ".join(f"{n} {s:+g}" for n, s in strengths.items())
    kept = edited.metadata.get("w2wkit.energy_kept")
    note = f"; energy kept {float(kept):.6f}, ranks {_rank_range(edited)}" if kept else ""
    console.print(f"wrote {written} ({fmt}): {what} edited by {desc} std{note}")


def _rank_range(adapter: Any) -> str:
    ranks = sorted({int(layer.rank) for layer in adapter.layers.values()})
    return str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"


def register(cli: click.Group) -> None:
    """Add the commands of this module to ``cli``."""
    cli.add_command(directions_cmd)
    cli.add_command(apply_cmd)
