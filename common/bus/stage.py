"""Process lifecycle shared by every service (`Service`: logging, uvloop, signals, Redis connection,
heartbeats, counters) and the one shape of a stage that consumes (`Stage`).

A service subclasses `Service`, implements `run(stop)` (return when `stop` is set) and counts in `self.count`.
SIGTERM/SIGINT set `stop`: the service stops taking new work and finishes what is in flight; whatever
was not acknowledged stays pending in its consumer group and is redelivered after restart.

A stage that reads the bus subclasses `Stage` and declares its wiring: its consumer group and inputs, whether
its handler's outputs are forwarded (published with the acknowledgements in one MULTI/EXEC), whether it keeps
checkpointed per-series state (then it holds the stage's lease, and its state is checkpointed in that same
MULTI/EXEC: common/bus/checkpoint.py), and `prepare()`, what must answer before it reads anything (a store:
retried with the one backoff, `degraded` meanwhile). The handler is `handle(batch)`, or for a checkpointed
stage `judge(batch, staging)`. Its heartbeat counters, one dict: `self.count`, what it keeps elsewhere
(`extra_counters()`: sizes, corrections), the series state's and the consumer's.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, ClassVar, Protocol

import redis.asyncio as aioredis
import uvloop
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException
from redis.exceptions import TimeoutError as RedisTimeoutError

from common.backoff import EXACT, Backoff, sleep_unless
from common.bus import streams
from common.bus.checkpoint import Checkpoint, SeriesState, stage_lease
from common.bus.core import (
    STORE_RETRY_MAX_S,
    Consumer,
    ConsumerStats,
    Delivery,
    Handler,
    Outputs,
    Producer,
    StreamSelector,
    redis_url,
)
from common.bus.lease import Lease
from common.bus.partitions import Partitions
from common.config import ConfigError, Settings, load_settings
from common.domain.state import SeriesBook, SeriesKey, Staging
from common.errors import StoreUnavailable
from common.redis_client import connect, is_cluster
from common.tasks import cancel_and_wait
from schemas import Codec, Heartbeat

log = logging.getLogger(__name__)
REDIS_TIMEOUT_S = 10.0
REDIS_WAIT_MAX_S = 5.0  # cap of the backoff while a starting service waits for Redis


def setup_logging(service: str) -> None:
    level = os.environ.get("MDP_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(
        level=level, stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s {service}[%(process)d] %(name)s: %(message)s",
    )


async def refuse_cluster(redis: aioredis.Redis) -> None:
    """ConfigError if `redis` is a Redis Cluster node reached without `[bus] cluster = true`: the bus then
    names its keys for one node, and its commits would span hash slots, which a cluster refuses (CROSSSLOT)."""
    if is_cluster(redis):
        return
    info = await redis.info("cluster")
    if str(info.get("cluster_enabled", 0)) == "1":
        raise ConfigError(
            f"redis.url: Redis at {redis_url(redis)} runs in cluster mode (INFO cluster: cluster_enabled:1), and "
            f"[bus] cluster is false: the bus names its keys for one Redis node, and its commits would span "
            f"several hash slots, which a cluster refuses (docs/scaling.md, 'Redis Cluster'). Set [bus] cluster "
            f"= true, or point MDP_REDIS_URL or [redis] url at a standalone Redis")


class Service:
    name: ClassVar[str] = "service"
    # Runs on a Redis Cluster ([bus] cluster = true): every key it writes carries its partition's hash tag (every
    # service of supervisord.conf does). One that does not say so stops at start with a ConfigError.
    cluster_ready: ClassVar[bool] = False
    # With bus.partitions = P > 1 its instances share the P partitions under leases (common/bus/partitions.py):
    # each partition's events are handled by one instance at a time. See Stage for a stage's.
    partitioned: ClassVar[bool] = False

    def __init__(self, settings: Settings, instance: str | None = None) -> None:
        self.settings = settings
        self.instance = instance or os.environ.get("MDP_INSTANCE", "0")
        self.codec = Codec()
        # Bounded waits: a Redis that stops answering raises instead of hanging (XREADGROUP blocks 1 s at most).
        self.redis: aioredis.Redis = connect(
            settings.redis.url, settings.bus.cluster, decode_responses=False, socket_timeout=REDIS_TIMEOUT_S,
            socket_connect_timeout=REDIS_TIMEOUT_S, health_check_interval=30)
        self.started_at = time.time_ns()
        self.state = "starting"
        self.detail = ""
        self.count: Counter[str] = Counter()  # what the service did since it started (heartbeat counters)

    @property
    def consumer_name(self) -> str:
        """Stable across restarts, so a restarted process finds its own pending entries at once."""
        return f"{self.name}-{self.instance}"

    def counters(self) -> dict[str, int]:
        return dict(self.count)

    async def run(self, stop: asyncio.Event) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        producer = getattr(self, "producer", None)
        if producer is not None and hasattr(producer, "aclose"):
            await producer.aclose()
        await self.redis.aclose()

    async def wait_for_redis(self, stop: asyncio.Event) -> bool:
        """Wait until Redis answers (True) or `stop` (False): a stage started while Redis is down (a machine
        boot, a Redis restart) waits with capped backoff instead of exiting, which supervisord would give up
        on after `startretries` (FATAL)."""
        if self.settings.bus.cluster and not self.cluster_ready:
            raise ConfigError(
                f"bus.cluster: {self.name} does not declare that it runs on a Redis Cluster (cluster_ready: every "
                f"key it writes tagged by partition; docs/scaling.md, 'Redis Cluster'). Set [bus] cluster = false "
                f"and point MDP_REDIS_URL or [redis] url at a standalone Redis")
        backoff, waited_since = Backoff(0.5, REDIS_WAIT_MAX_S), time.monotonic()
        while True:
            try:
                try:
                    await self.redis.ping()
                except RedisClusterException as exc:
                    if "not enabled" not in str(exc):
                        raise RedisConnectionError(str(exc)) from exc  # no master reachable yet: wait
                    raise ConfigError(
                        f"bus.cluster: [bus] cluster is true, and Redis at {redis_url(self.redis)} is not a "
                        f"Redis Cluster node ({exc}). Set [bus] cluster = false for a standalone Redis, or "
                        f"point MDP_REDIS_URL or [redis] url at a master of the cluster") from None
                await refuse_cluster(self.redis)
                if time.monotonic() - waited_since > 1:
                    log.info("%s: Redis at %s answers after %.1f s", self.name, redis_url(self.redis),
                             time.monotonic() - waited_since)
                return True
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                self.state = "degraded"
                self.detail = f"waiting for Redis at {redis_url(self.redis)}: {exc}"
                log.warning("%s: Redis at %s is unreachable (%s); waiting %.1f s (start Redis, or fix "
                            "MDP_REDIS_URL / [redis] url)", self.name, redis_url(self.redis), exc, backoff.delay)
            if await backoff.sleep(stop):
                return False

    async def until_ready(self, stop: asyncio.Event, ready: Callable[[], Awaitable[None]]) -> bool:
        """Call `ready` (connect to a store, make its schema) until it returns (True) or `stop` is set (False).
        While it raises StoreUnavailable the service is `degraded` with the error, reads nothing from Redis,
        and calls again after the one backoff (0.5 s doubling to 30 s)."""
        backoff = Backoff(0.5, STORE_RETRY_MAX_S)
        while not stop.is_set():
            try:
                await ready()
                return not stop.is_set()
            except StoreUnavailable as exc:
                self.state, self.detail = "degraded", str(exc)
                log.error("%s; retrying in %.1f s (reading nothing from Redis meanwhile)", exc, backoff.delay)
                await backoff.sleep(stop)
        return False

    async def heartbeat_once(self) -> None:
        now = time.time_ns()
        counters = self.counters()
        state, detail = self.state, self.detail
        consumer = getattr(self, "consumer", None)
        if consumer is not None:  # every consuming stage reports the same headline counters
            counters["events_consumed"] = consumer.stats.events
            counters["entries_dead_lettered"] = consumer.stats.dead_lettered
            # The bus's own view wins while it waits for a store or Redis, or stands by for a lease.
            if consumer.stats.state in ("degraded", "standby") and state in ("running", "starting"):
                state = consumer.stats.state
                detail = detail or getattr(consumer.stats, "detail", "") or consumer.stats.last_error
        beat = Heartbeat(service=self.name, instance=self.instance, pid=os.getpid(), started_at=self.started_at,
                         # state is a plain str on Service (subclasses set it); msgspec checks the Literal
                         counters=counters, state=state, detail=detail,  # type: ignore[arg-type]
                         ts_event=now, ts_recv=now)
        payload = self.codec.encode([beat])
        ttl = max(5, int(self.settings.bus.heartbeat_interval_s * 5))
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(streams.alive_key(self.name, self.instance), payload, ex=ttl)
        pipe.sadd(streams.instances_key(self.name), self.instance)  # after the SET: a member has a key
        # redis-py types xadd's fields as dict[FieldT, EncodableT], which (invariant) refuses dict[bytes, bytes].
        pipe.xadd(streams.HEARTBEATS, self.codec.entry([beat]), maxlen=10_000, approximate=True)  # type: ignore[arg-type]
        await pipe.execute()

    async def _heartbeats(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.heartbeat_once()
            except Exception as exc:  # noqa: BLE001 - a missed heartbeat must not kill the service
                log.warning("heartbeat failed: %s", exc)
            await sleep_unless(stop, self.settings.bus.heartbeat_interval_s, EXACT)

    async def main(self) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        log.info("starting %s instance %s (redis %s)", self.name, self.instance, redis_url(self.redis))
        if not await self.wait_for_redis(stop):
            await self.close()
            return
        self.state, self.detail = "starting", ""
        beats = asyncio.create_task(self._heartbeats(stop))
        work = asyncio.create_task(self.run(stop))
        try:
            done, _ = await asyncio.wait({beats, work}, return_when=asyncio.FIRST_COMPLETED)
            if work in done:
                work.result()  # re-raise a crash so supervisord sees a non-zero exit
        finally:
            stop.set()
            self.state = "stopping"
            for task in (work, beats):
                if not task.done() and not (await asyncio.wait({task}, timeout=10))[0]:
                    log.error("%s did not stop within 10 s; cancelling", self.name)
                    await cancel_and_wait(task)
            try:
                await self.heartbeat_once()  # the "stopping" heartbeat, so mdp status shows a clean stop
            except Exception as exc:  # noqa: BLE001 - the store may be what stopped us; stopping goes on
                log.warning("%s: the last heartbeat was not sent (%s)", self.name, exc)
            await self.close()
            log.info("%s stopped", self.name)


class Reader(Protocol):
    """What a stage reads with: a Consumer, or several seen as one."""

    @property
    def stats(self) -> ConsumerStats: ...

    async def run(self, handler: Handler, stop: asyncio.Event) -> None: ...

    async def dead_letter(self, stream: str, entry_id: str, reason: str) -> None: ...


class Stage(Service):
    """A service that consumes the bus: declared wiring (below) plus a handler.

    - `group` (default: the service's name), `inputs` (stream globs over the registry) and `input_names`
      (fixed streams) say what it reads;
    - `forwards`: the handler returns outputs, published (by `self.producer`) with the acknowledgements in
      one MULTI/EXEC;
    - `state_types` (series kind -> state class): per-series state kept in a SeriesBook of at most
      quality.max_series series, staged per batch and checkpointed in the batch's MULTI/EXEC; the stage then
      holds the lease mdp:lease:{name} (one instance works, another stands by) and implements
      `series_of(batch)` and `judge(batch, staging)` instead of `handle(batch)`;
    - `partitioned`: with bus.partitions = P > 1 its inputs (per-symbol md:* streams, or the partition
      streams raw:{exchange}:p{k} / valid:{exchange}:p{k}) split into P partitions by base asset, each under
      the lease mdp:lease:{name}:p{k} (and its own checkpoint, with state_types), shared out among the
      instances alive (common/bus/partitions.py; `on_partition_taken(k)` runs as one is taken); with P = 1 it
      runs as today (a checkpointed stage under one lease, another stage as a plain consumer group);
    - `bus_counters`: the consumer's counters its heartbeat carries;
    - `prepare()`: what must answer before anything is read (called until it does, see `until_ready`).
    """

    group: ClassVar[str] = ""
    inputs: ClassVar[tuple[str, ...]] = ()
    input_names: ClassVar[tuple[str, ...]] = ()
    forwards: ClassVar[bool] = False
    state_types: ClassVar[dict[str, type] | None] = None
    series_noun: ClassVar[str] = "series"  # the name of the state's size in the counters
    bus_counters: ClassVar[tuple[str, ...]] = ("delivered", "acked", "dead_lettered", "failures")

    def __init__(self, settings: Settings, instance: str | None = None) -> None:
        super().__init__(settings, instance)
        self.producer = Producer(self.redis, self.codec, settings.bus, source=self.name)
        self.lease: Lease | None = None
        self.series: SeriesState | None = None
        self.partitions: Partitions | None = None
        if (self.partitioned and settings.bus.partitions > 1) or settings.bus.cluster:
            # On a cluster a fixed input (mdp:alerts) is one stream per partition: mdp:alerts:{p<k>}.
            patterns = (*self.inputs, *(f"{n}:*" for n in self.input_names)) if settings.bus.cluster else self.inputs
            self.partitions = Partitions(self.redis, self.codec, settings.bus, self.name, self.instance,
                                         self.group_name, patterns, self.producer,
                                         self.partition_state if self.state_types is not None else None,
                                         noun=self.series_noun, on_take=self.on_partition_taken)
        elif self.state_types is not None:
            self.lease = stage_lease(self.redis, self.name, self.consumer_name, settings.bus)
            self.series = SeriesState(self.redis, self.name, self.state_types, settings.quality.max_series,
                                      restore=self.restore)
        self.consumer: Reader = self.reader()

    def partition_state(self, k: int) -> SeriesState:
        """The empty series state of partition k (checkpoint mdp:state:{name}:p{k}), made each time this
        process takes the partition."""
        assert self.state_types is not None
        return SeriesState(self.redis, f"{self.name}:{streams.part(k, self.settings.bus.cluster)}", self.state_types,
                           self.settings.quality.max_series, restore=self.restore)

    @property
    def book(self) -> SeriesBook:
        """The series state in memory (a checkpointed stage)."""
        if self.series is None:
            raise AttributeError(f"{type(self).__name__} keeps no series state (state_types is None)")
        return self.series.book

    @property
    def checkpoint(self) -> Checkpoint:
        """The series state's copy in Redis (a checkpointed stage)."""
        if self.series is None:
            raise AttributeError(f"{type(self).__name__} keeps no series state (state_types is None)")
        return self.series.checkpoint

    @property
    def group_name(self) -> str:
        return self.group or self.name

    def reader(self) -> Reader:
        """The stage's consumer (a stage reading with several consumers overrides this)."""
        if self.partitions is not None:
            return self.partitions
        series = self.series
        return Consumer(self.redis, self.codec, self.settings.bus, group=self.group_name, name=self.consumer_name,
                        selector=StreamSelector(names=self.input_names, patterns=self.inputs),
                        producer=self.producer if self.forwards else None, lease=self.lease,
                        on_acked=series.committed if series is not None else None,
                        on_commit=series.write if series is not None else None, tx=self.producer.tx)

    # -- what a stage implements ------------------------------------------------------------------------

    async def prepare(self) -> None:
        """What must answer before the stage reads anything; StoreUnavailable while it does not."""

    async def handle(self, batch: list[Delivery]) -> Outputs | None:
        """Handle a batch durably (outputs, if it forwards). A checkpointed stage's: its state for the batch
        (loaded from the checkpoint where memory lacks it), `judge`, then the staged state is held for the
        commit (made the memory's once the bus acknowledged the batch). A partitioned stage's batch comes from
        one partition: its state is that partition's."""
        series = self.series
        if series is None and self.partitions is not None and batch:
            series = self.partitions.state_for(batch[0].stream)
        if series is None:
            raise NotImplementedError(f"{type(self).__name__} handles no batch: implement handle(batch)")
        staging = await series.begin(self.series_of(batch))
        out = await self.judge(batch, staging)
        series.hold(staging)
        return out

    def series_of(self, batch: list[Delivery]) -> Iterable[SeriesKey]:
        """The series a batch may touch (a checkpointed stage)."""
        raise NotImplementedError

    async def judge(self, batch: list[Delivery], staging: Staging) -> Outputs:
        """Handle a batch against its staged series state (a checkpointed stage)."""
        raise NotImplementedError

    async def on_partition_taken(self, k: int) -> None:
        """Called as this instance takes partition k, before it reads any of it (a partitioned stage)."""

    def restore(self, key: SeriesKey, state: Any) -> Any:
        """Fix what the checkpoint's encoding does not keep (a deque's bound) after decoding."""
        return state

    def extra_counters(self) -> dict[str, int]:
        """Counters kept outside `self.count` (sizes, corrections); they win over its keys."""
        return {}

    # -- wiring -------------------------------------------------------------------------------------------

    def counters(self) -> dict[str, int]:
        s = self.consumer.stats
        if self.state_types is not None and (s.state == "standby" or self.state == "standby"):
            # waiting for the lease, or just took it
            self.state = "standby" if s.state == "standby" else "running"
        out = dict(self.count) | self.extra_counters()
        if self.series is not None:
            out |= self.series.counters(self.series_noun)
        if self.partitions is not None:
            out |= self.partitions.series_counters()
            if self.state == "running":  # what `mdp status` shows in DETAIL
                self.detail = self.partitions.describe()
        return out | {k: getattr(s, k) for k in self.bus_counters}

    async def run(self, stop: asyncio.Event) -> None:
        if not await self.until_ready(stop, self.prepare):
            return  # stopped before the store answered
        self.state, self.detail = "running", ""
        await self.consumer.run(self.handle, stop)


def service_main(cls: type[Service], argv: list[str] | None = None,
                 extra: list[tuple[str, dict[str, Any]]] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=f"python -m services.{cls.name}")
    parser.add_argument("--config", help="config file (default: $MDP_CONFIG or config/simulator.toml)")
    parser.add_argument("--instance", help="instance id, stable across restarts (default: $MDP_INSTANCE or 0)")
    for flag, kwargs in extra or []:
        parser.add_argument(flag, **kwargs)
    args = parser.parse_args(argv)
    setup_logging(cls.name)
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        log.error("%s", exc)
        raise SystemExit(2) from None
    kwargs = {k: v for k, v in vars(args).items() if k not in ("config", "instance")}
    service = cls(settings, args.instance, **kwargs) if kwargs else cls(settings, args.instance)
    try:
        uvloop.run(service.main())
    except ConfigError as exc:  # found once running (e.g. the Redis it reached is a cluster node)
        log.error("%s", exc)
        raise SystemExit(2) from None
