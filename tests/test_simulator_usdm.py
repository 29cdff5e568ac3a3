"""The `binanceusdm` simulator venue against the real, unmodified ccxt.pro 4.5.90, and its faults on the wire.

Expected values come straight from the raw USD-M capture (tests/test_simulator_depth.py `replay_capture` runs
Binance's client procedure on it), not from the simulator's loader.
"""

from __future__ import annotations

import asyncio
import gzip
import itertools
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import ccxt
import ccxt.pro
import pytest

from common.config import ExchangeSettings
from common.exchanges.clients import apply_endpoints
from simulator import Simulator, real_data_dir, start_simulator
from simulator.server import SimulatorOptions
from simulator.usdm import BinanceUsdm
from tests.test_simulator_depth import as_floats, replay_capture, top_of

DATA = real_data_dir()
CAPTURE = "binance_usdm_btcusdt_20240808.gz"
TOPS, TICKERS, FACTS = replay_capture((CAPTURE,))
SYMBOL = "BTC/USDT:USDT"


def recorded_trades(limit: int) -> list[dict[str, Any]]:
    out = []
    with gzip.open(DATA / "ws-captures" / CAPTURE, "rt") as fh:
        for line in fh:
            if '"stream":"btcusdt@trade"' in line[:60]:
                out.append(json.loads(line.split(" ", 1)[1])["data"])
                if len(out) == limit:
                    break
    return out


def usdm(sim: Simulator) -> BinanceUsdm:
    venue = sim.venues["binanceusdm"]
    assert isinstance(venue, BinanceUsdm)
    return venue


@pytest.fixture
async def made() -> AsyncIterator[list[Any]]:
    exchanges: list[Any] = []
    yield exchanges
    for ex in exchanges:
        await ex.close()


def pro_usdm(sim: Simulator, made: list[Any]) -> Any:
    ex = ccxt.pro.binanceusdm({"options": {"tradesLimit": 100_000}})
    apply_endpoints(ex, ExchangeSettings(id="binanceusdm", symbols=[SYMBOL], rest_url=sim.rest_url,
                                         ws_url=sim.ws_url))
    made.append(ex)
    return ex


def test_recorded_usdm_depth_chains_by_pu_and_matches_the_recorded_book_tickers() -> None:
    before = FACTS["diffs_before_snapshot"]
    snap = FACTS["snapshot_id"]
    assert len(before) == 6 and all(b["pu"] == a["u"] for a, b in itertools.pairwise(before))
    assert before[4]["U"] <= snap <= before[4]["u"]  # the futures rule: the first applied diff straddles it
    at_diff = [t for t in TICKERS if t["u"] in TOPS]
    assert len(at_diff) > 500
    assert all(TOPS[t["u"]] == (t["b"], t["B"], t["a"], t["A"]) for t in at_diff)
    assert FACTS["crossed"] == 0


async def test_ccxt_binanceusdm_market_data_from_the_venue(made: list[Any]) -> None:
    async with start_simulator(speed=2, history=False, venues=("binanceusdm",)) as sim:
        ex = pro_usdm(sim, made)
        async with asyncio.timeout(40):
            await ex.load_markets()
            market = ex.market(SYMBOL)
            trades = await ex.watch_trades(SYMBOL)
            books = [await ex.watch_order_book(SYMBOL) for _ in range(8)]
            bids_asks = await ex.watch_bids_asks([SYMBOL])
            ticker = await ex.watch_ticker(SYMBOL)
            mark = await ex.watch_mark_price(SYMBOL)
            funding = await ex.fetch_funding_rate(SYMBOL)
            oi = await ex.fetch_open_interest(SYMBOL)
            ohlcv = await ex.watch_ohlcv(SYMBOL, "1m")
        rest = usdm(sim).status()["rest"]

    # Assert: markets from the recorded exchangeInfo (tick fixed to 0.10), trades as recorded.
    assert market["swap"] and market["linear"] and market["precision"]["price"] == 0.1
    first = recorded_trades(1)[0]
    assert (trades[0]["id"], trades[0]["price"], trades[0]["side"]) == (str(first["t"]), float(first["p"]),
                                                                         "sell" if first["m"] else "buy")
    # The book: synced on a snapshot (the recorded one, or the replayed book if the replay had passed it), then
    # equal to the recording at each nonce, never crossed.
    assert books[0]["nonce"] == FACTS["snapshot_id"] or books[0]["nonce"] in TOPS
    for ob in books[1:]:
        assert top_of(ob) == as_floats(TOPS[ob["nonce"]])
    # bookTicker as recorded.
    info = bids_asks[SYMBOL]["info"]
    assert any(t["u"] == info["u"] and t["b"] == info["b"] and t["a"] == info["a"] for t in TICKERS)
    # Derived streams: ticker, mark/index/funding, open interest, klines (module docstring of usdm.py).
    assert ticker["last"] > 0 and ticker["high"] >= ticker["low"]
    assert mark["markPrice"] > 0 and mark["indexPrice"] > 0 and abs(mark["markPrice"] / mark["indexPrice"] - 1) < 0.01
    assert -0.0075 <= funding["fundingRate"] <= 0.0075 and funding["fundingTimestamp"] % (8 * 3600_000) == 0
    assert funding["markPrice"] > 0 and funding["indexPrice"] > 0
    assert oi["openInterestAmount"] > 0
    assert ohlcv[-1][0] % 60_000 == 0 and ohlcv[0][1] == float(first["p"])
    assert rest["requests"]["exchangeInfo"] == 1 and rest["status"] == {"200": sum(rest["requests"].values())}


