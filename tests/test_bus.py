"""The bus on a real Redis: batching, acknowledgement after effect, retries, dead letters, takeover."""

from __future__ import annotations

import asyncio
import gc
import random
import time

import msgspec
import pytest

from common.backoff import EQUAL, EXACT, Backoff, sleep_unless
from common.bus import streams
from common.bus.core import Consumer, Delivery, Producer, StreamSelector
from common.config import BusSettings
from common.errors import StoreUnavailable
from common.tasks import cancel_and_wait
from schemas import Codec, Trade
from tests import stubs

FAST = BusSettings(stream_maxlen=1000, backpressure_high_water=500, backpressure_max_wait_s=0.5,
                   batch_max_events=10, read_count=50, block_ms=50, claim_idle_ms=200, max_deliveries=2)


async def run_until(consumer: Consumer, handler, predicate, timeout: float = 10.0) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(handler, stop))
    try:
        async with asyncio.timeout(timeout):
            while not predicate():
                await asyncio.sleep(0.02)
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)


async def test_publish_packs_events_into_bounded_entries(redis) -> None:
    # Arrange
    producer = Producer(redis, Codec(), FAST, "test")
    events = [stubs.trade(i) for i in range(25)]
    # Act
    await producer.publish({"md:trade:binance:BTC/USDT": events})
    # Assert
    entries = await redis.xrange("md:trade:binance:BTC/USDT")
    assert [len(Codec().decode_entry(f)) for _, f in entries] == [10, 10, 5]
    assert await redis.sismember(streams.REGISTRY, "md:trade:binance:BTC/USDT")
    decoded = [e for _, f in entries for e in Codec().decode_entry(f)]
    assert decoded == events  # exact Decimals round-trip


async def test_entries_acknowledged_only_after_handler_succeeds(redis) -> None:
    producer = Producer(redis, Codec(), FAST, "test")
    await producer.publish({"s1": [stubs.trade(i) for i in range(30)]})
    seen: list[Trade] = []

    async def handler(batch: list[Delivery]) -> None:
        for d in batch:
            seen.extend(d.events)  # type: ignore[arg-type]

    consumer = Consumer(redis, Codec(), FAST, "g", "c1", StreamSelector(names=["s1"]))
    await run_until(consumer, handler, lambda: len(seen) == 30)
    pending = await redis.xpending("s1", "g")
    assert pending["pending"] == 0
    assert [t.trade_id for t in seen] == [stubs.trade(i).trade_id for i in range(30)]


async def test_store_unavailable_is_retried_in_place_without_loss(redis) -> None:
    producer = Producer(redis, Codec(), FAST, "test")
    await producer.publish({"s1": [stubs.trade(i) for i in range(5)]})
    calls = {"n": 0}
    stored: list[object] = []

    async def handler(batch: list[Delivery]) -> None:
        calls["n"] += 1
        if calls["n"] < 3:
            raise StoreUnavailable("influx down")
        for d in batch:
            stored.extend(d.events)

    consumer = Consumer(redis, Codec(), FAST, "g", "c1", StreamSelector(names=["s1"]))
    await run_until(consumer, handler, lambda: len(stored) == 5)
    assert consumer.stats.store_retries == 2
    assert consumer.stats.dead_lettered == 0
    assert (await redis.xpending("s1", "g"))["pending"] == 0


