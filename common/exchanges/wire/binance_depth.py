"""Binance depth diffs (spot `<symbol>@depth@100ms`, USD-M `<symbol>@depth@...`) decoded once with msgspec, and the
order book they maintain under the same sequencing rules ccxt.pro 4.5.90 applies (ccxt/pro/binance.py:
handle_order_book, fetch_order_book_snapshot, handle_order_book_message): the collector's decode fast path for
books (services/collector/fast_book.py, docs/collector.md "Decode fast path: books").

The book holds what ccxt's holds, the same way: prices and amounts as the floats ccxt parses from the exchange's
text (msgspec parses them correctly rounded, like float()), keyed by price, so the top levels the collector
publishes (`dec` of each float, common/exchanges/events.py) are the very Decimals the ccxt path publishes. What is
cheaper: one typed decode per frame instead of json.loads plus ccxt's per-level safe_float/store calls, and a
side that touches its sorted price list only when a level appears or disappears (an amount change is one dict
write).

Rules (ccxt's, reproduced; `nonce` is the book's last applied update id, None while the snapshot is awaited):
- buffering (nonce None): every diff is kept for the snapshot;
- after the snapshot (`replay`): spot drops u <= nonce and applies a diff with U-1 <= nonce <= u-1; USD-M
  ('linear') drops u < nonce and applies one with U <= nonce <= u or pu == nonce; anything else is skipped silently;
- live (`step`), told apart by `pu`: spot drops u <= nonce; the first diff after a snapshot (book time still unset)
  must have U-1 <= nonce <= u-1, later ones U-1 == nonce; USD-M drops u < nonce, applies U <= nonce or
  pu == nonce; any other diff is a BREAK (ccxt raises ChecksumError and drops the book).
"""

from __future__ import annotations

import enum
from bisect import bisect_left, insort
from collections.abc import Iterable, Sequence
from typing import Any

import msgspec

__all__ = ["BookSide", "DepthBook", "DepthUpdate", "Step", "decode_depth", "replay", "step"]

Level = tuple[float, float]


class DepthUpdate(msgspec.Struct):
    """One `depthUpdate` event. Missing ids or sides are tolerated as ccxt tolerates them (a diff without U or u
    is ignored; a missing side is empty)."""

    s: str
    U: int | None = None
    u: int | None = None
    E: int | None = None
    pu: int | None = None  # USD-M only: the previous diff's u
    b: list[Level] = msgspec.field(default_factory=list)
    a: list[Level] = msgspec.field(default_factory=list)


class _Combined(msgspec.Struct):
    """A combined-stream frame (`/stream?streams=...`): the event under `data`."""

    data: DepthUpdate


# strict=False: the exchange prints prices and amounts as JSON strings; they are parsed straight into floats.
_raw = msgspec.json.Decoder(DepthUpdate, strict=False)
_combined = msgspec.json.Decoder(_Combined, strict=False)
_MARK = '"depthUpdate"'  # the event type, among a depth frame's first bytes (after the stream name if combined)
_MARK_WITHIN = 160


def decode_depth(frame: str | bytes) -> DepthUpdate | None:
    """The depth diff a WebSocket text frame carries (raw `/ws` or combined `/stream` form), or None for any other
    frame (a cheap test of its first bytes; a malformed depth frame raises msgspec.DecodeError)."""
    if isinstance(frame, bytes):
        frame = frame.decode()
    head = frame[:_MARK_WITHIN]
    if _MARK not in head:
        return None
    if '"stream"' in head[:16]:
        return _combined.decode(frame).data
    return _raw.decode(frame)


class BookSide:
    """One side of a book as ccxt's OrderBookSide keeps it (same floats, same store/delete and depth cut), read
    best first. `keys` is sorted ascending: prices for asks, negated prices for bids."""

    __slots__ = ("amounts", "depth", "keys", "sign")

    def __init__(self, bids: bool, depth: int) -> None:
        self.sign = -1.0 if bids else 1.0
        self.depth = depth
        self.keys: list[float] = []
        self.amounts: dict[float, float] = {}

    def store_all(self, levels: Iterable[Sequence[float]]) -> None:
        """ccxt's storeArray for each [price, amount]: a non-zero amount sets the level, zero removes it. One loop
        over the levels (no call per level): this is most of a diff's cost."""
        sign, keys, amounts = self.sign, self.keys, self.amounts
        for level in levels:
            key, amount = level[0] * sign, level[1]
            if amount:
                if key not in amounts:
                    insort(keys, key)
                amounts[key] = amount
            elif key in amounts:
                del amounts[key]
                del keys[bisect_left(keys, key)]

    def clear(self) -> None:
        self.keys.clear()
        self.amounts.clear()

    def limit(self) -> None:
        """ccxt's limit(): keep the best `depth` levels (it runs when a watch returns the book)."""
        keys = self.keys
        while len(keys) > self.depth:
            del self.amounts[keys.pop()]

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: slice) -> list[list[float]]:
        """Levels best first as [price, amount] (ccxt's shape), e.g. side[:20] for the published top."""
        sign, amounts = self.sign, self.amounts
        return [[k * sign, amounts[k]] for k in self.keys[index]]