async def test_ccxt_resyncs_after_a_pu_gap(made: list[Any]) -> None:
    async with start_simulator(speed=2, history=False, venues=("binanceusdm",)) as sim:
        ex = pro_usdm(sim, made)
        async with asyncio.timeout(40):
            for _ in range(3):
                await ex.watch_order_book(SYMBOL)
            usdm(sim).inject("sequence_gap", stream="@depth", count=1)
            with pytest.raises(ccxt.ChecksumError):
                for _ in range(100):
                    await ex.watch_order_book(SYMBOL)
            books = [await ex.watch_order_book(SYMBOL) for _ in range(5)]
        status = usdm(sim).status()
    assert len(status["faults"]["dropped_depth_ids"]) == 1
    assert status["depth"]["snapshots_served"]["replayed"] >= 1
    for ob in books:
        assert top_of(ob) == as_floats(TOPS[ob["nonce"]])


# ------------------------------------------------------------------------------------------------------------
# Wire faults and REST limits


@pytest.fixture
async def manual() -> AsyncIterator[Simulator]:
    async with start_simulator(start="manual", max_trades=300, history=False, venues=("binanceusdm",)) as sim:
        yield sim


async def frames(sim: Simulator, fault: tuple[str, dict[str, Any]] | None, count: int,
                 streams: str = "btcusdt@depth@0ms/btcusdt@trade") -> list[str]:
    out: list[str] = []
    async with aiohttp.ClientSession() as s, s.ws_connect(
            f"{sim.ws_url}/fstream.binance.com/stream?streams={streams}") as ws:
        if fault is not None:
            usdm(sim).inject(fault[0], **fault[1])
        usdm(sim).speed = 0
        usdm(sim).restart()
        async with asyncio.timeout(10):
            while len(out) < count:
                msg = await ws.receive()
                assert msg.type == aiohttp.WSMsgType.TEXT, msg
                out.append(msg.data)
    return out


def diffs(texts: list[str]) -> list[dict[str, Any]]:
    return [d for d in (json.loads(t)["data"] for t in texts) if d.get("e") == "depthUpdate"]


async def test_pu_chains_on_the_wire_and_sequence_gap_breaks_it_once(manual: Simulator) -> None:
    plain = diffs(await frames(manual, None, 40))
    assert len(plain) > 5 and all(b["pu"] == a["u"] for a, b in itertools.pairwise(plain))
    gapped = diffs(await frames(manual, ("sequence_gap", {"stream": "@depth", "count": 1, "after": 3}), 40))
    breaks = [i for i, (a, b) in enumerate(itertools.pairwise(gapped)) if b["pu"] != a["u"]]
    assert breaks == [2]


async def test_duplicate_reorder_malformed_and_clock_skew_on_the_wire(manual: Simulator) -> None:
    venue = usdm(manual)
    plain = [json.loads(t)["data"] for t in await frames(manual, None, 10)]
    dup = diffs(await frames(manual, ("duplicate", {"stream": "@depth"}), 20))
    assert dup[0] == dup[1] and dup[2]["pu"] == dup[1]["u"]
    venue.inject("clear")
    swapped = diffs(await frames(manual, ("reorder", {"stream": "@depth"}), 20))
    assert swapped[0]["pu"] == swapped[1]["u"]
    venue.inject("clear")
    bad = await frames(manual, ("malformed_ws", {}), 3)
    with pytest.raises(ValueError):
        json.loads(bad[0])
    venue.inject("clear")
    skewed = [json.loads(t)["data"] for t in await frames(manual, ("clock_skew", {"ms": -3000}), 10)]
    assert [d["E"] - 3000 for d in plain] == [d["E"] for d in skewed]
    assert [d["T"] - 3000 for d in plain] == [d["T"] for d in skewed]


