"""From fetched candles to stored, recorded history: the same validation as live data, InfluxDB, then the ledger.

Why the backfill writes InfluxDB directly instead of publishing to raw:{exchange}: a two-year backfill is a
million candles in a few seconds of CPU; through the bus they would cross three streams and three processes,
compete with live data for the validator and normalizer, and the ledger could not know when they are durable
(the influx writer acknowledges to the bus, not to us). Validation stays the same code as live:
- building: `common.exchanges.events.candle_event` (what the collector publishes for a REST row);
- admitting: `common.domain.admit.admit`, the live validator's stateless rules (`quality.RULES` for candles,
  policies included) then the normalizer's `normalize` (canonical decimals, ns timestamps, alignment): a
  rejected candle is not stored, and each finding becomes an `Alert` on mdp:alerts (source "backfill" /
  "import"), exactly as the validator or normalizer publishes it; a flag-policy finding stores the candle with
  the rule in `quality`;
- encoding: `common.stores.influx.encode_candles` (same measurement, tags and timestamp as the influx writer, so a
  backfilled candle and a live one of the same minute are the same point: writes are idempotent).

A fast path keeps a two-year backfill at the exchange's rate limit on a small machine (the generic rule
machinery costs ~13 us per candle, a page of 1000 about as much CPU as the exchange's whole budget allows):
REST rows are built by `rest_candle` directly in the normalizer's canonical form (`canonical_number`), and a
candle that `clears_candle_rules` (common.domain.admit: a direct check of exactly the conditions of the live
candle rules) and sits on its timeframe's boundary is stored without going through `admit`. Every other
candle goes the full way, so findings, alerts and rejections are the live ones. The fast path is on only while
the live candle rule set is exactly the one it mirrors (`FAST_RULES`); a rule added to `common.domain.quality`
turns it off until it is taught the new rule. tests/test_backfill.py proves both paths agree on real rows and on
broken ones.

Order per batch, so that a kill at any moment loses nothing and claims nothing: write the candles (InfluxDB
answers 204: durable), publish the alerts, then record covered and empty ranges in the ledger in one
transaction. A kill before the ledger write only means those pages are fetched and written again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from common.bus import streams
from common.bus.core import Producer
from common.config import Settings
from common.domain import quality
from common.domain.admit import FAST_RULES, admit, clears_candle_rules
from common.domain.normalize import SymbolMap, canonical_number
from common.domain.span import Span, iso
from common.domain.timeframe import DAY_NS, MS
from common.history.ledger import Ledger, Series, Source
from common.stores.influx import InfluxClient, InfluxError, InfluxWriteError, encode_candles
from schemas import Alert, Candle

log = logging.getLogger(__name__)


@dataclass
class Checked:
    """The outcome of validating the candles of one page (or one archive file)."""

    stored: list[Candle] = field(default_factory=list)  # validated and normalized: to write
    alerts: list[Alert] = field(default_factory=list)
    rejected: int = 0


@dataclass
class Batch:
    """Candles to write and what to record once they are durable."""

    series: Series
    candles: list[Candle] = field(default_factory=list)
    covered: list[Span] = field(default_factory=list)
    empty: list[tuple[Span, dict[str, Any]]] = field(default_factory=list)
    alerts: list[Alert] = field(default_factory=list)
    rejected: int = 0
    received: list[Candle] = field(default_factory=list)  # the rows as the collector publishes them, if asked


def runs(open_times: Iterable[int], step: int) -> list[Span]:
    """Spans of consecutive candles: [t, t+step) for each open time, touching ones joined."""
    out: list[Span] = []
    for t in sorted(set(open_times)):
        if out and out[-1].end == t:
            out[-1] = Span(out[-1].start, t + step)
        else:
            out.append(Span(t, t + step))
    return out


def gaps(window: Span, open_times: Sequence[int], step: int) -> list[tuple[Span, int | None, int | None]]:
    """The parts of `window` holding no open time of `open_times` (sorted), each with the open time of the
    candle just before it and just after it inside the window (None at the window's edges)."""
    out: list[tuple[Span, int | None, int | None]] = []
    cursor, before = window.start, None
    for t in open_times:
        if t < window.start or t >= window.end:
            continue
        if t > cursor:
            out.append((Span(cursor, t), before, t))
        cursor, before = t + step, t
    if cursor < window.end:
        out.append((Span(cursor, window.end), before, None))
    return out


def rest_candle(exchange: str, symbol: str, timeframe: str, step_ns: int, row: Sequence[Any],
                ts_recv: int) -> Candle:
    """A closed candle of a ccxt OHLCV row, equal to what `normalize(candle_event(...))` gives for it."""
    open_ms = int(row[0])
    return Candle(exchange=exchange, symbol=symbol, timeframe=timeframe, open_time=open_ms * MS,
                  open=canonical_number(row[1]), high=canonical_number(row[2]), low=canonical_number(row[3]),
                  close=canonical_number(row[4]), volume=canonical_number(row[5]), closed=True,
                  ts_event=(open_ms * MS + step_ns) - MS, ts_recv=ts_recv, source="rest")


class Checker:
    """The live validation of candles (see the module docstring), reusable across pages."""

    def __init__(self, settings: Settings, source: str) -> None:
        self.settings = settings
        self.source = source
        self.rules = tuple(r for r in quality.RULES if "candle" in r.kinds)
        self.fast = frozenset(r.name for r in self.rules) == FAST_RULES
        self.symbols = SymbolMap()
        self.fast_passed = 0

    def check(self, candles: Sequence[Candle], now_ns: int | None = None, canonical: bool = False,
              step_ns: int = 0, live: Callable[[int], Candle] | None = None) -> Checked:
        """Validate and normalize `candles`. `canonical`: they were built by `rest_candle` (already in the
        normalizer's form), so those that clear the rules on an epoch-aligned timeframe `step_ns` are stored
        as they are; any other goes the live way as `live(i)` builds it (the collector's candle of row i), so
        its alerts carry the values as the live validator would show them."""
        ctx = quality.CheckContext.from_settings(self.settings.validation, now_ns=now_ns or time.time_ns())
        out = Checked()
        fast = self.fast and canonical and step_ns > 0 and DAY_NS % step_ns == 0
        limit = ctx.now_ns + ctx.max_future_skew_ns
        for i, c in enumerate(candles):
            if fast and c.open_time % step_ns == 0 and clears_candle_rules(c, limit):
                out.stored.append(c)
                self.fast_passed += 1
                continue
            if live is not None:
                c = live(i)
            admitted = admit(c, ctx, self.symbols, self.rules)
            out.alerts.extend(quality.to_alert(f, c, self.source, ctx.now_ns) for f in admitted.findings)
            if admitted.event is None:
                out.rejected += 1
                continue
            assert isinstance(admitted.event, Candle)
            out.stored.append(admitted.event)
        return out


def retention_cutoff(influx: InfluxClient, timeframe: str, now_ns: int) -> tuple[int | None, str]:
    """(oldest open time the storage tier of `timeframe` keeps, tier description); (None, ...) when it keeps
    everything. With storage tiers (common.stores.influx `plan`, docs/storage.md) a 1m candle lives in a tier whose
    retention may be shorter than the history asked for: InfluxDB drops older points, so a backfill must not
    fetch them, nor record them as covered."""
    plan = getattr(influx, "plan", None)
    if plan is None:
        return None, f"database {influx.database!r}"
    tier = plan.for_timeframe(timeframe)
    return tier.cutoff_ns(now_ns), f"storage tier {tier.name!r} (retention {tier.retention})"


class Sink:
    """Writes batches durably and records them: InfluxDB, then alerts, then the ledger."""

    def __init__(self, influx: InfluxClient, ledger: Ledger, producer: Producer | None, source: Source) -> None:
        self.influx = influx
        self.ledger = ledger
        self.producer = producer
        self.source = source
        self.points = 0
        self.alerts = 0
        self._database_ready = False

    async def prepare(self) -> None:
        """Create the database, or the storage tiers when the client has them (idempotent)."""
        if self._database_ready:
            return
        try:
            if hasattr(self.influx, "ensure_tiers"):
                for line in await self.influx.ensure_tiers():
                    log.debug("storage tiers: %s", line)
            else:
                await self.influx.create_database()
        except InfluxError as exc:
            log.warning("creating InfluxDB database %s (or its tiers) was refused (%s); writing anyway",
                        self.influx.database, exc)
        self._database_ready = True

    async def _write(self, timeframe: str, lines: list[str]) -> None:
        plan = getattr(self.influx, "plan", None)
        if plan is not None and hasattr(self.influx, "write_tier"):
            await self.influx.write_tier(plan.for_timeframe(timeframe), lines)
        else:
            await self.influx.write_lines(lines)

    async def store(self, batches: Sequence[Batch]) -> None:
        by_timeframe: dict[str, list[str]] = {}
        for b in batches:
            encode_candles(b.candles, by_timeframe.setdefault(b.series.timeframe, []))
        for timeframe, lines in by_timeframe.items():
            if not lines:
                continue
            await self.prepare()
            try:
                await self._write(timeframe, lines)
            except InfluxWriteError as exc:
                if not exc.database_not_found:
                    raise
                self._database_ready = False
                await self.prepare()
                await self._write(timeframe, lines)
            self.points += len(lines)
        alerts = [a for b in batches for a in b.alerts]
        if alerts and self.producer is not None:
            await self.producer.publish({streams.ALERTS: list(alerts)})
            self.alerts += len(alerts)
        elif alerts:
            log.warning("%d alert(s) not published (no Redis producer): %s", len(alerts), alerts[0].reason)
        by_series: dict[Series, tuple[list[Span], list[tuple[Span, dict[str, Any]]]]] = {}
        for b in batches:
            covered, empty = by_series.setdefault(b.series, ([], []))
            covered.extend(b.covered)
            empty.extend(b.empty)
        for series, (covered, empty) in by_series.items():
            await self.ledger.record(series, self.source, covered, empty)


def empty_evidence(kind: str, reason: str, before: int | None, after: int | None,
                   **details: Any) -> dict[str, Any]:
    """An evidence object for an empty range: what kind of proof, in words, and the neighbouring candles."""
    return {"kind": kind, "reason": reason, "before": iso(before) if before is not None else None,
            "after": iso(after) if after is not None else None, **details}


__all__ = ["Batch", "Checked", "Checker", "Sink", "empty_evidence", "gaps", "runs"]
