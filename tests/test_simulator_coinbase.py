"""The simulator's Coinbase Advanced Trade venue against the real, unmodified ccxt / ccxt.pro `coinbase`, and on
the wire (a raw aiohttp WebSocket client), replaying the real Coinbase Exchange capture.

Expected values are computed here straight from the capture file (its JSON lines), independently of the
venue's loader, so a loader or conversion bug shows up as a mismatch. Product under test: SKL-USD, the
recording's busiest (53 trades, ids 1568267..1568319, 2,592 book updates, 53 tickers).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import ccxt
import pytest

from common.config import ExchangeSettings
from common.exchanges.clients import make_pro_exchange
from simulator import FaultError, Simulator, real_data_dir, start_simulator
from simulator.coinbase import CoinbaseVenue

ROOT = Path(__file__).resolve().parent.parent
CAPTURE = real_data_dir(ROOT) / "cryptofeed-captures"
PRODUCT, SYMBOL = "SKL-USD", "SKL/USD"
WS_PATH = "/advanced-trade-ws.coinbase.com"
DEADLINE_S = 20.0
# Loops are paced by the loop time shift (3 minutes, see CoinbaseVenue.loop_shift_us): 3 s per loop at 60x.
LOOP_SPEED = 60


# ----------------------------------------------------------------------------------------------------------
# Expectations read from the capture itself


def recorded_messages() -> list[dict[str, Any]]:
    out = []
    for line in (CAPTURE / "COINBASE.ws.28.0").read_text().splitlines():
        if line[:1].isdigit():
            out.append(json.loads(line.split(": ", 1)[1]))
    return out


def recorded_trades(product: str) -> list[dict[str, Any]]:
    return [m for m in recorded_messages() if m["type"] in ("match", "last_match") and m["product_id"] == product]


def ms(iso: str) -> int:
    return int(datetime.fromisoformat(iso).timestamp() * 1000)


def recorded_books_at_tickers(product: str) -> tuple[list[tuple[Decimal, Decimal, bool]], dict[str, dict[Decimal,
                                                                                                     Decimal]]]:
    """For each recorded ticker of `product`: (its best bid, best ask, whether the recorded book's top equals
    them at that point), and the recorded book at the end."""
    book: dict[str, dict[Decimal, Decimal]] = {}
    out = []
    for m in recorded_messages():
        if m.get("product_id") != product:
            continue
        if m["type"] == "snapshot":
            book = {"buy": {Decimal(p): Decimal(s) for p, s in m["bids"]},
                    "sell": {Decimal(p): Decimal(s) for p, s in m["asks"]}}
        elif m["type"] == "l2update":
            for side, p, s in m["changes"]:
                if Decimal(s) == 0:
                    book[side].pop(Decimal(p), None)
                else:
                    book[side][Decimal(p)] = Decimal(s)
        elif m["type"] == "ticker":
            bid, ask = Decimal(m["best_bid"]), Decimal(m["best_ask"])
            out.append((bid, ask, bool(book) and max(book["buy"]) == bid and min(book["sell"]) == ask))
    return out, book


def recorded_product(product: str) -> dict[str, Any]:
    text = (CAPTURE / "COINBASE.0").read_text().splitlines()[0]
    rows = json.loads(text.split(": ", 1)[1])
    return next(r for r in rows if r["id"] == product)


# ----------------------------------------------------------------------------------------------------------
# Helpers


@contextlib.asynccontextmanager
async def coinbase_sim(**options: Any) -> AsyncIterator[tuple[Simulator, CoinbaseVenue]]:
    """A simulator serving coinbase (Binance trimmed to its minimum); the Coinbase replay starts only when
    the test calls `venue.restart()` unless `start` says otherwise."""
    options = {"start": "manual", "speed": 0, "max_trades": 10, "history": False, **options}
    async with start_simulator(venues=("coinbase",), **options) as sim:
        venue = sim.venues["coinbase"]
        assert isinstance(venue, CoinbaseVenue)
        yield sim, venue


def pro(sim: Simulator) -> Any:
    """ccxt.pro coinbase built the way the collector builds it (common/exchanges/clients.py)."""
    return make_pro_exchange(ExchangeSettings(id="coinbase", symbols=[SYMBOL], rest_url=sim.rest_url,
                                              ws_url=sim.ws_url))


def spy_messages(ex: Any) -> list[dict[str, Any]]:
    """Every message ccxt.pro's coinbase handles, in order, recorded after ccxt has handled it. (Wraps the
    instance's `handle_message` before its first socket: ccxt itself is not changed.) A collector can use
    the same hook to check `sequence_num`, which ccxt ignores."""
    seen: list[dict[str, Any]] = []
    handle = ex.handle_message

    def spy(client: Any, message: Any) -> Any:
        result = handle(client, message)
        seen.append(message)
        return result
    ex.handle_message = spy
    return seen


async def until(predicate: Callable[[], bool], what: str, timeout: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)


def subscribed(venue: CoinbaseVenue, *channels: str) -> Callable[[], bool]:
    def check() -> bool:
        conns = venue.status()["connections"]
        return bool(conns) and all(PRODUCT in c["subscriptions"].get(ch, []) for c in conns for ch in channels)
    return check


class Wire:
    """A raw Advanced Trade WebSocket client: what the venue puts on the wire, frame by frame."""

    def __init__(self, session: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.session, self.ws = session, ws
        self.frames: list[str] = []
        self.pongs = 0
        self.closed_code: int | None = None
        self._reader = asyncio.ensure_future(self._read())

    @classmethod
    async def open(cls, sim: Simulator) -> Wire:
        session = aiohttp.ClientSession()
        ws = await session.ws_connect(sim.ws_url + WS_PATH, autoping=False)
        return cls(session, ws)

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                self.frames.append(msg.data)
            elif msg.type == aiohttp.WSMsgType.PONG:
                self.pongs += 1
            elif msg.type == aiohttp.WSMsgType.PING:
                await self.ws.pong(msg.data)
        self.closed_code = self.ws.close_code

    async def subscribe(self, channel: str, products: list[str] | None = None) -> None:
        await self.ws.send_str(json.dumps({"type": "subscribe", "product_ids": products or [PRODUCT],
                                           "channel": channel}))

    def messages(self, channel: str | None = None) -> list[dict[str, Any]]:
        out = [json.loads(f) for f in self.frames]
        return [m for m in out if channel is None or m.get("channel") == channel]

    async def close(self) -> None:
        await self.ws.close()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        await self.session.close()


@contextlib.asynccontextmanager
async def wire(sim: Simulator) -> AsyncIterator[Wire]:
    w = await Wire.open(sim)
    try:
        yield w
    finally:
        await w.close()


async def collect_loop0_trades(ex: Any, got: list[dict[str, Any]], expected_ids: list[str]) -> list[dict[str, Any]]:
    """watch_trades until every id of the first loop has been returned. The replay loops so that the last
    trades of loop 0 are followed by more messages: ccxt's watch_trades returns only when a new message
    arrives, so trades that came in between two calls wait for the next message (at the end of a recording
    there would be none). Returns `got` (the trades returned so far) extended."""
    got = list(got)
    deadline = time.monotonic() + DEADLINE_S
    while not set(expected_ids) <= {t["id"] for t in got}:
        assert time.monotonic() < deadline, f"only {len(got)} trades within {DEADLINE_S} s"
        got += await asyncio.wait_for(ex.watch_trades(SYMBOL), DEADLINE_S)
    return got


# ----------------------------------------------------------------------------------------------------------
# Markets, trades, book, ticker, candles through ccxt


async def test_load_markets_calls_and_recorded_products() -> None:
    async with coinbase_sim() as (sim, venue):
        ex = pro(sim)
        try:
            markets = await ex.load_markets()
        finally:
            await ex.close()
        # ccxt 4.5.90 coinbase load_markets without keys: three v2 data-API calls (fetch_currencies) and the
        # public products list twice (spot, then product_type=FUTURE).
        assert venue.status()["rest"]["requests"] == {
            "/v2/currencies": 1, "/v2/currencies/crypto": 1, "/v2/exchange-rates": 1,
            "/api/v3/brokerage/market/products": 2}
        recorded = recorded_product(PRODUCT)
        rows = json.loads((CAPTURE / "COINBASE.0").read_text().splitlines()[0].split(": ", 1)[1])
        assert len(markets) == len(rows) == 162
        m = markets[SYMBOL]
        assert (m["id"], m["base"], m["quote"], m["type"], m["spot"], m["active"]) == (
            PRODUCT, "SKL", "USD", "spot", True, not recorded["trading_disabled"])
        assert m["precision"] == {"amount": float(recorded["base_increment"]),
                                  "price": float(recorded["quote_increment"])}
        assert m["limits"]["amount"] == {"min": float(recorded["base_min_size"]),
                                         "max": float(recorded["base_max_size"])}
        assert m["limits"]["cost"] == {"min": float(recorded["min_market_funds"]),
                                       "max": float(recorded["max_market_funds"])}


async def test_watch_trades_every_recorded_match_exactly_once() -> None:
    recorded = recorded_trades(PRODUCT)
    ids = [str(m["trade_id"]) for m in recorded]
    assert [int(i) for i in ids] == list(range(1568267, 1568320))  # continuous as recorded
    async with coinbase_sim(speed=LOOP_SPEED, loop=True) as (sim, venue):
        ex = pro(sim)
        try:
            await ex.load_markets()
            first = asyncio.ensure_future(ex.watch_trades(SYMBOL))
            await until(subscribed(venue, "market_trades"), "the market_trades subscription")
            venue.restart()
            got = await collect_loop0_trades(ex, await first, ids)
            while all(t["id"] in set(ids) for t in got):  # on into the next loop
                got += await asyncio.wait_for(ex.watch_trades(SYMBOL), DEADLINE_S)
        finally:
            await ex.close()
    loop0 = [t for t in got if t["id"] in set(ids)]
    assert [t["id"] for t in loop0] == ids  # each once, in recorded order
    for t, m in zip(loop0, recorded, strict=True):
        assert (t["symbol"], t["price"], t["amount"], t["timestamp"], t["side"]) == (
            SYMBOL, float(m["price"]), float(m["size"]), ms(m["time"]), m["side"])
    # the next loop goes on with the next ids (shifted by the recording's id span), never reusing one
    later = [int(t["id"]) for t in got if t["id"] not in set(ids)]
    assert later and min(later) == 1568320


async def test_book_top_at_each_ticker_through_ccxt() -> None:
    """ccxt's book, read right after each ticker message is handled, has the ticker's best bid/ask wherever
    the recording's own book does (52 of SKL-USD's 53 tickers; the first is the exchange's stale
    subscription ticker), and is never crossed after any l2_data message."""
    tickers, final_book = recorded_books_at_tickers(PRODUCT)
    expected_book_messages = 1 + sum(1 for m in recorded_messages()  # the snapshot, then each l2update
                                     if m["type"] == "l2update" and m["product_id"] == PRODUCT)
    async with coinbase_sim() as (sim, venue):
        ex = pro(sim)
        observed: list[tuple[Decimal, Decimal, bool]] = []
        crossed: list[tuple[float, float]] = []
        book_updates = 0
        handle = ex.handle_message

        def spy(client: Any, message: Any) -> Any:
            nonlocal book_updates
            result = handle(client, message)
            book = ex.orderbooks.get(SYMBOL)
            if message.get("channel") == "l2_data" and book is not None:
                book_updates += 1
                if book["bids"] and book["asks"] and book["bids"][0][0] >= book["asks"][0][0]:
                    crossed.append((book["bids"][0][0], book["asks"][0][0]))
            if message.get("channel") == "ticker" and message["events"][0]["type"] == "update":
                t = message["events"][0]["tickers"][0]
                bid, ask = Decimal(t["best_bid"]), Decimal(t["best_ask"])
                top = (Decimal(str(book["bids"][0][0])), Decimal(str(book["asks"][0][0])))
                observed.append((bid, ask, top == (bid, ask)))
            return result
        ex.handle_message = spy
        try:
            await ex.load_markets()
            tasks = [asyncio.ensure_future(ex.watch_order_book(SYMBOL)), asyncio.ensure_future(ex.watch_ticker(SYMBOL))]
            await until(subscribed(venue, "level2", "ticker"), "level2 and ticker subscriptions")
            venue.restart()
            await asyncio.wait_for(asyncio.gather(*tasks), DEADLINE_S)
            await venue.wait_finished(DEADLINE_S)
            await until(lambda: len(observed) == len(tickers) and book_updates == expected_book_messages,
                        "every recorded ticker and book update through ccxt")
        finally:
            await ex.close()
    assert crossed == []
    assert observed == tickers
    assert sum(coincide for _, _, coincide in observed) == 52
    book = ex.orderbooks[SYMBOL]  # at the end: the recorded book, level by level
    assert [(Decimal(str(p)), Decimal(str(s))) for p, s in book["bids"]] == sorted(
        final_book["buy"].items(), reverse=True)
    assert [(Decimal(str(p)), Decimal(str(s))) for p, s in book["asks"]] == sorted(final_book["sell"].items())


async def test_rest_after_replay_ohlcv_trades_ticker_book() -> None:
    recorded = recorded_trades(PRODUCT)
    _, final_book = recorded_books_at_tickers(PRODUCT)
    async with coinbase_sim(start="immediate") as (sim, venue):
        await venue.wait_finished(DEADLINE_S)
        ex = pro(sim)
        try:
            first_minute = ms(recorded[0]["time"]) // 60_000 * 60_000
            ohlcv = await ex.fetch_ohlcv(SYMBOL, "1m", since=first_minute)
            crv = await ex.fetch_ohlcv("CRV/EUR", "1m", since=ms("2021-04-17T16:30:00Z"))
            trades = await ex.fetch_trades(SYMBOL, limit=1000)
            ticker = await ex.fetch_ticker(SYMBOL)
            book = await ex.fetch_order_book(SYMBOL, 5)
        finally:
            await ex.close()
        requests = venue.status()["rest"]["requests"]
    by_minute: dict[int, list[dict[str, Any]]] = {}
    for m in recorded:
        by_minute.setdefault(ms(m["time"]) // 60_000 * 60_000, []).append(m)
    expected = [[t, float(ts[0]["price"]), max(float(x["price"]) for x in ts), min(float(x["price"]) for x in ts),
                 float(ts[-1]["price"]), float(sum(Decimal(x["size"]) for x in ts))] for t, ts in by_minute.items()]
    assert ohlcv == expected and len(ohlcv) == 2
    # CRV-EUR traded once (16:41:49, the last_match) and never again: one candle, none for the empty minutes
    (crv_trade,) = recorded_trades("CRV-EUR")
    price = float(crv_trade["price"])
    assert crv == [[ms("2021-04-17T16:41:00Z"), price, price, price, price, float(crv_trade["size"])]]
    assert [t["id"] for t in trades] == [str(m["trade_id"]) for m in recorded]
    assert (ticker["last"], ticker["timestamp"]) == (float(recorded[-1]["price"]), ms(recorded[-1]["time"]))
    assert (ticker["bid"], ticker["ask"]) == (float(max(final_book["buy"])), float(min(final_book["sell"])))
    assert book["bids"] == [[float(p), float(s)] for p, s in sorted(final_book["buy"].items(), reverse=True)[:5]]
    assert book["asks"] == [[float(p), float(s)] for p, s in sorted(final_book["sell"].items())[:5]]
    assert requests["/api/v3/brokerage/market/products/{product_id}/candles"] == 2
    assert requests["/api/v3/brokerage/market/products/{product_id}/ticker"] == 2  # fetch_trades, fetch_ticker
    assert requests["/api/v3/brokerage/market/product_book"] == 1


# ----------------------------------------------------------------------------------------------------------
# The wire


async def test_wire_envelope_sequence_heartbeats_and_candles() -> None:
    recorded = recorded_trades(PRODUCT)
    async with coinbase_sim() as (sim, venue), wire(sim) as w:
        for channel in ("heartbeats", "market_trades", "level2", "ticker", "candles"):
            await w.subscribe(channel)
        await until(subscribed(venue, "market_trades", "level2", "ticker", "candles"), "subscriptions")
        venue.restart()
        await venue.wait_finished(DEADLINE_S)
        await until(lambda: len(w.messages("heartbeats")) >= 2, "two heartbeats")
        messages = w.messages()
    for m in messages:
        assert set(m) == {"channel", "client_id", "timestamp", "sequence_num", "events"}
    assert [m["sequence_num"] for m in messages] == list(range(len(messages)))  # per connection, every channel
    subs = [m for m in messages if m["channel"] == "subscriptions"]
    assert subs[-1]["events"] == [{"subscriptions": {"heartbeats": [PRODUCT], "market_trades": [PRODUCT],
                                                     "level2": [PRODUCT], "ticker": [PRODUCT],
                                                     "candles": [PRODUCT]}}]
    beats = [m["events"][0]["heartbeat_counter"] for m in messages if m["channel"] == "heartbeats"]
    assert beats == list(range(1, len(beats) + 1))
    l2 = [e for m in messages if m["channel"] == "l2_data" for e in m["events"]]
    assert l2[0]["type"] == "snapshot" and all(e["type"] == "update" for e in l2[1:])
    assert {u["side"] for e in l2 for u in e["updates"]} == {"bid", "offer"}
    trades = [t for m in messages if m["channel"] == "market_trades" for e in m["events"] for t in e["trades"]]
    assert [t["trade_id"] for t in trades] == [str(m["trade_id"]) for m in recorded]
    # the candles channel: five-minute buckets; its last update is the whole recorded 16:40 bucket
    last = [c for m in messages if m["channel"] == "candles" for e in m["events"] for c in e["candles"]][-1]
    assert last == {"start": str(ms("2021-04-17T16:40:00Z") // 1000), "product_id": PRODUCT,
                    "open": recorded[0]["price"], "close": recorded[-1]["price"],
                    "high": str(max(Decimal(m["price"]) for m in recorded)),
                    "low": str(min(Decimal(m["price"]) for m in recorded)),
                    "volume": str(sum(Decimal(m["size"]) for m in recorded))}


async def test_bad_subscriptions_get_error_messages() -> None:
    async with coinbase_sim() as (sim, venue), wire(sim) as w:
        await w.ws.send_str(json.dumps({"type": "subscribe", "product_ids": [PRODUCT], "channels": ["level2"]}))
        await w.subscribe("market_trades", ["NOPE-USD"])
        await w.subscribe("user")
        await until(lambda: len(w.frames) == 3, "three error replies")
        errors = w.messages()
        assert venue.state == "idle"  # nothing valid was subscribed: the replay has not started
    assert [e["type"] for e in errors] == ["error"] * 3
    assert "'channel'" in errors[0]["message"] and "NOPE-USD" in errors[1]["message"]
    assert "authentication" in errors[2]["message"]


# ----------------------------------------------------------------------------------------------------------
# Faults, on the wire and through ccxt


async def test_sequence_gap_on_wire_is_ignored_by_ccxt() -> None:
    """ccxt.pro coinbase does not read sequence_num: after a gap it goes on as if nothing happened (no
    error, no resubscribe, same connection). Detecting gaps is the collector's job (see spy_messages)."""
    recorded = recorded_trades(PRODUCT)
    async with coinbase_sim(speed=LOOP_SPEED, loop=True) as (sim, venue):
        ex = pro(sim)
        seen = spy_messages(ex)
        try:
            await ex.load_markets()
            first = asyncio.ensure_future(ex.watch_trades(SYMBOL))
            await until(subscribed(venue, "market_trades"), "the subscription")
            venue.inject("sequence_gap", skip=3)
            venue.restart()
            got = await collect_loop0_trades(ex, await first, [str(m["trade_id"]) for m in recorded])
            connections = venue.status()["connections"]
        finally:
            await ex.close()
    seqs = [m["sequence_num"] for m in seen]
    assert seqs[:3] == [0, 4, 5]  # subscriptions, then the gap of 3
    assert len({t["id"] for t in got}) >= 53
    assert len(connections) == 1 and connections[0]["subscriptions"] == {"market_trades": [PRODUCT]}


