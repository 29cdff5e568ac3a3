"""Benchmark of the gap repair service: the time from a Gap event on mdp:gaps to its repaired data published.

    python -m tools.bench_gap_repair [--trades 20000] [--repeat 3]

Every part real: private redis-server and influxd on free ports, a scratch PostgreSQL database (the local
server, MDP_BENCH_POSTGRES_DSN), the simulator replaying the real Binance capture, and the gap repair service
as its own process (`python -m services.gap_repair`) talking to the simulator through the real ccxt.

What is measured: for each Gap, published alone (nothing queued before it), the time from its XADD on
mdp:gaps to the XADD of the service's `gap.repaired` alert on mdp:alerts (both Redis server clocks, ms). The
service publishes that alert in the same MULTI/EXEC that publishes the repaired trades or candles into
raw:{exchange} and acknowledges the Gap: the figure is "Gap event to repaired data durable in the pipeline's
first stream" (the validator, normalizer and influx writer then take it like live data; their latency is
the pipeline's, measured elsewhere). Each run repairs a different window (the validator would drop a repeat),
and every repaired window is then checked on raw:binance (every missing candle / trade id there, once).

Gaps:
- candles: 1, 5, 30, 120 and 1,000 minutes of 2022-06 BTC/USDT 1m history, none stored before (the 1,000
  minutes take one klines request of 1,000 candles);
- trades: id ranges of 10, 100, 1,000 and 3,000 trades removed from the "live" copy of the replayed
  recording (stored as the influx writer would), announced by the validator's own stream rules (the Gap
  carries the ids), fetched back with historicalTrades (1,000 per request, weight 25).
Prints Markdown (the figures for docs/gap-repair.md) and exits 1 if a check fails.
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
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, cast

import asyncpg
import redis.asyncio as aioredis

from common.bus import streams
from common.bus.core import Producer, StreamEntries
from common.config import PROJECT_ROOT, Settings, load_settings
from common.domain.normalize import canonical_decimal
from common.domain.series import StreamRules
from common.domain.span import NS, from_datetime
from common.domain.state import SeriesBook
from common.stores.influx import InfluxClient, encode_trades
from schemas import Alert, Candle, Codec, Gap, Trade
from simulator import start_simulator
from tools.localstores import start_influxd, start_redis

PG_ADMIN = os.environ.get("MDP_BENCH_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
MIN = 60 * NS
MS = 1_000_000
CANDLE_GAPS = (1, 5, 30, 120, 1000)  # minutes
TRADE_GAPS = (10, 100, 1000, 3000)  # trades
BASE = from_datetime(datetime(2022, 6, 1))


async def scratch_db(name: str) -> str:
    admin = await asyncpg.connect(PG_ADMIN, timeout=10)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    return f"{PG_ADMIN.rsplit('/', 1)[0]}/{name}"


def entry_ms(entry_id: bytes | str) -> int:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(text.split("-")[0])


async def wait_alive(redis: aioredis.Redis, proc: asyncio.subprocess.Process, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not await redis.exists(streams.alive_key("gap_repair", "0")):
        if proc.returncode is not None or time.monotonic() > deadline:
            raise SystemExit("the gap repair service did not come up (see its output above)")
        await asyncio.sleep(0.1)
    while True:  # its consumer group on mdp:gaps exists once it reads
        try:
            groups = await redis.xinfo_groups(streams.GAPS)
        except aioredis.ResponseError:
            groups = []
        if any(g["name"] in (b"gap_repair", "gap_repair") for g in groups):
            return
        if time.monotonic() > deadline:
            raise SystemExit("the gap repair service never created its consumer group on mdp:gaps")
        await asyncio.sleep(0.1)


async def one_gap(redis: aioredis.Redis, producer: Producer, gap: Gap, codec: Codec) -> tuple[float, Alert]:
    """Publish one Gap, wait for the service's final alert on it; (latency ms, the alert)."""
    last = cast(StreamEntries, await redis.xrevrange(streams.ALERTS, count=1))
    cursor = last[0][0] if last else b"0-0"
    await producer.publish({streams.GAPS: [gap]})
    (gap_id, _), = cast(StreamEntries, await redis.xrevrange(streams.GAPS, count=1))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        for entry_id, fields in cast(StreamEntries,
                                     await redis.xrange(streams.ALERTS, min=f"({cursor.decode()}", count=100)):
            cursor = entry_id
            for a in codec.decode_entry(fields):
                if isinstance(a, Alert) and a.source == "gap_repair" and a.values.get("start") == str(gap.start) \
                        and a.rule.startswith("gap."):
                    return float(entry_ms(entry_id) - entry_ms(gap_id)), a
        await asyncio.sleep(0.005)
    raise SystemExit(f"no outcome for {gap} within 120 s")


def trade_of(t: Any) -> Trade:
    return Trade(exchange="binance", symbol="BTC/USDT", trade_id=str(t.id), price=canonical_decimal(Decimal(t.price)),
                 amount=canonical_decimal(Decimal(t.qty)), side=t.side, ts_event=t.time * MS, ts_recv=t.time * MS)


