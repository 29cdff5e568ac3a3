"""The decode fast paths' frame sources: Binance trade and bookTicker frames taken off ccxt.pro's own connections
before ccxt parses them, decoded once by msgspec (common/exchanges/wire/) and handed to the fast feed of their
symbol (feeds.py `FastTradesFeed`, `FastTickerFeed`); docs/collector.md, "Decode fast path".

The frames come through the exchange object's `FrameTap` (frame_tap.py, shared with the books' fast path),
installed on every connection ccxt.pro opens, so no frame of a new connection passes before it. A frame that is
not of the wire's kind, one our decoder refuses, or one of a symbol without a fast feed goes on to ccxt exactly
as before. ccxt still dials, subscribes, pings, reconnects and closes, and the collector's hooks on its
connections (connections.py) are untouched.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar, Protocol, Self

from common.exchanges.wire import binance_book_ticker, binance_trades
from services.collector.frame_tap import FrameTap

# Exchanges whose frames each wire decodes (Binance's payloads, one trade or one best bid/ask per frame).
FAST_TRADES = frozenset({"binance", "binanceusdm"})
FAST_TICKERS = frozenset({"binance", "binanceusdm"})


class Receiver(Protocol):
    """What a wire hands a decoded frame to (feeds.py FastTradesFeed, FastTickerFeed)."""

    symbol: str

    def on_decoded(self, client: Any, raw: Any, ts_recv: int) -> None: ...

    def wake(self, client: Any) -> None: ...


class Wire:
    """Routes the decoded frames of one kind (`looks`, `decode`; the payload's `s` names the exchange's
    symbol) of one exchange object to the receiver of their symbol, and wakes each receiver once per burst."""

    attribute: ClassVar[str]  # where the exchange object keeps its wire of this kind

    def __init__(self, exchange: Any) -> None:
        self.exchange = exchange
        self.receivers: dict[str, Receiver] = {}  # by unified symbol
        self._routes: dict[tuple[bool, str], Receiver | None] = {}  # (spot connection, exchange's id)
        self._woken: dict[int, Receiver] = {}  # by id(): receivers given frames in the current burst
        FrameTap.of(exchange).add(self.take, self.flush)

    @classmethod
    def of(cls, exchange: Any) -> Self:
        """The exchange object's wire of this kind, made on first use."""
        wire = getattr(exchange, cls.attribute, None)
        if not isinstance(wire, cls):
            wire = cls(exchange)
            setattr(exchange, cls.attribute, wire)
        return wire

    @staticmethod
    def looks(frame: object) -> bool:
        """The cheap test of a frame, before decoding."""
        raise NotImplementedError

    @staticmethod
    def decode(frame: str) -> Any:
        """The frame's payload (with the exchange's symbol in `s`), or None."""
        raise NotImplementedError

    def add(self, receiver: Receiver) -> None:
        self.receivers[receiver.symbol] = receiver
        self._routes.clear()

    def route(self, spot: bool, market_id: str) -> Receiver | None:
        """The receiver of a frame of `market_id` on a spot (or contract) connection: by the symbol ccxt.pro
        binance's handlers give it (`safe_market` of the id and the connection's market type)."""
        key = (spot, market_id)
        if key not in self._routes:
            market = self.exchange.safe_market(market_id, None, None, "spot" if spot else "contract")
            self._routes[key] = self.receivers.get(market["symbol"])
        return self._routes[key]

    def take(self, client: Any, frame: str) -> bool:
        """A FrameTap handler: whether `frame` was of this kind and of a symbol with a receiver (then it has it)."""
        if not self.looks(frame):
            return False
        ts_recv = time.time_ns()
        raw = self.decode(frame)
        if raw is None:
            return False
        spot = getattr(client, "mdp_spot", None)
        if spot is None:  # ccxt's own test of the connection's market type, once per connection
            spot = client.mdp_spot = bool(self.exchange.is_spot_url(client))
        receiver = self.route(spot, raw.s)
        if receiver is None:
            return False
        receiver.on_decoded(client, raw, ts_recv)
        if getattr(client, "mdp_reader", None) is None:  # not read by the tap's reader: no flush will come
            receiver.wake(client)
        else:
            self._woken[id(receiver)] = receiver
        return True

    def flush(self, client: Any) -> None:
        """The end of a burst of frames on `client` (FrameTap's reader): wake each receiver that got frames in
        it, once."""
        if self._woken:
            woken, self._woken = self._woken, {}
            for receiver in woken.values():
                receiver.wake(client)


class TradeWire(Wire):
    """Binance trade frames (common/exchanges/wire/binance_trades.py)."""

    attribute = "mdp_trade_wire"

    @staticmethod
    def looks(frame: object) -> bool:
        return binance_trades.is_trade_frame(frame)

    @staticmethod
    def decode(frame: str) -> Any:
        return binance_trades.decode(frame)


class BookTickerWire(Wire):
    """Binance bookTicker frames (common/exchanges/wire/binance_book_ticker.py)."""

    attribute = "mdp_book_ticker_wire"

    @staticmethod
    def looks(frame: object) -> bool:
        return binance_book_ticker.is_book_ticker_frame(frame)

    @staticmethod
    def decode(frame: str) -> Any:
        return binance_book_ticker.decode(frame)
