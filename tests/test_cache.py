"""The Redis cache as the plan lays it out, on a real Redis: every key's type, TTL and cap, through the typed
client strategies use (common/stores/cache.py) and the cache publisher that fills the market side of it."""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal

import msgspec
import pytest
import redis.asyncio as aioredis

from common.bus import streams
from common.bus.core import Producer
from common.config import BusSettings, CacheSettings, RedisSettings, Settings
from common.stores.cache import (
    CacheClient,
    CacheError,
    Indicator,
    OrderBook,
    Price,
    StrategyTrade,
    Tick,
    indicator_key,
    orderbook_key,
    session_key,
    strategy_trades_key,
    trade_json,
)
from schemas import Codec
from services.cache_publisher import CachePublisher
from tests import stubs

FAST = BusSettings(stream_maxlen=1000, backpressure_high_water=500, backpressure_max_wait_s=0.5,
                   batch_max_events=50, read_count=50, block_ms=50, claim_idle_ms=1000, max_deliveries=2)
D = Decimal


@pytest.fixture
def cache(redis: aioredis.Redis) -> CacheClient:
    return CacheClient(redis, CacheSettings())


def fill(i: int, strategy: str = "mean-revert-1") -> StrategyTrade:
    return StrategyTrade(strategy=strategy, exchange="binance", symbol="BTC/USDT", side="buy" if i % 2 else "sell",
                         price=D("61837.63") + i, amount=D("0.002"), ts=stubs.T0_NS + i * 1_000_000,
                         trade_id=f"f{i}", order_id=f"o{i // 2}", fee=D("0.0000015"), fee_currency="BTC")


async def run_publisher(settings: Settings, until_events: int) -> CachePublisher:
    svc = CachePublisher(settings)
    stop = asyncio.Event()
    task = asyncio.create_task(svc.run(stop))
    try:
        async with asyncio.timeout(10):
            while svc.consumer.stats.events < until_events:
                if task.done():
                    task.result()
                await asyncio.sleep(0.02)
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
        await svc.close()
    return svc


# -- the market side, from the cache publisher ----------------------------------------------------------

async def test_price_and_recent_market_trades_from_the_publisher(
        redis: aioredis.Redis, redis_server, cache: CacheClient) -> None:
    # Arrange
    settings = Settings(redis=RedisSettings(url=redis_server.url), bus=FAST, cache=CacheSettings(recent_trades=5))
    trades = [stubs.trade(i, price=f"6180{i}.5") for i in range(8)]
    await Producer(redis, Codec(), FAST, "test").publish({streams.market_data("trade", "binance", "BTC/USDT"): trades})
    # Act
    await run_publisher(settings, len(trades))
    # Assert: price:{exchange}:{symbol}, a string with a TTL of at most 300 s
    assert await redis.type("price:binance:BTC/USDT") == b"string"
    assert 0 < await redis.ttl("price:binance:BTC/USDT") <= 300
    assert await cache.get_price("binance", "BTC/USDT") == Price(D("61807.5"), trades[-1].ts_event, "trade")
    assert await cache.get_price("binance", "ETH/USDT") is None
    # recent_trades:{exchange}:{symbol}: the market's newest trades, capped; trades:{...} is left to strategies
    assert await redis.type("recent_trades:binance:BTC/USDT") == b"list"
    assert await redis.llen("recent_trades:binance:BTC/USDT") == 5
    assert not await redis.exists("trades:binance:BTC/USDT")
    listed = await cache.recent_market_trades("binance", "BTC/USDT", count=3)
    assert [t.trade_id for t in listed] == [t.trade_id for t in reversed(trades[-3:])]
    assert listed[0] == Tick("binance", "BTC/USDT", trades[-1].trade_id, D("61807.5"), D("0.02"), "sell",
                             trades[-1].ts_event, trades[-1].ts_recv)


