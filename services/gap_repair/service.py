"""The gap repair service: reads mdp:gaps (consumer group "gap_repair") and scans the stored candles, and
answers every hole with the missing data, a proven-empty range, or an alert (docs/gap-repair.md).

Delivery: the repaired trades and candles are the handler's outputs for raw:{exchange} (they flow through
validator -> normalizer -> md:* -> influx writer and aggregator like live data); they, the repair's alerts
(info audits, error `gap.unrepaired`) and the Gap entry's acknowledgement go out in one MULTI/EXEC. So a
repair killed after its REST fetch published nothing and acknowledged nothing: the Gap is redelivered,
fetched again and its data reaches raw:{exchange} once. Before the acknowledgement only the ledger's
known-empty ranges are written (evidence of the exchange, nothing to publish for them). A store that is down
(InfluxDB, PostgreSQL) raises StoreUnavailable: the bus retries the same entries in place, nothing is
acknowledged meanwhile. The exchange being down is not a store failure: after `gap_repair.retries` attempts
the gap becomes an unrepaired alert (the scan tries candle holes again later). Repeating a Gap is harmless:
candles InfluxDB holds (or the ledger knows empty) are not fetched again, trades it holds are not published
again, and what an acknowledged repair of this process published is neither (services/gap_repair/published.py).

The scan runs every `gap_repair.scan_interval_s` beside the consumer (services/gap_repair/scan.py).

Counters (heartbeat, `mdp status`): gaps_in; per Gap outcome gaps_repaired, gaps_empty, gaps_explained,
gaps_unrepaired; per scan outcome scan_repaired, scan_empty, scan_explained, scan_unrepaired; scans,
scan_holes, scan_failures; candles_repaired, candles_empty, candles_rejected, trades_repaired,
trades_rejected; alerts; plus the bus consumer's delivered/acked/dead_lettered/failures; partitioned
(bus.partitions > 1 or a cluster), partitions_held, and DETAIL names the partitions this instance holds.
"""

from __future__ import annotations

import asyncio
import logging

import asyncpg
import redis.asyncio as aioredis

from common.backoff import sleep_unless
from common.bus import streams
from common.bus.core import (
    Consumer,
    Delivery,
    Outputs,
    Producer,
    StreamSelector,
)
from common.bus.partitions import Partitions
from common.bus.stage import Service
from common.config import Settings
from common.errors import StoreUnavailable
from common.history.ingest import Checker, Sink
from common.history.ledger import Ledger
from common.stores.influx import InfluxClient
from schemas import Candle, Gap, Trade
from services.gap_repair.candles import CandleRepair
from services.gap_repair.outcome import SOURCE
from services.gap_repair.published import Published
from services.gap_repair.repair import Repairer, add_outputs
from services.gap_repair.scan import Scanner
from services.gap_repair.trades import TradeRepair
from services.gap_repair.venues import Venues

log = logging.getLogger(__name__)

GROUP = "gap_repair"
_PG_DOWN = (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError, asyncpg.CannotConnectNowError)


async def build_repairer(settings: Settings, redis: aioredis.Redis, producer: Producer,
                         ledger: Ledger, influx: InfluxClient) -> tuple[Repairer, Venues]:
    """The repairer on open store clients (the service's, or a test's)."""
    venues = Venues(settings, redis)
    sink = Sink(influx, ledger, producer, "rest")
    published = Published()
    candles = CandleRepair(venues, Checker(settings, SOURCE), sink, settings.gap_repair.retries, published)
    trades = TradeRepair(settings, venues, sink, published)
    return Repairer(settings, candles, trades, Scanner(influx, ledger, sink)), venues


