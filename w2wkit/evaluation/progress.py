"""The evaluation's progress display (one rich ``Progress`` per run).

Kept minimal on purpose: one progress helper for the whole toolkit is due, and
this one is meant to be swapped for it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["progress_bar"]


@contextmanager
def progress_bar(enabled: bool) -> Iterator[Any]:
    """A transient rich progress display for the tasks of one run (rate shown as done/total, ETA).

    Parameters
    ----------
    enabled : bool
        False: yields ``None`` (callers skip their progress updates).

    Yields
    ------
    rich.progress.Progress or None
        Add tasks with ``add_task(description, total=n)``; they show the
        description, a bar, ``done/total``, elapsed time and time remaining.
    """
    if not enabled:
        yield None
        return
    from rich.progress import (
        BarColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        transient=True,
    ) as p:
        yield p
