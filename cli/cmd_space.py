"""``w2wkit fit``, ``info``, ``project``, ``sample`` and ``import-w2w``: the weight space."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import numpy as np
from rich.table import Table

from w2wkit.cli.common import (
    DEFAULT_SPACE,
    allow_pickle_option,
    byte_progress,
    cluster_option,
    console,
    energy_option,
    for_option,
    force_option,
    keep_alphas_option,
    note,
    output_format,
    output_option,
    quiet_enabled,
    space_option,
    space_path_from,
    write_format_option,
    write_options,
)
from w2wkit.errors import OUTPUT_EXISTS, SpaceError
from w2wkit.solvers import SOLVERS
from w2wkit.space import REPRESENTATIONS

read_space_option = space_option("The space folder (written by `w2wkit fit`).")

#: ``--no-verify`` (parameter ``no_verify``) of every command that loads a space.
no_verify_option = click.option(
    "--no-verify",
    is_flag=True,
    help="Skip the SHA-256 check of the space's arrays file (checked by default; "
    "about as long as reading the file once).",
)


def _load(path: Path, no_verify: bool = False):
    from w2wkit.space import WeightSpace

    return WeightSpace.load(path, verify=not no_verify)


@click.command("fit")
@click.argument("source", type=click.Path(path_type=Path))
@output_option("Space folder to write.", default=DEFAULT_SPACE, show_default=True)
@click.option(
    "-k",
    "--components",
    "n_components",
    type=int,
    default=None,
    help="Number of principal components, at most N-1 (default: the paper's 1000, capped at N-1).",
)
@click.option(
    "--representation",
    type=click.Choice(REPRESENTATIONS),
    default="factors",
    show_default=True,
    help="factors: the paper's A/B flattening (one rank and module set); "
    "delta: gauge-invariant, mixes ranks, alphas and formats.",
)
@click.option(
    "--solver",
    type=click.Choice(SOLVERS),
    default="auto",
    show_default=True,
    help="PCA solver (factors representation).",
)
@click.option("--labels", type=click.Path(path_type=Path), help="CSV/JSON attribute labels.")
@click.option("--no-standardize", is_flag=True, help="Skip per-coordinate (per-layer) scaling.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of randomized solvers.")
@click.option(
    "--profile",
    is_flag=True,
    help="Print the wall time of each phase next to its hardware floor (rates measured here).",
)
@click.option(
    "--no-row-cache",
    is_flag=True,
    help="Streamed fits: read the rows from the LoRA files on every pass even where they "
    "outgrow the page cache, instead of a row cache in the temporary folder (no temporary "
    "space the size of the data; slower there). While the files fit the page cache every "
    "streamed fit reads them in place anyway.",
)
@cluster_option
@force_option
@allow_pickle_option
def fit_cmd(
    source: Path,
    out: Path,
    n_components: int,
    representation: str,
    solver: str,
    labels: Path | None,
    no_standardize: bool,
    seed: int,
    profile: bool,
    no_row_cache: bool,
    cluster: str | None,
    force: bool,
    allow_pickle: bool,
) -> None:
    """Fit a weight space on a folder (or glob) of LoRA files.

    \b
    Examples:
      w2wkit fit ./loras/                       # writes ./w2w-space
      w2wkit fit ./loras/ -o faces -k 500 --labels attrs.csv
      w2wkit fit "./mixed/*.safetensors" --representation delta
      w2wkit fit /shared/loras/ --cluster tcp://scheduler:8786   # workers read the files
    """
    from w2wkit.atomic import recover
    from w2wkit.collection import Collection
    from w2wkit.space import WeightSpace

    recover(out)  # a save killed mid-swap: its old folder is back before the check
    if out.exists() and not force:
        raise SpaceError(OUTPUT_EXISTS, path=out)
    coll = Collection(source, allow_pickle=allow_pickle)
    space = WeightSpace(
        n_components,
        representation=representation,
        solver=solver,
        standardize=not no_standardize,
        random_state=seed,
        row_cache=not no_row_cache,
    )
    if cluster is None:
        space.fit(coll, labels=labels, progress=not quiet_enabled(), profile=profile)
    else:
        from w2wkit.cluster import dashboard_link, open_client, parse_cluster

        spec = parse_cluster(cluster)  # a bad value fails before anything starts
        space._check_params()
        space._check_cluster_fit(coll)
        with open_client(spec) as client:
            link = dashboard_link(client)
            if link:
                note(f"dask dashboard: {link}")
            space.fit(
                coll,
                labels=labels,
                progress=not quiet_enabled(),
                profile=profile,
                client=client,
            )
    space.save(out, overwrite=force)
    ratio = float(np.sum(space.explained_variance_ratio_))
    console.print(
        f"wrote {out}: {len(space.manifest_)} models, {space.n_components_} components "
        f"({representation}), {ratio:.1%} of the variance"
    )
    if profile:
        from w2wkit.floor import profile_table

        table = Table(title=f"fit profile (solver {space.info_.get('solver_used')})")
        for col in ("phase", "wall", "floor", "wall / floor"):
            table.add_column(col, justify="left" if col == "phase" else "right")
        for row in profile_table(space.info_["profile"]):
            table.add_row(*row)
        console.print(table)
        prof = space.info_["profile"]
        bound = prof.get("read_cpu_bound_seconds")
        read = next((r["seconds"] for r in prof["phases"] if r["phase"] == "read"), None)
        if bound and read:
            console.print(
                f"read: {read / bound:.2f}x its CPU bound here, {bound:.2f} s (every byte "
                "copied out of the page cache and hashed, rows held in memory faulted in, "
                "on every core; the floor lets the copy and the hash overlap)"
            )


def variance_marks(ratio: np.ndarray, levels: tuple[float, ...] = (0.9, 0.99)) -> dict[float, int]:
    """Fewest components whose cumulative explained-variance ratio reaches each level.

    Parameters
    ----------
    ratio : numpy.ndarray
        ``(k,)`` explained-variance ratios (fractions of the total variance).
    levels : tuple of float
        Fractions to mark.

    Returns
    -------
    dict of float to int
        ``level -> components`` (1-based) for the levels the kept components reach.
    """
    cum = np.cumsum(np.asarray(ratio, dtype=np.float64))
    return {lv: int(np.searchsorted(cum, lv) + 1) for lv in levels if cum.size and cum[-1] >= lv}


def variance_figure(ratio: np.ndarray, n_models: int, title: str = "") -> Any:
    """The explained-variance plot: per-component and cumulative ratio, 90%/99% marked.

    Parameters
    ----------
    ratio : numpy.ndarray
        ``(k,)`` explained-variance ratios.
    n_models : int
        N, the models the space was fitted on (in the title).
    title : str
        The space's name.

    Returns
    -------
    matplotlib.figure.Figure
        Log x-axis when k >= 1000.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratio = np.asarray(ratio, dtype=np.float64)
    k = ratio.size
    x = np.arange(1, k + 1)
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    cum = np.cumsum(ratio)
    ax.plot(x, cum, color="tab:blue", label="cumulative")
    if k <= 200:
        ax.bar(x, ratio, color="tab:orange", label="per component")
    else:
        ax.plot(x, ratio, color="tab:orange", label="per component")
    for level, comps in variance_marks(ratio).items():
        ax.axvline(comps, color="grey", linestyle="--", linewidth=0.8)
        ax.annotate(
            f"{level:.0%}: {comps}",
            (comps, level),
            textcoords="offset points",
            xytext=(4, -12),
            fontsize=8,
        )
    if k >= 1000:
        ax.set_xscale("log")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("component" + (" (log scale)" if k >= 1000 else ""))
    ax.set_ylabel("explained variance ratio")
    head = f"{title}: " if title else ""
    ax.set_title(
        f"{head}explained variance, N={n_models:,}, k={k:,} ({cum[-1]:.1%} kept)"
        if k
        else f"{head}explained variance, N={n_models:,}, k=0"
    )
    ax.legend(loc="center right")
    fig.tight_layout()
    return fig


