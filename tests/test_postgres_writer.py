"""Migrations and the PostgreSQL writer on a real PostgreSQL and a real Redis: schema, constraints,
idempotent upserts through the bus, redelivery, PostgreSQL going away, and the strategy events (helper,
stream, writer: exactly once, forward-only positions and metrics, auto-registration, COPY vs unnest,
dead letters)."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from decimal import Decimal
from itertools import count
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import msgspec
import pytest

from common.bus import streams
from common.bus.core import Delivery, Producer
from common.config import BusSettings, PostgresWriterSettings, Settings
from common.errors import StoreUnavailable
from common.stores.postgres import MIGRATIONS_DIR, MigrationError, load_migrations, migrate
from common.strategy_events import StrategyEventError, StrategyEvents
from schemas import Alert, Codec, Market
from schemas.events import Fill, PerformanceMetric, PositionUpdate, StrategyInfo
from services.postgres_writer.service import GROUP, PostgresWriter
from tests import stubs
from tools.bench_postgres import real_fills

FAST = BusSettings(stream_maxlen=1000, backpressure_high_water=500, backpressure_max_wait_s=0.5,
                   batch_max_events=10, read_count=50, block_ms=50, claim_idle_ms=60_000, max_deliveries=3)
MARKETS = streams.markets("binance")
# The tables of 0001-0003 (later migrations of other features add theirs).
OUR_TABLES = {"schema_migrations", "markets", "quality_alerts", "strategies", "trades", "positions",
              "performance_metrics", "position_history"}
VERSIONS = [m.version for m in load_migrations()]
_db_numbers = count()
T0 = datetime(2024, 8, 8, 23, 54, 15, 342_000, tzinfo=UTC)  # stubs.T0_NS


def next_version(offset: int = 1) -> str:
    """A version number after every migration file of the tree (for files a test adds)."""
    return f"{int(VERSIONS[-1]) + offset:04d}"


def with_db(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, f"/{database}", parts.query, parts.fragment))


@pytest.fixture
async def scratch_dsn(postgres_dsn: str) -> AsyncIterator[str]:
    """A fresh, empty database for one test (dropped after)."""
    name = f"{urlsplit(postgres_dsn).path.lstrip('/')}_pw{next(_db_numbers)}"
    admin = await asyncpg.connect(with_db(postgres_dsn, "postgres"), timeout=10)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield with_db(postgres_dsn, name)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
async def db(scratch_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to a fresh, migrated database."""
    await migrate(scratch_dsn)
    conn = await asyncpg.connect(scratch_dsn)
    yield conn
    await conn.close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def writer_settings(settings: Settings, dsn: str) -> Settings:
    return msgspec.structs.replace(settings, bus=FAST,
                                   postgres=msgspec.structs.replace(settings.postgres, dsn=dsn))


def market(symbol: str = "BTC/USDT", ts: int = stubs.T0_NS, active: bool | None = True,
           price_precision: str = "0.01", amount_precision: str = "0.00001",
           contract_size: str | None = None, exchange: str = "binance", market_type: str = "spot") -> Market:
    base, quote = symbol.split(":")[0].split("/")
    return Market(exchange=exchange, symbol=symbol, exchange_symbol=f"{base}{quote}", base=base, quote=quote,
                  market_type=market_type, active=active,
                  contract_size=None if contract_size is None else Decimal(contract_size),
                  price_precision=Decimal(price_precision), amount_precision=Decimal(amount_precision),
                  ts_event=ts, ts_recv=ts)


def alert(i: int, exchange: str = "binance", values: dict[str, str | None] | None = None) -> Alert:
    return Alert(rule="trade.price_positive", severity="error", source="validator", exchange=exchange,
                 symbol="BTC/USDT" if exchange else "", kind="trade" if exchange else "stream",
                 reason=f"price must be positive (alert {i})",
                 values={"price": "-1", "trade_id": str(i)} if values is None else values,
                 ts_event=stubs.T0_NS + i * 1000, ts_recv=stubs.T0_NS + i * 1000 + 7)


