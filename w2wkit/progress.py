"""The one progress bar of w2wkit: rich, with rate and ETA, and plain lines in a log.

:class:`Bar` is what every long job shows (zoo training, embedder training,
inversion). On a terminal it is a rich live bar (description, bar, done/total,
rate, elapsed, ETA, optional fields such as the loss). When the console is not
a terminal (a log file, CI) a live bar would show nothing until the end; the
bar then prints a plain line at most every ``every_s`` seconds instead (done /
total, percent, elapsed, rate, ETA).

Besides whole units done, the bar counts a fraction in progress
(:meth:`Bar.partial`, e.g. the models' worth of steps a running chunk has
done), so a long unit moves the percentage and the ETA before it finishes.

rich is imported when a bar is entered; importing this module is cheap.
"""

from __future__ import annotations

import time
from typing import Any

__all__ = ["Bar", "Tasks", "rate_text"]


def rate_text(done: float, seconds: float, unit: str = "") -> str:
    """``"12.5 models/s"`` or ``"380 models/h"`` (per hour below one per second); ``"?"``.

    Parameters
    ----------
    done : float
        Units done in ``seconds``.
    seconds : float
    unit : str
        Unit name, e.g. ``"models"`` (default: ``"it"``).
    """
    unit = unit or "it"
    if done <= 0 or seconds <= 0:
        return f"? {unit}/s"
    per_s = done / seconds
    if per_s >= 1.0:
        return f"{per_s:.1f} {unit}/s"
    return f"{per_s * 3600:.0f} {unit}/h"


def _live(console: Any, unit: str, transient: bool, fields: dict[str, Any] | None = None) -> Any:
    """A rich ``Progress``: description, bar, counts, fields, rate, elapsed, ETA.

    ``unit="B"`` shows the counts as bytes and the rate as a transfer speed.
    """
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )
    from rich.text import Text

    class _Rate(ProgressColumn):
        def render(self, task: Any) -> Text:
            spent = task.elapsed or 0.0
            return Text(rate_text(task.completed, spent, unit), style="progress.data.speed")

    counts = [DownloadColumn()] if unit == "B" else [MofNCompleteColumn()]
    extra = [TextColumn(f"{k} {{task.fields[{k}]}}") for k in fields or {}]
    rate = TransferSpeedColumn() if unit == "B" else _Rate()
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        *counts,
        *extra,
        rate,
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=transient,
    )


def _plain(
    console: Any,
    label: str,
    done: float,
    total: float,
    unit: str,
    spent: float,
    extra: str = "",
    count: float | None = None,
) -> None:
    """One plain progress line (a log): done/total, percent, elapsed, rate, ETA.

    ``count`` is the number of whole units shown (default ``done``; a bar that
    counts work in progress shows fewer finished units than its percentage).
    """
    eta = f"{spent / done * (total - done):.0f} s" if done > 0 else "?"
    pct = f" ({100 * done / total:.0f}%)" if total else ""
    shown = done if count is None else count
    console.print(
        f"{label}: {int(shown)}/{total:.0f}{' ' + unit if unit else ''}{pct}{extra}, "
        f"{spent:.0f} s elapsed, {rate_text(done, spent, unit)}, ETA {eta}",
        highlight=False,
        markup=False,
        soft_wrap=True,
    )


class Bar:
    """A progress bar with rate and ETA (a no-op when disabled).

    Parameters
    ----------
    total : int
        Units of the whole job.
    label : str
        Description shown before the bar.
    enabled : bool
        ``False`` (or ``total <= 0``) shows nothing.
    every_s : float
        Seconds between plain lines when the console is not a terminal.
    unit : str
        Unit name shown with the counts and the rate (``"models"``).
    transient : bool
        Remove the live bar when done (a terminal only).
    fields : dict, optional
        Extra values shown after the counts (``{"loss": "-"}``), updated by
        :meth:`update`.

    Examples
    --------
    >>> with Bar(10, "work", enabled=False) as bar:
    ...     bar.advance(10)
    """

    def __init__(
        self,
        total: int,
        label: str,
        enabled: bool = True,
        every_s: float = 30.0,
        unit: str = "",
        transient: bool = False,
        fields: dict[str, Any] | None = None,
    ) -> None:
        self.total, self.label, self.enabled = total, label, enabled and total > 0
        self.unit = f" {unit}" if unit else ""
        self._unit_name = unit
        self.every_s = float(every_s)
        self.transient = transient
        self.fields = dict(fields or {})
        self._p: Any = None
        self._lines: Any = None
        self._task: Any = None
        self._done = 0.0
        self._part = 0.0
        self._t0 = self._last = 0.0

    def __enter__(self) -> Bar:
        if not self.enabled:
            return self
        from rich.console import Console

        console = Console(stderr=True)
        self._t0 = time.time()
        if not console.is_terminal:
            self._lines = console
            self._line(force=True)  # a log shows that the work started, and its size
            return self
        self._p = _live(console, self._unit_name, self.transient, self.fields)
        self._p.__enter__()
        self._task = self._p.add_task(self.label, total=self.total, **self.fields)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._p is not None:
            self._p.__exit__(*exc)
        elif self._lines is not None and exc[0] is None:
            self._line(force=True)

    def _line(self, force: bool = False) -> None:
        now = time.time()
        if not force and now - self._last < self.every_s:
            return
        self._last = now
        extra = "".join(f", {k} {v}" for k, v in self.fields.items())
        done = self._progress()
        spent = now - self._t0
        _plain(self._lines, self.label, done, self.total, self._unit_name, spent, extra, self._done)

    def advance(self, n: float = 1) -> None:
        """``n`` more units finished."""
        self._done += n
        self._show()

    def update(self, advance: float = 0, **fields: Any) -> None:
        """Advance by ``advance`` units and set shown ``fields`` (``loss="0.1234"``)."""
        self.fields.update(fields)
        self._done += advance
        self._show()

    def partial(self, units: float) -> None:
        """The running unit(s) have done ``units`` units' worth of their work."""
        self._part = float(units)
        self._show()

    def set(self, done: float, part: float = 0.0) -> None:
        """``done`` units finished, ``part`` units' worth of work in running ones."""
        self._done, self._part = float(done), float(part)
        self._show()

    def _progress(self) -> float:
        return max(0.0, min(float(self.total), self._done + self._part))

    def _show(self) -> None:
        if self._p is not None:
            self._p.update(self._task, completed=self._progress(), **self.fields)
        elif self._lines is not None:
            self._line()


