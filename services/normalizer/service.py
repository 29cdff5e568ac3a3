"""The normalizer stage: reads valid:{exchange} (consumer group "normalizer") and publishes the canonical public
feeds md:trade|candle|ticker:{exchange}:{symbol} and md:market:{exchange}. Events it cannot normalize become
Alerts on mdp:alerts; outputs and alerts are returned from the handler, so they are published and the inputs
acknowledged in one MULTI/EXEC. What "canonical" means is `common.domain.normalize` (its docstring holds the
rules); this module is the wiring: the market map learned from the streams, the handler, the counters.

Scaling: the events of a symbol must reach md:* in order, so one normalizer reads a valid:* stream at a time.
With bus.partitions = 1 several instances share the consumer group of valid:{exchange} (run one: two would
interleave a symbol's batches in the order their commits land). With P > 1 each partition
valid:{exchange}:p{k} is read by one instance at a time under the lease mdp:lease:normalizer:p{k}, shared out
among the instances alive (common/bus/partitions.py). A market's catalog entry travels in its symbol's
partition, ahead of its events; an instance that takes a partition over reloads the catalog from md:market:*
first (what the previous holder normalized).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from typing import cast

from common.bus import streams
from common.bus.core import Delivery, Outputs, StreamEntries, StreamSelector
from common.bus.stage import Stage
from common.config import Settings
from common.domain import quality
from common.domain.normalize import Normalizable, Rejected, SymbolMap, normalize
from schemas import (
    Alert,
    Candle,
    DecodeError,
    Event,
    FundingRate,
    Market,
    OpenInterest,
    OrderBook,
    Ticker,
    Trade,
)

log = logging.getLogger(__name__)

GROUP = "normalizer"
INPUT_PATTERN = "valid:*"
MARKET_BOOTSTRAP_ENTRIES = 200  # newest entries of each md:market:* stream read at start (<= 100k markets)

def output_stream(event: Normalizable) -> str:
    if isinstance(event, Market):
        return streams.markets(event.exchange)
    kind = quality.kind_of(event)
    return streams.market_data(kind, event.exchange, event.symbol)


# ---------------------------------------------------------------------------------------------------------
# The service


class Normalizer(Stage):
    name = "normalizer"
    group = GROUP
    inputs = (INPUT_PATTERN,)
    forwards = True
    partitioned = True
    cluster_ready = True  # its commits touch its partition's keys only, tagged on a cluster

    def __init__(self, settings: Settings, instance: str | None = None) -> None:
        super().__init__(settings, instance)
        self.symbols = SymbolMap()
        self.rejections = quality.RejectionLog(log)
        self.events_in = 0
        self.published = 0
        self.rejected = 0
        self.forwarded_alerts = 0
        self.ignored = 0
        self.notes: Counter[str] = Counter()
        self.rejected_by_rule: Counter[str] = Counter()

    def extra_counters(self) -> dict[str, int]:
        out = {
            "events_in": self.events_in, "published": self.published, "rejected": self.rejected,
            "forwarded_alerts": self.forwarded_alerts, "ignored": self.ignored, "known_markets": len(self.symbols),
        }
        out.update(self.notes)
        out.update({f"rejected.{rule}": n for rule, n in self.rejected_by_rule.items()})
        return out

    async def load_markets(self) -> int:
        """Learn exchange ids from the newest entries of every md:market:* stream; returns markets read."""
        count = 0
        for name in await StreamSelector(patterns=["md:market:*"]).resolve(self.redis):
            for _, fields in cast(StreamEntries, await self.redis.xrevrange(name, count=MARKET_BOOTSTRAP_ENTRIES)):
                try:
                    events = self.codec.decode_entry(fields)
                except DecodeError:
                    continue
                for event in events:
                    if isinstance(event, Market):
                        self.symbols.learn(event)
                        count += 1
        if count:
            log.info("learned %d exchange ids from %d markets on md:market:*", len(self.symbols), count)
        return count

    async def on_partition_taken(self, k: int) -> None:
        """A partition taken from another instance: the markets it normalized meanwhile are on md:market:*."""
        await self.load_markets()

    async def run(self, stop: asyncio.Event) -> None:
        await self.load_markets()
        try:
            await super().run(stop)
        finally:
            self.rejections.flush()

    async def handle(self, batch: list[Delivery]) -> Outputs:
        now = time.time_ns()
        out: dict[str, list[Event]] = {}
        alerts: list[Alert] = []
        forwarded: list[Alert] = []
        for delivery in batch:
            stream_exchange = streams.exchange_of_stream(delivery.stream)
            for event in delivery.events:
                self.events_in += 1
                if isinstance(event, Alert):
                    forwarded.append(event)
                    continue
                if not isinstance(event, (Trade, Candle, Ticker, Market, OrderBook, FundingRate,
                                          OpenInterest)):
                    self.ignored += 1
                    continue
                try:
                    result, notes = normalize(event, self.symbols)
                except Rejected as rej:
                    self.rejected += 1
                    self.rejected_by_rule[rej.finding.rule] += 1
                    alerts.append(quality.to_alert(rej.finding, event, self.name, now,
                                                   exchange=stream_exchange))
                    continue
                self.notes.update(notes)
                self.published += 1
                out.setdefault(output_stream(result), []).append(result)
        if alerts:
            self.rejections.note(alerts)
        self.forwarded_alerts += len(forwarded)
        if alerts or forwarded:
            out[streams.ALERTS] = [*forwarded, *alerts]
        return out
