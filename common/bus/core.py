"""The message bus over Redis Streams. Guarantees and the faults they survive: docs/bus.md.

Producing: `Producer.publish({stream: [events]})` (cold callers) and `Producer.commit(outputs, commands)` (a
collector's round, a stage's batch: one MULTI/EXEC over the lean connection, `Transactions`) pack up to
`batch_max_events` events into one entry (FACTS.md: ~25x the throughput of one entry per event), send every
XADD of the call in one round trip, and trim each stream approximately at `stream_maxlen` entries. Every
publish also registers the stream (SADD `mdp:streams`); when that SADD finds the stream new (first write, or a Redis that lost its data)
the producer creates the pipeline's own consumer groups of the stream (`streams.own_groups`, from id 0), so
what is written while a stage is down is kept for it and counts for backpressure. Backpressure keeps the
trim harmless: before publishing, the producer looks (at most every 0.5 s) at the stream's own groups, and
while one has more than `backpressure_high_water` entries undelivered or pending it waits. After
`backpressure_max_wait_s` it publishes anyway and raises an alert, since a collector that stops reading its
socket loses data at the exchange instead. Other groups (a strategy's) are never obeyed; one whose
consumers have all been idle `abandoned_group_s` while it lags is reported (`bus.group_abandoned`) and, if
`drop_abandoned_groups`, destroyed.

Consuming: `Consumer.run(handler)` reads through a consumer group and acknowledges an entry only after
the handler returned, i.e. after its effect is durable. A handler may return output events: those are
published and the inputs acknowledged in one MULTI/EXEC transaction (with the stage's `on_commit`
checkpoint, and verified against its `lease`), so a stage that forwards never doubles nor drops an entry;
if the connection drops after EXEC was sent, the consumer asks Redis (XPENDING) whether the batch committed
instead of publishing it twice. While a batch is handled its entries stay claimed by this consumer (XCLAIM
renewed every third of `claim_idle_ms`), so a sibling never takes a slow batch over. Entries a crashed
consumer left pending are taken over with XAUTOCLAIM after `claim_idle_ms`; a restarted consumer first
replays its own pending entries one at a time. A handler raising `StoreUnavailable` is retried in place with
capped backoff (nothing is acknowledged, nothing counts against the entry; `store.unavailable` and
`store.recovered` alerts). Any other failure is retried entry by entry; an entry delivered `max_deliveries`
times without success (also one that kills the process), or one that cannot be decoded, moves to
`dlq:{stream}` with the reason and is acknowledged. A consumer that loses Redis waits for it (state
"degraded") and carries on, recreating a consumer group Redis lost (`bus.group_recreated`).
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, cast

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    ClusterDownError,
    RedisError,
    ResponseError,
    SlotNotCoveredError,
    TryAgainError,
    WatchError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.typing import StreamIdT

from common.backoff import EXACT, Backoff, sleep_unless
from common.bus import streams
from common.bus.client import cluster_url, commit_slot, node_address, refresh_slots
from common.bus.lease import Lease, LeaseLost
from common.bus.resp import Command, RespConnection, WatchMismatch, lean_connection, master_connection
from common.config import BusSettings
from common.errors import StoreUnavailable
from common.redis_client import is_cluster
from common.tasks import cancel_and_wait
from schemas import Alert, Codec, DecodeError, Event, Severity

log = logging.getLogger(__name__)

# Redis is unreachable (refused, reset, timed out, loading its data after a restart; on a cluster also a slot
# without a master, one being down or failing over): redis-py wraps socket errors into these. A handler's own
# OSError is the handler's failure, not the bus's.
REDIS_DOWN = (RedisConnectionError, RedisTimeoutError, ClusterDownError, SlotNotCoveredError, TryAgainError)
REDIS_RETRY_MAX_S = 5.0  # cap of the backoff while waiting for Redis
STORE_RETRY_MAX_S = 30.0  # cap of the backoff while a handler's store is unavailable
ABANDONED_CHECK_S = 10.0  # how often a producer looks at the foreign groups of a stream it writes


@dataclass(slots=True)
class Delivery:
    stream: str
    entry_id: str
    events: list[Event]


# The bus client is built with decode_responses=False: stream ids and fields are bytes (redis-py types its
# replies for either setting, and a range as optional).
StreamEntries = list[tuple[bytes, dict[bytes, bytes]]]
XReadReply = list[tuple[bytes, StreamEntries]] | dict[bytes, StreamEntries]  # RESP2 | RESP3
Outputs = dict[str, list[Event]]
Handler = Callable[[list[Delivery]], Awaitable[Outputs | None]]
# The commands a stateful stage adds to a batch's MULTI/EXEC (its state checkpoint).
CommitHook = Callable[[list[Delivery]], Sequence[Command]]

COMMIT_WATCH_RETRIES = 5


def now_ns() -> int:
    return time.time_ns()


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def redis_url(redis: aioredis.Redis) -> str:
    """Where a client points, without credentials (for messages)."""
    if is_cluster(redis):
        return cluster_url(redis)
    kw = redis.connection_pool.connection_kwargs
    if "path" in kw:
        return f"unix://{kw['path']}"
    return f"redis://{kw.get('host', '127.0.0.1')}:{kw.get('port', 6379)}/{kw.get('db', 0)}"


def without_retries(redis: aioredis.Redis) -> aioredis.Redis:
    """A client on the same server whose commands are never re-sent after a connection error. redis-py
    re-sends a whole MULTI/EXEC when the connection drops while it waits for the reply; if the first EXEC
    had run, the entries would be published twice. The caller checks instead (Consumer._commit)."""
    pool = redis.connection_pool
    kwargs = dict(pool.connection_kwargs)
    kwargs["retry"] = Retry(NoBackoff(), 0)
    return aioredis.Redis.from_pool(pool.__class__(connection_class=pool.connection_class,
                                                   max_connections=pool.max_connections, **kwargs))


class Transactions:
    """The bus's commits: one MULTI/EXEC of plain commands, sent once and never re-sent (a connection error is
    raised as redis ConnectionError/TimeoutError and the caller finds out whether the EXEC ran). Over the lean
    RESP connection (common/bus/resp.py: about 30 us of CPU a round against redis-py's 170-200), through a
    redis-py client without retries where it cannot speak (TLS). With a lease: WATCH its key and compare the
    owner before MULTI, so the EXEC aborts if the key changed; retried while the lease is still ours (our own
    renewal touches the key), LeaseLost when it is not."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis
        self._lean: RespConnection | Literal[False] | None = None  # None: not tried yet; False: needs redis-py
        self._redis_py: aioredis.Redis | None = None
        self._masters: dict[tuple[str, int], RespConnection] = {}  # a cluster's: one per master

    async def run(self, commands: Sequence[Command], lease: Lease | None = None) -> list[Any]:
        if self._lean is None:
            self._lean = False if is_cluster(self.redis) else lean_connection(self.redis) or False
        if lease is None:
            return await self._run(commands, None)
        for _ in range(COMMIT_WATCH_RETRIES):
            try:
                return await self._run(commands, (lease.key, lease.owner.encode()))
            except WatchMismatch as exc:
                raise lease.lost(f"at commit the key names {_s(exc.found) if exc.found else 'nobody (expired)'}") \
                    from None
            except WatchError:
                continue
        raise lease.lost(f"the key changed during {COMMIT_WATCH_RETRIES} commits in a row")

    async def _run(self, commands: Sequence[Command], watch: tuple[str, bytes] | None) -> list[Any]:
        if isinstance(self._lean, RespConnection):
            return await self._lean.transaction(commands, watch)
        if is_cluster(self.redis):
            return await self._run_on_master(commands, watch)
        if self._redis_py is None:
            self._redis_py = without_retries(self.redis)
        async with self._redis_py.pipeline(transaction=True) as pipe:
            if watch is not None:
                await pipe.watch(watch[0])
                found = cast(bytes | None, await pipe.get(watch[0]))  # decode_responses=False
                if found != watch[1]:
                    raise WatchMismatch(watch[0], found)
                pipe.multi()
            for command in commands:
                pipe.execute_command(*command)
            try:
                return list(await pipe.execute())
            except WatchError as exc:
                if isinstance(exc.__context__, REDIS_DOWN):  # redis-py reports a dropped connection so
                    raise RedisConnectionError(f"connection lost during a commit: {exc.__context__}") from exc
                raise

    async def _run_on_master(self, commands: Sequence[Command], watch: tuple[str, bytes] | None) -> list[Any]:
        """A cluster's commit: over a lean connection to the master serving the commit's one slot. A MOVED or
        a connection error reads the slot map again before it is raised (nothing was re-sent)."""
        slot = commit_slot(tuple(commands), watch[0] if watch is not None else None)
        address = node_address(self.redis, slot)
        conn = self._masters.get(address)
        if conn is None:
            conn = self._masters[address] = master_connection(self.redis, *address)
        try:
            return await conn.transaction(commands, watch)
        except (RedisConnectionError, RedisTimeoutError):
            self._masters.pop(address, None)
            await conn.aclose()
            try:
                await refresh_slots(self.redis)
            except (RedisError, OSError) as exc:
                log.warning("the cluster's slot map was not read again (%s); the next commit tries", exc)
            raise

    async def aclose(self) -> None:
        if self._redis_py is not None:
            await self._redis_py.aclose()
            self._redis_py = None
        for conn in self._masters.values():
            await conn.aclose()
        self._masters.clear()
        if isinstance(self._lean, RespConnection):
            await self._lean.aclose()
        self._lean = None


async def ensure_own_groups(redis: aioredis.Redis, stream: str) -> list[str]:
    """Create the pipeline's own consumer groups of `stream` (from id 0, MKSTREAM); BUSYGROUP is success.
    Returns the groups created now."""
    groups = streams.own_groups(stream)
    if not groups:
        return []
    pipe = redis.pipeline(transaction=False)
    for group in groups:
        pipe.xgroup_create(stream, group, id="0", mkstream=True)
    created = []
    for group, result in zip(groups, await pipe.execute(raise_on_error=False), strict=True):
        if isinstance(result, ResponseError):
            if "BUSYGROUP" not in str(result):
                raise result
        elif isinstance(result, Exception):
            raise result
        else:
            created.append(group)
    if created:
        log.info("created consumer group(s) %s on %s (id 0): kept for them from the first entry",
                 ", ".join(created), stream)
    return created


async def publish_alert(redis: aioredis.Redis, codec: Codec, settings: BusSettings, source: str, rule: str,
                        severity: str, reason: str, values: dict[str, str]) -> None:
    """Write one bus alert (kind "stream") to mdp:alerts (a cluster's mdp:alerts:{p0}) at once (never waits for
    backpressure: an alert is what says why)."""
    now = now_ns()
    alert = Alert(rule=rule, severity=cast(Severity, severity), source=source, exchange="", symbol="",
                  kind="stream", reason=reason, values=cast(dict[str, str | None], values), ts_event=now,
                  ts_recv=now)
    stream = streams.tagged(streams.ALERTS, 0) if is_cluster(redis) else streams.ALERTS  # a cluster's: in {p0}
    pipe = redis.pipeline(transaction=False)
    pipe.sadd(streams.REGISTRY, stream)
    # redis-py types xadd's fields as dict[FieldT, EncodableT], which (invariant) refuses dict[bytes, bytes].
    pipe.xadd(stream, codec.entry([alert]), maxlen=settings.stream_maxlen,  # type: ignore[arg-type]
              approximate=True)
    added, _ = await pipe.execute()
    if added:
        await ensure_own_groups(redis, stream)


@dataclass
class GroupState:
    """A consumer group of a stream as XINFO GROUPS/CONSUMERS show it."""
    stream: str
    name: str
    consumers: int
    pending: int
    lag: int | None
    idle_ms: int | None  # the least idle of its consumers; None without consumers
    last_delivered_ms: int = 0  # time part of the last entry id delivered to the group (0: none yet)

    @property
    def backlog(self) -> int:
        return (self.lag or 0) + self.pending


def _entry_id(value: bytes | str | None) -> tuple[int, int]:
    ms, _, seq = _s(value or "0-0").partition("-")
    return int(ms), int(seq or 0)


async def last_generated_id(redis: aioredis.Redis, stream: str) -> tuple[int, int] | None:
    try:
        info = await redis.xinfo_stream(stream)
    except ResponseError:
        return None
    return _entry_id(info.get("last-generated-id"))


def group_lag(group: dict[str, Any], last_generated: tuple[int, int] | None) -> int | None:
    """XINFO GROUPS' lag, but 0 for a group that was delivered the stream's last entry: after a restart from
    the AOF, Redis 7.0 can keep reporting a lag (or none) for a group that has read everything (seen in the
    chaos suite, docs/chaos.md), and a phantom lag would hold producers back and never let `mdp status` drain."""
    if last_generated is not None and _entry_id(group.get("last-delivered-id")) >= last_generated:
        return 0
    return None if group.get("lag") is None else int(group["lag"])


async def stream_groups(redis: aioredis.Redis, stream: str) -> list[GroupState]:
    try:
        groups = await redis.xinfo_groups(stream)
    except ResponseError:
        return []  # no such stream yet
    last = await last_generated_id(redis, stream) if groups else None
    return [GroupState(stream, _s(g["name"]), int(g["consumers"]), int(g.get("pending") or 0),
                       group_lag(g, last), None,
                       int(_s(g.get("last-delivered-id") or "0-0").partition("-")[0]))
            for g in groups]


async def abandoned_groups(redis: aioredis.Redis, stream: str, idle_s: float,
                           groups: list[GroupState] | None = None,
                           first_seen: dict[tuple[str, str], float] | None = None) -> list[GroupState]:
    """Groups of `stream` that are not the pipeline's own, lag (or hold pending entries), and whose consumers
    have all been idle longer than `idle_s`. A group without consumers counts as idle since the entry it was
    last delivered was written, or, having read nothing, since `first_seen` (when this process first saw it
    lagging)."""
    own = set(streams.own_groups(stream))
    found = []
    for g in groups if groups is not None else await stream_groups(redis, stream):
        if g.name in own or g.backlog == 0:
            continue
        if g.consumers:
            try:
                infos = await redis.xinfo_consumers(stream, g.name)
            except ResponseError:
                continue  # destroyed meanwhile
            g.idle_ms = min((int(c["idle"]) for c in infos), default=None)
            idle = (g.idle_ms or 0) / 1000
        elif g.last_delivered_ms:
            idle = time.time() - g.last_delivered_ms / 1000
        else:
            seen = (first_seen if first_seen is not None else {}).setdefault((stream, g.name), time.monotonic())
            idle = time.monotonic() - seen
        if idle > idle_s:
            found.append(g)
    return found


class Producer:
    def __init__(self, redis: aioredis.Redis, codec: Codec, settings: BusSettings, source: str) -> None:
        self.redis = redis
        self.codec = codec
        self.settings = settings
        self.source = source
        self.tx = Transactions(redis)
        self._checked_at: dict[str, float] = {}
        self._foreign_checked_at: dict[str, float] = {}
        self._foreign_first_seen: dict[tuple[str, str], float] = {}
        self.published_events = 0
        self.published_entries = 0
        self.backpressure_waits = 0
        self.hurried = False  # set by `hurry`: publish without waiting for slow consumers

    def hurry(self) -> None:
        """From now on publish without waiting for consumers (a wait under way ends within 0.1 s). A collector
        calls it at stop: what it took from the exchange is kept in the stream (MAXLEN is far above the high
        water) rather than left unpublished, which would be a Gap."""
        self.hurried = True

    async def alert(self, rule: str, severity: str, reason: str, values: dict[str, str]) -> None:
        await publish_alert(self.redis, self.codec, self.settings, self.source, rule, severity, reason, values)

    async def aclose(self) -> None:
        await self.tx.aclose()

    def _xadd_commands(self, outputs: Outputs, register: bool = True) -> tuple[list[Command], int, list[tuple[int, str]]]:
        """Every entry's XADD and (with `register`) each stream's SADD into the registry (every time: a Redis
        that lost its data gets the registry back at the next publish), as plain commands. Returns them, the
        entry count and where each SADD's reply will be among the commands' replies."""
        commands: list[Command] = []
        entries = 0
        sadds: list[tuple[int, str]] = []
        size, maxlen = self.settings.batch_max_events, self.settings.stream_maxlen
        entry = self.codec.entry
        for stream, events in outputs.items():
            if register:
                sadds.append((len(commands), stream))
                commands.append(("SADD", streams.REGISTRY, stream))
            for i in range(0, len(events), size):
                fields = entry(events[i:i + size])
                commands.append(("XADD", stream, "MAXLEN", "~", maxlen, "*", *(x for kv in fields.items() for x in kv)))
                entries += 1
        return commands, entries, sadds

    async def _registered(self, results: list[object], sadds: list[tuple[int, str]]) -> None:
        """After a publish: the streams the registry did not know yet get the pipeline's own groups."""
        for index, stream in sadds:
            if results[index] == 1:
                await ensure_own_groups(self.redis, stream)

    def _count(self, outputs: Outputs, entries: int) -> None:
        self.published_entries += entries
        self.published_events += sum(len(v) for v in outputs.values())

    async def publish(self, outputs: Outputs) -> None:
        """Publish outputs (the cold callers: alerts, gap repairs, strategies' events) through redis-py, which
        re-sends the pipeline if the connection drops (its retries): an entry may then be written twice, and readers
        tell it by its events' ids (every writer is idempotent). The hot paths use `commit`. On a Redis Cluster
        a stream without a partition tag is put in the partition `streams.partition_of_stream` gives it
        (md:trade:binance:BTC/USDT in its symbol's, mdp:alerts and strategy:{name} by their name)."""
        outputs = {s: ev for s, ev in outputs.items() if ev}
        if not outputs:
            return
        if self.settings.cluster or is_cluster(self.redis):  # each stream in its partition, as a commit puts it
            p = self.settings.partitions
            outputs = {streams.tagged(s, streams.partition_of_stream(s, p)): ev for s, ev in outputs.items()}
        await self.wait_for_consumers(outputs.keys())
        commands, entries, sadds = self._xadd_commands(outputs)
        pipe = self.redis.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        results = await pipe.execute()
        await self._registered(results, sadds)
        self._count(outputs, entries)

    async def commit(self, outputs: Outputs, commands: Sequence[Command] = (), lease: Lease | None = None) -> None:
        """Publish outputs and run `commands` (a collector's positions, a stage's acknowledgements and state
        checkpoint) in one MULTI/EXEC, guarded by `lease` if given (`Transactions`). Never re-sent: a
        connection error is raised as redis ConnectionError/TimeoutError and the caller finds out whether the
        EXEC ran (the collector from its positions, a stage with XPENDING)."""
        outputs = {s: ev for s, ev in outputs.items() if ev}
        if not outputs and not commands:
            return
        if outputs:
            await self.wait_for_consumers(outputs.keys())
        if is_cluster(self.redis) and outputs:
            await self._register(outputs.keys())  # the registry is a key of its own slot: not in the commit
            xadds, entries, sadds = self._xadd_commands(outputs, register=False)
        else:
            xadds, entries, sadds = self._xadd_commands(outputs)
        results = await self.tx.run([*xadds, *commands], lease)
        await self._registered(results, sadds)
        self._count(outputs, entries)

    async def _register(self, names: Iterable[str]) -> None:
        """On a cluster, before a commit: each stream's SADD into the registry (every time, as in the commit on
        one node), and the pipeline's own groups of those it did not know yet."""
        names = list(names)
        pipe = self.redis.pipeline(transaction=False)
        for name in names:
            pipe.sadd(streams.REGISTRY, name)
        for name, added in zip(names, await pipe.execute(), strict=True):
            if added == 1:
                await ensure_own_groups(self.redis, name)

    async def backlog(self, stream: str, groups: list[GroupState] | None = None) -> int:
        """Entries one of the pipeline's own groups of `stream` has not finished: undelivered (lag) plus
        pending. Other groups (a strategy's) never count: a stopped strategy must not hold the pipeline back."""
        own = streams.own_groups(stream)
        if not own:
            return 0
        if groups is None:
            groups = await stream_groups(self.redis, stream)
        return max((g.backlog for g in groups if g.name in own), default=0)

    async def wait_for_consumers(self, names: Iterable[str]) -> None:
        if self.hurried:
            return
        now = time.monotonic()
        due = [s for s in names if now - self._checked_at.get(s, 0.0) >= 0.5]
        for stream in due:
            self._checked_at[stream] = now
            deadline = now + self.settings.backpressure_max_wait_s
            groups = await stream_groups(self.redis, stream)
            if now - self._foreign_checked_at.get(stream, 0.0) >= ABANDONED_CHECK_S:
                self._foreign_checked_at[stream] = now
                await self.report_abandoned(stream, groups)
            backlog = await self.backlog(stream, groups)
            if backlog <= self.settings.backpressure_high_water:
                continue
            self.backpressure_waits += 1
            log.warning("backpressure: stream %s has %d entries unfinished by one of its groups (high water %d); "
                        "waiting up to %.0f s", stream, backlog, self.settings.backpressure_high_water,
                        self.settings.backpressure_max_wait_s)
            while (backlog > self.settings.backpressure_high_water and time.monotonic() < deadline
                   and not self.hurried):
                await asyncio.sleep(0.1)
                backlog = await self.backlog(stream)
            if self.hurried:
                log.warning("backpressure: stopping, so publishing to %s without waiting (%d entries unfinished)",
                            stream, backlog)
                return
            if backlog > self.settings.backpressure_high_water:
                reason = (f"consumers of {stream} are {backlog} entries behind after "
                          f"{self.settings.backpressure_max_wait_s:.0f} s; publishing anyway: entries beyond "
                          f"{self.settings.stream_maxlen} are trimmed unread. Start or scale the consumer.")
                log.error("%s", reason)
                await self.alert("bus.backpressure_timeout", "critical", reason,
                                 {"stream": stream, "backlog": str(backlog)})

    async def report_abandoned(self, stream: str, groups: list[GroupState]) -> None:
        """Alert (once per group per hour, across processes) on a foreign group abandoned while it lags; drop
        it if `drop_abandoned_groups`."""
        idle_s = self.settings.abandoned_group_s
        for g in await abandoned_groups(self.redis, stream, idle_s, groups, self._foreign_first_seen):
            idle = "no consumer" if g.idle_ms is None else f"its consumers idle {g.idle_ms / 1000:.0f} s"
            values = {"stream": stream, "group": g.name, "backlog": str(g.backlog)}
            if self.settings.drop_abandoned_groups:
                await self.redis.xgroup_destroy(stream, g.name)
                self._foreign_first_seen.pop((stream, g.name), None)
                rule = "bus.group_dropped"
                reason = (f"consumer group {g.name} of {stream} was abandoned ({idle}, {g.backlog} entries behind) "
                          f"and has been destroyed (bus.drop_abandoned_groups = true); its reader must create "
                          f"it again, from '$' or from an id")
            elif await self.redis.set(streams.abandoned_alerted_key(stream, g.name), self.source, nx=True,
                                      ex=3600):
                rule = "bus.group_abandoned"
                values["idle_ms"] = "" if g.idle_ms is None else str(g.idle_ms)
                reason = (f"consumer group {g.name} of {stream} looks abandoned: {idle}, {g.backlog} entries "
                          f"behind. It does not slow the pipeline, but its entries are trimmed unread beyond "
                          f"bus.stream_maxlen; resume its reader, or XGROUP DESTROY {stream} {g.name}, or set "
                          f"bus.drop_abandoned_groups = true")
            else:
                continue  # reported within the hour
            log.warning("%s", reason)
            await self.alert(rule, "warning", reason, values)


class StreamSelector:
    """The streams a consumer reads: fixed names and/or glob patterns over the stream registry, those of the
    patterns kept only where `where(name)` holds (a partition's share), if given."""

    def __init__(self, names: Iterable[str] = (), patterns: Iterable[str] = (),
                 where: Callable[[str], bool] | None = None) -> None:
        self.names = list(names)
        self.patterns = list(patterns)
        self.where = where

    async def resolve(self, redis: aioredis.Redis) -> list[str]:
        found = set(self.names)
        if self.patterns:
            for member in await redis.smembers(streams.REGISTRY):
                name = _s(member)
                if any(fnmatch.fnmatchcase(name, p) for p in self.patterns) and (
                        self.where is None or self.where(name)):
                    found.add(name)
        return sorted(found)


def alert_streams(cluster: bool) -> StreamSelector:
    """mdp:alerts, or on a Redis Cluster its stream in each partition (mdp:alerts:{p<k>}, from the registry)."""
    return StreamSelector(patterns=[f"{streams.ALERTS}:*"]) if cluster else StreamSelector(names=[streams.ALERTS])


@dataclass
class ConsumerStats:
    delivered: int = 0
    acked: int = 0
    events: int = 0
    dead_lettered: int = 0
    claimed: int = 0
    failures: int = 0
    store_retries: int = 0
    redis_outages: int = 0
    groups_recreated: int = 0
    last_error: str = ""
    state: str = "starting"
    detail: str = ""  # what a degraded consumer waits for: the store or Redis, and the error
    batch_seconds: list[float] = field(default_factory=list)


class Consumer:
    def __init__(self, redis: aioredis.Redis, codec: Codec, settings: BusSettings, group: str, name: str,
                 selector: StreamSelector, producer: Producer | None = None, refresh_s: float = 2.0,
                 on_acked: Callable[[list[Delivery]], None] | None = None,
                 on_commit: CommitHook | None = None, lease: Lease | None = None,
                 tx: Transactions | None = None, handover: Callable[[], bool] | None = None,
                 partition: int | None = None) -> None:
        self.redis = redis
        self.codec = codec
        self.settings = settings
        self.group = group
        self.name = name
        self.selector = selector
        self.producer = producer
        # Its commits; a stage passes its producer's, closed with the producer (else `aclose` closes its own).
        self.tx = tx or (producer.tx if producer is not None else Transactions(redis))
        self._owns_tx = tx is None and producer is None
        self.refresh_s = refresh_s
        # Called after a batch's outputs are published and its entries acknowledged: where a stateful stage
        # commits the state it staged for the batch (so a failed publish leaves the state as it was).
        self.on_acked = on_acked
        # Called while the batch's MULTI/EXEC is built: the commands a stateful stage adds after the XADDs and
        # XACKs (its state checkpoint), so state, outputs and acknowledgements commit together or not at all.
        self.on_commit = on_commit
        # With a lease, only its holder reads: acquired before anything is read, verified in every commit.
        self.lease = lease
        # Asked between batches: True when this consumer should give its lease up (its partition goes to
        # another instance). It stops reading once nothing is pending with it, and releases the lease.
        self.handover = handover
        self.handed_over = False
        # On a Redis Cluster, the partition this consumer reads: every output stream of its commits takes the
        # partition's hash tag (streams.tagged), so outputs, acknowledgements and state are in one slot.
        self.tag = partition if is_cluster(redis) else None
        self.streams: list[str] = []
        self._refreshed_at = 0.0
        self._claimed_at = 0.0
        self._errors: dict[str, str] = {}
        self._redis_down_since: float | None = None  # wall clock (s) of the first failed call of an outage
        self._redis_down_error = ""
        self._store_down: tuple[str, float] | None = None  # (store, since) while StoreUnavailable is retried
        self._stop = asyncio.Event()
        self.stats = ConsumerStats()

    async def alert(self, rule: str, severity: str, reason: str, values: dict[str, str]) -> None:
        await publish_alert(self.redis, self.codec, self.settings, self.group, rule, severity, reason, values)

    async def aclose(self) -> None:
        """Close the commits' connection if it is this consumer's own (one shared with a producer is closed with
        the producer)."""
        if self._owns_tx:
            await self.tx.aclose()

    # -- groups and streams ------------------------------------------------------------------------------

    async def ensure_group(self, stream: str) -> bool:
        """Create our group on `stream` from id 0 (a group made after the producer started misses nothing);
        True if it was created now, False if it existed."""
        try:
            await self.redis.xgroup_create(stream, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
            return False
        log.info("created consumer group %s on %s", self.group, stream)
        return True

    async def refresh_streams(self, force: bool = False) -> None:
        if not force and time.monotonic() - self._refreshed_at < self.refresh_s:
            return
        self._refreshed_at = time.monotonic()
        names = await self.selector.resolve(self.redis)
        new = [s for s in names if s not in self.streams]
        for stream in new:
            await self.ensure_group(stream)
        if new:
            self.streams = sorted(set(self.streams) | set(names))
            # Entries delivered to this consumer name before a restart are still pending with it.
            await self._process_own_pending(new)

    async def _recreate_groups(self, cause: str) -> None:
        """Redis lost our group (a restart without persistence, or XGROUP DESTROY): create it again from id 0
        and say so; the entries it had delivered and not acknowledged are gone with it."""
        for stream in self.streams:
            if await self.ensure_group(stream):
                self.stats.groups_recreated += 1
                reason = (f"consumer group {self.group} of {stream} was gone ({cause}) and has been recreated "
                          f"from id 0: entries still in the stream are delivered again; what it had pending is "
                          f"lost if Redis lost the stream. Run Redis with appendonly yes (docs/bus.md)")
                log.error("%s", reason)
                await self.alert("bus.group_recreated", "error", reason,
                                 {"stream": stream, "group": self.group, "consumer": self.name})

    # -- the loop ------------------------------------------------------------------------------------------

    async def run(self, handler: Handler, stop: asyncio.Event) -> None:
        self._stop = stop
        self._handler = handler
        if self.lease is None:
            await self._run_work(stop)
            self.stats.state = "stopping"
            return
        self.stats.state = "standby"
        if not await self.lease.acquire(stop):
            self.stats.state = "stopping"
            return
        lead_over = asyncio.Event()  # set when this consumer stops leading: the renewal ends even if its
        #                              cancellation is lost (common/tasks.py)
        renewal = asyncio.create_task(self.lease.run_renewal(stop, until=lead_over), name=f"{self.name}-lease")
        work = asyncio.create_task(self._run_work(stop), name=f"{self.name}-work")
        try:
            done, _ = await asyncio.wait({renewal, work}, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # LeaseLost from the renewal, or the work's own failure
            if renewal in done and not work.done():
                await work  # renewal ended because stop was set
        finally:
            lead_over.set()
            await cancel_and_wait(renewal, work)
            if (stop.is_set() or self.handed_over) and self.lease.held:
                try:
                    await self.lease.release()
                except (RedisError, OSError) as exc:
                    log.warning("lease %s not released at stop (%s); it expires after its ttl",
                                self.lease.key, exc)
        self.stats.state = "stopping"

    async def _run_work(self, stop: asyncio.Event) -> None:
        """Read and handle until `stop`. Redis unreachable: wait for it with capped backoff (state
        "degraded"), then carry on; a group Redis lost is recreated."""
        self.stats.state = "running"
        backoff = Backoff(0.5, REDIS_RETRY_MAX_S)
        resumed = False
        while not stop.is_set():
            try:
                await self._redis_recovered()
                if not resumed:
                    await self.refresh_streams(force=True)
                    resumed = True
                else:
                    await self._resume()
                await self._loop(stop)
                return
            except (*REDIS_DOWN, OSError) as exc:
                self._redis_down(exc)
                log.warning("consumer %s: Redis at %s unreachable (%s); retrying in %.1f s", self.name,
                            redis_url(self.redis), exc, backoff.delay)
                if await backoff.sleep(stop):
                    return
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                await self._recreate_groups(str(exc))
                backoff.reset()

    async def _resume(self) -> None:
        """After an outage or a lost group: our groups exist again, then what is pending with us is replayed."""
        await self._recreate_groups("found missing after Redis came back")
        self._refreshed_at = 0.0
        await self._process_own_pending(list(self.streams))

    def _redis_down(self, exc: BaseException) -> None:
        if self._redis_down_since is None:
            self._redis_down_since = time.time()
            self.stats.redis_outages += 1
        self._redis_down_error = f"{type(exc).__name__}: {exc}"
        self.stats.state = "degraded"
        self.stats.detail = (f"Redis at {redis_url(self.redis)} unreachable since "
                             f"{_hms(self._redis_down_since)}: {self._redis_down_error}")

    async def _redis_recovered(self) -> None:
        """Once Redis takes writes again: the outage as two alerts (none could be written during it)."""
        if self._redis_down_since is None:
            return
        since = self._redis_down_since or time.time()
        seconds = time.time() - since
        url = redis_url(self.redis)
        values = {"redis": url, "since": _hms(since), "outage_s": f"{seconds:.1f}", "error": self._redis_down_error,
                  "consumer": self.name}
        await self.alert(
            "bus.redis_unavailable", "error",
            f"Redis at {url} was unreachable for consumer {self.name} from {_hms(since)} ({self._redis_down_error});"
            f" it waited, nothing was acknowledged meanwhile", values)
        await self.alert("bus.redis_recovered", "info",
                         f"Redis at {url} is back for consumer {self.name} after {seconds:.1f} s; carrying on",
                         values)
        log.info("consumer %s: Redis at %s is back after %.1f s", self.name, url, seconds)
        self._redis_down_since = None
        self.stats.state, self.stats.detail = "running", ""

    async def _loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            if self.handover is not None and self.handover() and await self._nothing_pending():
                # Between batches, nothing of ours in flight: whoever takes the lease next cannot read newer
                # entries of these streams before older ones left pending with us.
                self.handed_over = True
                log.info("consumer %s hands its streams over (%d)", self.name, len(self.streams))
                return
            await self.refresh_streams()
            if time.monotonic() - self._claimed_at >= self.settings.claim_idle_ms / 2000:
                self._claimed_at = time.monotonic()
                await self.reclaim()
            if not self.streams:
                await sleep_unless(stop, 0.5)
                continue
            resp = await self.redis.xreadgroup(self.group, self.name, {s: ">" for s in self.streams},
                                               count=self.settings.read_count, block=self.settings.block_ms)
            deliveries = self._deliveries(cast(XReadReply | None, resp))
            if deliveries:
                await self._handle(deliveries)

    async def _nothing_pending(self) -> bool:
        """True if no entry of our streams is pending with this consumer."""
        if not self.streams:
            return True
        pipe = self.redis.pipeline(transaction=False)
        for stream in self.streams:
            pipe.xpending_range(stream, self.group, min="-", max="+", count=1, consumername=self.name)
        return not any(await pipe.execute())

    # -- own pending entries after a restart ----------------------------------------------------------------

    async def _process_own_pending(self, names: list[str]) -> None:
        """Replay what is pending with this consumer name, one entry at a time: an entry that killed the
        process while a batch was handled then counts its deliveries alone, and its batch neighbours are not
        blamed with it. One delivered `max_deliveries` times already is dead-lettered; one trimmed meanwhile
        is reported (`bus.trimmed_while_pending`) and acknowledged."""
        for stream in names:
            cursor = "-"
            while not self._stop.is_set():
                page = await self.redis.xpending_range(stream, self.group, min=cursor, max="+",
                                                       count=self.settings.read_count, consumername=self.name)
                if not page:
                    break
                for p in page:
                    if self._stop.is_set():
                        return
                    entry_id, delivered = _s(cast(bytes, p["message_id"])), int(p["times_delivered"])
                    cursor = "(" + entry_id
                    await self._replay_one(stream, entry_id, delivered)

    async def _replay_one(self, stream: str, entry_id: str, delivered: int) -> None:
        if delivered >= self.settings.max_deliveries:
            found = cast(StreamEntries, await self.redis.xrange(stream, min=entry_id, max=entry_id, count=1))
            if not found:
                await self._trimmed(stream, entry_id)
                return
            reason = self._errors.pop(entry_id, "") or ("its handling never finished: the process died or "
                                                        "failed each time (see the consumer's log)")
            await self.dead_letter(stream, entry_id, f"delivered {delivered} times without success: {reason}",
                                   found[0][1])
            return
        # XREADGROUP from just below the entry re-delivers exactly it (counting the delivery).
        resp = cast(XReadReply, await self.redis.xreadgroup(self.group, self.name, {stream: _before(entry_id)},
                                                            count=1))
        for _, entries in (resp.items() if isinstance(resp, dict) else resp or []):
            for eid, fields in entries:
                if _s(eid) != entry_id:
                    continue
                if not fields:
                    await self._trimmed(stream, entry_id)
                else:
                    await self._handle([self._decode(stream, entry_id, fields)])

    async def _trimmed(self, stream: str, entry_id: str) -> None:
        await self._report_trimmed(stream, entry_id)
        await self.redis.xack(stream, self.group, entry_id)

    # -- decoding ------------------------------------------------------------------------------------------

    def _deliveries(self, resp: XReadReply | None) -> list[Delivery]:
        out: list[Delivery] = []
        if not resp:
            return out
        items = resp.items() if isinstance(resp, dict) else resp
        for stream_name, entries in items:
            stream = _s(stream_name)
            for entry_id, fields in entries:
                out.append(self._decode(stream, _s(entry_id), fields))
        return out

    def _decode(self, stream: str, entry_id: str, fields: dict[bytes, bytes] | None) -> Delivery:
        if not fields:
            return Delivery(stream, entry_id, events=[])
        try:
            return Delivery(stream, entry_id, self.codec.decode_entry(fields))
        except DecodeError as exc:
            self._errors[entry_id] = str(exc)
            # None marks the entry undecodable: _handle sets it apart (poison) before a handler sees the batch.
            return Delivery(stream, entry_id, events=None)  # type: ignore[arg-type]

    # -- handling a batch ----------------------------------------------------------------------------------

    async def _handle(self, deliveries: list[Delivery]) -> None:
        self.stats.delivered += len(deliveries)
        poison = [d for d in deliveries if d.events is None]
        for d in poison:
            await self.dead_letter(d.stream, d.entry_id, self._errors.pop(d.entry_id, "undecodable entry"))
        good = [d for d in deliveries if d.events is not None]
        if not good:
            return
        backoff = Backoff(0.5, STORE_RETRY_MAX_S)
        # Keeps the entries ours during all handling (a slow batch, a store retried in place): without it a
        # sibling's XAUTOCLAIM would take them over after claim_idle_ms and process them a second time.
        hold: asyncio.Task[None] | None = None
        handled = asyncio.Event()  # ends the hold even if its cancellation is lost (common/tasks.py)

        def start_hold() -> None:
            nonlocal hold
            hold = asyncio.create_task(self._hold(good, handled), name=f"{self.name}-hold")

        timer = asyncio.get_running_loop().call_later(self.settings.claim_idle_ms / 3000, start_hold)
        try:
            while True:
                started = time.perf_counter()
                try:
                    outputs = await self._handler(good)
                    if not await self._commit(good, outputs or {}):
                        return
                    if self.on_acked is not None:
                        self.on_acked(good)
                    self._record(good, time.perf_counter() - started)
                    if self._store_down is not None:
                        await self._store_recovered()
                    if self.stats.state == "degraded" and self._redis_down_since is None:
                        self.stats.state, self.stats.detail = "running", ""
                    return
                except LeaseLost:
                    raise  # another process holds the stage now: stop, nothing more is committed here
                except StoreUnavailable as exc:
                    self.stats.store_retries += 1
                    await self._store_unavailable(exc)
                    log.error("store unavailable, retrying %d entries in %.1f s (nothing acknowledged): %s",
                              len(good), backoff.delay, exc)
                    if await backoff.sleep(self._stop):
                        return  # stopping: entries stay pending and are redelivered after restart
                except REDIS_DOWN:
                    raise  # the bus's own Redis: the run loop waits for it; the entries stay pending with us
                except Exception as exc:
                    self.stats.failures += 1
                    self.stats.last_error = f"{type(exc).__name__}: {exc}"
                    if len(good) == 1:
                        d = good[0]
                        self._errors[d.entry_id] = f"{type(exc).__name__}: {exc}"
                        log.exception("entry %s of %s failed; left pending for redelivery (%d events)",
                                      d.entry_id, d.stream, len(d.events))
                        return
                    log.warning("batch of %d entries failed (%s); retrying entry by entry", len(good), exc)
                    for d in good:
                        await self._handle([d])
                    return
        finally:
            timer.cancel()
            handled.set()
            if hold is not None:
                hold.cancel()

    async def _hold(self, deliveries: list[Delivery], handled: asyncio.Event) -> None:
        """Claim the batch's entries for this consumer again every third of `claim_idle_ms` until `handled`:
        they are not abandoned but busy. (A hold that ran on would keep entries from whoever takes the
        partition or the stage over: XAUTOCLAIM never finds them idle.)"""
        by_stream: dict[str, list[StreamIdT]] = {}
        for d in deliveries:
            by_stream.setdefault(d.stream, []).append(d.entry_id)
        while not handled.is_set():
            for stream, ids in by_stream.items():
                try:
                    await self.redis.xclaim(stream, self.group, self.name, 0, ids, justid=True)
                except (RedisError, OSError) as exc:
                    log.warning("could not renew this consumer's claim on %d entries of %s (%s); after "
                                "claim_idle_ms another consumer may take them over", len(ids), stream, exc)
            await sleep_unless(handled, self.settings.claim_idle_ms / 3000, EXACT)

    async def _store_unavailable(self, exc: StoreUnavailable) -> None:
        """State "degraded" naming the store and the error; one `store.unavailable` alert per outage (across
        the group's consumers: the first to set the outage key says it)."""
        store = exc.store
        first = self._store_down is None
        if self._store_down is None:
            self._store_down = (store, time.time())
        store, since = self._store_down
        self.stats.state = "degraded"
        self.stats.last_error = str(exc)
        self.stats.detail = f"{store} unavailable since {_hms(since)}: {exc}"
        if not first:
            return
        try:
            if not await self.redis.set(streams.outage_key(self.group, store), str(int(since * 1e9)), nx=True):
                return  # a sibling consumer already said it
            reason = (f"{store} is unavailable for {self.group} since {_hms(since)}: {exc}. Nothing is lost: the "
                      f"batch is retried with backoff up to 30 s, entries stay pending and backpressure reaches "
                      f"the producers. Fix: start or repair {store} (address and credentials in the config)")
            await self.alert("store.unavailable", "critical", reason,
                             {"store": store, "since": _hms(since), "error": str(exc), "consumer": self.name})
        except REDIS_DOWN as redis_exc:  # the store that is down may be this Redis (cache_publisher)
            log.warning("store.unavailable alert not written (Redis: %s); the log says it", redis_exc)

    async def _store_recovered(self) -> None:
        assert self._store_down is not None
        store, since = self._store_down
        self._store_down = None
        seconds = time.time() - since
        log.info("%s is back for %s after %.1f s", store, self.name, seconds)
        raw = await self.redis.getdel(streams.outage_key(self.group, store))
        if raw is None:
            return  # a sibling consumer already said it
        since = int(raw) / 1e9 if raw.isdigit() else since
        seconds = time.time() - since
        await self.alert("store.recovered", "info",
                         f"{store} is back for {self.group} after {seconds:.1f} s (down since {_hms(since)}); the "
                         f"retried batches are written",
                         {"store": store, "since": _hms(since), "outage_s": f"{seconds:.1f}"})

    def _record(self, good: list[Delivery], seconds: float) -> None:
        self.stats.acked += len(good)
        self.stats.events += sum(len(d.events) for d in good)
        for d in good:
            self._errors.pop(d.entry_id, None)

    # -- committing ----------------------------------------------------------------------------------------

    async def _commit(self, good: list[Delivery], outputs: Outputs) -> bool:
        """Publish the outputs and acknowledge the batch (one MULTI/EXEC). If the connection drops meanwhile,
        wait for Redis and ask it (XPENDING) whether the EXEC ran: if the entries are no longer pending it
        did, and nothing is published again. True if committed, False if a sibling has taken the batch."""
        acks: dict[str, list[str]] = {}
        for d in good:
            acks.setdefault(d.stream, []).append(d.entry_id)
        try:
            await self._ack(acks, good, outputs)
            return True
        except REDIS_DOWN as exc:
            # Not yet an outage: a pooled connection that died with a Redis restart fails once like this.
            log.warning("consumer %s: connection lost while committing %d entries (%s); checking whether the "
                        "commit ran before trying again", self.name, len(good), exc)
        backoff = Backoff(0.2, REDIS_RETRY_MAX_S)
        while True:
            try:
                where = await self._pending_where(acks)
                await self._redis_recovered()
                if where == "committed":
                    log.info("consumer %s: the commit of %d entries had run (its reply was lost); not "
                             "publishing again", self.name, len(good))
                    return True
                if where == "taken":
                    log.warning("consumer %s: %d entries were taken over by a sibling during the outage; "
                                "leaving them to it", self.name, len(good))
                    return False
                await self._ack(acks, good, outputs)
                return True
            except REDIS_DOWN as exc:
                self._redis_down(exc)
            if await backoff.sleep(self._stop):
                raise RedisConnectionError(f"stopping while Redis at {redis_url(self.redis)} is unreachable; "
                                           f"the batch stays pending and is replayed at restart")

    async def _pending_where(self, acks: dict[str, list[str]]) -> str:
        """"committed" if none of the batch's entries is pending any more (the MULTI/EXEC is atomic), "ours" if
        they are pending with this consumer, "taken" if with another."""
        try:
            for stream, ids in acks.items():
                rows = await self.redis.xpending_range(stream, self.group, min=ids[0], max=ids[-1],
                                                       count=len(ids) + 1000, consumername=self.name)
                if set(ids) & {_s(cast(bytes, r["message_id"])) for r in rows}:
                    return "ours"
            pipe = self.redis.pipeline(transaction=False)
            for stream, ids in acks.items():
                for entry_id in ids:
                    pipe.xpending_range(stream, self.group, min=entry_id, max=entry_id, count=1)
            return "taken" if any(await pipe.execute()) else "committed"
        except ResponseError as exc:
            if "NOGROUP" in str(exc):
                return "committed"  # the group is gone with Redis's data: nothing is pending any more
            raise

    async def _ack(self, acks: dict[str, list[str]], good: list[Delivery], outputs: Outputs) -> None:
        commands: list[Command] = [("XACK", stream, self.group, *ids) for stream, ids in acks.items() if ids]
        if self.on_commit is not None:
            commands.extend(self.on_commit(good))
        if self.tag is not None:
            outputs = {streams.tagged(stream, self.tag): events for stream, events in outputs.items()}
        if self.producer is not None:
            await self.producer.commit(outputs, commands, self.lease)
            return
        if outputs:
            raise RuntimeError(f"consumer {self.name} got outputs but has no producer to publish them")
        await self.tx.run(commands, self.lease)

    # -- takeover and dead letters -------------------------------------------------------------------------

    async def reclaim(self) -> None:
        """Take over entries idle longer than claim_idle_ms (a crashed consumer's, or our own failures)."""
        for stream in self.streams:
            start = "0-0"
            while True:
                resp = await self.redis.xautoclaim(stream, self.group, self.name,
                                                   min_idle_time=self.settings.claim_idle_ms,
                                                   start_id=start, count=self.settings.read_count)
                start = _s(resp[0])
                claimed = resp[1]
                deleted = resp[2] if len(resp) > 2 else []
                for entry_id in deleted:
                    await self._report_trimmed(stream, _s(entry_id))
                if claimed:
                    self.stats.claimed += len(claimed)
                    await self._handle_claimed(stream, claimed)
                if start == "0-0" or self._stop.is_set():
                    break

    async def _handle_claimed(self, stream: str, claimed: list[tuple[bytes | str, dict[bytes, bytes]]]) -> None:
        ids = [_s(eid) for eid, _ in claimed]
        counts: dict[str, int] = {}
        for p in await self.redis.xpending_range(stream, self.group, min=ids[0], max=ids[-1],
                                                 count=len(ids) + 1000, consumername=self.name):
            counts[_s(cast(bytes, p["message_id"]))] = int(p["times_delivered"])
        ready: list[Delivery] = []
        for entry_id, fields in claimed:
            entry_id = _s(entry_id)
            if counts.get(entry_id, 0) > self.settings.max_deliveries:
                reason = self._errors.pop(entry_id, "") or "handler failed on every delivery (reason not kept "\
                    "across restarts; see the consumer's log)"
                await self.dead_letter(stream, entry_id,
                                       f"delivered {counts[entry_id]} times without success: {reason}", fields)
            else:
                ready.append(self._decode(stream, entry_id, fields))
        if ready:
            log.info("took over %d pending entries of %s", len(ready), stream)
            await self._handle(ready)

    async def _report_trimmed(self, stream: str, entry_id: str) -> None:
        reason = (f"entry {entry_id} of {stream} was trimmed while pending with group {self.group}: "
                  f"its events are lost; raise bus.stream_maxlen or scale the consumer")
        log.error("%s", reason)
        await self.alert("bus.trimmed_while_pending", "critical", reason, {"stream": stream, "entry_id": entry_id})

    async def dead_letter(self, stream: str, entry_id: str, reason: str,
                          fields: dict[bytes, bytes] | None = None) -> None:
        if fields is None:
            found = cast(StreamEntries, await self.redis.xrange(stream, min=entry_id, max=entry_id, count=1))
            fields = found[0][1] if found else {}
        letter: dict[bytes | str, bytes | str] = {
            "stream": stream, "entry_id": entry_id, "group": self.group, "consumer": self.name,
            "reason": reason, "ts": str(now_ns()),
        }
        for k, v in (fields or {}).items():
            letter[b"orig_" + (k if isinstance(k, bytes) else k.encode())] = v
        # One MULTI/EXEC through the bus's commits (sent once; on a cluster dlq:{stream} has the stream's tag).
        await self.tx.run([("XADD", streams.dead_letter(stream), "MAXLEN", "~", self.settings.dead_letter_maxlen, "*",
                            *(x for kv in letter.items() for x in kv)),
                           ("XACK", stream, self.group, entry_id)])
        self.stats.dead_lettered += 1
        log.error("dead-lettered entry %s of %s (group %s): %s", entry_id, stream, self.group, reason)


def _before(entry_id: str) -> str:
    """The stream id just below `entry_id` (XREADGROUP returns ids greater than the one given)."""
    ms, _, seq = entry_id.partition("-")
    if int(seq or 0) > 0:
        return f"{ms}-{int(seq) - 1}"
    return f"{int(ms) - 1}-18446744073709551615" if int(ms) > 0 else "0-0"


def _hms(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
