"""Shared pieces of the command line: error handling, consoles, options."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import click
from rich.console import Console
from rich.text import Text

from w2wkit.errors import W2WError
from w2wkit.formats.registry import writable_formats

console = Console(highlight=False, markup=False, soft_wrap=True)  # lines whole (paths intact)
err_console = Console(stderr=True, highlight=False, markup=False, soft_wrap=True)


#: Environment variable that turns on tracebacks, like ``--debug``.
DEBUG_ENV = "W2WKIT_DEBUG"

_OS_HINTS = {
    errno.ENOSPC: "the disk is full; free space or write elsewhere",
    errno.EDQUOT: "the disk quota is exceeded; free space or write elsewhere",
    errno.EROFS: "the file system is read-only; write elsewhere",
    errno.EEXIST: "it already exists; pass --force to replace it",
    errno.EACCES: "permission denied; check the file's permissions",
    errno.EPERM: "operation not permitted; check the file's permissions",
    errno.ENOENT: "no such file or folder",
    errno.ENOTDIR: "a part of the path is not a folder",
    errno.EISDIR: "it is a folder, not a file",
    errno.ENAMETOOLONG: "the file name is too long",
    errno.EMFILE: "too many open files",
}


#: Terminal escape sequences and control characters, removed from every message
#: (a file name or tensor key must not be able to drive the terminal).
_CONTROL = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[@-_]|[\x00-\x08\x0b-\x1f\x7f]")


def _one_line(message: object) -> str:
    """``message`` as one line of plain text, without control characters."""
    return " ".join(_CONTROL.sub("", str(message)).split())


def fail(message: str, code: int = 1) -> NoReturn:
    """Print one error line to stderr as plain text (never markup) and exit with ``code``."""
    err_console.print(
        Text.assemble(("error:", "bold red"), " ", _one_line(message)), soft_wrap=True
    )
    sys.exit(code)


def note(message: str, style: str = "yellow") -> None:
    """Print one ``note:`` line to stderr as plain text (never markup, no control characters)."""
    err_console.print(Text.assemble(("note:", style), " ", _one_line(message)), soft_wrap=True)


def debug_enabled(ctx: click.Context | None = None) -> bool:
    """Whether tracebacks are wanted (``--debug`` or ``W2WKIT_DEBUG=1``)."""
    if os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no"):
        return True
    root = ctx.find_root() if ctx is not None else None
    return bool(root is not None and (root.obj or {}).get("debug"))


#: Library parameter -> the click parameter name that sets it, where they differ.
PARAM_NAMES = {
    "n_components": "components",
    "edits": "edit",
    "mask": "masks",
    "overwrite": "force",
    "verify": "no_verify",
    "edit_calibration_pool": "calibrate_on",
    "client": "cluster",
}

#: Library calls a message may point to (backticked, exactly as here) -> the command that
#: does the same from the command line.
API_COMMANDS = {
    "WeightSpace.fit()": "w2wkit fit",
    'WeightSpace(representation="factors").fit()': "w2wkit fit --representation factors",
    "fit_directions()": "w2wkit directions --labels FILE",
    "build_world(install=True)": "w2wkit world build --install",
    "build_world()": "w2wkit world build",
    "repair_world()": "w2wkit world verify --repair",
}

#: A reference to an API parameter inside a library message: `name` or `name=value`.
_API_REF = re.compile(r"`([A-Za-z_][A-Za-z0-9_]*)(?:=([^`]*))?`")

#: Backticked text inside a library message (a call of :data:`API_COMMANDS`, or not).
_BACKTICKED = re.compile(r"`([^`]+)`")


def _option_for(ctx: click.Context, param: str) -> click.Option | None:
    """The option of the invoked command that sets the library parameter ``param``."""
    names = {param, PARAM_NAMES.get(param, param)}
    group = ctx.command
    name = ctx.invoked_subcommand
    cmd = group.get_command(ctx, name) if isinstance(group, click.Group) and name else None
    commands = [cmd] if cmd is not None else []
    if isinstance(cmd, click.Group):
        commands += [cmd.get_command(ctx, n) for n in cmd.list_commands(ctx)]
    for c in commands:
        for p in getattr(c, "params", []):
            if p.name in names and isinstance(p, click.Option):
                return p
    return None


def _flag_for(ctx: click.Context, param: str) -> str | None:
    """The command-line spelling of ``param`` in the invoked command (None: it has no option)."""
    opt = _option_for(ctx, param)
    return "/".join(opt.opts) if opt is not None else None


def cli_wording(message: str, ctx: click.Context, param: str | None = None) -> str:
    """A library message in the invoked command's terms.

    "parameter NAME" (from ``W2WError(param=NAME)``) becomes "option FLAG", and
    every backticked reference to an API parameter, `` `name` `` or
    `` `name=value` ``, becomes the flag that sets it (``--force`` for
    `` `overwrite=True` ``, ``--representation delta`` for
    `` `representation="delta"` ``), and a library call of :data:`API_COMMANDS`
    (`` `repair_world()` ``) becomes its command (`` `w2wkit world verify --repair` ``).
    References the command has no option for are left as they are.
    """
    if param is not None and (spelling := _flag_for(ctx, param)) is not None:
        message = message.replace(f"parameter {param}", f"option {spelling}")
    message = _BACKTICKED.sub(
        lambda m: f"`{API_COMMANDS[m[1]]}`" if m[1] in API_COMMANDS else m[0], message
    )

    def flag(m: re.Match[str]) -> str:
        opt = _option_for(ctx, m[1])
        if opt is None:
            return m[0]
        long = max(opt.opts, key=len)
        if opt.is_flag or m[2] is None:
            return long
        return f"{long} {m[2].strip().strip(chr(34) + chr(39))}"

    return _API_REF.sub(flag, message)


def error_message(exc: BaseException) -> str | None:
    """The one line an expected failure prints, or None for an unexpected one.

    Expected: :class:`W2WError`, :class:`OSError` (disk full, read-only,
    exists, permission, missing), JSON errors, nesting too deep, numbers too
    large, and running out of memory.
    """
    if isinstance(exc, W2WError):
        return str(exc)
    if isinstance(exc, OSError):
        what = exc.strerror or str(exc) or type(exc).__name__
        hint = _OS_HINTS.get(exc.errno or -1)
        where = exc.filename
        if where is not None and exc.filename2 is not None:
            where = f"{where} -> {exc.filename2}"
        text = f"{where}: {what}" if where is not None else what
        return f"{text} ({hint})" if hint and hint != what.lower() else text
    if isinstance(exc, json.JSONDecodeError):
        return f"not valid JSON: {exc}"
    if isinstance(exc, RecursionError):
        return "the input is nested too deeply to read (a damaged or hostile JSON file?)"
    if isinstance(exc, OverflowError):
        return f"a number in the input is too large: {exc}"
    if isinstance(exc, MemoryError):
        detail = str(exc).strip()
        return (
            "out of memory"
            + (f" ({detail})" if detail else "")
            + "; free memory or give smaller inputs (for `w2wkit fit`, try --solver randomized)"
        )
    return None


def handle_exception(exc: BaseException, ctx: click.Context | None = None) -> NoReturn:
    """Turn ``exc`` into one line and exit 1 (130 for Ctrl-C); re-raise with ``--debug``.

    Click's own exceptions (usage errors, ``--help``, exits) pass through.
    """
    if isinstance(exc, click.exceptions.ClickException | click.exceptions.Exit | SystemExit):
        raise exc
    if isinstance(exc, click.exceptions.Abort | KeyboardInterrupt):
        fail("interrupted", code=130)
    debug = debug_enabled(ctx)
    message = error_message(exc)
    if isinstance(exc, W2WError) and message is not None and ctx is not None:
        message = cli_wording(message, ctx, exc.param)
    if debug:
        raise exc
    if message is None:
        text = " ".join(str(exc).split())[:300]
        message = f"internal error: {type(exc).__name__}" + (f": {text}" if text else "")
        message += " (re-run with --debug for the traceback, and please report it)"
    fail(message)


def verbosity() -> int:
    """-1 with ``-q``, 0 by default, 1+ with ``-v`` (``-vv``...), for the running command."""
    ctx = click.get_current_context(silent=True)
    root = ctx.find_root() if ctx is not None else None
    return int(((root.obj if root is not None else None) or {}).get("verbosity", 0))


def quiet_enabled() -> bool:
    """Whether ``-q/--quiet`` was given (no progress bars, no result lines on stdout)."""
    return verbosity() < 0


def _set_verbosity(ctx: click.Context, param: click.Parameter, value: Any) -> None:
    if not value:
        return
    root = ctx.find_root()
    obj = root.ensure_object(dict)
    level = -1 if param.name == "quiet" else int(value)
    obj["verbosity"] = level
    console.quiet = level < 0
    if level > 0:
        import logging

        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
        logging.getLogger("w2wkit").setLevel(logging.INFO if level == 1 else logging.DEBUG)


def verbosity_options() -> list[click.Option]:
    """``-q/--quiet`` and ``-v/--verbose``, as every command (and the group) takes them."""
    return [
        click.Option(
            ["-q", "--quiet"],
            is_flag=True,
            expose_value=False,
            is_eager=True,
            callback=_set_verbosity,
            help="Only errors and warnings: no progress bars or result lines.",
        ),
        click.Option(
            ["-v", "--verbose"],
            count=True,
            expose_value=False,
            is_eager=True,
            callback=_set_verbosity,
            help="More detail (w2wkit's log at INFO; -vv: DEBUG).",
        ),
    ]


class W2WGroup(click.Group):
    """A click group whose every failure is one plain-text line and exit 1.

    See :func:`handle_exception`; the group's ``--debug`` (or ``W2WKIT_DEBUG=1``)
    lets tracebacks through. Every command added gets ``-q/--quiet`` and
    ``-v/--verbose`` (:func:`verbosity_options`).
    """

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        have = {o for p in cmd.params for o in getattr(p, "opts", [])}
        if not have & {"-q", "--quiet", "-v", "--verbose"}:
            cmd.params.extend(verbosity_options())
        super().add_command(cmd, name)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BaseException as exc:  # the CLI's one error path
            handle_exception(exc, ctx)


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


def space_path_from(positional: Path | None, option: Path | None) -> Path | None:
    """The space of a command that also takes it as an argument (older spelling).

    ``--space`` is the one way every command names the space; ``info`` and
    ``directions`` still accept it as their argument. Both at once must agree.
    """
    if positional is not None and option is not None and Path(positional) != Path(option):
        raise click.UsageError(f"two spaces given: {positional} and --space {option}")
    return option if option is not None else positional


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
    type=click.Choice(writable_formats()),
    default=None,
    help="Output format [default: the one the --for loader reads completely, else kohya].",
)

#: ``--for`` loaders (see w2wkit.formats.targets.TARGETS).
TARGET_CHOICES = ("comfyui", "a1111", "kohya-scripts", "diffusers", "peft")

for_option = click.option(
    "--for",
    "target",
    type=click.Choice(TARGET_CHOICES),
    default=None,
    help="The program that will load the output: picks the format it reads completely "
    "(comfyui, a1111, kohya-scripts: kohya; diffusers; peft) and warns about anything "
    "it would drop.",
)
keep_alphas_option = click.option(
    "--keep-alphas",
    is_flag=True,
    help="kohya output: keep each module's own alpha (by default per-module alphas are "
    "folded into the factors, same deltas, so diffusers scales them right too).",
)


def output_format(fmt: str | None, target: str | None, default: str = "kohya") -> str:
    """The format to write: ``--format``, else the ``--for`` loader's, else ``default``."""
    if fmt is not None:
        return fmt
    if target is not None:
        from w2wkit.formats.targets import target_format

        return target_format(target)
    return default


