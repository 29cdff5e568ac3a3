"""The order-book decode fast path (services/collector/fast_book.py) against ccxt.pro's own handlers, on every real
capture with Binance depth diffs (data/real/ws-captures: spot BTCUSDT over two files, spot ETHUSDT, USD-M BTCUSDT).

Both paths get the same frames in recorded order: ccxt.pro through `exchange.handle_message` (what its connection
does with a frame after json.loads), the fast path through its frame-tap handler. Each starts as on a live
subscription: the acknowledgement creates the book and spawns the snapshot fetch, the diffs before the recorded
snapshot line are buffered, the snapshot (the recorded REST body, parsed by ccxt's own fetch_order_book) arrives at
its place in the recording and the buffered diffs are replayed onto it. After every diff both books must publish
the same OrderBook event (top levels as exact Decimals, sequence = lastUpdateId, exchange time), the same
resolve/reject decision must have reached the connection, and the whole books must be equal. A second replay drops
diffs: both must break at the same diff with the same error, drop the book, and resync identically from a new
snapshot (the exchange-side book the simulator reconstructs at that point).
"""

from __future__ import annotations

import asyncio
import gzip
import itertools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ccxt.pro
import pytest

from common.bus import streams
from common.config import ExchangeSettings, Settings
from common.exchanges.wire.binance_depth import DepthBook, decode_depth
from schemas import OrderBook
from services.collector.events import book_event
from services.collector.fast_book import FAST_BOOK_EXCHANGES, BinanceBooks, FastBookFeed, book_feed
from services.collector.feeds import BookFeed
from services.collector.frame_tap import FrameTap
from services.collector.service import Collector
from simulator import real_data_dir, start_simulator
from simulator.depth import DepthBook as ExchangeSideBook
from simulator.depth import load_depth
from tests.collecting import collector_settings, read, run_collector

CAPTURES = real_data_dir() / "ws-captures"
DEPTH = 20  # published levels a side compared at every diff (the collector's default book_depth)
SNAPSHOT_LIMIT = 1000  # the collector's default book_snapshot_limit (ccxt's watchOrderBookLimit)


@dataclass(frozen=True)
class Capture:
    """The consecutive capture files of one symbol of one venue (the first holds the REST snapshot line)."""

    exchange: str
    symbol: str
    market_id: str
    files: tuple[Path, ...]

    @property
    def name(self) -> str:
        return f"{self.exchange} {self.symbol}"


def captures() -> list[Capture]:
    """Every capture with depth diffs: binance_{spot,usdm}_{symbol}_{date}.gz grouped by venue and symbol, and
    COIN-M's binance_cm_{symbol}_perp_{date}.gz where the data directory holds it (the rules are the same code;
    the switch turns the fast path on for binance and binanceusdm only)."""
    found = [p for venue in ("spot", "usdm", "cm") for p in sorted(CAPTURES.glob(f"binance_{venue}_*.gz"))]
    out = []
    for (venue, sym), files in itertools.groupby(found, key=lambda p: tuple(p.name.split("_")[1:3])):
        base = sym.upper().removesuffix("USDT").removesuffix("USD")
        if venue == "spot":
            exchange, symbol, market_id = "binance", f"{base}/USDT", sym.upper()
        elif venue == "usdm":
            exchange, symbol, market_id = "binanceusdm", f"{base}/USDT:USDT", sym.upper()
        else:
            exchange, symbol, market_id = "binancecoinm", f"{base}/USD:{base}", f"{sym.upper()}_PERP"
        out.append(Capture(exchange, symbol, market_id, tuple(files)))
    return out


CAPTURE_LIST = captures()


@dataclass(frozen=True)
class Line:
    """A capture line that concerns the book: a depth frame (its text as received) or the REST snapshot body."""

    frame: str
    snapshot: dict[str, Any] | None = None


def lines(capture: Capture) -> list[Line]:
    out = []
    for path in capture.files:
        with gzip.open(path, "rt") as fh:
            for raw in fh:
                text = raw.rstrip("\n").split(" ", 1)[1]
                if text.startswith('{"lastUpdateId"'):
                    out.append(Line(text, json.loads(text)))
                elif "@depth" in text[:48]:
                    out.append(Line(text))
    return out


def raw_form(frame: str) -> str:
    """A combined-stream frame as a raw `/ws` connection carries it (what ccxt.pro subscribes): the event only."""
    return frame[frame.index('"data":') + 7:-1]


# ------------------------------------------------------------------------------------------------------------
# ccxt.pro objects without a network: markets set by hand, the REST depth answered from the recording