async def test_entries_retried_in_place_are_not_taken_over_by_a_sibling(redis) -> None:
    # Arrange: two consumers of one group; the first reads every entry, then its store is down for 5x
    # claim_idle_ms, while the second keeps looking for idle entries to take over.
    producer = Producer(redis, Codec(), FAST, "test")
    await producer.publish({"s1": [stubs.trade(i) for i in range(10)]})
    store_up = asyncio.Event()
    first: list[object] = []
    second: list[object] = []

    async def flaky(batch: list[Delivery]) -> None:
        if not store_up.is_set():
            raise StoreUnavailable("store down")
        for d in batch:
            first.extend(d.events)

    async def sibling(batch: list[Delivery]) -> None:
        for d in batch:
            second.extend(d.events)

    c1 = Consumer(redis, Codec(), FAST, "g", "c1", StreamSelector(names=["s1"]))
    c2 = Consumer(redis, Codec(), FAST, "g", "c2", StreamSelector(names=["s1"]))
    stop = asyncio.Event()
    t1 = asyncio.create_task(c1.run(flaky, stop))
    async with asyncio.timeout(5):
        while c1.stats.store_retries == 0:
            await asyncio.sleep(0.01)
    t2 = asyncio.create_task(c2.run(sibling, stop))

    # Act
    await asyncio.sleep(5 * FAST.claim_idle_ms / 1000)
    store_up.set()
    try:
        async with asyncio.timeout(10):
            while len(first) < 10:
                await asyncio.sleep(0.02)
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(t1, t2), 5)

    # Assert: the waiting consumer kept its entries (renewing its claim); nothing was processed twice.
    assert c1.stats.store_retries >= 2
    assert (second, c2.stats.claimed) == ([], 0)
    assert (await redis.xpending("s1", "g"))["pending"] == 0


async def test_undecodable_entry_goes_to_dead_letter_with_reason(redis) -> None:
    await redis.xadd("s1", {"v": "1", "d": b"\xc1garbage"})
    producer = Producer(redis, Codec(), FAST, "test")
    await producer.publish({"s1": [stubs.trade(1)]})
    got: list[object] = []

    async def handler(batch: list[Delivery]) -> None:
        for d in batch:
            got.extend(d.events)

    consumer = Consumer(redis, Codec(), FAST, "g", "c1", StreamSelector(names=["s1"]))
    await run_until(consumer, handler, lambda: len(got) == 1 and consumer.stats.dead_lettered == 1)
    letters = await redis.xrange(streams.dead_letter("s1"))
    assert len(letters) == 1
    assert b"not a batch of events" in letters[0][1][b"reason"]
    assert letters[0][1][b"orig_d"] == b"\xc1garbage"
    assert (await redis.xpending("s1", "g"))["pending"] == 0


async def test_entry_failing_every_delivery_is_dead_lettered_and_others_flow(redis) -> None:
    producer = Producer(redis, Codec(), FAST, "test")
    for i in range(3):
        await producer.publish({"s1": [stubs.trade(i)]})
    good: list[str] = []

    async def handler(batch: list[Delivery]) -> None:
        for d in batch:
            for e in d.events:
                if e.trade_id == stubs.trade(1).trade_id:  # type: ignore[union-attr]
                    raise ValueError("poison trade")
        for d in batch:
            good.extend(e.trade_id for e in d.events)  # type: ignore[union-attr]

    consumer = Consumer(redis, Codec(), FAST, "g", "c1", StreamSelector(names=["s1"]))
    await run_until(consumer, handler, lambda: consumer.stats.dead_lettered == 1, timeout=15)
    assert sorted(good) == sorted([stubs.trade(0).trade_id, stubs.trade(2).trade_id])
    letters = await redis.xrange(streams.dead_letter("s1"))
    assert b"poison trade" in letters[0][1][b"reason"]
    assert (await redis.xpending("s1", "g"))["pending"] == 0


async def test_entries_left_by_a_crashed_consumer_are_taken_over(redis) -> None:
    producer = Producer(redis, Codec(), FAST, "test")
    await producer.publish({"s1": [stubs.trade(i) for i in range(10)]})
    await redis.xgroup_create("s1", "g", id="0")
    # A consumer that read and died before acknowledging.
    await redis.xreadgroup("g", "dead-consumer", {"s1": ">"}, count=100)
    got: list[object] = []

    async def handler(batch: list[Delivery]) -> None:
        for d in batch:
            got.extend(d.events)

    consumer = Consumer(redis, Codec(), FAST, "g", "c2", StreamSelector(names=["s1"]))
    await run_until(consumer, handler, lambda: len(got) == 10)
    assert consumer.stats.claimed == 1
    assert (await redis.xpending("s1", "g"))["pending"] == 0


