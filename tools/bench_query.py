"""`python -m tools.bench_query`: history query latency with two years stored (docs/bench-query.md).

Into a private influxd 1.6.7 (started here on a free port; cache snapshot after 1 s and full compaction 5 s after
the last write, so the figures are those of settled, compacted shards), in a database whose tiers all keep
everything (the plan's 1m tier keeps 90 days: "two years of 1m" needs infinite retention), this writes
- two years of 1m candles of BTC/USDT (1,051,200 points) from a deterministic random walk (seed 7), and
- two years of 1h candles of BTC/USDT and ETH/USDT: the real Binance spot series of
  ../shared/data/real/binance-spot-1h (CSV: date as naive UTC text, open, high, low, close, volume), the last
  17,520 rows of each, shifted to end an hour ago,
then measures, each over N queries after a warm-up, with one client reused (as a strategy would):
- `history(..., last=100)` over the last day of 1m candles (ORDER BY time DESC LIMIT 100);
- `history(...)` of exactly the last 100 minutes of 1m candles;
- `history(...)` of one year of 1h candles (8,760 slots; the real series misses one hour), which `history`
  reads as two half-year requests at once;
and for each the same InfluxQL through `InfluxClient.query` (JSON decoded to row dicts, no DataFrame),
`InfluxClient.query_values` (value rows) and as a plain HTTP GET whose body is read and not decoded (server and
transport only), to show where the time goes. Everything runs twice: right after writing, and after the
server has snapshotted its cache and compacted the shards (the steady state a strategy meets).

    python -m tools.bench_query [--last-queries 500] [--year-queries 50]
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import numpy as np

from common.config import InfluxSettings
from common.history.api import SELECT_CANDLES, history
from common.stores.influx import OHLCV, InfluxClient, series_key
from simulator.recording import real_data_dir
from tools.bench_storage import settle, start_compacting_influxd

REAL = real_data_dir()  # $MDP_REAL_DATA, ../shared/data/real, or the shipped data/real
NS = 1_000_000_000
MINUTE = 60 * NS
HOUR = 3600 * NS
TWO_YEARS_1M = 2 * 365 * 24 * 60
TWO_YEARS_1H = 2 * 365 * 24
KEEP_ALL = {"ticks": "inf", "candles_1m": "inf", "candles_1h": "inf", "candles_1d": "inf"}


def walk_1m(n: int, end_ns: int, seed: int = 7) -> list[str]:
    """Line protocol of n deterministic 1m BTC/USDT candles ending at end_ns (a random walk around 60,000)."""
    rng = np.random.default_rng(seed)
    close = np.round(60_000 * np.exp(np.cumsum(rng.normal(0, 0.0006, n))), 2)
    open_ = np.concatenate(([60_000.0], close[:-1]))
    spread = np.round(np.abs(rng.normal(0, 15, n)), 2)
    high = np.maximum(open_, close) + spread
    low = np.minimum(open_, close) - spread
    volume = np.round(rng.gamma(2.0, 6.0, n), 5)
    first = end_ns - n * MINUTE
    key = series_key(OHLCV, (("exchange", "binance"), ("symbol", "BTC/USDT"), ("timeframe", "1m")))
    return [f"{key} open={o:.2f},high={h:.2f},low={lo:.2f},close={c:.2f},volume={v} {first + i * MINUTE}"
            for i, (o, h, lo, c, v) in enumerate(zip(open_.tolist(), high.tolist(), low.tolist(), close.tolist(),
                                                     volume.tolist(), strict=True))]


def real_1h(path: Path, symbol: str, n: int, end_ns: int) -> list[str]:
    """Line protocol of the last n rows of a binance-spot-1h CSV, shifted so the last candle opens at end_ns - 1h."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))[-n:]
    last = datetime.fromisoformat(rows[-1]["date"]).replace(tzinfo=UTC)
    shift = end_ns - HOUR - int(last.timestamp()) * NS
    key = series_key(OHLCV, (("exchange", "binance"), ("symbol", symbol), ("timeframe", "1h")))
    out = []
    for r in rows:
        t = int(datetime.fromisoformat(r["date"]).replace(tzinfo=UTC).timestamp()) * NS + shift
        out.append(f"{key} open={r['open']},high={r['high']},low={r['low']},close={r['close']},"
                   f"volume={r['volume']} {t}")
    return out


