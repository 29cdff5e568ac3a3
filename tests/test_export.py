"""`mdp export` against a real private influxd (1.6.7): real Binance candles (the data.binance.vision daily
zips of 2020-01-01..03) and real Binance spot trades (the WebSocket capture across midnight 2024-08-08/09) are
stored, exported to Parquet and CSV, read back with pandas and with DuckDB, and compared exactly with what
InfluxDB returns (and with the recordings' own text). An export killed with SIGKILL leaves no partial file
under a final name, and the resumed run completes byte for byte like an uninterrupted one."""

from __future__ import annotations

import asyncio
import csv
import gzip
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import AsyncIterator
from decimal import Decimal
from itertools import count
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import pyarrow.parquet as pq
import pytest

from common.config import InfluxSettings, load_settings
from common.history.api import to_ns
from common.history.export import (
    DECIMAL,
    METADATA_KEY,
    TIMESTAMP,
    ExportError,
    ExportRequest,
    day_windows,
    export,
    segment,
)
from common.history.progress import Progress
from common.stores.influx import InfluxClient, encode_candles, encode_trades, quote_ident
from schemas import Candle, Trade
from tools.localstores import LocalServer

ROOT = Path(__file__).resolve().parent.parent
MS = 1_000_000
_db_numbers = count()
TRADES_START, TRADES_END = "2024-08-08T23:00:00Z", "2024-08-09T01:00:00Z"


# -- the real recordings ------------------------------------------------------------------------------

def daily_candles(real_data: Path, symbol: str = "BTC/USDT") -> list[Candle]:
    """Binance spot BTCUSDT 1m klines of 2020-01-01..03 (4,320 rows), the zips' text as Decimals."""
    out = []
    for path in sorted((real_data / "binance-spot-1m-daily").glob("BTCUSDT-1m-*.zip")):
        with zipfile.ZipFile(path) as zf:
            text = zf.read(zf.namelist()[0]).decode()
        for row in csv.reader(io.StringIO(text)):
            open_time = int(row[0]) * MS
            out.append(Candle(exchange="binance", symbol=symbol, timeframe="1m", open_time=open_time,
                              open=Decimal(row[1]), high=Decimal(row[2]), low=Decimal(row[3]), close=Decimal(row[4]),
                              volume=Decimal(row[5]), closed=True, ts_event=open_time + 59_999 * MS,
                              ts_recv=open_time + 60_000 * MS))
    assert len(out) == 4320
    return out


def captured_trades(real_data: Path) -> list[Trade]:
    """Binance spot BTCUSDT trades of the two consecutive captures (2024-08-08 23:54 .. 08-09 00:05)."""
    out = []
    for path in sorted((real_data / "ws-captures").glob("binance_spot_btcusdt_2024080*.gz")):
        with gzip.open(path, "rt") as fh:
            for line in fh:
                received, _, raw = line.partition(" ")
                if '"@trade"' not in raw and "@trade" not in raw:
                    continue
                d = json.loads(raw)["data"]
                out.append(Trade(exchange="binance", symbol="BTC/USDT", trade_id=str(d["t"]), price=Decimal(d["p"]),
                                 amount=Decimal(d["q"]), side="sell" if d["m"] else "buy", ts_event=d["T"] * MS,
                                 ts_recv=int(received)))
    assert len(out) > 19_000
    return out


# -- stores ---------------------------------------------------------------------------------------------

@pytest.fixture
def influx_settings(influx_server: LocalServer) -> InfluxSettings:
    env = {"MDP_INFLUX_URL": influx_server.url, "MDP_INFLUX_DATABASE": f"mdp_export_{os.getpid()}_{next(_db_numbers)}"}
    return load_settings(ROOT / "config" / "simulator.toml", env=env).influx


@pytest.fixture
async def client(influx_settings: InfluxSettings) -> AsyncIterator[InfluxClient]:
    async with InfluxClient(influx_settings) as c:
        await c.ensure_tiers()
        yield c
        await c.execute(f"DROP DATABASE {quote_ident(influx_settings.database)}")


async def store_candles(client: InfluxClient, candles: list[Candle]) -> None:
    await client.write_tier(client.plan.for_timeframe(candles[0].timeframe), encode_candles(candles))


