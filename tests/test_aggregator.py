"""The aggregator on the real Redis with real data: 1m candles built from the real Binance capture's trades equal
the exchange's candles, a doctored exchange candle raises candle.reconcile, and 5m/1h/1d bars rolled up from the
real binance-spot-1m-ccxt file equal those pandas computes independently (resample), also across a restart."""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal

import msgspec
import pandas as pd
import pytest
import redis.asyncio as aioredis

from common import streams
from common.bus import Producer
from common.config import RedisSettings, Settings
from schemas import Alert, Candle, Codec, Event, Trade
from services.aggregator import Aggregator
from services.aggregator.bars import TimeframeError, bar_duration
from services.simulator import Recording
from tests.conftest import shipped_btc_minutes
from tests.test_stages import FAST, read, run_until

codec = Codec()
replace = msgspec.structs.replace
MS = 1_000_000
PACKED = replace(FAST, batch_max_events=500, read_count=100, stream_maxlen=10_000, backpressure_high_water=5_000)


@pytest.fixture
def settings(redis_server) -> Settings:  # type: ignore[no-untyped-def]
    return Settings(redis=RedisSettings(url=redis_server.url), bus=PACKED)


async def aggregate(redis: aioredis.Redis, settings: Settings, trades: Sequence[Event] = (),
                    candles: Sequence[Event] = ()) -> Aggregator:
    """Publish trades and candles on their md:* streams and run an aggregator until it has read them all."""
    producer = Producer(redis, codec, settings.bus, "test")
    await producer.publish({streams.market_data("trade", "binance", "BTC/USDT"): list(trades),
                            streams.market_data("candle", "binance", "BTC/USDT"): list(candles)})
    total = len(trades) + len(candles)
    svc = Aggregator(settings)
    svc.consumer.refresh_s = 0.05
    await run_until([svc], lambda: svc.count["trades"] + svc.count["candles_in"] >= total, timeout=30)
    return svc


# --- trades -> 1m, reconciled ----------------------------------------------------------------------------

def capture() -> tuple[Recording, list[Event], list[Event]]:
    rec = Recording.load()
    trades: list[Event] = [Trade(exchange="binance", symbol="BTC/USDT", trade_id=str(t.id), price=Decimal(t.price),
                                 amount=Decimal(t.qty), side=t.side, ts_event=t.time * MS, ts_recv=t.recv_ns)
                           for t in rec.trades]
    candles: list[Event] = [Candle(exchange="binance", symbol="BTC/USDT", timeframe="1m", open_time=c.open_time * MS,
                                   open=Decimal(c.open), high=Decimal(c.high), low=Decimal(c.low),
                                   close=Decimal(c.close), volume=Decimal(c.volume), closed=True,
                                   ts_event=c.close_time * MS, ts_recv=(c.close_time + 1) * MS)
                            for c in rec.candles]
    return rec, trades, candles


async def test_minutes_built_from_the_real_trades_equal_the_exchange_candles(redis, settings) -> None:  # type: ignore[no-untyped-def]
    # Arrange: 19,904 real trades and the 11 closed 1m candles the exchange (simulator) derives from them
    rec, trades, candles = capture()
    # Act
    svc = await aggregate(redis, settings, trades, candles)
    # Assert: every minute started and ended inside the capture is built, equal to the exchange's
    built = await read(redis, streams.candle_built("binance", "BTC/USDT"))
    inner = rec.candles[1:-1]  # the first minute starts mid-capture (partial), the last never ends
    assert [c.open_time for c in built] == [c.open_time * MS for c in inner]  # type: ignore[union-attr]
    for got, want in zip(built, inner, strict=True):
        assert isinstance(got, Candle) and got.source == "aggregate" and got.timeframe == "1m" and got.closed
        assert (got.open, got.high, got.low, got.close, got.volume) == \
            tuple(Decimal(x) for x in (want.open, want.high, want.low, want.close, want.volume))
    alerts = [a for a in await read(redis, streams.ALERTS) if isinstance(a, Alert)]
    assert alerts == []
    assert svc.count["reconciled_ok"] == len(inner) and svc.count["reconcile_mismatch"] == 0
    assert svc.count["partial_minutes"] == 1 and svc.count["reconcile_skipped"] == 1
    # the exchange's own 1m candles are not re-published: md:candle holds only the higher bars
    ours = [c for c in await read(redis, streams.market_data("candle", "binance", "BTC/USDT"))
            if isinstance(c, Candle) and c.source == "aggregate"]
    assert ours and all(c.timeframe != "1m" for c in ours)


async def test_a_doctored_exchange_candle_raises_candle_reconcile(redis, settings) -> None:  # type: ignore[no-untyped-def]
    rec, trades, candles = capture()
    doctored = candles[5]
    assert isinstance(doctored, Candle) and doctored.high is not None
    candles[5] = replace(doctored, high=doctored.high + Decimal("1.5"))
    svc = await aggregate(redis, settings, trades, candles)
    alerts = [a for a in await read(redis, streams.ALERTS) if isinstance(a, Alert)]
    assert [(a.rule, a.severity, a.source) for a in alerts] == [("candle.reconcile", "warning", "aggregator")]
    a = alerts[0]
    assert a.values["fields"] == "high" and a.values["open_time"] == str(doctored.open_time)
    assert Decimal(a.values["exchange_high"]) - Decimal(a.values["built_high"]) == Decimal("1.5")  # type: ignore[arg-type]
    assert svc.count["reconcile_mismatch"] == 1 and svc.count["reconciled_ok"] == len(rec.candles) - 3


# --- 1m -> higher timeframes -----------------------------------------------------------------------------

