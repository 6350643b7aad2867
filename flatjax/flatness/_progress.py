"""Periodic progress lines of the long-running flatness measures."""

from __future__ import annotations

import sys
import time
from typing import Any

# Seconds between two progress lines.
_PROGRESS_EVERY = 5.0


class _Progress:
    """Periodic one-line progress: ``progress=True`` prints to stderr, a callable gets the line.

    A line is emitted at most every ``_PROGRESS_EVERY`` seconds, and always for the last step.
    """

    def __init__(self, progress: Any, name: str, total: int, unit: str = ""):
        if progress is None or progress is False:
            self.emit = None
        elif progress is True:
            self.emit = lambda line: print(line, file=sys.stderr, flush=True)
        elif callable(progress):
            self.emit = progress
        else:
            raise TypeError(
                f"progress must be a bool or a callable taking one line (str), got {progress!r}."
            )
        self.name, self.total, self.unit, self.every = name, total, unit, _PROGRESS_EVERY
        self.seen = 0
        self.start = self.last = time.perf_counter()

    @property
    def on(self) -> bool:
        return self.emit is not None

    def __call__(self, done: int, detail: str = "") -> None:
        if self.emit is None:
            return
        now = time.perf_counter()
        if done < self.total and now - self.last < self.every:
            return
        self.last = now
        detail = f", {detail}" if detail else ""
        self.emit(f"{self.name}: {done}/{self.total}{self.unit}{detail} ({now - self.start:.1f} s)")
