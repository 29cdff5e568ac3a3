"""Every channel of the collector against the simulator replaying the real captures, through the real ccxt.pro,
on real Redis: tickers, order books (bounded, never crossed, with their sequence), and the book's way through
the validator and normalizer into the orderbook:{exchange}:{symbol} cache key."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import msgspec
import pytest

from common.bus import streams
from common.config import ConfigError, Settings
from common.stores.cache import CacheClient, orderbook_key
from schemas import Codec, FundingRate, OpenInterest, OrderBook, Ticker, Trade
from services.cache_publisher.service import CachePublisher
from services.collector.service import Collector
from services.normalizer.service import Normalizer
from services.validator.service import Validator
from simulator import start_simulator
from tests.collecting import collector_settings, read, run_collector

N = 3000
DEPTH = "btcusdt@depth@100ms"  # what ccxt.pro binance subscribes for watch_order_book
SPOT_STREAMS = ("btcusdt@trade", "btcusdt@kline_1m", "btcusdt@bookTicker", DEPTH)


async def test_spot_ticker_and_book_are_published_uncrossed_with_their_sequence(settings: Settings, redis) -> None:
    # Arrange
    async with start_simulator(speed=20, max_trades=N, wait_for_streams=SPOT_STREAMS) as sim:
        cfg = collector_settings(settings, sim.rest_url, sim.ws_url, book_depth=10, book_max_per_s=5.0,
                                 channels=["trades", "candles", "ticker", "book"])
        collector = Collector(cfg, "t", exchange="binance")

        async def enough() -> bool:
            return collector.count["books"] >= 5 and collector.counters().get("channel.ticker.messages", 0) >= 20

        # Act
        await run_collector(collector, enough)
    # Assert
    events = await read(redis, streams.raw("binance"))
    tickers = [e for e in events if isinstance(e, Ticker)]
    books = [e for e in events if isinstance(e, OrderBook)]
    assert len(tickers) >= 20 and len(books) >= 5
    assert all(t.bid is not None and t.ask is not None and t.bid < t.ask for t in tickers)
    assert all(t.bid_size is not None and t.bid_size > 0 for t in tickers)
    for b in books:
        assert b.bids and b.asks and b.bids[0][0] < b.asks[0][0], "a crossed book was published"
        assert b.depth == 10 and len(b.bids) <= 10 and len(b.asks) <= 10
        assert [p for p, _ in b.bids] == sorted((p for p, _ in b.bids), reverse=True)
        assert [p for p, _ in b.asks] == sorted(p for p, _ in b.asks)
        assert all(a > 0 for _, a in (*b.bids, *b.asks))
    sequences = [b.sequence for b in books]
    assert all(s is not None for s in sequences)
    assert sequences == sorted(sequences), "snapshots go forward in the exchange's update ids"
    assert len(set(sequences)) >= 3, "the book moved on with the recorded diffs"
    assert collector.count["books_crossed"] == 0
    assert any(isinstance(e, Trade) for e in events)


async def test_book_throttle_publishes_at_most_the_configured_rate(settings: Settings, redis) -> None:
    """At max_per_s=2 the book is published no more than twice a second per symbol, however fast diffs come:
    the in-between updates are folded into the next snapshot (the latest book wins)."""
    async with start_simulator(speed=50, max_trades=N, wait_for_streams=(DEPTH,)) as sim:
        cfg = collector_settings(settings, sim.rest_url, sim.ws_url, book_max_per_s=2.0, channels=["book"])
        collector = Collector(cfg, "t", exchange="binance")

        async def enough() -> bool:
            return collector.count["books"] >= 6

        await run_collector(collector, enough)
    books = [e for e in await read(redis, streams.raw("binance")) if isinstance(e, OrderBook)]
    recv = [b.ts_recv for b in books]
    # any 3 consecutive snapshots span at least one throttle interval (0.5 s each, a little slack for clocks)
    assert all(recv[i + 2] - recv[i] >= 0.9e9 for i in range(len(recv) - 2)), recv
    assert len({b.sequence for b in books}) == len(books), "each published snapshot is a newer book"


async def test_book_reaches_the_cache_through_validator_and_normalizer(settings: Settings, redis) -> None:
    async with start_simulator(speed=20, max_trades=N, wait_for_streams=(DEPTH,)) as sim:
        cfg = collector_settings(settings, sim.rest_url, sim.ws_url, channels=["book"], book_depth=5)
        collector = Collector(cfg, "t", exchange="binance")
        stages = [Validator(cfg), Normalizer(cfg), CachePublisher(cfg)]
        stop = asyncio.Event()
        tasks = [asyncio.create_task(s.run(stop)) for s in stages]
        cache = CacheClient(redis, cfg.cache)

        async def cached() -> bool:
            return await cache.get_orderbook("binance", "BTC/USDT") is not None

        try:
            await run_collector(collector, cached)
        finally:
            stop.set()
            await asyncio.gather(*tasks)
            for s in stages:
                await s.close()
    book = await cache.get_orderbook("binance", "BTC/USDT")
    assert book is not None
    assert book.bids[0][0] < book.asks[0][0] and len(book.bids) <= 5
    assert isinstance(book.bids[0][0], Decimal) and book.sequence > 0
    ttl = await redis.ttl(orderbook_key("binance", "BTC/USDT"))
    assert 0 < ttl <= cfg.cache.orderbook_ttl_s
    published = [e for _, f in await redis.xrange(streams.market_data("book", "binance", "BTC/USDT"))
                 for e in Codec().decode_entry(f)]
    assert published and all(isinstance(e, OrderBook) for e in published)


async def test_a_channel_the_exchange_does_not_offer_is_a_config_error(settings: Settings, redis) -> None:
    """Funding exists for perpetuals only: on Binance spot markets it is refused at start, naming the channel."""
    async with start_simulator(speed=20, max_trades=100) as sim:
        cfg = collector_settings(settings, sim.rest_url, sim.ws_url, channels=["trades", "funding"])
        collector = Collector(cfg, "t", exchange="binance")
        with pytest.raises(ConfigError, match=r"exchanges\[binance\].*'funding'.*BTC/USDT"):
            await asyncio.wait_for(collector.run(asyncio.Event()), 30)
        await collector.close()


def test_snapshot_events_round_trip_the_codec() -> None:
    codec = Codec()
    funding = FundingRate(exchange="binanceusdm", symbol="BTC/USDT:USDT", funding_rate=Decimal("-0.0001"),
                          mark_price=Decimal("60000.1"), index_price=Decimal(60001), next_funding_time=1,
                          ts_event=2, ts_recv=3)
    oi = OpenInterest(exchange="hyperliquid", symbol="BTC/USDC:USDC", amount=Decimal("688.11"), value=None,
                      ts_event=2, ts_recv=3)
    assert codec.decode_entry(codec.entry([funding, oi])) == [funding, oi]


VENUES = {  # exchange: (symbol, market types, channels, replay speed)
    "binanceusdm": ("BTC/USDT:USDT", ["linear"], ["trades", "candles", "ticker", "book", "funding", "open_interest"],
                    10.0),
    "hyperliquid": ("BTC/USDC:USDC", ["swap"], ["trades", "candles", "ticker", "book", "funding", "open_interest"],
                    10.0),
    "coinbase": ("SKL/USD", ["spot"], ["trades", "ticker", "book"], 1.0),  # the recorded Coinbase market
}


@pytest.mark.parametrize("exchange", sorted(VENUES))
async def test_every_channel_of_each_venue(exchange: str, settings: Settings, redis) -> None:
    # Arrange
    symbol, types, channels, speed = VENUES[exchange]
    async with start_simulator(speed=speed, venues=(exchange,)) as sim:
        cfg = collector_settings(settings, sim.rest_url, sim.ws_url, exchange=exchange, symbols=[symbol],
                                 market_types=types, channels=channels, rest_channel_poll_s=0.5)
        collector = Collector(cfg, "t", exchange=exchange)

        async def every_channel() -> bool:
            counters = collector.counters()
            return all(counters.get(f"channel.{c}.messages", 0) >= 2 for c in channels)

        # Act
        await run_collector(collector, every_channel)
    # Assert
    events = await read(redis, streams.raw(exchange))
    by_type: dict[type, list[object]] = {}
    for e in events:
        by_type.setdefault(type(e), []).append(e)
    books = by_type[OrderBook]
    assert all(b.bids[0][0] < b.asks[0][0] for b in books)  # type: ignore[attr-defined]
    if exchange == "binanceusdm":  # ccxt keeps no nonce for Coinbase or Hyperliquid books
        assert all(b.sequence is not None for b in books), "each snapshot names its update id"  # type: ignore[attr-defined]
    tickers = by_type[Ticker]
    assert all(t.bid < t.ask for t in tickers)  # type: ignore[attr-defined]
    assert all(t.symbol == symbol for t in (*books, *tickers, *by_type[Trade]))  # type: ignore[attr-defined]
    if "funding" in channels:
        funding = by_type[FundingRate]
        assert all(f.funding_rate is not None and f.mark_price > 0 and f.index_price > 0 for f in funding)  # type: ignore[attr-defined]
        oi = by_type[OpenInterest]
        assert all(o.amount is not None and o.amount > 0 for o in oi)  # type: ignore[attr-defined]
    assert collector.count["books_crossed"] == 0 and collector.count["gaps"] == 0


async def test_coinbase_sequence_gap_resyncs_the_book_with_a_gap_marker(settings: Settings, redis) -> None:
    """ccxt.pro does not check Coinbase's sequence_num; the collector does: a skipped number drops the
    connection's books, reconnects (fresh snapshot) and marks the outage."""
    symbol, types, _, _ = VENUES["coinbase"]
    async with start_simulator(speed=1.0, venues=("coinbase",)) as sim:
        cfg = collector_settings(settings, sim.rest_url, sim.ws_url, exchange="coinbase", symbols=[symbol],
                                 market_types=types, channels=["book"])
        collector = Collector(cfg, "t", exchange="coinbase")

        async def booked() -> bool:
            return collector.count["books"] >= 2

        stop = asyncio.Event()
        task = asyncio.create_task(collector.run(stop))
        async with asyncio.timeout(30):
            while not await booked():
                await asyncio.sleep(0.05)
        sim.venues["coinbase"].inject("sequence_gap", skip=3)
        try:
            async with asyncio.timeout(30):
                while collector.count["gaps"] < 1:
                    assert not task.done()
                    await asyncio.sleep(0.05)
        finally:
            stop.set()
            await asyncio.wait_for(task, 20)
            await collector.close()
    assert collector.count["sequence_gaps"] == 1 and collector.count["book_resyncs"] >= 1
    gaps = [e for _, f in await redis.xrange(streams.GAPS) for e in Codec().decode_entry(f)]
    assert [(g.channel, g.symbol) for g in gaps] == [("book", symbol)]
    assert "sequence gap: message" in gaps[0].reason and "3 lost" in gaps[0].reason