async def store_trades(client: InfluxClient, trades: list[Trade]) -> None:
    await client.write_tier(client.plan.for_timeframe("ticks"), encode_trades(trades))


async def influx_candles(client: InfluxClient, symbol: str, timeframe: str) -> list[tuple[Any, ...]]:
    """What InfluxDB returns for the series, queried here independently of the export's code."""
    database, rp = client.tier_for(timeframe)
    rows = await client.query('SELECT "open", "high", "low", "close", "volume", "quality" FROM "ohlcv" '
                              'WHERE "symbol" = $symbol AND "timeframe" = $tf', {"symbol": symbol, "tf": timeframe},
                              database=database, exact=True, rp=rp)
    return [(r["time"], *(Decimal(r[k]) for k in ("open", "high", "low", "close", "volume")), r["quality"])
            for r in rows]


async def influx_trades(client: InfluxClient) -> list[tuple[Any, ...]]:
    database, rp = client.tier_for("ticks")
    rows = await client.query('SELECT "trade_id", "price", "amount", "side", "quality" FROM "trades" '
                              'WHERE "symbol" = $symbol', {"symbol": "BTC/USDT"}, database=database, exact=True,
                              rp=rp)
    return [(r["time"] - r["time"] % MS, r["trade_id"], Decimal(r["price"]), Decimal(r["amount"]), r["side"],
             r["quality"]) for r in rows]


def request(kind: str, out: Path, start: str | int, end: str | int, **kw: Any) -> ExportRequest:
    timeframe = kw.pop("timeframe", "1m" if kind == "candles" else None)
    return ExportRequest(kind, kw.pop("exchange", "binance"), kw.pop("symbol", "BTC/USDT"), timeframe,
                         to_ns(start), to_ns(end), out, **kw)


def text(value: Any) -> str | None:
    """A string cell as read by pandas (a missing one is NaN there), None when missing."""
    return None if pd.isna(value) else str(value)


def quiet(_: str) -> None:
    pass


