"""Data-quality rules: named, pure checks over one event, shared by the validator service and any later
batch (DataFrame) validator.

A rule has a stable `name` (the `Alert.rule` operators filter on), a `severity`, a `policy` and the event
kinds it applies to. Calling a rule with an event and a `CheckContext` returns a list of `Finding`s (empty
when the event passes); a rule reports at most one finding per event, naming every offending field.
`check()` runs all applicable rules; `to_alert()` turns a finding into the `Alert` published on mdp:alerts.

Rules (all severity "error", policy "reject": a rejected event is never stored downstream):

  fields.missing       a None or non-finite (NaN/Infinity) price, amount, OHLCV field, or an empty exchange,
                       symbol, trade id or timeframe. ccxt yields rows of None for a malformed exchange body.
                       Tickers: bid, ask and last all missing. Markets: only exchange and symbol are checked.
  price.non_positive   trade price, candle open/high/low/close, ticker bid/ask/last <= 0
  amount.non_positive  trade amount <= 0
  volume.negative      candle volume < 0 (a zero-volume bar is legitimate: a minute without trades)
  ohlc.consistency     high >= max(open, close, low) and low <= min(open, close)
  time.invalid         ts_event (or a candle's open_time) <= 0: the collector had no exchange timestamp
  time.future          ts_event or open_time later than the event's own ts_recv (the collector's receipt
                       time; now, for an event without one) + validation.max_future_skew_s (after unit
                       inference by `to_ns`, so a millisecond stamp is judged by the time it denotes)
  ticker.crossed       bid >= ask when both are present

The catalog (`CATALOG`) names every rule of the live validator (these stateless ones plus the stream rules of
common/domain/series.py) and of the batch validator, with its severity and policy (reject, flag, repair,
alert; see docs/quality-live.md). `finding()` builds a Finding of a catalog rule, `with_quality()` the copy of a
trade or candle that carries its flags.

Rules only judge values that are present and finite; a missing value is `fields.missing`'s alone, so one
bad row produces one alert per distinct problem and never an exception.

Timestamp units (`to_ns`): every timestamp on the bus should be integer ns since the epoch, UTC. A value is
read by its magnitude: < 1e11 seconds, < 1e14 milliseconds, < 1e17 microseconds, else nanoseconds. Each
range covers 1973..5138 in its unit, so no date from 1973 to 5138 is ambiguous.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Literal, TypeGuard

import msgspec

from common.config import ValidationSettings
from common.domain.timeframe import MS, NS, US
from schemas import KIND_OF, Alert, Candle, Event, Severity, Ticker, Trade

# reject: quarantined (an Alert with the values on mdp:alerts), never stored. flag: stored with the rule's name in
# the event's `quality` tuple, plus an Alert. repair: fixed (a copy dropped, an order restored) with an audit
# Alert of severity info. alert: the event is fine, the Alert (and a Gap event) reports what is missing.
Policy = Literal["reject", "flag", "repair", "alert"]



# ---------------------------------------------------------------------------------------------------------
# Helpers shared with the normalizer


def to_ns(ts: int) -> int:
    """Integer ns since the epoch from a timestamp in s, ms, us or ns, inferred from its magnitude.

    < 1e11 -> seconds, < 1e14 -> milliseconds, < 1e17 -> microseconds, else nanoseconds. Non-positive
    values are returned unchanged (the `time.invalid` rule rejects them).
    """
    if ts <= 0:
        return ts
    if ts < 100_000_000_000:
        return ts * NS
    if ts < 100_000_000_000_000:
        return ts * MS
    if ts < 100_000_000_000_000_000:
        return ts * US
    return ts


def iso(ns: int) -> str:
    """ns since the epoch as ISO-8601 UTC text for humans ('?' when out of range)."""
    try:
        return datetime.fromtimestamp(ns / NS, tz=UTC).isoformat(timespec="milliseconds")
    except (OverflowError, OSError, ValueError):
        return "?"


def text(value: object) -> str | None:
    """A value as alert text: None stays None, a Decimal in fixed point with all its digits ('0.00000000',
    not '0E-8'), anything else str()."""
    if value is None:
        return None
    if isinstance(value, Decimal):
        return format(value, "f")
    return str(value)


def kind_of(event: Event) -> str:
    return KIND_OF.get(type(event), type(event).__name__.lower())


def describe(event: Event) -> str:
    """A short human name for an event: 'trade 3735683259 binance BTC/USDT'."""
    ex = getattr(event, "exchange", "") or "?"
    sym = getattr(event, "symbol", "") or "?"
    if isinstance(event, Trade):
        return f"trade {event.trade_id or '?'} {ex} {sym}"
    if isinstance(event, Candle):
        return f"{event.timeframe or '?'} candle {ex} {sym} @{iso(to_ns(event.open_time))}"
    return f"{kind_of(event)} {ex} {sym}"


def _finite(value: Decimal | None) -> TypeGuard[Decimal]:
    return value is not None and value.is_finite()


def _identity(event: Event) -> dict[str, str | None]:
    """Values that locate the event (added to every finding's values)."""
    out: dict[str, str | None] = {}
    if isinstance(event, Trade):
        out["trade_id"] = event.trade_id
    elif isinstance(event, Candle):
        out["timeframe"] = event.timeframe
        out["open_time"] = str(event.open_time)
    out["ts_event"] = str(getattr(event, "ts_event", ""))
    return out


# ---------------------------------------------------------------------------------------------------------
# Rule machinery


@dataclass(frozen=True, slots=True)
class CheckContext:
    """What a rule may know besides the event: the clock and the configured tolerances."""

    now_ns: int
    max_future_skew_ns: int = 5 * NS

    @classmethod
    def from_settings(cls, settings: ValidationSettings, now_ns: int | None = None) -> CheckContext:
        return cls(now_ns=time.time_ns() if now_ns is None else now_ns,
                   max_future_skew_ns=int(settings.max_future_skew_s * NS))


@dataclass(frozen=True, slots=True)
class Finding:
    """One rule's verdict on one event: which rule, how bad, why (for a human), and the offending values."""

    rule: str
    severity: Severity
    policy: Policy
    reason: str
    values: dict[str, str | None]


# A check yields (reason, offending values) pairs; the Rule adds name, severity and the event's identity.
Issue = tuple[str, dict[str, str | None]]
Check = Callable[[Event, CheckContext], Iterable[Issue]]


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    severity: Severity
    policy: Policy
    kinds: frozenset[str]
    description: str
    check: Check

    def applies_to(self, event: Event) -> bool:
        return kind_of(event) in self.kinds

    def __call__(self, event: Event, ctx: CheckContext) -> list[Finding]:
        if not self.applies_to(event):
            return []
        return [Finding(self.name, self.severity, self.policy, reason, {**values, **_identity(event)})
                for reason, values in self.check(event, ctx)]


# ---------------------------------------------------------------------------------------------------------
# The checks


def _fields_missing(event: Event, ctx: CheckContext) -> Iterable[Issue]:
    missing: dict[str, str | None] = {}
    for name in ("exchange", "symbol"):
        if not (getattr(event, name, "") or "").strip():
            missing[name] = getattr(event, name, None)
    numbers: tuple[str, ...] = ()
    if isinstance(event, Trade):
        if not (event.trade_id or "").strip():
            missing["trade_id"] = event.trade_id
        numbers = ("price", "amount")
    elif isinstance(event, Candle):
        if not (event.timeframe or "").strip():
            missing["timeframe"] = event.timeframe
        numbers = ("open", "high", "low", "close", "volume")
    elif isinstance(event, Ticker):
        quotes = ("bid", "ask", "last")
        if not any(_finite(getattr(event, q)) for q in quotes):
            missing.update({q: text(getattr(event, q)) for q in quotes})
    for name in numbers:
        value = getattr(event, name)
        if not _finite(value):
            missing[name] = text(value)
    if missing:
        listed = ", ".join(f"{k}={v!r}" for k, v in missing.items())
        yield ((f"{describe(event)} has missing or non-numeric fields ({listed}). ccxt returns None for "
               f"fields it could not parse, so the exchange sent a malformed or empty row; rejected. If it "
               f"repeats, check the exchange's status page and the collector's raw messages for this symbol."),
               missing)


def _prices(event: Event) -> tuple[str, ...]:
    if isinstance(event, Trade):
        return ("price",)
    if isinstance(event, Candle):
        return ("open", "high", "low", "close")
    if isinstance(event, Ticker):
        return ("bid", "ask", "last")
    return ()


def _price_non_positive(event: Event, ctx: CheckContext) -> Iterable[Issue]:
    bad = {name: text(v) for name in _prices(event) if _finite(v := getattr(event, name)) and v <= 0}
    if bad:
        listed = ", ".join(f"{k}={v}" for k, v in bad.items())
        yield ((f"{describe(event)} has non-positive price(s) {listed}; a price must be > 0 (a zero is "
               f"usually a placeholder row from the exchange); rejected."), bad)


def _amount_non_positive(event: Event, ctx: CheckContext) -> Iterable[Issue]:
    assert isinstance(event, Trade)
    if _finite(event.amount) and event.amount <= 0:
        yield ((f"{describe(event)} has amount={text(event.amount)}; a trade's amount must be > 0; rejected. "
               f"Check whether the exchange reports sells as negative amounts (the collector must map that "
               f"to side)."),
               {"amount": text(event.amount)})


def _volume_negative(event: Event, ctx: CheckContext) -> Iterable[Issue]:
    assert isinstance(event, Candle)
    if _finite(event.volume) and event.volume < 0:
        yield (f"{describe(event)} has volume={text(event.volume)}; volume must be >= 0; rejected.",
               {"volume": text(event.volume)})


def _ohlc_consistency(event: Event, ctx: CheckContext) -> Iterable[Issue]:
    assert isinstance(event, Candle)
    o, h, lo, c = event.open, event.high, event.low, event.close
    if not all(_finite(v) for v in (o, h, lo, c)):
        return
    assert o is not None and h is not None and lo is not None and c is not None
    broken: list[str] = []
    if h < lo:
        broken.append(f"high {text(h)} < low {text(lo)}")
    if h < max(o, c):
        broken.append(f"high {text(h)} < {'open' if o >= c else 'close'} {text(max(o, c))}")
    if lo > min(o, c):
        broken.append(f"low {text(lo)} > {'open' if o <= c else 'close'} {text(min(o, c))}")
    if broken:
        yield ((f"{describe(event)} is not a consistent bar ({'; '.join(broken)}); need low <= open, "
               f"close <= high; rejected. The exchange sent a corrupt row, or fields were mapped in the "
               f"wrong order."),
               {"open": text(o), "high": text(h), "low": text(lo), "close": text(c)})


def _stamps(event: Event) -> dict[str, int]:
    stamps = {"ts_event": event.ts_event}
    if isinstance(event, Candle):
        stamps["open_time"] = event.open_time
    return stamps


def _time_invalid(event: Event, ctx: CheckContext) -> Iterable[Issue]:
    bad: dict[str, str | None] = {name: str(v) for name, v in _stamps(event).items() if v <= 0}
    if bad:
        listed = ", ".join(f"{k}={v}" for k, v in bad.items())
        yield ((f"{describe(event)} has no usable exchange timestamp ({listed}); rejected. The collector must "
               f"take the exchange's time (ccxt 'timestamp'), not default it to 0."), bad)


def _time_future(event: Event, ctx: CheckContext) -> Iterable[Issue]:
    # Judged against the event's own receipt time (the collector's clock, at the moment it read the message),
    # not this host's clock now: a validator host whose clock is behind, or a backlog processed later, must
    # not turn good events into rejections. Only an event without a receipt time is judged against now.
    recv = getattr(event, "ts_recv", 0)
    ref, against = (recv, "its receipt time ts_recv") if isinstance(recv, int) and recv > 0 else \
        (ctx.now_ns, "this host's clock")
    limit = ref + ctx.max_future_skew_ns
    ahead = {name: v for name, v in _stamps(event).items() if v > 0 and to_ns(v) > limit}
    if ahead:
        name, worst = max(ahead.items(), key=lambda kv: to_ns(kv[1]))
        secs = (to_ns(worst) - ref) / NS
        values: dict[str, str | None] = {k: str(v) for k, v in ahead.items()}
        values["reference"] = str(ref)
        skew = ctx.max_future_skew_ns / NS
        yield ((f"{describe(event)} has {name}={worst} ({iso(to_ns(worst))}), {secs:.3f} s ahead of {against} "
               f"{iso(ref)} (allowed skew {skew:g} s); rejected. The exchange's clock (or the collector "
               f"host's) is off: check the collector host's clock sync (timedatectl / chronyc tracking), the "
               f"timestamp's unit, or raise validation.max_future_skew_s."), values)


def _ticker_crossed(event: Event, ctx: CheckContext) -> Iterable[Issue]:
    assert isinstance(event, Ticker)
    if _finite(event.bid) and _finite(event.ask) and event.bid >= event.ask:
        yield ((f"{describe(event)} quotes bid={text(event.bid)} >= ask={text(event.ask)} (crossed or locked "
               f"book); rejected. Usually bid and ask were swapped or taken from different updates."),
               {"bid": text(event.bid), "ask": text(event.ask)})


def _kinds(*names: str) -> frozenset[str]:
    return frozenset(names)


RULES: tuple[Rule, ...] = (
    Rule("fields.missing", "error", "reject", _kinds("trade", "candle", "ticker", "market"),
         "a required field is None/NaN/empty", _fields_missing),
    Rule("price.non_positive", "error", "reject", _kinds("trade", "candle", "ticker"),
         "a price is <= 0", _price_non_positive),
    Rule("amount.non_positive", "error", "reject", _kinds("trade"),
         "a trade's amount is <= 0", _amount_non_positive),
    Rule("volume.negative", "error", "reject", _kinds("candle"),
         "a candle's volume is < 0", _volume_negative),
    Rule("ohlc.consistency", "error", "reject", _kinds("candle"),
         "high/low do not bound open/close", _ohlc_consistency),
    Rule("time.invalid", "error", "reject", _kinds("trade", "candle", "ticker"),
         "ts_event or open_time <= 0", _time_invalid),
    Rule("time.future", "error", "reject", _kinds("trade", "candle", "ticker"),
         "ts_event or open_time beyond ts_recv + max_future_skew_s", _time_future),
    Rule("ticker.crossed", "error", "reject", _kinds("ticker"),
         "bid >= ask", _ticker_crossed),
)

RULES_BY_NAME: dict[str, Rule] = {r.name: r for r in RULES}


def check(event: Event, ctx: CheckContext, rules: Iterable[Rule] = RULES) -> list[Finding]:
    """Every finding of `rules` on `event` (empty: the event passes)."""
    out: list[Finding] = []
    for rule in rules:
        out.extend(rule(event, ctx))
    return out


def rejects(findings: Iterable[Finding]) -> bool:
    return any(f.policy == "reject" for f in findings)


def to_alert(finding: Finding, event: Event, source: str, now_ns: int, exchange: str = "") -> Alert:
    """The Alert for `finding` on `event`. `exchange` is the fallback when the event names none."""
    ts = getattr(event, "ts_event", 0)
    return Alert(rule=finding.rule, severity=finding.severity, source=source,
                 exchange=getattr(event, "exchange", "") or exchange,
                 symbol=getattr(event, "symbol", "") or "",
                 kind=kind_of(event), reason=finding.reason, values=dict(finding.values),
                 ts_event=ts if isinstance(ts, int) and ts > 0 else now_ns, ts_recv=now_ns)


# ---------------------------------------------------------------------------------------------------------
# The rule catalog: every rule name of the live validator and the batch (DataFrame) validator


@dataclass(frozen=True, slots=True)
class CatalogEntry:
    """One rule of the shared catalog: its stable name, severity, policy and what it means."""

    name: str
    severity: Severity
    policy: Policy
    meaning: str
    live: bool  # whether the stream validator (services/validator) applies it


def _entry(name: str, severity: Severity, policy: Policy, meaning: str, live: bool = True) -> CatalogEntry:
    return CatalogEntry(name, severity, policy, meaning, live)


CATALOG: dict[str, CatalogEntry] = {e.name: e for e in (
    _entry("fields.missing", "error", "reject", "a None/NaN/empty required field"),
    _entry("price.non_positive", "error", "reject", "a price <= 0"),
    _entry("amount.non_positive", "error", "reject", "a trade amount <= 0"),
    _entry("volume.negative", "error", "reject", "a candle volume < 0"),
    _entry("ohlc.consistency", "error", "reject", "high/low do not bound open/close"),
    _entry("time.invalid", "error", "reject", "a timestamp <= 0"),
    _entry("time.future", "error", "reject", "later than its ts_recv + validation.max_future_skew_s"),
    _entry("ticker.crossed", "error", "reject", "bid >= ask"),
    _entry("time.gap", "warning", "alert", "missing open times in a closed-candle series (a Gap event too)"),
    _entry("time.duplicate", "info", "repair", "an identical closed candle again: the copy is dropped"),
    _entry("time.conflict", "error", "reject", "a closed candle for an open time already seen, other values"),
    _entry("time.out_of_order", "warning", "repair",
           "a closed candle older than the newest one: passed (stores key by open time), audited"),
    _entry("time.stale", "warning", "flag", "received later than stale_after_s after its exchange time"),
    _entry("price.outlier", "warning", "flag", "log return or wick beyond k rolling MADs"),
    _entry("price.cross_venue", "warning", "flag", "close far from the same symbol's close on other venues"),
    _entry("price.stuck", "warning", "flag", "O=H=L=C unchanged for N or more consecutive bars"),
    _entry("volume.zero", "info", "flag", "a zero-volume bar (real on illiquid markets; never dropped)"),
    _entry("candle.open_gap", "warning", "flag", "open far from the previous close"),
    _entry("trade.outside_book", "warning", "flag", "trade price beyond the last bid/ask by a tolerance"),
    _entry("trade.id_gap", "warning", "flag", "trade ids not consecutive (a Gap event too)"),
    _entry("trade.duplicate", "info", "repair", "a trade id already forwarded: the copy is dropped"),
    _entry("candle.reconcile", "warning", "alert",
           "a 1m candle built from trades disagrees with the exchange's (aggregator)"),
)}


def finding(rule: str, event: Event, reason: str, values: dict[str, str | None]) -> Finding:
    """A Finding of catalog rule `rule` on `event`, with the catalog's severity and policy and the values
    that locate the event (trade id, or timeframe and open time; ts_event). KeyError: not a catalog rule."""
    entry = CATALOG[rule]
    return Finding(rule, entry.severity, entry.policy, reason, {**values, **_identity(event)})


def with_quality(event: Trade | Candle, rules: Iterable[str]) -> Trade | Candle:
    """A copy of `event` whose `quality` also names `rules` (in order, each once)."""
    merged = tuple(dict.fromkeys((*event.quality, *rules)))
    if merged == event.quality:
        return event
    return msgspec.structs.replace(event, quality=merged)


# ---------------------------------------------------------------------------------------------------------
# Logging rejections without flooding


class RejectionLog:
    """Logs rejections at WARNING, at most one line per rule per `interval_s`; the rest are counted and the
    count is reported on the rule's next line (and by `flush()` at shutdown)."""

    def __init__(self, logger: logging.Logger, interval_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.interval_s = interval_s
        self.clock = clock
        self._last: dict[str, float] = {}
        self._suppressed: Counter[str] = Counter()

    def note(self, alerts: Iterable[Alert]) -> None:
        by_rule: dict[str, list[Alert]] = {}
        for a in alerts:
            by_rule.setdefault(a.rule, []).append(a)
        now = self.clock()
        for rule, group in by_rule.items():
            last = self._last.get(rule)
            if last is not None and now - last < self.interval_s:
                self._suppressed[rule] += len(group)
                continue
            self._last[rule] = now
            earlier = self._suppressed.pop(rule, 0)
            more = f" (+{earlier} more since the last report)" if earlier else ""
            self.logger.warning("rejected %d event(s) by %s in this batch%s; e.g. %s", len(group), rule, more,
                                group[0].reason)

    def flush(self) -> None:
        for rule, n in sorted(self._suppressed.items()):
            self.logger.warning("rejected %d more event(s) by %s since the last report", n, rule)
        self._suppressed.clear()


__all__ = [
    "CATALOG", "RULES", "RULES_BY_NAME", "CatalogEntry", "CheckContext", "Finding", "Policy", "RejectionLog",
    "Rule", "check", "describe", "finding", "iso", "kind_of", "rejects", "text", "to_alert", "to_ns",
    "with_quality",
]
