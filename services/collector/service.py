"""Collector: one process per exchange (or per shard of its symbols), ccxt.pro WebSocket plus REST fallback.

Publishes everything it receives, as received, to `raw:{exchange}` (the validator decides what is good):
- Market: the catalog from `load_markets`, at start.
- Trade: every trade of `watch_trades`, one stream entry per wake-up (FACTS.md: packing is ~1.5x cheaper).
- Candle: `watch_ohlcv` updates as `closed=False`; a candle is published `closed=True` once a later candle
  of the same symbol has been seen (ccxt does not pass on Binance's `x` flag; for exchanges that publish a
  candle every interval this closes each candle within one update of its end).
When a channel's socket yields nothing for `ws_stall_s` (or raises), the collector polls REST `fetch_ohlcv`
every `rest_poll_s` from the last closed candle until the socket delivers again. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from decimal import Decimal
from typing import Any

import ccxt
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from common import streams
from common.bus import Producer
from common.config import ExchangeSettings, Settings
from common.exchanges import make_pro_exchange
from common.service import Service
from schemas import Candle, Event, Market, Trade

log = logging.getLogger(__name__)

MS = 1_000_000
PUBLISH_RETRY_S = 60.0  # how long the collector retries publishing while Redis is down before exiting
SWEEP_S = 0.5  # how often a quiet channel's ccxt cache is swept for updates that arrived between two calls
TIMEFRAME_MS = {"1m": 60_000, "3m": 180_000, "5m": 300_000, "15m": 900_000, "30m": 1_800_000,
                "1h": 3_600_000, "4h": 14_400_000, "1d": 86_400_000}


def dec(value: Any) -> Decimal | None:
    """Exact decimal of a ccxt number: floats via their shortest repr, which restores the exchange's text."""
    if value is None:
        return None
    if isinstance(value, float):
        return Decimal(repr(value))
    try:
        return Decimal(str(value))
    except ArithmeticError:
        return None


def trade_event(exchange: str, symbol: str, t: dict[str, Any], ts_recv: int) -> Trade:
    ts = t.get("timestamp")
    return Trade(exchange=exchange, symbol=t.get("symbol") or symbol, trade_id=str(t.get("id") or ""),
                 price=dec(t.get("price")), amount=dec(t.get("amount")),
                 side=t.get("side") if t.get("side") in ("buy", "sell") else None,
                 ts_event=int(ts) * MS if ts is not None else 0, ts_recv=ts_recv)


def candle_event(exchange: str, symbol: str, timeframe: str, row: list[Any], closed: bool, ts_recv: int,
                 source: str) -> Candle:
    open_ms = row[0] if row and row[0] is not None else None
    values = [dec(v) for v in (list(row[1:6]) + [None] * 5)[:5]]
    open_time = int(open_ms) * MS if open_ms is not None else 0
    close_ms = (int(open_ms) + TIMEFRAME_MS.get(timeframe, 0) - 1) if open_ms is not None else 0
    return Candle(exchange=exchange, symbol=symbol, timeframe=timeframe, open_time=open_time,
                  open=values[0], high=values[1], low=values[2], close=values[3], volume=values[4],
                  closed=closed, ts_event=close_ms * MS if closed else ts_recv, ts_recv=ts_recv,
                  source=source)  # type: ignore[arg-type]


def market_event(exchange: str, m: dict[str, Any], ts: int) -> Market:
    precision = m.get("precision") or {}
    return Market(exchange=exchange, symbol=m["symbol"], exchange_symbol=str(m.get("id") or ""),
                  base=str(m.get("base") or ""), quote=str(m.get("quote") or ""),
                  market_type=str(m.get("type") or ""), active=m.get("active"),
                  contract_size=dec(m.get("contractSize")), price_precision=dec(precision.get("price")),
                  amount_precision=dec(precision.get("amount")), ts_event=ts, ts_recv=ts)