async def test_duplicate_and_reorder_on_wire_and_through_ccxt() -> None:
    async with coinbase_sim(speed=LOOP_SPEED, loop=True) as (sim, venue), wire(sim) as w:
        await w.subscribe("market_trades")
        await until(subscribed(venue, "market_trades"), "the subscription")
        venue.inject("duplicate", count=1)
        venue.restart()
        await until(lambda: len(w.frames) >= 5, "trades")
        venue.inject("reorder", count=1)
        n = len(w.frames)

        def swapped_at() -> list[int]:  # where a message came after its successor, from frame n on
            seqs = [json.loads(f)["sequence_num"] for f in w.frames]
            return [i for i in range(n, len(seqs) - 1) if seqs[i] == seqs[i + 1] + 1]

        # frames already on their way when the fault was set arrive first: wait for the swap, then 3 more
        await until(lambda: bool(swapped_at()) and len(w.frames) >= swapped_at()[0] + 5, "the swapped pair")
        frames = list(w.frames)
    assert frames[1] == frames[2]  # the first trade message twice, byte for byte (same sequence_num)
    seqs = [json.loads(f)["sequence_num"] for f in frames]
    assert seqs[:4] == [0, 1, 1, 2]
    swapped = [i for i in range(n, len(seqs) - 1) if seqs[i] == seqs[i + 1] + 1]
    assert len(swapped) == 1 and sorted(seqs[n:]) == list(range(seqs[n] - 1, seqs[n] - 1 + len(seqs) - n))
    # through ccxt: a duplicated trade message is returned twice by watch_trades, reordered ones in wire order
    async with coinbase_sim(speed=LOOP_SPEED, loop=True) as (sim, venue):
        ex = pro(sim)
        try:
            await ex.load_markets()
            first = asyncio.ensure_future(ex.watch_trades(SYMBOL))
            await until(subscribed(venue, "market_trades"), "the subscription")
            venue.inject("duplicate", count=1)
            venue.restart()
            got = await first
            while len(got) < 4:
                got += await asyncio.wait_for(ex.watch_trades(SYMBOL), DEADLINE_S)
            venue.inject("clear")
            venue.inject("reorder", count=1)
            mark = len(got)

            def out_of_order() -> bool:  # one pair out of order, from the first trade after the fault on
                ids = [int(t["id"]) for t in got]
                return any(ids[i] == ids[i + 1] + 1 for i in range(mark - 1, len(ids) - 1))

            # trades ccxt had already received when the fault was set come first: read until the swapped pair
            deadline = time.monotonic() + DEADLINE_S
            while not out_of_order() and time.monotonic() < deadline:
                got += await asyncio.wait_for(ex.watch_trades(SYMBOL), DEADLINE_S)
        finally:
            await ex.close()
    ids = [int(t["id"]) for t in got]
    assert ids[:3] == [1568267, 1568267, 1568268]
    assert out_of_order(), f"no pair out of order after trade {mark} in {ids}"


