"""The validation rules of common.domain.quality, one by one, on events shaped like the real Binance capture."""

from __future__ import annotations

import logging
import time
from decimal import Decimal

import msgspec
import pytest

from common.domain import quality
from common.domain.admit import FAST_RULES, admit, clears_candle_rules
from common.domain.normalize import SymbolMap, canonical_decimal, canonical_number
from common.domain.quality import CheckContext, RejectionLog, to_ns
from common.domain.timeframe import MS, NS
from schemas import Candle, Market, Trade
from tests import stubs

CTX = CheckContext(now_ns=time.time_ns(), max_future_skew_ns=5 * NS)
replace = msgspec.structs.replace


def market(**changes: object) -> Market:
    m = Market(exchange="binance", symbol="BTC/USDT", exchange_symbol="BTCUSDT", base="BTC", quote="USDT",
               market_type="spot", active=True, contract_size=None, price_precision=Decimal("0.01"),
               amount_precision=Decimal("0.00001"), ts_event=stubs.T0_NS, ts_recv=stubs.T0_NS)
    return replace(m, **changes)


def rules_fired(event: object) -> list[str]:
    return [f.rule for f in quality.check(event, CTX)]  # type: ignore[arg-type]


def only(event: object, rule: str) -> quality.Finding:
    findings = quality.check(event, CTX)  # type: ignore[arg-type]
    assert [f.rule for f in findings] == [rule], findings
    return findings[0]


# --- the real shapes pass ---------------------------------------------------------------------------------

@pytest.mark.parametrize("event", [
    stubs.trade(), stubs.trade(5, price="61837.63000000", amount="0.02000000"), stubs.candle(),
    stubs.candle(v="0"),  # a minute without trades is a real bar
    stubs.ticker(), stubs.ticker(bid="61837.63", ask="61837.64", last="61837.63"), market(),
    replace(stubs.ticker(), last=None),  # bookTicker carries no last price
])
def test_real_shaped_events_pass_every_rule(event: object) -> None:
    assert quality.check(event, CTX) == []  # type: ignore[arg-type]


# --- fields.missing ---------------------------------------------------------------------------------------

def test_fields_missing_fires_on_a_none_row_and_names_every_field() -> None:
    # ccxt's parse_trade on a malformed body: price and amount None
    event = replace(stubs.trade(), price=None, amount=None)
    f = only(event, "fields.missing")
    assert f.severity == "error" and f.policy == "reject"
    assert f.values["price"] is None and f.values["amount"] is None and "price" in f.values
    assert f.values["trade_id"] == "3735683259"
    assert "malformed" in f.reason and "binance BTC/USDT" in f.reason


def test_fields_missing_fires_on_nan_and_empty_ids() -> None:
    nan_candle = replace(stubs.candle(), close=Decimal("NaN"))
    assert only(nan_candle, "fields.missing").values["close"] == "NaN"
    no_id = replace(stubs.trade(), trade_id="")
    assert only(no_id, "fields.missing").values["trade_id"] == ""
    no_symbol = replace(stubs.candle(), symbol="")
    assert "symbol" in only(no_symbol, "fields.missing").values


def test_fields_missing_on_ticker_only_when_no_quote_at_all() -> None:
    assert rules_fired(replace(stubs.ticker(), bid=None, last=None)) == []
    empty = replace(stubs.ticker(), bid=None, ask=None, last=None)
    assert rules_fired(empty) == ["fields.missing"]


def test_markets_are_checked_for_exchange_and_symbol_only() -> None:
    assert rules_fired(market(active=None, contract_size=None, price_precision=None)) == []
    f = only(market(exchange=""), "fields.missing")
    assert f.values["exchange"] == ""


# --- price.non_positive -----------------------------------------------------------------------------------

def test_price_non_positive_fires_on_zero_trade_price() -> None:
    f = only(stubs.trade(price="0.00000000"), "price.non_positive")
    assert f.values["price"] == "0.00000000"
    assert "> 0" in f.reason