async def test_restarted_consumer_processes_its_own_pending_first(redis) -> None:
    producer = Producer(redis, Codec(), FAST, "test")
    await producer.publish({"s1": [stubs.trade(i) for i in range(3)]})
    await redis.xgroup_create("s1", "g", id="0")
    await redis.xreadgroup("g", "c1", {"s1": ">"}, count=100)
    got: list[object] = []

    async def handler(batch: list[Delivery]) -> None:
        for d in batch:
            got.extend(d.events)

    slow_claim = msgspec.structs.replace(FAST, claim_idle_ms=600_000)
    consumer = Consumer(redis, Codec(), slow_claim, "g", "c1", StreamSelector(names=["s1"]))
    await run_until(consumer, handler, lambda: len(got) == 3, timeout=3)
    assert consumer.stats.claimed == 0


async def test_forwarding_publishes_and_acknowledges_atomically(redis) -> None:
    codec = Codec()
    producer = Producer(redis, codec, FAST, "test")
    await producer.publish({"in": [stubs.trade(i) for i in range(7)]})

    async def handler(batch: list[Delivery]) -> dict[str, list]:  # type: ignore[type-arg]
        return {"out": [e for d in batch for e in d.events]}

    consumer = Consumer(redis, codec, FAST, "g", "c1", StreamSelector(names=["in"]), producer=producer)
    await run_until(consumer, handler, lambda: consumer.stats.events == 7)
    out = [e for _, f in await redis.xrange("out") for e in codec.decode_entry(f)]
    assert len(out) == 7
    assert (await redis.xpending("in", "g"))["pending"] == 0


async def test_pattern_selector_finds_streams_published_later(redis) -> None:
    producer = Producer(redis, Codec(), FAST, "test")
    got: list[object] = []

    async def handler(batch: list[Delivery]) -> None:
        for d in batch:
            got.extend(d.events)

    consumer = Consumer(redis, Codec(), FAST, "g", "c1", StreamSelector(patterns=["md:trade:*"]), refresh_s=0.05)
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(handler, stop))
    await asyncio.sleep(0.2)
    await producer.publish({"md:trade:binance:ETH/USDT": [stubs.trade(1, symbol="ETH/USDT")],
                            "md:candle:binance:ETH/USDT": [stubs.candle()]})
    async with asyncio.timeout(5):
        while len(got) < 1:
            await asyncio.sleep(0.02)
    stop.set()
    await task
    assert consumer.streams == ["md:trade:binance:ETH/USDT"]


async def test_backpressure_waits_then_publishes_with_an_alert(redis) -> None:
    # raw:* is read by the pipeline's own validator group: the producer creates it and obeys it.
    settings = msgspec.structs.replace(FAST, backpressure_high_water=3, backpressure_max_wait_s=0.3)
    producer = Producer(redis, Codec(), settings, "test")
    for i in range(5):
        await producer.publish({"raw:test": [stubs.trade(i)]})
        producer._checked_at.clear()
    assert producer.backpressure_waits >= 1
    assert await redis.xlen("raw:test") == 5  # nothing dropped
    alerts = [e for _, f in await redis.xrange(streams.ALERTS) for e in Codec().decode_entry(f)]
    assert alerts and alerts[0].rule == "bus.backpressure_timeout"  # type: ignore[union-attr]


@pytest.mark.parametrize("bad", [b"", b"\x93\x01\x02\x03"])
def test_codec_rejects_payloads_that_are_not_event_batches(bad: bytes) -> None:
    from schemas import DecodeError
    with pytest.raises(DecodeError):
        Codec().decode(bad)


async def test_commit_writes_the_position_with_the_entries(redis) -> None:
    producer = Producer(redis, Codec(), FAST, "test")
    # Act
    await producer.commit({"s1": [stubs.trade(1)]}, [("SET", "pos:s1", "42")])
    # Assert
    assert await redis.xlen("s1") == 1
    assert await redis.get("pos:s1") == b"42"