async def test_malformed_json_kills_ccxt_reader_until_keepalive_timeout() -> None:
    """A frame that is not JSON: ccxt.pro's receive loop dies in an asyncio callback ("Exception in callback
    ... JSONDecodeError"), the socket stays open and every watch_* on it waits until ccxt's ping-pong
    keepalive gives up (2 x keepAlive; 30 s by default, 0.3 s here): then RequestTimeout, and the next
    watch_* reconnects and resubscribes (the market_trades snapshot then repeats up to 50 trades)."""
    async with coinbase_sim(speed=LOOP_SPEED, loop=True) as (sim, venue), wire(sim) as w:
        await w.subscribe("market_trades")
        await until(subscribed(venue, "market_trades"), "the subscription")
        venue.inject("malformed_json", count=1)
        venue.restart()
        await until(lambda: len(w.frames) >= 3, "trades")
        with pytest.raises(ValueError):
            json.loads(w.frames[1])
        assert json.loads(w.frames[2])["sequence_num"] == 2
    async with coinbase_sim(speed=LOOP_SPEED, loop=True) as (sim, venue):
        ex = pro(sim)
        ex.streaming = {**ex.streaming, "keepAlive": 300}
        try:
            await ex.load_markets()
            first = asyncio.ensure_future(ex.watch_trades(SYMBOL))
            await until(subscribed(venue, "market_trades"), "the subscription")
            venue.inject("malformed_json", count=1)
            venue.restart()
            with pytest.raises(ccxt.RequestTimeout):
                await asyncio.wait_for(first, DEADLINE_S)
            again = await asyncio.wait_for(ex.watch_trades(SYMBOL), DEADLINE_S)
        finally:
            await ex.close()
    assert again and all(t["symbol"] == SYMBOL for t in again)


