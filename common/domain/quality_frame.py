"""The data-quality rules over a whole candle series at once: a pandas DataFrame in, every finding out,
vectorised with numpy (no Python loop per row), so a month of 1m candles is judged in milliseconds.

Why a second implementation beside common.domain.quality: the live validator judges one event at a time and can
only look back; a stored series can be judged as a whole (duplicates anywhere, disorder, gaps, robust local
statistics). The rule NAMES, severities and policies are one catalog shared with the live validator (the
event rules' severities are taken from common.domain.quality.RULES_BY_NAME), so an operator filters both by the same
name. See docs/quality.md for the catalog, the policies and why each threshold has its value.

Input: the frame of common.domain.formats (open_time int64 epoch ms = the candle's OPEN time; open, high, low, close,
volume float64, NaN for a missing value), in arrival order. Output: a `Report` whose findings carry
`rule`, `severity`, `timestamp` (the candle's open time in ms; for a gap the first MISSING open time), `row`
(0-based position in the input) and the values involved.

How the rules see the series, in order:
  1. Row rules (policy reject): fields.missing, time.invalid, time.future, candle.misaligned,
     price.non_positive, volume.negative, ohlc.consistency. A rejected row is never stored, so it takes no
     part in the series rules below (one bad row gives one finding per problem, not a cascade).
  2. Identity (repair / reject): a later row with an open time already seen is time.duplicate (identical
     OHLCV: dropped, audited) or time.conflict (different values: the first is kept, the other quarantined).
  3. Order (repair): time.out_of_order marks a row whose open time is earlier than the previous kept row's;
     the stored series is sorted.
  4. The stored series (sorted, unique): time.gap, volume.zero, price.stuck, price.outlier,
     candle.open_gap, and price.cross_venue when a reference series of the same symbol on another venue is
     given.

Robust statistics: the scale of a bar's move is the median absolute deviation (MAD) of the per-bar log
returns in a window of `window` observed bars around it (windows every `stride` bars; each bar uses the
window centred nearest to it). Local, so a volatile day raises the bar and a quiet one lowers it; robust, so
the spike under test barely moves it. Bars that carry no information - flat (O=H=L=C) at the previous close,
e.g. an illiquid minute without trades or a stuck feed - are left out of the returns, and a return over
several bars is scaled by sqrt(bars elapsed), as for a random walk. The scale is never below one price tick
(the price's decimal resolution), so a market moving in whole ticks is not all outliers.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec
import numpy as np
import pandas as pd
from numpy.lib.stride_tricks import sliding_window_view

from common.domain import quality
from common.domain.formats import CANDLE_COLUMNS, PRICE_COLUMNS, timeframe_ms
from common.domain.timeframe import DAY_NS, MONDAY_NS, MS, WEEK_NS
from common.errors import MdpError
from schemas import Severity

Policy = Literal["reject", "flag", "repair", "alert"]

DAY_MS = DAY_NS // MS
WEEK_MS = WEEK_NS // MS
MONDAY_MS = MONDAY_NS // MS  # 1970-01-01 was a Thursday


@dataclass(frozen=True, slots=True)
class FrameRule:
    name: str
    severity: Severity
    policy: Policy
    description: str


def _event_rule(name: str, description: str) -> FrameRule:
    """A rule that common.domain.quality already defines for single events: same name and severity."""
    rule = quality.RULES_BY_NAME[name]
    return FrameRule(name, rule.severity, "reject", description)


FRAME_RULES: tuple[FrameRule, ...] = (
    _event_rule("fields.missing", "open, high, low, close or volume is empty, None or not a finite number"),
    _event_rule("time.invalid", "open_time <= 0"),
    _event_rule("time.future", "open_time later than now + max_future_skew_ms"),
    FrameRule("candle.misaligned", "error", "reject",
              "open_time not on the timeframe's boundary (as the normalizer rejects it)"),
    _event_rule("price.non_positive", "open, high, low or close <= 0"),
    _event_rule("volume.negative", "volume < 0"),
    _event_rule("ohlc.consistency", "high/low do not bound open/close (or high < low)"),
    FrameRule("time.duplicate", "info", "repair", "an identical candle repeated: the copy is dropped"),
    FrameRule("time.conflict", "error", "reject",
              "a second candle with the same open time and different values: the first is kept"),
    FrameRule("time.out_of_order", "warning", "repair", "open time earlier than the previous row's: reordered"),
    FrameRule("time.gap", "warning", "alert", "missing open times (timestamp = the first missing one)"),
    FrameRule("volume.zero", "info", "flag", "zero-volume bar: real on illiquid markets, stored and flagged"),
    FrameRule("price.stuck", "warning", "flag", "O=H=L=C unchanged for stuck_bars or more consecutive bars"),
    FrameRule("price.outlier", "warning", "flag",
              "log return (or a high/low wick) beyond k rolling MADs of the local returns"),
    FrameRule("candle.open_gap", "warning", "flag", "open far from the previous close, in MADs (with a floor)"),
    FrameRule("price.cross_venue", "warning", "flag",
              "close deviates from the same symbol on another venue beyond the local basis by a tolerance"),
)

FRAME_RULES_BY_NAME: dict[str, FrameRule] = {r.name: r for r in FRAME_RULES}


class FrameParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Thresholds of the series rules. The defaults were chosen once on the real recordings (docs/quality.md
    shows the distributions), not per file: they hold for 1m to 1d bars, liquid and illiquid markets."""

    # time.future: tolerated clock skew (same default as validation.max_future_skew_s).
    max_future_skew_ms: int = 5_000
    # Robust statistics: bars per window and the step between windows.
    window: int = 120
    stride: int = 30
    # price.outlier: a return beyond outlier_k MADs of the local returns, and at least min_move (log) in size;
    # a wick (high above max(open, close), low below min(open, close)) beyond wick_k MADs and min_move.
    outlier_k: float = 10.0
    wick_k: float = 10.0
    min_move: float = 0.002
    # candle.open_gap: |log(open / previous close)| beyond open_gap_k local scales and at least open_gap_min.
    open_gap_k: float = 10.0
    open_gap_min: float = 0.002
    # price.stuck: this many consecutive flat bars at one price.
    stuck_bars: int = 10
    # price.cross_venue: deviation from the local basis beyond cross_venue_k MADs and cross_venue_tolerance.
    cross_venue_k: float = 10.0
    cross_venue_tolerance: float = 0.005

    def __post_init__(self) -> None:
        if self.window < 8 or not 1 <= self.stride <= self.window:
            raise ValueError(f"FrameParams: window={self.window}, stride={self.stride}; need window >= 8 and "
                             f"1 <= stride <= window")
        if self.stuck_bars < 2:
            raise ValueError(f"FrameParams: stuck_bars={self.stuck_bars}; need at least 2")


