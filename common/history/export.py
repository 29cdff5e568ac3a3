"""Stored candles and trades to Parquet or CSV files, one file per UTC day (`mdp export`, docs/export.md).

    stats = await export(ExportRequest("candles", "binance", "BTC/USDT", "1m", start_ns, end_ns, Path("out")), client)

Layout (hive style, so pyarrow, pandas and DuckDB read a folder as one dataset, partition columns included):
    OUT/candles/exchange=binance/symbol=BTC%2FUSDT/timeframe=1m/date=2024-08-08/part.parquet
    OUT/trades/exchange=binance/symbol=BTC%2FUSDT/date=2024-08-08/part.parquet
Partition values are percent-encoded (RFC 3986, nothing kept but letters, digits and `_.-~`), which pyarrow's
hive partitioning and DuckDB decode back: `BTC/USDT:USDT` is the folder `symbol=BTC%2FUSDT%3AUSDT`.

Types: timestamps are timestamp[ns, UTC]; prices and amounts decimal128(38, 18), exact to what InfluxDB holds
(read as decimal text, never through a binary float); a value that needs more than 18 decimal places is an
ExportError, never rounded. CSV holds the same columns with timestamps as integer nanoseconds and decimals as
plain text (every digit, so CSV also takes what decimal128 refuses).

Atomic and resumable: a day is written to a hidden temporary file beside its final name (`.part.parquet.<pid>.tmp`,
ignored by dataset readers), fsynced, renamed over the final name and the folder fsynced, so a final name only
ever holds a whole file. A day whose file says it covers the wanted part of the day is skipped: Parquet files
carry the range they cover in their own key-value metadata (`mdp.export`); a CSV file gets a sidecar
`_part.csv.json` (ignored by dataset readers), removed before the CSV is replaced and written after it. A
leftover temporary file of a killed run is removed by the next run. Rerunning writes nothing new; with `force`
every day is read and written again, byte for byte the same if the stored data did not change.

Memory is bounded: each day is read in pages of `page_rows` rows (keyset pagination, as common.history reads
candles), and at most `ROW_GROUP_ROWS` rows wait as Arrow arrays before they are written as one row group.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import IO, Any, Protocol, Self
from urllib.parse import quote

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from common.domain.normalize import canonical_decimal
from common.errors import MdpError
from common.history.api import stored_values
from common.stores.influx import (
    NS_PER_MS,
    NS_PER_S,
    TICKS,
    TRADES,
    InfluxClient,
    InfluxQueryError,
    timeframe_seconds,
)

log = logging.getLogger(__name__)

KINDS = ("candles", "trades")
FORMATS = ("parquet", "csv")
EXPORT_VERSION = 1
METADATA_KEY = b"mdp.export"
SCALE = 18  # decimal places kept: Binance's smallest steps are 1e-8; 18 leaves room for any exchange's
DECIMAL = pa.decimal128(38, SCALE)
TIMESTAMP = pa.timestamp("ns", tz="UTC")
PAGE_ROWS = 10_000  # rows per InfluxDB request (1.x answers in chunks of 10,000 anyway)
ROW_GROUP_ROWS = 100_000  # rows per Parquet row group / CSV write: the bound on what waits in memory
DAY_NS = 86_400 * NS_PER_S

CANDLE_SCHEMA = pa.schema([("open_time", TIMESTAMP), ("open", DECIMAL), ("high", DECIMAL), ("low", DECIMAL),
                           ("close", DECIMAL), ("volume", DECIMAL), ("quality", pa.string())])
TRADE_SCHEMA = pa.schema([("ts_event", TIMESTAMP), ("trade_id", pa.string()), ("price", DECIMAL),
                          ("amount", DECIMAL), ("side", pa.string()), ("quality", pa.string())])


def _csv_schema(schema: pa.Schema) -> pa.Schema:
    """The same columns for CSV: timestamps as int64 ns, decimals as text."""
    kinds = {TIMESTAMP: pa.int64(), DECIMAL: pa.string()}
    return pa.schema([(f.name, kinds.get(f.type, f.type)) for f in schema])


CSV_CANDLE_SCHEMA = _csv_schema(CANDLE_SCHEMA)
CSV_TRADE_SCHEMA = _csv_schema(TRADE_SCHEMA)
SELECT_TRADES = ('SELECT "price", "amount", "side", "trade_id", "quality" FROM "' + TRADES + '" '
                 'WHERE "exchange" = $exchange AND "symbol" = $symbol AND time >= $start AND time < $end')
TRADE_FIELDS = ("time", "price", "amount", "side", "trade_id", "quality")


class ExportError(MdpError, ValueError):
    """An export that cannot be done as asked: bad arguments, or a value that the file type cannot hold exactly."""


class ProgressLine(Protocol):
    """What the export needs of a progress bar (common.history.progress.Progress is one)."""

    label: str
    total: int  # set by the export to the number of days

    def update(self, done: int = 0, force: bool = False) -> None: ...

    def finish(self) -> None: ...


@dataclass(frozen=True, slots=True)
class ExportRequest:
    kind: str  # "candles" or "trades"
    exchange: str
    symbol: str
    timeframe: str | None  # candles only
    start_ns: int
    end_ns: int  # exclusive
    out: Path
    fmt: str = "parquet"
    force: bool = False
    page_rows: int = PAGE_ROWS

    def check(self) -> None:
        if self.kind not in KINDS:
            raise ExportError(f"kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.fmt not in FORMATS:
            raise ExportError(f"format {self.fmt!r} is not one of {', '.join(FORMATS)}")
        for name in ("exchange", "symbol"):
            if not getattr(self, name):
                raise ExportError(f"{name} is empty; give e.g. --exchange binance --symbol BTC/USDT")
        if self.kind == "candles":
            if not self.timeframe:
                raise ExportError("candles need a timeframe, e.g. --timeframe 1m")
            try:
                timeframe_seconds(self.timeframe)
            except ValueError as exc:
                raise ExportError(str(exc)) from None
        elif self.timeframe:
            raise ExportError(f"--timeframe {self.timeframe} applies to candles only; leave it out for trades")
        if self.end_ns <= self.start_ns:
            raise ExportError(f"end ({_iso(self.end_ns)}) is not after start ({_iso(self.start_ns)}); "
                              f"the range is [start, end)")
        if self.page_rows < 1:
            raise ExportError(f"page_rows = {self.page_rows}: give at least 1")

    @property
    def series(self) -> dict[str, str]:
        """The partition keys of this export's files, outermost first."""
        keys = {"exchange": self.exchange, "symbol": self.symbol}
        if self.kind == "candles":
            keys["timeframe"] = str(self.timeframe)
        return keys


