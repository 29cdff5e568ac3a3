"""What became of one gap, and the alerts that say so.

Every gap ends in one of four states (counted in the heartbeat, docs/gap-repair.md):
- repaired: the missing data was fetched and is published into raw:{exchange} (`events`, with the Gap's
  acknowledgement), from where it is validated, normalized and stored like live data (an info
  `gap.repaired` audit alert names how much);
- empty: the exchange proves there was nothing (candles: a known-empty range in the coverage ledger with the
  request as evidence; trades: no trade in the window), an info `gap.explained` alert says so;
- explained: nothing to fetch by design (a book or ticker channel: the next snapshot supersedes what was
  missed; a window not closed yet, which the live feed still delivers), an info `gap.explained` alert;
- unrepaired: what could not be fetched (REST down after bounded retries, history the exchange no longer
  serves, an exchange without a history endpoint): an error `gap.unrepaired` alert naming the window, the
  reason and what to do. Never silence.
A gap may be partly repaired and partly not: it counts as unrepaired, and both alerts go out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from common.domain.span import Span
from schemas import Alert, Candle, Severity, Trade

State = Literal["repaired", "empty", "explained", "unrepaired"]
SOURCE = "gap_repair"
REPAIRED = ("gap.repaired",)  # the `quality` of every repaired Trade and Candle: stored and read as such


@dataclass(frozen=True, slots=True)
class Where:
    """The series a gap is in: exchange, symbol and channel ("trades", "candle:1m", "book", ...)."""

    exchange: str
    symbol: str
    channel: str

    @property
    def kind(self) -> str:
        return self.channel.partition(":")[0].rstrip("s") or self.channel


@dataclass
class Outcome:
    """The result of repairing one window: counts, and the alerts to publish (info audits and errors)."""

    where: Where
    window: Span
    repaired: int = 0  # candles or trades fetched and published into raw:{exchange}
    empty: int = 0  # candle slots recorded as known empty (trades: 1 when the window had none)
    rejected: int = 0  # fetched but rejected by validation (their own alerts went out)
    unrepaired: list[tuple[Span, str]] = field(default_factory=list)  # (part, why and what to do)
    explained: str = ""  # why there was nothing to fetch
    alerts: list[Alert] = field(default_factory=list)
    events: list[Trade | Candle] = field(default_factory=list)  # the repaired data, for raw:{exchange}

    def lose(self, part: Span, why: str) -> None:
        """Record a part of the window that could not be repaired, with why and what to do."""
        self.unrepaired.append((part, why))

    @property
    def state(self) -> State:
        if self.unrepaired:
            return "unrepaired"
        if self.repaired:
            return "repaired"
        if self.empty:
            return "empty"
        return "explained"

    def finish(self, now_ns: int, origin: str) -> Outcome:
        """Add the alerts of the final state; `origin` says what found the gap (the Gap's reason, or the scan)."""
        w = self.where
        base = {"channel": w.channel, "start": str(self.window.start), "end": str(self.window.end),
                "window": str(self.window), "origin": origin}
        for part, why in self.unrepaired:
            self.alerts.append(_alert("gap.unrepaired", "error", w, now_ns,
                                      f"{w.exchange} {w.symbol} {w.channel}: {part} could not be repaired: {why}",
                                      {**base, "part_start": str(part.start), "part_end": str(part.end),
                                       "part": str(part), "repaired": str(self.repaired)}))
        if self.repaired:
            self.alerts.append(_alert("gap.repaired", "info", w, now_ns,
                                      f"{w.exchange} {w.symbol} {w.channel}: {self.repaired} missing "
                                      f"{w.kind}(s) of {self.window} fetched over REST and published to raw:{w.exchange} "
                                      f"(validated, normalized and stored like live data)"
                                      + (f"; {self.empty} slot(s) known empty" if self.empty else ""),
                                      {**base, "repaired": str(self.repaired), "empty": str(self.empty)}))
        elif not self.unrepaired:
            why = self.explained or (f"the exchange has no {w.kind} in {self.window} (recorded with the request "
                                     f"as evidence)")
            self.alerts.append(_alert("gap.explained", "info", w, now_ns,
                                      f"{w.exchange} {w.symbol} {w.channel}: nothing missing in {self.window}: {why}",
                                      {**base, "empty": str(self.empty)}))
        return self


def _alert(rule: str, severity: Severity, w: Where, now_ns: int, reason: str, values: dict[str, str | None]) -> Alert:
    return Alert(rule=rule, severity=severity, source=SOURCE, exchange=w.exchange,
                 symbol=w.symbol, kind=w.kind, reason=reason, values=values, ts_event=now_ns, ts_recv=now_ns)


__all__ = ["REPAIRED", "SOURCE", "Outcome", "State", "Where"]
