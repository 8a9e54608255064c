"""The one progress bar: plain lines with rate and ETA when the console is not a terminal."""

from __future__ import annotations

import pytest

from w2wkit.progress import Bar, rate_text


def test_progress_prints_lines_when_not_a_terminal(capsys: pytest.CaptureFixture) -> None:
    with Bar(4, "zoo (cpu)", every_s=0.0, unit="models") as bar:
        bar.advance(1)
        bar.partial(1.5)  # a running chunk is 1.5 models' worth of steps in
        bar.partial(0.0)
        bar.set(3)
        bar.set(3, 2.0)  # more than is left: counted up to the total
        bar.advance(1)
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("zoo (cpu): 0/4 models (0%)") and err[0].endswith("ETA ?")
    assert "? models/s" in err[0]
    assert err[1].startswith("zoo (cpu): 1/4 models (25%)") and "ETA" in err[1]
    assert err[2].startswith("zoo (cpu): 1/4 models (62%)")  # the models done stay 1
    assert err[3].startswith("zoo (cpu): 1/4 models (25%)")
    assert err[4].startswith("zoo (cpu): 3/4 models (75%)")
    assert err[5].startswith("zoo (cpu): 3/4 models (100%)")
    assert err[-1].startswith("zoo (cpu): 4/4 models (100%)") and "ETA 0 s" in err[-1]
    with Bar(4, "quiet", every_s=3600.0) as bar:  # throttled: the start and the end
        for _ in range(4):
            bar.advance(1)
    assert capsys.readouterr().err.count("quiet:") == 2
    with Bar(4, "off", enabled=False) as bar:
        bar.advance(4)
    assert capsys.readouterr().err == ""


def test_fields_are_shown_and_updated(capsys: pytest.CaptureFixture) -> None:
    with Bar(10, "inverting", every_s=0.0, unit="steps", fields={"loss": "-"}) as bar:
        bar.update(5, loss="0.1234")
    err = capsys.readouterr().err.splitlines()
    assert "loss -" in err[0]
    assert err[1].startswith("inverting: 5/10 steps (50%), loss 0.1234")


def test_rate_text_switches_to_per_hour_below_one_per_second() -> None:
    assert rate_text(30, 10, "models") == "3.0 models/s"
    assert rate_text(1, 10, "models") == "360 models/h"
    assert rate_text(0, 10) == "? it/s"


def test_tasks_print_start_and_end_lines_off_a_terminal(capsys: pytest.CaptureFixture) -> None:
    from w2wkit.progress import Tasks

    with Tasks(every_s=3600.0, unit="models") as tasks:
        a = tasks.task("fit", 4)
        b = tasks.task("read", 2)
        for i in range(1, 5):
            a(i, 4)
        b(2, 2)
        b(2, 2)  # a finished task says so once
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("fit: 0/4 models (0%)") and err[0].endswith("ETA ?")
    assert err[1].startswith("read: 0/2 models (0%)")
    assert err[2].startswith("fit: 4/4 models (100%)") and "ETA 0 s" in err[2]
    assert err[3].startswith("read: 2/2 models (100%)")
    assert len(err) == 4
    # terminal-only bars and disabled ones print nothing off a terminal
    for kwargs in ({"terminal_only": True}, {"enabled": False}):
        with Tasks(**kwargs) as tasks:
            step = tasks.task("quiet", 3)
            step(3, 3)
        assert capsys.readouterr().err == ""
