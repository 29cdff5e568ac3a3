"""The decode fast path for order books on Binance spot (`binance`) and USD-M (`binanceusdm`): the `book` channel's
depth diffs are decoded once by msgspec (common/exchanges/wire/binance_depth.py) instead of by ccxt.pro, under ccxt's
own sequencing rules, so the feed publishes the same OrderBook events at the same moments (docs/collector.md
"Decode fast path: books"; tests/test_fast_path_depth.py replays every real capture through both).

What stays ccxt's: the markets, the connection (dial, URL rewriting, subscribe message, ping, reconnect: the
frames reach us through frame_tap.py), the depth snapshot (`fetch_rest_order_book_safe`, which the collector
routes through the exchange's REST budget, service.py `_budget_rest`) and the futures a watch waits on. What is
ours: the subscription's acknowledgement handler (ccxt's handle_order_book_subscription: a new book, buffer, fetch
the snapshot), the snapshot's replay of the buffered diffs, the live diff handler (ccxt's handle_order_book) and
the book itself, kept where ccxt keeps its own (`exchange.orderbooks[symbol]`) so that BookFeed's throttled,
never-crossed publishing, its crossed-book rebuild and connections.py see no difference. A sequence break is
ccxt's: ChecksumError (same message) rejects the watch, the book is dropped and the next watch resubscribes and
fetches a new snapshot; the collector counts a `book_resyncs` and publishes the outage's Gap as on the ccxt path.

Switch: `exchanges[].fast_path.book` (on unless set false, for the exchanges in FAST_BOOK_EXCHANGES).
"""

from __future__ import annotations

import logging
from typing import Any

import ccxt
import msgspec

from common.config import ExchangeSettings
from common.exchanges.wire.binance_depth import DepthBook, DepthUpdate, Step, decode_depth, replay, step
from services.collector.feeds import BookFeed, fast_path
from services.collector.frame_tap import FrameTap

log = logging.getLogger(__name__)

__all__ = ["FAST_BOOK_EXCHANGES", "BinanceBooks", "FastBookFeed", "book_feed"]

FAST_BOOK_EXCHANGES = frozenset({"binance", "binanceusdm"})  # where the fast path exists


