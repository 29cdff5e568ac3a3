"""The market catalog (`md:market:*` -> `markets`) and quality alerts (`mdp:alerts` -> `quality_alerts`).

- markets: upsert keyed by (exchange, symbol). A row only moves forward: an event older than the stored
  `last_seen` (a late redelivery) does not overwrite a newer one, and an identical one leaves it untouched.
- quality_alerts: keyed by (stream, entry id, index of the alert in the entry), ON CONFLICT DO NOTHING.
Both run inside the caller's transaction, one INSERT ... SELECT FROM unnest(arrays) each.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import asyncpg
import msgspec

from schemas import Alert, Market
from services.postgres_writer.batch import Item, columns, rows_of, ts

UPSERT_MARKETS = """
INSERT INTO markets AS m (exchange, symbol, exchange_symbol, base, quote, market_type, active, contract_size,
                          price_precision, amount_precision, first_seen, last_seen, updated_at)
SELECT r.exchange, r.symbol, r.exchange_symbol, r.base, r.quote, r.market_type, r.active, r.contract_size,
       r.price_precision, r.amount_precision, r.seen, r.seen, now()
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::boolean[],
            $8::numeric[], $9::numeric[], $10::numeric[], $11::timestamptz[])
     AS r(exchange, symbol, exchange_symbol, base, quote, market_type, active, contract_size,
          price_precision, amount_precision, seen)
ON CONFLICT (exchange, symbol) DO UPDATE SET
    exchange_symbol = EXCLUDED.exchange_symbol,
    base = EXCLUDED.base,
    quote = EXCLUDED.quote,
    market_type = EXCLUDED.market_type,
    active = EXCLUDED.active,
    contract_size = EXCLUDED.contract_size,
    price_precision = EXCLUDED.price_precision,
    amount_precision = EXCLUDED.amount_precision,
    first_seen = LEAST(m.first_seen, EXCLUDED.first_seen),
    last_seen = EXCLUDED.last_seen,
    updated_at = now()
WHERE EXCLUDED.last_seen > m.last_seen
   OR (EXCLUDED.last_seen = m.last_seen
       AND (m.exchange_symbol, m.base, m.quote, m.market_type, m.active, m.contract_size, m.price_precision,
            m.amount_precision)
           IS DISTINCT FROM (EXCLUDED.exchange_symbol, EXCLUDED.base, EXCLUDED.quote, EXCLUDED.market_type,
                             EXCLUDED.active, EXCLUDED.contract_size, EXCLUDED.price_precision,
                             EXCLUDED.amount_precision))
"""

INSERT_ALERTS = """
INSERT INTO quality_alerts (stream, entry_id, idx, rule, severity, source, exchange, symbol, kind, reason,
                            "values", ts_event, ts_recv)
SELECT * FROM unnest($1::text[], $2::text[], $3::integer[], $4::text[], $5::text[], $6::text[],
                     $7::text[], $8::text[], $9::text[], $10::text[], $11::jsonb[], $12::timestamptz[],
                     $13::timestamptz[])
ON CONFLICT ON CONSTRAINT quality_alerts_delivery_key DO NOTHING
"""


def _text(value: str) -> str:
    # PostgreSQL text and jsonb cannot hold NUL; alerts carry raw offending values from exchanges.
    return value.replace("\x00", "\ufffd") if "\x00" in value else value


class CatalogStore:
    """Writes the markets and alerts of one batch on a connection inside the caller's transaction."""

    def __init__(self) -> None:
        self._json = msgspec.json.Encoder()

    async def write(self, conn: asyncpg.Connection, markets: Sequence[Item], alerts: Sequence[Item]) -> dict[str, int]:
        latest: dict[tuple[str, str], Market] = {}
        for it in markets:
            m: Market = it.event  # type: ignore[assignment]
            seen = latest.get((m.exchange, m.symbol))
            if seen is None or m.ts_event >= seen.ts_event:
                latest[(m.exchange, m.symbol)] = m
        # Sorted keys: concurrent writers lock rows in one order and cannot deadlock.
        rows = [latest[k] for k in sorted(latest)]
        upserted = rows_of(await conn.execute(UPSERT_MARKETS, *self._market_columns(rows))) if rows else 0
        stored = rows_of(await conn.execute(INSERT_ALERTS, *self._alert_columns(alerts))) if alerts else 0
        return {"markets_upserted": upserted, "markets_unchanged": len(rows) - upserted,
                "alerts_stored": stored, "alerts_duplicate": len(alerts) - stored}

    @staticmethod
    def _market_columns(markets: list[Market]) -> list[list[Any]]:
        return columns([(m.exchange, m.symbol, m.exchange_symbol, m.base, m.quote, m.market_type, m.active,
                         m.contract_size, m.price_precision, m.amount_precision, ts(m.ts_event))
                        for m in markets], 11)

    def _alert_columns(self, alerts: Sequence[Item]) -> list[list[Any]]:
        rows = []
        for it in alerts:
            a: Alert = it.event  # type: ignore[assignment]
            values = {_text(k): None if v is None else _text(v) for k, v in a.values.items()}
            rows.append((it.stream, it.entry_id, it.idx, _text(a.rule), a.severity, _text(a.source),
                         _text(a.exchange) or None, _text(a.symbol) or None, _text(a.kind) or None,
                         _text(a.reason), self._json.encode(values).decode(), ts(a.ts_event),
                         ts(a.ts_recv) if a.ts_recv else None))
        return columns(rows, 13)
