"""The trade decode fast path's frame source: Binance trade frames taken off ccxt.pro's own connections before ccxt
parses them, decoded once by msgspec (common/exchanges/wire/binance_trades.py) and handed to the fast trades feed
of their symbol (feeds.py `FastTradesFeed`); docs/collector.md, "Decode fast path: trades".

The frames come through the exchange object's `FrameTap` (frame_tap.py, shared with the books' fast path),
installed on every connection ccxt.pro opens, so no frame of a new connection passes before it. A frame that is not a trade, a trade our decoder refuses, or a trade of a symbol without a
fast feed goes on to ccxt exactly as before. ccxt still dials, subscribes, pings, reconnects and closes, and the
collector's hooks on its connections (connections.py) are untouched.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

from common.exchanges.wire.binance_trades import BinanceTrade, decode, is_trade_frame
from services.collector.frame_tap import FrameTap

# Exchanges whose trade frames TradeWire decodes (the Binance trade payload, one trade per frame).
FAST_TRADES = frozenset({"binance", "binanceusdm"})


class TradeReceiver(Protocol):
    """What the wire hands a decoded trade to (feeds.py FastTradesFeed)."""

    symbol: str

    def on_trade(self, client: Any, raw: BinanceTrade, ts_recv: int) -> None: ...

    def wake(self, client: Any) -> None: ...


class TradeWire:
    """Routes the decoded trade frames of one exchange object to the receiver of their symbol."""

    def __init__(self, exchange: Any) -> None:
        self.exchange = exchange
        self.receivers: dict[str, TradeReceiver] = {}  # by unified symbol
        self._routes: dict[tuple[bool, str], TradeReceiver | None] = {}  # (spot connection, exchange's id)
        self._woken: dict[int, TradeReceiver] = {}  # by id(): receivers given trades in the current burst
        FrameTap.of(exchange).add(self.take, self.flush)

    @classmethod
    def of(cls, exchange: Any) -> TradeWire:
        """The exchange object's wire, made on first use."""
        wire: TradeWire | None = getattr(exchange, "mdp_trade_wire", None)
        if wire is None:
            wire = cls(exchange)
            exchange.mdp_trade_wire = wire
        return wire

    def add(self, receiver: TradeReceiver) -> None:
        self.receivers[receiver.symbol] = receiver
        self._routes.clear()

    def route(self, spot: bool, market_id: str) -> TradeReceiver | None:
        """The receiver of a trade of `market_id` on a spot (or contract) connection: by the symbol ccxt.pro
        binance's handle_trade gives it (`safe_market` of the id and the connection's market type)."""
        key = (spot, market_id)
        if key not in self._routes:
            market = self.exchange.safe_market(market_id, None, None, "spot" if spot else "contract")
            self._routes[key] = self.receivers.get(market["symbol"])
        return self._routes[key]

    def take(self, client: Any, frame: str) -> bool:
        """A FrameTap handler: whether `frame` was a trade of a symbol with a receiver (then it has it)."""
        if not is_trade_frame(frame):
            return False
        ts_recv = time.time_ns()
        raw = decode(frame)
        if raw is None:
            return False
        spot = getattr(client, "mdp_spot", None)
        if spot is None:  # ccxt's own test of the connection's market type, once per connection
            spot = client.mdp_spot = bool(self.exchange.is_spot_url(client))
        receiver = self.route(spot, raw.s)
        if receiver is None:
            return False
        receiver.on_trade(client, raw, ts_recv)
        if getattr(client, "mdp_reader", None) is None:  # not read by the tap's reader: no flush will come
            receiver.wake(client)
        else:
            self._woken[id(receiver)] = receiver
        return True

    def flush(self, client: Any) -> None:
        """The end of a burst of frames on `client` (FrameTap's reader): wake each receiver that got trades in
        it, once."""
        if self._woken:
            woken, self._woken = self._woken, {}
            for receiver in woken.values():
                receiver.wake(client)
