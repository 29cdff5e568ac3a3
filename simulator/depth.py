"""Binance L2 order-book depth, shared by the spot simulator and the USD-M venue.

What is real: every diff (`depthUpdate`: spot `btcusdt@depth@100ms`, USD-M `btcusdt@depth@0ms`) and the one REST
depth snapshot (`lastUpdateId`, 1,000 levels a side) of the first capture file of a symbol, in ws-captures/.
In both captures the snapshot was taken AFTER the first diffs had arrived (spot: 3 diffs came before it and its
lastUpdateId+1 lies inside the 3rd; USD-M: 6 came before it, its lastUpdateId inside the 5th), so a correct client buffers diffs, fetches the snapshot, drops what it covers
and applies from the diff that straddles it (spot: U <= lastUpdateId+1 <= u; USD-M: U <= lastUpdateId <= u, then
each diff's `pu` equals the previous diff's `u`). The diffs chain without a break across the whole captures.

What the simulator derives, so that a client can (re)sync at ANY point of the replay, as on the exchange:
`DepthBook` keeps the exchange-side book: the recorded snapshot, plus every recorded diff the replay has passed
whose `u` lies after the snapshot's id. `GET depth` answers with the recorded snapshot itself while the replay has
not passed it (the real property above: the snapshot is ahead of the first diffs), and with that reconstructed
book (top `limit` levels, lastUpdateId = the last applied `u`) afterwards. A diff dropped by the `sequence_gap`
fault is still applied here (the exchange's book moved on; only the client missed it), so a resync recovers.
"""

from __future__ import annotations

import functools
import gzip
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

Level = tuple[str, str]  # (price, quantity) as the exchange prints them


class DepthFormatError(ValueError):
    """A depth line of a capture is not in the format this loader reads; the message names the file and line."""


class DepthDiff(msgspec.Struct, frozen=True):
    """One recorded `depthUpdate` event."""

    symbol: str
    first_id: int  # U
    final_id: int  # u
    prev_final_id: int | None  # pu (USD-M only)
    event_time: int  # E
    trans_time: int | None  # T (USD-M only)
    bids: tuple[Level, ...]
    asks: tuple[Level, ...]
    recv_ns: int

    def shifted(self, id_shift: int, time_shift_ms: int) -> DepthDiff:
        if not (id_shift or time_shift_ms):
            return self
        return msgspec.structs.replace(
            self, first_id=self.first_id + id_shift, final_id=self.final_id + id_shift,
            prev_final_id=None if self.prev_final_id is None else self.prev_final_id + id_shift,
            event_time=self.event_time + time_shift_ms,
            trans_time=None if self.trans_time is None else self.trans_time + time_shift_ms)

    def wire(self) -> dict[str, Any]:
        """The event as Binance sends it (spot or USD-M field set, in the recorded order)."""
        if self.prev_final_id is None:
            return {"e": "depthUpdate", "E": self.event_time, "s": self.symbol, "U": self.first_id,
                    "u": self.final_id, "b": [list(x) for x in self.bids], "a": [list(x) for x in self.asks]}
        return {"e": "depthUpdate", "E": self.event_time, "T": self.trans_time, "s": self.symbol,
                "U": self.first_id, "u": self.final_id, "pu": self.prev_final_id,
                "b": [list(x) for x in self.bids], "a": [list(x) for x in self.asks]}


class DepthSnapshot(msgspec.Struct, frozen=True):
    """The recorded REST depth snapshot (`E`/`T` only on USD-M)."""

    last_update_id: int
    bids: tuple[Level, ...]
    asks: tuple[Level, ...]
    recv_ns: int
    event_time: int | None = None
    trans_time: int | None = None


class _RawDiff(msgspec.Struct):
    e: str
    E: int
    s: str
    U: int
    u: int
    b: list[tuple[str, str]]
    a: list[tuple[str, str]]
    T: int | None = None
    pu: int | None = None


class _RawSnapshot(msgspec.Struct):
    lastUpdateId: int
    bids: list[tuple[str, str]]
    asks: list[tuple[str, str]]
    E: int | None = None
    T: int | None = None


class _Envelope(msgspec.Struct):
    stream: str
    data: msgspec.Raw


_envelope = msgspec.json.Decoder(_Envelope)
_raw_diff = msgspec.json.Decoder(_RawDiff)
_raw_snapshot = msgspec.json.Decoder(_RawSnapshot)


@functools.lru_cache(maxsize=16)
def read_depth(path: Path, mtime_ns: int) -> tuple[tuple[DepthDiff, ...], DepthSnapshot | None]:
    """The depth diffs (any `@depth...` stream) and the REST snapshot line of one capture file, in file order."""
    del mtime_ns  # part of the cache key only
    diffs: list[DepthDiff] = []
    snapshot: DepthSnapshot | None = None
    with gzip.open(path, "rb") as fh:
        for lineno, line in enumerate(fh, 1):
            ts, sep, payload = line.partition(b" ")
            if not sep or not ts.isdigit():
                raise DepthFormatError(f"{path}:{lineno}: expected '<receive ns> <json>', got {line[:80]!r}")
            if payload.startswith(b'{"lastUpdateId"'):
                raw = _raw_snapshot.decode(payload)
                snapshot = DepthSnapshot(raw.lastUpdateId, tuple(raw.bids), tuple(raw.asks), int(ts), raw.E, raw.T)
            elif b"@depth" in payload[:48]:
                d = _raw_diff.decode(_envelope.decode(payload).data)
                if d.e != "depthUpdate":
                    raise DepthFormatError(f"{path}:{lineno}: depth stream carries event {d.e!r}")
                diffs.append(DepthDiff(d.s, d.U, d.u, d.pu, d.E, d.T, tuple(d.b), tuple(d.a), int(ts)))
    return tuple(diffs), snapshot


