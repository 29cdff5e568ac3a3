"""One repairer for Gap events and scanned holes: routes a gap to the candle or trade repair, counts outcomes.

Channels of a Gap (schemas.Gap.channel):
- "candle:{timeframe}" (validator `time.gap`), "candles" / "candles:{timeframe}" (collector reconnects;
  without a timeframe the exchange's configured one): the window's open times that neither InfluxDB nor the
  ledger holds are fetched (services/gap_repair/candles.py);
- "trades" (validator `trade.id_gap`, and collector reconnects on exchanges that number trades one by one,
  with "trade ids A..B missing" in the reason; other collector reconnects with only a time window):
  services/gap_repair/trades.py. A collector reason "no trade id missing" is explained at once;
- snapshot channels ("book", "ticker", "bookTicker", "funding", "open_interest"): nothing to fetch, the next
  snapshot supersedes what was missed; explained (an info alert records it), never an unrepaired loss;
- anything else: unrepaired, with an alert naming the channel.
A window with start = end is explained (nothing can be missing); end < start is unrepaired (a producer bug).
"""

from __future__ import annotations

import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable

from common.bus import streams
from common.bus.core import Outputs
from common.config import BusSettings, Settings
from common.domain.span import Span, SpanError
from common.domain.timeframe import MS
from common.history.ledger import Series
from schemas import Alert, Event, Gap
from services.gap_repair.candles import CandleRepair
from services.gap_repair.outcome import Outcome, Where
from services.gap_repair.scan import Scanner, scan_window
from services.gap_repair.trades import TradeRepair, missing_ids

log = logging.getLogger(__name__)

SNAPSHOT_CHANNELS = frozenset({"book", "orderbook", "ticker", "bookTicker", "funding", "open_interest"})
NO_ID_MISSING = "no trade id missing"  # the collector's reason when the ids around an outage are consecutive
ALERTED_MEMORY = 10_000  # scanned holes whose unrepaired alert went out, remembered to not repeat it


def add_outputs(outputs: Outputs, out: Outcome, bus: BusSettings, alerts: list[Alert] | None = None) -> None:
    """Add what one repair publishes: its repaired data to raw:{exchange} (its symbol's partition's with
    bus.partitions > 1 or on a cluster; flowing like live data), its alerts (`alerts`, default all of the
    outcome's) to mdp:alerts."""
    if out.events:
        events: list[Event] = list(out.events)
        where = streams.raw_for(out.where.exchange, out.where.symbol, bus.partitions, bus.cluster)
        outputs.setdefault(where, []).extend(events)
    chosen = out.alerts if alerts is None else alerts
    if chosen:
        outputs.setdefault(streams.ALERTS, []).extend(chosen)


