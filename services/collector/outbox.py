"""What the collector took from ccxt and has not published yet, bounded; and the position of each feed.

Feeds never wait for Redis: each wake-up's events go into the outbox as one `Batch`, and one publisher task
publishes whatever is queued in one MULTI/EXEC with the feeds' new positions (publisher.py). While Redis is
down the outbox fills; at `publish_buffer_events` the oldest batches are dropped, and what a feed lost that
way is kept as a `Dropped` window (first and last trade id, exchange times) that the collector publishes as
a Gap and an alert with the next batch that gets through. A batch is dropped whole, never split.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass, field

from common.domain.timeframe import MS
from schemas import Event

POSITION_PREFIX = "mdp:collector:pos:"  # hash per exchange, field "{channel}:{symbol}" -> Position (JSON)


def position_key(exchange: str) -> str:
    return f"{POSITION_PREFIX}{exchange}"


def position_field(channel: str, symbol: str) -> str:
    return f"{channel}:{symbol}"


@dataclass(frozen=True, slots=True)
class Position:
    """The newest event of a feed that was published: exchange time (ns), trade id (trades), receipt time."""

    ts_event: int
    trade_id: str = ""
    ts_recv: int = 0

    def encode(self) -> str:
        return json.dumps({"ts_event": self.ts_event, "trade_id": self.trade_id, "ts_recv": self.ts_recv})

    @classmethod
    def decode(cls, raw: bytes | str) -> Position:
        """A stored position; ValueError naming the value if it is not one (a foreign writer of the key)."""
        try:
            d = json.loads(raw)
            return cls(int(d["ts_event"]), str(d.get("trade_id") or ""), int(d.get("ts_recv") or 0))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"collector position {raw!r} is not JSON with ts_event, trade_id, ts_recv "
                             f"({exc}); delete the field from {POSITION_PREFIX}* and restart") from None


@dataclass(slots=True)
class Batch:
    """What one wake-up of one feed took from ccxt: published together, or dropped together."""

    symbol: str
    channel: str  # "" for events of no feed (the market catalog, alerts)
    events: list[Event]
    gaps: list[Event] = field(default_factory=list)  # Gaps that go with it: never dropped
    trade_ids: list[str] = field(default_factory=list)
    position: Position | None = None
    seq: int = 0  # per feed, set by Outbox.put: which dropped batches were next to each other


@dataclass(slots=True)
class Dropped:
    """A run of consecutive batches of one feed dropped at the outbox's bound: published as one Gap."""

    symbol: str
    channel: str
    events: int
    first_ns: int
    last_ns: int
    first_id: str
    last_id: str
    first_seq: int
    last_seq: int


class Outbox:
    """A FIFO of batches holding at most `limit` events (in flight aside; Gaps and drop records aside: a
    few per feed). At the bound the oldest queued batches are dropped and recorded as `Dropped` runs."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.queued: deque[Batch] = deque()
        self.events = 0  # events queued (not in flight)
        self.notices: list[Event] = []  # Gaps of dropped batches: published with the next batch
        self.dropped: list[Dropped] = []  # runs not yet published as Gaps
        self.dropped_events = 0
        # (symbol, trade id, exchange time ms) of dropped trades: the caller settles them (never taken again)
        self.dropped_trades: list[tuple[str, str, int]] = []
        self._seq: dict[tuple[str, str], int] = {}

    def __len__(self) -> int:
        return len(self.queued)

    def put(self, batch: Batch) -> None:
        key = (batch.symbol, batch.channel)
        batch.seq = self._seq[key] = self._seq.get(key, 0) + 1
        self.queued.append(batch)
        self.events += len(batch.events)
        self._bound()

    def _bound(self) -> None:
        while self.events > self.limit and self.queued:
            self._drop(self.queued.popleft())

    def _drop(self, batch: Batch) -> None:
        self.events -= len(batch.events)
        self.notices.extend(batch.gaps)
        if not batch.events:
            return
        self.dropped_events += len(batch.events)
        times = [int(getattr(e, "ts_event", 0)) for e in batch.events]
        self.dropped_trades.extend((batch.symbol, i, ts // MS) for i, ts in zip(batch.trade_ids, times, strict=False))
        first_id, last_id = (batch.trade_ids[0], batch.trade_ids[-1]) if batch.trade_ids else ("", "")
        for run in self.dropped:
            if (run.symbol, run.channel) != (batch.symbol, batch.channel):
                continue
            if batch.seq == run.last_seq + 1:
                run.last_seq, run.last_id = batch.seq, last_id
            elif batch.seq == run.first_seq - 1:  # a batch given back from a failed publish: older
                run.first_seq, run.first_id = batch.seq, first_id
            else:
                continue
            run.events += len(batch.events)
            run.first_ns, run.last_ns = min(run.first_ns, *times), max(run.last_ns, *times)
            return
        self.dropped.append(Dropped(batch.symbol, batch.channel, len(batch.events), min(times), max(times),
                                    first_id, last_id, batch.seq, batch.seq))

    def take(self, max_events: int) -> list[Batch]:
        """The oldest batches, up to `max_events` events (at least one batch), now in flight."""
        out: list[Batch] = []
        n = 0
        while self.queued and (not out or n + len(self.queued[0].events) <= max_events):
            batch = self.queued.popleft()
            n += len(batch.events)
            out.append(batch)
        self.events -= n
        return out

    def take_notices(self) -> tuple[list[Event], list[Dropped]]:
        """The Gaps and drop records to publish with the next batch (given back if that fails)."""
        notices, dropped = self.notices, self.dropped
        self.notices, self.dropped = [], []
        return notices, dropped

    def give_back(self, batches: list[Batch], notices: list[Event], dropped: list[Dropped]) -> None:
        """A failed publish: everything goes back to the front, oldest first (the first dropped at the bound)."""
        self.notices[:0] = notices
        self.dropped[:0] = dropped
        for batch in reversed(batches):
            self.queued.appendleft(batch)
            self.events += len(batch.events)
        self._bound()