def market(capture: Capture) -> dict[str, Any]:
    base, rest = capture.symbol.split("/")
    quote, _, settle = rest.partition(":")
    spot, inverse = capture.exchange == "binance", capture.exchange == "binancecoinm"
    return {"id": capture.market_id, "lowercaseId": capture.market_id.lower(), "symbol": capture.symbol,
            "base": base, "quote": quote, "settle": settle or None, "baseId": base, "quoteId": quote,
            "settleId": settle or None, "type": "spot" if spot else "swap", "spot": spot, "margin": False,
            "swap": not spot, "future": False, "option": False, "contract": not spot,
            "linear": None if spot else not inverse, "inverse": None if spot else inverse, "active": True,
            "contractSize": None if spot else (100.0 if inverse else 1.0),
            "precision": {"amount": 1e-5, "price": 0.01}, "limits": {}, "info": {}}


class Rest:
    """The REST depth endpoint: each request waits until the replay reaches the answer's place (`serve`)."""

    def __init__(self) -> None:
        self.body: dict[str, Any] | None = None
        self.ready = asyncio.Event()
        self.requests = 0

    def serve(self, body: dict[str, Any]) -> None:
        self.body = body
        self.ready.set()

    async def depth(self, params: dict[str, Any]) -> dict[str, Any]:
        self.requests += 1
        await self.ready.wait()
        self.ready.clear()
        assert self.body is not None
        return self.body


def pro_exchange(capture: Capture, rest: Rest) -> Any:
    ex = getattr(ccxt.pro, capture.exchange)({"options": {"watchOrderBookLimit": SNAPSHOT_LIMIT}})
    ex.set_markets([market(capture)])
    ex.publicGetDepth = rest.depth  # spot's GET /api/v3/depth; ccxt's fetch_order_book parses the answer
    ex.fapiPublicGetDepth = rest.depth  # USD-M's GET /fapi/v1/depth
    ex.dapiPublicGetDepth = rest.depth  # COIN-M's GET /dapi/v1/depth
    ex.open()  # the event loop ccxt spawns the snapshot fetch on (watch_* does this first)
    return ex


@dataclass
class Connection:
    """What ccxt's handlers use of a connection: its URL (spot or not), subscriptions, and what reached its
    futures, in order ("resolve" with the book's nonce, or "reject" with the error)."""

    url: str
    subscriptions: dict[str, Any] = field(default_factory=dict)
    outcomes: list[tuple[str, Any]] = field(default_factory=list)
    decompressBinary: bool = True  # ccxt's attribute name

    def resolve(self, result: Any, message_hash: str) -> None:
        self.outcomes.append(("resolve", result.get("nonce")))

    def reject(self, error: Exception, message_hash: str | None = None) -> None:
        self.outcomes.append(("reject", f"{type(error).__name__}: {error}"))


def ws_url(capture: Capture) -> str:
    return {"binance": "wss://stream.binance.com:9443/ws/0", "binanceusdm": "wss://fstream.binance.com/public/ws/0",
            "binancecoinm": "wss://dstream.binance.com/ws/0"}[capture.exchange]


class BookPath:
    """One path (ccxt's or the fast one) over one capture: its exchange object, connection and REST."""

    def __init__(self, capture: Capture, fast: bool) -> None:
        self.capture, self.fast = capture, fast
        self.rest = Rest()
        self.ex = pro_exchange(capture, self.rest)
        self.conn = Connection(ws_url(capture))
        self.books = BinanceBooks.of(self.ex) if fast else None
        self.subscription = {"id": "1", "name": "depth", "symbols": [capture.symbol], "limit": None,
                             "type": {"binance": "spot", "binanceusdm": "linear"}.get(capture.exchange, "inverse"),
                             "params": {}}

    def subscribe(self) -> None:
        """The subscription's acknowledgement: a buffering book and a spawned snapshot fetch."""
        message_hash = "orderbook::" + self.capture.symbol
        if self.books is not None:
            method: Callable[..., Any] = self.books.on_subscribed
        else:
            method = self.ex.handle_order_book_subscription
        self.conn.subscriptions[message_hash] = dict(self.subscription, method=method)
        method(self.conn, {"result": None, "id": 1}, self.conn.subscriptions[message_hash])

    def frame(self, text: str, raw: bool = False) -> None:
        if self.books is not None:
            assert self.books.on_frame(self.conn, raw_form(text) if raw else text)
        else:
            self.ex.handle_message(self.conn, json.loads(text))

    @property
    def book(self) -> Any:
        return self.ex.orderbooks.get(self.capture.symbol)

    def event(self) -> Any:
        """What the collector's BookFeed publishes of this book (after ccxt's limit(), as a watch returns it)."""
        return book_event(self.capture.exchange, self.capture.symbol, self.book.limit(), DEPTH, 0)

    async def close(self) -> None:
        await self.ex.close()


