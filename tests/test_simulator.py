"""The exchange simulator against the real, unmodified ccxt / ccxt.pro, and against the recordings themselves.

Expected values are read here straight from the real files (gzip capture lines, the zip CSV), independently of
the simulator's loader, so a loader or wire-format bug shows up as a mismatch.
"""

from __future__ import annotations

import asyncio
import csv
import gzip
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import ccxt
import ccxt.pro
import pytest

from common.config import ExchangeSettings
from common.exchanges.clients import apply_endpoints
from simulator import Recording, Simulator, real_data_dir, start_simulator
from simulator.recording import MINUTE_MS
from simulator.server import SimulatorOptions

ROOT = Path(__file__).resolve().parent.parent
DATA = real_data_dir(ROOT)
FIRST_TRADE_ID = 3735683259  # first btcusdt@trade of binance_spot_btcusdt_20240808.gz
N = 3000  # trades replayed by most tests: 2.6 minutes of the recording, 3 candles (the last one cut short)
BOTH = ("btcusdt@trade", "btcusdt@kline_1m")


def recorded_trade_lines(limit: int) -> list[tuple[str, dict[str, Any]]]:
    """(the raw line's JSON text, its `data`) of the first `limit` trade messages, across both capture files."""
    out: list[tuple[str, dict[str, Any]]] = []
    for name in ("binance_spot_btcusdt_20240808.gz", "binance_spot_btcusdt_20240809.gz"):
        with gzip.open(DATA / "ws-captures" / name, "rt") as fh:
            for line in fh:
                text = line.split(" ", 1)[1].rstrip("\n")
                if '"stream":"btcusdt@trade"' in text[:40]:
                    out.append((text, json.loads(text)["data"]))
                    if len(out) == limit:
                        return out
    return out


def zip_rows(day: str) -> list[list[str]]:
    with zipfile.ZipFile(DATA / "binance-spot-1m-daily" / f"BTCUSDT-1m-{day}.zip") as zf:
        return list(csv.reader(io.StringIO(zf.read(f"BTCUSDT-1m-{day}.csv").decode())))


def pro_exchange(sim: Simulator) -> Any:
    ex = ccxt.pro.binance({"options": {"fetchMarkets": {"types": ["spot"]}, "tradesLimit": 100_000}})
    apply_endpoints(ex, ExchangeSettings(id="binance", symbols=["BTC/USDT"], rest_url=sim.rest_url,
                                         ws_url=sim.ws_url))
    return ex


@pytest.fixture
async def exchange_for() -> AsyncIterator[Any]:
    made: list[Any] = []

    def make(sim: Simulator) -> Any:
        made.append(pro_exchange(sim))
        return made[-1]

    yield make
    for ex in made:
        await ex.close()


async def collect_trades(ex: Any, count: int, timeout: float = 15.0) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []
    async with asyncio.timeout(timeout):
        while len(got) < count:
            got.extend(await ex.watch_trades("BTC/USDT"))
    return got


async def post(sim: Simulator, path: str, body: dict[str, Any]) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.post(f"{sim.rest_url}{path}", json=body) as r:
        assert r.status == 200, await r.text()
        return await r.json()  # type: ignore[no-any-return]


# ------------------------------------------------------------------------------------------------------------
# The recording and its derived candles


