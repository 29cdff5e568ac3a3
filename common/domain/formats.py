"""Candle files as exchanges and tools publish them, read into one frame shape, and refused loudly when a
file is not what the caller says it is.

Why one shape: the batch validator (common.domain.quality_frame) and `mdp validate` must judge every source by the
same rules, so every loader returns a pandas DataFrame with

    open_time  int64    the candle's OPEN time, epoch milliseconds UTC
    open, high, low, close, volume   float64 (NaN where a cell was empty or not a number)
    trades     float64  number of trades, when the file has it (Binance `count`, Kraken OHLCVT's 7th column)

in file order (a validator must see duplicates and disorder as they are, so nothing is sorted or dropped).

Formats (name: what it reads):

  binance-kline      data.binance.vision kline CSV, no header, 12 columns (open_time, open, high, low, close,
                     volume, close_time, quote_volume, count, taker_buy_base, taker_buy_quote, ignore).
                     open_time in ms, or in MICROseconds as Binance spot files from 2025 on; the unit is
                     read per row by magnitude (>= 1e14 is us), so a concatenation of both eras reads right.
  binance-kline-zip  the same, inside data.binance.vision's zip (one CSV, with or without the header row the
                     futures archives carry), verified against `FILE.CHECKSUM` (sha256) before it is read.
  binance-usdm-csv   Binance USD-M/COIN-M monthly or daily CSV with its header row (open_time,...,ignore).
  ccxt-ohlcv         `timestamp,open,high,low,close,volume` header, timestamp in ms (ccxt fetch_ohlcv rows).
  python-binance     `date,open,high,low,close,volume,ticker`, `date` naive text in UTC, one ticker per file.
  binanceus-csv      `open_time,open,high,low,close,volume`, open_time ISO-8601 text with its UTC offset.
  kraken-ohlcvt      Kraken's downloadable OHLCVT: no header, 7 columns (unix SECONDS, o, h, l, c, volume,
                     trade count). Kraken writes no row for an interval without trades.

Refusals (all `FormatError`, whose message names the file, the format asked, what was seen and what to do):
an unknown format name (with the list), a header or column count that does not match, a timestamp cell that
cannot be read (its line number and text: a candle without a time cannot be placed), a zip without exactly
one CSV, and a CHECKSUM mismatch (`ChecksumError`: expected and actual sha256). A price or volume cell that
is empty or not a number is NOT refused: it becomes NaN so that the validator reports it (fields.missing)
with its open time.
"""

from __future__ import annotations

import hashlib
import io
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal, cast

import numpy as np
import pandas as pd

from common.domain.timeframe import MS, Timeframe
from common.errors import MdpError

PRICE_COLUMNS = ("open", "high", "low", "close")
CANDLE_COLUMNS = ("open_time", *PRICE_COLUMNS, "volume")

BINANCE_KLINE_COLUMNS = ("open_time", "open", "high", "low", "close", "volume", "close_time", "quote_volume",
                         "count", "taker_buy_volume", "taker_buy_quote_volume", "ignore")

# Open times at or above this are microseconds (1e14 us is 1973; 1e14 ms is year 5138).
MICROS_FROM = 100_000_000_000_000

# The fixed-length timeframes a file's step can be (monthly bars have no fixed step), and their milliseconds.
TIMEFRAME_MS: dict[str, int] = {
    name: Timeframe.parse(name).nominal_ns // MS
    for name in ("1s", "1m", "3m", "5m", "15m", "30m", "1h", "2h", "4h", "6h", "8h", "12h", "1d", "3d", "1w")
}

TimeUnit = Literal["ms", "us", "ms+us", "s", "text"]


class FormatError(MdpError, ValueError):
    """A file that cannot be read as the named candle format. The message says what was expected, what the
    file holds, and what to do."""


class ChecksumError(FormatError):
    """An archive whose sha256 differs from its .CHECKSUM file (corrupt or truncated download)."""


@dataclass(frozen=True, slots=True)
class CandleFile:
    """One loaded file: the frame (see the module docstring), its format, and what was learnt reading it."""

    path: Path
    format: str
    frame: pd.DataFrame
    timeframe: str | None  # inferred from the most common step between open times; None if not a known one
    time_unit: TimeUnit
    symbol: str | None = None
    checksum: str | None = None  # the verified sha256, for archives

    @property
    def rows(self) -> int:
        return len(self.frame)


