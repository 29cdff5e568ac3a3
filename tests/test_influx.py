"""The InfluxDB client and the influx writer on a real private influxd (1.6.7) and a real Redis: exact round
trips, line-protocol escaping, trade timestamps that never collide, idempotent redelivery, InfluxDB down,
refused writes, basic auth, the storage tiers as retention policies (`mdp init`, routing by timeframe,
retention), and the writer service end to end through the bus. 2.x and 3.x: tests/test_influx_generations.py."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
import zlib
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from itertools import count
from pathlib import Path

import asyncpg
import msgspec
import pytest

from common import cli
from common.bus import streams
from common.bus.core import Delivery, Producer
from common.config import BusSettings, InfluxSettings, RedisSettings, Settings
from common.errors import StoreUnavailable
from common.stores.influx import (
    InfluxClient,
    InfluxQueryError,
    InfluxWriteError,
    encode_candles,
    encode_trades,
    escape_tag,
    parse_retention,
    quote_ident,
    trade_timestamp,
)
from schemas import Candle, Codec, Trade
from services.influx_writer import InfluxWriter
from services.influx_writer.service import GROUP
from tests import stubs
from tools.localstores import INFLUXD_CONFIG, LocalServer, free_port, start_influxd, wait_influx

FAST = BusSettings(stream_maxlen=1000, backpressure_high_water=500, backpressure_max_wait_s=0.5,
                   batch_max_events=10, read_count=50, block_ms=50, claim_idle_ms=300, max_deliveries=2)
TRADE_STREAM = streams.market_data("trade", "binance", "BTC/USDT")
CANDLE_STREAM = streams.market_data("candle", "binance", "BTC/USDT")
MS = 1_000_000
replace = msgspec.structs.replace
_db_numbers = count()
# The stubs are real 2024 data: tests that do not test retention keep every tier forever, else InfluxDB would
# (rightly) refuse points older than 7 days in the ticks tier.
KEEP_ALL = {"ticks": "inf", "candles_1m": "inf", "candles_1h": "inf", "candles_1d": "inf"}


@pytest.fixture
def influx_settings(influx_server: LocalServer) -> InfluxSettings:
    """A database of its own for each test (created by the test or the writer, dropped after)."""
    return InfluxSettings(url=influx_server.url, database=f"mdp_test_{os.getpid()}_{next(_db_numbers)}",
                          batch_points=1000, timeout_s=10.0, retention=KEEP_ALL)


@pytest.fixture
async def client(influx_settings: InfluxSettings) -> AsyncIterator[InfluxClient]:
    async with InfluxClient(influx_settings) as c:
        await c.create_database()
        yield c
        await c.execute(f"DROP DATABASE {quote_ident(influx_settings.database)}")


async def points(client: InfluxClient, measurement: str, field: str, rp: str = "") -> int:
    rows = await client.query(f"SELECT count({field}) FROM {measurement}", rp=rp)
    return int(rows[0]["count"]) if rows else 0


async def wait_for(predicate: Callable[[], bool], timeout: float = 15.0, what: str = "condition") -> None:
    try:
        async with asyncio.timeout(timeout):
            while not predicate():
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout} s waiting for {what}") from None


def same_ms_trades(n: int, first_id: int = 5_000_000_000, ts: int = stubs.T0_NS + 123_456) -> list[Trade]:
    return [replace(stubs.trade(0), trade_id=str(first_id + i), price=Decimal(61837 + i) / 100, ts_event=ts,
                    ts_recv=ts + 1) for i in range(n)]


# -- client: round trips ------------------------------------------------------------------------------

async def test_ping_reports_version_and_create_database_is_idempotent(client: InfluxClient) -> None:
    assert (await client.ping()).startswith("1.6")
    await client.create_database()
    await client.create_database()
    names = [r["name"] for r in await client.query("SHOW DATABASES")]
    assert names.count(client.database) == 1


async def test_candles_round_trip_with_exact_values(client: InfluxClient) -> None:
    candles = [stubs.candle(0),
               stubs.candle(1, o="0.00000015", h="0.00000019", lo="0.0000001", c="0.00000018",
                            v="123456789.12"),
               stubs.candle(2, o="1E+2", h="100.5", lo="99.99", c="100", v="0"),
               stubs.candle(3, symbol="ETH/USDT", o="2650.01", h="2651", lo="2649.5", c="2650.75",
                            v="3.1415")]
    assert str(candles[1].open) == "1.5E-7"  # the exponent form Decimal's text takes; InfluxDB must read it
    lines = encode_candles(candles)
    assert lines[0] == ("ohlcv,exchange=binance,symbol=BTC/USDT,timeframe=1m open=61837.63,high=61900.00,"
                        "low=61800.00,close=61850.10,volume=12.5 1723161240000000000")
    assert await client.write_lines(lines) == 4

    rows = await client.query("SELECT * FROM ohlcv WHERE symbol = $symbol ORDER BY time",
                              params={"symbol": "BTC/USDT"}, exact=True)
    assert len(rows) == 3
    for row, c in zip(rows, candles[:3], strict=True):
        assert row["time"] == c.open_time
        assert (row["exchange"], row["symbol"], row["timeframe"]) == ("binance", "BTC/USDT", "1m")
        got = (row["open"], row["high"], row["low"], row["close"], row["volume"])
        assert got == (c.open, c.high, c.low, c.close, c.volume)  # Decimals compare by value
        assert not any(isinstance(v, float) for v in got)  # Decimal, or int for whole numbers
    eth = await client.query("SELECT close FROM ohlcv WHERE symbol = $symbol", params={"symbol": "ETH/USDT"},
                             exact=True)
    assert eth == [{"time": candles[3].open_time, "close": Decimal("2650.75")}]


async def test_trades_round_trip_with_exact_values_and_id_timestamps(client: InfluxClient) -> None:
    trades = [stubs.trade(0),
              stubs.trade(1, price="0.00001234", amount="150000"),
              replace(stubs.trade(2), side="buy", trade_id="17"),
              replace(stubs.trade(3), side=None),
              replace(stubs.trade(4), trade_id='tx-"quoted"\\back')]
    await client.write_lines(encode_trades(trades))

    rows = await client.query("SELECT * FROM trades ORDER BY time", exact=True)
    assert len(rows) == len(trades)
    by_id = {r["trade_id"]: r for r in rows}
    for t in trades:
        row = by_id[t.trade_id]
        assert row["time"] == trade_timestamp(t.ts_event, t.trade_id)
        assert (row["price"], row["amount"], row["side"]) == (t.price, t.amount, t.side)
        assert (row["exchange"], row["symbol"]) == ("binance", "BTC/USDT")
    # numeric ids: the id modulo 1e6 inside the trade's millisecond
    t0 = trades[0]
    assert by_id[t0.trade_id]["time"] == t0.ts_event - t0.ts_event % MS + int(t0.trade_id) % 1_000_000
    assert by_id["17"]["time"] == trades[2].ts_event - trades[2].ts_event % MS + 17
    # other ids: crc32 modulo 1e6
    t4 = trades[4]
    crc_offset = zlib.crc32(t4.trade_id.encode()) % 1_000_000
    assert by_id[t4.trade_id]["time"] == t4.ts_event - t4.ts_event % MS + crc_offset


async def test_tag_values_with_spaces_commas_equals_and_backslashes_round_trip(client: InfluxClient) -> None:
    symbols = ["BTC/USDT", "A B", "C,D", "E=F", "G\\H", "I\\,J", "K\\ L", "M=N,O P"]
    trades = [replace(stubs.trade(i), symbol=s, exchange="my exchange") for i, s in enumerate(symbols)]
    await client.write_lines(encode_trades(trades))

    shown = await client.query('SHOW TAG VALUES FROM trades WITH KEY = "symbol"')
    assert sorted(r["value"] for r in shown) == sorted(symbols)
    for t in trades:
        rows = await client.query("SELECT price, trade_id FROM trades WHERE symbol = $s AND exchange = $e",
                                  params={"s": t.symbol, "e": "my exchange"})
        assert [r["trade_id"] for r in rows] == [t.trade_id], t.symbol
    assert escape_tag("A B,C=D") == "A\\ B\\,C\\=D"
    with pytest.raises(ValueError, match="backslash"):
        escape_tag("ends\\")
    with pytest.raises(ValueError, match="newline"):
        encode_trades([replace(stubs.trade(0), symbol="X\nY")])


async def test_bound_parameters_are_data_not_query_text(client: InfluxClient) -> None:
    await client.write_lines(encode_trades([stubs.trade(0), replace(stubs.trade(1), symbol="ETH/USDT")]))
    hostile = "BTC/USDT' OR symbol = 'ETH/USDT"
    assert await client.query("SELECT * FROM trades WHERE symbol = $s", params={"s": hostile}) == []
    assert len(await client.query("SELECT * FROM trades WHERE symbol = $s", params={"s": "BTC/USDT"})) == 1


# -- trade timestamps ---------------------------------------------------------------------------------

async def test_trades_in_the_same_millisecond_do_not_collide(client: InfluxClient) -> None:
    trades = same_ms_trades(1000)
    await client.write_lines(encode_trades(trades))
    assert await points(client, "trades", "price") == 1000
    rows = await client.query("SELECT price, trade_id FROM trades", exact=True)
    ms_start = trades[0].ts_event - trades[0].ts_event % MS
    assert all(ms_start <= r["time"] < ms_start + MS for r in rows)  # each point stays in its millisecond
    assert {(r["trade_id"], r["price"]) for r in rows} == {(t.trade_id, t.price) for t in trades}

    # The same trades stamped with ts_event alone overwrite each other (docs/facts.md): the rule saves them.
    naive = [f"naive,exchange=binance,symbol=BTC/USDT price={t.price},trade_id=\"{t.trade_id}\" {t.ts_event}"
             for t in trades]
    await client.write_lines(naive)
    assert await points(client, "naive", "price") == 1


async def test_non_numeric_trade_ids_in_one_millisecond_do_not_collide(client: InfluxClient) -> None:
    trades = [replace(t, trade_id=f"a1b2c3d4-{i:04d}-uuid") for i, t in enumerate(same_ms_trades(200))]
    stamps = {trade_timestamp(t.ts_event, t.trade_id) for t in trades}
    assert len(stamps) == 200  # these ids' crc32 offsets are distinct
    await client.write_lines(encode_trades(trades))
    assert await points(client, "trades", "price") == 200


async def test_redelivery_writes_nothing_twice(client: InfluxClient) -> None:
    trades = same_ms_trades(500) + [stubs.trade(i) for i in range(500)]
    candles = [stubs.candle(i) for i in range(20)]
    batch = encode_trades(trades) + encode_candles(candles)
    await client.write_lines(batch)
    await client.write_lines(batch)  # a redelivered batch
    await client.write_lines(encode_trades(reversed(trades[:100])))  # redelivered in another order and batch
    assert await points(client, "trades", "price") == 1000
    assert await points(client, "ohlcv", "close") == 20


# -- errors ---------------------------------------------------------------------------------------------

async def test_closed_port_raises_store_unavailable_naming_the_url() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    async with InfluxClient(InfluxSettings(url=url, database="x", timeout_s=2)) as c:
        for call in (c.ping(), c.write_lines(encode_trades([stubs.trade(0)])), c.query("SHOW DATABASES"),
                     c.create_database()):
            with pytest.raises(StoreUnavailable, match=url) as info:
                await call
            assert "MDP_INFLUX_URL" in str(info.value)


async def _serve(handler) -> tuple[asyncio.Server, str]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}"


async def test_a_server_that_never_answers_raises_store_unavailable_after_timeout_s() -> None:
    done = asyncio.Event()

    async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        await done.wait()  # never answers
        writer.close()

    server, url = await _serve(stall)
    try:
        async with InfluxClient(InfluxSettings(url=url, database="x", timeout_s=0.3)) as c:
            started = asyncio.get_running_loop().time()
            with pytest.raises(StoreUnavailable, match=f"{url} is unavailable .*no answer within 0.3 s"):
                await c.write_lines(encode_trades([stubs.trade(0)]))
            assert asyncio.get_running_loop().time() - started < 2
    finally:
        done.set()
        server.close()
        await server.wait_closed()


async def test_5xx_raises_store_unavailable_with_the_server_error() -> None:
    async def unavailable(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        body = b'{"error":"engine is shutting down"}'
        writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        writer.close()

    server, url = await _serve(unavailable)
    try:
        async with InfluxClient(InfluxSettings(url=url, database="x")) as c:
            with pytest.raises(StoreUnavailable, match="HTTP 503 engine is shutting down"):
                await c.write_lines(encode_trades([stubs.trade(0)]))
    finally:
        server.close()


async def test_bad_line_raises_write_error_with_the_server_body(client: InfluxClient) -> None:
    with pytest.raises(InfluxWriteError) as info:
        await client.write_lines(["this is not line protocol"])
    assert info.value.status == 400
    assert "unable to parse 'this is not line protocol'" in info.value.body
    assert not info.value.partial
    assert "unable to parse" in str(info.value) and client.database in str(info.value)


async def test_partial_write_keeps_the_good_points_and_reports_the_server_message(
        client: InfluxClient) -> None:
    await client.write_lines(encode_trades([stubs.trade(0)]))
    good = encode_trades([stubs.trade(1)])[0]
    conflict = f'trades,exchange=binance,symbol=BTC/USDT price="not a number" {stubs.T0_NS + 7 * MS}'
    with pytest.raises(InfluxWriteError) as info:
        await client.write_lines([good, conflict])
    assert info.value.partial
    assert "field type conflict" in info.value.body and "dropped=1" in info.value.body
    assert await points(client, "trades", "price") == 2


async def test_missing_database_raises_write_error_and_a_bad_query_a_query_error(
        influx_settings: InfluxSettings) -> None:
    async with InfluxClient(influx_settings) as c:  # its database was never created
        with pytest.raises(InfluxWriteError) as info:
            await c.write_lines(encode_trades([stubs.trade(0)]))
        assert info.value.status == 404 and info.value.database_not_found
        with pytest.raises(InfluxQueryError, match="database not found"):
            await c.query("SELECT * FROM trades")
        with pytest.raises(InfluxQueryError, match="error parsing query") as qinfo:
            await c.query("SELEC * FROM trades")
        assert qinfo.value.status == 400


def _start_auth_influxd(data_dir: Path) -> LocalServer:
    """A private influxd with authentication enabled (tools.localstores' config plus auth-enabled)."""
    port = free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    config = data_dir / "influxdb.conf"
    config.write_text(INFLUXD_CONFIG.format(dir=data_dir, port=port, rpc_port=free_port())
                      .replace("[http]\n", "[http]\n  auth-enabled = true\n"))
    log_path = data_dir / "influxd.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(["influxd", "-config", str(config)], stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_influx(url, 30, log_path)
    except Exception:
        proc.kill()
        raise
    return LocalServer("influxd-auth", url, proc, log_path)


async def test_basic_auth_and_refused_credentials(tmp_path: Path, redis_server: LocalServer) -> None:
    server = await asyncio.to_thread(_start_auth_influxd, tmp_path / "influx-auth")
    try:
        async with InfluxClient(InfluxSettings(url=server.url, database="authdb")) as anonymous:
            # With no user yet, InfluxDB 1.x lets anyone create the first admin.
            await anonymous.execute("CREATE USER \"admin\" WITH PASSWORD 's3cret' WITH ALL PRIVILEGES")
            with pytest.raises(InfluxQueryError) as qinfo:
                await anonymous.query("SHOW DATABASES")
            assert qinfo.value.status == 401
        good = InfluxSettings(url=server.url, database="authdb", username="admin", password="s3cret",
                              retention=KEEP_ALL)
        async with InfluxClient(good) as c:
            await c.create_database()
            await c.write_lines(encode_trades([stubs.trade(0)]))
            assert await points(c, "trades", "price") == 1
        bad = replace(good, password="wrong")
        async with InfluxClient(bad) as c:
            with pytest.raises(InfluxWriteError) as info:
                await c.write_lines(encode_trades([stubs.trade(1)]))
            assert info.value.unauthorized and info.value.status == 401
            assert "authorization failed" in info.value.body
        # The writer takes refused credentials as the store being unusable: retry in place, dead-letter none.
        writer = InfluxWriter(Settings(redis=RedisSettings(url=redis_server.url), influx=bad, bus=FAST))
        try:
            with pytest.raises(StoreUnavailable, match="refused our credentials"):
                await writer.handle([Delivery(TRADE_STREAM, "1-0", [stubs.trade(2)])])
            assert writer.count["write_errors"] == 1 and writer.state == "degraded"
        finally:
            await writer.close()
    finally:
        await asyncio.to_thread(server.stop)


# -- the writer service -------------------------------------------------------------------------------

def writer_settings(redis_server: LocalServer, influx: InfluxSettings) -> Settings:
    return Settings(redis=RedisSettings(url=redis_server.url), influx=influx, bus=FAST)


class Running:
    """The writer's run() as a task, stopped and closed on exit."""

    def __init__(self, writer: InfluxWriter) -> None:
        self.writer = writer
        self.stop = asyncio.Event()

    async def __aenter__(self) -> InfluxWriter:
        self.task = asyncio.create_task(self.writer.run(self.stop))
        return self.writer

    async def __aexit__(self, *exc: object) -> None:
        self.stop.set()
        try:
            await asyncio.wait_for(self.task, 10)
        finally:
            await self.writer.close()


async def entries(redis, *names: str) -> int:
    return sum([await redis.xlen(n) for n in names])


async def test_writer_stores_closed_candles_and_every_trade_then_acks(
        redis, redis_server: LocalServer,
        influx_settings: InfluxSettings) -> None:
    producer = Producer(redis, Codec(), FAST, "test")
    trades = same_ms_trades(300) + [stubs.trade(i) for i in range(300)]
    closed = [stubs.candle(i, c=f"61850.{i}") for i in range(6)]
    candles: list[Candle] = []
    for c in closed:  # each bar updates twice while open, then closes
        candles += [replace(c, closed=False, close=Decimal(1)), replace(c, closed=False, close=Decimal(2)), c]
    candles.append(replace(stubs.candle(6), closed=False))  # the current bar: not stored
    await producer.publish({TRADE_STREAM: trades, CANDLE_STREAM: candles})
    await producer.publish({TRADE_STREAM: trades[:40]})  # duplicates, as a redelivery upstream would make
    total = await entries(redis, TRADE_STREAM, CANDLE_STREAM)

    writer = InfluxWriter(writer_settings(redis_server, influx_settings))
    async with Running(writer):
        await wait_for(lambda: writer.consumer.stats.acked == total, what="every entry acknowledged")

    async with InfluxClient(influx_settings) as c:  # the writer created the database and its tiers itself
        assert await points(c, "trades", "price", rp="ticks") == 600
        assert await points(c, "trades", "price") == 0  # nothing in the database's default retention policy
        stored = await c.query_timeframe("1m", "SELECT * FROM ohlcv ORDER BY time", exact=True)
        assert [(r["time"], r["open"], r["high"], r["low"], r["close"], r["volume"]) for r in stored] == \
            [(k.open_time, k.open, k.high, k.low, k.close, k.volume) for k in closed]
        rows = await c.query_timeframe("ticks", "SELECT price, amount, side, trade_id FROM trades", exact=True)
        assert {(r["trade_id"], r["price"], r["amount"], r["side"]) for r in rows} == \
            {(t.trade_id, t.price, t.amount, t.side) for t in trades}
        await c.execute(f"DROP DATABASE {quote_ident(influx_settings.database)}")
    for stream in (TRADE_STREAM, CANDLE_STREAM):
        assert (await redis.xpending(stream, GROUP))["pending"] == 0
    counters = writer.counters()
    assert counters["trades"] == 640 and counters["candles"] == 6
    # ts_recv -> stored: these trades were received in 2024, so every one is beyond the last bound
    assert counters["stored_ms_le_inf"] == 640 and counters["stored_ms_le_10000"] == 0
    assert counters["candles_open_skipped"] == 13
    assert counters["points_written"] == 646 and counters["write_errors"] == 0
    assert counters["dead_lettered"] == 0 and counters["acked"] == total


async def test_writer_waits_for_influxdb_and_loses_nothing_across_an_outage(
        redis, redis_server: LocalServer, tmp_path: Path) -> None:
    port = free_port()
    influx = InfluxSettings(url=f"http://127.0.0.1:{port}", database="outage", timeout_s=2, retention=KEEP_ALL)
    producer = Producer(redis, Codec(), FAST, "test")
    first = [stubs.trade(i) for i in range(100)]
    second = [stubs.trade(i) for i in range(100, 250)]
    writer = InfluxWriter(writer_settings(redis_server, influx))
    server: LocalServer | None = None
    try:
        async with Running(writer):
            await producer.publish({TRADE_STREAM: first})
            await wait_for(lambda: writer.state == "degraded", what="the writer to report InfluxDB down")
            await asyncio.sleep(0.3)
            assert writer.consumer.stats.delivered == 0  # nothing read while the database cannot be created
            assert str(port) in writer.detail

            server = await asyncio.to_thread(start_influxd, tmp_path / "influx", port)
            await wait_for(lambda: writer.consumer.stats.acked == 10, what="the first batch")
            await asyncio.to_thread(server.stop)

            await producer.publish({TRADE_STREAM: second})
            await wait_for(lambda: writer.consumer.stats.store_retries >= 1, what="a write to fail")
            assert writer.state == "degraded" and writer.consumer.stats.acked == 10
            assert (await redis.xpending(TRADE_STREAM, GROUP))["pending"] >= 1  # held, not acknowledged

            server = await asyncio.to_thread(start_influxd, tmp_path / "influx", port)  # same data dir
            # Exactly 25: the consumer retrying in place keeps its entries claimed, so no sibling consumer of
            # the process takes them over and acknowledges them a second time (common/bus/core.py `_hold`).
            await wait_for(lambda: writer.consumer.stats.acked >= 25, timeout=40, what="the second batch")
            await asyncio.sleep(0.5)
            assert writer.consumer.stats.acked == 25
            assert writer.state == "running"
        async with InfluxClient(influx) as c:
            assert await points(c, "trades", "price", rp="ticks") == 250
        assert (await redis.xpending(TRADE_STREAM, GROUP))["pending"] == 0
        assert writer.consumer.stats.dead_lettered == 0 and writer.count["write_errors"] >= 1
    finally:
        if server is not None:
            await asyncio.to_thread(server.stop)


async def test_writer_dead_letters_an_entry_influxdb_refuses_and_keeps_the_rest(
        redis, redis_server: LocalServer,
        influx_settings: InfluxSettings) -> None:
    producer = Producer(redis, Codec(), FAST, "test")
    await producer.publish({CANDLE_STREAM: [stubs.candle(0), stubs.candle(1)]})
    await producer.publish({CANDLE_STREAM: [stubs.candle(2, o="NaN")]})  # no validator in front: unwritable
    await producer.publish({CANDLE_STREAM: [stubs.candle(3)], TRADE_STREAM: [stubs.trade(0)]})

    # One consumer: a consumer keeps the reason of an entry's failures in memory, and the test reads it from the
    # dead letter; with two, the one that dead-letters may not be the one that saw it fail (then the letter
    # points to the log, where the bus logged the failure with its reason).
    writer = InfluxWriter(writer_settings(redis_server, replace(influx_settings, writer_consumers=1)))
    async with Running(writer):
        await wait_for(lambda: writer.consumer.stats.dead_lettered == 1, what="the bad entry dead-lettered")
        await wait_for(lambda: writer.consumer.stats.acked == 3, what="the good entries acknowledged")

    letters = await redis.xrange(streams.dead_letter(CANDLE_STREAM))
    assert len(letters) == 1
    reason = letters[0][1][b"reason"].decode()
    assert "InfluxWriteError" in reason and "invalid number" in reason
    async with InfluxClient(influx_settings) as c:
        rows = await c.query("SELECT close FROM ohlcv", rp="candles_1m")
        assert [r["time"] for r in rows] == [stubs.candle(i).open_time for i in (0, 1, 3)]
        assert await points(c, "trades", "price", rp="ticks") == 1
        await c.execute(f"DROP DATABASE {quote_ident(influx_settings.database)}")
    for stream in (TRADE_STREAM, CANDLE_STREAM):
        assert (await redis.xpending(stream, GROUP))["pending"] == 0


# -- storage tiers on 1.x: retention policies ----------------------------------------------------------

NOW_NS = time.time_ns()
MINUTE = 60 * 1_000_000_000


def recent_candle(i: int, timeframe: str, age_s: int = 3600) -> Candle:
    """A closed candle `age_s` seconds ago (inside every default tier but its own expiry tests)."""
    open_time = (NOW_NS - age_s * 1_000_000_000) // MINUTE * MINUTE + i * MINUTE
    return replace(stubs.candle(0), timeframe=timeframe, open_time=open_time, ts_event=open_time,
                   ts_recv=open_time)


def recent_trade(i: int, age_s: int = 60) -> Trade:
    return stubs.trade(i, ts=NOW_NS - age_s * 1_000_000_000 + i * MS)


async def retention_policies(client: InfluxClient) -> dict[str, int | None]:
    rows = await client.query(f"SHOW RETENTION POLICIES ON {quote_ident(client.database)}")
    return {r["name"]: (None if r["duration"] == "0s" else r["duration"]) for r in rows}


async def test_generation_1_is_detected_and_each_tier_is_a_retention_policy(
        influx_settings: InfluxSettings) -> None:
    async with InfluxClient(replace(influx_settings, retention=InfluxSettings().retention)) as c:
        # Act
        version = await c.connect()
        steps = await c.ensure_tiers()
        again = await c.ensure_tiers()
        # Assert
        assert version.startswith("1.6") and c.generation == 1
        assert await retention_policies(c) == {"autogen": None, "ticks": "168h0m0s", "candles_1m": "2160h0m0s",
                                               "candles_1h": "17520h0m0s", "candles_1d": None}
        assert [s for s in steps if "created" in s] == [
            "retention policy 'ticks' (ticks): created, 7d",
            "retention policy 'candles_1m' (1m, 3m, 5m, 15m, 30m): created, 90d",
            "retention policy 'candles_1h' (1h, 2h, 4h, 6h, 8h, 12h): created, 730d",
            "retention policy 'candles_1d' (1d, 3d, 1w, 1M): created, inf"]
        assert all("unchanged" in s or "present" in s for s in again)
        assert c.tier_for("ticks") == (c.database, "ticks")
        assert [c.tier_for(tf)[1] for tf in ("1m", "5m", "15m", "1h", "2h", "4h", "1d", "3d", "1w", "1M")] == \
            ["candles_1m"] * 3 + ["candles_1h"] * 3 + ["candles_1d"] * 4

        # A retention changed in the config is applied to the existing policy.
        changed = replace(c.settings, retention={**c.settings.retention, "ticks": "14d"})
        async with InfluxClient(changed) as c2:
            steps = await c2.ensure_tiers()
        assert "retention policy 'ticks' (ticks): retention changed from 7d to 14d" in steps
        assert (await retention_policies(c))["ticks"] == "336h0m0s"
        await c.execute(f"DROP DATABASE {quote_ident(c.database)}")


async def test_mdp_init_builds_every_tier_and_migrates_idempotently(
        influx_server: LocalServer, redis_server: LocalServer, postgres_dsn: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    # Arrange: a config of its own (its own InfluxDB database), the plan's default tiers
    database = f"mdp_init_{os.getpid()}"
    config = tmp_path / "init.toml"
    config.write_text(f'[redis]\nurl = "{redis_server.url}"\n[postgres]\ndsn = "{postgres_dsn}"\n'
                      f'[influx]\nurl = "{influx_server.url}"\ndatabase = "{database}"\n')
    # Act
    first = await asyncio.to_thread(cli.main, ["--config", str(config), "init"])
    out_first = capsys.readouterr().out
    second = await asyncio.to_thread(cli.main, ["--config", str(config), "init"])
    out_second = capsys.readouterr().out
    # Assert
    assert first == 0 and second == 0
    assert "generation 1" in out_first and out_first.count(": created, ") == 4
    assert "PostgreSQL at" in out_first and "migration(s)" in out_first
    assert out_second.count(": unchanged, ") == 4 and "created" not in out_second
    assert "applied 0 migration(s): none, the schema is current" in out_second
    async with InfluxClient(InfluxSettings(url=influx_server.url, database=database)) as c:
        assert set(await retention_policies(c)) == {"autogen", "ticks", "candles_1m", "candles_1h", "candles_1d"}
        await c.execute(f"DROP DATABASE {quote_ident(database)}")
    conn = await asyncpg.connect(postgres_dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM schema_migrations") >= 1
    finally:
        await conn.close()


async def test_mdp_init_fails_loudly_when_influxdb_is_down(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    config = tmp_path / "down.toml"
    config.write_text(f'[influx]\nurl = "{url}"\ntimeout_s = 2\n')
    code = await asyncio.to_thread(cli.main, ["--config", str(config), "init", "--influx-only"])
    err = capsys.readouterr().err
    assert code == 1
    assert url in err and "is unavailable" in err and "make stores" in err


async def test_writer_routes_each_timeframe_to_its_tier(
        redis, redis_server: LocalServer, influx_settings: InfluxSettings) -> None:
    # Arrange: the plan's retention; recent trades and closed candles of every kind of timeframe
    settings = writer_settings(redis_server, replace(influx_settings, retention=InfluxSettings().retention))
    trades = [recent_trade(i) for i in range(5)]
    frames = {"1m": "candles_1m", "5m": "candles_1m", "1h": "candles_1h", "2h": "candles_1h",
              "4h": "candles_1h", "1d": "candles_1d", "1w": "candles_1d"}
    candles = [recent_candle(i, tf) for i, tf in enumerate(frames)]
    producer = Producer(redis, Codec(), FAST, "test")
    await producer.publish({TRADE_STREAM: trades, CANDLE_STREAM: candles})
    total = await entries(redis, TRADE_STREAM, CANDLE_STREAM)
    writer = InfluxWriter(settings)
    # Act
    async with Running(writer):
        await wait_for(lambda: writer.consumer.stats.acked == total, what="every entry acknowledged")
    # Assert: each point in the retention policy of its timeframe, none elsewhere
    async with InfluxClient(settings.influx) as c:
        assert await points(c, "trades", "price", rp="ticks") == 5
        for rp in ("candles_1m", "candles_1h", "candles_1d"):
            rows = await c.query("SELECT close FROM ohlcv GROUP BY timeframe", rp=rp)
            assert sorted(r["timeframe"] for r in rows) == sorted(tf for tf, tier in frames.items() if tier == rp)
        for tf in frames:
            got = await c.query_timeframe(tf, "SELECT close FROM ohlcv WHERE timeframe = $tf", params={"tf": tf})
            assert len(got) == 1, tf
        await c.execute(f"DROP DATABASE {quote_ident(c.database)}")
    counters = writer.counters()
    assert counters["points.ticks"] == 5 and counters["points.candles_1m"] == 2
    assert counters["points.candles_1h"] == 3 and counters["points.candles_1d"] == 2
    assert counters["expired_skipped"] == 0


async def test_writer_skips_points_older_than_their_tier_and_acknowledges_them(
        redis, redis_server: LocalServer, influx_settings: InfluxSettings) -> None:
    settings = writer_settings(redis_server, replace(influx_settings, retention=InfluxSettings().retention))
    day = 86400
    old_trade, new_trade = recent_trade(0, age_s=8 * day), recent_trade(1, age_s=6 * day)
    old_1m, old_1h = recent_candle(0, "1m", age_s=91 * day), recent_candle(1, "1h", age_s=91 * day)
    producer = Producer(redis, Codec(), FAST, "test")
    await producer.publish({TRADE_STREAM: [old_trade, new_trade], CANDLE_STREAM: [old_1m, old_1h]})
    total = await entries(redis, TRADE_STREAM, CANDLE_STREAM)
    writer = InfluxWriter(settings)
    async with Running(writer):
        await wait_for(lambda: writer.consumer.stats.acked == total, what="every entry acknowledged")
    async with InfluxClient(settings.influx) as c:
        rows = await c.query_timeframe("ticks", "SELECT trade_id FROM trades")
        assert [r["trade_id"] for r in rows] == [new_trade.trade_id]  # 8 days old: beyond the 7d tier
        assert await points(c, "ohlcv", "close", rp="candles_1m") == 0  # 91 days: beyond 90d
        assert await points(c, "ohlcv", "close", rp="candles_1h") == 1  # 91 days: within 2 years
        await c.execute(f"DROP DATABASE {quote_ident(c.database)}")
    assert writer.counters()["expired_skipped"] == 2 and writer.consumer.stats.dead_lettered == 0


async def test_points_the_server_drops_as_beyond_retention_are_counted_not_an_error(
        client: InfluxClient) -> None:
    db = quote_ident(client.database)
    await client.execute(f'CREATE RETENTION POLICY "short" ON {db} DURATION 1h REPLICATION 1')
    old = encode_trades([recent_trade(0, age_s=2 * 3600)])
    new = encode_trades([recent_trade(1, age_s=60)])
    await client.write_lines(old + new, rp="short")  # no exception: InfluxDB keeps what its policy keeps
    assert client.expired_dropped == 1
    assert await points(client, "trades", "price", rp="short") == 1
    with pytest.raises(InfluxWriteError, match="retention policy not found") as info:
        await client.write_lines(new, rp="missing")
    assert info.value.database_not_found  # the writer makes the tiers again on this


async def test_quality_flags_are_a_string_field_written_only_when_present(client: InfluxClient) -> None:
    flagged = replace(stubs.trade(0), quality=("price.spike", "time.late"))
    plain = stubs.trade(1)
    bar = replace(stubs.candle(0), quality=("volume.zero",))
    lines = encode_trades([flagged, plain]) + encode_candles([bar, stubs.candle(1)])
    assert lines[0].endswith(f',quality="price.spike,time.late" {trade_timestamp(flagged.ts_event, "3735683259")}')
    assert "quality" not in lines[1] and "quality" not in lines[3]
    await client.write_lines(lines)
    rows = await client.query("SELECT trade_id, quality FROM trades ORDER BY time")
    assert [(r["trade_id"], r["quality"]) for r in rows] == [(flagged.trade_id, "price.spike,time.late"),
                                                            (plain.trade_id, None)]
    bars = await client.query("SELECT close, quality FROM ohlcv ORDER BY time")
    assert [r["quality"] for r in bars] == ["volume.zero", None]


def test_retention_text_parses_and_refuses_clearly() -> None:
    assert [parse_retention(t) for t in ("7d", "90d", "730d", "12h", "2w", "inf")] == \
        [604800, 7776000, 63072000, 43200, 1209600, None]
    for bad in ("30m", "7 days", "", "-1d"):
        with pytest.raises(ValueError, match="retention"):
            parse_retention(bad)


def test_the_writers_wire_view_gives_the_same_lines_as_the_schema() -> None:
    """The writer decodes decimals as text (services/influx_writer/wire.py): same lines, other events intact."""
    from services.influx_writer.wire import CandleText, TradeText, WireCodec

    codec = Codec()
    trades = [stubs.trade(0, price="61837.63000000", amount="0.00100000"),
              replace(stubs.trade(1, price="0.00000012"), side=None, quality=("price.spike",)),
              replace(stubs.trade(2), trade_id="uuid-like-id"), replace(stubs.trade(3), price=None)]
    candles = [stubs.candle(0, o="1E+2", v="0"), replace(stubs.candle(1), timeframe="4h", quality=("gap",))]
    others = [stubs.ticker(), stubs.alert()]
    entry = codec.entry([*trades, *candles, *others])
    schema = codec.decode_entry(entry)
    wire = WireCodec().decode_entry(entry)
    assert [type(e) for e in wire] == [TradeText] * 4 + [CandleText] * 2 + [type(o) for o in others]
    assert wire[-2:] == others
    assert encode_trades(wire[:4]) == encode_trades(schema[:4])  # type: ignore[arg-type]
    assert encode_candles(wire[4:6]) == encode_candles(schema[4:6])  # type: ignore[arg-type]
    assert len(encode_trades(wire[:4])) == 3  # the trade without a price is skipped either way


def test_the_writers_trade_encoder_gives_the_lines_of_encode_trades() -> None:
    """encode_trade_lines (the writer's fast path) is encode_trades byte for byte: same timestamps (so a
    rewrite overwrites the same point), same skips, same escapes, on every kind of trade."""
    from services.influx_writer.wire import WireCodec, encode_trade_lines

    t0 = stubs.T0_NS + 123_456
    trades = [stubs.trade(i, ts=t0 + i * 999_999) for i in range(5)]  # usual: ids of 10 digits
    trades += [
        replace(stubs.trade(5), trade_id="12345"),  # short numeric id: offset 12,345, not 6 digits of text
        replace(stubs.trade(6), trade_id="1000000"),  # offset 0
        replace(stubs.trade(7), trade_id="a-uuid\"id"),  # crc32 offset, escaped quote
        replace(stubs.trade(8), trade_id="١٢٣٤٥٦٧"),  # non-ASCII digits: not a numeric id
        replace(stubs.trade(9), side=None),
        replace(stubs.trade(10), quality=("price.spike",)),
        replace(stubs.trade(11), amount=None),  # skipped
        replace(stubs.trade(12), ts_event=999_999),  # before 1970-01-01T00:00:00.001
        replace(stubs.trade(13), ts_event=-5_000_123),
        stubs.trade(14, exchange="my exchange", symbol="BTC,USD=T"),  # tags escaped
        stubs.trade(15, symbol="ETH/USDT"),
    ]
    codec = Codec()
    wire = WireCodec().decode_entry(codec.entry(list(trades)))
    for cutoff in (None, trades[2].ts_event, -(10 ** 7)):
        assert encode_trade_lines(wire, not_before=cutoff) == encode_trades(trades, not_before=cutoff)
        assert encode_trade_lines(trades, not_before=cutoff) == encode_trades(trades, not_before=cutoff)
    lines = encode_trade_lines(wire)
    assert len(lines) == len(trades) - 1  # only the trade without an amount is left out
    assert lines[0].endswith(f" {t0 - t0 % 1_000_000 + 3735683259 % 1_000_000}")


def test_the_writer_counts_each_stored_trade_by_its_latency_and_a_quantile_reads_the_buckets(
        redis_server: LocalServer, influx_settings: InfluxSettings) -> None:
    """ts_recv -> stored (the InfluxDB writer's cumulative buckets, common.status), and the quantile the pipeline
    benchmark reads from two readings of them."""
    from common.status import stored_latency_quantile

    writer = InfluxWriter(writer_settings(redis_server, influx_settings))
    before = writer.counters()
    now = time.time_ns()
    writer._stored([replace(stubs.trade(0), ts_recv=now - ms * 1_000_000) for ms in (30, 40, 250, 12_000)])
    after = writer.counters()
    grew = {k: after[k] - before[k] for k in after if k.startswith("stored_ms_le_")}
    assert (grew["stored_ms_le_20"], grew["stored_ms_le_50"], grew["stored_ms_le_200"], grew["stored_ms_le_300"],
            grew["stored_ms_le_10000"], grew["stored_ms_le_inf"]) == (0, 2, 2, 3, 3, 4)
    assert stored_latency_quantile(before, after, 0.5) == 50.0  # the 2nd of 4: the top of the 20-50 ms bucket
    assert 200 < stored_latency_quantile(before, after, 0.75) <= 300  # type: ignore[operator]
    assert stored_latency_quantile(before, after, 0.99) == 10_000.0  # beyond the last bound: that bound
    assert stored_latency_quantile(after, after, 0.5) is None