def whole(book: Any) -> tuple[list[list[float]], list[list[float]]]:
    if isinstance(book, DepthBook):
        return book.bids[:], book.asks[:]
    return [list(x) for x in book["bids"]], [list(x) for x in book["asks"]]


async def settle(*paths: BookPath) -> None:
    """Let the spawned snapshot fetches finish."""
    for _ in range(50):
        await asyncio.sleep(0)
        if all(p.book is not None and p.book.get("nonce") is not None for p in paths):
            return
    raise AssertionError("the snapshot was not applied")


def compare(ccxt_path: BookPath, fast: BookPath, where: str) -> None:
    a, b = ccxt_path.book, fast.book
    assert (a is None) == (b is None), where
    assert ccxt_path.conn.outcomes == fast.conn.outcomes, where
    assert ccxt_path.conn.subscriptions.keys() == fast.conn.subscriptions.keys(), where
    if a is None:
        return
    assert a.get("nonce") == b.get("nonce") and a.get("timestamp") == b.get("timestamp"), where
    if a.get("nonce") is None:
        return
    ea, eb = ccxt_path.event(), fast.event()
    assert ea == eb, where
    # exact decimals: the same text, not only equal numbers
    assert [(str(p), str(q)) for p, q in ea.bids + ea.asks] == [(str(p), str(q)) for p, q in eb.bids + eb.asks]


# ------------------------------------------------------------------------------------------------------------
# Identical books at every diff


@dataclass
class Replay:
    diffs: int = 0  # diffs compared after the snapshot
    buffered: int = 0  # diffs received before it
    resolves: int = 0
    resynced_at: list[int] = field(default_factory=list)  # diffs at which both resubscribed after a break


async def replay(capture: Capture, drop: frozenset[int] = frozenset(), raw: bool = False) -> Replay:
    """Every book line of `capture` through both paths, compared after each; diffs whose index (0-based, among
    the diffs) is in `drop` are lost on the way. After a break both resubscribe at the next diff, and the new
    snapshot is the exchange's book at that diff (`exchange_side`)."""
    ccxt_path, fast = BookPath(capture, fast=False), BookPath(capture, fast=True)
    out = Replay()
    resync_snapshot: Callable[[int], dict[str, Any]] | None = None
    try:
        for p in (ccxt_path, fast):
            p.subscribe()
        await asyncio.sleep(0)  # the snapshot requests go out
        index = -1
        for line in lines(capture):
            if line.snapshot is not None:
                for p in (ccxt_path, fast):
                    p.rest.serve(line.snapshot)
                await settle(ccxt_path, fast)
                compare(ccxt_path, fast, f"{capture.name}: snapshot {line.snapshot['lastUpdateId']}")
                continue
            index += 1
            if index in drop:
                continue
            if ccxt_path.book is None:  # broken: resubscribe, fresh snapshot
                resync_snapshot = resync_snapshot or exchange_side(capture)
                out.resynced_at.append(index)
                for p in (ccxt_path, fast):
                    p.subscribe()
                    p.rest.serve(resync_snapshot(index))
                await settle(ccxt_path, fast)
            synced = ccxt_path.book is not None and ccxt_path.book.get("nonce") is not None
            for p in (ccxt_path, fast):
                p.frame(line.frame, raw=raw)
            compare(ccxt_path, fast, f"{capture.name}: diff #{index} {line.frame[:120]}")
            out.diffs += synced
            out.buffered += not synced
        bids_a, asks_a = whole(ccxt_path.book)
        bids_b, asks_b = whole(fast.book)
        assert (bids_a, asks_a) == (bids_b, asks_b), "whole books differ at the end"
        out.resolves = sum(1 for kind, _ in fast.conn.outcomes if kind == "resolve")
        assert ccxt_path.rest.requests == fast.rest.requests
    finally:
        await ccxt_path.close()
        await fast.close()
    return out


