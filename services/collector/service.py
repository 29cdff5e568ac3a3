"""Collector: one process per exchange (or per shard of its symbols), ccxt.pro WebSocket plus REST.

Publishes everything it receives, as received, to `raw:{exchange}` (the validator decides what is good):
- Market: the catalog from `load_markets`, at start.
- Trade: every trade of `watch_trades`, one stream entry per wake-up (FACTS.md: packing is ~1.5x cheaper).
- Candle: `watch_ohlcv` updates as `closed=False`; a candle is published `closed=True` once a later candle
  of the same symbol has been seen (feeds.py, CandlesFeed). While the candle socket is quiet for `ws_stall_s`
  (or down) it polls REST `fetch_ohlcv` every `rest_poll_s` from the last closed candle.
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
bounded outbox (outbox.py) and never wait for Redis; one publisher task (publisher.py) sends it with each
feed's position (`mdp:collector:pos:{exchange}`) in one MULTI/EXEC. A trade counts as published only after that
succeeded. At start each feed opens an outage from its stored position (the restart's Gap); SIGTERM drains the
outbox for at most DRAIN_S; while Redis is down the state is degraded and the outbox's overflow becomes a Gap.

Modules: this one runs the process (markets, the feed loop, reconnects, the stall watchdog); feeds.py turns
each ccxt subscription into events (through `FeedHost`, the narrow view of this Collector it gets); gaps.py
builds the Gaps; publisher.py and outbox.py publish; connections.py watches ccxt's connections; symbols.py
remembers what was published per symbol; common/exchanges/venues.py holds the exchange facts.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import resource
import time
import zlib
from collections import Counter
from collections.abc import Sequence
from typing import Any

# isort: off
import services.collector.lazy_ccxt  # noqa: F401  first: ccxt then imports only the exchanges used (memory)
# isort: on
import ccxt

from common.backoff import EQUAL, EXACT, Backoff, jittered, sleep_unless
from common.bus.core import Producer
from common.bus.stage import Service
from common.config import ExchangeSettings, Settings
from common.domain.timeframe import MS
from common.exchanges.clients import make_pro_exchange
from common.exchanges.ratelimit import BudgetedExchange, ExchangeBanned, RateBudget, limit_for
from common.exchanges.venues import Venue, venue
from common.tasks import cancel_and_wait
from schemas import Event
from services.collector.connections import Connections
from services.collector.events import market_event
from services.collector.feeds import ERRORS, ChannelStats, Feed, PolledFeed, TradesFeed, WireFed, plan_feeds
from services.collector.gaps import Outage
from services.collector.outbox import Position
from services.collector.publisher import Publisher
from services.collector.symbols import SymbolState

__all__ = ["DRAIN_S", "Collector", "Pacer", "SymbolState", "backoff_delay", "rss_bytes"]

log = logging.getLogger(__name__)

DRAIN_S = 8.0  # at SIGTERM: how long the outbox may take to publish (service.main cancels us after 10 s)
SWEEP_S = 0.5  # the longest single wait on a socket: then caches are swept and the watchdog looks
MARKETS_BACKOFF_S, MARKETS_BACKOFF_MAX_S = 1.0, 60.0  # retrying load_markets


def rss_bytes() -> int:
    """Resident memory of this process now (Linux /proc/self/statm); elsewhere its peak (getrusage, KiB on
    Linux, bytes on macOS: an upper bound either way)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def backoff_delay(attempt: int, base_s: float, cap_s: float, rng: random.Random | None = None) -> float:
    """Seconds before reconnect attempt `attempt` (1, 2, ...): base * 2^(attempt-1), capped, with "equal
    jitter" (half fixed, half random) so reconnecting processes spread out yet never retry at once."""
    return jittered(min(cap_s, base_s * 2 ** min(max(attempt - 1, 0), 30)), EQUAL, rng)


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
            await sleep_unless(stop, slot - now)