@dataclass(slots=True)
class DayFile:
    date: str
    path: Path
    status: str  # "written", "skipped" (complete already), "empty" (nothing stored for that part of the day)
    rows: int = 0
    bytes: int = 0


@dataclass(slots=True)
class ExportStats:
    request: ExportRequest
    days: list[DayFile] = field(default_factory=list)
    requests: int = 0
    seconds: float = 0.0

    def count(self, status: str) -> int:
        return sum(1 for d in self.days if d.status == status)

    @property
    def rows(self) -> int:
        return sum(d.rows for d in self.days if d.status == "written")

    @property
    def bytes(self) -> int:
        return sum(d.bytes for d in self.days if d.status == "written")

    def summary(self) -> str:
        r = self.request
        what = f"{r.kind} {r.exchange} {r.symbol}" + (f" {r.timeframe}" if r.timeframe else "")
        return (f"export {what} {_iso(r.start_ns)} .. {_iso(r.end_ns)}: {self.count('written')} day(s) written "
                f"({self.rows:,} rows, {self.bytes / 1e6:,.1f} MB), {self.count('skipped')} already complete, "
                f"{self.count('empty')} with nothing stored; {self.requests} InfluxDB request(s) in "
                f"{self.seconds:.1f} s -> {series_dir(r)}")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.request.kind, "exchange": self.request.exchange, "symbol": self.request.symbol,
                "timeframe": self.request.timeframe, "start_ns": self.request.start_ns,
                "end_ns": self.request.end_ns, "format": self.request.fmt, "rows": self.rows, "bytes": self.bytes,
                "written": self.count("written"), "skipped": self.count("skipped"), "empty": self.count("empty"),
                "requests": self.requests, "seconds": round(self.seconds, 3),
                "days": [{"date": d.date, "path": str(d.path), "status": d.status, "rows": d.rows, "bytes": d.bytes}
                         for d in self.days]}


