"""PostgreSQL write throughput: the postgres writer's fills through the bus vs the raw server, same rows, same run.

    python -m tools.bench_postgres [--fills 100000] [--batch 5000] [--only raw,writer,threshold]

Fills are built from the real Binance spot BTC/USDT and ETH/USDT trades of ../shared/data/real/ws-captures
(price, amount, side, trade id and time as recorded; a 0.1 % fee in the quote currency; repeated with fresh
trade ids when more are asked for than were recorded). It starts a private redis-server on a free port and
uses the local PostgreSQL (MDP_BENCH_POSTGRES_DSN, default postgresql://postgres@127.0.0.1:5432/postgres)
with a scratch database it creates, migrates and drops. Every measurement starts from an empty `trades`.

Raw baselines, `--batch` rows per transaction, one connection, rows prepared beforehand:
  copy           binary COPY straight into trades (no conflict handling: the ceiling)
  copy+upsert    binary COPY into a TEMP table, INSERT ... SELECT ... ON CONFLICT DO NOTHING (what the writer does)
  unnest         one INSERT ... SELECT FROM unnest(arrays) ... ON CONFLICT DO NOTHING per batch
  executemany    INSERT ... VALUES ($1..$11) ON CONFLICT DO NOTHING, executemany per batch
The writer: the stream strategy:bench pre-filled (500 fills per entry), then PostgresWriter.run in this
process until every fill is stored: XREADGROUP, decode, checks, rows, COPY/unnest, commit, XACK.
Threshold: the writer's own two paths (StrategyStore with copy_min_rows forced) at batch sizes 1..5000.
Prints Markdown; the figures and their reading are in docs/bench-postgres.md.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import heapq
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import msgspec

from common.bus import streams
from common.bus.core import Producer
from common.config import PROJECT_ROOT, BusSettings, PostgresWriterSettings, Settings, load_settings
from common.stores.postgres import migrate
from schemas import Event
from schemas.events import Fill
from services.postgres_writer.batch import Item, ts
from services.postgres_writer.strategy_store import CREATE_STAGE, StrategyStore
from simulator.recording import real_data_dir
from tools.localstores import start_redis

REAL = real_data_dir(PROJECT_ROOT)  # MDP_REAL_DATA, ../shared/data/real, or the shipped data/real
CAPTURES = (("binance_spot_btcusdt_20240808.gz", "BTC/USDT"), ("binance_spot_btcusdt_20240809.gz", "BTC/USDT"),
            ("binance_spot_ethusdt_20240808.gz", "ETH/USDT"))
FEE_RATE = Decimal("0.001")
RAW_STAGE = """
CREATE TEMP TABLE IF NOT EXISTS raw_stage (
    strategy_id bigint, exchange text, symbol text, side text, price numeric, amount numeric, fee numeric,
    fee_currency text, exchange_trade_id text, exchange_order_id text, ts timestamptz
) ON COMMIT DELETE ROWS
"""
TRADE_COLUMNS = ("strategy_id", "exchange", "symbol", "side", "price", "amount", "fee", "fee_currency",
                 "exchange_trade_id", "exchange_order_id", "ts")


def _capture_trades(name: str, symbol: str) -> Iterator[tuple[int, str, dict[str, Any]]]:
    path = REAL / "ws-captures" / name
    if not path.exists():
        raise FileNotFoundError(f"real capture {path} not found; fills are made of ../shared/data/real "
                                f"(set MDP_REAL_DATA to its folder)")
    with gzip.open(path, "rt") as f:
        for line in f:
            _, _, raw = line.partition(" ")
            if "@trade" not in raw:
                continue
            msg = json.loads(raw).get("data", {})
            if msg.get("e") == "trade":
                yield msg["T"], symbol, msg


def real_fills(strategy: str, n: int) -> list[Fill]:
    """n fills of `strategy` made of the recorded trades of both symbols in time order (repeated with fresh
    trade ids if n is larger than the recordings)."""
    base: list[Fill] = []
    for _, symbol, t in heapq.merge(*(_capture_trades(name, symbol) for name, symbol in CAPTURES),
                                    key=lambda x: x[0]):
        if len(base) >= n:
            break
        price, amount = Decimal(t["p"]), Decimal(t["q"])
        fee = (price * amount * FEE_RATE).quantize(Decimal("0.00000001"))
        ns = t["T"] * 1_000_000
        base.append(Fill(strategy=strategy, exchange="binance", symbol=symbol, side="sell" if t["m"] else "buy",
                         price=price, amount=amount, fee=fee, fee_currency="USDT", exchange_trade_id=str(t["t"]),
                         order_id=None, ts_event=ns, ts_recv=ns + 1_000_000))
    out: list[Fill] = []
    for i in range(n):
        f = base[i % len(base)]
        loop = i // len(base)
        out.append(f if loop == 0 else msgspec.structs.replace(
            f, exchange_trade_id=f"{f.exchange_trade_id}-{loop}", ts_event=f.ts_event + loop * 86_400 * 10**9))
    return out


def _batches(rows: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(rows), size):
        yield rows[i:i + size]


# -- raw server baselines ---------------------------------------------------------------------------------

async def _timed(conn: asyncpg.Connection, n: int, work: Callable[[], Awaitable[None]]) -> float:
    await conn.execute("TRUNCATE trades")
    t0 = time.perf_counter()
    await work()
    elapsed = time.perf_counter() - t0
    stored = await conn.fetchval("SELECT count(*) FROM trades")
    if stored != n:
        raise RuntimeError(f"stored {stored} of {n} rows; the measurement is void")
    return n / elapsed


async def bench_raw(conn: asyncpg.Connection, rows: list[tuple[Any, ...]], batch: int) -> dict[str, float]:
    n = len(rows)
    await conn.execute(RAW_STAGE)
    cols = ", ".join(TRADE_COLUMNS)
    upsert_from_stage = (f"INSERT INTO trades ({cols}) SELECT {cols} FROM raw_stage "
                         f"ON CONFLICT ON CONSTRAINT trades_fill_key DO NOTHING")
    insert_values = (f"INSERT INTO trades ({cols}) VALUES ({', '.join(f'${i + 1}' for i in range(11))}) "
                     f"ON CONFLICT ON CONSTRAINT trades_fill_key DO NOTHING")
    insert_unnest = (f"INSERT INTO trades ({cols}) SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], "
                     f"$4::text[], $5::numeric[], $6::numeric[], $7::numeric[], $8::text[], $9::text[], "
                     f"$10::text[], $11::timestamptz[]) ON CONFLICT ON CONSTRAINT trades_fill_key DO NOTHING")

    async def copy() -> None:
        for part in _batches(rows, batch):
            async with conn.transaction():
                await conn.copy_records_to_table("trades", records=part, columns=TRADE_COLUMNS)

    async def copy_upsert() -> None:
        for part in _batches(rows, batch):
            async with conn.transaction():
                await conn.copy_records_to_table("raw_stage", records=part, columns=TRADE_COLUMNS)
                await conn.execute(upsert_from_stage)

    async def unnest() -> None:
        for part in _batches(rows, batch):
            async with conn.transaction():
                await conn.execute(insert_unnest, *[list(c) for c in zip(*part, strict=True)])

    async def executemany() -> None:
        for part in _batches(rows, batch):
            async with conn.transaction():
                await conn.executemany(insert_values, part)

    return {"copy": await _timed(conn, n, copy), "copy+upsert": await _timed(conn, n, copy_upsert),
            "unnest": await _timed(conn, n, unnest), "executemany": await _timed(conn, n, executemany)}


# -- the writer through the bus ---------------------------------------------------------------------------

async def bench_writer(settings: Settings, fills: list[Fill], conn: asyncpg.Connection,
                       redelivered: bool = False) -> tuple[float, dict[str, int]]:
    """Fills/s of the writer through the bus: new fills into an empty trades, or (`redelivered`) the same
    fills again, all duplicates, as after a crash before the acknowledgements."""
    from services.postgres_writer.service import PostgresWriter

    if not redelivered:
        await conn.execute("TRUNCATE trades")
    counter = "fills_duplicate" if redelivered else "fills_stored"
    writer = PostgresWriter(settings, "bench")
    await writer.redis.flushdb()
    producer = Producer(writer.redis, writer.codec, settings.bus, "bench")
    stream = streams.strategy(fills[0].strategy)
    for part in _batches(fills, 5000):
        events: list[Event] = list(part)
        await producer.publish({stream: events})
    await writer.connect()  # migrations and pool before the clock starts
    stop = asyncio.Event()
    t0 = time.perf_counter()
    task = asyncio.create_task(writer.run(stop))
    try:
        async with asyncio.timeout(600):
            while writer.counters()[counter] < len(fills):
                if task.done():
                    task.result()
                    raise RuntimeError("the writer stopped before storing every fill")
                await asyncio.sleep(0.005)
        elapsed = time.perf_counter() - t0
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        counters = writer.counters()
        await writer.close()
    return len(fills) / elapsed, counters


# -- COPY vs unnest by batch size -------------------------------------------------------------------------

async def bench_threshold(conn: asyncpg.Connection, fills: list[Fill], sizes: list[int],
                          rows_per_size: int) -> list[tuple[int, float, float, float, float]]:
    """Per batch size, ms per batch with the writer's StrategyStore: (size, unnest new, COPY new, unnest
    redelivered, COPY redelivered). New: fills not stored yet (the usual case: COPY goes straight into
    trades); redelivered: the same batch again (COPY fails on the first duplicate and stages instead)."""
    await conn.execute(CREATE_STAGE)
    out = []
    for size in sizes:
        medians: dict[tuple[str, int], float] = {}
        for copy_min_rows in (10**9, 1):
            store = StrategyStore(copy_min_rows)
            await conn.execute("TRUNCATE trades")
            times: dict[str, list[float]] = {"new": [], "again": []}
            for b in range(max(1, min(300, rows_per_size // size))):  # never wraps: every batch is new
                part = fills[(b * size) % len(fills):][:size]
                items = [Item("strategy:bench", f"{b}-0", i, f) for i, f in enumerate(part)]
                for kind, counter in (("new", "fills_stored"), ("again", "fills_duplicate")):
                    t0 = time.perf_counter()
                    async with conn.transaction():
                        result = await store.write(conn, items)
                    times[kind].append(time.perf_counter() - t0)
                    if result.counts.get(counter, 0) != len(part):
                        raise RuntimeError(f"batch of {size} ({kind}): {result.counts}; the measurement is void")
            for kind, values in times.items():
                medians[(kind, copy_min_rows)] = statistics.median(values) * 1000
        out.append((size, medians[("new", 10**9)], medians[("new", 1)], medians[("again", 10**9)],
                    medians[("again", 1)]))
    return out


async def bench_throughput(args: argparse.Namespace, conn: asyncpg.Connection, rows: list[tuple[Any, ...]],
                           fills: list[Fill], redis_url: str, dsn: str) -> None:
    """Raw paths and the writer, interleaved in `args.repeat` rounds so drift hits them alike; prints
    medians (and the spread), and the writer's ratio to raw copy+upsert taken within each round."""
    settings = load_settings(PROJECT_ROOT / "config" / "simulator.toml",
                             env={"MDP_REDIS_URL": redis_url, "MDP_POSTGRES_DSN": dsn})
    bus = BusSettings(stream_maxlen=1_000_000, backpressure_high_water=900_000, batch_max_events=500,
                      read_count=max(1, args.batch // 500), block_ms=100)
    writer_runs = [("COPY", args.copy_min_rows, False), ("unnest only", 10**9, False),
                   ("COPY, every fill redelivered", args.copy_min_rows, True)]
    rates: dict[str, list[float]] = {}
    ratios: dict[str, list[float]] = {}
    to_copy: dict[str, list[float]] = {}
    notes: dict[str, str] = {}
    for _ in range(args.repeat):
        round_rates = {f"raw {k}": v for k, v in (await bench_raw(conn, rows, args.batch)).items()}
        if "writer" in args.only:
            for how, copy_min_rows, redelivered in writer_runs:
                s = msgspec.structs.replace(settings, bus=bus,
                                            postgres_writer=PostgresWriterSettings(copy_min_rows=copy_min_rows))
                rate, c = await bench_writer(s, fills, conn, redelivered)
                name = f"postgres_writer through the bus, {how}"
                round_rates[name] = rate
                notes[name] = (f"{c['batches']} batches: {c['copy_direct']} COPY straight into trades, "
                               f"{c['copy_batches'] - c['copy_direct']} staged, "
                               f"{c['batches'] - c['copy_batches']} unnest")
        for name, rate in round_rates.items():
            rates.setdefault(name, []).append(rate)
            ratios.setdefault(name, []).append(rate / round_rates["raw copy+upsert"])
            to_copy.setdefault(name, []).append(rate / round_rates["raw copy"])
    print(f"| path ({args.repeat} rounds) | rows/s, median | min-max | vs raw copy+upsert | vs raw copy | "
          f"batches |\n|---|---:|---:|---:|---:|---|")
    for name, values in rates.items():
        print(f"| {name} | {statistics.median(values):,.0f} | {min(values):,.0f}-{max(values):,.0f} | "
              f"{statistics.median(ratios[name]):.0%} | {statistics.median(to_copy[name]):.0%} | "
              f"{notes.get(name, '')} |")
    print("\n(ratios: median over the rounds of the ratio within a round)")
    print()


async def main_async(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="mdp-bench-pg-"))
    redis_srv = start_redis(tmp / "redis")
    admin_dsn = os.environ.get("MDP_BENCH_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
    database = f"mdp_bench_pg_{os.getpid()}"
    admin = await asyncpg.connect(admin_dsn)
    await admin.execute(f'CREATE DATABASE "{database}"')
    dsn = f"{admin_dsn.rsplit('/', 1)[0]}/{database}"
    try:
        await migrate(dsn)
        conn = await asyncpg.connect(dsn)
        version = await conn.fetchval("SHOW server_version")
        strategy_id = await conn.fetchval("INSERT INTO strategies (name, registered_ns) VALUES ('bench', 1) "
                                          "RETURNING id")
        fills = real_fills("bench", args.fills)
        rows = [(strategy_id, f.exchange, f.symbol, f.side, f.price, f.amount, f.fee, f.fee_currency,
                 f.exchange_trade_id, f.order_id, ts(f.ts_event)) for f in fills]
        print(f"\nMachine: {platform.node()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
              f"PostgreSQL {version}, asyncpg {asyncpg.__version__}; {len(fills):,} fills from real trades, "
              f"{args.batch:,} rows per transaction\n")
        if "raw" in args.only or "writer" in args.only:
            await bench_throughput(args, conn, rows, fills, redis_srv.url, dsn)
        if "threshold" in args.only:
            sizes = [1, 10, 20, 30, 50, 100, 200, 500, 1000, 5000]
            table = await bench_threshold(conn, fills, sizes, rows_per_size=min(len(fills), 20_000))
            print("| fills per batch | unnest ms | COPY ms | unnest rows/s | COPY rows/s | redelivered: unnest ms "
                  "| redelivered: COPY ms |")
            print("|---:|---:|---:|---:|---:|---:|---:|")
            for size, unnest_ms, copy_ms, unnest_again, copy_again in table:
                print(f"| {size:,} | {unnest_ms:.2f} | {copy_ms:.2f} | {size / unnest_ms * 1000:,.0f} | "
                      f"{size / copy_ms * 1000:,.0f} | {unnest_again:.2f} | {copy_again:.2f} |")
            print()
        await conn.close()
    finally:
        redis_srv.stop()
        await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        await admin.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.bench_postgres")
    parser.add_argument("--fills", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=5000, help="rows per transaction (the writer: per read)")
    parser.add_argument("--copy-min-rows", type=int, default=PostgresWriterSettings().copy_min_rows,
                        help="the writer's COPY threshold in the COPY run")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of the throughput measurements")
    parser.add_argument("--only", default="raw,writer,threshold")
    args = parser.parse_args()
    args.only = set(args.only.split(","))
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
