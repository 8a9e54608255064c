"""``w2wkit ui``: time from releasing a slider to the 4 new edited pictures shown in the page.

Serves the app over the shipped world (its calibrated identity space, built once
into the cache folder by ``w2wkit ui``), opens it in headless Debian chromium
(Playwright), samples a model, then moves a direction's slider ``--repeat``
times, timing each from the mouse release until the page shows the new edited
pictures. Anchor, in the same process: the renderer alone drawing the same 4
pictures of the edited model (``Renderer.render``, what the page must do at the
least). Prints one JSON line: the page's median seconds, the anchor's, the ratio.

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
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from playwright.sync_api import sync_playwright

    from w2wkit.ui.app import serve
    from w2wkit.ui.backend import Session, View
    from w2wkit.ui.open import open_backend

    backend = open_backend(device="cpu", log=lambda m: print(m, file=sys.stderr))
    names = [n for n, _ in backend.directions()]
    name = args.direction or names[0]
    rng = dict(backend.directions())[name]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    # server side: time in the backend's pictures + nearest per event (the rest is Gradio + browser)
    server: list[float] = []
    for meth in ("pictures", "nearest"):
        fn = getattr(backend, meth)

        def timed(*a: object, _fn: object = fn, **k: object) -> object:
            t = time.perf_counter()
            try:
                return _fn(*a, **k)  # type: ignore[operator]
            finally:
                server.append(time.perf_counter() - t)

        setattr(backend, meth, timed)
    app = serve(backend, port=port, block=False)
    page_times: list[float] = []
    server_times: list[float] = []
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
                frac = 0.6 + 0.35 * (i % 2)  # alternate two strengths: each move is new
                page.mouse.move(box["x"] + box["width"] / 2, y)
                page.mouse.down()
                page.mouse.move(box["x"] + box["width"] * frac, y, steps=3)
                server.clear()
                page.mouse.up()
                page.wait_for_function("() => window.__t1 !== null", polling=200)
                page_times.append(page.evaluate("() => (window.__t1 - window.__t0) / 1000"))
                server_times.append(sum(server))
            if args.screenshot:
                page.screenshot(path=str(args.screenshot), full_page=True)
            browser.close()
    finally:
        app.close()

    # anchor: the renderer alone, the same 4 pictures of an edited model
    session = Session()
    backend.sample(session, 0, 1.0)
    view = View(prompt=backend.prompt, steps=args.steps)
    edited = backend.edited(session, {name: rng["default"]})
    backend.renderer.render([edited], prompts=view.prompt, seeds=list(view.seeds), steps=1)
    anchor: list[float] = []

    def renders() -> None:
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            backend.renderer.render(
                [edited],
                prompts=view.prompt,
                seeds=list(view.seeds),
                steps=view.steps,
                guidance=view.guidance,
            )
            anchor.append(time.perf_counter() - t0)

    # in a worker thread, as the page renders (on a loaded CPU the main thread's OpenMP
    # pool measured 4-8x slower than a worker thread's: 22-42 s vs 5.1-5.6 s)
    worker = threading.Thread(target=renders)
    worker.start()
    worker.join()
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
                "anchor": "Renderer.render of the 4 edited pictures, same process, a worker thread",
                "anchor_median_s": round(amed, 3),
                "ratio_page_over_anchor": round(med / amed, 3),
                "target_s": 2.0,
                "channels_last": True,
                "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
                "machine": machine(),
            }
        )
    )


if __name__ == "__main__":
    main()
