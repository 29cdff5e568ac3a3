"""The trade decode fast path against ccxt.pro's own path, on every real WebSocket capture with trades.

Each capture (data/real/ws-captures, and the unshipped ones of the real-data folder) is replayed frame by frame,
as Binance sent them (one trade per frame), through both paths of the collector's trades feed, with no network:
- ccxt: `TradesFeed`; every frame goes to the ccxt.pro exchange's `handle_message` (after the JSON parse ccxt's
  client does), the feed reads ccxt's trade cache and builds events with common/exchanges/events.py `trade_event`;
- fast: `FastTradesFeed`; every frame passes the exchange object's FrameTap, where `TradeWire` decodes the trade
  frames (common/exchanges/wire/binance_trades.py) and ccxt gets the others.
Both must publish identical events (ids, Decimals, exchange times, sides, symbols; `ts_recv` is the local clock
at receipt in both, so it is compared for bounds, not value) and, on a replay with breaks and dropped messages,
identical Gaps naming the same missing trade ids.

`python -m tests.test_fast_path_trades` prints the CPU per trade of both paths on each capture.
"""

from __future__ import annotations

import asyncio
import gzip
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import msgspec
import orjson
import pytest

from common.bus import streams
from common.config import ConfigError, ExchangeSettings, Settings
from common.domain.timeframe import MS
from common.exchanges.clients import make_pro_exchange
from common.exchanges.wire.binance_trades import is_trade_frame
from schemas import Event, Gap, Trade
from services.collector.feeds import FastTradesFeed, Feed, TradesFeed, plan_feeds
from services.collector.frame_tap import FrameTap
from services.collector.outbox import Position
from services.collector.service import Collector
from services.collector.symbols import SymbolState
from services.collector.wires import FAST_TRADES, TradeWire
from simulator import start_simulator, usdm
from simulator.recording import SHIPPED_DATA, load_exchange_info, real_data_dir
from tests.collecting import collector_settings, read, run_collector

ROOT = Path(__file__).resolve().parent.parent

# Capture name prefix -> ccxt id and the URL of the connection ccxt.pro opens for its trades (the market type
# ccxt reads from it: `/stream` spot, else contract).
VENUES = {
    "binance_spot_": ("binance", "wss://stream.binance.com:9443/ws/0"),
    "binance_usdm_": ("binanceusdm", "wss://fstream.binance.com/public/ws/0"),
    "binance_cm_": ("binancecoinm", "wss://dstream.binance.com/ws/0"),
}


def captures() -> list[Path]:
    """Every WebSocket capture: the shipped ones and those of the real-data folder (by name, once)."""
    found: dict[str, Path] = {}
    for folder in (real_data_dir(ROOT) / "ws-captures", ROOT / SHIPPED_DATA / "ws-captures"):
        for path in sorted(folder.glob("*.gz")):
            found.setdefault(path.name, path)
    return [found[name] for name in sorted(found)]


def frames(path: Path) -> list[tuple[int, str]]:
    """(local receive ns, raw frame) of each line, `<ns> <json>`."""
    out = []
    with gzip.open(path, "rt") as fh:
        for line in fh:
            ns, _, raw = line.rstrip("\n").partition(" ")
            out.append((int(ns), raw))
    return out


def venue_of(path: Path) -> tuple[str, str] | None:
    return next((v for prefix, v in VENUES.items() if path.name.startswith(prefix)), None)


def binance_captures() -> list[Path]:
    return [p for p in captures() if venue_of(p) is not None]


def spot_capture() -> Path:
    return next(p for p in captures() if p.name.startswith("binance_spot_"))


def exchange_for(exchange_id: str) -> Any:
    """A ccxt.pro object configured as the collector configures it, with the recorded markets (no network)."""
    exchange = make_pro_exchange(ExchangeSettings(id=exchange_id, symbols=[]))
    exchange.options["crossMarginPairsData"] = exchange.options["isolatedMarginPairsData"] = []
    data = real_data_dir(ROOT)
    if exchange_id == "binance":
        info = load_exchange_info(data)
    elif exchange_id == "binanceusdm":
        info = usdm._load_exchange_info(data)
    else:  # no recorded COIN-M exchangeInfo: ccxt then names the market by its id, on both paths alike
        info = {"symbols": []}
    exchange.set_markets([exchange.parse_market(s) for s in info["symbols"]])
    return exchange


