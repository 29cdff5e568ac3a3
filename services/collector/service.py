"""Collector: one process per exchange (or per shard of its symbols), ccxt.pro WebSocket plus REST.

Publishes everything it receives, as received, to `raw:{exchange}` (the validator decides what is good):
- Market: the catalog from `load_markets`, at start.
- Trade: every trade of `watch_trades`, one stream entry per wake-up (FACTS.md: packing is ~1.5x cheaper).
- Candle: `watch_ohlcv` updates as `closed=False`; a candle is published `closed=True` once a later candle
  of the same symbol has been seen (ccxt does not pass on Binance's `x` flag; for exchanges that publish a
  candle every interval this closes each candle within one update of its end). While the candle socket is
  quiet for `ws_stall_s` (or down) it polls REST `fetch_ohlcv` every `rest_poll_s` from the last closed candle.
- Ticker, OrderBook (bounded, throttled, never crossed), FundingRate, OpenInterest: see feeds.py.

Resilience (docs/collector.md):
- Every wait is bounded: each `watch_*` waits at most SWEEP_S, then the feed sweeps ccxt's caches and the
  stall watchdog checks the channel's last message; REST calls are bounded by `rest_timeout_s`.
- A channel that fails (ccxt raises) reconnects after a capped exponential backoff with jitter; one that
  stays silent for its `stall_s` is reconnected by closing its ccxt connection (a server that stalls while
  answering pings would otherwise hang `watch_*` forever). Binance's 24 h forced disconnect is one such
  failure.
- Every break marks an outage on each channel it touched (also when ccxt's connection closes while no task
  was waiting: the close hook); the first message afterwards publishes a `Gap` to `mdp:gaps` with the
  window [exchange time of the last message before, exchange time of the first after] and, for trades, the
  last trade id seen (`last_trade_id=` in its reason), for services/gap_repair to fill from REST.
- (Re)subscriptions are paced at `subscribe_per_s` across the process, so hundreds of symbols start (and
  reconnect) without tripping the exchange's WebSocket message/connection limits.
- REST (markets, candle polls, order-book snapshots ccxt fetches, polled channels) spends the exchange's
  shared budget in Redis (common/exchanges/ratelimit.py); a 418 stops every REST call to the exchange for the ban.

Publishing (docs/collector.md, "Stops, restarts and Redis outages"): feeds put each wake-up's events in a
bounded outbox (outbox.py) and never wait for Redis; one publisher task sends it with each feed's position
(`mdp:collector:pos:{exchange}`) in one MULTI/EXEC. A trade counts as published only after that succeeded.
At start each feed opens an outage from its stored position (the restart's Gap); SIGTERM drains the outbox
for at most DRAIN_S; while Redis is down the state is degraded and the outbox's overflow becomes a Gap.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import zlib
from collections import Counter, deque
from collections.abc import Sequence
from typing import Any, Literal

import ccxt
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from common.bus import streams
from common.bus.core import Producer, sleep_unless
from common.bus.stage import Service
from common.config import ExchangeSettings, Settings
from common.exchanges.clients import make_pro_exchange
from common.exchanges.events import TIMEFRAME_MS, candle_event, dec, trade_event
from common.exchanges.ratelimit import BudgetedExchange, ExchangeBanned, RateBudget, limit_for
from schemas import Alert, Candle, Event, Gap, Trade
from services.collector.events import market_event
from services.collector.feeds import (
    ChannelStats,
    Feed,
    Outage,
    PolledFeed,
    TradesFeed,
    cache_tail,
    crossed_alert,
    plan_feeds,
)
from services.collector.outbox import Batch, Dropped, Outbox, Position, position_field, position_key

__all__ = ["Collector", "SymbolState", "backoff_delay", "cache_tail", "candle_event", "dec", "market_event",
           "trade_event"]

log = logging.getLogger(__name__)

DRAIN_S = 8.0  # at SIGTERM: how long the outbox may take to publish (service.main cancels us after 10 s)
PUBLISH_BACKOFF_S, PUBLISH_BACKOFF_MAX_S = 0.2, 5.0  # retrying a publish while Redis is down
REDIS_DOWN = (RedisConnectionError, RedisTimeoutError)
SWEEP_S = 0.5  # the longest single wait on a socket: then caches are swept and the watchdog looks
MS = 1_000_000
# OperationFailed (NetworkError's parent): Binance's -1001 "Internal error; try again", sent with a 5xx, maps
# there in ccxt 4.5.90; it is transient like a NetworkError and must be retried, not crash the feed.
ERRORS = (ccxt.OperationFailed, ccxt.ExchangeError, ExchangeBanned)


def backoff_delay(attempt: int, base_s: float, cap_s: float, rng: random.Random | None = None) -> float:
    """Seconds before reconnect attempt `attempt` (1, 2, ...): base * 2^(attempt-1), capped, with "equal
    jitter" (half fixed, half random) so reconnecting processes spread out yet never retry at once."""
    ceiling = min(cap_s, base_s * 2 ** min(max(attempt - 1, 0), 30))
    return ceiling / 2 + (rng or random).random() * ceiling / 2


