"""The collector's Gaps (to `mdp:gaps`, for services/gap_repair), one builder per way data goes missing:

- `outage_gap`: a channel broke (reconnect, stall, restart) and its first message afterwards arrived;
- `dropped_gap`: batches dropped at the outbox's bound while Redis was down (with its alert);
- `lost_gap`: Redis came back without what we had published (its stored position is behind ours).

On exchanges whose trade ids count up by one (`quality.sequential_trade_ids`) each names the missing ids in
`first_missing_id`/`last_missing_id` and in its reason (`trade ids A..B missing`), which gap_repair fetches by id.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from schemas import Alert, Gap
from services.collector.outbox import Dropped, Position

log = logging.getLogger(__name__)


@dataclass
class Outage:
    """A break in a channel: from the exchange time of the last message before it (`start_ns`), why, and
    the last id seen (trades), so a repairer can fetch from there."""

    start_ns: int
    reason: str
    last_id: str


def outage_gap(exchange: str, sequential: bool, symbol: str, channel: str, outage: Outage, end_ns: int,
               first_id: str = "") -> Gap:
    """The Gap of `outage`, ended by a message at exchange time `end_ns` (the first trade's id `first_id`)."""
    reason = outage.reason
    first_missing = last_missing = ""
    if channel == "trades" and outage.last_id:
        reason += f"; last_trade_id={outage.last_id}"
        if first_id:
            reason += f", first_trade_id_after={first_id}"
        if sequential and outage.last_id.isdigit() and first_id.isdigit():
            # the ids services/gap_repair fetches by id (its `trade ids A..B missing` form)
            lo, hi = int(outage.last_id) + 1, int(first_id) - 1
            reason += f"; trade ids {lo}..{hi} missing" if hi >= lo else "; no trade id missing"
            if hi >= lo:
                first_missing, last_missing = str(lo), str(hi)
    now = time.time_ns()
    log.warning("gap in %s %s %s from %d to %d (%.3f s): %s", exchange, symbol, channel,
                outage.start_ns, end_ns, (end_ns - outage.start_ns) / 1e9, reason)
    return Gap(exchange=exchange, symbol=symbol, channel=channel, start=outage.start_ns,
               end=max(end_ns, outage.start_ns), reason=reason, ts_event=now, ts_recv=now,
               first_missing_id=first_missing, last_missing_id=last_missing)


def dropped_gap(exchange: str, sequential: bool, run: Dropped, limit: int) -> tuple[Gap, Alert]:
    """The Gap and the alert for a run of batches dropped at the outbox's bound (`limit` events) while Redis
    was down."""
    now = time.time_ns()
    reason = (f"dropped at the collector's bound: {run.events} {run.channel} events taken from the exchange "
              f"while Redis was unreachable did not fit in publish_buffer_events={limit}")
    first_missing = last_missing = ""
    if run.first_id:
        reason += f"; trade ids {run.first_id}..{run.last_id} dropped"
        if sequential and run.first_id.isdigit() and run.last_id.isdigit():
            reason += f"; trade ids {run.first_id}..{run.last_id} missing"
            first_missing, last_missing = run.first_id, run.last_id
    log.error("gap in %s %s %s from %d to %d: %s", exchange, run.symbol, run.channel, run.first_ns,
              run.last_ns, reason)
    gap = Gap(exchange=exchange, symbol=run.symbol, channel=run.channel, start=run.first_ns,
              end=run.last_ns + 1, reason=reason, ts_event=now, ts_recv=now, first_missing_id=first_missing,
              last_missing_id=last_missing)
    alert = Alert(rule="collector.buffer_overflow", severity="error", source=f"collector:{exchange}",
                  exchange=exchange, symbol=run.symbol, kind=run.channel,
                  reason=reason + "; raise publish_buffer_events or restore Redis sooner (a Gap is on mdp:gaps)",
                  values={"dropped_events": str(run.events), "first_trade_id": run.first_id,
                          "last_trade_id": run.last_id, "limit": str(limit)},
                  ts_event=now, ts_recv=now)
    return gap, alert


def lost_gap(exchange: str, sequential: bool, channel: str, symbol: str, ours: Position, theirs: Position | None,
             started_at: int) -> Gap:
    """The Gap of what Redis lost of a feed: it holds position `theirs` (None: gone, then everything since
    `started_at`, this process's start), we had published up to `ours`."""
    now = time.time_ns()
    start = theirs.ts_event if theirs else started_at
    reason = (f"Redis lost published data: its position for {channel} {symbol} is {theirs or 'gone'}, "
              f"we had published up to {ours}")
    first_missing = last_missing = ""
    if theirs and theirs.trade_id.isdigit() and ours.trade_id.isdigit() and sequential:
        first_missing, last_missing = str(int(theirs.trade_id) + 1), ours.trade_id
        reason += f"; trade ids {first_missing}..{last_missing} missing"
    log.error("gap in %s %s %s from %d to %d: %s", exchange, symbol, channel, start, ours.ts_event, reason)
    return Gap(exchange=exchange, symbol=symbol, channel=channel, start=start, end=max(ours.ts_event + 1, start),
               reason=reason, ts_event=now, ts_recv=now, first_missing_id=first_missing,
               last_missing_id=last_missing)
