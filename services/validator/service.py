"""The validator: reads raw:{exchange} (consumer group "validator"), runs the rules of common.quality on every
event, forwards the events that pass to valid:{exchange} and turns every rejected event into one Alert per
failed rule on mdp:alerts. Both outputs are returned from the handler, so the bus publishes them and
acknowledges the inputs in one MULTI/EXEC: an input is never half-forwarded.

Routing: valid:{event.exchange}; an event without an exchange is rejected (fields.missing) and its alert
carries the exchange of the raw stream it came from. Markets pass when exchange and symbol are non-empty.
Alerts found on raw:* are forwarded to mdp:alerts unchanged; heartbeats (not market data) are dropped and
counted as `ignored`.

Counters (heartbeat): events_in, passed, rejected, alerts (alerts published), forwarded_alerts, ignored,
rejected.{rule} per rule, plus the bus consumer's delivered/acked/dead_lettered/failures. Counters count
processing, so a batch retried after a failed publish is counted again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter

from common import quality, streams
from common.bus import Consumer, Delivery, Outputs, Producer, StreamSelector
from common.config import Settings
from common.service import Service
from schemas import Alert, Candle, Event, Market, Ticker, Trade

log = logging.getLogger(__name__)

GROUP = "validator"
INPUT_PATTERN = "raw:*"


class Validator(Service):
    name = "validator"

    def __init__(self, settings: Settings, instance: str | None = None,
                 rules: tuple[quality.Rule, ...] = quality.RULES) -> None:
        super().__init__(settings, instance)
        self.rules = rules
        self.producer = Producer(self.redis, self.codec, settings.bus, source=self.name)
        self.consumer = Consumer(self.redis, self.codec, settings.bus, group=GROUP,
                                 name=self.consumer_name,
                                 selector=StreamSelector(patterns=[INPUT_PATTERN]), producer=self.producer)
        self.rejections = quality.RejectionLog(log)
        self.events_in = 0
        self.passed = 0
        self.rejected = 0
        self.alerts = 0
        self.forwarded_alerts = 0
        self.ignored = 0
        self.rejected_by_rule: Counter[str] = Counter()

    def counters(self) -> dict[str, int]:
        s = self.consumer.stats
        out = {
            "events_in": self.events_in, "passed": self.passed, "rejected": self.rejected,
            "alerts": self.alerts, "forwarded_alerts": self.forwarded_alerts, "ignored": self.ignored,
            "delivered": s.delivered, "acked": s.acked, "dead_lettered": s.dead_lettered,
            "failures": s.failures,
        }
        out.update({f"rejected.{rule}": n for rule, n in self.rejected_by_rule.items()})
        return out

    async def run(self, stop: asyncio.Event) -> None:
        self.state = "running"
        try:
            await self.consumer.run(self.handle, stop)
        finally:
            self.rejections.flush()

    def validate(self, event: Event, stream_exchange: str, ctx: quality.CheckContext,
                 out: dict[str, list[Event]], alerts: list[Alert]) -> None:
        """Route one event: to valid:{exchange} if it passes, else its alerts to `alerts`."""
        findings = quality.check(event, ctx, self.rules)
        if not quality.rejects(findings):
            self.passed += 1
            out.setdefault(streams.valid(event.exchange), []).append(event)  # type: ignore[union-attr]
            return
        self.rejected += 1
        for f in findings:
            self.rejected_by_rule[f.rule] += 1
            alerts.append(quality.to_alert(f, event, self.name, ctx.now_ns, exchange=stream_exchange))

    async def handle(self, batch: list[Delivery]) -> Outputs:
        ctx = quality.CheckContext.from_settings(self.settings.validation, now_ns=time.time_ns())
        out: dict[str, list[Event]] = {}
        alerts: list[Alert] = []
        forwarded: list[Alert] = []
        for delivery in batch:
            stream_exchange = delivery.stream.partition(":")[2]
            for event in delivery.events:
                self.events_in += 1
                if isinstance(event, (Trade, Candle, Ticker, Market)):
                    self.validate(event, stream_exchange, ctx, out, alerts)
                elif isinstance(event, Alert):
                    forwarded.append(event)
                else:  # a Heartbeat: not market data
                    self.ignored += 1
                    if self.ignored == 1:
                        log.warning("ignoring %s events on %s: not market data (counted as 'ignored')",
                                    type(event).__name__, delivery.stream)
        if alerts:
            self.rejections.note(alerts)
        self.alerts += len(alerts)
        self.forwarded_alerts += len(forwarded)
        if alerts or forwarded:
            out[streams.ALERTS] = [*forwarded, *alerts]
        return out
