"""`mdp import`: Binance kline archives (the real data.binance.vision zips, and the simulator's) into InfluxDB and
the ledger; CHECKSUM verification; millisecond and microsecond timestamps."""

from __future__ import annotations

import csv
import hashlib
import io
import shutil
import uuid
import zipfile
from collections.abc import AsyncIterator
from datetime import date
from decimal import Decimal
from pathlib import Path
from typing import Any

import msgspec
import pytest

from common.config import Settings, load_settings
from common.domain.span import NS, Span, parse_when
from common.history.archive import ArchiveError, ArchiveFile, archive_base, files_for, read_rows
from common.history.backfill import ImportRequest, run_import
from common.history.ledger import Ledger, Series
from common.stores.influx import InfluxClient
from simulator import start_simulator
from tools.localstores import LocalServer

ROOT = Path(__file__).resolve().parent.parent
DAY = 86_400 * NS
SERIES = Series("binance", "BTC/USDT", "1m")


def settings_for(redis_server: LocalServer, influx_server: LocalServer, dsn: str, sim_url: str = "") -> Settings:
    env = {"MDP_REDIS_URL": redis_server.url, "MDP_INFLUX_URL": influx_server.url, "MDP_POSTGRES_DSN": dsn,
           "MDP_INFLUX_DATABASE": f"imp_{uuid.uuid4().hex[:8]}"}
    if sim_url:
        env["MDP_SIMULATOR_URL"] = sim_url
    settings = load_settings(ROOT / "config" / "simulator.toml", env=env)
    if hasattr(settings.influx, "retention"):  # keep 2020-2022 candles: older than the default 1m tier's retention
        forever = {tier: "inf" for tier in settings.influx.retention}
        settings = msgspec.structs.replace(settings, influx=msgspec.structs.replace(settings.influx, retention=forever))
    return settings


@pytest.fixture
async def ledger(postgres_dsn: str) -> AsyncIterator[Ledger]:
    led = await Ledger.connect(postgres_dsn)
    await led.pool.execute("DELETE FROM coverage")
    yield led
    await led.close()


async def stored(settings: Settings) -> list[dict[str, Any]]:
    async with InfluxClient(settings.influx) as influx:
        source, database = "ohlcv", None
        if hasattr(influx, "tier_for"):
            await influx.ensure_tiers()  # connects, and creates the tiers if no import did
            database, rp = influx.tier_for("1m")
            source = f'"{rp}".ohlcv' if rp else "ohlcv"
        else:
            await influx.create_database()
        return await influx.query(
            f"SELECT open, high, low, close, volume FROM {source} WHERE symbol = $sym AND timeframe = '1m' "
            "AND time >= $start AND time < $end",
            params={"sym": "BTC/USDT", "start": 0, "end": 4_000_000_000 * NS}, exact=True, database=database)


def zip_rows(path: Path) -> list[list[str]]:
    with zipfile.ZipFile(path) as zf:
        return list(csv.reader(io.StringIO(zf.read(zf.namelist()[0]).decode())))


def as_points(rows: list[list[str]]) -> list[dict[str, Any]]:
    return [{"time": int(r[0]) * 1_000_000, **{k: Decimal(v).normalize() for k, v in
                                               zip(("open", "high", "low", "close", "volume"), r[1:6], strict=True)}}
            for r in rows]


def exact(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: (Decimal(v).normalize() if k != "time" else v) for k, v in p.items()} for p in points]


def write_zip(path: Path, rows: list[list[str]]) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(path.name.replace(".zip", ".csv"), "\n".join(",".join(r) for r in rows) + "\n")
    path.with_name(path.name + ".CHECKSUM").write_text(
        f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path.name}\n")


