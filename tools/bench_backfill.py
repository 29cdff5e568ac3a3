"""Benchmark of `mdp backfill` (issue 5, Measure): two years of BTC/USDT 1m against the simulator enforcing
Binance's real request weights, and kill-resume equivalence.

    python -m tools.bench_backfill [--since 2022-01-01] [--until 2024-01-01] [--kills 3] [--seed N]

What it does (every part real: private redis-server and influxd on free ports, the local PostgreSQL with two
scratch databases, the simulator as its own process, `mdp backfill` as a subprocess through the real ccxt):
1. an uninterrupted backfill of the span; from its JSON summary and the simulator's /_sim/status: candles,
   requests, requests/s while fetching (and over the whole run) against the ceiling (6,000 weight/min /
   weight 2 = 50 requests/s),
   and the HTTP statuses the simulator answered (429s and 418s must be zero);
2. the same backfill into a second InfluxDB database and ledger, SIGKILLed `--kills` times at random moments
   (seeded), then run to completion;
3. a comparison of the two: every stored point (time, open, high, low, close, volume, as InfluxDB returns them)
   and every ledger range (state, source, span) must be identical.
Prints Markdown (the figures for docs/bench-backfill.md) and exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import random
import resource
import signal
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import asyncpg

from common.config import PROJECT_ROOT, load_settings
from common.domain.span import NS, parse_when
from common.stores.influx import InfluxClient
from tools.localstores import free_port, start_influxd, start_redis

PG_ADMIN = os.environ.get("MDP_BENCH_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
CEILING_RPS = 6000 / 60 / 2  # Binance spot: 6,000 weight per minute, klines weigh 2


async def scratch_db(admin: asyncpg.Connection, name: str) -> str:
    await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await admin.execute(f'CREATE DATABASE "{name}"')
    return f"{PG_ADMIN.rsplit('/', 1)[0]}/{name}"


def sim_status(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url}/_sim/status", timeout=10) as r:
        return json.loads(r.read())


async def backfill(env: dict[str, str], args: list[str], kill_after: float | None = None) -> tuple[int, str, float]:
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "common.cli", "backfill", *args, env=env,
                                                cwd=PROJECT_ROOT, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    if kill_after is None:
        out, _ = await proc.communicate()
        return proc.returncode or 0, out.decode(), time.monotonic() - started
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout=kill_after)
        return proc.returncode or 0, out.decode(), time.monotonic() - started  # finished before the kill
    except TimeoutError:
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        return -9, "", time.monotonic() - started


async def points(influx_url: str, database: str, start: int, end: int, config: Path) -> tuple[int, str]:
    settings = load_settings(config, env={"MDP_INFLUX_URL": influx_url, "MDP_INFLUX_DATABASE": database})
    digest = hashlib.sha256()
    n = 0
    async with InfluxClient(settings.influx) as influx:
        source, db = "ohlcv", None
        if hasattr(influx, "tier_for"):  # storage tiers: 1m candles live in their tier's retention policy
            await influx.connect()
            db, rp = influx.tier_for("1m")
            source = f'"{rp}".ohlcv' if rp else "ohlcv"
        t = start
        month = 31 * 86_400 * NS
        while t < end:
            rows = await influx.query(f"SELECT open, high, low, close, volume FROM {source} WHERE symbol = $s AND "
                                      "time >= $a AND time < $b", params={"s": "BTC/USDT", "a": t,
                                                                          "b": min(end, t + month)},
                                      exact=True, database=db)
            for r in rows:
                digest.update(json.dumps([r["time"], *(str(r[k]) for k in ("open", "high", "low", "close",
                                                                          "volume"))]).encode())
            n += len(rows)
            t += month
    return n, digest.hexdigest()


async def ledger_ranges(dsn: str) -> list[tuple[str, str, str]]:
    conn = await asyncpg.connect(dsn)
    try:
        if not await conn.fetchval("SELECT to_regclass('coverage') IS NOT NULL"):
            return []  # killed before its first migration
        rows = await conn.fetch("SELECT state, source, span::text AS span FROM coverage ORDER BY lower(span), state")
        return [(r["state"], r["source"], r["span"]) for r in rows]
    finally:
        await conn.close()


async def covered_candles(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        if not await conn.fetchval("SELECT to_regclass('coverage') IS NOT NULL"):
            return 0
        return int(await conn.fetchval("SELECT coalesce(sum(extract(epoch FROM upper(span) - lower(span))), 0) / 60 "
                                       "FROM coverage WHERE state = 'covered'"))
    finally:
        await conn.close()


async def main(opts: argparse.Namespace) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="bench-backfill-"))
    influx = start_influxd(tmp / "influx")
    redis = start_redis(tmp / "redis")
    port = free_port()
    sim = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "simulator", "--port", str(port), "--speed", "0", "--start", "manual",
        "--max-trades", "100", cwd=PROJECT_ROOT, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL)
    sim_url = f"http://127.0.0.1:{port}"
    admin = await asyncpg.connect(PG_ADMIN)
    failures: list[str] = []
    try:
        for _ in range(100):
            try:
                sim_status(sim_url)
                break
            except OSError:
                await asyncio.sleep(0.1)
        dsn_a = await scratch_db(admin, "mdp_bench_backfill_a")
        dsn_b = await scratch_db(admin, "mdp_bench_backfill_b")
        # Two years of 1m candles must be kept: every storage tier keeps its data forever in this run.
        config = tmp / "bench.toml"
        base = (PROJECT_ROOT / "config" / "simulator.toml").read_text()
        tiers = {} if "\nretention = " in base else getattr(load_settings().influx, "retention", {})
        config.write_text(base + ("\n[influx.retention]\n" + "".join(f'{t} = "inf"\n' for t in tiers) if tiers else ""))
        base_env = {**os.environ, "MDP_REDIS_URL": redis.url, "MDP_INFLUX_URL": influx.url,
                    "MDP_SIMULATOR_URL": sim_url, "MDP_CONFIG": str(config)}
        env_a = {**base_env, "MDP_POSTGRES_DSN": dsn_a, "MDP_INFLUX_DATABASE": "bench_a"}
        env_b = {**base_env, "MDP_POSTGRES_DSN": dsn_b, "MDP_INFLUX_DATABASE": "bench_b"}
        args = ["--exchange", "binance", "--symbol", "BTC/USDT", "--timeframe", "1m", "--since", opts.since,
                "--until", opts.until, "--no-progress", "--json"]

        # 1. Uninterrupted.
        before = sim_status(sim_url)["rest"]
        load_before = os.getloadavg()[0]
        cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        rc, out, wall = await backfill(env_a, args)
        cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu_s = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
        load_after = os.getloadavg()[0]
        if rc != 0:
            print(out)
            raise SystemExit(f"the uninterrupted backfill failed with exit status {rc}")
        summary = json.loads(out.strip().splitlines()[-1])
        after = sim_status(sim_url)["rest"]
        statuses = {k: v - before["status"].get(k, 0) for k, v in after["status"].items()}
        rps = summary["requests"] / summary["fetch_s"]  # while fetching: start-up is not rate-limited
        rps_all = summary["requests"] / summary["elapsed_s"]

        # 2. Killed at random moments, then completed.
        rng = random.Random(opts.seed)
        kills: list[str] = []
        for i in range(opts.kills):
            # Any moment from start-up (imports, migrations, markets: ~2 s) to well into the fetch.
            at = rng.uniform(0.5, max(1.0, wall / 3))
            rc_k, _out_k, lived = await backfill(env_b, args, kill_after=at)
            kills.append(f"{lived:.2f} s ({'killed' if rc_k == -9 else 'finished first'}; "
                         f"{await covered_candles(dsn_b):,} candles recorded so far)")
        rc, out_b, _ = await backfill(env_b, args)
        if rc != 0:
            print(out_b)
            raise SystemExit(f"the resumed backfill failed with exit status {rc}")
        resumed = json.loads(out_b.strip().splitlines()[-1])
        final = sim_status(sim_url)["rest"]["status"]

        # 3. Compare.
        start, end = parse_when(opts.since, 0), parse_when(opts.until, 0)
        n_a, sha_a = await points(influx.url, "bench_a", start, end, config)
        n_b, sha_b = await points(influx.url, "bench_b", start, end, config)
        led_a, led_b = await ledger_ranges(dsn_a), await ledger_ranges(dsn_b)

        if statuses.get("429", 0) or statuses.get("418", 0) or final.get("429", 0) or final.get("418", 0):
            failures.append(f"the simulator answered 429/418: {statuses} / {final}")
        if rps < 0.9 * CEILING_RPS:
            failures.append(f"{rps:.1f} requests/s is below 90% of the {CEILING_RPS:.0f}/s ceiling")
        if (n_a, sha_a) != (n_b, sha_b):
            failures.append(f"stored data differ: {n_a} points {sha_a[:16]} vs {n_b} points {sha_b[:16]}")
        if led_a != led_b:
            failures.append(f"ledgers differ: {led_a} vs {led_b}")

        cpu = platform.processor() or platform.machine()
        print(f"## Backfill: BTC/USDT 1m, {opts.since} .. {opts.until}, simulator enforcing Binance weights\n")
        print(f"Machine: {os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, "
              f"{time.strftime('%Y-%m-%d')}. Simulator: its own process, 6,000 weight/min, klines weight 2, "
              f"429 + Retry-After, 418 after repeated 429s. Budget: backfill.ratelimit defaults "
              f"(utilization 0.97, burst 0.5 s), concurrency {load_settings().backfill.concurrency}.\n")
        print("| figure | value |\n|---|---|")
        print(f"| candles stored | {summary['candles']:,} (+ {summary['empty_candles']:,} known empty: real outage) |")
        print(f"| requests | {summary['requests']:,} (weight {summary['weight']:,}) |")
        print(f"| run time (whole command, incl. start-up) | {wall:.1f} s (backfill {summary['elapsed_s']:.1f} s) |")
        print(f"| requests/s while fetching | {rps:.1f} = {100 * rps / CEILING_RPS:.0f}% of the "
              f"{CEILING_RPS:.0f}/s ceiling (fetch phase {summary['fetch_s']:.1f} s) |")
        print(f"| requests/s over the whole run | {rps_all:.1f} = {100 * rps_all / CEILING_RPS:.0f}% (start-up: "
              f"migrations, markets) |")
        print(f"| candles/s while fetching | {summary['candles'] / summary['fetch_s']:,.0f} |")
        print(f"| CPU of the backfill process | {cpu_s:.1f} s ({1000 * cpu_s / max(1, summary['pages']):.1f} ms per "
              f"page of 1000 candles, start-up included) |")
        print(f"| machine load (1-min average) before / after | {load_before:.2f} / {load_after:.2f} |")
        print(f"| simulator HTTP statuses | {statuses} |")
        print(f"| 429s seen by the backfill | {summary['throttled_429']} (418s: {summary['banned_418']}) |")
        print(f"| kills (SIGKILL after) | {'; '.join(kills)} |")
        print(f"| resumed run | fetched {resumed['candles']:,} candles in {resumed['requests']:,} requests |")
        print(f"| stored points, uninterrupted vs killed+resumed | {n_a:,} vs {n_b:,}; sha256 "
              f"{sha_a[:16]} vs {sha_b[:16]}: {'identical' if (n_a, sha_a) == (n_b, sha_b) else 'DIFFERENT'} |")
        print(f"| ledger ranges | {len(led_a)} vs {len(led_b)}: {'identical' if led_a == led_b else 'DIFFERENT'} |")
        print(f"| seed | {opts.seed} |")
        for f in failures:
            print(f"\nFAILED: {f}")
        return 1 if failures else 0
    finally:
        sim.send_signal(signal.SIGTERM)
        await sim.wait()
        for name in ("mdp_bench_backfill_a", "mdp_bench_backfill_b"):
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
        influx.stop()
        redis.stop()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tools.bench_backfill", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--since", default="2022-01-01")
    p.add_argument("--until", default="2024-01-01")
    p.add_argument("--kills", type=int, default=3)
    p.add_argument("--seed", type=int, default=int(time.time()) % 100_000)
    return p.parse_args(argv)


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main(parse_args())))
