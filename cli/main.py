"""Entry point of the ``w2wkit`` command."""

from __future__ import annotations

import importlib

import click

from w2wkit import __version__
from w2wkit.cli.common import W2WGroup, _set_verbosity, console

#: Modules that each add their commands to :data:`cli` through ``register(cli)``.
COMMAND_MODULES = (
    "w2wkit.cli.cmd_formats",
    "w2wkit.cli.cmd_space",
    "w2wkit.cli.cmd_directions",
    "w2wkit.cli.cmd_render",
    "w2wkit.cli.cmd_invert",
    "w2wkit.cli.cmd_world",
    "w2wkit.cli.cmd_eval",
    "w2wkit.cli.cmd_ui",
    "w2wkit.cli.cmd_train",
)


@click.group(cls=W2WGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="w2wkit")
@click.option(
    "--debug",
    is_flag=True,
    help="Print the full traceback of an error (also: W2WKIT_DEBUG=1).",
)
@click.option(
    "-q",
    "--quiet",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=lambda ctx, p, v: _set_verbosity(ctx, p, v),
    help="Only errors and warnings (also after the command name).",
)
@click.option(
    "-v",
    "--verbose",
    count=True,
    expose_value=False,
    is_eager=True,
    callback=lambda ctx, p, v: _set_verbosity(ctx, p, v),
    help="More detail; -vv for debug output (also after the command name).",
)
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """w2wkit: treat a folder of LoRAs as a space of models.

    \b
    Typical session:
      w2wkit inspect my_lora.safetensors
      w2wkit fit ./loras/ -o w2w-space
      w2wkit sample -n 4 -o samples/
      w2wkit apply my_lora.safetensors --direction age --strength 1.5 -o older.safetensors

    Every command has --help with examples and takes -q/--quiet and -v/--verbose.
    Errors print one line and exit 1; --debug (or W2WKIT_DEBUG=1) shows the
    traceback. Shell completion (bash): eval "$(_W2WKIT_COMPLETE=bash_source w2wkit)"
    (zsh: zsh_source, fish: fish_source).
    """
    obj = ctx.ensure_object(dict)
    obj["debug"] = debug
    console.quiet = obj.get("verbosity", 0) < 0  # -q of an earlier run in this process is gone


for _mod in COMMAND_MODULES:
    importlib.import_module(_mod).register(cli)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="w2wkit")


if __name__ == "__main__":  # pragma: no cover
    main()
