"""The collector's feeds: one per (symbol, ccxt subscription), each serving one or more channels.

How each channel is fetched (checked against `exchange.has` at start, `plan_feeds`; anything else is a
ConfigError naming the exchange and the channel):

  trades         watch_trades                               every exchange we test
  candles        watch_ohlcv (+ REST fetch_ohlcv while the socket is quiet or down)
  ticker         watch_bids_asks where it exists (Binance: the bookTicker stream, best bid/ask with sizes,
                 no last), else watch_ticker (Coinbase ticker; Hyperliquid activeAssetCtx, whose bid/ask
                 are ccxt's impact prices)
  book           watch_order_book: ccxt.pro builds the book from the exchange's snapshot and diffs and
                 applies its sequence rules (Binance spot U/u, USD-M pu; on a break it raises
                 ChecksumError and re-fetches the snapshot on the next call); we publish bounded-depth
                 snapshots, throttled, never crossed
  funding        watch_mark_price (Binance USD-M markPrice: mark, index, funding rate, next funding time);
                 Hyperliquid's activeAssetCtx (watch_ticker's `info`); else REST fetch_funding_rate, polled
  open_interest  Hyperliquid's activeAssetCtx; else REST fetch_open_interest, polled (Binance USD-M has no
                 open-interest stream)

Channels that resolve to the same ccxt subscription of a symbol (Hyperliquid's ticker, funding and open
interest) share one feed: two tasks waiting on one ccxt future would cancel each other's waits.
"""

from __future__ import annotations

import time
from collections.abc import Container
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from common.config import ConfigError, ExchangeSettings
from common.exchanges.events import trade_event
from schemas import Alert, Event
from services.collector import events as ev

if TYPE_CHECKING:
    from common.exchanges.ratelimit import BudgetedExchange
    from services.collector.service import Collector

MS = 1_000_000
CHANNELS = ("trades", "candles", "ticker", "book", "funding", "open_interest")


