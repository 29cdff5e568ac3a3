"""Binance spot depth in the simulator: the recorded diffs and snapshot, ccxt.pro's watch_order_book syncing on
them, and the wire faults of the spot simulator (simulator/wirefaults.py).

The expected book is rebuilt here straight from the raw capture lines (Binance's documented client procedure),
independently of the simulator's loader, and checked against the recorded bookTickers: the issue's order-book test.
"""

from __future__ import annotations

import asyncio
import gzip
import itertools
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import ccxt
import ccxt.pro
import pytest

from common.config import ExchangeSettings
from common.exchanges.clients import apply_endpoints
from simulator import Simulator, real_data_dir, start_simulator
from simulator.depth import DepthBook, load_depth
from simulator.recording import capture_files

DATA = real_data_dir()
SPOT_FILES = ("binance_spot_btcusdt_20240808.gz", "binance_spot_btcusdt_20240809.gz")
Top = tuple[str, str, str, str]  # best bid, its qty, best ask, its qty


def replay_capture(files: tuple[str, ...]) -> tuple[dict[int, Top], list[dict[str, Any]], dict[str, Any]]:
    """Binance's client procedure on the raw lines: buffer diffs until the snapshot line, drop what it covers,
    apply the rest. Returns the top of book after each applied diff (by its `u`), the bookTickers, and facts."""
    bids: dict[str, str] = {}
    asks: dict[str, str] = {}
    buffered: list[dict[str, Any]] = []
    tops: dict[int, Top] = {}
    tickers: list[dict[str, Any]] = []
    facts: dict[str, Any] = {"crossed": 0}
    snapshot_id: int | None = None

    def apply(d: dict[str, Any]) -> None:
        for side, levels in ((bids, d["b"]), (asks, d["a"])):
            for price, qty in levels:
                if float(qty) == 0:
                    side.pop(price, None)
                else:
                    side[price] = qty
        bb, ba = max(bids, key=float), min(asks, key=float)
        facts["crossed"] += float(bb) >= float(ba)
        tops[d["u"]] = (bb, bids[bb], ba, asks[ba])

    for name in files:
        with gzip.open(DATA / "ws-captures" / name, "rt") as fh:
            for line in fh:
                payload = json.loads(line.split(" ", 1)[1])
                if "lastUpdateId" in payload:
                    snapshot_id = payload["lastUpdateId"]
                    bids, asks = dict(payload["bids"]), dict(payload["asks"])
                    facts.update(snapshot_id=snapshot_id, diffs_before_snapshot=list(buffered))
                    for d in buffered:
                        if d["u"] > snapshot_id:
                            apply(d)
                    continue
                data = payload["data"]
                if "@depth" in payload["stream"]:
                    if snapshot_id is None:
                        buffered.append(data)
                    elif data["u"] > snapshot_id:
                        apply(data)
                elif payload["stream"].endswith("@bookTicker"):
                    tickers.append(data)
    return tops, tickers, facts


SPOT_TOPS, SPOT_TICKERS, SPOT_FACTS = replay_capture(SPOT_FILES)


def pro_binance(sim: Simulator) -> Any:
    ex = ccxt.pro.binance({"options": {"fetchMarkets": {"types": ["spot"]}}})
    apply_endpoints(ex, ExchangeSettings(id="binance", symbols=["BTC/USDT"], rest_url=sim.rest_url,
                                         ws_url=sim.ws_url))
    return ex


def top_of(ob: Any) -> tuple[float, float, float, float]:
    return (ob["bids"][0][0], ob["bids"][0][1], ob["asks"][0][0], ob["asks"][0][1])


def as_floats(top: Top) -> tuple[float, float, float, float]:
    return (float(top[0]), float(top[1]), float(top[2]), float(top[3]))


@pytest.fixture
async def made() -> AsyncIterator[list[Any]]:
    exchanges: list[Any] = []
    yield exchanges
    for ex in exchanges:
        await ex.close()


# ------------------------------------------------------------------------------------------------------------
# The recording


def test_recorded_snapshot_comes_after_the_first_diffs_and_the_book_matches_every_recorded_book_ticker() -> None:
    # Arrange: the raw capture, replayed by the client procedure.
    before = SPOT_FACTS["diffs_before_snapshot"]
    snapshot_id = SPOT_FACTS["snapshot_id"]

    # Assert: the snapshot line follows 3 diffs: it covers the first two, the third straddles it (U <= id+1 <= u),
    # so a client that fetched it applies from a diff it had buffered.
    assert len(before) == 3 and before[1]["u"] <= snapshot_id
    assert before[2]["U"] <= snapshot_id + 1 <= before[2]["u"]
    assert min(SPOT_TOPS) == before[2]["u"]
    # Every bookTicker whose update id ends a diff shows exactly that book's best bid/ask and quantities.
    at_diff = [t for t in SPOT_TICKERS if t["u"] in SPOT_TOPS]
    assert len(at_diff) > 1000
    assert all(SPOT_TOPS[t["u"]] == (t["b"], t["B"], t["a"], t["A"]) for t in at_diff)
    assert SPOT_FACTS["crossed"] == 0


