"""Benchmark of recovery from a disconnect: the time from an injected disconnect to data flowing again, and to
the gap being repaired in InfluxDB.

    python -m tools.bench_faults [--runs 7] [--speed 5] [--down 0.5]

Every part real: private redis-server and influxd on free ports, a scratch PostgreSQL database (the local
server, MDP_BENCH_POSTGRES_DSN), the simulator replaying the real Binance spot BTC/USDT capture, ccxt.pro
4.5.90 unmodified, and the stages in one process, each on its own asyncio task: collector (trades), validator,
normalizer, InfluxDB writer and gap repair (the repair's ccxt REST talks to the simulator).

Each run starts a fresh simulator (speed `--speed`, i.e. ~30 x speed trades/s), flushes Redis, uses a new
InfluxDB database; after 200 trades the simulator closes every WebSocket and refuses new ones for `--down` s.
Measured from the fault (wall clock, ms):
- flowing: to the XADD of the collector's Gap on mdp:gaps, which it publishes with the first trade after the
  reconnect (Redis entry id = the server's clock, same host);
- repaired: to the XADD of the gap repair's `gap.repaired` alert on mdp:alerts, which is published with the
  acknowledgement after InfluxDB answered the write of the missing trades (durable).
Then each run checks InfluxDB: every trade id from the first stored to the last lost one present, once.
Prints Markdown (the figures for docs/bench-faults.md) and exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import cast

import asyncpg
import msgspec
import redis.asyncio as aioredis

from common.bus import streams
from common.bus.core import StreamEntries
from common.bus.stage import Service
from common.config import PROJECT_ROOT, Settings, load_settings
from common.stores.influx import InfluxClient
from schemas import Alert, Codec, Gap
from services.collector.service import Collector
from services.gap_repair.service import GapRepair
from services.influx_writer.service import InfluxWriter
from services.normalizer.service import Normalizer
from services.validator.service import Validator
from simulator import start_simulator
from tools.localstores import LocalServer, start_influxd, start_redis

PG_ADMIN = os.environ.get("MDP_BENCH_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")


async def scratch_db(name: str) -> str:
    admin = await asyncpg.connect(PG_ADMIN, timeout=10)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    return f"{PG_ADMIN.rsplit('/', 1)[0]}/{name}"


async def drop_db(dsn: str) -> None:
    admin = await asyncpg.connect(PG_ADMIN, timeout=10)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{dsn.rsplit("/", 1)[1]}" WITH (FORCE)')
    finally:
        await admin.close()


def entry_ms(entry_id: bytes) -> int:
    return int(entry_id.decode().split("-")[0])


async def first(redis: aioredis.Redis, stream: str, codec: Codec, match: type, rule: str = "",
                timeout: float = 60.0) -> tuple[int, object]:
    """(XADD ms, event) of the first event of type `match` (and alert `rule`) on `stream`, waiting for it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for entry_id, fields in cast(StreamEntries, await redis.xrange(stream)):
            for e in codec.decode_entry(fields):
                if isinstance(e, match) and (not rule or getattr(e, "rule", "") == rule):
                    return entry_ms(entry_id), e
        await asyncio.sleep(0.005)
    raise SystemExit(f"no {match.__name__} {rule} on {stream} within {timeout:.0f} s")


def run_settings(redis_srv: LocalServer, influx_srv: LocalServer, dsn: str, sim_url: str) -> Settings:
    env = {"MDP_REDIS_URL": redis_srv.url, "MDP_INFLUX_URL": influx_srv.url, "MDP_POSTGRES_DSN": dsn,
           "MDP_INFLUX_DATABASE": f"bench_faults_{uuid.uuid4().hex[:8]}", "MDP_SIMULATOR_URL": sim_url}
    settings = load_settings(PROJECT_ROOT / "config" / "simulator.toml", env=env)
    ex = msgspec.structs.replace(settings.exchange("binance"), channels=["trades"])
    return msgspec.structs.replace(settings, exchanges=[ex])