def cache_tail(cache: list[dict[str, Any]] | None, seen: dict[str, None]) -> list[dict[str, Any]]:
    """The trades at the end of a ccxt trade cache that come after the last one already seen."""
    if not cache:
        return []
    tail = []
    for t in reversed(cache):
        if str(t.get("id")) in seen:
            break
        tail.append(t)
    tail.reverse()
    return tail


class SymbolState:
    """Per-symbol memory of what was published, so reconnects and REST polls never publish twice."""

    def __init__(self) -> None:
        self.last_trade_ms = -1
        self.recent_trade_ids: dict[str, None] = {}
        self.last_candle: list[Any] | None = None
        self.last_closed_open_ms = -1

    def new_trades(self, trades: list[dict[str, Any]]) -> list[dict[str, Any]]:
        fresh = []
        for t in trades:
            tid = str(t.get("id"))
            ts = t.get("timestamp") or 0
            if tid in self.recent_trade_ids or ts < self.last_trade_ms:
                continue
            fresh.append(t)
            self.recent_trade_ids[tid] = None
            self.last_trade_ms = max(self.last_trade_ms, ts)
        while len(self.recent_trade_ids) > 10_000:  # bounded: ids older than the last 10k are not re-sent
            del self.recent_trade_ids[next(iter(self.recent_trade_ids))]
        return fresh