async def test_ticks_channel_carries_every_published_trade(
        redis: aioredis.Redis, redis_server, cache: CacheClient) -> None:
    # Arrange: a subscriber of ticks:BTC/USDT (and not of ETH/USDT)
    got: list[Tick] = []
    subscribed = asyncio.Event()

    async def listen() -> None:
        ticks = cache.ticks("BTC/USDT")
        first = asyncio.ensure_future(ticks.__anext__())  # subscribes, then waits for the first tick
        while dict(await redis.pubsub_numsub("ticks:BTC/USDT")).get(b"ticks:BTC/USDT", 0) < 1:
            await asyncio.sleep(0.01)
        subscribed.set()
        got.append(await first)
        async for tick in ticks:
            got.append(tick)
            if len(got) == 4:
                break

    listener = asyncio.create_task(listen())
    await asyncio.wait_for(subscribed.wait(), 5)
    settings = Settings(redis=RedisSettings(url=redis_server.url), bus=FAST)
    trades = [stubs.trade(i) for i in range(3)]
    await Producer(redis, Codec(), FAST, "test").publish({
        streams.market_data("trade", "binance", "BTC/USDT"): trades,
        streams.market_data("trade", "binance", "ETH/USDT"): [stubs.trade(9, symbol="ETH/USDT")]})
    # Act: the publisher publishes them, and a strategy publishes one itself
    await run_publisher(settings, 4)
    assert await cache.publish_tick(stubs.trade(50)) == 1
    await asyncio.wait_for(listener, 5)
    # Assert
    assert [t.trade_id for t in got] == [t.trade_id for t in trades] + [stubs.trade(50).trade_id]
    assert got[0] == msgspec.json.decode(trade_json(trades[0]), type=Tick)
    assert all(t.symbol == "BTC/USDT" for t in got)


# -- order books ---------------------------------------------------------------------------------------------

async def test_orderbook_is_a_bounded_uncrossed_hash_with_a_60s_ttl(redis: aioredis.Redis,
                                                                   cache: CacheClient) -> None:
    # Arrange: levels out of order, more than the depth, as strings and Decimals (a real L2 shape)
    bids = [(f"61837.{60 - i:02d}", "0.5") for i in range(60)]
    asks = [(D(f"61838.{i:02d}"), D("0.25")) for i in range(60)][::-1]
    key = orderbook_key("binance", "BTC/USDT")
    # Act
    written = await cache.put_orderbook("binance", "BTC/USDT", bids, asks, sequence=1001, ts=stubs.T0_NS)
    # Assert: a hash of bids/asks/sequence/ts, expiring within 60 s, best levels first, 50 a side
    assert written
    assert await redis.type(key) == b"hash"
    assert set(await redis.hkeys(key)) == {b"bids", b"asks", b"sequence", b"ts"}
    assert 0 < await redis.ttl(key) <= 60
    book = await cache.get_orderbook("binance", "BTC/USDT")
    assert isinstance(book, OrderBook) and book.sequence == 1001 and book.ts == stubs.T0_NS
    assert len(book.bids) == len(book.asks) == 50
    assert book.bids[0] == (D("61837.60"), D("0.5")) and book.bids[-1] == (D("61837.11"), D("0.5"))
    assert book.asks[0] == (D("61838.00"), D("0.25")) and book.asks[-1] == (D("61838.49"), D("0.25"))
    assert json.loads(await redis.hget(key, "bids"))[0] == ["61837.60", "0.5"]  # type: ignore[arg-type]

    # An older or equal sequence does not replace it; a newer one does.
    assert not await cache.put_orderbook("binance", "BTC/USDT", [("1", "1")], [("2", "1")], sequence=1000, ts=1)
    assert not await cache.put_orderbook("binance", "BTC/USDT", [("1", "1")], [("2", "1")], sequence=1001, ts=1)
    assert (await cache.get_orderbook("binance", "BTC/USDT")).sequence == 1001  # type: ignore[union-attr]
    assert await cache.put_orderbook("binance", "BTC/USDT", [("1", "1")], [("2", "1")], sequence=1002, ts=2,
                                     depth=5)
    assert (await cache.get_orderbook("binance", "BTC/USDT")).bids == [(D(1), D(1))]  # type: ignore[union-attr]
    assert await cache.get_orderbook("binance", "ETH/USDT") is None


