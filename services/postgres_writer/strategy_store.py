"""Strategy events into PostgreSQL: registrations, fills, positions (+ history) and metrics, idempotently.

Each function runs inside the caller's transaction and resolves strategy names to ids in SQL (a join on
`strategies.name`); a name no registration has created yet is auto-registered first (`registered_ns` 0).

- strategies: upsert by name; a registration replaces the row only if its ts_event is later than the stored
  `registered_ns`, so a late redelivery of an older registration changes nothing.
- fills (`trades`): ON CONFLICT (the fill key) DO NOTHING. A fill is a fact the exchange reported once; the
  first stored copy stays. A copy that differs from the stored one is not a duplicate but a contradiction:
  it is returned as a conflict (the writer dead-letters it and raises an alert) instead of overwriting.
  Batches of at least `copy_min_rows` fills go by binary COPY: straight into `trades` inside a savepoint
  (new fills, the usual case: the fastest path), and if one of them is stored already (a redelivery) into a
  session TEMP table, then one INSERT ... SELECT ... ON CONFLICT. Smaller batches go through one
  INSERT ... SELECT FROM unnest(arrays) ... ON CONFLICT (docs/bench-postgres.md measures the three).
- positions: every update goes to `position_history` (DO NOTHING by (strategy, market, as_of_ns)); the latest
  of the batch per market upserts `positions` only if it is newer than the stored `as_of_ns`. The same
  as_of_ns with different numbers is a conflict, as for fills.
- performance_metrics: upsert by (strategy, metric, period, ts); the larger revision (publisher's ts_recv)
  wins; the same revision with a different value is a conflict.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar, cast

import asyncpg
import msgspec

from schemas import Event
from schemas.events import Fill, PerformanceMetric, PositionUpdate, StrategyInfo
from services.postgres_writer.batch import Item, columns, rows_of, ts

STAGE_TABLE = "mdp_fill_stage"
# One per connection (created by the pool's init), emptied by every commit.
CREATE_STAGE = f"""
CREATE TEMP TABLE IF NOT EXISTS {STAGE_TABLE} (
    strategy text, exchange text, symbol text, side text, price numeric, amount numeric, fee numeric,
    fee_currency text, exchange_trade_id text, exchange_order_id text, ts timestamptz
) ON COMMIT DELETE ROWS
"""
FILL_COLUMNS = ("strategy", "exchange", "symbol", "side", "price", "amount", "fee", "fee_currency",
                "exchange_trade_id", "exchange_order_id", "ts")
TRADE_COLUMNS = ("strategy_id", *FILL_COLUMNS[1:])
STRATEGY_IDS = "SELECT name, id FROM strategies WHERE name = ANY($1::text[])"
FILL_UNNEST = ("unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::numeric[], $6::numeric[], "
               "$7::numeric[], $8::text[], $9::text[], $10::text[], $11::timestamptz[]) "
               f"AS r({', '.join(FILL_COLUMNS)})")
FILL_STAGE = f"{STAGE_TABLE} AS r"

INSERT_FILLS = """
INSERT INTO trades (strategy_id, exchange, symbol, side, price, amount, fee, fee_currency, exchange_trade_id,
                    exchange_order_id, ts)
SELECT s.id, r.exchange, r.symbol, r.side, r.price, r.amount, r.fee, r.fee_currency, r.exchange_trade_id,
       r.exchange_order_id, r.ts
FROM {source} JOIN strategies s ON s.name = r.strategy
ON CONFLICT ON CONSTRAINT trades_fill_key DO NOTHING
"""
# Run only when some incoming fill was not inserted: the stored fills that contradict their incoming copy.
# The unique index finds them (the ON CONFLICT arbiter, no join the planner could get wrong on a table whose
# statistics are stale); a contradicting row gets a no-op update, which is what makes RETURNING report it.
FILL_CONFLICTS = f"""
INSERT INTO trades AS t (strategy_id, exchange, symbol, side, price, amount, fee, fee_currency, exchange_trade_id,
                         exchange_order_id, ts)
SELECT s.id, r.exchange, r.symbol, r.side, r.price, r.amount, r.fee, r.fee_currency, r.exchange_trade_id,
       r.exchange_order_id, r.ts
