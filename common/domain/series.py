"""The validator's stream rules: checks that need what came before in the same series.

A series is (exchange, symbol, kind, timeframe): the closed candles of one timeframe, or the trades (and
the last ticker) of one symbol. `StreamRules.judge(event, staging, now_ns)` returns a `Verdict`: the event to
forward (a copy whose `quality` names the flags it tripped), or None when it is dropped (time.duplicate) or
rejected (time.conflict); the findings to publish as alerts; and the Gap events to publish on mdp:gaps.

Rules (names, severities and policies from common.domain.quality.CATALOG; thresholds from QualitySettings):

  closed candles, in arrival order of one series
    time.duplicate     an identical closed candle for an open time seen before: dropped, info alert
    time.conflict      same open time, other values: rejected (the first one stays), error alert with both
    time.out_of_order  older than the newest closed candle: passed (stores key bars by open time, which is
                       the reordering), info alert saying whether it fills a known gap; the value rules below
                       are not applied to it (its neighbours were judged without it)
    time.gap           open time beyond the previous one + the timeframe: warning alert and a Gap event
                       [first missing open time, this open time); the candle itself passes
    volume.zero        volume == 0: flagged (a minute without trades is real: stored, never dropped)
    price.stuck        O=H=L=C at one unchanged price for `stuck_bars` bars in a row: flagged from that bar on
    price.outlier      log return vs the previous close, or the longer wick, beyond outlier_k rolling MADs of
                       the last `outlier_window` returns (MAD floored at outlier_min_mad); flagged
    candle.open_gap    consecutive bars only: |log(open / previous close)| > max(open_gap_k MADs of those
                       jumps, open_gap_min); flagged
    price.cross_venue  the close deviates from the median close of the same symbol, timeframe and open time
                       on the other venues seen by more than cross_venue_tolerance; flagged (with two venues
                       the later one is flagged: which one is wrong needs a third)
  trades
    trade.id_gap       numeric ids not consecutive (exchanges in sequential_trade_ids): flagged, warning
                       alert and a Gap event naming the missing id range, which is remembered as a hole
    trade.duplicate    a trade already forwarded: dropped, info alert (throttled like a flag's). Exact memory:
                       on exchanges in sequential_trade_ids an id at or below the last one passes only if it
                       fills a hole (a late or repaired trade: gap_repair publishes into raw:{exchange}), and
                       is dropped otherwise; at most HOLES_KEPT (1,000) holes per series, the oldest forgotten
                       first (a trade of a forgotten hole arriving later is then dropped as a duplicate; its
                       Gap was announced when the hole opened). Other exchanges: an id among the series'
                       last RECENT_IDS_KEPT (5,000) ids is a duplicate (an older resent id passes again).
    trade.outside_book price beyond the last ticker's bid/ask by outside_book_tolerance, if that ticker was
                       received at most book_max_age_s before the trade; flagged
  trades and tickers
    time.stale         ts_recv - ts_event > stale_after_s: the feed delivers old data; flagged

Unclosed candle updates and markets get no stream rule (the stateless rules of common.domain.quality only).

Alerts of flags are throttled per series and rule: the first at once, then at most one per
`alert_interval_s`, carrying how many were suppressed since the previous one; every event still carries its
flag and every flag is counted. Rejections, gaps and candle repairs are never throttled.

Memory: at most `max_series` series (least recently used forgotten first: its next event is judged as the
first of a new series), each with `dedup_memory` closed candles (as text) and `outlier_window` returns.
The state is checkpointed (common/bus/checkpoint.py, hash mdp:state:validator) with every batch, in the same
MULTI/EXEC as its outputs and acknowledgements, and loaded series by series by a new process: a restart (or
a standby taking the lease over) judges the next event against the last committed state, so a gap spanning
the restart is announced and a trade forwarded before it is not forwarded again.

Transactions: the validator stages every change of a batch (`SeriesBook.stage()`: copy on first touch) and
commits it only once the batch's outputs are published and its inputs acknowledged, so a batch retried after
a failed publish is judged against the same state as the first time (a retried candle is not a duplicate).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from decimal import Decimal
from statistics import median

from common.config import QualitySettings
from common.domain import quality
from common.domain.quality import Finding, iso, text, to_ns
from common.domain.state import Staging
from common.domain.timeframe import NS, Timeframe
from schemas import Candle, Event, Gap, Ticker, Trade

_GAPS_KEPT = 64  # open gaps remembered per candle series (a late candle inside one "fills a known gap")
# Trade ids remembered per series: holes (missing id ranges below the last id, each an inclusive range) for
# exchanges with sequential ids, the most recent ids for the others. At the bound the oldest is forgotten.
HOLES_KEPT = 1_000
RECENT_IDS_KEPT = 5_000


def timeframe_ns(timeframe: str) -> int | None:
    """Duration of a fixed-length timeframe ('1m' -> 60e9); None for months/years or unknown text."""
    tf = Timeframe.find(timeframe)
    return None if tf is None else tf.ns


def mad(values: list[float]) -> tuple[float, float]:
    """(median, median absolute deviation) of a non-empty list."""
    med = median(values)
    return med, median([abs(v - med) for v in values])


# ---------------------------------------------------------------------------------------------------------
# Per-series state


@dataclass(slots=True)
class Throttle:
    """When the last alert of one (series, rule) went out, and how many were suppressed since."""

    last_ns: int = 0
    suppressed: int = 0


@dataclass(slots=True)
class CandleSeries:
    """Closed candles of one (exchange, symbol, timeframe)."""

    seen: dict[int, str] = field(default_factory=dict)  # open_time -> "o h l c v", oldest first
    last_open: int | None = None
    last_close: float = 0.0
    returns: deque[float] = field(default_factory=deque)
    jumps: deque[float] = field(default_factory=deque)
    flat_run: int = 0
    flat_price: Decimal | None = None
    gaps: list[tuple[int, int]] = field(default_factory=list)  # [start, end) of missing open times
    throttles: dict[str, Throttle] = field(default_factory=dict)

    def copy(self) -> CandleSeries:
        return CandleSeries(dict(self.seen), self.last_open, self.last_close,
                            deque(self.returns, self.returns.maxlen), deque(self.jumps, self.jumps.maxlen),
                            self.flat_run, self.flat_price, list(self.gaps),
                            {k: Throttle(v.last_ns, v.suppressed) for k, v in self.throttles.items()})


@dataclass(slots=True)
class TradeSeries:
    """Trades of one (exchange, symbol), with the last ticker seen for it, and the memory of the trade ids
    already forwarded: for sequential ids the last id and the holes below it (inclusive ranges, oldest
    first, at most HOLES_KEPT), for other ids the most recent RECENT_IDS_KEPT ids (oldest first)."""

    last_id: int | None = None
    last_ts: int = 0
    bid: float | None = None
    ask: float | None = None
    book_recv: int = 0
    throttles: dict[str, Throttle] = field(default_factory=dict)
    holes: list[tuple[int, int]] = field(default_factory=list)
    recent: dict[str, None] = field(default_factory=dict)

    def copy(self) -> TradeSeries:
        return TradeSeries(self.last_id, self.last_ts, self.bid, self.ask, self.book_recv,
                           {k: Throttle(v.last_ns, v.suppressed) for k, v in self.throttles.items()},
                           list(self.holes), dict(self.recent))

    def fill_hole(self, n: int) -> bool:
        """Take id `n` out of the holes; False if it is in none (already forwarded, or a forgotten hole)."""
        holes = self.holes
        for i in range(len(holes) - 1, -1, -1):  # repairs usually fill the newest holes
            a, b = holes[i]
            if a <= n <= b:
                holes[i:i + 1] = [(x, y) for x, y in ((a, n - 1), (n + 1, b)) if x <= y]
                return True
            if b < n:
                return False
        return False


@dataclass(slots=True)
class VenueCloses:
    """The newest closed candle's (open_time, close) of one (symbol, timeframe) per exchange."""

    closes: dict[str, tuple[int, float]] = field(default_factory=dict)

    def copy(self) -> VenueCloses:
        return VenueCloses(dict(self.closes))


