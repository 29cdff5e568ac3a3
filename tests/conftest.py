"""Shared fixtures: real servers only.

- Redis: a private `redis-server` on a free port for the whole session (flushed before each test that asks).
- InfluxDB: a private `influxd` (Debian's 1.6.7) on a free port.
- PostgreSQL: the local server (MDP_TEST_POSTGRES_DSN, default postgresql://postgres@127.0.0.1:5432/postgres);
  a fresh database `mdp_test_<pid>` is created for the session and dropped after.
A server that cannot be started or reached fails the test run loudly; nothing is skipped.
"""

from __future__ import annotations

import os
import sys
import zipfile
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pandas as pd
import pytest
import redis.asyncio as aioredis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common.config import Settings, load_settings
from simulator.recording import real_data_dir
from tools.localstores import LocalServer, start_influxd, start_redis


def _real_data_or_none() -> Path | None:
    try:
        return real_data_dir(ROOT)
    except FileNotFoundError:
        return None


# The licensed recordings shipped with the project (data/real/NOTICE): present in every clone.
SHIPPED_DATA = ROOT / "data" / "real"
KLINE_ZIP_COLUMNS = ["timestamp", "open", "high", "low", "close", "volume", "close_time", "quote_volume", "count",
                     "taker_buy_volume", "taker_buy_quote_volume", "ignore"]


def shipped_btc_minutes(rows: int | None = None, dtype: type | None = None) -> pd.DataFrame:
    """Real Binance spot BTC/USDT 1m candles, 2020-01-01 00:00 .. 01-03 23:59 UTC (4,320 consecutive minutes),
    from the shipped data.binance.vision daily zips: columns timestamp (open time, ms), open, high, low, close,
    volume; with dtype=str the cells are the file's text ("7195.24000000")."""
    zips = sorted((SHIPPED_DATA / "binance-spot-1m-daily").glob("BTCUSDT-1m-*.zip"))
    if len(zips) != 3:
        pytest.fail(f"expected 3 BTCUSDT daily zips in {SHIPPED_DATA / 'binance-spot-1m-daily'}, found {zips}; "
                    f"data/real is shipped with the repository: restore it from git")
    frame = pd.concat([pd.read_csv(z, header=None, names=KLINE_ZIP_COLUMNS, dtype=dtype) for z in zips],
                      ignore_index=True)[["timestamp", "open", "high", "low", "close", "volume"]]
    return frame if rows is None else frame.iloc[:rows].reset_index(drop=True)


def _zip_lines(path: Path) -> list[str]:
    with zipfile.ZipFile(path) as z:
        return z.read(z.namelist()[0]).decode().splitlines()


USDM_HEADER = ("open_time,open,high,low,close,volume,close_time,quote_volume,count,taker_buy_volume,"
               "taker_buy_quote_volume,ignore")


