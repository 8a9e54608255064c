"""Shared pieces of the command line: error handling, consoles, options."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from w2wkit.errors import W2WError

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def fail(message: str, code: int = 1) -> None:
    """Print one error line to stderr and exit with ``code``."""
    err_console.print(f"[bold red]error:[/] {message}", markup=True, soft_wrap=True)
    sys.exit(code)


class W2WGroup(click.Group):
    """A click group that turns :class:`W2WError` into one line and exit 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except W2WError as exc:
            fail(str(exc))
        except KeyboardInterrupt:
            fail("interrupted", code=130)
        except MemoryError:
            fail("out of memory; try a smaller --block-size or the randomized solver")


force_option = click.option("--force", is_flag=True, help="Overwrite the output if it exists.")


def profile_option(choices: list[str], default: str, help: str) -> Any:
    """``--profile`` with a fixed set of named settings."""
    return click.option(
        "--profile", type=click.Choice(choices), default=default, show_default=True, help=help
    )


energy_option = click.option(
    "--energy",
    type=float,
    default=None,
    help="Delta spaces: per layer, the smallest rank keeping this fraction of the squared "
    "norm (e.g. 0.999; --rank caps it).",
)
allow_pickle_option = click.option(
    "--allow-pickle",
    is_flag=True,
    help="Also read .pt/.pth/.ckpt/.bin pickles (torch.load with weights_only=True). "
    "Only for files you trust.",
)

#: Folder ``fit`` writes and later commands read when ``--space`` is not given.
DEFAULT_SPACE = "w2w-space"


def space_option(help: str, default: str | None = DEFAULT_SPACE) -> Any:
    """``--space`` (parameter ``space_path``): the space folder to read."""
    extra: dict[str, Any] = {} if default is None else {"default": default, "show_default": True}
    return click.option(
        "--space", "space_path", type=click.Path(path_type=Path), help=help, **extra
    )


def output_option(help: str | None = None, **kwargs: Any) -> Any:
    """``-o/--output`` (parameter ``out``), a path; ``kwargs`` go to :func:`click.option`."""
    return click.option(
        "-o", "--output", "out", type=click.Path(path_type=Path), help=help, **kwargs
    )


#: ``--dtype`` choices of written LoRA files -> safetensors storage dtype.
DTYPES = {"fp32": "F32", "fp16": "F16", "bf16": "BF16"}


def storage_dtype_option(help: str) -> Any:
    """``--dtype`` (one of :data:`DTYPES`): storage dtype of a written LoRA file."""
    return click.option("--dtype", type=click.Choice(sorted(DTYPES)), help=help)


write_format_option = click.option(
    "--format",
    "fmt",
    type=click.Choice(["kohya", "diffusers", "peft"]),
    default="kohya",
    show_default=True,
)
device_option = click.option(
    "--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1..."
)
torch_dtype_option = click.option(
    "--dtype",
    type=click.Choice(["float32", "float16", "bfloat16"]),
    default="float32",
    show_default=True,
)
