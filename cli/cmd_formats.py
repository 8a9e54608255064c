"""``w2wkit inspect`` and ``w2wkit convert``: LoRA files in and out."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from w2wkit.adapter import Adapter, LoraLayer
from w2wkit.cli.common import (
    DTYPES,
    allow_pickle_option,
    console,
    for_option,
    force_option,
    keep_alphas_option,
    output_format,
    output_option,
    storage_dtype_option,
    write_options,
)
from w2wkit.errors import FormatError
from w2wkit.formats.registry import (
    FORMATS,
    _ensure_loaded,
    discover_lora_files,
    provenance_metadata,
    read_adapter,
    writable_formats,
    write_adapter,
)

_ensure_loaded()
READ_FORMATS = sorted(FORMATS)
WRITE_FORMATS = writable_formats()
input_format_option = click.option(
    "--format", "fmt", type=click.Choice(READ_FORMATS), help="Force the input format."
)


def _family(adapter: Adapter) -> str:
    try:
        from w2wkit.names import guess_family
    except ImportError:  # pragma: no cover - names module missing
        return "unknown"
    return guess_family({m: layer.delta_shape for m, layer in adapter.items()})


def summarize(adapter: Adapter, path: Path) -> dict[str, Any]:
    """Describe an adapter for ``inspect``.

    Returns
    -------
    dict
        JSON-serialisable summary: format, family, modules, ranks, alphas,
        dtypes, bytes, components, metadata keys.
    """
    ranks: Counter[int] = Counter()
    alphas: Counter[float] = Counter()
    kinds: Counter[str] = Counter()
    dtypes: Counter[str] = Counter()
    for layer in adapter.layers.values():
        if isinstance(layer, LoraLayer):
            ranks[layer.rank] += 1
            alphas[float(layer.alpha)] += 1
            kinds["lora-conv" if layer.down.ndim == 4 else "lora"] += 1
        else:
            kinds[layer.kind] += 1
        dtypes[layer.dtype] += 1
    size = (
        sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        if path.is_dir()
        else path.stat().st_size
    )
    return {
        "path": str(path),
        "format": adapter.format,
        "family": _family(adapter),
        "components": adapter.components,
        "modules": len(adapter),
        "layer_kinds": dict(kinds),
        "ranks": {str(k): v for k, v in sorted(ranks.items())},
        "alphas": {f"{k:g}": v for k, v in sorted(alphas.items())},
        "dtypes": dict(dtypes),
        "parameters": adapter.numel(),
        "bytes": int(size),
        "metadata_keys": sorted(adapter.metadata),
    }


def _fmt_counter(d: dict[str, int]) -> str:
    return ", ".join(f"{k} (x{v})" if len(d) > 1 else k for k, v in d.items()) or "-"


@click.command("inspect")
@click.argument("path", type=click.Path(path_type=Path))
@input_format_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@allow_pickle_option
def inspect_cmd(path: Path, fmt: str | None, as_json: bool, allow_pickle: bool) -> None:
    """Describe a LoRA file, a PEFT folder, or every LoRA in a folder.

    Shows the detected format, the base-model family it targets, the number of
    modules, ranks, alphas, storage dtypes and size.

    \b
    Examples:
      w2wkit inspect my_lora.safetensors
      w2wkit inspect ./loras/ --json
    """
    files = discover_lora_files(path, allow_pickle=allow_pickle)
    rows = [summarize(read_adapter(f, format=fmt, allow_pickle=allow_pickle), f) for f in files]
    if as_json:
        click.echo(json.dumps(rows[0] if len(rows) == 1 and path.is_file() else rows, indent=2))
        return
    if len(rows) == 1:
        info = rows[0]
        table = Table(title=str(info["path"]), show_header=False)
        table.add_column("field", style="bold")
        table.add_column("value")
        for key in (
            "format",
            "family",
            "components",
            "modules",
            "layer_kinds",
            "ranks",
            "alphas",
            "dtypes",
            "bytes",
        ):
            value = info[key]
            if isinstance(value, dict):
                value = _fmt_counter(value)
            elif isinstance(value, list):
                value = ", ".join(value)
            table.add_row(key, f"{value:,}" if isinstance(value, int) else str(value))
        meta = info["metadata_keys"]
        table.add_row(
            "metadata", f"{len(meta)} keys" + (f": {', '.join(meta[:6])}" if meta else "")
        )
        console.print(table)
        return
    table = Table(title=f"{len(rows)} LoRA files under {path}")
    for col in ("file", "format", "family", "modules", "ranks", "alphas", "dtype", "bytes"):
        table.add_column(col, justify="right" if col in ("modules", "bytes") else "left")
    for info in rows:
        table.add_row(
            str(Path(info["path"]).relative_to(path)) if path.is_dir() else info["path"],
            str(info["format"]),
            info["family"],
            str(info["modules"]),
            _fmt_counter(info["ranks"]),
            _fmt_counter(info["alphas"]),
            _fmt_counter(info["dtypes"]),
            f"{info['bytes']:,}",
        )
    console.print(table)


@click.command("convert")
@click.argument("src", type=click.Path(path_type=Path))
@output_option("Output file (kohya, diffusers) or folder (peft).", required=True)
@click.option(
    "--to",
    "to",
    type=click.Choice(WRITE_FORMATS),
    help="Output format [default: the one the --for loader reads completely].",
)
@for_option
@keep_alphas_option
@input_format_option
@storage_dtype_option(
    "Storage dtype of the output (default: per layer, the dtype its down factor had; "
    "both factors are stored in it)."
)
@force_option
@allow_pickle_option
def convert_cmd(
    src: Path,
    out: Path,
    to: str | None,
    target: str | None,
    keep_alphas: bool,
    fmt: str | None,
    dtype: str | None,
    force: bool,
    allow_pickle: bool,
) -> None:
    """Convert a LoRA between kohya, diffusers and PEFT formats.

    Deltas are kept exactly; the output records where it came from in its
    metadata. --for LOADER writes what that program reads completely. kohya
    output gets one alpha for all modules (per-module alphas are folded into
    the factors, which diffusers would otherwise mis-scale) unless --keep-alphas.

    \b
    Examples:
      w2wkit convert my_lora.safetensors --for comfyui -o for_comfyui.safetensors
      w2wkit convert my_lora.safetensors --to diffusers -o my_lora_diffusers.safetensors
      w2wkit convert ./peft_adapter/ --to kohya -o for_a1111.safetensors
    """
    if to is None and target is None:
        raise click.UsageError("give --to FORMAT or --for LOADER")
    to = output_format(to, target)
    if src.resolve() == out.resolve():
        raise FormatError("output is the input file; choose another output path", path=out)
    adapter = read_adapter(src, format=fmt, allow_pickle=allow_pickle)
    if not adapter.is_lora:
        kinds = sorted({getattr(layer, "kind", "?") for layer in adapter.layers.values()})
        raise FormatError(
            f"holds {'/'.join(kinds)} layers, which are read as exact deltas only; "
            "they have no LoRA factors to write (fit a space with --representation delta, "
            "whose exports re-compress deltas to LoRA factors)",
            path=src,
        )
    prov = provenance_metadata("w2wkit convert", [str(src)], source_format=adapter.format)
    written = write_adapter(
        adapter,
        out,
        format=to,
        dtype=DTYPES.get(dtype or ""),
        overwrite=force,
        provenance=prov,
        **write_options(target, keep_alphas),
    )
    console.print(f"wrote {written} ({to}, {len(adapter)} modules, from {adapter.format})")


def register(cli: click.Group) -> None:
    """Add the commands of this module to ``cli``."""
    cli.add_command(inspect_cmd)
    cli.add_command(convert_cmd)
