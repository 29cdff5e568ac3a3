"""What the collector remembers per symbol, so reconnects, restarts and REST polls never publish twice."""

from __future__ import annotations

from collections import deque
from typing import Any

from common.domain.timeframe import MS
from services.collector.outbox import Position


class SymbolState:
    """Per-symbol memory of what was published, so reconnects and REST polls never publish twice.

    A trade taken from ccxt is `taken` until its XADD succeeded (then it joins the published memory) or it was
    dropped at the outbox's bound (then a Gap names it): `new_trades` never hands it out twice meanwhile, and a
    failed publish retries the same trades from the outbox."""

    TRADE_ID_MEMORY = 10_000

    def __init__(self) -> None:
        self.forgotten_trade_ms = -1  # newest exchange time of a trade whose id fell out of the memory
        self.recent_trade_ids: dict[str, int] = {}  # published: id -> exchange time (ms)
        self._order: deque[str] = deque()  # the same ids, oldest first (O(1) eviction)
        self.taken: set[str] = set()  # taken from ccxt, not yet published (in the outbox or in flight)
        self.last_candle: list[Any] | None = None
        self.last_closed_open_ms = -1

    def __contains__(self, trade_id: object) -> bool:
        return trade_id in self.recent_trade_ids or trade_id in self.taken

    def new_trades(self, trades: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The trades neither published nor taken yet, by id; they are taken now. A trade older than the ids
        still remembered (the last TRADE_ID_MEMORY) counts as published: a resubscribe snapshot may re-send
        it. Exchange time is not otherwise a filter: a reordered message, or an exchange clock stepping back,
        must not drop trades."""
        fresh = []
        for t in trades:
            tid = str(t.get("id"))
            ts = t.get("timestamp") or 0
            if tid in self or ts < self.forgotten_trade_ms:
                continue
            fresh.append(t)
            self.taken.add(tid)
        return fresh

    def settle(self, trades: list[tuple[str, int]]) -> None:
        """(id, exchange time ms) of trades whose XADD succeeded, or that were dropped and named by a Gap."""
        for tid, ts in trades:
            self.taken.discard(tid)
            if tid not in self.recent_trade_ids:
                self.recent_trade_ids[tid] = ts
                self._order.append(tid)
        while len(self._order) > self.TRADE_ID_MEMORY:  # bounded
            oldest = self._order.popleft()
            self.forgotten_trade_ms = max(self.forgotten_trade_ms, self.recent_trade_ids.pop(oldest))

    def resume_after(self, position: Position) -> None:
        """A previous process published up to `position`: trades older than it are not published again."""
        self.forgotten_trade_ms = max(self.forgotten_trade_ms, position.ts_event // MS)
        if position.trade_id:
            self.settle([(position.trade_id, position.ts_event // MS)])