class StubClient:
    """What ccxt.pro's handlers use of a connection; `handle_text_or_binary_message` is the client's own step:
    parse the JSON (orjson, as ccxt does when it is installed), then the exchange's message handler."""

    decompressBinary = True  # ccxt's attribute

    def __init__(self, exchange: Any, url: str) -> None:
        self.exchange, self.url = exchange, url
        self.subscriptions: dict[str, Any] = {}
        self.futures: dict[str, Any] = {}

    @property
    def asyncio_loop(self) -> asyncio.AbstractEventLoop:  # ccxt's Client holds the loop it runs on
        return asyncio.get_running_loop()

    def handle_text_or_binary_message(self, data: str) -> None:
        self.exchange.handle_message(self, orjson.loads(data))

    def resolve(self, result: Any, message_hash: str) -> Any:
        return result

    def reject(self, result: Any, message_hash: str | None = None) -> Any:
        return result

    def closed(self) -> bool:
        return False


class Host:
    """feeds.FeedHost of a replay without Redis: `publish` records what a feed hands the outbox, and settles its
    trades at once, as a successful publish does."""

    def __init__(self, exchange: Any, exchange_id: str, symbol: str) -> None:
        self.exchange, self.exchange_id = exchange, exchange_id
        self.exchange_settings = ExchangeSettings(id=exchange_id, symbols=[symbol])
        self.rest = None
        self.state_by_symbol = {symbol: SymbolState()}
        self.count: Counter[str] = Counter()
        self.sequential_ids = True
        self.trades: list[Trade] = []
        self.gaps: list[Gap] = []

    async def publish(self, events: Sequence[Event], gaps: list[Event] | None = None, symbol: str = "",
                      channel: str = "", position: Position | None = None) -> None:
        self.gaps += [g for g in gaps or [] if isinstance(g, Gap)]
        trades = [e for e in events if isinstance(e, Trade)]
        self.trades += trades
        self.state_by_symbol[symbol].settle([(t.trade_id, t.ts_event // MS) for t in trades])

    def drop_connections(self, feed: Feed, reason: str) -> int:
        return 0

    def next_round_in(self) -> float:
        return 0.0  # no publisher: a round is always due


@dataclass
class Replay:
    host: Host
    feed: TradesFeed
    exchange: Any
    tap: FrameTap | None
    trade_frames: int
    wall: tuple[int, int]  # local clock before and after


def symbol_of(exchange: Any, exchange_id: str, url: str, lines: list[tuple[int, str]]) -> str:
    """The unified symbol of a capture's trades, as ccxt.pro names it."""
    first = next(raw for _, raw in lines if is_trade_frame(raw))
    market_id = orjson.loads(first)["data"]["s"]
    spot = exchange.is_spot_url(StubClient(exchange, url))
    return str(exchange.safe_market(market_id, None, None, "spot" if spot else "contract")["symbol"])


async def replay(path: Path, fast: bool, sweep_every: int = 1, breaks: dict[int, int] | None = None,
                 limit: int | None = None) -> Replay:
    """Every frame of `path` through one path's feed, swept after every `sweep_every` frames. `breaks`: after
    trade k (0-based, counted over the capture) the connection breaks (the feed opens its outage, as ccxt's
    close hook does) and the frames of the next n trades never arrive."""
    exchange_id, url = venue_of(path) or ("", "")
    lines = frames(path)
    exchange = exchange_for(exchange_id)
    symbol = symbol_of(exchange, exchange_id, url, lines)
    host = Host(exchange, exchange_id, symbol)
    client = StubClient(exchange, url)
    tap = None
    feed: TradesFeed
    if fast:
        feed = FastTradesFeed(host, symbol, ("trades",), 60.0)
        TradeWire.of(exchange).add(feed)
        tap = FrameTap.of(exchange)
        tap.install(client)
    else:
        feed = TradesFeed(host, symbol, ("trades",), 60.0)
    breaks = breaks or {}
    trade_no, dropping, since_sweep = -1, 0, 0
    started = time.time_ns()
    for _, raw in lines:
        if is_trade_frame(raw):
            trade_no += 1
            if limit is not None and trade_no >= limit:
                break
            if dropping:
                dropping -= 1
                continue
        client.handle_text_or_binary_message(raw)
        since_sweep += 1
        if since_sweep >= sweep_every:
            await feed.sweep()
            since_sweep = 0
        if is_trade_frame(raw) and trade_no in breaks:
            feed.open_outage(f"test break after trade {trade_no}")
            dropping = breaks[trade_no]
    await feed.sweep()
    return Replay(host, feed, exchange, tap, trade_no + 1, (started, time.time_ns()))


def without_recv(trades: list[Trade]) -> list[Trade]:
    return [msgspec.structs.replace(t, ts_recv=0) for t in trades]


def gap_fields(gaps: list[Gap]) -> list[tuple[Any, ...]]:
    """A Gap's content (its own ts_event/ts_recv are the local clock when it was made)."""
    return [(g.exchange, g.symbol, g.channel, g.start, g.end, g.reason, g.first_missing_id, g.last_missing_id)
            for g in gaps]


def test_every_capture_is_classified() -> None:
    # Every capture with trades is either a Binance one (both paths compared below) or one whose exchange has no
    # trade fast path: then no frame of it is a Binance trade frame, so the wire takes none and ccxt parses all.
    found = captures()
    assert {p.name for p in found} >= {p.name for p in (ROOT / SHIPPED_DATA / "ws-captures").glob("*.gz")}
    for path in found:
        if venue_of(path) is None:
            assert not any(is_trade_frame(raw) for _, raw in frames(path)), path.name


@pytest.mark.parametrize("path", binance_captures(), ids=lambda p: p.name)
async def test_both_paths_publish_identical_trades(path: Path) -> None:
    # Arrange, Act: every frame of the capture through each path
    ccxt_run = await replay(path, fast=False)
    fast_run = await replay(path, fast=True)
    # Assert: the same events, every trade of the capture, none parsed by ccxt on the fast path
    assert fast_run.trade_frames > 1000
    assert len(ccxt_run.host.trades) == ccxt_run.trade_frames
    assert without_recv(fast_run.host.trades) == without_recv(ccxt_run.host.trades)
    assert [(t.trade_id, str(t.price), str(t.amount)) for t in fast_run.host.trades] == \
        [(t.trade_id, str(t.price), str(t.amount)) for t in ccxt_run.host.trades]  # the same text, not only value
    assert fast_run.tap is not None and fast_run.tap.taken == fast_run.trade_frames
    assert not (fast_run.exchange.trades or {}).get(fast_run.feed.symbol)
    # ts_recv: the local clock when the frame was decoded, never going back
    lo, hi = fast_run.wall
    recv = [t.ts_recv for t in fast_run.host.trades]
    assert lo <= recv[0] and recv[-1] <= hi and recv == sorted(recv)


@pytest.mark.parametrize("path", [p for p in binance_captures() if (venue_of(p) or ("",))[0] in FAST_TRADES],
                         ids=lambda p: p.name)
async def test_breaks_and_dropped_trades_give_identical_gaps(path: Path) -> None:
    # Arrange: three breaks, two losing trades (one of them while trades sit unswept), one losing none
    breaks = {500: 7, 1201: 1, 2000: 0}
    # Act
    ccxt_run = await replay(path, fast=False, sweep_every=3, breaks=breaks, limit=3000)
    fast_run = await replay(path, fast=True, sweep_every=3, breaks=breaks, limit=3000)
    # Assert: the same trades and Gaps; the Gaps name exactly the trade ids never delivered
    assert without_recv(fast_run.host.trades) == without_recv(ccxt_run.host.trades)
    assert gap_fields(fast_run.host.gaps) == gap_fields(ccxt_run.host.gaps)
    lines = [raw for _, raw in frames(path) if is_trade_frame(raw)]
    ids = [str(orjson.loads(raw)["data"]["t"]) for raw in lines[:3000]]
    missing = [(g.first_missing_id, g.last_missing_id) for g in fast_run.host.gaps]
    assert missing == [(ids[501], ids[507]), (ids[1202], ids[1202]), ("", "")]
    assert len(fast_run.host.trades) == 3000 - 8


async def test_two_symbols_on_one_connection_are_routed_to_their_feeds() -> None:
    # Arrange: the BTCUSDT and ETHUSDT spot captures of the same hours, merged by receive time onto one connection
    paths = [p for p in captures() if p.name in ("binance_spot_btcusdt_20240808.gz", "binance_spot_ethusdt_20240808.gz")]
    merged = [raw for _, raw in sorted(line for p in paths for line in frames(p))]
    symbols = ["BTC/USDT", "ETH/USDT"]
    published: dict[bool, dict[str, list[Trade]]] = {}
    for fast in (False, True):
        exchange = exchange_for("binance")
        client = StubClient(exchange, VENUES["binance_spot_"][1])
        feeds: list[TradesFeed] = []
        hosts = []
        for symbol in symbols:
            host = Host(exchange, "binance", symbol)
            feed = (FastTradesFeed if fast else TradesFeed)(host, symbol, ("trades",), 60.0)
            if isinstance(feed, FastTradesFeed):
                TradeWire.of(exchange).add(feed)
            feeds.append(feed)
            hosts.append(host)
        if fast:
            FrameTap.of(exchange).install(client)
        # Act
        for i, raw in enumerate(merged):
            client.handle_text_or_binary_message(raw)
            if i % 5 == 0:
                for feed in feeds:
                    await feed.sweep()
        for feed in feeds:
            await feed.sweep()
        published[fast] = {h.exchange_settings.symbols[0]: without_recv(h.trades) for h in hosts}
    # Assert
    assert len(published[True]["BTC/USDT"]) == 9757 and len(published[True]["ETH/USDT"]) == 6106
    assert published[True] == published[False]


async def test_duplicate_frames_publish_once() -> None:
    # Arrange: a capture's trade frames, each sent twice (the simulator's `duplicate` wire fault)
    path = spot_capture()
    exchange = exchange_for("binance")
    host = Host(exchange, "binance", "BTC/USDT")
    feed = FastTradesFeed(host, "BTC/USDT", ("trades",), 60.0)
    TradeWire.of(exchange).add(feed)
    client = StubClient(exchange, VENUES["binance_spot_"][1])
    FrameTap.of(exchange).install(client)
    trades = [raw for _, raw in frames(path) if is_trade_frame(raw)][:200]
    # Act
    for raw in trades:
        client.handle_text_or_binary_message(raw)
        client.handle_text_or_binary_message(raw)
    await feed.sweep()
    # Assert
    assert [t.trade_id for t in host.trades] == [str(orjson.loads(raw)["data"]["t"]) for raw in trades]


async def test_a_frame_the_decoder_refuses_goes_to_ccxt_and_is_still_published() -> None:
    # Arrange: a trade frame cut short, and a trade whose fields come in another order than Binance's (not
    # recognised as a trade frame: ccxt parses it into its cache)
    exchange = exchange_for("binance")
    host = Host(exchange, "binance", "BTC/USDT")
    feed = FastTradesFeed(host, "BTC/USDT", ("trades",), 60.0)
    TradeWire.of(exchange).add(feed)
    client = StubClient(exchange, VENUES["binance_spot_"][1])
    tap = FrameTap.of(exchange)
    tap.install(client)
    cut = '{"e":"trade","E":1723161255343,"s":"BTCUSDT","t":6,"p":"610'
    reordered = ('{"s":"BTCUSDT","t":7,"p":"61000.10000000","q":"0.50000000","T":1723161255342,"m":false,'
                 '"E":1723161255343,"M":true,"e":"trade"}')
    assert is_trade_frame(cut) and not is_trade_frame(reordered)
    # Act, Assert: the cut frame reaches ccxt's JSON parse (which raises, as on a real connection)
    with pytest.raises(orjson.JSONDecodeError):
        client.handle_text_or_binary_message(cut)
    client.handle_text_or_binary_message(reordered)
    await feed.sweep()
    # Assert: the reordered trade is published from ccxt's cache, as ccxt's path publishes it
    assert tap.taken == 0
    assert [(t.trade_id, t.price, t.side) for t in host.trades] == [("7", Decimal("61000.1"), "buy")]
    assert feed.position() == (1723161255342 * MS, "7")


def test_fast_path_switch_and_its_keys() -> None:
    exchange = exchange_for("binance")
    host = Host(exchange, "binance", "BTC/USDT")
    exchange.has["watchTrades"] = True

    def plan(**fields: Any) -> list[Feed]:
        settings = ExchangeSettings(id=fields.pop("id", "binance"), symbols=["BTC/USDT"], channels=["trades"],
                                    **fields)
        return plan_feeds(host, exchange, settings, ["BTC/USDT"])[0]

    assert type(plan()[0]) is FastTradesFeed  # on by default where it exists
    assert type(plan(fast_path={"trades": True})[0]) is FastTradesFeed
    assert type(plan(fast_path={"trades": False})[0]) is TradesFeed
    assert type(plan(id="coinbase", fast_path={"trades": True})[0]) is TradesFeed  # none for coinbase: ccxt
    with pytest.raises(ConfigError) as err:
        plan(fast_path={"trade": True})
    assert "exchanges[binance].fast_path" in str(err.value) and "'trade'" in str(err.value)
    assert "trades, ticker, book" in str(err.value)


# -- the whole collector against the simulator ------------------------------------------------------------------

COLLECTED = {  # exchange: (symbol, market types, simulator options)
    "binance": ("BTC/USDT", ["spot"], {"speed": 0, "max_trades": 2000, "wait_for_streams": ("btcusdt@trade",),
                                        "book_ticker": False, "depth": False}),
    "binanceusdm": ("BTC/USDT:USDT", ["linear"], {"speed": 10.0, "venues": ("binanceusdm",)}),
}


async def collect(settings: Settings, redis: Any, exchange: str, fast: bool, n: int) -> tuple[list[Trade], Any]:
    """The first `n` trades the collector publishes to raw:{exchange} from a fresh replay, and its exchange object."""
    symbol, types, options = COLLECTED[exchange]
    async with start_simulator(**options) as sim:
        cfg = collector_settings(settings, sim.rest_url, sim.ws_url, exchange=exchange, symbols=[symbol],
                                 market_types=types, channels=["trades"], fast_path={"trades": fast})
        collector = Collector(cfg, "t", exchange=exchange)

        async def enough() -> bool:
            return collector.count["trades"] >= n

        await run_collector(collector, enough)
    events = await read(redis, streams.raw(exchange))
    return [e for e in events if isinstance(e, Trade)][:n], collector.exchange


@pytest.mark.parametrize("exchange", sorted(COLLECTED))
async def test_the_collector_publishes_the_same_trades_on_both_paths(exchange: str, settings: Settings,
                                                                     redis: Any) -> None:
    # Arrange, Act: the same replay collected by ccxt's path, then (a fresh Redis stream) by the fast path
    n = 2000 if exchange == "binance" else 300
    slow, _ = await collect(settings, redis, exchange, fast=False, n=n)
    await redis.flushdb()
    fast, fast_exchange = await collect(settings, redis, exchange, fast=True, n=n)
    # Assert: identical trades; the fast path decoded them (ccxt's trade cache stayed empty)
    assert len(fast) == n
    assert without_recv(fast) == without_recv(slow)
    assert fast_exchange.mdp_frame_tap.taken >= n
    assert not fast_exchange.trades


# -- CPU per trade --------------------------------------------------------------------------------------------


def cpu_per_trade(path: Path, fast: bool, repeat: int = 3) -> float:
    """CPU seconds per trade, from the frame's text to the events taken for the outbox (one trade per frame, one
    take per frame as when every frame wakes the feed), best of `repeat`. The rest of the way (ccxt's socket
    reading before, the outbox after) is the same on both paths."""
    exchange_id, url = venue_of(path) or ("", "")
    lines = frames(path)
    raws = [raw for _, raw in lines if is_trade_frame(raw)]
    best = float("inf")
    for _ in range(repeat):
        exchange = exchange_for(exchange_id)
        symbol = symbol_of(exchange, exchange_id, url, lines)
        host = Host(exchange, exchange_id, symbol)
        client = StubClient(exchange, url)
        state = host.state_by_symbol[symbol]
        feed: TradesFeed
        if fast:
            feed = FastTradesFeed(host, symbol, ("trades",), 60.0)
            TradeWire.of(exchange).add(feed)
            FrameTap.of(exchange).install(client)
        else:
            feed = TradesFeed(host, symbol, ("trades",), 60.0)
        handle, take = client.handle_text_or_binary_message, feed.take
        taken = 0
        start = time.process_time()
        for raw in raws:
            handle(raw)
            taken += len(take(state))
        best = min(best, (time.process_time() - start) / len(raws))
        assert taken == len(raws)
    return best


def test_fast_path_costs_less_cpu_per_trade() -> None:
    path = spot_capture()
    assert cpu_per_trade(path, fast=True, repeat=2) < cpu_per_trade(path, fast=False, repeat=2)


if __name__ == "__main__":
    for capture in binance_captures():
        ccxt_us, fast_us = cpu_per_trade(capture, fast=False) * 1e6, cpu_per_trade(capture, fast=True) * 1e6
        print(f"{capture.name}: ccxt {ccxt_us:.1f} us/trade, fast {fast_us:.1f} us/trade ({ccxt_us / fast_us:.1f}x)")
