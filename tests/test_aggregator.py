"""The aggregator on the real Redis with real data: 1m candles built from the real Binance capture's trades equal
the exchange's candles, a doctored exchange candle raises candle.reconcile, and 5m/1h/1d bars rolled up from the
real binance-spot-1m-ccxt file equal those pandas computes independently (resample), also across a restart."""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import Sequence
from decimal import Decimal

import msgspec
import pandas as pd
import pytest
import redis.asyncio as aioredis

from common.bus import streams
from common.bus.core import Delivery, Producer
from common.config import ExchangeSettings, InfluxSettings, RedisSettings, Settings
from common.domain.bars import TimeframeError, bar_duration
from common.stores.influx import InfluxClient, quote_ident
from schemas import Alert, Candle, Codec, Event, Trade
from services.aggregator import Aggregator
from services.influx_writer import InfluxWriter
from simulator import Recording
from simulator.coinbase_recording import CoinbaseRecording
from simulator.hyperliquid_data import load_capture
from tests.conftest import SHIPPED_DATA, shipped_btc_minutes
from tests.test_influx import KEEP_ALL, Running, wait_for
from tests.test_stages import FAST, read, run_until

codec = Codec()
replace = msgspec.structs.replace
MS = 1_000_000
MINUTE = 60_000_000_000
PACKED = replace(FAST, batch_max_events=500, read_count=100, stream_maxlen=10_000, backpressure_high_water=5_000)


@pytest.fixture
def settings(redis_server) -> Settings:
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


async def test_minutes_built_from_the_real_trades_equal_the_exchange_candles(redis, settings) -> None:
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


async def test_a_doctored_exchange_candle_raises_candle_reconcile(redis, settings) -> None:
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


async def test_higher_bars_equal_pandas_resample_of_the_real_file(redis, settings) -> None:
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


async def test_a_restart_rebuilds_the_bars_in_progress(redis, settings) -> None:
    minutes, frame = real_minutes(130)  # 00:00 .. 02:09
    first, second = minutes[:95], minutes[95:]  # the restart falls inside the 01:00 hour and a 5m bar
    await aggregate(redis, settings, candles=first)
    svc = await aggregate(redis, settings, candles=second)  # a new process: empty memory
    assert svc.counters()["series_loaded"] == 1  # the symbol's state, from the checkpoint
    out = await bars_published(redis)
    hours = [c for c in out if c.timeframe == "1h"]
    assert [h.open_time for h in hours] == [minutes[0].open_time, minutes[60].open_time]
    assert all(not h.quality for h in hours)  # complete: the first process's minutes were not lost
    assert_bars_equal(hours, resample(frame, "1h"), 60)
    fives = [c for c in out if c.timeframe == "5m"]
    assert len({c.open_time for c in fives}) == 26 and not any(c.quality for c in fives)


async def test_redelivered_minutes_give_the_same_bars(redis, settings) -> None:
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


# --- restarts, a second instance (issue 10, defect 4) ----------------------------------------------------

def streams_of(events: Sequence[Event]) -> dict[str, list[Event]]:
    out: dict[str, list[Event]] = {}
    for e in events:
        kind = "trade" if isinstance(e, Trade) else "candle"
        out.setdefault(streams.market_data(kind, e.exchange, e.symbol), []).append(e)  # type: ignore[union-attr]
    return out


async def everything_published(redis: aioredis.Redis) -> dict[str, list[Event]]:
    """What the aggregator published (built minutes, bars, alerts), without its processing-time stamps."""
    out: dict[str, list[Event]] = {}
    for key in sorted(k.decode() for k in await redis.keys("md:candle*")):
        ours = [e for e in await read(redis, key) if isinstance(e, Candle) and e.source == "aggregate"]
        if ours:
            out[key] = ours
    out[streams.ALERTS] = [replace(a, ts_recv=0) for a in await read(redis, streams.ALERTS)]
    return out


async def aggregate_in_pieces(redis: aioredis.Redis, settings: Settings, pieces: Sequence[Sequence[Event]]) -> None:
    """Each piece published, then consumed by a new aggregator process (empty memory) that stops after it."""
    for piece in pieces:
        await Producer(redis, codec, settings.bus, "test").publish(streams_of(piece))
        svc = Aggregator(settings)
        svc.consumer.refresh_s = 0.05
        n = len(piece)
        await run_until([svc], lambda s=svc, n=n: s.count["trades"] + s.count["candles_in"] >= n,  # type: ignore[misc]
                        timeout=30)


