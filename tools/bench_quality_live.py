"""Cost of the live quality rules and throughput of the aggregator, on real data (docs/bench-quality-live.md).

1. In-process, no I/O: the stateless rules (common.domain.quality.check) alone, then with the stream rules
   (common.domain.series), per trade (the real Binance capture) and per closed 1m candle (the real
   binance-spot-1m-ccxt file, March 2024, 30,954 rows with its 54 page-boundary duplicates).
2. The validator and the aggregator as services, one process each, on a private redis-server: input streams
   pre-filled, time until every event is acknowledged.

    python -m tools.bench_quality_live [--trades N]

Prints Markdown. Compare ratios within one run; absolute figures drift with the machine and its load.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import platform
import tempfile
import time
from decimal import Decimal
from pathlib import Path

from common.bus import streams
from common.config import BusSettings, QualitySettings, RedisSettings, Settings
from common.domain import quality
from common.domain.series import StreamRules
from common.domain.state import SeriesBook
from schemas import Candle, Event
from services.aggregator import Aggregator
from services.validator import Validator
from tools.bench import REAL, real_trades, stage_rate
from tools.localstores import start_redis

BUS = BusSettings(stream_maxlen=100_000, backpressure_high_water=50_000, batch_max_events=500, read_count=100,
                  block_ms=100)


def real_candles() -> list[Candle]:
    path = REAL / "binance-spot-1m-ccxt" / "BTCUSDT-1m-2024-03.csv"
    out = []
    with path.open() as fh:
        for row in csv.DictReader(fh):
            t = int(row["timestamp"]) * 1_000_000
            out.append(Candle(exchange="binance", symbol="BTC/USDT", timeframe="1m", open_time=t,
                              open=Decimal(row["open"]), high=Decimal(row["high"]), low=Decimal(row["low"]),
                              close=Decimal(row["close"]), volume=Decimal(row["volume"]), closed=True,
                              ts_event=t + 59_999_000_000, ts_recv=t + 60_000_000_000))
    return out


def rules_cost(events: list[Event], stream: bool) -> float:
    """Microseconds per event of the rules alone, in batches of 500 (as the validator stages them)."""
    ctx = quality.CheckContext(now_ns=time.time_ns())
    rules = StreamRules(QualitySettings())
    book = SeriesBook(5000)
    t0 = time.perf_counter()
    for i in range(0, len(events), 500):
        staging = book.stage()
        for e in events[i:i + 500]:
            if not quality.rejects(quality.check(e, ctx)) and stream:
                rules.judge(e, staging, ctx.now_ns)
        staging.commit()
    return (time.perf_counter() - t0) / len(events) * 1e6


async def service_rate(settings: Settings, cls: type[Validator | Aggregator],
                       streams_in: dict[str, list[Event]]) -> float:
    return await stage_rate(settings, cls, streams_in)


async def main_async(args: argparse.Namespace) -> None:
    trades: list[Event] = list(real_trades(args.trades))
    candles: list[Event] = list(real_candles())
    print(f"# Live quality rules and aggregator ({platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()})\n")
    print("| what | cost |")
    print("|---|---|")
    for name, events in (("trade", trades), ("closed 1m candle", candles)):
        base = rules_cost(events, stream=False)
        full = rules_cost(events, stream=True)
        print(f"| stateless rules per {name} | {base:.2f} us |")
        print(f"| stateless + stream rules per {name} | {full:.2f} us (x{full / base:.2f}) |")
    tmp = Path(tempfile.mkdtemp(prefix="mdp-bench-quality-"))
    server = start_redis(tmp / "redis")
    try:
        settings = Settings(redis=RedisSettings(url=server.url), bus=BUS)
        rate = await service_rate(settings, Validator, {streams.raw("binance"): trades})
        print(f"| validator service, {len(trades):,} real trades through Redis | {rate:,.0f} events/s |")
        rate = await service_rate(settings, Validator, {streams.raw("binance"): candles})
        print(f"| validator service, {len(candles):,} real closed 1m candles | {rate:,.0f} events/s |")
        md_trades = streams.market_data("trade", "binance", "BTC/USDT")
        rate = await service_rate(settings, Aggregator, {md_trades: trades})
        print(f"| aggregator service, {len(trades):,} real trades -> 1m | {rate:,.0f} events/s |")
        md_candles = streams.market_data("candle", "binance", "BTC/USDT")
        rate = await service_rate(settings, Aggregator, {md_candles: candles})
        print(f"| aggregator service, {len(candles):,} real 1m candles -> 5m..1d | {rate:,.0f} events/s |")
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.bench_quality_live")
    parser.add_argument("--trades", type=int, default=200_000, help="real trades to replay (looped with new ids)")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
