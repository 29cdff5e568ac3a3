"""The validator, normalizer and cache publisher, each run in-process against the real Redis: inputs published
with common.bus.core.Producer, outputs read back from the streams and keys they must land on."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from decimal import Decimal

import msgspec
import pytest
import redis.asyncio as aioredis

from common.bus import streams
from common.bus.core import Producer
from common.bus.stage import Service
from common.config import BusSettings, CacheSettings, RedisSettings, Settings
from common.domain.normalize import candle_alignment, canonical_decimal
from schemas import Alert, Candle, Codec, Event, Market, Ticker, Trade
from services.cache_publisher import CachePublisher
from services.cache_publisher.service import trade_json
from services.normalizer import Normalizer
from services.validator import Validator
from tests import stubs

FAST = BusSettings(stream_maxlen=1000, backpressure_high_water=500, backpressure_max_wait_s=0.5,
                   batch_max_events=10, read_count=50, block_ms=50, claim_idle_ms=200, max_deliveries=2)
RECENT = 50
replace = msgspec.structs.replace
codec = Codec()


@pytest.fixture
def stage_settings(redis_server) -> Settings:
    return Settings(redis=RedisSettings(url=redis_server.url), bus=FAST,
                    cache=CacheSettings(price_ttl_s=300, recent_trades=RECENT))


async def run_until(services: list[Service], predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    stop = asyncio.Event()
    tasks = [asyncio.create_task(s.run(stop)) for s in services]
    try:
        async with asyncio.timeout(timeout):
            while not predicate():
                for t in tasks:
                    if t.done():
                        t.result()  # a crashed service fails the test with its own exception
                await asyncio.sleep(0.02)
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 5)
        for s in services:
            await s.close()


async def read(redis: aioredis.Redis, stream: str) -> list[Event]:
    return [e for _, f in await redis.xrange(stream) for e in codec.decode_entry(f)]


async def pending(redis: aioredis.Redis, stream: str, group: str) -> int:
    return int((await redis.xpending(stream, group))["pending"])


def market(symbol: str = "BTC/USDT", exchange_symbol: str = "BTCUSDT", market_type: str = "spot") -> Market:
    base, quote = symbol.split(":")[0].split("/")
    return Market(exchange="binance", symbol=symbol, exchange_symbol=exchange_symbol, base=base, quote=quote,
                  market_type=market_type, active=True, contract_size=None,
                  price_precision=Decimal("0.01000000"), amount_precision=Decimal("0.00001000"),
                  ts_event=stubs.T0_NS, ts_recv=stubs.T0_NS)


# --- validator --------------------------------------------------------------------------------------------

async def test_validator_forwards_valid_events_and_alerts_rejected_ones(redis, stage_settings) -> None:
    # Arrange: the real shapes, and one bad event per rule, interleaved
    now = time.time_ns()
    good: list[Event] = [stubs.trade(0), stubs.trade(1), stubs.candle(), stubs.ticker(), market(),
                         stubs.trade(2)]
    bad: dict[str, Event] = {
        "fields.missing": replace(stubs.trade(10), price=None, amount=None),
        "price.non_positive": stubs.trade(11, price="0.00000000"),
        "amount.non_positive": stubs.trade(12, amount="0"),
        "volume.negative": stubs.candle(1, v="-1"),
        "ohlc.consistency": stubs.candle(2, h="61790.00"),
        "time.future": replace(stubs.trade(13, ts=now + 120 * 1_000_000_000), ts_recv=now),
        "ticker.crossed": stubs.ticker(bid="61837.65", ask="61837.64"),
    }
    mixed = [good[0], *list(bad.values())[:4], good[1], good[2], *list(bad.values())[4:], *good[3:]]
    kraken = stubs.trade(0, exchange="kraken", symbol="BTC/USD")
    producer = Producer(redis, codec, FAST, "test")
    await producer.publish({streams.raw("binance"): mixed, streams.raw("kraken"): [kraken]})
    svc = Validator(stage_settings)
    total = len(mixed) + 1
    # Act
    await run_until([svc], lambda: svc.passed + svc.rejected == total)
    # Assert: exactly the good events, unchanged and in order, on valid:{exchange}
    assert await read(redis, streams.valid("binance")) == good
    assert await read(redis, streams.valid("kraken")) == [kraken]
    alerts = await read(redis, streams.ALERTS)
    assert all(isinstance(a, Alert) for a in alerts)
    assert sorted(a.rule for a in alerts) == sorted(bad)  # one alert per bad event, none for the good ones
    by_rule = {a.rule: a for a in alerts}  # type: ignore[union-attr]
    for rule, event in bad.items():
        a = by_rule[rule]
        assert (a.source, a.severity, a.exchange, a.symbol) == ("validator", "error", "binance", "BTC/USDT")
        assert a.kind == {Trade: "trade", Candle: "candle", Ticker: "ticker"}[type(event)]
        assert a.reason and "rejected" in a.reason
    missing = by_rule["fields.missing"].values
    assert missing["price"] is None and missing["amount"] is None and missing["trade_id"] == "3735683269"
    assert by_rule["price.non_positive"].values["price"] == "0.00000000"
    assert by_rule["ohlc.consistency"].values["high"] == "61790.00"
    assert by_rule["time.future"].values["ts_event"] == str(bad["time.future"].ts_event)  # type: ignore[union-attr]
    crossed = by_rule["ticker.crossed"].values
    assert crossed == {"bid": "61837.65", "ask": "61837.64", "ts_event": str(stubs.T0_NS)}
    assert await pending(redis, streams.raw("binance"), "validator") == 0
    assert await pending(redis, streams.raw("kraken"), "validator") == 0
    c = svc.counters()
    assert (c["events_in"], c["passed"], c["rejected"]) == (total, len(good) + 1, len(bad))
    assert c["rejected.ohlc.consistency"] == 1


# --- normalizer -------------------------------------------------------------------------------------------

def test_canonical_decimal_strips_zeros_and_exponents() -> None:
    assert str(canonical_decimal(Decimal("61837.63000000"))) == "61837.63"
    assert str(canonical_decimal(Decimal("0.02000000"))) == "0.02"
    assert str(canonical_decimal(Decimal("100.00"))) == "100"
    assert str(canonical_decimal(Decimal("1E+2"))) == "100"
    assert str(canonical_decimal(Decimal("0E-8"))) == "0"
    assert str(canonical_decimal(Decimal("-0.0"))) == "0"
    assert canonical_decimal(Decimal("0.00000001000")) == Decimal("1E-8")
    assert canonical_decimal(None) is None


def test_candle_alignment_by_timeframe() -> None:
    minute = 1_723_161_240_000_000_000  # 2024-08-08 23:54:00 UTC, a Thursday
    assert candle_alignment(minute, "1m") == "aligned"
    assert candle_alignment(minute + 1_000_000, "1m") == "misaligned"
    assert candle_alignment(minute, "1h") == "misaligned"
    assert candle_alignment(1_723_161_600_000_000_000, "1d") == "aligned"           # 2024-08-09 00:00
    assert candle_alignment(1_723_420_800_000_000_000, "1w") == "aligned"           # Monday 2024-08-12
    assert candle_alignment(1_723_161_600_000_000_000, "1w") == "misaligned"        # a Friday
    assert candle_alignment(1_722_470_400_000_000_000, "1M") == "aligned"           # 2024-08-01
    assert candle_alignment(1_723_161_600_000_000_000, "1M") == "misaligned"
    assert candle_alignment(minute, "3d") == "unchecked"
    with pytest.raises(ValueError):
        candle_alignment(minute, "minute")


async def test_normalizer_canonicalizes_and_routes_and_rejects(redis, stage_settings) -> None:
    # Arrange
    ms_trade = replace(stubs.trade(0, price="61837.63000000", amount="0.02000000"),
                       ts_event=1_723_161_255_342, ts_recv=1_723_161_255_342_500_000)
    id_trade = stubs.trade(1, symbol="BTCUSDT")  # exchange form, mapped by the market before it
    candle = replace(stubs.candle(o="61837.63000000", h="61900.00000000", lo="61800.00000000",
                                  c="61850.10000000", v="12.50000000"), open_time=1_723_161_240_000)  # ms
    misaligned = replace(stubs.candle(1), open_time=stubs.candle(1).open_time + 30_000_000_000)
    ticker = stubs.ticker(bid="61837.63000000", ask="61837.64000000", last="61837.63000000")
    inputs: list[Event] = [
        ms_trade, market(), id_trade, candle, misaligned, ticker,
        market("ETH/USDT", "ETHUSDT"), market("ETH/USDT:USDT", "ETHUSDT", "swap"),
        stubs.trade(2, symbol="ETHUSDT"),        # ambiguous: spot or swap
        stubs.trade(3, symbol="SOLUSDT"),        # unknown id
        stubs.trade(4, symbol="BTC / USDT"),     # not a unified symbol
        stubs.trade(5, symbol="ETH/USDT:USDT"),  # a swap symbol passes as is
    ]
    await Producer(redis, codec, FAST, "test").publish({streams.valid("binance"): inputs})
    svc = Normalizer(stage_settings)
    # Act
    await run_until([svc], lambda: svc.published + svc.rejected == len(inputs))
    # Assert: trades, canonical
    trades = await read(redis, streams.market_data("trade", "binance", "BTC/USDT"))
    assert [t.trade_id for t in trades] == [ms_trade.trade_id, id_trade.trade_id]  # type: ignore[union-attr]
    first = trades[0]
    assert isinstance(first, Trade)
    assert first.ts_event == 1_723_161_255_342_000_000 and first.ts_recv == ms_trade.ts_recv
    assert (str(first.price), str(first.amount)) == ("61837.63", "0.02")
    assert trades[1] == replace(id_trade, symbol="BTC/USDT")
    swaps = await read(redis, streams.market_data("trade", "binance", "ETH/USDT:USDT"))
    assert [t.trade_id for t in swaps] == [stubs.trade(5).trade_id]  # type: ignore[union-attr]
    # candles: aligned one converted, misaligned one rejected
    candles = await read(redis, streams.market_data("candle", "binance", "BTC/USDT"))
    assert len(candles) == 1 and isinstance(candles[0], Candle)
    assert candles[0].open_time == 1_723_161_240_000_000_000
    assert [str(v) for v in (candles[0].open, candles[0].high, candles[0].low, candles[0].close,
                             candles[0].volume)] == ["61837.63", "61900", "61800", "61850.1", "12.5"]
    tickers = await read(redis, streams.market_data("ticker", "binance", "BTC/USDT"))
    assert len(tickers) == 1 and isinstance(tickers[0], Ticker)
    quote = (str(tickers[0].bid), str(tickers[0].ask), str(tickers[0].last))
    assert quote == ("61837.63", "61837.64", "61837.63")
    markets = await read(redis, streams.markets("binance"))
    assert [m.symbol for m in markets] == ["BTC/USDT", "ETH/USDT", "ETH/USDT:USDT"]  # type: ignore[union-attr]
    assert str(markets[0].price_precision) == "0.01"  # type: ignore[union-attr]
    # nothing rejected reached md:*
    registry = {m.decode() for m in await redis.smembers(streams.REGISTRY)}
    assert not any(s.startswith("md:") and ("SOLUSDT" in s or "ETHUSDT" in s or " " in s) for s in registry)
    # alerts with reason and values
    alerts = {a.values.get("symbol") or a.rule: a for a in await read(redis, streams.ALERTS)}  # type: ignore[union-attr]
    assert len(alerts) == 4
    ambiguous, unknown, invalid = alerts["ETHUSDT"], alerts["SOLUSDT"], alerts["BTC / USDT"]
    assert ambiguous.rule == "symbol.unmapped" and ambiguous.values["candidates"] == "ETH/USDT, ETH/USDT:USDT"
    assert "ambiguous" in ambiguous.reason
    assert unknown.rule == "symbol.unmapped" and unknown.values["candidates"] is None
    assert "md:market" in unknown.reason
    assert invalid.rule == "symbol.invalid" and invalid.source == "normalizer"
    bad_bar = alerts["candle.misaligned"]
    assert bad_bar.values["open_time"] == str(misaligned.open_time)
    assert bad_bar.values["expected_open_time"] == str(stubs.candle(1).open_time)
    assert (bad_bar.exchange, bad_bar.symbol, bad_bar.kind) == ("binance", "BTC/USDT", "candle")
    assert await pending(redis, streams.valid("binance"), "normalizer") == 0
    c = svc.counters()
    assert c["ts_rescaled"] == 2 and c["symbol_mapped"] == 1 and c["rejected.symbol.unmapped"] == 2


async def test_normalizer_learns_exchange_ids_from_md_market_at_start(redis, stage_settings) -> None:
    producer = Producer(redis, codec, FAST, "test")
    await producer.publish({streams.markets("binance"): [market()]})  # published by an earlier run
    await producer.publish({streams.valid("binance"): [stubs.trade(7, symbol="btcusdt")]})
    svc = Normalizer(stage_settings)
    await run_until([svc], lambda: svc.published + svc.rejected == 1)
    trades = await read(redis, streams.market_data("trade", "binance", "BTC/USDT"))
    assert trades == [stubs.trade(7)]
    assert svc.rejected == 0


# --- cache publisher --------------------------------------------------------------------------------------

def price_of(trade: Trade) -> dict[str, object]:
    return {"price": format(trade.price, "f"), "ts": trade.ts_event, "source": "trade"}


async def drain(ps: aioredis.client.PubSub, expect: int, timeout: float = 5.0) -> list[dict[str, object]]:
    got: list[dict[str, object]] = []
    async with asyncio.timeout(timeout):
        while len(got) < expect:
            msg = await ps.get_message(ignore_subscribe_messages=True, timeout=0.1)
            if msg is not None:
                got.append(json.loads(msg["data"]))
    return got


async def test_cache_publisher_price_recent_trades_and_ticks(redis, redis_server, stage_settings) -> None:
    # Arrange: 82 trades, the last two in the same millisecond (one taker order filling two makers). The first
    # ten were read by a consumer that crashed before acknowledging: they are redelivered after the others.
    same_ms = stubs.T0_NS + 80_000_000
    trades = [stubs.trade(i, price=f"{61800 + i}.5") for i in range(80)]
    trades += [stubs.trade(80, price="61900.1", ts=same_ms), stubs.trade(81, price="61900.2", ts=same_ms)]
    stream = streams.market_data("trade", "binance", "BTC/USDT")
    producer = Producer(redis, codec, FAST, "test")
    await producer.publish({stream: trades[:10]})
    with contextlib.suppress(aioredis.ResponseError):  # BUSYGROUP: the producer makes the pipeline's own groups
        await redis.xgroup_create(stream, "cache_publisher", id="0")
    await redis.xreadgroup("cache_publisher", "crashed", {stream: ">"}, count=100)
    await producer.publish({stream: trades[10:]})
    listener = aioredis.Redis.from_url(redis_server.url)
    ps = listener.pubsub()
    await ps.subscribe("ticks:BTC/USDT")
    # Taken over once idle 1 s: long after this service has read the newer entry at start.
    svc = CachePublisher(replace(stage_settings, bus=replace(FAST, claim_idle_ms=1000)))
    # Act
    await run_until([svc], lambda: svc.consumer.stats.events == len(trades))
    # Assert: the older redelivered trades came last and did not move the price back
    assert svc.consumer.stats.claimed == 1
    assert svc.counters()["prices_stale"] == 1
    last = trades[-1]
    assert json.loads(await redis.get("price:binance:BTC/USDT")) == price_of(last)
    assert 0 < await redis.ttl("price:binance:BTC/USDT") <= 300
    # the recent list: capped, newest first, exactly the newest trades' JSON
    listed = await redis.lrange("recent_trades:binance:BTC/USDT", 0, -1)
    assert len(listed) == RECENT
    assert listed == [trade_json(t) for t in reversed(trades[-RECENT:])]
    assert json.loads(listed[0]) == {"exchange": "binance", "symbol": "BTC/USDT", "trade_id": last.trade_id,
                                     "price": "61900.2", "amount": "0.02", "side": "sell", "ts": same_ms,
                                     "ts_recv": last.ts_recv}
    ticks = await drain(ps, len(trades))
    assert sorted(t["trade_id"] for t in ticks) == sorted(t.trade_id for t in trades)
    assert [t["trade_id"] for t in ticks if t["trade_id"] == last.trade_id] == [last.trade_id]
    assert await pending(redis, stream, "cache_publisher") == 0

    # Act: processed trades delivered again (a producer re-publishing after a restart): older ones, then the
    # same-millisecond pair
    for again in (trades[10:20], trades[-2:]):
        await producer.publish({stream: again})
        svc2 = CachePublisher(stage_settings)
        await run_until([svc2], lambda: svc2.consumer.stats.events == len(again))  # noqa: B023
        # Assert: the price did not move back, the list holds no duplicate
        assert json.loads(await redis.get("price:binance:BTC/USDT")) == price_of(last)
        assert await redis.lrange("recent_trades:binance:BTC/USDT", 0, -1) == listed
        assert svc2.counters()["trades_listed"] == 0
        assert len(await drain(ps, len(again))) == len(again)  # pub/sub is at-least-once: republished
        assert await pending(redis, stream, "cache_publisher") == 0
    assert svc2.counters()["prices_written"] == 1  # the same-ms redelivery rewrites the same value
    await ps.aclose()
    await listener.aclose()


async def test_cache_price_moves_forward_across_sources(redis, stage_settings) -> None:
    producer = Producer(redis, codec, FAST, "test")
    key = "price:binance:BTC/USDT"
    trade = stubs.trade(0)
    ticker = replace(stubs.ticker(last="61840.00000000"), ts_event=trade.ts_event + 1_000_000_000)
    old_bar = stubs.candle(-1, c="61700.00")  # closed before the trade
    new_bar = stubs.candle(0, c="61850.10")   # its ts_event is the bar's end, after the ticker
    svc = CachePublisher(stage_settings)
    await producer.publish({streams.market_data("trade", "binance", "BTC/USDT"): [trade],
                            streams.market_data("ticker", "binance", "BTC/USDT"): [ticker]})
    await run_until([svc], lambda: svc.consumer.stats.events == 2)
    expected = {"price": "61840.00000000", "ts": ticker.ts_event, "source": "ticker"}
    assert json.loads(await redis.get(key)) == expected
    # an older candle does not move it back; a newer one does
    await producer.publish({streams.market_data("candle", "binance", "BTC/USDT"): [old_bar]})
    svc2 = CachePublisher(stage_settings)
    await run_until([svc2], lambda: svc2.consumer.stats.events == 1)
    assert json.loads(await redis.get(key))["source"] == "ticker"
    assert svc2.counters()["prices_stale"] == 1
    await producer.publish({streams.market_data("candle", "binance", "BTC/USDT"): [new_bar]})
    svc3 = CachePublisher(stage_settings)
    await run_until([svc3], lambda: svc3.consumer.stats.events == 1)
    expected = {"price": "61850.10", "ts": new_bar.ts_event, "source": "candle"}
    assert json.loads(await redis.get(key)) == expected
    assert not await redis.exists("recent_trades:binance:BTC/USDT:candle")
    assert await redis.llen("recent_trades:binance:BTC/USDT") == 1  # only the trade is a trade


# --- the three stages chained -----------------------------------------------------------------------------

async def test_rejected_event_never_reaches_the_cache(redis, stage_settings) -> None:
    good = [stubs.trade(i, price="61837.63000000") for i in range(5)]
    poisoned = stubs.trade(99, price="0E-8")  # the newest trade, with a zero price
    await Producer(redis, codec, FAST, "test").publish({streams.raw("binance"): [*good, poisoned]})
    validator = Validator(stage_settings)
    normalizer = Normalizer(stage_settings)
    cache = CachePublisher(stage_settings)
    for svc in (normalizer, cache):
        svc.consumer.refresh_s = 0.05  # find valid:* and md:* as soon as the stage before creates them
    await run_until([validator, normalizer, cache], lambda: cache.consumer.stats.events == len(good))
    expected = {"price": "61837.63", "ts": good[-1].ts_event, "source": "trade"}
    assert json.loads(await redis.get("price:binance:BTC/USDT")) == expected
    listed = [json.loads(x)["trade_id"] for x in await redis.lrange("recent_trades:binance:BTC/USDT", 0, -1)]
    assert listed == [t.trade_id for t in reversed(good)]
    alerts = await read(redis, streams.ALERTS)
    assert [(a.rule, a.values["trade_id"]) for a in alerts] == [("price.non_positive", poisoned.trade_id)]  # type: ignore[union-attr]
    assert poisoned.trade_id not in {t.trade_id for t in await read(redis, streams.valid("binance"))}  # type: ignore[union-attr]


# --- normalizer: contract sizes ---------------------------------------------------------------------------

async def test_normalizer_puts_contract_amounts_in_base_units(redis, stage_settings) -> None:
    # Arrange: a linear swap worth 0.01 BTC per contract (OKX BTC-USDT-SWAP), an inverse one worth 100 USD
    # per contract (Binance COIN-M BTCUSD_PERP), a spot market; amounts in contracts as ccxt reports them
    linear = replace(market("BTC/USDT:USDT", "BTC-USDT-SWAP", "swap"), contract_size=Decimal("0.01"))
    inverse = replace(market("BTC/USD:BTC", "BTCUSD_PERP", "swap"), contract_size=Decimal(100))
    on_linear = stubs.trade(0, symbol="BTC/USDT:USDT", price="61837.6", amount="3")
    on_inverse = stubs.trade(1, symbol="BTC/USD:BTC", price="50000", amount="5")
    spot = stubs.trade(2, price="61837.63", amount="0.02")
    quote = replace(stubs.ticker(), symbol="BTC/USDT:USDT", bid_size=Decimal(7), ask_size=Decimal(2))
    bar = replace(stubs.candle(), symbol="BTC/USD:BTC", volume=Decimal("1.5"))  # ccxt: base volume already
    unknown = stubs.trade(3, symbol="ETH/USDT:USDT", amount="1")  # no Market seen for it
    inputs: list[Event] = [linear, inverse, on_linear, on_inverse, spot, quote, bar, unknown]
    await Producer(redis, codec, FAST, "test").publish({streams.valid("binance"): inputs})
    svc = Normalizer(stage_settings)
    # Act
    await run_until([svc], lambda: svc.published + svc.rejected == len(inputs))
    # Assert
    [t] = await read(redis, streams.market_data("trade", "binance", "BTC/USDT:USDT"))
    assert isinstance(t, Trade) and t.amount == Decimal("0.03") and str(t.amount) == "0.03"
    [t] = await read(redis, streams.market_data("trade", "binance", "BTC/USD:BTC"))
    assert isinstance(t, Trade) and t.amount == Decimal("0.01")  # 5 x 100 USD at 50,000 USD/BTC
    [t] = await read(redis, streams.market_data("trade", "binance", "BTC/USDT"))
    assert isinstance(t, Trade) and t.amount == Decimal("0.02")
    [q] = await read(redis, streams.market_data("ticker", "binance", "BTC/USDT:USDT"))
    assert isinstance(q, Ticker) and (q.bid_size, q.ask_size) == (Decimal("0.07"), Decimal("0.02"))
    [c] = await read(redis, streams.market_data("candle", "binance", "BTC/USD:BTC"))
    assert isinstance(c, Candle) and c.volume == Decimal("1.5")
    [a] = await read(redis, streams.ALERTS)
    assert isinstance(a, Alert) and a.rule == "market.unknown" and a.values["symbol"] == "ETH/USDT:USDT"
    assert "contract" in a.reason and "load_markets" in a.reason
    assert svc.counters()["contract_scaled"] == 3