DEFAULT_PARAMS = FrameParams()


class FrameError(MdpError, ValueError):
    """A frame the validator cannot read (missing columns, wrong types): names what is wrong and the fix."""


@dataclass(frozen=True, slots=True)
class Report:
    """The findings of one series. `findings[rule]` is a DataFrame with `timestamp` (open time, ms), `row`
    (0-based input position) and the rule's value columns. `stored` holds the input positions of the rows
    that would be stored (not rejected, duplicates dropped), in time order; `flags` maps a stored row's input
    position to the flag rules it tripped."""

    rows: int
    timeframe: str
    findings: dict[str, pd.DataFrame]
    stored: np.ndarray
    flags: dict[str, np.ndarray] = field(default_factory=dict)

    def summary(self) -> dict[str, int]:
        return {rule: len(f) for rule, f in self.findings.items() if len(f)}

    @property
    def has_errors(self) -> bool:
        return any(FRAME_RULES_BY_NAME[r].severity in ("error", "critical") for r in self.summary())

    def issues(self) -> list[dict[str, Any]]:
        """Every finding as {"rule", "severity", "timestamp", "row", ...values}, in time order, JSON-ready
        (NaN becomes None)."""
        out: list[dict[str, Any]] = []
        for rule, frame in self.findings.items():
            severity = FRAME_RULES_BY_NAME[rule].severity
            for rec in frame.to_dict("records"):
                item: dict[str, Any] = {"rule": rule, "severity": severity}
                for k, v in rec.items():
                    item[str(k)] = None if isinstance(v, float) and not np.isfinite(v) else v
                out.append(item)
        out.sort(key=lambda i: (i["timestamp"], i["rule"]))
        return out

    def iter_findings(self) -> Iterator[tuple[FrameRule, pd.DataFrame]]:
        for rule in FRAME_RULES:
            frame = self.findings.get(rule.name)
            if frame is not None and len(frame):
                yield rule, frame

    def stored_frame(self, df: pd.DataFrame) -> pd.DataFrame:
        """What would be stored from `df`: repaired (sorted, deduplicated), rejected rows left out, with a
        `quality` column naming the flag rules each bar tripped (comma-separated, '' when clean)."""
        out = df.iloc[self.stored].reset_index(drop=True)
        quality_text = np.full(len(self.stored), "", dtype=object)
        position = np.full(self.rows, -1, dtype=np.int64)
        position[self.stored] = np.arange(len(self.stored))
        for rule in FRAME_RULES:
            rows = self.flags.get(rule.name)
            if rows is None or not len(rows):
                continue
            at = position[rows]
            at = at[at >= 0]
            quality_text[at] = [f"{q},{rule.name}" if q else rule.name for q in quality_text[at]]
        out["quality"] = quality_text
        return out