class BinanceBooks:
    """The fast-path books of one ccxt.pro Binance exchange object: subscribing, the snapshot, the diffs."""

    def __init__(self, exchange: Any) -> None:
        self.exchange = exchange
        self.tap = FrameTap.of(exchange)
        self.tap.add(self.on_frame)
        self.symbols: dict[tuple[bool, str], str] = {}  # (spot connection, exchange symbol id) -> unified symbol
        self.malformed = 0

    @classmethod
    def of(cls, exchange: Any) -> BinanceBooks:
        books = getattr(exchange, "mdp_fast_books", None)
        if books is None:
            books = exchange.mdp_fast_books = cls(exchange)
        assert isinstance(books, BinanceBooks)
        return books

    # -- subscribing: ccxt's watch_order_book_for_symbols for one symbol --------------------------------------

    async def watch(self, symbol: str) -> DepthBook:
        """Wait for the next update of `symbol`'s book (subscribing first where the connection lacks it)."""
        ex = self.exchange
        market = ex.market(symbol)
        kind = market["type"]
        if market["option"] is True:
            kind = "option"
        elif market["contract"] is True:
            kind = "linear" if market["linear"] is True else "inverse"
        rate, _ = ex.handle_option_string_and_params({}, "watchOrderBookForSymbols", "watchOrderBookRate", "100")
        message_hash = "orderbook::" + symbol
        url = (ex.get_ws_url(kind, ex.get_future_ws_category("depth")) + "/"
               + ex.stream(kind, "multipleOrderbook::" + symbol, 1))
        request_id = ex.request_id(url)
        request = {"method": "SUBSCRIBE", "params": [f"{market['lowercaseId']}@depth@{rate}ms"], "id": request_id}
        subscription = {"id": str(request_id), "name": "depth", "symbols": [symbol], "method": self.on_subscribed,
                        "limit": None, "type": kind, "params": {}}
        self.tap.install(ex.client(url))
        book: DepthBook = await ex.watch_multiple(url, [message_hash], request, [message_hash], subscription)
        return book.limit()

    def on_subscribed(self, client: Any, message: Any, subscription: dict[str, Any]) -> None:
        """The subscription's acknowledgement (ccxt's handle_order_book_subscription): each symbol's book starts
        buffering and its snapshot is fetched in the background."""
        ex = self.exchange
        limit = ex.safe_integer(ex.options, "watchOrderBookLimit", 1000)
        for symbol in subscription["symbols"]:
            book = ex.orderbooks.get(symbol)
            if not isinstance(book, DepthBook):
                book = ex.orderbooks[symbol] = DepthBook(symbol, limit)
            book.nonce = None
            book.cache = []
            ex.spawn(self.fetch_snapshot, client, dict(subscription, symbol=symbol))

    async def fetch_snapshot(self, client: Any, subscription: dict[str, Any]) -> None:
        """ccxt's fetch_order_book_snapshot: the REST snapshot (through the collector's budget), the buffered
        diffs replayed onto it, the waiting watch resolved. A failure rejects the watch and forgets the
        subscription, so the next watch subscribes again."""
        ex = self.exchange
        symbol = subscription["symbol"]
        message_hash = "orderbook::" + symbol
        try:
            limit = ex.safe_integer(ex.options, "watchOrderBookLimit", 1000)
            snapshot = await ex.fetch_rest_order_book_safe(symbol, limit, subscription["params"])
            book = ex.orderbooks.get(symbol)
            if book is None:  # dropped before the snapshot came
                return
            book.reset(snapshot)
            cached, book.cache = book.cache, []
            replay(book, cached, subscription["type"] == "linear")
            ex.orderbooks[symbol] = book
            client.resolve(book, message_hash)
        except Exception as exc:  # noqa: BLE001 - ccxt's own handling: whatever failed is the watcher's error
            client.subscriptions.pop(message_hash, None)
            client.reject(exc, message_hash)

    # -- the frames ----------------------------------------------------------------------------------------

    def on_frame(self, client: Any, frame: str) -> bool:
        """A text frame of a connection: a depth diff is taken (and handled as ccxt would), anything else is
        left to ccxt; so is a diff of a book the fast path does not keep."""
        try:
            diff = decode_depth(frame)
        except msgspec.DecodeError as exc:
            # Ignored, as ccxt ignores a diff it cannot read: the next diff does not chain, so the book resyncs.
            self.malformed += 1
            log.error("%s: a depth frame does not decode (%s), ignored (the sequence check resyncs the book): "
                      "%.200s", self.exchange.id, exc, frame)
            return True
        if diff is None:
            return False
        symbol = self.symbol_of(client, diff.s)
        book = self.exchange.orderbooks.get(symbol)
        if book is None:  # not subscribed yet or dropped after a break: ccxt ignores these too
            return True
        if not isinstance(book, DepthBook):
            return False
        self.on_diff(client, symbol, book, diff)
        return True

    def symbol_of(self, client: Any, market_id: str) -> str:
        """The unified symbol of a diff's `s`, as ccxt resolves it (the connection says spot or swap)."""
        spot = getattr(client, "mdp_spot", None)
        if spot is None:  # ccxt's own test of the connection's market type, once per connection
            spot = client.mdp_spot = bool(self.exchange.is_spot_url(client))
        symbol = self.symbols.get((spot, market_id))
        if symbol is None:
            market = self.exchange.safe_market(market_id, None, None, "spot" if spot else "swap")
            symbol = self.symbols[(spot, market_id)] = str(market["symbol"])
        return symbol

    def on_diff(self, client: Any, symbol: str, book: DepthBook, diff: DepthUpdate) -> None:
        """ccxt's handle_order_book on one decoded diff."""
        if book.nonce is None:  # the snapshot is on its way
            book.cache.append(diff)
            return
        outcome = step(book, diff)
        if outcome is Step.APPLIED:
            client.resolve(book, "orderbook::" + symbol)
        elif outcome is Step.BREAK and self.exchange.handle_option("watchOrderBook", "checksum", True) is True:
            ex = self.exchange
            self.drop(client, symbol, ccxt.ChecksumError(ex.id + " " + ex.orderbook_checksum_message(symbol)))

    def drop(self, client: Any, symbol: str, error: Exception) -> None:
        """ccxt's answer to a broken book: forget it and the subscription, fail the watch (the next resubscribes)."""
        message_hash = "orderbook::" + symbol
        self.exchange.orderbooks.pop(symbol, None)
        client.subscriptions.pop(message_hash, None)
        client.reject(error, message_hash)


class FastBookFeed(BookFeed):
    """BookFeed (throttled, bounded, never crossed) on the fast path's books: only how it waits differs."""

    async def watch(self) -> Any:
        return await BinanceBooks.of(self.exchange).watch(self.symbol)


def book_feed(settings: ExchangeSettings) -> type[BookFeed]:
    """The feed class of the `book` channel: the fast path's where it exists and is switched on."""
    return FastBookFeed if fast_path(settings, "book", FAST_BOOK_EXCHANGES) else BookFeed
