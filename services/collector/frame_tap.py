"""Raw WebSocket frames of ccxt.pro connections, offered to the collector's own decoders before ccxt parses them:
the frame source of the decode fast path (docs/collector.md "Decode fast path: books").

ccxt.pro keeps doing everything else on the connection (dialing, URL rewriting, subscribing, ping/pong,
reconnects, the collector's close/error hooks in connections.py); only the frames a fast-path handler takes skip
ccxt's json.loads and its handle_message. A handler gets (client, frame text) and answers whether it took the
frame; one that does not (another channel, an unknown symbol) leaves it to ccxt, so installing the tap on a
connection that also carries other channels changes nothing for them. Any channel's fast path can add its own
handler to the same tap (each one tests its frames by a cheap prefix first).

The tap also replaces ccxt.pro's receive loop on its connections (`read_frames`). ccxt's loop creates a Task, a
done callback and a `call_soon` for every frame; ours is one long-lived task per connection that awaits aiohttp's
queue (an await on a non-empty queue returns without suspending, so a burst of frames is read in one wake-up),
gives each text frame to the handlers and, if none takes it, to ccxt's own text handler, and every other message
(binary, ping, pong, close, error) to ccxt's `handle_message`, in order, as ccxt's loop does. When the queue is
empty (the end of a burst) it calls the `flushers`: a fast path that collects decoded frames wakes its consumer
once per burst instead of once per frame.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from aiohttp import WSMsgType
from ccxt.base.errors import NetworkError

__all__ = ["BURST_FRAMES", "FrameFlusher", "FrameHandler", "FrameTap"]

log = logging.getLogger(__name__)

FrameHandler = Callable[[Any, str], bool]  # (ccxt client, text frame) -> taken
FrameFlusher = Callable[[Any], None]  # (ccxt client): the end of a burst of frames on it

# Frames read in one go at most before the reader yields to the other tasks (and flushes): a bound on how long a
# deep queue can hold the feeds and the publisher back.
BURST_FRAMES = 1000

TEXT = WSMsgType.TEXT


class FrameTap:
    """The fast-path handlers of one ccxt.pro exchange object, installed on each of its connections as it is
    used (`install`, idempotent; ccxt makes a new client object for every reconnect)."""

    def __init__(self) -> None:
        self.handlers: list[FrameHandler] = []
        self.flushers: list[FrameFlusher] = []
        self.taken = 0  # frames a handler took (ccxt never saw them)
        self.wakeups = 0  # bursts read (reader wake-ups)

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

    def add(self, handler: FrameHandler, flusher: FrameFlusher | None = None) -> None:
        if handler not in self.handlers:
            self.handlers.append(handler)
        if flusher is not None and flusher not in self.flushers:
            self.flushers.append(flusher)

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
        client.mdp_ccxt_handles = ccxt_handles
        client.receive_loop = lambda: self._start_reader(client)  # ccxt.pro calls it once the socket is open
        client.mdp_frame_tap = self

    def _start_reader(self, client: Any) -> None:
        if client.closed():  # closed between connecting and the first read, as ccxt's receive_loop handles it
            client.on_close(1006)
            return
        client.mdp_reader = client.asyncio_loop.create_task(self.read_frames(client))

    async def read_frames(self, client: Any) -> None:
        """ccxt.pro's receive loop, one task per connection: a text frame goes to the handlers, and to ccxt's
        own text handler if none takes it; any other message (binary, ping, pong, close, error) to ccxt's
        `handle_message`, in order; `last_message_at` is kept as ccxt keeps it (once per burst). A failed read
        rejects the connection's futures as ccxt's loop does; once the connection is closed, ccxt's
        `on_close(1006)`. After each burst (the queue empty, or BURST_FRAMES read) the flushers run."""
        flushers = self.flushers
        while True:
            if client.closed():
                client.on_close(1006)
                return
            try:
                message = await client.receive()
            except asyncio.CancelledError:
                return  # the connection is being torn down (ccxt's loop returns on a cancelled read too)
            except Exception as exc:  # noqa: BLE001 - as ccxt's loop: any failed read fails the connection's waits
                client.reject(NetworkError(str(exc)))
                return
            self.wakeups += 1
            client.last_message_at = time.time_ns() // 1_000_000
            try:
                read = await self._burst(client, message)
            except asyncio.CancelledError:
                return
            except Exception as exc:
                # A bug in a handler (ours or ccxt's): logged with its traceback, and the connection failed as
                # ccxt fails it on an error (its futures rejected, the collector's error hook, closed), so the
                # feeds reconnect and the outage becomes a Gap instead of a reader that died silently.
                log.exception("handling a frame from %s failed; closing the connection", client.url)
                client.on_error(NetworkError(f"handling a frame failed: {type(exc).__name__}: {exc}"))
                return
            for flush in flushers:
                flush(client)
            if read >= BURST_FRAMES:
                await asyncio.sleep(0)

    async def _burst(self, client: Any, message: Any) -> int:
        """Handle `message` and the messages queued behind it (at most BURST_FRAMES in all); how many. (A read
        of a queued message returns without suspending; aiohttp's `receive` keeps its close handshake state.)"""
        handlers = self.handlers
        handle = client.handle_message
        ccxt_text = client.mdp_ccxt_handles
        queue = client.buffer  # aiohttp's message deque of the connection (ccxt's own accessor)
        read = 0
        while True:
            read += 1
            data = message.data
            if message.type is TEXT and type(data) is str:
                for handler in handlers:
                    if handler(client, data):
                        self.taken += 1
                        break
                else:
                    ccxt_text(data)
            else:
                handle(message)
            if not queue or read >= BURST_FRAMES or client.closed():
                return read
            message = await client.receive()