def book_snapshot_weight(exchange_id: str, limit: int) -> int:
    """Request weight of the REST depth snapshot ccxt fetches to build a book (Binance's published tables)."""
    if exchange_id == "binance":
        return 5 if limit <= 100 else 25 if limit <= 500 else 50 if limit <= 1000 else 250
    if exchange_id == "binanceusdm":
        return 2 if limit <= 50 else 5 if limit <= 100 else 10 if limit <= 500 else 20
    return 1


class Pacer:
    """Spaces (re)subscriptions at most `per_s` a second across the process (slots handed out in order)."""

    def __init__(self, per_s: float) -> None:
        self.interval = 1.0 / per_s
        self.next_slot = 0.0
        self.granted = 0

    async def wait(self, stop: asyncio.Event) -> None:
        now = time.monotonic()
        slot = max(now, self.next_slot)
        self.next_slot = slot + self.interval
        self.granted += 1
        if slot > now:
            await sleep_exact(stop, slot - now)


async def sleep_exact(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    except TimeoutError:
        pass


class SymbolState:
    """Per-symbol memory of what was published, so reconnects and REST polls never publish twice.

    A trade taken from ccxt is `taken` until its XADD succeeded (then it joins the published memory) or it was
    dropped at the outbox's bound (then a Gap names it): `new_trades` never hands it out twice meanwhile, and a
    failed publish retries the same trades from the outbox."""

    TRADE_ID_MEMORY = 10_000

    def __init__(self) -> None:
        self.forgotten_trade_ms = -1  # newest exchange time of a trade whose id fell out of the memory
        self.recent_trade_ids: dict[str, int] = {}  # published: id -> exchange time (ms)
        self._order: deque[str] = deque()  # the same ids, oldest first (O(1) eviction)
        self.taken: set[str] = set()  # taken from ccxt, not yet published (in the outbox or in flight)
        self.last_candle: list[Any] | None = None
        self.last_closed_open_ms = -1

    def __contains__(self, trade_id: object) -> bool:
        return trade_id in self.recent_trade_ids or trade_id in self.taken

    def new_trades(self, trades: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The trades neither published nor taken yet, by id; they are taken now. A trade older than the ids
        still remembered (the last TRADE_ID_MEMORY) counts as published: a resubscribe snapshot may re-send
        it. Exchange time is not otherwise a filter: a reordered message, or an exchange clock stepping back,
        must not drop trades."""
        fresh = []
        for t in trades:
            tid = str(t.get("id"))
            ts = t.get("timestamp") or 0
            if tid in self or ts < self.forgotten_trade_ms:
                continue
            fresh.append(t)
            self.taken.add(tid)
        return fresh

    def settle(self, trades: list[tuple[str, int]]) -> None:
        """(id, exchange time ms) of trades whose XADD succeeded, or that were dropped and named by a Gap."""
        for tid, ts in trades:
            self.taken.discard(tid)
            if tid not in self.recent_trade_ids:
                self.recent_trade_ids[tid] = ts
                self._order.append(tid)
        while len(self._order) > self.TRADE_ID_MEMORY:  # bounded
            oldest = self._order.popleft()
            self.forgotten_trade_ms = max(self.forgotten_trade_ms, self.recent_trade_ids.pop(oldest))

    def resume_after(self, position: Position) -> None:
        """A previous process published up to `position`: trades older than it are not published again."""
        self.forgotten_trade_ms = max(self.forgotten_trade_ms, position.ts_event // MS)
        if position.trade_id:
            self.settle([(position.trade_id, position.ts_event // MS)])


class Collector(Service):
    name = "collector"

    def __init__(self, settings: Settings, instance: str | None = None, exchange: str = "binance",
                 shard: str | None = None, idle_unless_configured: bool = False) -> None:
        self.exchange_settings: ExchangeSettings = settings.exchange(exchange)
        super().__init__(settings, instance)
        self.instance = f"{exchange}-{self.instance}"
        self.exchange_id = exchange
        self.symbols = self._shard(self.exchange_settings.symbols, shard)
        self.producer = Producer(self.redis, self.codec, settings.bus, source=f"collector:{exchange}")
        self.stream = streams.raw(exchange)
        self.state_by_symbol = {s: SymbolState() for s in self.symbols}
        self.count: Counter[str] = Counter({k: 0 for k in (
            "trades", "candle_updates", "candles_closed", "rest_polls", "reconnects", "stalls", "markets",
            "errors", "publish_retries", "gaps", "books", "books_crossed", "book_resyncs", "rest_held",
            "sequence_gaps", "positions_lost", "candles_stale_dropped")})
        self.outbox = Outbox(self.exchange_settings.publish_buffer_events)
        self.outbox_ready = asyncio.Event()
        self.published_pos: dict[tuple[str, str], Position] = {}  # (channel, symbol) -> as stored in Redis
        self.redis_down_since = 0.0  # monotonic; 0 while publishing works
        self.pacer = Pacer(self.exchange_settings.subscribe_per_s)
        self.feeds: list[Feed] = []
        self.polled: list[PolledFeed] = []
        self.exchange: Any = None
        self.rest: BudgetedExchange | None = None

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
        return [s for s in symbols if zlib.crc32(s.encode()) % n == i]

    # -- status -----------------------------------------------------------------------------------------

    def counters(self) -> dict[str, int]:
        """Headline counters plus, per channel, `channel.{c}.messages`, `.gaps`, `.last_ms` (wall clock of the
        newest message of any symbol) and `.oldest_ms` (of the symbol heard from longest ago): `mdp status`
        turns them into each channel's rate and last-message age."""
        out = dict(self.count) | {"published_events": self.producer.published_events,
                                  "published_entries": self.producer.published_entries,
                                  "subscriptions": self.pacer.granted, "buffered_events": self.outbox.events,
                                  "buffer_dropped": self.outbox.dropped_events}
        if self.rest is not None:
            out["rest_requests"] = self.rest.stats.requests
            out["rest_429"] = self.rest.stats.throttled_429
            out["rest_418"] = self.rest.stats.banned_418
        per: dict[str, list[ChannelStats]] = {}
        all_feeds: list[Feed | PolledFeed] = [*self.feeds, *self.polled]
        for feed in all_feeds:
            for channel, stats in feed.stats.items():
                per.setdefault(channel, []).append(stats)
        for channel, all_stats in per.items():
            out[f"channel.{channel}.messages"] = sum(s.messages for s in all_stats)
            out[f"channel.{channel}.gaps"] = sum(s.gaps for s in all_stats)
            out[f"channel.{channel}.last_ms"] = max(s.last_recv_ms for s in all_stats)
            out[f"channel.{channel}.oldest_ms"] = min(s.last_recv_ms for s in all_stats)
        return out

    # -- publishing -------------------------------------------------------------------------------------

    async def publish(self, events: Sequence[Event], gaps: list[Event] | None = None, symbol: str = "",
                      channel: str = "", position: Position | None = None) -> None:
        """Queue events for raw:{exchange} (and Gaps for mdp:gaps) in the outbox; the publisher task sends
        them. Never waits for Redis: while it is down, feeds keep reading their sockets into the bounded
        outbox (`publish_buffer_events`; at the bound the oldest batches become a Gap, see outbox.py)."""
        if not events and not gaps:
            return
        ids = [e.trade_id for e in events if isinstance(e, Trade)] if channel == "trades" else []
        self.outbox.put(Batch(symbol, channel, list(events), list(gaps or []), ids, position))
        self._settle_dropped()
        self.outbox_ready.set()

    async def emit(self, feed: Feed, channel: str, events: Sequence[Event], first_ns: int, last_ns: int,
                   last_id: str = "", first_id: str = "", ends_outage: bool = True) -> None:
        """Publish a channel's events; the first message after an outage also publishes its Gap (unless
        `ends_outage` is False: messages ccxt had received before the break)."""
        stats = feed.stats[channel]
        gaps: list[Event] = []
        if stats.outage is not None and ends_outage:
            gaps.append(self._gap(feed.symbol, channel, stats.outage, first_ns, first_id))
            stats.outage = None
            stats.gaps += 1
            self.count["gaps"] += 1
        stats.messages += 1
        stats.last_recv_ms = time.time_ns() // MS
        stats.last_event_ns = max(stats.last_event_ns, last_ns)
        if last_id:
            stats.last_id = last_id
        position = Position(stats.last_event_ns, stats.last_id if channel == "trades" else "", time.time_ns())
        await self.publish(events, gaps, feed.symbol, channel, position)

    def _settle_dropped(self) -> None:
        """Trades dropped at the outbox's bound are named by a Gap: never taken from ccxt again."""
        if not self.outbox.dropped_trades:
            return
        by_symbol: dict[str, list[tuple[str, int]]] = {}
        for symbol, tid, ms in self.outbox.dropped_trades:
            by_symbol.setdefault(symbol, []).append((tid, ms))
        self.outbox.dropped_trades = []
        for symbol, trades in by_symbol.items():
            self.state_by_symbol[symbol].settle(trades)

    # -- the publisher ----------------------------------------------------------------------------------

    async def _publisher(self, draining: asyncio.Event) -> None:
        """Publish the outbox, oldest first, each round in one MULTI/EXEC with the feeds' new positions (so a
        position never claims more than the stream holds). A Redis that is down is retried with capped
        backoff, the same batches first; the state is `degraded` with the reason meanwhile. Returns once
        `draining` is set and the outbox is empty."""
        delay = PUBLISH_BACKOFF_S
        recheck = False
        limit = max(self.settings.bus.batch_max_events * 20, 1)
        while True:
            if not self.outbox.queued and not self.outbox.notices and not self.outbox.dropped:
                if draining.is_set():
                    return
                self.outbox_ready.clear()
                try:
                    async with asyncio.timeout(SWEEP_S):
                        await self.outbox_ready.wait()
                except TimeoutError:
                    pass
                continue
            batches = self.outbox.take(limit)
            notices, dropped = self.outbox.take_notices()
            try:
                if recheck:  # Redis is back: did it keep what we published before it went away?
                    notices = [*await self._lost_while_down(), *notices]
                    recheck = False
                await self._publish_round(batches, notices, dropped)
            except REDIS_DOWN as exc:
                self.outbox.give_back(batches, notices, dropped)
                self._settle_dropped()
                recheck = True
                self._redis_down(exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, PUBLISH_BACKOFF_MAX_S)
                continue
            except BaseException:
                self.outbox.give_back(batches, notices, dropped)  # cancelled at the end of a drain: logged
                raise
            delay = PUBLISH_BACKOFF_S
            if self.redis_down_since and not self.outbox.queued:
                log.info("Redis is back after %.1f s; the buffered events are published",
                         time.monotonic() - self.redis_down_since)
                self.redis_down_since = 0.0
                self.state, self.detail = "running", ""

    async def _publish_round(self, batches: list[Batch], notices: list[Event], dropped: list[Dropped]) -> None:
        events = [e for b in batches for e in b.events]
        gaps = [*notices, *(g for b in batches for g in b.gaps)]
        alerts: list[Event] = []
        for run in dropped:
            gap, alert = self._dropped_gap(run)
            if run.channel:  # not the market catalog or an alert: a feed's window
                gaps.append(gap)
            alerts.append(alert)
        positions: dict[tuple[str, str], Position] = {}
        for b in batches:
            if b.position is not None:
                positions[(b.channel, b.symbol)] = b.position
        key = position_key(self.exchange_id)
        fields = {position_field(c, s): p.encode() for (c, s), p in positions.items()}

        def record_positions(pipe: Any) -> None:
            if fields:
                pipe.hset(key, mapping=fields)

        outputs: dict[str, list[Event]] = {self.stream: events, streams.GAPS: gaps, streams.ALERTS: alerts}
        await self.producer.publish(outputs, extra=record_positions)
        for b in batches:
            if b.trade_ids:
                self.state_by_symbol[b.symbol].settle(
                    [(e.trade_id, e.ts_event // MS) for e in b.events if isinstance(e, Trade)])
        for k, p in positions.items():
            self.published_pos[k] = p

    def _redis_down(self, exc: BaseException, delay: float) -> None:
        now = time.monotonic()
        if not self.redis_down_since:
            self.redis_down_since = now
        self.count["publish_retries"] += 1
        self.state = "degraded"
        self.detail = (f"Redis unreachable for {now - self.redis_down_since:.0f} s ({type(exc).__name__}: {exc}); "
                       f"{self.outbox.events} events buffered (bound publish_buffer_events="
                       f"{self.outbox.limit}), {self.outbox.dropped_events} dropped so far as Gaps")
        log.error("cannot publish to %s: %s; retrying in %.1f s", self.stream, self.detail, delay)

    def _dropped_gap(self, run: Dropped) -> tuple[Gap, Alert]:
        """The Gap and the alert for a run of batches dropped at the outbox's bound while Redis was down."""
        now = time.time_ns()
        reason = (f"dropped at the collector's bound: {run.events} {run.channel} events taken from the exchange "
                  f"while Redis was unreachable did not fit in publish_buffer_events={self.outbox.limit}")
        first_missing = last_missing = ""
        if run.first_id:
            reason += f"; trade ids {run.first_id}..{run.last_id} dropped"
            sequential = self.exchange_id in self.settings.quality.sequential_trade_ids
            if sequential and run.first_id.isdigit() and run.last_id.isdigit():
                reason += f"; trade ids {run.first_id}..{run.last_id} missing"
                first_missing, last_missing = run.first_id, run.last_id
        log.error("gap in %s %s %s from %d to %d: %s", self.exchange_id, run.symbol, run.channel, run.first_ns,
                  run.last_ns, reason)
        gap = Gap(exchange=self.exchange_id, symbol=run.symbol, channel=run.channel, start=run.first_ns,
                  end=run.last_ns + 1, reason=reason, ts_event=now, ts_recv=now, first_missing_id=first_missing,
                  last_missing_id=last_missing)
        alert = Alert(rule="collector.buffer_overflow", severity="error", source=f"collector:{self.exchange_id}",
                      exchange=self.exchange_id, symbol=run.symbol, kind=run.channel,
                      reason=reason + "; raise publish_buffer_events or restore Redis sooner (a Gap is on mdp:gaps)",
                      values={"dropped_events": str(run.events), "first_trade_id": run.first_id,
                              "last_trade_id": run.last_id, "limit": str(self.outbox.limit)},
                      ts_event=now, ts_recv=now)
        return gap, alert

    async def _lost_while_down(self) -> list[Event]:
        """Gaps for what Redis lost of what we had published (it restarted from an older AOF or snapshot, or
        empty): the position it holds per feed, written with the XADDs, is behind ours."""
        stored = await self._read_positions()
        gaps: list[Event] = []
        now = time.time_ns()
        for (channel, symbol), ours in self.published_pos.items():
            theirs = stored.get((channel, symbol))
            if theirs is not None and theirs.ts_event >= ours.ts_event and theirs.trade_id == ours.trade_id:
                continue
            self.count["positions_lost"] += 1
            self.count["gaps"] += 1
            start = theirs.ts_event if theirs else self.started_at  # gone: all this process published
            reason = (f"Redis lost published data: its position for {channel} {symbol} is {theirs or 'gone'}, "
                      f"we had published up to {ours}")
            first_missing = last_missing = ""
            if theirs and theirs.trade_id.isdigit() and ours.trade_id.isdigit() and \
                    self.exchange_id in self.settings.quality.sequential_trade_ids:
                first_missing, last_missing = str(int(theirs.trade_id) + 1), ours.trade_id
                reason += f"; trade ids {first_missing}..{last_missing} missing"
            log.error("gap in %s %s %s from %d to %d: %s", self.exchange_id, symbol, channel, start,
                      ours.ts_event, reason)
            gaps.append(Gap(exchange=self.exchange_id, symbol=symbol, channel=channel, start=start,
                            end=max(ours.ts_event + 1, start), reason=reason, ts_event=now, ts_recv=now,
                            first_missing_id=first_missing, last_missing_id=last_missing))
        return gaps

    async def _read_positions(self) -> dict[tuple[str, str], Position]:
        raw = await self.redis.hgetall(position_key(self.exchange_id))
        out: dict[tuple[str, str], Position] = {}
        for f, v in raw.items():
            channel, _, symbol = (f.decode() if isinstance(f, bytes) else f).partition(":")
            out[(channel, symbol)] = Position.decode(v)
        return out

    def _gap(self, symbol: str, channel: str, outage: Outage, end_ns: int, first_id: str = "") -> Gap:
        reason = outage.reason
        first_missing = last_missing = ""
        if channel == "trades" and outage.last_id:
            reason += f"; last_trade_id={outage.last_id}"
            if first_id:
                reason += f", first_trade_id_after={first_id}"
            sequential = self.exchange_id in self.settings.quality.sequential_trade_ids
            if sequential and outage.last_id.isdigit() and first_id.isdigit():
                # the ids services/gap_repair fetches by id (its `trade ids A..B missing` form)
                lo, hi = int(outage.last_id) + 1, int(first_id) - 1
                reason += f"; trade ids {lo}..{hi} missing" if hi >= lo else "; no trade id missing"
                if hi >= lo:
                    first_missing, last_missing = str(lo), str(hi)
        now = time.time_ns()
        log.warning("gap in %s %s %s from %d to %d (%.3f s): %s", self.exchange_id, symbol, channel,
                    outage.start_ns, end_ns, (end_ns - outage.start_ns) / 1e9, reason)
        return Gap(exchange=self.exchange_id, symbol=symbol, channel=channel, start=outage.start_ns,
                   end=max(end_ns, outage.start_ns), reason=reason, ts_event=now, ts_recv=now,
                   first_missing_id=first_missing, last_missing_id=last_missing)

    def mark_outage(self, feed: Feed, reason: str) -> None:
        """Open an outage on each channel of `feed` (an open one keeps its start: one Gap per window)."""
        held = feed.position()
        for stats in feed.stats.values():
            if stats.outage is None:
                start, last_id = stats.last_event_ns or feed.started_ns, stats.last_id
                if held is not None and held[0] >= start:
                    start, last_id = held[0], held[1] or last_id
                stats.outage = Outage(start_ns=start, reason=reason, last_id=last_id)

    # -- connections ------------------------------------------------------------------------------------

    def _needles(self, symbol: str) -> set[str]:
        """Strings that name `symbol` in ccxt's subscription keys ('btcusdt@trade', 'trade:BTC/USDC:USDC')."""
        market = (self.exchange.markets or {}).get(symbol) or {}
        needles = {symbol}
        for key in ("id", "lowercaseId"):
            value = str(market.get(key) or "")
            if len(value) >= 4:
                needles.add(value)
        return needles

    def _carries(self, client: Any, feed: Feed, by_hint: bool) -> bool:
        """Whether ccxt connection `client` carries `feed`: a subscription key names its symbol (and, with
        `by_hint`, its channel)."""
        keys = [str(k).lower() for k in (getattr(client, "subscriptions", None) or {})]
        needles = [n.lower() for n in self._needles(feed.symbol)]
        return any(any(n in k for n in needles) and (not by_hint or any(h in k for h in feed.hints))
                   for k in keys)

    def _feeds_on(self, client: Any) -> list[Feed]:
        """The feeds a connection carries: matched by symbol and channel, else by symbol, else (cannot
        tell) every feed of the process."""
        for by_hint in (True, False):
            hit = [f for f in self.feeds if self._carries(client, f, by_hint)]
            if hit:
                return hit
        return list(self.feeds)

    def drop_connections(self, feed: Feed, reason: str) -> int:
        """Close the ccxt connection(s) carrying `feed` (matched like `_feeds_on`; all when none can be told
        apart), so the next watch call reconnects and resubscribes. Returns how many were closed."""
        clients = list((self.exchange.clients or {}).values())
        chosen: list[Any] = []
        for by_hint in (True, False):
            chosen = [c for c in clients if self._carries(c, feed, by_hint)]
            if chosen:
                break
        for client in chosen or clients:
            client.on_error(ccxt.NetworkError(reason))
        return len(chosen or clients)

    def _hook_connection_events(self) -> None:
        """Mark an outage on the feeds of a ccxt connection that closes or fails, also when no task of ours
        was waiting on it at that moment (ccxt then reconnects silently on the next watch call)."""
        exchange = self.exchange
        on_close, on_error = exchange.on_close, exchange.on_error

        def current(client: Any) -> bool:  # a connection we already dropped closes late: not news
            return (exchange.clients or {}).get(client.url) is client

        def closed(client: Any, code: Any) -> Any:
            for feed in self._feeds_on(client) if current(client) else []:
                self.mark_outage(feed, f"connection closed (code {code})")
            return on_close(client, code)

        def failed(client: Any, error: Any) -> Any:
            for feed in self._feeds_on(client) if current(client) else []:
                self.mark_outage(feed, f"connection failed ({type(error).__name__}: {error})")
            return on_error(client, error)

        exchange.on_close, exchange.on_error = closed, failed
        if self.exchange_id == "coinbase":
            self._check_coinbase_sequence()

    def _check_coinbase_sequence(self) -> None:
        """Coinbase Advanced Trade numbers every message of a connection (`sequence_num`, +1 each, any channel);
        ccxt.pro 4.5.90 does not look at it. A skipped number is a lost message, and a lost level2 update
        makes a wrong book: drop ccxt's books of that connection and reconnect (a fresh snapshot follows),
        with an outage (Gap) on every feed it carried."""
        exchange = self.exchange
        handle = exchange.handle_message

        def checked(client: Any, message: Any) -> Any:
            seq = message.get("sequence_num") if isinstance(message, dict) else None
            if isinstance(seq, int):
                last = getattr(client, "mdp_sequence", None)
                client.mdp_sequence = seq
                if last is not None and seq != last + 1:
                    self._on_sequence_gap(client, last, seq)
                    return None
            return handle(client, message)

        exchange.handle_message = checked

    def _on_sequence_gap(self, client: Any, last: int, seq: int) -> None:
        self.count["sequence_gaps"] += 1
        reason = f"sequence gap: message {seq} after {last} ({seq - last - 1} lost); books resynced"
        log.warning("%s %s; reconnecting %s", self.exchange_id, reason, client.url)
        for feed in self._feeds_on(client):
            self.mark_outage(feed, reason)
            if "book" in feed.channels:
                (self.exchange.orderbooks or {}).pop(feed.symbol, None)
                self.count["book_resyncs"] += 1
        client.on_error(ccxt.NetworkError(reason))

    def _budget_rest(self) -> None:
        """Every REST call of the exchange object spends the shared budget, including the depth snapshot
        ccxt.pro fetches by itself to build an order book."""
        ex = self.exchange_settings
        budget = RateBudget(self.redis, self.exchange_id,
                            limit_for(self.exchange_id, self.settings.backfill.ratelimit, self.exchange.rateLimit),
                            self.settings.backfill.ratelimit)
        self.rest = BudgetedExchange(self.exchange, budget)
        original = self.exchange.fetch_rest_order_book_safe
        weight = min(book_snapshot_weight(self.exchange_id, ex.book_snapshot_limit), budget.cap)
        rest = self.rest

        async def budgeted_snapshot(symbol: Any, limit: Any = None, params: Any = None) -> Any:
            return await rest.call(weight, original, symbol, limit, params or {})

        self.exchange.fetch_rest_order_book_safe = budgeted_snapshot
        if self.exchange_id in ("binance", "binanceusdm"):
            self.exchange.options["watchOrderBookLimit"] = ex.book_snapshot_limit

    # -- lifecycle --------------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        self.exchange = make_pro_exchange(self.exchange_settings)
        draining = asyncio.Event()
        publisher = asyncio.create_task(self._publisher(draining), name="publisher")
        tasks: list[asyncio.Task[None]] = []
        try:
            ex = self.exchange_settings
            log.info("collector %s: symbols %s, channels %s, REST %s, WS %s", self.exchange_id, self.symbols,
                     ex.channels, ex.rest_url or "(live)", ex.ws_url or "(live)")
            self._budget_rest()
            self._hook_connection_events()
            await self._load_markets(stop)
            if stop.is_set():
                return
            self.feeds, self.polled = plan_feeds(self, self.exchange, ex, self.symbols)
            await self._resume_from_positions(stop)
            self.state = "running"
            tasks = [asyncio.create_task(self._run_feed(f, stop), name=f"feed {f.name}") for f in self.feeds]
            tasks += [asyncio.create_task(self._run_polled(p, stop), name=f"poll {p.name}") for p in self.polled]
            stopped = asyncio.create_task(stop.wait())
            await asyncio.wait([stopped, publisher, *tasks], return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
            if publisher.done():
                publisher.result()  # a Redis error other than unreachable: exit non-zero, supervisord restarts
        finally:
            # Stop reading the sockets; publish what was taken from ccxt (bounded), then close the connections.
            for t in tasks:
                t.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            await self._drain(publisher, draining)
            await self.exchange.close()
        for r in results:
            if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError):
                raise r  # a feed crashed: exit non-zero so supervisord restarts us

    async def _drain(self, publisher: asyncio.Task[None], draining: asyncio.Event) -> None:
        """At stop: publish the trades ccxt holds and what the outbox holds, for at most DRAIN_S; what is left
        then is logged as the Gap it leaves (the next start opens it from the stored positions anyway)."""
        for feed in self.feeds:
            if isinstance(feed, TradesFeed):
                await feed.sweep()  # trades received between the last wake-up and the stop
        draining.set()
        self.outbox_ready.set()
        if publisher.done():
            return
        started = time.monotonic()
        try:
            await asyncio.wait_for(asyncio.shield(publisher), DRAIN_S)
            log.info("stopped collecting; the outbox was published in %.2f s", time.monotonic() - started)
            return
        except TimeoutError:
            publisher.cancel()
            await asyncio.gather(publisher, return_exceptions=True)
        self._settle_dropped()
        runs: dict[tuple[str, str], list[Event]] = {}
        for batch in self.outbox.queued:
            runs.setdefault((batch.symbol, batch.channel), []).extend(batch.events)
        log.error("could not publish within %.0f s of the stop (%s): %d events of %d batches not published",
                  DRAIN_S, self.detail or "Redis slow or unreachable", self.outbox.events, len(self.outbox))
        for (symbol, channel), events in runs.items():
            times = [int(getattr(e, "ts_event", 0)) for e in events]
            ids = [e.trade_id for e in events if isinstance(e, Trade)]
            named = f"; trade ids {ids[0]}..{ids[-1]}" if ids else ""
            log.error("gap in %s %s %s from %d to %d (not published at stop): %d events%s; the next start "
                      "opens its Gap from the stored position (written with the XADDs, so it also tells if a "
                      "write sent before the stop was applied after all)", self.exchange_id, symbol,
                      channel or "-", min(times), max(times), len(events), named)

    async def _resume_from_positions(self, stop: asyncio.Event) -> None:
        """Each feed a previous process published opens an outage at its stored position: the first message
        now publishes the Gap of the restart, like a reconnect's (with the missing trade ids where they
        count up by one)."""
        delay = PUBLISH_BACKOFF_S
        while True:
            try:
                stored = await self._read_positions()
                break
            except REDIS_DOWN as exc:
                self._redis_down(exc, delay)
                if await sleep_unless(stop, delay):
                    return
                delay = min(delay * 2, PUBLISH_BACKOFF_MAX_S)
        for feed in self.feeds:
            for channel, stats in feed.stats.items():
                pos = stored.get((channel, feed.symbol))
                if pos is None:
                    continue
                self.published_pos[(channel, feed.symbol)] = pos
                stats.last_event_ns, stats.last_id = pos.ts_event, pos.trade_id
                stats.outage = Outage(start_ns=pos.ts_event, last_id=pos.trade_id,
                                      reason=f"collector restarted (last published: {pos})")
                if channel == "trades":
                    self.state_by_symbol[feed.symbol].resume_after(pos)
        if stored:
            log.info("resuming %d feeds of %s from their stored positions", len(self.published_pos),
                     self.exchange_id)

    async def _load_markets(self, stop: asyncio.Event) -> None:
        assert self.rest is not None
        delay = 1.0
        weight = self.rest.budget.limit.markets_weight
        while not stop.is_set():
            try:
                markets = await asyncio.wait_for(self.rest.call(weight, self.exchange.load_markets),
                                                 timeout=self.exchange_settings.rest_timeout_s)
                break
            except (*ERRORS, TimeoutError) as exc:
                self.count["errors"] += 1
                self.detail = f"load_markets failed: {exc}"
                log.error("load_markets on %s failed (%s: %s); retrying in %.0f s", self.exchange_id,
                          type(exc).__name__, exc, delay)
                await sleep_exact(stop, delay)
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

    # -- the feed loop ----------------------------------------------------------------------------------

    async def _run_feed(self, feed: Feed, stop: asyncio.Event) -> None:
        """Wait for updates (each wait bounded by SWEEP_S), sweep, watch for stalls, reconnect on failures."""
        ex = self.exchange_settings
        attempt = 0
        subscribe = True
        while not stop.is_set():
            if subscribe:
                await self.pacer.wait(stop)
                feed.quiet_since = time.monotonic()
                subscribe = False
            try:
                async with asyncio.timeout(SWEEP_S):  # cheaper than wait_for: no task per wait
                    result = await feed.watch()
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if stop.is_set() or (task is not None and task.cancelling()):
                    raise
                # ccxt cancelled the future we waited on (it closed that connection): a failure, not our stop
                attempt += 1
                self._on_failure(feed, ccxt.NetworkError("ccxt cancelled the wait (connection closed)"))
                await sleep_exact(stop, backoff_delay(attempt, ex.reconnect_backoff_s, ex.reconnect_backoff_max_s))
                subscribe = True
                continue
            except TimeoutError:
                await feed.sweep()
                quiet = time.monotonic() - feed.quiet_since
                if quiet > feed.stall_s:
                    self._on_stall(feed, quiet)
                    subscribe = True
                continue
            except ERRORS as exc:
                attempt += 1
                self._on_failure(feed, exc)
                await feed.on_break()
                await sleep_exact(stop, backoff_delay(attempt, ex.reconnect_backoff_s, ex.reconnect_backoff_max_s))
                subscribe = True
                continue
            attempt = 0
            feed.quiet_since = time.monotonic()
            await feed.on_update(result)

    def _on_stall(self, feed: Feed, quiet: float) -> None:
        self.count["stalls"] += 1
        reason = f"stall: no {'/'.join(feed.channels)} message for {quiet:.1f} s (stall_s {feed.stall_s:g})"
        log.warning("%s %s: %s; reconnecting", self.exchange_id, feed.name, reason)
        self.mark_outage(feed, reason)
        self.drop_connections(feed, reason)

    def _on_failure(self, feed: Feed, exc: BaseException) -> None:
        if isinstance(exc, ccxt.ChecksumError | ccxt.InvalidNonce):
            self.count["book_resyncs"] += 1  # ccxt found a sequence break and rebuilds from a new snapshot
            reason = f"sequence break, book resynced ({type(exc).__name__}: {exc})"
        else:
            self.count["reconnects"] += 1
            reason = f"reconnect after {type(exc).__name__}: {exc}"
        if isinstance(exc, ExchangeBanned):
            self.count["errors"] += 1
        log.warning("%s %s failed (%s: %s); reconnecting", self.exchange_id, feed.name, type(exc).__name__, exc)
        self.mark_outage(feed, reason[:300])

    async def _run_polled(self, feed: PolledFeed, stop: asyncio.Event) -> None:
        ex = self.exchange_settings
        while not stop.is_set():
            try:
                events = await asyncio.wait_for(feed.poll(), timeout=ex.rest_timeout_s)
            except (*ERRORS, TimeoutError) as exc:
                self.count["errors"] += 1
                log.error("REST %s of %s failed (%s: %s)", feed.name, self.exchange_id, type(exc).__name__, exc)
            else:
                stats = feed.stats[feed.channel]
                stats.messages += 1
                stats.last_recv_ms = time.time_ns() // MS
                await self.publish(events, symbol=feed.symbol, channel=feed.channel)
            await sleep_unless(stop, ex.rest_channel_poll_s)

    async def on_crossed_book(self, feed: Feed, book: Any) -> None:
        """A crossed book is never published: alert, drop ccxt's book and reconnect, so it is rebuilt."""
        self.count["books_crossed"] += 1
        await self.publish([crossed_alert(self, book)])
        (self.exchange.orderbooks or {}).pop(feed.symbol, None)
        self.mark_outage(feed, "crossed book: rebuilt from a fresh snapshot")
        self.drop_connections(feed, f"crossed book {feed.symbol}")

    # -- candles ----------------------------------------------------------------------------------------

    async def poll_candles(self, feed: Feed, symbol: str) -> None:
        """REST fetch_ohlcv from the last closed candle, through the shared budget (a ban holds it)."""
        assert self.rest is not None
        state = self.state_by_symbol[symbol]
        tf = self.exchange_settings.timeframe
        since = state.last_closed_open_ms + TIMEFRAME_MS[tf] if state.last_closed_open_ms >= 0 else None
        self.count["rest_polls"] += 1
        try:
            rows = await asyncio.wait_for(
                self.rest.call(self.rest.budget.limit.ohlcv_weight, self.exchange.fetch_ohlcv, symbol, tf,
                               since=since, limit=1000),
                timeout=self.exchange_settings.rest_timeout_s)
        except TimeoutError:
            self.count["rest_held"] += 1
            log.error("REST fetch_ohlcv %s %s did not complete within %.0f s (REST held by the shared budget: "
                      "a 429 cool-down or a 418 ban, or a slow exchange)", self.exchange_id, symbol,
                      self.exchange_settings.rest_timeout_s)
            return
        except ERRORS as exc:
            self.count["errors"] += 1
            log.error("REST fetch_ohlcv %s %s failed (%s: %s)", self.exchange_id, symbol, type(exc).__name__, exc)
            return
        await self.on_candles(feed, symbol, rows, "rest")

    async def _close_interrupted_candle(self, feed: Feed, symbol: str) -> None:
        """The socket broke while a candle was open and came back in a later minute: the open candle's last
        snapshot predates the break, so its final updates were missed. Its closed values come from REST; if
        REST cannot give them, it is not published at all (the outage's Gap covers its minute, and gap_repair
        fetches it), never closed from the stale snapshot."""
        state = self.state_by_symbol[symbol]
        stale = state.last_candle
        if stale is None:
            return
        if self.rest is not None:
            await self.poll_candles(feed, symbol)
        if state.last_closed_open_ms < int(stale[0]):
            self.count["candles_stale_dropped"] += 1
            log.warning("%s %s: the %s candle opening at %d was open when the socket broke and REST did not "
                        "give its final values; not published (the outage's Gap covers it, gap_repair fetches "
                        "it)", self.exchange_id, symbol, self.exchange_settings.timeframe, int(stale[0]))
            state.last_closed_open_ms = int(stale[0])
            state.last_candle = None

    async def on_candles(self, feed: Feed, symbol: str, rows: list[list[Any]], source: Literal["ws", "rest"],
                         ends_outage: bool = True) -> None:
        state = self.state_by_symbol[symbol]
        tf = self.exchange_settings.timeframe
        stats = feed.stats.get("candles")
        if (source == "ws" and stats is not None and stats.outage is not None and state.last_candle is not None
                and any(row and row[0] is not None and int(row[0]) > state.last_candle[0] for row in rows)):
            await self._close_interrupted_candle(feed, symbol)
        ts_recv = time.time_ns()
        events: list[Candle] = []
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
        if not events:
            return
        if source == "rest":  # fills in while the socket is quiet; only a socket message ends an outage
            await self.publish(events, symbol=symbol, channel="candles")
            return
        opens = [c.open_time for c in events if getattr(c, "open_time", 0)]
        await self.emit(feed, "candles", events, min(opens, default=ts_recv), max(opens, default=ts_recv),
                        ends_outage=ends_outage)