async def run_until(writer: PostgresWriter, predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    """Run the writer until `predicate` holds. The bound is generous: the writer first waits until PostgreSQL
    answers (its backoff is 0.5, 1, 2, 4 s... while a loaded machine keeps it from answering at once)."""
    stop = asyncio.Event()
    task = asyncio.create_task(writer.run(stop))
    try:
        try:
            async with asyncio.timeout(timeout):
                while not predicate():
                    if task.done():
                        task.result()  # the run loop crashed: show why
                        raise AssertionError("the writer's run loop returned before the condition held")
                    await asyncio.sleep(0.02)
        except TimeoutError:
            raise AssertionError(f"the condition did not hold within {timeout:.0f} s: writer state "
                                 f"{writer.state!r} ({writer.detail!r}), counters {writer.counters()}") from None
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def read_deliveries(redis, stream: str) -> list[Delivery]:
    codec = Codec()
    return [Delivery(stream, eid.decode(), codec.decode_entry(fields))
            for eid, fields in await redis.xrange(stream)]


# -- migrations --------------------------------------------------------------------------------

async def test_migrations_apply_in_order_and_are_recorded(scratch_dsn: str) -> None:
    files = load_migrations()
    assert [m.version for m in files][:3] == ["0001", "0002", "0003"]

    applied = await migrate(scratch_dsn)

    assert applied == VERSIONS
    conn = await asyncpg.connect(scratch_dsn)
    try:
        rows = await conn.fetch("SELECT version, name, checksum, applied_at FROM schema_migrations "
                                "ORDER BY version")
        tables = {r["tablename"] for r in await conn.fetch("SELECT tablename FROM pg_tables "
                                                          "WHERE schemaname = 'public'")}
    finally:
        await conn.close()
    assert [(r["version"], r["name"], r["checksum"]) for r in rows] == \
        [(m.version, m.name, m.checksum) for m in files]
    assert [r["applied_at"] for r in rows] == sorted(r["applied_at"] for r in rows)
    assert OUR_TABLES <= tables


async def test_rerun_applies_nothing(scratch_dsn: str) -> None:
    await migrate(scratch_dsn)
    assert await migrate(scratch_dsn) == []
    conn = await asyncpg.connect(scratch_dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM schema_migrations") == len(VERSIONS)
    finally:
        await conn.close()


async def test_concurrent_runs_apply_each_migration_once(scratch_dsn: str) -> None:
    # Four processes starting together: the advisory lock lets one apply, the others find nothing to do.
    results = await asyncio.gather(*(migrate(scratch_dsn) for _ in range(4)))

    assert sorted(results) == [[], [], [], VERSIONS]


async def test_changed_checksum_is_refused_naming_the_file(scratch_dsn: str, tmp_path: Path) -> None:
    shutil.copytree(MIGRATIONS_DIR, tmp_path / "m")
    assert await migrate(scratch_dsn, tmp_path / "m") == VERSIONS
    first = tmp_path / "m" / "0001_initial.sql"
    first.write_text(first.read_text() + "\nCREATE INDEX markets_quote_idx ON markets (quote);\n")
    (tmp_path / "m" / f"{next_version()}_more.sql").write_text("CREATE TABLE more_things (id int);")

    with pytest.raises(MigrationError, match="0001_initial.sql") as info:
        await migrate(scratch_dsn, tmp_path / "m")

    assert "changed after it was applied" in str(info.value)
    conn = await asyncpg.connect(scratch_dsn)
    try:  # refused before anything ran: neither the edit nor the new file
        assert await conn.fetchval("SELECT to_regclass('more_things')") is None
        assert await conn.fetchval("SELECT to_regclass('markets_quote_idx')") is None
        assert await conn.fetchval("SELECT max(version) FROM schema_migrations") == VERSIONS[-1]
    finally:
        await conn.close()


async def test_line_endings_do_not_change_the_checksum(scratch_dsn: str, tmp_path: Path) -> None:
    shutil.copytree(MIGRATIONS_DIR, tmp_path / "m")
    await migrate(scratch_dsn, tmp_path / "m")
    for path in (tmp_path / "m").glob("*.sql"):  # a Windows checkout
        path.write_bytes(path.read_bytes().replace(b"\n", b"\r\n"))

    assert await migrate(scratch_dsn, tmp_path / "m") == []


async def test_failing_migration_is_rolled_back_and_named(scratch_dsn: str, tmp_path: Path) -> None:
    shutil.copytree(MIGRATIONS_DIR, tmp_path / "m")
    broken = tmp_path / "m" / f"{next_version()}_broken.sql"
    broken.write_text("CREATE TABLE half_done (id int);\nSELECT 1 / 0;\n")

    with pytest.raises(MigrationError, match=f"{broken.name}.*rolled back"):
        await migrate(scratch_dsn, tmp_path / "m")

    conn = await asyncpg.connect(scratch_dsn)
    try:
        assert await conn.fetchval("SELECT to_regclass('half_done')") is None
        assert [r[0] for r in await conn.fetch("SELECT version FROM schema_migrations ORDER BY 1")] == VERSIONS
    finally:
        await conn.close()
    broken.write_text("CREATE TABLE half_done (id int);\n")
    assert await migrate(scratch_dsn, tmp_path / "m") == [next_version()]


async def test_misnamed_and_out_of_order_files_are_refused(scratch_dsn: str, tmp_path: Path) -> None:
    shutil.copytree(MIGRATIONS_DIR, tmp_path / "m")
    (tmp_path / "m" / "3_oops.sql").write_text("SELECT 1;")
    with pytest.raises(MigrationError, match="3_oops.sql"):
        await migrate(scratch_dsn, tmp_path / "m")
    (tmp_path / "m" / "3_oops.sql").unlink()
    await migrate(scratch_dsn, tmp_path / "m")
    (tmp_path / "m" / "0001_from_a_branch.sql").write_text("SELECT 1;")
    with pytest.raises(MigrationError, match="share version 0001"):
        await migrate(scratch_dsn, tmp_path / "m")
    (tmp_path / "m" / "0001_from_a_branch.sql").rename(tmp_path / "m" / "0000_from_a_branch.sql")
    with pytest.raises(MigrationError, match=f"0000_from_a_branch.sql.*numbered below {VERSIONS[-1]}"):
        await migrate(scratch_dsn, tmp_path / "m")


# -- constraints ---------------------------------------------------------------------------------------------

async def test_strategy_tables_enforce_their_constraints(db: asyncpg.Connection) -> None:
    sid = await db.fetchval("INSERT INTO strategies (name, params) "
                            "VALUES ('mean-revert', '{\"window\": 20}') RETURNING id")
    fill = ("INSERT INTO trades (strategy_id, exchange, symbol, side, price, amount, fee, fee_currency, "
            "exchange_trade_id, ts) VALUES ($1, 'binance', 'BTC/USDT', $2, $3, $4, $5, 'USDT', $6, now()) "
            "ON CONFLICT ON CONSTRAINT trades_fill_key DO UPDATE SET fee = EXCLUDED.fee")
    price, amount = Decimal("61837.63000001"), Decimal("0.00012345")
    await db.execute(fill, sid, "buy", price, amount, Decimal("0.0001"), "t1")
    await db.execute(fill, sid, "buy", price, amount, Decimal("0.0002"), "t1")  # the same fill, corrected

    row = await db.fetchrow("SELECT count(*) OVER () AS n, price, amount, cost, fee FROM trades")
    assert row["n"] == 1  # the fill key made the second insert an update
    assert row["price"] == Decimal("61837.63000001")  # exact
    assert row["cost"] == Decimal("61837.63000001") * Decimal("0.00012345")
    assert row["fee"] == Decimal("0.0002")
    with pytest.raises(asyncpg.CheckViolationError, match="side"):
        await db.execute(fill, sid, "hold", Decimal(1), Decimal(1), Decimal(0), "t2")
    with pytest.raises(asyncpg.CheckViolationError, match="price"):
        await db.execute(fill, sid, "sell", Decimal(0), Decimal(1), Decimal(0), "t3")
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await db.execute(fill, sid + 999, "sell", Decimal(1), Decimal(1), Decimal(0), "t4")
    with pytest.raises(asyncpg.UniqueViolationError):
        await db.execute("INSERT INTO strategies (name) VALUES ('mean-revert')")
    with pytest.raises(asyncpg.CheckViolationError):
        await db.execute("INSERT INTO strategies (name, params) VALUES ('x', '[1, 2]')")
    with pytest.raises(asyncpg.CheckViolationError):  # an open position needs its average price
        await db.execute("INSERT INTO positions (strategy_id, exchange, symbol, quantity) "
                         "VALUES ($1, 'binance', 'BTC/USDT', -0.5)", sid)
    await db.execute("INSERT INTO positions (strategy_id, exchange, symbol, quantity, avg_price) "
                     "VALUES ($1, 'binance', 'BTC/USDT', -0.5, 61000.1)", sid)
    with pytest.raises(asyncpg.UniqueViolationError):
        await db.execute("INSERT INTO positions (strategy_id, exchange, symbol, quantity, avg_price) "
                         "VALUES ($1, 'binance', 'BTC/USDT', 1, 2)", sid)
    metric = ("INSERT INTO performance_metrics (strategy_id, metric, period, ts, value) "
              "VALUES ($1, 'pnl', '1d', '2024-08-09T00:00:00Z', $2)")
    await db.execute(metric, sid, Decimal("12.5"))
    with pytest.raises(asyncpg.UniqueViolationError):
        await db.execute(metric, sid, Decimal(13))
    with pytest.raises(asyncpg.ForeignKeyViolationError):  # fills are records: a strategy with fills stays
        await db.execute("DELETE FROM strategies WHERE id = $1", sid)


async def test_catalog_and_alert_tables_enforce_their_constraints(db: asyncpg.Connection) -> None:
    insert = ("INSERT INTO markets (exchange, symbol, exchange_symbol, base, quote, market_type, "
              "contract_size, first_seen, last_seen) "
              "VALUES ('binance', $1, 'X', 'B', 'Q', 'spot', $2, now(), now())")
    await db.execute(insert, "BTC/USDT", None)
    with pytest.raises(asyncpg.UniqueViolationError):
        await db.execute(insert, "BTC/USDT", None)
    with pytest.raises(asyncpg.CheckViolationError, match="contract_size"):
        await db.execute(insert, "ETH/USDT", Decimal(0))
    with pytest.raises(asyncpg.CheckViolationError, match="symbol"):
        await db.execute(insert, "", None)
    alert_sql = ("INSERT INTO quality_alerts (stream, entry_id, idx, rule, severity, source, reason, "
                 "ts_event) VALUES ('mdp:alerts', $1, 0, 'r', $2, 'validator', 'why', now())")
    with pytest.raises(asyncpg.CheckViolationError, match="severity"):
        await db.execute(alert_sql, "1-0", "fatal")
    with pytest.raises(asyncpg.CheckViolationError, match="entry_id"):
        await db.execute(alert_sql, "not-an-id", "error")


# -- the writer --------------------------------------------------------------------------------

async def test_writer_upserts_markets_and_stores_alerts_from_the_bus(redis, settings, scratch_dsn) -> None:
    producer = Producer(redis, Codec(), FAST, "test")
    swap = market("BTC/USDT:USDT", market_type="swap", contract_size="1", price_precision="0.1",
                  amount_precision="0.001")
    await producer.publish({MARKETS: [market(), market("ETH/USDT"), swap],
                            streams.ALERTS: [alert(i) for i in range(3)] + [alert(3, exchange="")]})
    writer = PostgresWriter(writer_settings(settings, scratch_dsn), "t")
    try:
        await run_until(writer, lambda: writer.counters()["acked"] == 2)

        conn = await asyncpg.connect(scratch_dsn)
        try:
            rows = {r["symbol"]: r for r in await conn.fetch("SELECT * FROM markets")}
            alerts = await conn.fetch('SELECT * FROM quality_alerts ORDER BY entry_id, idx')
        finally:
            await conn.close()
        assert set(rows) == {"BTC/USDT", "ETH/USDT", "BTC/USDT:USDT"}
        btc = rows["BTC/USDT"]
        assert (btc["exchange"], btc["exchange_symbol"], btc["base"], btc["quote"], btc["market_type"],
                btc["active"]) == ("binance", "BTCUSDT", "BTC", "USDT", "spot", True)
        assert btc["price_precision"] == Decimal("0.01") and btc["amount_precision"] == Decimal("0.00001")
        assert btc["contract_size"] is None
        assert rows["BTC/USDT:USDT"]["contract_size"] == Decimal(1)
        assert btc["first_seen"] == btc["last_seen"] == T0
        assert len(alerts) == 4
        first = alerts[0]
        assert (first["stream"], first["idx"], first["rule"], first["severity"], first["source"],
                first["exchange"], first["symbol"], first["kind"]) == \
            (streams.ALERTS, 0, "trade.price_positive", "error", "validator", "binance", "BTC/USDT", "trade")
        assert msgspec.json.decode(first["values"]) == {"price": "-1", "trade_id": "0"}
        assert [a["idx"] for a in alerts] == [0, 1, 2, 3]
        assert alerts[3]["exchange"] is None and alerts[3]["kind"] == "stream"
        assert alerts[1]["ts_event"] == T0.replace(microsecond=342_001)
        assert alerts[1]["ts_recv"] == T0.replace(microsecond=342_001)  # +7 ns: PostgreSQL keeps microseconds
        c = writer.counters()
        assert (c["markets_upserted"], c["alerts_stored"], c["alerts_duplicate"], c["events"]) == (3, 4, 0, 7)
        assert c["batches"] >= 1 and c["dead_lettered"] == 0
        assert (await redis.xpending(MARKETS, GROUP))["pending"] == 0
        assert (await redis.xpending(streams.ALERTS, GROUP))["pending"] == 0
    finally:
        await writer.close()


async def test_updating_a_market_changes_its_row_and_never_goes_back(redis, settings, scratch_dsn) -> None:
    producer = Producer(redis, Codec(), FAST, "test")
    writer = PostgresWriter(writer_settings(settings, scratch_dsn), "t")
    t1, t2 = stubs.T0_NS, stubs.T0_NS + 3_600 * 10**9
    try:
        await producer.publish({MARKETS: [market(ts=t1)]})
        await run_until(writer, lambda: writer.counters()["acked"] == 1)
        conn = await asyncpg.connect(scratch_dsn)
        try:
            before = await conn.fetchrow("SELECT * FROM markets")
            # Delisted an hour later with a finer tick; and in the same batch a stale copy of the old row.
            await producer.publish({MARKETS: [market(ts=t2, active=False, price_precision="0.001")]})
            await producer.publish({MARKETS: [market(ts=t1)]})
            await run_until(writer, lambda: writer.counters()["acked"] == 3)
            after = await conn.fetch("SELECT * FROM markets")
            # A late redelivery of the first catalog must not bring the old values back.
            await writer.handle(await read_deliveries(redis, MARKETS))
            final = await conn.fetch("SELECT * FROM markets")
        finally:
            await conn.close()
        assert len(after) == 1
        row = after[0]
        assert row["active"] is False and row["price_precision"] == Decimal("0.001")
        assert row["first_seen"] == before["first_seen"]
        assert row["last_seen"] > before["last_seen"]
        assert row["updated_at"] > before["updated_at"]
        assert [dict(r) for r in final] == [dict(row)]
        assert writer.counters()["markets_unchanged"] >= 1
    finally:
        await writer.close()


async def test_redelivered_entries_are_stored_exactly_once(redis, settings, scratch_dsn) -> None:
    producer = Producer(redis, Codec(), FAST, "test")
    await producer.publish({streams.ALERTS: [alert(i) for i in range(25)],
                            MARKETS: [market(), market("ETH/USDT")]})
    codec = Codec()
    wset = writer_settings(settings, scratch_dsn)
    # A first writer instance reads and stores everything, then dies before acknowledging.
    first = PostgresWriter(wset, "t")
    # The producer made the pipeline's own groups (the postgres writer's among them) when it first wrote.
    resp = await redis.xreadgroup(GROUP, first.consumer.name, {streams.ALERTS: ">", MARKETS: ">"}, count=100)
    deliveries = [Delivery(s.decode(), eid.decode(), codec.decode_entry(f)) for s, entries in resp
                  for eid, f in entries]
    assert len(deliveries) == 4  # 25 alerts in entries of 10: 3 entries, plus one of markets
    await first.handle(deliveries)
    await first.close()
    assert (await redis.xpending(streams.ALERTS, GROUP))["pending"] == 3

    # Restarted under the same name, it first processes what it left pending: the same entries again.
    second = PostgresWriter(wset, "t")
    try:
        await run_until(second, lambda: second.counters()["acked"] == 4)
        c = second.counters()
        assert (c["alerts_stored"], c["alerts_duplicate"]) == (0, 25)
        assert c["delivered"] == 4
        # And once more by hand, as a claim by another instance would.
        await second.handle(deliveries)
    finally:
        await second.close()
    conn = await asyncpg.connect(scratch_dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM quality_alerts") == 25
        assert await conn.fetchval("SELECT count(DISTINCT values->>'trade_id') FROM quality_alerts") == 25
        assert await conn.fetchval("SELECT count(*) FROM markets") == 2
    finally:
        await conn.close()
    assert (await redis.xpending(streams.ALERTS, GROUP))["pending"] == 0


async def test_alert_text_with_nul_characters_is_stored(redis, settings, scratch_dsn) -> None:
    writer = PostgresWriter(writer_settings(settings, scratch_dsn), "t")
    try:
        nul = alert(1, values={"raw": "a\x00b", "none": None})
        await writer.handle([Delivery(streams.ALERTS, "5-0", [nul])])
    finally:
        await writer.close()
    conn = await asyncpg.connect(scratch_dsn)
    try:
        values = msgspec.json.decode(await conn.fetchval('SELECT "values" FROM quality_alerts'))
    finally:
        await conn.close()
    assert values == {"raw": "a\ufffdb", "none": None}


async def test_postgres_down_raises_store_unavailable_and_loses_nothing(redis, settings, scratch_dsn) -> None:
    producer = Producer(redis, Codec(), FAST, "test")
    await producer.publish({streams.ALERTS: [alert(i) for i in range(5)], MARKETS: [market()]})
    port = closed_port()
    down_dsn = f"postgresql://postgres:s3cret@127.0.0.1:{port}/market_data"
    down = PostgresWriter(writer_settings(settings, down_dsn), "t")
    try:
        with pytest.raises(StoreUnavailable) as info:
            await down.handle(await read_deliveries(redis, streams.ALERTS))
        message = str(info.value)
        assert f"127.0.0.1:{port}/market_data" in message and "s3cret" not in message
        assert "make stores" in message

        await run_until(down, lambda: down.state == "degraded" and f":{port}/" in down.detail, timeout=5)
        await asyncio.sleep(0.3)
        assert down.counters()["acked"] == 0
        assert down.counters()["alerts_stored"] == 0
    finally:
        await down.close()

    # Everything is still in Redis: a writer that can reach PostgreSQL stores all of it.
    up = PostgresWriter(writer_settings(settings, scratch_dsn), "t")
    try:
        await run_until(up, lambda: up.counters()["acked"] == 2)
        assert (up.counters()["alerts_stored"], up.counters()["markets_upserted"]) == (5, 1)
    finally:
        await up.close()


class TcpProxy:
    """A TCP relay to PostgreSQL the test can cut (every connection reset) and restore on the same port."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.port = 0
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()
        for w in self.writers:
            w.transport.abort()
        self.writers.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self.writers += [writer, up_writer]

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except OSError:
                pass
            finally:
                dst.transport.abort()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))


async def test_outage_while_running_is_retried_in_place_without_loss(redis, settings, scratch_dsn) -> None:
    parts = urlsplit(scratch_dsn)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    await proxy.start()
    netloc = f"{parts.username or 'postgres'}@127.0.0.1:{proxy.port}"
    via_proxy = urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    producer = Producer(redis, Codec(), FAST, "test")
    await producer.publish({streams.ALERTS: [alert(i) for i in range(5)], MARKETS: [market()]})
    writer = PostgresWriter(writer_settings(settings, via_proxy), "t")
    stop = asyncio.Event()
    task = asyncio.create_task(writer.run(stop))
    try:
        async with asyncio.timeout(10):
            while writer.counters()["alerts_stored"] < 5:
                await asyncio.sleep(0.02)
        await proxy.cut()  # PostgreSQL goes away under the running writer
        await producer.publish({streams.ALERTS: [alert(i) for i in range(5, 12)]})
        async with asyncio.timeout(10):
            while writer.counters()["store_retries"] < 2:
                await asyncio.sleep(0.02)
        assert writer.state == "degraded" and f"127.0.0.1:{proxy.port}" in writer.detail
        assert (await redis.xpending(streams.ALERTS, GROUP))["pending"] == 1  # held, not acknowledged
        assert writer.counters()["alerts_stored"] == 5

        await proxy.start()  # back on the same port
        async with asyncio.timeout(30):
            while writer.counters()["alerts_stored"] < 14:  # 12, and the outage's own two alerts
                await asyncio.sleep(0.02)
        assert writer.state == "running"
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await writer.close()
        await proxy.cut()
    conn = await asyncpg.connect(scratch_dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM quality_alerts WHERE rule = 'trade.price_positive'") == 12
        # The outage itself is stated once: when it began and when it ended.
        rules = await conn.fetch("SELECT rule FROM quality_alerts WHERE rule LIKE 'store.%' ORDER BY rule")
        assert [r["rule"] for r in rules] == ["store.recovered", "store.unavailable"]
    finally:
        await conn.close()
    c = writer.counters()
    assert (c["dead_lettered"], c["failures"], c["alerts_duplicate"]) == (0, 0, 0)
    assert (await redis.xpending(streams.ALERTS, GROUP))["pending"] == 0


# -- strategy events: the helper, the stream, the writer ------------------------------------------------------

STRATEGY = "mean-revert"
STREAM = streams.strategy(STRATEGY)
T0_S = T0.replace(microsecond=0)


def fill(i: int, strategy: str = STRATEGY, price: str = "61837.63", amount: str = "0.02", fee: str = "0.00123675",
         symbol: str = "BTC/USDT", order_id: str | None = "8389765", ts: int | None = None) -> Fill:
    """A fill shaped like the first trades of the real spot capture (trade ids 3735683259...)."""
    at = stubs.T0_NS + i * 1_000_001 if ts is None else ts
    return Fill(strategy=strategy, exchange="binance", symbol=symbol, side="buy" if i % 2 else "sell",
                price=Decimal(price), amount=Decimal(amount), fee=Decimal(fee), fee_currency="USDT",
                exchange_trade_id=str(3735683259 + i), order_id=order_id, ts_event=at, ts_recv=at + 500_000)


def position(at: int, quantity: str, avg_price: str | None, strategy: str = STRATEGY,
             realized: str = "0") -> PositionUpdate:
    return PositionUpdate(strategy=strategy, exchange="binance", symbol="BTC/USDT", quantity=Decimal(quantity),
                          avg_price=None if avg_price is None else Decimal(avg_price),
                          realized_pnl=Decimal(realized), ts_event=at, ts_recv=at + 1)


def strategy_settings(settings: Settings, dsn: str, copy_min_rows: int = 500) -> Settings:
    return msgspec.structs.replace(writer_settings(settings, dsn),
                                   postgres_writer=PostgresWriterSettings(copy_min_rows=copy_min_rows))


async def fetch(dsn: str, sql: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


async def alerts_on_bus(redis, rule: str) -> list[Alert]:
    codec = Codec()
    return [a for _, f in await redis.xrange(streams.ALERTS) for a in codec.decode_entry(f)
            if isinstance(a, Alert) and a.rule == rule]


async def test_helper_publishes_what_the_writer_stores(redis, settings, scratch_dsn) -> None:
    # Arrange: a strategy registers, fills twice, reports its position and a metric, through the helper.
    events = StrategyEvents(redis, STRATEGY, bus=FAST)
    info = await events.register(description="z-score mean reversion", params={"window": 20, "z": "2.5"})
    buy = await events.fill(exchange="binance", symbol="BTC/USDT", side="buy", price="61837.63000001",
                            amount="0.02", fee="0.00123675", fee_currency="USDT", exchange_trade_id="3735683259",
                            order_id="8389765", ts_event=stubs.T0_NS)
    await events.fill(exchange="binance", symbol="BTC/USDT", side="sell", price=61900.5, amount=Decimal("0.01"),
                      exchange_trade_id="3735683301", ts_event=stubs.T0_NS + 7_000_000_000)
    pos = await events.position(exchange="binance", symbol="BTC/USDT", quantity="0.01",
                                avg_price="61837.63000001", realized_pnl="0.62869999")
    met = await events.metric("pnl", "0.62869999", period="1d", ts_event=stubs.T0_NS)
    assert (await redis.xlen(STREAM)) == 5  # one entry per call, on the strategy's own stream
    writer = PostgresWriter(strategy_settings(settings, scratch_dsn), "t")
    # Act
    try:
        await run_until(writer, lambda: writer.counters()["acked"] == 5)
    finally:
        await writer.close()
    # Assert
    [s] = await fetch(scratch_dsn, "SELECT * FROM strategies")
    assert (s["name"], s["description"], s["active"], s["registered_ns"]) == \
        (STRATEGY, "z-score mean reversion", True, info.ts_event)
    assert msgspec.json.decode(s["params"]) == {"window": 20, "z": "2.5"}
    trades = await fetch(scratch_dsn, "SELECT * FROM trades ORDER BY ts")
    assert [(t["strategy_id"], t["side"], t["price"], t["amount"], t["exchange_trade_id"], t["exchange_order_id"])
            for t in trades] == [(s["id"], "buy", Decimal("61837.63000001"), Decimal("0.02"), "3735683259", "8389765"),
                                 (s["id"], "sell", Decimal("61900.5"), Decimal("0.01"), "3735683301", None)]
    assert trades[0]["ts"] == T0 and trades[0]["cost"] == buy.price * buy.amount
    assert (trades[0]["fee"], trades[0]["fee_currency"], trades[1]["fee"]) == (Decimal("0.00123675"), "USDT", 0)
    [p] = await fetch(scratch_dsn, "SELECT * FROM positions")
    assert (p["quantity"], p["avg_price"], p["realized_pnl"], p["as_of_ns"]) == \
        (Decimal("0.01"), Decimal("61837.63000001"), Decimal("0.62869999"), pos.ts_event)
    assert p["as_of"] == datetime.fromtimestamp(pos.ts_event // 1000 / 1e6, UTC)
    assert len(await fetch(scratch_dsn, "SELECT * FROM position_history")) == 1
    [m] = await fetch(scratch_dsn, "SELECT * FROM performance_metrics")
    assert (m["metric"], m["period"], m["ts"], m["value"], m["revision_ns"]) == \
        ("pnl", "1d", T0, Decimal("0.62869999"), met.ts_recv)
    [pnl] = await fetch(scratch_dsn, "SELECT * FROM strategy_pnl")
    assert (pnl["strategy"], pnl["fills"], pnl["net_quantity"], pnl["fees_in_quote"], pnl["position_quantity"]) == \
        (STRATEGY, 2, Decimal("0.01"), Decimal("0.00123675"), Decimal("0.01"))
    assert pnl["cash_flow"] == Decimal("61900.5") * Decimal("0.01") - buy.price * buy.amount
    c = writer.counters()
    assert (c["strategies_registered"], c["fills_stored"], c["positions_updated"], c["metrics_stored"]) == (1, 2, 1, 1)
    assert (c["strategies_auto_registered"], c["rejected"], c["dead_lettered"], c["failures"]) == (0, 0, 0, 0)
    assert (await redis.xpending(STREAM, GROUP))["pending"] == 0


async def test_helper_refuses_bad_events_before_they_leave(redis) -> None:
    events = StrategyEvents(redis, STRATEGY, bus=FAST)
    args = {"exchange": "binance", "symbol": "BTC/USDT", "side": "buy", "amount": "1", "exchange_trade_id": "1"}
    with pytest.raises(StrategyEventError, match=r"fill '1' of strategy 'mean-revert'.*price = -1 must be positive"):
        await events.fill(price="-1", **args)  # type: ignore[arg-type]
    with pytest.raises(StrategyEventError, match="price = NaN is not a finite number"):
        await events.fill(price="NaN", **args)  # type: ignore[arg-type]
    with pytest.raises(StrategyEventError, match="fee = 0.1 has no fee_currency"):
        await events.fill(price="1", fee="0.1", **args)  # type: ignore[arg-type]
    with pytest.raises(StrategyEventError, match="price = 'abc' is not a number"):
        await events.fill(price="abc", **args)  # type: ignore[arg-type]
    with pytest.raises(StrategyEventError, match="outside what is stored exactly"):
        await events.fill(price="1E+200000", **args)  # type: ignore[arg-type]
    with pytest.raises(StrategyEventError, match="quantity = 1 is open but avg_price is missing"):
        await events.position(exchange="binance", symbol="BTC/USDT", quantity="1")
    await events.position(exchange="binance", symbol="BTC/USDT", quantity="0", ts_event=stubs.T0_NS)
    with pytest.raises(StrategyEventError, match="is not after the previous update"):
        await events.position(exchange="binance", symbol="BTC/USDT", quantity="0", ts_event=stubs.T0_NS)
    with pytest.raises(StrategyEventError, match="params cannot be stored as JSON"):
        await events.register(params={"when": object()})
    with pytest.raises(StrategyEventError, match="glob or control character"):
        StrategyEvents(redis, "mean*")
    with pytest.raises(StrategyEventError, match="leading/trailing spaces"):
        StrategyEvents(redis, " x")
    with pytest.raises(StrategyEventError, match="is for strategy 'other'"):
        await events.publish([fill(1, strategy="other")])
    # Only the one good position update left the process.
    assert [type(e) for _, f in await redis.xrange(STREAM) for e in Codec().decode_entry(f)] == [PositionUpdate]


async def test_strategy_events_delivered_twice_are_stored_once(redis, settings, scratch_dsn) -> None:
    # Arrange: a register, 30 fills (several entries), positions and metrics; the writer stores them.
    producer = Producer(redis, Codec(), FAST, "test")
    info = StrategyInfo(strategy=STRATEGY, description="d", params={"w": 1}, ts_event=stubs.T0_NS,
                        ts_recv=stubs.T0_NS)
    metric = PerformanceMetric(strategy=STRATEGY, metric="pnl", period="1d", value=Decimal("3.5"),
                               ts_event=stubs.T0_NS, ts_recv=stubs.T0_NS + 9)
    await producer.publish({STREAM: [info, *(fill(i) for i in range(30)), position(stubs.T0_NS, "0.02", "61837.63"),
                                     position(stubs.T0_NS + 1, "0", None, realized="0.5"), metric]})
    wset = strategy_settings(settings, scratch_dsn, copy_min_rows=5)
    writer = PostgresWriter(wset, "t")
    try:
        await run_until(writer, lambda: writer.counters()["acked"] == 4)
    finally:
        await writer.close()
    tables = ("strategies", "trades", "positions", "position_history", "performance_metrics")
    before = {t: [dict(r) for r in await fetch(scratch_dsn, f"SELECT * FROM {t} ORDER BY 1, 2")] for t in tables}

    # Act: every entry delivered again, as after a crash before the acks or a takeover (the COPY path sees
    # only duplicates and falls back to staging), and then once more with a small-batch writer.
    again = PostgresWriter(wset, "t2")
    small = PostgresWriter(strategy_settings(settings, scratch_dsn, copy_min_rows=10**6), "t3")
    try:
        await again.handle(await read_deliveries(redis, STREAM))
        await small.handle(await read_deliveries(redis, STREAM))
    finally:
        await again.close()
        await small.close()

    # Assert: not one row added or changed (updated_at included), every copy counted as a duplicate.
    after = {t: [dict(r) for r in await fetch(scratch_dsn, f"SELECT * FROM {t} ORDER BY 1, 2")] for t in tables}
    assert after == before
    assert [len(before[t]) for t in tables] == [1, 30, 1, 2, 1]
    for w in (again, small):
        c = w.counters()
        assert (c["fills_stored"], c["fills_duplicate"], c["strategies_registered"], c["positions_updated"],
                c["position_history_stored"], c["metrics_stored"], c["rejected"]) == (0, 30, 0, 0, 0, 0, 0)
    assert again.counters()["copy_batches"] == 1 and again.counters()["copy_direct"] == 0
    assert small.counters()["copy_batches"] == 0


async def test_an_older_position_never_overwrites_a_newer_one(redis, settings, scratch_dsn) -> None:
    producer = Producer(redis, Codec(), FAST, "test")
    writer = PostgresWriter(strategy_settings(settings, scratch_dsn), "t")

    def seen(n: int) -> Callable[[], bool]:
        return lambda: writer.counters()["positions_updated"] + writer.counters()["positions_stale"] == n

    t1, t2, t3 = stubs.T0_NS, stubs.T0_NS + 60 * 10**9, stubs.T0_NS + 60 * 10**9 + 1  # t3: 1 ns after t2
    try:
        # Arrange: the newest position first, then (late) an older one, then one 1 ns newer in the same batch
        # as a stale copy of the first.
        await producer.publish({STREAM: [position(t2, "0.05", "61900")]})
        await run_until(writer, seen(1))
        # Act
        await producer.publish({STREAM: [position(t1, "0.02", "61837.63")]})
        await run_until(writer, seen(2))
        mid = await fetch(scratch_dsn, "SELECT quantity, avg_price, as_of_ns FROM positions")
        await producer.publish({STREAM: [position(t3, "-0.01", "61950", realized="0.25"),
                                         position(t1, "0.02", "61837.63")]})
        await run_until(writer, seen(4))
    finally:
        await writer.close()
    # Assert: the late t1 did not win; t3 (1 ns later, same microsecond as t2) did.
    assert [tuple(r) for r in mid] == [(Decimal("0.05"), Decimal(61900), t2)]
    [p] = await fetch(scratch_dsn, "SELECT quantity, avg_price, realized_pnl, as_of_ns FROM positions")
    assert tuple(p) == (Decimal("-0.01"), Decimal(61950), Decimal("0.25"), t3)
    history = await fetch(scratch_dsn, "SELECT as_of_ns, quantity FROM position_history ORDER BY as_of_ns")
    assert [tuple(r) for r in history] == [(t1, Decimal("0.02")), (t2, Decimal("0.05")), (t3, Decimal("-0.01"))]
    c = writer.counters()
    assert (c["positions_updated"], c["positions_stale"], c["rejected"]) == (2, 2, 0)


async def test_a_metric_revision_only_moves_forward(redis, settings, scratch_dsn) -> None:
    def rev(value: str, revision: int) -> PerformanceMetric:
        return PerformanceMetric(strategy=STRATEGY, metric="pnl", period="1d", value=Decimal(value),
                                 ts_event=stubs.T0_NS, ts_recv=stubs.T0_NS + revision)

    writer = PostgresWriter(strategy_settings(settings, scratch_dsn), "t")
    try:
        await writer.handle([Delivery(STREAM, "1-0", [rev("1.5", 2)])])
        await writer.handle([Delivery(STREAM, "2-0", [rev("0.5", 1), rev("1.5", 2)])])  # older, and a copy
        stale = await fetch(scratch_dsn, "SELECT value, revision_ns FROM performance_metrics")
        await writer.handle([Delivery(STREAM, "3-0", [rev("2.25", 3)])])
    finally:
        await writer.close()
    assert [tuple(r) for r in stale] == [(Decimal("1.5"), stubs.T0_NS + 2)]
    final = await fetch(scratch_dsn, "SELECT value, revision_ns FROM performance_metrics")
    assert [tuple(r) for r in final] == [(Decimal("2.25"), stubs.T0_NS + 3)]


async def test_a_fill_of_an_unregistered_strategy_registers_it_and_alerts(redis, settings, scratch_dsn) -> None:
    # Arrange: "scalper" publishes fills without registering first.
    producer = Producer(redis, Codec(), FAST, "test")
    await producer.publish({streams.strategy("scalper"): [fill(i, strategy="scalper") for i in range(3)]})
    writer = PostgresWriter(strategy_settings(settings, scratch_dsn), "t")
    try:
        # Act
        await run_until(writer, lambda: writer.counters()["fills_stored"] == 3)
        [auto] = await fetch(scratch_dsn, "SELECT id, name, description, params, registered_ns FROM strategies")
        # ... and registers later: the same row gets its description.
        await StrategyEvents(redis, "scalper", bus=FAST).register(description="1s scalper", params={"edge": 2})
        await run_until(writer, lambda: writer.counters()["strategies_registered"] == 1)
    finally:
        await writer.close()
    # Assert: nothing lost, the name registered with empty params, a warning on the bus (stored by the writer).
    assert (auto["name"], auto["description"], msgspec.json.decode(auto["params"]), auto["registered_ns"]) == \
        ("scalper", "", {}, 0)
    [row] = await fetch(scratch_dsn, "SELECT id, description, registered_ns FROM strategies")
    assert row["id"] == auto["id"] and row["description"] == "1s scalper" and row["registered_ns"] > 0
    assert [r["strategy_id"] for r in await fetch(scratch_dsn, "SELECT strategy_id FROM trades")] == [auto["id"]] * 3
    [warning] = await alerts_on_bus(redis, "postgres_writer.strategy_auto_registered")
    assert warning.severity == "warning" and warning.values["strategy"] == "scalper"
    assert "'scalper' was not registered" in warning.reason and "register()" in warning.reason
    assert writer.counters()["strategies_auto_registered"] == 1


async def test_copy_and_small_batch_paths_give_identical_tables(redis, settings, scratch_dsn, postgres_dsn) -> None:
    # Arrange: 600 fills made of real trades (two symbols, real prices, amounts and ids), in 2 deliveries,
    # the second repeating 100 of the first (a partial redelivery).
    fills = real_fills(STRATEGY, 600)
    first, second = fills[:350], fills[250:]
    deliveries = [Delivery(STREAM, "1-0", [*first]), Delivery(STREAM, "2-0", [*second])]
    other = f"{urlsplit(postgres_dsn).path.lstrip('/')}_pw_small"
    admin = await asyncpg.connect(with_db(postgres_dsn, "postgres"))
    await admin.execute(f'DROP DATABASE IF EXISTS "{other}"')
    await admin.execute(f'CREATE DATABASE "{other}"')
    other_dsn = with_db(postgres_dsn, other)
    copying = PostgresWriter(strategy_settings(settings, scratch_dsn, copy_min_rows=1), "c")
    small = PostgresWriter(strategy_settings(settings, other_dsn, copy_min_rows=10**6), "s")
    try:
        # Act: one writer per path, each batch alone (as the bus hands them over).
        for d in deliveries:
            await copying.handle([d])
            await small.handle([d])
        sql = ("SELECT s.name, t.exchange, t.symbol, t.side, t.price::text, t.amount::text, t.cost::text, "
               "t.fee::text, t.fee_currency, t.exchange_trade_id, t.exchange_order_id, t.ts "
               "FROM trades t JOIN strategies s ON s.id = t.strategy_id ORDER BY t.exchange_trade_id, t.symbol")
        by_copy = [tuple(r) for r in await fetch(scratch_dsn, sql)]
        by_unnest = [tuple(r) for r in await fetch(other_dsn, sql)]
    finally:
        await copying.close()
        await small.close()
        await admin.execute(f'DROP DATABASE IF EXISTS "{other}" WITH (FORCE)')
        await admin.close()
    # Assert: the same 600 rows, to the digit and microsecond (text forms: scale kept, e.g. 0.02000000).
    assert len(by_copy) == 600 and by_copy == by_unnest
    assert {r[2] for r in by_copy} == {"BTC/USDT", "ETH/USDT"}
    assert sorted((r[9], r[2], r[4], r[5]) for r in by_copy) == \
        sorted((f.exchange_trade_id, f.symbol, str(f.price), str(f.amount)) for f in fills)  # e.g. 0.02000000
    cc, sc = copying.counters(), small.counters()
    assert (cc["copy_batches"], cc["copy_direct"], sc["copy_batches"]) == (2, 1, 0)  # 2nd: staged (duplicates)
    assert (cc["fills_stored"], cc["fills_duplicate"]) == (sc["fills_stored"], sc["fills_duplicate"]) == (600, 100)


async def test_bad_events_are_dead_lettered_with_the_reason_and_the_rest_is_written(redis, settings, scratch_dsn) -> None:
    # Arrange (raw producer: the helper would refuse these): entry 1 holds good fills, a negative price and a
    # fill with the id of a stored one but another price; entry 2 good fills and one PostgreSQL refuses
    # (an exchange trade id too long for the unique index); entry 3 an event naming another strategy.
    producer = Producer(redis, Codec(), msgspec.structs.replace(FAST, batch_max_events=100), "test")
    writer = PostgresWriter(strategy_settings(settings, scratch_dsn), "t")
    huge_id = os.urandom(4000).hex()  # 8000 incompressible characters
    try:
        await writer.handle([Delivery(STREAM, "1-0", [fill(0)])])
        await producer.publish({STREAM: [fill(1), fill(2, price="-1"), fill(0, price="61000"), fill(3)]})
        await producer.publish({STREAM: [fill(10 + i) for i in range(12)] +
                                [msgspec.structs.replace(fill(30), exchange_trade_id=huge_id)]})
        await producer.publish({STREAM: [fill(40, strategy="other")]})
        # Act
        await run_until(writer, lambda: writer.counters()["dead_lettered"] == 3)
    finally:
        await writer.close()
    # Assert: every good fill stored, once; nothing pending, nothing retried.
    ids = [r[0] for r in await fetch(scratch_dsn, "SELECT exchange_trade_id FROM trades ORDER BY 1")]
    assert ids == sorted(str(3735683259 + i) for i in [0, 1, 3, *range(10, 22)])
    [original] = await fetch(scratch_dsn, "SELECT price FROM trades WHERE exchange_trade_id = '3735683259'")
    assert original["price"] == Decimal("61837.63")  # the contradicting copy did not overwrite it
    assert (await redis.xpending(STREAM, GROUP))["pending"] == 0
    c = writer.counters()
    # Dead-lettered at the first delivery: no failure left an entry pending for another try.
    assert (c["failures"], c["store_retries"], c["rejected"], c["dead_lettered"]) == (0, 0, 4, 3)
    assert c["isolation_splits"] >= 1
    letters = {f[b"entry_id"].decode(): f for _, f in await redis.xrange(streams.dead_letter(STREAM))}
    entries = [eid.decode() for eid, _ in await redis.xrange(STREAM)]
    assert sorted(letters) == sorted(entries)
    first, second, third = (letters[e][b"reason"].decode() for e in entries)
    assert "event #1 (fill '3735683261' of strategy 'mean-revert' on binance BTC/USDT): price = -1 must be " \
           "positive" in first
    assert "event #2 (fill '3735683259'" in first and "contradicts the stored fill" in first
    assert "price 61837.63" in first and "price 61000" in first and "rejected 2 event(s)" in first
    assert "event #12 (fill '" in second and "... (8000 characters)' of strategy" in second
    assert "PostgreSQL refused it: ProgramLimitExceededError: index row size" in second and huge_id not in second
    assert "names strategy 'other' but was published on strategy:mean-revert" in third
    assert len(Codec().decode(letters[entries[0]][b"orig_d"])) == 4  # the original entry goes with its reasons
    rejected = await alerts_on_bus(redis, "postgres_writer.rejected")
    assert len(rejected) == 4 and {a.severity for a in rejected} == {"error"}
    assert all(a.values["dead_letter"] == streams.dead_letter(STREAM) for a in rejected)


async def test_migration_0003_refuses_what_numeric_would_let_through(db: asyncpg.Connection) -> None:
    sid = await db.fetchval("INSERT INTO strategies (name) VALUES ('s') RETURNING id")
    fill_sql = ("INSERT INTO trades (strategy_id, exchange, symbol, side, price, amount, fee, fee_currency, "
                "exchange_trade_id, ts) VALUES ($1, 'binance', 'BTC/USDT', 'buy', $2::numeric, 1, $3::numeric, $4, "
                "'t1', now())")
    for price in ("NaN", "Infinity"):  # NaN > 0 is true in PostgreSQL: 0002's CHECK (price > 0) lets it in
        with pytest.raises(asyncpg.CheckViolationError, match="trades_numbers_finite"):
            await db.execute(fill_sql, sid, price, "0", None)
    with pytest.raises(asyncpg.CheckViolationError, match="trades_fee_currency_named"):
        await db.execute(fill_sql, sid, "1", "0.1", "")
    with pytest.raises(asyncpg.CheckViolationError, match="position_history"):
        await db.execute("INSERT INTO position_history (strategy_id, exchange, symbol, as_of_ns, as_of, quantity) "
                         "VALUES ($1, 'binance', 'BTC/USDT', 1, now(), 1)", sid)  # open without avg_price
    with pytest.raises(asyncpg.CheckViolationError, match="performance_metrics_value_finite"):
        await db.execute("INSERT INTO performance_metrics (strategy_id, metric, ts, value) "
                         "VALUES ($1, 'pnl', now(), 'NaN')", sid)
    assert await db.fetchval("SELECT registered_ns FROM strategies WHERE id = $1", sid) == 0


async def test_postgres_down_strategy_events_wait_in_redis_and_nothing_is_lost(redis, settings, scratch_dsn) -> None:
    # Arrange: a running writer through a relay to PostgreSQL, and a strategy publishing fills.
    parts = urlsplit(scratch_dsn)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    await proxy.start()
    via_proxy = urlunsplit((parts.scheme, f"{parts.username or 'postgres'}@127.0.0.1:{proxy.port}", parts.path,
                            parts.query, parts.fragment))
    events = StrategyEvents(redis, STRATEGY, bus=FAST)
    await events.register(description="registered: no auto-registration alert on the bus")
    await events.publish([fill(i) for i in range(20)])
    writer = PostgresWriter(strategy_settings(settings, via_proxy, copy_min_rows=5), "t")
    stop = asyncio.Event()
    task = asyncio.create_task(writer.run(stop))
    try:
        async with asyncio.timeout(10):
            while writer.counters()["fills_stored"] < 20:
                await asyncio.sleep(0.02)
        # Act: PostgreSQL goes away; the strategy keeps publishing.
        await proxy.cut()
        await events.publish([fill(i) for i in range(20, 45)])
        await events.position(exchange="binance", symbol="BTC/USDT", quantity="0.5", avg_price="61837.63")
        async with asyncio.timeout(10):
            while writer.counters()["store_retries"] < 2 or (await redis.xpending(STREAM, GROUP))["pending"] < 1:
                await asyncio.sleep(0.02)
        with pytest.raises(StoreUnavailable, match=f"127.0.0.1:{proxy.port}"):
            await writer.handle(await read_deliveries(redis, STREAM))
        assert writer.state == "degraded"
        assert writer.counters()["fills_stored"] == 20  # the new ones held in Redis, not acknowledged
        await proxy.start()  # back on the same port
        async with asyncio.timeout(30):
            while writer.counters()["positions_updated"] < 1:
                await asyncio.sleep(0.02)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await writer.close()
        await proxy.cut()
    # Assert: every fill exactly once, the position too, nothing dead-lettered.
    assert [r[0] for r in await fetch(scratch_dsn, "SELECT count(*) FROM trades")] == [45]
    assert [r[0] for r in await fetch(scratch_dsn, "SELECT quantity FROM positions")] == [Decimal("0.5")]
    c = writer.counters()
    assert (c["fills_stored"], c["dead_lettered"], c["failures"], c["rejected"]) == (45, 0, 0, 0)
    assert (await redis.xpending(STREAM, GROUP))["pending"] == 0


async def test_0003_upgrades_a_database_with_data_and_the_writer_moves_it_forward(redis, settings, scratch_dsn,
                                                                                   tmp_path: Path) -> None:
    # Arrange: a user's database at 0002 with a strategy, a fill, a position and a metric written by hand.
    (tmp_path / "m").mkdir()
    for m in load_migrations()[:2]:
        shutil.copy(m.path, tmp_path / "m" / m.path.name)
    assert await migrate(scratch_dsn, tmp_path / "m") == ["0001", "0002"]
    conn = await asyncpg.connect(scratch_dsn)
    try:
        sid = await conn.fetchval("INSERT INTO strategies (name, params) VALUES ($1, '{\"w\": 5}') RETURNING id",
                                  STRATEGY)
        await conn.execute("INSERT INTO trades (strategy_id, exchange, symbol, side, price, amount, exchange_trade_id, "
                           "ts) VALUES ($1, 'binance', 'BTC/USDT', 'buy', 61000, 0.1, '1', now())", sid)
        await conn.execute("INSERT INTO positions (strategy_id, exchange, symbol, quantity, avg_price) "
                           "VALUES ($1, 'binance', 'BTC/USDT', 0.1, 61000)", sid)
        await conn.execute("INSERT INTO performance_metrics (strategy_id, metric, ts, value) "
                           "VALUES ($1, 'pnl', $2, 1)", sid, T0)
    finally:
        await conn.close()

    # Act: the rest of the migrations, then the writer with a new position and a recomputed metric.
    assert await migrate(scratch_dsn) == VERSIONS[2:]
    writer = PostgresWriter(strategy_settings(settings, scratch_dsn), "t")
    metric = PerformanceMetric(strategy=STRATEGY, metric="pnl", period="all", value=Decimal(2),
                               ts_event=stubs.T0_NS, ts_recv=stubs.T0_NS + 5)
    try:
        await writer.handle([Delivery(STREAM, "1-0", [position(stubs.T0_NS, "0.3", "61500"), metric])])
    finally:
        await writer.close()

    # Assert: the old rows kept (a strategy created before 0003 reads registered_ns 0 until it registers
    # again), and the hand-written position and metric (ordering keys 0) replaced by the newer events.
    [s] = await fetch(scratch_dsn, "SELECT id, registered_ns, params FROM strategies")
    assert (s["id"], s["registered_ns"], msgspec.json.decode(s["params"])) == (sid, 0, {"w": 5})
    assert [r[0] for r in await fetch(scratch_dsn, "SELECT price FROM trades")] == [Decimal(61000)]
    [p] = await fetch(scratch_dsn, "SELECT quantity, as_of_ns FROM positions")
    assert tuple(p) == (Decimal("0.3"), stubs.T0_NS)
    [m] = await fetch(scratch_dsn, "SELECT value, revision_ns FROM performance_metrics")
    assert tuple(m) == (Decimal(2), stubs.T0_NS + 5)
    assert writer.counters()["strategies_auto_registered"] == 0