async def test_disconnect_then_ccxt_reconnects_and_resubscribes() -> None:
    async with coinbase_sim(speed=LOOP_SPEED, loop=True) as (sim, venue):
        async with wire(sim) as w:
            await w.subscribe("market_trades")
            await until(subscribed(venue, "market_trades"), "the subscription")
            venue.inject("disconnect", code=1011)
            await until(lambda: w.closed_code is not None, "the close")
            assert w.closed_code == 1011
        ex = pro(sim)
        try:
            await ex.load_markets()
            first = asyncio.ensure_future(ex.watch_trades(SYMBOL))
            await until(subscribed(venue, "market_trades"), "the subscription")
            venue.restart()
            await first
            venue.inject("disconnect", down_s=0.5)
            with pytest.raises(ccxt.NetworkError, match="closing code 1001"):
                while True:
                    await asyncio.wait_for(ex.watch_trades(SYMBOL), DEADLINE_S)
            refused: list[str] = []  # while the server refuses upgrades (503), each watch_* raises at once
            deadline = time.monotonic() + DEADLINE_S
            while True:
                assert time.monotonic() < deadline, "ccxt did not reconnect"
                try:
                    again = await asyncio.wait_for(ex.watch_trades(SYMBOL), DEADLINE_S)
                    break
                except ccxt.NetworkError as exc:
                    refused.append(str(exc))
            connections = venue.status()["connections"]
        finally:
            await ex.close()
    assert refused and all("503" in r for r in refused)
    assert again and len(connections) == 1 and connections[0]["subscriptions"] == {"market_trades": [PRODUCT]}