FROM {FILL_UNNEST} JOIN strategies s ON s.name = r.strategy
ON CONFLICT ON CONSTRAINT trades_fill_key DO UPDATE SET exchange_order_id = t.exchange_order_id
WHERE (t.side, t.price, t.amount, t.fee, t.fee_currency, t.exchange_order_id, t.ts)
      IS DISTINCT FROM (EXCLUDED.side, EXCLUDED.price, EXCLUDED.amount, EXCLUDED.fee, EXCLUDED.fee_currency,
                        EXCLUDED.exchange_order_id, EXCLUDED.ts)
RETURNING t.strategy_id, t.exchange, t.symbol, t.exchange_trade_id, t.side, t.price, t.amount, t.fee,
          t.fee_currency, t.exchange_order_id, t.ts
"""

UPSERT_STRATEGIES = """
INSERT INTO strategies AS s (name, description, params, active, registered_ns)
SELECT * FROM unnest($1::text[], $2::text[], $3::jsonb[], $4::boolean[], $5::bigint[])
ON CONFLICT (name) DO UPDATE SET
    description = EXCLUDED.description, params = EXCLUDED.params, active = EXCLUDED.active,
    registered_ns = EXCLUDED.registered_ns
WHERE EXCLUDED.registered_ns > s.registered_ns
"""
AUTO_REGISTER = """
INSERT INTO strategies (name) SELECT unnest($1::text[]) ORDER BY 1
ON CONFLICT (name) DO NOTHING
RETURNING name
"""

POSITION_UNNEST = ("unnest($1::text[], $2::text[], $3::text[], $4::numeric[], $5::numeric[], $6::numeric[], "
                   "$7::timestamptz[], $8::bigint[]) "
                   "AS r(strategy, exchange, symbol, quantity, avg_price, realized_pnl, as_of, as_of_ns)")
INSERT_POSITION_HISTORY = f"""
INSERT INTO position_history (strategy_id, exchange, symbol, as_of_ns, as_of, quantity, avg_price, realized_pnl)
SELECT s.id, r.exchange, r.symbol, r.as_of_ns, r.as_of, r.quantity, r.avg_price, r.realized_pnl
FROM {POSITION_UNNEST} JOIN strategies s ON s.name = r.strategy
ON CONFLICT (strategy_id, exchange, symbol, as_of_ns) DO NOTHING
"""
POSITION_CONFLICTS = f"""
INSERT INTO position_history AS h (strategy_id, exchange, symbol, as_of_ns, as_of, quantity, avg_price,
                                   realized_pnl)
SELECT s.id, r.exchange, r.symbol, r.as_of_ns, r.as_of, r.quantity, r.avg_price, r.realized_pnl
FROM {POSITION_UNNEST} JOIN strategies s ON s.name = r.strategy
ON CONFLICT (strategy_id, exchange, symbol, as_of_ns) DO UPDATE SET quantity = h.quantity
WHERE (h.quantity, h.avg_price, h.realized_pnl) IS DISTINCT FROM
      (EXCLUDED.quantity, EXCLUDED.avg_price, EXCLUDED.realized_pnl)
RETURNING h.strategy_id, h.exchange, h.symbol, h.as_of_ns, h.quantity, h.avg_price, h.realized_pnl
"""
UPSERT_POSITIONS = f"""
INSERT INTO positions AS p (strategy_id, exchange, symbol, quantity, avg_price, realized_pnl, as_of, as_of_ns)
SELECT s.id, r.exchange, r.symbol, r.quantity, r.avg_price, r.realized_pnl, r.as_of, r.as_of_ns
FROM {POSITION_UNNEST} JOIN strategies s ON s.name = r.strategy
ON CONFLICT (strategy_id, exchange, symbol) DO UPDATE SET
    quantity = EXCLUDED.quantity, avg_price = EXCLUDED.avg_price, realized_pnl = EXCLUDED.realized_pnl,
    as_of = EXCLUDED.as_of, as_of_ns = EXCLUDED.as_of_ns
