"""Candle file loaders on the real recordings: each reads its file exactly, and refuses what it does not
understand with a message naming the file, the format and what was seen."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from common.domain.formats import (
    FORMATS,
    ChecksumError,
    FormatError,
    infer_timeframe,
    load_candles,
    sniff,
    timeframe_ms,
)
from tests.conftest import SHIPPED_DATA, shipped_as

# file, format, timeframe, header lines, open-time unit in the file (all but the zip are not shipped: their
# sources state no licence; the same formats are tested from a bare clone on the shipped minutes, below)
REAL_CANDLE_FILES = [
    ("binance-spot-1m-daily/BTCUSDT-1m-2020-01-01.zip", "binance-kline-zip", "1m", 0, "ms"),
    ("binance-spot-1h/BTCUSDT-1h-2021-04-2023-12.csv", "python-binance", "1h", 1, "text"),
    ("binance-spot-1h/ETHUSDT-1h-2021-04-2023-12.csv", "python-binance", "1h", 1, "text"),
    ("binance-spot-1m-ccxt/BTCUSDT-1m-2024-03.csv", "ccxt-ohlcv", "1m", 1, "ms"),
    ("binance-spot-1m-ccxt/BTCUSDT-1h-2023-06-2024-03.csv", "ccxt-ohlcv", "1h", 1, "ms"),
    ("binance-spot-1m-ccxt/BTCUSDT-1d-2023-06-2024-03.csv", "ccxt-ohlcv", "1d", 1, "ms"),
    ("binance-usdm-1m/ALGOUSDT-1m-2024-09.csv", "binance-usdm-csv", "1m", 1, "ms"),
    ("binanceus-kraken-2023-03/binanceus_BTCUSDT_1m_20230301_20230321.csv", "binanceus-csv", "1m", 1, "text"),
    ("binanceus-kraken-2023-03/kraken_XBTUSDC_1m_ohlcvt_2023Q1.csv", "kraken-ohlcvt", "1m", 0, "s"),
]

DAILY_ZIP = "binance-spot-1m-daily/BTCUSDT-1m-2020-01-02.zip"
SHIPPED_ZIP = SHIPPED_DATA / "binance-spot-1m-daily" / "BTCUSDT-1m-2020-01-01.zip"


@pytest.mark.parametrize(("fmt", "unit"), [("binance-kline", "ms"), ("binance-usdm-csv", "ms"), ("ccxt-ohlcv", "ms"),
                                           ("python-binance", "text"), ("binanceus-csv", "text"),
                                           ("kraken-ohlcvt", "s")])
def test_each_loader_reads_the_shipped_minutes_in_its_format(tmp_path: Path, fmt: str, unit: str) -> None:
    # Arrange
    rows = [line.split(",") for line in text_lines(SHIPPED_ZIP) if line.strip()]
    path = shipped_as(fmt, tmp_path)
    # Act
    loaded = load_candles(path, fmt)
    frame = loaded.frame
    # Assert: every row, in order, the open times in ms and the values as written
    assert sniff(path) == [fmt]
    assert loaded.rows == len(rows) == 1440
    assert loaded.timeframe == "1m" and loaded.time_unit == unit and loaded.format == fmt
    assert frame["open_time"].tolist() == [int(r[0]) for r in rows]
    for i, col in enumerate(("open", "high", "low", "close", "volume"), start=1):
        assert frame[col].tolist() == [float(r[i]) for r in rows], col
    if fmt == "kraken-ohlcvt":
        assert frame["trades"].tolist() == [int(r[8]) for r in rows]
    if fmt == "python-binance":
        assert loaded.symbol == "BTCUSDT"


def text_lines(path: Path) -> list[str]:
    """The file's data as text lines, read independently of the loaders."""
    if path.suffix == ".zip":
        with zipfile.ZipFile(path) as z:
            return z.read(z.namelist()[0]).decode().splitlines()
    return path.read_text().splitlines()


@pytest.mark.parametrize(("rel", "fmt", "timeframe", "header", "unit"), [
    pytest.param(*f, id=f[1] + ":" + Path(f[0]).name,
                 marks=() if f[0].startswith("binance-spot-1m-daily/") else pytest.mark.unshipped_data)
    for f in REAL_CANDLE_FILES])
def test_each_loader_reads_its_real_file_exactly(real_data: Path, rel: str, fmt: str, timeframe: str,
                                                 header: int, unit: str) -> None:
    # Arrange
    lines = [line for line in text_lines(real_data / rel)[header:] if line.strip()]
    first, last = lines[0].split(","), lines[-1].split(",")
    # Act
    loaded = load_candles(real_data / rel, fmt)
    frame = loaded.frame
    # Assert: every data line is a row, in file order, values as written
    assert loaded.rows == len(lines)
    assert loaded.timeframe == timeframe and loaded.time_unit == unit and loaded.format == fmt
    assert frame["open_time"].dtype == np.int64
    assert all(frame[c].dtype == np.float64 for c in ("open", "high", "low", "close", "volume"))
    assert [frame[c].iloc[0] for c in ("open", "high", "low", "close", "volume")] == [float(x) for x in first[1:6]]
    assert frame["close"].iloc[-1] == float(last[4])
    step = timeframe_ms(timeframe)
    assert frame["open_time"].iloc[0] % step == 0  # the candle's OPEN time, in ms
    assert 1_500_000_000_000 < frame["open_time"].iloc[0] < 1_800_000_000_000


