"""The simulator under many symbols (simulator/market.py, issue 13 item 3): the BTCUSDT capture replayed under K
symbols of the recorded exchangeInfo, ids, prices and event times shifted per symbol, at a total rate.

Arrange / Act / Assert. Each test runs for seconds: short recordings (max_trades) or a short window of a looped one.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import ccxt.pro
import pytest

from common.config import ExchangeSettings
from common.exchanges.clients import apply_endpoints
from simulator import Recording, Simulator, real_data_dir, start_simulator
from simulator.__main__ import options_of, parse_args
from simulator.depth import DepthBook, load_depth
from simulator.market import ID_STRIDE, MarketRecording, MarketSymbolError, PriceLevels, SymbolShape
from simulator.recording import TradeEvent, _with_klines, capture_files, load_exchange_info, to_units
from simulator.server import SimulatorOptions

DATA = real_data_dir()
INFO = load_exchange_info(DATA)
FILTERS = {s["symbol"]: {f["filterType"]: f for f in s["filters"]} for s in INFO["symbols"]}


def assert_valid_price(symbol: str, price: str) -> None:
    """A multiple of the symbol's tickSize, inside its PRICE_FILTER's [minPrice, maxPrice]."""
    pf = FILTERS[symbol]["PRICE_FILTER"]
    units, tick = to_units(price), to_units(pf["tickSize"])
    assert units % tick == 0, (symbol, price, pf)
    assert to_units(pf["minPrice"]) <= units, (symbol, price, pf)
    assert to_units(pf["maxPrice"]) == 0 or units <= to_units(pf["maxPrice"]), (symbol, price, pf)


@pytest.fixture(scope="module")
def source() -> Recording:
    return Recording.load(DATA, max_trades=2000, depth=True)


@pytest.fixture
async def made() -> AsyncIterator[list[Any]]:
    exchanges: list[Any] = []
    yield exchanges
    for ex in exchanges:
        await ex.close()


def pro_binance(sim: Simulator, symbols: list[str]) -> Any:
    ex = ccxt.pro.binance({"options": {"fetchMarkets": {"types": ["spot"]}}})
    apply_endpoints(ex, ExchangeSettings(id="binance", symbols=symbols, rest_url=sim.rest_url, ws_url=sim.ws_url))
    return ex


# ------------------------------------------------------------------------------------------------------------
# The transform, without a server


def test_every_level_is_valid_for_its_symbol_and_the_klines_are_the_candles_of_its_trades(source: Recording) -> None:
    # Arrange: two symbols that take the linear map and the first one whose filter needs the squeezed map.
    levels = PriceLevels(source)
    squeezed = next(s["symbol"] for s in INFO["symbols"]
                    if (shape := levels.shape(s, 2)) is not None and not shape.linear)
    market = MarketRecording.build(source, INFO, ["ETHBTC", "LTCBTC", squeezed])
    assert [s.linear for s in market.shapes] == [True, True, False]

    # Act
    events = list(market.events)

    # Assert: every price of every event and snapshot is a valid level of its symbol.
    for ev in events:
        if isinstance(ev, TradeEvent):
            assert_valid_price(ev.trade.symbol, ev.trade.price)
        elif hasattr(ev, "book"):
            assert_valid_price(ev.book.symbol, ev.book.bid)
            assert_valid_price(ev.book.symbol, ev.book.ask)
            assert to_units(ev.book.bid) < to_units(ev.book.ask)
        elif hasattr(ev, "diff"):
            for price, _ in (*ev.diff.bids, *ev.diff.asks):
                assert_valid_price(ev.diff.symbol, price)
    for sym, snap in market.snapshots.items():
        for price, _ in (*snap.bids, *snap.asks):
            assert_valid_price(sym, price)
    # Each symbol is the recording with its ids moved by k * 10^12 and its event times by k ms.
    for k, shape in enumerate(market.shapes):
        trades = [e.trade for e in events if isinstance(e, TradeEvent) and e.trade.symbol == shape.symbol]
        assert [t.id - k * ID_STRIDE for t in trades] == [t.id for t in source.trades]
        assert [t.event_time - k for t in trades] == [t.event_time for t in source.trades]
        assert [t.time for t in trades] == [t.time for t in source.trades]
    # The derived klines (with their exact quote volumes) are what the symbol's own trades aggregate to.
    for shape in market.shapes:
        own = [TradeEvent(e.recv_ns, e.trade) for e in events
               if isinstance(e, TradeEvent) and e.trade.symbol == shape.symbol]
        rebuilt = [e.candle for e in _with_klines(list(own), 0) if hasattr(e, "candle") and e.closed]
        served = [c for c in market.candles_in_loop(0) if c.symbol == shape.symbol]
        assert served == rebuilt


def test_symbols_are_chosen_in_exchange_info_order_and_bad_ones_are_named(source: Recording) -> None:
    levels = PriceLevels(source)
    trading = [s["symbol"] for s in INFO["symbols"] if s["status"] == "TRADING"]

    market = MarketRecording.build(source, INFO, 20)

    assert len(market.symbols) == 20
    assert list(market.symbols) == [s for s in trading if s in market.symbols]  # in order, only TRADING
    assert all(isinstance(s, SymbolShape) for s in market.shapes)
    with pytest.raises(MarketSymbolError, match="NOPEUSDT"):
        MarketRecording.build(source, INFO, ["BTCUSDT", "NOPEUSDT"])
    with pytest.raises(MarketSymbolError, match="at most"):
        MarketRecording.build(source, INFO, 5000)
    assert levels.spans[False][1] - levels.spans[False][0] < 100_000  # the squeezed map fits tight filters
    assert SimulatorOptions(market_symbols=["ETHBTC"]).market_symbols == ("ETHBTC",)


def test_command_line_symbols_n_and_market_symbols() -> None:
    many = options_of(parse_args(["--symbols", "50", "--rate", "20000"]))
    named = options_of(parse_args(["--market-symbols", "ethbtc, LTCBTC"]))
    one = options_of(parse_args(["--symbols", "BTCUSDT,ETHUSDT"]))

    assert (many.market_symbols, many.symbols, many.rate) == (50, ("BTCUSDT",), 20000)
    assert named.market_symbols == ("ETHBTC", "LTCBTC")
    assert (one.market_symbols, one.symbols) == (None, ("BTCUSDT", "ETHUSDT"))


# ------------------------------------------------------------------------------------------------------------
# On the wire


async def test_fifty_symbols_at_2000_trades_a_second_in_total() -> None:
    # Arrange: 50 symbols, looped, 2,000 trades/s over all of them; one combined connection for 50 trade streams.
    rate, window_s = 2000, 2.5
    async with start_simulator(market_symbols=50, rate=rate, loop=True, history=False, depth=False,
                               book_ticker=False) as sim:
        symbols = list(sim.recording.symbols)
        streams = "/".join(f"{s.lower()}@trade" for s in symbols)
        received: list[tuple[float, dict[str, Any]]] = []
        # Act
        async with (aiohttp.ClientSession() as http,
                    http.ws_connect(f"{sim.ws_url}/stream.binance.com/stream?streams={streams}") as ws):
            deadline = time.monotonic() + window_s + 5
            async with asyncio.timeout(window_s + 10):
                while time.monotonic() < deadline:
                    msg = await ws.receive()
                    now = time.monotonic()
                    received.append((now, json.loads(msg.data)["data"]))
                    if now - received[0][0] >= window_s:
                        break
    # Assert: every symbol gets trades, each symbol's ids unique and increasing, prices valid levels.
    by_symbol: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for _, trade in received:
        by_symbol[trade["s"]].append(trade)
    assert set(by_symbol) == set(symbols)
    for sym, trades in by_symbol.items():
        ids = [t["t"] for t in trades]
        assert ids == sorted(set(ids)), sym
        k = symbols.index(sym)
        assert all(k * ID_STRIDE <= i < (k + 1) * ID_STRIDE for i in ids), sym
        for t in trades:
            assert_valid_price(sym, t["p"])
    # The total rate is the configured one (within 10%), spread evenly: each symbol within one trade of the rest.
    elapsed = received[-1][0] - received[0][0]
    measured = (len(received) - 1) / elapsed
    assert abs(measured - rate) <= 0.1 * rate, measured
    counts = [len(v) for v in by_symbol.values()]
    assert max(counts) - min(counts) <= 1, counts


async def test_ccxt_loads_the_markets_and_syncs_two_shifted_order_books(made: list[Any]) -> None:
    # Arrange: the recorded pace (halved, so ccxt may fetch the recorded snapshot before the replay passes it).
    names = ["ETHBTC", "LTCBTC", "BNBUSDT"]
    diffs, snapshot = load_depth(capture_files(DATA, "BTCUSDT"))
    async with start_simulator(market_symbols=names, speed=0.5, max_trades=600, history=False) as sim:
        ex = pro_binance(sim, ["LTC/BTC", "BNB/USDT"])
        made.append(ex)
        shapes = {s.symbol: s for s in sim.spot.recording.shapes}
        # Act
        markets = await ex.load_markets()
        seen: dict[str, list[tuple[int, tuple[float, float, float, float]]]] = {"LTC/BTC": [], "BNB/USDT": []}
        async with asyncio.timeout(30):
            while min(len(v) for v in seen.values()) < 8:
                for symbol, books in seen.items():
                    ob = await ex.watch_order_book(symbol)
                    books.append((ob["nonce"], (ob["bids"][0][0], ob["bids"][0][1], ob["asks"][0][0],
                                                ob["asks"][0][1])))
        served = {s: sim.status()["depth"][s]["snapshots_served"] for s in ("LTCBTC", "BNBUSDT")}
    # Assert: ccxt knows the served symbols with their recorded filters.
    assert {"ETH/BTC", "LTC/BTC", "BNB/USDT", "BTC/USDT"} <= set(markets)
    assert markets["LTC/BTC"]["precision"]["price"] == float(FILTERS["LTCBTC"]["PRICE_FILTER"]["tickSize"])
    # Each book is the recorded book at the recorded update id (nonce minus the symbol's shift), prices mapped.
    wanted = {n - shapes[sym.replace("/", "")].id_shift for sym, books in seen.items() for n, _ in books}
    recorded_tops = {}
    book = DepthBook(snapshot)
    for d in diffs:
        book.apply(d)
        if d.final_id in wanted:
            bb, ba = max(book.bids, key=float), min(book.asks, key=float)
            recorded_tops[d.final_id] = (bb, book.bids[bb], ba, book.asks[ba])
    transform = sim.spot.recording.transform
    for symbol, books in seen.items():
        shape = shapes[symbol.replace("/", "")]
        assert shape.id_shift > 0
        for nonce, top in books[1:]:
            bb, bq, ba, aq = recorded_tops[nonce - shape.id_shift]
            expected = (float(transform.price(shape, bb)), float(bq), float(transform.price(shape, ba)), float(aq))
            assert top == expected, (symbol, nonce)
        assert len({n for n, _ in books}) == len(books)
    assert all(sum(v.values()) >= 1 for v in served.values())


async def test_book_tickers_depth_diffs_and_klines_of_every_symbol_on_one_connection() -> None:
    # Arrange: 10 symbols, all four channels (40 streams) on one combined connection, 300 trades/s in total.
    async with start_simulator(market_symbols=10, rate=300, loop=True, history=False) as sim:
        symbols = list(sim.recording.symbols)
        streams = "/".join(f"{s.lower()}@{ch}" for s in symbols
                           for ch in ("trade", "bookTicker", "depth@100ms", "kline_1m"))
        kinds: dict[str, set[str]] = defaultdict(set)
        last_u: dict[str, int] = {}
        # Act
        async with (aiohttp.ClientSession() as http,
                    http.ws_connect(f"{sim.ws_url}/stream.binance.com/stream?streams={streams}") as ws):
            async with asyncio.timeout(15):
                while sum(len(v) for v in kinds.values()) < 4 * len(symbols):
                    msg = json.loads((await ws.receive()).data)
                    sym, channel = msg["stream"].split("@", 1)
                    data = msg["data"]
                    symbol = sym.upper()
                    kinds[symbol].add(channel)
                    # Assert (as they come): valid levels; each symbol's diffs chain (U = previous u + 1).
                    if channel == "bookTicker":
                        assert_valid_price(symbol, data["b"])
                        assert_valid_price(symbol, data["a"])
                        assert float(data["b"]) < float(data["a"])
                    elif channel == "depth@100ms":
                        for price, _ in (*data["b"], *data["a"]):
                            assert_valid_price(symbol, price)
                        if symbol in last_u:
                            assert data["U"] == last_u[symbol] + 1, symbol
                        last_u[symbol] = data["u"]
                    elif channel == "kline_1m":
                        assert data["s"] == symbol
                        assert_valid_price(symbol, data["k"]["c"])
    assert all(kinds[s] == {"trade", "bookTicker", "depth@100ms", "kline_1m"} for s in symbols)


async def test_ccxt_watches_the_trades_of_fifty_symbols(made: list[Any]) -> None:
    # Arrange
    async with start_simulator(market_symbols=50, rate=1000, loop=True, history=False, depth=False,
                               book_ticker=False) as sim:
        ex = pro_binance(sim, [])
        made.append(ex)
        await ex.load_markets()
        unified = [ex.markets_by_id[s][0]["symbol"] for s in sim.recording.symbols]
        seen: dict[str, set[int]] = defaultdict(set)
        # Act: one watch for all 50 (ccxt subscribes them on its connection).
        async with asyncio.timeout(20):
            while len(seen) < len(unified):
                for t in await ex.watch_trades_for_symbols(unified):
                    seen[t["symbol"]].add(int(t["id"]))
    # Assert
    assert set(seen) == set(unified)
    assert len(unified) == 50


async def test_rest_trade_history_of_a_shifted_symbol_is_what_the_wire_carried() -> None:
    # Arrange: three symbols, 300 recorded trades each, replayed flat out to a subscriber of the third.
    async with start_simulator(market_symbols=3, speed=0, max_trades=300, history=False, depth=False) as sim:
        symbol = sim.recording.symbols[2]
        wire: list[dict[str, Any]] = []
        async with aiohttp.ClientSession() as http:
            async with http.ws_connect(f"{sim.ws_url}/stream.binance.com/ws/{symbol.lower()}@trade") as ws:
                async with asyncio.timeout(15):
                    while len(wire) < 300:
                        wire.append(json.loads((await ws.receive()).data))
            await sim.wait_finished(10)
            # Act
            base = f"{sim.rest_url}/api.binance.com/api/v3"
            async with http.get(f"{base}/historicalTrades", params={"symbol": symbol, "limit": "1000"}) as r:
                history = await r.json()
            async with http.get(f"{base}/aggTrades", params={"symbol": symbol, "limit": "1000"}) as r:
                aggs = await r.json()
    # Assert: the same ids, prices and times; the aggregates cover exactly those ids.
    assert [(t["id"], t["price"], t["qty"], t["time"]) for t in history] == \
        [(t["t"], t["p"], t["q"], t["T"]) for t in wire]
    assert wire[0]["t"] >= 2 * ID_STRIDE
    assert aggs[0]["f"] == wire[0]["t"] and aggs[-1]["l"] == wire[-1]["t"]
    assert all(a["p"] == next(t["p"] for t in wire if t["t"] == a["f"]) for a in aggs)


async def test_loops_keep_each_symbols_ids_increasing() -> None:
    # Arrange: 100 recorded trades under 3 symbols at 1,500 trades/s in total: a loop every 0.2 s.
    async with start_simulator(market_symbols=3, rate=1500, max_trades=100, loop=True, history=False,
                               depth=False, book_ticker=False) as sim:
        symbols = list(sim.recording.symbols)
        streams = "/".join(f"{s.lower()}@trade" for s in symbols)
        ids: dict[str, list[int]] = defaultdict(list)
        # Act: three loops' worth.
        async with (aiohttp.ClientSession() as http,
                    http.ws_connect(f"{sim.ws_url}/stream.binance.com/stream?streams={streams}") as ws):
            async with asyncio.timeout(10):
                while sum(len(v) for v in ids.values()) < 900:
                    data = json.loads((await ws.receive()).data)["data"]
                    ids[data["s"]].append(data["t"])
        expected = sim.expected_trades(1)
    # Assert: 300 a symbol, unique and increasing across the loop boundaries; loop 1 as expected_trades says.
    assert sorted(len(v) for v in ids.values()) == [300, 300, 300]
    for sym, seq in ids.items():
        assert seq == sorted(set(seq)), sym
        assert seq[100:200] == [t.id for t in expected if t.symbol == sym]