@pytest.mark.parametrize("capture", CAPTURE_LIST, ids=lambda c: c.name)
async def test_fast_path_publishes_the_same_books_as_ccxt_at_every_diff(capture: Capture) -> None:
    # Act: spot in the combined-stream form of the recording, USD-M in the raw form ccxt.pro's connection carries
    result = await replay(capture, raw=capture.exchange == "binanceusdm")  # lost-diff test: the other forms
    # Assert (beyond the comparison at every diff): in each recording the snapshot came after the first diffs
    # (buffered, then replayed onto it), and every later diff chained: the snapshot's resolve and one per diff.
    assert result.buffered >= 2
    assert result.diffs > 3000
    if capture.exchange == "binancecoinm":
        # ccxt.pro 4.5.90 replays the buffered diffs of a COIN-M ('inverse') book by spot's rule, so the diff after
        # the straddling one is skipped and the next live diff breaks the chain: both paths break there alike.
        assert len(result.resynced_at) == 1
        return
    assert result.resynced_at == []
    assert result.resolves == result.diffs + 1


def test_every_capture_with_depth_is_compared() -> None:
    names = {p.name for c in CAPTURE_LIST for p in c.files}
    depth = {p.name for p in CAPTURES.glob("*.gz") if not p.name.startswith("hyperliquid_")}  # l2Book snapshots
    assert names == depth and len(CAPTURE_LIST) >= 3


# ------------------------------------------------------------------------------------------------------------
# A lost diff: the same break, the same resync


def exchange_side(capture: Capture) -> Callable[[int], dict[str, Any]]:
    """The REST depth answer at the replay's diff `index`: the exchange's book with every diff before it applied,
    lost or not (simulator/depth.py's DepthBook, the simulator's own answer to a resync)."""
    diffs, snapshot = load_depth(list(capture.files))
    book = ExchangeSideBook(snapshot)

    def at(index: int) -> dict[str, Any]:
        book.reset(0)
        for d in diffs[:index]:
            book.apply(d)
        return book.rest_body(SNAPSHOT_LIMIT, capture.exchange != "binance", diffs[index].event_time)

    return at


@pytest.mark.parametrize("capture", CAPTURE_LIST, ids=lambda c: c.name)
async def test_a_lost_diff_breaks_both_paths_at_the_same_diff_and_both_resync_alike(capture: Capture) -> None:
    # Act: two diffs lost well after the snapshot, the second after the first resync (raw frames for spot and
    # COIN-M, combined for USD-M: the forms the first test does not use)
    lost = frozenset({500, 2000})
    result = await replay(capture, drop=lost, raw=capture.exchange != "binanceusdm")
    # Assert: each loss broke the chain at the next diff (ChecksumError on both paths: compared at every diff),
    # both resubscribed at the one after, and the books then followed the recording to the end.
    assert result.resynced_at[-2:] == [502, 2002]
    assert result.diffs > 3000


# ------------------------------------------------------------------------------------------------------------
# The frame tap and the switch


def test_frames_other_than_depth_diffs_go_to_ccxt_unchanged() -> None:
    tap = FrameTap()
    taken: list[str] = []
    passed: list[Any] = []

    class Client:
        decompressBinary = True  # ccxt's attribute name

        def handle_text_or_binary_message(self, data: Any) -> None:
            passed.append(data)

    client = Client()
    tap.add(lambda c, frame: (taken.append(frame), frame.startswith('{"e":"depthUpdate"'))[1])
    tap.install(client)
    tap.install(client)  # idempotent
    trade = '{"e":"trade","E":1,"s":"BTCUSDT","t":1,"p":"1.0","q":"1.0","T":1,"m":true}'
    depth = '{"e":"depthUpdate","E":1,"s":"BTCUSDT","U":1,"u":2,"b":[],"a":[]}'
    client.handle_text_or_binary_message(trade)
    client.handle_text_or_binary_message(depth.encode())
    assert passed == [trade] and taken == [trade, depth] and tap.taken == 1


def test_decode_depth_reads_both_frame_forms_and_nothing_else() -> None:
    combined = ('{"stream":"btcusdt@depth@100ms","data":{"e":"depthUpdate","E":5,"s":"BTCUSDT","U":1,"u":2,'
                '"b":[["1.50","0.00"]],"a":[["2.00000000","3.10000000"]]}}')
    d = decode_depth(combined)
    assert d is not None and (d.s, d.U, d.u, d.E, d.pu, d.b, d.a) == ("BTCUSDT", 1, 2, 5, None, [(1.5, 0.0)],
                                                                     [(2.0, 3.1)])
    assert decode_depth(raw_form(combined)) == d
    spaced = json.dumps(json.loads(combined))  # '{"stream": ..., "data": {"e": "depthUpdate", ...}}'
    assert decode_depth(spaced) == d and decode_depth(json.dumps(json.loads(raw_form(combined)))) == d
    assert decode_depth('{"stream":"btcusdt@trade","data":{"e":"trade"}}') is None
    assert decode_depth('{"result":null,"id":1}') is None


