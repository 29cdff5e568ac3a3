"""The bus survives its own infrastructure's faults (issue 10): real redis-server processes that these tests
start, SIGKILL and restart (appendonly yes in a temp dir), a TCP proxy that drops an EXEC's reply, consumer
processes killed with SIGKILL in their handler, and a stage started while Redis is down."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import msgspec
import pytest
import redis.asyncio as aioredis

from common import status as status_mod
from common.bus import streams
from common.bus.core import Consumer, Delivery, Outputs, Producer, StreamSelector
from common.config import BusSettings
from common.errors import StoreUnavailable
from schemas import Alert, Codec, Trade
from tests import stubs
from tools.localstores import free_port, port_open

ROOT = Path(__file__).resolve().parent.parent
FAST = BusSettings(stream_maxlen=10_000, backpressure_high_water=5_000, backpressure_max_wait_s=0.5,
                   batch_max_events=10, read_count=50, block_ms=50, claim_idle_ms=300, max_deliveries=2)


class RedisProcess:
    """A redis-server of the test's own, on a fixed port, that can be SIGKILLed and started again."""

    def __init__(self, data_dir: Path, appendonly: bool = True) -> None:
        self.dir = data_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.appendonly = appendonly
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, fresh_dir: Path | None = None) -> None:
        data = fresh_dir or self.dir
        data.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "everysec",
             "--dir", str(data), "--logfile", str(data / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 10
        while not port_open(self.port):
            assert self.proc.poll() is None, f"redis-server exited; read {data / 'redis.log'}"
            assert time.monotonic() < deadline, f"redis-server did not listen on {self.port}"
            time.sleep(0.02)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(5)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.kill()


@pytest.fixture
def redis_proc(tmp_path: Path) -> Iterator[RedisProcess]:
    server = RedisProcess(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


async def client(url: str) -> aioredis.Redis:
    # As common.bus.stage builds it: bounded waits, so a dead Redis raises instead of hanging.
    return aioredis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)


async def wait_for(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        await asyncio.sleep(0.02)


async def alerts(redis: aioredis.Redis, rule: str | None = None) -> list[Alert]:
    out = [e for _, f in await redis.xrange(streams.ALERTS) for e in Codec().decode_entry(f)]
    return [a for a in out if isinstance(a, Alert) and (rule is None or a.rule == rule)]


async def trade_ids(redis: aioredis.Redis, stream: str) -> list[str]:
    return [e.trade_id for _, f in await redis.xrange(stream) for e in Codec().decode_entry(f)
            if isinstance(e, Trade)]


def forward_to(out: str) -> Callable[[list[Delivery]], object]:
    async def handler(batch: list[Delivery]) -> Outputs:
        return {out: [e for d in batch for e in d.events]}
    return handler


@contextlib.asynccontextmanager
async def running(consumer: Consumer, handler: Callable[[list[Delivery]], object]) -> AsyncIterator[asyncio.Task[None]]:
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(handler, stop))  # type: ignore[arg-type]
    try:
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


# -- 1. Redis restarts -------------------------------------------------------------------------------------


async def test_redis_killed_and_restarted_with_aof_loses_nothing_and_forwards_each_entry_once(
        redis_proc: RedisProcess) -> None:
    # Arrange: a forwarding stage (raw:t -> valid:t) runs while a producer publishes 60 batches.
    r = await client(redis_proc.url)
    producer = Producer(r, Codec(), FAST, "collector")
    stage = Consumer(r, Codec(), FAST, "validator", "validator-0", StreamSelector(patterns=["raw:*"]),
                     producer=Producer(r, Codec(), FAST, "validator"))
    published = 0

    async def publish_with_retry(i: int) -> None:
        while True:  # a collector keeps the batch until Redis takes it
            try:
                await producer.publish({"raw:t": [stubs.trade(i * 10 + k) for k in range(10)]})
                return
            except (aioredis.ConnectionError, aioredis.TimeoutError):
                await asyncio.sleep(0.1)

    async with running(stage, forward_to("valid:t")) as task:
        for i in range(20):
            await publish_with_retry(i)
            published += 1
        await wait_for(lambda: stage.stats.acked >= 5, 10, "the stage to forward some entries")
        # Act: SIGKILL Redis mid-stream; the stage must wait (degraded, naming Redis), then carry on.
        redis_proc.kill()
        await wait_for(lambda: stage.stats.state == "degraded", 10, "the stage to notice Redis is gone")
        assert f"Redis at redis://127.0.0.1:{redis_proc.port}/0 unreachable" in stage.stats.detail
        await asyncio.sleep(1.0)
        redis_proc.start()
        for i in range(20, 60):
            await publish_with_retry(i)
            published += 1
        await wait_for(lambda: stage.stats.acked >= 60 or task.done(), 30, "the stage to forward all 60 entries")
        assert not task.done(), f"the stage stopped: {task.exception() if task.done() else ''}"

    # Assert: every event forwarded exactly as often as it was published (AOF kept the stream, the group and
    # its pending entries; the atomic commit forwarded no entry twice); the outage was stated.
    raw, valid = await trade_ids(r, "raw:t"), await trade_ids(r, "valid:t")
    assert sorted(valid) == sorted(raw)
    assert set(raw) == {stubs.trade(i).trade_id for i in range(600)}
    assert (await r.xpending("raw:t", "validator"))["pending"] == 0
    down, up = await alerts(r, "bus.redis_unavailable"), await alerts(r, "bus.redis_recovered")
    assert len(down) == 1 and len(up) == 1
    assert float(up[0].values["outage_s"]) >= 1.0
    assert stage.stats.state == "stopping" and stage.stats.redis_outages == 1
    await r.aclose()


async def test_registry_and_groups_come_back_when_redis_restarts_without_its_data(tmp_path: Path) -> None:
    # Arrange: Redis without persistence; a stage reads raw:* and has forwarded one batch.
    server = RedisProcess(tmp_path / "redis", appendonly=False)
    server.start()
    try:
        r = await client(server.url)
        producer = Producer(r, Codec(), FAST, "collector")
        stage = Consumer(r, Codec(), FAST, "validator", "validator-0", StreamSelector(patterns=["raw:*"]),
                         producer=Producer(r, Codec(), FAST, "validator"))
        await producer.publish({"raw:t": [stubs.trade(1)]})
        async with running(stage, forward_to("valid:t")) as task:
            await wait_for(lambda: stage.stats.acked == 1, 10, "the first batch")
            # Act: Redis dies and comes back empty: no registry, no stream, no group.
            server.kill()
            await wait_for(lambda: stage.stats.state == "degraded", 10, "the stage to notice")
            server.start(fresh_dir=tmp_path / "empty")
            await wait_for(lambda: stage.stats.groups_recreated == 1 or task.done(), 20, "the group recreated")
            await producer.publish({"raw:t": [stubs.trade(2)]})
            await wait_for(lambda: stage.stats.acked == 2 or task.done(), 20, "the batch after the restart")
            assert not task.done(), f"the stage stopped: {task.exception() if task.done() else ''}"
        # Assert: the producer registered the stream again (consumers find streams there); the recreated
        # group was stated; the stage carried on.
        assert await r.sismember(streams.REGISTRY, "raw:t")
        assert await r.sismember(streams.REGISTRY, "valid:t")
        assert await trade_ids(r, "valid:t") == [stubs.trade(2).trade_id]
        recreated = await alerts(r, "bus.group_recreated")
        assert [a.values["stream"] for a in recreated] == ["raw:t"]
        await r.aclose()
    finally:
        server.stop()


async def test_producer_creates_the_pipelines_own_groups_so_data_waits_for_a_stopped_stage(redis) -> None:
    # Arrange: no validator is running.
    settings = msgspec.structs.replace(FAST, backpressure_high_water=3, backpressure_max_wait_s=0.3)
    producer = Producer(redis, Codec(), settings, "collector")
    # Act
    for i in range(6):
        await producer.publish({"raw:binance": [stubs.trade(i)]})
        producer._checked_at.clear()
    await producer.publish({"md:trade:binance:BTC/USDT": [stubs.trade(1)]})
    # Assert: the group exists from the first entry, its lag counts for backpressure, and the stage finds
    # everything when it starts.
    groups = {g["name"].decode(): g for g in await redis.xinfo_groups("raw:binance")}
    assert set(groups) == {"validator"} and groups["validator"]["lag"] == 6
    assert producer.backpressure_waits >= 1
    md = {g["name"].decode() for g in await redis.xinfo_groups("md:trade:binance:BTC/USDT")}
    assert md == {"influx_writer", "cache_publisher", "aggregator"}
    seen: list[str] = []

    async def handler(batch: list[Delivery]) -> None:
        seen.extend(e.trade_id for d in batch for e in d.events)  # type: ignore[union-attr]

    stage = Consumer(redis, Codec(), settings, "validator", "validator-0", StreamSelector(patterns=["raw:*"]))
    async with running(stage, handler):
        await wait_for(lambda: len(seen) == 6, 10, "the stopped stage's backlog")
    assert seen == [stubs.trade(i).trade_id for i in range(6)]


# -- 2. groups that are not ours ---------------------------------------------------------------------------


async def test_an_abandoned_strategy_group_with_a_huge_lag_does_not_slow_a_producer(redis) -> None:
    # Arrange: the README's example left `my-strategy` behind on a stream, far beyond the high water mark.
    stream = "md:trade:binance:BTC/USDT"
    settings = msgspec.structs.replace(FAST, backpressure_high_water=50, backpressure_max_wait_s=5.0,
                                       abandoned_group_s=0.3)
    await redis.xgroup_create(stream, "my-strategy", id="$", mkstream=True)
    filler = Producer(redis, Codec(), msgspec.structs.replace(settings, backpressure_high_water=10_000), "test")
    await filler.publish({stream: [stubs.trade(0)]})
    await redis.xreadgroup("my-strategy", "me", {stream: ">"}, count=1)
    for i in range(1, 300):
        await filler.publish({stream: [stubs.trade(i)]})
    await asyncio.sleep(0.4)
    producer = Producer(redis, Codec(), settings, "normalizer")

    async def keep_up(batch: list[Delivery]) -> None:
        pass

    # Act: our own stages keep up while the producer publishes 300 more entries, one at a time.
    async with contextlib.AsyncExitStack() as stack:
        for g in ("influx_writer", "cache_publisher", "aggregator"):
            await stack.enter_async_context(running(
                Consumer(redis, Codec(), settings, g, f"{g}-0", StreamSelector(names=[stream])), keep_up))
        async with asyncio.timeout(10):
            while await producer.backlog(stream) > 0:  # they have caught up with the first 300
                await asyncio.sleep(0.02)
        started = time.perf_counter()
        for i in range(300, 600):
            producer._checked_at.clear()
            producer._foreign_checked_at.clear()
            await producer.publish({stream: [stubs.trade(i)]})
        elapsed = time.perf_counter() - started
    # Assert: never waited; reported once (per hour), in mdp status too; not dropped by default.
    assert producer.backpressure_waits == 0
    assert elapsed < settings.backpressure_max_wait_s
    assert await alerts(redis, "bus.backpressure_timeout") == []
    abandoned = await alerts(redis, "bus.group_abandoned")
    assert [(a.values["stream"], a.values["group"]) for a in abandoned] == [(stream, "my-strategy")]
    st = await status_mod.collect(redis, abandoned_group_s=0.3)
    assert [(g.stream, g.name) for g in st.abandoned] == [(stream, "my-strategy")]
    assert "abandoned" in status_mod.render(st) and "my-strategy" in status_mod.render(st)
    assert "my-strategy" in {g["name"].decode() for g in await redis.xinfo_groups(stream)}


async def test_an_abandoned_group_is_dropped_only_when_configured(redis) -> None:
    stream = "md:candle_built:binance:BTC/USDT"  # no stage of ours reads it
    settings = msgspec.structs.replace(FAST, abandoned_group_s=0.2, drop_abandoned_groups=True)
    producer = Producer(redis, Codec(), settings, "aggregator")
    await redis.xgroup_create(stream, "old-strategy", id="0", mkstream=True)
    await producer.publish({stream: [stubs.trade(1)]})
    await redis.xreadgroup("old-strategy", "me", {stream: ">"}, count=1)
    await producer.publish({stream: [stubs.trade(2)]})
    await asyncio.sleep(0.3)
    # Act
    producer._checked_at.clear()
    producer._foreign_checked_at.clear()
    await producer.publish({stream: [stubs.trade(2)]})
    # Assert
    assert await redis.xinfo_groups(stream) == []
    assert [a.values["group"] for a in await alerts(redis, "bus.group_dropped")] == ["old-strategy"]


# -- 3. smaller bus defects --------------------------------------------------------------------------------


async def test_a_pending_entry_trimmed_before_the_restart_is_reported_not_acknowledged_silently(redis) -> None:
    # Arrange: consumer c1 took 3 entries and died; the stream was trimmed past two of them meanwhile.
    producer = Producer(redis, Codec(), FAST, "test")
    for i in range(3):
        await producer.publish({"s1": [stubs.trade(i)]})
    await redis.xgroup_create("s1", "g", id="0")
    await redis.xreadgroup("g", "c1", {"s1": ">"}, count=10)
    first_two = [eid for eid, _ in await redis.xrange("s1", count=2)]
    await redis.xdel("s1", *first_two)
    seen: list[str] = []

    async def handler(batch: list[Delivery]) -> None:
        seen.extend(e.trade_id for d in batch for e in d.events)  # type: ignore[union-attr]

    # Act: c1 restarts and replays its own pending entries.
    consumer = Consumer(redis, Codec(), FAST, "g", "c1", StreamSelector(names=["s1"]))
    async with running(consumer, handler):
        await wait_for(lambda: len(seen) == 1, 10, "the surviving entry")
    # Assert
    assert seen == [stubs.trade(2).trade_id]
    trimmed = await alerts(redis, "bus.trimmed_while_pending")
    assert sorted(a.values["entry_id"] for a in trimmed) == sorted(e.decode() for e in first_two)
    assert (await redis.xpending("s1", "g"))["pending"] == 0


POISON_CONSUMER = textwrap.dedent("""
    import asyncio, os, signal, sys
    import redis.asyncio as aioredis
    from common.bus.core import Consumer, StreamSelector
    from common.config import BusSettings
    from schemas import Codec

    async def main() -> None:
        r = aioredis.Redis.from_url(sys.argv[1])
        settings = BusSettings(read_count=50, block_ms=50, claim_idle_ms=60_000, max_deliveries=2)

        async def handler(batch):
            ids = [e.trade_id for d in batch for e in d.events]
            if "poison" in ids:
                os.kill(os.getpid(), signal.SIGKILL)  # dies inside the handler, every time
            await r.rpush("done", *ids)

        stop = asyncio.Event()
        await Consumer(r, Codec(), settings, "g", "c1", StreamSelector(names=["s1"])).run(handler, stop)

    asyncio.run(main())
""")


async def test_an_entry_that_kills_the_process_every_time_is_dead_lettered_after_max_deliveries(
        redis, redis_server, tmp_path: Path) -> None:
    # Arrange: good, poison, good; the consumer process is SIGKILLed by its handler on the poison entry.
    producer = Producer(redis, Codec(), FAST, "test")
    poison = msgspec.structs.replace(stubs.trade(1), trade_id="poison")
    for event in (stubs.trade(0), poison, stubs.trade(2)):
        await producer.publish({"s1": [event]})
    script = tmp_path / "poison_consumer.py"
    script.write_text(POISON_CONSUMER)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # Act: restart it each time it dies, as supervisord does.
    runs = 0
    while runs < 6:
        runs += 1
        proc = await asyncio.create_subprocess_exec(sys.executable, str(script), redis_server.url, cwd=ROOT,
                                                    env=env)
        deadline = time.monotonic() + 30
        while proc.returncode is None and time.monotonic() < deadline:
            if await redis.xlen("dlq:s1") == 1 and await redis.llen("done") >= 2:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 0.05)
        if proc.returncode is None:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 10)
            break
        assert proc.returncode == -signal.SIGKILL
    # Assert: killed max_deliveries (2) times, then the entry is a dead letter and the others are done once.
    assert runs == 3
    assert [b.decode() for b in await redis.lrange("done", 0, -1)] == [stubs.trade(0).trade_id,
                                                                       stubs.trade(2).trade_id]
    (_, letter), = await redis.xrange("dlq:s1")
    assert b"delivered 2 times" in letter[b"reason"]
    assert (await redis.xpending("s1", "g"))["pending"] == 0