async def test_on_commit_checkpoint_is_written_with_outputs_and_acks(redis) -> None:
    # Arrange: a forwarding stage that checkpoints how many entries it has seen, atomically with its commit.
    producer = Producer(redis, Codec(), FAST, "test")
    await producer.publish({"in": [stubs.trade(i) for i in range(3)]})
    seen: list[str] = []

    def checkpoint(batch: list[Delivery]) -> list[tuple[str, str]]:
        seen.extend(d.entry_id for d in batch)
        return [("SET", "ckpt", batch[-1].entry_id)]

    async def forward(batch: list[Delivery]) -> dict[str, list[object]]:
        return {"out": [e for d in batch for e in d.events]}

    consumer = Consumer(redis, Codec(), FAST, "g", "c1", StreamSelector(names=["in"]), producer=producer,
                        on_commit=checkpoint)
    # Act
    await run_until(consumer, forward, lambda: consumer.stats.acked == 1)
    # Assert
    assert await redis.get("ckpt") == seen[-1].encode()
    assert await redis.xlen("out") == 1
    assert (await redis.xpending("in", "g"))["pending"] == 0


async def test_lease_admits_one_consumer_and_a_lost_lease_stops_it(redis) -> None:
    from common.bus.lease import Lease, LeaseLost

    # Arrange: c1 holds the lease; c2 (same group) waits as standby and reads nothing.
    producer = Producer(redis, Codec(), FAST, "test")
    await producer.publish({"s1": [stubs.trade(1)]})
    got: dict[str, int] = {"c1": 0, "c2": 0}

    def handler_for(name: str):
        async def handler(batch: list[Delivery]) -> None:
            got[name] += len(batch)
        return handler

    c1 = Consumer(redis, Codec(), FAST, "g", "c1", StreamSelector(names=["s1"]),
                  lease=Lease(redis, "lease:g", "c1", ttl_ms=600))
    c2 = Consumer(redis, Codec(), FAST, "g", "c2", StreamSelector(names=["s1"]),
                  lease=Lease(redis, "lease:g", "c2", ttl_ms=600))
    stop = asyncio.Event()
    t1 = asyncio.create_task(c1.run(handler_for("c1"), stop))
    async with asyncio.timeout(5):
        while got["c1"] < 1:
            await asyncio.sleep(0.01)
    t2 = asyncio.create_task(c2.run(handler_for("c2"), stop))
    async with asyncio.timeout(5):
        while c2.stats.state != "standby":
            await asyncio.sleep(0.01)
    # Act: another owner takes the key from c1 (as after a partition) and new entries arrive.
    await redis.set("lease:g", "intruder", px=60_000)
    await producer.publish({"s1": [stubs.trade(2)]})
    # Assert: c1 stops with LeaseLost before it acknowledges anything more; c2 is still standby.
    with pytest.raises(LeaseLost):
        await asyncio.wait_for(t1, 5)
    assert c2.stats.state == "standby" and got["c2"] == 0
    stop.set()
    await asyncio.wait_for(t2, 5)


def test_backoff_doubles_to_its_cap_with_jitter_and_starts_again_after_reset() -> None:
    backoff = Backoff(0.5, 4.0, rng=random.Random(3))
    nominal = []
    for _ in range(6):
        nominal.append(backoff.delay)
        assert 0.8 * backoff.delay <= backoff.next() <= 1.2 * backoff.delay  # +-20% around the nominal delay
    assert nominal == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0] and backoff.attempts == 6
    backoff.reset()
    assert (backoff.delay, backoff.attempts) == (0.5, 0)
    equal = Backoff(1.0, 1.0, spread=EQUAL, rng=random.Random(3))
    assert all(0.5 <= equal.next() <= 1.0 for _ in range(20))  # "equal jitter" never waits longer
    with pytest.raises(ValueError, match="first_s"):
        Backoff(0.0, 1.0)


async def test_backoff_sleep_returns_at_once_when_stop_is_set() -> None:
    stop = asyncio.Event()
    started = time.monotonic()
    assert not await sleep_unless(stop, 0.05, EXACT)
    assert time.monotonic() - started >= 0.05
    stop.set()
    started = time.monotonic()
    assert await Backoff(30.0, 30.0).sleep(stop)
    assert time.monotonic() - started < 1.0