def files(root: Path) -> dict[str, bytes]:
    """Every file under root (hidden ones included), relative path -> bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# -- Parquet: read back with pandas and DuckDB, compared with InfluxDB -------------------------------------

async def test_candles_round_trip_exactly_through_parquet(client: InfluxClient, real_data: Path,
                                                          tmp_path: Path) -> None:
    # Arrange: three real days of 1m candles, stored
    source = daily_candles(real_data)
    await store_candles(client, source)
    stored = await influx_candles(client, "BTC/USDT", "1m")
    assert len(stored) == 4320

    # Act
    stats = await export(request("candles", tmp_path, "2020-01-01", "2020-01-04"), client, say=quiet)

    # Assert: one file a day, hive layout with the symbol percent-encoded
    assert [(d.date, d.status, d.rows) for d in stats.days] == [
        ("2020-01-01", "written", 1440), ("2020-01-02", "written", 1440), ("2020-01-03", "written", 1440)]
    series = tmp_path / "candles" / "exchange=binance" / "symbol=BTC%2FUSDT" / "timeframe=1m"
    assert sorted(p.relative_to(series).as_posix() for p in series.rglob("*") if p.is_file()) == [
        f"date=2020-01-0{i}/part.parquet" for i in (1, 2, 3)]
    schema = pq.read_schema(series / "date=2020-01-02" / "part.parquet")
    assert schema.field("open_time").type == TIMESTAMP and schema.field("close").type == DECIMAL
    assert json.loads(schema.metadata[METADATA_KEY]) == {
        "version": 1, "kind": "candles", "exchange": "binance", "symbol": "BTC/USDT", "timeframe": "1m",
        "start_ns": to_ns("2020-01-02"), "end_ns": to_ns("2020-01-03")}

    # pandas reads the folder as one dataset, partition columns decoded
    frame = pd.read_parquet(tmp_path / "candles").sort_values("open_time")
    assert str(frame["open_time"].dtype) == "datetime64[ns, UTC]"
    assert set(frame["symbol"].astype(str)) == {"BTC/USDT"} and set(frame["timeframe"].astype(str)) == {"1m"}
    from_pandas = [(t.value, o, h, lo, c, v, text(q)) for t, o, h, lo, c, v, q in zip(
        frame["open_time"], frame["open"], frame["high"], frame["low"], frame["close"], frame["volume"],
        frame["quality"], strict=True)]
    assert from_pandas == stored

    # DuckDB: nanoseconds and DECIMAL(38,18) as written, hive partitions decoded
    from_duckdb = duckdb.sql(
        f"SELECT epoch_ns(open_time), open, high, low, close, volume, quality, symbol, typeof(close) "
        f"FROM read_parquet('{tmp_path}/candles/**/*.parquet', hive_partitioning = true) ORDER BY open_time"
    ).fetchall()
    assert [row[:7] for row in from_duckdb] == stored
    assert {row[7] for row in from_duckdb} == {"BTC/USDT"} and {row[8] for row in from_duckdb} == {"DECIMAL(38,18)"}

    # and the values are the exchange's own text, exactly
    assert [(c.open_time, c.open, c.high, c.low, c.close, c.volume) for c in source] == [r[:6] for r in stored]


async def test_trades_across_midnight_round_trip_exactly(client: InfluxClient, real_data: Path,
                                                         tmp_path: Path) -> None:
    trades = captured_trades(real_data)
    await store_trades(client, trades)
    stored = await influx_trades(client)
    assert len(stored) == len(trades)

    stats = await export(request("trades", tmp_path, TRADES_START, TRADES_END), client, say=quiet)

    assert [(d.date, d.status) for d in stats.days] == [("2024-08-08", "written"), ("2024-08-09", "written")]
    assert sum(d.rows for d in stats.days) == len(trades)
    frame = pd.read_parquet(tmp_path / "trades")
    frame = frame.sort_values(["date", "ts_event"], kind="stable")
    from_pandas = [(t.value, i, p, a, text(s), text(q)) for t, i, p, a, s, q in zip(
        frame["ts_event"], frame["trade_id"], frame["price"], frame["amount"], frame["side"], frame["quality"],
        strict=True)]
    assert from_pandas == stored  # same rows, same order (stored order: time, then trade id within a ms)
    from_duckdb = duckdb.sql(
        f"SELECT epoch_ns(ts_event), trade_id, price, amount, side, quality, date "
        f"FROM read_parquet('{tmp_path}/trades/**/*.parquet', hive_partitioning = true, filename = true) "
        f"ORDER BY filename, ts_event, trade_id::BIGINT").fetchall()
    assert [row[:6] for row in from_duckdb] == stored
    # each row in the file of its own UTC day
    assert all(str(row[6]) == pd.Timestamp(row[0], unit="ns").strftime("%Y-%m-%d") for row in from_duckdb)
    # ts_event is the exchange's millisecond; price and amount the exchange's text
    assert [(t.ts_event, t.trade_id, t.price, t.amount, t.side) for t in trades] == [r[:5] for r in stored]


async def test_csv_holds_the_same_values_as_text(client: InfluxClient, real_data: Path, tmp_path: Path) -> None:
    trades = captured_trades(real_data)
    await store_trades(client, trades)
    stored = await influx_trades(client)

    stats = await export(request("trades", tmp_path, TRADES_START, TRADES_END, fmt="csv"), client, say=quiet)

    assert stats.count("written") == 2
    paths = sorted((tmp_path / "trades").rglob("part.csv"))
    assert [p.parent.name for p in paths] == ["date=2024-08-08", "date=2024-08-09"]
    header = paths[0].read_text().splitlines()[0]
    assert header == '"ts_event","trade_id","price","amount","side","quality"'
    rows = []
    for p in paths:
        frame = pd.read_csv(p, dtype=str, keep_default_na=False)
        rows += [(int(t), i, Decimal(pr), Decimal(a), s, q or None) for t, i, pr, a, s, q in frame.itertuples(
            index=False)]
    assert rows == stored
    assert "E" not in "".join(pd.read_csv(paths[0], dtype=str)["amount"])  # plain text, never 1E-7
    typed = duckdb.sql(
        f"SELECT ts_event, trade_id, price, amount, side, quality FROM read_csv('{tmp_path}/trades/**/*.csv', "
        f"columns = {{'ts_event': 'BIGINT', 'trade_id': 'VARCHAR', 'price': 'DECIMAL(38,18)', "
        f"'amount': 'DECIMAL(38,18)', 'side': 'VARCHAR', 'quality': 'VARCHAR'}}, header = true, filename = true) "
        f"ORDER BY filename, ts_event, trade_id::BIGINT").fetchall()
    assert typed == stored
    # the sidecar says what the CSV covers; a second run skips both days
    side = json.loads((paths[0].parent / "_part.csv.json").read_text())
    assert side["rows"] == stats.days[0].rows and side["bytes"] == paths[0].stat().st_size
    again = await export(request("trades", tmp_path, TRADES_START, TRADES_END, fmt="csv"), client, say=quiet)
    assert again.count("skipped") == 2 and again.count("written") == 0


# -- resumable, idempotent, atomic ----------------------------------------------------------------------

async def test_rerun_skips_complete_days_and_force_rewrites_identically(client: InfluxClient, real_data: Path,
                                                                        tmp_path: Path) -> None:
    await store_candles(client, daily_candles(real_data))
    first = await export(request("candles", tmp_path, "2020-01-01", "2020-01-04"), client, say=quiet)
    before = files(tmp_path)
    mtimes = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.parquet")}

    again = await export(request("candles", tmp_path, "2020-01-01", "2020-01-04"), client, say=quiet)
    assert again.count("skipped") == 3 and again.count("written") == 0
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.parquet")} == mtimes
    assert first.requests > 3 and again.requests == 1  # the ping only: a skipped day costs no query

    forced = await export(request("candles", tmp_path, "2020-01-01", "2020-01-04", force=True), client, say=quiet)
    assert forced.count("written") == 3
    assert files(tmp_path) == before  # byte for byte


async def test_a_partial_day_is_widened_never_narrowed(client: InfluxClient, real_data: Path, tmp_path: Path) -> None:
    await store_candles(client, daily_candles(real_data))
    direct = tmp_path / "direct"
    await export(request("candles", direct, "2020-01-02", "2020-01-03"), client, say=quiet)
    out = tmp_path / "pieces"

    evening = await export(request("candles", out, "2020-01-02T18:00:00Z", "2020-01-03"), client, say=quiet)
    morning = await export(request("candles", out, "2020-01-02T00:00:00Z", "2020-01-02T06:00:00Z"), client,
                           say=quiet)
    inside = await export(request("candles", out, "2020-01-02T03:00:00Z", "2020-01-02T04:00:00Z"), client,
                          say=quiet)

    assert evening.days[0].rows == 360
    assert morning.days[0].rows == 1440  # widened to cover both: [00:00, 24:00)
    assert inside.count("skipped") == 1
    assert files(out) == files(direct)


async def test_progress_line_counts_days(client: InfluxClient, real_data: Path, tmp_path: Path) -> None:
    await store_candles(client, daily_candles(real_data))
    stream = io.StringIO()
    progress = Progress(0, "export", stream=stream, enabled=True, interval_s=0.0, unit="days")

    await export(request("candles", tmp_path, "2020-01-01", "2020-01-04"), client, progress=progress, say=quiet)

    lines = stream.getvalue().split("\r")
    assert "export candles BTC/USDT 2020-01-01 1,440 rows 0/3 days" in lines[1]
    assert lines[-1].startswith("export candles BTC/USDT 2020-01-03 1,440 rows 3/3 days 100.0%")


async def test_days_with_nothing_stored_leave_no_file(client: InfluxClient, real_data: Path, tmp_path: Path) -> None:
    await store_candles(client, daily_candles(real_data))
    stats = await export(request("candles", tmp_path, "2019-12-30", "2020-01-02"), client, say=quiet)
    assert [(d.date, d.status) for d in stats.days] == [
        ("2019-12-30", "empty"), ("2019-12-31", "empty"), ("2020-01-01", "written")]
    assert [p.parent.name for p in tmp_path.rglob("part.parquet")] == ["date=2020-01-01"]
    assert not list(tmp_path.rglob(".*.tmp"))


async def test_kill_mid_export_leaves_no_partial_file_and_resume_completes_identically(
        client: InfluxClient, influx_settings: InfluxSettings, real_data: Path, tmp_path: Path) -> None:
    # Arrange: the trades stored, and an uninterrupted export to compare with
    await store_trades(client, captured_trades(real_data))
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    await export(request("trades", clean, TRADES_START, TRADES_END, page_rows=20), client, say=quiet)
    env = {**os.environ, "MDP_CONFIG": str(ROOT / "config" / "simulator.toml"), "MDP_INFLUX_URL": influx_settings.url,
           "MDP_INFLUX_DATABASE": influx_settings.database}
    argv = [sys.executable, "-m", "common.cli", "export", "--exchange", "binance", "--symbol", "BTC/USDT",
            "--kind", "trades", "--start", TRADES_START, "--end", TRADES_END, "--out", str(killed),
            "--page-rows", "20", "--json"]
    second_day = killed / "trades" / "exchange=binance" / "symbol=BTC%2FUSDT" / "date=2024-08-09"

    # Act 1: SIGKILL while the second day's file is being written (20 trades per request: ~500 requests)
    proc = await asyncio.create_subprocess_exec(*argv, cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not list(second_day.glob(f".part.parquet.{proc.pid}.tmp")):
            assert proc.returncode is None, f"the export ended before it could be killed: {await proc.communicate()}"
            assert time.monotonic() < deadline, "the export never started writing the second day"
            await asyncio.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        assert await asyncio.wait_for(proc.wait(), 30) == -signal.SIGKILL
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

    # Assert 1: the first day is whole and final, the second has no file under its final name; a reader of
    # the folder sees exactly the first day (the dead run's temporary file is hidden from dataset readers)
    assert not (second_day / "part.parquet").exists()
    first_day = "trades/exchange=binance/symbol=BTC%2FUSDT/date=2024-08-08/part.parquet"
    assert (killed / first_day).read_bytes() == (clean / first_day).read_bytes()
    assert [p.name for p in second_day.iterdir()] == [f".part.parquet.{proc.pid}.tmp"]
    assert len(pd.read_parquet(killed / "trades")) == pq.read_metadata(clean / first_day).num_rows
    assert duckdb.sql(f"SELECT count(*) FROM read_parquet('{killed}/trades/**/*.parquet')").fetchall() == [
        (pq.read_metadata(clean / first_day).num_rows,)]

    # Act 2: the same command again
    again = await asyncio.create_subprocess_exec(*argv, cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE,
                                                 stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(again.communicate(), 300)

    # Assert 2: it skipped the complete day, wrote the other, removed the leftover; identical to the clean run
    assert again.returncode == 0, err.decode()
    summary = json.loads(out.decode().strip().splitlines()[-1])
    assert [(d["date"], d["status"]) for d in summary["days"]] == [("2024-08-08", "skipped"),
                                                                   ("2024-08-09", "written")]
    assert "left by an export that was killed" in err.decode()
    assert files(killed) == files(clean)


# -- layout and types -----------------------------------------------------------------------------------

async def test_symbols_are_path_safe_and_decoded_by_readers(client: InfluxClient, real_data: Path,
                                                            tmp_path: Path) -> None:
    perp = "BTC/USDT:USDT"
    await store_candles(client, daily_candles(real_data, symbol=perp)[:1440])
    await export(request("candles", tmp_path, "2020-01-01", "2020-01-02", symbol=perp), client, say=quiet)
    folder = tmp_path / "candles" / "exchange=binance" / "symbol=BTC%2FUSDT%3AUSDT" / "timeframe=1m"
    assert (folder / "date=2020-01-01" / "part.parquet").exists()
    assert set(pd.read_parquet(tmp_path / "candles")["symbol"].astype(str)) == {perp}
    assert duckdb.sql(f"SELECT DISTINCT symbol FROM read_parquet('{tmp_path}/candles/**/*.parquet', "
                      f"hive_partitioning = true)").fetchall() == [(perp,)]
    assert segment("symbol", "../x y%") == "symbol=..%2Fx%20y%25"  # one folder level, whatever the value


def hyperliquid_hourly(real_data: Path) -> list[Candle]:
    """Hyperliquid kPEPE 1h candles (24) from the recorded candleSnapshot response (hyperliquid-python-sdk's
    cassette: a single-line quoted YAML scalar holding the JSON body)."""
    text = (real_data / "hyperliquid-rest" / "candles_snapshot.yaml").read_text()
    block = next(b for b in text.split("- request:")[1:] if '"type": "candleSnapshot"' in b)
    body = re.search(r"^\s+string: '(.*)'$", block, re.MULTILINE)
    assert body is not None
    return [Candle(exchange="hyperliquid", symbol="kPEPE/USDC:USDC", timeframe=c["i"], open_time=c["t"] * MS,
                   open=Decimal(c["o"]), high=Decimal(c["h"]), low=Decimal(c["l"]), close=Decimal(c["c"]),
                   volume=Decimal(c["v"]), closed=True, ts_event=c["T"] * MS, ts_recv=c["T"] * MS)
            for c in json.loads(body.group(1).replace("''", "'"))]


async def test_other_timeframes_export_from_their_tier(client: InfluxClient, real_data: Path, tmp_path: Path) -> None:
    hourly = hyperliquid_hourly(real_data)
    assert len(hourly) == 24 and {c.timeframe for c in hourly} == {"1h"}
    await store_candles(client, hourly)
    first, last = hourly[0].open_time, hourly[-1].open_time + 3_600_000_000_000

    stats = await export(request("candles", tmp_path, first, last, exchange="hyperliquid", symbol="kPEPE/USDC:USDC",
                                 timeframe="1h"), client, say=quiet)

    assert stats.rows == 24
    assert (tmp_path / "candles" / "exchange=hyperliquid" / "symbol=kPEPE%2FUSDC%3AUSDC" / "timeframe=1h").is_dir()
    frame = pd.read_parquet(tmp_path / "candles").sort_values("open_time")
    assert set(frame["timeframe"].astype(str)) == {"1h"} and set(frame["symbol"].astype(str)) == {"kPEPE/USDC:USDC"}
    assert [(t.value, o, h, lo, c, v) for t, o, h, lo, c, v in zip(
        frame["open_time"], frame["open"], frame["high"], frame["low"], frame["close"], frame["volume"],
        strict=True)] == [(c.open_time, c.open, c.high, c.low, c.close, c.volume) for c in hourly]
    assert await influx_candles(client, "kPEPE/USDC:USDC", "1h") == [
        (c.open_time, c.open, c.high, c.low, c.close, c.volume, None) for c in hourly]


async def test_a_value_beyond_18_decimals_is_refused_not_rounded(client: InfluxClient, tmp_path: Path) -> None:
    tiny = Trade(exchange="binance", symbol="BTC/USDT", trade_id="1", price=Decimal("61000.5"),
                 amount=Decimal("1E-20"), side="buy", ts_event=to_ns("2024-08-08T12:00:00Z"),
                 ts_recv=to_ns("2024-08-08T12:00:00Z"))
    await store_trades(client, [tiny])
    with pytest.raises(ExportError, match=r"amount = 1E-20 at 2024-08-08T12:00:00Z .* --format csv"):
        await export(request("trades", tmp_path, "2024-08-08", "2024-08-09"), client, say=quiet)
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # nothing left behind, not even a temporary
    stats = await export(request("trades", tmp_path, "2024-08-08", "2024-08-09", fmt="csv"), client, say=quiet)
    assert stats.rows == 1
    text = next(tmp_path.rglob("part.csv")).read_text()
    assert "0.00000000000000000001" in text


def test_requests_are_checked_before_anything_is_read(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="candles need a timeframe"):
        request("candles", tmp_path, "2024-01-01", "2024-01-02", timeframe=None).check()
    with pytest.raises(ExportError, match="applies to candles only"):
        request("trades", tmp_path, "2024-01-01", "2024-01-02", timeframe="1m").check()
    with pytest.raises(ExportError, match="is not after start"):
        request("trades", tmp_path, "2024-01-02", "2024-01-01").check()
    with pytest.raises(ExportError, match="not a ccxt timeframe"):
        request("candles", tmp_path, "2024-01-01", "2024-01-02", timeframe="7x").check()
    assert [d[0] for d in day_windows(to_ns("2024-02-28T12:00:00Z"), to_ns("2024-03-01T00:00:01Z"))] == [
        "2024-02-28", "2024-02-29", "2024-03-01"]


def test_cli_names_the_bad_argument(tmp_path: Path) -> None:
    env = {**os.environ, "MDP_CONFIG": str(ROOT / "config" / "simulator.toml")}
    argv = [sys.executable, "-m", "common.cli", "export", "--exchange", "binance", "--symbol", "BTC/USDT",
            "--kind", "trades", "--timeframe", "1m", "--start", "2024-08-08", "--out", str(tmp_path)]
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2
    assert "--timeframe 1m applies to candles only" in done.stderr