def by_time(trades: list[Event], candles: list[Event], cuts: Sequence[int]) -> list[list[Event]]:
    """The trades cut at `cuts` (indexes), each piece with the exchange candles that closed before its end."""
    pieces: list[list[Event]] = []
    bounds = [0, *cuts, len(trades)]
    for start, end in itertools.pairwise(bounds):
        until = trades[end - 1].ts_event if end < len(trades) else None  # type: ignore[union-attr]
        since = trades[start - 1].ts_event if start else None  # type: ignore[union-attr]
        cs = [c for c in candles if (since is None or c.ts_event > since) and (until is None or c.ts_event <= until)]  # type: ignore[union-attr]
        pieces.append([*trades[start:end], *cs])
    return pieces


async def test_restarts_mid_minute_give_the_outputs_of_an_uninterrupted_run(redis, settings) -> None:
    # Arrange: the real capture in one process
    rec, trades, candles = capture()
    await aggregate_in_pieces(redis, settings, [[*trades, *candles]])
    expected = await everything_published(redis)
    assert len(expected[streams.candle_built("binance", "BTC/USDT")]) == len(rec.candles) - 2
    await redis.flushdb()
    # Act: a new process after each cut, each in the middle of a minute
    await aggregate_in_pieces(redis, settings, by_time(trades, candles, [2500, 7001, 7002, 15000]))
    # Assert: every minute built, each once, equal; the same bars and (no) alerts
    assert await everything_published(redis) == expected


async def test_restarts_across_midnight_never_rebuild_the_wrong_day(redis, settings) -> None:
    # Arrange: 27 real hours of minutes in one process; then cut around midnight, one piece starting with a
    # minute of the day before sent again (a late copy)
    minutes, frame = real_minutes(27 * 60)
    await aggregate_in_pieces(redis, settings, [minutes])
    expected = await everything_published(redis)
    await redis.flushdb()
    midnight = 24 * 60
    cuts = [0, midnight - 3, midnight + 1, midnight + 5, midnight + 100, len(minutes)]
    pieces: list[list[Event]] = [list(minutes[a:b]) for a, b in itertools.pairwise(cuts)]
    pieces[3].insert(0, minutes[midnight - 10])
    await aggregate_in_pieces(redis, settings, [*pieces[:3], [minutes[midnight - 10]], *pieces[3:]])
    # Assert: the same bars as without restarts; the 1h and 1d bars equal pandas' (volume included)
    got = await everything_published(redis)
    assert got == expected
    bars = got[streams.market_data("candle", "binance", "BTC/USDT")]
    day = [b for b in bars if b.timeframe == "1d"]
    assert len(day) == 1 and not day[0].quality  # type: ignore[union-attr]
    assert_bars_equal(day, resample(frame, "1D"), 1440)  # type: ignore[arg-type]
    assert_bars_equal([b for b in bars if b.timeframe == "1h"], resample(frame, "1h"), 60)  # type: ignore[misc]


