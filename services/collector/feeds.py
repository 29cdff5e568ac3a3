"""The collector's feeds: one per (symbol, ccxt subscription), each serving one or more channels.

How each channel is fetched (checked against `exchange.has` at start, `plan_feeds`; anything else is a
ConfigError naming the exchange and the channel):

  trades         watch_trades                               every exchange we test; Binance spot and USD-M frames
                 decoded by our own msgspec decoder instead (FastTradesFeed, wires.py; `fast_path`)
  candles        watch_ohlcv (+ REST fetch_ohlcv while the socket is quiet or down)
  ticker         watch_bids_asks where it exists (Binance: the bookTicker stream, best bid/ask with sizes,
                 no last; spot and USD-M frames decoded by our own msgspec decoder instead, FastTickerFeed,
                 wires.py; `fast_path`), else watch_ticker (Coinbase ticker; Hyperliquid activeAssetCtx, whose bid/ask
                 are ccxt's impact prices)
  book           watch_order_book: ccxt.pro builds the book from the exchange's snapshot and diffs and
                 applies its sequence rules (Binance spot U/u, USD-M pu; on a break it raises
                 ChecksumError and re-fetches the snapshot on the next call); we publish bounded-depth
                 snapshots, throttled, never crossed; Binance spot and USD-M depth frames decoded and
                 sequenced by our own code instead, by ccxt's rules (FastBookFeed, fast_book.py; `fast_path`)
  funding        watch_mark_price (Binance USD-M markPrice: mark, index, funding rate, next funding time);
                 Hyperliquid's activeAssetCtx (watch_ticker's `info`); else REST fetch_funding_rate, polled
  open_interest  Hyperliquid's activeAssetCtx; else REST fetch_open_interest, polled (Binance USD-M has no
                 open-interest stream)

Channels that resolve to the same ccxt subscription of a symbol (Hyperliquid's ticker, funding and open
interest: the venue table's `asset_context`, common/exchanges/venues.py) share one feed: two tasks waiting on
one ccxt future would cancel each other's waits.

Feeds see the collector only through `FeedHost` (what they need of it); this module never imports service.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Container, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol, cast

import ccxt
from ccxt.async_support.base.ws.cache import ArrayCache

from common.config import ConfigError, ExchangeSettings
from common.domain.timeframe import MS
from common.exchanges.events import candle_event, length_ms, trade_event
from common.exchanges.ratelimit import BudgetedExchange, ExchangeBanned
from common.exchanges.venues import venue
from common.exchanges.wire.binance_book_ticker import BinanceBookTicker, to_ticker
from common.exchanges.wire.binance_trades import BinanceTrade, to_trade
from schemas import Alert, Candle, Event, OrderBook, Ticker, Trade
from services.collector import events as ev
from services.collector.gaps import Outage, outage_gap
from services.collector.outbox import Position
from services.collector.symbols import SymbolState
from services.collector.wires import FAST_TICKERS, FAST_TRADES, BookTickerWire, TradeWire

log = logging.getLogger(__name__)

CHANNELS = ("trades", "candles", "ticker", "book", "funding", "open_interest")
# Channels with a decode fast path on some exchange: the keys `[[exchanges]] fast_path` accepts.
FAST_PATH_CHANNELS = ("trades", "ticker", "book")
# OperationFailed (NetworkError's parent): Binance's -1001 "Internal error; try again", sent with a 5xx, maps
# there in ccxt 4.5.90; it is transient like a NetworkError and must be retried, not crash the feed.
ERRORS = (ccxt.OperationFailed, ccxt.ExchangeError, ExchangeBanned)


class FeedHost(Protocol):
    """What a feed needs of the process that runs it (services/collector/service.py's Collector, which this
    module never imports): the exchange objects and settings, the per-symbol memory, the counters, the outbox
    (`publish`) and the connections (`drop_connections`)."""

    @property
    def exchange(self) -> Any: ...  # the ccxt.pro object
    @property
    def exchange_id(self) -> str: ...
    @property
    def exchange_settings(self) -> ExchangeSettings: ...
    @property
    def rest(self) -> BudgetedExchange | None: ...  # REST through the shared budget, built before the feeds
    @property
    def state_by_symbol(self) -> dict[str, SymbolState]: ...
    @property
    def count(self) -> Counter[str]: ...
    @property
    def sequential_ids(self) -> bool: ...  # trade ids count up by one (quality.sequential_trade_ids)

    async def publish(self, events: Sequence[Event], gaps: list[Event] | None = None, symbol: str = "",
                      channel: str = "", position: Position | None = None) -> None: ...

    def drop_connections(self, feed: Feed, reason: str) -> int: ...

    def next_round_in(self) -> float: ...  # seconds until the publisher's next round is due (<= 0: now)


@dataclass
class ChannelStats:
    """What one channel of one symbol has received; feeds the heartbeat counters and `mdp status`."""

    messages: int = 0
    last_recv_ms: int = 0  # wall clock of the last message
    last_event_ns: int = 0  # exchange time of the last message
    last_id: str = ""  # trades: the last trade id published
    outage: Outage | None = None
    gaps: int = 0


@dataclass
class Feed:
    """One ccxt subscription of one symbol. `watch()` waits for the next update; `on_update()` turns it into
    events and hands them to the outbox (`emit`); `sweep()` runs whenever a wait times out."""

    host: FeedHost
    symbol: str
    channels: tuple[str, ...]
    stall_s: float
    stats: dict[str, ChannelStats] = field(default_factory=dict)
    quiet_since: float = field(default_factory=time.monotonic)  # last message or (re)subscription
    started_ns: int = field(default_factory=time.time_ns)

    # Words that name this feed's subscription in ccxt's subscription keys, beside the symbol ('btcusdt@trade',
    # 'btcusdt@depth@100ms', 'orderbook:BTC/USDC:USDC'), lower case: which connection carries the feed.
    hints: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.stats = {c: ChannelStats() for c in self.channels}

    @property
    def name(self) -> str:
        return f"{'+'.join(self.channels)} {self.symbol}"

    @property
    def exchange(self) -> Any:
        return self.host.exchange

    async def emit(self, channel: str, events: Sequence[Event], first_ns: int, last_ns: int, last_id: str = "",
                   first_id: str = "", ends_outage: bool = True) -> None:
        """Publish a channel's events; the first message after an outage also publishes its Gap (unless
        `ends_outage` is False: messages ccxt had received before the break)."""
        host = self.host
        stats = self.stats[channel]
        gaps: list[Event] = []
        if stats.outage is not None and ends_outage:
            gaps.append(outage_gap(host.exchange_id, host.sequential_ids, self.symbol, channel, stats.outage,
                                   first_ns, first_id))
            stats.outage = None
            stats.gaps += 1
            host.count["gaps"] += 1
        stats.messages += max(1, len(events))  # events, not wake-ups: a fast path hands a burst at once
        stats.last_recv_ms = time.time_ns() // MS
        stats.last_event_ns = max(stats.last_event_ns, last_ns)
        if last_id:
            stats.last_id = last_id
        position = Position(stats.last_event_ns, stats.last_id if channel == "trades" else "", time.time_ns())
        await host.publish(events, gaps, self.symbol, channel, position)

    def open_outage(self, reason: str) -> None:
        """Open an outage on each channel of the feed (an open one keeps its start: one Gap per window)."""
        held = self.position()
        for stats in self.stats.values():
            if stats.outage is None:
                start, last_id = stats.last_event_ns or self.started_ns, stats.last_id
                if held is not None and held[0] >= start:
                    start, last_id = held[0], held[1] or last_id
                stats.outage = Outage(start_ns=start, reason=reason, last_id=last_id)

    async def watch(self) -> Any:
        raise NotImplementedError

    async def on_update(self, result: Any) -> None:
        raise NotImplementedError

    async def sweep(self) -> None:
        """Nothing by default; trades, candles and books pick up what arrived between two waits."""

    def position(self) -> tuple[int, str] | None:
        """Exchange time (ns) and id of the newest message ccxt holds for this feed, published or not: where
        an outage starts when the connection breaks (messages already received are not lost)."""
        return None

    async def on_break(self) -> None:
        """The socket failed or stalled; candles poll REST meanwhile."""


class TradesFeed(Feed):
    """watch_trades; ccxt.pro parses each trade frame into its trade cache, which the feed reads."""

    hints = ("trade",)

    async def watch(self) -> Any:
        return await self.exchange.watch_trades(self.symbol)

    async def on_update(self, result: Any) -> None:
        await self.sweep()

    def take(self, state: SymbolState) -> list[Trade]:
        """The trades of ccxt's cache neither published nor taken yet, as events (taken now). ccxt.pro signals
        only messages that arrive while a watch_* call waits; one arriving between two calls sits in the cache
        until the next message, so reading the cache's tail picks it up at once."""
        cache = self.exchange.trades.get(self.symbol) if self.exchange.trades else None
        fresh = state.new_trades(cache_tail(cache, state)) if cache else []
        if not fresh:
            return []
        ts_recv = time.time_ns()
        return [trade_event(self.host.exchange_id, self.symbol, t, ts_recv) for t in fresh]

    async def sweep(self) -> None:
        """Publish the trades received beyond those published (`take`); trades received before the break that
        opened an outage are published without ending it."""
        trades = self.take(self.host.state_by_symbol[self.symbol])
        if not trades:
            return
        self.host.count["trades"] += len(trades)
        outage = self.stats["trades"].outage
        if outage is not None and outage.last_id:
            ids = [t.trade_id for t in trades]
            if outage.last_id in ids:  # received before the break: they do not end it
                cut = ids.index(outage.last_id) + 1
                before, trades = trades[:cut], trades[cut:]
                await self.emit("trades", before, before[0].ts_event, before[-1].ts_event,
                                last_id=before[-1].trade_id, ends_outage=False)
                if not trades:
                    return
        await self.emit("trades", trades, trades[0].ts_event, trades[-1].ts_event,
                        last_id=trades[-1].trade_id, first_id=trades[0].trade_id)

    def position(self) -> tuple[int, str] | None:
        cache = self.exchange.trades.get(self.symbol) if self.exchange.trades else None
        if not cache:
            return None
        last = cache[-1]
        return int(last.get("timestamp") or 0) * MS, str(last.get("id"))