class DropExecReply:
    """A TCP proxy to Redis that, once armed, forwards the next EXEC to Redis, waits for Redis's reply and
    drops the connection instead of passing the reply on: the transaction ran, the client never hears so."""

    def __init__(self, redis_port: int) -> None:
        self.redis_port = redis_port
        self.armed = False
        self.dropped = 0
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _serve(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        sreader, swriter = await asyncio.open_connection("127.0.0.1", self.redis_port)
        exec_sent = asyncio.Event()

        async def upstream() -> None:
            while data := await creader.read(65536):
                swriter.write(data)
                await swriter.drain()
                if self.armed and b"EXEC\r\n" in data:
                    self.armed = False
                    exec_sent.set()
            swriter.close()

        async def downstream() -> None:
            while data := await sreader.read(65536):
                if exec_sent.is_set():
                    self.dropped += 1
                    break  # the reply to EXEC (and whatever came with it) never reaches the client
                cwriter.write(data)
                await cwriter.drain()
            cwriter.close()
            swriter.close()

        up = asyncio.create_task(upstream())
        await downstream()
        up.cancel()

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()


async def test_a_lost_exec_reply_does_not_publish_a_committed_batch_twice(redis, redis_server) -> None:
    # Arrange: the stage talks to Redis through a proxy that loses the reply of its first commit.
    port = int(redis_server.url.rsplit(":", 1)[1].split("/")[0])
    proxy = DropExecReply(port)
    await proxy.start()
    r = await client(f"redis://127.0.0.1:{proxy.port}/0")
    await Producer(redis, Codec(), FAST, "test").publish({"s1": [stubs.trade(i) for i in range(15)]})  # 2 entries
    stage = Consumer(r, Codec(), FAST, "g", "c1", StreamSelector(names=["s1"]),
                     producer=Producer(r, Codec(), FAST, "stage"))
    proxy.armed = True
    # Act
    async with running(stage, forward_to("out")) as task:
        await wait_for(lambda: stage.stats.acked == 2 or task.done(), 20, "the batch to be committed")
    # Assert: the commit ran once (its reply was lost); the stage found out and did not publish again.
    assert proxy.dropped == 1
    assert await trade_ids(redis, "out") == [stubs.trade(i).trade_id for i in range(15)]
    assert (await redis.xpending("s1", "g"))["pending"] == 0
    await r.aclose()
    await proxy.close()


async def test_a_batch_slower_than_claim_idle_ms_is_not_taken_over_by_a_sibling(redis) -> None:
    # Arrange: c1's handler takes 5x claim_idle_ms; c2 looks for idle entries meanwhile.
    await Producer(redis, Codec(), FAST, "test").publish({"s1": [stubs.trade(i) for i in range(10)]})
    first: list[object] = []
    second: list[object] = []

    async def slow(batch: list[Delivery]) -> None:
        await asyncio.sleep(5 * FAST.claim_idle_ms / 1000)
        first.extend(e for d in batch for e in d.events)

    async def sibling(batch: list[Delivery]) -> None:
        second.extend(e for d in batch for e in d.events)

    c1 = Consumer(redis, Codec(), FAST, "g", "c1", StreamSelector(names=["s1"]))
    c2 = Consumer(redis, Codec(), FAST, "g", "c2", StreamSelector(names=["s1"]))
    # Act
    async with running(c1, slow):
        await wait_for(lambda: c1.stats.delivered > 0, 10, "c1 to take the batch")
        async with running(c2, sibling):
            await wait_for(lambda: len(first) == 10, 15, "the slow batch")
    # Assert
    assert (second, c2.stats.claimed) == ([], 0)
    assert (await redis.xpending("s1", "g"))["pending"] == 0


STAGE_SERVICE = textwrap.dedent("""
    import asyncio
    from common.bus.core import Consumer, StreamSelector
    from common.bus.stage import Service, service_main

    class Stage(Service):
        name = "recovery_stage"

        def __init__(self, settings, instance=None):
            super().__init__(settings, instance)
            self.consumer = Consumer(self.redis, self.codec, settings.bus, "recovery_stage", self.consumer_name,
                                     StreamSelector(names=["s1"]))

        async def run(self, stop):
            async def handler(batch):
                await self.redis.rpush("done", *[e.trade_id for d in batch for e in d.events])
            self.state = "running"
            await self.consumer.run(handler, stop)

    service_main(Stage)
""")


async def test_a_stage_started_while_redis_is_down_waits_for_it(tmp_path: Path) -> None:
    # Arrange: nothing listens on the Redis port yet.
    server = RedisProcess(tmp_path / "redis")
    script = tmp_path / "stage.py"
    script.write_text(STAGE_SERVICE)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MDP_REDIS_URL": server.url}
    log_path = tmp_path / "stage.log"
    with log_path.open("wb") as log_file:
        proc = await asyncio.create_subprocess_exec(sys.executable, str(script), cwd=ROOT, env=env,
                                                    stderr=log_file)
    try:
        # Act: Redis comes 3 s later.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), 3)
        assert proc.returncode is None, f"the stage exited while Redis was down: {log_path.read_text()[-2000:]}"
        server.start()
        r = await client(server.url)
        await Producer(r, Codec(), FAST, "test").publish({"s1": [stubs.trade(1)]})
        deadline = time.monotonic() + 20
        while await r.llen("done") < 1:
            assert proc.returncode is None and time.monotonic() < deadline, "the stage did not carry on"
            await asyncio.sleep(0.05)
        # Assert: it processed, heartbeats, and stops cleanly on SIGTERM.
        assert await r.exists(streams.alive_key("recovery_stage", "0"))
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 15) == 0
        assert f"Redis at {server.url} is unreachable" in log_path.read_text()
        await r.aclose()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        server.stop()


