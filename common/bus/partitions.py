"""A partitioned stage: its inputs split into P partitions, each worked by one instance at a time under its own
lease (and checkpoint, for a stateful stage), shared out among the instances alive.

Partition k of the inputs: the per-symbol streams (md:trade:binance:BTC/USDT, ...) whose symbol's base asset
hashes to k, and the partition streams raw:{exchange}:p{k} / valid:{exchange}:p{k}, into which the collectors
(and the validator) route each event by the same hash of its symbol (`streams.partition_of_stream`: crc32,
the same in every process), so every venue and quote of an asset meets in one partition, and the events of a
symbol stay in order through every stage. An instance runs a slot per partition; a slot that holds
partition k runs a Consumer named `{stage}-{instance}.p{k}` over the partition's streams, guarded by the lease
`mdp:lease:{stage}:p{k}` (verified in every commit, as a single-instance stage's); a stateful stage's series
state is in `mdp:state:{stage}:p{k}` (common/bus/checkpoint.py), checkpointed with each batch. One reader
per partition at a time is what keeps a symbol's order: two consumers sharing a stream in one group would
publish its events in the order their commits happen to land.

Sharing out: an instance holds at most ceil(P / instances alive) partitions, alive = the stage's heartbeat
keys `mdp:alive:{stage}:*` not in state "stopping" (looked at every heartbeat interval), this instance
included.
- An instance joins: the quota of the others falls, and each hands its extra partitions over between batches,
  once nothing is pending with that partition's consumer; it releases the lease, and the newcomer's slot,
  which polls the lease, takes it. Nothing pending: the new holder cannot read newer entries of a stream
  before older ones left with the old holder.
- An instance dies: its heartbeat key expires (5 heartbeat intervals), the others' quota rises, and they take
  its leases as those expire (1.5 x claim_idle_ms after its last renewal). By then the entries it left pending
  have been idle at least claim_idle_ms, so the new holder's first XAUTOCLAIM takes them before it reads
  anything newer (`checkpoint.stage_lease`).
- Each time a slot takes a partition it starts with a new Consumer and an empty memory: the state comes from
  the partition's checkpoint (what the previous holder committed), never from what this process remembered
  of the partition from an earlier turn; `on_take(k)` lets a stage refresh what it learns from the streams
  (the normalizer's market catalog) first.
A slot that loses its lease (a commit finds another owner) raises LeaseLost: the process stops, as a
single-instance stage does, and supervisord restarts it.

Changing P moves every series to another checkpoint hash: the stage's state starts afresh once (each
symbol's minute in progress is then built partial), as after `mdp:state:*` was deleted.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable
from functools import partial

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from common.backoff import SPREAD, sleep_unless
from common.bus import streams
from common.bus.checkpoint import SeriesState, stage_lease
from common.bus.core import Consumer, ConsumerStats, Delivery, Handler, Producer, StreamSelector
from common.bus.lease import Lease
from common.config import BusSettings
from common.tasks import cancel_and_wait
from schemas import Codec, DecodeError, Heartbeat

log = logging.getLogger(__name__)

_SUMMED = ("delivered", "acked", "events", "dead_lettered", "claimed", "failures", "store_retries",
           "redis_outages", "groups_recreated")


class Share:
    """How many of a stage's partitions this instance may hold (ceil(P / instances alive)), and which it holds
    or is handing over. Every change is synchronous: the slots of one process never race past the quota."""

    def __init__(self, redis: aioredis.Redis, codec: Codec, stage: str, instance: str, partitions: int) -> None:
        self.redis = redis
        self.codec = codec
        self.stage = stage
        self.instance = instance
        self.partitions = partitions
        self.alive: set[str] = {instance}
        self.held: set[int] = set()
        self.giving: set[int] = set()

    @property
    def quota(self) -> int:
        return math.ceil(self.partitions / max(1, len(self.alive)))

    def reserve(self, k: int) -> bool:
        """Count partition k as held if the quota allows one more (before its lease is tried)."""
        if len(self.held) >= self.quota:
            return False
        self.held.add(k)
        return True

    def drop(self, k: int) -> None:
        self.held.discard(k)
        self.giving.discard(k)

    def should_give(self, k: int) -> bool:
        """True if partition k is (or is now chosen as) one this instance hands over: it holds more than its
        quota, counting those already being handed over."""
        if k in self.giving:
            return True
        if k in self.held and len(self.held) - len(self.giving) > self.quota:
            self.giving.add(k)
            log.info("%s-%s holds %d partitions, its share is %d (%d instances alive): handing partition %d "
                     "over", self.stage, self.instance, len(self.held), self.quota, len(self.alive), k)
            return True
        return False

    async def refresh(self) -> None:
        """The instances alive: members of the stage's instance set (`streams.instances_key`) whose heartbeat
        key exists and whose last heartbeat is not "stopping". Members whose key has expired are removed (O(the
        stage's instances) a refresh, not O(keys) as a SCAN would be)."""
        names = sorted(m.decode() if isinstance(m, bytes) else str(m)
                       for m in await self.redis.smembers(streams.instances_key(self.stage)))
        pipe = self.redis.pipeline(transaction=False)  # not MGET: on a cluster the keys are in several slots
        for name in names:
            pipe.get(streams.alive_key(self.stage, name))
        payloads = await pipe.execute() if names else []
        alive, gone = {self.instance}, []
        for name, payload in zip(names, payloads, strict=True):
            if payload is None:
                gone.append(name)  # its heartbeats stopped 5 intervals ago (or it never beat)
                continue
            try:
                beats = self.codec.decode(payload if isinstance(payload, bytes) else payload.encode())
            except DecodeError:
                beats = []
            beat = beats[0] if beats else None
            if isinstance(beat, Heartbeat) and beat.state == "stopping":
                continue
            alive.add(name)
        if gone:
            await self.redis.srem(streams.instances_key(self.stage), *gone)
        if alive != self.alive:
            log.info("%s: instances alive %s -> %s; share %d -> %d of %d partitions", self.stage,
                     ",".join(sorted(self.alive)), ",".join(sorted(alive)), self.quota,
                     math.ceil(self.partitions / len(alive)), self.partitions)
        self.alive = alive


class Partitions:
    """The Reader of a partitioned stage (see the module docstring): a slot per partition, each running a
    Consumer over its partition's streams while it holds the partition's lease. `new_state(k)` makes the
    empty series state of partition k; `state_for(stream)` gives the handler the state of the partition a
    batch came from (a batch comes from one partition's consumer)."""

    def __init__(self, redis: aioredis.Redis, codec: Codec, bus: BusSettings, stage: str, instance: str,
                 group: str, patterns: tuple[str, ...], producer: Producer,
                 new_state: Callable[[int], SeriesState] | None, noun: str = "series",
                 on_take: Callable[[int], Awaitable[None]] | None = None,
                 on_acked: Callable[[list[Delivery]], None] | None = None) -> None:
        self.redis = redis
        self.codec = codec
        self.bus = bus
        self.stage = stage
        self.instance = instance
        self.group = group
        self.patterns = patterns
        self.producer = producer
        self.new_state = new_state  # None: a stage without series state
        self.on_take = on_take
        self.on_acked = on_acked  # a stage without series state: called after each batch is acknowledged
        self.noun = noun  # the name of the series count in the counters (Stage.series_noun)
        self.count = bus.partitions
        self.share = Share(redis, codec, stage, instance, self.count)
        self.refresh_s = 2.0  # how often each consumer looks for new streams (tests shorten it)
        self.live: dict[int, tuple[Consumer, SeriesState | None]] = {}
        self._retired = ConsumerStats()
        self._retired_series: dict[str, int] = {}  # keyed as SeriesState.counters, without the series in memory
        self._state = "starting"
        self._closing = False

    def consumer_name(self, k: int) -> str:
        return f"{self.stage}-{self.instance}.p{k}"

    def partition_of(self, stream: str) -> int:
        return streams.partition_of_stream(stream, self.count)

    def _in_partition(self, k: int, stream: str) -> bool:
        if self.bus.cluster and streams.tag_of(stream) is None:
            return False  # on a cluster only tagged streams are the bus's (an untagged one would span slots)
        return self.partition_of(stream) == k

    def state_for(self, stream: str) -> SeriesState:
        k = self.partition_of(stream)
        held = self.live.get(k)
        if held is None or held[1] is None:
            raise RuntimeError(f"{self.stage}: a batch of {stream} (partition {k}) arrived while partition {k} "
                               f"is not held by {self.instance}, or the stage keeps no series state")
        return held[1]

    # -- the Reader protocol -----------------------------------------------------------------------------

    @property
    def stats(self) -> ConsumerStats:
        out = ConsumerStats(**{k: getattr(self._retired, k) for k in _SUMMED})
        states = []
        for consumer, _ in self.live.values():
            s = consumer.stats
            for k in _SUMMED:
                setattr(out, k, getattr(out, k) + getattr(s, k))
            out.last_error = s.last_error or out.last_error
            states.append((s.state, s.detail))
        degraded = [d for st, d in states if st == "degraded"]
        if degraded:
            out.state, out.detail = "degraded", degraded[0]
        elif self.live:
            out.state = "running"
        else:
            out.state = self._state
            out.detail = (f"holds none of the {self.count} partitions (share {self.share.quota}, "
                          f"{len(self.share.alive)} instances alive)") if self._state == "standby" else ""
        return out

    def series_counters(self) -> dict[str, int]:
        """The series state's counters (`SeriesState.counters`): the series in memory over the partitions
        held, the others summed over every partition this process has held; and `partitions_held`."""
        noun = self.noun
        out = {noun: 0, f"{noun}_evicted": 0, "series_loaded": 0, "checkpoint_undecodable": 0}
        for counters in [self._retired_series, *(s.counters(noun) for _, s in self.live.values() if s is not None)]:
            for k, v in counters.items():
                out[k] += v
        out["partitions_held"] = len(self.live)
        return out

    def describe(self) -> str:
        """The partitions held, for a person: "partitions 0,2 of 4 (share 2, 2 instances alive)"."""
        held = ",".join(map(str, sorted(self.live))) or "none"
        return f"partitions {held} of {self.count} (share {self.share.quota}, {len(self.share.alive)} instances alive)"

    async def dead_letter(self, stream: str, entry_id: str, reason: str) -> None:
        held = self.live.get(self.partition_of(stream))
        if held is None:
            raise RuntimeError(f"{self.stage}: cannot dead-letter {entry_id} of {stream}: its partition is not held")
        await held[0].dead_letter(stream, entry_id, reason)

    async def run(self, handler: Handler, stop: asyncio.Event) -> None:
        """Run every partition's slot until `stop`; the first failure of one (LeaseLost) stops them all and is
        raised."""
        self._state = "standby"
        await self.share.refresh()
        tasks = [asyncio.create_task(self._slot(k, handler, stop), name=f"{self.stage}-p{k}")
                 for k in range(self.count)]
        tasks.append(asyncio.create_task(self._watch_alive(stop), name=f"{self.stage}-alive"))
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()
        finally:
            self._closing = True  # a slot whose cancellation is lost takes nothing more (common/tasks.py)
            await cancel_and_wait(*tasks)
            self._state = "stopping"

    # -- slots ---------------------------------------------------------------------------------------------

    async def _watch_alive(self, stop: asyncio.Event) -> None:
        while not await sleep_unless(stop, self.bus.heartbeat_interval_s, SPREAD):
            try:
                await self.share.refresh()
            except (RedisError, OSError) as exc:
                log.warning("%s: instances alive not refreshed (%s); the share stays %d", self.stage, exc,
                            self.share.quota)

    async def _slot(self, k: int, handler: Handler, stop: asyncio.Event) -> None:
        lease = stage_lease(self.redis, f"{self.stage}:{streams.part(k, self.bus.cluster)}", self.consumer_name(k),
                            self.bus)
        while not stop.is_set() and not self._closing:
            if not await self._take(k, lease, stop):
                return
            series = self.new_state(k) if self.new_state is not None else None
            consumer = Consumer(
                self.redis, self.codec, self.bus, group=self.group, name=self.consumer_name(k),
                selector=StreamSelector(patterns=self.patterns, where=partial(self._in_partition, k)),
                producer=self.producer, lease=lease,
                on_acked=series.committed if series is not None else self.on_acked,
                on_commit=series.write if series is not None else None, tx=self.producer.tx,
                handover=partial(self.share.should_give, k), refresh_s=self.refresh_s, partition=k)
            self.live[k] = (consumer, series)
            log.info("%s: partition %d of %d taken by %s%s", self.stage, k, self.count, self.instance,
                     f" (state from {series.checkpoint.key})" if series is not None else "")
            try:
                if self.on_take is not None:
                    await self.on_take(k)
                await consumer.run(handler, stop)
            finally:
                del self.live[k]
                self.share.drop(k)
                self._retire(consumer, series)
            if consumer.handed_over:
                log.info("%s: partition %d handed over by %s", self.stage, k, self.instance)

    async def _take(self, k: int, lease: Lease, stop: asyncio.Event) -> bool:
        """Wait until this instance's share allows partition k and its lease is ours (True), or `stop`."""
        while not stop.is_set() and not self._closing:
            if self.share.reserve(k):
                try:
                    if await lease.try_acquire():
                        return True
                except (RedisError, OSError) as exc:
                    log.warning("lease %s: Redis unreachable (%s); retrying", lease.key, exc)
                self.share.drop(k)
            await sleep_unless(stop, lease.ttl_ms / 3000, SPREAD)
        return False

    def _retire(self, consumer: Consumer, series: SeriesState | None) -> None:
        for k in _SUMMED:
            setattr(self._retired, k, getattr(self._retired, k) + getattr(consumer.stats, k))
        if series is None:
            return
        gone = series.counters(self.noun)
        gone.pop(self.noun)  # the series in memory are dropped with the partition
        for k, v in gone.items():
            self._retired_series[k] = self._retired_series.get(k, 0) + v