def timeframe_ms(timeframe: str) -> int:
    """Milliseconds of a timeframe name ('1m', '4h', '1d'); ValueError naming the known ones otherwise."""
    try:
        return TIMEFRAME_MS[timeframe]
    except KeyError:
        raise ValueError(f"unknown timeframe {timeframe!r}; use one of {', '.join(TIMEFRAME_MS)} (fixed-length "
                         f"bars only: monthly bars have no fixed step)") from None


def infer_timeframe(open_time_ms: np.ndarray) -> str | None:
    """The timeframe whose step is the most common gap between consecutive distinct open times.

    The mode, not the minimum: Kraken writes no row for a minute without trades and real files hold gaps
    and duplicates, but most steps are still one bar."""
    t = np.unique(open_time_ms)
    if len(t) < 2:
        return None
    steps, counts = np.unique(np.diff(t), return_counts=True)
    step = int(steps[np.argmax(counts)])
    for name, ms in TIMEFRAME_MS.items():
        if ms == step:
            return name
    return None


# ---------------------------------------------------------------------------------------------------------
# Reading a table


TimeKind = Literal["ms|us", "ms", "s", "iso", "naive-utc"]


@dataclass(frozen=True, slots=True)
class Layout:
    """How one CSV layout maps onto the frame: its header (None: no header row), its column names, which
    column is the open time and how it is written, and optional columns."""

    header: tuple[str, ...] | None
    names: tuple[str, ...]
    time_column: str
    time_kind: TimeKind
    trades_column: str | None = None
    symbol_column: str | None = None


BINANCE_KLINE = Layout(None, BINANCE_KLINE_COLUMNS, "open_time", "ms|us", trades_column="count")
BINANCE_USDM = Layout(BINANCE_KLINE_COLUMNS, BINANCE_KLINE_COLUMNS, "open_time", "ms|us", trades_column="count")
CCXT_OHLCV = Layout(("timestamp", "open", "high", "low", "close", "volume"),
                    ("timestamp", "open", "high", "low", "close", "volume"), "timestamp", "ms")
PYTHON_BINANCE = Layout(("date", "open", "high", "low", "close", "volume", "ticker"),
                        ("date", "open", "high", "low", "close", "volume", "ticker"), "date", "naive-utc",
                        symbol_column="ticker")
BINANCEUS = Layout(("open_time", "open", "high", "low", "close", "volume"),
                   ("open_time", "open", "high", "low", "close", "volume"), "open_time", "iso")
KRAKEN_OHLCVT = Layout(None, ("time", "open", "high", "low", "close", "volume", "trades"), "time", "s",
                       trades_column="trades")


def _first_line(head: bytes) -> str:
    return head.decode("utf-8", errors="replace").lstrip("\ufeff").splitlines()[0] if head.strip() else ""


def _cells(line: str) -> list[str]:
    return [c.strip().strip('"').strip().lower() for c in line.split(",")]


def _looks_numeric(cell: str) -> bool:
    return re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", cell) is not None


def _layout_mismatch(layout: Layout, first: str) -> str | None:
    """Why `first` (the file's first line) is not this layout's first line, or None if it fits."""
    cells = _cells(first)
    if not first:
        return "the file is empty"
    if layout.header is not None:
        if tuple(cells) != layout.header:
            return f"expected the header {','.join(layout.header)!r}, the first line is {first[:160]!r}"
        return None
    if len(cells) != len(layout.names):
        return f"expected {len(layout.names)} columns without a header, the first line has {len(cells)}: {first[:160]!r}"
    if not _looks_numeric(cells[0]):
        return f"expected no header row (a number first), the first line is {first[:160]!r}"
    return None


def _read_table(source: IO[bytes] | Path, layout: Layout, where: str) -> tuple[pd.DataFrame, TimeUnit, str | None]:
    """Parse the table; returns the frame in the common shape, the time unit seen, and the symbol (if any)."""
    has_header = layout.header is not None
    usecols = [layout.time_column, *PRICE_COLUMNS, "volume"]
    if layout.trades_column:
        usecols.append(layout.trades_column)
    if layout.symbol_column:
        usecols.append(layout.symbol_column)
    try:
        raw = pd.read_csv(source, header=0 if has_header else None, names=list(layout.names), usecols=usecols,
                          dtype=str, keep_default_na=False, skipinitialspace=True, engine="c",
                          on_bad_lines="error")
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        raise FormatError(f"{where}: cannot be parsed as CSV ({exc}); check that the file is complete and of "
                          f"this format") from None
    first_data_line = 2 if has_header else 1
    open_time, unit = _open_times(raw[layout.time_column], layout.time_kind, where, first_data_line)
    frame = pd.DataFrame({"open_time": open_time})
    for name in (*PRICE_COLUMNS, "volume"):
        frame[name] = _numbers(raw[name])
    if layout.trades_column:
        frame["trades"] = _numbers(raw[layout.trades_column])
    symbol = None
    if layout.symbol_column:
        symbols = raw[layout.symbol_column].unique()
        if len(symbols) > 1:
            raise FormatError(f"{where}: holds {len(symbols)} symbols in column {layout.symbol_column!r} "
                              f"({', '.join(map(str, symbols[:5]))}...); a candle series is one symbol: split the "
                              f"file per symbol first")
        symbol = str(symbols[0]) if len(symbols) else None
    return frame, unit, symbol