# -- 4. mdp status -----------------------------------------------------------------------------------------


async def test_status_warns_when_the_bus_redis_has_no_persistence(tmp_path: Path, redis_proc: RedisProcess) -> None:
    bare = RedisProcess(tmp_path / "bare", appendonly=False)
    bare.start()
    try:
        r_bare, r_aof = await client(bare.url), await client(redis_proc.url)
        warned = status_mod.render(await status_mod.collect(r_bare))
        quiet = status_mod.render(await status_mod.collect(r_aof))
        assert (f"Redis at {bare.url} has no persistence: a Redis restart loses every stream; set appendonly "
                f"yes (docs/bus.md)") in warned
        assert "no persistence" not in quiet
        await r_bare.aclose()
        await r_aof.aclose()
    finally:
        bare.stop()


# -- 5. store outages --------------------------------------------------------------------------------------


async def test_a_store_outage_is_stated_once_with_its_duration(redis) -> None:
    await Producer(redis, Codec(), FAST, "test").publish({"s1": [stubs.trade(1)]})
    calls = {"n": 0}
    details: list[str] = []

    async def handler(batch: list[Delivery]) -> None:
        calls["n"] += 1
        if calls["n"] <= 3:
            raise StoreUnavailable("InfluxDB at http://127.0.0.1:1, database 'm' is unavailable (write: refused); "
                                   "start it")

    consumer = Consumer(redis, Codec(), FAST, "influx_writer", "c1", StreamSelector(names=["s1"]))
    async with running(consumer, handler):
        await wait_for(lambda: consumer.stats.state == "degraded", 10, "degraded")
        details.append(consumer.stats.detail)
        await wait_for(lambda: consumer.stats.acked == 1, 20, "the batch after the outage")
    down, up = await alerts(redis, "store.unavailable"), await alerts(redis, "store.recovered")
    assert len(down) == 1 and len(up) == 1
    assert down[0].values["store"] == "InfluxDB at http://127.0.0.1:1, database 'm'"
    assert "write: refused" in down[0].values["error"]
    assert float(up[0].values["outage_s"]) > 0
    assert details[0].startswith("InfluxDB at http://127.0.0.1:1, database 'm' unavailable since ")
    assert "write: refused" in details[0]
    assert not await redis.exists(streams.outage_key("influx_writer", down[0].values["store"]))


