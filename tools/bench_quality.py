"""`python -m tools.bench_quality`: the labelled data-quality benchmark (issue 4, "Measure"). Prints Markdown.

1. Clean real data: every finding `validate_frame` makes on the real BTC/USDT 1m (ccxt, March 2024) and
   ALGOUSDT 1m (Binance USD-M, September 2024) files, grouped by rule, each with its values and an
   explanation: a REAL issue of the file (duplicates, conflicts, zero-volume minutes: facts anyone can
   check) or a judgement call on a real market move (the false positives, counted against the 1% bound).
2. Recall per rule: the repaired clean series (sorted, deduplicated: the validator's own repair) gets each
   kind of issue injected at random places (seeded, spaced apart, away from the base's own findings);
   a label (rule, open time) is found when a finding of that rule has that open time. Findings that are
   neither labels nor base findings are collateral: each is attributed to the injection next to it.
3. Sensitivity: recall of a price spike by its size; cross-venue recall on Binance.US BTC/USDT against
   BTC/USD.
4. Speed: candles validated per second, one process, on a 1M-row frame built from the real 1m series.
5. `mdp validate --json` (in process, the real CLI) over every candle file in ../shared/data/real.

    python -m tools.bench_quality [--trials 8] [--per-kind 25] [--seed 7] [--speed-rows 1000000]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from common import cli
from common.commands.validate import iso_ms
from common.domain.formats import load_candles, timeframe_ms
from common.domain.quality_frame import FRAME_RULES, FrameParams, Report, validate_frame
from simulator.recording import real_data_dir

REAL = real_data_dir()  # $MDP_REAL_DATA, ../shared/data/real, or the shipped data/real

CLEAN = {
    "BTC/USDT 1m (Binance spot via ccxt, 2024-03)": ("binance-spot-1m-ccxt/BTCUSDT-1m-2024-03.csv", "ccxt-ohlcv"),
    "ALGOUSDT 1m (Binance USD-M, 2024-09)": ("binance-usdm-1m/ALGOUSDT-1m-2024-09.csv", "binance-usdm-csv"),
}
CROSS = ("binanceus-kraken-2023-03/binanceus_BTCUSDT_1m_20230301_20230321.csv",
         "binanceus-kraken-2023-03/binanceus_BTCUSD_1m_20230301_20230321.csv", "binanceus-csv")

# Every candle file of ../shared/data/real with its format, plus the one CSV there that is not candles.
REAL_FILES: list[tuple[str, str, list[str]]] = [
    ("binance-spot-1m-daily/BTCUSDT-1m-2020-01-01.zip", "binance-kline-zip", []),
    ("binance-spot-1m-daily/BTCUSDT-1m-2020-01-02.zip", "binance-kline-zip", []),
    ("binance-spot-1m-daily/BTCUSDT-1m-2020-01-03.zip", "binance-kline-zip", []),
    ("binance-spot-1h/BTCUSDT-1h-2021-04-2023-12.csv", "python-binance", []),
    ("binance-spot-1h/ETHUSDT-1h-2021-04-2023-12.csv", "python-binance", []),
    ("binance-spot-1m-ccxt/BTCUSDT-1m-2024-03.csv", "ccxt-ohlcv", []),
    ("binance-spot-1m-ccxt/BTCUSDT-1h-2023-06-2024-03.csv", "ccxt-ohlcv", []),
    ("binance-spot-1m-ccxt/BTCUSDT-1d-2023-06-2024-03.csv", "ccxt-ohlcv", []),
    ("binance-usdm-1m/ALGOUSDT-1m-2024-09.csv", "binance-usdm-csv", []),
    ("binanceus-kraken-2023-03/binanceus_BTCUSDT_1m_20230301_20230321.csv", "binanceus-csv", []),
    ("binanceus-kraken-2023-03/binanceus_BTCUSD_1m_20230301_20230321.csv", "binanceus-csv", []),
    ("binanceus-kraken-2023-03/binanceus_BTCUSDC_1m_20230301_20230321.csv", "binanceus-csv", []),
    ("binanceus-kraken-2023-03/kraken_XBTUSDC_1m_ohlcvt_2023Q1.csv", "kraken-ohlcvt", []),
    ("binanceus-kraken-2023-03/binanceus_BTCUSDT_1m_20230301_20230321.csv", "binanceus-csv",
     ["--reference", str(REAL / "binanceus-kraken-2023-03/binanceus_BTCUSD_1m_20230301_20230321.csv")]),
    ("binanceus-kraken-2023-03/binanceus_BTCUSDC_1m_20230301_20230321.csv", "binanceus-csv",
     ["--reference", str(REAL / "binanceus-kraken-2023-03/binanceus_BTCUSDT_1m_20230301_20230321.csv")]),
    ("binanceus-kraken-2023-03/kraken_XBTUSDC_1m_ohlcvt_2023Q1.csv", "kraken-ohlcvt",
     ["--reference", str(REAL / "binanceus-kraken-2023-03/binanceus_BTCUSDC_1m_20230301_20230321.csv"),
      "--reference-format", "binanceus-csv"]),
    ("binanceus-kraken-2023-03/binanceus_metadata_range_1m_20230301_20230321.csv", "binanceus-csv", []),
]

# Rules whose findings state a checkable fact about the file (not a statistical judgement).
FACT_RULES = {"fields.missing", "time.invalid", "time.future", "candle.misaligned", "price.non_positive",
              "volume.negative", "ohlc.consistency", "time.duplicate", "time.conflict", "time.out_of_order",
              "time.gap", "volume.zero"}

NOW_MS = 1_767_225_600_000  # 2026-01-01: a fixed "now", so runs are reproducible


# ---------------------------------------------------------------------------------------------------------
# 1. Findings on clean real data, explained


def explain(rule: str, f: dict[str, Any], df: pd.DataFrame) -> str:
    """Why this finding is there, from its values and its neighbours in the file."""
    row = int(f["row"])
    if rule == "time.duplicate":
        first = int(f["first_row"])
        page = " at a 1000-row page boundary (ccxt fetch_ohlcv pagination repeats the last candle)" \
            if row % 1000 == 0 else ""
        return f"REAL: identical copy of data row {first}{page}"
    if rule == "time.conflict":
        return (f"REAL: a second version of the candle (volume {f['volume']} vs {f['kept_volume']} kept, close "
                f"{f['close']} vs {f['kept_close']}): the first fetch caught the candle while it was still open")
    if rule == "volume.zero":
        prev = df["close"].iloc[row - 1] if row else float("nan")
        bar = df.iloc[row]
        flat = bar["open"] == bar["high"] == bar["low"] == bar["close"]
        return "REAL: no trade that minute (flat bar at the previous close)" if flat and bar["close"] == prev \
            else "REAL: zero volume reported"
    if rule == "time.gap":
        return f"REAL: {f['missing_bars']} bar(s) missing (exchange outage or maintenance)"
    if rule == "price.outlier":
        close = df["close"].to_numpy()
        later = close[min(row + 5, len(close) - 1)]
        prev = f["previous_close"]
        kept = abs(np.log(later / prev)) > 0.5 * abs(float(f["log_return"] or 0))
        what = (f"{float(f['log_return']):+.2%} vs threshold {float(f['threshold_return']):.2%}"
                if "return" in str(f["kind"]) else
                f"{float(f['wick']):.2%} vs threshold {float(f['threshold_wick']):.2%}")
        after = "the price stayed there 5 bars later: a real move" if kept else "the price came back within 5 bars"
        return f"JUDGEMENT: {f['kind']} {what}; {after}"
    if rule == "candle.open_gap":
        return f"JUDGEMENT: open {f['open']} vs previous close {f['previous_close']} ({float(f['jump']):+.2%})"
    if rule == "price.stuck":
        return f"JUDGEMENT: {f['bars']} flat bars at {f['price']}"
    return "see values"


def clean_findings(name: str, df: pd.DataFrame, tf: str, params: FrameParams) -> tuple[list[str], Counter[str], int]:
    report = validate_frame(df, tf, now_ms=NOW_MS, params=params)
    lines = [f"\n#### {name}: {len(df):,} rows\n", "| rule | count | first open times | explanation (first) |",
             "|---|---:|---|---|"]
    kinds: Counter[str] = Counter()
    judgement = 0
    detail: list[str] = []
    for rule, frame in report.iter_findings():
        recs: list[dict[str, Any]] = [{str(k): v for k, v in rec.items()} for rec in frame.to_dict("records")]
        reasons = [explain(rule.name, rec, df) for rec in recs]
        for why in reasons:
            kinds[why.split(":")[0]] += 1
        if rule.name not in FACT_RULES:
            judgement += len(recs)
        shown = ", ".join(iso_ms(int(rec["timestamp"])) for rec in recs[:3]) + (", ..." if len(recs) > 3 else "")
        lines.append(f"| {rule.name} | {len(recs)} | {shown} | {reasons[0]} |")
        if rule.name not in FACT_RULES or rule.name == "time.conflict":
            detail.append(f"\n{rule.name} on {name}, every finding:\n")
            detail.append("| open time | values | explanation |\n|---|---|---|")
            for rec, why in zip(recs, reasons, strict=True):
                values = ", ".join(f"{k}={_fmt(v)}" for k, v in rec.items() if k not in ("timestamp", "row"))
                detail.append(f"| {iso_ms(int(rec['timestamp']))} | {values} | {why} |")
    return lines + detail, kinds, judgement


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


# ---------------------------------------------------------------------------------------------------------
# 2. Injection


@dataclass(frozen=True, slots=True)
class Label:
    rule: str
    timestamp: int
    kind: str
    end: int = 0  # price.stuck: the run's last open time


KINDS = ("gap", "duplicate", "conflict", "out_of_order", "non_positive", "negative_volume", "ohlc", "missing",
         "future", "spike", "wick", "stuck", "zero_volume", "open_gap")
RULE_OF = {"gap": "time.gap", "duplicate": "time.duplicate", "conflict": "time.conflict",
           "out_of_order": "time.out_of_order", "non_positive": "price.non_positive",
           "negative_volume": "volume.negative", "ohlc": "ohlc.consistency", "missing": "fields.missing",
           "future": "time.future", "spike": "price.outlier", "wick": "price.outlier", "stuck": "price.stuck",
           "zero_volume": "volume.zero", "open_gap": "candle.open_gap", "cross_spike": "price.cross_venue"}


def pick_positions(n: int, count: int, spacing: int, forbidden: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`count` random row positions at least `spacing` apart, away from `forbidden` rows."""
    free = np.ones(n, dtype=bool)
    free[:spacing] = free[n - 3 * spacing:] = False
    for f in forbidden:
        free[max(0, f - 3):f + 4] = False
    chosen: list[int] = []
    for p in rng.permutation(np.flatnonzero(free)):
        if free[p]:
            chosen.append(int(p))
            free[max(0, p - spacing):p + spacing] = False
            if len(chosen) == count:
                break
    if len(chosen) < count:
        raise SystemExit(f"cannot place {count} injections {spacing} rows apart in {n} rows; lower --per-kind")
    return np.array(chosen)


