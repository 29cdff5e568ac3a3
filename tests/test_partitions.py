"""A partitioned aggregator (bus.partitions = 4) on the real Redis with the real capture: partitions by base
asset, shared out between two instances, handed over when one joins and taken back when one dies with a batch
in hand; the outputs equal those of one aggregator without partitions (no minute or bar lost, doubled or
wrong)."""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Callable, Sequence

import msgspec
import pytest
import redis.asyncio as aioredis

from common.bus import streams
from common.bus.core import Delivery, Producer
from common.config import ConfigError, load_settings
from schemas import Event
from services.aggregator import Aggregator
from tests.test_aggregator import (
    aggregate_in_pieces,
    all_done,
    by_time,
    capture,
    everything_published,
    settings,  # noqa: F401 - the fixture
    streams_of,
)

replace = msgspec.structs.replace
# Five symbols over the four partitions (BTC and SOL share partition 2): the real BTC/USDT capture under each.
SYMBOLS = {"BTC/USDT": 2, "ETH/USDT": 3, "XRP/USDT": 0, "LINK/USDT": 1, "SOL/USDT": 2}


def test_a_symbol_s_partition_is_the_crc32_of_its_base_asset() -> None:
    for symbol, k in SYMBOLS.items():
        assert streams.partition_of(symbol, 4) == k == zlib.crc32(symbol.split("/")[0].encode()) % 4
    # every venue and quote of an asset meets in one partition
    assert {streams.partition_of(s, 7) for s in ("BTC/USDT", "BTC/USDT:USDT", "BTC/USD", "BTC/USDC:USDC")} == {
        streams.partition_of("BTC/EUR", 7)}
    assert streams.partition_of_stream("md:trade:binanceusdm:ETH/USDT:USDT", 4) == 3
    assert streams.partition_of("ETH/USDT", 1) == 0


def test_partitions_out_of_bounds_is_a_config_error(tmp_path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[bus]\npartitions = 0\n")
    with pytest.raises(ConfigError, match=r"bus.partitions = 0 must be from 1 to 256"):
        load_settings(path, env={})


def pieces_of_five_symbols() -> list[list[Event]]:
    """The real capture's trades and exchange candles under each symbol, cut by time into three pieces."""
    _, trades, candles = capture()
    cuts = [len(trades) // 3, 2 * len(trades) // 3]
    pieces: list[list[Event]] = [[], [], []]
    for symbol in SYMBOLS:
        mine = by_time([replace(t, symbol=symbol) for t in trades], [replace(c, symbol=symbol) for c in candles], cuts)
        for whole, piece in zip(pieces, mine, strict=True):
            whole.extend(piece)
    return pieces


async def wait_until(what: str, predicate: Callable[[], bool], tasks: Sequence[asyncio.Task[None]],
                     timeout: float = 60.0) -> None:
    """Wait for `predicate`, failing with `what` on timeout or with a task's own exception if one ends."""
    try:
        async with asyncio.timeout(timeout):
            while not predicate():
                for t in tasks:
                    if t.done():
                        t.result()
                        raise AssertionError(f"a service stopped while waiting for {what}")
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout} s waiting for {what}") from None


async def drained(redis: aioredis.Redis, names: list[str], tasks: Sequence[asyncio.Task[None]]) -> None:
    async with asyncio.timeout(90):
        while not await all_done(redis, names, "aggregator"):
            for t in tasks:
                if t.done():
                    t.result()
            await asyncio.sleep(0.05)


def held(svc: Aggregator) -> set[int]:
    assert svc.partitions is not None
    return set(svc.partitions.live)


async def test_two_partitioned_aggregators_share_hand_over_and_take_back_without_loss(redis, settings) -> None:  # noqa: F811
    # Arrange: what one aggregator without partitions publishes from the three pieces (many small batches)
    small = replace(settings, bus=replace(settings.bus, batch_max_events=20, read_count=10, heartbeat_interval_s=0.2))
    pieces = pieces_of_five_symbols()
    await aggregate_in_pieces(redis, small, pieces)
    expected = await everything_published(redis)
    assert all(len(expected[streams.candle_built("binance", s)]) >= 9 for s in SYMBOLS)  # every symbol's minutes
    await redis.flushdb()
    four = replace(small, bus=replace(small.bus, partitions=4))
    names = sorted({s for piece in pieces for s in streams_of(piece)})
    a, b = Aggregator(four, instance="a"), Aggregator(four, instance="b")
    stuck = asyncio.Event()
    for svc in (a, b):
        assert svc.partitions is not None
        svc.partitions.refresh_s = 0.05
    b.handle = freeze_after(b, 5, stuck)  # type: ignore[method-assign]
    stop_a, stop_b = asyncio.Event(), asyncio.Event()
    tasks_a = [asyncio.create_task(a.run(stop_a)), asyncio.create_task(a._heartbeats(stop_a))]
    tasks_b: list[asyncio.Task[None]] = []
    producer = Producer(redis, a.codec, small.bus, "test")
    try:
        # Act 1: A alone takes the four partitions and aggregates the first piece
        await wait_until("A holding all four partitions", lambda: held(a) == {0, 1, 2, 3}, tasks_a)
        await producer.publish(streams_of(pieces[0]))
        await drained(redis, names, tasks_a)
        # Act 2: B joins; A hands two partitions over between batches; B freezes with a batch of the second
        # piece in hand (its lease still renewed) and is killed
        tasks_b = [asyncio.create_task(b.run(stop_b)), asyncio.create_task(b._heartbeats(stop_b))]
        await wait_until("A and B holding two partitions each",
                         lambda: len(held(a)) == 2 and len(held(b)) == 2 and not held(a) & held(b), [*tasks_a, *tasks_b])
        taken_by_b = held(b)
        await producer.publish(streams_of(pieces[1]))
        await wait_until("B frozen with a batch in hand", stuck.is_set, [*tasks_a, *tasks_b])
        for t in tasks_b:
            t.cancel()
        await asyncio.gather(*tasks_b, return_exceptions=True)
        # Act 3: A takes B's partitions back once B's heartbeat and leases expire, B's pending batch first
        await producer.publish(streams_of(pieces[2]))
        await wait_until("A holding all four partitions again", lambda: held(a) == {0, 1, 2, 3}, tasks_a)
        await drained(redis, names, tasks_a)
        counters = a.counters()
    finally:
        stop_a.set()
        stop_b.set()
        await asyncio.gather(*tasks_a, *tasks_b, return_exceptions=True)
        await producer.aclose()
        for svc in (a, b):
            await svc.close()
    # Assert: one process's outputs, nothing lost, doubled or wrong; B's pending batch was taken over
    assert await everything_published(redis) == expected
    assert len(taken_by_b) == 2
    assert a.consumer.stats.claimed > 0
    assert counters["partitions_held"] == 4 and counters["series_loaded"] >= 2  # B's symbols, from checkpoints
    for k in range(4):
        assert await redis.hlen(f"mdp:state:aggregator:p{k}") == sum(1 for p in SYMBOLS.values() if p == k)


def freeze_after(svc: Aggregator, entries: int, stuck: asyncio.Event):
    """svc.handle, except that its batch after `entries` acknowledged entries hangs (a process that froze with
    the batch in hand, then is killed)."""
    handle = svc.handle

    async def gated(batch: list[Delivery]) -> object:
        if svc.consumer.stats.acked >= entries:
            stuck.set()
            await asyncio.Event().wait()
        return await handle(batch)
    return gated