def write_options(target: str | None, keep_alphas: bool) -> dict[str, Any]:
    """``write_adapter`` keywords of ``--for`` and ``--keep-alphas`` (notes go to stderr)."""

    def warn(message: str) -> None:
        note(message.replace("`keep_alphas=True`", "--keep-alphas"))

    return {"target": target, "keep_alphas": keep_alphas, "warn": warn}


cluster_option = click.option(
    "--cluster",
    default=None,
    metavar="SPEC",
    help="Run on a Dask cluster: local:N (N worker processes on 127.0.0.1), tcp://HOST:PORT "
    "or a scheduler file. Needs the cluster extra.",
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


class StrengthType(click.ParamType):
    """A calibrated edit strength, parsed once: finite, at most ``MAX_STRENGTH`` in size.

    A bad value is a :class:`~w2wkit.errors.DirectionError` (one line, exit 1).
    """

    name = "float"  # a number (shown as FLOAT in --help), checked finite and bounded

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        from w2wkit.edits import check_strength, parse_strength

        if isinstance(value, int | float) and not isinstance(value, bool):
            return check_strength(value)
        return parse_strength(value)


class EditType(click.ParamType):
    """``NAME=STRENGTH``, parsed once into ``(name, strength)``."""

    name = "NAME=STRENGTH"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> tuple[str, float]:
        from w2wkit.edits import parse_strength
        from w2wkit.errors import DirectionError

        if isinstance(value, tuple):
            return value
        name, sep, rest = str(value).partition("=")
        if not sep or not name.strip() or not rest.strip():
            raise DirectionError(f"--edit expects NAME=STRENGTH, got {value!r}")
        return name.strip(), parse_strength(rest, name.strip())


@contextlib.contextmanager
def byte_progress(description: str) -> Iterator[Callable[[int, int], None]]:
    """One transient bar (bytes, rate, ETA), shown from the first ``advance(done, total)``.

    Nothing is drawn when ``advance`` is never called, when stderr is not a
    terminal, or with ``-q``; the bar is removed when the block ends.
    """
    from w2wkit.progress import Tasks

    with Tasks(not quiet_enabled(), unit="B", terminal_only=True) as tasks:
        bar: list[Callable[[int, int], None]] = []

        def advance(done: int, total: int) -> None:
            if not bar:
                bar.append(tasks.task(description, total))
            bar[0](done, total)

        yield advance