def inject(base: pd.DataFrame, tf_ms: int, kinds: list[str], positions: np.ndarray, rng: np.random.Generator,
           stuck_bars: int, size: Callable[[], float]) -> tuple[pd.DataFrame, list[Label]]:
    """Apply kinds[k] at positions[k] to a copy of `base`; returns the frame in its new arrival order and the
    labels (rule, open time) a validator must report."""
    t = base["open_time"].to_numpy().copy()
    cols = {c: base[c].to_numpy(dtype=np.float64).copy() for c in ("open", "high", "low", "close", "volume")}
    o, h, lo, c, v = (cols[k] for k in ("open", "high", "low", "close", "volume"))
    key = np.arange(len(t), dtype=np.float64)  # arrival order: rows sorted by key
    keep = np.ones(len(t), dtype=bool)
    extra: list[tuple[float, int, tuple[float, float, float, float, float]]] = []
    labels: list[Label] = []
    for kind, i in zip(kinds, positions, strict=True):
        sign = 1.0 if rng.random() < 0.5 else -1.0
        if kind == "gap":
            k = int(rng.integers(1, 6))
            keep[i:i + k] = False
            labels.append(Label("time.gap", int(t[i]), kind))
        elif kind in ("duplicate", "conflict"):
            d = int(rng.integers(0, 4))
            values = (o[i], h[i], lo[i], c[i], v[i])
            if kind == "conflict":
                close = lo[i] + (h[i] - lo[i]) * rng.random()
                values = (o[i], h[i], lo[i], close, v[i] * rng.uniform(1.1, 3.0) + 1e-3)
            extra.append((i + d + 0.5, int(t[i]), values))
            labels.append(Label(RULE_OF[kind], int(t[i]), kind))
        elif kind == "out_of_order":
            key[i] = i + int(rng.integers(1, 5)) + 0.5
            labels.append(Label("time.out_of_order", int(t[i]), kind))
        elif kind == "non_positive":
            col = (o, h, lo, c)[int(rng.integers(0, 4))]
            col[i] = 0.0 if rng.random() < 0.5 else -col[i]
            labels.append(Label("price.non_positive", int(t[i]), kind))
        elif kind == "negative_volume":
            v[i] = -(v[i] if v[i] > 0 else 1.0)
            labels.append(Label("volume.negative", int(t[i]), kind))
        elif kind == "ohlc":
            variant = int(rng.integers(0, 3))
            if variant == 0:  # high below low
                h[i], lo[i] = lo[i] * 0.999, h[i] * 1.001
            elif variant == 1:  # high below the body
                h[i] = max(o[i], c[i]) * (1 - rng.uniform(0.001, 0.01))
            else:  # low above the body
                lo[i] = min(o[i], c[i]) * (1 + rng.uniform(0.001, 0.01))
            labels.append(Label("ohlc.consistency", int(t[i]), kind))
        elif kind == "missing":
            (o, h, lo, c, v)[int(rng.integers(0, 5))][i] = np.nan
            labels.append(Label("fields.missing", int(t[i]), kind))
        elif kind == "future":
            future = (NOW_MS // tf_ms + int(rng.integers(1, 500_000))) * tf_ms
            extra.append((i + 0.5, future, (o[i], h[i], lo[i], c[i], v[i])))
            labels.append(Label("time.future", future, kind))
        elif kind == "spike":
            c[i] *= np.exp(sign * size())
            h[i], lo[i] = max(h[i], c[i]), min(lo[i], c[i])
            labels.append(Label("price.outlier", int(t[i]), kind))
        elif kind == "wick":
            if sign > 0:
                h[i] = max(o[i], c[i]) * np.exp(size())
            else:
                lo[i] = min(o[i], c[i]) * np.exp(-size())
            labels.append(Label("price.outlier", int(t[i]), kind))
        elif kind == "stuck":
            n = int(rng.integers(stuck_bars, 3 * stuck_bars + 1))
            price = c[i - 1]
            o[i:i + n] = h[i:i + n] = lo[i:i + n] = c[i:i + n] = price
            labels.append(Label("price.stuck", int(t[i]), kind, end=int(t[i + n - 1])))
        elif kind == "zero_volume":
            v[i] = 0.0
            labels.append(Label("volume.zero", int(t[i]), kind))
        elif kind == "open_gap":
            o[i] = c[i - 1] * np.exp(sign * size())
            h[i], lo[i] = max(h[i], o[i]), min(lo[i], o[i])
            labels.append(Label("candle.open_gap", int(t[i]), kind))
        else:
            raise ValueError(f"unknown injection kind {kind!r}")
    idx = np.flatnonzero(keep)
    frame = pd.DataFrame({"key": key[idx], "open_time": t[idx], "open": o[idx], "high": h[idx], "low": lo[idx],
                          "close": c[idx], "volume": v[idx]})
    if extra:
        ek, et, ev = zip(*extra, strict=True)
        arr = np.array(ev)
        frame = pd.concat([frame, pd.DataFrame({"key": ek, "open_time": np.array(et, dtype=np.int64),
                                                "open": arr[:, 0], "high": arr[:, 1], "low": arr[:, 2],
                                                "close": arr[:, 3], "volume": arr[:, 4]})], ignore_index=True)
    frame = frame.sort_values("key", kind="stable").drop(columns="key").reset_index(drop=True)
    return frame, labels


def _sizes(rng: np.random.Generator, size: tuple[float, float]) -> Callable[[], float]:
    """Draws of an injected move's size (log), uniform in `size`."""
    return lambda: float(rng.uniform(*size))


def found(label: Label, report: Report) -> bool:
    f = report.findings[label.rule]
    if label.rule == "price.stuck":
        return bool(((f["timestamp"] <= label.timestamp) & (f["last_timestamp"] >= label.end)).any())
    return bool((f["timestamp"] == label.timestamp).any())


@dataclass
class Score:
    labels: Counter[str]
    hits: Counter[str]
    collateral: Counter[tuple[str, str]]
    missed: list[tuple[str, Label]]


def score(name: str, base: pd.DataFrame, tf: str, trials: int, per_kind: int, seed: int, params: FrameParams,
          kinds: tuple[str, ...] = KINDS, size: tuple[float, float] = (0.02, 0.10),
          reference: pd.DataFrame | None = None, cross_only: bool = False) -> Score:
    tf_ms = timeframe_ms(tf)
    base_report = validate_frame(base, tf, now_ms=NOW_MS, params=params, reference=reference)
    base_keys = {(r, int(ts)) for r, fr in base_report.findings.items() for ts in fr["timestamp"]}
    base_rows = np.concatenate([fr["row"].to_numpy() for fr in base_report.findings.values()])
    result = Score(Counter(), Counter(), Counter(), [])
    for trial in range(trials):
        rng = np.random.default_rng([seed, trial, len(base)])
        spacing = 3 * params.stuck_bars + 10
        positions = pick_positions(len(base), per_kind * len(kinds), spacing, base_rows, rng)
        plan = [kinds[k % len(kinds)] for k in range(len(positions))]
        frame, labels = inject(base, tf_ms, plan, positions, rng, params.stuck_bars,
                               _sizes(np.random.default_rng([seed, trial, len(base), 1]), size))
        if cross_only:
            labels = [Label("price.cross_venue", lb.timestamp, "cross_spike") for lb in labels]
        report = validate_frame(frame, tf, now_ms=NOW_MS, params=params, reference=reference)
        label_keys = set()
        for lb in labels:
            result.labels[lb.rule] += 1
            label_keys.add((lb.rule, lb.timestamp))
            if found(lb, report):
                result.hits[lb.rule] += 1
            else:
                result.missed.append((name, lb))
        near = np.array(sorted(lb.timestamp for lb in labels))
        kind_at = {lb.timestamp: lb.kind for lb in labels}
        for rule, fr in report.findings.items():
            for ts in fr["timestamp"].to_numpy():
                key = (rule, int(ts))
                if key in label_keys or key in base_keys:
                    continue
                if rule == "price.stuck" and any(lb.rule == rule and found(lb, report) for lb in labels
                                                 if lb.timestamp - 40 * tf_ms <= ts <= lb.timestamp):
                    continue
                j = np.searchsorted(near, ts)
                cands = [near[k] for k in (j - 1, j) if 0 <= k < len(near)]
                cause = min(cands, key=lambda x: abs(x - ts)) if cands else None
                bars = abs(cause - ts) // tf_ms if cause is not None else None
                if cause is not None and bars is not None and bars <= 3 * params.stuck_bars + 3:
                    result.collateral[(rule, f"at or next to injected {kind_at[cause]}")] += 1
                elif cause is not None and bars is not None and bars <= params.window:
                    cause_text = (f"a real move near the threshold; an injection inside its {params.window}-bar "
                                  f"window shifted the local MAD")
                    result.collateral[(rule, cause_text)] += 1
                else:
                    result.collateral[(rule, "UNEXPLAINED")] += 1
    return result


# ---------------------------------------------------------------------------------------------------------
# 4. Speed and 5. every real file


def speed(base: pd.DataFrame, rows: int, repeats: int = 5) -> tuple[float, float, int]:
    """Candles/s of validate_frame on `rows` rows: the real series repeated end to end, each copy shifted in
    time and scaled to continue from the previous copy's last close."""
    copies = -(-rows // len(base))
    span = int(base["open_time"].iloc[-1] - base["open_time"].iloc[0]) + 60_000
    ratio = float(base["close"].iloc[-1] / base["open"].iloc[0])
    parts = []
    for k in range(copies):
        part = base[["open_time", "open", "high", "low", "close", "volume"]].copy()
        part["open_time"] += k * span
        for col in ("open", "high", "low", "close"):
            part[col] = part[col] * ratio ** k
        parts.append(part)
    frame = pd.concat(parts, ignore_index=True).iloc[:rows].reset_index(drop=True)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        validate_frame(frame, "1m", now_ms=NOW_MS)
        times.append(time.perf_counter() - t0)
    return len(frame) / min(times), len(frame) / float(np.median(times)), len(frame)


def run_cli(path: Path, fmt: str, extra: list[str]) -> tuple[int, dict[str, Any] | None, str, float]:
    out, err = io.StringIO(), io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(["validate", str(path), "--format", fmt, "--json", "--now", str(NOW_MS), *extra])
    elapsed = time.perf_counter() - t0
    data = json.loads(out.getvalue()) if out.getvalue().strip() else None
    return code, data, err.getvalue().strip(), elapsed


# ---------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.bench_quality")
    parser.add_argument("--trials", type=int, default=8, help="injection rounds per data set")
    parser.add_argument("--per-kind", type=int, default=25, help="injections of each kind per round")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--speed-rows", type=int, default=1_000_000)
    args = parser.parse_args()
    params = FrameParams()
    print(f"# Data-quality benchmark\n\nMachine: {platform.node()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}, numpy {np.__version__}, pandas {pd.__version__}. Seed {args.seed}, "
          f"{args.trials} rounds x {args.per_kind} injections per kind per data set. Parameters: {params}.\n")

    # 1. Clean data.
    print("## Findings on clean real data\n")
    bases: dict[str, pd.DataFrame] = {}
    total_rows = total_judgement = 0
    for name, (rel, fmt) in CLEAN.items():
        loaded = load_candles(REAL / rel, fmt)
        assert loaded.timeframe is not None
        lines, kinds, judgement = clean_findings(name, loaded.frame, loaded.timeframe, params)
        print("\n".join(lines))
        report = validate_frame(loaded.frame, loaded.timeframe, now_ms=NOW_MS, params=params)
        bases[name] = report.stored_frame(loaded.frame).drop(columns="quality")
        total_rows += loaded.rows
        total_judgement += judgement
        print(f"\nOn {name}: {sum(kinds.values())} findings: {dict(kinds)}; judgement calls (false-positive "
              f"candidates) {judgement} = {judgement / loaded.rows:.3%} of rows.")
    print(f"\n**False positives on clean data: {total_judgement} of {total_rows:,} rows = "
          f"{total_judgement / total_rows:.3%}** (bound: 1%).\n")

    # 2. Recall.
    print("## Recall per rule (injected issues, sizes of spikes, wicks and open gaps 2-10%)\n")
    total = Score(Counter(), Counter(), Counter(), [])
    for name, base in bases.items():
        s = score(name, base, "1m", args.trials, args.per_kind, args.seed, params)
        for attr in ("labels", "hits", "collateral"):
            getattr(total, attr).update(getattr(s, attr))
        total.missed += s.missed
    cross_base = validate_frame(load_candles(REAL / CROSS[0], CROSS[2]).frame, "1m", now_ms=NOW_MS)
    us = load_candles(REAL / CROSS[0], CROSS[2]).frame
    us_base = cross_base.stored_frame(us).drop(columns="quality")
    ref = load_candles(REAL / CROSS[1], CROSS[2]).frame
    cross = score("Binance.US BTC/USDT vs BTC/USD", us_base, "1m", args.trials, args.per_kind, args.seed, params,
                  kinds=("spike",), reference=ref, cross_only=True)
    print("| rule | injected | found | recall |\n|---|---:|---:|---:|")
    for rule in FRAME_RULES:
        src = cross if rule.name == "price.cross_venue" else total
        n = src.labels.get(rule.name, 0)
        if n:
            hit = src.hits[rule.name]
            print(f"| {rule.name} | {n} | {hit} | {hit / n:.1%} |")
    if total.missed or cross.missed:
        print("\nMissed labels:\n")
        for name, lb in (total.missed + cross.missed)[:40]:
            print(f"- {name}: {lb.kind} -> {lb.rule} at {iso_ms(lb.timestamp)}")
    print("\nCollateral findings (not a label, not in the clean base), by cause:\n")
    print("| rule | cause | count |\n|---|---|---:|")
    for (rule_name, cause), k in sorted((total.collateral + cross.collateral).items()):
        print(f"| {rule_name} | {cause} | {k} |")

    # 3. Sensitivity.
    print("\n## Sensitivity: recall of a one-bar price spike by size\n")
    print("| spike size | price.outlier, BTC/USDT + ALGOUSDT | price.cross_venue, Binance.US BTC/USDT vs BTC/USD |")
    print("|---|---:|---:|")
    for lo_size, hi_size in ((0.0025, 0.005), (0.005, 0.01), (0.01, 0.02), (0.02, 0.05), (0.05, 0.10)):
        hits = labels = 0
        for name, base in bases.items():
            s = score(name, base, "1m", 1, args.per_kind * 4, args.seed, params, kinds=("spike",),
                      size=(lo_size, hi_size))
            hits += s.hits["price.outlier"]
            labels += s.labels["price.outlier"]
        c = score("cross", us_base, "1m", 1, args.per_kind * 4, args.seed, params, kinds=("spike",),
                  size=(lo_size, hi_size), reference=ref, cross_only=True)
        print(f"| {lo_size:.2%}-{hi_size:.2%} | {hits / labels:.1%} ({labels}) | "
              f"{c.hits['price.cross_venue'] / c.labels['price.cross_venue']:.1%} ({c.labels['price.cross_venue']}) |")

    # 4. Speed.
    best, median, rows = speed(bases[next(iter(CLEAN))], args.speed_rows)
    print(f"\n## Speed\n\nvalidate_frame on {rows:,} 1m candles (the real BTC/USDT month repeated), one process: "
          f"**{best:,.0f} candles/s** best of 5, {median:,.0f} median (bound: 1,000,000).\n")

    # 5. Every real file.
    print("## `mdp validate --json` over every real candle file\n")
    print("| file | format | rows | tf | exit | findings by rule | s |\n|---|---|---:|---|---:|---|---:|")
    for rel, fmt, extra in REAL_FILES:
        code, data, err, elapsed = run_cli(REAL / rel, fmt, extra)
        label = rel + (f" vs {Path(extra[1]).name}" if extra else "")
        if data is None:
            print(f"| {label} | {fmt} | - | - | {code} | refused: {err[:200]} | {elapsed:.2f} |")
            continue
        summary = ", ".join(f"{k} {n}" for k, n in data["summary"].items()) or "none"
        print(f"| {label} | {fmt} | {data['rows']:,} | {data['timeframe']} | {code} | {summary} | {elapsed:.2f} |")
    print()


if __name__ == "__main__":
    main()