async def test_funding_and_open_interest_are_stored_as_time_series(settings: Settings, redis) -> None:
    """The influx writer stores md:funding:* and md:open_interest:* (ticks tier), exact to the decimal."""
    import os

    from common.bus.core import Producer
    from common.stores.influx import InfluxClient, quote_ident
    from services.influx_writer.service import InfluxWriter

    keep = {"ticks": "inf", "candles_1m": "inf", "candles_1h": "inf", "candles_1d": "inf"}
    cfg = msgspec.structs.replace(settings, influx=msgspec.structs.replace(
        settings.influx, database=f"mdp_collector_{os.getpid()}", retention=keep))
    symbol = "BTC/USDT:USDT"
    funding = FundingRate(exchange="binanceusdm", symbol=symbol, funding_rate=Decimal("-0.00012345"),
                          mark_price=Decimal("61740.4"), index_price=Decimal("61762.005"),
                          next_funding_time=1_723_161_600_000_000_000, ts_event=1_723_161_375_000_000_000,
                          ts_recv=1_723_161_375_100_000_000)
    oi = OpenInterest(exchange="binanceusdm", symbol=symbol, amount=Decimal("74942.635"), value=None,
                      ts_event=1_723_161_369_967_000_000, ts_recv=1_723_161_370_000_000_000)
    producer = Producer(redis, Codec(), cfg.bus, source="test")
    await producer.publish({streams.market_data("funding", "binanceusdm", symbol): [funding],
                            streams.market_data("open_interest", "binanceusdm", symbol): [oi]})
    writer = InfluxWriter(cfg)
    stop = asyncio.Event()
    task = asyncio.create_task(writer.run(stop))
    try:
        async with asyncio.timeout(30):
            while writer.count["funding"] < 1 or writer.count["open_interest"] < 1:
                assert not task.done(), task
                await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)
        await writer.close()
    async with InfluxClient(cfg.influx) as client:
        rows = await client.query_timeframe("ticks", "SELECT * FROM funding", exact=True)
        oi_rows = await client.query_timeframe("ticks", "SELECT * FROM open_interest", exact=True)
        await client.execute(f"DROP DATABASE {quote_ident(cfg.influx.database)}")
    assert len(rows) == 1 and rows[0]["time"] == funding.ts_event
    assert rows[0]["funding_rate"] == Decimal("-0.00012345") and rows[0]["index_price"] == Decimal("61762.005")
    assert rows[0]["next_funding_time"] == funding.next_funding_time and rows[0]["symbol"] == symbol
    assert len(oi_rows) == 1 and oi_rows[0]["amount"] == Decimal("74942.635") and oi_rows[0].get("value") is None


