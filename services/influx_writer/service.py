"""InfluxDB writer: `md:trade:*` into measurement `trades` of the ticks tier, closed candles of `md:candle:*`
into measurement `ohlcv` of their timeframe's tier (common/stores/influx.py, docs/storage.md).

Consumer group "influx_writer". At start it connects (learning the server's generation: 1.x, 2.x or 3.x) and
makes sure every storage tier exists with its configured retention (`ensure_tiers`, idempotent, the same as
`mdp init`); while InfluxDB does not answer it retries with capped backoff, reads nothing and reports
`degraded` in its heartbeat.

Routing: trades go to the tier holding "ticks"; a candle goes to the tier of its `timeframe` (1m, 5m, 15m
with 1m; 1h, 4h with 1h; 1d with 1d by default). The aggregator publishes 5m..1d candles on the same
`md:candle:{exchange}:{symbol}` streams, so downsampled bars reach their tiers here, before 1m expires.

Throughput (docs/bench-storage.md): the writer runs `influx.writer_consumers` (4) consumers of its group in
the process, each reading batches of `influx.writer_read_count` (20) entries, so batches are read and decoded
while others are being written, and the small batches keep the event loop from stalling InfluxDB's requests
while one decodes (at most 4 x 20 entries in memory); within a batch, each tier's points are encoded
`influx.batch_points` at a time and every chunk is sent as soon as it is encoded, with at most
`influx.write_concurrency` requests in flight for the process, so encoding overlaps InfluxDB's work. A
batch's handler returns only after InfluxDB answered 204 to every request of it, and only then does the bus
acknowledge its entries (batches of different consumers are acknowledged independently; InfluxDB points carry
their own time, so their order does not matter). So:
- InfluxDB down, timing out or answering 5xx: `StoreUnavailable`, the bus retries the same batch in place and
  acknowledges nothing; the backlog waits in Redis and backpressure reaches the producers.
- Authentication refused (401/403): also `StoreUnavailable` (a configuration problem, not the data's): the
  message says which setting to fix; nothing is dead-lettered meanwhile.
- A tier not found (database, retention policy or bucket dropped while running): the tiers are made again,
  the write retried once.
- Any other refusal (a point InfluxDB cannot parse, a field type conflict): `InfluxWriteError`; the bus
  retries entry by entry and dead-letters the entry that keeps failing, with the server's message (a consumer
  keeps that message in memory: when another consumer of the process is the one that dead-letters the entry,
  the letter points to the log, where the failure was logged with it).
- Points older than their tier's retention (a late backfill) are not written: InfluxDB would drop them (1.x
  refuses them outright), so they are counted (`expired_skipped`) and the entry is acknowledged.
Writes are idempotent: a point is keyed by measurement, tags and timestamp, and both timestamps are derived
from the event (a candle's open_time; a trade's ts_event millisecond plus an offset from its id, see
`common.stores.influx.trade_timestamp`), so a redelivered event overwrites itself with the same values.
Open (not yet closed) candles are skipped: only the final bar is stored.
Funding rates and open interest (md:funding:*, md:open_interest:*) are stored as time series in the ticks
tier (measurements `funding` and `open_interest`, common.stores.influx.encode_snapshots); tickers and order books are
not stored (the cache and the md:* streams carry them).
Trades and candles are decoded with their decimals as text (wire.py): the writer only writes them out again.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import logging
import time
from typing import cast

import msgspec

from common.bus.core import Consumer, ConsumerStats, Delivery, Handler, StreamSelector
from common.bus.partitions import Partitions
from common.bus.stage import Stage
from common.config import Settings
from common.errors import StoreUnavailable
from common.status import STORED_LATENCY_BUCKETS_MS, STORED_LATENCY_KEYS
from common.stores.influx import (
    InfluxClient,
    InfluxError,
    InfluxWriteError,
    Tier,
    encode_candles,
    encode_snapshots,
)
from schemas import Candle, FundingRate, OpenInterest, Trade
from services.influx_writer.wire import CandleText, TradeText, WireCodec, encode_trade_lines

log = logging.getLogger(__name__)

GROUP = "influx_writer"
_ONLY_TRADES = {TradeText}
INPUT_PATTERNS = ("md:trade:*", "md:candle:*", "md:funding:*", "md:open_interest:*")  # streams.market_data


class Consumers:
    """The writer's consumers seen as one: `run` runs them all, `stats` sums theirs."""

    def __init__(self, consumers: list[Consumer]) -> None:
        self.consumers = consumers

    @property
    def stats(self) -> ConsumerStats:
        total = ConsumerStats()
        for c in self.consumers:
            s = c.stats
            total.delivered += s.delivered
            total.acked += s.acked
            total.events += s.events
            total.dead_lettered += s.dead_lettered
            total.claimed += s.claimed
            total.failures += s.failures
            total.store_retries += s.store_retries
            total.last_error = total.last_error or s.last_error
        total.state = "degraded" if any(c.stats.state == "degraded" for c in self.consumers) else \
            self.consumers[0].stats.state
        return total

    async def run(self, handler: Handler, stop: asyncio.Event) -> None:
        await asyncio.gather(*(c.run(handler, stop) for c in self.consumers))

    async def dead_letter(self, stream: str, entry_id: str, reason: str) -> None:
        await self.consumers[0].dead_letter(stream, entry_id, reason)


