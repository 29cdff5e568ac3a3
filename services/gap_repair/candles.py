"""Repairing a window of candles: the backfill's own fetch, then published into raw:{exchange} like live ones.

A window is cut into the backfill's pages (`PageFetcher.page`: bounded startTime/endTime requests, malformed
answers asked again, empty stretches with the request as evidence). What the exchange answered goes into
raw:{exchange} as the collector's own closed candles (`common.exchanges.events.candle_event`, source "rest",
`ts_recv` = when this service received the answer, `quality` = ("gap.repaired",)): the outcome's events, which
the service publishes with the Gap's acknowledgement in one MULTI/EXEC. So a repaired 1m candle crosses
validator -> normalizer -> md:candle:* like a live one, the influx writer stores it as the same point, and
the aggregator rolls it up to 5m..1d.

Why no direct InfluxDB write, and no "covered" record in the ledger: both would be effects before the
acknowledgement. A repair killed after them but before the EXEC would be redelivered, find the candles
stored (or covered), fetch nothing and publish nothing: they would be in InfluxDB but never on md:*. Data
reaches InfluxDB through the pipeline within the influx writer's latency; the scan leaves the last
`scan_settle_s` to it. What the exchange proved empty is recorded in the ledger at once (with the request as
evidence): it needs no store, publishes nothing, and a redelivered Gap then does not ask for it again.
The pages are still validated here (`Checker`, the live rules) to count what the validator will reject: a
rejected candle leaves its slot unrepaired (an error alert), its own alert comes from the validator.

What is not fetched, and why:
- candles not closed yet (open time + timeframe > now): the live feed still delivers them; explained;
- candles older than the storage tier keeps (influx.retention): InfluxDB would drop them; explained;
- candles older than the exchange serves (Hyperliquid keeps only its latest 5,000 per timeframe,
  common/history/plan.py): unrepaired, with an alert.
REST failures after `gap_repair.retries` attempts, a ban, or candles the validation rejected leave the
rest of the window as holes: unrepaired, with an alert. The periodic scan tries again later.
"""

from __future__ import annotations

import logging

import ccxt
import msgspec

from common.domain.span import Span, ceil_to, floor_to, intersect, iso, merge, subtract, timeframe_ns
from common.exchanges.ratelimit import ExchangeBanned
from common.history.ingest import Checker, Sink, retention_cutoff, runs
from common.history.ledger import Series
from common.history.plan import history_of
from common.history.rest import FetchError, PageFetcher
from services.gap_repair.outcome import REPAIRED, Outcome, Where
from services.gap_repair.published import Published, candle_key
from services.gap_repair.venues import Venues, VenueUnavailable

log = logging.getLogger(__name__)