@pytest.mark.unshipped_data
def test_kraken_seconds_and_trade_counts(real_data: Path) -> None:
    loaded = load_candles(real_data / "binanceus-kraken-2023-03/kraken_XBTUSDC_1m_ohlcvt_2023Q1.csv",
                          "kraken-ohlcvt")
    # first line: 1672531200,16535.97,16535.97,16522.66,16522.66,0.01429883,2
    assert loaded.frame["open_time"].iloc[0] == 1_672_531_200_000
    assert loaded.frame["trades"].iloc[0] == 2


@pytest.mark.unshipped_data
def test_python_binance_naive_utc_text_and_ticker(real_data: Path) -> None:
    loaded = load_candles(real_data / "binance-spot-1h/ETHUSDT-1h-2021-04-2023-12.csv", "python-binance")
    assert loaded.symbol == "ETHUSDT"
    assert loaded.frame["open_time"].iloc[0] == 1_617_566_400_000  # 2021-04-04 20:00:00 UTC


@pytest.mark.unshipped_data
def test_binanceus_iso_with_offset(real_data: Path) -> None:
    loaded = load_candles(real_data / "binanceus-kraken-2023-03/binanceus_BTCUSDC_1m_20230301_20230321.csv",
                          "binanceus-csv")
    assert loaded.frame["open_time"].iloc[0] == 1_677_628_800_000  # 2023-03-01 00:00:00+00:00


def test_zip_checksum_is_verified_and_reported(real_data: Path) -> None:
    loaded = load_candles(real_data / DAILY_ZIP, "binance-kline-zip")
    expected = (real_data / (DAILY_ZIP + ".CHECKSUM")).read_text().split()[0]
    assert loaded.checksum == expected
    assert loaded.rows == 1440 and loaded.frame["trades"].iloc[0] == 220