# ---------------------------------------------------------------------------------------------------------
# Helpers


def _columns(df: pd.DataFrame) -> tuple[np.ndarray, ...]:
    missing = [c for c in CANDLE_COLUMNS if c not in df.columns]
    if missing:
        raise FrameError(f"the frame lacks column(s) {', '.join(missing)}; it needs {', '.join(CANDLE_COLUMNS)} "
                         f"(open_time in epoch ms): read files with common.domain.formats.load_candles")
    t = df["open_time"].to_numpy()
    if not np.issubdtype(t.dtype, np.integer):
        raise FrameError(f"open_time has dtype {t.dtype}; it must be integer epoch milliseconds (e.g. "
                         f"df['open_time'] = df['open_time'].astype('int64'))")
    values = []
    for name in (*PRICE_COLUMNS, "volume"):
        try:
            values.append(df[name].to_numpy(dtype=np.float64, na_value=np.nan))
        except (TypeError, ValueError):
            raise FrameError(f"column {name!r} (dtype {df[name].dtype}) is not numeric; convert it with "
                             f"pd.to_numeric(df[{name!r}], errors='coerce')") from None
    return (t.astype(np.int64, copy=False), *values)


def price_tick(prices: np.ndarray) -> float:
    """The price resolution: 10^-d for the fewest decimals d that write 95% of the prices exactly (a sample
    of at most 20,000). A floor for the robust scale: a market that moves in whole ticks has a MAD of 0."""
    p = prices[np.isfinite(prices) & (prices > 0)]
    if not len(p):
        return 0.0
    if len(p) > 20_000:
        p = p[np.linspace(0, len(p) - 1, 20_000).astype(np.int64)]
    for d in range(13):
        scaled = p * 10.0 ** d
        if np.mean(np.abs(scaled - np.round(scaled)) <= 1e-9 * scaled + 1e-9) >= 0.95:
            return 10.0 ** -d
    return 10.0 ** -12


