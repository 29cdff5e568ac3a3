"""cryptofeed's Binance trades -> its Redis Streams backend, pointed at our simulator: one contender of
tools/bench_collector.py, run with the interpreter of the cryptofeed venv that benchmark builds
(var/bench/cryptofeed-venv), never with the project's (cryptofeed is not a project dependency).

    var/bench/cryptofeed-venv/bin/python tools/bench_cryptofeed_client.py --ws ws://127.0.0.1:PORT \
        --rest http://127.0.0.1:PORT --redis-port 6379

Writes every trade of BTC-USDT to the stream `trades-BINANCE-BTC-USDT` (cryptofeed's `TradeStream`, one XADD per
trade with fields id, price, amount, side, timestamp, ...), until SIGTERM.

What is changed in cryptofeed 2.4.1, and why (nothing else is):
- the endpoints: its Binance feed's WebSocket and REST addresses are class attributes naming the real exchange;
  a subclass names the simulator's instead (same paths: /stream?streams=..., /api/v3/exchangeInfo);
- plain ws://: its WebSocket connection refuses any address but wss://; the simulator serves plain WebSocket on
  loopback (as it does to every contender), so the connection is built with the wss:// check passed and then
  connects to the ws:// address (`_plain_ws`);
- the trade stream: cryptofeed subscribes its TRADES channel to Binance's `aggTrade` stream; the benchmark
  replays Binance's `trade` stream (one trade per message, what the other contenders read), so the subclass
  subscribes to `trade` and builds cryptofeed's own `Trade` from it exactly as cryptofeed's `_trade` does from an
  aggTrade (the same parser, Decimal fields and callback), with the trade id `t` where an aggTrade has `a`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from decimal import Decimal
from typing import Any, ClassVar

from cryptofeed import FeedHandler  # type: ignore[import-not-found]
from cryptofeed.backends.redis import TradeStream  # type: ignore[import-not-found]
from cryptofeed.connection import (  # type: ignore[import-not-found]
    RestEndpoint,
    Routes,
    WebsocketEndpoint,
    WSAsyncConn,
)
from cryptofeed.defines import BUY, SELL, TRADES  # type: ignore[import-not-found]
from cryptofeed.exchanges.binance import Binance  # type: ignore[import-not-found]
from cryptofeed.types import Trade  # type: ignore[import-not-found]
from yapic import json  # type: ignore[import-not-found]  # the JSON parser cryptofeed's Binance feed uses


def _plain_ws() -> None:
    """Let cryptofeed's WebSocket connection take a ws:// address (its constructor accepts only wss://)."""
    init = WSAsyncConn.__init__

    def plain_init(self: Any, address: str, conn_id: str, *args: Any, **kwargs: Any) -> None:
        init(self, "wss://" + address.removeprefix("ws://"), conn_id, *args, **kwargs)
        self.address = address

    WSAsyncConn.__init__ = plain_init


def feed_class(ws: str, rest: str) -> type[Any]:
    """cryptofeed's Binance feed with the simulator's endpoints and the one-trade-per-message `trade` stream."""

    class SimulatedBinance(Binance):
        websocket_endpoints: ClassVar[list[Any]] = [WebsocketEndpoint(ws)]
        rest_endpoints: ClassVar[list[Any]] = [RestEndpoint(rest, routes=Routes(
            "/api/v3/exchangeInfo", l2book="/api/v3/depth?symbol={}&limit={}"))]
        websocket_channels: ClassVar[dict[str, str]] = {**Binance.websocket_channels, TRADES: "trade"}

        async def message_handler(self, msg: str, conn: Any, timestamp: float) -> None:
            data = json.loads(msg, parse_float=Decimal)
            trade = data.get("data", {})
            if trade.get("e") != "trade":
                await super().message_handler(msg, conn, timestamp)
                return
            t = Trade(self.id, self.exchange_symbol_to_std_symbol(trade["s"]), SELL if trade["m"] else BUY,
                      Decimal(trade["q"]), Decimal(trade["p"]), self.timestamp_normalize(trade["T"]),
                      id=str(trade["t"]), raw=trade)
            await self.callback(TRADES, t, timestamp)

    return SimulatedBinance


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ws", required=True, help="the simulator's WebSocket base, e.g. ws://127.0.0.1:8765")
    p.add_argument("--rest", required=True, help="the simulator's REST base, e.g. http://127.0.0.1:8765")
    p.add_argument("--redis-port", type=int, required=True)
    p.add_argument("--symbol", default="BTC-USDT")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    _plain_ws()
    fh = FeedHandler(config={"uvloop": True, "log": {"filename": "/dev/null", "level": "WARNING"}})
    feed = feed_class(args.ws, args.rest)
    fh.add_feed(feed(symbols=[args.symbol], channels=[TRADES],
                     callbacks={TRADES: TradeStream(host="127.0.0.1", port=args.redis_port)}))
    asyncio.set_event_loop(asyncio.new_event_loop())  # fh.run() asks for the current loop (uvloop's policy, set above)
    fh.run()


if __name__ == "__main__":
    main()
