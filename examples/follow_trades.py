"""Follow BTC/USDT trades from the pipeline's public stream with a consumer group of your own."""
import asyncio
import os

import redis.asyncio as aioredis

from schemas import Codec

STREAM = "md:trade:binance:BTC/USDT"


async def main() -> None:
    codec = Codec()
    r = aioredis.Redis.from_url(os.environ.get("MDP_REDIS_URL", "redis://127.0.0.1:6380/0"))
    try:  # a group of our own; id="$" starts at new entries ("0" replays the whole stream)
        await r.xgroup_create(STREAM, "my-strategy", id="$", mkstream=True)
    except aioredis.ResponseError:
        pass  # BUSYGROUP: it exists, carry on where we left off
    for _ in range(3):
        for stream, entries in await r.xreadgroup("my-strategy", "me", {STREAM: ">"}, count=10, block=5000):
            for entry_id, fields in entries:
                for trade in codec.decode_entry(fields):
                    print(trade.symbol, trade.price, trade.amount, trade.side, trade.ts_event)
                await r.xack(stream, "my-strategy", entry_id)
    await r.aclose()


asyncio.run(main())
