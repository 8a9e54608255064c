"""``w2wkit world ...``: build, inspect, verify and export the miniature world."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.table import Table

from w2wkit.cli.common import (
    W2WGroup,
    console,
    for_option,
    force_option,
    output_format,
    output_option,
    profile_option,
)
from w2wkit.errors import W2WError
from w2wkit.formats.registry import writable_formats
from w2wkit.world import CONCEPTS, HELDOUT_CONCEPT
from w2wkit.world.measure import FidelitySettings

_FID = FidelitySettings()  # the measure command's defaults: the full profile's

world_path_option = click.option(
    "--world",
    "world_path",
    type=click.Path(path_type=Path),
    default=None,
    help="World folder (default: $W2WKIT_WORLD, else the one shipped in the package).",
)


@click.group("world", cls=W2WGroup)  # errors are worded in the invoked world command's flags
def world_group() -> None:
    """The miniature world: a tiny diffusion model, its LoRA zoo and evaluators.

    \b
    Examples:
      w2wkit world info
      w2wkit world export-loras -o zoo/ --concept identity && w2wkit fit zoo/
      w2wkit world verify
      w2wkit world build --profile micro --out /tmp/world
    """


@world_group.command("build")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Work folder.")
@profile_option(
    ["full", "full-gpu", "full-cpu", "micro"],
    "full",
    "full-gpu: full with the base UNet at batch 64 (for a GPU build); full-cpu: the base on "
    "2 threads for up to 24,000 steps (with --budget).",
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--budget", type=float, default=None, help="Total wall-clock seconds (phases scaled)."
)
@click.option("--workers", type=int, default=None, help="CPU processes (default: cores - 1).")
@click.option("--install", is_flag=True, help="Copy the packed world into the package.")
@click.option(
    "--evaluators-from",
    type=click.Path(path_type=Path),
    default=None,
    help="Reuse the evaluators of this world folder instead of training them (they do not "
    "depend on the base model; the log records the source and hashes).",
)
def build_cmd(
    out: Path,
    profile: str,
    device: str,
    seed: int,
    budget: float | None,
    workers: int | None,
    install: bool,
    evaluators_from: Path | None,
) -> None:
    """Build the whole world from a seed (resumable; phases skip finished outputs).

    Writes OUT/base, OUT/zoo, OUT/heldout, OUT/evaluators, OUT/metrics.json,
    OUT/build_log.json and the packed world OUT/shipped.
    """
    from w2wkit.world.builder import build_world

    log = build_world(
        out,
        profile,
        seed=seed,
        device=device,
        budget_s=budget,
        workers=workers,
        install=install,
        evaluators_from=evaluators_from,
    )
    console.print(f"world built in {log.get('elapsed', 0):.1f} s -> {out / 'shipped'}")


@world_group.command("zoo")
@click.argument("base", type=click.Path(path_type=Path, exists=True))
@output_option(required=True)
@click.option("--concept", default=HELDOUT_CONCEPT, show_default=True)
@click.option("-n", "--count", type=int, default=10, show_default=True, help="Models to train.")
@click.option("--start", type=int, default=0, show_default=True, help="First instance index.")
@click.option("--inst-seed", type=int, default=0, show_default=True)
@click.option("--steps", type=int, default=150, show_default=True)
@click.option("--batch", type=int, default=4, show_default=True)
@click.option("--lr", type=float, default=2e-3, show_default=True)
@click.option("--rank", type=int, default=1, show_default=True)
@click.option(
    "--alpha", type=float, default=None, help="LoRA alpha (scale = alpha/rank; default: rank)."
)
@click.option("--targets", default="to_q,to_v", show_default=True)
@click.option("--images", "n_images", type=int, default=10, show_default=True)
@click.option("--init-seed", type=int, default=0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--prompt",
    default=None,
    help="Instance prompt (default: 'a photo of ' + the concept's, e.g. 'a photo of sks person').",
)
@click.option("--class-prompt", default=None, help="Enables prior preservation (e.g. 'person').")
@click.option("--prior-weight", type=float, default=0.0, show_default=True)
@click.option("--chunk", type=int, default=0, help="Models per batch (0: 8 on CPU, 1024 on CUDA).")
@click.option("--workers", type=int, default=1, show_default=True, help="CPU processes.")
@click.option("--device", default="auto", show_default=True)
@click.option("--format", "fmt", default="diffusers", show_default=True)
def zoo_cmd(
    base: Path,
    out: Path,
    concept: str,
    count: int,
    start: int,
    inst_seed: int,
    steps: int,
    batch: int,
    lr: float,
    rank: int,
    alpha: float | None,
    targets: str,
    n_images: int,
    init_seed: int,
    seed: int,
    prompt: str | None,
    class_prompt: str | None,
    prior_weight: float,
    chunk: int,
    workers: int,
    device: str,
    fmt: str,
) -> None:
    """Train one DreamBooth-style LoRA per instance of CONCEPT on the BASE pipeline.

    Many models train at once in one batch; finished files are skipped
    (resume). Writes OUT/<instance>.safetensors, OUT/labels.csv, OUT/manifest.json.
    """
    from w2wkit.concepts import full_prompt, get_pack
    from w2wkit.world.pictures import render_instances
    from w2wkit.world.zoo import ZooSettings, train_zoo, write_labels, write_zoo_manifest, zoo_jobs

    pack = get_pack(concept)  # unknown concept: one line listing the known ones
    s = ZooSettings(
        rank=rank,
        alpha=float(rank if alpha is None else alpha),
        targets=tuple(t.strip() for t in targets.split(",") if t.strip()),
        steps=steps,
        batch=batch,
        lr=lr,
        n_images=n_images,
        init_seed=init_seed,
        seed=seed,
        format=fmt,
        chunk=chunk,
        class_prompt=class_prompt,
        prior_weight=prior_weight,
        device=device,
    )
    jobs = zoo_jobs(pack.name, count, inst_seed=inst_seed, start=start, first=start)
    prior = None
    if prior_weight > 0:
        specs = [(i, inst_seed + 7919) for i in range(64)]
        prior = render_instances(pack.name, specs, 1, seed + 1).reshape(-1, 32, 32, 3)
    prompt = prompt or full_prompt(pack)
    res = train_zoo(base, jobs, out, prompt, s, workers=workers, prior=prior, progress=True)
    write_labels(jobs, out / "labels.csv")
    write_zoo_manifest(out, jobs, {"concept": pack.name, "prompt": prompt, "base": base})
    mph = res["models_per_hour"]
    console.print(
        f"{res['trained']} trained, {res['skipped']} skipped, {res['missing']} missing in "
        f"{res['seconds']:.1f} s" + (f" ({mph:.0f} models/hour on {res['device']})" if mph else "")
    )


@world_group.command("info")
@world_path_option
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def info_cmd(world_path: Path | None, as_json: bool) -> None:
    """Summarise the shipped world: sizes, counts, build times and metrics."""
    from w2wkit.world.shipped import load_world

    w = load_world(world_path, verify=False)
    s = w.summary()
    if as_json:
        click.echo(json.dumps(s, indent=1, default=str))
        return
    t = Table(title=f"miniature world: {s['root']}", show_header=False)
    t.add_row("size", f"{(s['total_bytes'] or 0) / 1e6:.1f} MB in {s['files']} files")
    t.add_row("models", ", ".join(f"{c}: {n}" for c, n in s["models"].items()))
    t.add_row("LoRA", f"rank {s['rank']} on {s['targets']} UNet modules")
    t.add_row("training prompts", ", ".join(f"{c}: {p!r}" for c, p in s["prompts"].items()))
    t.add_row("held-out identities", str(s["heldout"]))
    t.add_row("built on", f"{s['device']} {s['gpu'] or ''} (profile {s['profile']})")
    t.add_row("phase seconds", ", ".join(f"{k} {v}" for k, v in s["seconds"].items()))
    for concept in s["models"]:
        ev = s["evaluators"].get(concept, {})
        if ev:
            t.add_row(
                f"evaluators {concept}",
                f"min attribute accuracy {ev.get('min_attribute_accuracy', float('nan')):.3f}, "
                f"verification ROC-AUC {ev.get('verification_auc', float('nan')):.3f}",
            )
        m = s["metrics"].get(concept, {})
        if m:
            t.add_row(
                f"zoo fidelity {concept}",
                f"top-1 {m.get('fidelity_top1', float('nan')):.3f} among {m.get('candidates')} "
                f"({m.get('fidelity_models')} models); ID score intra "
                f"{m.get('intra_model_id_score') or float('nan'):.3f} / inter "
                f"{m.get('inter_model_id_score') or float('nan'):.3f}",
            )
    for entry in s["measurements"]:
        for concept in s["models"]:
            m = entry.get(concept)
            if not m:
                continue
            f = m.get("fidelity_settings", {})
            t.add_row(
                f"zoo fidelity {concept}, re-measured {entry.get('when', '')[:10]}",
                f"top-1 {m['fidelity_top1']:.3f} among {m['candidates']} "
                f"({m['fidelity_models']} models, {m['generations_per_model']} pictures each, "
                f"{f.get('ref_images')} references; one picture alone "
                f"{m.get('fidelity_top1_per_image', float('nan')):.3f})"
                + (
                    f"; evaluators {entry['evaluators_sha256'][:8]}"
                    if entry.get("evaluators_sha256")
                    else ""
                )
                + (f", LoRAs {entry['loras_sha256'][:8]}" if entry.get("loras_sha256") else ""),
            )
    for entry in s["revisions"]:
        if entry.get("kind") == "zoo":
            changed = _recipe_change(entry)
            t.add_row(
                f"revision {entry.get('when', '')[:10]}",
                f"{entry.get('what', '')}: {changed or 'recipe unchanged'}; "
                f"{entry.get('models')} models in {entry.get('seconds', 0):.0f} s on "
                f"{entry.get('device')}",
            )
            continue
        b, a = entry.get("before", {}), entry.get("after", {})
        oracle = ", ".join(
            f"{k} {b.get('transient_id', {}).get(k, {}).get('id_score', float('nan')):.2f}"
            f" -> {v['id_score']:.2f}"
            for k, v in a.get("transient_id", {}).items()
        )
        how = ""
        if entry.get("vary") is not None:
            tied = entry.get("vary_tied")
            how = f"vary {entry['vary']}" + ("" if tied is None else f" (tied: {tied})") + ", "
        steps = entry.get("training", {}).get("steps")
        t.add_row(
            f"revision {entry.get('when', '')[:10]}",
            f"{entry.get('what', '')}: {how}{steps} steps, verification ROC-AUC "
            f"{b.get('verification_auc', float('nan')):.3f} -> "
            f"{a.get('verification_auc', float('nan')):.3f}"
            + (f"; perfect-edit ID score {oracle}" if oracle else ""),
        )
    ev = s["metrics"].get(f"explained_variance_{HELDOUT_CONCEPT}")
    if ev:
        cum = ", ".join(f"{k}: {v:.2f}" for k, v in ev["cumulative_at"].items())
        t.add_row(f"{HELDOUT_CONCEPT} PCA (cum. var.)", cum)
    console.print(t)


@world_group.command("export-loras")
@world_path_option
@output_option(required=True)
@click.option("--concept", default=HELDOUT_CONCEPT, show_default=True)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(writable_formats()),
    default=None,
    help="Output format [default: the --for loader's, else diffusers].",
)
@for_option
@click.option("--limit", type=int, default=None, help="Only the first N models.")
@force_option
def export_cmd(
    world_path: Path | None,
    out: Path,
    concept: str,
    fmt: str | None,
    target: str | None,
    limit: int | None,
    force: bool,
) -> None:
    """Write the stacked zoo LoRAs out as ordinary files + labels.csv (for `w2wkit fit`)."""
    from w2wkit.world.shipped import load_world

    fmt = output_format(fmt, target, default="diffusers")

    w = load_world(world_path, verify=False)
    n = len(w.names(concept))
    models = None if limit is None else list(range(min(limit, n)))
    files = w.export_loras(out, concept, format=fmt, overwrite=force, models=models)
    console.print(f"wrote {len(files)} {concept} LoRAs and labels.csv to {out}")


@world_group.command("measure")
@world_path_option
@output_option("JSON file of the measured metrics (optional).")
@click.option(
    "--concept",
    "concepts",
    multiple=True,
    default=CONCEPTS,
    show_default=True,
    help="Concept(s) to measure.",
)
@click.option(
    "--models", type=int, default=_FID.models, show_default=True, help="Zoo models tested."
)
@click.option(
    "--candidates",
    type=int,
    default=_FID.candidates,
    show_default=True,
    help="Instances matched among.",
)
@click.option(
    "--generations",
    type=int,
    default=_FID.generations,
    show_default=True,
    help="Pictures per tested model.",
)
@click.option(
    "--ref-images",
    type=int,
    default=_FID.ref_images,
    show_default=True,
    help="Procedural reference renders per instance.",
)
@click.option("--steps", type=int, default=_FID.steps, show_default=True, help="DDIM steps.")
@click.option("--guidance", type=float, default=_FID.guidance, show_default=True, help="CFG scale.")
@click.option("--seed", type=int, default=_FID.seed, show_default=True, help="Seed of the draws.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--workers", type=int, default=1, show_default=True, help="Render processes.")
@click.option(
    "--record",
    is_flag=True,
    help="Append the result to the world's build log (its 'measurements'; the manifest is "
    "rewritten so that the world still verifies).",
)
@force_option
def measure_cmd(
    world_path: Path | None,
    out: Path | None,
    concepts: tuple[str, ...],
    models: int,
    candidates: int,
    generations: int,
    ref_images: int,
    steps: int,
    guidance: float,
    seed: int,
    device: str,
    workers: int,
    record: bool,
    force: bool,
) -> None:
    """Measure zoo fidelity again, with other settings (recorded in the world only with --record).

    Each tested model renders --generations pictures with its training prompt;
    it is matched when its own instance scores highest (identity embedding,
    mean over its pictures) among --candidates instances. The defaults are the
    build's (its log has the numbers it measured).

    \b
    Examples:
      w2wkit world measure --concept identity --generations 8 -o fidelity.json
    """
    from w2wkit.stio import write_json
    from w2wkit.world.measure import FidelitySettings, measure_world, record_measurement

    if out is not None and out.exists() and not force:
        raise W2WError("exists (give --force to replace it)", path=out)
    settings = FidelitySettings(
        models=models,
        candidates=candidates,
        generations=generations,
        ref_images=ref_images,
        steps=steps,
        guidance=guidance,
        seed=seed,
    )
    res = measure_world(
        world_path,
        tuple(concepts),
        settings,
        device=device,
        workers=workers,
        progress=lambda line: console.print(line, soft_wrap=True),
    )
    if out is not None:
        write_json(out, res)
        console.print(f"wrote {out}")
    if record:
        log = record_measurement(world_path, res)
        console.print(f"recorded in {log}")


@world_group.command("retrain-embedder")
@world_path_option
@click.option(
    "--concept",
    type=click.Choice(list(CONCEPTS)),
    default=HELDOUT_CONCEPT,
    show_default=True,
    help="Which embedder to train again.",
)
@click.option(
    "--vary",
    type=click.FloatRange(0.0, 1.0),
    default=None,
    help="Identity only: probability of toggling each transient attribute (beard, glasses, "
    "lipstick, age) per training picture [default: the build profile's, 0.3].",
)
@click.option(
    "--tied/--flags-only",
    default=None,
    help="Identity only: toggle the attributes as an edit does (ageing greys the hair; "
    "the default) or the flags alone (world v1.1's embedder).",
)
@click.option("--steps", type=click.IntRange(1), default=None, help="Training steps [build's].")
@click.option("--batch", type=click.IntRange(1), default=None, help="Batch size [build's].")
@click.option("--budget", type=click.FloatRange(1.0), default=None, help="Seconds to fit in.")
@click.option("--threads", type=click.IntRange(1), default=None, help="torch CPU threads.")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda.")
@click.option("--workers", type=click.IntRange(1), default=None, help="Render processes.")
def retrain_embedder_cmd(
    world_path: Path | None,
    concept: str,
    vary: float | None,
    tied: bool | None,
    steps: int | None,
    batch: int | None,
    budget: float | None,
    threads: int | None,
    device: str,
    workers: int | None,
) -> None:
    """Train one of the world's embedders again.

    identity (default): the build's training identities and network, pictures
    drawn with beard, glasses, lipstick and age toggled per picture, so that a
    perfect edit keeps its ID score. dog: the build's breeds and pictures, for
    the planned steps (a build's time budget may have cut them short). Replaces
    that embedder in the world (the attribute classifiers and the other
    embedder are kept), records old and new metrics in the build log
    ('revisions') and rewrites the manifest.

    \b
    Examples:
      w2wkit world retrain-embedder --world ./my-world --threads 2
      w2wkit world retrain-embedder --concept dog --threads 2
    """
    from w2wkit.world.retrain import retrain_embedder

    entry = retrain_embedder(
        world_path,
        vary=vary,
        concept=concept,
        tied=tied,
        steps=steps,
        batch=batch,
        budget_s=budget,
        workers=workers,
        device=device,
        threads=threads,
    )
    b, a = entry["before"], entry["after"]
    console.print(
        f"{concept} embedder retrained in {entry['seconds']:.0f} s "
        f"({entry['training']['steps']} steps): verification ROC-AUC "
        f"{b['verification_auc']:.3f} -> {a['verification_auc']:.3f}"
    )
    for k, v in a.get("transient_id", {}).items():
        console.print(
            f"  perfect {k} edit, ID score {b['transient_id'][k]['id_score']:.3f} -> "
            f"{v['id_score']:.3f} ({v['n']} identities)"
        )


def _recipe_change(entry: dict) -> str:
    """``steps 600 -> 1200`` / ``continued for 1200 steps (2400 in all)`` of a zoo revision."""
    rb, ra = entry.get("recipe_before", {}), entry.get("recipe", {})
    skip = {"continued_from", "steps"} if entry.get("continued") else {"continued_from"}
    parts = [f"{k} {rb.get(k)} -> {v}" for k, v in ra.items() if k not in skip and rb.get(k) != v]
    if entry.get("continued"):
        total = entry.get("total_steps")
        parts.insert(0, f"continued for {ra.get('steps')} steps ({total} in all)")
    return ", ".join(parts)


@world_group.command("retrain-zoo")
@world_path_option
@click.option(
    "--concept",
    type=click.Choice(list(CONCEPTS)),
    default=CONCEPTS[-1],  # the zoo retrained so far
    show_default=True,
    help="Which concept's zoo to train again.",
)
@click.option("--steps", type=click.IntRange(1), default=None, help="Steps per model [build's].")
@click.option(
    "--lr", type=click.FloatRange(0.0, min_open=True), default=None, help="Learning rate."
)
@click.option("--batch", type=click.IntRange(1), default=None, help="Batch per model [build's].")
@click.option(
    "--images", "n_images", type=click.IntRange(1), default=None, help="Renders per model."
)
@click.option("--workers", type=click.IntRange(1), default=1, show_default=True)
@click.option("--threads", type=click.IntRange(1), default=None, help="torch threads per worker.")
@click.option(
    "--chunk",
    type=click.IntRange(1),
    default=None,
    help="Models trained together in one batch [build's; 8 on a CPU]. On a 2-core CPU a "
    "chunk of 40 trains ~2.5x faster per model than 8.",
)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or auto.")
@click.option(
    "--work",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder to train the LoRA files into (kept; resumable) [a temporary one].",
)
@click.option(
    "--continue",
    "continue_training",
    is_flag=True,
    help="Train the current models STEPS steps further instead of from the shared "
    "initialisation (recorded as a continuation of the current recipe).",
)
def retrain_zoo_cmd(
    world_path: Path | None,
    concept: str,
    steps: int | None,
    lr: float | None,
    batch: int | None,
    n_images: int | None,
    workers: int,
    threads: int | None,
    chunk: int | None,
    device: str,
    work: Path | None,
    continue_training: bool,
) -> None:
    """Train every model of one concept's zoo again with another training budget.

    The same instances, renders, initialisation and seeds as the build; rank,
    alpha and targets stay the world's. The new factors replace the concept's
    in loras.safetensors (the other concept is kept), the recipe is recorded
    in the stack and the build log ('revisions'), and the manifest is
    rewritten. Measure the result with 'w2wkit world measure'.

    \b
    Examples:
      w2wkit world retrain-zoo --concept dog --steps 1200 --workers 2
      w2wkit world retrain-zoo --world ./my-world --concept dog --device cuda
      w2wkit world retrain-zoo --concept dog --continue --steps 1200 --workers 2
    """
    from w2wkit.world.retrain import retrain_zoo

    entry = retrain_zoo(
        world_path,
        concept,
        steps=steps,
        lr=lr,
        batch=batch,
        n_images=n_images,
        workers=workers,
        device=device,
        threads=threads,
        chunk=chunk,
        work=work,
        continue_training=continue_training,
    )
    changed = _recipe_change(entry)
    console.print(
        f"{concept} zoo retrained: {entry['models']} models in {entry['seconds']:.0f} s "
        f"({changed or 'recipe unchanged'}); mean training loss "
        f"{entry['mean_loss'] if entry['mean_loss'] is not None else float('nan'):.4f}"
    )


@world_group.command("verify")
@world_path_option
@click.option(
    "--repair",
    is_flag=True,
    help="Finish an interrupted revision (retrain-zoo / retrain-embedder): keep it if it had "
    "written every file, else put the files back as they were before it.",
)
def verify_cmd(world_path: Path | None, repair: bool) -> None:
    """Check every shipped file against the manifest's sha256.

    \b
    Examples:
      w2wkit world verify
      w2wkit world verify --world ./my-world --repair
    """
    from w2wkit.world.shipped import repair_world, verify_world

    if repair:
        done = repair_world(world_path)
        console.print(
            {
                "none": "no interrupted revision",
                "kept": "the interrupted revision had written every file: kept",
                "restored": "the interrupted revision was undone: files restored",
            }[done]
        )
    res = verify_world(world_path)
    console.print(f"ok: {res['files']} files, {(res['total_bytes'] or 0) / 1e6:.1f} MB")


def register(cli: click.Group) -> None:
    """Add ``w2wkit world`` to ``cli``."""
    cli.add_command(world_group)


__all__ = ["W2WError", "register"]
