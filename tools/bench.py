"""`make bench`: throughput of the bus and of each stage (events/s, one process), and end-to-end latency.

Runs on private servers it starts itself (redis-server, influxd on free ports; the local PostgreSQL with a
scratch database), fed by real trades from ../shared/data/real/ws-captures. Prints a Markdown table that
goes into BENCHMARKS.md. Compare ratios within one run; absolute figures drift with the machine.

    python -m tools.bench [--events N] [--only bus,stages,latency]
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import redis.asyncio as aioredis

from common.bus.core import Consumer, Delivery, Producer, StreamSelector
from common.config import PROJECT_ROOT, BusSettings, Settings, load_settings
from schemas import Codec, Event, Trade
from simulator.recording import real_data_dir
from tools.localstores import start_influxd, start_redis

REAL = real_data_dir()  # $MDP_REAL_DATA, ../shared/data/real, or the shipped data/real


def real_trades(n: int) -> list[Trade]:
    """The first n trades of the real Binance spot capture (repeated with fresh ids/times if n is larger)."""
    base: list[Trade] = []
    for name in ("binance_spot_btcusdt_20240808.gz", "binance_spot_btcusdt_20240809.gz"):
        with gzip.open(REAL / "ws-captures" / name, "rt") as f:
            for line in f:
                recv, _, raw = line.partition(" ")
                if '"@trade"' not in raw and "@trade" not in raw:
                    continue
                msg = json.loads(raw).get("data", {})
                if msg.get("e") != "trade":
                    continue
                base.append(Trade(exchange="binance", symbol="BTC/USDT", trade_id=str(msg["t"]),
                                  price=Decimal(msg["p"]), amount=Decimal(msg["q"]),
                                  side="sell" if msg["m"] else "buy", ts_event=msg["T"] * 1_000_000,
                                  ts_recv=int(recv)))
    out: list[Trade] = []
    i = 0
    while len(out) < n:
        t = base[i % len(base)]
        loop = i // len(base)
        out.append(msgspec.structs.replace(t, trade_id=str(int(t.trade_id) + loop * 10_000_000),
                                           ts_event=t.ts_event + loop * 86_400_000_000_000,
                                           ts_recv=t.ts_recv + loop * 86_400_000_000_000))  # received then too
        i += 1
    return out


async def bench_bus(redis: aioredis.Redis, trades: list[Trade]) -> list[tuple[str, float, str]]:
    codec = Codec()
    rows = []
    n = len(trades)
    # One entry per event, pipelined 1000 XADDs per round trip.
    await redis.flushdb()
    t0 = time.perf_counter()
    for i in range(0, n, 1000):
        pipe = redis.pipeline(transaction=False)
        for t in trades[i:i + 1000]:
            pipe.xadd("single", codec.entry([t]))  # type: ignore[arg-type]
        await pipe.execute()
    single_pub = n / (time.perf_counter() - t0)
    mem_single = await redis.memory_usage("single") or 0
    # Packed: the Producer, 500 events per entry.
    settings = BusSettings(stream_maxlen=1_000_000, backpressure_high_water=900_000)
    producer = Producer(redis, codec, settings, "bench")
    t0 = time.perf_counter()
    for i in range(0, n, 5000):
        await producer.publish({"packed": trades[i:i + 5000]})  # type: ignore[dict-item]
    packed_pub = n / (time.perf_counter() - t0)
    mem_packed = await redis.memory_usage("packed") or 0
    for name, pub, mem in (("single", single_pub, mem_single), ("packed", packed_pub, mem_packed)):
        rate = await consume_all(redis, codec, name, n)
        rows.append((f"bus publish, {'one entry per event' if name == 'single' else '500 events per entry'}",
                     pub, f"{mem / n:.0f} B of Redis memory per event"))
        rows.append((f"bus consume (XREADGROUP+decode+XACK), {name}", rate, ""))
    return rows


async def consume_all(redis: aioredis.Redis, codec: Codec, stream: str, n: int) -> float:
    seen = 0
    settings = BusSettings(read_count=100 if stream == "packed" else 1000, block_ms=100)

    async def handler(batch: list[Delivery]) -> None:
        nonlocal seen
        seen += sum(len(d.events) for d in batch)

    consumer = Consumer(redis, codec, settings, "bench", "c1", StreamSelector(names=[stream]))
    return await run_consumer(consumer, handler, lambda: seen >= n, n)


async def run_consumer(consumer: Consumer, handler: Callable[[list[Delivery]], Awaitable[Any]],
                       done: Callable[[], bool], n: int, timeout: float = 300) -> float:
    stop = asyncio.Event()
    t0 = time.perf_counter()
    task = asyncio.create_task(consumer.run(handler, stop))
    async with asyncio.timeout(timeout):
        while not done():
            await asyncio.sleep(0.005)
    elapsed = time.perf_counter() - t0
    stop.set()
    await task
    return n / elapsed


def _stage(name: str) -> Any:
    if name == "validator":
        from services.validator.service import Validator
        return Validator
    if name == "normalizer":
        from services.normalizer.service import Normalizer
        return Normalizer
    if name == "influx_writer":
        from services.influx_writer.service import InfluxWriter
        return InfluxWriter
    if name == "cache_publisher":
        from services.cache_publisher.service import CachePublisher
        return CachePublisher
    raise KeyError(name)


async def bench_stage(settings: Settings, name: str, input_stream: str, events: Sequence[Event]) -> float:
    return await stage_rate(settings, _stage(name), {input_stream: list(events)})


async def stage_rate(settings: Settings, cls: Any, streams_in: dict[str, list[Event]],
                     timeout_s: float = 300) -> float:
    """Events/s of one stage (a Service class with a `consumer`) draining streams pre-filled through
    `Producer`, timed from start until it has consumed every event (raising what the stage raised)."""
    service = cls(settings, "bench")
    await service.redis.flushdb()
    producer = Producer(service.redis, service.codec, settings.bus, "bench")
    for stream, events in streams_in.items():
        for i in range(0, len(events), 5000):
            await producer.publish({stream: events[i:i + 5000]})
    n = sum(len(v) for v in streams_in.values())
    stop = asyncio.Event()
    t0 = time.perf_counter()
    task = asyncio.create_task(service.run(stop))
    try:
        async with asyncio.timeout(timeout_s):
            while service.consumer.stats.events < n:
                if task.done():
                    task.result()
                await asyncio.sleep(0.005)
    finally:
        elapsed = time.perf_counter() - t0
        stop.set()
        await asyncio.wait_for(task, 30)
        await service.close()
    return n / elapsed


async def bench_latency(settings: Settings, config_path: Path, trades: list[Trade], rate: int,
                        seconds: float) -> list[tuple[str, float, str]]:
    """Collector-like load through validator -> normalizer -> cache_publisher, each its own process.

    Every 10 ms a batch of rate/100 real trades stamped ts_recv=now goes to raw:binance; a subscriber on
    ticks:BTC/USDT takes (receipt time - ts_recv) per trade.
    """
    import sys

    env = dict(os.environ, MDP_CONFIG=str(config_path), MDP_REDIS_URL=settings.redis.url,
               MDP_INFLUX_URL=settings.influx.url, MDP_POSTGRES_DSN=settings.postgres.dsn, MDP_LOG_LEVEL="WARNING")
    redis = aioredis.Redis.from_url(settings.redis.url)
    await redis.flushdb()
    procs = [await asyncio.create_subprocess_exec(sys.executable, "-m", f"services.{name}", env=env, cwd=PROJECT_ROOT)
             for name in ("validator", "normalizer", "cache_publisher")]
    pubsub = redis.pubsub()
    await pubsub.subscribe("ticks:BTC/USDT")
    latencies: list[float] = []

    async def listen() -> None:
        async for msg in pubsub.listen():
            if msg["type"] == "message":
                body = json.loads(msg["data"])
                latencies.append((time.time_ns() - body["ts_recv"]) / 1e6)

    listener = asyncio.create_task(listen())
    producer = Producer(redis, Codec(), settings.bus, "bench")
    per_tick = max(1, rate // 100)
    warmup_end = time.monotonic() + 6  # the stages discover their streams within ~2 s each
    sent = 0
    measured_from = 0
    try:
        t_end = warmup_end + seconds
        i = 0
        while time.monotonic() < t_end:
            now = time.time_ns()
            batch = [msgspec.structs.replace(t, ts_recv=now) for t in trades[i:i + per_tick]]
            i = (i + per_tick) % max(1, len(trades) - per_tick)
            await producer.publish({"raw:binance": batch})  # type: ignore[dict-item]
            sent += len(batch)
            if not measured_from and time.monotonic() >= warmup_end:
                measured_from = len(latencies)
            await asyncio.sleep(0.01)
        await asyncio.sleep(2)
    finally:
        listener.cancel()
        for p in procs:
            p.terminate()
        for p in procs:
            await asyncio.wait_for(p.wait(), timeout=20)
        await pubsub.aclose()
        await redis.aclose()
    sample = sorted(latencies[measured_from:])
    if not sample:
        raise RuntimeError("no tick reached the cache during the latency run; read the stage logs above")
    p50 = statistics.median(sample)
    p99 = sample[int(len(sample) * 0.99) - 1]
    return [(f"latency ts_recv -> cache (ticks pub/sub), {rate} trades/s, 3 stage processes", p50,
             f"p50 ms (p99 {p99:.1f} ms, max {sample[-1]:.1f} ms, {len(sample)} trades)")]


async def main_async(args: argparse.Namespace) -> None:
    trades = real_trades(args.events)  # first: a missing recording must not leave servers behind
    tmp = Path(tempfile.mkdtemp(prefix="mdp-bench-"))
    redis_srv = start_redis(tmp / "redis")
    influx_srv = start_influxd(tmp / "influx")
    admin = await asyncpg.connect("postgresql://postgres@127.0.0.1:5432/postgres")
    await admin.execute("DROP DATABASE IF EXISTS mdp_bench")
    await admin.execute("CREATE DATABASE mdp_bench")
    settings = load_settings(PROJECT_ROOT / "config" / "simulator.toml", env={
        "MDP_REDIS_URL": redis_srv.url, "MDP_INFLUX_URL": influx_srv.url,
        "MDP_POSTGRES_DSN": "postgresql://postgres@127.0.0.1:5432/mdp_bench"})
    settings = msgspec.structs.replace(settings, bus=msgspec.structs.replace(
        settings.bus, stream_maxlen=1_000_000, backpressure_high_water=900_000))
    rows: list[tuple[str, float, str]] = []
    try:
        redis = aioredis.Redis.from_url(redis_srv.url)
        if "bus" in args.only:
            rows += await bench_bus(redis, trades)
        if "stages" in args.only:
            from common.bus import streams
            rows.append(("validator", await bench_stage(settings, "validator", streams.raw("binance"), trades),
                         "real trades"))
            rows.append(("normalizer", await bench_stage(settings, "normalizer", streams.valid("binance"), trades),
                         "real trades"))
            rows.append(("influx_writer", await bench_stage(settings, "influx_writer", "md:trade:binance:BTC/USDT",
                                                            trades), "real trades into InfluxDB 1.6.7"))
            rows.append(("cache_publisher", await bench_stage(settings, "cache_publisher",
                                                              "md:trade:binance:BTC/USDT", trades),
                         "real trades: price key, ticks pub/sub, recent list"))
        if "latency" in args.only:
            cfg = tmp / "bench.toml"
            cfg.write_text((PROJECT_ROOT / "config" / "simulator.toml").read_text())
            rows += await bench_latency(settings, cfg, trades, args.rate, args.seconds)
        await redis.aclose()
    finally:
        redis_srv.stop()
        influx_srv.stop()
        await admin.execute("DROP DATABASE IF EXISTS mdp_bench WITH (FORCE)")
        await admin.close()
    print(f"\nMachine: {platform.node()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
          f"{len(trades)} real trades per measurement\n")
    print("| what | figure | note |\n|---|---:|---|")
    for what, rate, note in rows:
        figure = f"{rate:,.1f}" if rate < 100 else f"{rate:,.0f} events/s"
        print(f"| {what} | {figure} | {note} |")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.bench")
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--only", default="bus,stages,latency")
    parser.add_argument("--rate", type=int, default=2000, help="trades/s offered in the latency run")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured seconds of the latency run")
    args = parser.parse_args()
    args.only = set(args.only.split(","))
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
