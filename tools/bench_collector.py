"""Benchmark of the collector (issue 3, Measure): its overhead on top of ccxt.pro, and how fast data flows again
after a disconnect.

    python -m tools.bench_collector [--trades 200000] [--disconnects 10]

Every part real: a private redis-server on a free port, the simulator as its own process (`python -m
simulator`, replaying the real Binance spot capture of BTC/USDT, looped), ccxt.pro unmodified.

1. Throughput at speed 0 (the simulator sends as fast as the socket takes it), the same replay twice:
   a. ccxt.pro alone: `watch_trades` in a loop, reading each new trade out of ccxt's cache (the least any
      consumer of ccxt must do), nothing else;
   b. our collector (services/collector) with the trades channel only: the same watch loop plus turning
      each trade into a `Trade` event, dedup by id, packing and XADD to raw:binance.
   Each runs in this process until `--trades` trades were seen; we report wall time, trades/s, and the CPU
   time of this process per trade (the simulator and Redis run in other processes), and the overhead
   (b - a) / a of CPU per trade. The target: at most 15%.
2. Reconnect: with the replay at 5x real speed, `--disconnects` times: the simulator drops every socket
   (`disconnect` fault, new connections accepted at once); we time from the fault to the collector's Gap
   being published, i.e. the first trade after the reconnect (data flowing again).
Prints Markdown (the figures of docs/bench-collector.md).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import msgspec

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common.config import ExchangeSettings, Settings, load_settings
from common.exchanges.clients import make_pro_exchange
from services.collector.feeds import cache_tail
from services.collector.service import Collector
from tools.localstores import free_port, port_open, start_redis


def start_simulator(port: int, speed: float) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "simulator", "--port", str(port), "--speed", str(speed), "--loop",
           "--wait-for", "btcusdt@trade", "--no-book-ticker"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not port_open(port):
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError(f"the simulator did not start on port {port}")
        time.sleep(0.1)
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    proc.wait(20)


def exchange_settings(base: Settings, port: int) -> ExchangeSettings:
    return msgspec.structs.replace(base.exchange("binance"), rest_url=f"http://127.0.0.1:{port}",
                                   ws_url=f"ws://127.0.0.1:{port}", channels=["trades"])


async def ccxt_alone(ex: ExchangeSettings, trades: int) -> tuple[float, float, int]:
    """(wall s, CPU s, trades seen) of a bare ccxt.pro watch_trades loop reading its cache's new trades."""
    exchange = make_pro_exchange(ex)
    seen: dict[str, None] = {}
    count = 0
    try:
        await exchange.load_markets()
        t0, c0 = time.perf_counter(), time.process_time()
        while count < trades:
            await exchange.watch_trades("BTC/USDT")
            fresh = cache_tail(exchange.trades.get("BTC/USDT"), seen)
            for t in fresh:
                seen[str(t["id"])] = None
            count += len(fresh)
            while len(seen) > 10_000:
                del seen[next(iter(seen))]
        return time.perf_counter() - t0, time.process_time() - c0, count
    finally:
        await exchange.close()


async def collector_run(settings: Settings, trades: int) -> tuple[float, float, int]:
    """(wall s, CPU s, trades published) of our collector with the trades channel, from its first trade."""
    collector = Collector(settings, "bench", exchange="binance")
    stop_event = asyncio.Event()
    task = asyncio.create_task(collector.run(stop_event))
    try:
        while collector.count["trades"] == 0:
            if task.done():
                task.result()
            await asyncio.sleep(0.001)
        t0, c0, n0 = time.perf_counter(), time.process_time(), collector.count["trades"]
        while collector.count["trades"] - n0 < trades:
            if task.done():
                task.result()
            await asyncio.sleep(0.05)
        return time.perf_counter() - t0, time.process_time() - c0, collector.count["trades"] - n0
    finally:
        stop_event.set()
        await asyncio.wait_for(task, 30)
        await collector.close()


async def reconnects(settings: Settings, port: int, n: int) -> list[float]:
    """Seconds from a disconnect fault to the collector's Gap (its first trade after the reconnect)."""
    collector = Collector(settings, "bench-reconnect", exchange="binance")
    stop_event = asyncio.Event()
    task = asyncio.create_task(collector.run(stop_event))
    out: list[float] = []
    try:
        async with aiohttp.ClientSession() as http:
            while collector.count["trades"] < 100:
                await asyncio.sleep(0.01)
            for _ in range(n):
                gaps = collector.count["gaps"]
                t0 = time.perf_counter()
                async with http.post(f"http://127.0.0.1:{port}/_sim/fault", json={"kind": "disconnect"}) as r:
                    r.raise_for_status()
                async with asyncio.timeout(60):
                    while collector.count["gaps"] == gaps:
                        await asyncio.sleep(0.002)
                out.append(time.perf_counter() - t0)
                await asyncio.sleep(1.0)  # let the new connection settle before the next fault
    finally:
        stop_event.set()
        await asyncio.wait_for(task, 30)
        await collector.close()
    return out


async def main_async(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        redis = start_redis(Path(tmp))
        try:
            base = load_settings(env={"MDP_REDIS_URL": redis.url})
            rows = []
            for name in ("ccxt.pro alone", "collector (trades -> Redis)"):
                port = free_port()
                sim = start_simulator(port, speed=0)
                try:
                    ex = exchange_settings(base, port)
                    if name == "ccxt.pro alone":
                        wall, cpu, count = await ccxt_alone(ex, args.trades)
                    else:
                        wall, cpu, count = await collector_run(
                            msgspec.structs.replace(base, exchanges=[ex]), args.trades)
                finally:
                    stop(sim)
                rows.append((name, wall, cpu, count))
            port = free_port()
            sim = start_simulator(port, speed=5)
            try:
                ex = exchange_settings(base, port)
                times = await reconnects(msgspec.structs.replace(base, exchanges=[ex]), port, args.disconnects)
            finally:
                stop(sim)
        finally:
            redis.stop()
    print(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}\n")
    print("| run | trades | wall s | trades/s | CPU us/trade |")
    print("|---|---|---|---|---|")
    for name, wall, cpu, count in rows:
        print(f"| {name} | {count:,} | {wall:.2f} | {count / wall:,.0f} | {cpu / count * 1e6:.1f} |")
    base_cpu = rows[0][2] / rows[0][3]
    ours = rows[1][2] / rows[1][3]
    print(f"\nOverhead of the collector on top of ccxt.pro, CPU per trade: {(ours - base_cpu) / base_cpu:+.1%}")
    print(f"\nDisconnect -> data flowing again ({len(times)} disconnects at 5x real speed): median "
          f"{statistics.median(times) * 1000:.0f} ms, min {min(times) * 1000:.0f} ms, max {max(times) * 1000:.0f} ms")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trades", type=int, default=200_000)
    p.add_argument("--disconnects", type=int, default=10)
    asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    main()