def _numbers(text: pd.Series) -> np.ndarray:
    """float64 of a text column; empty or non-numeric cells become NaN (the validator reports them)."""
    try:
        return cast(np.ndarray, text.to_numpy(dtype=np.float64))
    except ValueError:
        return cast(np.ndarray, pd.to_numeric(text, errors="coerce").to_numpy(dtype=np.float64))


def _bad_cells(text: pd.Series, bad: np.ndarray, where: str, first_data_line: int, what: str) -> FormatError:
    idx = np.flatnonzero(bad)
    shown = ", ".join(f"line {first_data_line + i}: {text.iloc[i]!r}" for i in idx[:5])
    return FormatError(f"{where}: {len(idx)} open time(s) are not {what} ({shown}); a candle without a time "
                       f"cannot be placed in a series: fix or remove those lines")


def _open_times(text: pd.Series, kind: TimeKind, where: str, first_data_line: int) -> tuple[np.ndarray, TimeUnit]:
    if kind in ("ms|us", "ms", "s"):
        values = pd.to_numeric(text, errors="coerce")
        bad = (values.isna() | (values != np.floor(values))).to_numpy()
        if bad.any():
            raise _bad_cells(text, bad, where, first_data_line, "integers")
        t = values.to_numpy(dtype=np.int64)
        if kind == "s":
            return t * 1000, "s"
        if kind == "ms":
            return t, "ms"
        micros = t >= MICROS_FROM
        unit: TimeUnit = "ms+us" if micros.any() and not micros.all() else ("us" if micros.any() else "ms")
        return np.where(micros, t // 1000, t), unit
    parsed = pd.to_datetime(text, utc=True, format="ISO8601", errors="coerce")
    bad = parsed.isna().to_numpy()
    if bad.any():
        raise _bad_cells(text, bad, where, first_data_line, "ISO-8601 date-times")
    if kind == "iso" and not text.str.contains(r"(?:[+-]\d\d:?\d\d|Z)$", regex=True).all():
        naive = ~text.str.contains(r"(?:[+-]\d\d:?\d\d|Z)$", regex=True).to_numpy()
        raise _bad_cells(text, naive, where, first_data_line, "ISO-8601 with a UTC offset (use python-binance "
                                                               "for naive UTC text)")
    return parsed.dt.as_unit("ms").astype("int64").to_numpy(), "text"


# ---------------------------------------------------------------------------------------------------------
# Formats


@dataclass(frozen=True, slots=True)
class Format:
    name: str
    description: str
    read: Callable[[Path, bool], CandleFile]
    layout: Layout | None = None


def _table_reader(name: str, layout: Layout) -> Callable[[Path, bool], CandleFile]:
    def read(path: Path, verify_checksum: bool) -> CandleFile:
        with path.open("rb") as f:
            head = f.read(4096)
        why = _layout_mismatch(layout, _first_line(head))
        if why:
            raise _mismatch(path, name, why)
        frame, unit, symbol = _read_table(path, layout, f"{path} (format {name})")
        return CandleFile(path, name, frame, infer_timeframe(frame["open_time"].to_numpy()), unit, symbol)
    return read


def verify_checksum(path: Path) -> str:
    """The archive's sha256 after checking it against `path.CHECKSUM` (`<sha256>  <name>`, as
    data.binance.vision publishes it)."""
    checksum_file = path.with_name(path.name + ".CHECKSUM")
    try:
        listed = checksum_file.read_text(errors="replace").split()
    except FileNotFoundError:
        raise FormatError(f"{path}: no checksum file {checksum_file.name} next to it; download it from "
                          f"data.binance.vision beside the zip, or pass --no-checksum to read it unverified") from None
    expected = listed[0].lower() if listed else ""
    if not re.fullmatch(r"[0-9a-f]{64}", expected):
        raise FormatError(f"{checksum_file}: expected '<sha256 hex>  <file name>', found {' '.join(listed)[:120]!r}")
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    actual = digest.hexdigest()
    if actual != expected:
        raise ChecksumError(f"{path}: sha256 is {actual} but {checksum_file.name} expects {expected}; the archive "
                            f"is corrupt or incomplete: download it again from data.binance.vision")
    return actual


def _read_binance_zip(path: Path, check: bool) -> CandleFile:
    name = "binance-kline-zip"
    if not zipfile.is_zipfile(path):
        raise _mismatch(path, name, "it is not a zip archive")
    checksum = verify_checksum(path) if check else None
    with zipfile.ZipFile(path) as archive:
        members = [m for m in archive.namelist() if not m.endswith("/")]
        csvs = [m for m in members if m.lower().endswith(".csv")]
        if len(csvs) != 1 or len(members) != 1:
            raise _mismatch(path, name, f"expected exactly one CSV inside, found {members[:10]}")
        data = archive.read(csvs[0])
    first = _first_line(data[:4096])
    layout = BINANCE_USDM if _layout_mismatch(BINANCE_USDM, first) is None else BINANCE_KLINE
    why = _layout_mismatch(layout, first)
    if why:
        raise _mismatch(path, name, f"{csvs[0]} inside: {why}")
    frame, unit, _ = _read_table(io.BytesIO(data), layout, f"{path}!{csvs[0]} (format {name})")
    return CandleFile(path, name, frame, infer_timeframe(frame["open_time"].to_numpy()), unit, None, checksum)


FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("binance-kline", "data.binance.vision kline CSV: no header, 12 columns, open_time ms or us",
           _table_reader("binance-kline", BINANCE_KLINE), BINANCE_KLINE),
    Format("binance-kline-zip", "data.binance.vision kline zip, verified against FILE.CHECKSUM (sha256)",
           _read_binance_zip),
    Format("binance-usdm-csv", "Binance futures kline CSV with its header row (open_time,open,...,ignore)",
           _table_reader("binance-usdm-csv", BINANCE_USDM), BINANCE_USDM),
    Format("ccxt-ohlcv", "ccxt fetch_ohlcv rows: timestamp,open,high,low,close,volume (ms)",
           _table_reader("ccxt-ohlcv", CCXT_OHLCV), CCXT_OHLCV),
    Format("python-binance", "date,open,high,low,close,volume,ticker with naive UTC date text",
           _table_reader("python-binance", PYTHON_BINANCE), PYTHON_BINANCE),
    Format("binanceus-csv", "open_time,open,high,low,close,volume with ISO-8601 open_time and offset",
           _table_reader("binanceus-csv", BINANCEUS), BINANCEUS),
    Format("kraken-ohlcvt", "Kraken OHLCVT: no header, unix seconds, open,high,low,close,volume,trades",
           _table_reader("kraken-ohlcvt", KRAKEN_OHLCVT), KRAKEN_OHLCVT),
)}