async def measure(n: int, call: Callable[[], Awaitable[Any]], check: Callable[[Any], None]) -> list[float]:
    """Milliseconds of n calls after 10 warm-up calls; `check` validates the warm-up answer once."""
    for _ in range(10):
        result = await call()
    check(result)
    out = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        await call()
        out.append((time.perf_counter_ns() - t0) / 1e6)
    return out


def row(name: str, ms: list[float], target: str) -> str:
    qs = statistics.quantiles(ms, n=100, method="inclusive")
    return f"| {name} | {len(ms)} | {statistics.median(ms):.2f} | {qs[98]:.2f} | {max(ms):.2f} | {target} |"


async def load(url: str, end: int) -> None:
    """Write the two years of 1m and 1h candles ending at `end` into a database whose tiers keep everything."""
    settings = InfluxSettings(url=url, database="bench_query", retention=KEEP_ALL, write_concurrency=2)
    async with InfluxClient(settings) as client:
        await client.ensure_tiers()
        t0 = time.perf_counter()
        lines_1m = walk_1m(TWO_YEARS_1M, end)
        await client.write_tier(client.plan.for_timeframe("1m"), lines_1m)
        for symbol in ("BTC/USDT", "ETH/USDT"):
            csv_path = REAL / "binance-spot-1h" / f"{symbol.replace('/', '')}-1h-2021-04-2023-12.csv"
            await client.write_tier(client.plan.for_timeframe("1h"), real_1h(csv_path, symbol, TWO_YEARS_1H, end))
        print(f"wrote {len(lines_1m):,} 1m and {2 * TWO_YEARS_1H:,} 1h candles in {time.perf_counter() - t0:.1f} s",
              flush=True)


