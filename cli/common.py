"""Shared pieces of the command line: error handling, consoles, options."""

from __future__ import annotations

import sys
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
allow_pickle_option = click.option(
    "--allow-pickle",
    is_flag=True,
    help="Also read .pt/.pth/.ckpt/.bin pickles (torch.load with weights_only=True). "
    "Only for files you trust.",
)
