"""``w2wkit eval`` and ``w2wkit demo``: the paper's tables and the README's main job."""

from __future__ import annotations

import tempfile
from pathlib import Path

import click
from rich.text import Text

from w2wkit.cli.common import console, err_console, force_option, profile_option

threads_option = click.option(
    "--threads",
    type=int,
    default=1,
    show_default=True,
    help="torch threads on the CPU (more threads on a small, busy CPU are much slower).",
)


def _inject_t(text: str) -> float | None:
    """``--inject-t``: a timestep in [0, 1000] or ``off``."""
    from w2wkit.errors import W2WError

    if text.strip().lower() in ("off", "none"):
        return None
    try:
        t = float(text)
    except ValueError:
        t = float("nan")
    if not 0.0 <= t <= 1000.0:
        raise W2WError(f"--inject-t must be a timestep in [0, 1000] or 'off', got {text!r}")
    return t


@click.command("eval")
@click.option(
    "--world",
    "world",
    default=None,
    help="World to evaluate: a world folder, 'micro' (build a small world first, in "
    "OUTPUT/micro-world), or nothing for the shipped miniature world.",
)
@profile_option(
    ["tiny", "quick", "full"],
    "quick",
    "How much to evaluate (tiny: CI; quick: minutes; full: the paper-style tables).",
)
@click.option(
    "-o",
    "--output",
    "out",
    type=click.Path(path_type=Path),
    default="w2w-eval",
    show_default=True,
    help="Output folder (results.json, report.html, images/, plots/).",
)
@click.option(
    "--sections",
    default="space,inversion,editing,ood,sampling,scaling,fidelity",
    show_default=True,
    help="Comma-separated parts to run.",
)
@click.option("--heldout", type=int, default=None, help="Held-out identities (profile default).")
@click.option("--seed", type=int, default=None, help="Seed (profile default 0).")
@click.option(
    "--inject-t",
    default=None,
    help="Delayed injection of w2w edits: the unedited model while t > T, the edited one "
    "after; a timestep, or 'off' to edit throughout [default: 700].",
)
@click.option(
    "--calibrate-on",
    type=click.Choice(["zoo", "heldout"]),
    default=None,
    help="Models the edit strengths are calibrated on: DreamBooth models of held-out "
    "identities that are not evaluated, or zoo models [default: heldout; the tiny profile: zoo].",
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@threads_option
@force_option
def eval_cmd(
    world: str | None,
    profile: str,
    out: Path,
    sections: str,
    heldout: int | None,
    seed: int | None,
    inject_t: str | None,
    calibrate_on: str | None,
    device: str,
    threads: int,
    force: bool,
) -> None:
    """Evaluate sampling, editing and inversion against baselines on held-out identities.

    \b
    Examples:
      w2wkit eval --profile quick -o eval/          # the shipped world
      w2wkit eval --world micro --profile tiny -o /tmp/ev   # a micro world built first
    Writes OUTPUT/results.json and OUTPUT/report.html (grids, plots, tables).
    """
    from dataclasses import replace

    from w2wkit import evaluation as E
    from w2wkit.errors import OUTPUT_EXISTS, W2WError

    wanted = [x.strip() for x in sections.split(",") if x.strip()]
    known = set(E.SECTIONS)
    bad = [x for x in wanted if x not in known]
    if bad:
        raise W2WError(f"unknown section(s) {', '.join(bad)}; use {', '.join(sorted(known))}")
    s = E.PROFILES[profile]
    changes = {"device": device, "threads": threads}
    if heldout is not None:
        changes["n_heldout"] = heldout
    if seed is not None:
        changes["seed"] = seed
    if inject_t is not None:
        changes["edit_inject_t"] = _inject_t(inject_t)
    if calibrate_on is not None:
        changes["edit_calibration_pool"] = calibrate_on
    s = replace(s, **changes)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not force:
        raise W2WError(OUTPUT_EXISTS, path=out)  # before building a micro world in it
    if world == "micro":
        folder = out / "micro-world"
        if not (folder / "world.json").exists():
            console.print(
                f"building a micro world in {folder} (seconds; numbers only show the machinery)"
            )
            E.build_micro_world(folder, progress=lambda m: console.print(m, style="dim"))
        w = E.load_eval_world(folder)
        force = True
    else:
        w = E.load_eval_world(world, device=device)
    console.print(f"evaluating world {w.name} ({len(w.zoo)} models, profile {profile})")
    res = E.run_eval(w, s, out, sections=wanted, overwrite=force)
    for name, c in res["checks"].items():
        val = c["value"]
        val = f"{val:.3f}" if isinstance(val, float) else str(val)
        mark = ("pass", "green") if c["pass"] else ("miss", "red")
        console.print(Text.assemble(f"  {name}: {val} (target {c['target']}) ", mark))
    console.print(f"report: {out / 'report.html'}")


@click.command("demo")
@click.option(
    "-o",
    "--output",
    "out",
    type=click.Path(path_type=Path),
    default=None,
    help="Output folder (default: a new temporary folder).",
)
@click.option("--world", default=None, help="World folder (default: the shipped world).")
@click.option(
    "--synthetic",
    is_flag=True,
    help="Run the synthetic demo (planted LoRA collection, no images) even with a world.",
)
@click.option("--image", type=click.Path(path_type=Path), default=None, help="Invert this picture.")
@click.option("--mask", type=click.Path(path_type=Path), default=None, help="Mask for --image.")
@click.option(
    "--steps",
    type=int,
    default=None,
    help="Inversion steps (default: the recipe of `w2wkit invert`).",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@threads_option
@force_option
def demo_cmd(
    out: Path | None,
    world: str | None,
    synthetic: bool,
    image: Path | None,
    mask: Path | None,
    steps: int | None,
    seed: int,
    device: str,
    threads: int,
    force: bool,
) -> None:
    """Fit, sample, edit and invert on the miniature world; write an HTML report.

    \b
    On a fresh clone with the shipped miniature world (a few minutes on a CPU):
    fits the identity space, samples 4 new identities, edits one model along
    2 directions, inverts 1 held-out picture, renders grids and writes
    OUTPUT/report.html. Without a shipped world it runs a synthetic demo
    (planted LoRA collection: fit, directions, edit, sample, export; no images).
    """
    from dataclasses import replace

    from w2wkit.demo import DemoSettings, run_demo, run_synthetic_demo
    from w2wkit.evaluation import shipped_world_available

    folder = out if out is not None else Path(tempfile.mkdtemp(prefix="w2w-demo-"))

    def log(msg: str) -> None:
        console.print(msg, markup=False, highlight=False)

    if synthetic or (world is None and not shipped_world_available()):
        if image is not None or mask is not None:
            from w2wkit.errors import W2WError

            raise W2WError(
                "--image needs a miniature world (none is shipped in this checkout; give --world)",
                key="image",
            )
        if not synthetic:
            err_console.print(
                "no miniature world is shipped in this checkout: running the synthetic demo "
                "(planted LoRA collection; no images)"
            )
        res = run_synthetic_demo(folder, seed=seed, overwrite=force, log=log)
    else:
        s = replace(DemoSettings(), seed=seed, device=device, threads=threads)
        if steps is not None:
            s = replace(s, inversion_steps=steps)
        res = run_demo(
            folder, world=world, settings=s, image=image, mask=mask, overwrite=force, log=log
        )
    console.print(f"done in {res['seconds']['total']:.0f} s")
    console.print(f"report: {res['report']}")


def register(cli: click.Group) -> None:
    """Add ``eval`` and ``demo``."""
    cli.add_command(eval_cmd)
    cli.add_command(demo_cmd)
