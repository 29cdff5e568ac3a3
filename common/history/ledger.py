"""The coverage ledger (PostgreSQL table `coverage`, migration 0004): which time ranges of a series are
fetched-and-verified ('covered', by source rest / archive / live), which the source showed to be empty,
with the evidence, and which the exchange no longer serves at all ('unfetchable', migration 0005: history
older than an exchange's cap, with the cap as evidence). Everything else is a hole.

Why a ledger and not "the last stored candle": a backfill resumes from what was recorded, not from the newest
point in InfluxDB, so a page that failed in the middle of a run is fetched again instead of being skipped; and
a range where the exchange has no candles (an outage) is recorded as such, so it is neither fetched again and
again nor mistaken for a hole we never filled.

Rules, all applied in one transaction per `record()` under a per-series advisory lock (concurrent writers
of one series queue; different series do not block each other):
- covered ranges of one (series, source) are merged with the rows they overlap or touch;
- a covered range is cut out of every 'empty' row of the series (data that exists is not empty);
- an empty (or unfetchable) range is first cut down by what is covered (any source), then merged with the
  rows of its state and source it overlaps or touches; their evidence lists are joined (capped at
  `EVIDENCE_CAP` entries plus a {"more": n} count);
- a covered range is cut out of 'unfetchable' rows too (whatever is stored is not missing).
Record a range only after its candles are durable in InfluxDB: the ledger must never claim more than is
stored. It can still come to claim more (a new or wiped InfluxDB, a different one), so a backfill checks
covered spans against the store before it skips them (common/history/verify.py) and `forget_covered`
cuts what the store does not hold out of the covered rows. Re-recording what is recorded changes nothing but `updated_at`: writers are idempotent.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import asyncpg

from common.domain.span import Span, from_datetime, merge, subtract, to_datetime, total

Source = Literal["rest", "archive", "live"]
SOURCES: tuple[Source, ...] = ("rest", "archive", "live")
EVIDENCE_CAP = 8


@dataclass(frozen=True, slots=True, order=True)
class Series:
    exchange: str
    symbol: str
    timeframe: str

    def __str__(self) -> str:
        return f"{self.exchange} {self.symbol} {self.timeframe}"


@dataclass(frozen=True, slots=True)
class EmptyRange:
    span: Span
    source: str
    evidence: tuple[dict[str, Any], ...]


@dataclass
class Coverage:
    """What the ledger holds for one series."""

    series: Series
    covered: dict[str, list[Span]] = field(default_factory=dict)  # source -> disjoint sorted spans
    empty: list[EmptyRange] = field(default_factory=list)
    unfetchable: list[EmptyRange] = field(default_factory=list)  # beyond the exchange's history cap

    def covered_all(self) -> list[Span]:
        return merge(s for spans in self.covered.values() for s in spans)

    def empty_all(self) -> list[Span]:
        return merge(e.span for e in self.empty)

    def unfetchable_all(self) -> list[Span]:
        return merge(e.span for e in self.unfetchable)

    def known(self) -> list[Span]:
        """Covered, known empty or unfetchable: what a backfill need not (or cannot) fetch again."""
        return merge([*self.covered_all(), *self.empty_all(), *self.unfetchable_all()])

    def holes(self, window: Span | None = None) -> list[Span]:
        """What is neither covered, known empty nor unfetchable, inside `window` (default: first to last
        recorded time)."""
        known = self.known()
        if window is None:
            if not known:
                return []
            window = Span(known[0].start, known[-1].end)
        return subtract([window], known)

    def extent(self) -> Span | None:
        known = self.known()
        return Span(known[0].start, known[-1].end) if known else None


def join_evidence(a: Sequence[dict[str, Any]], b: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Both evidence lists as one, at most EVIDENCE_CAP entries plus a {"more": n} count of the rest."""
    items: list[dict[str, Any]] = []
    more = 0
    for e in (*a, *b):
        if set(e) == {"more"}:
            more += int(e["more"])
        elif e not in items:
            items.append(e)
    if len(items) > EVIDENCE_CAP:
        more += len(items) - EVIDENCE_CAP
        items = items[:EVIDENCE_CAP]
    return items + ([{"more": more}] if more else [])


