"""The one timeframe type (common.domain.timeframe) and the callers that read it, each keeping its own set."""

from __future__ import annotations

import pytest

from common.domain import bars, formats, normalize, series, span
from common.domain.timeframe import DAY_NS, MINUTE_NS, MS, NS, WEEK_NS, Timeframe, TimeframeError

MONDAY_2024_08_12 = 1_723_420_800_000_000_000
FRIDAY_2024_08_09 = 1_723_161_600_000_000_000


def test_units_are_nanoseconds_per_unit() -> None:
    assert (MS, NS, MINUTE_NS, DAY_NS, WEEK_NS) == (10**6, 10**9, 60 * 10**9, 86_400 * 10**9, 7 * 86_400 * 10**9)


@pytest.mark.parametrize(("text", "ns", "nominal_ns"), [
    ("1s", NS, NS), ("1m", MINUTE_NS, MINUTE_NS), ("5m", 5 * MINUTE_NS, 5 * MINUTE_NS),
    ("1h", 60 * MINUTE_NS, 60 * MINUTE_NS), ("1d", DAY_NS, DAY_NS), ("1w", WEEK_NS, WEEK_NS),
    ("1M", None, 30 * DAY_NS), ("1y", None, 365 * DAY_NS),
])
def test_parse_gives_fixed_and_nominal_lengths(text: str, ns: int | None, nominal_ns: int) -> None:
    tf = Timeframe.parse(text)
    assert (str(tf), tf.ns, tf.nominal_ns) == (text, ns, nominal_ns)


@pytest.mark.parametrize("text", ["", "m", "0m", "1x", "1.5m", "-1m", " 1m", "1 m", "minute", "1m\n"])
def test_parse_refuses_naming_the_value_and_the_accepted_forms(text: str) -> None:
    assert Timeframe.find(text) is None
    with pytest.raises(TimeframeError, match=r"is not a ccxt timeframe; use <count><unit>.*e\.g\. 1m, 5m"):
        Timeframe.parse(text)


def test_alignment_floor_and_epoch_alignment() -> None:
    assert Timeframe.parse("1h").alignment(FRIDAY_2024_08_09) == "aligned"
    assert Timeframe.parse("1h").alignment(FRIDAY_2024_08_09 + MINUTE_NS) == "misaligned"
    assert Timeframe.parse("1w").alignment(MONDAY_2024_08_12) == "aligned"
    assert Timeframe.parse("1w").alignment(FRIDAY_2024_08_09) == "misaligned"
    assert Timeframe.parse("3d").alignment(FRIDAY_2024_08_09 + 1) == "unchecked"
    assert Timeframe.parse("5h").alignment(FRIDAY_2024_08_09 + 1) == "unchecked"
    assert Timeframe.parse("4h").floor(FRIDAY_2024_08_09 + 5 * 60 * MINUTE_NS) == FRIDAY_2024_08_09 + 4 * 60 * MINUTE_NS
    assert Timeframe.parse("15m").epoch_aligned and not Timeframe.parse("7m").epoch_aligned
    with pytest.raises(TimeframeError, match="no fixed length"):
        Timeframe.parse("1M").floor(FRIDAY_2024_08_09)


def test_each_caller_keeps_its_own_set_and_message() -> None:
    # span (ccxt's view: months of 30 days), SpanError
    assert span.timeframe_ns("1M") == 30 * DAY_NS and span.timeframe_ns("01m") == MINUTE_NS
    with pytest.raises(span.SpanError, match="'minute' is not a ccxt timeframe; use e.g. 1m"):
        span.timeframe_ns("minute")
    # series: fixed lengths only, None otherwise
    assert series.timeframe_ns("1w") == WEEK_NS and series.timeframe_ns("1M") is None
    assert series.timeframe_ns("x") is None
    # bars: m/h/d dividing one day, longer than 1m
    assert bars.bar_duration("4h") == 4 * 60 * MINUTE_NS
    with pytest.raises(bars.TimeframeError, match="is not <number><m|h|d>"):
        bars.bar_duration("1w")
    # formats: its table of fixed-length steps
    assert formats.timeframe_ms("3d") == 3 * DAY_NS // MS
    with pytest.raises(ValueError, match="unknown timeframe '10m'; use one of 1s, 1m"):
        formats.timeframe_ms("10m")
    # normalize: the canonical spelling only
    assert normalize.candle_alignment(FRIDAY_2024_08_09, "1d") == "aligned"
    with pytest.raises(ValueError, match="'01m' is not a canonical ccxt timeframe"):
        normalize.candle_alignment(FRIDAY_2024_08_09, "01m")