async def test_stall_sends_nothing_but_answers_pings() -> None:
    async with coinbase_sim(speed=LOOP_SPEED, loop=True) as (sim, venue), wire(sim) as w:
        await w.subscribe("heartbeats")
        await w.subscribe("market_trades")
        await until(subscribed(venue, "market_trades"), "the subscription")
        venue.restart()
        await until(lambda: len(w.messages("market_trades")) >= 2, "trades")
        venue.inject("stall", seconds=1.5)
        await asyncio.sleep(0.05)  # a frame already in flight may still land
        n, pongs = len(w.frames), w.pongs
        await w.ws.ping(b"are you there")
        await until(lambda: w.pongs > pongs, "the pong")
        assert len(w.frames) == n  # the pong came, nothing else
        await until(lambda: len(w.frames) > n, "data after the stall")
        seqs = [m["sequence_num"] for m in w.messages()]
    assert seqs == list(range(len(seqs)))  # 'pause' loses nothing


async def test_stall_drop_loses_messages_with_their_sequence_numbers() -> None:
    async with coinbase_sim() as (sim, venue), wire(sim) as w:
        await w.subscribe("market_trades")
        await until(subscribed(venue, "market_trades"), "the subscription")
        venue.inject("stall", seconds=0.5, mode="drop")
        venue.restart()  # flat out: the whole replay falls inside the stall
        await venue.wait_finished(DEADLINE_S)
        await asyncio.sleep(0.6)
        await w.subscribe("ticker")  # after the stall: the reply shows where the numbering has got to
        await until(lambda: len(w.frames) == 3, "the ticker subscription reply and snapshot")
        messages = w.messages()
    assert [m["channel"] for m in messages] == ["subscriptions", "subscriptions", "ticker"]
    # the 53 trade messages were lost, each with its sequence_num: 1..53
    assert [m["sequence_num"] for m in messages] == [0, 1 + len(recorded_trades(PRODUCT)), 2 + 53]


