"""The collector's frame reader (services/collector/frame_tap.py `FrameTap.read_frames`), which replaces ccxt.pro's
receive loop on the connections of the decode fast path: on a real ccxt.pro connection to a local aiohttp
WebSocket server, a burst of frames is read in order in fewer wake-ups than frames, frames no handler takes reach
ccxt, and a frame that is not JSON fails the connection (ccxt's own loop would die on it and leave the waits
hanging)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import ccxt.pro
import pytest
from aiohttp import web
from ccxt.base.errors import NetworkError

from services.collector.frame_tap import FrameTap

FRAMES = 200


@pytest.fixture
async def ws_server() -> AsyncIterator[tuple[str, asyncio.Queue[list[str] | None]]]:
    """A WebSocket server on 127.0.0.1 that sends each list put in the queue as one burst (one write each);
    None ends it."""
    bursts: asyncio.Queue[list[str] | None] = asyncio.Queue()

    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        while not ws.closed:
            burst = await bursts.get()
            if burst is None:
                break
            for frame in burst:
                await ws.send_str(frame)
        return ws

    app = web.Application()
    app.router.add_get("/ws", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"ws://127.0.0.1:{port}/ws", bursts
    finally:
        bursts.put_nowait(None)
        await runner.cleanup()


async def wait_for(what: str, check: Any, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def test_a_burst_is_read_in_order_in_few_wakeups_and_other_frames_reach_ccxt(
        ws_server: tuple[str, asyncio.Queue[list[str] | None]]) -> None:
    url, bursts = ws_server
    exchange = ccxt.pro.binance()
    taken: list[int] = []
    flushes: list[int] = []
    to_ccxt: list[Any] = []
    tap = FrameTap.of(exchange)
    tap.add(lambda client, frame: frame.startswith('{"n"') and not taken.append(int(frame[6:-1])),
            lambda client: flushes.append(len(taken)))
    exchange.handle_message = lambda client, message: to_ccxt.append(message)  # ccxt's parse, then this
    try:
        client = exchange.client(url)
        await client.connect(exchange.session)
        await wait_for("the reader", lambda: getattr(client, "mdp_reader", None) is not None)
        bursts.put_nowait([f'{{"n": {i}}}' for i in range(FRAMES)] + ['{"other": 1}'])
        await wait_for("every frame", lambda: len(taken) == FRAMES and to_ccxt)
        await wait_for("the last flush", lambda: flushes and flushes[-1] == FRAMES)
    finally:
        await exchange.close()
    assert taken == list(range(FRAMES)), "every frame once, in order"
    assert to_ccxt == [{"other": 1}], "a frame no handler takes is parsed by ccxt and handed to the exchange"
    assert tap.taken == FRAMES
    assert tap.wakeups < FRAMES and len(flushes) == tap.wakeups, "a burst costs fewer wake-ups than frames"


async def test_a_frame_that_is_not_json_fails_the_connection(
        ws_server: tuple[str, asyncio.Queue[list[str] | None]], caplog: pytest.LogCaptureFixture) -> None:
    url, bursts = ws_server
    exchange = ccxt.pro.binance()
    FrameTap.of(exchange).add(lambda client, frame: False)
    try:
        client = exchange.client(url)
        await client.connect(exchange.session)
        await wait_for("the reader", lambda: getattr(client, "mdp_reader", None) is not None)
        waiting = client.future("trade::BTC/USDT")
        bursts.put_nowait(['{"e": "trade", "s": "BTCU'])  # cut in half
        with caplog.at_level(logging.ERROR, logger="services.collector.frame_tap"):
            with pytest.raises(NetworkError, match="handling a frame failed"):
                await asyncio.wait_for(waiting, 10)
            await wait_for("the connection closed", client.closed)
    finally:
        await exchange.close()
    assert any("handling a frame from" in r.getMessage() and r.exc_info for r in caplog.records), \
        "logged with its traceback"
    assert client.mdp_reader.done()


async def test_the_tap_is_installed_only_once_per_connection() -> None:
    exchange = ccxt.pro.binance()
    try:
        tap = FrameTap.of(exchange)
        assert FrameTap.of(exchange) is tap
        client = exchange.client("ws://127.0.0.1:9/ws")
        reader = client.receive_loop
        tap.install(client)
        assert client.receive_loop is reader and client.mdp_frame_tap is tap
    finally:
        await exchange.close()
