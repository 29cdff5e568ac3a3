"""Raw WebSocket frames of ccxt.pro connections, offered to the collector's own decoders before ccxt parses them:
the frame source of the decode fast path (docs/collector.md "Decode fast path: books").

ccxt.pro keeps doing everything else on the connection (dialing, URL rewriting, subscribing, ping/pong,
reconnects, the collector's close/error hooks in connections.py); only the frames a fast-path handler takes skip
ccxt's json.loads and its handle_message. A handler gets (client, frame text) and answers whether it took the
frame; one that does not (another channel, an unknown symbol) leaves it to ccxt, so installing the tap on a
connection that also carries other channels changes nothing for them. Any channel's fast path can add its own
handler to the same tap (each one tests its frames by a cheap prefix first).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["FrameHandler", "FrameTap"]

FrameHandler = Callable[[Any, str], bool]  # (ccxt client, text frame) -> taken


class FrameTap:
    """The fast-path handlers of one ccxt.pro exchange object, installed on each of its connections as it is
    used (`install`, idempotent; ccxt makes a new client object for every reconnect)."""

    def __init__(self) -> None:
        self.handlers: list[FrameHandler] = []
        self.taken = 0  # frames a handler took (ccxt never saw them)

    @classmethod
    def of(cls, exchange: Any) -> FrameTap:
        """The tap of a ccxt.pro exchange object, made once (`exchange.mdp_frame_tap`) and installed on every
        connection the object opens from then on (ccxt.pro makes each one through `exchange.client(url)`)."""
        tap = getattr(exchange, "mdp_frame_tap", None)
        if isinstance(tap, FrameTap):
            return tap
        made = cls()
        opened = exchange.client

        def client(url: str) -> Any:
            conn = opened(url)
            made.install(conn)  # idempotent
            return conn

        exchange.client = client
        exchange.mdp_frame_tap = made
        return made

    def add(self, handler: FrameHandler) -> None:
        if handler not in self.handlers:
            self.handlers.append(handler)

    def install(self, client: Any) -> None:
        """Route `client`'s text frames through the handlers first (ccxt's Client.handle_text_or_binary_message,
        which every TEXT and BINARY frame passes, decompressed)."""
        if getattr(client, "mdp_frame_tap", None) is self:
            return
        ccxt_handles = client.handle_text_or_binary_message
        handlers = self.handlers

        def tapped(data: Any) -> Any:
            if isinstance(data, bytes) and client.decompressBinary:
                data = data.decode()
            if isinstance(data, str):
                for handler in handlers:
                    if handler(client, data):
                        self.taken += 1
                        return None
            return ccxt_handles(data)

        client.handle_text_or_binary_message = tapped
        client.mdp_frame_tap = self