def _range(span: Span) -> asyncpg.Range:
    return asyncpg.Range(to_datetime(span.start), to_datetime(span.end), lower_inc=True, upper_inc=False)


def _span(r: asyncpg.Range) -> Span:
    return Span(from_datetime(r.lower), from_datetime(r.upper))


_SELECT_NEAR = """
SELECT id, source, span, evidence FROM coverage
WHERE exchange = $1 AND symbol = $2 AND timeframe = $3 AND state = $4 AND ($5::text IS NULL OR source = $5)
  AND (span && $6 OR span -|- $6)
FOR UPDATE
"""
_INSERT = """
INSERT INTO coverage (exchange, symbol, timeframe, state, source, span, evidence)
VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb)
"""


class Ledger:
    """The coverage ledger on one asyncpg pool (or connection-like object with `acquire()`)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    @classmethod
    async def connect(cls, dsn: str, migrate_first: bool = True) -> Ledger:
        """Apply pending migrations (idempotent; 0004 creates the table), then open a small pool."""
        if migrate_first:
            from common.stores.postgres import migrate
            await migrate(dsn)
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=4, timeout=10)
        return cls(pool)

    async def close(self) -> None:
        await self.pool.close()

    async def record(self, series: Series, source: Source, covered: Iterable[Span] = (),
                     empty: Iterable[tuple[Span, dict[str, Any]]] = (),
                     unfetchable: Iterable[tuple[Span, dict[str, Any]]] = ()) -> None:
        """Record `covered` spans, `empty` and `unfetchable` (span, evidence) of `series` from `source`, in one
        transaction."""
        if source not in SOURCES:
            raise ValueError(f"ledger source {source!r} is not one of {', '.join(SOURCES)}")
        covered = merge(covered)
        empty = list(empty)
        unfetchable = list(unfetchable)
        if not covered and not empty and not unfetchable:
            return
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 4))",
                               f"{series.exchange}\x1f{series.symbol}\x1f{series.timeframe}")
            if covered:
                await self._add_covered(conn, series, source, covered)
            for span, evidence in empty:
                await self._add_empty(conn, series, source, span, evidence)
            for span, evidence in unfetchable:
                await self._add_empty(conn, series, source, span, evidence, state="unfetchable")

    async def forget_covered(self, series: Series, spans: Iterable[Span]) -> None:
        """Cut `spans` out of the series' covered rows (every source), in one transaction: InfluxDB does not
        hold them (common/history/verify.py), so the ledger must stop claiming them."""
        spans = merge(spans)
        if not spans:
            return
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 4))",
                               f"{series.exchange}\x1f{series.symbol}\x1f{series.timeframe}")
            for row in await self._near(conn, series, "covered", None, Span(spans[0].start, spans[-1].end)):
                span = _span(row["span"])
                rest = subtract([span], spans)
                if rest != [span]:
                    await self._replace(conn, series, "covered", row["source"], [row["id"]],
                                        [(s, []) for s in rest])

    async def _near(self, conn: asyncpg.Connection, series: Series, state: str, source: str | None,
                    hull: Span) -> list[asyncpg.Record]:
        return list(await conn.fetch(_SELECT_NEAR, series.exchange, series.symbol, series.timeframe, state,
                                     source, _range(hull)))

    async def _replace(self, conn: asyncpg.Connection, series: Series, state: str, source: str,
                       old_ids: list[int], new: list[tuple[Span, list[dict[str, Any]]]]) -> None:
        if old_ids:
            await conn.execute("DELETE FROM coverage WHERE id = ANY($1::bigint[])", old_ids)
        if new:
            await conn.executemany(_INSERT, [(series.exchange, series.symbol, series.timeframe, state, source,
                                              _range(span), json.dumps(ev)) for span, ev in new])

    async def _add_covered(self, conn: asyncpg.Connection, series: Series, source: str,
                           covered: list[Span]) -> None:
        hull = Span(covered[0].start, covered[-1].end)
        rows = await self._near(conn, series, "covered", source, hull)
        spans = [_span(r["span"]) for r in rows]
        touched = [r for r, s in zip(rows, spans, strict=True)
                   if any(s.start <= c.end and c.start <= s.end for c in covered)]
        merged = merge([*covered, *(_span(r["span"]) for r in touched)])
        if merged != sorted(_span(r["span"]) for r in touched):
            await self._replace(conn, series, "covered", source, [r["id"] for r in touched],
                                [(s, []) for s in merged])
        # Data that exists is neither empty nor missing: cut covered spans out of every source's empty and
        # unfetchable rows.
        for state in ("empty", "unfetchable"):
            for row in await self._near(conn, series, state, None, hull):
                span = _span(row["span"])
                rest = subtract([span], covered)
                if rest == [span]:
                    continue
                await self._replace(conn, series, state, row["source"], [row["id"]],
                                    [(s, _json(row["evidence"])) for s in rest])

    async def _add_empty(self, conn: asyncpg.Connection, series: Series, source: str, span: Span,
                         evidence: dict[str, Any], state: str = "empty") -> None:
        covered_rows = await self._near(conn, series, "covered", None, span)
        pieces = subtract([span], [_span(r["span"]) for r in covered_rows])
        for piece in pieces:
            rows = await self._near(conn, series, state, source, piece)
            merged = merge([piece, *(_span(r["span"]) for r in rows)])
            if len(rows) == 1 and merged == [_span(rows[0]["span"])] and evidence in _json(rows[0]["evidence"]):
                continue  # already recorded, with this evidence: nothing changes
            joined: list[dict[str, Any]] = []
            for r in rows:
                joined = join_evidence(joined, _json(r["evidence"]))
            joined = join_evidence(joined, [evidence])
            await self._replace(conn, series, state, source, [r["id"] for r in rows],
                                [(s, joined) for s in merged])

    async def coverage(self, series: Series) -> Coverage:
        """What the ledger holds for `series` (nothing when migration 0004 is not applied yet: read-only
        callers such as `mdp coverage` and `mdp backfill --plan` do not migrate)."""
        try:
            rows = await self.pool.fetch(
                "SELECT state, source, span, evidence FROM coverage WHERE exchange = $1 AND symbol = $2 "
                "AND timeframe = $3 ORDER BY lower(span)", series.exchange, series.symbol, series.timeframe)
        except asyncpg.UndefinedTableError:
            rows = []
        return _coverage(series, rows)

    async def series(self, exchange: str | None = None, symbol: str | None = None,
                     timeframe: str | None = None) -> list[Series]:
        if not await self.pool.fetchval("SELECT to_regclass('coverage') IS NOT NULL"):
            return []
        rows = await self.pool.fetch(
            "SELECT DISTINCT exchange, symbol, timeframe FROM coverage WHERE ($1::text IS NULL OR exchange = $1) "
            "AND ($2::text IS NULL OR symbol = $2) AND ($3::text IS NULL OR timeframe = $3) "
            "ORDER BY exchange, symbol, timeframe", exchange, symbol, timeframe)
        return [Series(r["exchange"], r["symbol"], r["timeframe"]) for r in rows]

    async def rows(self, series: Series) -> list[tuple[str, str, Span, list[dict[str, Any]]]]:
        """Every row of `series` as (state, source, span, evidence), by start: for tests and `--json`."""
        rows = await self.pool.fetch(
            "SELECT state, source, span, evidence FROM coverage WHERE exchange = $1 AND symbol = $2 "
            "AND timeframe = $3 ORDER BY lower(span), state, source", series.exchange, series.symbol,
            series.timeframe)
        return [(r["state"], r["source"], _span(r["span"]), _json(r["evidence"])) for r in rows]


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def _coverage(series: Series, rows: Iterable[asyncpg.Record]) -> Coverage:
    covered: dict[str, list[Span]] = defaultdict(list)
    empty: list[EmptyRange] = []
    unfetchable: list[EmptyRange] = []
    for r in rows:
        span = _span(r["span"])
        if r["state"] == "covered":
            covered[r["source"]].append(span)
        else:
            (empty if r["state"] == "empty" else unfetchable).append(
                EmptyRange(span, r["source"], tuple(_json(r["evidence"]))))
    return Coverage(series, {k: merge(v) for k, v in covered.items()}, empty, unfetchable)


def percent(part: int, whole: int) -> float:
    return 100.0 * part / whole if whole else 0.0


__all__ = ["EVIDENCE_CAP", "SOURCES", "Coverage", "EmptyRange", "Ledger", "Series", "Source", "join_evidence",
           "percent", "total"]
