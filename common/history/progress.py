"""The progress line of `mdp backfill` / `mdp import`: candles, rate, ETA, rewritten in place on a terminal.

On a terminal the line is redrawn at most every `interval_s`; elsewhere (a log file, a pipe, CI) nothing is
printed while running, only the final summary, so logs are not flooded with carriage returns.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds + 0.5))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}"


class Progress:
    def __init__(self, total: int, label: str = "", stream: TextIO | None = None, enabled: bool | None = None,
                 interval_s: float = 0.2, unit: str = "candles", requests: Callable[[], int] | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.total = total
        self.label = label
        self.unit = unit
        self.interval_s = interval_s
        self.done = 0
        self.requests = requests or (lambda: 0)
        self.started = time.monotonic()
        self._drawn = 0.0
        self._width = 0

    def update(self, done: int = 0, force: bool = False) -> None:
        self.done += done
        now = time.monotonic()
        if not self.enabled or (not force and now - self._drawn < self.interval_s):
            return
        self._drawn = now
        line = self.line(now)
        pad = max(0, self._width - len(line))
        self._width = len(line)
        self.stream.write("\r" + line + " " * pad)
        self.stream.flush()

    def line(self, now: float | None = None) -> str:
        elapsed = max(1e-9, (now or time.monotonic()) - self.started)
        rate = self.done / elapsed
        left = max(0, self.total - self.done)
        eta = _duration(left / rate) if rate > 0 else "?"
        pct = 100.0 * self.done / self.total if self.total else 100.0
        return (f"{self.label} {self.done:,}/{self.total:,} {self.unit} {pct:5.1f}%  {rate:,.0f} {self.unit}/s  "
                f"{self.requests() / elapsed:.1f} req/s  elapsed {_duration(elapsed)}  ETA {eta}").strip()

    def finish(self) -> None:
        if self.enabled:
            self.update(force=True)
            self.stream.write("\n")
            self.stream.flush()
