"""The ``w2wkit ui`` page (Gradio): sample, invert, load, edit with sliders, download.

:func:`build_app` lays the page out over a :class:`~w2wkit.ui.backend.Backend`;
:func:`serve` starts it (127.0.0.1 unless told otherwise). Every handler
answers bad input with one line in the page's status box (``#status``), never
a traceback; each browser session keeps its own model (``gr.State``).
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from w2wkit.errors import W2WError
from w2wkit.ui.backend import Backend, Session, View

__all__ = ["build_app", "parse_seeds", "serve"]

log = logging.getLogger("w2wkit.ui")

#: At most this many seeds on the page (each is a picture per model).
MAX_SEEDS = 8


def parse_seeds(text: str) -> tuple[int, ...]:
    """``"0,1,2,3"`` or ``"0-3"`` -> seeds (at most :data:`MAX_SEEDS`), one line otherwise."""
    out: list[int] = []
    for part in str(text).replace(" ", "").split(","):
        if not part:
            continue
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise W2WError(f"seeds {text!r}: write them as 0,1,2,3 or 0-3", param="seeds")
        a, b = int(m.group(1)), int(m.group(2) or m.group(1))
        out.extend(range(a, b + 1))
        if len(out) > MAX_SEEDS:
            break
    if not out or len(out) > MAX_SEEDS:
        raise W2WError(f"give 1 to {MAX_SEEDS} seeds, got {text!r}", param="seeds")
    return tuple(out)


def _message(exc: BaseException) -> str:
    if isinstance(exc, W2WError):
        return f"**Error:** {exc}"
    log.exception("unexpected error in the ui")  # the server's log keeps the traceback
    return f"**Error:** {type(exc).__name__}: {exc}"


def build_app(backend: Backend) -> Any:
    """The Gradio ``Blocks`` of the page for ``backend``."""
    import gradio as gr

    PROGRESS = gr.Progress()
    names = [n for n, _ in backend.directions()]
    ranges = dict(backend.directions())
    with gr.Blocks(title="w2wkit ui", analytics_enabled=False) as app:
        state = gr.State(Session())
        gr.Markdown(
            "## w2wkit: weights2weights\n"
            + (backend.description or "")
            + "\n\nSample a model, invert a picture or load a LoRA file; move the sliders to "
            "edit it; download the edited model."
        )
        status = gr.Markdown("No model yet.", elem_id="status")
        with gr.Row():
            with gr.Column(scale=1):
                with gr.Tab("Sample"):
                    seed = gr.Number(0, label="seed", precision=0, elem_id="sample-seed")
                    temperature = gr.Slider(0.0, 2.0, 1.0, step=0.05, label="temperature")
                    sample_btn = gr.Button("Sample a model", variant="primary", elem_id="sample")
                with gr.Tab("Invert a picture"):
                    picture = gr.File(label="picture (PNG, JPEG)", elem_id="picture")
                    with gr.Accordion("inversion settings", open=False):
                        inv_steps = gr.Number(
                            0, label="steps (0: the recipe's)", precision=0, elem_id="inv-steps"
                        )
                        inv_k = gr.Number(
                            0, label="components (0: the recipe's)", precision=0, elem_id="inv-k"
                        )
                        inv_mask = gr.Checkbox(True, label="fit only the concept's region (mask)")
                    with gr.Row():
                        invert_btn = gr.Button("Invert", variant="primary", elem_id="invert")
                        cancel_btn = gr.Button("Cancel", elem_id="cancel")
                with gr.Tab("Load a LoRA"):
                    lora = gr.File(label="LoRA file (.safetensors)", elem_id="lora")
                    lora_btn = gr.Button("Load and project", elem_id="load-lora")
                gr.Markdown("### Edit")
                sliders = []
                for n in names:
                    r = ranges[n]
                    sliders.append(
                        gr.Slider(
                            round(r["low"], 3),
                            round(r["high"], 3),
                            0.0,
                            step=round((r["high"] - r["low"]) / 60, 4),
                            label=f"{n} ({r['unit']})",
                            elem_id=f"dir-{n}",
                        )
                    )
                keep = gr.CheckboxGroup(
                    names, label="keep independent of (their scores do not move)", elem_id="keep"
                )
                inject = gr.Slider(
                    0,
                    1000,
                    1000,
                    step=10,
                    label="injection step: edited model for timesteps <= this (1000: all)",
                    elem_id="inject",
                )
            with gr.Column(scale=2):
                with gr.Row():
                    prompt = gr.Textbox(backend.prompt, label="prompt", elem_id="prompt")
                    seeds = gr.Textbox("0-3", label="seeds", elem_id="seeds")
                with gr.Row():
                    steps = gr.Number(20, label="steps", precision=0, elem_id="steps")
                    guidance = gr.Number(3.0, label="guidance", elem_id="guidance")
                    render_btn = gr.Button("Render", elem_id="render")
                with gr.Row():
                    # PNG: the page shows the renderer's pixels (Gradio's default, WebP, is
                    # lossy at quality 80)
                    original = gr.Image(
                        label="original",
                        type="numpy",
                        format="png",
                        interactive=False,
                        elem_id="original",
                    )
                    edited = gr.Image(
                        label="edited",
                        type="numpy",
                        format="png",
                        interactive=False,
                        elem_id="edited",
                    )
                probs = gr.Markdown("", elem_id="probs")
                nearest = gr.Markdown("", elem_id="nearest")
                with gr.Row():
                    from w2wkit.formats.registry import writable_formats

                    fmt = gr.Dropdown(
                        writable_formats(), value="diffusers", label="format", elem_id="format"
                    )
                    from w2wkit.formats.targets import TARGETS

                    loader = gr.Dropdown(
                        ["any (the format above)", *TARGETS],
                        value="any (the format above)",
                        label="for the loader",
                        elem_id="loader",
                    )
                    download_btn = gr.Button("Download the edited model", elem_id="download")
                files = gr.File(label="files", file_count="multiple", elem_id="files")

        view_inputs = [prompt, seeds, steps, guidance, keep, inject, *sliders]
        picture_outputs = [state, status, original, edited, probs, nearest]

        def unpack(values: tuple[Any, ...]) -> tuple[View, list[str], float | None, dict]:
            p, sd, st, g, kp, inj, *vals = values
            if int(st or 0) < 1 or int(st) > 200:
                raise W2WError(f"steps must be 1..200, got {st}", param="steps")
            view = View(prompt=str(p), seeds=parse_seeds(sd), steps=int(st), guidance=float(g))
            strengths = {n: float(v or 0.0) for n, v in zip(names, vals, strict=True)}
            return (
                view,
                list(kp or []),
                (None if inj is None or inj >= 1000 else float(inj)),
                strengths,
            )

        def show(session: Session, note: str, values: tuple[Any, ...]) -> dict:
            view, kp, inj, strengths = unpack(values)
            a, b, text = backend.pictures(session, strengths, kp, view=view, inject_t=inj)
            near = backend.nearest(session, strengths, kp)
            rows = "\n".join(f"| {n} | {s:.3f} |" for n, s in near)
            return {
                state: session,
                status: note,
                original: a,
                edited: b,
                probs: text,
                nearest: "**Nearest training models** (coefficient cosine)\n\n| model | cosine |"
                "\n|---|---|\n" + rows,
            }

        def on_move(session: Session, *values: Any) -> dict:
            # a slider moved: only the edited pictures (the original's are on the page)
            try:
                view, kp, inj, strengths = unpack(values)
                b = backend.edited_strip(session, strengths, kp, view=view, inject_t=inj)
                return {edited: b, status: session.source}
            except Exception as exc:
                return {status: _message(exc)}

        def on_details(session: Session, *values: Any) -> dict:
            # after the pictures: the classifier's probabilities and the nearest models
            try:
                view, kp, inj, strengths = unpack(values)
                text = backend.probabilities(session, strengths, kp, view=view, inject_t=inj)
                near = backend.nearest(session, strengths, kp)
                rows = "\n".join(f"| {n} | {s:.3f} |" for n, s in near)
                return {
                    probs: text,
                    nearest: "**Nearest training models** (coefficient cosine)\n\n"
                    "| model | cosine |\n|---|---|\n" + rows,
                }
            except Exception as exc:
                return {status: _message(exc)}

        def guarded(fn: Callable[..., dict]) -> Callable[..., dict]:
            def run(session: Session, *args: Any) -> dict:
                try:
                    return fn(session, *args)
                except Exception as exc:  # every failure is one line in the page
                    return {status: _message(exc)}

            return run

        @guarded
        def on_sample(session: Session, sd: Any, temp: Any, *values: Any) -> dict:
            note = backend.sample(session, int(sd or 0), float(temp))
            return show(session, note, values)

        @guarded
        def on_render(session: Session, *values: Any) -> dict:
            return show(session, session.source, values)

        @guarded
        def on_lora(session: Session, path: Any, *values: Any) -> dict:
            note = backend.load_lora(session, path)
            return show(session, note, values)

        def on_invert(
            session: Session,
            path: Any,
            n_steps: Any,
            k: Any,
            use_mask: bool,
            *values: Any,
            progress: Any = PROGRESS,
        ) -> dict:
            try:
                unpack(values)  # bad view settings are refused before a long job

                def cb(step: int, total: int, loss: float) -> None:
                    progress((step, total), desc=f"inverting: loss {loss:.4f}")

                note = backend.invert(
                    session,
                    path,
                    steps=int(n_steps or 0) or None,
                    n_components=int(k or 0) or None,
                    use_mask=bool(use_mask),
                    progress=cb,
                )
                return show(session, note, values)
            except Exception as exc:
                return {status: _message(exc)}

        @guarded
        def on_download(session: Session, f: str, target: str, *values: Any) -> dict:
            _, kp, _, strengths = unpack(values)
            target = target if target in TARGETS else None
            paths = backend.export(session, strengths, kp, format=str(f), target=target)
            said = f"for {target}" if target else str(f)
            notes = json.loads(Path(paths[-1]).read_text()).get("notes") or []
            text = f"wrote {len(paths)} files ({said})" + "".join(f"; {n}" for n in notes)
            return {files: paths, status: text}

        sample_btn.click(on_sample, [state, seed, temperature, *view_inputs], picture_outputs)
        render_btn.click(on_render, [state, *view_inputs], picture_outputs)
        move_outputs = [edited, status]
        detail_outputs = [probs, nearest, status]
        for s in [*sliders, inject]:
            # show_progress="minimal": no animated overlay timer repainting the page while the
            # render shares the CPU; the move waits only for the edited pictures, the
            # probabilities and nearest models follow (benchmarks/bench_ui.py)
            s.release(
                on_move,
                [state, *view_inputs],
                move_outputs,
                trigger_mode="always_last",
                show_progress="minimal",
            ).then(on_details, [state, *view_inputs], detail_outputs, show_progress="hidden")
        keep.change(
            on_move,
            [state, *view_inputs],
            move_outputs,
            trigger_mode="always_last",
            show_progress="minimal",
        ).then(on_details, [state, *view_inputs], detail_outputs, show_progress="hidden")
        lora_btn.click(on_lora, [state, lora, *view_inputs], picture_outputs)
        inv = invert_btn.click(
            on_invert, [state, picture, inv_steps, inv_k, inv_mask, *view_inputs], picture_outputs
        )
        cancel_btn.click(None, None, None, cancels=[inv])
        download_btn.click(on_download, [state, fmt, loader, *view_inputs], [state, files, status])
    return app


def serve(
    backend: Backend,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    block: bool = True,
    warn: Callable[[str], None] | None = None,
) -> Any:
    """Start the page; returns the Gradio app (``block=False``: serving in a thread).

    A host other than a loopback address serves everyone who can reach the
    machine (there is no login): it is allowed when asked, with a warning.
    """
    if host not in ("127.0.0.1", "localhost", "::1"):
        (warn or (lambda m: print(m, file=sys.stderr)))(
            f"warning: serving on {host}: anyone who can reach this machine can use the "
            "app (no login). Use --host 127.0.0.1 to keep it local."
        )
    app = build_app(backend)
    app.queue(default_concurrency_limit=1)
    app.launch(
        server_name=host,
        server_port=port,
        prevent_thread_lock=not block,
        show_error=False,
        quiet=True,
        ssr_mode=False,
        max_file_size=backend.max_upload_bytes * 2,
        footer_links=[],
    )
    return app