def test_price_non_positive_fires_on_negative_candle_low_and_ticker_bid() -> None:
    bad = stubs.candle(o="61837.63", h="61900.00", lo="-1", c="61850.10")
    fired = rules_fired(bad)
    assert "price.non_positive" in fired
    f = next(f for f in quality.check(bad, CTX) if f.rule == "price.non_positive")
    assert f.values["low"] == "-1" and "open" not in f.values
    assert rules_fired(stubs.ticker(bid="0", ask="61837.64")) == ["price.non_positive"]


def test_price_non_positive_quiet_on_tiny_positive_price() -> None:
    assert rules_fired(stubs.trade(price="0.00000001")) == []


# --- amount.non_positive / volume.negative ----------------------------------------------------------------

def test_amount_non_positive_fires_on_zero_and_negative_amounts() -> None:
    assert only(stubs.trade(amount="0"), "amount.non_positive").values["amount"] == "0"
    assert only(stubs.trade(amount="-0.02"), "amount.non_positive").values["amount"] == "-0.02"
    assert rules_fired(stubs.trade(amount="0.00001")) == []


def test_volume_negative_fires_below_zero_only() -> None:
    assert only(stubs.candle(v="-12.5"), "volume.negative").values["volume"] == "-12.5"
    assert rules_fired(stubs.candle(v="0.00000000")) == []


# --- ohlc.consistency -------------------------------------------------------------------------------------

@pytest.mark.parametrize("o,h,lo,c,broken", [
    ("61837.63", "61800.00", "61900.00", "61850.10", "high 61800.00 < low 61900.00"),
    ("61837.63", "61840.00", "61800.00", "61850.10", "high 61840.00 < close 61850.10"),
    ("61790.00", "61900.00", "61800.00", "61850.10", "low 61800.00 > open 61790.00"),
])
def test_ohlc_consistency_fires_on_each_broken_bound(o: str, h: str, lo: str, c: str, broken: str) -> None:
    f = only(stubs.candle(o=o, h=h, lo=lo, c=c), "ohlc.consistency")
    assert broken in f.reason
    assert (f.values["open"], f.values["high"], f.values["low"], f.values["close"]) == (o, h, lo, c)


def test_ohlc_consistency_quiet_on_a_flat_bar() -> None:
    assert rules_fired(stubs.candle(o="61837.63", h="61837.63", lo="61837.63", c="61837.63")) == []


# --- time.future / time.invalid ---------------------------------------------------------------------------

def future_trade(ahead_ns: int, recv: int | None = None) -> Trade:
    """A trade stamped `ahead_ns` after its receipt (the exchange's clock ahead of the collector's)."""
    recv = CTX.now_ns if recv is None else recv
    return replace(stubs.trade(ts=recv + ahead_ns), ts_recv=recv)


def test_time_future_fires_beyond_the_skew_and_names_the_value() -> None:
    bad = future_trade(60 * NS)
    f = only(bad, "time.future")
    assert f.values["ts_event"] == str(bad.ts_event) and f.values["reference"] == str(bad.ts_recv)
    assert "60.000 s ahead of its receipt time" in f.reason and "max_future_skew_s" in f.reason


def test_time_future_quiet_within_the_skew() -> None:
    assert rules_fired(future_trade(4 * NS)) == []


def test_time_future_judges_by_the_receipt_time_not_this_hosts_clock() -> None:
    # This host's clock an hour behind: events received (and stamped) now are fine; before, all were rejected
    behind = CheckContext(now_ns=CTX.now_ns - 3_600 * NS, max_future_skew_ns=CTX.max_future_skew_ns)
    now_trade = future_trade(0)
    assert quality.check(now_trade, behind) == []
    assert [f.rule for f in quality.check(future_trade(60 * NS), behind)] == ["time.future"]
    # without a receipt time, this host's clock is the reference
    no_recv = replace(stubs.trade(ts=CTX.now_ns + 60 * NS), ts_recv=0)
    f = only(no_recv, "time.future")
    assert "this host's clock" in f.reason and f.values["reference"] == str(CTX.now_ns)


def test_time_future_reads_milliseconds_by_magnitude() -> None:
    ahead_ms = (CTX.now_ns + 3_600 * NS) // MS
    assert rules_fired(replace(stubs.trade(ts=ahead_ms), ts_recv=CTX.now_ns)) == ["time.future"]
    assert rules_fired(replace(stubs.trade(ts=1_723_161_255_342), ts_recv=CTX.now_ns)) == []  # capture's, in ms


