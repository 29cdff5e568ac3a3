"""Per-series state of a stateful stage (the validator's stream rules, the aggregator's bars), staged per batch
and checkpointed in Redis in the same MULTI/EXEC as the batch's outputs and acknowledgements.

`SeriesBook` holds every series' state in memory, least recently used first, at most `max_series` of them.
A batch works on a `Staging` (a private copy of each series it touches); the bus's `on_commit` hook adds
`Checkpoint.write(pipe, staging)` to the batch's MULTI/EXEC (HSET of each touched series, HDEL of the series
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
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from typing import Any, Protocol, TypeVar, cast, get_origin

import msgspec
import redis.asyncio as aioredis

from common.config import BusSettings
from common.lease import Lease

log = logging.getLogger(__name__)

SeriesKey = tuple[str, str, str, str]  # (exchange, symbol, kind, timeframe)


class _Copyable(Protocol):
    def copy(self) -> Any: ...


S = TypeVar("S", bound=_Copyable)


def state_key(stage: str) -> str:
    """The Redis hash holding a stage's checkpoint."""
    return f"mdp:state:{stage}"


def field_of(key: SeriesKey) -> str:
    return "|".join(key)


def key_of(field: str) -> SeriesKey:
    exchange, rest = field.split("|", 1)
    symbol, kind, timeframe = rest.rsplit("|", 2)  # a symbol may hold '|', the other parts never do
    return exchange, symbol, kind, timeframe


class SeriesBook:
    """Every series' state, least recently used first, at most `max_series` of them."""

    def __init__(self, max_series: int) -> None:
        self.max_series = max(1, max_series)
        self.series: OrderedDict[SeriesKey, Any] = OrderedDict()
        self.evicted = 0

    def stage(self) -> Staging:
        return Staging(self)

    def forget(self) -> None:
        """Drop everything in memory (it is reloaded from the checkpoint series by series)."""
        self.series.clear()

    def __len__(self) -> int:
        return len(self.series)


class Staging:
    """The changes of one batch: a private copy of each series it touches, written back by `commit()`."""

    def __init__(self, book: SeriesBook) -> None:
        self.book = book
        self.touched: dict[SeriesKey, Any] = {}
        self._evictions: list[SeriesKey] | None = None

    def get(self, key: SeriesKey, new: Callable[[], S]) -> S:
        state = self.touched.get(key)
        if state is None:
            committed = self.book.series.get(key)
            state = self.touched[key] = committed.copy() if committed is not None else new()
        return state

    def evictions(self) -> list[SeriesKey]:
        """The series `commit()` will forget to stay within max_series (least recently used first); fixed on
        the first call, so the checkpoint deletes exactly what the commit evicts."""
        if self._evictions is None:
            series = self.book.series
            excess = len(series) + sum(1 for k in self.touched if k not in series) - self.book.max_series
            order = [k for k in series if k not in self.touched] + list(self.touched)
            self._evictions = order[:max(0, excess)]
        return self._evictions

    def commit(self) -> None:
        series = self.book.series
        evict = self.evictions()
        for key, state in self.touched.items():
            series[key] = state
            series.move_to_end(key)
        for key in evict:
            if series.pop(key, None) is not None:
                self.book.evicted += 1
        self.touched = {}
        self._evictions = None


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

    def write(self, pipe: aioredis.client.Pipeline, staging: Staging) -> None:
        """Add the batch's state to its MULTI/EXEC: every touched series, minus the ones the commit evicts."""
        evict = staging.evictions()
        gone = set(evict)
        mapping = {field_of(k): self.encoder.encode(v) for k, v in staging.touched.items() if k not in gone}
        if mapping:
            # redis-py types the mapping as an invariant dict[FieldT, EncodableT], refusing dict[str, bytes].
            pipe.hset(self.key, mapping=mapping)  # type: ignore[arg-type]
        if evict:
            pipe.hdel(self.key, *[field_of(k) for k in evict])


LEASE_TTL_MIN_MS = 1_000


def stage_lease(redis: aioredis.Redis, stage: str, owner: str, bus: BusSettings) -> Lease:
    """The single-instance guard of a stateful stage: lease `mdp:lease:{stage}`, ttl 1.5 x bus.claim_idle_ms
    (22.5 s by default). A standby takes over at most a ttl after the holder's last renewal, by when the
    entries the holder left pending have been idle at least claim_idle_ms (it renewed every ttl/3), so the
    new holder's first XAUTOCLAIM takes them over before it reads anything newer: the order is kept."""
    return Lease(redis, f"mdp:lease:{stage}", owner, ttl_ms=max(LEASE_TTL_MIN_MS, bus.claim_idle_ms * 3 // 2))