async def test_halt_keeps_heartbeats_stops_market_data() -> None:
    async with coinbase_sim(speed=LOOP_SPEED, loop=True) as (sim, venue), wire(sim) as w, \
            aiohttp.ClientSession() as http:
        await w.subscribe("heartbeats")
        await w.subscribe("market_trades")
        await until(subscribed(venue, "market_trades"), "the subscription")
        venue.inject("halt")
        venue.restart()
        await until(lambda: len(w.messages("heartbeats")) >= 2, "two heartbeats")
        assert w.messages("market_trades") == []
        url = f"{sim.rest_url}/api.coinbase.com/api/v3/brokerage/market/products/{PRODUCT}"
        async with http.get(url) as r:
            product = await r.json()
        assert (product["trading_disabled"], product["status"]) == (True, "offline")
        venue.inject("clear")
        await until(lambda: len(w.messages("market_trades")) >= 1, "trades after the halt")
        first = w.messages("market_trades")[0]["events"][0]["trades"][0]
    assert first["trade_id"] == "1568267"  # the halt held the replay: nothing was lost


async def test_clock_skew_moves_exchange_times() -> None:
    async with coinbase_sim(speed=LOOP_SPEED, loop=True) as (sim, venue), wire(sim) as w, \
            aiohttp.ClientSession() as http:
        venue.inject("clock_skew", seconds=-3600)
        await w.subscribe("heartbeats")
        await until(lambda: len(w.messages("heartbeats")) >= 1, "a heartbeat")
        beat = w.messages("heartbeats")[0]
        async with http.get(f"{sim.rest_url}/api.coinbase.com/api/v3/brokerage/time") as r:
            server = await r.json()
    now = time.time()
    assert abs(ms(beat["timestamp"]) / 1000 - (now - 3600)) < 5
    assert abs(int(server["epochSeconds"]) - (now - 3600)) < 5


