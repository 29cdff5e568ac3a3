"""The message bus over Redis Streams.

Producing: `Producer.publish({stream: [events]})` packs up to `batch_max_events` events into one entry
(FACTS.md: ~25x the throughput of one entry per event), pipelines every XADD of the call into one round
trip, and trims each stream approximately at `stream_maxlen` entries. Backpressure keeps that trim
harmless: before publishing, the producer looks (at most every 0.5 s) at each consumer group of the
stream, and while some group has more than `backpressure_high_water` entries undelivered or pending it
waits. After `backpressure_max_wait_s` it publishes anyway and raises an alert, since a collector that
stops reading its socket loses data at the exchange instead. So data is only trimmed unread when a group
falls more than `stream_maxlen` entries behind after that alert.

Consuming: `Consumer.run(handler)` reads through a consumer group and acknowledges an entry only after
the handler returned, i.e. after its effect is durable. A handler may return output events: those are
published and the inputs acknowledged in one MULTI/EXEC transaction, so a stage that forwards never
doubles nor drops an entry. Entries a crashed consumer left pending are taken over with XAUTOCLAIM after
`claim_idle_ms`. A handler raising `StoreUnavailable` is retried in place with capped backoff (nothing is
acknowledged, nothing counts against the entry), and its entries stay claimed by this consumer meanwhile (XCLAIM
renewed every third of `claim_idle_ms`), so a sibling consumer never takes them over and processes them twice.
Any other failure is retried entry by entry; an entry
delivered `max_deliveries` times without success, or one that cannot be decoded, moves to
`dlq:{stream}` with the reason and is acknowledged.
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError, WatchError

from common import streams
from common.config import BusSettings
from common.lease import Lease, LeaseLost
from schemas import Alert, Codec, DecodeError, Event

log = logging.getLogger(__name__)


class StoreUnavailable(Exception):
    """A store (InfluxDB, PostgreSQL, Redis) cannot be reached: retry the same batch later, lose nothing."""


@dataclass(slots=True)
class Delivery:
    stream: str
    entry_id: str
    events: list[Event]


Outputs = dict[str, list[Event]]
Handler = Callable[[list[Delivery]], Awaitable[Outputs | None]]
# Adds commands to a publish's MULTI/EXEC (a collector's position, a stage's state checkpoint).
PipelineHook = Callable[[aioredis.client.Pipeline], None]
CommitHook = Callable[[aioredis.client.Pipeline, list[Delivery]], None]

COMMIT_WATCH_RETRIES = 5


async def commit(redis: aioredis.Redis, build: PipelineHook, lease: Lease | None = None) -> list[object]:
    """Run the commands `build` adds in one MULTI/EXEC. With a lease: WATCH its key and compare the owner
    before MULTI, so the EXEC aborts if the key changed; it is retried while the lease is still ours (our own
    renewal touches the key) and raises LeaseLost when it is not."""
    if lease is None:
        pipe = redis.pipeline(transaction=True)
        build(pipe)
        return await pipe.execute()  # type: ignore[no-any-return]
    async with redis.pipeline(transaction=True) as pipe:
        for _ in range(COMMIT_WATCH_RETRIES):
            try:
                await pipe.watch(lease.key)
                owner = await pipe.get(lease.key)
                if owner != lease.owner.encode():
                    holder = owner.decode() if owner else "nobody (expired)"
                    raise lease.lost(f"at commit the key names {holder}")
                pipe.multi()
                build(pipe)
                return await pipe.execute()  # type: ignore[no-any-return]
            except WatchError:
                await pipe.reset()
                continue
        raise lease.lost(f"the key changed during {COMMIT_WATCH_RETRIES} commits in a row")


def now_ns() -> int:
    return time.time_ns()


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class Producer:
    def __init__(self, redis: aioredis.Redis, codec: Codec, settings: BusSettings, source: str) -> None:
        self.redis = redis
        self.codec = codec
        self.settings = settings
        self.source = source
        self._registered: set[str] = set()
        self._checked_at: dict[str, float] = {}
        self.published_events = 0
        self.published_entries = 0
        self.backpressure_waits = 0

    def _xadd_all(self, pipe: aioredis.client.Pipeline, outputs: Outputs) -> int:
        entries = 0
        size = self.settings.batch_max_events
        for stream, events in outputs.items():
            if stream not in self._registered:
                pipe.sadd(streams.REGISTRY, stream)
            for i in range(0, len(events), size):
                pipe.xadd(stream, self.codec.entry(events[i:i + size]),  # type: ignore[arg-type]
                          maxlen=self.settings.stream_maxlen, approximate=True)
                entries += 1
        return entries

    def _count(self, outputs: Outputs, entries: int) -> None:
        self._registered.update(outputs)
        self.published_entries += entries
        self.published_events += sum(len(v) for v in outputs.values())

    async def publish(self, outputs: Outputs, *, extra: PipelineHook | None = None,
                      lease: Lease | None = None) -> None:
        """Publish outputs; with `extra`, its commands and the XADDs go in one MULTI/EXEC."""
        outputs = {s: ev for s, ev in outputs.items() if ev}
        if not outputs and extra is None:
            return
        if outputs:
            await self.wait_for_consumers(outputs.keys())
        if extra is None and lease is None:
            pipe = self.redis.pipeline(transaction=False)
            entries = self._xadd_all(pipe, outputs)
            await pipe.execute()
            self._count(outputs, entries)
            return
        counted: list[int] = []

        def build(pipe: aioredis.client.Pipeline) -> None:
            counted[:] = [self._xadd_all(pipe, outputs)]
            if extra is not None:
                extra(pipe)

        await commit(self.redis, build, lease)
        self._count(outputs, counted[0])

    async def publish_and_ack(self, outputs: Outputs, acks: dict[str, list[str]], group: str, *,
                              extra: PipelineHook | None = None, lease: Lease | None = None) -> None:
        """Publish outputs and acknowledge the inputs they came from, atomically; `extra` adds commands (a
        stage's state checkpoint) to the same MULTI/EXEC."""
        outputs = {s: ev for s, ev in outputs.items() if ev}
        if outputs:
            await self.wait_for_consumers(outputs.keys())
        counted: list[int] = []

        def build(pipe: aioredis.client.Pipeline) -> None:
            counted[:] = [self._xadd_all(pipe, outputs)]
            for stream, ids in acks.items():
                if ids:
                    pipe.xack(stream, group, *ids)
            if extra is not None:
                extra(pipe)

        await commit(self.redis, build, lease)
        self._count(outputs, counted[0])

    async def backlog(self, stream: str) -> int:
        """Entries some consumer group of `stream` has not finished: undelivered (lag) plus pending."""
        try:
            groups = await self.redis.xinfo_groups(stream)
        except ResponseError:
            return 0  # no such stream yet
        worst = 0
        for g in groups:
            lag = g.get("lag")
            pending = int(g.get("pending") or 0)
            worst = max(worst, int(lag or 0) + pending)
        return worst

    async def wait_for_consumers(self, names: Iterable[str]) -> None:
        now = time.monotonic()
        due = [s for s in names if now - self._checked_at.get(s, 0.0) >= 0.5]
        for stream in due:
            self._checked_at[stream] = now
            deadline = now + self.settings.backpressure_max_wait_s
            backlog = await self.backlog(stream)
            if backlog <= self.settings.backpressure_high_water:
                continue
            self.backpressure_waits += 1
            log.warning("backpressure: stream %s has %d entries unfinished by a consumer group (high water %d); "
                        "waiting up to %.0f s", stream, backlog, self.settings.backpressure_high_water,
                        self.settings.backpressure_max_wait_s)
            while backlog > self.settings.backpressure_high_water and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
                backlog = await self.backlog(stream)
            if backlog > self.settings.backpressure_high_water:
                reason = (f"consumers of {stream} are {backlog} entries behind after "
                          f"{self.settings.backpressure_max_wait_s:.0f} s; publishing anyway: entries beyond "
                          f"{self.settings.stream_maxlen} are trimmed unread. Start or scale the consumer.")
                log.error("%s", reason)
                alert = Alert(rule="bus.backpressure_timeout", severity="critical", source=self.source,
                              exchange="", symbol="", kind="stream", reason=reason,
                              values={"stream": stream, "backlog": str(backlog)},
                              ts_event=now_ns(), ts_recv=now_ns())
                await self.redis.xadd(streams.ALERTS, self.codec.entry([alert]),  # type: ignore[arg-type]
                                      maxlen=self.settings.stream_maxlen, approximate=True)


class StreamSelector:
    """The streams a consumer reads: fixed names and/or glob patterns over the stream registry."""

    def __init__(self, names: Iterable[str] = (), patterns: Iterable[str] = ()) -> None:
        self.names = list(names)
        self.patterns = list(patterns)

    async def resolve(self, redis: aioredis.Redis) -> list[str]:
        found = set(self.names)
        if self.patterns:
            for member in await redis.smembers(streams.REGISTRY):
                name = _s(member)
                if any(fnmatch.fnmatchcase(name, p) for p in self.patterns):
                    found.add(name)
        return sorted(found)


@dataclass
class ConsumerStats:
    delivered: int = 0
    acked: int = 0
    events: int = 0
    dead_lettered: int = 0
    claimed: int = 0
    failures: int = 0
    store_retries: int = 0
    last_error: str = ""
    state: str = "starting"
    batch_seconds: list[float] = field(default_factory=list)


class Consumer:
    def __init__(self, redis: aioredis.Redis, codec: Codec, settings: BusSettings, group: str, name: str,
                 selector: StreamSelector, producer: Producer | None = None, refresh_s: float = 2.0,
                 on_acked: Callable[[list[Delivery]], None] | None = None,
                 on_commit: CommitHook | None = None, lease: Lease | None = None) -> None:
        self.redis = redis
        self.codec = codec
        self.settings = settings
        self.group = group
        self.name = name
        self.selector = selector
        self.producer = producer
        self.refresh_s = refresh_s
        # Called after a batch's outputs are published and its entries acknowledged: where a stateful stage
        # commits the state it staged for the batch (so a failed publish leaves the state as it was).
        self.on_acked = on_acked
        # Called while the batch's MULTI is built, after its XADDs and XACKs: a stateful stage adds its state
        # checkpoint there, so state, outputs and acknowledgements commit together or not at all.
        self.on_commit = on_commit
        # With a lease, only its holder reads: acquired before anything is read, verified in every commit.
        self.lease = lease
        self.streams: list[str] = []
        self._refreshed_at = 0.0
        self._claimed_at = 0.0
        self._errors: dict[str, str] = {}
        self.stats = ConsumerStats()

    async def ensure_group(self, stream: str) -> None:
        try:
            # From the start of the stream: a group made after the producer started misses nothing.
            await self.redis.xgroup_create(stream, self.group, id="0", mkstream=True)
            log.info("created consumer group %s on %s", self.group, stream)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def refresh_streams(self, force: bool = False) -> None:
        if not force and time.monotonic() - self._refreshed_at < self.refresh_s:
            return
        self._refreshed_at = time.monotonic()
        names = await self.selector.resolve(self.redis)
        new = [s for s in names if s not in self.streams]
        for stream in new:
            await self.ensure_group(stream)
        if new:
            self.streams = names
            # Entries delivered to this consumer name before a restart are still pending with it.
            await self._process_own_pending(new)

    async def _process_own_pending(self, names: list[str]) -> None:
        for stream in names:
            cursor = "0"
            while not self._stop.is_set():
                resp = await self.redis.xreadgroup(self.group, self.name, {stream: cursor},
                                                   count=self.settings.read_count)
                deliveries = self._deliveries(resp)
                if not deliveries:
                    break
                cursor = deliveries[-1].entry_id
                await self._handle(deliveries)

    def _deliveries(self, resp: list | dict | None) -> list[Delivery]:  # type: ignore[type-arg]
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
            return Delivery(stream, entry_id, events=None)  # type: ignore[arg-type]

    async def run(self, handler: Handler, stop: asyncio.Event) -> None:
        self._stop = stop
        self._handler = handler
        if self.lease is not None:
            self.stats.state = "standby"
            if not await self.lease.acquire(stop):
                self.stats.state = "stopping"
                return
            renewal = asyncio.create_task(self.lease.run_renewal(stop), name=f"{self.name}-lease")
            work = asyncio.create_task(self._run_work(stop), name=f"{self.name}-work")
            try:
                done, _ = await asyncio.wait({renewal, work}, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()  # LeaseLost from the renewal, or the work's own failure
                if renewal in done and not work.done():
                    await work  # renewal ended because stop was set
            finally:
                for task in (renewal, work):
                    if not task.done():
                        task.cancel()
                        try:
                            await task
                        except (asyncio.CancelledError, LeaseLost):
                            pass
                if stop.is_set() and self.lease.held:
                    try:
                        await self.lease.release()
                    except (RedisError, OSError) as exc:
                        log.warning("lease %s not released at stop (%s); it expires after its ttl",
                                    self.lease.key, exc)
            self.stats.state = "stopping"
            return
        await self._run_work(stop)
        self.stats.state = "stopping"

    async def _run_work(self, stop: asyncio.Event) -> None:
        self.stats.state = "running"
        await self.refresh_streams(force=True)
        await self._loop(stop)

    async def _loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.refresh_streams()
            if time.monotonic() - self._claimed_at >= self.settings.claim_idle_ms / 2000:
                self._claimed_at = time.monotonic()
                await self.reclaim()
            if not self.streams:
                await sleep_unless(stop, 0.5)
                continue
            resp = await self.redis.xreadgroup(self.group, self.name, {s: ">" for s in self.streams},
                                               count=self.settings.read_count, block=self.settings.block_ms)
            deliveries = self._deliveries(resp)
            if deliveries:
                await self._handle(deliveries)

    async def _handle(self, deliveries: list[Delivery]) -> None:
        self.stats.delivered += len(deliveries)
        poison = [d for d in deliveries if d.events is None]
        for d in poison:
            await self.dead_letter(d.stream, d.entry_id, self._errors.pop(d.entry_id, "undecodable entry"))
        good = [d for d in deliveries if d.events is not None]
        if not good:
            return
        backoff = 0.5
        hold: asyncio.Task[None] | None = None  # keeps the entries ours while a store is down
        try:
            while True:
                started = time.perf_counter()
                try:
                    outputs = await self._handler(good)
                    await self._ack(good, outputs or {})
                    if self.on_acked is not None:
                        self.on_acked(good)
                    self._record(good, time.perf_counter() - started)
                    self.stats.state = "running"
                    return
                except LeaseLost:
                    raise  # another process holds the stage now: stop, nothing more is committed here
                except StoreUnavailable as exc:
                    self.stats.store_retries += 1
                    self.stats.state = "degraded"
                    self.stats.last_error = str(exc)
                    log.error("store unavailable, retrying %d entries in %.1f s (nothing acknowledged): %s",
                              len(good), backoff, exc)
                    if hold is None:
                        hold = asyncio.create_task(self._hold(good), name=f"{self.name}-hold")
                    if await sleep_unless(self._stop, backoff):
                        return  # stopping: entries stay pending and are redelivered after restart
                    backoff = min(backoff * 2, 30.0)
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
            if hold is not None:
                hold.cancel()

    async def _hold(self, deliveries: list[Delivery]) -> None:
        """While a batch is retried in place, claim its entries for this consumer again every third of
        `claim_idle_ms`: they are not abandoned but waiting for a store, and a sibling consumer's XAUTOCLAIM
        would otherwise take them over and process them a second time."""
        by_stream: dict[str, list[str]] = {}
        for d in deliveries:
            by_stream.setdefault(d.stream, []).append(d.entry_id)
        while True:
            await asyncio.sleep(self.settings.claim_idle_ms / 3000)
            for stream, ids in by_stream.items():
                try:
                    await self.redis.xclaim(stream, self.group, self.name, 0, ids, justid=True)
                except (RedisError, OSError) as exc:
                    log.warning("could not renew this consumer's claim on %d entries of %s (%s); after "
                                "claim_idle_ms another consumer may take them over", len(ids), stream, exc)

    def _record(self, good: list[Delivery], seconds: float) -> None:
        self.stats.acked += len(good)
        self.stats.events += sum(len(d.events) for d in good)
        for d in good:
            self._errors.pop(d.entry_id, None)

    async def _ack(self, good: list[Delivery], outputs: Outputs) -> None:
        acks: dict[str, list[str]] = {}
        for d in good:
            acks.setdefault(d.stream, []).append(d.entry_id)
        on_commit = self.on_commit
        extra: PipelineHook | None = None
        if on_commit is not None:
            def extra(pipe: aioredis.client.Pipeline) -> None:
                on_commit(pipe, good)
        if self.producer is not None:
            await self.producer.publish_and_ack(outputs, acks, self.group, extra=extra, lease=self.lease)
            return
        if outputs:
            raise RuntimeError(f"consumer {self.name} got outputs but has no producer to publish them")
        if extra is None and self.lease is None:
            pipe = self.redis.pipeline(transaction=False)
            for stream, ids in acks.items():
                pipe.xack(stream, self.group, *ids)
            await pipe.execute()
            return

        def build(pipe: aioredis.client.Pipeline) -> None:
            for stream, ids in acks.items():
                pipe.xack(stream, self.group, *ids)
            if extra is not None:
                extra(pipe)

        await commit(self.redis, build, self.lease)

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

    async def _handle_claimed(self, stream: str, claimed: list) -> None:  # type: ignore[type-arg]
        ids = [_s(eid) for eid, _ in claimed]
        counts: dict[str, int] = {}
        for p in await self.redis.xpending_range(stream, self.group, min=ids[0], max=ids[-1],
                                                 count=len(ids) + 1000, consumername=self.name):
            counts[_s(p["message_id"])] = int(p["times_delivered"])
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
        alert = Alert(rule="bus.trimmed_while_pending", severity="critical", source=self.group, exchange="",
                      symbol="", kind="stream", reason=reason, values={"stream": stream, "entry_id": entry_id},
                      ts_event=now_ns(), ts_recv=now_ns())
        await self.redis.xadd(streams.ALERTS, self.codec.entry([alert]),  # type: ignore[arg-type]
                              maxlen=self.settings.stream_maxlen, approximate=True)

    async def dead_letter(self, stream: str, entry_id: str, reason: str,
                          fields: dict[bytes, bytes] | None = None) -> None:
        if fields is None:
            found = await self.redis.xrange(stream, min=entry_id, max=entry_id, count=1)
            fields = found[0][1] if found else {}
        letter: dict[bytes | str, bytes | str] = {
            "stream": stream, "entry_id": entry_id, "group": self.group, "consumer": self.name,
            "reason": reason, "ts": str(now_ns()),
        }
        for k, v in (fields or {}).items():
            letter[b"orig_" + (k if isinstance(k, bytes) else k.encode())] = v
        pipe = self.redis.pipeline(transaction=True)
        pipe.xadd(streams.dead_letter(stream), letter, maxlen=self.settings.dead_letter_maxlen,  # type: ignore[arg-type]
                  approximate=True)
        pipe.xack(stream, self.group, entry_id)
        await pipe.execute()
        self.stats.dead_lettered += 1
        log.error("dead-lettered entry %s of %s (group %s): %s", entry_id, stream, self.group, reason)


async def sleep_unless(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep about `seconds` (+-20% jitter, so retrying processes spread out); True if `stop` was set meanwhile."""
    try:
        await asyncio.wait_for(stop.wait(), timeout=seconds * (0.8 + 0.4 * random.random()))
        return True
    except TimeoutError:
        return False
