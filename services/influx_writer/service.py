"""InfluxDB writer: `md:trade:*` into measurement `trades`, closed candles of `md:candle:*` into `ohlcv`.

Consumer group "influx_writer". At start it creates the database (idempotent); while InfluxDB does not answer
it retries with capped backoff, reads nothing and reports `degraded` in its heartbeat.

Each batch the group hands over is encoded in one pass (common/influx.py: one f-string per point) and written
in requests of `influx.batch_points` lines; the handler returns only after InfluxDB answered 204 to every
request, and only then does the bus acknowledge the entries. So:
- InfluxDB down, timing out or answering 5xx: `StoreUnavailable`, the bus retries the same batch in place and
  acknowledges nothing; the backlog waits in Redis and backpressure reaches the producers.
- Authentication refused (401/403): also `StoreUnavailable` (a configuration problem, not the data's): the
  message says to fix influx.username / influx.password; nothing is dead-lettered meanwhile.
- Database not found (dropped while running): created again, the write retried once.
- Any other refusal (a point InfluxDB cannot parse, a field type conflict): `InfluxWriteError`; the bus
  retries entry by entry and dead-letters the entry that keeps failing, with the server's message.
Writes are idempotent: a point is keyed by measurement, tags and timestamp, and both timestamps are derived
from the event (a candle's open_time; a trade's ts_event millisecond plus an offset from its id, see
`common.influx.trade_timestamp`), so a redelivered event overwrites itself with the same values.
Open (not yet closed) candles are skipped: only the final bar is stored.
"""

from __future__ import annotations

import asyncio
import logging
import random

from common.bus import Consumer, Delivery, StoreUnavailable, StreamSelector
from common.config import Settings
from common.influx import InfluxClient, InfluxError, InfluxWriteError, encode_candles, encode_trades
from common.service import Service
from schemas import Candle, Trade

log = logging.getLogger(__name__)

GROUP = "influx_writer"
INPUT_PATTERNS = ("md:trade:*", "md:candle:*")  # streams.market_data(kind, exchange, symbol)


class InfluxWriter(Service):
    name = "influx_writer"

    def __init__(self, settings: Settings, instance: str | None = None) -> None:
        super().__init__(settings, instance)
        self.influx = InfluxClient(settings.influx)
        self.consumer = Consumer(self.redis, self.codec, settings.bus, group=GROUP,
                                 name=self.consumer_name,
                                 selector=StreamSelector(patterns=INPUT_PATTERNS))
        self.count: dict[str, int] = {
            "points_written": 0, "trades": 0, "candles": 0, "candles_open_skipped": 0, "invalid_skipped": 0,
            "ignored": 0, "write_errors": 0, "batches": 0, "database_creates": 0,
        }
        self.version = ""

    def counters(self) -> dict[str, int]:
        s = self.consumer.stats
        return dict(self.count) | {"delivered": s.delivered, "acked": s.acked, "events": s.events,
                                   "dead_lettered": s.dead_lettered, "claimed": s.claimed,
                                   "failures": s.failures, "store_retries": s.store_retries}

    def _where(self) -> str:
        return f"InfluxDB at {self.influx.url}, database {self.influx.database!r}"

    # -- start ----------------------------------------------------------------------------------

    async def prepare(self) -> None:
        """Ping and create the database. StoreUnavailable while InfluxDB cannot be reached.

        A refused CREATE DATABASE (a user without admin rights, a server without InfluxQL CREATE) is logged
        and not fatal: the database may exist already, and the first write tells."""
        self.version = await self.influx.ping()
        try:
            await self.influx.create_database()
            self.count["database_creates"] += 1
            log.info("connected to %s (InfluxDB %s); database ready", self._where(), self.version)
        except InfluxError as exc:
            log.warning("connected to %s (InfluxDB %s) but CREATE DATABASE was refused (%s); writing anyway, "
                        "create the database by hand if writes report it missing",
                        self._where(), self.version, exc)

    async def _prepare_until(self, stop: asyncio.Event) -> None:
        delay = 0.5
        while not stop.is_set():
            try:
                await self.prepare()
                return
            except StoreUnavailable as exc:
                self._degraded(exc)
                log.error("%s; retrying in %.1f s (reading nothing from Redis meanwhile)", exc, delay)
                try:
                    await asyncio.wait_for(stop.wait(), timeout=delay * (0.8 + 0.4 * random.random()))
                except TimeoutError:
                    pass
                delay = min(delay * 2, 30.0)

    async def run(self, stop: asyncio.Event) -> None:
        log.info("influx_writer: group %s reads %s into %s",
                 GROUP, " and ".join(INPUT_PATTERNS), self._where())
        await self._prepare_until(stop)
        if stop.is_set():
            return
        self.state = "running"
        self.detail = ""
        await self.consumer.run(self.handle, stop)

    async def close(self) -> None:
        await self.influx.close()
        await super().close()

    # -- the handler ----------------------------------------------------------------------------

    async def handle(self, deliveries: list[Delivery]) -> None:
        """Write a batch durably (answered 204 on return); StoreUnavailable if InfluxDB cannot take it."""
        trades: list[Trade] = []
        closed: list[Candle] = []
        open_candles = ignored = 0
        for d in deliveries:
            for event in d.events:
                kind = type(event)
                if kind is Trade:
                    trades.append(event)  # type: ignore[arg-type]
                elif kind is Candle:
                    if event.closed:  # type: ignore[union-attr]
                        closed.append(event)  # type: ignore[arg-type]
                    else:
                        open_candles += 1
                else:
                    ignored += 1
        lines = encode_trades(trades)
        n_trades = len(lines)
        encode_candles(closed, lines)
        n_candles = len(lines) - n_trades
        invalid = len(trades) - n_trades + len(closed) - n_candles
        if invalid:
            log.warning("skipped %d trades/candles without price, amount or OHLCV values (the validator "
                        "should have rejected them)", invalid)
        if lines:
            await self._write(lines)
        self.count["points_written"] += len(lines)
        self.count["trades"] += n_trades
        self.count["candles"] += n_candles
        self.count["candles_open_skipped"] += open_candles
        self.count["invalid_skipped"] += invalid
        self.count["ignored"] += ignored
        self.count["batches"] += 1
        if self.state == "degraded":
            log.info("%s is writable again", self._where())
        self.state = "running"
        self.detail = ""

    async def _write(self, lines: list[str]) -> None:
        try:
            try:
                await self.influx.write_lines(lines)
            except InfluxWriteError as exc:
                if not exc.database_not_found:
                    raise
                log.warning("%s: database not found; creating it and writing again", self._where())
                try:
                    await self.influx.create_database()
                except InfluxError as create_exc:
                    raise StoreUnavailable(
                        f"{self._where()}: the database does not exist and cannot be created ({create_exc}); "
                        f"create it (CREATE DATABASE) or give influx.username admin rights") from create_exc
                self.count["database_creates"] += 1
                await self.influx.write_lines(lines)
        except StoreUnavailable as exc:
            self.count["write_errors"] += 1
            self._degraded(exc)
            raise
        except InfluxWriteError as exc:
            self.count["write_errors"] += 1
            if exc.unauthorized:
                err = StoreUnavailable(f"{self._where()} refused our credentials (HTTP {exc.status} "
                                       f"{exc.body}); fix influx.username / influx.password "
                                       f"(MDP_INFLUX_USERNAME, MDP_INFLUX_PASSWORD); nothing is "
                                       f"acknowledged meanwhile")
                self._degraded(err)
                raise err from exc
            raise

    def _degraded(self, exc: BaseException) -> None:
        self.state = "degraded"
        self.detail = str(exc)
