"""Time ranges of candle open times, and the dates and durations users type.

A `Span` is half-open, [start, end), in integer nanoseconds since the epoch (UTC), like every timestamp of the
pipeline. A candle "is in" a span when its open time is. The helpers keep lists of spans sorted and
disjoint: `merge` (union, also joining spans that touch), `subtract`, `intersect`.

`parse_when("2y", now)` and friends read what `--since` / `--until` / `--from` / `--to` accept:
- a duration back from now: `<n><unit>`, unit s, m (minutes), h, d, w, y (365 days): 2y, 90d, 12h, 30m;
- a date or time in UTC: 2024-01-01, 2024-01-01T12:30, 2024-01-01 12:30:00, with an optional Z or +00:00;
- `now`.
Anything else raises `SpanError` naming the value and the accepted forms.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from common.domain.timeframe import DAY_NS, HOUR_NS, MINUTE_NS, MS, NS, WEEK_NS, Timeframe
from common.errors import MdpError

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_DURATION = re.compile(r"^(\d+)\s*(s|m|h|d|w|y)$")
_DURATION_NS = {"s": NS, "m": MINUTE_NS, "h": HOUR_NS, "d": DAY_NS, "w": WEEK_NS, "y": 365 * DAY_NS}


class SpanError(MdpError, ValueError):
    """A date, duration, timeframe or range that cannot be used; the message names it and the fix."""


@dataclass(frozen=True, slots=True, order=True)
class Span:
    start: int
    end: int

    def __post_init__(self) -> None:
        if self.end <= self.start:
            raise SpanError(f"empty or reversed range [{iso(self.start)}, {iso(self.end)})")

    @property
    def duration(self) -> int:
        return self.end - self.start

    def __contains__(self, t: object) -> bool:
        return isinstance(t, int) and self.start <= t < self.end

    def __str__(self) -> str:
        return f"[{iso(self.start)}, {iso(self.end)})"


def merge(spans: Iterable[Span]) -> list[Span]:
    """The union of `spans` as sorted, disjoint spans; spans that touch are joined."""
    out: list[Span] = []
    for s in sorted(spans):
        if out and s.start <= out[-1].end:
            if s.end > out[-1].end:
                out[-1] = Span(out[-1].start, s.end)
        else:
            out.append(s)
    return out


def subtract(spans: Iterable[Span], remove: Iterable[Span]) -> list[Span]:
    """`spans` minus `remove`, sorted and disjoint."""
    cuts = merge(remove)
    out: list[Span] = []
    for s in merge(spans):
        start = s.start
        for c in cuts:
            if c.end <= start or c.start >= s.end:
                continue
            if c.start > start:
                out.append(Span(start, c.start))
            start = max(start, c.end)
            if start >= s.end:
                break
        if start < s.end:
            out.append(Span(start, s.end))
    return out


def intersect(spans: Iterable[Span], window: Span) -> list[Span]:
    """The parts of `spans` inside `window`."""
    out = []
    for s in merge(spans):
        lo, hi = max(s.start, window.start), min(s.end, window.end)
        if lo < hi:
            out.append(Span(lo, hi))
    return out


def total(spans: Iterable[Span]) -> int:
    return sum(s.duration for s in merge(spans))


def timeframe_ns(timeframe: str) -> int:
    """Nanoseconds of a ccxt timeframe as ccxt counts it ('1m' -> 60e9, '1M' -> 30 days). SpanError otherwise."""
    tf = Timeframe.find(timeframe)
    if tf is None:
        raise SpanError(f"timeframe {timeframe!r} is not a ccxt timeframe; use e.g. 1m, 5m, 1h, 1d")
    return tf.nominal_ns


def floor_to(t: int, step: int) -> int:
    return t - t % step


def ceil_to(t: int, step: int) -> int:
    return -((-t) // step) * step


def iso(ns: int) -> str:
    """UTC text for humans: '2024-01-01T00:00:00Z' (milliseconds shown only when not whole seconds)."""
    try:
        dt = _EPOCH + timedelta(microseconds=ns // 1000)
    except OverflowError:
        return f"{ns}ns"
    spec = "seconds" if ns % NS == 0 else "milliseconds"
    return dt.isoformat(timespec=spec).replace("+00:00", "Z")


def to_datetime(ns: int) -> datetime:
    """A timezone-aware UTC datetime (microsecond precision: candle boundaries are whole milliseconds)."""
    return _EPOCH + timedelta(microseconds=ns // 1000)


def from_datetime(dt: datetime) -> int:
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    delta = dt - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * NS + delta.microseconds * 1000


def parse_when(text: str, now_ns: int, what: str = "time") -> int:
    """ns since the epoch of `text`: a duration back from `now_ns`, a UTC date/time, or 'now'."""
    value = text.strip()
    if value.lower() == "now":
        return now_ns
    m = _DURATION.match(value)
    if m:
        return now_ns - int(m.group(1)) * _DURATION_NS[m.group(2)]
    iso_text = value.replace(" ", "T", 1)
    if iso_text.endswith(("Z", "z")):
        iso_text = iso_text[:-1] + "+00:00"
    try:
        dt = datetime.fromisoformat(iso_text)
    except ValueError:
        raise SpanError(f"{what} {text!r} is neither a duration (2y, 90d, 12h, 30m: back from now) nor a UTC "
                        f"date (2024-01-01, 2024-01-01T12:30Z) nor 'now'") from None
    if dt.tzinfo is not None and dt.utcoffset() != timedelta(0):
        dt = dt.astimezone(UTC)
    return from_datetime(dt)


def requested_span(since: str, until: str | None, now_ns: int, timeframe: str) -> Span:
    """The candles wanted: open times from `since` (floored to the timeframe, so the candle holding `since` is
    included) up to `until` or now, and never past the last closed candle (its open + timeframe <= now)."""
    step = timeframe_ns(timeframe)
    start = floor_to(parse_when(since, now_ns, "--since"), step)
    end = parse_when(until, now_ns, "--until") if until else now_ns
    end = min(ceil_to(end, step), floor_to(now_ns, step))
    if end <= start:
        raise SpanError(f"nothing to fetch: --since {since!r} ({iso(start)}) is not before --until "
                        f"{until or 'now'!r} ({iso(end)}, capped at the last closed {timeframe} candle)")
    return Span(start, end)


__all__ = [
    "MS", "NS", "Span", "SpanError", "ceil_to", "floor_to", "from_datetime", "intersect", "iso", "merge",
    "parse_when", "requested_span", "subtract", "timeframe_ns", "to_datetime", "total",
]