class Repairer:
    def __init__(self, settings: Settings, candles: CandleRepair, trades: TradeRepair, scanner: Scanner) -> None:
        self.settings = settings
        self.candles = candles
        self.trades = trades
        self.scanner = scanner
        self.published = candles.published  # one memory for both (services/gap_repair/published.py)
        # Every counter from the start, so `mdp status` shows zeros rather than nothing.
        self.counts: Counter[str] = Counter({f"{p}{s}": 0 for p in ("gaps_", "scan_")
                                             for s in ("repaired", "empty", "explained", "unrepaired")})
        self.counts.update({k: 0 for k in ("gaps_in", "scans", "scan_holes", "scan_failures", "candles_repaired",
                                           "candles_empty", "candles_rejected", "trades_repaired",
                                           "trades_rejected")})
        self._alerted: OrderedDict[tuple[Series, Span], None] = OrderedDict()

    def _count(self, out: Outcome, prefix: str) -> None:
        self.counts[f"{prefix}{out.state}"] += 1
        kind = out.where.kind
        if kind not in ("candle", "trade"):
            return
        self.counts[f"{kind}s_repaired"] += out.repaired
        self.counts[f"{kind}s_rejected"] += out.rejected
        if kind == "candle":
            self.counts["candles_empty"] += out.empty

    async def repair_gap(self, gap: Gap, now_ns: int | None = None, partition: int | None = None) -> Outcome:
        """Repair what one Gap event (of `partition`'s batch) announces; the outcome carries the alerts to
        publish."""
        now_ns = now_ns or time.time_ns()
        self.counts["gaps_in"] += 1
        out = await self._route(gap, now_ns)
        self.published.stage(out.events, partition)  # remembered once the bus acknowledged the Gap (`committed`)
        self._count(out, "gaps_")
        log.info("gap %s %s %s %s: %s (%d repaired, %d empty)", gap.exchange, gap.symbol, gap.channel,
                 out.window, out.state, out.repaired, out.empty)
        return out

    async def _route(self, gap: Gap, now_ns: int) -> Outcome:
        channel, _, timeframe = gap.channel.partition(":")
        ids = missing_ids(gap) if channel in ("trades", "trade") else None
        end = max(gap.end, gap.start + MS) if ids else gap.end  # an id gap may lie inside one millisecond
        try:
            window = Span(gap.start, end)
        except SpanError:
            out = Outcome(Where(gap.exchange, gap.symbol, gap.channel), Span(gap.start, gap.start + 1))
            if end == gap.start:
                out.explained = "the Gap's window is empty (start = end): nothing can be missing"
            else:
                out.lose(out.window, f"the Gap event's window [{gap.start}, {gap.end}) is reversed; the "
                                     f"producer ({gap.reason!r}) must send start <= end")
            return out.finish(now_ns, gap.reason)
        if ids is None and NO_ID_MISSING in gap.reason:
            out = Outcome(Where(gap.exchange, gap.symbol, gap.channel), window)
            out.explained = ("the trade ids on both sides of the window are consecutive (the collector says "
                             "so): no trade was missed")
            return out.finish(now_ns, gap.reason)
        if channel in ("candle", "candles"):
            if not timeframe:
                timeframe = self._timeframe(gap.exchange)
            series = Series(gap.exchange, gap.symbol, timeframe)
            missing = await self.scanner.holes(series, window)
            return await self.candles.repair(series, window, missing, now_ns, gap.reason)
        if channel in ("trades", "trade"):
            return await self.trades.repair(gap.exchange, gap.symbol, window, ids, now_ns, gap.reason)
        out = Outcome(Where(gap.exchange, gap.symbol, gap.channel), window)
        if channel in SNAPSHOT_CHANNELS:
            out.explained = (f"{channel} is a snapshot channel: the first update after the gap supersedes what "
                             f"was missed, and no exchange serves past {channel} states over REST")
        else:
            out.lose(window, f"channel {gap.channel!r} is not one this service repairs (candle:TF, "
                             f"candles, trades) nor a snapshot channel ({', '.join(sorted(SNAPSHOT_CHANNELS))}); "
                             f"fix the producer of this Gap")
        return out.finish(now_ns, gap.reason)

    def committed(self, partition: int | None = None) -> None:
        """The Gap entries of `partition` handled last were acknowledged: their repaired data is on
        raw:{exchange}."""
        self.published.commit(partition)

    def discarded(self, partition: int | None = None) -> None:
        """The Gap entries of `partition` handled last were not acknowledged and are handled again."""
        self.published.discard(partition)

    def _timeframe(self, exchange: str) -> str:
        for ex in self.settings.exchanges:
            if ex.id == exchange:
                return ex.timeframe
        return "1m"

    def scanned_series(self) -> list[Series]:
        return [Series(ex.id, symbol, ex.timeframe) for ex in self.settings.exchanges if "candles" in ex.channels
                for symbol in ex.symbols]

    async def scan(self, now_ns: int | None = None, mine: Callable[[str], bool] | None = None) -> Outputs:
        """Find and repair holes in the recent candles of every configured series (of those whose symbol
        `mine` accepts: a partitioned instance's); what to publish: the repaired candles (raw:{exchange}) and
        the alerts (an unrepaired hole is alerted once per process, not at every scan)."""
        now_ns = now_ns or time.time_ns()
        cfg = self.settings.gap_repair
        self.counts["scans"] += 1
        outputs: Outputs = {}
        for series in self.scanned_series():
            if mine is not None and not mine(series.symbol):
                continue
            window = scan_window(series.timeframe, now_ns, cfg.scan_lookback_s, cfg.scan_settle_s)
            if window is None:
                continue
            holes = await self.scanner.holes(series, window, recorded_only=True)
            if not holes:
                continue
            self.counts["scan_holes"] += len(holes)
            log.warning("scan: %s has %d hole(s) in %s no Gap repaired: %s", series, len(holes), window,
                        ", ".join(map(str, holes[:5])))
            out = await self.candles.repair(series, Span(holes[0].start, holes[-1].end), holes, now_ns,
                                            "scan of InfluxDB and the coverage ledger")
            self._count(out, "scan_")
            add_outputs(outputs, out, self.settings.bus,
                        [a for a in out.alerts if self._first_time(series, a)])
        return outputs

    def _first_time(self, series: Series, alert: Alert) -> bool:
        if alert.rule != "gap.unrepaired":
            return True
        key = (series, Span(int(alert.values["part_start"] or 0), int(alert.values["part_end"] or 1)))
        if key in self._alerted:
            return False
        self._alerted[key] = None
        while len(self._alerted) > ALERTED_MEMORY:
            self._alerted.popitem(last=False)
        return True


__all__ = ["SNAPSHOT_CHANNELS", "Repairer", "add_outputs"]