class DepthBook:
    """The order book of one symbol, kept where and as ccxt keeps its own (`exchange.orderbooks[symbol]`), read
    by the collector through the same keys as ccxt's book: `nonce`, `timestamp`, `bids`, `asks`."""

    __slots__ = ("asks", "bids", "cache", "nonce", "symbol", "timestamp")

    def __init__(self, symbol: str, depth: int) -> None:
        self.symbol = symbol
        self.bids = BookSide(True, depth)
        self.asks = BookSide(False, depth)
        self.nonce: int | None = None
        self.timestamp: int | None = None
        self.cache: list[DepthUpdate] = []  # diffs received while the snapshot is awaited

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key, default) if key in self.__slots__ else default

    def __getitem__(self, key: str) -> Any:
        if key not in self.__slots__:
            raise KeyError(key)
        return getattr(self, key)

    def reset(self, snapshot: dict[str, Any]) -> None:
        """ccxt's OrderBook.reset: the REST snapshot as ccxt's fetch_order_book returns it (sorted [price, amount]
        floats, `nonce` = lastUpdateId, `timestamp` = the answer's time or None)."""
        self.bids.clear()
        self.bids.store_all(snapshot.get("bids") or [])
        self.asks.clear()
        self.asks.store_all(snapshot.get("asks") or [])
        self.nonce = snapshot.get("nonce")
        self.timestamp = snapshot.get("timestamp")

    def apply(self, d: DepthUpdate) -> None:
        """ccxt's handle_order_book_message: asks, then bids, then the book takes the diff's u and E."""
        self.asks.store_all(d.a)
        self.bids.store_all(d.b)
        self.nonce = d.u
        self.timestamp = d.E

    def limit(self) -> DepthBook:
        self.asks.limit()
        self.bids.limit()
        return self


class Step(enum.Enum):
    """What a live diff did to a synced book."""

    APPLIED = "applied"
    SKIPPED = "skipped"  # already covered (or ignored, as ccxt ignores it)
    BREAK = "break"  # the chain broke: ccxt raises ChecksumError, drops the book and resubscribes


def step(book: DepthBook, d: DepthUpdate) -> Step:
    """A diff arriving on a synced book (`book.nonce` set), ccxt's handle_order_book."""
    nonce, first, last = book.nonce, d.U, d.u
    if nonce is None or first is None or last is None:
        return Step.SKIPPED
    if d.pu is None:  # spot
        if last <= nonce:
            return Step.SKIPPED
        chained = (first - 1 <= nonce <= last - 1) if book.timestamp is None else (first - 1 == nonce)
    else:  # USD-M
        if last < nonce:
            return Step.SKIPPED
        chained = first <= nonce or d.pu == nonce
    if not chained:
        return Step.BREAK
    book.apply(d)
    return Step.APPLIED


def replay(book: DepthBook, cached: Sequence[DepthUpdate], linear: bool) -> None:
    """The diffs buffered before the snapshot, onto the freshly reset book (ccxt's fetch_order_book_snapshot):
    what the snapshot covers is dropped, what does not chain is skipped without a break."""
    for d in cached:
        first, last = d.U, d.u
        if first is None or last is None:
            continue
        nonce = book.nonce
        if nonce is None:  # every comparison with an unknown id fails; only a USD-M book takes a diff without pu
            if linear and d.pu is None:
                book.apply(d)
            continue
        if linear:
            if last < nonce:
                continue
            if (first <= nonce <= last) or d.pu == nonce:
                book.apply(d)
        else:
            if last <= nonce:
                continue
            if first - 1 <= nonce <= last - 1:
                book.apply(d)
