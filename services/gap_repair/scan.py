"""Holes no Gap event announced: the recent candles of a series, as InfluxDB holds them, against the ledger.

Why a scan beside the Gap events: a gap is announced only by someone who saw it happen. A validator restart
forgets the last candle of each series (its first candle after a restart cannot be judged a gap), a crashed
collector announces nothing, and a Gap event can be lost (dead-lettered) or its repair fail. The scan looks
at what is stored, so whatever the cause, a missing candle of the recent window is found within one
`gap_repair.scan_interval_s`.

A hole is a slot of the window [now - scan_lookback_s, the last candle closed at least scan_settle_s ago)
that has no candle in InfluxDB and that the coverage ledger does not know as empty or unfetchable (an
exchange outage recorded as empty is not a hole; a slot the ledger marks covered but InfluxDB lacks is one). Candles closed more recently than
`scan_settle_s` are left to the live pipeline, which may still be storing them. A series is scanned from
its first recorded candle on: before that there is history to backfill, not a gap.
"""

from __future__ import annotations

from common.domain.span import NS, Span, floor_to, subtract, timeframe_ns
from common.history.ingest import Sink, runs
from common.history.ledger import Ledger, Series
from common.stores.influx import InfluxClient


def scan_window(timeframe: str, now_ns: int, lookback_s: float, settle_s: float) -> Span | None:
    """The open times the scan looks at: whole slots from now - lookback to the last settled close."""
    step = timeframe_ns(timeframe)
    end = floor_to(now_ns - int(settle_s * NS), step)  # the slot [end - step, end) closed `settle` ago or more
    start = floor_to(now_ns - int(lookback_s * NS), step)
    return Span(start, end) if end > start else None


class Scanner:
    def __init__(self, influx: InfluxClient, ledger: Ledger, sink: Sink) -> None:
        self.influx = influx
        self.ledger = ledger
        self.sink = sink

    async def stored_open_times(self, series: Series, window: Span) -> list[int]:
        """Open times of the candles InfluxDB holds for `series` in `window`."""
        await self.sink.prepare()
        rows = await self.influx.query_timeframe(
            series.timeframe,
            "SELECT open FROM ohlcv WHERE exchange = $ex AND symbol = $sym AND timeframe = $tf AND time >= $lo "
            "AND time < $hi", {"ex": series.exchange, "sym": series.symbol, "tf": series.timeframe,
                               "lo": window.start, "hi": window.end})
        return sorted(int(r["time"]) for r in rows)

    async def holes(self, series: Series, window: Span, recorded_only: bool = False) -> list[Span]:
        """The slots of `window` neither stored in InfluxDB nor known to the ledger. With `recorded_only`,
        slots before the series' first stored or known candle are not holes: a series recorded only from
        some time on has history to backfill (`mdp backfill`), not gaps."""
        step = timeframe_ns(series.timeframe)
        times = await self.stored_open_times(series, window)
        coverage = await self.ledger.coverage(series)
        known = coverage.known()
        if recorded_only and not (known and known[0].start < window.start) \
                and not await self._stored_before(series, window.start):
            first = min([*times[:1], *(s.start for s in known if s.end > window.start)], default=None)
            if first is None or first >= window.end:
                return []
            window = Span(max(window.start, first), window.end)
        # What the exchange proved empty or no longer serves is not a hole; "covered" is not trusted: the store
        # itself says what it holds (a wiped InfluxDB leaves the ledger claiming candles it does not have).
        return subtract([window], [*runs(times, step), *coverage.empty_all(), *coverage.unfetchable_all()])

    async def _stored_before(self, series: Series, t: int) -> bool:
        rows = await self.influx.query_timeframe(
            series.timeframe,
            "SELECT last(open) FROM ohlcv WHERE exchange = $ex AND symbol = $sym AND timeframe = $tf AND "
            "time < $t", {"ex": series.exchange, "sym": series.symbol, "tf": series.timeframe, "t": t})
        return bool(rows)


__all__ = ["Scanner", "scan_window"]
