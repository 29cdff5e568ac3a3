"""Shared by the collector tests: a config pointing one exchange at a simulator, reading a stream's events,
and running a collector until a condition holds."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import msgspec
import redis.asyncio as aioredis

from common.config import Settings
from schemas import Codec
from services.collector.service import Collector


def collector_settings(settings: Settings, rest: str, ws: str, exchange: str = "binance",
                       **fields: object) -> Settings:
    """`settings` with only `exchange`, built from the binance entry, its URLs at a simulator."""
    ex = msgspec.structs.replace(settings.exchange("binance"), id=exchange, rest_url=rest, ws_url=ws, **fields)
    return msgspec.structs.replace(settings, exchanges=[ex])


async def read(redis: aioredis.Redis, stream: str) -> list[object]:
    """Every event of `stream`, in order."""
    codec = Codec()
    return [e for _, f in await redis.xrange(stream) for e in codec.decode_entry(f)]


async def run_collector(collector: Collector, until: Callable[[], Awaitable[bool]], timeout: float = 60.0) -> None:
    """Run `collector` until `until()` holds (raising what the collector raised), then stop and close it."""
    stop = asyncio.Event()
    task = asyncio.create_task(collector.run(stop))
    try:
        async with asyncio.timeout(timeout):
            while not await until():
                if task.done():
                    task.result()
                await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)
        await collector.close()