class InfluxWriter(Stage):
    name = "influx_writer"
    group = GROUP
    inputs = INPUT_PATTERNS
    cluster_ready = True  # reads partition by partition on a cluster, and writes nothing to Redis but its acks
    bus_counters = ("delivered", "acked", "events", "dead_lettered", "claimed", "failures", "store_retries")

    def __init__(self, settings: Settings, instance: str | None = None) -> None:
        super().__init__(settings, instance)
        self.influx = InfluxClient(settings.influx)
        self.plan = self.influx.plan
        self._slots = asyncio.Semaphore(max(1, settings.influx.write_concurrency))
        self._remaking = asyncio.Lock()
        self._bounds_ns = [b * 1_000_000 for b in STORED_LATENCY_BUCKETS_MS]
        self._latency = [0] * len(STORED_LATENCY_KEYS)  # per bucket (the last: beyond every bound)
        self._expired_logged_at = float("-inf")
        self._expired_unlogged = 0
        self.count.update(dict.fromkeys((
            "points_written", "trades", "candles", "candles_open_skipped", "invalid_skipped", "expired_skipped",
            "ignored", "write_errors", "batches", "database_creates", "funding", "open_interest",
            *(f"points.{tier.name}" for tier in self.plan.tiers)), 0))
        self.version = ""

    def reader(self) -> Consumers | Partitions:
        # Stable names: consumer k of instance i is "influx_writer-i" (k = 0) or "influx_writer-i.k", so each
        # finds its own pending entries after a restart. Each reads batches of influx.writer_read_count entries.
        bus = msgspec.structs.replace(self.settings.bus, read_count=max(1, self.settings.influx.writer_read_count))
        if self.partitions is not None:  # a cluster: a consumer per partition (writer_consumers does not apply)
            self.partitions = Partitions(self.redis, WireCodec(), bus, self.name, self.instance, GROUP,
                                         INPUT_PATTERNS, self.producer, None)
            return self.partitions
        return Consumers([
            Consumer(self.redis, WireCodec(), bus, group=GROUP,
                     name=self.consumer_name if k == 0 else f"{self.consumer_name}.{k}",
                     selector=StreamSelector(patterns=INPUT_PATTERNS), tx=self.producer.tx)
            for k in range(max(1, self.settings.influx.writer_consumers))])

    def extra_counters(self) -> dict[str, int]:
        # Points InfluxDB dropped as beyond their retention policy were sent, not stored.
        dropped = self.influx.expired_dropped
        cumulative = list(itertools.accumulate(self._latency))
        return {"points_written": self.count["points_written"] - dropped, "expired_dropped": dropped,
                **dict(zip(STORED_LATENCY_KEYS, cumulative, strict=True))}

    def _stored(self, trades: list[Trade | TradeText]) -> None:
        """Count each trade InfluxDB just acknowledged by its ts_recv -> stored latency (common.status buckets)."""
        now, bounds, counts = time.time_ns(), self._bounds_ns, self._latency
        for t in trades:
            if t.ts_recv > 0:
                counts[bisect.bisect_left(bounds, now - t.ts_recv)] += 1

    def _where(self) -> str:
        return f"InfluxDB at {self.influx.url}, database {self.influx.database!r}"

    # -- start ----------------------------------------------------------------------------------

    async def prepare(self) -> None:
        """Connect and make the tiers. StoreUnavailable while InfluxDB cannot be reached.

        Tiers the server refuses to make (a user or token without admin rights) are logged and not fatal:
        they may exist already, and the first write tells."""
        self.version = await self.influx.connect()
        try:
            steps = await self.influx.ensure_tiers()
            self.count["database_creates"] += 1
            log.info("connected to %s (InfluxDB %s, generation %d); tiers ready:\n  %s", self._where(),
                     self.version, self.influx.generation, "\n  ".join(steps))
        except InfluxError as exc:
            log.warning("connected to %s (InfluxDB %s) but making the tiers was refused (%s); writing anyway, "
                        "run `mdp init` with admin rights if writes report a tier missing",
                        self._where(), self.version, exc)

    async def run(self, stop: asyncio.Event) -> None:
        log.info("influx_writer: group %s reads %s into %s; tiers: %s", GROUP, " and ".join(INPUT_PATTERNS),
                 self._where(), "; ".join(f"{t.name} ({', '.join(t.holds)}; {t.retention})"
                                         for t in self.plan.tiers))
        await super().run(stop)  # prepare() until InfluxDB answers, then read

    async def close(self) -> None:
        await self.influx.close()
        await super().close()

    # -- the handler ----------------------------------------------------------------------------

    async def handle(self, deliveries: list[Delivery]) -> None:
        """Write a batch durably (answered 204 on return); StoreUnavailable if InfluxDB cannot take it."""
        trades: list[Trade | TradeText] = []
        snapshots: list[FundingRate | OpenInterest] = []
        closed: dict[Tier, list[Candle | CandleText]] = {}
        open_candles = ignored = expired = 0
        now = time.time_ns()
        ticks = self.plan.ticks
        cutoffs: dict[Tier, int | None] = {ticks: ticks.cutoff_ns(now)}
        for_timeframe = self.plan.for_timeframe
        for d in deliveries:
            if set(map(type, d.events)) == _ONLY_TRADES:  # an md:trade entry: take it whole (the hot path)
                trades.extend(d.events)  # type: ignore[arg-type]
                continue
            for event in d.events:
                kind: type = type(event)  # TradeText / CandleText from WireCodec; Trade / Candle from callers
                if kind is TradeText or kind is Trade:
                    trades.append(event)  # type: ignore[arg-type]
                elif kind is CandleText or kind is Candle:
                    if not event.closed:  # type: ignore[union-attr]
                        open_candles += 1
                        continue
                    tier = for_timeframe(event.timeframe)  # type: ignore[union-attr]
                    if tier not in cutoffs:
                        cutoffs[tier] = tier.cutoff_ns(now)
                    cutoff = cutoffs[tier]
                    if cutoff is not None and event.open_time < cutoff:  # type: ignore[union-attr]
                        expired += 1
                    else:
                        closed.setdefault(tier, []).append(event)  # type: ignore[arg-type]
                elif kind is FundingRate or kind is OpenInterest:
                    snapshots.append(event)  # type: ignore[arg-type]
                else:
                    ignored += 1
        work: list[tuple[Tier, list[Trade | TradeText] | list[Candle | CandleText]]] = []
        if trades:
            work.append((ticks, trades))
        work.extend(closed.items())
        encoded, n_trades = await self._write_all(work, cutoffs[ticks])
        n_candles = sum(encoded.values()) - n_trades
        if snapshots:  # funding and open interest: a few points a second per market, one request
            lines = encode_snapshots(snapshots)
            if lines:
                await self._write(ticks, lines)
                encoded[ticks] = encoded.get(ticks, 0) + len(lines)
            self.count["funding"] += sum(isinstance(e, FundingRate) for e in snapshots)
            self.count["open_interest"] += sum(isinstance(e, OpenInterest) for e in snapshots)
            self.count["points_written"] += len(lines)
        # Trades not encoded: older than the ticks tier keeps, or without price or amount.
        old_trades = 0
        tick_cutoff = cutoffs[ticks]
        if len(trades) != n_trades and tick_cutoff is not None:
            old_trades = sum(t.ts_event < tick_cutoff for t in trades)
        expired += old_trades
        invalid = len(trades) - old_trades - n_trades + sum(len(c) for c in closed.values()) - n_candles
        if expired:
            self._expired_unlogged += expired
            if time.monotonic() - self._expired_logged_at >= 60:  # a backfill would log every batch otherwise
                log.warning("skipped %d trades/candles older than their tier's retention (a late backfill?): "
                            "InfluxDB would not keep them (counter expired_skipped)", self._expired_unlogged)
                self._expired_logged_at = time.monotonic()
                self._expired_unlogged = 0
        if invalid:
            log.warning("skipped %d trades/candles without price, amount or OHLCV values (the validator "
                        "should have rejected them)", invalid)
        self._stored(trades)
        self.count["points_written"] += n_trades + n_candles
        self.count["trades"] += n_trades
        self.count["candles"] += n_candles
        self.count["candles_open_skipped"] += open_candles
        self.count["invalid_skipped"] += invalid
        self.count["expired_skipped"] += expired
        self.count["ignored"] += ignored
        self.count["batches"] += 1
        for tier, n in encoded.items():
            self.count[f"points.{tier.name}"] = self.count.get(f"points.{tier.name}", 0) + n
        if self.state == "degraded":
            log.info("%s is writable again", self._where())
        self.state = "running"
        self.detail = ""

    async def _write_all(self, work: list[tuple[Tier, list[Trade | TradeText] | list[Candle | CandleText]]],
                         trades_not_before: int | None) -> tuple[dict[Tier, int], int]:
        """Encode each tier's events `batch_points` at a time and send every chunk as soon as it is encoded
        (at most `write_concurrency` requests in flight for the process), so encoding overlaps InfluxDB's
        work. Returns the lines encoded per tier and how many of them are trades. Raises after every request
        has finished: the first StoreUnavailable, else the first error, so a retry never races a write still
        in flight."""
        size = self.influx.batch_points
        encoded: dict[Tier, int] = {}
        n_trades = 0
        tasks: list[asyncio.Task[None]] = []
        try:
            for tier, events in work:
                for i in range(0, len(events), size):
                    chunk = events[i:i + size]
                    # `type() is` (the hot path) does not narrow the union as isinstance would.
                    if type(chunk[0]) is TradeText or type(chunk[0]) is Trade:
                        lines = encode_trade_lines(cast("list[Trade | TradeText]", chunk),
                                                   not_before=trades_not_before)  # all trades
                        n_trades += len(lines)
                    else:
                        lines = encode_candles(cast("list[Candle | CandleText]", chunk))
                    encoded[tier] = encoded.get(tier, 0) + len(lines)
                    if not lines:
                        continue
                    await self._slots.acquire()
                    tasks.append(asyncio.create_task(self._send(tier, lines)))
                    await asyncio.sleep(0)  # let the request go out before encoding the next chunk
        finally:
            results = await asyncio.gather(*tasks, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise next((e for e in errors if isinstance(e, StoreUnavailable)), errors[0])
        return encoded, n_trades

    async def _send(self, tier: Tier, lines: list[str]) -> None:
        try:
            await self._write(tier, lines)
        finally:
            self._slots.release()

    async def _write(self, tier: Tier, lines: list[str]) -> None:
        try:
            try:
                await self.influx.write_tier(tier, lines)
            except InfluxWriteError as exc:
                if not exc.database_not_found:
                    raise
                log.warning("%s: tier %r not found (%s); making the tiers and writing again", self._where(),
                            tier.name, exc.body)
                async with self._remaking:  # one remake for the chunks that all found the tier missing
                    try:
                        await self.influx.ensure_tiers()
                    except InfluxError as create_exc:
                        raise StoreUnavailable(
                            f"{self._where()}: tier {tier.name!r} does not exist and cannot be made ({create_exc}); "
                            f"run `mdp init` with admin rights") from create_exc
                    self.count["database_creates"] += 1
                await self.influx.write_tier(tier, lines)
        except StoreUnavailable as exc:
            self.count["write_errors"] += 1
            self._degraded(exc)
            raise
        except InfluxWriteError as exc:
            self.count["write_errors"] += 1
            if exc.unauthorized:
                err = StoreUnavailable(f"{self._where()} refused our credentials (HTTP {exc.status} {exc.body}); "
                                       f"{self.influx.credentials_hint()}; nothing is acknowledged meanwhile")
                self._degraded(err)
                raise err from exc
            raise

    def _degraded(self, exc: BaseException) -> None:
        self.state = "degraded"
        self.detail = str(exc)
