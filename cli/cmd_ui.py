"""``w2wkit ui``: the web app (Gradio, from the ``ui`` extra)."""

from __future__ import annotations

from pathlib import Path

import click

from w2wkit.cli.common import console, err_console
from w2wkit.errors import W2WError


@click.command("ui")
@click.option(
    "--space",
    "space_path",
    type=click.Path(path_type=Path),
    help="A space folder (default: the shipped world's identity space, fitted and "
    "calibrated once into the cache folder).",
)
@click.option(
    "--base",
    type=click.Path(path_type=Path),
    help="Pipeline folder to render with (default: the shipped world's).",
)
@click.option("--prompt", help="Default prompt (default: the one the space's models name).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to serve on.")
@click.option("--port", type=int, default=7860, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda...")
@click.option("--max-upload-mb", default=32.0, show_default=True, help="Largest accepted upload.")
@click.option(
    "--no-calibrate",
    is_flag=True,
    help="Do not calibrate the shipped world's directions at the first start "
    "(sliders then move in uncalibrated 1-sd units).",
)
def ui_cmd(
    space_path: Path | None,
    base: Path | None,
    prompt: str | None,
    host: str,
    port: int,
    device: str,
    max_upload_mb: float,
    no_calibrate: bool,
) -> None:
    """Serve a web page: sample, invert, edit with sliders, download.

    \b
    Examples:
      w2wkit ui                                   # the shipped world, http://127.0.0.1:7860
      w2wkit ui --space w2w-space --base ./pipeline
      w2wkit ui --host 0.0.0.0                    # reachable by others (no login!)
    """
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise W2WError(
            "the web app needs Gradio", hint='install the extra: pip install "w2wkit[ui]"'
        ) from None
    from w2wkit.ui.app import serve
    from w2wkit.ui.open import open_backend

    if max_upload_mb <= 0:
        raise W2WError(f"must be > 0, got {max_upload_mb}", param="max_upload_mb")
    backend = open_backend(
        space_path,
        base,
        prompt=prompt,
        device=device,
        calibrate=not no_calibrate,
        max_upload_bytes=int(max_upload_mb * 2**20),
        log=lambda m: console.print(m, highlight=False),
    )
    console.print(f"w2wkit ui: http://{host}:{port}  (Ctrl-C stops it)", highlight=False)
    serve(backend, host=host, port=port, warn=lambda m: err_console.print(m, highlight=False))


def register(cli: click.Group) -> None:
    """Add ``ui`` to ``cli``."""
    cli.add_command(ui_cmd)