# ---------------------------------------------------------------------------------------------------------
# Verdicts


@dataclass(slots=True)
class Verdict:
    """What becomes of one event: `event` goes on (None: dropped or rejected); `findings` become alerts
    (`alert` False for a flag whose alert the throttle holds back); `gaps` go to mdp:gaps."""

    event: Event | None
    findings: list[Finding] = field(default_factory=list)
    alert: list[bool] = field(default_factory=list)
    gaps: list[Gap] = field(default_factory=list)

    @property
    def rejected(self) -> bool:
        return any(f.policy == "reject" for f in self.findings)


def _candle_text(c: Candle) -> str:
    return " ".join(text(v) or "None" for v in (c.open, c.high, c.low, c.close, c.volume))


def _ohlcv_values(prefix: str, fingerprint: str) -> dict[str, str | None]:
    return {f"{prefix}{name}": v for name, v in zip(("open", "high", "low", "close", "volume"),
                                                      fingerprint.split(" "), strict=True)}


class StreamRules:
    """The stream rules with their thresholds; see the module docstring."""

    def __init__(self, settings: QualitySettings) -> None:
        self.s = settings
        self.sequential = frozenset(settings.sequential_trade_ids)
        self.stale_ns = int(settings.stale_after_s * NS)
        self.book_age_ns = int(settings.book_max_age_s * NS)
        self.alert_interval_ns = int(settings.alert_interval_s * NS)

    # -- entry point ----------------------------------------------------------------------------------

    def judge(self, event: Event, staging: Staging, now_ns: int) -> Verdict:
        """The verdict on an event that passed the stateless rules."""
        if isinstance(event, Trade):
            return self._trade(event, staging, now_ns)
        if isinstance(event, Candle):
            if event.closed:
                return self._closed_candle(event, staging, now_ns)
            return Verdict(event)
        if isinstance(event, Ticker):
            return self._ticker(event, staging, now_ns)
        return Verdict(event)

    # -- helpers --------------------------------------------------------------------------------------

    def _flag(self, verdict: Verdict, event: Event, throttles: dict[str, Throttle], now_ns: int, rule: str,
              reason: str, values: dict[str, str | None]) -> None:
        """Add a flag finding; its alert goes out unless one did for this series and rule within the interval."""
        t = throttles.get(rule)
        if t is None:
            t = throttles[rule] = Throttle()
        send = t.last_ns == 0 or now_ns - t.last_ns >= self.alert_interval_ns
        if send:
            if t.suppressed:
                values = {**values, "suppressed_since_last_alert": str(t.suppressed)}
            t.last_ns, t.suppressed = now_ns, 0
        else:
            t.suppressed += 1
        verdict.findings.append(quality.finding(rule, event, reason, values))
        verdict.alert.append(send)

    def _add(self, verdict: Verdict, event: Event, rule: str, reason: str, values: dict[str, str | None]) -> None:
        verdict.findings.append(quality.finding(rule, event, reason, values))
        verdict.alert.append(True)

    @staticmethod
    def _finish(verdict: Verdict, event: Trade | Candle) -> Verdict:
        flags = [f.rule for f in verdict.findings if f.policy == "flag"]
        if flags and verdict.event is not None:
            verdict.event = quality.with_quality(event, flags)
        return verdict

    def _stale(self, verdict: Verdict, event: Trade | Ticker, throttles: dict[str, Throttle], now_ns: int) -> None:
        if self.stale_ns <= 0:
            return
        ts = to_ns(event.ts_event)
        lag = event.ts_recv - ts
        if lag > self.stale_ns:
            self._flag(verdict, event, throttles, now_ns, "time.stale",
                       f"{quality.describe(event)} was received {lag / NS:.3f} s after its exchange time "
                       f"{iso(ts)} (threshold {self.s.stale_after_s:g} s): the feed is delivering old data "
                       f"(a stalled or catching-up connection, or this host's clock is ahead); stored with "
                       f"the flag.",
                       {"ts_event": str(event.ts_event), "ts_recv": str(event.ts_recv), "lag_s": f"{lag / NS:.3f}"})

    # -- tickers and trades ---------------------------------------------------------------------------

    def _ticker(self, event: Ticker, staging: Staging, now_ns: int) -> Verdict:
        state = staging.get((event.exchange, event.symbol, "trade", ""), TradeSeries)
        verdict = Verdict(event)
        if event.bid is not None and event.ask is not None:
            state.bid, state.ask, state.book_recv = float(event.bid), float(event.ask), event.ts_recv
        self._stale(verdict, event, state.throttles, now_ns)
        return verdict  # a Ticker has no quality field: its flags are in the alerts only

    def _trade(self, event: Trade, staging: Staging, now_ns: int) -> Verdict:
        state = staging.get((event.exchange, event.symbol, "trade", ""), TradeSeries)
        verdict = Verdict(event)
        ts = to_ns(event.ts_event)
        tid = event.trade_id
        if event.exchange in self.sequential and tid.isdigit() and tid.isascii():
            n = int(tid)
            last = state.last_id
            if last is not None and n <= last:
                if n == last or not state.fill_hole(n):
                    return self._duplicate(verdict, event, state, now_ns,
                                           f"at or below the last id {last} and in none of the {len(state.holes)} "
                                           f"missing id range(s) remembered")
            elif last is not None and n > last + 1:
                missing = n - last - 1
                span = f"{last + 1}..{n - 1}" if missing > 1 else str(last + 1)
                reason = (f"{quality.describe(event)}: trade ids {span} are missing ({missing} trade(s) between "
                          f"{iso(state.last_ts)} and {iso(ts)}); {event.exchange} numbers trades one by one, so "
                          f"the feed lost them (a reconnect or a dropped message); stored with the flag. A "
                          f"repairer can fetch them by id range from the Gap event on {'mdp:gaps'}.")
                self._flag(verdict, event, state.throttles, now_ns, "trade.id_gap", reason,
                           {"previous_id": str(last), "first_missing_id": str(last + 1),
                            "last_missing_id": str(n - 1), "missing": str(missing)})
                verdict.gaps.append(Gap(exchange=event.exchange, symbol=event.symbol, channel="trades",
                                        start=state.last_ts, end=ts,
                                        reason=f"trade ids {span} missing ({missing})",
                                        ts_event=ts, ts_recv=now_ns, first_missing_id=str(last + 1),
                                        last_missing_id=str(n - 1)))
                state.holes.append((last + 1, n - 1))
                del state.holes[:-HOLES_KEPT]
            if last is None or n > last:
                state.last_id, state.last_ts = n, ts
        else:
            recent = state.recent
            if tid in recent:
                return self._duplicate(verdict, event, state, now_ns,
                                       f"among the last {len(recent)} ids of the series")
            recent[tid] = None
            if len(recent) > RECENT_IDS_KEPT:
                del recent[next(iter(recent))]
        if state.bid is not None and state.ask is not None and event.price is not None \
                and abs(event.ts_recv - state.book_recv) <= self.book_age_ns:
            price = float(event.price)
            tol = self.s.outside_book_tolerance
            low, high = state.bid * (1 - tol), state.ask * (1 + tol)
            if price < low or price > high:
                side = "below the bid" if price < low else "above the ask"
                self._flag(verdict, event, state.throttles, now_ns, "trade.outside_book",
                           f"{quality.describe(event)} at {text(event.price)} is {side} of the last quote "
                           f"(bid {state.bid:g}, ask {state.ask:g}) by more than {tol:.4%}; a print far from "
                           f"the book is usually a bad tick or a block/OTC report; stored with the flag.",
                           {"price": text(event.price), "bid": repr(state.bid), "ask": repr(state.ask),
                            "tolerance": repr(tol)})
        self._stale(verdict, event, state.throttles, now_ns)
        return self._finish(verdict, event)

    def _duplicate(self, verdict: Verdict, event: Trade, state: TradeSeries, now_ns: int, why: str) -> Verdict:
        """Drop a trade already forwarded (a redelivery, a resent message, a repair of a filled hole)."""
        verdict.event = None
        self._flag(verdict, event, state.throttles, now_ns, "trade.duplicate",
                   f"{quality.describe(event)} was already forwarded (its id is {why}); the copy is dropped so "
                   f"that no trade is doubled on md:trade.", {"trade_id": event.trade_id})
        return verdict

    # -- closed candles -------------------------------------------------------------------------------

    def _new_candle_series(self) -> CandleSeries:
        return CandleSeries(returns=deque(maxlen=self.s.outlier_window), jumps=deque(maxlen=self.s.outlier_window))

    def _closed_candle(self, event: Candle, staging: Staging, now_ns: int) -> Verdict:
        state = staging.get((event.exchange, event.symbol, "candle", event.timeframe), self._new_candle_series)
        verdict = Verdict(event)
        t = to_ns(event.open_time)
        fingerprint = _candle_text(event)
        first = state.seen.get(t)
        if first is not None:
            if first == fingerprint:
                verdict.event = None
                self._add(verdict, event, "time.duplicate",
                          f"{quality.describe(event)} was already received with the same values; the copy is "
                          f"dropped (overlapping REST pages or a resent bar).", {"source": event.source})
            else:
                verdict.event = None
                self._add(verdict, event, "time.conflict",
                          f"{quality.describe(event)} was already received with other values "
                          f"(first: {first}; now: {fingerprint}); the first is kept and this one rejected. "
                          f"Compare the exchange's REST and WebSocket bars for this minute.",
                          {**_ohlcv_values("first_", first), **_ohlcv_values("", fingerprint),
                           "source": event.source})
            return verdict
        step = timeframe_ns(event.timeframe)
        last = state.last_open
        if last is not None and t < last:
            self._late(verdict, state, event, t, last, step)
            self._remember(state, t, fingerprint)
            return verdict
        if last is not None and step and t > last + step:
            self._gap(verdict, state, event, last + step, t, step, now_ns)
        c = event.close
        o, h, lo, v = event.open, event.high, event.low, event.volume
        assert o is not None and h is not None and lo is not None and c is not None and v is not None
        if v == 0:
            self._flag(verdict, event, state.throttles, now_ns, "volume.zero",
                       f"{quality.describe(event)} has volume 0: no trade in the interval (real on illiquid "
                       f"markets); stored with the flag, never dropped.", {"volume": text(v)})
        flat = o == h == lo == c
        state.flat_run = (state.flat_run + 1 if flat and state.flat_price == c else 1) if flat else 0
        state.flat_price = c if flat else None
        if flat and state.flat_run >= self.s.stuck_bars:
            self._flag(verdict, event, state.throttles, now_ns, "price.stuck",
                       f"{quality.describe(event)} is the {state.flat_run}th bar in a row with "
                       f"open=high=low=close={text(c)} (threshold {self.s.stuck_bars}): a stuck feed or a market "
                       f"without trades; stored with the flag.",
                       {"price": text(c), "bars": str(state.flat_run)})
        close = float(c)
        if last is not None and state.last_close > 0:
            self._outlier(verdict, state, event, close, now_ns)
            if step and t == last + step:
                self._open_gap(verdict, state, event, now_ns)
        self._cross_venue(verdict, staging, event, t, close, now_ns, state)
        state.last_open, state.last_close = t, close
        self._remember(state, t, fingerprint)
        return self._finish(verdict, event)

    def _remember(self, state: CandleSeries, t: int, fingerprint: str) -> None:
        state.seen[t] = fingerprint
        while len(state.seen) > self.s.dedup_memory:
            del state.seen[next(iter(state.seen))]

    def _late(self, verdict: Verdict, state: CandleSeries, event: Candle, t: int, last: int,
              step: int | None) -> None:
        filled = None
        for i, (start, end) in enumerate(state.gaps):
            if start <= t < end:
                filled = (start, end)
                rest = [(start, t), ((t + step) if step else end, end)]
                state.gaps[i:i + 1] = [(a, b) for a, b in rest if a < b]
                break
        if filled is not None:
            how = (f"it fills the known gap {iso(filled[0])}..{iso(filled[1])} (a late or repaired bar); "
                   f"passed")
        else:
            how = ("it is older than what this validator remembers of the series (a history backfill, or a "
                   "bar from before a restart); passed without the duplicate check")
        self._add(verdict, event, "time.out_of_order",
                  f"{quality.describe(event)} arrived after the newer bar {iso(last)}: {how}; stores key bars by "
                  f"open time, so it lands in its place.",
                  {"newest_open_time": str(last), "fills_gap": "true" if filled else "false",
                   "source": event.source})

    def _gap(self, verdict: Verdict, state: CandleSeries, event: Candle, start: int, end: int, step: int,
             now_ns: int) -> None:
        missing = (end - start) // step
        reason = (f"{quality.describe(event)}: {missing} {event.timeframe} bar(s) missing before it, from "
                  f"{iso(start)} to {iso(end - step)} (a maintenance window, a socket outage, or a market "
                  f"without trades on an exchange that publishes no empty bars); the Gap event on mdp:gaps "
                  f"lets a repairer fetch them.")
        self._add(verdict, event, "time.gap", reason,
                  {"first_missing_open_time": str(start), "end": str(end), "missing": str(missing)})
        verdict.gaps.append(Gap(exchange=event.exchange, symbol=event.symbol, channel=f"candle:{event.timeframe}",
                                start=start, end=end, reason=f"{missing} closed {event.timeframe} bar(s) missing",
                                ts_event=event.ts_event, ts_recv=now_ns))
        state.gaps.append((start, end))
        del state.gaps[:-_GAPS_KEPT]

    def _outlier(self, verdict: Verdict, state: CandleSeries, event: Candle, close: float, now_ns: int) -> None:
        r = math.log(close / state.last_close)
        s = self.s
        if len(state.returns) >= s.outlier_min_samples:
            med, spread = mad(list(state.returns))
            limit = s.outlier_k * max(spread, s.outlier_min_mad)
            o, h, lo = float(event.open), float(event.high), float(event.low)  # type: ignore[arg-type]
            wick = max(math.log(h / max(o, close)), math.log(min(o, close) / lo))
            what = []
            if abs(r - med) > limit:
                what.append(f"log return {r:+.6f} vs median {med:+.6f}")
            if wick > limit:
                what.append(f"wick {wick:.6f}")
            if what:
                self._flag(verdict, event, state.throttles, now_ns, "price.outlier",
                           f"{quality.describe(event)}: {' and '.join(what)} beyond {s.outlier_k:g} x "
                           f"max(MAD {spread:.6f}, floor {s.outlier_min_mad:g}) = {limit:.6f} of the last "
                           f"{len(state.returns)} returns; a spike or a flash crash; stored with the flag.",
                           {"log_return": f"{r:.8f}", "wick": f"{wick:.8f}", "median": f"{med:.8f}",
                            "mad": f"{spread:.8f}", "limit": f"{limit:.8f}", "previous_close": repr(state.last_close),
                            "close": text(event.close), "high": text(event.high), "low": text(event.low)})
        state.returns.append(r)

    def _open_gap(self, verdict: Verdict, state: CandleSeries, event: Candle, now_ns: int) -> None:
        jump = abs(math.log(float(event.open) / state.last_close))  # type: ignore[arg-type]
        s = self.s
        spread = mad(list(state.jumps))[1] if len(state.jumps) >= s.outlier_min_samples else 0.0
        limit = max(s.open_gap_k * spread, s.open_gap_min)
        if jump > limit:
            self._flag(verdict, event, state.throttles, now_ns, "candle.open_gap",
                       f"{quality.describe(event)} opens at {text(event.open)}, {jump:.4%} (log) from the previous "
                       f"close {state.last_close:g}, beyond max({s.open_gap_k:g} x MAD {spread:.6f}, "
                       f"{s.open_gap_min:g}); consecutive bars normally open at the last price; stored with the "
                       f"flag.", {"open": text(event.open), "previous_close": repr(state.last_close),
                                  "jump": f"{jump:.8f}", "limit": f"{limit:.8f}"})
        state.jumps.append(jump)

    def _cross_venue(self, verdict: Verdict, staging: Staging, event: Candle, t: int, close: float, now_ns: int,
                     state: CandleSeries) -> None:
        venues = staging.get(("*", event.symbol, "venue", event.timeframe), VenueCloses)
        others = sorted(c for ex, (ot, c) in venues.closes.items() if ex != event.exchange and ot == t)
        venues.closes[event.exchange] = (t, close)
        if not others:
            return
        ref = median(others)
        dev = abs(close / ref - 1)
        if dev > self.s.cross_venue_tolerance:
            self._flag(verdict, event, state.throttles, now_ns, "price.cross_venue",
                       f"{quality.describe(event)} closes at {text(event.close)}, {dev:.2%} from the median close "
                       f"{ref:g} of {len(others)} other venue(s) for the same bar (tolerance "
                       f"{self.s.cross_venue_tolerance:.2%}); stored with the flag.",
                       {"close": text(event.close), "other_median": repr(ref), "venues": str(len(others)),
                        "deviation": f"{dev:.8f}"})