def test_recording_matches_the_capture_and_candles_hold_every_trade_once() -> None:
    rec = Recording.load(DATA, max_trades=N)
    recorded = [d for _, d in recorded_trade_lines(N)]
    assert len(rec.trades) == N
    assert [(t.id, t.price, t.qty, t.time, t.is_buyer_maker) for t in rec.trades] == \
        [(d["t"], d["p"], d["q"], d["T"], d["m"]) for d in recorded]
    assert rec.trades[0].id == FIRST_TRADE_ID and rec.trades[0].side == "sell"  # m=true: the taker sold

    # Each closed candle is exactly the trades of its minute (recomputed here with Decimal).
    assert [c.open_time for c in rec.candles] == [1723161240000, 1723161300000, 1723161360000]
    assert sum(c.count for c in rec.candles) == N
    for c in rec.candles:
        mine = [d for d in recorded if d["T"] // MINUTE_MS * MINUTE_MS == c.open_time]
        prices = [Decimal(d["p"]) for d in mine]
        assert (c.first_trade_id, c.last_trade_id, c.count) == (mine[0]["t"], mine[-1]["t"], len(mine))
        assert (Decimal(c.open), Decimal(c.close)) == (prices[0], prices[-1])
        assert (Decimal(c.high), Decimal(c.low)) == (max(prices), min(prices))
        assert Decimal(c.volume) == sum(Decimal(d["q"]) for d in mine)
        assert Decimal(c.taker_buy_volume) == sum(Decimal(d["q"]) for d in mine if not d["m"])
        quote = sum(Decimal(d["p"]) * Decimal(d["q"]) for d in mine)
        assert Decimal(c.quote_volume) == quote.quantize(Decimal("1e-8"), rounding="ROUND_DOWN")

    throttled = Recording.load(DATA, max_trades=N, kline_throttle_ms=1000)
    assert throttled.candles == rec.candles
    assert sum(1 for e in throttled.events if type(e).__name__ == "KlineEvent") < N // 5

    full = Recording.load(DATA)
    assert len(full.trades) == 19904 and len(full.candles) == 12  # 2024-08-08 23:54 .. 08-09 00:05
    assert [t.id for t in full.trades] == list(range(FIRST_TRADE_ID, FIRST_TRADE_ID + 19904))
    assert sum(c.count for c in full.candles) == 19904
    assert full.loop_shift_ms == 12 * MINUTE_MS

    loop2 = full.trades_in_loop(2)
    assert loop2[0].id == FIRST_TRADE_ID + 2 * 19904 and loop2[0].time == full.trades[0].time + 24 * MINUTE_MS
    assert full.candles_in_loop(1)[0].open_time == full.candles[-1].open_time + MINUTE_MS


# ------------------------------------------------------------------------------------------------------------
# REST with the real ccxt


async def test_load_markets_and_fetch_ohlcv_serve_the_real_daily_zip(exchange_for: Any) -> None:
    async with start_simulator(speed=0, max_trades=N) as sim:
        ex = exchange_for(sim)
        await ex.load_markets()
        assert {"BTC/USDT", "ETH/USDT"} <= set(ex.markets)
        btc = ex.market("BTC/USDT")
        assert btc["spot"] and btc["id"] == "BTCUSDT" and btc["precision"]["price"] == 0.01

        expected = zip_rows("2020-01-01") + zip_rows("2020-01-02")
        rows = await ex.fetch_ohlcv("BTC/USDT", "1m", since=1577836800000, limit=1000)
        assert len(rows) == 1000
        assert rows == [[int(r[0]), *(float(x) for x in r[1:6])] for r in expected[:1000]]
        later = await ex.fetch_ohlcv("BTC/USDT", "1m", since=1577836800000 + 1440 * MINUTE_MS, limit=5)
        assert later[0][0] == int(expected[1440][0]) == 1577923200000  # across the day boundary

        # The raw body is Binance's 12-column array, text as in the zip; weight is counted per minute.
        url = f"{sim.rest_url}/api.binance.com/api/v3/klines?symbol=BTCUSDT&interval=1m&startTime=1577836800000&limit=2"
        async with aiohttp.ClientSession() as s:
            async with s.get(url) as r:
                body = await r.json()
                used = int(r.headers["X-MBX-USED-WEIGHT-1M"])
            assert body[0] == [int(expected[0][0]), *expected[0][1:6], int(expected[0][6]), expected[0][7],
                               int(expected[0][8]), *expected[0][9:12]]
            async with s.get(url.replace("/api.binance.com", "")) as r:  # url_rewrite="path" layout
                assert await r.json() == body
                assert int(r.headers["X-MBX-USED-WEIGHT-1M"]) == used + 2  # spot klines weigh 2
            async with s.get(url.replace("limit=2", "limit=1001")) as r:
                assert r.status == 400 and (await r.json())["code"] == -1130
            async with s.get(f"{sim.rest_url}/api.binance.com/api/v3/time") as r:
                assert abs((await r.json())["serverTime"] - time.time() * 1000) < 5000


async def test_malformed_klines_fault_gives_rows_of_none(exchange_for: Any) -> None:
    async with start_simulator(speed=0, max_trades=N) as sim:
        ex = exchange_for(sim)
        await ex.load_markets()
        since = 1577836800000
        good = await ex.fetch_ohlcv("BTC/USDT", "1m", since=since, limit=3)
        assert all(v is not None for row in good for v in row)

        # Default shape: open time kept, all else null -> [t, None x5] even when `since` is passed.
        await post(sim, "/_sim/fault", {"kind": "malformed_klines", "count": 1})
        bad = await ex.fetch_ohlcv("BTC/USDT", "1m", since=since, limit=3)
        assert bad == [[row[0], None, None, None, None, None] for row in good]
        assert await ex.fetch_ohlcv("BTC/USDT", "1m", since=since, limit=3) == good  # count=1: next one is fine

        # Whole rows null: rows of None without `since`; with `since` ccxt silently drops them (returns []).
        sim.inject("malformed_klines", shape="nulls", count=2)
        assert await ex.fetch_ohlcv("BTC/USDT", "1m", limit=3) == [[None] * 6] * 3
        assert await ex.fetch_ohlcv("BTC/USDT", "1m", since=since, limit=3) == []

        sim.inject("http_error", status=429, retry_after=7)
        with pytest.raises(ccxt.DDoSProtection):
            await ex.fetch_ohlcv("BTC/USDT", "1m", since=since, limit=3)
        assert await ex.fetch_ohlcv("BTC/USDT", "1m", since=since, limit=3) == good


# ------------------------------------------------------------------------------------------------------------
# WebSocket with the real ccxt.pro


async def test_watch_trades_and_ohlcv_deliver_every_recorded_trade_and_candle_once(exchange_for: Any) -> None:
    async with start_simulator(speed=0, max_trades=N, wait_for_streams=BOTH) as sim:
        ex = exchange_for(sim)
        candles = asyncio.create_task(ex.watch_ohlcv("BTC/USDT", "1m"))
        await asyncio.sleep(0.2)
        assert sim.status()["state"] == "idle"  # waits for both streams: nothing is lost to a late subscriber
        trades = await collect_trades(ex, N)
        first_candle = await asyncio.wait_for(candles, 5)
        await sim.wait_finished(10)

        recorded = recorded_trade_lines(N)
        assert len(trades) == N
        assert [t["info"] for t in trades] == [d for _, d in recorded]  # the wire payload is the recorded one
        assert [int(t["id"]) for t in trades] == list(range(FIRST_TRADE_ID, FIRST_TRADE_ID + N))
        assert [(t["price"], t["amount"], t["timestamp"], t["side"]) for t in trades] == \
            [(float(d["p"]), float(d["q"]), d["T"], "sell" if d["m"] else "buy") for _, d in recorded]
        assert [t.id for t in sim.expected_trades()] == [int(t["id"]) for t in trades]

        assert first_candle[0][0] == 1723161240000
        stored = ex.ohlcvs["BTC/USDT"]["1m"]  # ccxt's cache: the last update of each candle
        assert [list(r) for r in stored] == [c.ccxt_row() for c in sim.expected_candles()]
        status = sim.status()
        assert status["state"] == "finished" and status["trades_replayed"] == N
        assert status["sent_by_stream"]["btcusdt@trade"] == N

        # REST now serves the derived candles the replay has closed, in Binance's text format.
        rest = await ex.fetch_ohlcv("BTC/USDT", "1m", since=1723161240000, limit=10)
        assert rest == [c.ccxt_row() for c in sim.expected_candles()]

        # A finished replay does not start again on a new subscription, only on POST /_sim/replay.
        async with aiohttp.ClientSession() as s, s.ws_connect(f"{sim.ws_url}/stream.binance.com/ws/x") as ws:
            await ws.send_json({"method": "SUBSCRIBE", "params": ["btcusdt@trade"], "id": 1})
            assert await ws.receive_json(timeout=5) == {"result": None, "id": 1}
            await asyncio.sleep(0.2)
            assert sim.status()["state"] == "finished" and sim.status()["trades_replayed"] == N
        reply = await post(sim, "/_sim/replay", {"speed": 0})
        assert reply["state"] == "running"
        again = await collect_trades(ex, N)
        assert [int(t["id"]) for t in again[:N]] == list(range(FIRST_TRADE_ID, FIRST_TRADE_ID + N))


async def test_rest_klines_show_no_candle_before_the_replay_reaches_it() -> None:
    async with start_simulator(speed=0, max_trades=N, start="manual") as sim:
        assert sim.candles_between("BTCUSDT", 1723161240000, None, 10) == []
        sim.restart()
        await sim.wait_finished(10)
        assert [c.open_time for c in sim.candles_between("BTCUSDT", 1723161240000, None, 10)] == \
            [1723161240000, 1723161300000, 1723161360000]


async def test_disconnect_raises_network_error_and_stall_keeps_the_socket(exchange_for: Any) -> None:
    async with start_simulator(speed=1.0, max_trades=N) as sim:
        ex = exchange_for(sim)
        first = await asyncio.wait_for(ex.watch_trades("BTC/USDT"), 10)
        assert int(first[0]["id"]) == FIRST_TRADE_ID

        sim.inject("stall", seconds=30)
        await asyncio.sleep(0.3)
        with pytest.raises(TimeoutError):  # connection open, pings answered, no data: the wait must be bounded
            await asyncio.wait_for(ex.watch_trades("BTC/USDT"), 1.0)
        assert len(sim.status()["connections"]) == 1

        pending = asyncio.create_task(ex.watch_trades("BTC/USDT"))
        await asyncio.sleep(0.1)
        await post(sim, "/_sim/fault", {"kind": "disconnect"})
        with pytest.raises(ccxt.NetworkError):
            await asyncio.wait_for(pending, 5)

        sim.inject("clear")
        resumed = await asyncio.wait_for(ex.watch_trades("BTC/USDT"), 10)  # ccxt reconnects and resubscribes
        assert int(resumed[0]["id"]) > int(first[-1]["id"])
        assert sim.status()["state"] == "running"


async def test_loop_shifts_trade_ids_and_times(exchange_for: Any) -> None:
    async with start_simulator(speed=0, max_trades=200, loop=True, book_ticker=False) as sim:
        ex = exchange_for(sim)
        got = await collect_trades(ex, 600)
        ids = [int(t["id"]) for t in got[:600]]
        assert ids == list(range(FIRST_TRADE_ID, FIRST_TRADE_ID + 600))  # no id repeats across loops
        rec = sim.recording
        for loop in (1, 2):
            expected = sim.expected_trades(loop)
            chunk = got[200 * loop: 200 * (loop + 1)]
            assert [(int(t["id"]), t["timestamp"], t["price"]) for t in chunk] == \
                [(t.id, t.time, float(t.price)) for t in expected]
            assert expected[0].time == rec.trades[0].time + loop * rec.loop_shift_ms


async def test_rate_sends_one_trade_per_message_evenly_at_n_a_second() -> None:
    """--rate N (benchmarks): the recorded trades, one per message, 1/N s apart, loop after loop (ids go on)."""
    rate, count = 1000, 600  # 300 recorded trades looped twice: 0.6 s at the rate (about 20 s at the recorded pace)
    async with (start_simulator(rate=rate, max_trades=300, loop=True, book_ticker=False) as sim,
                aiohttp.ClientSession() as s, s.ws_connect(f"{sim.ws_url}/stream.binance.com/ws/btcusdt@trade") as ws):
        arrived: list[float] = []
        ids: list[int] = []
        for _ in range(count):
            ids.append(json.loads(await ws.receive_str(timeout=5))["t"])
            arrived.append(time.monotonic())
    assert ids == list(range(FIRST_TRADE_ID, FIRST_TRADE_ID + count))
    elapsed = arrived[-1] - arrived[0]
    assert 0.9 * (count - 1) / rate < elapsed < 2.0 * (count - 1) / rate, elapsed
    half = arrived[count // 2] - arrived[0]  # evenly spread: half the trades in about half the time
    assert abs(half / elapsed - 0.5) < 0.15, (half, elapsed)
    with pytest.raises(ValueError, match="rate must be above 0"):
        SimulatorOptions(rate=0)


async def test_combined_stream_frames_are_the_recorded_lines_and_shift_to_now() -> None:
    recorded = recorded_trade_lines(50)
    async with (start_simulator(speed=0, max_trades=50) as sim, aiohttp.ClientSession() as s,
                s.ws_connect(f"{sim.ws_url}/stream.binance.com/stream?streams=btcusdt@trade") as ws):
        frames = [await ws.receive_str(timeout=5) for _ in range(50)]
    assert frames == [text for text, _ in recorded]  # byte for byte, envelope included

    async with (start_simulator(speed=0, max_trades=50, shift_to_now=True) as sim, aiohttp.ClientSession() as s,
                s.ws_connect(f"{sim.ws_url}/stream.binance.com/ws") as ws):
        await ws.send_json({"method": "SUBSCRIBE", "params": ["btcusdt@trade"], "id": 7})
        assert await ws.receive_json(timeout=5) == {"result": None, "id": 7}
        events = [await ws.receive_json(timeout=5) for _ in range(50)]
    now_ms = time.time() * 1000
    offset = sim.time_offset_ms
    assert offset % MINUTE_MS == 0 and now_ms - 2 * MINUTE_MS < events[0]["T"] <= now_ms
    assert [(e["e"], e["t"], e["T"]) for e in events] == [("trade", d["t"], d["T"] + offset) for _, d in recorded]
    assert [t.time for t in sim.expected_trades()] == [e["T"] for e in events]


async def test_kline_events_update_per_trade_and_close_each_minute_once() -> None:
    async with (start_simulator(speed=0, max_trades=N, start="manual") as sim, aiohttp.ClientSession() as s,
                s.ws_connect(f"{sim.ws_url}/stream.binance.com/stream?streams=btcusdt@kline_1m/btcusdt@trade") as ws):
        sim.inject("drop_trades", count=3)
        sim.restart()
        frames: list[dict[str, Any]] = []
        while not frames or frames[-1]["stream"] != "btcusdt@kline_1m" or not frames[-1]["data"]["k"]["x"] \
                or frames[-1]["data"]["k"]["t"] != 1723161360000:
            frames.append(await ws.receive_json(timeout=5))
    klines = [f["data"] for f in frames if f["stream"] == "btcusdt@kline_1m"]
    trades = [f["data"] for f in frames if f["stream"] == "btcusdt@trade"]
    assert [t["t"] for t in trades] == list(range(FIRST_TRADE_ID + 3, FIRST_TRADE_ID + N))  # a real id gap
    assert sim.status()["dropped_trade_ids"] == [FIRST_TRADE_ID, FIRST_TRADE_ID + 1, FIRST_TRADE_ID + 2]

    closed = [k for k in klines if k["k"]["x"]]
    expected = sim.expected_candles()
    assert [k["k"]["t"] for k in closed] == [c.open_time for c in expected]  # each minute closed once
    for k, c in zip(closed, expected, strict=True):
        assert k["e"] == "kline" and k["s"] == "BTCUSDT" and k["k"]["i"] == "1m"
        assert [k["k"][f] for f in ("T", "f", "L", "o", "h", "l", "c", "v", "n", "q", "V", "Q")] == \
            [c.close_time, c.first_trade_id, c.last_trade_id, c.open, c.high, c.low, c.close, c.volume,
             c.count, c.quote_volume, c.taker_buy_volume, c.taker_buy_quote_volume]
    updates = [k for k in klines if not k["k"]["x"]]
    assert len(updates) == N  # one open-kline update per trade (kline_throttle_ms=0), dropped trades included
    # Every update of a minute comes before that minute's close, and the close before the next minute's updates.
    order = [(k["k"]["t"], k["k"]["x"]) for k in klines]
    assert order == sorted(order)


def test_cli_serves_and_reports_status() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "simulator", "--port", str(port), "--speed", "0",
                             "--max-trades", "10"], cwd=ROOT, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "MDP_LOG_LEVEL": "INFO"})
    try:
        deadline = time.monotonic() + 15
        status = None
        while status is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_sim/status", timeout=1) as r:
                    status = json.load(r)
            except OSError:
                time.sleep(0.1)
        assert status is not None, "the simulator CLI did not answer within 15 s"
        assert status["state"] == "idle" and status["recording"]["trades"] == 10
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert "10 trades of BTCUSDT" in err and "stopping" in err