def window_stats(x: np.ndarray, window: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Median and median absolute deviation of `x` for each element, over the window of `window` elements
    (starting every `stride`, the last one ending at the end) whose centre is nearest to it. Exact medians by
    partition, O(n * window / stride): why not pandas' rolling median - it costs ~0.2 s per million values
    and we need several."""
    n = len(x)
    if n == 0:
        return np.empty(0), np.empty(0)
    w = min(window, n)
    starts = np.arange(0, n - w + 1, stride)
    regular = len(starts)
    if starts[-1] != n - w:
        starts = np.append(starts, n - w)
    views = sliding_window_view(x, w)[starts]  # a copy (fancy indexing): partitioned in place below
    lo, hi = (w - 1) // 2, w // 2
    views.partition((lo, hi), axis=1)
    med = (views[:, lo] + views[:, hi]) * 0.5
    views -= med[:, None]
    np.abs(views, out=views)
    views.partition((lo, hi), axis=1)
    mad = (views[:, lo] + views[:, hi]) * 0.5
    # Nearest centre: regular windows by arithmetic, then the last (irregular) one where it is nearer.
    half = (w - 1) / 2
    i = np.arange(n)
    pick = np.clip(np.rint((i - half) / stride).astype(np.int64), 0, regular - 1)
    if len(starts) > regular:
        last_centre = starts[-1] + half
        nearer = np.abs(last_centre - i) < np.abs(starts[pick] + half - i)
        pick[nearer] = len(starts) - 1
    return med[pick], mad[pick]


@dataclass(frozen=True, slots=True)
class _Moves:
    """Return statistics of a stored series: which bars are observations, the flagged return outliers, and
    the per-bar robust scale of one bar's log return."""

    outlier: np.ndarray  # bool per series bar: its close is a return outlier
    ret: np.ndarray  # log return into the bar from the previous observation (NaN if none)
    scale: np.ndarray  # per series bar: robust scale of a one-bar return (MAD, floored at one tick)
    median: np.ndarray  # per series bar: local median of the per-bar return
    elapsed: np.ndarray  # bars since the previous observation (>= 1; 1 for the first bar)
    filler: np.ndarray  # bool: flat bar at the previous close (carries no new price)


def _moves(t: np.ndarray, o: np.ndarray, h: np.ndarray, lo: np.ndarray, c: np.ndarray, tf: int,
           p: FrameParams) -> _Moves:
    n = len(c)
    flat = (o == h) & (h == lo) & (lo == c)
    filler = np.zeros(n, dtype=bool)
    filler[1:] = flat[1:] & (c[1:] == c[:-1])
    obs = np.flatnonzero(~filler)
    tick = price_tick(c)
    log_c = np.log(c)
    ret = np.full(n, np.nan)
    elapsed = np.ones(n)
    # Per observation: return from the previous observation, per-bar normalised by sqrt(elapsed bars).
    r = np.diff(log_c[obs])
    b = np.maximum(np.diff(t[obs]) / tf, 1.0)
    rn = r / np.sqrt(b)
    med_o, mad_o = window_stats(rn, p.window, p.stride)
    ret[obs[1:]] = r
    elapsed[obs[1:]] = b
    # Every series bar takes the statistics of the observation at or before it (the first: the first's).
    k = np.clip(np.searchsorted(obs, np.arange(n), side="right") - 2, 0, max(len(rn) - 1, 0))
    if len(rn):
        median, mad = med_o[k], mad_o[k]
    else:
        median, mad = np.zeros(n), np.zeros(n)
    scale = np.maximum(mad, tick / c)
    outlier = np.zeros(n, dtype=bool)
    if len(rn):
        big = (np.abs(rn - med_o) > p.outlier_k * np.maximum(mad_o, tick / c[obs[1:]])) & (np.abs(r) > p.min_move)
        # The return back from a spike is not a second outlier: a big move reversing a big previous move.
        recovery = np.zeros_like(big)
        recovery[1:] = big[:-1] & (np.sign(r[1:]) != np.sign(r[:-1])) & \
            (np.abs(r[1:] + r[:-1]) < 0.5 * np.maximum(np.abs(r[1:]), np.abs(r[:-1])))
        outlier[obs[1:][big & ~recovery]] = True
    return _Moves(outlier, ret, scale, median, elapsed, filler)


# ---------------------------------------------------------------------------------------------------------
# The validator


def validate_frame(df: pd.DataFrame, timeframe: str, *, now_ms: int | None = None,
                   reference: pd.DataFrame | None = None, params: FrameParams = DEFAULT_PARAMS) -> Report:
    """Every finding of the catalog's series rules on `df` (see the module docstring). `reference`: the same
    symbol on another venue and timeframe (same columns), for price.cross_venue."""
    tf = timeframe_ms(timeframe)
    now = time.time_ns() // MS if now_ms is None else now_ms
    t, o, h, lo, c, v = _columns(df)
    n = len(t)
    rows = np.arange(n)
    findings: dict[str, pd.DataFrame] = {}
    flags: dict[str, np.ndarray] = {}

    def add(rule: str, at: np.ndarray, timestamp: np.ndarray | None = None, **values: np.ndarray) -> None:
        findings[rule] = pd.DataFrame({"timestamp": t[at] if timestamp is None else timestamp,
                                       "row": rows[at], **values})

    # 1. Row rules (reject).
    finite = np.isfinite(o) & np.isfinite(h) & np.isfinite(lo) & np.isfinite(c) & np.isfinite(v)
    at = np.flatnonzero(~finite)
    add("fields.missing", at, open=o[at], high=h[at], low=lo[at], close=c[at], volume=v[at])
    invalid = t <= 0
    at = np.flatnonzero(invalid)
    add("time.invalid", at)
    future = t > now + params.max_future_skew_ms
    at = np.flatnonzero(future)
    add("time.future", at, now=np.full(len(at), now, dtype=np.int64))
    if DAY_MS % tf == 0:
        misaligned = ~invalid & (t % tf != 0)
        boundary = t - t % tf
    elif tf == WEEK_MS:
        misaligned = ~invalid & ((t - MONDAY_MS) % tf != 0)
        boundary = t - (t - MONDAY_MS) % tf
    else:  # exchange-specific anchors (3d): not checked, as in the normalizer
        misaligned = np.zeros(n, dtype=bool)
        boundary = t
    at = np.flatnonzero(misaligned)
    add("candle.misaligned", at, expected_open_time=boundary[at])
    with np.errstate(invalid="ignore"):
        non_positive = finite & ((o <= 0) | (h <= 0) | (lo <= 0) | (c <= 0))
        volume_negative = finite & (v < 0)
        inconsistent = finite & ((h < np.maximum(np.maximum(o, c), lo)) | (lo > np.minimum(o, c)))
    for rule, mask in (("price.non_positive", non_positive), ("ohlc.consistency", inconsistent)):
        at = np.flatnonzero(mask)
        add(rule, at, open=o[at], high=h[at], low=lo[at], close=c[at])
    at = np.flatnonzero(volume_negative)
    add("volume.negative", at, volume=v[at])
    rejected = ~finite | invalid | future | misaligned | non_positive | volume_negative | inconsistent

    # 2. Identity: duplicates and conflicts among the rows that could be stored; the first one wins.
    kept = np.flatnonzero(~rejected)
    order = kept[np.argsort(t[kept], kind="stable")]
    ts = t[order]
    repeat = np.zeros(len(order), dtype=bool)
    repeat[1:] = ts[1:] == ts[:-1]
    first_pos = np.maximum.accumulate(np.where(repeat, 0, np.arange(len(order))))
    copy_rows, first_rows = order[repeat], order[first_pos[repeat]]
    same = ((o[copy_rows] == o[first_rows]) & (h[copy_rows] == h[first_rows]) & (lo[copy_rows] == lo[first_rows])
            & (c[copy_rows] == c[first_rows]) & (v[copy_rows] == v[first_rows]))
    dup, dup_first = copy_rows[same], first_rows[same]
    add("time.duplicate", dup, first_row=dup_first)
    con, con_first = copy_rows[~same], first_rows[~same]
    add("time.conflict", con, first_row=con_first, open=o[con], high=h[con], low=lo[con], close=c[con],
        volume=v[con], kept_open=o[con_first], kept_high=h[con_first], kept_low=lo[con_first],
        kept_close=c[con_first], kept_volume=v[con_first])

    # 3. Order: among the unique rows in arrival order, a row earlier than the one before it.
    series = order[~repeat]  # the stored series, in time order
    arrival = np.sort(series)
    ta = t[arrival]
    descent = np.flatnonzero(ta[1:] < ta[:-1]) + 1
    add("time.out_of_order", arrival[descent], previous_open_time=ta[descent - 1])

    # 4. Gaps: open times missing from every row with a usable open time. A row rejected for its values still
    # holds its slot: it is reported once, by its own rule, not again as a gap.
    timed = np.flatnonzero(~(invalid | future | misaligned))
    by_time = timed[np.argsort(t[timed], kind="stable")]
    sorted_t = t[by_time]
    distinct = np.ones(len(sorted_t), dtype=bool)
    distinct[1:] = sorted_t[1:] != sorted_t[:-1]
    holders = by_time[distinct]  # the first row holding each distinct open time, in time order
    present = t[holders]
    step = np.diff(present)
    gap = np.flatnonzero(step > tf)
    before = holders[gap]
    findings["time.gap"] = pd.DataFrame({
        "timestamp": present[gap] + tf, "row": before, "missing_bars": step[gap] // tf - 1,
        "previous_open_time": present[gap], "next_open_time": present[gap + 1]})

    # 5. The stored series.
    st, so, sh, sl, sc, sv = t[series], o[series], h[series], lo[series], c[series], v[series]
    m = len(series)

    at = np.flatnonzero(sv == 0)
    add("volume.zero", series[at], volume=sv[at], close=sc[at])
    flags["volume.zero"] = series[at]

    if m:
        flat = (so == sh) & (sh == sl) & (sl == sc)
        cont = np.zeros(m, dtype=bool)
        cont[1:] = flat[1:] & flat[:-1] & (sc[1:] == sc[:-1])
        run_id = np.cumsum(~cont) - 1
        run_len = np.bincount(run_id)
        starts = np.flatnonzero(~cont)
        long_run = flat[starts] & (run_len >= params.stuck_bars)
        s0, sl_len = starts[long_run], run_len[long_run]
        add("price.stuck", series[s0], bars=sl_len, price=sc[s0], last_timestamp=st[s0 + sl_len - 1])
        flags["price.stuck"] = series[np.flatnonzero(long_run[run_id] & flat)]

        mv = _moves(st, so, sh, sl, sc, tf, params)
        with np.errstate(divide="ignore", invalid="ignore"):
            up = np.log(sh / np.maximum(so, sc))
            down = np.log(np.minimum(so, sc) / sl)
        wick = np.maximum(up, down)
        wick_out = (wick > params.wick_k * mv.scale) & (wick > params.min_move)
        out = np.flatnonzero(mv.outlier | wick_out)
        kind = np.where(mv.outlier[out] & wick_out[out], "return+wick",
                        np.where(mv.outlier[out], "return", np.where(up[out] >= down[out], "wick_high", "wick_low")))
        prev_close = np.full(m, np.nan)
        prev_close[1:] = sc[:-1]
        add("price.outlier", series[out], kind=kind, open=so[out], high=sh[out], low=sl[out], close=sc[out],
            previous_close=prev_close[out], log_return=mv.ret[out], wick=wick[out], mad=mv.scale[out],
            threshold_return=params.outlier_k * mv.scale[out] * np.sqrt(mv.elapsed[out]),
            threshold_wick=params.wick_k * mv.scale[out])
        flags["price.outlier"] = series[out]

        # candle.open_gap: the open against the previous close, skipped after a return outlier (that close
        # is the suspect one). Scale: the local MAD of the jumps or of one return over the bars elapsed.
        jump = np.full(m, np.nan)
        with np.errstate(divide="ignore", invalid="ignore"):
            jump[1:] = np.log(so[1:] / sc[:-1])
        jmed, jmad = window_stats(np.nan_to_num(jump), params.window, params.stride)
        gap_scale = np.maximum(jmad, mv.scale * np.sqrt(np.maximum(mv.elapsed - 1.0, 1.0)))
        after_outlier = np.zeros(m, dtype=bool)
        after_outlier[1:] = mv.outlier[:-1]
        open_gap = (np.abs(jump - jmed) > params.open_gap_k * gap_scale) & (np.abs(jump) > params.open_gap_min) \
            & ~after_outlier
        at = np.flatnonzero(open_gap)
        add("candle.open_gap", series[at], open=so[at], previous_close=prev_close[at], jump=jump[at],
            threshold=params.open_gap_k * gap_scale[at])
        flags["candle.open_gap"] = series[at]

        if reference is not None:
            cv = _cross_venue(st, sc, reference, tf, params)
            at = cv[0]
            add("price.cross_venue", series[at], close=sc[at], reference_close=cv[1], deviation=cv[2],
                basis=cv[3], threshold=cv[4])
            flags["price.cross_venue"] = series[at]
    for catalog_rule in FRAME_RULES:
        findings.setdefault(catalog_rule.name, pd.DataFrame({"timestamp": np.empty(0, np.int64),
                                                             "row": np.empty(0, np.int64)}))
    ordered = {r.name: findings[r.name] for r in FRAME_RULES}
    return Report(rows=n, timeframe=timeframe, findings=ordered, stored=series, flags=flags)


def _cross_venue(st: np.ndarray, sc: np.ndarray, reference: pd.DataFrame, tf: int,
                 p: FrameParams) -> tuple[np.ndarray, ...]:
    """Series positions whose close deviates from the reference venue's close beyond the local basis, with
    the reference close, the deviation from the basis, the basis and the threshold.

    The basis (log price ratio between venues: quote currency, funding, fees) drifts, so it is the window
    median of the ratio, not zero. Bars where the reference itself has a return outlier are skipped: the
    deviation is the reference's fault."""
    rt, ro, rh, rl, rc, _ = _columns(reference)
    ok = np.isfinite(rc) & (rc > 0) & (rt > 0)
    rt, ro, rh, rl, rc = rt[ok], ro[ok], rh[ok], rl[ok], rc[ok]
    order = np.argsort(rt, kind="stable")
    rt, ro, rh, rl, rc = rt[order], ro[order], rh[order], rl[order], rc[order]
    first = np.ones(len(rt), dtype=bool)
    first[1:] = rt[1:] != rt[:-1]
    rt, ro, rh, rl, rc = rt[first], ro[first], rh[first], rl[first], rc[first]
    ref_outlier = _moves(rt, ro, rh, rl, rc, tf, p).outlier if len(rt) else np.zeros(0, dtype=bool)
    pos = np.clip(np.searchsorted(rt, st), 0, max(len(rt) - 1, 0))
    matched = np.flatnonzero((rt[pos] == st) & ~ref_outlier[pos]) if len(rt) else np.empty(0, np.int64)
    empty = np.empty(0)
    if not len(matched):
        return np.empty(0, np.int64), empty, empty, empty, empty
    ref_close = rc[pos[matched]]
    d = np.log(sc[matched] / ref_close)
    med, mad = window_stats(d, p.window, p.stride)
    threshold = np.maximum(p.cross_venue_k * mad, p.cross_venue_tolerance)
    bad = np.abs(d - med) > threshold
    return matched[bad], ref_close[bad], (d - med)[bad], med[bad], threshold[bad]


__all__ = [
    "DEFAULT_PARAMS", "FRAME_RULES", "FRAME_RULES_BY_NAME", "FrameError", "FrameParams", "FrameRule", "Policy", "Report",
    "price_tick", "validate_frame", "window_stats",
]
