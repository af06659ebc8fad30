"""Progress of long steps (listing, embedding, training the quantiser, adding, activating), shown on
stderr: a tqdm bar on a terminal, a plain line every `every` seconds (and one at the end) when
stderr is a file or a pipe, so that logs of cluster jobs stay readable.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import IO, Any


class Progress:
    """One step's progress: `update(n)` as work completes, `close()` (or leave the `with` block)
    at the end. Disabled, it does nothing at all.

    what: the step's name ("embedding"); total: the amount expected (None: unknown); unit: what
    is counted ("images"); blocking: the work happens in one call that reports nothing until it
    ends (training the quantiser): the display is refreshed from a thread meanwhile, so the elapsed
    time keeps moving.
    """

    def __init__(self, what: str, total: int | None = None, unit: str = "images", enabled: bool = True,
                 stream: IO[str] | None = None, every: float = 10.0, blocking: bool = False):
        self.what, self.total, self.unit, self.enabled = what, total, unit, enabled
        self.stream = stream if stream is not None else sys.stderr
        self.every = every
        self.done = 0
        self.start = time.perf_counter()
        self._last_line = self.start
        self._written = -1
        self._bar: Any = None
        if enabled and _is_terminal(self.stream):
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=what, unit=f" {unit}", file=self.stream, dynamic_ncols=True, leave=True)
        self._stop = threading.Event()
        self._thread = None
        if enabled and blocking:
            self._thread = threading.Thread(target=self._heartbeat, daemon=True)
            self._thread.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(1.0 if self._bar is not None else self.every):
            if self._bar is not None:
                self._bar.refresh()
            else:
                self._write_line()

    def update(self, n: int = 1) -> None:
        """Count `n` more units as done."""
        self.done += n
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.perf_counter()
        if now - self._last_line >= self.every:
            self._last_line = now
            self._write_line()

    def close(self) -> None:
        """End the step: close the bar, or write the last line (only if the step took a while)."""
        if not self.enabled:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif time.perf_counter() - self.start >= self.every and self._written != self.done:
            self._write_line()

    def _write_line(self) -> None:
        self._written = self.done
        elapsed = time.perf_counter() - self.start
        of = f"/{self.total}" if self.total is not None else ""
        rate = f", {self.done / elapsed:.1f} {self.unit}/s" if elapsed > 0 and self.done else ""
        self.stream.write(f"{self.what}: {self.done}{of} {self.unit}{rate}, {elapsed:.0f} s\n")
        self.stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
