"""``w2wkit train``: one DreamBooth LoRA per instance folder, many models per batch."""

from __future__ import annotations

from pathlib import Path

import click

from w2wkit.cli.common import (
    cluster_option,
    console,
    device_option,
    note,
    output_option,
    quiet_enabled,
    write_format_option,
)
from w2wkit.errors import W2WError


@click.command("train")
@click.argument("instances", type=click.Path(path_type=Path))
@click.option("--base", required=True, help="Stable Diffusion 1.x/2.x or SDXL pipeline folder.")
@output_option("Output folder (one LoRA per instance + train_manifest.json).", required=True)
@click.option("--rank", default=1, show_default=True, type=int, help="LoRA rank.")
@click.option("--alpha", default=1.0, show_default=True, type=float, help="LoRA alpha.")
@click.option(
    "--targets",
    default="to_q,to_k,to_v,to_out.0",
    show_default=True,
    help="UNet modules (names or name endings, comma-separated) that get a LoRA.",
)
@click.option("--steps", default=400, show_default=True, type=int, help="Steps per model.")
@click.option("--batch", default=1, show_default=True, type=int, help="Pictures per model/step.")
@click.option("--lr", default=5e-4, show_default=True, type=float, help="Learning rate (Adam).")
@click.option(
    "--instance-prompt",
    default="a photo of sks person",
    show_default=True,
    help="Prompt of every training picture (with the rare token sks).",
)
@click.option("--resolution", type=int, help="Training picture side (default: the pipeline's).")
@click.option(
    "--models-per-batch",
    default="auto",
    show_default=True,
    help="Models trained together, or auto (from free memory; halved on out-of-memory).",
)
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the draws.")
@click.option(
    "--init-seed", default=0, show_default=True, type=int, help="Shared initialisation seed."
)
@write_format_option
@device_option
@click.option("--skip-bad-images", is_flag=True, help="Skip unreadable pictures (say which).")
@click.option(
    "--dry-run", is_flag=True, help="Print the plan and an estimated time; train nothing."
)
@click.option("--force", is_flag=True, help="Train again into a folder of another recipe.")
@click.option(
    "--captions",
    is_flag=True,
    help="Prompt each picture with its caption .txt (a caption without the instance token "
    "follows the instance prompt: '<instance prompt>, <caption>').",
)
@click.option(
    "--instance-token",
    default="sks",
    show_default=True,
    help="The rare token; with --captions, captions that lack it get the instance prompt first.",
)
@click.option(
    "--prior-preservation",
    is_flag=True,
    help="Add the prior loss on class pictures the base model renders once (cached).",
)
@click.option(
    "--class-prompt",
    default="a photo of a person",
    show_default=True,
    help="Prompt of the class pictures (--prior-preservation).",
)
@click.option(
    "--num-class-images",
    default=100,
    show_default=True,
    type=int,
    help="Class pictures to render (--prior-preservation).",
)
@click.option(
    "--prior-weight",
    default=1.0,
    show_default=True,
    type=float,
    help="Weight of the prior loss (--prior-preservation).",
)
@click.option(
    "--class-dir",
    type=click.Path(path_type=Path),
    help="Cache of the class pictures (default OUT/class_pictures; share it between runs).",
)
@click.option(
    "--text-encoder",
    is_flag=True,
    help="A LoRA on the text encoder's attention projections too (written with the UNet's).",
)
@click.option("--flip", is_flag=True, help="Mirror each training sample left-right (p = 0.5).")
@click.option(
    "--random-crop/--center-crop",
    default=False,
    show_default=True,
    help="Crop a random square of each resized picture per sample, or its center once.",
)
@click.option(
    "--precision",
    type=click.Choice(["fp32", "bf16", "fp16"]),
    default="fp32",
    show_default=True,
    help="Frozen base in bf16/fp16 under autocast (LoRA factors, Adam and loss stay "
    "float32; fp16 with a loss scale per model).",
)
@click.option(
    "--check",
    is_flag=True,
    help="After training, render a grid per model to OUT/check/NAME.png (GPU when present).",
)
@click.option(
    "--check-seeds",
    default="0,1,2,3",
    show_default=True,
    help="Seeds of the --check grids (comma-separated).",
)
@click.option(
    "--check-steps", default=25, show_default=True, type=int, help="Sampler steps of --check."
)
@cluster_option
def train_cmd(
    instances: Path,
    base: str,
    out: Path,
    rank: int,
    alpha: float,
    targets: str,
    steps: int,
    batch: int,
    lr: float,
    instance_prompt: str,
    resolution: int | None,
    models_per_batch: str,
    seed: int,
    init_seed: int,
    fmt: str | None,
    device: str,
    skip_bad_images: bool,
    dry_run: bool,
    force: bool,
    captions: bool,
    instance_token: str,
    prior_preservation: bool,
    class_prompt: str,
    num_class_images: int,
    prior_weight: float,
    class_dir: Path | None,
    text_encoder: bool,
    flip: bool,
    random_crop: bool,
    precision: str,
    check: bool,
    check_seeds: str,
    check_steps: int,
    cluster: str | None,
) -> None:
    """Train one LoRA per instance of INSTANCES on the --base pipeline.

    INSTANCES is a folder of instance folders (pictures; an optional caption
    .txt per picture; an optional labels.csv at the top, copied into the
    output) or a CSV/JSONL manifest with the columns instance, picture,
    caption. Every model gets the same recipe (the paper's by default: rank 1,
    one shared initialisation, the UNet's attention projections), many models
    share a batch, each trained exactly as if alone. A killed run continues
    where it stopped when run again. Each model's loss at every step is
    written to OUT/losses/NAME.json.

    Beyond the paper's recipe (all off by default): --captions,
    --prior-preservation (class pictures cached in OUT/class_pictures or
    --class-dir), --text-encoder, --flip, --random-crop, --precision bf16/fp16;
    --check renders a grid per model after training.
    With --cluster, chunks of models are Dask tasks: the workers (which must
    see INSTANCES, --base and -o at the same paths) write the models, this
    process keeps the manifest.

    \b
    Examples:
      w2wkit train ./people --base ./sd15 -o ./people-loras --dry-run
      w2wkit train ./people --base ./sd15 -o ./people-loras --steps 800
      w2wkit train ./people --base ./sd15 -o ./people-loras --cluster sched.json
      w2wkit train ./people --base ./sdxl -o ./people-xl-loras --resolution 1024
      w2wkit fit ./people-loras -o people-space --labels ./people-loras/labels.csv
    """
    from w2wkit.training import Recipe, train

    mpb: int | str = models_per_batch.strip().lower()
    if mpb != "auto":
        try:
            mpb = int(mpb)
        except ValueError:
            raise W2WError(
                f"bad value {models_per_batch!r}", key="--models-per-batch", hint="a number or auto"
            ) from None
    try:
        seeds = [int(x) for x in check_seeds.split(",") if x.strip()]
    except ValueError:
        raise W2WError(
            f"bad value {check_seeds!r}", key="--check-seeds", hint="comma-separated integers"
        ) from None
    if check and not seeds:
        raise W2WError("give at least one seed", key="--check-seeds")
    if check_steps < 1:
        raise W2WError(f"must be >= 1, got {check_steps}", key="--check-steps")
    recipe = Recipe(
        rank=rank,
        alpha=alpha,
        targets=tuple(t.strip() for t in targets.split(",") if t.strip()),
        steps=steps,
        batch=batch,
        lr=lr,
        instance_prompt=instance_prompt,
        resolution=resolution,
        init_seed=init_seed,
        seed=seed,
        captions=captions,
        instance_token=instance_token,
        prior_preservation=prior_preservation,
        class_prompt=class_prompt,
        num_class_images=num_class_images,
        prior_weight=prior_weight,
        text_encoder=text_encoder,
        flip=flip,
        random_crop=random_crop,
        precision=precision,
    )
    from w2wkit.cluster import open_client

    with open_client(cluster) as client:  # None: no cluster, dask not imported
        plan = train(
            instances,
            base,
            out,
            recipe,
            models_per_batch=mpb,
            format=fmt or "kohya",
            device=device,
            skip_bad_images=skip_bad_images,
            overwrite=force,
            dry_run=dry_run,
            progress=not quiet_enabled(),
            warn=note,
            check=check,
            check_seeds=seeds,
            check_steps=check_steps,
            class_dir=class_dir,
            client=client,
        )
    if dry_run:
        console.print(plan.describe())
        return
    console.print(
        f"wrote {len(plan.written)} LoRAs to {out} ({plan.done} were done before"
        + (
            f", {len(plan.failed_names)} diverged: {', '.join(plan.failed_names)}"
            if plan.failed_names
            else ""
        )
        + ")"
    )
    if plan.checked:
        console.print(f"check grids of {len(plan.checked)} models in {out / 'check'}")
    if plan.failed_names:
        raise SystemExit(1)


def register(cli: click.Group) -> None:
    """Add ``train`` to the command group."""
    cli.add_command(train_cmd)