@dataclass
class Outage:
    """A break in a channel: from the exchange time of the last message before it (`start_ns`), why, and
    the last id seen (trades), so a repairer can fetch from there."""

    start_ns: int
    reason: str
    last_id: str


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
    events and hands them to the collector; `sweep()` runs whenever a wait times out."""

    collector: Collector
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
        return self.collector.exchange

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
    hints = ("trade",)

    async def watch(self) -> Any:
        return await self.exchange.watch_trades(self.symbol)

    async def on_update(self, result: Any) -> None:
        await self.sweep()

    async def sweep(self) -> None:
        """Publish what ccxt's trade cache holds beyond what we published. ccxt.pro signals only messages
        that arrive while a watch_* call waits; one arriving between two calls sits in the cache until the
        next message, so reading the cache's tail picks it up at once."""
        cache = self.exchange.trades.get(self.symbol) if self.exchange.trades else None
        state = self.collector.state_by_symbol[self.symbol]
        fresh = state.new_trades(cache_tail(cache, state))
        if not fresh:
            return
        ts_recv = time.time_ns()
        trades = [trade_event(self.collector.exchange_id, self.symbol, t, ts_recv) for t in fresh]
        self.collector.count["trades"] += len(trades)
        outage = self.stats["trades"].outage
        ids = [t.trade_id for t in trades]
        if outage is not None and outage.last_id in ids:  # received before the break: they do not end it
            cut = ids.index(outage.last_id) + 1
            before, trades = trades[:cut], trades[cut:]
            await self.collector.emit(self, "trades", before, before[0].ts_event, before[-1].ts_event,
                                      last_id=before[-1].trade_id, ends_outage=False)
            if not trades:
                return
        await self.collector.emit(self, "trades", trades, trades[0].ts_event, trades[-1].ts_event,
                                  last_id=trades[-1].trade_id, first_id=trades[0].trade_id)

    def position(self) -> tuple[int, str] | None:
        cache = self.exchange.trades.get(self.symbol) if self.exchange.trades else None
        if not cache:
            return None
        last = cache[-1]
        return int(last.get("timestamp") or 0) * MS, str(last.get("id"))


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
    from the last closed candle, so candles keep coming during an outage."""

    hints = ("kline", "ohlcv", "candle")

    last_rest_poll: float = 0.0

    async def watch(self) -> Any:
        return await self.exchange.watch_ohlcv(self.symbol, self.collector.exchange_settings.timeframe)

    async def on_update(self, result: Any) -> None:
        await self.collector.on_candles(self, self.symbol, result, "ws")

    def position(self) -> tuple[int, str] | None:
        tf = self.collector.exchange_settings.timeframe
        cached = (self.exchange.ohlcvs or {}).get(self.symbol, {}).get(tf)
        return (int(cached[-1][0]) * MS, "") if cached else None

    async def sweep(self) -> None:
        tf = self.collector.exchange_settings.timeframe
        cached = (self.exchange.ohlcvs or {}).get(self.symbol, {}).get(tf)
        if cached:  # updates that arrived between two watch calls (see TradesFeed.sweep); not news after a break
            await self.collector.on_candles(self, self.symbol, list(cached[-2:]), "ws", ends_outage=False)
        if time.monotonic() - self.quiet_since >= self.collector.exchange_settings.ws_stall_s:
            await self.on_break()

    async def on_break(self) -> None:
        now = time.monotonic()
        if now - self.last_rest_poll >= self.collector.exchange_settings.rest_poll_s:
            self.last_rest_poll = now
            await self.collector.poll_candles(self, self.symbol)


class TickerFeed(Feed):
    hints = ("ticker", "bidask")
    bids_asks: bool = False  # Binance: the bookTicker stream through watch_bids_asks

    async def watch(self) -> Any:
        if self.bids_asks:
            return (await self.exchange.watch_bids_asks([self.symbol]))[self.symbol]
        return await self.exchange.watch_ticker(self.symbol)

    async def on_update(self, result: Any) -> None:
        t = ev.ticker_event(self.collector.exchange_id, self.symbol, result, time.time_ns())
        await self.collector.emit(self, "ticker", [t], t.ts_event, t.ts_event)


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
        settings = self.collector.exchange_settings
        if not self.pending or time.monotonic() - self.last_published < 1.0 / settings.book_max_per_s:
            return
        ob = (self.exchange.orderbooks or {}).get(self.symbol)
        self.pending = False
        if ob is None:  # dropped by ccxt after a sequence break; the next watch rebuilds it
            return
        self.last_published = time.monotonic()
        book = ev.book_event(self.collector.exchange_id, self.symbol, ob, settings.book_depth, time.time_ns())
        if ev.crossed(book):
            await self.collector.on_crossed_book(self, book)
            return
        self.collector.count["books"] += 1
        await self.collector.emit(self, "book", [book], book.ts_event, book.ts_event)


class MarkPriceFeed(Feed):
    """Binance USD-M markPrice stream: funding rate, mark and index price."""

    hints = ("markprice",)

    async def watch(self) -> Any:
        return await self.exchange.watch_mark_price(self.symbol)

    async def on_update(self, result: Any) -> None:
        f = ev.funding_from_mark_price(self.collector.exchange_id, self.symbol, result, time.time_ns())
        await self.collector.emit(self, "funding", [f], f.ts_event, f.ts_event)


class AssetContextFeed(Feed):
    """Hyperliquid activeAssetCtx through watch_ticker: ticker, funding and open interest in one message."""

    hints = ("ticker", "assetctx")

    async def watch(self) -> Any:
        return await self.exchange.watch_ticker(self.symbol)

    async def on_update(self, result: Any) -> None:
        ts_recv = time.time_ns()
        ex = self.collector.exchange_id
        for channel in self.channels:
            event: Event
            if channel == "ticker":
                event = ev.ticker_event(ex, self.symbol, result, ts_recv)
            elif channel == "funding":
                event = ev.funding_from_asset_context(ex, self.symbol, result, ts_recv)
            else:
                event = ev.open_interest_from_asset_context(ex, self.symbol, result, ts_recv)
            await self.collector.emit(self, channel, [event], event.ts_event, event.ts_event)


@dataclass
class PolledFeed:
    """A channel the exchange offers only over REST: polled every rest_channel_poll_s through the shared
    budget. A failed poll is counted and logged; the channel's last-message age in `mdp status` shows it."""

    collector: Collector
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
        ex, rest = self.collector.exchange_id, cast("BudgetedExchange", self.collector.rest)
        if self.channel == "funding":
            f = await rest.call(1, self.collector.exchange.fetch_funding_rate, self.symbol)
            return [ev.funding_from_rest(ex, self.symbol, f, time.time_ns())]
        oi = await rest.call(1, self.collector.exchange.fetch_open_interest, self.symbol)
        return [ev.open_interest_from_rest(ex, self.symbol, oi, time.time_ns())]


