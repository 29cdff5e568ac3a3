"""The bookTicker decode fast path against ccxt.pro's own path, on every real WebSocket capture with book tickers.

Each Binance capture (data/real/ws-captures, and the unshipped ones of the real-data folder) is replayed frame by
frame, as Binance sent them (one best bid/ask per frame), through both paths of the collector's ticker feed,
with no network:
- ccxt: `TickerFeed` on watch_bids_asks; every frame goes to the ccxt.pro exchange's `handle_message`, and each
  ticker ccxt resolves for the symbol is handed to the feed, as its watch returns it;
- fast: `FastTickerFeed`; every frame passes the exchange object's FrameTap, where `BookTickerWire` decodes the
  bookTicker frames (common/exchanges/wire/binance_book_ticker.py) and ccxt gets the others.
Both must publish identical tickers in the same order (Decimals as text, exchange times where the venue sends
one; spot sends none, so there both paths use the local receipt time, compared for bounds, not value).
And the whole collector against the simulator: every bookTicker frame sent is published (ccxt's path kept about
one in four: its watch resolves one future per wait).

`python -m tests.test_fast_path_tickers` prints the CPU per book ticker of both paths on each capture.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec
import orjson
import pytest

from common.bus import streams
from common.config import ConfigError, ExchangeSettings, Settings
from common.exchanges.wire.binance_book_ticker import decode, is_book_ticker_frame
from common.exchanges.wire.binance_trades import is_trade_frame
from schemas import Event, Ticker
from services.collector.feeds import FastTickerFeed, Feed, TickerFeed, plan_feeds
from services.collector.frame_tap import FrameTap
from services.collector.outbox import Position
from services.collector.service import Collector
from services.collector.wires import BookTickerWire
from simulator import start_simulator
from tests.collecting import collector_settings, read, run_collector
from tests.test_fast_path_trades import Host, StubClient, captures, exchange_for, frames, venue_of


def ticker_captures() -> list[Path]:
    """The Binance captures holding bookTicker frames."""
    return [p for p in captures() if venue_of(p) and p.name.startswith(("binance_spot_", "binance_usdm_"))
            and any(is_book_ticker_frame(raw) for _, raw in frames(p)[:5000])]


class TickerHost(Host):
    """Host recording the tickers a feed hands the outbox."""

    def __init__(self, exchange: Any, exchange_id: str, symbol: str) -> None:
        super().__init__(exchange, exchange_id, symbol)
        self.tickers: list[Ticker] = []
        self.batches = 0

    async def publish(self, events: Sequence[Event], gaps: list[Event] | None = None, symbol: str = "",
                      channel: str = "", position: Position | None = None) -> None:
        self.tickers += [e for e in events if isinstance(e, Ticker)]
        self.batches += 1


class ResolvingClient(StubClient):
    """StubClient that hands what ccxt resolves for the feed's subscription to a list (what watch returns)."""

    def __init__(self, exchange: Any, url: str, message_hash: str) -> None:
        super().__init__(exchange, url)
        self.message_hash = message_hash
        self.resolved: list[Any] = []

    def resolve(self, result: Any, message_hash: str) -> Any:
        if message_hash == self.message_hash:
            self.resolved.append(result)
        return result


def symbol_of(exchange: Any, url: str, lines: list[tuple[int, str]]) -> str:
    first = next(raw for _, raw in lines if is_book_ticker_frame(raw))
    market_id = orjson.loads(first)["data"]["s"]
    spot = exchange.is_spot_url(StubClient(exchange, url))
    return str(exchange.safe_market(market_id, None, None, "spot" if spot else "contract")["symbol"])


