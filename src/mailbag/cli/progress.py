"""A one-line progress bar for long CLI jobs (``mailbag migrate``), stdlib only.

On a terminal the bar is redrawn in place (at most ten times a second, so a
fast copy is not slowed by printing); anywhere else (a log, a pipe, a test)
it prints a plain line every ``every`` items and none in between, so logs
stay readable.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

WIDTH = 30
REDRAW_EVERY = 0.1


class ProgressBar:
    """``label [#####.....] done/total`` for one job at a time."""

    def __init__(self, stream: TextIO | None = None, *, every: int = 5000,
                 tty: bool | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.every = every
        self.label = ""
        self.total = 0
        self.done = 0
        self._drawn = 0.0

    def start(self, label: str, total: int) -> None:
        """Begin a job of ``total`` items (0 when unknown)."""
        self.label, self.total, self.done, self._drawn = label, total, 0, 0.0
        if self.tty:
            self._draw()

    def advance(self, n: int = 1) -> None:
        """``n`` more items done."""
        self.done += n
        if self.tty:
            now = time.monotonic()
            if now - self._drawn >= REDRAW_EVERY or self.done == self.total:
                self._draw(now)
        elif self.done % self.every == 0:
            print(f"{self.label}: {self._count()}", file=self.stream, flush=True)

    def finish(self) -> None:
        """End the job; the terminal line is cleared for the caller's summary line."""
        if self.tty:
            self.stream.write("\r\x1b[K")
            self.stream.flush()

    def _count(self) -> str:
        return f"{self.done}/{self.total}" if self.total else str(self.done)

    def _draw(self, now: float | None = None) -> None:
        self._drawn = time.monotonic() if now is None else now
        filled = WIDTH * self.done // self.total if self.total else 0
        bar = "#" * filled + "." * (WIDTH - filled)
        self.stream.write(f"\r\x1b[K{self.label} [{bar}] {self._count()}")
        self.stream.flush()
