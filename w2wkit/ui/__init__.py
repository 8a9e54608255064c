"""``w2wkit ui``: a web app to sample, invert, edit and download models (Gradio).

:mod:`w2wkit.ui.backend` holds everything the page does, without Gradio (a
session object per browser session); :mod:`w2wkit.ui.app` builds the page
(imports Gradio, from the ``ui`` extra) and serves it.
"""

from __future__ import annotations

__all__: list[str] = []
