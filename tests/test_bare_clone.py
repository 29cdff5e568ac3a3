"""A clone with nothing beside it runs the demo: `git clone` of this checkout into an empty temporary folder (no
../shared, no var/), then `make demo` there, as the README says, on this test's private stores and ports: every
program RUNNING, trades flowing into Redis and InfluxDB from the recordings shipped in data/real, the simulator
saying in one log line that the unlicensed series are absent, plain `supervisorctl -c supervisord.conf status`
working from the clone with no variable set; then `make stop`.

The one shortcut: the clone's .venv is a thin venv over this checkout's installed packages (a .pth file), so
the test does not download the pinned packages again; `.ci/run` runs `make test` in a bare clone with a venv
built from PyPI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tools.localstores import LocalServer, free_port

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.e2e
FLOW_DEADLINE_S = 120.0


def thin_venv(clone: Path) -> None:
    """clone/.venv: a venv whose site-packages point at this checkout's (no download), with the console
    scripts make and supervise.sh call, and bin/mdp newer than pyproject.toml so make does not rebuild it."""
    venv = clone / ".venv"
    base = Path(getattr(sys, "_base_executable", sys.executable))
    subprocess.run([str(base), "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = Path(sysconfig.get_paths(vars={"base": str(venv), "platbase": str(venv)})["purelib"])
    (site / "mdp_parent_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    for name, module in (("supervisord", "supervisor.supervisord"), ("supervisorctl", "supervisor.supervisorctl"),
                         ("mdp", "common.cli")):
        script = venv / "bin" / name
        script.write_text(f'#!/bin/sh\nexec "{venv}/bin/python" -m {module} "$@"\n')
        script.chmod(0o755)
    os.utime(venv / "bin" / "mdp", (time.time() + 5, time.time() + 5))


@pytest.fixture
def clone() -> Iterator[Path]:
    parent = Path(tempfile.mkdtemp(prefix="mdp-bare-"))
    try:
        subprocess.run(["git", "clone", "-q", str(ROOT), str(parent / "mdp")], check=True, timeout=120)
        assert sorted(p.name for p in parent.iterdir()) == ["mdp"]  # nothing beside it
        thin_venv(parent / "mdp")
        yield parent / "mdp"
    finally:
        shutil.rmtree(parent, ignore_errors=True)


def test_make_demo_runs_from_a_bare_clone(clone: Path, redis_server: LocalServer,
                                                influx_server: LocalServer, postgres_dsn: str) -> None:
    # Arrange: this test's stores and a free simulator port (a config with the exchanges at that port)
    assert not (clone.parent / "shared").exists()
    sim_port = free_port()
    config = clone.parent / "demo.toml"
    config.write_text((clone / "config" / "simulator.toml").read_text().replace("127.0.0.1:8765",
                                                                                f"127.0.0.1:{sim_port}"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MDP_") and k != "PYTEST_CURRENT_TEST"}
    env.update(MDP_REDIS_URL=redis_server.url, MDP_INFLUX_URL=influx_server.url, MDP_POSTGRES_DSN=postgres_dsn,
               MDP_SIMULATOR="true", MDP_START_TIMEOUT="120",
               MDP_SIM_ARGS=f"--port {sim_port} --speed 1 --loop --shift-to-now --wait-for btcusdt@trade "
                            "--wait-for btcusdt@kline_1m --venue binanceusdm --venue coinbase --venue hyperliquid")
    subprocess.run(["redis-cli", "-u", redis_server.url, "flushdb"], check=True, capture_output=True)
    # Act
    demo = subprocess.run(["make", "demo", f"CONFIG={config}"], cwd=clone, env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    try:
        logs = clone / "var" / "run" / "logs"
        assert demo.returncode == 0, f"make demo failed:\n{demo.stdout}\n{demo.stderr}\n{tail(logs)}"
        # Assert: plain supervisorctl from the clone, no MDP_* variable, lists every program RUNNING
        plain = {k: v for k, v in env.items() if not k.startswith("MDP_")}
        status = subprocess.run([str(clone / ".venv/bin/supervisorctl"), "-c", "supervisord.conf", "status"],
                                cwd=clone, env=plain, capture_output=True, text=True, timeout=30, check=False)
        programs = [ln for ln in status.stdout.splitlines() if ln.strip()]
        configured = (clone / "supervisord.conf").read_text().count("\n[program:")
        assert len(programs) == configured >= 12, status.stdout + status.stderr
        assert all(" RUNNING " in ln for ln in programs), status.stdout + status.stderr
        # trades flow from the shipped recordings into Redis (md:trade) and InfluxDB
        bus = redis.Redis.from_url(redis_server.url)
        try:
            deadline = time.monotonic() + FLOW_DEADLINE_S
            while bus.xlen("md:trade:binance:BTC/USDT") == 0 or influx_trades(influx_server) == 0:
                assert time.monotonic() < deadline, f"no trades after {FLOW_DEADLINE_S:.0f} s\n{tail(logs)}"
                time.sleep(0.5)
        finally:
            bus.close()
        simulator_log = (logs / "simulator.log").read_text()
        assert str(clone / "data" / "real") in simulator_log, simulator_log[-2000:]
        assert "has no binance-spot-1h/ binance-spot-1m-ccxt/" in simulator_log, simulator_log[-2000:]
    finally:
        stop = subprocess.run(["make", "stop"], cwd=clone, env=env, capture_output=True, text=True, timeout=120,
                              check=False)
    assert stop.returncode == 0 and "pipeline stopped" in stop.stdout, stop.stdout + stop.stderr
    gone = subprocess.run([str(clone / ".venv/bin/supervisorctl"), "-c", "supervisord.conf", "pid"], cwd=clone,
                          capture_output=True, text=True, timeout=30, check=False)
    assert gone.returncode != 0, gone.stdout  # supervisord is gone


def influx_trades(influx: LocalServer) -> int:
    query = urllib.parse.urlencode({"db": "market_data", "q": 'SELECT count("price") FROM "ticks"."trades"'})
    with urllib.request.urlopen(f"{influx.url}/query?{query}", timeout=10) as resp:
        body = json.load(resp)
    series = body["results"][0].get("series") or []
    return int(series[0]["values"][0][1]) if series else 0


def tail(logs: Path) -> str:
    return "\n".join(f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-12:])
                     for p in sorted(logs.glob("*.log")))