async def test_a_second_aggregator_waits_as_standby_and_takes_over_when_the_first_dies(redis, settings) -> None:
    # Arrange: one process's outputs, from small entries (many batches)
    small = replace(settings, bus=replace(settings.bus, batch_max_events=20, read_count=10))
    _, trades, candles = capture()
    events = streams_of([*trades, *candles])
    await aggregate_in_pieces(redis, small, [[*trades, *candles]])
    expected = await everything_published(redis)
    await redis.flushdb()
    await Producer(redis, codec, small.bus, "test").publish(events)
    entries = 0
    for name in events:
        entries += await redis.xlen(name)
    # Act: two at once; the holder is killed half way with a batch in hand (its lease must expire)
    a, b = Aggregator(small, instance="a"), Aggregator(small, instance="b")
    stuck = asyncio.Event()
    for svc in (a, b):
        svc.consumer.refresh_s = 0.05
        svc.handle = hang_after(svc, entries // 2, stuck)  # type: ignore[method-assign]
    stop = asyncio.Event()
    tasks = {svc: asyncio.create_task(svc.run(stop)) for svc in (a, b)}
    try:
        async with asyncio.timeout(60):
            await stuck.wait()
            holder, standby = (a, b) if a.consumer.stats.acked else (b, a)
            assert standby.consumer.stats.acked == 0 and standby.consumer.stats.state == "standby"
            tasks[holder].cancel()
            while not await all_done(redis, list(events), "aggregator"):
                assert not tasks[standby].done()
                await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
        for svc in (a, b):
            await svc.close()
    # Assert: one process's outputs: no minute or bar doubled, none wrong
    assert await everything_published(redis) == expected
    assert standby.consumer.stats.acked > 0 and standby.checkpoint.loaded == 1


def hang_after(svc: Aggregator, entries: int, stuck: asyncio.Event):
    """svc.handle, except that the batch after `entries` entries hangs (a process that froze, then is killed)."""
    handle = svc.handle

    async def gated(batch: list[Delivery]) -> object:
        if svc.consumer.stats.acked >= entries:
            stuck.set()
            await asyncio.Event().wait()
        return await handle(batch)
    return gated


async def all_done(redis: aioredis.Redis, names: list[str], group: str) -> bool:
    for stream in names:
        info = next((g for g in await redis.xinfo_groups(stream) if g["name"] == group.encode()), None)
        if info is None or info["lag"] or info["pending"]:
            return False
    return True


# --- exchanges with unordered trade ids, exchanges without candles (issue 10, defect 5) --------------------

def hyperliquid_trades() -> list[Trade]:
    path = SHIPPED_DATA / "ws-captures" / "hyperliquid_btcusd_20250126.gz"
    return [Trade(exchange="hyperliquid", symbol="BTC/USDC:USDC", trade_id=str(t["tid"]), price=Decimal(t["px"]),
                  amount=Decimal(t["sz"]), side="buy" if t["side"] == "B" else "sell", ts_event=t["time"] * MS,
                  ts_recv=e.recv_ns)
            for e in load_capture(path) if e.channel == "trades" for t in e.data]


async def test_hyperliquid_minutes_keep_every_trade_though_its_ids_are_not_ordered(redis, settings) -> None:
    # Arrange: the real Hyperliquid capture (64 trades over two minutes, tids in no order), and a trade of the
    # next minute that closes the second one
    trades = hyperliquid_trades()
    ids = [int(t.trade_id) for t in trades]
    assert ids != sorted(ids) and len(set(ids)) == len(ids)
    second = max(t.ts_event for t in trades) // MINUTE * MINUTE
    closer = replace(trades[-1], trade_id="1", ts_event=second + MINUTE, ts_recv=trades[-1].ts_recv + MINUTE)
    in_minute = [t for t in trades if t.ts_event >= second]
    # Act: with one trade redelivered
    await aggregate_in_pieces(redis, settings, [[*trades, in_minute[3], closer]])
    # Assert: the built minute holds every trade of the minute once
    built = await read(redis, streams.candle_built("hyperliquid", "BTC/USDC:USDC"))
    prices = [t.price for t in in_minute]
    assert built == [Candle(exchange="hyperliquid", symbol="BTC/USDC:USDC", timeframe="1m", open_time=second,
                            open=prices[0], high=max(prices), low=min(prices), close=prices[-1],  # type: ignore[type-var]
                            volume=sum((t.amount for t in in_minute), Decimal(0)), closed=True,  # type: ignore[misc]
                            ts_event=second + MINUTE - MS, ts_recv=in_minute[-1].ts_recv, source="aggregate")]
    assert len(in_minute) > 20


def coinbase_trades(loops: int) -> list[Trade]:
    """The real Coinbase SKL-USD matches, replayed `loops` times a minute apart with ids moving on, as the
    simulator loops them."""
    recording = CoinbaseRecording.load(SHIPPED_DATA)
    base = [t for t in recording.trades("SKL-USD") if not t.last_match]
    span = max(t.trade_id for t in base) - min(t.trade_id for t in base) + 1
    return [Trade(exchange="coinbase", symbol="SKL/USD", trade_id=str(t.trade_id + k * span),
                  price=Decimal(t.price), amount=Decimal(t.size), side="sell" if t.maker_side == "buy" else "buy",
                  ts_event=(t.time_us + k * 60 * 1_000_000) * 1_000, ts_recv=(t.recv_us + k * 60 * 1_000_000) * 1_000)
            for k in range(loops) for t in base]


async def test_coinbase_built_minutes_are_its_1m_candles_and_roll_up(redis, settings) -> None:
    # Arrange: Coinbase configured as in config/simulator.toml (no candle channel), 12 minutes of its trades
    coinbase = ExchangeSettings(id="coinbase", symbols=["SKL/USD"], channels=["trades", "ticker", "book"])
    with_coinbase = replace(settings, exchanges=[coinbase])
    trades = coinbase_trades(12)
    # Act
    await aggregate_in_pieces(redis, with_coinbase, [trades])
    # Assert: each closed minute (not the first, partial one) is on md:candle as the 1m candle, equal to the
    # minute computed here from the trades, and the 5m bars are rolled up from them
    frame = pd.DataFrame({"t": [t.ts_event for t in trades], "price": [float(t.price) for t in trades],  # type: ignore[arg-type]
                          "amount": [float(t.amount) for t in trades]})  # type: ignore[arg-type]
    frame.index = pd.to_datetime(frame.t, unit="ns", utc=True)
    per_minute = frame.resample("1min").agg({"price": ["first", "max", "min", "last"], "amount": "sum", "t": "count"})
    per_minute = per_minute[per_minute[("t", "count")] > 0]
    published = [c for c in await read(redis, streams.market_data("candle", "coinbase", "SKL/USD"))
                 if isinstance(c, Candle)]
    ones = [c for c in published if c.timeframe == "1m"]
    assert [c.open_time for c in ones] == [int(t.value) for t in per_minute.index[1:-1]]
    for c in ones:
        row = per_minute.loc[pd.Timestamp(c.open_time, unit="ns", tz="UTC")]
        assert [float(v) for v in (c.open, c.high, c.low, c.close)] == list(row["price"])  # type: ignore[arg-type]
        assert float(c.volume) == pytest.approx(row[("amount", "sum")], rel=1e-12)  # type: ignore[arg-type]
        assert c.source == "aggregate" and c.closed
    fives = [c for c in published if c.timeframe == "5m"]
    assert fives, "rolled up"
    minute_frame = pd.DataFrame({"timestamp": [c.open_time for c in ones], "open": [float(c.open) for c in ones],  # type: ignore[arg-type]
                                 "high": [float(c.high) for c in ones], "low": [float(c.low) for c in ones],  # type: ignore[arg-type]
                                 "close": [float(c.close) for c in ones], "volume": [float(c.volume) for c in ones]})  # type: ignore[arg-type]
    minute_frame.index = pd.to_datetime(minute_frame.timestamp, unit="ns", utc=True)
    assert_bars_equal(fives, resample(minute_frame, "5min"), 5)


async def test_a_late_trade_filling_a_hole_of_the_minute_counts_once(redis, settings) -> None:
    # Binance numbers trades one by one: 3 arrives after 4 (a reordered message, or a repair of the hole the
    # validator announced); 2 and 4 come twice (redeliveries). The minute holds 1..4, each once.
    _, trades, _ = capture()
    first = trades[0]
    minute = first.ts_event - first.ts_event % MINUTE + MINUTE  # type: ignore[union-attr]
    at = [replace(first, trade_id=str(i), price=Decimal(100 + i), amount=Decimal(i), ts_event=minute + i * MS)
          for i in range(6)]
    closer = replace(first, trade_id="9", ts_event=minute + MINUTE)
    svc = await aggregate(redis, settings, trades=[first, at[0], *[at[i] for i in (1, 2, 4, 3, 2, 4, 5)], closer])
    built = await read(redis, streams.candle_built("binance", "BTC/USDT"))
    assert [(c.open, c.high, c.low, c.close, c.volume) for c in built] == \
        [(Decimal(100), Decimal(105), Decimal(100), Decimal(105), Decimal(15))]  # type: ignore[union-attr]
    assert svc.count["trades_redelivered"] == 2


@pytest.fixture
def influx_settings(influx_server) -> InfluxSettings:
    return InfluxSettings(url=influx_server.url, database=f"mdp_test_aggregator_{os.getpid()}", retention=KEEP_ALL)


async def test_coinbase_1m_candles_reach_influxdb_through_the_writer(redis, settings, influx_settings) -> None:
    # Arrange: the aggregator's outputs for 6 minutes of Coinbase trades (no candle channel)
    coinbase = ExchangeSettings(id="coinbase", symbols=["SKL/USD"], channels=["trades", "ticker", "book"])
    with_coinbase = replace(settings, exchanges=[coinbase], influx=influx_settings)
    await aggregate_in_pieces(redis, with_coinbase, [coinbase_trades(6)])
    stream = streams.market_data("candle", "coinbase", "SKL/USD")
    ones = [c for c in await read(redis, stream) if isinstance(c, Candle) and c.timeframe == "1m"]
    assert ones
    # Act: the InfluxDB writer drains md:candle:*
    writer = InfluxWriter(with_coinbase)
    async with Running(writer):
        await wait_for(lambda: writer.counters()["candles"] >= len(ones), what="the 1m candles written")
    # Assert: Coinbase's 1m tier holds them, exactly
    async with InfluxClient(influx_settings) as c:
        stored = await c.query_timeframe("1m", "SELECT * FROM ohlcv WHERE exchange = $ex AND timeframe = '1m' "
                                               "ORDER BY time", {"ex": "coinbase"}, exact=True)
        await c.execute(f"DROP DATABASE {quote_ident(influx_settings.database)}")
    assert [(r["time"], r["open"], r["high"], r["low"], r["close"], r["volume"]) for r in stored] == \
        [(k.open_time, k.open, k.high, k.low, k.close, k.volume) for k in ones]