async def one_run(redis_srv: LocalServer, influx_srv: LocalServer, dsn: str, args: argparse.Namespace,
                  failures: list[str]) -> tuple[float, float, int] | None:
    """(ms to flowing, ms to repaired, trades lost) of one disconnect; None when no trade was lost (the
    replay was between trades the whole time: the Gap is explained, nothing to repair)."""
    codec = Codec()
    async with start_simulator(speed=args.speed, max_trades=args.trades, wait_for_streams=("btcusdt@trade",)) as sim:
        settings = run_settings(redis_srv, influx_srv, dsn, sim.rest_url)
        redis = aioredis.Redis.from_url(settings.redis.url)
        await redis.flushdb()
        collector = Collector(settings, "bench", exchange="binance")
        stages: list[Service] = [collector, *(s(settings, "bench") for s in (Validator, Normalizer, InfluxWriter,
                                                                               GapRepair))]
        stop = asyncio.Event()
        tasks = [asyncio.create_task(s.run(stop)) for s in stages]
        try:
            while collector.count["trades"] < 200:
                if any(t.done() for t in tasks):
                    raise SystemExit("a stage stopped before the fault")
                await asyncio.sleep(0.01)
            t0 = time.time() * 1000
            sim.inject("disconnect", down_s=args.down)
            gap_ms, gap = await first(redis, streams.GAPS, codec, Gap)
            assert isinstance(gap, Gap)
            if not gap.first_missing_id:
                return None
            fixed_ms, alert = await first(redis, streams.ALERTS, codec, Alert, "gap.repaired")
            assert isinstance(gap, Gap) and isinstance(alert, Alert)
            lo, hi = int(gap.first_missing_id or 0), int(gap.last_missing_id or -1)
            async with InfluxClient(settings.influx) as influx:
                rows = await influx.query_timeframe(
                    "ticks", "SELECT trade_id FROM trades WHERE exchange = 'binance' AND symbol = 'BTC/USDT'",
                    exact=True)
            ids = sorted(int(r["trade_id"]) for r in rows if int(r["trade_id"]) <= hi)
            if not ids or ids != list(range(ids[0], hi + 1)) or hi < lo:
                failures.append(f"run with gap {lo}..{hi}: InfluxDB does not hold every id up to {hi} once")
        finally:
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            for s in stages:
                await s.close()
            await redis.aclose()
    return gap_ms - t0, fixed_ms - t0, hi - lo + 1


async def run(args: argparse.Namespace) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="bench_faults_"))
    redis_srv, influx_srv = start_redis(tmp / "redis"), start_influxd(tmp / "influx")
    dsn = await scratch_db(f"mdp_bench_faults_{os.getpid()}")
    failures: list[str] = []
    results: list[tuple[float, float, int]] = []
    skipped = 0
    try:
        for _ in range(args.runs * 3):
            result = await one_run(redis_srv, influx_srv, dsn, args, failures)
            if result is None:
                skipped += 1
            else:
                results.append(result)
            if len(results) == args.runs:
                break
    finally:
        await drop_db(dsn)
        redis_srv.stop()
        influx_srv.stop()
    flowing, repaired, lost = ([r[i] for r in results] for i in range(3))
    print(f"# Disconnect -> flowing -> repaired ({platform.node()}, {os.cpu_count()} cores, "
          f"{time.strftime('%Y-%m-%d')})\n")
    print(f"{args.runs} runs, replay at {args.speed}x (~{30 * args.speed:.0f} trades/s), dials refused for "
          f"{args.down} s after each disconnect ({skipped} more disconnects lost no trade and are not "
          f"counted).\n")
    print("| from the disconnect to | median | min | max |\n|---|---|---|---|")
    for name, xs in (("data flowing again (collector's Gap)", flowing), ("gap repaired in InfluxDB", repaired)):
        print(f"| {name} | {statistics.median(xs):.0f} ms | {min(xs):.0f} ms | {max(xs):.0f} ms |")
    print(f"\ntrades lost per disconnect (then repaired): median {statistics.median(lost):.0f}, "
          f"min {min(lost)}, max {max(lost)}; per run (flowing, repaired, lost): "
          + ", ".join(f"({f:.0f}, {r:.0f}, {n})" for f, r, n in results))
    for f in failures:
        print(f"FAILED: {f}")
    return 1 if failures else 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--speed", type=float, default=5.0)
    p.add_argument("--down", type=float, default=0.5, help="seconds new WebSocket dials are refused")
    p.add_argument("--trades", type=int, default=6000, help="trades of the recording replayed per run")
    sys.exit(asyncio.run(run(p.parse_args())))


if __name__ == "__main__":
    main()
