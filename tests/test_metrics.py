"""Prometheus metrics, alert rules and the Grafana dashboard, checked against a real Prometheus (Debian's
`prometheus` 2.42 with `promtool`; `make deps` installs it) scraping the pipeline under supervisord (the
project's supervisord.conf through tools/supervise.sh, as tests/test_end_to_end.py runs it) on private Redis,
PostgreSQL and InfluxDB, with the simulator replaying the four markets at real speed, looping, as `make demo`.

- deploy/prometheus/rules.yml passes `promtool check rules` and its unit tests (rules_test.yml);
- every PromQL query of deploy/grafana/dashboards/mdp.json returns data from that Prometheus;
- faults fire their alerts in Prometheus's /api/v1/alerts: a halted market (the simulator's `halt` on
  Binance USD-M) fires MdpFeedSilent for that feed only, a stopped program fires MdpProgramDown, the private
  Redis (no persistence) fires MdpRedisWithoutPersistence; a disconnect's Gap is counted as opened and its
  repair's alert by rule.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry, generate_latest

from common import status as status_mod
from common.config import MetricsSettings, Settings
from services.metrics_exporter import service as exporter_mod
from services.metrics_exporter.families import pipeline_families
from tools.localstores import LocalServer, free_port

ROOT = Path(__file__).resolve().parent.parent
PROM_DIR = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "mdp.json"
SERVICES = {"collector", "validator", "normalizer", "aggregator", "influx_writer", "postgres_writer",
            "cache_publisher", "gap_repair", "metrics_exporter"}
EXCHANGES = {"binance", "binanceusdm", "coinbase", "hyperliquid"}
USDM_TRADES_STALL_S = 5.0  # the test's stall limit for Binance USD-M trades (default 60 s)
RATE_WINDOW = "10s"  # $__rate_interval at a 1 s scrape interval
pytestmark = pytest.mark.e2e


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed; install Debian's 'prometheus' package (make deps does it: "
                    f"apt-get install -y prometheus)")
    return path


def test_rules_pass_promtool_check_and_their_unit_tests() -> None:
    promtool = _binary("promtool")
    checked = subprocess.run([promtool, "check", "rules", str(PROM_DIR / "rules.yml")], check=False,
                             capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 11 rules found" in checked.stdout + checked.stderr
    config = subprocess.run([promtool, "check", "config", str(PROM_DIR / "prometheus.yml")], check=False,
                            capture_output=True, text=True, timeout=60)
    assert config.returncode == 0, config.stdout + config.stderr
    tested = subprocess.run([promtool, "test", "rules", str(PROM_DIR / "rules_test.yml")], check=False,
                            capture_output=True, text=True, timeout=60, cwd=PROM_DIR)
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr
    # Every alert of rules.yml has a unit test.
    alerts = set(re.findall(r"^\s+- alert: (\w+)", (PROM_DIR / "rules.yml").read_text(), re.MULTILINE))
    tested_names = set(re.findall(r"alertname: (\w+)", (PROM_DIR / "rules_test.yml").read_text()))
    assert alerts and alerts == tested_names, alerts ^ tested_names


def test_sharded_collectors_are_one_series_each_and_a_silent_channel_ages_from_the_process_start(
        settings: Settings) -> None:
    # Arrange: binance collected by two shards (numprocs=2); shard 1's trades channel has had no message yet.
    now_ms = int(time.time() * 1000)
    counters = {0: {"gaps": 1, "published_events": 10, "channel.trades.messages": 7, "channel.trades.gaps": 1,
                    "channel.trades.last_ms": now_ms - 2000, "channel.trades.oldest_ms": now_ms - 2000},
                1: {"gaps": 0, "published_events": 0, "channel.trades.messages": 0, "channel.trades.gaps": 0,
                    "channel.trades.last_ms": 0, "channel.trades.oldest_ms": 0}}
    services = [status_mod.ServiceStatus(service="collector", instance=f"binance-{n}", alive=True, state="running",
                                         heartbeat_age_s=0.5, uptime_s=30.0, rates={}, counters=c, detail="")
                for n, c in counters.items()]
    status = status_mod.Status(services=services, streams=[], channels=status_mod.channel_status(services,
                                                                                               time.time_ns()))
    registry = CollectorRegistry()

    class Snapshot:
        def collect(self) -> Iterator[Any]:
            return pipeline_families(status, settings)
    registry.register(Snapshot())  # type: ignore[arg-type]
    # Act
    text = generate_latest(registry).decode()
    # Assert
    assert 'mdp_channel_messages_total{channel="trades",exchange="binance",instance_id="binance-0"} 7.0' in text
    assert 'mdp_channel_messages_total{channel="trades",exchange="binance",instance_id="binance-1"} 0.0' in text
    assert re.search(r'mdp_channel_last_message_age_seconds\{channel="trades",exchange="binance",'
                     r'instance_id="binance-0"\} 2\.\d', text), text
    assert 'mdp_channel_last_message_age_seconds{channel="trades",exchange="binance",instance_id="binance-1"} 30.5' \
        in text  # never: as old as the process, so a feed that never started is silent too
    assert 'mdp_channel_stall_limit_seconds{channel="trades",exchange="binance"} 60.0' in text
    assert 'mdp_gaps_opened_total{instance_id="binance-0",service="collector"} 1.0' in text
    assert 'mdp_service_state{instance_id="binance-1",service="collector",state="running"} 1.0' in text


async def test_a_taken_port_leaves_the_exporter_up_degraded_then_it_listens(
        settings: Settings, redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    # Arrange: the port is taken (another pipeline's exporter on this machine).
    monkeypatch.setattr(exporter_mod, "BIND_RETRY_S", 0.2)
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    port = blocker.getsockname()[1]
    exporter = exporter_mod.MetricsExporter(msgspec.structs.replace(settings, metrics=MetricsSettings(port=port)))
    stop = asyncio.Event()
    task = asyncio.create_task(exporter.run(stop))
    try:
        # Act / Assert: up, degraded, saying which key to change; then listening once the port is free.
        await _until(lambda: exporter.state == "degraded", 10, "the exporter to say the port is taken")
        assert f"metrics.port = {port}" in exporter.detail and "[metrics] port" in exporter.detail, exporter.detail
        assert not task.done()
        blocker.close()
        await _until(lambda: exporter.state == "running", 10, "the exporter to listen once the port is free")
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/metrics") as resp:
            body = await resp.text()
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain")
        assert "mdp_redis_up 1.0" in body and "mdp_redis_persistence_enabled 0.0" in body
        assert 'mdp_alerts_total{rule="gap.unrepaired"} 0.0' in body  # counted from 0, so a first one is seen
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        blocker.close()
        await exporter.close()


async def test_a_bus_redis_that_does_not_answer_is_mdp_redis_up_0_and_the_exporter_answers(
        settings: Settings) -> None:
    # Arrange: the bus Redis address points at a port nobody listens on.
    closed, port = free_port(), free_port()
    down = msgspec.structs.replace(settings, redis=msgspec.structs.replace(
        settings.redis, url=f"redis://127.0.0.1:{closed}/0"), metrics=MetricsSettings(port=port))
    exporter = exporter_mod.MetricsExporter(down)
    stop = asyncio.Event()
    task = asyncio.create_task(exporter.run(stop))
    try:
        await _until(lambda: exporter.state == "running", 10, "the exporter to listen")
        # Act
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/metrics") as resp:
            body = await resp.text()
        # Assert: what MdpRedisUnreachable reads, and no pipeline series that would look healthy.
        assert resp.status == 200
        assert "mdp_redis_up 0.0" in body and "mdp_exporter_refresh_errors_total 1.0" in body
        assert "mdp_service_up" not in body and "mdp_redis_persistence_enabled" not in body
        assert not task.done()
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await exporter.close()


async def _until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(0.05)


# -- the pipeline scraped by a real Prometheus -------------------------------------------------------------

@dataclass
class Monitored:
    env: dict[str, str]
    run_dir: Path
    sim_url: str
    prom_url: str
    prom_log: Path

    def ctl(self, *args: str) -> str:
        out = subprocess.run(["bash", str(ROOT / "tools/supervise.sh"), "ctl", *args], env=self.env,
                             check=False, capture_output=True, text=True, timeout=30)
        return out.stdout + out.stderr

    def logs(self) -> str:
        parts = [f"--- prometheus (tail)\n{_tail(self.prom_log)}"]
        for log in sorted((self.run_dir / "logs").glob("*.log")):
            if log.name.startswith(("metrics_exporter", "collector-binanceusdm")):
                parts.append(f"--- {log.name} (tail)\n{_tail(log)}")
        return "\n".join(parts)


def _tail(path: Path, lines: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else "(no log)"


def _prometheus_config(metrics_port: int) -> str:
    """The shipped deploy/prometheus/prometheus.yml, scraping and evaluating every second, at the test's port."""
    text = (PROM_DIR / "prometheus.yml").read_text()
    for old, new in (("scrape_interval: 15s", "scrape_interval: 1s"),
                     ("evaluation_interval: 15s", "evaluation_interval: 1s"),
                     ('"127.0.0.1:9464"', f'"127.0.0.1:{metrics_port}"'),
                     ("  - rules.yml", f"  - {PROM_DIR / 'rules.yml'}")):
        assert text.count(old) == 1, f"deploy/prometheus/prometheus.yml no longer has {old!r}"
        text = text.replace(old, new)
    return text