class WireFed(Feed):
    """What the feeds of a decode fast path share (docs/collector.md, "Decode fast path"): a wire (wires.py)
    takes this symbol's frames off ccxt.pro's connection, decodes them with msgspec and hands them to
    `on_decoded`; they wait in `decoded` until the feed sweeps them.

    The feed waits on ccxt's own future of its subscription (`message_hash`): the wire resolves it once per
    burst of frames and ccxt rejects it when the connection fails, so failures reach the feed loop as before.
    ccxt's watch_* is called only when no live connection carries the subscription: it (re)connects and
    subscribes."""

    hash_prefix: ClassVar[str]  # ccxt.pro binance's subscription and future of a symbol: prefix + symbol
    woken: ClassVar[Any]  # what the wire resolves ccxt's future with: read by ccxt's watch_* as "nothing new"
    decoded: list[Any]
    client: Any = None  # the ccxt connection carrying the subscription (the last frame came on it)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.decoded = []
        self.swept_at = 0.0  # monotonic
        self._wake_timer: asyncio.TimerHandle | None = None
        self.message_hash = self.hash_prefix + self.symbol

    def wake(self, client: Any) -> None:
        """The wire's call at the end of a burst of frames that brought this feed some (once per burst, not per
        frame): wakes watch() when the publisher's next round is due (`publish_linger_ms` after the previous one
        started): at once if it is due now, else with one timer. So the sweep lands on the round and a frame
        waits at most one linger (a sweep paced on its own clock and a round on the publisher's made it up to
        two), and every feed's timer ends at the same time: one round carries them all. Never sooner than the
        linger after this feed's last sweep (a publisher held back by a slow Redis does not make every burst a
        sweep). The first frame after a quiet spell goes at once."""
        if self._wake_timer is not None:
            return
        carrier = self.client if self.client is not None else client  # the connection of its newest frame
        linger = self.host.exchange_settings.publish_linger_ms / 1000
        due = max(self.swept_at + linger - time.monotonic(), self.host.next_round_in())
        if due <= WAKE_SLACK_S:
            carrier.resolve(self.woken, self.message_hash)  # wakes watch(); nothing when nobody waits
        else:
            self._wake_timer = carrier.asyncio_loop.call_later(due, self._deferred_wake)

    def _deferred_wake(self) -> None:
        self._wake_timer = None
        if self.decoded and self.client is not None:
            self.client.resolve(self.woken, self.message_hash)

    async def sweep(self) -> None:
        self.swept_at = time.monotonic()
        await super().sweep()

    def _carrier(self) -> Any:
        """The live ccxt connection that carries the subscription, or None."""
        clients = self.exchange.clients or {}
        client = self.client
        if client is not None and clients.get(client.url) is client and not client.closed():
            return client
        self.client = None
        for client in clients.values():
            if self.message_hash in client.subscriptions and not client.closed():
                self.client = client
                return client
        return None

    async def wait_fed(self, subscribe: Callable[[], Awaitable[Any]]) -> Any:
        """None at once if frames wait in `decoded`; else ccxt's future of the subscription on its live
        connection, or `subscribe()` (ccxt's watch_*) when none carries it."""
        if self.decoded:
            return None
        client = self._carrier()
        if client is None:  # ccxt (re)connects and subscribes; the wire's resolve or ccxt's reject ends the wait
            return await subscribe()
        return await client.future(self.message_hash)