async def test_a_group_that_read_everything_has_no_lag_even_when_redis_miscounts_it(redis) -> None:
    # Arrange: after a restart from the AOF, Redis 7.0 kept reporting a lag for a group that had been delivered
    # the stream's last entry (docs/chaos.md). Reproduced here by giving the group a wrong entries-read counter.
    stream = streams.raw("binance")
    producer = Producer(redis, Codec(), BusSettings(backpressure_high_water=5, backpressure_max_wait_s=30.0), "t")
    await producer.publish({stream: [stubs.trade(0)]})  # registers the stream and makes the pipeline's groups
    for i in range(20):  # 20 entries of one event each
        await redis.xadd(stream, Codec().entry([stubs.trade(100 + i)]))  # type: ignore[arg-type]
    await redis.xreadgroup("validator", "v-0", {stream: ">"}, count=1000)
    last = (await redis.xinfo_stream(stream))["last-generated-id"]
    await redis.xgroup_setid(stream, "validator", last, entries_read=3)
    pending = [e["message_id"] for e in await redis.xpending_range(stream, "validator", "-", "+", 1000)]
    await redis.xack(stream, "validator", *pending)
    raw_lag = next(int(g["lag"]) for g in await redis.xinfo_groups(stream) if g["name"] == b"validator")
    assert raw_lag > 5  # what XINFO GROUPS says: a phantom backlog beyond the high-water mark

    # Act
    st = await status_mod.collect(redis)
    started = time.monotonic()
    await producer.publish({stream: [stubs.trade(200)]})
    waited = time.monotonic() - started

    # Assert: status shows the group drained, and the producer did not wait on the phantom backlog.
    group = next(g for s in st.streams if s.name == stream for g in s.groups if g.name == "validator")
    assert (group.lag, group.pending) == (0, 0)
    assert waited < 1.0, f"the producer waited {waited:.1f} s on a group that had read everything"