async def replay(path: Path, fast: bool, sweep_every: int = 7) -> tuple[TickerHost, int, Any, tuple[int, int]]:
    """Every frame of `path` through one path's ticker feed (the fast one swept every `sweep_every` frames, as
    bursts are). Returns the host, the number of bookTicker frames, the exchange object and the wall clock
    before and after."""
    exchange_id, url = venue_of(path) or ("", "")
    lines = frames(path)
    exchange = exchange_for(exchange_id)
    symbol = symbol_of(exchange, url, lines)
    host = TickerHost(exchange, exchange_id, symbol)
    client = ResolvingClient(exchange, url, f"bidask:bookTicker@{symbol}")
    feed: TickerFeed
    if fast:
        feed = FastTickerFeed(host, symbol, ("ticker",), 60.0)
        BookTickerWire.of(exchange).add(feed)
        FrameTap.of(exchange).install(client)
    else:
        feed = TickerFeed(host, symbol, ("ticker",), 60.0)
        feed.bids_asks = True
    n, since = 0, 0
    started = time.time_ns()
    for _, raw in lines:
        if is_book_ticker_frame(raw):
            n += 1
        client.handle_text_or_binary_message(raw)
        for result in client.resolved:  # ccxt's path: each ticker ccxt resolved, as watch returns it
            await feed.on_update(result)
        client.resolved.clear()
        since += 1
        if fast and since >= sweep_every:
            await feed.sweep()
            since = 0
    await feed.sweep()
    return host, n, exchange, (started, time.time_ns())


def comparable(tickers: list[Ticker], local_time: bool) -> list[Ticker]:
    """Without the receipt time (the local clock), and without ts_event where it is the receipt time too."""
    return [msgspec.structs.replace(t, ts_recv=0, ts_event=0 if local_time else t.ts_event) for t in tickers]


def test_the_ticker_captures_are_found() -> None:
    names = {p.name for p in ticker_captures()}
    assert any(n.startswith("binance_spot_") for n in names), names


@pytest.mark.parametrize("path", ticker_captures(), ids=lambda p: p.name)
async def test_both_paths_publish_identical_tickers(path: Path) -> None:
    # Arrange, Act: every frame of the capture through each path
    slow, n_slow, _, _ = await replay(path, fast=False)
    fast, n_fast, exchange, (lo, hi) = await replay(path, fast=True)
    spot = path.name.startswith("binance_spot_")
    # Assert: every bookTicker of the capture, the same events in the same order, the same text
    assert n_fast == n_slow > 1000
    assert len(slow.tickers) == n_slow, "ccxt's path gave one ticker a frame"
    assert comparable(fast.tickers, spot) == comparable(slow.tickers, spot)
    assert [(str(t.bid), str(t.bid_size), str(t.ask), str(t.ask_size)) for t in fast.tickers] == \
        [(str(t.bid), str(t.bid_size), str(t.ask), str(t.ask_size)) for t in slow.tickers]
    assert exchange.mdp_frame_tap.taken == n_fast and not exchange.bidsasks, "ccxt parsed none on the fast path"
    assert fast.batches < len(fast.tickers) / 5, "a sweep publishes the burst's tickers in one batch"
    recv = [t.ts_recv for t in fast.tickers]
    assert lo <= recv[0] and recv[-1] <= hi and recv == sorted(recv)
    if spot:
        assert all(t.ts_event == t.ts_recv for t in fast.tickers), "spot sends no time: the receipt time"
    else:
        assert all(t.ts_event < lo for t in fast.tickers), "USD-M: the exchange's E, from the recording"


def test_frames_the_decoder_refuses_go_to_ccxt() -> None:
    good = '{"stream":"btcusdt@bookTicker","data":{"u":1,"s":"BTCUSDT","b":"1.5","B":"2","a":"1.6","A":"3"}}'
    assert is_book_ticker_frame(good) and decode(good) is not None
    assert is_book_ticker_frame('{"u":1,"s":"BTCUSDT","b":"1.5","B":"2","a":"1.6","A":"3"}')
    assert is_book_ticker_frame('{"e":"bookTicker","u":1,"s":"BTCUSDT","b":"1","B":"2","a":"1","A":"3","E":5}')
    for bad in (good.replace('"b":"1.5",', ""),  # a field missing
                good.replace('"B":"2"', '"B":null'),  # mistyped
                good[:-5]):  # cut short
        assert decode(bad) is None, bad
    trade = '{"stream":"btcusdt@trade","data":{"e":"trade","E":1,"s":"BTCUSDT","t":1,"p":"1","q":"1","T":1,"m":true}}'
    assert is_trade_frame(trade) and not is_book_ticker_frame(trade)
    depth = '{"stream":"btcusdt@depth@100ms","data":{"e":"depthUpdate","E":1,"s":"BTCUSDT","U":1,"u":2,"b":[],"a":[]}}'
    assert not is_book_ticker_frame(depth)


