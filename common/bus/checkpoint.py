"""Per-series state of a stateful stage (the validator's stream rules, the aggregator's bars), staged per batch
and checkpointed in Redis in the same MULTI/EXEC as the batch's outputs and acknowledgements.

`SeriesBook` holds every series' state in memory, least recently used first, at most `max_series` of them.
A batch works on a `Staging` (a private copy of each series it touches); the bus's `on_commit` hook adds
`Checkpoint.write(staging)` to the batch's MULTI/EXEC (HSET of each touched series, HDEL of the series
the commit evicts), and its `on_acked` hook then makes the staged copies the book's (`Staging.commit()`).
So state, outputs and acknowledgements are durable together or not at all: a batch whose commit fails is
judged again against the same state, and a new process (a restart, or a standby that took the lease over)
continues from exactly the state of the last committed batch.

The checkpoint is one Redis hash per stage, `mdp:state:{stage}`: field = the series key as text
(`exchange|symbol|kind|timeframe`), value = the msgpack-encoded state (msgspec, dataclasses as arrays of their
fields). It is bounded like the book: a series evicted from memory is deleted from the hash in the same
commit (so at most `max_series` fields). Loading is lazy: before a batch is judged, `Checkpoint.load()` reads
(one HMGET) the series of the batch that are not in memory yet. A value that cannot be decoded (a state layout
changed by an upgrade) is logged with the series and the error, counted in `undecodable`, and that series
starts afresh.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, cast, get_origin

import msgspec
import redis.asyncio as aioredis

from common.bus.lease import Lease
from common.bus.resp import Command
from common.config import BusSettings
from common.domain.state import SeriesBook, SeriesKey, Staging, field_of

log = logging.getLogger(__name__)

def state_key(stage: str) -> str:
    """The Redis hash holding a stage's checkpoint."""
    return f"mdp:state:{stage}"


def _enc_hook(obj: object) -> object:
    if isinstance(obj, deque):
        return list(obj)
    raise NotImplementedError(f"cannot checkpoint a {type(obj).__name__}")


def _dec_hook(typ: type, obj: object) -> object:
    if (get_origin(typ) or typ) is deque:
        return deque(cast(Iterable[Any], obj))
    raise NotImplementedError(f"cannot restore a {typ} from a checkpoint")


class Checkpoint:
    """The durable copy of a stage's SeriesBook: `types` maps a series kind to its state class, `restore`
    (optional) fixes what the encoding does not keep (a deque's maxlen) after decoding."""

    def __init__(self, redis: aioredis.Redis, stage: str, types: dict[str, type],
                 restore: Callable[[SeriesKey, Any], Any] | None = None) -> None:
        self.redis = redis
        self.key = state_key(stage)
        self.encoder = msgspec.msgpack.Encoder(enc_hook=_enc_hook)
        self.decoders: dict[str, msgspec.msgpack.Decoder[Any]] = {
            kind: msgspec.msgpack.Decoder(t, dec_hook=_dec_hook) for kind, t in types.items()}
        self.restore = restore
        self.loaded = 0
        self.undecodable = 0

    async def load(self, book: SeriesBook, keys: Iterable[SeriesKey]) -> None:
        """Bring the checkpointed state of `keys` not in memory into the book (absent ones stay absent)."""
        missing = [k for k in keys if k not in book.series]
        if not missing:
            return
        # bytes: the bus client is built with decode_responses=False.
        values = cast(list[bytes | None], await self.redis.hmget(self.key, [field_of(k) for k in missing]))
        for key, raw in zip(missing, values, strict=True):
            if raw is None:
                continue
            try:
                state = self.decoders[key[2]].decode(raw)
            except (msgspec.DecodeError, KeyError, NotImplementedError, TypeError, ValueError) as exc:
                self.undecodable += 1
                log.error("checkpoint %s: series %s cannot be decoded (%s: %s); it starts afresh (a state "
                          "layout changed by an upgrade?)", self.key, field_of(key), type(exc).__name__, exc)
                continue
            book.series[key] = self.restore(key, state) if self.restore is not None else state
            self.loaded += 1

    def write(self, staging: Staging) -> list[Command]:
        """The batch's state, as commands for its MULTI/EXEC: every touched series, minus the ones the commit
        evicts."""
        evict = staging.evictions()
        gone = set(evict)
        commands: list[Command] = []
        fields = [x for k, v in staging.touched.items() if k not in gone for x in (field_of(k), self.encoder.encode(v))]
        if fields:
            commands.append(("HSET", self.key, *fields))
        if evict:
            commands.append(("HDEL", self.key, *[field_of(k) for k in evict]))
        return commands


class SeriesState:
    """A stateful stage's per-series state: the SeriesBook in memory (at most `max_series` series), its
    Checkpoint in Redis, and the Staging of the batch in hand. `begin` gives a batch its staging, `hold` keeps
    it for the commit, `write` (the consumer's on_commit) puts it in the batch's MULTI/EXEC, `committed` (the
    consumer's on_acked) makes it the memory's. A batch that began while one is still held (its commit failed,
    or its outcome is unknown) drops the memory first: it is judged against what Redis holds."""

    def __init__(self, redis: aioredis.Redis, stage: str, types: dict[str, type], max_series: int,
                 restore: Callable[[SeriesKey, Any], Any] | None = None) -> None:
        self.book = SeriesBook(max_series)
        self.checkpoint = Checkpoint(redis, stage, types, restore)
        self._held: Staging | None = None

    async def begin(self, keys: Iterable[SeriesKey]) -> Staging:
        if self._held is not None:  # the last batch's commit failed, or its outcome is unknown
            self._held = None
            self.book.forget()  # reloaded from the checkpoint below, as Redis holds it
        await self.checkpoint.load(self.book, keys)
        return self.book.stage()

    def hold(self, staging: Staging) -> None:
        self._held = staging

    def write(self, batch: object) -> list[Command]:
        return self.checkpoint.write(self._held) if self._held is not None else []

    def committed(self, batch: object) -> None:
        if self._held is not None:
            self._held.commit()
            self._held = None

    def counters(self, noun: str) -> dict[str, int]:
        """Series in memory (`{noun}`), evicted (`{noun}_evicted`), loaded from and undecodable in the checkpoint."""
        return {noun: len(self.book), f"{noun}_evicted": self.book.evicted, "series_loaded": self.checkpoint.loaded,
                "checkpoint_undecodable": self.checkpoint.undecodable}


LEASE_TTL_MIN_MS = 1_000


def stage_lease(redis: aioredis.Redis, stage: str, owner: str, bus: BusSettings) -> Lease:
    """The single-instance guard of a stateful stage: lease `mdp:lease:{stage}`, ttl 1.5 x bus.claim_idle_ms
    (22.5 s by default). A standby takes over at most a ttl after the holder's last renewal, by when the
    entries the holder left pending have been idle at least claim_idle_ms (it renewed every ttl/3), so the
    new holder's first XAUTOCLAIM takes them over before it reads anything newer: the order is kept."""
    return Lease(redis, f"mdp:lease:{stage}", owner, ttl_ms=max(LEASE_TTL_MIN_MS, bus.claim_idle_ms * 3 // 2))