async def queries(client: InfluxClient, url: str, end: int, last_queries: int, year_queries: int) -> list[str]:
    await client.connect()
    series = {"exchange": "binance", "symbol": "BTC/USDT"}
    day, minutes, year = end - 24 * HOUR, end - 100 * MINUTE, end - 365 * 24 * HOUR
    db_1m, rp_1m = client.tier_for("1m")
    db_1h, rp_1h = client.tier_for("1h")
    q_last = f"{SELECT_CANDLES} ORDER BY time DESC LIMIT 100"
    q_range = f"{SELECT_CANDLES} ORDER BY time ASC LIMIT 10000"
    p_last = {**series, "timeframe": "1m", "start": day, "end": end}
    p_year = {**series, "timeframe": "1h", "start": year, "end": end}
    # The real 1h series has the exchange's own holes (a maintenance hour): expect what is stored.
    stored = await client.query("SELECT count(close) FROM ohlcv WHERE symbol = $symbol AND time >= $start AND "
                                "time < $end", p_year, database=db_1h, rp=rp_1h)
    year_rows = int(stored[0]["count"])
    middle = year + (end - year) // 2
    halves = [{**p_year, "end": middle}, {**p_year, "start": middle}]

    def rows_of(n: int) -> Callable[[Any], None]:
        def check(result: Any) -> None:
            assert len(result) == n, f"expected {n} rows, got {len(result)}"
        return check

    def values_of(n: int) -> Callable[[Any], None]:
        return lambda answer: rows_of(n)(answer[1])

    def body_ok(body: bytes) -> None:
        assert body.startswith(b'{"results":[{"statement_id":0,"series"'), body[:200]

    def bodies_ok(bodies: list[bytes]) -> None:
        for body in bodies:
            body_ok(body)

    session = aiohttp.ClientSession()

    async def plain(db: str, rp: str, q: str, params: dict[str, Any]) -> bytes:
        query = {"db": db, "rp": rp, "epoch": "ns", "q": q, "params": msgspec.json.encode(params).decode()}
        async with session.get(url + "/query", params=query) as resp:
            return await resp.read()

    out = []
    try:
        cases: list[tuple[str, int, Callable[[], Awaitable[Any]], Callable[[Any], None], str]] = [
            ("last 100 1m candles: `history(last=100)`, range = last day", last_queries,
             lambda: history("binance", "BTC/USDT", "1m", day, end, client=client, last=100), rows_of(100),
             "p99 < 10 ms"),
            ("  same InfluxQL, `InfluxClient.query` (rows as dicts, no DataFrame)", last_queries,
             lambda: client.query(q_last, p_last, database=db_1m, rp=rp_1m), rows_of(100), ""),
            ("  same InfluxQL, plain HTTP GET (body not decoded)", last_queries,
             lambda: plain(db_1m, rp_1m, q_last, p_last), body_ok, ""),
            ("last 100 1m candles: `history()` of the last 100 minutes", last_queries,
             lambda: history("binance", "BTC/USDT", "1m", minutes, end, client=client), rows_of(100), "p99 < 10 ms"),
            (f"one year of 1h candles: `history()` ({year_rows:,} rows)", year_queries,
             lambda: history("binance", "BTC/USDT", "1h", year, end, client=client), rows_of(year_rows), "< 200 ms"),
            ("  same InfluxQL, `InfluxClient.query` (rows as dicts, no DataFrame; one request)", year_queries,
             lambda: client.query(q_range, p_year, database=db_1h, rp=rp_1h), rows_of(year_rows), ""),
            ("  same InfluxQL, `InfluxClient.query_values` (value rows, no dicts; one request)", year_queries,
             lambda: client.query_values(q_range, p_year, db_1h, False, rp_1h), values_of(year_rows), ""),
            ("  same InfluxQL, plain HTTP GET (body not decoded; one request)", year_queries,
             lambda: plain(db_1h, rp_1h, q_range, p_year), body_ok, ""),
            ("  same InfluxQL, plain HTTP GET, two half-year requests at once (what `history` sends)",
             year_queries, lambda: asyncio.gather(plain(db_1h, rp_1h, q_range, halves[0]),
                                                  plain(db_1h, rp_1h, q_range, halves[1])),
             bodies_ok, ""),
        ]
        for name, n, call, check, target in cases:
            out.append(row(name, await measure(n, call, check), target))
            print(out[-1], flush=True)
    finally:
        await session.close()
    return out


async def main_async(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="mdp-bench-query-"))
    server = start_compacting_influxd(tmp / "influx")
    end = (time.time_ns() // HOUR) * HOUR
    settings = InfluxSettings(url=server.url, database="bench_query", retention=KEEP_ALL)
    try:
        await load(server.url, end)
        async with InfluxClient(settings) as client:
            fresh = await queries(client, server.url, end, args.last_queries, args.year_queries)
        print("settling (waiting for the cache snapshot and compaction)... ", end="", flush=True)
        waited = await settle(tmp / "influx" / "data", tmp / "influx" / "wal")
        print(f"{waited:.0f} s", flush=True)
        async with InfluxClient(settings) as client:
            settled = await queries(client, server.url, end, args.last_queries, args.year_queries)
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\nMachine: {platform.node()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"{args.influxd_version}, asyncio event loop\n")
    header = "| query | n | p50 ms | p99 ms | max ms | target |\n|---|---:|---:|---:|---:|---|"
    print("### Right after writing (data partly in the cache/WAL)\n")
    print(header)
    print("\n".join(fresh))
    print("\n### After compaction (steady state)\n")
    print(header)
    print("\n".join(settled))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.bench_query")
    parser.add_argument("--last-queries", type=int, default=500)
    parser.add_argument("--year-queries", type=int, default=50)
    args = parser.parse_args()
    args.influxd_version = subprocess.run(["influxd", "version"], check=True, capture_output=True,
                                          text=True).stdout.strip()
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