def _iso(ns: int) -> str:
    return datetime.fromtimestamp(ns / NS_PER_S, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def segment(key: str, value: str) -> str:
    """A hive partition folder `key=value` with the value percent-encoded (`BTC/USDT` -> `BTC%2FUSDT`)."""
    return f"{key}={quote(value, safe='')}"


def series_dir(request: ExportRequest) -> Path:
    path = request.out / request.kind
    for key, value in request.series.items():
        path = path / segment(key, value)
    return path


def day_windows(start_ns: int, end_ns: int) -> list[tuple[str, int, int, int]]:
    """(date, day start, window start, window end) of each UTC day the range [start_ns, end_ns) touches."""
    days = []
    day = start_ns - start_ns % DAY_NS
    while day < end_ns:
        date = datetime.fromtimestamp(day // NS_PER_S, UTC).strftime("%Y-%m-%d")
        days.append((date, day, max(start_ns, day), min(end_ns, day + DAY_NS)))
        day += DAY_NS
    return days


# -- reading InfluxDB -----------------------------------------------------------------------------------

async def trade_pages(client: InfluxClient, exchange: str, symbol: str, start_ns: int, end_ns: int,
                      page_rows: int = PAGE_ROWS) -> AsyncIterator[list[list[Any]]]:
    """Pages of stored trades of one symbol with start_ns <= time < end_ns, oldest first, each row in the
    order of TRADE_FIELDS (time = the point's timestamp, see common.stores.influx.trade_timestamp), numbers as
    Decimal or int from the server's text. Keyset pagination like common.history.stored_values: a trade's
    point timestamp is unique in its series, so continuing after the last time skips and repeats nothing."""
    try:
        database, rp = client.tier_for(TICKS)
    except RuntimeError:  # the generation, hence where the tier lives, is learnt on connecting
        await client.connect()
        database, rp = client.tier_for(TICKS)
    params: dict[str, Any] = {"exchange": exchange, "symbol": symbol, "start": start_ns, "end": end_ns}
    query = f"{SELECT_TRADES} ORDER BY time ASC LIMIT {int(page_rows)}"
    while True:
        columns, rows = await client.query_values(query, params, database, True, rp)
        if columns and tuple(columns) != TRADE_FIELDS:
            raise InfluxQueryError(f"InfluxDB answered columns {columns}, not {list(TRADE_FIELDS)}: the query "
                                   f"is wrong")
        if rows:
            yield rows
        if len(rows) < page_rows:
            return
        params["start"] = int(rows[-1][0]) + 1


def _pages(client: InfluxClient, r: ExportRequest, lo: int, hi: int) -> AsyncIterator[list[list[Any]]]:
    if r.kind == "candles":
        return stored_values(client, r.exchange, r.symbol, str(r.timeframe), lo, hi, exact=True,
                             page_rows=r.page_rows)
    return trade_pages(client, r.exchange, r.symbol, lo, hi, r.page_rows)


# -- rows to Arrow --------------------------------------------------------------------------------------

def _decimal(value: Any) -> Decimal:
    """A stored number as Decimal: the exact decoder gives Decimal for numbers with a fraction, int otherwise."""
    return value if isinstance(value, Decimal) else Decimal(value)


def _decimals(values: Sequence[Any], name: str, times: Sequence[int]) -> pa.Array:
    numbers = [_decimal(v) for v in values]
    try:
        return pa.array(numbers, type=DECIMAL)
    except (pa.ArrowInvalid, OverflowError):
        for number, ts in zip(numbers, times, strict=True):
            exponent = number.as_tuple().exponent
            if (isinstance(exponent, int) and exponent < -SCALE) or number.adjusted() >= 38 - SCALE:
                raise ExportError(f"{name} = {number} at {_iso(ts)} ({ts} ns) does not fit decimal128(38, {SCALE}) "
                                  f"exactly (more than {SCALE} decimal places or {38 - SCALE} integer digits); "
                                  f"export this range with --format csv, which keeps every digit as text") \
                    from None
        raise


def _texts(values: Sequence[Any], name: str, times: Sequence[int]) -> pa.Array:
    """Decimals as plain text for CSV: no exponent, no padding ("61837.63", "0.0000001"), every digit kept."""
    return pa.array([format(canonical_decimal(_decimal(v)), "f") for v in values], type=pa.string())


def _times(times: Sequence[int], csv: bool) -> pa.Array:
    """Timestamps: timestamp[ns, UTC] in Parquet; integer ns in CSV (CSV readers parse ISO text at microseconds)."""
    array = pa.array(times, type=pa.int64())
    return array if csv else array.cast(TIMESTAMP)


def candle_batch(rows: Sequence[Sequence[Any]], csv: bool = False) -> pa.RecordBatch:
    """Rows in common.history.FIELDS order (time, open, high, low, close, volume, quality) as a RecordBatch of
    CANDLE_SCHEMA (with `csv`: CSV_CANDLE_SCHEMA)."""
    columns = list(zip(*rows, strict=True))
    times = columns[0]
    numbers = _texts if csv else _decimals
    arrays = [_times(times, csv)]
    arrays += [numbers(columns[i], name, times) for i, name in enumerate(CANDLE_SCHEMA.names[1:6], start=1)]
    arrays.append(pa.array([q or None for q in columns[6]], type=pa.string()))
    return pa.RecordBatch.from_arrays(arrays, schema=CSV_CANDLE_SCHEMA if csv else CANDLE_SCHEMA)


def trade_batch(rows: Sequence[Sequence[Any]], csv: bool = False) -> pa.RecordBatch:
    """Rows in TRADE_FIELDS order as a RecordBatch of TRADE_SCHEMA (with `csv`: CSV_TRADE_SCHEMA). ts_event is
    the point's millisecond: the writer stores a trade at its ts_event floored to the millisecond plus an
    id-derived offset (common.stores.influx.trade_timestamp); exchanges (and ccxt) stamp trades in milliseconds, so
    that is the exchange's time. Rows keep the stored order, which inside a millisecond is trade id order."""
    columns = list(zip(*rows, strict=True))
    times = [t - t % NS_PER_MS for t in columns[0]]
    numbers = _texts if csv else _decimals
    return pa.RecordBatch.from_arrays([
        _times(times, csv),
        pa.array([str(t) for t in columns[4]], type=pa.string()),
        numbers(columns[1], "price", times),
        numbers(columns[2], "amount", times),
        pa.array(columns[3], type=pa.string()),
        pa.array([q or None for q in columns[5]], type=pa.string()),
    ], schema=CSV_TRADE_SCHEMA if csv else TRADE_SCHEMA)


# -- files ----------------------------------------------------------------------------------------------

def _coverage(r: ExportRequest, start_ns: int, end_ns: int) -> dict[str, Any]:
    return {"version": EXPORT_VERSION, "kind": r.kind, **r.series, "start_ns": start_ns, "end_ns": end_ns}


def _sidecar(final: Path) -> Path:
    return final.with_name(f"_{final.name}.json")


def covered(final: Path, r: ExportRequest) -> tuple[int, int] | None:
    """The [start, end) a complete file at `final` says it covers, or None when there is none (or it is of
    another version or series, or unreadable: it is then written again)."""
    try:
        if r.fmt == "parquet":
            if not final.exists():
                return None
            metadata = pq.read_schema(final).metadata or {}
            raw = metadata.get(METADATA_KEY)
            if raw is None:
                log.warning("%s has no %s metadata; writing it again", final, METADATA_KEY.decode())
                return None
            info = json.loads(raw)
        else:
            side = _sidecar(final)
            if not (side.exists() and final.exists()):
                return None
            info = json.loads(side.read_text())
            if info.get("bytes") != final.stat().st_size:
                log.warning("%s does not match its size in %s; writing it again", final, side.name)
                return None
    except (OSError, ValueError, pa.ArrowException) as exc:
        log.warning("%s cannot be read (%s); writing it again", final, exc)
        return None
    want = _coverage(r, 0, 0)
    if any(info.get(k) != v for k, v in want.items() if k not in ("start_ns", "end_ns")):
        log.warning("%s was written for %s, not %s; writing it again", final, info, want)
        return None
    return int(info["start_ns"]), int(info["end_ns"])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Remove the temporary files of exports that died (their pid is gone) in `folder`; returns them."""
    removed = []
    for tmp in folder.glob(".*.tmp"):
        try:
            pid = int(tmp.name.rsplit(".", 2)[-2])
        except (ValueError, IndexError):
            continue
        if pid != os.getpid() and _alive(pid):
            continue
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _DayWriter:
    """One day's file, written to a hidden temporary file and renamed over the final name when complete."""

    def __init__(self, final: Path, r: ExportRequest, schema: pa.Schema, coverage: dict[str, Any]) -> None:
        self.final, self.fmt, self.coverage = final, r.fmt, coverage
        self.tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
        self.schema = schema.with_metadata({METADATA_KEY: json.dumps(coverage, sort_keys=True).encode()})
        self.pending: list[pa.RecordBatch] = []
        self.pending_rows = 0
        self.rows = 0
        self._fh: IO[bytes] | None = None
        self._parquet: pq.ParquetWriter | None = None
        self._csv: pa_csv.CSVWriter | None = None

    def __enter__(self) -> Self:
        self._fh = open(self.tmp, "wb")  # closed by commit() or __exit__
        if self.fmt == "parquet":
            self._parquet = pq.ParquetWriter(self._fh, self.schema, compression="zstd")
        return self

    def add(self, batch: pa.RecordBatch) -> None:
        self.pending.append(batch)
        self.pending_rows += batch.num_rows
        if self.pending_rows >= ROW_GROUP_ROWS:
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        table = pa.Table.from_batches(self.pending, schema=self.schema)
        if self._parquet is not None:
            self._parquet.write_table(table, row_group_size=max(1, table.num_rows))
        else:
            if self._csv is None:
                assert self._fh is not None
                self._csv = pa_csv.CSVWriter(self._fh, table.schema,
                                             write_options=pa_csv.WriteOptions(quoting_style="needed"))
            self._csv.write_table(table)
        self.rows += table.num_rows
        self.pending, self.pending_rows = [], 0

    def commit(self) -> int:
        """Flush, fsync and rename over the final name (the CSV sidecar after it); returns the file's size.
        A day with no rows leaves no file (and removes nothing)."""
        self._flush()
        assert self._fh is not None
        if self._parquet is not None:
            self._parquet.close()
        if self._csv is not None:
            self._csv.close()
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        if not self.rows:
            self.tmp.unlink(missing_ok=True)
            return 0
        size = self.tmp.stat().st_size
        side = _sidecar(self.final)
        if self.fmt == "csv":
            side.unlink(missing_ok=True)  # never a sidecar beside a CSV it does not describe
        os.replace(self.tmp, self.final)
        _fsync_dir(self.final.parent)
        if self.fmt == "csv":
            _atomic_write_text(side, json.dumps({**self.coverage, "rows": self.rows, "bytes": size},
                                                sort_keys=True))
        return size

    def __exit__(self, *exc: object) -> None:
        """After commit: nothing left to do. After an error: drop the temporary file (the writers are closed
        first, into the file that is then removed)."""
        if self._fh is not None and not self._fh.closed:
            for writer in (self._parquet, self._csv):
                if writer is not None:
                    try:
                        writer.close()
                    except (OSError, ValueError, pa.ArrowException) as error:
                        log.debug("closing the writer of %s after an error: %s", self.tmp, error)
            self._fh.close()
        self.tmp.unlink(missing_ok=True)


# -- the export -----------------------------------------------------------------------------------------

async def export(r: ExportRequest, client: InfluxClient, *, progress: ProgressLine | None = None,
                 say: Callable[[str], None] = print, now_ns: int | None = None) -> ExportStats:
    """Export one series for [start, end) day by day (see the module's doc). The part of the range after
    `now_ns` (default: now) is left out, so a day that is still going on is exported up to now and written
    again by a later run. ExportError for a bad request; InfluxQueryError / StoreUnavailable from the server;
    OSError from the file system. Files already written stay complete whatever happens."""
    r.check()
    started = time.monotonic()
    now = time.time_ns() if now_ns is None else now_ns
    end = min(r.end_ns, now)
    if end <= r.start_ns:
        raise ExportError(f"start ({_iso(r.start_ns)}) is in the future (now {_iso(now)}); nothing is stored yet")
    requests_before = client.requests
    await client.connect()
    tier = client.plan.for_timeframe(TICKS if r.kind == "trades" else str(r.timeframe))
    cutoff = tier.cutoff_ns(now)
    if cutoff is not None and r.start_ns < cutoff:
        say(f"note: {r.kind} before {_iso(cutoff)} are past the retention of tier {tier.name!r} ({tier.retention}); "
            f"InfluxDB no longer holds them, so those days export nothing")
    csv = r.fmt == "csv"
    schemas = {(False, "candles"): CANDLE_SCHEMA, (False, "trades"): TRADE_SCHEMA,
               (True, "candles"): CSV_CANDLE_SCHEMA, (True, "trades"): CSV_TRADE_SCHEMA}
    schema = schemas[(csv, r.kind)]
    build = candle_batch if r.kind == "candles" else trade_batch
    stats = ExportStats(r)
    base = series_dir(r)
    windows = day_windows(r.start_ns, end)
    if progress is not None:
        progress.total = len(windows)
    for date, day, lo, hi in windows:
        folder = base / segment("date", date)
        final = folder / f"part.{r.fmt}"
        have = None if r.force else covered(final, r)
        if have is not None and have[0] <= lo and hi <= have[1]:
            stats.days.append(DayFile(date, final, "skipped", bytes=final.stat().st_size))
            if progress is not None:
                progress.update(done=1)
            continue
        if have is not None:  # a partial day written before: widen, never narrow, what the file covers
            lo, hi = max(day, min(lo, have[0])), min(day + DAY_NS, max(hi, have[1]))
        folder.mkdir(parents=True, exist_ok=True)
        for stale in remove_stale_temporaries(folder):
            say(f"removed {stale}, left by an export that was killed")
        with _DayWriter(final, r, schema, _coverage(r, lo, hi)) as writer:
            async for rows in _pages(client, r, lo, hi):
                writer.add(build(rows, csv))
                if progress is not None:
                    progress.label = f"export {r.kind} {r.symbol} {date} {writer.rows + writer.pending_rows:,} rows"
                    progress.update()
            size = writer.commit()
        stats.days.append(DayFile(date, final, "written" if writer.rows else "empty", writer.rows, size))
        if progress is not None:
            progress.update(done=1)
    if progress is not None:
        progress.finish()
    stats.requests = client.requests - requests_before
    stats.seconds = time.monotonic() - started
    return stats


__all__ = ["CANDLE_SCHEMA", "CSV_CANDLE_SCHEMA", "CSV_TRADE_SCHEMA", "DECIMAL", "FORMATS", "KINDS", "METADATA_KEY", "TIMESTAMP", "TRADE_SCHEMA", "DayFile",
           "ExportError", "ExportRequest", "ExportStats", "ProgressLine", "candle_batch", "covered",
           "day_windows", "export", "remove_stale_temporaries", "segment", "series_dir", "trade_batch",
           "trade_pages"]
