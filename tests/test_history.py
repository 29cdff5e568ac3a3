"""History for strategies on a real private influxd (1.6.7) and a real Redis: `history` returns exactly the
stored closed candles of a bounded range, refuses unbounded or malformed ranges, treats hostile symbols as
data; `candles` joins stored and live candles with no gap and no duplicate at the seam, also while the real
influx writer stores what is being published, and when the stream was trimmed past the seam."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from itertools import count
from pathlib import Path

import msgspec
import numpy as np
import pandas as pd
import pytest
import redis.asyncio as aioredis

from common.bus import streams
from common.bus.core import Producer
from common.config import BusSettings, InfluxSettings, RedisSettings, Settings
from common.history.api import (
    CandleFeed,
    FeedGapError,
    HistoryRangeError,
    candles,
    history,
    history_sync,
    stored_values,
    to_ns,
)
from common.stores.influx import InfluxClient, InfluxQueryError, encode_candles, quote_ident
from schemas import Candle, Codec
from services.influx_writer import InfluxWriter
from tests import stubs
from tools.localstores import LocalServer

ROOT = Path(__file__).resolve().parent.parent
MINUTE = 60_000_000_000
T0 = stubs.candle(0).open_time
STREAM = streams.market_data("candle", "binance", "BTC/USDT")
KEEP_ALL = {"ticks": "inf", "candles_1m": "inf", "candles_1h": "inf", "candles_1d": "inf"}
ONE_PER_ENTRY = BusSettings(batch_max_events=1, stream_maxlen=100_000, backpressure_max_wait_s=0.5)
FAST = BusSettings(stream_maxlen=10_000, backpressure_high_water=5_000, backpressure_max_wait_s=0.5,
                   batch_max_events=10, read_count=50, block_ms=50, claim_idle_ms=300, max_deliveries=2)
replace = msgspec.structs.replace
_db_numbers = count()


def bar(i: int, closed: bool = True, symbol: str = "BTC/USDT", timeframe: str = "1m") -> Candle:
    """Candle i of a 1m series with prices that differ per candle (so a wrong row cannot pass)."""
    price = Decimal(61_000) + Decimal(i) / 100
    c = stubs.candle(i, o=str(price), h=str(price + 5), lo=str(price - 5), c=str(price + 1),
                     v=f"{i}.5", closed=closed, symbol=symbol)
    return replace(c, timeframe=timeframe) if timeframe != "1m" else c


@pytest.fixture
def influx_settings(influx_server: LocalServer) -> InfluxSettings:
    return InfluxSettings(url=influx_server.url, database=f"mdp_history_{os.getpid()}_{next(_db_numbers)}",
                          timeout_s=10.0, retention=KEEP_ALL)


@pytest.fixture
async def client(influx_settings: InfluxSettings) -> AsyncIterator[InfluxClient]:
    async with InfluxClient(influx_settings) as c:
        await c.ensure_tiers()
        yield c
        await c.execute(f"DROP DATABASE {quote_ident(influx_settings.database)}")


async def store(client: InfluxClient, candles_: Sequence[Candle]) -> None:
    """Write candles into their timeframe's tier with the client's write path (what the writer does)."""
    by_tf: dict[str, list[Candle]] = {}
    for c in candles_:
        by_tf.setdefault(c.timeframe, []).append(c)
    for tf, group in by_tf.items():
        await client.write_tier(client.plan.for_timeframe(tf), encode_candles(group))


async def publish(redis: aioredis.Redis, candles_: Sequence[Candle], bus: BusSettings = ONE_PER_ENTRY) -> None:
    await Producer(redis, Codec(), bus, "test").publish({STREAM: list(candles_)})


async def take(feed: AsyncIterator[Candle], n: int, timeout: float = 15.0) -> list[int]:
    """The indexes (minutes after T0) of the next n candles the feed yields."""
    got: list[int] = []
    async with asyncio.timeout(timeout):
        while len(got) < n:
            candle = await anext(feed)
            got.append((candle.open_time - T0) // MINUTE)
    return got


async def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    try:
        async with asyncio.timeout(timeout):
            while not predicate():
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout} s waiting for {what}") from None


# -- history ----------------------------------------------------------------------------------------

async def test_history_returns_exactly_the_stored_closed_candles_of_the_range(client: InfluxClient) -> None:
    # Arrange: 100 candles of the series, one flagged, plus neighbours that must not leak in
    flagged = replace(bar(15), quality=("volume.zero",))
    await store(client, [bar(i) for i in range(100) if i != 15] + [flagged])
    await store(client, [bar(i, symbol="ETH/USDT") for i in range(100)])
    await store(client, [replace(bar(i), timeframe="5m", open=Decimal(1)) for i in range(0, 100, 5)])
    await store(client, [replace(bar(12), close=Decimal("99999.5"))])  # a redelivery overwrites: last wins
    # Act
    frame = await history("binance", "BTC/USDT", "1m", T0 + 10 * MINUTE, T0 + 20 * MINUTE, client=client)
    # Assert
    assert list(frame.columns) == ["open", "high", "low", "close", "volume", "quality"]
    assert str(frame.index.dtype) == "datetime64[ns, UTC]" and frame.index.name == "open_time"
    assert all(frame[c].dtype == np.float64 for c in ("open", "high", "low", "close", "volume"))
    assert list(frame.index.asi8) == [T0 + i * MINUTE for i in range(10, 20)]  # end excluded
    expected = [bar(i) for i in range(10, 20)]
    assert list(frame["open"]) == [float(c.open) for c in expected]  # type: ignore[arg-type]
    assert list(frame["volume"]) == [float(c.volume) for c in expected]  # type: ignore[arg-type]
    assert frame.loc[pd.Timestamp(T0 + 12 * MINUTE, tz="UTC"), "close"] == 99999.5
    assert list(frame["quality"]) == ["", "", "", "", "", "volume.zero", "", "", "", ""]


async def test_history_last_keeps_the_newest_candles_and_text_times_work(client: InfluxClient) -> None:
    await store(client, [bar(i) for i in range(100)])
    start = datetime.fromtimestamp(T0 / 1e9, tz=UTC).isoformat()
    frame = await history("binance", "BTC/USDT", "1m", start, T0 + 1_000 * MINUTE, client=client, last=5)
    assert list(frame.index.asi8) == [T0 + i * MINUTE for i in range(95, 100)]
    empty = await history("binance", "BTC/USDT", "1m", T0 - 50 * MINUTE, T0, client=client)
    assert len(empty) == 0 and list(empty.columns) == ["open", "high", "low", "close", "volume", "quality"]


async def test_stored_values_pages_a_range_without_loss_or_repeat(client: InfluxClient) -> None:
    await store(client, [bar(i) for i in range(50)])
    pages = [page async for page in stored_values(client, "binance", "BTC/USDT", "1m", T0, T0 + 50 * MINUTE,
                                                  page_rows=7)]
    assert [len(p) for p in pages] == [7] * 7 + [1]
    assert [r[0] for p in pages for r in p] == [T0 + i * MINUTE for i in range(50)]


async def test_history_of_a_large_range_reads_windows_in_order(client: InfluxClient) -> None:
    # 5,000 candles: more than SPLIT_ROWS, so read as two windows at once; one point every minute, a hole
    await store(client, [bar(i) for i in range(5_000) if not 2_400 <= i < 2_600])
    frame = await history("binance", "BTC/USDT", "1m", T0 - 7 * MINUTE, T0 + 5_007 * MINUTE, client=client)
    expected = [T0 + i * MINUTE for i in range(5_000) if not 2_400 <= i < 2_600]
    assert list(frame.index.asi8) == expected
    assert list(frame["open"][:3]) == [61_000.0, 61_000.01, 61_000.02]


async def test_history_refuses_unbounded_inverted_and_malformed_ranges(client: InfluxClient) -> None:
    async def ask(start: object, end: object, **kw: object) -> None:
        await history("binance", "BTC/USDT", kw.pop("timeframe", "1m"), start, end, client=client,  # type: ignore
                      **kw)  # type: ignore[arg-type]

    with pytest.raises(HistoryRangeError, match="not after start"):
        await ask(T0, T0)
    with pytest.raises(HistoryRangeError, match="not after start"):
        await ask(T0 + MINUTE, T0)
    with pytest.raises(HistoryRangeError, match=r"spans 1001 candles, more than max_rows = 1000"):
        await ask(T0, T0 + 1001 * MINUTE, max_rows=1000)
    with pytest.raises(HistoryRangeError, match="seconds or milliseconds"):
        await ask(T0 // 1_000_000_000, T0)
    with pytest.raises(HistoryRangeError, match="has no timezone"):
        await ask(datetime(2024, 8, 8), T0)
    with pytest.raises(HistoryRangeError, match="not ISO 8601"):
        await ask("yesterday", T0)
    with pytest.raises(HistoryRangeError, match="start = None"):
        await ask(None, T0)
    with pytest.raises(HistoryRangeError, match="last = 0"):
        await ask(T0, T0 + MINUTE, last=0)
    with pytest.raises(ValueError, match="not a ccxt timeframe"):
        await ask(T0, T0 + MINUTE, timeframe="1 minute")
    assert to_ns("2024-08-08T23:54:00Z") == to_ns("2024-08-08T23:54:00") == T0
    assert to_ns(pd.Timestamp(T0, tz="UTC")) == to_ns(datetime(2024, 8, 8, 23, 54, tzinfo=UTC)) == T0


@pytest.mark.parametrize("symbol", [
    "BTC/USDT' OR 1=1 --",
    "BTC/USDT' OR symbol =~ /.*/ --",
    'BTC/USDT" OR "1"="1',
    "BTC/USDT\nSELECT * FROM ohlcv",
    "BTC/USDT'; DROP DATABASE x; --",
    "\\'",
    "$symbol",
])
async def test_hostile_symbols_are_data_and_match_nothing(client: InfluxClient, symbol: str) -> None:
    await store(client, [bar(i) for i in range(10)])
    frame = await history("binance", symbol, "1m", T0, T0 + 10 * MINUTE, client=client)
    also = await history(symbol, "BTC/USDT", "1m", T0, T0 + 10 * MINUTE, client=client)
    assert len(frame) == 0 and len(also) == 0
    assert len(await history("binance", "BTC/USDT", "1m", T0, T0 + 10 * MINUTE, client=client)) == 10


async def test_history_sync_runs_outside_an_event_loop_only(influx_settings: InfluxSettings,
                                                             client: InfluxClient) -> None:
    await store(client, [bar(i) for i in range(10)])
    settings = Settings(influx=influx_settings)
    frame = await asyncio.to_thread(history_sync, "binance", "BTC/USDT", "1m", T0, T0 + 10 * MINUTE,
                                    settings=settings)
    assert list(frame.index.asi8) == [T0 + i * MINUTE for i in range(10)]
    with pytest.raises(RuntimeError, match="await history"):
        history_sync("binance", "BTC/USDT", "1m", T0, T0 + MINUTE, settings=settings)


# -- the feed: stored, then live --------------------------------------------------------------------

def feed(client: InfluxClient, redis: aioredis.Redis, start: int = T0) -> CandleFeed:
    return candles("binance", "BTC/USDT", "1m", start, redis=redis, client=client, block_ms=100)


@pytest.mark.parametrize(("stored", "published"), [
    (range(100), range(90, 121)),   # the stream overlaps the store
    (range(80), range(70, 121)),    # the writer is behind: the stream fills 80..99 too
    (range(100), range(100, 121)),  # the stream starts right after the store
    (range(0), range(121)),      # nothing stored yet
    (range(121), range(0)),         # nothing published yet
])
async def test_feed_joins_store_and_stream_once_in_order(client: InfluxClient, redis: aioredis.Redis,
                                                         stored: range, published: range) -> None:
    # Arrange: the stream also carries open updates and another timeframe, which the feed must skip
    await store(client, [bar(i) for i in stored])
    noise = [bar(i, closed=False) for i in published] + [bar(i, timeframe="5m") for i in published]
    await publish(redis, [bar(i) for i in published] + noise)
    async with feed(client, redis) as f:
        it = aiter(f)
        # Act
        first = await take(it, 121)
        await publish(redis, [bar(i) for i in range(115, 126)])  # live, overlapping what was yielded
        more = await take(it, 5)
    # Assert
    assert first == list(range(121))
    assert more == list(range(121, 126))
    assert f.live and f.from_store == len(stored) and f.from_stream == 126 - len(stored)


async def test_feed_starts_at_start_and_yields_exact_values(client: InfluxClient, redis: aioredis.Redis) -> None:
    await store(client, [replace(bar(i), quality=("volume.zero",)) if i == 42 else bar(i) for i in range(50)])
    await publish(redis, [bar(i) for i in range(45, 60)])
    async with feed(client, redis, start=T0 + 40 * MINUTE) as f:
        it = aiter(f)
        got = [await anext(it) for _ in range(20)]
    assert [(c.open_time - T0) // MINUTE for c in got] == list(range(40, 60))
    assert [(c.open, c.high, c.low, c.close, c.volume) for c in got] == \
        [(b.open, b.high, b.low, b.close, b.volume) for b in (bar(i) for i in range(40, 60))]
    assert got[2].quality == ("volume.zero",) and all(c.closed for c in got)


async def test_feed_seam_while_the_real_writer_stores_what_is_published(
        client: InfluxClient, redis: aioredis.Redis, redis_server: LocalServer,
        influx_settings: InfluxSettings) -> None:
    # Arrange: the real influx writer stores the stream while candles keep coming
    writer = InfluxWriter(Settings(redis=RedisSettings(url=redis_server.url), influx=influx_settings, bus=FAST))
    stop = asyncio.Event()
    task = asyncio.create_task(writer.run(stop))
    producer = Producer(redis, Codec(), FAST, "test")
    total = 400

    async def publish_all() -> None:
        for i in range(0, total, 5):  # 5 candles (plus their open updates) per entry, as a live feed would
            await producer.publish({STREAM: [bar(i + k, closed=False) for k in range(5)] +
                                    [bar(i + k) for k in range(5)]})
            await asyncio.sleep(0.005)  # pacing only: let the writer and the feed interleave with it

    try:
        await producer.publish({STREAM: [bar(i) for i in range(100)]})
        await wait_for(lambda: writer.count["candles"] >= 50, "the writer to store some candles")
        publishing = asyncio.create_task(publish_all())
        # Act: the feed starts while the writer is storing and the producer publishing
        async with feed(client, redis) as f:
            got = await take(aiter(f), total, timeout=30)
        await publishing
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await writer.close()
    # Assert
    assert got == list(range(total))
    assert f.from_store > 0 and f.from_stream > 0


async def test_feed_trimmed_stream_contiguous_with_the_store_loses_nothing(client: InfluxClient,
                                                                          redis: aioredis.Redis) -> None:
    await store(client, [bar(i) for i in range(100)])
    await publish(redis, [bar(i) for i in range(121)])
    await redis.xtrim(STREAM, maxlen=21, approximate=False)  # only 100..120 left
    async with feed(client, redis) as f:
        it = aiter(f)
        got = await take(it, 121)
        await publish(redis, [bar(121)])
        assert await take(it, 1) == [121]
    assert got == list(range(121))


async def test_feed_trimmed_past_the_seam_raises_instead_of_skipping(client: InfluxClient,
                                                                    redis: aioredis.Redis) -> None:
    await store(client, [bar(i) for i in range(50)])
    await publish(redis, [bar(i) for i in range(121)])
    await redis.xtrim(STREAM, maxlen=21, approximate=False)  # 50..99 are in neither place
    async with feed(client, redis) as f:
        it = aiter(f)
        assert await take(it, 50) == list(range(50))
        with pytest.raises(FeedGapError, match=r"md:candle:binance:BTC/USDT was trimmed past the seam"):
            await anext(it)


async def test_feed_trimmed_while_live_reads_the_store_again(client: InfluxClient, redis: aioredis.Redis) -> None:
    # Arrange: a feed that has caught up, then falls behind while the stream is trimmed past its position
    await store(client, [bar(i) for i in range(100)])
    await publish(redis, [bar(i) for i in range(90, 121)])
    async with feed(client, redis) as f:
        it = aiter(f)
        assert await take(it, 121) == list(range(121))
        await publish(redis, [bar(i) for i in range(121, 201)])
        await store(client, [bar(i) for i in range(121, 201)])  # the writer kept up; the feed did not
        await redis.xtrim(STREAM, maxlen=10, approximate=False)  # 191..200 left
        # Act
        got = await take(it, 80)
        await publish(redis, [bar(201)])
        after = await take(it, 1)
    # Assert
    assert got == list(range(121, 201)) and after == [201]
    assert f.resyncs == 1


async def test_query_values_reports_refused_and_failed_queries(client: InfluxClient) -> None:
    await store(client, [bar(i) for i in range(3)])
    database, rp = client.tier_for("1m")
    columns, rows = await client.query_values("SELECT close FROM ohlcv", database=database, rp=rp)
    assert columns == ["time", "close"] and [r[0] for r in rows] == [T0, T0 + MINUTE, T0 + 2 * MINUTE]
    with pytest.raises(InfluxQueryError, match="HTTP 400"):
        await client.query_values("SELEC close FROM ohlcv", database=database, rp=rp)
    with pytest.raises(InfluxQueryError, match="aggregate"):
        await client.query_values("SELECT close FROM ohlcv WHERE time > 0 GROUP BY time(1m)", database=database,
                                  rp=rp)


async def test_history_then_live_example_runs_as_written(client: InfluxClient, redis: aioredis.Redis,
                                                         redis_server: LocalServer,
                                                         influx_settings: InfluxSettings) -> None:
    # Arrange: the last 30 minutes stored, the newest 10 of them and 5 more on the stream, as in `make demo`
    now_minute = time.time_ns() // MINUTE * MINUTE
    recent = [replace(bar(i), open_time=now_minute - (30 - i) * MINUTE) for i in range(35)]
    await store(client, recent[:30])
    await publish(redis, recent[20:])
    env = dict(os.environ, PYTHONPATH=str(ROOT), MDP_REDIS_URL=redis_server.url,
               MDP_INFLUX_URL=influx_settings.url, MDP_INFLUX_DATABASE=influx_settings.database, LIVE_CANDLES="5")
    # Act
    proc = await asyncio.create_subprocess_exec(sys.executable, str(ROOT / "examples" / "history_then_live.py"),
                                                cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    # Assert
    assert proc.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    assert lines[0] == "last hour in InfluxDB: 30 candles"
    fed = [line.split() for line in lines if line.startswith(("stored ", "stream "))]
    assert [int(f[1]) for f in fed] == [c.open_time for c in recent]
    assert [f[0] for f in fed] == ["stored"] * 30 + ["stream"] * 5
    first = recent[0]
    assert [Decimal(x) for x in fed[0][2:]] == [first.open, first.high, first.low, first.close, first.volume]


async def test_feed_on_a_trimmed_stream_with_nothing_stored_starts_only_where_the_stream_does(
        client: InfluxClient, redis: aioredis.Redis) -> None:
    await publish(redis, [bar(i) for i in range(121)])
    await redis.xtrim(STREAM, maxlen=21, approximate=False)  # 100..120 left, nothing in InfluxDB
    async with feed(client, redis, start=T0 + 100 * MINUTE - 30_000_000_000) as f:  # between two candles
        assert await take(aiter(f), 21) == list(range(100, 121))
    async with feed(client, redis, start=T0 + 90 * MINUTE) as f:  # 90..99 are lost
        with pytest.raises(FeedGapError, match=f"after open_time {T0 + 90 * MINUTE - 1}"):
            await anext(aiter(f))