def test_simulator_book_follows_the_recorded_diffs_exactly() -> None:
    diffs, snapshot = load_depth(capture_files(DATA, "BTCUSDT"))
    book = DepthBook(snapshot)
    assert book.rest_body(5, False, 0)["lastUpdateId"] == SPOT_FACTS["snapshot_id"]
    for d in diffs:
        book.apply(d)
        if d.final_id in SPOT_TOPS:
            bb, ba = max(book.bids, key=float), min(book.asks, key=float)
            assert (bb, book.bids[bb], ba, book.asks[ba]) == SPOT_TOPS[d.final_id]
    body = book.rest_body(1000, False, 0)
    assert body["lastUpdateId"] == diffs[-1].final_id
    assert [float(p) for p, _ in body["bids"]] == sorted((float(p) for p, _ in body["bids"]), reverse=True)
    assert book.served == {"recorded": 1, "replayed": 1}


# ------------------------------------------------------------------------------------------------------------
# ccxt.pro against the simulator


async def test_ccxt_watch_order_book_syncs_on_the_late_recorded_snapshot(made: list[Any]) -> None:
    # Arrange: the recorded pace, halved, so the client fetches the snapshot before the replay passes it.
    async with start_simulator(speed=0.5, max_trades=600, history=False) as sim:
        ex = pro_binance(sim)
        made.append(ex)
        seen: list[tuple[int, tuple[float, float, float, float]]] = []
        # Act
        async with asyncio.timeout(20):
            while len(seen) < 12:
                ob = await ex.watch_order_book("BTC/USDT")
                seen.append((ob["nonce"], top_of(ob)))
        served = sim.status()["depth"]["BTCUSDT"]["snapshots_served"]
    # Assert: synced on the recorded snapshot (the only real one), then every book equals the recording's.
    assert served["recorded"] >= 1
    assert seen[0][0] == SPOT_FACTS["snapshot_id"] or seen[0][0] in SPOT_TOPS
    for nonce, top in seen[1:]:
        assert top == as_floats(SPOT_TOPS[nonce]), nonce
        assert top[0] < top[2]
    assert len({n for n, _ in seen}) == len(seen)


async def test_sequence_gap_makes_ccxt_resync_from_a_new_snapshot(made: list[Any]) -> None:
    async with start_simulator(speed=2, max_trades=3000, history=False) as sim:
        ex = pro_binance(sim)
        made.append(ex)
        async with asyncio.timeout(30):
            for _ in range(3):
                await ex.watch_order_book("BTC/USDT")
            # Act: one diff never reaches the socket.
            sim.inject("sequence_gap", stream="@depth", count=1)
            with pytest.raises(ccxt.ChecksumError):
                for _ in range(50):
                    await ex.watch_order_book("BTC/USDT")
            dropped = sim.status()["faults"]["dropped_depth_ids"]
            # The next call resubscribes and fetches a fresh snapshot: the replayed book.
            books = [await ex.watch_order_book("BTC/USDT") for _ in range(5)]
        served = sim.status()["depth"]["BTCUSDT"]["snapshots_served"]
    assert len(dropped) == 1
    assert served["replayed"] >= 1
    for ob in books:
        assert top_of(ob) == as_floats(SPOT_TOPS[ob["nonce"]])
        assert ob["nonce"] > dropped[0]


# ------------------------------------------------------------------------------------------------------------
# Wire faults, seen by a raw WebSocket client


async def frames_after(sim: Simulator, fault: tuple[str, dict[str, Any]] | None, count: int,
                       streams: str = "btcusdt@depth@100ms/btcusdt@trade") -> list[str]:
    """Subscribe (combined), inject `fault`, run the replay flat out, and return the first `count` text frames."""
    out: list[str] = []
    async with aiohttp.ClientSession() as s, s.ws_connect(
            f"{sim.ws_url}/stream.binance.com/stream?streams={streams}") as ws:
        if fault is not None:
            sim.inject(fault[0], **fault[1])
        sim.restart(speed=0)
        async with asyncio.timeout(10):
            while len(out) < count:
                msg = await ws.receive()
                assert msg.type == aiohttp.WSMsgType.TEXT, msg
                out.append(msg.data)
    return out


def depth_ids(frames: list[str]) -> list[tuple[int, int]]:
    ids = []
    for f in frames:
        data = json.loads(f)["data"]
        if data.get("e") == "depthUpdate":
            ids.append((data["U"], data["u"]))
    return ids


@pytest.fixture
async def manual_sim() -> AsyncIterator[Simulator]:
    async with start_simulator(start="manual", max_trades=400, history=False) as sim:
        yield sim


async def test_no_fault_depth_diffs_chain(manual_sim: Simulator) -> None:
    ids = depth_ids(await frames_after(manual_sim, None, 60))
    assert len(ids) > 5 and all(b[0] == a[1] + 1 for a, b in itertools.pairwise(ids))


