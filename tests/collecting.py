"""Shared by the collector tests: a config pointing one exchange at a simulator, reading a stream's events,
running a collector until a condition holds, and a Redis a test can stop and start again."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path

import msgspec
import redis.asyncio as aioredis

from common.config import Settings
from schemas import Codec
from services.collector.service import Collector
from tools.localstores import free_port, port_open


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


class RestartableRedis:
    """A private redis-server with its append-only file (fsync always), that a test stops and starts again."""

    def __init__(self, directory: Path, appendonly: bool = True) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.cmd = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                    "--appendonly", "yes" if appendonly else "no", "--appendfsync", "always",
                    "--dir", str(directory)]
        self.process: subprocess.Popen[bytes] | None = None

    def spawn(self) -> None:
        self.process = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL)

    async def start(self) -> None:
        self.spawn()
        async with asyncio.timeout(10):
            while not port_open(self.port):
                await asyncio.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None