class Collector(Service):
    """One exchange (or one shard of its symbols): the feeds' host (feeds.FeedHost) and their loops."""

    name = "collector"
    cluster_ready = True  # a round is committed partition by partition on a cluster (Publisher._publish)

    def __init__(self, settings: Settings, instance: str | None = None, exchange: str = "binance",
                 shard: str | None = None, idle_unless_configured: bool = False) -> None:
        self.exchange_settings: ExchangeSettings = settings.exchange(exchange)
        super().__init__(settings, instance)
        self.instance = f"{exchange}-{self.instance}"
        self.exchange_id = exchange
        self.venue: Venue = venue(exchange)
        self.sequential_ids = exchange in settings.quality.sequential_trade_ids
        self.symbols = self._shard(self.exchange_settings.symbols, shard)
        self.producer = Producer(self.redis, self.codec, settings.bus, source=f"collector:{exchange}")
        self.state_by_symbol = {s: SymbolState() for s in self.symbols}
        self.count: Counter[str] = Counter({k: 0 for k in (
            "trades", "candle_updates", "candles_closed", "rest_polls", "reconnects", "stalls", "markets",
            "errors", "publish_retries", "gaps", "books", "books_crossed", "book_resyncs", "rest_held",
            "sequence_gaps", "positions_lost", "candles_stale_dropped", "publish_round_trips",
            "rounds_in_doubt_ran")})
        ex = self.exchange_settings
        self.publisher = Publisher(self, self.producer, exchange, self.state_by_symbol, self.count,
                                   self.sequential_ids, ex.publish_buffer_events, ex.publish_batch_events,
                                   ex.publish_linger_ms / 1000, settings.bus.partitions, settings.bus.cluster)
        self.outbox = self.publisher.outbox
        self.pacer = Pacer(self.exchange_settings.subscribe_per_s)
        self.feeds: list[Feed] = []
        self.polled: list[PolledFeed] = []
        self.exchange: Any = None
        self.connections: Connections | None = None
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
        """Headline counters, the resident memory (`rss_bytes`), the outbox, plus, per channel, `channel.{c}.messages`, `.gaps`, `.last_ms` (wall clock of the
        newest message of any symbol) and `.oldest_ms` (of the symbol heard from longest ago): `mdp status`
        turns them into each channel's rate and last-message age."""
        out = dict(self.count) | {"published_events": self.producer.published_events,
                                  "published_entries": self.producer.published_entries,
                                  "subscriptions": self.pacer.granted, "buffered_events": self.outbox.events,
                                  "buffer_dropped": self.outbox.dropped_events, "rss_bytes": rss_bytes()}
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

    # -- what feeds call (feeds.FeedHost) ---------------------------------------------------------------

    async def publish(self, events: Sequence[Event], gaps: list[Event] | None = None, symbol: str = "",
                      channel: str = "", position: Position | None = None) -> None:
        """Queue events in the outbox (Publisher.publish): never waits for Redis."""
        await self.publisher.publish(events, gaps, symbol, channel, position)

    def next_round_in(self) -> float:
        return self.publisher.next_round_in()

    def drop_connections(self, feed: Feed, reason: str) -> int:
        """Close the ccxt connection(s) carrying `feed` so the next watch reconnects (Connections.drop)."""
        assert self.connections is not None
        return self.connections.drop(feed, reason)

    # -- lifecycle --------------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        self.exchange = make_pro_exchange(self.exchange_settings)
        self.connections = Connections(self.exchange, self.exchange_id, self.count)
        publisher = asyncio.create_task(self.publisher.run(max(self.settings.bus.batch_max_events * 20, 1)),
                                        name="publisher")
        tasks: list[asyncio.Task[None]] = []
        try:
            ex = self.exchange_settings
            log.info("collector %s: symbols %s, channels %s, REST %s, WS %s", self.exchange_id, self.symbols,
                     ex.channels, ex.rest_url or "(live)", ex.ws_url or "(live)")
            self._budget_rest()
            self.connections.watch(self.venue.numbered_messages)
            await self._load_markets(stop)
            if stop.is_set():
                return
            self.feeds, self.polled = plan_feeds(self, self.exchange, ex, self.symbols)
            self.connections.feeds = self.feeds
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
            await cancel_and_wait(*tasks)  # a plain cancel can be lost on 3.11 (common/tasks.py)
            results = [None if t.cancelled() else t.exception() for t in tasks]
            for feed in self.feeds:
                if isinstance(feed, TradesFeed | WireFed):
                    await feed.sweep()  # trades (and decoded tickers) received since the last wake-up
            await self.publisher.drain(publisher, DRAIN_S)
            await self.exchange.close()
        for r in results:
            if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError):
                raise r  # a feed crashed: exit non-zero so supervisord restarts us

    async def _resume_from_positions(self, stop: asyncio.Event) -> None:
        """Each feed a previous process published opens an outage at its stored position: the first message
        now publishes the Gap of the restart, like a reconnect's (with the missing trade ids where they
        count up by one)."""
        stored = await self.publisher.stored_positions(stop)
        if stored is None:
            return
        for feed in self.feeds:
            for channel, stats in feed.stats.items():
                pos = stored.get((channel, feed.symbol))
                if pos is None:
                    continue
                self.publisher.published_pos[(channel, feed.symbol)] = pos
                stats.last_event_ns, stats.last_id = pos.ts_event, pos.trade_id
                stats.outage = Outage(start_ns=pos.ts_event, last_id=pos.trade_id,
                                      reason=f"collector restarted (last published: {pos})")
                if channel == "trades":
                    self.state_by_symbol[feed.symbol].resume_after(pos)
        if stored:
            log.info("resuming %d feeds of %s from their stored positions", len(self.publisher.published_pos),
                     self.exchange_id)

    def _budget_rest(self) -> None:
        """Every REST call of the exchange object spends the shared budget, including the depth snapshot
        ccxt.pro fetches by itself to build an order book."""
        ex = self.exchange_settings
        budget = RateBudget(self.redis, self.exchange_id,
                            limit_for(self.exchange_id, self.settings.backfill.ratelimit, self.exchange.rateLimit),
                            self.settings.backfill.ratelimit)
        self.rest = BudgetedExchange(self.exchange, budget)
        original = self.exchange.fetch_rest_order_book_safe
        weight = min(self.venue.book_snapshot_weight(ex.book_snapshot_limit), budget.cap)
        rest = self.rest

        async def budgeted_snapshot(symbol: Any, limit: Any = None, params: Any = None) -> Any:
            return await rest.call(weight, original, symbol, limit, params or {})

        self.exchange.fetch_rest_order_book_safe = budgeted_snapshot
        if self.venue.book_snapshot_option:
            self.exchange.options[self.venue.book_snapshot_option] = ex.book_snapshot_limit

    async def _load_markets(self, stop: asyncio.Event) -> None:
        assert self.rest is not None
        backoff = Backoff(MARKETS_BACKOFF_S, MARKETS_BACKOFF_MAX_S, spread=EXACT)
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
                          type(exc).__name__, exc, backoff.delay)
                await backoff.sleep(stop)
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
                await sleep_unless(stop, backoff_delay(attempt, ex.reconnect_backoff_s, ex.reconnect_backoff_max_s))
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
                await sleep_unless(stop, backoff_delay(attempt, ex.reconnect_backoff_s, ex.reconnect_backoff_max_s))
                subscribe = True
                continue
            attempt = 0
            feed.quiet_since = time.monotonic()
            await feed.on_update(result)

    def _on_stall(self, feed: Feed, quiet: float) -> None:
        self.count["stalls"] += 1
        reason = f"stall: no {'/'.join(feed.channels)} message for {quiet:.1f} s (stall_s {feed.stall_s:g})"
        log.warning("%s %s: %s; reconnecting", self.exchange_id, feed.name, reason)
        feed.open_outage(reason)
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
        feed.open_outage(reason[:300])

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
            await sleep_unless(stop, jittered(ex.rest_channel_poll_s))
