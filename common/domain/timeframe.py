"""Time units and timeframes: the one place that knows how long a millisecond, a minute or a '4h' bar is.

Every timestamp of the pipeline is integer nanoseconds since the epoch (UTC); the constants are nanoseconds
per unit, so `t * NS` is t seconds in ns and `t // MS` is a ns time in milliseconds. (`NS` keeps the name the
code has always used for nanoseconds per second.)

A `Timeframe` is a ccxt timeframe, `<count><unit>`: a count of one or more (ASCII digits) and a unit of
s (second), m (minute), h (hour), d (day), w (week), M (month) or y (year): '1m', '5m', '1h', '1d', '1w', '1M'.
- `ns`: its fixed length, for s, m, h, d and w; None for M and y, whose length varies with the calendar.
- `nominal_ns`: the length ccxt gives it (a month 30 days, a year 365 days), for stepping through requests.
- `alignment(t)`: whether a bar opening at t sits on the timeframe's boundary. Durations dividing one day
  (1s .. 1d) open on multiples of the duration since the epoch (UTC midnight, as Binance and most exchanges);
  '1w' on Monday 00:00 UTC; '1M' on the 1st of the month 00:00 UTC. Others ('3d', '2w', '3M', '5h') have
  exchange-specific anchors (Binance's 3d bars do not start on epoch multiples): "unchecked".
`Timeframe.parse` raises `TimeframeError` naming the value and the accepted forms; `Timeframe.find` answers
None instead. Callers with a narrower set (the aggregator's bars, the archive formats' table) check it on the
parsed value.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from common.errors import MdpError

US = 1_000  # ns per microsecond
MS = 1_000_000  # ns per millisecond
NS = 1_000_000_000  # ns per second
MINUTE_NS = 60 * NS
HOUR_NS = 60 * MINUTE_NS
DAY_NS = 24 * HOUR_NS
WEEK_NS = 7 * DAY_NS
MONDAY_NS = 4 * DAY_NS  # 1970-01-01 was a Thursday; 1970-01-05 the first Monday

Alignment = Literal["aligned", "misaligned", "unchecked"]

_FORM = re.compile(r"([0-9]+)([smhdwMy])")
_FIXED_NS = {"s": NS, "m": MINUTE_NS, "h": HOUR_NS, "d": DAY_NS, "w": WEEK_NS}
_NOMINAL_NS = {**_FIXED_NS, "M": 30 * DAY_NS, "y": 365 * DAY_NS}  # ccxt's parse_timeframe lengths
ACCEPTED = ("<count><unit>: a count of 1 or more and a unit of s, m, h, d, w, M (month) or y (year), "
            "e.g. 1m, 5m, 1h, 1d, 1w, 1M")


class TimeframeError(MdpError, ValueError):
    """A timeframe that is not a ccxt timeframe, or not one the caller can use; the message says which and why."""


@dataclass(frozen=True, slots=True)
class Timeframe:
    count: int
    unit: str  # s, m, h, d, w, M or y

    @staticmethod
    def parse(text: str) -> Timeframe:
        """The timeframe `text` names; TimeframeError naming it and the accepted forms otherwise."""
        found = _find(text)
        if found is None:
            raise TimeframeError(f"timeframe {text!r} is not a ccxt timeframe; use {ACCEPTED}")
        return found

    @staticmethod
    def find(text: str) -> Timeframe | None:
        """The timeframe `text` names, or None (what `parse` refuses)."""
        return _find(text)

    def __str__(self) -> str:
        return f"{self.count}{self.unit}"

    @property
    def ns(self) -> int | None:
        """Its fixed length in ns; None for months and years."""
        unit = _FIXED_NS.get(self.unit)
        return None if unit is None else self.count * unit

    @property
    def nominal_ns(self) -> int:
        """Its length as ccxt counts it (a month 30 days, a year 365 days), in ns."""
        return self.count * _NOMINAL_NS[self.unit]

    @property
    def epoch_aligned(self) -> bool:
        """Whether its bars open on multiples of its length since the epoch: s, m, h, d dividing one day."""
        return self.unit in "smhd" and DAY_NS % (self.count * _FIXED_NS[self.unit]) == 0

    def floor(self, t: int) -> int:
        """The multiple of its fixed length at or before `t` (the open time of the epoch-aligned bar holding t).
        TimeframeError for months and years, which have no fixed length."""
        ns = self.ns
        if ns is None:
            raise TimeframeError(f"timeframe {self} has no fixed length, so no epoch multiple to floor to")
        return t - t % ns

    def alignment(self, open_time_ns: int) -> Alignment:
        """Whether a bar opening at `open_time_ns` sits on this timeframe's boundary (see the module docstring)."""
        if self.unit in "smhd":
            if not self.epoch_aligned:
                return "unchecked"
            return "aligned" if open_time_ns % (self.count * _FIXED_NS[self.unit]) == 0 else "misaligned"
        if self.count != 1:
            return "unchecked"
        if self.unit == "w":
            return "aligned" if (open_time_ns - MONDAY_NS) % WEEK_NS == 0 else "misaligned"
        if self.unit == "M":
            if open_time_ns % NS:
                return "misaligned"
            dt = datetime.fromtimestamp(open_time_ns // NS, tz=UTC)
            return "aligned" if (dt.day, dt.hour, dt.minute, dt.second) == (1, 0, 0, 0) else "misaligned"
        return "unchecked"


@functools.lru_cache(maxsize=1024)  # hot paths (validator, normalizer) parse the same few names per event
def _find(text: str) -> Timeframe | None:
    m = _FORM.fullmatch(text) if isinstance(text, str) else None
    if m is None:
        return None
    count = int(m.group(1))
    return Timeframe(count, m.group(2)) if count > 0 else None


__all__ = [
    "ACCEPTED", "DAY_NS", "HOUR_NS", "MINUTE_NS", "MONDAY_NS", "MS", "NS", "US", "WEEK_NS", "Alignment",
    "Timeframe", "TimeframeError",
]