class CandleRepair:
    def __init__(self, venues: Venues, checker: Checker, sink: Sink, retries: int, published: Published) -> None:
        self.venues = venues
        self.checker = checker
        self.sink = sink
        self.retries = retries
        self.published = published

    async def repair(self, series: Series, window: Span, missing: list[Span], now_ns: int, origin: str) -> Outcome:
        """Fetch the candles of `series` opening in the `missing` parts of `window` (what InfluxDB and the ledger
        lack: what is stored is not fetched again): the outcome's events, for raw:{exchange}; record what the
        exchange proved empty."""
        step = timeframe_ns(series.timeframe)
        where = Where(series.exchange, series.symbol, f"candle:{series.timeframe}")
        start, end = floor_to(window.start, step), ceil_to(window.end, step)
        out = Outcome(where, Span(start, end))
        closed_end = floor_to(now_ns, step)  # a candle opening before this has closed
        if closed_end <= start:
            out.explained = (f"no candle of {out.window} has closed yet (now {iso(now_ns)}); the live feed "
                             f"delivers them, and the scan looks again once they are settled")
            return out.finish(now_ns, origin)
        end = min(end, closed_end)
        cutoff, tier = retention_cutoff(self.sink.influx, series.timeframe, now_ns)
        if cutoff is not None and start < ceil_to(cutoff, step):
            start = min(ceil_to(cutoff, step), end)
            if start >= end:
                out.explained = f"the {tier} keeps no candle this old; nothing to store"
                return out.finish(now_ns, origin)
        history = history_of(series.exchange)
        todo = intersect(missing, Span(start, end)) if start < end else []
        oldest = ceil_to(now_ns - history.depth_candles * step, step) if history.depth_candles else None
        if oldest is not None and todo and oldest > todo[0].start:
            for lost in intersect(todo, Span(todo[0].start, oldest)):
                out.lose(lost, f"{series.exchange} {history.note}: its oldest {series.timeframe} "
                               f"candle opens about {iso(oldest)}, so these candles can no longer "
                               f"be fetched anywhere over REST; they stay a hole in the ledger "
                               f"(import an archive of them if one exists)")
            todo = subtract(todo, [Span(todo[0].start, oldest)])
        sent = [t for span in todo for t in range(span.start, span.end, step)
                if candle_key(series.exchange, series.symbol, series.timeframe, t) in self.published]
        todo = subtract(todo, runs(sent, step))
        if not todo and not out.unrepaired:
            out.explained = (f"every candle of {out.window} is stored, known empty, or published by an earlier "
                             f"repair and on its way to the store (already repaired, or delivered live)")
        for i, hole in enumerate(todo):
            if not await self._fetch_and_store(series, hole, step, history.page_limit, out):
                for later in todo[i + 1:]:
                    out.lose(later, "not tried: the exchange could not be asked (see the alert of the window "
                                    "before it)")
                break
        return out.finish(now_ns, origin)

    async def _fetch_and_store(self, series: Series, todo: Span, step: int, page_limit: int, out: Outcome) -> bool:
        """Repair one hole; False when the exchange cannot be asked (the hole is then an unrepaired part)."""
        try:
            rest = await self.venues.get(series.exchange)
        except VenueUnavailable as exc:
            out.lose(todo, f"{exc}. The scan retries every gap_repair.scan_interval_s while the "
                           f"window is recent; older ones: `mdp backfill` over the window")
            return False
        fetcher = PageFetcher(rest, series, step, page_limit, rest.budget.limit.ohlcv_weight, self.checker,
                              self.retries, keep_received=True)
        done: list[Span] = []
        try:
            for t in range(todo.start, todo.end, page_limit * step):
                batch = await fetcher.page(Span(t, min(t + page_limit * step, todo.end)))
                if batch.empty:
                    await self.sink.ledger.record(series, self.sink.source, empty=batch.empty)
                out.events.extend(msgspec.structs.replace(c, quality=REPAIRED) for c in batch.received)
                out.repaired += len(batch.candles)
                out.rejected += batch.rejected
                out.empty += sum(s.duration for s, _ in batch.empty) // step
                done.extend([*batch.covered, *(s for s, _ in batch.empty)])
        except (FetchError, ExchangeBanned, ccxt.BaseError) as exc:
            # ccxt.BaseError: what PageFetcher does not retry, e.g. Binance's -1001 "Internal error" body on a
            # 5xx, which ccxt raises as OperationFailed before looking at the HTTP status.
            log.warning("candle repair of %s %s stopped: %s", series, todo, exc)
            for hole in subtract([todo], done):
                out.lose(hole, f"REST failed: {type(exc).__name__}: {str(exc)[:300]}. The scan retries every "
                               f"gap_repair.scan_interval_s while the window is recent; older ones: "
                               f"`mdp backfill --exchange {series.exchange} --symbol {series.symbol} "
                               f"--timeframe {series.timeframe} --since {iso(hole.start)}`")
            return False
        for hole in subtract([todo], merge(done)):
            out.lose(hole, "the exchange answered with candles that fail validation (the validator rejects "
                           "them with an alert on mdp:alerts); they are not stored")
        return True


__all__ = ["CandleRepair"]