def real_minutes(rows: int) -> tuple[list[Candle], pd.DataFrame]:
    """The first `rows` real Binance BTC/USDT 1m candles of the shipped daily zips (2020-01-01 00:00 on) as
    Candles, and as a pandas frame."""
    text = shipped_btc_minutes(rows, dtype=str)
    candles = [Candle(exchange="binance", symbol="BTC/USDT", timeframe="1m", open_time=int(r.timestamp) * MS,
                      open=Decimal(r.open), high=Decimal(r.high), low=Decimal(r.low), close=Decimal(r.close),
                      volume=Decimal(r.volume), closed=True, ts_event=(int(r.timestamp) + 59_999) * MS,
                      ts_recv=(int(r.timestamp) + 60_000) * MS) for r in text.itertuples()]
    frame = shipped_btc_minutes(rows)
    assert len(frame) == len(text) == len({c.open_time for c in candles})
    frame.index = pd.to_datetime(frame.timestamp, unit="ms", utc=True)
    return candles, frame


async def bars_published(redis: aioredis.Redis) -> list[Candle]:
    """What the aggregator published on md:candle (the inputs are there too)."""
    return [c for c in await read(redis, streams.market_data("candle", "binance", "BTC/USDT"))
            if isinstance(c, Candle) and c.source == "aggregate"]


def resample(frame: pd.DataFrame, rule: str) -> pd.DataFrame:
    return frame.resample(rule, label="left", closed="left").agg(
        {"open": "first", "high": "max", "low": "min", "close": "last", "volume": "sum", "timestamp": "count"})


def assert_bars_equal(bars: list[Candle], expected: pd.DataFrame, minutes: int) -> None:
    assert bars, "no bars"
    for bar in bars:
        row = expected.loc[pd.Timestamp(bar.open_time, unit="ns", tz="UTC")]
        got = [float(v) for v in (bar.open, bar.high, bar.low, bar.close)]  # type: ignore[arg-type]
        assert got == [row.open, row.high, row.low, row.close], bar
        assert float(bar.volume) == pytest.approx(row.volume, rel=1e-12)  # type: ignore[arg-type]
        assert ("time.gap" in bar.quality) == (row.timestamp < minutes), bar


async def test_higher_bars_equal_pandas_resample_of_the_real_file(redis, settings) -> None:  # type: ignore[no-untyped-def]
    # Arrange: 1 day and 3 hours of real minutes, one missing (a hole inside a 5m, 1h and the 1d bar)
    minutes, frame = real_minutes(27 * 60)
    hole = 3 * 60 + 7
    del minutes[hole]
    frame = frame.drop(frame.index[hole])
    # Act
    await aggregate(redis, settings, candles=minutes)
    # Assert
    out = await bars_published(redis)
    by_tf: dict[str, list[Candle]] = {}
    for c in out:
        by_tf.setdefault(c.timeframe, []).append(c)
    assert sorted(by_tf) == ["15m", "1d", "1h", "4h", "5m"]
    for tf, rule, n in (("5m", "5min", 5), ("15m", "15min", 15), ("1h", "1h", 60), ("4h", "4h", 240),
                        ("1d", "1D", 1440)):
        bars = by_tf[tf]
        expected = resample(frame, rule)
        # every bar whose last minute was seen is published, each once; the one still running is not
        closed = [t for t, row in expected.iterrows() if t + pd.Timedelta(minutes=n) <= frame.index[-1] + pd.Timedelta(minutes=1)]
        assert [b.open_time for b in bars] == [int(t.value) for t in closed], tf
        assert_bars_equal(bars, expected, n)
    flagged = [(b.timeframe, b.open_time) for b in out if b.quality]
    hole_ns = minutes[hole].open_time - 60_000_000_000
    assert flagged == [(tf, hole_ns - hole_ns % bar_duration(tf)) for tf in ("5m", "15m", "1h", "4h", "1d")]


async def test_a_restart_rebuilds_the_bars_in_progress(redis, settings) -> None:  # type: ignore[no-untyped-def]
    minutes, frame = real_minutes(130)  # 00:00 .. 02:09
    first, second = minutes[:95], minutes[95:]  # the restart falls inside the 01:00 hour and a 5m bar
    await aggregate(redis, settings, candles=first)
    svc = await aggregate(redis, settings, candles=second)  # a new process: empty memory
    assert svc.count["recovered_minutes"] == len(first)
    out = await bars_published(redis)
    hours = [c for c in out if c.timeframe == "1h"]
    assert [h.open_time for h in hours] == [minutes[0].open_time, minutes[60].open_time]
    assert all(not h.quality for h in hours)  # complete: the first process's minutes were not lost
    assert_bars_equal(hours, resample(frame, "1h"), 60)
    fives = [c for c in out if c.timeframe == "5m"]
    assert len({c.open_time for c in fives}) == 26 and not any(c.quality for c in fives)


async def test_redelivered_minutes_give_the_same_bars(redis, settings) -> None:  # type: ignore[no-untyped-def]
    minutes, frame = real_minutes(20)
    await aggregate(redis, settings, candles=[*minutes, *minutes[5:15]])  # a producer re-sent ten minutes
    out = await bars_published(redis)
    fives = {}
    for c in out:
        if c.timeframe == "5m":
            assert fives.setdefault(c.open_time, c) == c  # a bar published again is the same bar
    assert len(fives) == 4
    assert_bars_equal(list(fives.values()), resample(frame, "5min"), 5)


def test_bar_timeframes_must_divide_a_day() -> None:
    assert bar_duration("4h") == 4 * 3_600_000_000_000
    for bad in ("7m", "1m", "5x", "1w"):
        with pytest.raises(TimeframeError, match="bar_timeframes"):
            bar_duration(bad)