@pytest.fixture(scope="module")
def monitored(redis_server: LocalServer, influx_server: LocalServer, postgres_dsn: str) -> Iterator[Monitored]:
    prometheus = _binary("prometheus")
    run_dir = Path(tempfile.mkdtemp(prefix="mdp-metrics-"))
    sim_port, metrics_port, prom_port = free_port(), free_port(), free_port()
    config = run_dir / "metrics.toml"
    toml = (ROOT / "config" / "simulator.toml").read_text().replace("127.0.0.1:8765", f"127.0.0.1:{sim_port}")
    usdm = 'id = "binanceusdm"\n'
    assert toml.count(usdm) == 1
    config.write_text(toml.replace(usdm, f"{usdm}stall_s = {{ trades = {USDM_TRADES_STALL_S}, open_interest = 60.0 }}\n")
                      + f"\n[bus]\nheartbeat_interval_s = 0.5\n\n[metrics]\nport = {metrics_port}\n")
    env = dict(os.environ, MDP_RUN_DIR=str(run_dir), MDP_REDIS_URL=redis_server.url,
               MDP_INFLUX_URL=influx_server.url, MDP_POSTGRES_DSN=postgres_dsn, MDP_SIMULATOR="true",
               MDP_SIM_ARGS=f"--port {sim_port} --speed 1 --loop --shift-to-now --wait-for btcusdt@trade "
                            "--wait-for btcusdt@kline_1m --venue binanceusdm --venue coinbase --venue hyperliquid",
               MDP_START_TIMEOUT="90")
    subprocess.run(["redis-cli", "-u", redis_server.url, "flushdb"], check=True, capture_output=True)
    prom_dir = run_dir / "prometheus"
    prom_dir.mkdir()
    (prom_dir / "prometheus.yml").write_text(_prometheus_config(metrics_port))
    checked = subprocess.run([_binary("promtool"), "check", "config", str(prom_dir / "prometheus.yml")],
                             check=False, capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    started = subprocess.run(["bash", str(ROOT / "tools/supervise.sh"), "start", str(config)], env=env,
                             check=False, capture_output=True, text=True, timeout=150)
    prom_log = prom_dir / "prometheus.log"
    mon = Monitored(env, run_dir, f"http://127.0.0.1:{sim_port}", f"http://127.0.0.1:{prom_port}", prom_log)
    prom: subprocess.Popen[bytes] | None = None
    try:
        assert started.returncode == 0, f"supervise.sh start failed:\n{started.stdout}\n{started.stderr}\n{mon.logs()}"
        with open(prom_log, "ab") as log:
            prom = subprocess.Popen([prometheus, f"--config.file={prom_dir / 'prometheus.yml'}",
                                     f"--storage.tsdb.path={prom_dir / 'data'}",
                                     f"--web.listen-address=127.0.0.1:{prom_port}",
                                     "--storage.tsdb.retention.time=1h"],
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        _wait_ready(mon, prom)
        yield mon
    finally:
        if prom is not None:
            prom.terminate()
            try:
                prom.wait(timeout=15)
            except subprocess.TimeoutExpired:
                prom.kill()
                prom.wait(timeout=5)
        subprocess.run(["bash", str(ROOT / "tools/supervise.sh"), "stop"], env=env, check=False,
                       capture_output=True, timeout=120)


def _wait_ready(mon: Monitored, prom: subprocess.Popen[bytes]) -> None:
    import urllib.error
    import urllib.request
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if prom.poll() is not None:
            raise AssertionError(f"prometheus exited with {prom.returncode}\n{mon.logs()}")
        try:
            with urllib.request.urlopen(f"{mon.prom_url}/-/ready", timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"prometheus not ready at {mon.prom_url} after 30 s\n{mon.logs()}")


async def _query(http: aiohttp.ClientSession, mon: Monitored, promql: str) -> list[dict[str, Any]]:
    async with http.get(f"{mon.prom_url}/api/v1/query", params={"query": promql}) as resp:
        body = await resp.json()
    assert body["status"] == "success", (promql, body)
    return list(body["data"]["result"])


def _finite(result: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in result if math.isfinite(float(r["value"][1]))]


async def _wait(what: str, mon: Monitored, check: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last})\n"
                         f"{mon.ctl('status')}\n{mon.logs()}")


