"""The aggregator: builds bars the exchange does not give us, and checks the ones it does.

Reads md:trade:* and md:candle:* (consumer group "aggregator") and publishes:
- md:candle_built:{exchange}:{symbol}: 1m candles built from the trades (source "aggregate"), apart from the
  exchange's own 1m candles so the two never mix in a store;
- md:candle:{exchange}:{symbol}: 5m, 15m, 1h, 4h, 1d bars (quality.bar_timeframes) rolled up from the
  symbol's closed 1m candles, with their timeframe and source "aggregate" (the InfluxDB writer stores them
  in `ohlcv` beside the 1m bars, tag `timeframe`);
- mdp:alerts: `candle.reconcile` (warning) when a built 1m candle and the exchange's closed 1m candle for the
  same minute disagree beyond quality.reconcile_price_rel / reconcile_volume_rel, with both values.
The bar logic, and when a bar is emitted, is in common/domain/bars.py. Its own higher-timeframe bars
come back to it on md:candle:*; only closed 1m candles not built by it are rolled up.

A symbol's 1m candles: the exchange's own closed 1m candles, if its exchange sends them. For an exchange whose
`channels` in the config has "trades" but no "candles" (Coinbase: ccxt.pro has no candle stream), the 1m
candle built from trades IS the symbol's 1m candle: each closed one is also published on
md:candle:{exchange}:{symbol} (timeframe 1m, source "aggregate"; the InfluxDB writer stores it in the 1m
tier) and rolled up to the higher timeframes; it is not reconciled (an exchange candle of that symbol, e.g.
a repair fetched over REST, is rolled up only for a minute no trade built). A minute without trades has no
candle there (as on Coinbase's own REST), so the higher bar holding it is published incomplete (quality
"time.gap").

Restarts and a second copy: the state of every symbol (the minute being built from trades, with the ids
already in it; the higher bars in progress; the candles waiting for reconciliation) is checkpointed in the
Redis hash mdp:state:aggregator in the same MULTI/EXEC as the batch's outputs and acknowledgements
(common/bus/checkpoint.py), and loaded symbol by symbol by a new process. A restart therefore continues the
minute in hand (the first minute after it is complete, not partial) and the 1h/4h/1d bars in progress with
exactly the minutes they had (this replaces the per-day `mdp:agg:{exchange}:{symbol}:{YYYYMMDD}` hash of
minutes, which could rebuild the wrong day after a restart across midnight and double volume in 1h/1d
bars). One aggregator works at a time: it holds the lease mdp:lease:aggregator, verified in every commit; a
second instance waits as standby and takes over from the checkpoint when the holder dies or stops.

Atomicity and idempotence: a batch's outputs, acknowledgements and state checkpoint commit in one
MULTI/EXEC; only then is the state staged for the batch made the in-memory one (if the outcome of a commit
is unknown, the memory is dropped and reloaded from the checkpoint). A retried batch sees the same state; a
re-emitted bar has the same content, and downstream stores overwrite by open time. State is bounded: at
most quality.max_series symbols (the least recently used is forgotten, in memory and in the checkpoint),
each with 12 bars per timeframe and 120 candles waiting for reconciliation per side.

Counters: trades, candles_in (not built here), minutes_built, minutes_as_1m (built minutes published as the
symbol's 1m candle), partial_minutes, bars (higher-timeframe bars published), bars_incomplete,
reconciled_ok, reconcile_mismatch, reconcile_skipped, reconcile_expired, late_dropped, trades_late,
trades_redelivered, trades_invalid, ignored, symbols, series_loaded (from the checkpoint),
checkpoint_undecodable, plus the consumer's counters.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import ClassVar

from common.bus import streams
from common.bus.core import Delivery, Outputs
from common.bus.stage import Stage
from common.config import ConfigError, Settings
from common.domain.bars import SymbolBars, TimeframeError, bar_duration, compare
from common.domain.quality import iso, text
from common.domain.state import SeriesKey, Staging
from schemas import Alert, Candle, Event, Trade

log = logging.getLogger(__name__)

GROUP = "aggregator"
INPUT_PATTERNS = ("md:trade:*", "md:candle:*")
KEEP_PERIODS = 12  # bars kept per timeframe (a late minute for one of them re-emits it)
COUNTERS = ("trades", "candles_in", "minutes_built", "minutes_as_1m", "partial_minutes", "bars", "bars_incomplete",
            "reconciled_ok", "reconcile_mismatch", "reconcile_skipped", "reconcile_expired", "late_dropped",
            "trades_late", "trades_redelivered", "trades_invalid", "ignored")


def symbol_keys(batch: list[Delivery]) -> set[SeriesKey]:
    """The symbols (checkpoint series) a batch may touch."""
    keys: set[SeriesKey] = set()
    for d in batch:
        for e in d.events:
            if isinstance(e, (Trade, Candle)):
                keys.add((e.exchange, e.symbol, "bars", ""))
    return keys


class Aggregator(Stage):
    name = "aggregator"
    group = GROUP
    inputs = INPUT_PATTERNS
    forwards = True
    state_types: ClassVar[dict[str, type] | None] = {"bars": SymbolBars}
    partitioned = True
    cluster_ready = True  # its commits touch its partition's keys only, tagged on a cluster
    series_noun = "symbols"

    def __init__(self, settings: Settings, instance: str | None = None) -> None:
        super().__init__(settings, instance)
        q = settings.quality
        try:
            self.timeframes = {tf: bar_duration(tf) for tf in q.bar_timeframes}
        except TimeframeError as exc:
            raise ConfigError(f"{exc}; fix [quality] bar_timeframes in the config file") from None
        self.price_rel = q.reconcile_price_rel
        self.volume_rel = q.reconcile_volume_rel
        # Exchanges with trades but no candle channel: the 1m candle built from trades is the symbol's 1m candle.
        self.builds_1m = frozenset(ex.id for ex in settings.exchanges
                                   if "trades" in ex.channels and "candles" not in ex.channels)
        self.sequential = frozenset(q.sequential_trade_ids)
        self.count.update(dict.fromkeys(COUNTERS, 0))

    async def run(self, stop: asyncio.Event) -> None:
        log.info("aggregator: group %s reads %s; builds 1m from trades, %s from 1m",
                 GROUP, " and ".join(INPUT_PATTERNS), ", ".join(self.timeframes))
        await super().run(stop)

    # -- the handler ----------------------------------------------------------------------------------

    def series_of(self, batch: list[Delivery]) -> set[SeriesKey]:
        return symbol_keys(batch)

    async def judge(self, batch: list[Delivery], staging: Staging) -> Outputs:
        now = time.time_ns()
        out: dict[str, list[Event]] = {}
        alerts: list[Event] = []
        for d in batch:
            for event in d.events:
                if isinstance(event, Trade):
                    self._trade(event, staging, out, alerts, now)
                    continue
                if isinstance(event, Candle) and event.source != "aggregate":
                    self.count["candles_in"] += 1
                    if event.timeframe == "1m" and event.closed:
                        self._minute(event, staging, out, alerts, now)
                        continue
                self.count["ignored"] += 1  # open updates, our own bars, other timeframes
        if alerts:
            out[streams.ALERTS] = alerts
        return out

    def _bars(self, staging: Staging, exchange: str, symbol: str) -> SymbolBars:
        return staging.get((exchange, symbol, "bars", ""), lambda: SymbolBars(exchange, symbol))

    def _trade(self, trade: Trade, staging: Staging, out: dict[str, list[Event]], alerts: list[Event],
               now: int) -> None:
        self.count["trades"] += 1
        bars = self._bars(staging, trade.exchange, trade.symbol)
        was_partial = bars.partial and bars.minute is not None
        built = bars.add_trade(trade, self.count, trade.exchange in self.sequential)
        if built is None:
            if was_partial and not bars.partial:
                self.count["partial_minutes"] += 1
            return
        self.count["minutes_built"] += 1
        out.setdefault(streams.candle_built(trade.exchange, trade.symbol), []).append(built)
        if trade.exchange in self.builds_1m:  # no candle channel: the built minute is the symbol's 1m candle
            self.count["minutes_as_1m"] += 1
            out.setdefault(streams.market_data("candle", trade.exchange, trade.symbol), []).append(built)
            self._roll_up(bars, built, out)
            return  # nothing of the exchange's to reconcile it with
        self._reconcile(bars.pair_built(built, self.count), alerts, now)

    def _minute(self, candle: Candle, staging: Staging, out: dict[str, list[Event]], alerts: list[Event],
                now: int) -> None:
        bars = self._bars(staging, candle.exchange, candle.symbol)
        self._roll_up(bars, candle, out)  # a minute already there (built from trades) keeps the first copy
        if candle.exchange not in self.builds_1m:
            self._reconcile(bars.pair_exchange(candle, self.count), alerts, now)

    def _roll_up(self, bars: SymbolBars, minute: Candle, out: dict[str, list[Event]]) -> None:
        produced = bars.add_minute(minute, self.timeframes, KEEP_PERIODS, self.count)
        if produced:
            out.setdefault(streams.market_data("candle", minute.exchange, minute.symbol), []).extend(produced)
            self.count["bars"] += len(produced)
            self.count["bars_incomplete"] += sum("time.gap" in c.quality for c in produced)

    def _reconcile(self, pairs: list[tuple[Candle | None, Candle]], alerts: list[Event], now: int) -> None:
        for built, exchange in pairs:
            bad = compare(built, exchange, self.price_rel, self.volume_rel)
            if not bad:
                self.count["reconciled_ok"] += 1
                continue
            self.count["reconcile_mismatch"] += 1
            alerts.append(self._alert(built, exchange, bad, now))

    def _alert(self, built: Candle | None, exchange: Candle, bad: list[str], now: int) -> Alert:
        fields = ("open", "high", "low", "close", "volume")
        values: dict[str, str | None] = {"open_time": str(exchange.open_time), "fields": ",".join(bad)}
        for name in fields:
            values[f"exchange_{name}"] = text(getattr(exchange, name))
            values[f"built_{name}"] = text(getattr(built, name)) if built is not None else None
        if built is None:
            what = "no trade was seen in that minute, yet the exchange reports volume " + (text(exchange.volume) or "")
        else:
            what = "; ".join(f"{n} built {text(getattr(built, n))} vs exchange {text(getattr(exchange, n))}"
                             for n in bad)
        reason = (f"1m candle {exchange.exchange} {exchange.symbol} @{iso(exchange.open_time)} built from trades "
                  f"disagrees with the exchange's ({what}); tolerance {self.price_rel:g} relative on prices, "
                  f"{self.volume_rel:g} on volume. Missing trades (see trade.id_gap alerts) or a corrected "
                  f"exchange bar are the usual causes.")
        return Alert(rule="candle.reconcile", severity="warning", source=self.name, exchange=exchange.exchange,
                     symbol=exchange.symbol, kind="candle", reason=reason, values=values,
                     ts_event=exchange.ts_event, ts_recv=now)
