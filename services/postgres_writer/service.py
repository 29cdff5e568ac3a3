"""PostgreSQL writer: the market catalog (`md:market:*`) into `markets`, `mdp:alerts` into `quality_alerts`.

At start it applies the migrations (common/migrate.py) and opens a small connection pool; while PostgreSQL
cannot be reached it retries with capped backoff, reads nothing, and reports `degraded` in its heartbeat.

Each batch the consumer group hands over is written in one transaction, one statement per table
(`INSERT ... SELECT FROM unnest(arrays) ON CONFLICT ...`), and committed before the handler returns; only
then does the bus acknowledge the entries. Both writes are idempotent, so a redelivered entry changes nothing:
- markets: upsert keyed by (exchange, symbol). A row only moves forward: an event older than the stored
  `last_seen` (a late redelivery) does not overwrite a newer one, and an identical one leaves it untouched.
- quality_alerts: keyed by (stream, entry id, index of the alert in the entry), ON CONFLICT DO NOTHING.
A lost connection raises `StoreUnavailable`: the bus retries the same batch in place, nothing is acknowledged.
"""

from __future__ import annotations

import asyncio
import logging
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import msgspec

from common import streams
from common.bus import Consumer, Delivery, StoreUnavailable, StreamSelector
from common.config import Settings
from common.migrate import migrate, safe_dsn
from common.service import Service
from schemas import Alert, Market

log = logging.getLogger(__name__)

GROUP = "postgres_writer"
MARKET_STREAMS = streams.markets("*")  # md:market:*

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# Errors meaning "PostgreSQL cannot be used right now": retry the batch in place, lose nothing.
UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,  # refused, reset, unreachable; TimeoutError (connect, command and pool-acquire timeouts) too
    asyncpg.PostgresConnectionError,  # class 08, including a connection lost in the middle of a query
    asyncpg.exceptions.OperatorInterventionError,  # 57: server shutting down or starting up
    asyncpg.exceptions.InsufficientResourcesError,  # 53: too many connections, disk full, out of memory
    asyncpg.exceptions.InvalidCatalogNameError,  # the database does not exist (yet)
    asyncpg.exceptions.InvalidAuthorizationSpecificationError,  # role or password refused
    asyncpg.exceptions.ReadOnlySQLTransactionError,  # connected to a standby (failover in progress)
)

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