def shipped_as(fmt: str, folder: Path) -> Path:
    """The real BTC/USDT minutes of 2020-01-01 (the shipped daily zip, cells as written there) laid out as
    `fmt` lays out a file: for the formats whose real example files are not shipped."""
    day = SHIPPED_DATA / "binance-spot-1m-daily" / "BTCUSDT-1m-2020-01-01.zip"
    rows = [line.split(",") for line in _zip_lines(day) if line.strip()]

    def utc(ms: str) -> str:
        return datetime.fromtimestamp(int(ms) / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")

    lines = {
        "binance-kline": [",".join(r) for r in rows],
        "binance-usdm-csv": [USDM_HEADER] + [",".join(r) for r in rows],
        "ccxt-ohlcv": ["timestamp,open,high,low,close,volume"] + [",".join(r[:6]) for r in rows],
        "python-binance": ["date,open,high,low,close,volume,ticker"]
                          + [",".join([utc(r[0]), *r[1:6], "BTCUSDT"]) for r in rows],
        "binanceus-csv": ["open_time,open,high,low,close,volume"]
                         + [",".join([utc(r[0]) + "+00:00", *r[1:6]]) for r in rows],
        "kraken-ohlcvt": [",".join([str(int(r[0]) // 1000), *r[1:6], r[8]]) for r in rows],
    }[fmt]
    path = folder / f"BTCUSDT-1m-2020-01-01.{fmt}.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


# The real recordings: $MDP_REAL_DATA, else ../shared/data/real (the full set), else the shipped data/real
# (licensed files only; data/real/NOTICE). None when none exists: the real_data fixture then fails loudly.
SHARED_DATA = _real_data_or_none()

# The tests choose their own servers and config files: a user's MDP_* store settings must not leak in.
for _var in [v for v in os.environ if v.startswith("MDP_") and v not in ("MDP_TEST_POSTGRES_DSN", "MDP_REAL_DATA")]:
    del os.environ[_var]


# Folders of the shared real-data set whose sources state no licence: never shipped (data/real/NOTICE).
UNSHIPPED_FOLDERS = ("binance-spot-1h", "binance-spot-1m-ccxt", "binance-usdm-1m", "binanceus-kraken-2023-03")
_not_run: list[str] = []


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "unshipped_data: needs real recordings that are not shipped (their sources "
                                       "state no licence): runs only with MDP_REAL_DATA or ../shared/data/real")


def _missing_unshipped() -> list[str]:
    return [f for f in UNSHIPPED_FOLDERS if SHARED_DATA is None or not (SHARED_DATA / f).is_dir()]


def pytest_report_header(config: pytest.Config) -> str:
    missing = _missing_unshipped()
    return (f"real data: {SHARED_DATA}" + (f" (without the unshipped {', '.join(missing)}: tests marked "
                                           f"unshipped_data do not run)" if missing else " (the full set)"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """From a clone without the unlicensed recordings, the tests that need them are deselected, and said so
    loudly at the end (pytest_terminal_summary): never reported as passed."""
    missing = _missing_unshipped()
    if not missing:
        return
    keep, drop = [], []
    for item in items:
        (drop if item.get_closest_marker("unshipped_data") else keep).append(item)
    if drop:
        _not_run.extend(item.nodeid for item in drop)
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _not_run:
        tr = terminalreporter
        tr.section("NOT RUN: tests that need the unshipped recordings", sep="=", yellow=True, bold=True)
        tr.line(f"{len(_not_run)} test(s) need {', '.join(_missing_unshipped())} (sources state no licence, so "
                f"not shipped in data/real) and did not run here. Run them with MDP_REAL_DATA=<folder holding "
                f"them> (the project's machines have ../shared/data/real):", yellow=True)
        for nodeid in _not_run:
            tr.line(f"  {nodeid}", yellow=True)


@pytest.fixture(scope="session")
def real_data() -> Path:
    try:
        return real_data_dir(ROOT)
    except FileNotFoundError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def influx_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    server = start_influxd(tmp_path_factory.mktemp("influxdb"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
async def postgres_dsn() -> AsyncIterator[str]:
    admin_dsn = os.environ.get("MDP_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
    name = f"mdp_test_{os.getpid()}"
    try:
        admin = await asyncpg.connect(admin_dsn, timeout=10)
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.fail(f"PostgreSQL is not reachable at {admin_dsn} ({exc}); start it (make stores) "
                    f"or set MDP_TEST_POSTGRES_DSN")
    await admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
    await admin.execute(f'CREATE DATABASE "{name}"')
    base = admin_dsn.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await admin.close()


@pytest.fixture(scope="session")
def settings(redis_server: LocalServer, influx_server: LocalServer, postgres_dsn: str) -> Settings:
    env = {
        "MDP_REDIS_URL": redis_server.url,
        "MDP_INFLUX_URL": influx_server.url,
        "MDP_POSTGRES_DSN": postgres_dsn,
    }
    return load_settings(ROOT / "config" / "simulator.toml", env=env)


@pytest.fixture
async def redis(redis_server: LocalServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_server.url)
    await client.flushdb()
    yield client
    await client.aclose()