def test_corrupt_zip_is_refused_naming_expected_and_actual(real_data: Path, tmp_path: Path) -> None:
    # Arrange: the real archive with one byte of its compressed data flipped, beside its real CHECKSUM
    src = real_data / DAILY_ZIP
    data = bytearray(src.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target = tmp_path / src.name
    target.write_bytes(bytes(data))
    shutil.copy(src.with_name(src.name + ".CHECKSUM"), tmp_path)
    expected = (tmp_path / (src.name + ".CHECKSUM")).read_text().split()[0]
    # Act
    with pytest.raises(ChecksumError) as err:
        load_candles(target, "binance-kline-zip")
    # Assert
    message = str(err.value)
    assert str(target) in message and expected in message and "download it again" in message
    import hashlib
    assert hashlib.sha256(bytes(data)).hexdigest() in message


def test_wrong_checksum_file_is_refused(real_data: Path, tmp_path: Path) -> None:
    src = real_data / DAILY_ZIP
    shutil.copy(src, tmp_path / src.name)
    other = real_data / "binance-spot-1m-daily/BTCUSDT-1m-2020-01-03.zip.CHECKSUM"
    (tmp_path / (src.name + ".CHECKSUM")).write_text(other.read_text())
    with pytest.raises(ChecksumError, match="sha256 is"):
        load_candles(tmp_path / src.name, "binance-kline-zip")


def test_missing_checksum_is_refused_unless_asked_not_to_verify(real_data: Path, tmp_path: Path) -> None:
    src = real_data / DAILY_ZIP
    shutil.copy(src, tmp_path / src.name)
    with pytest.raises(FormatError, match=r"no checksum file .*--no-checksum"):
        load_candles(tmp_path / src.name, "binance-kline-zip")
    assert load_candles(tmp_path / src.name, "binance-kline-zip", verify=False).rows == 1440


def _microsecond_copy(real_data: Path, tmp_path: Path) -> tuple[Path, list[str]]:
    """The real daily CSV rewritten with open and close times in microseconds, as Binance spot files are
    from 2025 on."""
    lines = text_lines(real_data / DAILY_ZIP)
    out = []
    for line in lines:
        cells = line.split(",")
        cells[0] = str(int(cells[0]) * 1000)
        cells[6] = str(int(cells[6]) * 1000 + 999)
        out.append(",".join(cells))
    path = tmp_path / "BTCUSDT-1m-us.csv"
    path.write_text("\n".join(out) + "\n")
    return path, lines


def test_microsecond_open_times_are_detected(real_data: Path, tmp_path: Path) -> None:
    # Arrange
    path, lines = _microsecond_copy(real_data, tmp_path)
    # Act
    loaded = load_candles(path, "binance-kline")
    # Assert: same open times in ms as the millisecond original
    assert loaded.time_unit == "us"
    assert loaded.frame["open_time"].tolist() == [int(line.split(",")[0]) for line in lines]
    assert loaded.timeframe == "1m"


def test_a_concatenation_of_ms_and_us_files_reads_as_one_series(real_data: Path, tmp_path: Path) -> None:
    micro, _ = _microsecond_copy(real_data, tmp_path)
    ms_lines = text_lines(real_data / "binance-spot-1m-daily/BTCUSDT-1m-2020-01-01.zip")
    mixed = tmp_path / "mixed.csv"
    mixed.write_text("\n".join(ms_lines) + "\n" + micro.read_text())
    loaded = load_candles(mixed, "binance-kline")
    assert loaded.time_unit == "ms+us"
    assert np.all(np.diff(loaded.frame["open_time"].to_numpy()) == 60_000)  # Jan 1 then Jan 2, no hole


def test_unknown_format_is_refused_with_the_list(tmp_path: Path) -> None:
    with pytest.raises(FormatError) as err:
        load_candles(shipped_as("binance-usdm-csv", tmp_path), "binance-csv")
    assert "unknown format 'binance-csv'" in str(err.value)
    for name in FORMATS:
        assert name in str(err.value)


def test_a_file_of_another_format_is_refused_with_a_suggestion(tmp_path: Path) -> None:
    path = shipped_as("binance-usdm-csv", tmp_path)
    with pytest.raises(FormatError) as err:
        load_candles(path, "binance-kline")
    message = str(err.value)
    assert "not a 'binance-kline' file" in message and "open_time,open,high" in message
    assert "--format binance-usdm-csv" in message
    with pytest.raises(FormatError, match="expected the header 'timestamp,open"):
        load_candles(path, "ccxt-ohlcv")


@pytest.mark.unshipped_data
def test_the_metadata_csv_is_not_a_candle_file(real_data: Path) -> None:
    path = real_data / "binanceus-kraken-2023-03/binanceus_metadata_range_1m_20230301_20230321.csv"
    assert sniff(path) == []
    for fmt in FORMATS:
        with pytest.raises(FormatError, match="no known candle format matches it"):
            load_candles(path, fmt)


def test_a_csv_is_not_a_zip(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match="not a zip archive"):
        load_candles(shipped_as("ccxt-ohlcv", tmp_path), "binance-kline-zip")


@pytest.mark.unshipped_data
def test_sniff_names_the_format_of_every_real_file(real_data: Path) -> None:
    for rel, fmt, *_ in REAL_CANDLE_FILES:
        assert sniff(real_data / rel) == [fmt]


def test_unreadable_open_time_is_refused_with_its_line(tmp_path: Path) -> None:
    lines = shipped_as("ccxt-ohlcv", tmp_path).read_text().splitlines()
    lines[3] = "not-a-time," + lines[3].split(",", 1)[1]
    path = tmp_path / "bad.csv"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(FormatError, match=r"line 4: 'not-a-time'"):
        load_candles(path, "ccxt-ohlcv")


def test_empty_or_non_numeric_price_cells_become_nan_for_the_validator(tmp_path: Path) -> None:
    lines = shipped_as("ccxt-ohlcv", tmp_path).read_text().splitlines()
    cells = lines[2].split(",")
    cells[2], cells[5] = "", "None"
    lines[2] = ",".join(cells)
    path = tmp_path / "holes.csv"
    path.write_text("\n".join(lines) + "\n")
    frame = load_candles(path, "ccxt-ohlcv").frame
    assert np.isnan(frame["high"].iloc[1]) and np.isnan(frame["volume"].iloc[1])
    assert frame["open"].iloc[1] == float(cells[1]) and len(frame) == len(lines) - 1


@pytest.mark.unshipped_data
def test_python_binance_with_two_tickers_is_refused(real_data: Path, tmp_path: Path) -> None:
    btc = (real_data / "binance-spot-1h/BTCUSDT-1h-2021-04-2023-12.csv").read_text().splitlines()
    eth = (real_data / "binance-spot-1h/ETHUSDT-1h-2021-04-2023-12.csv").read_text().splitlines()
    path = tmp_path / "both.csv"
    path.write_text("\n".join(btc[:10] + eth[1:10]) + "\n")
    with pytest.raises(FormatError, match="holds 2 symbols"):
        load_candles(path, "python-binance")


def test_infer_timeframe_takes_the_most_common_step() -> None:
    minute = 60_000
    t = np.array([0, 1, 2, 5, 6, 7, 7, 9]) * minute + 1_700_000_000_000
    assert infer_timeframe(t) == "1m"
    assert infer_timeframe(np.array([0, 7 * minute])) is None
    assert infer_timeframe(np.array([1])) is None
    with pytest.raises(ValueError, match="unknown timeframe '1M'"):
        timeframe_ms("1M")