def ts(ns: int) -> datetime:
    """Nanoseconds since the epoch as an aware datetime (PostgreSQL keeps microseconds)."""
    return EPOCH + timedelta(microseconds=ns // 1000)


def _text(value: str) -> str:
    # PostgreSQL text and jsonb cannot hold NUL; alerts carry raw offending values from exchanges.
    return value.replace("\x00", "\ufffd") if "\x00" in value else value


def _rows_of(status: str) -> int:
    """The row count of a command status such as 'INSERT 0 17'."""
    try:
        return int(status.rsplit(" ", 1)[-1])
    except ValueError:
        return 0


class PostgresWriter(Service):
    name = "postgres_writer"

    def __init__(self, settings: Settings, instance: str | None = None) -> None:
        super().__init__(settings, instance)
        self.dsn = settings.postgres.dsn
        self.pool: asyncpg.Pool | None = None
        self.consumer = Consumer(self.redis, self.codec, settings.bus, group=GROUP,
                                 name=self.consumer_name,
                                 selector=StreamSelector(names=[streams.ALERTS], patterns=[MARKET_STREAMS]))
        self.count: dict[str, int] = {"markets_upserted": 0, "markets_unchanged": 0, "alerts_stored": 0,
                                      "alerts_duplicate": 0, "ignored": 0, "batches": 0, "connects": 0}
        self._json = msgspec.json.Encoder()

    def counters(self) -> dict[str, int]:
        s = self.consumer.stats
        return dict(self.count) | {"delivered": s.delivered, "acked": s.acked, "events": s.events,
                                   "dead_lettered": s.dead_lettered, "claimed": s.claimed,
                                   "failures": s.failures, "store_retries": s.store_retries}

    # -- connection -----------------------------------------------------------------------------

    def _unavailable(self, exc: BaseException) -> StoreUnavailable:
        if isinstance(exc, asyncpg.exceptions.InvalidCatalogNameError):
            fix = "create the database (`make stores` creates the one named in MDP_POSTGRES_DSN)"
        elif isinstance(exc, asyncpg.exceptions.InvalidAuthorizationSpecificationError):
            fix = "check the user and password of postgres.dsn / MDP_POSTGRES_DSN"
        else:
            fix = ("start PostgreSQL (`make stores`) or fix postgres.dsn / MDP_POSTGRES_DSN; "
                   "nothing is acknowledged meanwhile, the backlog waits in Redis")
        return StoreUnavailable(f"PostgreSQL at {safe_dsn(self.dsn)} is unavailable "
                                f"({type(exc).__name__}: {exc}); {fix}")

    async def connect(self) -> None:
        """Apply migrations and open the pool; StoreUnavailable if PostgreSQL cannot be reached."""
        if self.pool is not None:
            return
        try:
            applied = await migrate(self.dsn)
            pool = await asyncpg.create_pool(
                self.dsn, min_size=1, max_size=2, timeout=10, command_timeout=60,
                server_settings={"application_name": f"mdp-{self.name}-{self.instance}"})
        except UNAVAILABLE as exc:
            raise self._unavailable(exc) from exc
        try:
            async with pool.acquire(timeout=10) as conn:
                row = await conn.fetchrow("SELECT current_database() AS db, current_user AS usr, "
                                          "current_setting('server_version') AS version")
        except UNAVAILABLE as exc:
            await pool.close()
            raise self._unavailable(exc) from exc
        self.pool = pool
        self.count["connects"] += 1
        log.info("connected to %s (PostgreSQL %s, database %s, user %s); migrations applied now: %s",
                 safe_dsn(self.dsn), row["version"], row["db"], row["usr"],
                 ", ".join(applied) or "none, schema is current")

    async def _connect_until(self, stop: asyncio.Event) -> None:
        delay = 0.5
        while not stop.is_set():
            try:
                await self.connect()
                return
            except StoreUnavailable as exc:
                self.state = "degraded"
                self.detail = str(exc)
                log.error("%s; retrying in %.1f s", exc, delay)
                try:
                    await asyncio.wait_for(stop.wait(), timeout=delay * (0.8 + 0.4 * random.random()))
                except TimeoutError:
                    pass
                delay = min(delay * 2, 30.0)

    # -- service --------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        log.info("postgres_writer: group %s reads %s and %s into %s", GROUP, MARKET_STREAMS, streams.ALERTS,
                 safe_dsn(self.dsn))
        await self._connect_until(stop)
        if stop.is_set():
            return
        self.state = "running"
        self.detail = ""
        await self.consumer.run(self.handle, stop)

    async def close(self) -> None:
        if self.pool is not None:
            try:
                await asyncio.wait_for(self.pool.close(), timeout=10)
            except (TimeoutError, *UNAVAILABLE):
                self.pool.terminate()
            self.pool = None
        await super().close()

    # -- the handler ----------------------------------------------------------------------------

    async def handle(self, deliveries: list[Delivery]) -> None:
        """Write a batch durably (committed on return); StoreUnavailable if PostgreSQL cannot be reached."""
        latest: dict[tuple[str, str], Market] = {}
        alerts: list[tuple[str, str, int, Alert]] = []
        ignored = 0
        for d in deliveries:
            for i, event in enumerate(d.events):
                if isinstance(event, Market):
                    key = (event.exchange, event.symbol)
                    seen = latest.get(key)
                    if seen is None or event.ts_event >= seen.ts_event:
                        latest[key] = event
                elif isinstance(event, Alert):
                    alerts.append((d.stream, d.entry_id, i, event))
                else:
                    ignored += 1
        if latest or alerts:
            # Sorted keys: concurrent writers lock rows in one order and cannot deadlock.
            markets = [latest[k] for k in sorted(latest)]
            upserted, stored = await self._write(markets, alerts)
            self.count["markets_upserted"] += upserted
            self.count["markets_unchanged"] += len(markets) - upserted
            self.count["alerts_stored"] += stored
            self.count["alerts_duplicate"] += len(alerts) - stored
        self.count["ignored"] += ignored
        self.count["batches"] += 1
        if self.state == "degraded":
            log.info("PostgreSQL at %s is writable again", safe_dsn(self.dsn))
        self.state = "running"
        self.detail = ""

    async def _write(self, markets: list[Market],
                     alerts: list[tuple[str, str, int, Alert]]) -> tuple[int, int]:
        try:
            if self.pool is None:
                await self.connect()
            assert self.pool is not None
            async with self.pool.acquire(timeout=30) as conn, conn.transaction():
                upserted = _rows_of(await conn.execute(UPSERT_MARKETS, *self._market_columns(markets))) \
                    if markets else 0
                stored = _rows_of(await conn.execute(INSERT_ALERTS, *self._alert_columns(alerts))) \
                    if alerts else 0
            return upserted, stored
        except StoreUnavailable as exc:
            self._degraded(exc)
            raise
        except UNAVAILABLE as exc:
            err = self._unavailable(exc)
            self._degraded(err)
            raise err from exc

    def _degraded(self, exc: StoreUnavailable) -> None:
        self.state = "degraded"
        self.detail = str(exc)

    @staticmethod
    def _market_columns(markets: list[Market]) -> list[list[Any]]:
        return [
            [m.exchange for m in markets], [m.symbol for m in markets], [m.exchange_symbol for m in markets],
            [m.base for m in markets], [m.quote for m in markets], [m.market_type for m in markets],
            [m.active for m in markets], [m.contract_size for m in markets],
            [m.price_precision for m in markets], [m.amount_precision for m in markets],
            [ts(m.ts_event) for m in markets],
        ]

    def _alert_columns(self, alerts: list[tuple[str, str, int, Alert]]) -> list[list[Any]]:
        cols: list[list[Any]] = [[] for _ in range(13)]
        for stream, entry_id, idx, a in alerts:
            values = {_text(k): None if v is None else _text(v) for k, v in a.values.items()}
            row = (stream, entry_id, idx, _text(a.rule), a.severity, _text(a.source),
                   _text(a.exchange) or None, _text(a.symbol) or None, _text(a.kind) or None, _text(a.reason),
                   self._json.encode(values).decode(), ts(a.ts_event), ts(a.ts_recv) if a.ts_recv else None)
            for col, value in zip(cols, row, strict=True):
                col.append(value)
        return cols