def load_depth(files: list[Path]) -> tuple[list[DepthDiff], DepthSnapshot]:
    """A symbol's diffs across its consecutive capture files and its (first) snapshot; checks the id chain."""
    diffs: list[DepthDiff] = []
    snapshot: DepthSnapshot | None = None
    for path in files:
        part, snap = read_depth(path, path.stat().st_mtime_ns)
        diffs.extend(part)
        snapshot = snapshot or snap
    if snapshot is None or not diffs:
        raise DepthFormatError(f"no depth snapshot or diffs in {[str(f) for f in files]}")
    for prev, cur in itertools.pairwise(diffs):
        chained = cur.prev_final_id == prev.final_id if cur.prev_final_id is not None \
            else cur.first_id == prev.final_id + 1
        if not chained:
            raise DepthFormatError(f"{files[0].name}...: depth ids break between u={prev.final_id} and "
                                   f"U={cur.first_id} (pu={cur.prev_final_id}); the replay assumes one chain")
    return diffs, snapshot


def merge_diffs(diffs: list[DepthDiff]) -> DepthDiff:
    """Consecutive diffs as one (Binance's slower `@depth` stream): U of the first, u/pu/E/T of the last... and for
    each price the latest quantity. Applying it equals applying them one by one."""
    first, last = diffs[0], diffs[-1]
    bids: dict[str, str] = {}
    asks: dict[str, str] = {}
    for d in diffs:
        bids.update(d.bids)
        asks.update(d.asks)
    return msgspec.structs.replace(last, first_id=first.first_id, prev_final_id=first.prev_final_id,
                                   bids=tuple(bids.items()), asks=tuple(asks.items()))


def depth_weight(limit: int, futures: bool) -> int:
    """REST depth weight by limit: spot 5/25/50/250 (<=100, <=500, <=1000, <=5000); USD-M 2/5/10/20
    (<=50, 100, 500, 1000)."""
    if futures:
        return 2 if limit <= 50 else 5 if limit <= 100 else 10 if limit <= 500 else 20
    return 5 if limit <= 100 else 25 if limit <= 500 else 50 if limit <= 1000 else 250


SPOT_DEPTH_LIMITS = (5, 10, 20, 50, 100, 500, 1000, 5000)
USDM_DEPTH_LIMITS = (5, 10, 20, 50, 100, 500, 1000)


@dataclass
class DepthBook:
    """The exchange-side book of one symbol during a replay (see the module docstring)."""

    snapshot: DepthSnapshot
    id_shift: int = 0
    bids: dict[str, str] = field(default_factory=dict)
    asks: dict[str, str] = field(default_factory=dict)
    last_update_id: int = 0
    passed_snapshot: bool = False
    served: dict[str, int] = field(default_factory=lambda: {"recorded": 0, "replayed": 0})  # REST answers by source

    def __post_init__(self) -> None:
        self.reset(self.id_shift)

    def reset(self, id_shift: int) -> None:
        """Back to the recorded snapshot (a new replay or loop; loop k shifts ids by `id_shift`)."""
        self.id_shift = id_shift
        self.bids = dict(self.snapshot.bids)
        self.asks = dict(self.snapshot.asks)
        self.last_update_id = self.snapshot.last_update_id + id_shift
        self.passed_snapshot = False

    def apply(self, diff: DepthDiff) -> None:
        """A diff the replay has reached (already id-shifted): applied when it lies after the book's id."""
        if diff.final_id <= self.last_update_id:
            return
        self.passed_snapshot = True
        for side, levels in ((self.bids, diff.bids), (self.asks, diff.asks)):
            for price, qty in levels:
                if float(qty) == 0.0:
                    side.pop(price, None)
                else:
                    side[price] = qty
        self.last_update_id = diff.final_id

    def rest_body(self, limit: int, futures: bool, now_ms: int) -> dict[str, Any]:
        """The `GET depth` body: the recorded snapshot until the replay passes it, then the reconstructed book."""
        self.served["replayed" if self.passed_snapshot else "recorded"] += 1
        if not self.passed_snapshot:
            bids, asks = list(self.snapshot.bids[:limit]), list(self.snapshot.asks[:limit])
        else:
            bids = sorted(self.bids.items(), key=lambda lv: -float(lv[0]))[:limit]
            asks = sorted(self.asks.items(), key=lambda lv: float(lv[0]))[:limit]
        body: dict[str, Any] = {"lastUpdateId": self.last_update_id}
        if futures:
            body["E"] = now_ms
            body["T"] = now_ms
        body["bids"] = [list(x) for x in bids]
        body["asks"] = [list(x) for x in asks]
        return body
