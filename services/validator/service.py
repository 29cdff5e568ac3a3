"""The validator: reads raw:{exchange} (consumer group "validator"), runs the rules of common.domain.quality on every
event, then the stream rules of common.domain.series (which compare an event with what came before in
its series), and forwards what passes to valid:{exchange}: flagged events as copies whose `quality` names the
flags. Rejected events become one Alert per failed rule on mdp:alerts (with the offending values) and are
never forwarded; flags, repairs and gaps also become Alerts (flags throttled per series and rule, see
series.py), gaps also Gap events on mdp:gaps.

Atomicity: the handler returns its outputs; the bus publishes them and acknowledges the inputs in one
MULTI/EXEC, which also writes the checkpoint of every series the batch touched (the consumer's `on_commit`
hook: hash mdp:state:validator, common/bus/checkpoint.py); only then (`on_acked`) is the series state staged for
the batch committed in memory. A batch whose publish fails is therefore judged again against the same state;
when the outcome of a commit is unknown (no `on_acked` followed it), the memory is dropped and reloaded from
the checkpoint, which is what Redis holds. A new process loads each series' checkpoint the first time it
meets the series: no gap, duplicate or outlier verdict is lost to a restart.

Routing: valid:{event.exchange}; an event without an exchange is rejected (fields.missing) and its alert
carries the exchange of the raw stream it came from. Markets pass when exchange and symbol are non-empty.
Alerts found on raw:* are forwarded to mdp:alerts unchanged; heartbeats (not market data) are dropped and
counted as `ignored`.

Scaling: the stream rules need every event of a series in one process. With bus.partitions = 1, one
validator works at a time: it holds the lease mdp:lease:validator (common/checkpoint.stage_lease), verified
in every commit. A second instance waits as standby and takes over, from the checkpoint, when the holder dies
(the lease expires) or stops (it releases the lease); it never publishes while the first holds it. With
P > 1 the collectors write raw:{exchange}:p{k} (k from the base asset of the event's symbol), each partition
has its own lease mdp:lease:validator:p{k} and checkpoint mdp:state:validator:p{k}, the instances alive share
the partitions (common/bus/partitions.py), and what passes goes to valid:{exchange}:p{k}.

Counters (heartbeat): events_in, passed, rejected, flagged (events forwarded with a flag), repaired (events
dropped as duplicates), alerts (alerts published), gaps (Gap events published), forwarded_alerts, ignored,
series (series in memory), series_evicted, series_loaded (from the checkpoint), checkpoint_undecodable,
and per rule `rejected.{rule}`, `flagged.{rule}`,
`repaired.{rule}`, `alerted.{rule}` (what `mdp status` shows per rule), plus the bus consumer's
delivered/acked/dead_lettered/failures. Counters count processing, so a batch retried after a failed publish
is counted again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import ClassVar

from common.bus import streams
from common.bus.core import Delivery, Outputs
from common.bus.stage import Stage
from common.config import Settings
from common.domain import quality
from common.domain.series import CandleSeries, StreamRules, TradeSeries, VenueCloses
from common.domain.state import SeriesKey, Staging
from schemas import Alert, Candle, Event, FundingRate, Market, OpenInterest, OrderBook, Ticker, Trade
from services.validator.market_rules import VALIDATOR_RULES

log = logging.getLogger(__name__)

GROUP = "validator"
INPUT_PATTERN = "raw:*"
VERB = {"reject": "rejected", "flag": "flagged", "repair": "repaired", "alert": "alerted"}
COUNTERS = ("events_in", "passed", "rejected", "flagged", "repaired", "alerts", "gaps", "forwarded_alerts", "ignored")


def series_keys(batch: list[Delivery]) -> set[SeriesKey]:
    """The series the stream rules may touch for a batch (common/domain/series.py)."""
    keys: set[SeriesKey] = set()
    for d in batch:
        for e in d.events:
            if isinstance(e, (Trade, Ticker)):
                keys.add((e.exchange, e.symbol, "trade", ""))
            elif isinstance(e, Candle) and e.closed:
                keys.add((e.exchange, e.symbol, "candle", e.timeframe))
                keys.add(("*", e.symbol, "venue", e.timeframe))
    return keys


class Validator(Stage):
    name = "validator"
    group = GROUP
    inputs = (INPUT_PATTERN,)
    forwards = True
    state_types: ClassVar[dict[str, type] | None] = {"trade": TradeSeries, "candle": CandleSeries, "venue": VenueCloses}
    partitioned = True
    cluster_ready = True  # its commits touch its partition's keys only, tagged on a cluster

    def __init__(self, settings: Settings, instance: str | None = None,
                 rules: tuple[quality.Rule, ...] = VALIDATOR_RULES) -> None:
        super().__init__(settings, instance)
        self.partition_count = settings.bus.partitions
        self.cluster = settings.bus.cluster  # partition k's streams are tagged: valid:{exchange}:{p<k>}
        self.rules = rules
        self.rejections = quality.RejectionLog(log)
        self.stream_rules = StreamRules(settings.quality)
        self.count.update(dict.fromkeys(COUNTERS, 0))  # and per rule "{rejected|flagged|repaired|alerted}.{rule}"

    @property
    def passed(self) -> int:
        return self.count["passed"]

    @property
    def rejected(self) -> int:
        return self.count["rejected"]

    async def run(self, stop: asyncio.Event) -> None:
        try:
            await super().run(stop)
        finally:
            self.rejections.flush()

    def validate(self, event: Event, stream_exchange: str, ctx: quality.CheckContext, staging: Staging,
                 out: dict[str, list[Event]], alerts: list[Alert], gaps: list[Event],
                 partition: int | None = None) -> None:
        """Route one event: to valid:{exchange} (its partition's valid:{exchange}:p{k} with bus.partitions > 1)
        if it passes (flagged or not), else its alerts to `alerts`."""
        findings = quality.check(event, ctx, self.rules)
        if quality.rejects(findings):
            self.count["rejected"] += 1
            for f in findings:
                self.count[f"rejected.{f.rule}"] += 1
                alerts.append(quality.to_alert(f, event, self.name, ctx.now_ns, exchange=stream_exchange))
            return
        verdict = self.stream_rules.judge(event, staging, ctx.now_ns)
        for f, send in zip(verdict.findings, verdict.alert, strict=True):
            self.count[f"{VERB[f.policy]}.{f.rule}"] += 1
            if send:
                alerts.append(quality.to_alert(f, event, self.name, ctx.now_ns, exchange=stream_exchange))
        gaps.extend(verdict.gaps)
        forwarded = verdict.event
        if forwarded is None:
            self.count["rejected" if verdict.rejected else "repaired"] += 1
            return
        self.count["passed"] += 1
        if forwarded is not event:
            self.count["flagged"] += 1
        # A verdict forwards only the market event it judged (all have `exchange`); no cast on this hot path.
        out.setdefault(streams.valid(forwarded.exchange, partition, self.cluster), []).append(forwarded)  # type: ignore[union-attr]

    def restore(self, key: SeriesKey, state: object) -> object:
        if isinstance(state, CandleSeries):  # the encoding keeps the values, not the deques' bound
            window = self.settings.quality.outlier_window
            state.returns, state.jumps = deque(state.returns, window), deque(state.jumps, window)
        return state

    def series_of(self, batch: list[Delivery]) -> set[SeriesKey]:
        return series_keys(batch)

    async def judge(self, batch: list[Delivery], staging: Staging) -> Outputs:
        ctx = quality.CheckContext.from_settings(self.settings.validation, now_ns=time.time_ns())
        out: dict[str, list[Event]] = {}
        alerts: list[Alert] = []
        forwarded: list[Alert] = []
        gaps: list[Event] = []
        partition: int | None = None  # a batch comes from one partition's consumer
        for delivery in batch:
            stream_exchange = streams.exchange_of_stream(delivery.stream)
            # Partitioned: what passes goes on to the same partition (the event's symbol hashed there already).
            partition = (streams.partition_of_stream(delivery.stream, self.partition_count)
                         if self.partition_count > 1 or self.cluster else None)
            for event in delivery.events:
                self.count["events_in"] += 1
                if isinstance(event, (Trade, Candle, Ticker, Market, OrderBook, FundingRate, OpenInterest)):
                    self.validate(event, stream_exchange, ctx, staging, out, alerts, gaps, partition)
                elif isinstance(event, Alert):
                    forwarded.append(event)
                else:  # a Heartbeat or a Gap: not market data
                    self.count["ignored"] += 1
                    if self.count["ignored"] == 1:
                        log.warning("ignoring %s events on %s: not market data (counted as 'ignored')",
                                    type(event).__name__, delivery.stream)
        rejections = [a for a in alerts if a.severity == "error"]
        if rejections:
            self.rejections.note(rejections)
        self.count["alerts"] += len(alerts)
        self.count["gaps"] += len(gaps)
        self.count["forwarded_alerts"] += len(forwarded)
        if alerts or forwarded:
            out[streams.ALERTS] = [*forwarded, *alerts]
        if gaps:  # to the partition's mdp:gaps:p{k}, read by the gap_repair instance holding it
            out[streams.gaps(partition, self.cluster)] = gaps
        return out