class FastTradesFeed(WireFed, TradesFeed):
    """The decode fast path of trades (docs/collector.md, "Decode fast path: trades"): wires.TradeWire hands
    this symbol's decoded trade frames to `on_decoded`; they go through the same dedup, outbox and Gaps as
    TradesFeed's. A trade ccxt parsed itself (a frame the decoder refused) is still read from ccxt's cache."""

    hash_prefix = "trade::"
    woken = ArrayCache(1)  # the resubscribing watch_trades reads it as an empty trade cache
    decoded: list[Trade]
    newest: tuple[int, str] | None = None  # exchange time (ns) and id of the newest trade decoded

    def on_decoded(self, client: Any, raw: BinanceTrade, ts_recv: int) -> None:
        """A trade frame of this symbol arrived on `client` (called inside ccxt's receive loop)."""
        trade = to_trade(self.host.exchange_id, self.symbol, raw, ts_recv)
        self.decoded.append(trade)
        self.newest = (trade.ts_event, trade.trade_id)
        self.client = client

    async def watch(self) -> Any:
        return await self.wait_fed(lambda: self.exchange.watch_trades(self.symbol))

    def take(self, state: SymbolState) -> list[Trade]:
        decoded, self.decoded = self.decoded, []
        fresh = state.new_trades([{"id": t.trade_id, "timestamp": t.ts_event // MS, "event": t} for t in decoded])
        return [t["event"] for t in fresh] + super().take(state)

    def position(self) -> tuple[int, str] | None:
        held = super().position()  # a trade ccxt parsed itself
        if held is None or (self.newest is not None and self.newest[0] >= held[0]):
            return self.newest
        return held


# A wake due in less than this goes now (uvloop's timers count whole milliseconds; the publisher's LINGER_SLACK_S).
WAKE_SLACK_S = 0.001


def cache_tail(cache: list[dict[str, Any]] | None, seen: Container[str]) -> list[dict[str, Any]]:
    """The trades at the end of a ccxt trade cache that come after the last one already seen (published
    or taken)."""
    if not cache:
        return []
    tail = []
    for t in reversed(cache):
        if str(t.get("id")) in seen:
            break
        tail.append(t)
    tail.reverse()
    return tail


class CandlesFeed(Feed):
    """watch_ohlcv; while the socket is quiet for ws_stall_s (or down), REST fetch_ohlcv every rest_poll_s
    from the last closed candle, so candles keep coming during an outage.

    A candle is published `closed=True` once a later candle of the same symbol has been seen (ccxt does not
    pass on Binance's `x` flag; for exchanges that publish a candle every interval this closes each candle
    within one update of its end)."""

    hints = ("kline", "ohlcv", "candle")

    last_rest_poll: float = 0.0

    @property
    def timeframe(self) -> str:
        return self.host.exchange_settings.timeframe

    async def watch(self) -> Any:
        return await self.exchange.watch_ohlcv(self.symbol, self.timeframe)

    async def on_update(self, result: Any) -> None:
        await self.on_candles(result, "ws")

    def position(self) -> tuple[int, str] | None:
        cached = (self.exchange.ohlcvs or {}).get(self.symbol, {}).get(self.timeframe)
        return (int(cached[-1][0]) * MS, "") if cached else None

    async def sweep(self) -> None:
        cached = (self.exchange.ohlcvs or {}).get(self.symbol, {}).get(self.timeframe)
        if cached:  # updates that arrived between two watch calls (see TradesFeed.sweep); not news after a break
            await self.on_candles(list(cached[-2:]), "ws", ends_outage=False)
        if time.monotonic() - self.quiet_since >= self.host.exchange_settings.ws_stall_s:
            await self.on_break()

    async def on_break(self) -> None:
        now = time.monotonic()
        if now - self.last_rest_poll >= self.host.exchange_settings.rest_poll_s:
            self.last_rest_poll = now
            await self.poll_rest()

    async def poll_rest(self) -> None:
        """REST fetch_ohlcv from the last closed candle, through the shared budget (a ban holds it)."""
        host, symbol = self.host, self.symbol
        assert host.rest is not None
        state = host.state_by_symbol[symbol]
        tf = self.timeframe
        since = state.last_closed_open_ms + length_ms(tf) if state.last_closed_open_ms >= 0 else None
        host.count["rest_polls"] += 1
        try:
            rows = await asyncio.wait_for(
                host.rest.call(host.rest.budget.limit.ohlcv_weight, self.exchange.fetch_ohlcv, symbol, tf,
                               since=since, limit=1000),
                timeout=host.exchange_settings.rest_timeout_s)
        except TimeoutError:
            host.count["rest_held"] += 1
            log.error("REST fetch_ohlcv %s %s did not complete within %.0f s (REST held by the shared budget: "
                      "a 429 cool-down or a 418 ban, or a slow exchange)", host.exchange_id, symbol,
                      host.exchange_settings.rest_timeout_s)
            return
        except ERRORS as exc:
            host.count["errors"] += 1
            log.error("REST fetch_ohlcv %s %s failed (%s: %s)", host.exchange_id, symbol, type(exc).__name__, exc)
            return
        await self.on_candles(rows, "rest")

    async def _close_interrupted_candle(self) -> None:
        """The socket broke while a candle was open and came back in a later minute: the open candle's last
        snapshot predates the break, so its final updates were missed. Its closed values come from REST; if
        REST cannot give them, it is not published at all (the outage's Gap covers its minute, and gap_repair
        fetches it), never closed from the stale snapshot."""
        host = self.host
        state = host.state_by_symbol[self.symbol]
        stale = state.last_candle
        if stale is None:
            return
        if host.rest is not None:
            await self.poll_rest()
        if state.last_closed_open_ms < int(stale[0]):
            host.count["candles_stale_dropped"] += 1
            log.warning("%s %s: the %s candle opening at %d was open when the socket broke and REST did not "
                        "give its final values; not published (the outage's Gap covers it, gap_repair fetches "
                        "it)", host.exchange_id, self.symbol, self.timeframe, int(stale[0]))
            state.last_closed_open_ms = int(stale[0])
            state.last_candle = None

    async def on_candles(self, rows: list[list[Any]], source: Literal["ws", "rest"],
                         ends_outage: bool = True) -> None:
        host, symbol = self.host, self.symbol
        state = host.state_by_symbol[symbol]
        tf = self.timeframe
        stats = self.stats.get("candles")
        if (source == "ws" and stats is not None and stats.outage is not None and state.last_candle is not None
                and any(row and row[0] is not None and int(row[0]) > state.last_candle[0] for row in rows)):
            await self._close_interrupted_candle()
        ts_recv = time.time_ns()
        events: list[Candle] = []
        updated = False
        for row in rows:
            if not row or any(v is None for v in row[:6]):
                # A malformed exchange body: pass it on as received; the validator rejects it with an alert.
                events.append(candle_event(host.exchange_id, symbol, tf, list(row or []), True, ts_recv, source))
                continue
            open_ms = int(row[0])
            if open_ms <= state.last_closed_open_ms:
                continue  # already published as closed
            last = state.last_candle
            if last is not None and open_ms > last[0]:
                events.append(candle_event(host.exchange_id, symbol, tf, last, True, ts_recv, source))
                state.last_closed_open_ms = last[0]
                host.count["candles_closed"] += 1
            if last is None or open_ms > last[0] or (open_ms == last[0] and list(row[:6]) != last[:6]):
                state.last_candle = list(row)
                updated = True
        if updated and state.last_candle is not None:
            events.append(candle_event(host.exchange_id, symbol, tf, state.last_candle, False, ts_recv, source))
            host.count["candle_updates"] += 1
        if not events:
            return
        if source == "rest":  # fills in while the socket is quiet; only a socket message ends an outage
            await host.publish(events, symbol=symbol, channel="candles")
            return
        opens = [c.open_time for c in events if getattr(c, "open_time", 0)]
        await self.emit("candles", events, min(opens, default=ts_recv), max(opens, default=ts_recv),
                        ends_outage=ends_outage)


class TickerFeed(Feed):
    hints = ("ticker", "bidask")
    bids_asks: bool = False  # Binance: the bookTicker stream through watch_bids_asks

    async def watch(self) -> Any:
        if self.bids_asks:
            return (await self.exchange.watch_bids_asks([self.symbol]))[self.symbol]
        return await self.exchange.watch_ticker(self.symbol)

    async def on_update(self, result: Any) -> None:
        t = ev.ticker_event(self.host.exchange_id, self.symbol, result, time.time_ns())
        await self.emit("ticker", [t], t.ts_event, t.ts_event)


class FastTickerFeed(WireFed, TickerFeed):
    """The decode fast path of Binance's bookTicker (docs/collector.md, "Decode fast path: tickers"):
    wires.BookTickerWire hands this symbol's decoded frames to `on_decoded`, and a sweep publishes every
    ticker of the burst in one batch, in arrival order, instead of one ccxt parse, future and outbox batch per
    frame. A frame the decoder refused goes to ccxt, whose parsed ticker resolves the same future: it is
    published with the next sweep, after those decoded before the feed woke."""

    hash_prefix = "bidask:bookTicker@"
    woken: ClassVar[dict[str, Any]] = {}  # watch_bids_asks([symbol]) reads a ticker without a symbol: {}
    decoded: list[Ticker]
    bids_asks = True

    def on_decoded(self, client: Any, raw: BinanceBookTicker, ts_recv: int) -> None:
        """A bookTicker frame of this symbol arrived on `client` (called inside ccxt's receive loop)."""
        self.decoded.append(to_ticker(self.host.exchange_id, self.symbol, raw, ts_recv))
        self.client = client

    async def watch(self) -> Any:
        return await self.wait_fed(lambda: self.exchange.watch_bids_asks([self.symbol]))

    async def on_update(self, result: Any) -> None:
        if isinstance(result, dict) and result is not self.woken:
            parsed = result if result.get("symbol") == self.symbol else result.get(self.symbol)
            if isinstance(parsed, dict):  # ccxt parsed a frame itself
                self.decoded.append(ev.ticker_event(self.host.exchange_id, self.symbol, parsed, time.time_ns()))
        await self.sweep()

    async def sweep(self) -> None:
        await super().sweep()
        tickers, self.decoded = self.decoded, []
        if tickers:
            await self.emit("ticker", tickers, tickers[0].ts_event, tickers[-1].ts_event)


class BookFeed(Feed):
    """Bounded-depth snapshots of ccxt's order book, at most book_max_per_s per symbol: an update inside
    the interval is not published by itself, the next snapshot (at the interval's end, from a sweep if
    no update comes) carries the latest state, so the newest book always wins and none is held back."""

    hints = ("depth", "orderbook", "level2", "l2book")

    last_published: float = 0.0
    pending: bool = False

    async def watch(self) -> Any:
        return await self.exchange.watch_order_book(self.symbol)

    async def on_update(self, result: Any) -> None:
        self.pending = True
        await self.sweep()

    async def sweep(self) -> None:
        settings = self.host.exchange_settings
        if not self.pending or time.monotonic() - self.last_published < 1.0 / settings.book_max_per_s:
            return
        ob = (self.exchange.orderbooks or {}).get(self.symbol)
        self.pending = False
        if ob is None:  # dropped by ccxt after a sequence break; the next watch rebuilds it
            return
        self.last_published = time.monotonic()
        book = ev.book_event(self.host.exchange_id, self.symbol, ob, settings.book_depth, time.time_ns())
        if ev.crossed(book):
            await self.on_crossed(book)
            return
        self.host.count["books"] += 1
        await self.emit("book", [book], book.ts_event, book.ts_event)

    async def on_crossed(self, book: OrderBook) -> None:
        """A crossed book is never published: alert, drop ccxt's book and reconnect, so it is rebuilt."""
        self.host.count["books_crossed"] += 1
        await self.host.publish([crossed_alert(self.host.exchange_id, book)])
        (self.exchange.orderbooks or {}).pop(self.symbol, None)
        self.open_outage("crossed book: rebuilt from a fresh snapshot")
        self.host.drop_connections(self, f"crossed book {self.symbol}")


class MarkPriceFeed(Feed):
    """Binance USD-M markPrice stream: funding rate, mark and index price."""

    hints = ("markprice",)

    async def watch(self) -> Any:
        return await self.exchange.watch_mark_price(self.symbol)

    async def on_update(self, result: Any) -> None:
        f = ev.funding_from_mark_price(self.host.exchange_id, self.symbol, result, time.time_ns())
        await self.emit("funding", [f], f.ts_event, f.ts_event)


class AssetContextFeed(Feed):
    """Hyperliquid activeAssetCtx through watch_ticker: ticker, funding and open interest in one message."""

    hints = ("ticker", "assetctx")

    async def watch(self) -> Any:
        return await self.exchange.watch_ticker(self.symbol)

    async def on_update(self, result: Any) -> None:
        ts_recv = time.time_ns()
        ex = self.host.exchange_id
        for channel in self.channels:
            event: Event
            if channel == "ticker":
                event = ev.ticker_event(ex, self.symbol, result, ts_recv)
            elif channel == "funding":
                event = ev.funding_from_asset_context(ex, self.symbol, result, ts_recv)
            else:
                event = ev.open_interest_from_asset_context(ex, self.symbol, result, ts_recv)
            await self.emit(channel, [event], event.ts_event, event.ts_event)


@dataclass
class PolledFeed:
    """A channel the exchange offers only over REST: polled every rest_channel_poll_s through the shared
    budget. A failed poll is counted and logged; the channel's last-message age in `mdp status` shows it."""

    host: FeedHost
    symbol: str
    channel: str
    stats: dict[str, ChannelStats] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.stats = {self.channel: ChannelStats()}

    @property
    def channels(self) -> tuple[str, ...]:
        return (self.channel,)

    @property
    def name(self) -> str:
        return f"{self.channel} {self.symbol} (REST)"

    async def poll(self) -> list[Event]:
        # The collector builds its REST client before it plans polled feeds.
        ex, rest = self.host.exchange_id, cast("BudgetedExchange", self.host.rest)
        if self.channel == "funding":
            f = await rest.call(1, self.host.exchange.fetch_funding_rate, self.symbol)
            return [ev.funding_from_rest(ex, self.symbol, f, time.time_ns())]
        oi = await rest.call(1, self.host.exchange.fetch_open_interest, self.symbol)
        return [ev.open_interest_from_rest(ex, self.symbol, oi, time.time_ns())]


def check_fast_path(settings: ExchangeSettings) -> None:
    """ConfigError for a `fast_path` key that is no channel with a decode fast path."""
    bad = sorted(set(settings.fast_path) - set(FAST_PATH_CHANNELS))
    if bad:
        raise ConfigError(f"exchanges[{settings.id}].fast_path: {', '.join(map(repr, bad))} is not a channel with a "
                          f"decode fast path; accepted keys: {', '.join(FAST_PATH_CHANNELS)}")


def fast_path(settings: ExchangeSettings, channel: str, exchanges: Container[str]) -> bool:
    """Whether `channel` of this exchange goes through its decode fast path: where one exists (`exchanges`)
    unless `fast_path[channel]` is false (docs/collector.md, "Decode fast path")."""
    wanted = settings.fast_path.get(channel, True)
    if wanted and settings.id not in exchanges and channel in settings.fast_path:
        log.info("exchanges[%s].fast_path.%s: no decode fast path for %s %s; ccxt.pro parses it", settings.id,
                 channel, settings.id, channel)
    return wanted and settings.id in exchanges


def _is_derivative(market: dict[str, Any]) -> bool:
    return bool(market.get("swap") or market.get("future"))


def plan_feeds(host: FeedHost, exchange: Any, settings: ExchangeSettings,
               symbols: list[str]) -> tuple[list[Feed], list[PolledFeed]]:
    """The feeds serving `settings.channels` for `symbols`, or ConfigError for a channel the exchange (or a
    symbol's market type) does not offer through ccxt."""
    has = exchange.has
    ex_id = settings.id
    asset_ctx = venue(ex_id).asset_context
    feeds: list[Feed] = []
    polled: list[PolledFeed] = []

    def unsupported(channel: str, needs: str) -> ConfigError:
        return ConfigError(f"exchanges[{ex_id}].channels: {ex_id} does not offer channel {channel!r} through "
                           f"ccxt (needs {needs}); remove {channel!r} from its channels")

    def stall(channel: str) -> float:
        return settings.stall_s.get(channel, settings.ws_stall_s)

    check_fast_path(settings)

    for channel in settings.channels:
        if channel in ("funding", "open_interest"):
            spot = [s for s in symbols if not _is_derivative(exchange.markets[s])]
            if spot:
                raise ConfigError(f"exchanges[{ex_id}].channels: {channel!r} exists for perpetuals and futures "
                                  f"only, but {', '.join(spot)} are spot markets; collect it on a derivatives "
                                  f"exchange id (e.g. binanceusdm) or remove the channel")
    wanted = set(settings.channels)
    for symbol in symbols:
        if "trades" in wanted:
            if not has.get("watchTrades"):
                raise unsupported("trades", "has['watchTrades']")
            if fast_path(settings, "trades", FAST_TRADES):
                fast = FastTradesFeed(host, symbol, ("trades",), stall("trades"))
                TradeWire.of(exchange).add(fast)
                feeds.append(fast)
            else:
                feeds.append(TradesFeed(host, symbol, ("trades",), stall("trades")))
        if "candles" in wanted:
            if not has.get("watchOHLCV"):
                raise unsupported("candles", "has['watchOHLCV']")
            feeds.append(CandlesFeed(host, symbol, ("candles",), stall("candles")))
        if "book" in wanted:
            if not has.get("watchOrderBook"):
                raise unsupported("book", "has['watchOrderBook']")
            from services.collector.fast_book import book_feed  # here: fast_book builds on this module
            feeds.append(book_feed(settings)(host, symbol, ("book",), stall("book")))
        context = tuple(c for c in ("ticker", "funding", "open_interest") if c in wanted) if asset_ctx else ()
        if context:
            if not has.get("watchTicker"):
                raise unsupported(context[0], "has['watchTicker']")
            feeds.append(AssetContextFeed(host, symbol, context, min(stall(c) for c in context)))
        if "ticker" in wanted and not asset_ctx:
            if has.get("watchBidsAsks") and fast_path(settings, "ticker", FAST_TICKERS):
                fast_ticker = FastTickerFeed(host, symbol, ("ticker",), stall("ticker"))
                BookTickerWire.of(exchange).add(fast_ticker)
                feeds.append(fast_ticker)
            elif has.get("watchBidsAsks"):
                feed = TickerFeed(host, symbol, ("ticker",), stall("ticker"))
                feed.bids_asks = True
                feeds.append(feed)
            elif has.get("watchTicker"):
                feeds.append(TickerFeed(host, symbol, ("ticker",), stall("ticker")))
            else:
                raise unsupported("ticker", "has['watchBidsAsks'] or has['watchTicker']")
        if "funding" in wanted and not asset_ctx:
            if has.get("watchMarkPrice"):
                feeds.append(MarkPriceFeed(host, symbol, ("funding",), stall("funding")))
            elif has.get("fetchFundingRate"):
                polled.append(PolledFeed(host, symbol, "funding"))
            else:
                raise unsupported("funding", "has['watchMarkPrice'] or has['fetchFundingRate']")
        if "open_interest" in wanted and not asset_ctx:
            if has.get("fetchOpenInterest"):
                polled.append(PolledFeed(host, symbol, "open_interest"))
            else:
                raise unsupported("open_interest", "has['fetchOpenInterest']")
    return feeds, polled


def crossed_alert(exchange: str, book: OrderBook) -> Alert:
    now = time.time_ns()
    return Alert(rule="book.crossed", severity="error", source=f"collector:{exchange}",
                 exchange=exchange, symbol=book.symbol, kind="book",
                 reason=(f"order book {exchange} {book.symbol} at sequence {book.sequence} is crossed "
                         f"(best bid {book.bids[0][0]} >= best ask {book.asks[0][0]}); not published, the book is "
                         f"rebuilt from a fresh snapshot (reconnect)"),
                 values={"best_bid": str(book.bids[0][0]), "best_ask": str(book.asks[0][0]),
                         "sequence": None if book.sequence is None else str(book.sequence)},
                 ts_event=book.ts_event, ts_recv=now)