def test_time_future_fires_on_candle_open_time() -> None:
    c = stubs.candle()
    future_open = c.ts_recv + 3_600 * NS
    bad = replace(c, open_time=future_open, ts_event=c.ts_event)
    f = only(bad, "time.future")
    assert f.values["open_time"] == str(future_open)


def test_time_invalid_fires_on_zero_timestamp() -> None:
    f = only(stubs.trade(ts=0), "time.invalid")
    assert f.values["ts_event"] == "0"


# --- ticker.crossed ---------------------------------------------------------------------------------------

def test_ticker_crossed_fires_when_bid_not_below_ask() -> None:
    f = only(stubs.ticker(bid="61837.65", ask="61837.64"), "ticker.crossed")
    assert f.values["bid"] == "61837.65" and f.values["ask"] == "61837.64"
    assert rules_fired(stubs.ticker(bid="61837.64", ask="61837.64")) == ["ticker.crossed"]


def test_ticker_crossed_quiet_with_one_side_missing() -> None:
    assert rules_fired(replace(stubs.ticker(), ask=None)) == []


# --- several problems, alerts -----------------------------------------------------------------------------

def test_one_bad_row_gives_one_finding_per_problem_and_no_exception() -> None:
    bad = stubs.candle(o="0", h="-1", lo="5", c="3", v="-2")
    assert sorted(rules_fired(bad)) == ["ohlc.consistency", "price.non_positive", "volume.negative"]


def test_to_alert_carries_values_exchange_symbol_kind_and_reason() -> None:
    event = stubs.trade(price="0")
    finding = only(event, "price.non_positive")
    alert = quality.to_alert(finding, event, "validator", CTX.now_ns)
    assert (alert.rule, alert.severity, alert.source) == ("price.non_positive", "error", "validator")
    assert (alert.exchange, alert.symbol, alert.kind) == ("binance", "BTC/USDT", "trade")
    assert alert.values["price"] == "0" and alert.reason == finding.reason
    assert alert.ts_event == event.ts_event and alert.ts_recv == CTX.now_ns
    no_exchange = replace(stubs.trade(), exchange="")
    fallback = quality.to_alert(only(no_exchange, "fields.missing"), no_exchange, "validator", CTX.now_ns,
                                exchange="binance")
    assert fallback.exchange == "binance"


def test_every_rule_has_a_unique_name_and_rejects() -> None:
    names = [r.name for r in quality.RULES]
    assert len(names) == len(set(names))
    assert {"fields.missing", "price.non_positive", "amount.non_positive", "volume.negative",
            "ohlc.consistency", "time.future", "ticker.crossed"} <= set(names)
    assert all(r.policy == "reject" for r in quality.RULES)


# --- helpers ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value,expected", [
    (1_723_161_255, 1_723_161_255_000_000_000),              # seconds
    (1_723_161_255_342, 1_723_161_255_342_000_000),          # milliseconds
    (1_723_161_255_342_123, 1_723_161_255_342_123_000),      # microseconds
    (1_723_161_255_342_000_001, 1_723_161_255_342_000_001),  # nanoseconds
    (0, 0),
])
def test_to_ns_infers_the_unit_from_magnitude(value: int, expected: int) -> None:
    assert to_ns(value) == expected


def test_rejection_log_reports_once_per_interval_then_counts(caplog: pytest.LogCaptureFixture) -> None:
    clock = {"t": 0.0}
    rl = RejectionLog(logging.getLogger("test.rejections"), interval_s=10, clock=lambda: clock["t"])
    event = stubs.trade(price="0")
    alert = quality.to_alert(only(event, "price.non_positive"), event, "validator", CTX.now_ns)
    with caplog.at_level(logging.WARNING, logger="test.rejections"):
        rl.note([alert] * 3)
        for _ in range(100):
            rl.note([alert])
        clock["t"] = 11.0
        rl.note([alert])
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert "rejected 3 event(s) by price.non_positive" in lines[0]
    assert "+100 more since the last report" in lines[1]


