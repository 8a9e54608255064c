"""The one quiet context: diffusers/transformers progress bars, info lines and warnings off.

:func:`quiet` restores every setting it changed when it exits, so it never
leaks into the caller's process. It is a context manager and, like every
:func:`contextlib.contextmanager`, also a decorator (``@quiet()``) for a
function that should run quietly as a whole (a worker process, a build).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

__all__ = ["quiet"]


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence diffusers/transformers progress bars, info lines and Future/Deprecation warnings.

    The progress-bar switches and verbosity levels in force before are restored
    on exit (and the warning filters, through :func:`warnings.catch_warnings`).
    """
    import warnings

    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    d_bar, t_bar = dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled()
    d_level, t_level = dlog.get_verbosity(), tlog.get_verbosity()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        dlog.set_verbosity(d_level)
        tlog.set_verbosity(t_level)
        if d_bar:
            dlog.enable_progress_bar()
        if t_bar:
            tlog.enable_progress_bar()