async def test_http_errors_and_rate_limit() -> None:
    async with coinbase_sim(start="immediate") as (sim, venue), aiohttp.ClientSession() as http:
        await venue.wait_finished(DEADLINE_S)
        url = f"{sim.rest_url}/api.coinbase.com/api/v3/brokerage/market/products/{PRODUCT}/ticker?limit=1"
        ex = pro(sim)
        try:
            await ex.load_markets()
            venue.inject("http_error", status=503)
            with pytest.raises(ccxt.ExchangeNotAvailable):
                await ex.fetch_trades(SYMBOL)
            venue.inject("http_error", status=429, retry_after=7)
            with pytest.raises(ccxt.RateLimitExceeded):
                await ex.fetch_trades(SYMBOL)
            venue.inject("malformed_json", target="rest")
            assert await ex.fetch_trades(SYMBOL) == []  # ccxt raises nothing on a broken body: an empty answer
            # ccxt's own throttle (rateLimit 34 ms x cost 3) keeps it under 10 requests/s: no 429
            await asyncio.sleep(1.1)
            throttled = venue.status()["rest"]["status"].get("429", 0)
            for _ in range(12):
                await ex.fetch_trades(SYMBOL, limit=1)
            assert venue.status()["rest"]["status"].get("429", 0) == throttled
            await asyncio.sleep(1.1)  # let the one-second window empty before the burst below
            statuses, retry_after = [], []
            for _ in range(12):  # a client that does not throttle: the 11th request within a second gets 429
                async with http.get(url) as r:
                    statuses.append(r.status)
                    retry_after.append(r.headers.get("Retry-After"))
                    body = await r.json()
        finally:
            await ex.close()
    assert statuses[:10] == [200] * 10 and statuses[10:] == [429, 429]
    assert retry_after[10] == "1" and body["error"] == "rate_limit_exceeded"


async def test_fault_requests_are_checked() -> None:
    async with coinbase_sim() as (sim, venue):
        for kind, params in [("nonsense", {}), ("stall", {}), ("http_error", {"status": 404}),
                             ("malformed_json", {"target": "fix"}), ("sequence_gap", {"skip": 0}),
                             ("clock_skew", {}), ("stall", {"seconds": "soon"})]:
            with pytest.raises(FaultError):
                venue.inject(kind, **params)
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{sim.rest_url}/_sim/fault", json={"exchange": "coinbase", "kind": "halt",
                                                                     "seconds": 0.2}) as r:
                assert r.status == 200 and (await r.json())["faults"]["halt_remaining_s"] > 0
            async with http.post(f"{sim.rest_url}/_sim/fault", json={"exchange": "coinbase", "kind": "bogus"}) as r:
                assert r.status == 400 and "bogus" in (await r.json())["error"]