class Tasks:
    """Several bars at once (or one per phase), each with rate and ETA; a no-op when disabled.

    The multi-task form of :class:`Bar`, for jobs made of parts: the fit's
    phases, the evaluation's sections, a byte count. On a terminal it is one
    rich live display on stderr; elsewhere (a log file, CI) it prints a plain
    line per task when it starts and when it ends, and at most every
    ``every_s`` seconds in between.

    Parameters
    ----------
    enabled : bool
        ``False`` shows nothing; :meth:`task` then returns a callback that does nothing.
    transient : bool
        Remove each bar when its task is done, and the display when the block ends.
    one_at_a_time : bool
        A new task hides the bars of the earlier ones (one bar for the phase under way).
    unit : str
        Unit of the counts and the rate (``"B"`` shows bytes).
    terminal_only : bool
        Show nothing (not even plain lines) when stderr is not a terminal.
    every_s : float
        Seconds between plain lines of one task.

    Examples
    --------
    >>> with Tasks(enabled=False) as tasks:
    ...     step = tasks.task("reading", 10)
    ...     step(10, 10)
    """

    def __init__(
        self,
        enabled: bool = True,
        transient: bool = True,
        one_at_a_time: bool = False,
        unit: str = "",
        terminal_only: bool = False,
        every_s: float = 30.0,
    ) -> None:
        self.enabled, self.transient, self.one_at_a_time = enabled, transient, one_at_a_time
        self.unit, self.terminal_only, self.every_s = unit, terminal_only, float(every_s)
        self.console: Any = None
        self._p: Any = None
        self._ids: list[Any] = []

    def __enter__(self) -> Tasks:
        if not self.enabled:
            return self
        from rich.console import Console

        self.console = Console(stderr=True)
        if not self.console.is_terminal:
            if self.terminal_only:
                self.enabled = False
            return self
        self._p = _live(self.console, self.unit, self.transient)
        self._p.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._p is not None:
            self._p.__exit__(*exc)

    def task(self, description: str, total: int) -> Any:
        """Start a task of ``total`` units; returns ``callback(done, total)``.

        The callback sets the units done (and the total, which may change). A
        task whose ``done`` reaches ``total`` is finished: with ``transient`` its
        bar disappears.
        """
        if not self.enabled:
            return lambda done, tot: None
        if self._p is None:  # plain lines
            return self._line_task(description, total)
        p = self._p
        if self.one_at_a_time:
            for old in self._ids:
                p.update(old, visible=False)
        tid = p.add_task(description, total=total)
        self._ids.append(tid)

        def update(done: int, tot: int) -> None:
            p.update(tid, completed=done, total=tot, visible=True)
            if self.transient and tot and done >= tot and tid in p.task_ids:
                p.remove_task(tid)
                self._ids.remove(tid)

        return update

    def _line_task(self, description: str, total: int) -> Any:
        t0 = time.time()
        last = [t0]
        state = {"ended": False}
        unit = self.unit

        def say(done: float, tot: float) -> None:
            _plain(self.console, description, done, tot, unit, time.time() - t0)

        say(0, total)

        def update(done: int, tot: int) -> None:
            now = time.time()
            end = bool(tot) and done >= tot
            if end and not state["ended"]:
                state["ended"] = True
                say(done, tot)
            elif not end and now - last[0] >= self.every_s:
                last[0] = now
                say(done, tot)

        return update
