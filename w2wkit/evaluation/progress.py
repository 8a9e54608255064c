"""The evaluation's progress display: the toolkit's one multi-task bar, per run."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["progress_bar"]


@contextmanager
def progress_bar(enabled: bool) -> Iterator[Any]:
    """The run's progress display: a :class:`w2wkit.progress.Tasks` (rate and ETA per task).

    Parameters
    ----------
    enabled : bool
        False: yields ``None`` (callers skip their progress updates).

    Yields
    ------
    w2wkit.progress.Tasks or None
        ``task(description, total)`` returns ``callback(done, total)``; its
        ``console`` prints notes. Bars show on a terminal only.
    """
    if not enabled:
        yield None
        return
    from w2wkit.progress import Tasks

    with Tasks(True, transient=True, terminal_only=True) as tasks:
        yield tasks
