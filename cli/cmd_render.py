"""``w2wkit render``: image grids of many LoRA models, batched across models."""

from __future__ import annotations

import json
import re
from pathlib import Path

import click

from w2wkit.cli.common import (
    allow_pickle_option,
    console,
    device_option,
    force_option,
    output_option,
    torch_dtype_option,
)
from w2wkit.errors import OUTPUT_EXISTS, FormatError, W2WError


def parse_seeds(text: str) -> list[int]:
    """``"0,1,5-7"`` -> ``[0, 1, 5, 6, 7]`` (non-negative integers)."""
    seeds: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if m is None or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
            raise W2WError(f"bad seed '{part}'", key="--seeds", hint="e.g. 0,1,2 or 0-3")
        hi = m.group(2) if m.group(2) is not None else m.group(1)
        seeds.extend(range(int(m.group(1)), int(hi) + 1))
    if not seeds:
        raise W2WError("no seeds given", key="--seeds")
    return seeds


def parse_size(text: str | None) -> tuple[int | None, int | None]:
    """``"512"`` -> (512, 512); ``"512x768"`` -> (512, 768) as (height, width)."""
    if not text:
        return None, None
    try:
        if "x" in text.lower():
            h, w = text.lower().split("x", 1)
            return int(h), int(w)
        return int(text), int(text)
    except ValueError:
        raise W2WError(f"bad size '{text}'", key="--size", hint="e.g. 512 or 512x768") from None


def _expand(paths: tuple[Path, ...], allow_pickle: bool) -> list[Path]:
    from w2wkit.formats.registry import discover_lora_files

    files: list[Path] = []
    for p in paths:
        files.extend(discover_lora_files(p, allow_pickle=allow_pickle))
    return files


@click.command("render")
@click.argument("loras", nargs=-1, type=click.Path(path_type=Path))
@click.option(
    "--base",
    required=True,
    help="SD1.x/2.x or SDXL pipeline: a diffusers folder (or a hub id, downloaded).",
)
@output_option("Grid PNG.", required=True)
@click.option(
    "-p",
    "--prompt",
    "prompts",
    multiple=True,
    help="Prompt (repeat for several columns). Default: 'a photo of sks person'.",
)
@click.option("--negative-prompt", default="", show_default=True)
@click.option("--seeds", default="0", show_default=True, help="Seeds: '0,1,2' or '0-3'.")
@click.option("--steps", default=25, show_default=True, type=int, help="Scheduler steps.")
@click.option(
    "--guidance", default=7.5, show_default=True, type=float, help="Classifier-free guidance."
)
@click.option("--size", help="Image size: 512 or HEIGHTxWIDTH (default: the pipeline's).")
@click.option(
    "--edited",
    "edited",
    multiple=True,
    type=click.Path(path_type=Path),
    help="Edited model of each LORA, in the same order (repeat, or give a folder).",
)
@click.option(
    "--inject-after",
    "inject_t",
    type=float,
    help="Delayed injection: each LORA while timestep t > T, its --edited model for t <= T "
    "(0..999; 700-1000 global edits, 400-700 finer ones).",
)
@click.option("--include-base", is_flag=True, help="Add a row for the base model.")
@device_option
@torch_dtype_option
@click.option("--batch-size", default=16, show_default=True, type=int, help="Images per batch.")
@click.option("--cell", type=int, help="Grid cell size in pixels (default: image size, >= 96).")
@click.option("--json", "as_json", is_flag=True, help="Print the settings as JSON at the end.")
@force_option
@allow_pickle_option
def render_cmd(
    loras: tuple[Path, ...],
    base: str,
    out: Path,
    prompts: tuple[str, ...],
    negative_prompt: str,
    seeds: str,
    steps: int,
    guidance: float,
    size: str | None,
    edited: tuple[Path, ...],
    inject_t: float | None,
    include_base: bool,
    device: str,
    dtype: str,
    batch_size: int,
    cell: int | None,
    as_json: bool,
    force: bool,
    allow_pickle: bool,
) -> None:
    """Render a grid: rows = models, columns = prompts x seeds.

    All LoRAs are rendered together: each sample in a batch uses its own LoRA
    weights (the LoRAs must target the same modules), so many models cost
    about as much as one batch. Every image is seeded on its own, so a model's
    picture does not depend on the other models.

    \b
    Examples:
      w2wkit render --base ./sd15 a.safetensors b.safetensors -o grid.png
      w2wkit render --base ./sd15 ./samples/ -p "a photo of sks person" \\
          -p "sks person in a forest" --seeds 0-3 --steps 30 -o grid.png
      w2wkit render --base ./sd15 me.safetensors --edited me_beard.safetensors \\
          --inject-after 800 -o edit.png
    """
    from w2wkit.render import Renderer

    if out.exists() and not force:
        raise FormatError(OUTPUT_EXISTS, path=out)
    if not loras and not include_base:
        raise W2WError("give at least one LoRA (or --include-base)", key="LORA")
    if edited and inject_t is None:
        raise W2WError("--edited needs --inject-after T", key="--inject-after")
    if inject_t is not None and not edited:
        raise W2WError("--inject-after needs --edited LORA for each LoRA", key="--edited")
    seed_list = parse_seeds(seeds)
    height, width = parse_size(size)
    models: list[Path | None] = list(_expand(loras, allow_pickle)) if loras else []
    edits: list[Path | None] | None = list(_expand(edited, allow_pickle)) if edited else None
    if edits is not None and len(edits) != len(models):
        raise W2WError(
            f"{len(edits)} --edited models for {len(models)} LoRAs; give one each, same order",
            key="--edited",
        )
    if include_base:
        models = [None, *models]
        if edits is not None:
            edits = [None, *edits]
    allow_download = not Path(base).exists()
    renderer = Renderer(base, device=device, dtype=dtype, allow_download=allow_download)
    originals, edit_ads, names = renderer.prepare(models, edited=edits, allow_pickle=allow_pickle)
    renderer.check(originals + (edit_ads or []))

    from w2wkit.progress import Bar

    prompt_list = list(prompts) or ["a photo of sks person"]
    total = len(originals) * len(prompt_list) * len(seed_list)
    with Bar(total, "rendering", unit="images", transient=True) as bar:

        def progress(done: int, total: int) -> None:
            bar.set(done)

        result = renderer.render(
            originals,
            prompt_list,
            seed_list,
            steps=steps,
            guidance=guidance,
            negative_prompt=negative_prompt,
            height=height,
            width=width,
            edited=edit_ads,
            inject_t=inject_t,
            names=names,
            batch_size=batch_size,
            progress=progress,
        )
    path = result.save_grid(out, overwrite=force, cell=cell)
    n = result.images.shape[0] * result.images.shape[1] * result.images.shape[2]
    if as_json:
        click.echo(json.dumps({"output": str(path), "images": n, **result.info}))
    else:
        console.print(
            f"wrote {path} ({len(result.names)} models x {len(result.prompts)} prompts x "
            f"{len(result.seeds)} seeds, {result.info['device']}, {result.info['dtype']})"
        )


def register(cli: click.Group) -> None:
    """Add ``render`` to the command group."""
    cli.add_command(render_cmd)
