"""Screenshot the first screen of a ``w2wkit demo`` report (headless Debian chromium).

    .venv/bin/w2wkit demo -o w2w-demo
    .venv/bin/python scripts/demo_screenshot.py w2w-demo docs/demo.png

Takes what a person sees on opening ``report.html`` in a 1280x900 window and
writes it as a small palette PNG (the README shows ``docs/demo.png``).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from pathlib import Path


def screenshot(report_dir: Path, out: Path, size: tuple[int, int] = (1280, 900)) -> Path:
    """Write the first screen of ``report_dir/report.html`` to ``out`` (PNG, 128 colours)."""
    from PIL import Image

    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        raise SystemExit("no chromium executable (Debian: apt-get install -y chromium)")
    page = (report_dir / "report.html").resolve()
    if not page.is_file():
        raise SystemExit(f"{page}: no report here (run `w2wkit demo -o {report_dir}` first)")
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.png"
        subprocess.run(
            [
                exe,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                f"--user-data-dir={tmp}/profile",
                f"--window-size={size[0]},{size[1]}",
                f"--screenshot={raw}",
                page.as_uri(),
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(raw) as im:
            im.convert("RGB").quantize(colors=128).save(out, optimize=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("report_dir", type=Path)
    ap.add_argument("out", type=Path, nargs="?", default=Path("docs/demo.png"))
    args = ap.parse_args()
    out = screenshot(args.report_dir, args.out)
    print(f"{out} ({out.stat().st_size / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