def test_the_ticker_fast_path_switch() -> None:
    exchange = exchange_for("binance")
    host = TickerHost(exchange, "binance", "BTC/USDT")

    def plan(**fields: Any) -> list[Feed]:
        settings = ExchangeSettings(id=fields.pop("id", "binance"), symbols=["BTC/USDT"], channels=["ticker"],
                                    **fields)
        return plan_feeds(host, exchange, settings, ["BTC/USDT"])[0]

    assert type(plan()[0]) is FastTickerFeed  # on by default where it exists
    slow = plan(fast_path={"ticker": False})[0]
    assert type(slow) is TickerFeed and slow.bids_asks
    with pytest.raises(ConfigError, match="accepted keys: trades, ticker, book"):
        plan(fast_path={"tickers": True})


async def test_the_collector_publishes_every_book_ticker_the_exchange_sent(settings: Settings, redis: Any) -> None:
    """The whole collector against the simulator (spot, trades and ticker): every bookTicker frame sent reaches
    raw:binance, in the exchange's order. ccxt.pro's watch_bids_asks resolves one future per wait, so the ccxt
    path published only the frame that ended each wait (measured: 3,225 of 12,257 at this speed)."""
    async with start_simulator(speed=5, max_trades=3000,
                               wait_for_streams=("btcusdt@trade", "btcusdt@bookTicker")) as sim:
        cfg = collector_settings(settings, sim.rest_url, sim.ws_url, channels=["trades", "ticker"])
        collector = Collector(cfg, "t", exchange="binance")

        async def all_sent_published() -> bool:  # the replay stops after its 3,000th trade
            sent = sim.status()["sent_by_stream"].get("btcusdt@bookTicker", 0)
            return (collector.count["trades"] >= 3000
                    and collector.counters().get("channel.ticker.messages", 0) >= sent > 1000)

        await run_collector(collector, all_sent_published, timeout=90)
        sent = sim.status()["sent_by_stream"]["btcusdt@bookTicker"]
    tickers = [e for e in await read(redis, streams.raw("binance")) if isinstance(e, Ticker)]
    assert len(tickers) == sent, f"{len(tickers)} tickers published of {sent} bookTicker frames sent"
    recv = [t.ts_recv for t in tickers]
    assert recv == sorted(recv), "in the order they arrived"


def cpu_per_ticker(path: Path, fast: bool, repeat: int = 3) -> float:
    """CPU seconds per book ticker, from the frame's text to the event (ccxt: parse, then `ticker_event`; fast:
    the tap, the wire and the event), best of `repeat`; the outbox after is the same on both paths, except that
    the fast one hands it a burst per batch."""
    exchange_id, url = venue_of(path) or ("", "")
    lines = frames(path)
    raws = [raw for _, raw in lines if is_book_ticker_frame(raw)]
    best = float("inf")
    for _ in range(repeat):
        exchange = exchange_for(exchange_id)
        symbol = symbol_of(exchange, url, lines)
        host = TickerHost(exchange, exchange_id, symbol)
        client = ResolvingClient(exchange, url, f"bidask:bookTicker@{symbol}")
        if fast:
            fast_feed = FastTickerFeed(host, symbol, ("ticker",), 60.0)
            BookTickerWire.of(exchange).add(fast_feed)
            FrameTap.of(exchange).install(client)
        handle = client.handle_text_or_binary_message
        from services.collector import events as ev

        start = time.process_time()
        for raw in raws:
            handle(raw)
            if not fast:
                ev.ticker_event(exchange_id, symbol, client.resolved.pop(), 0)
        best = min(best, (time.process_time() - start) / len(raws))
        if fast:
            assert len(fast_feed.decoded) == len(raws)
    return best


def test_the_ticker_fast_path_costs_less_cpu() -> None:
    path = ticker_captures()[0]
    assert cpu_per_ticker(path, fast=True, repeat=2) < cpu_per_ticker(path, fast=False, repeat=2)


if __name__ == "__main__":
    for capture in ticker_captures():
        ccxt_us, fast_us = cpu_per_ticker(capture, fast=False) * 1e6, cpu_per_ticker(capture, fast=True) * 1e6
        print(f"{capture.name}: ccxt {ccxt_us:.1f} us/ticker, fast {fast_us:.1f} us/ticker "
              f"({ccxt_us / fast_us:.1f}x)")
