"""``w2wkit ui``: time from releasing a slider to the 4 new edited pictures shown in the page.

Serves the app over the shipped world (its calibrated identity space, built once
into the cache folder by ``w2wkit ui``, or ``--space``), opens it in headless
Debian chromium (Playwright), samples a model, then moves a direction's slider
``--repeat`` times to a new strength each time, timing each from the mouse
release until the page shows the new edited pictures. Anchor, in the same process
and interleaved with the moves (one after each): the renderer alone drawing the
same 4 pictures of an edited model (``Renderer.render``, what the page must do at
the least). Prints one JSON line: the page's median seconds, the anchor's, the
ratios.

    .venv/bin/python benchmarks/bench_ui.py --repeat 5 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--steps", type=int, default=20, help="sampler steps (the page's default)")
    ap.add_argument("--direction", default=None, help="default: the space's first")
    ap.add_argument("--screenshot", type=Path, help="save a PNG of the page after the last move")
    ap.add_argument(
        "--space",
        type=Path,
        help="saved space (default: the shipped world's, fitted and calibrated once into the "
        "cache folder as `w2wkit ui` does)",
    )
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from playwright.sync_api import sync_playwright

    from w2wkit.ui.app import serve
    from w2wkit.ui.backend import Session, View
    from w2wkit.ui.open import open_backend

    backend = open_backend(args.space, device="cpu", log=lambda m: print(m, file=sys.stderr))
    names = [n for n, _ in backend.directions()]
    name = args.direction or names[0]
    rng = dict(backend.directions())[name]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    # server side: time in the backend's edited pictures (what a move waits for; the rest is
    # Gradio + browser) and in the details that follow (probabilities, nearest models)
    server: list[float] = []
    details: list[float] = []
    for meth, into in (("edited_strip", server), ("probabilities", details), ("nearest", details)):
        fn = getattr(backend, meth)

        def timed(*a: object, _fn: object = fn, _into: list = into, **k: object) -> object:
            t = time.perf_counter()
            try:
                return _fn(*a, **k)  # type: ignore[operator]
            finally:
                _into.append(time.perf_counter() - t)

        setattr(backend, meth, timed)
    # anchor: the renderer alone, the same 4 pictures of an edited model, in a worker thread
    # as the page renders (on a loaded CPU the main thread's OpenMP pool measured 4-8x slower
    # than a worker thread's: 22-42 s vs 5.1-5.6 s)
    anchor_session = Session()
    backend.sample(anchor_session, 0, 1.0)
    view = View(prompt=backend.prompt, steps=args.steps)
    anchor_model = backend.edited(anchor_session, {name: rng["default"]})
    anchor: list[float] = []

    def anchor_once() -> None:
        def run() -> None:
            t0 = time.perf_counter()
            backend.renderer.render(
                [anchor_model],
                prompts=view.prompt,
                seeds=list(view.seeds),
                steps=view.steps,
                guidance=view.guidance,
            )
            anchor.append(time.perf_counter() - t0)

        worker = threading.Thread(target=run)
        worker.start()
        worker.join()

    app = serve(backend, port=port, block=False)
    page_times: list[float] = []
    server_times: list[float] = []
    detail_times: list[float] = []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=shutil.which("chromium"), headless=True, args=["--no-sandbox"]
            )
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.set_default_timeout(300_000)
            page.goto(f"http://127.0.0.1:{port}/")
            page.locator("#steps input").fill(str(args.steps))
            page.locator("#sample").click()
            page.wait_for_function(
                "() => document.querySelector('#status').innerText.includes('sampled')"
            )
            page.wait_for_selector("#edited img")
            box = page.locator(f"#dir-{name} input[type=range]").bounding_box()
            y = box["y"] + box["height"] / 2
            # timed in the page's own clock, from the mouse release to the new edited picture
            # loaded, by event listeners (no polling loop competing with the render for the CPU)
            page.evaluate(
                """() => {
                  window.__t0 = null; window.__t1 = null;
                  document.addEventListener('pointerup', () => {
                    window.__t0 = performance.now(); window.__t1 = null; }, true);
                  document.addEventListener('load', (e) => {
                    const img = document.querySelector('#edited img');
                    if (e.target === img && window.__t0 !== null && img.src !== window.__src)
                      window.__t1 = performance.now();
                  }, true);
                }"""
            )
            for i in range(args.repeat):
                page.evaluate(
                    "() => { window.__src = document.querySelector('#edited img').src;"
                    " window.__t0 = null; window.__t1 = null; }"
                )
                # a new strength each move (a value shown before comes from the session's cache)
                frac = 0.55 + 0.4 * i / max(1, args.repeat - 1)
                page.mouse.move(box["x"] + box["width"] / 2, y)
                page.mouse.down()
                page.mouse.move(box["x"] + box["width"] * frac, y, steps=3)
                server.clear()
                details.clear()
                page.mouse.up()
                page.wait_for_function("() => window.__t1 !== null", polling=200)
                page_times.append(page.evaluate("() => (window.__t1 - window.__t0) / 1000"))
                server_times.append(sum(server))
                # let the details event finish before the next move (as a person would)
                while len(details) < 2:
                    time.sleep(0.02)
                detail_times.append(sum(details))
                anchor_once()  # interleaved: the renderer alone, right after the page's move
            if args.screenshot:
                page.screenshot(path=str(args.screenshot), full_page=True)
            browser.close()
    finally:
        app.close()

    med, amed = statistics.median(page_times), statistics.median(anchor)
    print(
        json.dumps(
            {
                "bench": "ui_slider_to_pictures",
                "pictures": len(view.seeds),
                "steps": args.steps,
                "threads": args.threads,
                "direction": name,
                "page_seconds": page_times,
                "page_median_s": round(med, 3),
                "server_seconds": [round(x, 3) for x in server_times],
                "server_median_s": round(statistics.median(server_times), 3),
                "server": "Backend.edited_strip (edit + render + strip), what a move waits for",
                "details_seconds": [round(x, 3) for x in detail_times],
                "details": "probabilities + nearest, a second event after the pictures",
                "anchor": "Renderer.render of 4 edited pictures, same process, a worker thread, "
                "one after each move",
                "anchor_seconds": [round(x, 3) for x in anchor],
                "anchor_median_s": round(amed, 3),
                "ratio_page_over_anchor": round(med / amed, 3),
                "ratios_per_move": [
                    round(a / b, 3) for a, b in zip(page_times, anchor, strict=True)
                ],
                "target_s": 2.0,
                "channels_last": True,
                "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
                "machine": machine(),
            }
        )
    )


if __name__ == "__main__":
    main()