@pytest.mark.parametrize(("exchange", "switch", "expected"), [
    ("binance", {}, FastBookFeed), ("binanceusdm", {}, FastBookFeed), ("binance", {"book": False}, BookFeed),
    ("binance", {"trades": False}, FastBookFeed), ("coinbase", {}, BookFeed), ("hyperliquid", {"book": True}, BookFeed),
])
def test_the_switch_chooses_the_book_feed(exchange: str, switch: dict[str, bool], expected: type) -> None:
    settings = ExchangeSettings(id=exchange, symbols=["BTC/USDT"], channels=["book"], fast_path=switch)
    assert book_feed(settings) is expected


async def test_the_collector_publishes_the_same_books_on_either_path(settings: Settings, redis: Any) -> None:
    """The whole collector against the simulator's spot replay, once per path: every book both published at the
    same sequence is the same book, and the fast run's books came through the frame tap."""
    published: dict[bool, dict[int | None, OrderBook]] = {}
    for fast in (True, False):
        await redis.flushdb()
        async with start_simulator(speed=5, max_trades=1500, wait_for_streams=("btcusdt@depth@100ms",)) as sim:
            cfg = collector_settings(settings, sim.rest_url, sim.ws_url, channels=["book"], book_depth=10,
                                     book_max_per_s=1000.0, fast_path={"book": fast})
            collector = Collector(cfg, "t", exchange="binance")

            async def enough(c: Collector = collector) -> bool:
                return c.count["books"] >= 30

            await run_collector(collector, enough)
        assert [type(f) for f in collector.feeds] == [FastBookFeed if fast else BookFeed]
        taken = collector.exchange.mdp_frame_tap.taken if fast else 0
        assert (taken > 0) == fast
        books = [e for e in await read(redis, streams.raw("binance")) if isinstance(e, OrderBook)]
        published[fast] = {b.sequence: b for b in books}
    both = published[True].keys() & published[False].keys()
    assert len(both) >= 10
    for sequence in both:
        a, b = published[True][sequence], published[False][sequence]
        # (not ts_event: the simulator stamps each replay's diffs with the time it sends them)
        assert (a.bids, a.asks, a.depth) == (b.bids, b.asks, b.depth), sequence


# ------------------------------------------------------------------------------------------------------------
# CPU per depth message


async def cpu_per_message(capture: Capture) -> tuple[float, float, int]:
    """Microseconds of CPU per depth frame on a synced book: ccxt.pro (json.loads + handle_message, what its
    connection does with a frame) and the fast path (on_frame), the same raw frames, the snapshot applied first
    (untimed), best of three runs each."""
    all_lines = lines(capture)
    at = next(i for i, line in enumerate(all_lines) if line.snapshot is not None)
    frames = [raw_form(line.frame) for line in all_lines[at + 1:] if line.snapshot is None]
    best: list[float] = []
    for fast in (False, True):
        runs = []
        for _ in range(3):
            p = BookPath(capture, fast)
            p.subscribe()
            await asyncio.sleep(0)
            for line in all_lines[:at]:  # buffered until the snapshot
                p.frame(line.frame)
            p.rest.serve(all_lines[at].snapshot or {})
            await settle(p)
            conn, ex, books = p.conn, p.ex, p.books
            start = time.process_time()
            if books is not None:
                for f in frames:
                    books.on_frame(conn, f)
            else:
                for f in frames:
                    ex.handle_message(conn, json.loads(f))
            runs.append((time.process_time() - start) / len(frames) * 1e6)
            assert all(kind == "resolve" for kind, _ in conn.outcomes)
            await p.close()
        best.append(min(runs))
    return best[0], best[1], len(frames)


@pytest.mark.parametrize("capture", [c for c in CAPTURE_LIST if c.exchange in FAST_BOOK_EXCHANGES],
                         ids=lambda c: c.name)
async def test_fast_path_costs_less_cpu_per_depth_message(capture: Capture) -> None:
    ccxt_us, fast_us, frames = await cpu_per_message(capture)
    print(f"\n{capture.name}: {frames} depth frames, CPU per frame: ccxt.pro {ccxt_us:.1f} us, "
          f"fast path {fast_us:.1f} us ({ccxt_us / fast_us:.1f}x)")
    assert fast_us < ccxt_us
