"""The DataFrame validator and `mdp validate` on real candles: each rule fires on an injected case and not on
its clean neighbour, the policies shape what would be stored, and the CLI's JSON is what a scorer needs."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from common import cli
from common.domain import quality
from common.domain.formats import load_candles
from common.domain.quality_frame import (
    FRAME_RULES,
    FRAME_RULES_BY_NAME,
    FrameError,
    FrameParams,
    Report,
    validate_frame,
    window_stats,
)
from tests.conftest import shipped_as

MINUTE = 60_000
NOW_MS = 1_767_225_600_000  # 2026-01-01, a fixed "now"
BTC_1M = "binance-spot-1m-ccxt/BTCUSDT-1m-2024-03.csv"
I = 100  # the row that gets the injected issue


@pytest.fixture(scope="module")
def btc(real_data: Path) -> pd.DataFrame:
    """The first 600 real BTC/USDT 1m candles of 2020-01-01, from the daily zip shipped in data/real (no finding
    of any rule, see the first test)."""
    frame = load_candles(real_data / "binance-spot-1m-daily/BTCUSDT-1m-2020-01-01.zip", "binance-kline-zip").frame
    return frame[["open_time", "open", "high", "low", "close", "volume"]].iloc[:600].reset_index(drop=True)


def check(df: pd.DataFrame, **kw: object) -> Report:
    return validate_frame(df, "1m", now_ms=NOW_MS, **kw)  # type: ignore[arg-type]


def stamps(report: Report, rule: str) -> list[int]:
    return report.findings[rule]["timestamp"].tolist()


# --- the catalog -------------------------------------------------------------------------------------------

def test_catalog_shares_names_and_severities_with_the_live_rules() -> None:
    names = {r.name for r in FRAME_RULES}
    assert {"fields.missing", "price.non_positive", "volume.negative", "ohlc.consistency", "time.invalid",
            "time.future", "time.gap", "time.duplicate", "time.conflict", "time.out_of_order", "price.outlier",
            "price.cross_venue", "price.stuck", "volume.zero", "candle.open_gap"} <= names
    # the live half's catalog (common.domain.quality.CATALOG) once it exists, and the event rules in any case
    catalog = getattr(quality, "CATALOG", {})
    for rule in FRAME_RULES:
        for live in (quality.RULES_BY_NAME.get(rule.name), catalog.get(rule.name)):
            if live is not None:
                assert (rule.severity, rule.policy) == (live.severity, live.policy), rule.name
    policies = {r.name: r.policy for r in FRAME_RULES}
    assert policies["time.duplicate"] == policies["time.out_of_order"] == "repair"
    assert policies["time.conflict"] == "reject" and policies["volume.zero"] == "flag"


def test_clean_real_candles_pass_every_rule(btc: pd.DataFrame) -> None:
    report = check(btc)
    assert report.summary() == {}
    assert report.stored.tolist() == list(range(len(btc)))
    assert not report.has_errors


# --- each rule on an injected case --------------------------------------------------------------------------

def _set(df: pd.DataFrame, row: int, **values: float) -> pd.DataFrame:
    out = df.copy()
    for k, v in values.items():
        out.loc[row, k] = v
    return out


def _insert_after(df: pd.DataFrame, after: int, row: pd.Series) -> pd.DataFrame:
    return pd.concat([df.iloc[:after + 1], row.to_frame().T.astype(df.dtypes), df.iloc[after + 1:]],
                     ignore_index=True)


def _t(df: pd.DataFrame, row: int) -> int:
    return int(df["open_time"].iloc[row])


Injection = Callable[[pd.DataFrame], tuple[pd.DataFrame, list[int]]]

ROW_RULES: dict[str, Injection] = {
    # rule -> (frame with the issue at row I, the expected finding timestamps)
    "fields.missing": lambda df: (_set(df, I, close=np.nan), [_t(df, I)]),
    "price.non_positive": lambda df: (_set(df, I, low=0.0), [_t(df, I)]),
    "volume.negative": lambda df: (_set(df, I, volume=-1.5), [_t(df, I)]),
    "ohlc.consistency": lambda df: (_set(df, I, high=float(df["low"].iloc[I]) * 0.999), [_t(df, I)]),
    "time.future": lambda df: (_insert_after(df, I, df.iloc[I].copy().set_axis(df.columns).pipe(
        lambda r: r.where(r.index != "open_time", NOW_MS + 10 * MINUTE))), [NOW_MS + 10 * MINUTE]),
}


@pytest.mark.parametrize("rule", list(ROW_RULES))
def test_row_rules_reject_the_bad_row_and_only_it(btc: pd.DataFrame, rule: str) -> None:
    # Arrange
    df, expected = ROW_RULES[rule](btc)
    # Act
    report = check(df)
    # Assert: one finding, on the bad row; nothing else; the row is not stored
    assert report.summary() == {rule: 1}
    assert stamps(report, rule) == expected
    bad_row = int(report.findings[rule]["row"].iloc[0])
    assert bad_row not in set(report.stored.tolist())
    assert len(report.stored) == len(df) - 1
    assert FRAME_RULES_BY_NAME[rule].severity == "error" and report.has_errors


def test_fields_missing_reads_none_in_an_object_column(btc: pd.DataFrame) -> None:
    df = btc.astype({"volume": object})
    df.loc[I, "volume"] = None
    report = check(df)
    assert stamps(report, "fields.missing") == [_t(btc, I)]
    assert report.issues()[0]["volume"] is None  # JSON-ready: NaN/None become null


def test_time_invalid_and_misaligned(btc: pd.DataFrame) -> None:
    df = _set(btc, I, open_time=0)
    df.loc[I + 50, "open_time"] = _t(btc, I + 50) + 30_000
    report = check(df.astype({"open_time": "int64"}))
    assert stamps(report, "time.invalid") == [0]
    assert stamps(report, "candle.misaligned") == [_t(btc, I + 50) + 30_000]
    assert report.findings["candle.misaligned"]["expected_open_time"].tolist() == [_t(btc, I + 50)]
    # both slots are now empty in the series: reported as gaps at their open times
    assert stamps(report, "time.gap") == [_t(btc, I), _t(btc, I + 50)]


def test_identical_duplicate_is_dropped_with_an_audit(btc: pd.DataFrame) -> None:
    df = _insert_after(btc, I + 3, btc.iloc[I])  # a page overlap: the row comes again 3 rows later
    report = check(df)
    assert report.summary() == {"time.duplicate": 1}
    finding = report.findings["time.duplicate"].iloc[0]
    assert (finding["timestamp"], finding["row"], finding["first_row"]) == (_t(btc, I), I + 4, I)
    assert FRAME_RULES_BY_NAME["time.duplicate"].severity == "info" and not report.has_errors
    assert report.stored_frame(df)["open_time"].is_monotonic_increasing
    assert len(report.stored) == len(btc)


def test_conflicting_duplicate_keeps_the_first_and_quarantines_the_other(btc: pd.DataFrame) -> None:
    other = btc.iloc[I].copy()
    other["volume"] = other["volume"] * 2
    df = _insert_after(btc, I, other)
    report = check(df)
    assert report.summary() == {"time.conflict": 1}
    finding = report.findings["time.conflict"].iloc[0]
    assert finding["volume"] == other["volume"] and finding["kept_volume"] == btc["volume"].iloc[I]
    stored = report.stored_frame(df)
    assert stored.loc[stored["open_time"] == _t(btc, I), "volume"].tolist() == [btc["volume"].iloc[I]]
    assert report.has_errors


def test_out_of_order_row_is_reported_and_the_stored_series_sorted(btc: pd.DataFrame) -> None:
    order = list(range(len(btc)))
    order.remove(I)
    order.insert(I + 2, I)  # row I arrives after rows I+1 and I+2
    df = btc.iloc[order].reset_index(drop=True)
    report = check(df)
    assert report.summary() == {"time.out_of_order": 1}
    finding = report.findings["time.out_of_order"].iloc[0]
    assert finding["timestamp"] == _t(btc, I) and finding["previous_open_time"] == _t(btc, I + 2)
    assert report.stored_frame(df)["open_time"].tolist() == btc["open_time"].tolist()


def test_gap_reports_the_first_missing_open_time(btc: pd.DataFrame) -> None:
    df = btc.drop(index=[I, I + 1, I + 2]).reset_index(drop=True)
    report = check(df)
    assert report.summary() == {"time.gap": 1}
    finding = report.findings["time.gap"].iloc[0]
    assert finding["timestamp"] == _t(btc, I) and finding["missing_bars"] == 3
    assert finding["previous_open_time"] == _t(btc, I - 1) and finding["next_open_time"] == _t(btc, I + 3)


def test_zero_volume_is_stored_and_flagged_not_dropped(btc: pd.DataFrame) -> None:
    df = _set(btc, I, volume=0.0)
    report = check(df)
    assert report.summary() == {"volume.zero": 1} and stamps(report, "volume.zero") == [_t(btc, I)]
    stored = report.stored_frame(df)
    assert len(stored) == len(btc)
    assert stored["quality"].iloc[I] == "volume.zero" and stored["quality"].iloc[I + 1] == ""


def _flatten(df: pd.DataFrame, start: int, bars: int) -> pd.DataFrame:
    out = df.copy()
    price = float(df["close"].iloc[start - 1])
    for col in ("open", "high", "low", "close"):
        out.loc[start:start + bars - 1, col] = price
    return out


def test_stuck_series_from_the_threshold_not_below(btc: pd.DataFrame) -> None:
    params = FrameParams()
    stuck = check(_flatten(btc, I, params.stuck_bars))
    short = check(_flatten(btc, I, params.stuck_bars - 1))
    assert stuck.summary() == {"price.stuck": 1}
    finding = stuck.findings["price.stuck"].iloc[0]
    assert finding["timestamp"] == _t(btc, I) and finding["bars"] == params.stuck_bars
    assert finding["last_timestamp"] == _t(btc, I + params.stuck_bars - 1)
    assert short.summary() == {}  # one bar short: flat minutes happen


def test_a_one_minute_spike_is_one_outlier_not_two(btc: pd.DataFrame) -> None:
    close = float(btc["close"].iloc[I]) * np.exp(0.02)
    df = _set(btc, I, close=close, high=max(close, float(btc["high"].iloc[I])))
    report = check(df)
    # the return back at I+1 and its open far from the spiked close are the spike's echo, not new issues
    assert report.summary() == {"price.outlier": 1}
    finding = report.findings["price.outlier"].iloc[0]
    assert finding["timestamp"] == _t(btc, I) and finding["kind"] == "return"
    assert finding["log_return"] > finding["threshold_return"]


@pytest.mark.parametrize("side", ["high", "low"])
def test_a_wick_far_beyond_the_local_range_is_an_outlier(btc: pd.DataFrame, side: str) -> None:
    body_hi = max(float(btc["open"].iloc[I]), float(btc["close"].iloc[I]))
    body_lo = min(float(btc["open"].iloc[I]), float(btc["close"].iloc[I]))
    df = _set(btc, I, high=body_hi * 1.02) if side == "high" else _set(btc, I, low=body_lo / 1.02)
    report = check(df)
    assert report.summary() == {"price.outlier": 1}
    assert report.findings["price.outlier"].iloc[0]["kind"] == f"wick_{side}"
    assert stamps(report, "price.outlier") == [_t(btc, I)]


def test_open_far_from_the_previous_close(btc: pd.DataFrame) -> None:
    open_ = float(btc["close"].iloc[I - 1]) * 1.01
    df = _set(btc, I, open=open_, high=max(open_, float(btc["high"].iloc[I])))
    report = check(df)
    assert report.summary() == {"candle.open_gap": 1}
    finding = report.findings["candle.open_gap"].iloc[0]
    assert finding["timestamp"] == _t(btc, I) and finding["jump"] == pytest.approx(np.log(1.01))


def _amplified(df: pd.DataFrame, start: int, factor: float) -> pd.DataFrame:
    """The same real path, with every move from row `start` on `factor` times larger (a volatile spell)."""
    out = df.copy()
    ref = np.log(float(df["close"].iloc[start - 1]))
    for col in ("open", "high", "low", "close"):
        x = np.log(out[col].to_numpy(dtype=float))
        x[start:] = ref + factor * (x[start:] - ref)
        out[col] = np.exp(x)
    return out


def test_local_statistics_where_a_global_sigma_fails(btc: pd.DataFrame) -> None:
    # Arrange: a quiet spell, then a volatile one (moves x6), and a 0.4% spike in the quiet spell (the morning
    # of 2020-01-01 was quiet: a 0.7% spike, right for March 2024, stands out even of the global sigma)
    volatile = _amplified(btc, 480, 6.0)
    close = float(volatile["close"].iloc[I]) * np.exp(0.004)
    spiked = _set(volatile, I, close=close, high=max(close, float(volatile["high"].iloc[I])))

    def global_5_sigma(df: pd.DataFrame) -> set[int]:
        r = np.diff(np.log(df["close"].to_numpy(dtype=float)))
        return set((np.flatnonzero(np.abs(r - r.mean()) > 5 * r.std()) + 1).tolist())

    # Act
    ours_volatile = check(volatile)
    ours_spiked = check(spiked)
    # Assert: the global test flags normal moves of the volatile spell and misses the quiet spell's spike
    assert global_5_sigma(volatile) and min(global_5_sigma(volatile)) >= 480
    assert I not in global_5_sigma(spiked)
    assert ours_volatile.summary() == {}
    assert stamps(ours_spiked, "price.outlier") == [_t(btc, I)]


@pytest.mark.unshipped_data
def test_cross_venue_deviation_and_the_reference_s_own_spikes(real_data: Path) -> None:
    # Arrange: the same hours on Binance.US, BTC/USDT against BTC/USD (basis ~0.1%, drifting)
    folder = real_data / "binanceus-kraken-2023-03"
    usdt = load_candles(folder / "binanceus_BTCUSDT_1m_20230301_20230321.csv", "binanceus-csv").frame.iloc[:600]
    usd = load_candles(folder / "binanceus_BTCUSD_1m_20230301_20230321.csv", "binanceus-csv").frame.iloc[:600]
    close = float(usdt["close"].iloc[I]) * 1.008
    spiked = _set(usdt, I, close=close, high=max(close, float(usdt["high"].iloc[I])))
    ref_close = float(usd["close"].iloc[I]) * 1.03
    spiked_ref = _set(usd, I, close=ref_close, high=max(ref_close, float(usd["high"].iloc[I])))
    # Act / Assert
    assert stamps(check(usdt, reference=usd), "price.cross_venue") == []
    found = check(spiked, reference=usd)
    assert stamps(found, "price.cross_venue") == [_t(usdt, I)]
    assert found.findings["price.cross_venue"]["reference_close"].tolist() == [usd["close"].iloc[I]]
    # a spike on the reference venue is the reference's fault, not this series'
    assert stamps(check(usdt, reference=spiked_ref), "price.cross_venue") == []


# --- report shape, errors, statistics -----------------------------------------------------------------------

def test_issues_are_json_ready_and_in_time_order(btc: pd.DataFrame) -> None:
    df = _insert_after(_set(btc, 300, volume=0.0, close=np.nan), 50, btc.iloc[40])
    report = check(df)
    issues = report.issues()
    text = json.dumps(issues, allow_nan=False)
    assert [i["timestamp"] for i in issues] == sorted(i["timestamp"] for i in issues)
    assert {i["rule"] for i in json.loads(text)} == {"time.duplicate", "fields.missing"}
    assert all(isinstance(i["timestamp"], int) and isinstance(i["row"], int) for i in issues)
    assert Counter(i["rule"] for i in issues) == Counter(report.summary())


def test_frames_without_the_columns_are_refused_clearly(btc: pd.DataFrame) -> None:
    with pytest.raises(FrameError, match="lacks column.*close"):
        validate_frame(btc.drop(columns="close"), "1m")
    with pytest.raises(FrameError, match="open_time has dtype float64"):
        validate_frame(btc.astype({"open_time": float}), "1m")
    with pytest.raises(ValueError, match="unknown timeframe '7m'"):
        validate_frame(btc, "7m")


def test_window_stats_equal_direct_medians(btc: pd.DataFrame) -> None:
    x = np.diff(np.log(btc["close"].to_numpy()))
    med, mad = window_stats(x, 120, 30)
    for i in (0, 57, 300, len(x) - 1):
        starts = list(range(0, len(x) - 120 + 1, 30)) + [len(x) - 120]
        s = min(starts, key=lambda s: (abs(s + 59.5 - i), s))
        w = x[s:s + 120]
        assert med[i] == pytest.approx(np.median(w))
        assert mad[i] == pytest.approx(np.median(np.abs(w - np.median(w))))


# --- mdp validate --------------------------------------------------------------------------------------------

def run_validate(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli.main(["validate", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.unshipped_data
def test_cli_json_schema_on_a_real_file(real_data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Arrange: an independent oracle for the file's repeats (pandas, not our code)
    path = real_data / BTC_1M
    raw = pd.read_csv(path)
    repeated = raw["timestamp"].duplicated(keep="first")
    identical = raw.duplicated(keep="first")
    # Act
    code, out, _ = run_validate(capsys, str(path), "--format", "ccxt-ohlcv", "--json", "--now", str(NOW_MS))
    data = json.loads(out)
    # Assert
    assert {"file", "format", "rows", "timeframe", "issues", "summary"} <= set(data)
    assert (data["format"], data["rows"], data["timeframe"]) == ("ccxt-ohlcv", len(raw), "1m")
    for issue in data["issues"]:
        assert {"rule", "severity", "timestamp"} <= set(issue)
        assert issue["severity"] == FRAME_RULES_BY_NAME[issue["rule"]].severity
        assert isinstance(issue["timestamp"], int)
    by_rule = Counter(i["rule"] for i in data["issues"])
    assert data["summary"] == dict(by_rule)
    dups = sorted(i["timestamp"] for i in data["issues"] if i["rule"] == "time.duplicate")
    conflicts = sorted(i["timestamp"] for i in data["issues"] if i["rule"] == "time.conflict")
    assert dups == sorted(raw.loc[identical, "timestamp"].tolist())
    assert conflicts == sorted(raw.loc[repeated & ~identical, "timestamp"].tolist())
    assert code == (1 if conflicts else 0)


def test_cli_gap_timestamp_is_the_first_missing_open_time(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    lines = shipped_as("ccxt-ohlcv", tmp_path).read_text().splitlines()
    missing = int(lines[11].split(",")[0])
    path = tmp_path / "holed.csv"
    path.write_text("\n".join(lines[:11] + lines[14:]) + "\n")
    code, out, _ = run_validate(capsys, str(path), "--format", "ccxt-ohlcv", "--json")
    gaps = [i for i in json.loads(out)["issues"] if i["rule"] == "time.gap"]
    assert [(g["timestamp"], g["missing_bars"]) for g in gaps] == [(missing, 3)]
    assert code == 0  # a gap is a warning


@pytest.mark.unshipped_data
def test_cli_text_report_names_rules_counts_and_iso_times(real_data: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_validate(capsys, str(real_data / BTC_1M), "--format", "ccxt-ohlcv")
    dup_line = next(line for line in out.splitlines() if line.strip().startswith("time.duplicate"))
    assert "info" in dup_line and "repair" in dup_line and "2024-03-01T16:39:00Z" in dup_line
    assert "exit 1" in out and code == 1


def test_cli_clean_zip_exits_0(real_data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_validate(capsys, str(real_data / "binance-spot-1m-daily/BTCUSDT-1m-2020-01-01.zip"),
                                "--format", "binance-kline-zip")
    assert code == 0 and "matches its .CHECKSUM" in out


@pytest.mark.unshipped_data
def test_cli_refuses_unknown_formats_and_foreign_files_with_exit_2(real_data: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_validate(capsys, str(real_data / BTC_1M), "--format", "csv")
    assert code == 2 and out == "" and "unknown format 'csv'" in err and "kraken-ohlcvt" in err
    meta = real_data / "binanceus-kraken-2023-03/binanceus_metadata_range_1m_20230301_20230321.csv"
    code, out, err = run_validate(capsys, str(meta), "--format", "binanceus-csv", "--json")
    assert code == 2 and out == "" and "no known candle format matches it" in err


@pytest.mark.unshipped_data
def test_cli_cross_venue_reference(real_data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = real_data / "binanceus-kraken-2023-03"
    code, out, _ = run_validate(capsys, str(folder / "binanceus_BTCUSDT_1m_20230301_20230321.csv"),
                                "--format", "binanceus-csv", "--json", "--reference",
                                str(folder / "binanceus_BTCUSD_1m_20230301_20230321.csv"))
    data = json.loads(out)
    assert data["reference"].endswith("binanceus_BTCUSD_1m_20230301_20230321.csv")
    assert code == 0 and all(i["severity"] != "error" for i in data["issues"])


@pytest.mark.unshipped_data
def test_cli_refuses_a_reference_of_another_timeframe(real_data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = real_data / "binance-spot-1m-ccxt"
    code, out, err = run_validate(capsys, str(folder / "BTCUSDT-1m-2024-03.csv"), "--format", "ccxt-ohlcv",
                                  "--reference", str(folder / "BTCUSDT-1h-2023-06-2024-03.csv"))
    assert code == 2 and out == "" and "has 1h bars but the file is judged as 1m" in err