class GapRepair(Service):
    name = "gap_repair"
    cluster_ready = True  # on a cluster it reads each partition's Gaps and repairs into that partition
    # With bus.partitions = P > 1 (or on a cluster) each partition's Gaps (mdp:gaps:p{k}) are read, and its
    # symbols scanned, by the one instance holding the partition's lease: two instances never repair one
    # hole at once, which their separate memories of what they published (published.py) could not prevent.
    partitioned = True

    def __init__(self, settings: Settings, instance: str | None = None) -> None:
        super().__init__(settings, instance)
        self.producer = Producer(self.redis, self.codec, settings.bus, source=self.name)
        self.consumer: Consumer | Partitions
        bus = settings.bus
        if bus.partitions > 1 or bus.cluster:
            # One Gap stream per partition, mdp:gaps:p{k} (mdp:gaps:{p<k>} on a cluster), read partition by
            # partition. On one node also mdp:gaps, in the partition its name hashes to: Gaps written before
            # bus.partitions was raised, or by a tool.
            patterns = (f"{streams.GAPS}:*",) if bus.cluster else (streams.GAPS, f"{streams.GAPS}:p*")
            self.consumer = Partitions(self.redis, self.codec, bus, self.name, self.instance, GROUP, patterns,
                                       self.producer, None, on_acked=self._acked)
        else:
            self.consumer = Consumer(self.redis, self.codec, settings.bus, group=GROUP, name=self.consumer_name,
                                     selector=StreamSelector(names=[streams.GAPS]), producer=self.producer,
                                     on_acked=self._acked)
        self.influx = InfluxClient(settings.influx)
        self.ledger: Ledger | None = None
        self.venues: Venues | None = None
        self.repairer: Repairer | None = None
        self.alerts = 0
        self.ignored = 0

    def counters(self) -> dict[str, int]:
        s = self.consumer.stats
        out = {"alerts": self.alerts, "ignored": self.ignored, "delivered": s.delivered, "acked": s.acked,
               "dead_lettered": s.dead_lettered, "failures": s.failures}
        if self.repairer is not None:
            out.update(self.repairer.counts)
        if isinstance(self.consumer, Partitions):
            out["partitions_held"] = len(self.consumer.live)
            if self.state == "running":  # what `mdp status` shows in DETAIL, as for a partitioned stage
                self.detail = self.consumer.describe()
        return out

    async def run(self, stop: asyncio.Event) -> None:
        self.ledger = await Ledger.connect(self.settings.postgres.dsn)
        self.repairer, self.venues = await build_repairer(self.settings, self.redis, self.producer, self.ledger,
                                                          self.influx)
        self.state = "running"
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.consumer.run(self.handle, stop))
            tg.create_task(self._scan_loop(stop))

    async def close(self) -> None:
        if self.venues is not None:
            await self.venues.close()
        if self.ledger is not None:
            await self.ledger.close()
        await self.influx.close()
        await super().close()

    async def handle(self, batch: list[Delivery]) -> Outputs:
        """Repair every Gap of the batch; the repaired data and the alerts go out with the acknowledgement."""
        assert self.repairer is not None
        partition = self._partition(batch)
        self.repairer.discarded(partition)  # a batch handled before and not acknowledged is handled again
        outputs: Outputs = {}
        for delivery in batch:
            for event in delivery.events:
                if not isinstance(event, Gap):
                    self.ignored += 1
                    continue
                try:
                    out = await self.repairer.repair_gap(event, partition=partition)
                except _PG_DOWN as exc:
                    raise StoreUnavailable(f"PostgreSQL (coverage ledger) is unavailable: {exc}") from exc
                add_outputs(outputs, out, self.settings.bus)
        self.alerts += len(outputs.get(streams.ALERTS, ()))
        return outputs

    def _partition(self, batch: list[Delivery]) -> int | None:
        """The partition a batch came from (a batch comes from one partition's consumer), None unpartitioned:
        the instance handles its partitions' batches concurrently, each with its own staging (published.py)."""
        if not isinstance(self.consumer, Partitions) or not batch:
            return None
        return self.consumer.partition_of(batch[0].stream)

    def _mine(self, symbol: str) -> bool:
        """Whether this instance scans `symbol`'s candles: partitioned, only while it holds its partition."""
        if not isinstance(self.consumer, Partitions):
            return True
        return streams.partition_of(symbol, self.consumer.count) in self.consumer.live

    def _acked(self, batch: list[Delivery]) -> None:
        if self.repairer is not None:
            self.repairer.committed(self._partition(batch))

    async def _scan_loop(self, stop: asyncio.Event) -> None:
        assert self.repairer is not None
        interval = max(1.0, self.settings.gap_repair.scan_interval_s)
        while not stop.is_set():
            try:
                outputs = await self.repairer.scan(mine=self._mine)
                if outputs:
                    await self.producer.publish(outputs)
                    self.repairer.published.remember(
                        e for stream, events in outputs.items() if stream != streams.ALERTS
                        for e in events if isinstance(e, (Trade, Candle)))
                    self.alerts += len(outputs.get(streams.ALERTS, ()))
            except (StoreUnavailable, *_PG_DOWN) as exc:
                self.repairer.counts["scan_failures"] += 1
                log.error("scan failed, a store is unavailable (next scan in %.0f s): %s", interval, exc)
            if await sleep_unless(stop, interval):
                return


__all__ = ["GROUP", "GapRepair", "build_repairer"]