def known_formats() -> str:
    return ", ".join(FORMATS)


def sniff(path: Path) -> list[str]:
    """The formats whose first line (or container) `path` matches; used to suggest the right --format."""
    path = Path(path)
    if zipfile.is_zipfile(path):
        return ["binance-kline-zip"]
    try:
        with path.open("rb") as f:
            first = _first_line(f.read(4096))
    except OSError:
        return []
    return [f.name for f in FORMATS.values() if f.layout is not None and _layout_mismatch(f.layout, first) is None]


def _mismatch(path: Path, name: str, why: str) -> FormatError:
    fits = [f for f in sniff(path) if f != name]
    hint = (f"it looks like --format {' or '.join(fits)}" if fits
            else "no known candle format matches it (is it a candle file?)")
    return FormatError(f"{path} is not a {name!r} file: {why}; {hint}. Known formats: {known_formats()}")


def load_candles(path: str | Path, fmt: str, *, verify: bool = True) -> CandleFile:
    """Read `path` as candle format `fmt` (a key of FORMATS). `verify=False` skips an archive's CHECKSUM."""
    path = Path(path)
    if fmt not in FORMATS:
        raise FormatError(f"unknown format {fmt!r}; known formats: {known_formats()}")
    if not path.is_file():
        raise FormatError(f"{path}: no such file")
    return FORMATS[fmt].read(path, verify)


__all__ = [
    "CANDLE_COLUMNS", "FORMATS", "TIMEFRAME_MS", "CandleFile", "ChecksumError", "Format", "FormatError",
    "infer_timeframe", "known_formats", "load_candles", "sniff", "timeframe_ms", "verify_checksum",
]