def test_file_plan_uses_monthly_zips_for_whole_past_months() -> None:
    files = files_for("BTCUSDT", "1m", date(2022, 1, 30), date(2022, 3, 2), today=date(2026, 11, 23))
    assert [f.name for f in files] == ["BTCUSDT-1m-2022-01-30.zip", "BTCUSDT-1m-2022-01-31.zip",
                                       "BTCUSDT-1m-2022-02.zip", "BTCUSDT-1m-2022-03-01.zip",
                                       "BTCUSDT-1m-2022-03-02.zip"]
    assert files_for("BTCUSDT", "1m", date(2026, 11, 1), date(2026, 11, 30), today=date(2026, 11, 23))[-1].name \
        == "BTCUSDT-1m-2026-11-22.zip"  # no file for today or later; the current month by days
    assert ArchiveFile.from_name("BTCUSDT-1m-2022-02.zip").span.duration == 28 * DAY


async def test_real_daily_zips_import_exactly(real_data: Path, redis_server: LocalServer,
                                              influx_server: LocalServer, postgres_dsn: str,
                                              ledger: Ledger) -> None:
    # Arrange: the three real data.binance.vision zips with their real CHECKSUM files.
    settings = settings_for(redis_server, influx_server, postgres_dsn)
    files = sorted((real_data / "binance-spot-1m-daily").glob("*.zip"))

    # Act
    stats = await run_import(settings, ImportRequest(files=files, progress=False), say=lambda _: None)
    again = await run_import(settings, ImportRequest(files=files[:1], progress=False), say=lambda _: None)

    # Assert: every row stored with the zip's exact values; the ledger covers the three days from "archive".
    expected = [r for f in files for r in zip_rows(f)]
    assert stats.files == 3 and stats.candles == len(expected) == 4320 and stats.rejected == 0
    assert exact(await stored(settings)) == as_points(expected)
    cov = await ledger.coverage(SERIES)
    start = parse_when("2020-01-01", 0)
    assert cov.covered == {"archive": [Span(start, start + 3 * DAY)]}
    assert again.candles == 1440 and len(await stored(settings)) == 4320  # a rerun overwrites, adds nothing


async def test_microsecond_archive_reads_as_the_millisecond_one(real_data: Path, tmp_path: Path,
                                                               redis_server: LocalServer, influx_server: LocalServer,
                                                               postgres_dsn: str, ledger: Ledger) -> None:
    # Arrange: the real 2020-01-01 rows rewritten with microsecond timestamps, as Binance writes from 2025 on.
    rows = zip_rows(real_data / "binance-spot-1m-daily" / "BTCUSDT-1m-2020-01-01.zip")
    micro = [[str(int(r[0]) * 1000), *r[1:6], str(int(r[6]) * 1000 + 999), *r[7:]] for r in rows]
    path = tmp_path / "BTCUSDT-1m-2020-01-01.zip"
    write_zip(path, micro)
    settings = settings_for(redis_server, influx_server, postgres_dsn)

    # Act
    parsed = list(read_rows(path.read_bytes(), path.name, "1m"))
    stats = await run_import(settings, ImportRequest(files=[path], progress=False), say=lambda _: None)

    # Assert: read as microseconds, stored at the same open times and values as the millisecond original.
    assert {r.unit for r in parsed} == {"us"}
    assert stats.candles == 1440
    assert exact(await stored(settings)) == as_points(rows)


async def test_checksum_mismatch_is_refused_and_nothing_is_written(real_data: Path, tmp_path: Path,
                                                                  redis_server: LocalServer,
                                                                  influx_server: LocalServer, postgres_dsn: str,
                                                                  ledger: Ledger) -> None:
    # Arrange: a real zip whose CHECKSUM file holds another file's digest.
    src = real_data / "binance-spot-1m-daily"
    path = tmp_path / "BTCUSDT-1m-2020-01-01.zip"
    shutil.copy(src / path.name, path)
    other = (src / "BTCUSDT-1m-2020-01-02.zip.CHECKSUM").read_text().split()[0]
    path.with_name(path.name + ".CHECKSUM").write_text(f"{other}  {path.name}\n")
    settings = settings_for(redis_server, influx_server, postgres_dsn)

    # Act / Assert
    with pytest.raises(ArchiveError, match="does not match its CHECKSUM") as refused:
        await run_import(settings, ImportRequest(files=[path], progress=False), say=lambda _: None)
    assert path.name in str(refused.value) and "nothing of it was written" in str(refused.value)
    assert await stored(settings) == []
    assert await ledger.series() == []
    # And a zip without a CHECKSUM file is refused too.
    path.with_name(path.name + ".CHECKSUM").unlink()
    with pytest.raises(ArchiveError, match="no CHECKSUM file"):
        await run_import(settings, ImportRequest(files=[path], progress=False), say=lambda _: None)