async def test_halt_and_stall_keep_the_socket_and_answer_pings(manual: Simulator) -> None:
    venue = usdm(manual)
    async with aiohttp.ClientSession() as s, s.ws_connect(
            f"{manual.ws_url}/fstream.binance.com/public/ws/btcusdt@trade", autoping=False) as ws:
        venue.restart()
        first = json.loads((await ws.receive(timeout=10)).data)["t"]
        for kind in ("halt", "stall"):
            venue.inject(kind, seconds=1.0)
            began = time.monotonic()
            await ws.ping(kind.encode())
            while (msg := await ws.receive(timeout=10)).type == aiohttp.WSMsgType.TEXT:
                pass
            assert msg.type == aiohttp.WSMsgType.PONG and msg.data == kind.encode()
            assert time.monotonic() - began < 1.0
            nxt = json.loads((await ws.receive(timeout=10)).data)
            assert time.monotonic() - began >= 0.9 and nxt["t"] > first


async def test_disconnect_closes_and_refuses_then_accepts(manual: Simulator) -> None:
    venue = usdm(manual)
    url = f"{manual.ws_url}/fstream.binance.com/market/ws/btcusdt@markPrice@1s"
    async with aiohttp.ClientSession() as s:
        async with s.ws_connect(url) as ws:
            venue.inject("disconnect", down_s=0.5)
            msg = await ws.receive(timeout=5)
            assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await s.ws_connect(url)
        assert refused.value.status == 503
        deadline = time.monotonic() + 5
        while True:  # accepted again once down_s has passed (polled with a bound)
            try:
                async with s.ws_connect(url):
                    break
            except aiohttp.WSServerHandshakeError:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)


async def test_rest_weights_429_retry_after_418_and_5xx(manual: Simulator) -> None:
    venue = usdm(manual)
    venue.limiter.limit = 40
    venue.limiter.ban_after_429s = 1
    base = f"{manual.rest_url}/fapi.binance.com/fapi/v1"
    got: list[tuple[int, str | None, str | None]] = []
    async with aiohttp.ClientSession() as s:
        venue.inject("http_error", status=502, count=1)
        async with s.get(f"{base}/ping") as r:
            got.append((r.status, r.headers.get("X-MBX-USED-WEIGHT-1M"), None))
        for path in ("depth?symbol=BTCUSDT&limit=1000", "klines?symbol=BTCUSDT&interval=1m&limit=1000",
                     "premiumIndex?symbol=BTCUSDT", "depth?symbol=BTCUSDT&limit=1000", "ping", "ping"):
            async with s.get(f"{base}/{path}") as r:
                got.append((r.status, r.headers.get("X-MBX-USED-WEIGHT-1M"), r.headers.get("Retry-After")))
    assert got[0] == (502, "1", None)
    assert got[1:4] == [(200, "21", None), (200, "26", None), (200, "27", None)]  # depth 20, klines 5, premium 1
    assert got[4][:2] == (429, "47") and int(got[4][2] or 0) >= 1
    assert got[5][0] == 418 and int(got[5][2] or 0) >= 100 and got[6][0] == 418


def test_mdp_simulate_serves_the_venue_named_on_the_command_line() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mdp = Path(sys.executable).with_name("mdp")
    proc = subprocess.Popen([str(mdp), "simulate", "--venue", "binanceusdm", "--port", str(port), "--no-history",
                             "--max-trades", "50"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_sim/status", timeout=2) as r:
                    status = json.load(r)
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
                time.sleep(0.2)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/fapi.binance.com/fapi/v1/depth?symbol=BTCUSDT"
                                    f"&limit=5", timeout=5) as r:
            book = json.load(r)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
    assert status["venues"]["binanceusdm"]["state"] == "idle"
    assert book["lastUpdateId"] == FACTS["snapshot_id"] and len(book["asks"]) == 5
    with pytest.raises(ValueError, match="binanceusdm"):
        Simulator(SimulatorOptions(venues=("nosuch",), history=False, max_trades=10))