async def _sleep(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    except TimeoutError:
        pass


class Collector(Service):
    name = "collector"

    def __init__(self, settings: Settings, instance: str | None = None, exchange: str = "binance",
                 shard: str | None = None) -> None:
        self.exchange_settings: ExchangeSettings = settings.exchange(exchange)
        super().__init__(settings, instance)
        self.instance = f"{exchange}-{self.instance}"
        self.exchange_id = exchange
        self.symbols = self._shard(self.exchange_settings.symbols, shard)
        self.producer = Producer(self.redis, self.codec, settings.bus, source=f"collector:{exchange}")
        self.stream = streams.raw(exchange)
        self.state_by_symbol = {s: SymbolState() for s in self.symbols}
        self.count: dict[str, int] = {"trades": 0, "candle_updates": 0, "candles_closed": 0, "rest_polls": 0,
                                      "reconnects": 0, "markets": 0, "errors": 0, "publish_retries": 0}
        self.ws_alive: dict[str, float] = {}

    @staticmethod
    def _shard(symbols: list[str], shard: str | None) -> list[str]:
        """`--shard i/n` keeps the symbols whose stable index falls in shard i of n."""
        if not shard:
            return list(symbols)
        try:
            i, n = (int(x) for x in shard.split("/"))
            assert 0 <= i < n
        except (ValueError, AssertionError):
            raise SystemExit(f"--shard {shard!r} must be i/n with 0 <= i < n, e.g. 0/2") from None
        import zlib
        return [s for s in symbols if zlib.crc32(s.encode()) % n == i]

    def counters(self) -> dict[str, int]:
        return dict(self.count) | {"published_events": self.producer.published_events,
                                   "published_entries": self.producer.published_entries}

    async def publish(self, events: list[Event]) -> None:
        """Publish to raw:{exchange}; while Redis is unreachable retry with backoff for up to
        PUBLISH_RETRY_S (meanwhile ccxt keeps receiving into its caches, bounded by tradesLimit/OHLCVLimit),
        then fail the process so supervisord restarts it and the outage shows in its log and status."""
        if not events:
            return
        deadline = time.monotonic() + PUBLISH_RETRY_S
        delay = 0.2
        while True:
            try:
                await self.producer.publish({self.stream: events})
                if self.state == "degraded":
                    self.state, self.detail = "running", ""
                return
            except (RedisConnectionError, RedisTimeoutError) as exc:
                if time.monotonic() > deadline:
                    raise
                self.state, self.detail = "degraded", f"Redis unreachable: {exc}"
                self.count["publish_retries"] += 1
                log.error("cannot publish %d events to %s (%s); retrying in %.1f s", len(events), self.stream,
                          exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def run(self, stop: asyncio.Event) -> None:
        exchange = make_pro_exchange(self.exchange_settings)
        try:
            log.info("collector %s: symbols %s, channels %s, REST %s, WS %s", self.exchange_id, self.symbols,
                     self.exchange_settings.channels, self.exchange_settings.rest_url or "(live)",
                     self.exchange_settings.ws_url or "(live)")
            await self._load_markets(exchange, stop)
            if stop.is_set():
                return
            self.state = "running"
            tasks = []
            for symbol in self.symbols:
                if "trades" in self.exchange_settings.channels:
                    tasks.append(asyncio.create_task(self._trades_loop(exchange, symbol, stop)))
                if "candles" in self.exchange_settings.channels:
                    tasks.append(asyncio.create_task(self._candles_loop(exchange, symbol, stop)))
            stopped = asyncio.create_task(stop.wait())
            done, _ = await asyncio.wait([stopped, *tasks], return_when=asyncio.FIRST_COMPLETED)
            for t in [stopped, *tasks]:
                t.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            for r in results:
                if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError):
                    raise r  # a channel loop crashed: exit non-zero so supervisord restarts us
        finally:
            await exchange.close()

    async def _load_markets(self, exchange: Any, stop: asyncio.Event) -> None:
        delay = 1.0
        while not stop.is_set():
            try:
                markets = await asyncio.wait_for(exchange.load_markets(), timeout=30)
                break
            except (ccxt.NetworkError, ccxt.ExchangeError, TimeoutError) as exc:
                self.count["errors"] += 1
                self.detail = f"load_markets failed: {exc}"
                log.error("load_markets on %s failed (%s: %s); retrying in %.0f s", self.exchange_id,
                          type(exc).__name__, exc, delay)
                try:
                    await asyncio.wait_for(stop.wait(), timeout=delay)
                except TimeoutError:
                    pass
                delay = min(delay * 2, 60)
        else:
            return
        missing = [s for s in self.symbols if s not in markets]
        if missing:
            raise SystemExit(f"symbols {missing} are not markets of {self.exchange_id}; "
                             f"fix exchanges[{self.exchange_id}].symbols in the config")
        self.detail = ""
        now = time.time_ns()
        events: list[Event] = [market_event(self.exchange_id, m, now) for m in markets.values()]
        await self.publish(events)
        self.count["markets"] = len(events)
        log.info("published %d markets of %s", len(events), self.exchange_id)

    async def _backoff(self, stop: asyncio.Event, attempt: int) -> None:
        delay = min(30.0, 0.5 * 2 ** min(attempt, 6)) * (0.5 + random.random())
        try:
            await asyncio.wait_for(stop.wait(), timeout=delay)
        except TimeoutError:
            pass

    async def _trades_loop(self, exchange: Any, symbol: str, stop: asyncio.Event) -> None:
        state = self.state_by_symbol[symbol]
        failures = 0
        last_message = time.monotonic()
        stalled = False
        while not stop.is_set():
            try:
                await asyncio.wait_for(exchange.watch_trades(symbol), timeout=SWEEP_S)
                last_message = time.monotonic()
                stalled = False
            except TimeoutError:
                if not stalled and time.monotonic() - last_message > self.exchange_settings.ws_stall_s:
                    stalled = True
                    log.warning("no trade from %s %s for %.0f s", self.exchange_id, symbol,
                                self.exchange_settings.ws_stall_s)
            except (ccxt.NetworkError, ccxt.ExchangeError) as exc:
                failures += 1
                self.count["reconnects"] += 1
                log.warning("trades socket of %s %s failed (%s: %s); reconnecting", self.exchange_id, symbol,
                            type(exc).__name__, exc)
                await self._backoff(stop, failures)
                continue
            else:
                failures = 0
            await self._publish_trades(exchange, symbol, state)

    async def _publish_trades(self, exchange: Any, symbol: str, state: SymbolState) -> None:
        """Publish what ccxt's trade cache holds beyond what we published.

        ccxt.pro signals only messages that arrive while a watch_* call waits; one arriving between two calls
        sits in the cache until the next message. Reading the cache's tail picks it up at once.
        """
        ts_recv = time.time_ns()
        fresh = state.new_trades(cache_tail(exchange.trades.get(symbol) if exchange.trades else None,
                                            state.recent_trade_ids))
        if fresh:
            await self.publish([trade_event(self.exchange_id, symbol, t, ts_recv) for t in fresh])
            self.count["trades"] += len(fresh)

    async def _candles_loop(self, exchange: Any, symbol: str, stop: asyncio.Event) -> None:
        tf = self.exchange_settings.timeframe
        failures = 0
        last_message = time.monotonic()
        while not stop.is_set():
            try:
                rows = await asyncio.wait_for(exchange.watch_ohlcv(symbol, tf), timeout=SWEEP_S)
                failures = 0
                last_message = time.monotonic()
                await self._on_candles(symbol, rows, "ws")
                continue
            except TimeoutError:
                cached = (exchange.ohlcvs or {}).get(symbol, {}).get(tf)
                if cached:  # updates that arrived between two watch calls (see _publish_trades)
                    await self._on_candles(symbol, list(cached[-2:]), "ws")
                if time.monotonic() - last_message < self.exchange_settings.ws_stall_s:
                    continue
                log.warning("no candle from %s %s for %.0f s; polling REST", self.exchange_id, symbol,
                            time.monotonic() - last_message)
            except (ccxt.NetworkError, ccxt.ExchangeError) as exc:
                failures += 1
                self.count["reconnects"] += 1
                log.warning("candles socket of %s %s failed (%s: %s); polling REST until it is back",
                            self.exchange_id, symbol, type(exc).__name__, exc)
            await self._poll_rest(exchange, symbol, stop)
            await self._backoff(stop, failures) if failures else await _sleep(stop, self.exchange_settings.rest_poll_s)

    async def _poll_rest(self, exchange: Any, symbol: str, stop: asyncio.Event) -> None:
        state = self.state_by_symbol[symbol]
        tf = self.exchange_settings.timeframe
        since = state.last_closed_open_ms + TIMEFRAME_MS[tf] if state.last_closed_open_ms >= 0 else None
        self.count["rest_polls"] += 1
        try:
            rows = await asyncio.wait_for(exchange.fetch_ohlcv(symbol, tf, since=since, limit=1000), timeout=30)
        except (ccxt.NetworkError, ccxt.ExchangeError, TimeoutError) as exc:
            self.count["errors"] += 1
            log.error("REST fetch_ohlcv %s %s failed (%s: %s)", self.exchange_id, symbol, type(exc).__name__, exc)
            return
        await self._on_candles(symbol, rows, "rest")

    async def _on_candles(self, symbol: str, rows: list[list[Any]], source: str) -> None:
        state = self.state_by_symbol[symbol]
        tf = self.exchange_settings.timeframe
        ts_recv = time.time_ns()
        events: list[Event] = []
        updated = False
        for row in rows:
            if not row or any(v is None for v in row[:6]):
                # A malformed exchange body: pass it on as received; the validator rejects it with an alert.
                events.append(candle_event(self.exchange_id, symbol, tf, list(row or []), True, ts_recv, source))
                continue
            open_ms = int(row[0])
            if open_ms <= state.last_closed_open_ms:
                continue  # already published as closed
            last = state.last_candle
            if last is not None and open_ms > last[0]:
                events.append(candle_event(self.exchange_id, symbol, tf, last, True, ts_recv, source))
                state.last_closed_open_ms = last[0]
                self.count["candles_closed"] += 1
            if last is None or open_ms > last[0] or (open_ms == last[0] and list(row[:6]) != last[:6]):
                state.last_candle = list(row)
                updated = True
        if updated and state.last_candle is not None:
            events.append(candle_event(self.exchange_id, symbol, tf, state.last_candle, False, ts_recv, source))
            self.count["candle_updates"] += 1
        await self.publish(events)