@pytest.mark.unshipped_data  # the simulator's history derived from the unlicensed 1h series
async def test_download_from_the_simulator_monthly_daily_and_corrupt(redis_server: LocalServer,
                                                                    influx_server: LocalServer,
                                                                    postgres_dsn: str, ledger: Ledger) -> None:
    # Arrange: the simulator serves archives built from what its REST serves; base URL from the config.
    async with start_simulator(speed=0, max_trades=100, start="manual") as sim:
        settings = settings_for(redis_server, influx_server, postgres_dsn, sim.rest_url)
        assert archive_base(settings) == f"{sim.rest_url}/data.binance.vision"
        request = ImportRequest(symbol="BTC/USDT", start=date(2022, 1, 31), end=date(2022, 3, 1), progress=False)
        start, end = parse_when("2022-01-31", 0), parse_when("2022-03-02", 0)

        # Act 1: one daily zip, one monthly, one daily.
        lines: list[str] = []
        stats = await run_import(settings, request, say=lines.append)

        # Assert 1: exactly what the simulator's REST klines serve for those days; ledger covered by archive.
        served = sim.candles_between("BTCUSDT", start // 1_000_000, end // 1_000_000 - 1, 100_000)
        assert stats.files == 3 and stats.candles == len(served) == 30 * 1440
        points = exact(await stored(settings))
        assert points == as_points([c.rest_row() for c in served])  # type: ignore[arg-type]
        cov = await ledger.coverage(SERIES)
        assert cov.covered == {"archive": [Span(start, end)]}

        # Act 2: a corrupted download of a new day.
        sim.inject("corrupt_archive", count=1)
        with pytest.raises(ArchiveError, match="does not match its CHECKSUM"):
            await run_import(settings, ImportRequest(symbol="BTC/USDT", start=date(2022, 3, 2),
                                                     end=date(2022, 3, 2), progress=False), say=lines.append)
        # Assert 2: nothing of that day was written or recorded; a rerun imports it.
        assert len(await stored(settings)) == 30 * 1440
        assert (await ledger.coverage(SERIES)).covered == {"archive": [Span(start, end)]}
        rerun = await run_import(settings, ImportRequest(symbol="BTC/USDT", start=date(2022, 1, 31),
                                                         end=date(2022, 3, 2), progress=False), say=lines.append)
        assert rerun.files == 1 and rerun.candles == 1440  # only the missing day: the rest is in the ledger


@pytest.mark.unshipped_data  # the simulator's history derived from the unlicensed 1h series
async def test_simulator_serves_microsecond_archives_from_2025() -> None:
    async with start_simulator(speed=0, max_trades=100, start="manual", shift_to_now=True) as sim:
        blob = sim.archive_zip("BTCUSDT-1m-2025-01-02.zip")
        assert blob is not None
        rows = list(read_rows(blob, "BTCUSDT-1m-2025-01-02.zip", "1m"))
        assert len(rows) == 1440 and {r.unit for r in rows} == {"us"}
        assert rows[0].open_time_ns == parse_when("2025-01-02", 0)
        assert sim.archive_zip("BTCUSDT-1m-2099-01-01.zip") is None  # the future is not published
        assert sim.archive_zip("BTCUSDT-1m-2020-01-01.zip") == \
            (sim.data_dir / "binance-spot-1m-daily" / "BTCUSDT-1m-2020-01-01.zip").read_bytes()