def _is_derivative(market: dict[str, Any]) -> bool:
    return bool(market.get("swap") or market.get("future"))


def plan_feeds(collector: Collector, exchange: Any, settings: ExchangeSettings,
               symbols: list[str]) -> tuple[list[Feed], list[PolledFeed]]:
    """The feeds serving `settings.channels` for `symbols`, or ConfigError for a channel the exchange (or a
    symbol's market type) does not offer through ccxt."""
    has = exchange.has
    ex_id = settings.id
    asset_ctx = ex_id == "hyperliquid"
    feeds: list[Feed] = []
    polled: list[PolledFeed] = []

    def unsupported(channel: str, needs: str) -> ConfigError:
        return ConfigError(f"exchanges[{ex_id}].channels: {ex_id} does not offer channel {channel!r} through "
                           f"ccxt (needs {needs}); remove {channel!r} from its channels")

    def stall(channel: str) -> float:
        return settings.stall_s.get(channel, settings.ws_stall_s)

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
            feeds.append(TradesFeed(collector, symbol, ("trades",), stall("trades")))
        if "candles" in wanted:
            if not has.get("watchOHLCV"):
                raise unsupported("candles", "has['watchOHLCV']")
            feeds.append(CandlesFeed(collector, symbol, ("candles",), stall("candles")))
        if "book" in wanted:
            if not has.get("watchOrderBook"):
                raise unsupported("book", "has['watchOrderBook']")
            feeds.append(BookFeed(collector, symbol, ("book",), stall("book")))
        context = tuple(c for c in ("ticker", "funding", "open_interest") if c in wanted) if asset_ctx else ()
        if context:
            if not has.get("watchTicker"):
                raise unsupported(context[0], "has['watchTicker']")
            feeds.append(AssetContextFeed(collector, symbol, context, min(stall(c) for c in context)))
        if "ticker" in wanted and not asset_ctx:
            if has.get("watchBidsAsks"):
                feed = TickerFeed(collector, symbol, ("ticker",), stall("ticker"))
                feed.bids_asks = True
                feeds.append(feed)
            elif has.get("watchTicker"):
                feeds.append(TickerFeed(collector, symbol, ("ticker",), stall("ticker")))
            else:
                raise unsupported("ticker", "has['watchBidsAsks'] or has['watchTicker']")
        if "funding" in wanted and not asset_ctx:
            if has.get("watchMarkPrice"):
                feeds.append(MarkPriceFeed(collector, symbol, ("funding",), stall("funding")))
            elif has.get("fetchFundingRate"):
                polled.append(PolledFeed(collector, symbol, "funding"))
            else:
                raise unsupported("funding", "has['watchMarkPrice'] or has['fetchFundingRate']")
        if "open_interest" in wanted and not asset_ctx:
            if has.get("fetchOpenInterest"):
                polled.append(PolledFeed(collector, symbol, "open_interest"))
            else:
                raise unsupported("open_interest", "has['fetchOpenInterest']")
    return feeds, polled


def crossed_alert(collector: Collector, book: Any) -> Alert:
    now = time.time_ns()
    return Alert(rule="book.crossed", severity="error", source=f"collector:{collector.exchange_id}",
                 exchange=collector.exchange_id, symbol=book.symbol, kind="book",
                 reason=(f"order book {collector.exchange_id} {book.symbol} at sequence {book.sequence} is crossed "
                         f"(best bid {book.bids[0][0]} >= best ask {book.asks[0][0]}); not published, the book is "
                         f"rebuilt from a fresh snapshot (reconnect)"),
                 values={"best_bid": str(book.bids[0][0]), "best_ask": str(book.asks[0][0]),
                         "sequence": None if book.sequence is None else str(book.sequence)},
                 ts_event=book.ts_event, ts_recv=now)