async def test_status_shows_each_channels_rate_and_last_message_age(settings: Settings, redis) -> None:
    from common import status

    async with start_simulator(speed=20, max_trades=N, wait_for_streams=SPOT_STREAMS[:1] + SPOT_STREAMS[2:3]) as sim:
        cfg = collector_settings(settings, sim.rest_url, sim.ws_url, channels=["trades", "ticker"])
        collector = Collector(cfg, "t", exchange="binance")
        beats = 0

        async def two_beats_apart() -> bool:
            nonlocal beats
            if collector.count["trades"] >= 100 * (beats + 1) and beats < 2:
                await collector.heartbeat_once()
                beats += 1
            return beats == 2

        await run_collector(collector, two_beats_apart)
    st = await status.collect(redis)
    rows = {c.channel: c for c in st.channels if c.instance == "binance-t"}
    assert set(rows) == {"trades", "ticker"}
    assert rows["trades"].rate is not None and rows["trades"].rate > 0
    assert rows["trades"].last_age_s is not None and rows["trades"].last_age_s < 60
    assert rows["trades"].messages > 0 and rows["trades"].gaps == 0
    assert "binance-t trades" in status.render(st)


async def test_validator_and_normalizer_pass_the_new_kinds_and_reject_bad_ones(settings: Settings, redis) -> None:
    """Books, funding and open interest go raw -> valid -> md:{book|funding|open_interest}:*; a crossed book
    and a funding event without numbers are rejected with alerts; contract book amounts become base units."""
    from common.bus.core import Producer
    from schemas import Alert, Market

    ex, sym, t = "binanceusdm", "BTC/USDT:USDT", 1_723_161_375_000_000_000
    market = Market(exchange=ex, symbol=sym, exchange_symbol="BTCUSDT", base="BTC", quote="USDT",
                    market_type="swap", active=True, contract_size=Decimal("0.001"), price_precision=None,
                    amount_precision=None, ts_event=t, ts_recv=t)
    good = OrderBook(exchange=ex, symbol=sym, bids=((Decimal("61740.0"), Decimal("2.000")),),
                     asks=((Decimal("61740.1"), Decimal(1)),), depth=20, sequence=7, ts_event=t, ts_recv=t)
    crossed = msgspec.structs.replace(good, bids=((Decimal(61741), Decimal(1)),), sequence=8)
    funding = FundingRate(exchange=ex, symbol=sym, funding_rate=Decimal("0.00010000"), mark_price=Decimal("61740.4"),
                          index_price=Decimal("61762.005"), next_funding_time=1_723_161_600_000, ts_event=t,
                          ts_recv=t)
    empty = msgspec.structs.replace(funding, funding_rate=None, mark_price=None, index_price=None)
    oi = OpenInterest(exchange=ex, symbol=sym, amount=Decimal("74942.635"), value=None, ts_event=t, ts_recv=t)
    await Producer(redis, Codec(), settings.bus, source="test").publish(
        {streams.raw(ex): [market, good, crossed, funding, empty, oi]})
    stages = [Validator(settings), Normalizer(settings)]
    stop = asyncio.Event()
    tasks = [asyncio.create_task(s.run(stop)) for s in stages]

    async def read(stream: str) -> list[object]:
        return [e for _, f in await redis.xrange(stream) for e in Codec().decode_entry(f)]

    try:
        async with asyncio.timeout(30):
            while not await read(streams.market_data("open_interest", ex, sym)):
                await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        for s in stages:
            await s.close()
    books = await read(streams.market_data("book", ex, sym))
    assert len(books) == 1 and books[0].sequence == 7  # type: ignore[attr-defined]
    assert books[0].bids == ((Decimal(61740), Decimal("0.002")),)  # type: ignore[attr-defined]
    [f] = await read(streams.market_data("funding", ex, sym))
    assert f.funding_rate == Decimal("0.0001") and f.next_funding_time == 1_723_161_600_000_000_000  # type: ignore[attr-defined]
    [o] = await read(streams.market_data("open_interest", ex, sym))
    assert o.amount == Decimal("74942.635")  # type: ignore[attr-defined]
    rules = sorted(a.rule for a in await read(streams.ALERTS) if isinstance(a, Alert))
    assert rules == ["book.crossed", "funding.numeric"]
