"""``w2wkit invert``: one model of a weight space per image (coefficients only)."""

from __future__ import annotations

from pathlib import Path

import click

from w2wkit.cli.cmd_space import no_verify_option
from w2wkit.cli.common import (
    console,
    device_option,
    for_option,
    force_option,
    note,
    output_format,
    output_option,
    space_option,
    torch_dtype_option,
    write_format_option,
)
from w2wkit.errors import W2WError


@click.command("invert")
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@space_option("The space folder (written by `w2wkit fit`); factors representation.")
@click.option(
    "--base",
    required=True,
    help="The Stable Diffusion pipeline the space's LoRAs were trained on (diffusers folder, "
    "or a hub id, downloaded).",
)
@output_option(
    "Output folder: one LoRA per image, coefficients.npy, inversion.json.", required=True
)
@click.option(
    "--mask",
    "masks",
    multiple=True,
    type=click.Path(path_type=Path),
    help="Grey-level mask image (white = fit): one for all images, or repeat once per image.",
)
@click.option(
    "--auto-mask",
    is_flag=True,
    help="Use the concept pack's mask (e.g. the identity pack's face region).",
)
@click.option(
    "-k",
    "--components",
    type=int,
    default=None,
    help="Principal components to optimise (default: the recipe's, capped at the space's k).",
)
@click.option("--steps", type=int, default=None, help="Maximum Adam steps per image.")
@click.option("--lr", type=float, default=None, help="Adam step size (coefficient units).")
@click.option(
    "--ood",
    is_flag=True,
    help="Out-of-distribution recipe (paintings, sketches): for SD-sized spaces the paper's "
    "(fewer components, larger step, more steps); the miniature world's is its standard one.",
)
@click.option(
    "--prompt",
    default=None,
    help="Prompt (default: the one the space's LoRA files name in their metadata, e.g. 'a "
    "photo of sks person' for the miniature world; else the concept's, 'sks person').",
)
@click.option("--concept", default=None, help="Concept pack (identity, dog, ...) for defaults.")
@write_format_option
@for_option
@click.option("--seed", type=int, default=0, show_default=True, help="Image i uses seed + i.")
@click.option(
    "--early-stop/--no-early-stop",
    "early_stop",
    default=None,
    help="Stop an image when its loss stops improving (default: the recipe's, off; on the "
    "miniature world it lowered the ID score of inversions).",
)
@click.option("--batch-size", type=int, default=None, help="Images per batch (default: all).")
@device_option
@torch_dtype_option
@force_option
@no_verify_option
def invert_cmd(
    images: tuple[Path, ...],
    space_path: Path,
    base: str,
    out: Path,
    masks: tuple[Path, ...],
    auto_mask: bool,
    components: int | None,
    steps: int | None,
    lr: float | None,
    ood: bool,
    prompt: str | None,
    concept: str | None,
    fmt: str | None,
    target: str | None,
    seed: int,
    early_stop: bool | None,
    batch_size: int | None,
    device: str,
    dtype: str,
    force: bool,
    no_verify: bool,
) -> None:
    """Invert images into models of a weight space (one LoRA per image).

    Only the coefficients of the first K principal components are trained
    (from the mean model), with the diffusion loss on the image; all images
    are optimised together in one batch, each with its own coefficients.

    \b
    Examples:
      w2wkit invert me.jpg --space w2w-space --base ./sd15 -o me/
      w2wkit invert a.png b.png --base ./sd15 --mask face.png -k 5000 -o out/
      w2wkit invert painting.png --base ./sd15 --ood -o painting/ --format diffusers
    """
    from w2wkit.invert import _check_output, invert
    from w2wkit.space import WeightSpace

    _check_output(out, force)  # before the (long) inversion
    fmt = output_format(fmt, target)
    if masks and auto_mask:
        raise W2WError("give --mask or --auto-mask, not both", key="--mask")
    space = WeightSpace.load(space_path, verify=not no_verify)
    mask: object = None
    if auto_mask:
        mask = "auto"
        if concept is None:
            raise W2WError("--auto-mask needs --concept (e.g. identity)", key="--auto-mask")
    elif masks:
        mask = [str(m) for m in masks] if len(masks) > 1 else str(masks[0])

    def notice(msg: str) -> None:
        note(msg)

    allow_download = not Path(base).exists()
    pipeline: object = base
    if allow_download:
        from w2wkit.render import load_pipeline

        pipeline = load_pipeline(base, device=device, dtype=dtype, allow_download=True, sdxl=True)
    result = invert(
        space,
        pipeline,
        [str(p) for p in images],
        n_components=components,
        steps=steps,
        lr=lr,
        mask=mask,
        prompt=prompt,
        concept=concept,
        ood=ood,
        early_stopping=early_stop,
        batch_size=batch_size,
        device=device,
        dtype=dtype,
        seed=seed,
        progress=True,
        notice=notice,
    )
    if target is not None and result.adapters:
        from w2wkit.formats.targets import loader_gaps

        for gap in loader_gaps(result.adapters[0], fmt, target):
            note(gap.message(fmt))
    result.save(
        out,
        format=fmt,
        overwrite=force,
        inputs=[str(p) for p in images],
        space=str(space_path),
        base=str(base),
    )
    n = len(result.adapters)
    s = result.settings
    console.print(
        f"wrote {n} model{'s' if n != 1 else ''} to {out} ({fmt}): {s['n_components']} "
        f"components, lr {s['lr']}, steps {', '.join(str(int(x)) for x in result.steps_run)} "
        f"of {s['steps']}, {result.seconds:.1f} s on {s['device']}",
        soft_wrap=True,
    )


def register(cli: click.Group) -> None:
    """Add ``invert`` to ``cli``."""
    cli.add_command(invert_cmd)