# --- the catalog ------------------------------------------------------------------------------------------

def test_every_stateless_rule_is_in_the_catalog_with_its_severity_and_policy() -> None:
    for rule in quality.RULES:
        entry = quality.CATALOG[rule.name]
        assert (entry.severity, entry.policy) == (rule.severity, rule.policy)
    assert quality.CATALOG["time.duplicate"].policy == "repair"
    assert quality.CATALOG["volume.zero"].policy == "flag" and quality.CATALOG["volume.zero"].severity == "info"


def test_finding_takes_severity_and_policy_from_the_catalog_and_locates_the_event() -> None:
    f = quality.finding("price.outlier", stubs.candle(), "a spike", {"close": "1"})
    assert (f.severity, f.policy) == ("warning", "flag")
    assert f.values["close"] == "1" and f.values["open_time"] == str(stubs.candle().open_time)
    with pytest.raises(KeyError):
        quality.finding("no.such.rule", stubs.candle(), "", {})


def test_with_quality_appends_each_rule_once() -> None:
    flagged = quality.with_quality(stubs.trade(), ["time.stale"])
    assert flagged.quality == ("time.stale",)
    assert quality.with_quality(flagged, ["trade.id_gap", "time.stale"]).quality == ("time.stale", "trade.id_gap")
    assert quality.with_quality(flagged, []) is flagged


# --- admit: the stateless rules, then normalization (backfill, import, gap repair's candles) ---------------

def test_admit_normalizes_an_event_that_passes() -> None:
    raw = replace(stubs.candle(o="61837.63000000"), open_time=1_723_161_240_000)  # open time in ms
    admitted = admit(raw, CTX, SymbolMap())
    assert admitted.findings == [] and admitted.notes == {"ts_rescaled"}
    event = admitted.event
    assert isinstance(event, Candle) and event.open_time == stubs.candle().open_time
    assert [str(v) for v in (event.open, event.high, event.low, event.close)] == ["61837.63", "61900", "61800",
                                                                                 "61850.1"]


def test_admit_rejects_on_a_rule_and_returns_its_findings() -> None:
    admitted = admit(stubs.candle(h="61000", lo="62000"), CTX, SymbolMap())
    assert admitted.event is None and [f.rule for f in admitted.findings] == ["ohlc.consistency"]


def test_admit_rejects_what_normalize_refuses_with_its_finding() -> None:
    misaligned = replace(stubs.candle(), open_time=stubs.candle().open_time + 1_000_000)
    admitted = admit(misaligned, CTX, SymbolMap())
    assert admitted.event is None and [f.rule for f in admitted.findings] == ["candle.misaligned"]


def test_admit_flags_a_finding_whose_policy_is_not_reject() -> None:
    flag = quality.Rule("volume.zero", "info", "flag", frozenset({"candle"}), "zero volume",
                        lambda e, ctx: [("zero volume", {})])
    admitted = admit(stubs.candle(), CTX, SymbolMap(), (*quality.RULES, flag))
    assert isinstance(admitted.event, Candle) and admitted.event.quality == ("volume.zero",)
    assert [f.rule for f in admitted.findings] == ["volume.zero"]


def test_the_fast_candle_check_agrees_with_admit() -> None:
    limit = CTX.now_ns + CTX.max_future_skew_ns
    good, bad = stubs.candle(), stubs.candle(h="61000", lo="62000")
    assert frozenset(r.name for r in quality.RULES if "candle" in r.kinds) == FAST_RULES
    assert clears_candle_rules(good, limit) and admit(good, CTX, SymbolMap()).event is not None
    assert not clears_candle_rules(bad, limit) and admit(bad, CTX, SymbolMap()).event is None


@pytest.mark.parametrize("x", [61837.63, 100.0, 0.0, -0.0, 1e-08, 1.5e16, 0.1, 12.5, "61837.63000000", 7])
def test_canonical_number_is_canonical_decimal_of_the_exchange_text(x: float | str) -> None:
    expected = canonical_decimal(Decimal(repr(x) if isinstance(x, float) else str(x)))
    assert str(canonical_number(x)) == str(expected)
    assert canonical_number(None) is None and canonical_number("not a number") is None
