"""`mdp doctor` against real servers: a good deployment (a Redis with AOF, InfluxDB with its tiers, PostgreSQL
migrated, the simulator's four exchanges, a real supervisord with its programs up) is all OK; a broken one (Redis
without persistence, a missing migration, a missing InfluxDB tier, a stopped program, an exchange clock 8 s
ahead) names each fault and its fix, and exits 1. The command runs as users run it (`python -m common.cli`)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from common.config import load_settings
from common.stores.influx import InfluxClient
from common.stores.postgres import load_migrations, migrate
from simulator import Simulator, start_simulator
from tools.localstores import LocalServer, free_port, port_open

ROOT = Path(__file__).resolve().parent.parent
DEADLINE_S = 30.0


@pytest.fixture
def aof_redis(tmp_path: Path) -> Iterator[str]:
    """A private redis-server with AOF as the project's bus runs it (tools/start-stores.sh)."""
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "yes", "--appendfsync", "everysec", "--dir", str(tmp_path),
                             "--logfile", str(tmp_path / "redis.log")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + DEADLINE_S
        while not port_open(port):
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "redis.log").read_text()
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def supervised(tmp_path: Path) -> Iterator[Path]:
    """A real supervisord (the project's pinned one) with two long-running programs and one that is not
    started (autostart=false, as the simulator under `make run`). Yields its run dir."""
    run_dir = tmp_path / "run"
    (run_dir / "logs").mkdir(parents=True)
    program = f"{sys.executable} -c 'import time; time.sleep(600)'"
    conf = run_dir / "supervisord.conf"
    conf.write_text(f"""
[unix_http_server]
file={run_dir}/supervisor.sock
[supervisord]
logfile={run_dir}/logs/supervisord.log
pidfile={run_dir}/supervisord.pid
childlogdir={run_dir}/logs
nodaemon=true
[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface
[supervisorctl]
serverurl=unix://{run_dir}/supervisor.sock
[program:validator]
command={program}
startsecs=1
stdout_logfile={run_dir}/logs/validator.log
[program:influx_writer]
command={program}
startsecs=1
stdout_logfile={run_dir}/logs/influx_writer.log
[program:simulator]
command={program}
autostart=false
""")
    bin_dir = Path(sys.executable).parent
    proc = subprocess.Popen([str(bin_dir / "supervisord"), "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + DEADLINE_S
        while ctl(run_dir, "status").count(" RUNNING ") < 2:
            assert proc.poll() is None and time.monotonic() < deadline, ctl(run_dir, "status")
            time.sleep(0.2)
        yield run_dir
    finally:
        ctl(run_dir, "shutdown")
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def ctl(run_dir: Path, *args: str) -> str:
    out = subprocess.run([str(Path(sys.executable).parent / "supervisorctl"), "-c", str(run_dir / "supervisord.conf"),
                          *args], capture_output=True, text=True, timeout=30, check=False)
    return out.stdout


@pytest.fixture
async def doctor_db() -> AsyncIterator[str]:
    """A PostgreSQL database of this test's own (a migration row is deleted in it)."""
    admin_dsn = os.environ.get("MDP_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
    name = f"mdp_doctor_{os.getpid()}"
    admin = await asyncpg.connect(admin_dsn, timeout=10)
    await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{admin_dsn.rsplit('/', 1)[0]}/{name}"
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@pytest.fixture
async def simulator() -> AsyncIterator[Simulator]:
    async with start_simulator(speed=0, history=False, venues=("binanceusdm", "coinbase", "hyperliquid")) as sim:
        yield sim


def write_config(tmp_path: Path, sim: Simulator) -> Path:
    """config/simulator.toml with the exchanges at this simulator and an InfluxDB database of this test."""
    text = (ROOT / "config" / "simulator.toml").read_text()
    assert 'database = "market_data"' in text
    path = tmp_path / "doctor.toml"
    path.write_text(text.replace("127.0.0.1:8765", f"127.0.0.1:{sim.port}")
                    .replace('database = "market_data"', 'database = "mdp_doctor"', 1))
    return path


async def doctor(config: Path, run_dir: Path, env: dict[str, str]) -> tuple[int, dict[str, dict[str, Any]], str]:
    """Run `mdp doctor` twice, as a user does (text, then --json); exit code, checks by name, the text."""
    base = [sys.executable, "-m", "common.cli", "--config", str(config), "doctor", "--run-dir", str(run_dir)]
    full_env = {**os.environ, **env}

    def run(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*base, *extra], cwd=ROOT, env=full_env, capture_output=True, text=True,
                              timeout=120, check=False)

    text, js = await asyncio.gather(asyncio.to_thread(run), asyncio.to_thread(run, "--json"))
    assert text.returncode == js.returncode, (text.stdout, js.stdout)
    body = json.loads(js.stdout)
    assert body["ok"] == (js.returncode == 0)
    checks = {c["name"]: c for c in body["checks"]}
    assert len(checks) == len(body["checks"]), "check names are unique"
    # one line per check, in the same order, then the summary
    lines = text.stdout.splitlines()
    assert [ln.split()[1] for ln in lines[:-1]] == [c["name"] for c in body["checks"]], text.stdout
    return js.returncode, checks, text.stdout


async def prepare_stores(config: Path, env: dict[str, str]) -> list[str]:
    settings = load_settings(config, env=env)
    async with InfluxClient(settings.influx) as client:
        await client.connect()
        await client.ensure_tiers()
        tiers = [t.name for t in client.plan.tiers]
    await migrate(settings.postgres.dsn)
    return tiers


async def test_a_good_deployment_is_all_ok(tmp_path: Path, aof_redis: str, influx_server: LocalServer,
                                          doctor_db: str, simulator: Simulator, supervised: Path) -> None:
    # Arrange
    config = write_config(tmp_path, simulator)
    env = {"MDP_REDIS_URL": aof_redis, "MDP_INFLUX_URL": influx_server.url, "MDP_POSTGRES_DSN": doctor_db}
    tiers = await prepare_stores(config, env)
    # Act
    code, checks, text = await doctor(config, supervised, env)
    # Assert
    expected = {"redis", "redis.persistence", "influx", *(f"influx.tier.{t}" for t in tiers), "postgres",
                "postgres.migrations", "exchange.binance", "exchange.binanceusdm", "exchange.coinbase",
                "exchange.hyperliquid", "supervisord"}
    assert set(checks) == expected, text
    assert {n: c["status"] for n, c in checks.items() if c["status"] != "OK"} == {}, text
    assert code == 0
    assert "appendfsync everysec" in checks["redis.persistence"]["detail"]
    assert checks["redis"]["detail"].startswith("Redis 7.")
    assert checks["influx"]["detail"].startswith("InfluxDB 1.")
    assert f"all {len(load_migrations())} applied" in checks["postgres.migrations"]["detail"]
    assert "2 of 3 programs RUNNING" in checks["supervisord"]["detail"]  # the simulator: autostart=false
    assert "clock is" in checks["exchange.hyperliquid"]["detail"]  # no time endpoint there: the Date header
    assert text.splitlines()[-1].startswith("OK: ")


async def test_a_broken_deployment_names_each_fault_and_its_fix(
        tmp_path: Path, redis_server: LocalServer, influx_server: LocalServer, doctor_db: str,
        simulator: Simulator, supervised: Path) -> None:
    # Arrange: the conftest Redis runs as the machine's does (appendonly no, no snapshots)
    config = write_config(tmp_path, simulator)
    env = {"MDP_REDIS_URL": redis_server.url, "MDP_INFLUX_URL": influx_server.url, "MDP_POSTGRES_DSN": doctor_db}
    tiers = await prepare_stores(config, env)
    latest = load_migrations()[-1]
    conn = await asyncpg.connect(doctor_db)
    await conn.execute("DELETE FROM schema_migrations WHERE version = $1", latest.version)
    await conn.close()
    async with InfluxClient(load_settings(config, env=env).influx) as client:
        await client.connect()
        await client.execute(f'DROP RETENTION POLICY "{tiers[0]}" ON "mdp_doctor"')
    ctl(supervised, "stop", "influx_writer")
    async with aiohttp.ClientSession() as http, \
            http.post(f"{simulator.rest_url}/_sim/fault", json={"kind": "clock_skew", "ms": 8000}) as resp:
        assert resp.status == 200, await resp.text()
    # Act
    code, checks, text = await doctor(config, supervised, env)
    # Assert
    assert code == 1
    failed = {n for n, c in checks.items() if c["status"] == "FAIL"}
    assert failed == {"redis.persistence", "postgres.migrations", f"influx.tier.{tiers[0]}", "supervisord",
                      "exchange.binance"}, text
    assert "no persistence" in checks["redis.persistence"]["detail"]
    assert "appendonly yes" in checks["redis.persistence"]["fix"]
    assert f"{latest.version}_{latest.name}" in checks["postgres.migrations"]["detail"]
    assert "mdp migrate" in checks["postgres.migrations"]["fix"]
    assert "mdp init" in checks[f"influx.tier.{tiers[0]}"]["fix"]
    assert "influx_writer STOPPED" in checks["supervisord"]["detail"]
    assert "start influx_writer" in checks["supervisord"]["fix"]
    skew = checks["exchange.binance"]["detail"]
    offset = float(skew.split("its clock is ")[1].split(" s")[0])
    assert 7.0 < offset < 9.0, skew
    assert "NTP" in checks["exchange.binance"]["fix"]
    assert checks["redis"]["status"] == checks["postgres"]["status"] == checks["influx"]["status"] == "OK"
    assert text.splitlines()[-1].startswith("FAIL: ")
    assert "-> fix: " in next(ln for ln in text.splitlines() if ln.split()[1] == "supervisord")
