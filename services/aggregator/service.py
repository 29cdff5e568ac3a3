"""The aggregator: builds bars the exchange does not give us, and checks the ones it does.

Reads md:trade:* and md:candle:* (consumer group "aggregator") and publishes:
- md:candle_built:{exchange}:{symbol}: 1m candles built from the trades (source "aggregate"), apart from the
  exchange's own 1m candles so the two never mix in a store;
- md:candle:{exchange}:{symbol}: 5m, 15m, 1h, 4h, 1d bars (quality.bar_timeframes) rolled up from the
  exchange's closed 1m candles, with their timeframe and source "aggregate" (the InfluxDB writer stores them
  in `ohlcv` beside the 1m bars, tag `timeframe`);
- mdp:alerts: `candle.reconcile` (warning) when a built 1m candle and the exchange's closed 1m candle for the
  same minute disagree beyond quality.reconcile_price_rel / reconcile_volume_rel, with both values.
The bar logic, and when a bar is emitted, is in services/aggregator/bars.py. Its own higher-timeframe bars
come back to it on md:candle:*; only closed 1m candles not built by it are rolled up.

Restarts: the closed 1m candles of the current UTC day are also kept in a Redis hash per symbol and day
(`mdp:agg:{exchange}:{symbol}:{YYYYMMDD}`, field = open time ns, value = the encoded candle, expiring after 2
days). The first time this process sees a symbol it rebuilds that day's bars in progress from the hash, so a
restart does not turn the 1h/4h/1d bars in progress into incomplete ones. The minute being built from trades
is not kept: after a restart the first built minute of each symbol is partial and skipped.

Atomicity and idempotence: a batch's minutes are written to the hash first (HSET of the same value is
idempotent), then its outputs are published and its inputs acknowledged in one MULTI/EXEC, then the state
staged for the batch is committed (services.validator.series.SeriesBook, as in the validator). A retried
batch sees the same state; a re-emitted bar has the same content, and downstream stores overwrite by open
time. State is bounded: at most quality.max_series symbols in memory (the least recently used is forgotten
and rebuilt from the hash when it comes back), each with 12 bars per timeframe and 120 candles waiting for
reconciliation per side.

Counters: trades, candles_in (not built here), minutes_built, partial_minutes, bars (higher-timeframe bars published), bars_incomplete,
reconciled_ok, reconcile_mismatch, reconcile_skipped, reconcile_expired, late_dropped, trades_late,
trades_redelivered, trades_invalid, recovered_minutes, ignored, symbols, plus the consumer's counters.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from datetime import UTC, datetime

from common import streams
from common.bus import Consumer, Delivery, Outputs, Producer, StreamSelector
from common.config import ConfigError, Settings
from common.quality import iso, text
from common.service import Service
from schemas import Alert, Candle, Event, Trade
from services.aggregator.bars import DAY_NS, SymbolBars, TimeframeError, bar_duration, compare
from services.validator.series import SeriesBook, Staging

log = logging.getLogger(__name__)

GROUP = "aggregator"
INPUT_PATTERNS = ("md:trade:*", "md:candle:*")
KEEP_PERIODS = 12  # bars kept per timeframe (a late minute for one of them re-emits it)
MINUTES_TTL_S = 2 * 86_400
COUNTERS = ("trades", "candles_in", "minutes_built", "partial_minutes", "bars", "bars_incomplete", "reconciled_ok",
            "reconcile_mismatch", "reconcile_skipped", "reconcile_expired", "late_dropped", "trades_late",
            "trades_redelivered", "trades_invalid", "recovered_minutes", "ignored")


def minutes_key(exchange: str, symbol: str, open_time: int) -> str:
    """The Redis hash holding one UTC day's closed 1m candles of a symbol (for restarts)."""
    day = datetime.fromtimestamp(open_time // 1_000_000_000, tz=UTC).strftime("%Y%m%d")
    return f"mdp:agg:{exchange}:{symbol}:{day}"


class Aggregator(Service):
    name = "aggregator"

    def __init__(self, settings: Settings, instance: str | None = None) -> None:
        super().__init__(settings, instance)
        q = settings.quality
        try:
            self.timeframes = {tf: bar_duration(tf) for tf in q.bar_timeframes}
        except TimeframeError as exc:
            raise ConfigError(f"{exc}; fix [quality] bar_timeframes in the config file") from None
        self.price_rel = q.reconcile_price_rel
        self.volume_rel = q.reconcile_volume_rel
        self.book = SeriesBook(q.max_series)
        self.producer = Producer(self.redis, self.codec, settings.bus, source=self.name)
        self.consumer = Consumer(self.redis, self.codec, settings.bus, group=GROUP, name=self.consumer_name,
                                 selector=StreamSelector(patterns=INPUT_PATTERNS), producer=self.producer,
                                 on_acked=self._commit)
        self.count: Counter[str] = Counter(dict.fromkeys(COUNTERS, 0))
        self._staged: Staging | None = None

    def counters(self) -> dict[str, int]:
        s = self.consumer.stats
        return {**self.count, "symbols": len(self.book), "symbols_evicted": self.book.evicted,
                "delivered": s.delivered, "acked": s.acked, "dead_lettered": s.dead_lettered,
                "failures": s.failures}

    async def run(self, stop: asyncio.Event) -> None:
        log.info("aggregator: group %s reads %s; builds 1m from trades, %s from 1m",
                 GROUP, " and ".join(INPUT_PATTERNS), ", ".join(self.timeframes))
        self.state = "running"
        await self.consumer.run(self.handle, stop)

    # -- the handler ----------------------------------------------------------------------------------

    def _commit(self, batch: list[Delivery]) -> None:
        if self._staged is not None:
            self._staged.commit()
            self._staged = None

    async def handle(self, batch: list[Delivery]) -> Outputs:
        now = time.time_ns()
        staging = self.book.stage()
        await self._recover(batch, staging)
        out: dict[str, list[Event]] = {}
        alerts: list[Event] = []
        minutes: list[Candle] = []
        for d in batch:
            for event in d.events:
                if isinstance(event, Trade):
                    self._trade(event, staging, out, alerts, now)
                    continue
                if isinstance(event, Candle) and event.source != "aggregate":
                    self.count["candles_in"] += 1
                    if event.timeframe == "1m" and event.closed:
                        minutes.append(event)
                        self._minute(event, staging, out, alerts, now)
                        continue
                self.count["ignored"] += 1  # open updates, our own bars, other timeframes
        if alerts:
            out[streams.ALERTS] = alerts
        if minutes:
            pipe = self.redis.pipeline(transaction=False)
            for c in minutes:
                key = minutes_key(c.exchange, c.symbol, c.open_time)
                pipe.hset(key, str(c.open_time), self.codec.encode([c]))
                pipe.expire(key, MINUTES_TTL_S)
            await pipe.execute()
        self._staged = staging  # committed by _commit once the bus has published and acknowledged
        return out

    def _bars(self, staging: Staging, exchange: str, symbol: str) -> SymbolBars:
        return staging.get((exchange, symbol, "bars", ""), lambda: SymbolBars(exchange, symbol))

    async def _recover(self, batch: list[Delivery], staging: Staging) -> None:
        """Rebuild, from the minutes hash, the bars in progress of symbols this process has not rebuilt yet."""
        first: dict[tuple[str, str], int] = {}
        for d in batch:
            for e in d.events:
                if isinstance(e, Candle) and e.timeframe == "1m" and e.closed and e.source != "aggregate":
                    first.setdefault((e.exchange, e.symbol), e.open_time)
        for (exchange, symbol), open_time in first.items():
            bars = self._bars(staging, exchange, symbol)
            if bars.recovered:
                continue
            bars.recovered = True
            raw = await self.redis.hgetall(minutes_key(exchange, symbol, open_time))
            day_start = open_time - open_time % DAY_NS
            stored = [c for v in raw.values() for c in self.codec.decode(v)
                      if isinstance(c, Candle) and c.open_time >= day_start]
            for c in sorted(stored, key=lambda c: c.open_time):
                bars.add_minute(c, self.timeframes, KEEP_PERIODS, self.count, emit=False)
            bars.settle_recovered(self.timeframes)
            self.count["recovered_minutes"] += len(stored)
            if stored:
                log.info("rebuilt the bars in progress of %s %s from %d stored minutes", exchange, symbol,
                         len(stored))

    def _trade(self, trade: Trade, staging: Staging, out: dict[str, list[Event]], alerts: list[Event],
               now: int) -> None:
        self.count["trades"] += 1
        bars = self._bars(staging, trade.exchange, trade.symbol)
        was_partial = bars.partial and bars.minute is not None
        built = bars.add_trade(trade, self.count)
        if built is None:
            if was_partial and not bars.partial:
                self.count["partial_minutes"] += 1
            return
        self.count["minutes_built"] += 1
        out.setdefault(streams.candle_built(trade.exchange, trade.symbol), []).append(built)
        self._reconcile(bars.pair_built(built, self.count), alerts, now)

    def _minute(self, candle: Candle, staging: Staging, out: dict[str, list[Event]], alerts: list[Event],
                now: int) -> None:
        bars = self._bars(staging, candle.exchange, candle.symbol)
        produced = bars.add_minute(candle, self.timeframes, KEEP_PERIODS, self.count)
        if produced:
            out.setdefault(streams.market_data("candle", candle.exchange, candle.symbol), []).extend(produced)
            self.count["bars"] += len(produced)
            self.count["bars_incomplete"] += sum("time.gap" in c.quality for c in produced)
        self._reconcile(bars.pair_exchange(candle, self.count), alerts, now)

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