def dashboard_queries() -> list[str]:
    """Every PromQL expression of the dashboard's panels, wherever they are nested."""
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("expr"), str):
                found.append(node["expr"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(json.loads(DASHBOARD.read_text())["panels"])
    return found


async def test_every_dashboard_query_returns_data_from_prometheus_scraping_the_pipeline(monitored: Monitored) -> None:
    mon = monitored
    queries = dashboard_queries()
    assert len(queries) >= 15
    async with aiohttp.ClientSession() as http:
        # The exporter is scraped and sees every stage and every market.
        async def every_service_up() -> set[str]:
            up = await _query(http, mon, 'mdp_service_up{job="mdp"} == 1')
            names = {r["metric"]["service"] for r in up}
            return names if names >= SERVICES else set()
        await _wait("every service up in Prometheus", mon, every_service_up, 60)
        target = await _query(http, mon, 'up{job="mdp"}')
        assert [r["value"][1] for r in target] == ["1"]
        template = json.loads(DASHBOARD.read_text())["templating"]["list"][0]["definition"]
        assert template == "label_values(mdp_channel_messages_total, exchange)"

        async def every_exchange() -> set[str]:  # a collector's channels exist once its markets have loaded
            found = {r["metric"]["exchange"] for r in await _query(http, mon, "mdp_channel_messages_total")}
            return found if found >= EXCHANGES else set()

        exchanges = await _wait("every exchange's channels in Prometheus", mon, every_exchange, 60)
        assert exchanges == EXCHANGES

        # Act / Assert: each query, as Grafana would send it, returns at least one finite value.
        for raw in queries:
            promql = raw.replace("$__rate_interval", RATE_WINDOW).replace("$exchange", ".*")
            assert "$" not in promql, f"a dashboard variable the test does not know: {raw}"

            async def answered(promql: str = promql) -> list[dict[str, Any]]:
                return _finite(await _query(http, mon, promql))
            await _wait(f"data for the dashboard query {raw!r}", mon, answered, 45)

        # What the panels show is the pipeline's: the four markets' message rates, the cache latency of Binance.
        # Both are rates over a recent window, so the test waits for them (a window can fall between two
        # samples, or on a pause of the feed) rather than sampling one moment.
        async def every_rate() -> set[str]:
            rates = _finite(await _query(http, mon, 'sum by (exchange) (rate(mdp_channel_messages_total[10s]))'))
            found = {r["metric"]["exchange"] for r in rates}
            return found if found >= EXCHANGES else set()

        assert await _wait("a message rate for every exchange", mon, every_rate, 45) == EXCHANGES

        async def binance_p50() -> list[dict[str, Any]]:
            return _finite(await _query(http, mon, 'histogram_quantile(0.5, sum by (le) '
                                                   '(rate(mdp_cache_latency_seconds_bucket{exchange="binance"}[30s])))'))

        p50 = await _wait("Binance's p50 cache latency", mon, binance_p50, 45)
        assert 0 < float(p50[0]["value"][1]) < 60, p50


async def _firing(http: aiohttp.ClientSession, mon: Monitored) -> list[dict[str, Any]]:
    async with http.get(f"{mon.prom_url}/api/v1/alerts") as resp:
        body = await resp.json()
    return [a for a in body["data"]["alerts"] if a["state"] == "firing"]


def _matching(alerts: list[dict[str, Any]], name: str, **labels: str) -> list[dict[str, Any]]:
    return [a for a in alerts if a["labels"]["alertname"] == name
            and all(a["labels"].get(k) == v for k, v in labels.items())]


async def test_alert_rules_fire_on_faults_the_simulator_injects(monitored: Monitored,
                                                               redis_server: LocalServer) -> None:
    mon = monitored
    feed = {"exchange": "binanceusdm", "channel": "trades"}
    async with aiohttp.ClientSession() as http:
        await _wait("the USD-M trades feed flowing", mon, lambda: _query(
            http, mon, 'rate(mdp_channel_messages_total{exchange="binanceusdm",channel="trades"}[10s]) > 0'), 60)
        before = await _firing(http, mon)
        assert not _matching(before, "MdpFeedSilent", **feed), before
        assert not _matching(before, "MdpProgramDown"), before
        opened_before = sum(float(r["value"][1]) for r in await _query(http, mon, 'mdp_gaps_opened_total{service="collector"}'))

        # Act: halt the USD-M market, stop a program, and cut Binance spot's sockets for a second.
        injected_at = time.time()
        for fault in ({"exchange": "binanceusdm", "kind": "halt", "seconds": 45},
                      {"exchange": "binance", "kind": "disconnect", "down_s": 1}):
            async with http.post(f"{mon.sim_url}/_sim/fault", json=fault) as resp:
                assert resp.status == 200, await resp.text()
        stopped = mon.ctl("stop", "aggregator:*")
        assert "stopped" in stopped, stopped

        # Assert: each alert fires, on the thing the fault hit.
        async def feed_silent() -> list[dict[str, Any]]:
            return _matching(await _firing(http, mon), "MdpFeedSilent", **feed)
        silent = await _wait("MdpFeedSilent for binanceusdm trades", mon, feed_silent, 40)
        assert silent[0]["labels"]["severity"] == "warning"
        assert float(silent[0]["value"]) > USDM_TRADES_STALL_S
        assert _parse_time(silent[0]["activeAt"]) >= injected_at - 1
        others = [a for a in _matching(await _firing(http, mon), "MdpFeedSilent") if a["labels"]["exchange"] == "binance"]
        assert not others, f"a 1 s disconnect is not a silence beyond Binance spot's limits: {others}"

        async def program_down() -> list[dict[str, Any]]:
            return _matching(await _firing(http, mon), "MdpProgramDown", group="aggregator")
        down = await _wait("MdpProgramDown for the stopped aggregator", mon, program_down, 60)
        assert down[0]["labels"]["name"] == "aggregator-0" and down[0]["labels"]["severity"] == "critical"

        no_persistence = _matching(await _firing(http, mon), "MdpRedisWithoutPersistence")
        client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
        try:
            persistence = await client.config_get("appendonly") | await client.config_get("save")
        finally:
            await client.aclose()
        assert persistence == {"appendonly": "no", "save": ""}, persistence  # the test's Redis persists nothing
        assert len(no_persistence) == 1, no_persistence

        # The disconnect's Gap is counted as opened, and gap_repair's verdict as an alert by rule.
        async def gap_counted() -> bool:
            opened = sum(float(r["value"][1]) for r in await _query(http, mon, 'mdp_gaps_opened_total{service="collector"}'))
            verdicts = await _query(http, mon, 'sum(mdp_alerts_total{rule=~"gap\\\\..*"}) > 0')
            return opened > opened_before and bool(verdicts)
        await _wait("the Gap opened and its verdict counted", mon, gap_counted, 45)
    mon.ctl("start", "aggregator:*")


def _parse_time(text: str) -> float:
    from datetime import datetime
    return datetime.fromisoformat(text).timestamp()