def _strength_rows(space: Any) -> list[tuple[str, str]]:
    """One row per direction: its calibrated strength, or that it is uncalibrated."""
    from w2wkit.edits import describe_strength

    return [(f"  {n}", describe_strength(d)) for n, d in space.directions_.items()]


@click.command("info")
@click.argument("space_arg", metavar="[SPACE]", required=False, type=click.Path(path_type=Path))
@space_option(f"The space folder (default: ./{DEFAULT_SPACE}).", default=None)
@click.option(
    "--plot",
    type=click.Path(path_type=Path),
    help="Explained-variance plot (PNG); default SPACE/explained_variance.png.",
)
@no_verify_option
def info_cmd(
    space_arg: Path | None, space_path: Path | None, plot: Path | None, no_verify: bool
) -> None:
    """Describe a space and plot its explained variance.

    \b
    Examples:
      w2wkit info
      w2wkit info --space faces --plot faces.png
    """
    space_path = space_path_from(space_arg, space_path) or Path(DEFAULT_SPACE)
    space = _load(space_path, no_verify)
    ratio = np.asarray(space.explained_variance_ratio_)
    marks = variance_marks(ratio)
    table = Table(title=str(space_path), show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    rows = [
        ("representation", space.representation),
        ("models", f"{len(space.manifest_):,}"),
        ("components", f"{space.n_components_:,}"),
        ("dimension", f"{space.layout_.dim:,} ({len(space.layout_)} modules)"),
        ("layout", space.layout_.signature),
        ("solver", str(space.info_.get("solver_used"))),
        ("variance kept", f"{ratio.sum():.2%}"),
        ("first components", ", ".join(f"{r:.2%}" for r in ratio[:5])),
        (
            "components for 90% / 99%",
            " / ".join(str(marks.get(lv, f">{ratio.size}")) for lv in (0.9, 0.99)),
        ),
        ("labels", ", ".join(space.labels_ or {}) or "-"),
        ("directions", ", ".join(space.directions_) or "-"),
        *_strength_rows(space),
        ("written by", f"w2wkit {space.info_.get('w2wkit_version')}"),
    ]
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)
    from w2wkit.atomic import atomic_path

    target = plot or space_path / "explained_variance.png"
    fig = variance_figure(ratio, len(space.manifest_), title=space_path.name or str(space_path))
    with atomic_path(target, overwrite=True, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    console.print(f"plot: {target}")


@click.command("project")
@click.argument("lora", type=click.Path(path_type=Path))
@read_space_option
@click.option(
    "-n",
    "--nearest",
    "n_nearest",
    type=int,
    default=5,
    show_default=True,
    help="Nearest training models to list.",
)
@click.option("--show", type=int, default=8, show_default=True, help="Coefficients to print.")
@allow_pickle_option
@no_verify_option
def project_cmd(
    lora: Path, space_path: Path, n_nearest: int, show: int, allow_pickle: bool, no_verify: bool
) -> None:
    """Project a LoRA into a space: coefficients, reconstruction error, neighbours.

    \b
    Example:
      w2wkit project my_lora.safetensors --space faces
    """
    from w2wkit.formats import read_adapter

    space = _load(space_path, no_verify)
    ad = read_adapter(lora, allow_pickle=allow_pickle)
    c = space.transform(ad)
    err = float(space.residual(ad)[0])
    z = c[0] / np.where(space.coef_std_ > 0, space.coef_std_, 1.0)
    console.print(f"{lora}: {c.shape[1]} coefficients, relative reconstruction error {err:.4f}")
    console.print(
        "first coefficients (in training std units): " + ", ".join(f"{v:+.2f}" for v in z[:show])
    )
    table = Table(title="nearest training models (cosine of coefficients)")
    for col in ("row", "name", "cosine"):
        table.add_column(col)
    for row, name, sim in space.nearest(c, n_nearest)[0]:
        table.add_row(str(row), name, f"{sim:.4f}")
    console.print(table)


@click.command("sample")
@read_space_option
@click.option("-n", "count", type=int, default=1, show_default=True, help="Models to sample.")
@output_option("Output folder.", required=True)
@write_format_option
@for_option
@keep_alphas_option
@click.option("--seed", type=int, default=None, help="Random seed (default: fresh).")
@click.option(
    "--temperature", type=float, default=1.0, show_default=True, help="Scale of the sampling std."
)
@click.option(
    "--covariance", type=click.Choice(["diagonal", "full"]), default="diagonal", show_default=True
)
@click.option("--rank", type=int, default=None, help="Rank of written layers (delta spaces).")
@energy_option
@force_option
@no_verify_option
def sample_cmd(
    space_path: Path,
    count: int,
    out: Path,
    fmt: str | None,
    target: str | None,
    keep_alphas: bool,
    seed: int | None,
    temperature: float,
    covariance: str,
    rank: int | None,
    energy: float | None,
    force: bool,
    no_verify: bool,
) -> None:
    """Sample new models from a space and write them as LoRA files.

    Writes sample_0000 ... and coefficients.npy into the output folder (other
    files there are left alone). Every output is checked before anything is
    written; all are written to a staging folder and published together.

    \b
    Example:
      w2wkit sample -n 4 -o samples/ --seed 0 --format diffusers
    """
    from rich.progress import track

    from w2wkit.atomic import atomic_entries, atomic_path
    from w2wkit.formats import provenance_metadata, write_adapter
    from w2wkit.space import validate_energy

    if count < 1:
        raise SpaceError(f"-n must be positive, got {count}")
    fmt = output_format(fmt, target)
    opts = write_options(target, keep_alphas)
    names = [f"sample_{i:04d}" + ("" if fmt == "peft" else ".safetensors") for i in range(count)]
    # entering checks every output (before the space is even read)
    with atomic_entries(out, [*names, "coefficients.npy"], overwrite=force) as stage:
        space = _load(space_path, no_verify)
        validate_energy(energy, space.representation)
        coefs = space.sample(count, seed=seed, temperature=temperature, covariance=covariance)
        for i in track(
            range(count),
            description="writing",
            transient=True,
            console=console,
            disable=quiet_enabled(),
        ):
            ad = space.inverse_transform(coefs[i], rank=rank, energy=energy)[0]
            prov = provenance_metadata(
                "w2wkit sample", [str(space_path)], seed=seed, temperature=temperature, index=i
            )
            if i > 0:  # the same notes for every sample: say them once
                opts["warn"] = lambda message: None
            write_adapter(ad, stage / names[i], format=fmt, provenance=prov, **opts)
        with atomic_path(stage / "coefficients.npy", suffix=".npy") as tmp:
            np.save(tmp, coefs)
    console.print(f"wrote {count} models to {out} ({fmt})")


@click.command("import-w2w")
@click.argument("folder", type=click.Path(path_type=Path))
@output_option(default=DEFAULT_SPACE, show_default=True)
@click.option(
    "-k",
    "--components",
    type=int,
    default=None,
    help="Components to keep (default: the release's projection width; more are computed "
    "from all_weights.pt).",
)
@click.option(
    "--weights",
    type=click.Path(path_type=Path),
    default=None,
    help="all_weights.pt or its folder, when it is not under FOLDER "
    "(default: FOLDER/weights_datasets/identities/).",
)
@force_option
@allow_pickle_option
def import_w2w_cmd(
    folder: Path,
    out: Path,
    components: int | None,
    weights: Path | None,
    force: bool,
    allow_pickle: bool,
) -> None:
    """Import the official weights2weights release (torch pickles) as a space.

    FOLDER is the release as downloaded (holding files/ and
    weights_datasets/identities/all_weights.pt), or its files/ folder (give
    all_weights.pt with --weights, or leave it out: the stored projection is used).

    \b
    Examples:
      w2wkit import-w2w weights2weights -o w2w-space --allow-pickle
      w2wkit import-w2w weights2weights/files --weights /data/all_weights.pt --allow-pickle -k 10000
    """
    from w2wkit.atomic import atomic_path, recover
    from w2wkit.importers.w2w import import_w2w
    from w2wkit.space import WeightSpace

    recover(out)  # a save killed mid-swap: its old folder is back before the check
    if out.exists() and not force:
        raise SpaceError(OUTPUT_EXISTS, path=out)
    with byte_progress("reading all_weights.pt") as advance:
        space = import_w2w(
            folder,
            weights=weights,
            allow_pickle=allow_pickle,
            n_components=components,
            warn=note,
            progress=lambda stage, done, total: advance(done, total),
        )
    with atomic_path(out, overwrite=force) as staged:
        space.save(staged)
        # the space users will load, checked with the loader they use, before it is published
        WeightSpace.load(staged, verify=True)
    console.print(
        f"wrote {out}: {len(space.manifest_)} models, {space.n_components_} components, "
        f"labels: {', '.join(space.labels_ or {}) or '-'}"
    )


def register(cli: click.Group) -> None:
    """Add the commands of this module to ``cli``."""
    for cmd in (fit_cmd, info_cmd, project_cmd, sample_cmd, import_w2w_cmd):
        cli.add_command(cmd)
