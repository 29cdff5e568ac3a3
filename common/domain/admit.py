"""Admitting an event that does not cross the live stages: the stateless quality rules, then normalization.

Live data crosses two stages, the validator (`common.domain.quality.check`, plus the stream rules) and the
normalizer (`common.domain.normalize.normalize`). Data written straight to storage (backfill, archive import,
gap repair's candles, through `common.history.ingest.Checker`) is admitted by `admit`, the same two steps
in one call, so it is judged by the same code:
- a finding whose policy is "reject" rejects the event (the findings say why);
- other findings flag it: the stored event names their rules in `quality`;
- then `normalize`; its refusal (`Rejected`) rejects the event with that finding.
Every finding is returned, so the caller publishes each as an Alert (`quality.to_alert`) as the validator and
normalizer would.

`clears_candle_rules` is the fast form for candles already in the normalizer's canonical form (built from
REST rows by `common.history.ingest.rest_candle`): a direct check of exactly the conditions of the live
candle rules, FAST_RULES. It is valid only while the candle rule set is exactly FAST_RULES (`Checker` turns
it off otherwise), and it is conservative: False sends the candle the full way through `admit`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from common.domain import quality
from common.domain.normalize import Normalizable, Rejected, SymbolMap, normalize
from common.domain.quality import CheckContext, Finding, Rule
from schemas import Candle, Trade

FAST_RULES = frozenset({"fields.missing", "price.non_positive", "volume.negative", "ohlc.consistency",
                        "time.invalid", "time.future"})
_NS_MAGNITUDE = 10**17  # a stamp at or above this is ns already: `quality.to_ns` leaves it as it is


@dataclass(frozen=True, slots=True)
class Admission:
    """What `admit` decided: the canonical event to store (None: rejected) and every finding on the way."""

    event: Normalizable | None
    findings: list[Finding]
    notes: set[str]  # normalize's notes on what changed ('symbol_mapped', 'ts_rescaled', ...)


def admit(event: Normalizable, ctx: CheckContext, symbols: SymbolMap,
          rules: Iterable[Rule] = quality.RULES) -> Admission:
    """`event` checked by `rules`, then normalized (see the module docstring)."""
    findings = quality.check(event, ctx, rules)
    if findings:
        if quality.rejects(findings):
            return Admission(None, findings, set())
        if isinstance(event, (Trade, Candle)):
            event = quality.with_quality(event, (f.rule for f in findings))
    try:
        normalized, notes = normalize(event, symbols)
    except Rejected as exc:
        return Admission(None, [*findings, exc.finding], set())
    return Admission(normalized, findings, notes)


def clears_candle_rules(c: Candle, future_limit_ns: int) -> bool:
    """True only if none of FAST_RULES can find anything in `c` (conservative: False sends it the full way).
    `future_limit_ns`: now + the allowed future skew."""
    o, h, lo, cl, v = c.open, c.high, c.low, c.close, c.volume
    if o is None or h is None or lo is None or cl is None or v is None:
        return False
    if not (o.is_finite() and h.is_finite() and lo.is_finite() and cl.is_finite() and v.is_finite()):
        return False
    if not (c.exchange.strip() and c.symbol.strip() and c.timeframe.strip()):
        return False
    if not (lo > 0 and v >= 0 and lo <= o <= h and lo <= cl <= h):
        return False
    # ns-magnitude stamps (so quality.to_ns leaves them as they are), neither invalid nor in the future
    return (_NS_MAGNITUDE <= c.open_time <= future_limit_ns
            and _NS_MAGNITUDE <= c.ts_event <= future_limit_ns)


__all__ = ["FAST_RULES", "Admission", "admit", "clears_candle_rules"]