async def run(args: argparse.Namespace) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="bench_gap_repair_"))
    redis_srv, influx_srv = start_redis(tmp / "redis"), start_influxd(tmp / "influx")
    dsn = await scratch_db(f"mdp_bench_gap_{os.getpid()}")
    failures: list[str] = []
    proc: asyncio.subprocess.Process | None = None
    try:
        async with start_simulator(speed=0, max_trades=args.trades, start="manual") as sim:
            sim.restart()
            await sim.wait_finished(120)
            env = {**os.environ, "MDP_REDIS_URL": redis_srv.url, "MDP_INFLUX_URL": influx_srv.url,
                   "MDP_POSTGRES_DSN": dsn, "MDP_SIMULATOR_URL": sim.rest_url,
                   "MDP_CONFIG": str(PROJECT_ROOT / "config" / "simulator.toml"), "MDP_LOG_LEVEL": "WARNING"}
            settings = load_settings(env["MDP_CONFIG"], env=env)
            recorded = sim.expected_trades()
            removed: list[list[range]] = []  # per gap size, one id range per run
            at = 1000
            for size in TRADE_GAPS:
                removed.append([])
                for _ in range(args.repeat):
                    removed[-1].append(range(recorded[at].id, recorded[at].id + size))
                    at += size + 500
            if at > len(recorded):
                raise SystemExit(f"--trades {args.trades} is too few for --repeat {args.repeat}: need {at}")
            gone = {i for runs in removed for r in runs for i in r}
            live = [trade_of(t) for t in recorded if t.id not in gone]
            async with InfluxClient(settings.influx) as influx:
                await influx.ensure_tiers()
                await influx.write_tier(influx.plan.ticks, encode_trades(live))
            found = validator_gaps(settings, live)
            assert len(found) == len(TRADE_GAPS) * args.repeat, found
            trade_gaps = [found[k * args.repeat:(k + 1) * args.repeat] for k in range(len(TRADE_GAPS))]
            candle_gaps: list[list[Gap]] = []
            t = BASE
            for minutes in CANDLE_GAPS:
                candle_gaps.append([])
                for _ in range(args.repeat):
                    candle_gaps[-1].append(Gap(exchange="binance", symbol="BTC/USDT", channel="candle:1m", start=t,
                                               end=t + minutes * MIN, reason=f"{minutes} closed 1m bar(s) missing",
                                               ts_event=t, ts_recv=t))
                    t += (minutes + 60) * MIN

            proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "services.gap_repair", env=env,
                                                        cwd=PROJECT_ROOT)
            redis = aioredis.Redis.from_url(redis_srv.url)
            codec = Codec()
            producer = Producer(redis, codec, settings.bus, source="bench")
            await wait_alive(redis, proc)
            results: list[tuple[str, int, list[float], str]] = []
            for runs, size, kind in [*((g, m, "candles") for g, m in zip(candle_gaps, CANDLE_GAPS, strict=True)),
                                     *((g, n, "trades") for g, n in zip(trade_gaps, TRADE_GAPS, strict=True))]:
                times: list[float] = []
                state = ""
                for gap in runs:
                    ms, alert = await one_gap(redis, producer, gap, codec)
                    times.append(ms)
                    state = alert.rule
                    if alert.rule != "gap.repaired" or alert.values.get("repaired") != str(size):
                        failures.append(f"{kind} {size}: {alert.rule} {alert.values.get('repaired')} ({alert.reason})")
                results.append((kind, size, times, state))
            failures.extend(await check_published(redis, codec, [g for runs in candle_gaps for g in runs], gone))
            await redis.aclose()
    finally:
        if proc is not None and proc.returncode is None:
            proc.terminate()
            await proc.wait()
        redis_srv.stop()
        influx_srv.stop()
    print(report(results, args))
    for f in failures:
        print(f"FAILED: {f}")
    return 1 if failures else 0


def validator_gaps(settings: Settings, trades: list[Trade]) -> list[Gap]:
    rules, book = StreamRules(settings.quality), SeriesBook(10)
    out: list[Gap] = []
    for t in trades:
        staging = book.stage()
        out.extend(rules.judge(t, staging, t.ts_event).gaps)
        staging.commit()
    return out


async def check_published(redis: aioredis.Redis, codec: Codec, candle_gaps: list[Gap], gone: set[int]) -> list[str]:
    """Every repaired candle and every removed trade id on raw:binance, once each."""
    events = [e for _, f in cast(StreamEntries, await redis.xrange(streams.raw("binance")))
              for e in codec.decode_entry(f)]
    trade_ids = sorted(int(e.trade_id) for e in events if isinstance(e, Trade))
    open_times = sorted(e.open_time for e in events if isinstance(e, Candle))
    failures = []
    if trade_ids != sorted(gone):
        failures.append(f"trades: {len(trade_ids)} published ({len(set(trade_ids))} distinct), {len(gone)} removed")
    wanted = sorted(t for g in candle_gaps for t in range(g.start, g.end, MIN))
    if open_times != wanted:
        failures.append(f"candles: {len(open_times)} published ({len(set(open_times))} distinct), {len(wanted)} "
                        f"missing")
    return failures


def report(results: list[tuple[str, int, list[float], str]], args: argparse.Namespace) -> str:
    head = (f"Gap event to repaired data on raw:binance ({platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} cores, python {platform.python_version()}; each gap alone, {args.repeat} runs):")
    lines = [head, "", "| gap | size | median ms | min ms | max ms |", "|---|---:|---:|---:|---:|"]
    for kind, size, times, _state in results:
        unit = "minutes" if kind == "candles" else "trades"
        lines.append(f"| {kind} | {size:,} {unit} | {statistics.median(times):.0f} | {min(times):.0f} | "
                     f"{max(times):.0f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trades", type=int, default=20_000, help="trades of the recording to replay")
    parser.add_argument("--repeat", type=int, default=3, help="runs per gap")
    return asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    raise SystemExit(main())
