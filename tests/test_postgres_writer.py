"""Migrations and the PostgreSQL writer on a real PostgreSQL and a real Redis: schema, constraints,
idempotent upserts through the bus, redelivery, and PostgreSQL going away."""

from __future__ import annotations

import asyncio
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

from common import streams
from common.bus import Delivery, Producer, StoreUnavailable
from common.config import BusSettings, Settings
from common.migrate import MIGRATIONS_DIR, MigrationError, load_migrations, migrate
from schemas import Alert, Codec, Market
from services.postgres_writer.service import GROUP, PostgresWriter
from tests import stubs

FAST = BusSettings(stream_maxlen=1000, backpressure_high_water=500, backpressure_max_wait_s=0.5,
                   batch_max_events=10, read_count=50, block_ms=50, claim_idle_ms=60_000, max_deliveries=3)
MARKETS = streams.markets("binance")
ALL_TABLES = {"schema_migrations", "markets", "quality_alerts", "strategies", "trades", "positions",
              "performance_metrics"}
_db_numbers = count()
T0 = datetime(2024, 8, 8, 23, 54, 15, 342_000, tzinfo=UTC)  # stubs.T0_NS


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


async def run_until(writer: PostgresWriter, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(writer.run(stop))
    try:
        async with asyncio.timeout(timeout):
            while not predicate():
                if task.done():
                    task.result()  # the run loop crashed: show why
                    raise AssertionError("the writer's run loop returned before the condition held")
                await asyncio.sleep(0.02)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def read_deliveries(redis, stream: str) -> list[Delivery]:  # type: ignore[no-untyped-def]
    codec = Codec()
    return [Delivery(stream, eid.decode(), codec.decode_entry(fields))
            for eid, fields in await redis.xrange(stream)]


# -- migrations --------------------------------------------------------------------------------

async def test_migrations_apply_in_order_and_are_recorded(scratch_dsn: str) -> None:
    files = load_migrations()
    assert [m.version for m in files] == ["0001", "0002"]

    applied = await migrate(scratch_dsn)

    assert applied == ["0001", "0002"]
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
    assert rows[0]["applied_at"] <= rows[1]["applied_at"]
    assert tables == ALL_TABLES


async def test_rerun_applies_nothing(scratch_dsn: str) -> None:
    await migrate(scratch_dsn)
    assert await migrate(scratch_dsn) == []
    conn = await asyncpg.connect(scratch_dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM schema_migrations") == 2
    finally:
        await conn.close()


async def test_concurrent_runs_apply_each_migration_once(scratch_dsn: str) -> None:
    # Four processes starting together: the advisory lock lets one apply, the others find nothing to do.
    results = await asyncio.gather(*(migrate(scratch_dsn) for _ in range(4)))

    assert sorted(results) == [[], [], [], ["0001", "0002"]]


async def test_changed_checksum_is_refused_naming_the_file(scratch_dsn: str, tmp_path: Path) -> None:
    shutil.copytree(MIGRATIONS_DIR, tmp_path / "m")
    assert await migrate(scratch_dsn, tmp_path / "m") == ["0001", "0002"]
    first = tmp_path / "m" / "0001_initial.sql"
    first.write_text(first.read_text() + "\nCREATE INDEX markets_quote_idx ON markets (quote);\n")
    (tmp_path / "m" / "0003_more.sql").write_text("CREATE TABLE more_things (id int);")

    with pytest.raises(MigrationError, match="0001_initial.sql") as info:
        await migrate(scratch_dsn, tmp_path / "m")

    assert "changed after it was applied" in str(info.value)
    conn = await asyncpg.connect(scratch_dsn)
    try:  # refused before anything ran: neither the edit nor the new file
        assert await conn.fetchval("SELECT to_regclass('more_things')") is None
        assert await conn.fetchval("SELECT to_regclass('markets_quote_idx')") is None
        assert await conn.fetchval("SELECT max(version) FROM schema_migrations") == "0002"
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
    (tmp_path / "m" / "0003_broken.sql").write_text("CREATE TABLE half_done (id int);\nSELECT 1 / 0;\n")

    with pytest.raises(MigrationError, match="0003_broken.sql.*rolled back"):
        await migrate(scratch_dsn, tmp_path / "m")

    conn = await asyncpg.connect(scratch_dsn)
    try:
        assert await conn.fetchval("SELECT to_regclass('half_done')") is None
        assert [r[0] for r in await conn.fetch("SELECT version FROM schema_migrations ORDER BY 1")] == \
            ["0001", "0002"]
    finally:
        await conn.close()
    (tmp_path / "m" / "0003_broken.sql").write_text("CREATE TABLE half_done (id int);\n")
    assert await migrate(scratch_dsn, tmp_path / "m") == ["0003"]


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
    with pytest.raises(MigrationError, match="0000_from_a_branch.sql.*numbered below 0002"):
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
        await db.execute(fill, sid, "hold", Decimal("1"), Decimal("1"), Decimal("0"), "t2")
    with pytest.raises(asyncpg.CheckViolationError, match="price"):
        await db.execute(fill, sid, "sell", Decimal("0"), Decimal("1"), Decimal("0"), "t3")
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await db.execute(fill, sid + 999, "sell", Decimal("1"), Decimal("1"), Decimal("0"), "t4")
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
        await db.execute(metric, sid, Decimal("13"))
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
        await db.execute(insert, "ETH/USDT", Decimal("0"))
    with pytest.raises(asyncpg.CheckViolationError, match="symbol"):
        await db.execute(insert, "", None)
    alert_sql = ("INSERT INTO quality_alerts (stream, entry_id, idx, rule, severity, source, reason, "
                 "ts_event) VALUES ('mdp:alerts', $1, 0, 'r', $2, 'validator', 'why', now())")
    with pytest.raises(asyncpg.CheckViolationError, match="severity"):
        await db.execute(alert_sql, "1-0", "fatal")
    with pytest.raises(asyncpg.CheckViolationError, match="entry_id"):
        await db.execute(alert_sql, "not-an-id", "error")


# -- the writer --------------------------------------------------------------------------------

async def test_writer_upserts_markets_and_stores_alerts_from_the_bus(redis, settings, scratch_dsn) -> None:  # type: ignore[no-untyped-def]
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
        assert rows["BTC/USDT:USDT"]["contract_size"] == Decimal("1")
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


async def test_updating_a_market_changes_its_row_and_never_goes_back(redis, settings, scratch_dsn) -> None:  # type: ignore[no-untyped-def]
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


async def test_redelivered_entries_are_stored_exactly_once(redis, settings, scratch_dsn) -> None:  # type: ignore[no-untyped-def]
    producer = Producer(redis, Codec(), FAST, "test")
    await producer.publish({streams.ALERTS: [alert(i) for i in range(25)],
                            MARKETS: [market(), market("ETH/USDT")]})
    codec = Codec()
    wset = writer_settings(settings, scratch_dsn)
    # A first writer instance reads and stores everything, then dies before acknowledging.
    first = PostgresWriter(wset, "t")
    await redis.xgroup_create(streams.ALERTS, GROUP, id="0")
    await redis.xgroup_create(MARKETS, GROUP, id="0")
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


async def test_alert_text_with_nul_characters_is_stored(redis, settings, scratch_dsn) -> None:  # type: ignore[no-untyped-def]
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


async def test_postgres_down_raises_store_unavailable_and_loses_nothing(redis, settings, scratch_dsn) -> None:  # type: ignore[no-untyped-def]
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


async def test_outage_while_running_is_retried_in_place_without_loss(redis, settings, scratch_dsn) -> None:  # type: ignore[no-untyped-def]
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
            while writer.counters()["alerts_stored"] < 12:
                await asyncio.sleep(0.02)
        assert writer.state == "running"
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await writer.close()
        await proxy.cut()
    conn = await asyncpg.connect(scratch_dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM quality_alerts") == 12
    finally:
        await conn.close()
    c = writer.counters()
    assert (c["dead_lettered"], c["failures"], c["alerts_duplicate"]) == (0, 0, 0)
    assert (await redis.xpending(streams.ALERTS, GROUP))["pending"] == 0
