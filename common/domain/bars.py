"""Bars built by the aggregator, as pure state machines (no I/O): 1m candles from trades, higher timeframes
from closed 1m candles, and the comparison of a built 1m candle with the exchange's own.

Minutes from trades (`SymbolBars.add_trade`): a trade falls in the minute floor(ts_event / 1m). The minute
closes when a trade of a later minute arrives (the collector orders trades per symbol), and the built candle
is open = first trade's price, high/low, close = last trade's price, volume = sum of amounts, exactly (Decimal).
The first minute the aggregator sees of a symbol started before it was listening: it is `partial`, never
published nor compared (the state, this flag included, is checkpointed: a restart continues the minute in
hand, so the first minute after a restart is complete). A trade of an older minute than the open one (late)
is not added (counted); a trade whose id was already added to the open minute is a redelivery and skipped.
Ids are compared per minute, never by order alone: Hyperliquid's trade ids (`tid`) are not ordered, and a
late trade filling a hole of the open minute belongs in it. Where ids are sequential (quality
sequential_trade_ids) the minute's ids are kept as runs of consecutive ids (one run, plus one per hole:
small whatever the rate); elsewhere as a set (at most the minute's trades).

Higher timeframes (`SymbolBars.add_minute`): each timeframe's bar P (open times aligned on multiples of the
timeframe since the epoch, i.e. UTC midnight) collects the closed 1m candles inside it, each minute once
(the first copy wins). It is emitted when the 1m candle that ends it arrives, or, if that one is missing,
when a minute of a later bar arrives (then it is incomplete). A bar with a missing minute carries
quality ("time.gap",) plus the union of its minutes' flags. A late minute for one of the last `keep` bars
of a timeframe re-emits that bar with the minute included (downstream stores overwrite by open time), so a
REST repair completes the higher bars too; a minute older than those is counted as `late_dropped`.
Emission is deterministic: the same minutes give the same bar (ts_event = bar end - 1 ms, ts_recv = the
newest ts_recv of its minutes), so a re-emitted bar overwrites itself.

Reconciliation (`compare`): a built 1m candle and the exchange's closed 1m candle for the same minute agree
when open/high/low/close are within `price_rel` (relative) and volume within `volume_rel` (relative) of the
exchange's. A minute the exchange reports with volume > 0 that saw no trade here (the trade stream went past
it) disagrees too; with volume 0 it agrees.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal

from common.domain.timeframe import DAY_NS, MINUTE_NS, MS, Timeframe, TimeframeError
from schemas import Candle, Trade

WAITING_MAX = 120  # candles waiting for their counterpart, per symbol and side


def bar_duration(timeframe: str) -> int:
    """ns of a timeframe built from 1m candles: a whole number of minutes dividing one day (5m .. 1d)."""
    tf = Timeframe.find(timeframe)
    if tf is None or tf.unit not in ("m", "h", "d"):
        raise TimeframeError(f"quality.bar_timeframes: {timeframe!r} is not <number><m|h|d> (e.g. '5m', '4h', '1d')")
    duration = tf.nominal_ns
    if duration <= MINUTE_NS or DAY_NS % duration:
        raise TimeframeError(f"quality.bar_timeframes: {timeframe!r} must be longer than 1m and divide one day "
                             f"(5m, 15m, 30m, 1h, 2h, 4h, 6h, 8h, 12h, 1d) so that bars align on UTC midnight")
    return duration


@dataclass(slots=True)
class Bar:
    """OHLCV being accumulated, exact."""

    open_time: int
    open: Decimal
    high: Decimal
    low: Decimal
    close: Decimal
    volume: Decimal
    ts_recv: int

    def copy(self) -> Bar:
        return Bar(self.open_time, self.open, self.high, self.low, self.close, self.volume, self.ts_recv)


@dataclass(slots=True)
class Period:
    """One higher-timeframe bar in progress: which of its minutes arrived, and their aggregate."""

    start: int
    minutes: bytearray = field(default_factory=bytearray)  # bit i: minute start + i*1m arrived (1d: 180 bytes)
    first: int = -1  # index of the earliest minute present (its open is the bar's open)
    last: int = -1  # index of the latest minute present (its close is the bar's close)
    bar: Bar | None = None
    quality: frozenset[str] = frozenset()
    final: bool = False  # emitted (complete, or superseded by a later bar)
    count: int = 0  # minutes present

    def copy(self) -> Period:
        return Period(self.start, bytearray(self.minutes), self.first, self.last,
                      self.bar.copy() if self.bar is not None else None, self.quality, self.final, self.count)

    def complete(self, duration: int) -> bool:
        return self.count == duration // MINUTE_NS

    def add(self, candle: Candle, index: int) -> bool:
        """Add a minute; False if it was already there (first copy wins)."""
        byte, bit = index >> 3, 1 << (index & 7)
        minutes = self.minutes
        if byte >= len(minutes):
            minutes.extend(bytes(byte + 1 - len(minutes)))
        if minutes[byte] & bit:
            return False
        minutes[byte] |= bit
        self.count += 1
        o, h, lo, c, v = candle.open, candle.high, candle.low, candle.close, candle.volume
        assert o is not None and h is not None and lo is not None and c is not None and v is not None
        b = self.bar
        if b is None:
            self.bar = Bar(self.start, o, h, lo, c, v, candle.ts_recv)
            self.first = self.last = index
        else:
            b.high = max(b.high, h)
            b.low = min(b.low, lo)
            b.volume += v
            b.ts_recv = max(b.ts_recv, candle.ts_recv)
            if index < self.first:
                self.first, b.open = index, o
            if index > self.last:
                self.last, b.close = index, c
        if candle.quality:
            self.quality = self.quality | frozenset(candle.quality)
        return True


@dataclass(slots=True)
class SymbolBars:
    """Everything the aggregator keeps for one (exchange, symbol)."""

    exchange: str
    symbol: str
    # minutes from trades
    minute: Bar | None = None
    partial: bool = True  # the open minute started before the aggregator listened
    minute_ids: set[str] = field(default_factory=set)  # trade ids added to the open minute (unordered ids)
    minute_runs: list[tuple[int, int]] = field(default_factory=list)  # the same, sequential ids: inclusive runs
    first_complete: int | None = None  # open time of the first minute built from its start
    # reconciliation
    built_waiting: dict[int, Candle] = field(default_factory=dict)
    exchange_waiting: dict[int, Candle] = field(default_factory=dict)
    # higher timeframes: timeframe -> bar start -> Period
    periods: dict[str, dict[int, Period]] = field(default_factory=dict)

    def copy(self) -> SymbolBars:
        return SymbolBars(self.exchange, self.symbol, self.minute.copy() if self.minute else None, self.partial,
                          set(self.minute_ids), list(self.minute_runs), self.first_complete,
                          dict(self.built_waiting), dict(self.exchange_waiting),
                          {tf: {s: p.copy() for s, p in ps.items()} for tf, ps in self.periods.items()})

    # -- trades -> 1m ----------------------------------------------------------------------------------

    def add_trade(self, trade: Trade, counts: dict[str, int], sequential: bool = False) -> Candle | None:
        """Add a trade; the built candle of the minute it closed (None if none closed or it was partial).
        `sequential`: its exchange numbers trades one by one."""
        price, amount = trade.price, trade.amount
        if price is None or amount is None:
            counts["trades_invalid"] += 1
            return None
        start = trade.ts_event - trade.ts_event % MINUTE_NS
        m = self.minute
        if m is not None and start < m.open_time:
            counts["trades_late"] += 1
            return None
        closed: Candle | None = None
        if m is not None and start > m.open_time:
            if not self.partial:
                closed = self.built_candle(m)
            self.minute = m = None
            self.minute_ids, self.minute_runs = set(), []
            self.partial = False
            if self.first_complete is None:
                self.first_complete = start
        tid = trade.trade_id
        if sequential and tid.isdigit() and tid.isascii():
            if not add_to_runs(self.minute_runs, int(tid)):
                counts["trades_redelivered"] += 1
                return None
        elif tid in self.minute_ids:
            counts["trades_redelivered"] += 1
            return None
        else:
            self.minute_ids.add(tid)
        if m is None:
            self.minute = Bar(start, price, price, price, price, amount, trade.ts_recv)
        else:
            m.high = max(m.high, price)
            m.low = min(m.low, price)
            m.close = price
            m.volume += amount
            m.ts_recv = trade.ts_recv
        return closed

    def built_candle(self, m: Bar) -> Candle:
        return Candle(exchange=self.exchange, symbol=self.symbol, timeframe="1m", open_time=m.open_time,
                      open=m.open, high=m.high, low=m.low, close=m.close, volume=m.volume, closed=True,
                      ts_event=m.open_time + MINUTE_NS - MS, ts_recv=m.ts_recv, source="aggregate")

    @property
    def trade_minute(self) -> int | None:
        return self.minute.open_time if self.minute is not None else None

    # -- reconciliation --------------------------------------------------------------------------------

    def pair_built(self, built: Candle, counts: dict[str, int]) -> list[tuple[Candle | None, Candle]]:
        """Pairs (built or None, exchange) now ready to compare, after `built` closed."""
        ready: list[tuple[Candle | None, Candle]] = []
        ex = self.exchange_waiting.pop(built.open_time, None)
        if ex is not None:
            ready.append((built, ex))
        else:
            self.built_waiting[built.open_time] = built
            _bound(self.built_waiting)
        ready.extend(self._without_trades(counts))
        return ready

    def pair_exchange(self, candle: Candle, counts: dict[str, int]) -> list[tuple[Candle | None, Candle]]:
        """Pairs ready to compare after the exchange's closed 1m `candle` arrived."""
        t = candle.open_time
        built = self.built_waiting.pop(t, None)
        if built is not None:
            return [(built, candle)]
        if self.first_complete is not None and t < self.first_complete:
            counts["reconcile_skipped"] += 1  # before the first minute built from its start
            return []
        self.exchange_waiting[t] = candle
        counts["reconcile_expired"] += _bound(self.exchange_waiting)
        return self._without_trades(counts)

    def _without_trades(self, counts: dict[str, int]) -> list[tuple[Candle | None, Candle]]:
        """Exchange candles of minutes the trade stream went past without a trade (those before the first
        minute built from its start are dropped: nothing to compare them with)."""
        now, first = self.trade_minute, self.first_complete
        if now is None or first is None:
            return []
        for t in [t for t in self.exchange_waiting if t < first]:
            del self.exchange_waiting[t]
            counts["reconcile_skipped"] += 1
        done = [t for t in self.exchange_waiting if t < now]
        return [(None, self.exchange_waiting.pop(t)) for t in sorted(done)]

    # -- 1m -> higher timeframes -----------------------------------------------------------------------

    def add_minute(self, candle: Candle, timeframes: dict[str, int], keep: int, counts: dict[str, int],
                   emit: bool = True) -> list[Candle]:
        """Add a closed 1m candle to every timeframe's bar; the bars to publish (none when `emit` is False)."""
        t = candle.open_time
        out: list[Candle] = []
        for tf, duration in timeframes.items():
            periods = self.periods.setdefault(tf, {})
            start = t - t % duration
            period = periods.get(start)
            if period is None:
                if len(periods) >= keep and start < min(periods):
                    counts["late_dropped"] += 1
                    continue
                period = periods[start] = Period(start)
            added = period.add(candle, (t - start) // MINUTE_NS)
            if emit:
                is_last = t + MINUTE_NS == start + duration
                if is_last or (added and period.final):
                    out.append(self.bar_candle(tf, duration, period))
                    period.final = True
                for other in sorted(periods.values(), key=lambda p: p.start):
                    if other.start < start and not other.final:
                        out.append(self.bar_candle(tf, duration, other))
                        other.final = True
            while len(periods) > keep:
                del periods[min(periods)]
        return out

    def bar_candle(self, timeframe: str, duration: int, period: Period) -> Candle:
        b = period.bar
        assert b is not None
        complete = period.complete(duration)
        flags = set(period.quality)
        if not complete:
            flags.add("time.gap")
        return Candle(exchange=self.exchange, symbol=self.symbol, timeframe=timeframe, open_time=period.start,
                      open=b.open, high=b.high, low=b.low, close=b.close, volume=b.volume, closed=True,
                      ts_event=period.start + duration - MS, ts_recv=b.ts_recv, source="aggregate",
                      quality=tuple(sorted(flags)))


def add_to_runs(runs: list[tuple[int, int]], n: int) -> bool:
    """Add id `n` to sorted, disjoint inclusive runs of ids; False if it is already in one."""
    if not runs or n > runs[-1][1] + 1:
        runs.append((n, n))
        return True
    a, b = runs[-1]
    if n == b + 1:
        runs[-1] = (a, n)
        return True
    i = bisect.bisect_right(runs, (n, math.inf)) - 1  # the last run starting at or before n
    if i >= 0 and runs[i][1] >= n:
        return False
    joins_left = i >= 0 and runs[i][1] == n - 1
    joins_right = i + 1 < len(runs) and runs[i + 1][0] == n + 1
    if joins_left and joins_right:
        runs[i:i + 2] = [(runs[i][0], runs[i + 1][1])]
    elif joins_left:
        runs[i] = (runs[i][0], n)
    elif joins_right:
        runs[i + 1] = (n, runs[i + 1][1])
    else:
        runs.insert(i + 1, (n, n))
    return True


def _bound(waiting: dict[int, Candle]) -> int:
    dropped = 0
    while len(waiting) > WAITING_MAX:
        del waiting[min(waiting)]
        dropped += 1
    return dropped


def compare(built: Candle | None, exchange: Candle, price_rel: float, volume_rel: float) -> list[str]:
    """Names of the fields where the built candle disagrees with the exchange's (empty: they agree)."""
    if built is None:
        return ["volume"] if exchange.volume != 0 else []
    bad = []
    for name in ("open", "high", "low", "close", "volume"):
        a, b = getattr(built, name), getattr(exchange, name)
        rel = volume_rel if name == "volume" else price_rel
        if abs(a - b) > Decimal(repr(rel)) * abs(b):
            bad.append(name)
    return bad


def minutes_of(candles: Iterable[Candle]) -> list[Candle]:
    """Closed exchange 1m candles among `candles` (what the higher timeframes are built from)."""
    return [c for c in candles if c.timeframe == "1m" and c.closed and c.source != "aggregate"]


# TimeframeError (common.domain.timeframe) is re-exported: the aggregator catches bar_duration's refusals from here.
__all__ = ["WAITING_MAX", "Bar", "Period", "SymbolBars", "TimeframeError", "add_to_runs", "bar_duration", "compare",
           "minutes_of"]
