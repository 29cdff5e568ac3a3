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
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pandas as pd
import pytest
import redis.asyncio as aioredis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common.config import Settings, load_settings
from services.simulator.recording import real_data_dir
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


# The real recordings: $MDP_REAL_DATA, else ../shared/data/real (the full set), else the shipped data/real
# (licensed files only; data/real/NOTICE). None when none exists: the real_data fixture then fails loudly.
SHARED_DATA = _real_data_or_none()

# The tests choose their own servers and config files: a user's MDP_* store settings must not leak in.
for _var in [v for v in os.environ if v.startswith("MDP_") and v not in ("MDP_TEST_POSTGRES_DSN", "MDP_REAL_DATA")]:
    del os.environ[_var]


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
