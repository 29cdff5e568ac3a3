"""Stored candles, then live ones: the last hour of BTC/USDT 1m candles from InfluxDB as a DataFrame, then a
feed from an hour ago that continues live from md:candle:binance:BTC/USDT with no gap and no duplicate.

    .venv/bin/python examples/history_then_live.py   (with `make demo` running; LIVE_CANDLES=3 waits for 3)
"""
import asyncio
import os
import time

import redis.asyncio as aioredis

from common.config import load_settings
from common.history import candles, history

LIVE_CANDLES = int(os.environ.get("LIVE_CANDLES", "1"))  # a closed 1m candle arrives once a minute


async def main() -> None:
    settings = load_settings()  # config/simulator.toml, or MDP_CONFIG; MDP_REDIS_URL / MDP_INFLUX_URL override
    now = time.time_ns()
    hour_ago = now - 3600 * 1_000_000_000
    frame = await history("binance", "BTC/USDT", "1m", hour_ago, now, settings=settings)
    print(f"last hour in InfluxDB: {len(frame)} candles")
    print(frame.tail(3).to_string())

    r = aioredis.Redis.from_url(settings.redis.url)
    live = 0
    async with candles("binance", "BTC/USDT", "1m", hour_ago, redis=r, settings=settings) as feed:
        async for candle in feed:
            print("stream" if feed.live else "stored", candle.open_time, candle.open, candle.high, candle.low,
                  candle.close, candle.volume)
            live += feed.live
            if live >= LIVE_CANDLES:
                break
    await r.aclose()


asyncio.run(main())
