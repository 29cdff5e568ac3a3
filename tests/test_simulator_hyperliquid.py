"""The simulator's Hyperliquid venue against the real, unmodified ccxt / ccxt.pro hyperliquid, and on the wire.

Expected values are read here straight from the real files (the gzip capture, the cassettes' JSON), with their
own small parsing, so a loader or wire-format bug in the venue shows up as a mismatch.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import re
from collections import Counter
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import aiohttp
import ccxt
import ccxt.pro
import pytest

from common.config import ExchangeSettings
from common.exchanges.clients import apply_endpoints
from simulator import Simulator, real_data_dir, start_simulator
from simulator.hyperliquid import HyperliquidVenue

DATA = real_data_dir()
SYMBOL = "BTC/USDC:USDC"
INFO = "/api.hyperliquid.xyz/info"
WS = "/api.hyperliquid.xyz/ws"


def capture() -> list[tuple[str, dict[str, Any]]]:
    """(raw JSON text, parsed) of every line of the Hyperliquid capture, in file order."""
    with gzip.open(DATA / "ws-captures" / "hyperliquid_btcusd_20250126.gz", "rt") as fh:
        return [(raw, json.loads(raw)) for raw in (line.rstrip("\n").split(" ", 1)[1] for line in fh)]


def recorded_trades() -> list[dict[str, Any]]:
    return [t for _, m in capture() if m["channel"] == "trades" for t in m["data"]]


def recorded_books() -> list[dict[str, Any]]:
    return [m["data"] for _, m in capture() if m["channel"] == "l2Book"]


def cassette_json(name: str, kind: str) -> Any:
    """The recorded response body of the `kind` request in a cassette (single-line quoted scalar)."""
    text = (DATA / "hyperliquid-rest" / name).read_text()
    for block in text.split("- request:")[1:]:
        if f'"type": "{kind}"' in block:
            body = re.search(r"^\s+string: '(.*)'$", block, re.MULTILINE)
            assert body is not None
            return json.loads(body.group(1).replace("''", "'"))
    raise AssertionError(f"{name} has no {kind}")


def venue(sim: Simulator) -> HyperliquidVenue:
    return sim.venues["hyperliquid"]  # type: ignore[return-value]


def simulator(**options: Any) -> Any:
    """A simulator serving Hyperliquid; its Binance spot part kept small (it is not under test here)."""
    return start_simulator(venues=["hyperliquid"], max_trades=100, history=False, **options)


@pytest.fixture
async def pro_for() -> AsyncIterator[Any]:
    made: list[Any] = []

    def make(sim: Simulator, **config: Any) -> Any:
        # ccxt's own throttle (cost 10-20 x 50 ms per /info call) only slows these tests; the venue's weight
        # budget is tested on its own.
        ex = ccxt.pro.hyperliquid({"enableRateLimit": False, "options": {"tradesLimit": 10_000}, **config})
        apply_endpoints(ex, ExchangeSettings(id="hyperliquid", symbols=[SYMBOL], rest_url=sim.rest_url,
                                             ws_url=sim.ws_url))
        made.append(ex)
        return ex

    yield make
    for ex in made:
        await ex.close()


async def info(sim: Simulator, body: dict[str, Any]) -> tuple[int, str]:
    async with aiohttp.ClientSession() as s, s.post(f"{sim.rest_url}{INFO}", json=body) as r:
        return r.status, await r.text()


async def ws_messages(ws: aiohttp.ClientWebSocketResponse, until: Any, timeout: float = 10.0) -> list[str]:
    """Raw text frames until `until(texts)` holds (bounded by `timeout`)."""
    texts: list[str] = []
    async with asyncio.timeout(timeout):
        while not until(texts):
            msg = await ws.receive()
            if msg.type != aiohttp.WSMsgType.TEXT:
                texts.append(f"<{msg.type.name} {msg.data}>")
                break
            texts.append(msg.data)
    return texts


async def subscribe(ws: aiohttp.ClientWebSocketResponse, before: list[str] | None = None,
                    **subscription: Any) -> dict[str, Any]:
    """Subscribe and return the ack; data frames that arrive first are appended to `before`."""
    await ws.send_str(json.dumps({"method": "subscribe", "subscription": subscription}))
    async with asyncio.timeout(5):
        while True:
            text = (await ws.receive()).data
            msg = json.loads(text)
            if msg["channel"] == "subscriptionResponse":
                return msg  # type: ignore[no-any-return]
            if before is None:
                raise AssertionError(f"expected the subscription ack, got {text[:200]}")
            before.append(text)


def channel_data(texts: list[str], channel: str) -> list[Any]:
    out = []
    for t in texts:
        try:
            msg = json.loads(t)
        except ValueError:
            continue
        if msg.get("channel") == channel:
            out.append(msg["data"])
    return out


# ------------------------------------------------------------------------------------------------------------
# Markets and REST with the real ccxt


async def test_load_markets_asks_what_ccxt_asks_and_names_the_perp(pro_for: Any) -> None:
    async with simulator(speed=0) as sim:
        ex = pro_for(sim)
        await ex.load_markets()
        meta = cassette_json("info.yaml", "meta")
        assert len(ex.markets) == len(meta["universe"]) == 28
        btc = ex.market(SYMBOL)
        assert (btc["swap"], btc["id"], btc["baseName"], btc["settle"]) == (True, "0", "BTC", "USDC")
        assert btc["precision"]["amount"] == 1e-05  # szDecimals 5, as recorded
        assert venue(sim).status()["rest"]["requests"] == {"spotMeta": 1, "spotMetaAndAssetCtxs": 1,
                                                           "metaAndAssetCtxs": 1, "perpDexs": 1}
        status, text = await info(sim, {"type": "meta"})
        assert status == 200 and json.loads(text) == meta  # the recorded meta, as recorded
        status, text = await info(sim, {"type": "allMids"})
        mids = json.loads(text)
        recorded_mids = cassette_json("all_mids.yaml", "allMids")
        assert {k: v for k, v in mids.items() if k != "BTC"} == {k: v for k, v in recorded_mids.items() if k != "BTC"}
        first = recorded_books()[0]["levels"]
        assert Decimal(mids["BTC"]) == (Decimal(first[0][0]["px"]) + Decimal(first[1][0]["px"])) / 2
        status, text = await info(sim, {"type": "userRole", "user": "0x0"})
        assert status == 422 and "Failed to deserialize" in text


async def test_rest_books_and_funding_history_are_the_recordings(pro_for: Any) -> None:
    async with simulator(speed=0) as sim:
        ex = pro_for(sim)
        await ex.load_markets()
        dydx = cassette_json("l2_snapshot.yaml", "l2Book")
        ob = await ex.fetch_order_book("DYDX/USDC:USDC")
        assert ob["bids"][0] == [float(dydx["levels"][0][0]["px"]), float(dydx["levels"][0][0]["sz"])]
        assert ob["timestamp"] == dydx["time"] and len(ob["asks"]) == len(dydx["levels"][1])
        btc = await ex.fetch_order_book(SYMBOL)  # before the replay: the first recorded snapshot
        assert btc["timestamp"] == recorded_books()[0]["time"]

        history = cassette_json("funding_history_all.yaml", "fundingHistory")
        rates = await ex.fetch_funding_rate_history(SYMBOL, since=0)
        assert len(rates) == 500  # one page, as Hyperliquid answers
        assert [(r["timestamp"], r["fundingRate"]) for r in rates] == \
            [(h["time"], float(h["fundingRate"])) for h in history[:500]]
        later = await ex.fetch_funding_rate_history(SYMBOL, since=history[-3]["time"])
        assert [r["timestamp"] for r in later] == [h["time"] for h in history[-3:]]


async def test_ohlcv_rest_and_ws_are_the_recorded_trades_bucketed_by_minute(pro_for: Any) -> None:
    trades = recorded_trades()
    minutes: dict[int, list[dict[str, Any]]] = {}
    for t in trades:
        minutes.setdefault(t["time"] // 60_000 * 60_000, []).append(t)
    expected = [[m, float(ts[0]["px"]), max(float(t["px"]) for t in ts), min(float(t["px"]) for t in ts),
                 float(ts[-1]["px"]), float(sum(Decimal(t["sz"]) for t in ts))] for m, ts in sorted(minutes.items())]
    async with simulator(speed=0) as sim:
        ex = pro_for(sim)
        await ex.load_markets()
        assert await ex.fetch_ohlcv(SYMBOL, "1m", since=0) == []  # nothing before the replay
        watched: list[list[Any]] = []
        async with asyncio.timeout(10):
            while not watched or watched[-1] != expected[-1]:
                watched = await ex.watch_ohlcv(SYMBOL, "1m")
        await venue(sim).wait_finished(10)
        assert await ex.fetch_ohlcv(SYMBOL, "1m", since=0) == expected
        hour = await ex.fetch_ohlcv(SYMBOL, "1h", since=0)
        assert hour == [[expected[0][0] // 3_600_000 * 3_600_000, expected[0][1], max(r[2] for r in expected),
                         min(r[3] for r in expected), expected[-1][4], sum(r[5] for r in expected)]]

        kpepe = cassette_json("candles_snapshot.yaml", "candleSnapshot")
        rows = await ex.fetch_ohlcv("KPEPE/USDC:USDC", "1h", since=0)
        assert rows == [[c["t"], float(c["o"]), float(c["h"]), float(c["l"]), float(c["c"]), float(c["v"])]
                        for c in kpepe]


async def test_candle_snapshot_keeps_only_the_latest_5000_candles(pro_for: Any) -> None:
    real = cassette_json("candles_snapshot.yaml", "candleSnapshot")
    day = 24 * 3_600_000
    # 250 shifted copies of the 24 recorded hours: 6,000 contiguous 1h candles ending at the recorded ones.
    series = [{**c, "t": c["t"] - k * day, "T": c["T"] - k * day} for k in range(249, -1, -1) for c in real]
    async with simulator(speed=0) as sim:
        venue(sim).recording.candles[("kPEPE", "1h")] = series
        ex = pro_for(sim)
        await ex.load_markets()
        rows = await ex.fetch_ohlcv("KPEPE/USDC:USDC", "1h", since=0)
        assert len(rows) == 5000
        assert [r[0] for r in rows] == [c["t"] for c in series[1000:]]  # the oldest 1,000 are gone
        status, text = await info(sim, {"type": "candleSnapshot", "req": {
            "coin": "kPEPE", "interval": "1h", "startTime": series[0]["t"], "endTime": series[1500]["t"]}})
        body = json.loads(text)
        assert status == 200 and [c["t"] for c in body] == [c["t"] for c in series[1000:1501]]


async def test_funding_rate_open_interest_and_ticker_follow_the_replay(pro_for: Any) -> None:
    trades = recorded_trades()
    last_book = recorded_books()[-1]["levels"]
    bid, ask = Decimal(last_book[0][0]["px"]), Decimal(last_book[1][0]["px"])
    volume = sum(Decimal(t["sz"]) for t in trades)
    vwap = sum(Decimal(t["px"]) * Decimal(t["sz"]) for t in trades) / volume
    async with simulator(speed=0) as sim:
        ex = pro_for(sim)
        await ex.load_markets()
        ticker = await ex.watch_ticker(SYMBOL)  # activeAssetCtx; its subscription starts the replay
        assert ticker["symbol"] == SYMBOL and ticker["bid"] is not None
        await venue(sim).wait_finished(10)
        rate = await ex.fetch_funding_rate(SYMBOL)
        assert rate["markPrice"] == float(sorted((bid, ask, Decimal(trades[-1]["px"])))[1])
        assert rate["indexPrice"] == float(vwap.quantize(Decimal("0.1")))
        assert rate["fundingRate"] == 0.0000125  # premium within the clamp: the interest rate
        assert rate["interval"] == "1h"
        oi = await ex.fetch_open_interest(SYMBOL)
        assert oi["openInterestAmount"] == float(volume)
        eth = (await ex.fetch_funding_rates(["ETH/USDC:USDC"]))["ETH/USDC:USDC"]
        assert eth["markPrice"] == float(cassette_json("all_mids.yaml", "allMids")["ETH"])


# ------------------------------------------------------------------------------------------------------------
# WebSocket with the real ccxt.pro


async def test_watch_trades_gets_every_recorded_trade_exactly_once(pro_for: Any) -> None:
    expected = recorded_trades()
    async with simulator(speed=0) as sim:
        ex = pro_for(sim)
        got: list[dict[str, Any]] = []
        async with asyncio.timeout(10):
            while len(got) < len(expected):
                got.extend(await ex.watch_trades(SYMBOL))
        await venue(sim).wait_finished(10)
        assert Counter(t["id"] for t in got) == Counter(str(t["tid"]) for t in expected)
        assert all(c == 1 for c in Counter(t["id"] for t in got).values())
        assert [(t["id"], t["timestamp"], t["price"], t["amount"], t["side"]) for t in got] == \
            [(str(t["tid"]), t["time"], float(t["px"]), float(t["sz"]), "sell" if t["side"] == "A" else "buy")
             for t in expected]


async def test_watch_order_book_is_never_crossed_and_ends_at_the_recorded_book(pro_for: Any) -> None:
    books = recorded_books()
    async with simulator(speed=20) as sim:
        ex = pro_for(sim)
        seen: list[int] = []
        async with asyncio.timeout(10):
            while not seen or seen[-1] != books[-1]["time"]:
                ob = await ex.watch_order_book(SYMBOL)
                assert ob["bids"][0][0] < ob["asks"][0][0]
                seen.append(ob["timestamp"])
        assert seen == sorted(seen) and len(set(seen)) > 30  # in order, and most snapshots seen one by one
        last = books[-1]["levels"]
        assert ob["bids"] == [[float(lv["px"]), float(lv["sz"])] for lv in last[0]]
        assert ob["asks"] == [[float(lv["px"]), float(lv["sz"])] for lv in last[1]]


async def test_ccxt_pro_takes_a_reordered_or_duplicated_book_as_it_comes(pro_for: Any) -> None:
    """ccxt.pro hyperliquid resets its book from each l2Book snapshot and never compares `time`: a reordered
    (older) snapshot silently replaces the newer one; a duplicate is applied twice, unnoticed; nothing raises."""
    books = recorded_books()
    assert books[0]["time"] == books[1]["time"]  # the real capture itself repeats its first snapshot
    b2, b3 = books[2]["time"], books[3]["time"]
    async with simulator(speed=20) as sim:
        ex = pro_for(sim)
        # count=2: the first snapshot goes after the second (same time), then the third after the fourth.
        venue(sim).inject("reorder", channel="l2Book", count=2)
        venue(sim).inject("duplicate", channel="l2Book", count=3)
        seen: list[int] = []
        async with asyncio.timeout(10):
            while not seen or seen[-1] != books[-1]["time"]:
                seen.append((await ex.watch_order_book(SYMBOL))["timestamp"])
        # Either ccxt handed out b3 and then went back to b2, or (both frames read in one go) b3 was never
        # shown: in both cases the older snapshot won, and nothing was raised.
        assert b2 in seen and (b3 not in seen or seen.index(b3) < seen.index(b2))
        assert venue(sim).status()["sent_by_channel"]["l2Book"] == len(books) + 3


async def test_watch_tickers_uses_all_mids(pro_for: Any) -> None:
    async with simulator(speed=0) as sim:
        ex = pro_for(sim)
        tickers = await ex.watch_tickers()
        assert {SYMBOL, "ETH/USDC:USDC"} <= set(tickers)
        first = recorded_books()[0]["levels"]
        assert tickers[SYMBOL]["last"] == float((Decimal(first[0][0]["px"]) + Decimal(first[1][0]["px"])) / 2)


# ------------------------------------------------------------------------------------------------------------
# The wire: what the venue sends, rate limits, faults


async def test_l2book_and_trades_are_replayed_byte_for_byte_in_recorded_order() -> None:
    recorded = [raw for raw, _ in capture()]
    async with simulator(speed=0) as sim, aiohttp.ClientSession() as s, s.ws_connect(f"{sim.ws_url}{WS}") as ws:
        ack = await subscribe(ws, type="l2Book", coin="BTC")
        assert ack["data"] == {"method": "subscribe", "subscription": {"nSigFigs": None, "mantissa": None,
                                                                       "type": "l2Book", "coin": "BTC"}}
        texts: list[str] = []
        await subscribe(ws, texts, type="trades", coin="BTC")  # the replay began: the trades so far come first
        texts += await ws_messages(ws, lambda t: len(texts) + len(t) >= len(recorded))
        books = [t for t in texts if t.startswith('{"channel":"l2Book"')]
        assert books == [r for r in recorded if r.startswith('{"channel":"l2Book"')]
        assert [t["tid"] for d in channel_data(texts, "trades") for t in d] == [t["tid"] for t in recorded_trades()]
        await ws.send_str('{"method":"ping"}')
        assert json.loads((await ws.receive()).data) == {"channel": "pong"}
        await ws.send_str(json.dumps({"method": "subscribe", "subscription": {"type": "trades", "coin": "BTC"}}))
        assert json.loads((await ws.receive()).data)["data"].startswith("Already subscribed")
        await ws.send_str("{not json")
        assert json.loads((await ws.receive()).data)["channel"] == "error"


async def test_rest_weight_budget_gives_429_with_a_null_body(pro_for: Any) -> None:
    async with simulator(speed=0) as sim:
        statuses = [(await info(sim, {"type": "metaAndAssetCtxs"}))[0] for _ in range(61)]
        assert statuses == [200] * 60 + [429]  # 60 x weight 20 = 1200 per minute
        status, text = await info(sim, {"type": "l2Book", "coin": "BTC"})
        assert (status, text) == (429, "null")
        assert venue(sim).status()["rest"]["weight_used"] == 1200
        ex = pro_for(sim, enableRateLimit=False)
        with pytest.raises(ccxt.RateLimitExceeded):
            await ex.load_markets()


async def test_http_and_malformed_rest_faults(pro_for: Any) -> None:
    async with simulator(speed=0) as sim:
        ex = pro_for(sim)
        await ex.load_markets()
        venue(sim).inject("http_error", status=503, count=1)
        with pytest.raises(ccxt.ExchangeNotAvailable):
            await ex.fetch_order_book(SYMBOL)
        venue(sim).inject("http_error", status=429)
        assert await info(sim, {"type": "allMids"}) == (429, "null")
        venue(sim).inject("malformed_json", target="rest")
        status, text = await info(sim, {"type": "l2Book", "coin": "BTC"})
        assert status == 200
        with pytest.raises(ValueError):
            json.loads(text)
        assert (await ex.fetch_order_book(SYMBOL))["bids"]  # count=1: the next answer is whole again
        # ccxt on an HTTP 200 body cut in half: nothing raised, an empty book / no candles; funding: BadSymbol.
        venue(sim).inject("malformed_json", target="rest", count=3)
        ob = await ex.fetch_order_book(SYMBOL)
        assert (ob["bids"], ob["asks"], ob["timestamp"]) == ([], [], None)
        assert await ex.fetch_ohlcv("KPEPE/USDC:USDC", "1h", since=0) == []
        with pytest.raises(ccxt.BadSymbol):
            await ex.fetch_funding_rate(SYMBOL)
        from simulator.server import FaultError
        with pytest.raises(FaultError, match="channel must be one of"):
            venue(sim).inject("sequence_gap", channel="candle")


async def test_sequence_gap_duplicate_reorder_and_clock_skew_on_the_wire() -> None:
    trades, books = recorded_trades(), recorded_books()
    async with simulator(speed=0, start="manual") as sim, aiohttp.ClientSession() as s, \
            s.ws_connect(f"{sim.ws_url}{WS}") as ws:
        v = venue(sim)
        v.inject("sequence_gap", channel="trades", count=2)
        v.inject("sequence_gap", channel="l2Book", count=1)
        v.inject("duplicate", channel="trades", count=1)
        v.inject("reorder", channel="l2Book", count=1)
        v.inject("clock_skew", ms=-2500)
        texts: list[str] = []
        await subscribe(ws, texts, type="trades", coin="BTC")
        await subscribe(ws, texts, type="l2Book", coin="BTC")
        assert v.state == "idle" and texts == []
        v.restart()
        await v.wait_finished(10)
        texts += await ws_messages(ws, lambda t: len(channel_data(texts + t, "l2Book")) >= len(books) - 1)
        got_books = [b["time"] for b in channel_data(texts, "l2Book")]
        got_trades = [t for d in channel_data(texts, "trades") for t in d]
        # gap: the first snapshot and the first two trades are missing, and the status says which
        assert v.status()["gap_book_times"] == [books[0]["time"]]
        assert v.status()["gap_trade_ids"] == [trades[0]["tid"], trades[1]["tid"]]
        # reorder: the second snapshot comes after the third; skew: every time is 2.5 s early
        assert got_books[:2] == [books[2]["time"] - 2500, books[1]["time"] - 2500]
        # duplicate: the first trades message (28 trades left) arrives twice
        assert [t["tid"] for t in got_trades[:56]] == [t["tid"] for t in trades[2:30]] * 2
        assert all(g["time"] == r["time"] - 2500 for g, r in zip(got_trades[56:], trades[30:], strict=True))


async def test_malformed_ws_message_stops_ccxt_pro_reading_that_connection(pro_for: Any) -> None:
    """ccxt.pro parses each frame in a callback of its receive loop: a frame that is not JSON raises there
    (logged by asyncio), the loop is not rescheduled and every later watch on that connection hangs, even
    though the server keeps sending. Only closing the exchange (a new connection) recovers."""
    async with simulator(speed=4) as sim:
        v = venue(sim)
        ex = pro_for(sim)
        await ex.watch_order_book(SYMBOL)
        v.inject("malformed_json", target="ws", count=1)
        sent_before = v.status()["sent_by_channel"]["l2Book"]
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(ex.watch_order_book(SYMBOL), 2.0)
        assert v.status()["faults"]["malformed_ws"] == 0  # the frame went out
        assert v.status()["sent_by_channel"]["l2Book"] > sent_before + 1  # and more after it, unread
        await ex.close()
        ob = await asyncio.wait_for(ex.watch_order_book(SYMBOL), 5)
        assert ob["bids"][0][0] < ob["asks"][0][0]


async def test_disconnect_stall_and_halt() -> None:
    async with simulator(speed=4) as sim, aiohttp.ClientSession() as s:
        v = venue(sim)
        async with s.ws_connect(f"{sim.ws_url}{WS}") as ws:
            await subscribe(ws, type="l2Book", coin="BTC")
            await ws_messages(ws, lambda t: len(t) >= 2)
            v.inject("stall", seconds=1.0)
            position, books_sent = v.status()["position"], v.status()["sent_by_channel"]["l2Book"]
            await asyncio.sleep(0.5)  # inside the stall (a fault window, not a timing assertion)
            await ws.send_str('{"method":"ping"}')  # answered while nothing else is sent
            await ws_messages(ws, lambda t: '{"channel":"pong"}' in t, timeout=2)
            assert (v.status()["position"], v.status()["sent_by_channel"]["l2Book"]) == (position, books_sent)
            await ws_messages(ws, lambda t: len(channel_data(t, "l2Book")) >= 1, timeout=5)  # resumes, late

            v.inject("halt", seconds=2.0)
            halted_at, books_sent = v.status()["position"], v.status()["sent_by_channel"]["l2Book"]
            async with asyncio.timeout(5):
                while v.status()["position"] <= halted_at + 3:
                    await asyncio.sleep(0.05)
            assert v.status()["sent_by_channel"]["l2Book"] == books_sent  # the recording moved on, unsent
            await ws.send_str('{"method":"ping"}')
            texts = await ws_messages(ws, lambda t: '{"channel":"pong"}' in t, timeout=2)
            assert texts[-1] == '{"channel":"pong"}'

            v.inject("disconnect", down_s=30)
            closed = await asyncio.wait_for(ws.receive(), 5)
            assert closed.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
            assert ws.close_code == 1001
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await s.ws_connect(f"{sim.ws_url}{WS}")
        assert refused.value.status == 503
        async with s.post(f"{sim.rest_url}/_sim/fault", json={"exchange": "hyperliquid", "kind": "clear"}) as r:
            assert r.status == 200 and (await r.json())["faults"]["ws_down_remaining_s"] == 0
        async with s.post(f"{sim.rest_url}/_sim/fault", json={"exchange": "hyperliquid", "kind": "nope"}) as r:
            assert r.status == 400 and "unknown kind" in (await r.json())["error"]
        async with s.ws_connect(f"{sim.ws_url}{WS}") as ws:
            await subscribe(ws, type="allMids")
        async with s.get(f"{sim.rest_url}/_sim/status") as r:
            assert "hyperliquid" in (await r.json())["venues"]


async def test_loop_and_shift_to_now_move_times_by_whole_minutes_and_tids_past_the_recording() -> None:
    trades = recorded_trades()
    async with simulator(speed=0, loop=True, shift_to_now=True, start="manual") as sim, \
            aiohttp.ClientSession() as s, s.ws_connect(f"{sim.ws_url}{WS}") as ws:
        v = venue(sim)
        await subscribe(ws, type="trades", coin="BTC")
        v.restart()
        texts = await ws_messages(ws, lambda t: sum(len(d) for d in channel_data(t, "trades")) >= 2 * len(trades))
        got = [t for d in channel_data(texts, "trades") for t in d][: 2 * len(trades)]
        offset = v.status()["time_offset_ms"]
        assert offset > 0 and offset % 60_000 == 0
        assert got == v.expected_trades(0) + v.expected_trades(1)
        assert [t["time"] for t in got[: len(trades)]] == [t["time"] + offset for t in trades]
        assert [t["tid"] for t in got[len(trades):]] == [t["tid"] + 10**16 for t in trades]
        # Whole minutes past every recorded time (trades from 20:33:14, books to 20:34:28): the next loop's
        # trades are later than this loop's and fall in later candles.
        assert got[len(trades)]["time"] - got[0]["time"] == v.loop_shift_ms == 120_000
        assert got[len(trades)]["time"] // 60_000 > max(t["time"] for t in got[: len(trades)]) // 60_000
