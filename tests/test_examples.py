"""The README's strategy example runs as written against a real Redis fed by the bus."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from common.bus.core import Producer
from common.config import BusSettings
from schemas import Codec
from tests import stubs

ROOT = Path(__file__).resolve().parent.parent


async def test_follow_trades_example_prints_published_trades(redis_server, redis) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(ROOT / "examples" / "follow_trades.py"), cwd=ROOT,
        env=dict(os.environ, MDP_REDIS_URL=redis_server.url, PYTHONPATH=str(ROOT)),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    producer = Producer(redis, Codec(), BusSettings(), "test")
    async with asyncio.timeout(30):
        while proc.returncode is None:
            if await redis.exists("md:trade:binance:BTC/USDT"):
                groups = await redis.xinfo_groups("md:trade:binance:BTC/USDT")
                if groups:
                    await producer.publish({"md:trade:binance:BTC/USDT": [stubs.trade(i) for i in range(5)]})
            try:
                await asyncio.wait_for(proc.wait(), 0.3)
            except TimeoutError:
                pass
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    assert lines[0].startswith("BTC/USDT 61837.63 0.02 sell ")
    assert len(lines) >= 5