async def test_sequence_gap_breaks_the_u_chain_once_on_the_wire(manual_sim: Simulator) -> None:
    fault = ("sequence_gap", {"stream": "@depth", "count": 1, "after": 5})
    ids = depth_ids(await frames_after(manual_sim, fault, 60))
    breaks = [(a, b) for a, b in itertools.pairwise(ids) if b[0] != a[1] + 1]
    dropped = manual_sim.status()["faults"]["dropped_depth_ids"]
    assert len(breaks) == 1 and breaks[0][0] == ids[4]  # the 6th diff is missing
    assert len(dropped) == 1 and ids[4][1] < dropped[0] < ids[5][0]


async def test_duplicate_and_reorder_and_malformed_on_the_wire(manual_sim: Simulator) -> None:
    dup = depth_ids(await frames_after(manual_sim, ("duplicate", {"stream": "@depth", "count": 1}), 40))
    assert dup[0] == dup[1] and dup[2][0] == dup[1][1] + 1
    manual_sim.inject("clear")
    swapped = depth_ids(await frames_after(manual_sim, ("reorder", {"stream": "@depth", "count": 1}), 40))
    assert swapped[1][1] + 1 == swapped[0][0]  # the second diff arrives first
    manual_sim.inject("clear")
    frames = await frames_after(manual_sim, ("malformed_ws", {"count": 1}), 5)
    with pytest.raises(ValueError):
        json.loads(frames[0])
    assert all(json.loads(f) for f in frames[1:])


async def test_clock_skew_shifts_event_times_and_server_time(manual_sim: Simulator) -> None:
    plain = [json.loads(f)["data"] for f in await frames_after(manual_sim, None, 20)]
    manual_sim.inject("clock_skew", ms=5000)
    skewed = [json.loads(f)["data"] for f in await frames_after(manual_sim, None, 20)]
    assert [d["E"] + 5000 for d in plain] == [d["E"] for d in skewed]
    async with aiohttp.ClientSession() as s, s.get(f"{manual_sim.rest_url}/api.binance.com/api/v3/time") as r:
        server_time = (await r.json())["serverTime"]
    assert server_time - time.time() * 1000 > 4000


async def test_halt_sends_nothing_but_answers_pings_and_loses_nothing() -> None:
    async with start_simulator(start="manual", max_trades=400, history=False) as sim, \
            aiohttp.ClientSession() as s, \
            s.ws_connect(f"{sim.ws_url}/stream.binance.com/stream?streams=btcusdt@trade", autoping=False) as ws:
        sim.restart(speed=1)
        ids = [json.loads((await ws.receive(timeout=10)).data)["data"]["t"] for _ in range(3)]
        sim.inject("halt", seconds=1.5)
        halted_at = time.monotonic()
        await ws.ping(b"during-halt")
        while (msg := await ws.receive(timeout=10)).type == aiohttp.WSMsgType.TEXT:
            ids.append(json.loads(msg.data)["data"]["t"])  # sent before the halt took hold
        pong = (msg.type, msg.data, time.monotonic() - halted_at)
        ids.append(json.loads((await ws.receive(timeout=10)).data)["data"]["t"])
        resumed_after = time.monotonic() - halted_at
    assert pong[0] == aiohttp.WSMsgType.PONG and pong[1] == b"during-halt" and pong[2] < 1.5
    assert resumed_after >= 1.4  # the server sent nothing while halted
    assert ids == list(range(ids[0], ids[0] + len(ids)))  # nothing lost


async def test_depth_rest_weights_by_limit_then_429_with_retry_after_then_418() -> None:
    async with start_simulator(start="manual", max_trades=100, history=False, weight_limit=100,
                               ban_after_429s=1) as sim, aiohttp.ClientSession() as s:
        url = f"{sim.rest_url}/api.binance.com/api/v3/depth?symbol=BTCUSDT"
        got: list[tuple[int, str | None, str | None]] = []
        for limit in (100, 500, 1000, 1000, 5, 5):
            async with s.get(f"{url}&limit={limit}") as r:
                got.append((r.status, r.headers.get("X-MBX-USED-WEIGHT-1M"), r.headers.get("Retry-After")))
                if r.status == 200:
                    body = await r.json()
                    assert body["lastUpdateId"] == SPOT_FACTS["snapshot_id"] and len(body["bids"]) == limit
    # Assert: weights 5, 25, 50 by limit (Binance spot); over 100: 429, then the ban.
    assert got[:3] == [(200, "5", None), (200, "30", None), (200, "80", None)]
    assert got[3][:2] == (429, "130") and int(got[3][2] or 0) >= 1
    assert got[4][0] == 418 and int(got[4][2] or 0) >= 100
    assert got[5][0] == 418


async def test_http_5xx_on_depth_reaches_ccxt_as_operation_failed(made: list[Any]) -> None:
    async with start_simulator(start="manual", max_trades=100, history=False) as sim:
        ex = pro_binance(sim)
        made.append(ex)
        await ex.load_markets()
        sim.inject("http_error", status=503, count=1)
        with pytest.raises(ccxt.OperationFailed):  # ccxt 4.5.90 maps the body code -1001 to it (not NetworkError)
            await ex.fetch_order_book("BTC/USDT", 5)
        book = await ex.fetch_order_book("BTC/USDT", 5)
    assert book["nonce"] == SPOT_FACTS["snapshot_id"] and len(book["bids"]) == 5