async def test_orderbook_refuses_crossed_locked_and_bad_levels(redis: aioredis.Redis, cache: CacheClient) -> None:
    with pytest.raises(CacheError, match=r"binance:BTC/USDT sequence 7 is crossed: best bid 101 >= best ask 100"):
        await cache.put_orderbook("binance", "BTC/USDT", [("101", "1"), ("99", "1")], [("100", "1")], 7, 1)
    with pytest.raises(CacheError, match="best bid 100 >= best ask 100"):
        await cache.put_orderbook("binance", "BTC/USDT", [("100", "1")], [("100", "2")], 8, 1)
    with pytest.raises(CacheError, match=r"bid level \[99, 0\] has a non-positive"):
        await cache.put_orderbook("binance", "BTC/USDT", [("99", "0")], [("100", "1")], 9, 1)
    with pytest.raises(CacheError, match="two ask levels at price 100"):
        await cache.put_orderbook("binance", "BTC/USDT", [("99", "1")], [("100", "1"), ("100", "2")], 10, 1)
    assert not await redis.exists(orderbook_key("binance", "BTC/USDT"))


# -- a strategy's trade log and session ------------------------------------------------------------------------

async def test_strategy_trade_log_is_a_list_capped_at_1000_newest_first(redis: aioredis.Redis,
                                                                       cache: CacheClient) -> None:
    # Act: 1,005 fills, one of them appended twice (a retry)
    for i in range(1005):
        assert await cache.append_trade(fill(i))
    assert not await cache.append_trade(fill(1004))
    await cache.append_trade(fill(0, strategy="other"))
    # Assert
    key = strategy_trades_key("mean-revert-1")
    assert key == "trades:mean-revert-1" and await redis.type(key) == b"list"
    assert await redis.llen(key) == 1000  # the 5 oldest fell off
    newest = await cache.recent_trades("mean-revert-1", count=3)
    assert newest == [fill(1004), fill(1003), fill(1002)]
    assert (await cache.recent_trades("mean-revert-1", count=5000))[-1] == fill(5)
    assert await cache.recent_trades("other") == [fill(0, strategy="other")]
    assert await redis.ttl(key) == -1  # a log, not a cache entry: no expiry, the cap bounds it


async def test_session_is_a_hash_per_strategy(redis: aioredis.Redis, cache: CacheClient) -> None:
    await cache.set_session("s-1", {"state": "long", "position": D("0.0020"), "orders_open": 2})
    await cache.set_session("s-1", {"state": "flat"})
    assert await redis.type(session_key("s-1")) == b"hash"
    assert await cache.get_session("s-1") == {"state": "flat", "position": "0.0020", "orders_open": "2"}
    assert await redis.ttl(session_key("s-1")) == -1
    await cache.clear_session("s-1", "orders_open")
    assert await cache.get_session("s-1") == {"state": "flat", "position": "0.0020"}
    await cache.set_session("s-2", {"state": "warming"}, ttl_s=3600)
    assert 3500 < await redis.ttl(session_key("s-2")) <= 3600
    await cache.clear_session("s-1")
    assert await cache.get_session("s-1") == {}


# -- indicators -------------------------------------------------------------------------------------------------

async def test_indicator_is_a_string_with_a_ttl(redis: aioredis.Redis, cache: CacheClient) -> None:
    await cache.set_indicator("BTC/USDT", "rsi_14", D("61.25"), ts=stubs.T0_NS)
    key = indicator_key("BTC/USDT", "rsi_14")
    assert key == "indicator:BTC/USDT:rsi_14" and await redis.type(key) == b"string"
    assert 0 < await redis.ttl(key) <= 300
    assert await cache.get_indicator("BTC/USDT", "rsi_14") == Indicator("BTC/USDT", "rsi_14", D("61.25"), stubs.T0_NS)
    await cache.set_indicator("BTC/USDT", "ema_200", "61000.5", ts=stubs.T0_NS, ttl_s=30)
    assert 0 < await redis.ttl(indicator_key("BTC/USDT", "ema_200")) <= 30
    await redis.pexpire(key, 1)  # let it expire now
    await asyncio.sleep(0.05)
    assert await cache.get_indicator("BTC/USDT", "rsi_14") is None
    with pytest.raises(CacheError, match="not a finite number"):
        await cache.set_indicator("BTC/USDT", "bad", D("NaN"), ts=1)


async def test_the_cap_comes_from_the_settings(redis: aioredis.Redis, redis_server) -> None:
    settings = Settings(redis=RedisSettings(url=redis_server.url), cache=CacheSettings(strategy_trades=2))
    async with CacheClient.connect(settings) as cache:
        for i in range(3):
            await cache.append_trade(fill(i, strategy="capped"))
        assert [t.trade_id for t in await cache.recent_trades("capped")] == ["f2", "f1"]
    assert await redis.llen("trades:capped") == 2
