"""PostgreSQL writer: the market catalog, quality alerts, and the strategies' own events.

  md:market:*          -> markets                     (catalog.py)
  mdp:alerts           -> quality_alerts              (catalog.py)
  strategy:{strategy}  -> strategies, trades, positions, position_history, performance_metrics
                                                      (strategy_store.py; published with common.strategy_events)

At start it applies the migrations (common/stores/postgres.py) and opens a small connection pool; while PostgreSQL
cannot be reached it retries with capped backoff, reads nothing, and reports `degraded` in its heartbeat.

Each batch the consumer group hands over is written in one transaction and committed before the handler
returns; only then does the bus acknowledge the entries. Every write is idempotent (natural keys, forward-only
upserts), so a redelivered entry changes nothing. A lost connection raises `StoreUnavailable`: the bus retries
the same batch in place, nothing is acknowledged.

What PostgreSQL must not store is not retried: an event that fails the checks of common.strategy_events, that
names another strategy than its stream, that contradicts what is stored under its key (a fill with the same
exchange trade id but another price), or that PostgreSQL refuses (a constraint or data error; the batch is
split in halves until the refused events are isolated, the rest is written) is dead-lettered: its entry goes
to `dlq:{stream}` with every reason, and an alert (`postgres_writer.rejected`) goes to mdp:alerts.
A fill, position or metric of a strategy that never registered is stored: the writer registers the name
(`registered_ns` 0, empty params) and raises a `postgres_writer.strategy_auto_registered` warning.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from dataclasses import dataclass, field

import asyncpg

from common.bus import streams
from common.bus.core import Delivery, Outputs, now_ns
from common.bus.stage import Stage
from common.config import ConfigError, Settings
from common.errors import StoreUnavailable
from common.stores.postgres import migrate, safe_dsn
from common.strategy_events import describe, problems
from schemas import KIND_OF, Alert, Event, Market
from schemas.events import Fill, PerformanceMetric, PositionUpdate, StrategyInfo
from services.postgres_writer.batch import Item
from services.postgres_writer.catalog import CatalogStore
from services.postgres_writer.strategy_store import CREATE_STAGE, StrategyStore

log = logging.getLogger(__name__)

GROUP = "postgres_writer"
MARKET_STREAMS = streams.markets("*")  # md:market:*
STRATEGY_TYPES = (StrategyInfo, Fill, PositionUpdate, PerformanceMetric)
STRATEGY_PREFIX = streams.strategy("")

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
CLOSE_ERRORS: tuple[type[BaseException], ...] = (TimeoutError, *UNAVAILABLE)
# Errors meaning "PostgreSQL refuses these rows": retrying cannot help; isolate and dead-letter them.
REFUSED: tuple[type[BaseException], ...] = (
    asyncpg.DataError,  # 22: invalid text encoding, numeric out of range, bad JSON
    asyncpg.IntegrityConstraintViolationError,  # 23: CHECK, NOT NULL, foreign key
    asyncpg.exceptions.ProgramLimitExceededError,  # 54: e.g. a text too long for an index row
    asyncpg.exceptions._base.DataError,  # asyncpg could not encode a value
)


@dataclass
class WriteResult:
    counts: Counter[str] = field(default_factory=Counter)
    auto_registered: list[tuple[str, Item]] = field(default_factory=list)
    rejected: list[tuple[Item, str]] = field(default_factory=list)

    def merge(self, other: WriteResult) -> WriteResult:
        self.counts.update(other.counts)
        self.auto_registered += other.auto_registered
        self.rejected += other.rejected
        return self


class PostgresWriter(Stage):
    name = "postgres_writer"
    group = GROUP
    inputs = (MARKET_STREAMS, streams.STRATEGY_STREAMS)
    input_names = (streams.ALERTS,)
    cluster_ready = True  # reads partition by partition on a cluster; its only outputs are alerts
    forwards = True  # the handler's alerts (a strategy registered on its behalf) go out with the acknowledgements
    bus_counters = ("delivered", "acked", "events", "dead_lettered", "claimed", "failures", "store_retries")

    def __init__(self, settings: Settings, instance: str | None = None) -> None:
        super().__init__(settings, instance)
        if settings.postgres_writer.copy_min_rows < 1:
            raise ConfigError(f"postgres_writer.copy_min_rows = {settings.postgres_writer.copy_min_rows} must "
                              f"be at least 1 (fills per batch from which COPY is used)")
        self.dsn = settings.postgres.dsn
        self.pool: asyncpg.Pool | None = None
        self.catalog = CatalogStore()
        self.strategies = StrategyStore(settings.postgres_writer.copy_min_rows)
        self.count.update({k: 0 for k in (
            "markets_upserted", "markets_unchanged", "alerts_stored", "alerts_duplicate", "strategies_registered",
            "strategies_unchanged", "strategies_auto_registered", "fills_stored", "fills_duplicate",
            "positions_updated", "positions_stale", "position_history_stored", "metrics_stored",
            "metrics_unchanged", "copy_batches", "copy_direct", "rejected", "isolation_splits", "ignored", "batches",
            "connects")})

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

    @staticmethod
    async def _init_connection(conn: asyncpg.Connection) -> None:
        await conn.execute(CREATE_STAGE)  # the COPY staging table lives as long as the session

    async def connect(self) -> None:
        """Apply migrations and open the pool; StoreUnavailable if PostgreSQL cannot be reached."""
        if self.pool is not None:
            return
        try:
            applied = await migrate(self.dsn)
            pool = await asyncpg.create_pool(
                self.dsn, min_size=1, max_size=2, timeout=10, command_timeout=60, init=self._init_connection,
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

    async def prepare(self) -> None:
        await self.connect()

    # -- service --------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        log.info("postgres_writer: group %s reads %s, %s and %s into %s", GROUP, MARKET_STREAMS,
                 streams.STRATEGY_STREAMS, streams.ALERTS, safe_dsn(self.dsn))
        await super().run(stop)  # prepare() until PostgreSQL answers, then read

    async def close(self) -> None:
        if self.pool is not None:
            try:
                await asyncio.wait_for(self.pool.close(), timeout=10)
            except CLOSE_ERRORS:
                self.pool.terminate()
            self.pool = None
        await super().close()

    # -- the handler ----------------------------------------------------------------------------

    async def handle(self, deliveries: list[Delivery]) -> Outputs | None:
        """Write a batch durably (committed on return); StoreUnavailable if PostgreSQL cannot be reached.

        Returns the alerts about auto-registered strategies, which the bus publishes with the acks."""
        items: list[Item] = []
        rejected: list[tuple[Item, str]] = []
        for d in deliveries:
            for i, event in enumerate(d.events):
                item = Item(d.stream, d.entry_id, i, event)
                if isinstance(event, STRATEGY_TYPES):
                    reason = self._check(d.stream, event)
                    if reason:
                        rejected.append((item, reason))
                        continue
                elif not isinstance(event, (Market, Alert)):
                    self.count["ignored"] += 1
                    continue
                items.append(item)
        result = await self._write_isolating(items) if items else WriteResult()
        self.count.update(result.counts)
        self.count["batches"] += 1
        if self.state == "degraded":
            log.info("PostgreSQL at %s is writable again", safe_dsn(self.dsn))
        self.state = "running"
        self.detail = ""
        if rejected or result.rejected:
            await self._reject(rejected + result.rejected)
        alerts: list[Event] = [self._auto_registered_alert(name, it) for name, it in result.auto_registered]
        return {streams.ALERTS: alerts} if alerts else None

    @staticmethod
    def _check(stream: str, event: StrategyInfo | Fill | PositionUpdate | PerformanceMetric) -> str:
        stream = streams.untagged(stream)  # a cluster's strategy:{name}:{p<k>}
        if not stream.startswith(STRATEGY_PREFIX):
            return f"a strategy event on {stream}; publish it on {streams.strategy(event.strategy)}"
        if stream != streams.strategy(event.strategy):
            return (f"names strategy {event.strategy!r} but was published on {stream}; publish each strategy's "
                    f"events on its own stream {streams.strategy(event.strategy)} (common.strategy_events)")
        return "; ".join(problems(event))

    async def _write_isolating(self, items: list[Item]) -> WriteResult:
        """Write `items`; if PostgreSQL refuses some, split in halves until each refused event stands alone."""
        try:
            return await self._write(items)
        except REFUSED as exc:
            if len(items) == 1:
                message = str(exc) if len(str(exc)) <= 1000 else f"{str(exc)[:1000]}... (clipped)"
                return WriteResult(rejected=[(items[0], f"PostgreSQL refused it: {type(exc).__name__}: {message}")])
            self.count["isolation_splits"] += 1
            log.warning("PostgreSQL refused a batch of %d events (%s: %s); isolating the refused ones",
                        len(items), type(exc).__name__, exc)
            mid = len(items) // 2
            first = await self._write_isolating(items[:mid])
            return first.merge(await self._write_isolating(items[mid:]))

    async def _write(self, items: list[Item]) -> WriteResult:
        markets = [it for it in items if isinstance(it.event, Market)]
        alerts = [it for it in items if isinstance(it.event, Alert)]
        strategy_items = [it for it in items if isinstance(it.event, STRATEGY_TYPES)]
        result = WriteResult()
        try:
            if self.pool is None:
                await self.connect()
            assert self.pool is not None
            async with self.pool.acquire(timeout=30) as conn, conn.transaction():
                if strategy_items:
                    written = await self.strategies.write(conn, strategy_items)
                    result.counts.update(written.counts)
                    result.rejected += written.conflicts
                    first_use: dict[str, Item] = {}
                    for it in strategy_items:
                        first_use.setdefault(it.event.strategy, it)  # type: ignore[union-attr]
                    result.auto_registered = [(name, first_use[name]) for name in written.auto_registered]
                if markets or alerts:
                    result.counts.update(await self.catalog.write(conn, markets, alerts))
            return result
        except StoreUnavailable as exc:
            self._degraded(exc)
            raise
        except UNAVAILABLE as exc:
            err = self._unavailable(exc)
            self._degraded(err)
            raise err from exc
        except asyncpg.InterfaceError as exc:
            # Leaving the transaction of a connection that broke masks the connection error with this one.
            if not (isinstance(exc.__context__, UNAVAILABLE) or "connection is closed" in str(exc)):
                raise
            err = self._unavailable(exc.__context__ or exc)
            self._degraded(err)
            raise err from exc

    def _degraded(self, exc: StoreUnavailable) -> None:
        self.state = "degraded"
        self.detail = str(exc)

    # -- rejections -----------------------------------------------------------------------------

    async def _reject(self, rejected: list[tuple[Item, str]]) -> None:
        """Alert about each rejected event, then dead-letter their entries with every reason.

        The alerts go first: a crash in between repeats them on redelivery rather than losing them."""
        by_entry: dict[tuple[str, str], list[tuple[Item, str]]] = {}
        for item, reason in sorted(rejected, key=lambda r: (r[0].stream, r[0].entry_id, r[0].idx)):
            by_entry.setdefault((item.stream, item.entry_id), []).append((item, reason))
        alerts: list[Event] = [self._rejected_alert(item, reason) for item, reason in rejected]
        await self.producer.publish({streams.ALERTS: alerts})
        for (stream, entry_id), found in by_entry.items():
            reason = " | ".join(f"event #{it.idx} ({_describe(it.event)}): {why}" for it, why in found)
            log.error("rejected %d event(s) of entry %s of %s: %s", len(found), entry_id, stream, reason)
            await self.consumer.dead_letter(stream, entry_id, f"{GROUP} rejected {len(found)} event(s), wrote "
                                            f"the others of the entry: {reason}")
        self.count["rejected"] += len(rejected)

    def _rejected_alert(self, item: Item, reason: str) -> Alert:
        e = item.event
        values: dict[str, str | None] = {"stream": item.stream, "entry_id": item.entry_id, "index": str(item.idx),
                                         "dead_letter": streams.dead_letter(item.stream)}
        if isinstance(e, STRATEGY_TYPES):
            values["strategy"] = e.strategy
        if isinstance(e, Fill):
            values |= {"exchange_trade_id": e.exchange_trade_id, "price": str(e.price), "amount": str(e.amount)}
        now = now_ns()
        return Alert(rule="postgres_writer.rejected", severity="error", source=self.name,
                     exchange=getattr(e, "exchange", ""), symbol=getattr(e, "symbol", ""),
                     kind=KIND_OF.get(type(e), "event"), reason=f"{_describe(e)}: {reason}; it is in "
                     f"{streams.dead_letter(item.stream)}", values=values, ts_event=now, ts_recv=now)

    def _auto_registered_alert(self, name: str, item: Item) -> Alert:
        now = now_ns()
        reason = (f"strategy {name!r} was not registered when its {_describe(item.event)} arrived on {item.stream}; "
                  f"registered it with empty params so nothing is lost. If the name is a typo, move its rows; "
                  f"otherwise call StrategyEvents.register() first")
        log.warning("%s", reason)
        return Alert(rule="postgres_writer.strategy_auto_registered", severity="warning", source=self.name,
                     exchange="", symbol="", kind=KIND_OF.get(type(item.event), "event"), reason=reason,
                     values={"strategy": name, "stream": item.stream, "entry_id": item.entry_id},
                     ts_event=now, ts_recv=now)


def _describe(event: Event) -> str:
    if isinstance(event, STRATEGY_TYPES):
        return describe(event)
    if isinstance(event, Market):
        return f"market {event.exchange} {event.symbol}"
    if isinstance(event, Alert):
        return f"alert {event.rule}"
    return type(event).__name__