WHERE EXCLUDED.as_of_ns > p.as_of_ns
"""

METRIC_UNNEST = ("unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[], $5::numeric[], $6::bigint[]) "
                 "AS r(strategy, metric, period, ts, value, revision_ns)")
UPSERT_METRICS = f"""
INSERT INTO performance_metrics AS m (strategy_id, metric, period, ts, value, revision_ns)
SELECT s.id, r.metric, r.period, r.ts, r.value, r.revision_ns
FROM {METRIC_UNNEST} JOIN strategies s ON s.name = r.strategy
ON CONFLICT ON CONSTRAINT performance_metrics_key DO UPDATE SET
    value = EXCLUDED.value, revision_ns = EXCLUDED.revision_ns
WHERE EXCLUDED.revision_ns > m.revision_ns
"""
METRIC_CONFLICTS = f"""
INSERT INTO performance_metrics AS m (strategy_id, metric, period, ts, value, revision_ns)
SELECT s.id, r.metric, r.period, r.ts, r.value, r.revision_ns
FROM {METRIC_UNNEST} JOIN strategies s ON s.name = r.strategy
ON CONFLICT ON CONSTRAINT performance_metrics_key DO UPDATE SET value = m.value
WHERE m.revision_ns = EXCLUDED.revision_ns AND m.value IS DISTINCT FROM EXCLUDED.value
RETURNING m.strategy_id, m.metric, m.period, m.ts, m.value
"""


@dataclass
class StrategyResult:
    counts: dict[str, int] = field(default_factory=dict)
    auto_registered: list[str] = field(default_factory=list)
    # Events that contradict what is stored (or another event of the batch), with the reason.
    conflicts: list[tuple[Item, str]] = field(default_factory=list)

    def add(self, counter: str, n: int) -> None:
        self.counts[counter] = self.counts.get(counter, 0) + n


K = TypeVar("K")


def _first_per_key(items: Sequence[Item], key: Callable[[Any], K], same: Callable[[Any, Any], bool],
                   what: str, result: StrategyResult) -> tuple[dict[K, Item], int]:
    """One item per key, the first; a later one with different content is a conflict (returned with their
    count), an equal one a duplicate that is dropped."""
    kept: dict[K, Item] = {}
    conflicts = 0
    for it in items:
        k = key(it.event)
        first = kept.get(k)
        if first is None:
            kept[k] = it
        elif not same(first.event, it.event):
            conflicts += 1
            reason = (f"contradicts the {what} at {first.stream} {first.entry_id} #{first.idx} in the same batch "
                      f"with the same key ({_fields(first.event)} vs {_fields(it.event)})")
            result.conflicts.append((it, reason))
    return kept, conflicts


def _fields(event: Event) -> str:
    if isinstance(event, Fill):
        return (f"side {event.side}, price {event.price}, amount {event.amount}, fee {event.fee} "
                f"{event.fee_currency or ''}, order {event.order_id}, ts_event {event.ts_event}")
    if isinstance(event, PositionUpdate):
        return f"quantity {event.quantity}, avg_price {event.avg_price}, realized_pnl {event.realized_pnl}"
    if isinstance(event, PerformanceMetric):
        return f"value {event.value}"
    return repr(event)


def _fill_key(f: Fill) -> tuple[str, str, str, str]:
    return (f.strategy, f.exchange, f.symbol, f.exchange_trade_id)


def _fill_row(f: Fill) -> tuple[Any, ...]:
    return (f.strategy, f.exchange, f.symbol, f.side, f.price, f.amount, f.fee, f.fee_currency,
            f.exchange_trade_id, f.order_id, ts(f.ts_event))


def _same_fill(a: Fill, b: Fill) -> bool:
    return _fill_row(a) == _fill_row(b)


def _position_key(p: PositionUpdate) -> tuple[str, str, str, int]:
    return (p.strategy, p.exchange, p.symbol, p.ts_event)


def _same_position(a: PositionUpdate, b: PositionUpdate) -> bool:
    return (a.quantity, a.avg_price, a.realized_pnl) == (b.quantity, b.avg_price, b.realized_pnl)


def _metric_key(m: PerformanceMetric) -> tuple[str, str, str, datetime, int]:
    return (m.strategy, m.metric, m.period, ts(m.ts_event), m.ts_recv)


def _same_metric(a: PerformanceMetric, b: PerformanceMetric) -> bool:
    return a.value == b.value


async def _names(conn: asyncpg.Connection, names: Iterable[str]) -> dict[int, str]:
    return {r["id"]: r["name"] for r in await conn.fetch(STRATEGY_IDS, sorted(set(names)))}


class StrategyStore:
    """Writes the strategy events of one batch on a connection inside the caller's transaction."""

    def __init__(self, copy_min_rows: int) -> None:
        self.copy_min_rows = copy_min_rows
        self._json = msgspec.json.Encoder()

    async def write(self, conn: asyncpg.Connection, items: Sequence[Item]) -> StrategyResult:
        result = StrategyResult()
        infos = [it for it in items if isinstance(it.event, StrategyInfo)]
        fills = [it for it in items if isinstance(it.event, Fill)]
        positions = [it for it in items if isinstance(it.event, PositionUpdate)]
        metrics = [it for it in items if isinstance(it.event, PerformanceMetric)]
        if infos:
            await self._register(conn, infos, result)
        names = sorted({it.event.strategy for it in fills + positions + metrics})  # type: ignore[union-attr]
        if names:
            result.auto_registered = [r["name"] for r in await conn.fetch(AUTO_REGISTER, names)]
            result.add("strategies_auto_registered", len(result.auto_registered))
        if fills:
            await self._fills(conn, fills, result)
        if positions:
            await self._positions(conn, positions, result)
        if metrics:
            await self._metrics(conn, metrics, result)
        return result

    async def _register(self, conn: asyncpg.Connection, infos: list[Item], result: StrategyResult) -> None:
        latest: dict[str, StrategyInfo] = {}
        for it in infos:
            e: StrategyInfo = it.event  # type: ignore[assignment]
            seen = latest.get(e.strategy)
            if seen is None or e.ts_event > seen.ts_event:
                latest[e.strategy] = e
        rows = [latest[name] for name in sorted(latest)]
        status = await conn.execute(UPSERT_STRATEGIES, [e.strategy for e in rows], [e.description for e in rows],
                                    [self._json.encode(e.params).decode() for e in rows],
                                    [e.active for e in rows], [e.ts_event for e in rows])
        stored = rows_of(status)
        result.add("strategies_registered", stored)
        result.add("strategies_unchanged", len(infos) - stored)

    async def _fills(self, conn: asyncpg.Connection, fills: list[Item], result: StrategyResult) -> None:
        kept, conflicting = _first_per_key(fills, _fill_key, _same_fill, "fill", result)
        by_key = {k: kept[k] for k in sorted(kept)}  # one lock order for concurrent writers
        rows = [_fill_row(it.event) for it in by_key.values()]  # type: ignore[arg-type]
        if len(rows) >= self.copy_min_rows:
            result.add("copy_batches", 1)
            if await self._copy_new_fills(conn, rows):
                result.add("copy_direct", 1)
                result.add("fills_stored", len(rows))
                result.add("fills_duplicate", len(fills) - len(rows) - conflicting)
                return
            await conn.copy_records_to_table(STAGE_TABLE, records=rows, columns=FILL_COLUMNS)
            inserted = rows_of(await conn.execute(INSERT_FILLS.format(source=FILL_STAGE)))
        else:
            inserted = rows_of(await conn.execute(INSERT_FILLS.format(source=FILL_UNNEST),
                                                  *columns(rows, len(FILL_COLUMNS))))
        result.add("fills_stored", inserted)
        if inserted < len(rows):
            conflicting += await self._fill_conflicts(conn, rows, by_key, result)
        result.add("fills_duplicate", len(fills) - inserted - conflicting)

    @staticmethod
    async def _copy_new_fills(conn: asyncpg.Connection, rows: list[tuple[Any, ...]]) -> bool:
        """COPY the fills straight into trades, the fast path when none is stored yet (the usual case); False,
        with nothing written, if one is (a redelivery): the caller then stages them and upserts."""
        ids = {name: i for i, name in (await _names(conn, (row[0] for row in rows))).items()}
        try:
            async with conn.transaction():  # a savepoint: a duplicate key undoes this COPY only
                await conn.copy_records_to_table("trades", records=[(ids[row[0]], *row[1:]) for row in rows],
                                                 columns=TRADE_COLUMNS)
            return True
        except asyncpg.UniqueViolationError:
            return False

    async def _fill_conflicts(self, conn: asyncpg.Connection, rows: list[tuple[Any, ...]],
                              by_key: dict[tuple[str, str, str, str], Item], result: StrategyResult) -> int:
        conflicting = 0
        names = await _names(conn, (row[0] for row in rows))
        for r in await conn.fetch(FILL_CONFLICTS, *columns(rows, len(FILL_COLUMNS))):
            it = by_key[(names[r["strategy_id"]], r["exchange"], r["symbol"], r["exchange_trade_id"])]
            conflicting += 1
            result.conflicts.append((it, (
                f"contradicts the stored fill with the same key (stored: side {r['side']}, price {r['price']}, "
                f"amount {r['amount']}, fee {r['fee']} {r['fee_currency'] or ''}, order "
                f"{r['exchange_order_id']}, ts {r['ts'].isoformat()}; this one: {_fields(it.event)}); the stored "
                f"fill is kept: if this one is the correction, fix the row by hand")))
        return conflicting

    async def _positions(self, conn: asyncpg.Connection, positions: list[Item], result: StrategyResult) -> None:
        kept, _ = _first_per_key(positions, _position_key, _same_position, "position", result)
        updates = [cast(PositionUpdate, kept[k].event) for k in sorted(kept)]
        rows = [(p.strategy, p.exchange, p.symbol, p.quantity, p.avg_price, p.realized_pnl, ts(p.ts_event),
                 p.ts_event) for p in updates]
        cols = columns(rows, 8)
        history = rows_of(await conn.execute(INSERT_POSITION_HISTORY, *cols))
        result.add("position_history_stored", history)
        if history < len(rows):
            names = await _names(conn, (row[0] for row in rows))
            for r in await conn.fetch(POSITION_CONFLICTS, *cols):
                it = kept[(names[r["strategy_id"]], r["exchange"], r["symbol"], r["as_of_ns"])]
                result.conflicts.append((it, (
                    f"contradicts the stored position with the same ts_event (stored: quantity {r['quantity']}, "
                    f"avg_price {r['avg_price']}, realized_pnl {r['realized_pnl']}; this one: "
                    f"{_fields(it.event)}); give each update a later ts_event")))
        latest: dict[tuple[str, str, str], tuple[Any, ...]] = {}
        for row in rows:  # sorted by (strategy, exchange, symbol, ts_event): the last per market is the newest
            latest[row[:3]] = row
        newest = list(latest.values())
        updated = rows_of(await conn.execute(UPSERT_POSITIONS, *columns(newest, 8)))
        result.add("positions_updated", updated)
        result.add("positions_stale", len(positions) - updated)

    async def _metrics(self, conn: asyncpg.Connection, metrics: list[Item], result: StrategyResult) -> None:
        kept, _ = _first_per_key(metrics, _metric_key, _same_metric, "metric revision", result)
        latest: dict[tuple[str, str, str, datetime], Item] = {}
        for k in sorted(kept):  # the largest revision per metric key goes to the upsert
            latest[k[:4]] = kept[k]
        rows = [(m.strategy, m.metric, m.period, ts(m.ts_event), m.value, m.ts_recv)  # type: ignore[union-attr]
                for m in (it.event for it in latest.values())]
        cols = columns(rows, 6)
        stored = rows_of(await conn.execute(UPSERT_METRICS, *cols))
        result.add("metrics_stored", stored)
        if stored < len(rows):
            names = await _names(conn, (row[0] for row in rows))
            for r in await conn.fetch(METRIC_CONFLICTS, *cols):
                it = latest[(names[r["strategy_id"]], r["metric"], r["period"], r["ts"])]
                result.conflicts.append((it, (
                    f"contradicts the stored value {r['value']} of the same revision (ts_recv); publish a "
                    f"recomputed value with a later ts_recv")))
        result.add("metrics_unchanged", len(metrics) - stored)