async def test_a_sleep_cancelled_as_its_stop_is_set_is_cancelled() -> None:
    # Arrange: a task in sleep_unless
    stop = asyncio.Event()
    task = asyncio.create_task(sleep_unless(stop, 30.0, EXACT))
    await asyncio.sleep(0)
    # Act: stop is set and the task cancelled in the same turn of the loop (a consumer told to stop by
    # both its stop event and its supervisor at once)
    stop.set()
    task.cancel()
    # Assert: the cancellation wins; Python 3.11's wait_for returned True here and the task ran on
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_cancel_and_wait_ends_a_task_whose_first_cancellation_was_lost() -> None:
    # Arrange: a task that loses its first cancellation, as Python 3.11's wait_for (inside redis-py's send)
    # does when the send finishes in the turn the cancellation lands
    async def loses_one() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            pass
        await asyncio.sleep(30)

    once, twice = asyncio.create_task(loses_one()), asyncio.create_task(loses_one())
    await asyncio.sleep(0)
    # Act: one cancellation, and cancel_and_wait
    once.cancel()
    started = time.monotonic()
    await cancel_and_wait(twice)
    # Assert: the plain cancellation left its task running; cancel_and_wait ended its task
    assert time.monotonic() - started < 1.0 and twice.cancelled()
    await asyncio.sleep(0.05)
    assert not once.done()
    await cancel_and_wait(once)


async def test_cancel_and_wait_cancelled_itself_leaves_no_exception_unretrieved(caplog) -> None:
    """A partitioned stage stops every slot when one fails: a slot is cancelled while it waits in cancel_and_wait
    for its lease renewal, which then ends with LeaseLost. asyncio logged that as "Task exception was never
    retrieved" with a traceback; it is now one warning naming the task."""
    # Arrange: a task that outlives one cancellation and then fails, and one already failed
    class Lost(Exception):
        pass

    async def fails_once_cancelled() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            await asyncio.sleep(0.05)
            raise Lost("lease gone") from None

    async def failed() -> None:
        raise Lost("already")

    renewal = asyncio.create_task(fails_once_cancelled(), name="p0-lease")
    done = asyncio.create_task(failed(), name="p0-work")
    await asyncio.sleep(0)
    unretrieved: list[dict[str, object]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, context: unretrieved.append(context))
    try:
        # Act: the owner waits for both, and is cancelled while the renewal still runs
        owner = asyncio.create_task(cancel_and_wait(renewal, done))
        await asyncio.sleep(0.01)
        owner.cancel()
        with pytest.raises(asyncio.CancelledError):
            await owner
        async with asyncio.timeout(10):  # the renewal ends with Lost
            while not renewal.done():
                await asyncio.sleep(0.01)
        await asyncio.sleep(0)  # its done callbacks run
        del renewal, done, owner
        gc.collect()  # an unretrieved exception is reported when its task is collected
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(None)
    # Assert
    assert unretrieved == []
    assert any("p0-lease" in r.getMessage() and "Lost: lease gone" in r.getMessage() for r in caplog.records)


async def test_a_consumer_closes_its_own_commit_connection_never_its_producer_s(redis) -> None:
    """Consumer.aclose closes the commits' connection it made; one it shares with a producer (a stage's) stays
    open for the producer, which closes it."""
    producer = Producer(redis, Codec(), FAST, "test")
    shared = Consumer(redis, Codec(), FAST, "g", "c1", StreamSelector(names=["s1"]), producer=producer)
    own = Consumer(redis, Codec(), FAST, "g", "c2", StreamSelector(names=["s1"]))
    for c in (shared, own):
        await c.tx.run([("SET", f"k:{c.name}", "1")])  # opens the commits' connection
    assert producer.tx._lean and own.tx._lean

    await shared.aclose()
    await own.aclose()

    assert producer.tx._lean, "the producer's connection was closed by a consumer sharing it"
    await producer.tx.run([("SET", "k:after", "1")])
    assert own.tx._lean is None
    await producer.aclose()
