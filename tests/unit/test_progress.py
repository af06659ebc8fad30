"""Progress of long steps: a bar on a terminal, periodic plain lines elsewhere, nothing when off."""

from __future__ import annotations

import io
import time

from raysearch.progress import Progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_without_a_terminal_a_line_is_written_every_period_and_at_the_end():
    out = io.StringIO()
    with Progress("embedding", 100, "images", stream=out, every=0.05) as p:
        p.update(10)
        assert out.getvalue() == ""            # nothing before the first period is over
        time.sleep(0.06)
        p.update(30)
        assert out.getvalue().startswith("embedding: 40/100 images")
        time.sleep(0.06)
        p.update(60)
    lines = out.getvalue().splitlines()
    assert lines[-1].startswith("embedding: 100/100 images, ") and "images/s" in lines[-1]


def test_a_short_step_writes_nothing_and_a_disabled_one_nothing_at_all():
    out = io.StringIO()
    with Progress("adding", 5, "vectors", stream=out, every=60) as p:
        p.update(5)
    with Progress("adding", 5, "vectors", stream=out, every=0.0, enabled=False) as p:
        p.update(5)
    assert out.getvalue() == ""


def test_on_a_terminal_it_draws_a_bar():
    out = _Terminal()
    with Progress("activating", 4, "images", stream=out) as p:
        p.update(4)
    assert "activating" in out.getvalue() and "4/4" in out.getvalue()


def test_a_blocking_step_keeps_reporting_while_it_runs():
    out = io.StringIO()
    with Progress("training the quantiser", 1000, "vectors", stream=out, every=0.05, blocking=True) as p:
        time.sleep(0.2)                        # one call that reports nothing until it ends
        assert out.getvalue().count("training the quantiser: 0/1000") >= 2
        p.update(1000)
    assert out.getvalue().splitlines()[-1].startswith("training the quantiser: 1000/1000")
