"""The whole pipeline under supervisord (the project's own supervisord.conf and tools/supervise.sh), against the
simulator replaying the real Binance spot capture, on real Redis, PostgreSQL and InfluxDB.

Asserts that every recorded trade and every closed candle lands exactly once in InfluxDB, also when the InfluxDB
writer is killed with SIGKILL mid-run; that the cached price is the recording's last trade; that the markets
catalog is in PostgreSQL; and that a malformed exchange body becomes an alert, stores nothing, and stops nothing.
Twice: on one Redis node, and on a local 3-master Redis Cluster (`[bus] cluster = true`, three partitions).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import aiohttp
import asyncpg
import pytest
import redis.asyncio as aioredis

from common import status as status_mod
from common.bus import streams
from common.config import BusSettings
from common.redis_client import connect
from schemas import Alert, Codec
from simulator import Recording
from tools.localstores import LocalServer, free_port, start_redis_cluster

ROOT = Path(__file__).resolve().parent.parent
MARKETS = (("binance", "BTC/USDT"), ("binanceusdm", "BTC/USDT:USDT"), ("coinbase", "SKL/USD"),
           ("hyperliquid", "BTC/USDC:USDC"))
SPEED = 20  # the 11-minute recording in about 35 s
pytestmark = pytest.mark.e2e


class Bus:
    """The Redis the pipeline runs on: one node, or a Redis Cluster (`[bus] cluster = true`, every stream of
    partition k tagged {p<k>}): its URL, a client of it, and where a stream is found on it."""

    def __init__(self, url: str, cluster: bool = False, partitions: int = 1) -> None:
        self.url, self.cluster, self.partitions = url, cluster, partitions

    def client(self) -> aioredis.Redis:
        return connect(self.url, self.cluster)

    def stream(self, name: str) -> str:
        """Where `name` is: itself on one node, tagged with its partition on a cluster."""
        return streams.located(name, BusSettings(partitions=self.partitions, cluster=self.cluster))

    async def every(self, redis: aioredis.Redis, name: str) -> list[str]:
        """`name` (mdp:alerts, mdp:gaps), or on a cluster its stream of every partition that exists."""
        if not self.cluster:
            return [name]
        return sorted({k.decode() async for k in redis.scan_iter(match=f"{name}:*", count=1000)})


class Pipeline:
    def __init__(self, env: dict[str, str], run_dir: Path, bus: Bus) -> None:
        self.env = env
        self.run_dir = run_dir
        self.bus = bus

    def ctl(self, *args: str) -> str:
        # A private run dir: tools/supervise.sh rendered supervisord.conf there (its socket, logs, simulator args)
        conf = str(self.run_dir / "supervisord.conf")
        out = subprocess.run([str(ROOT / ".venv/bin/supervisorctl"), "-c", conf, *args],
                             env=self.env, capture_output=True, text=True, timeout=30, check=False)
        return out.stdout

    def logs(self) -> str:
        parts = []
        for log in sorted((self.run_dir / "logs").glob("*.log")):
            parts.append(f"--- {log.name} (tail)\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:]))
        return "\n".join(parts)


@pytest.fixture(params=["one Redis node", "a Redis Cluster"])
def bus(request: pytest.FixtureRequest, redis_server: LocalServer, tmp_path: Path) -> Iterator[Bus]:
    """The pipeline's Redis: the session's one node, or three masters of a cluster (with AOF) over three
    partitions."""
    if request.param == "one Redis node":
        subprocess.run(["redis-cli", "-u", redis_server.url, "flushdb"], check=True, capture_output=True)
        yield Bus(redis_server.url)
        return
    cluster = start_redis_cluster(tmp_path / "cluster")
    try:
        yield Bus(cluster.url, cluster=True, partitions=3)
    finally:
        cluster.stop()


@pytest.fixture
def pipeline(bus: Bus, influx_server: LocalServer, postgres_dsn: str) -> Iterator[Pipeline]:
    run_dir = Path(tempfile.mkdtemp(prefix="mdp-e2e-"))
    sim_port = free_port()
    config = run_dir / "e2e.toml"
    config.write_text(
        (ROOT / "config" / "simulator.toml").read_text().replace("127.0.0.1:8765", f"127.0.0.1:{sim_port}")
        # binance's candles fall back to REST quickly (the malformed-klines fault below)
        .replace('url_rewrite = "host-prefix"', 'url_rewrite = "host-prefix"\nws_stall_s = 2.0\nrest_poll_s = 1.0', 1)
        + "\n[bus]\nheartbeat_interval_s = 0.5\nclaim_idle_ms = 5000\n"
        + (f"cluster = true\npartitions = {bus.partitions}\n" if bus.cluster else "")
    )
    env = dict(os.environ, MDP_RUN_DIR=str(run_dir), MDP_REDIS_URL=bus.url,
               MDP_INFLUX_URL=influx_server.url, MDP_POSTGRES_DSN=postgres_dsn, MDP_SIMULATOR="true",
               MDP_SIM_ARGS=f"--port {sim_port} --speed {SPEED} --wait-for btcusdt@trade --wait-for btcusdt@kline_1m "
                            "--venue binanceusdm --venue coinbase --venue hyperliquid",
               MDP_START_TIMEOUT="90")
    # The InfluxDB server is shared by the session's tests, and others store Binance trades too: start from an
    # empty database (the influx writer builds its tiers again at start), so "exactly once" counts ours only.
    drop = urllib.request.Request(f"{influx_server.url}/query?q=DROP+DATABASE+market_data", method="POST")
    with urllib.request.urlopen(drop, timeout=30) as resp:
        assert resp.status == 200
    started = subprocess.run(["bash", str(ROOT / "tools/supervise.sh"), "start", str(config)], env=env,
                             capture_output=True, text=True, timeout=150, check=False)
    pipe = Pipeline(env, run_dir, bus)
    assert started.returncode == 0, f"supervise.sh start failed:\n{started.stdout}\n{started.stderr}\n{pipe.logs()}"
    pipe.sim_url = f"http://127.0.0.1:{sim_port}"  # type: ignore[attr-defined]
    try:
        yield pipe
    finally:
        subprocess.run(["bash", str(ROOT / "tools/supervise.sh"), "stop"], env=env, capture_output=True, timeout=120,
                       check=False)


async def influx_query(url: str, q: str) -> list[list[object]]:
    async with aiohttp.ClientSession() as http, \
            http.get(f"{url}/query", params={"db": "market_data", "q": q, "epoch": "ms"}) as resp:
        body = await resp.json()
    series = body["results"][0].get("series") or []
    return series[0]["values"] if series else []


async def influx_count(url: str, measurement: str) -> int:
    try:
        rows = await influx_query(url, 'SELECT count("close") FROM "candles_1m"."ohlcv" WHERE "timeframe" = \'1m\' '
                                  'AND "exchange" = \'binance\'' if measurement == "ohlcv"
                                  else f'SELECT count("price") FROM "ticks"."{measurement}" WHERE "exchange" = \'binance\'')
    except (aiohttp.ClientError, KeyError):
        return 0
    return int(rows[0][1]) if rows else 0


async def wait_for(predicate, timeout: float, what: str, pipe: Pipeline, explain=None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate():
            return
        await asyncio.sleep(0.5)
    found = f"\n{await explain()}" if explain is not None else ""
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}{found}\n{pipe.ctl('status')}\n"
                         f"{pipe.logs()}")


async def missing_trades(influx: str, bus: Bus, expected_ids: list[str]) -> str:
    """What is missing and where it got to, for a failure message: stored count, missing id ranges, the
    pipeline's stream backlogs and the Gaps announced."""
    rows = await influx_query(influx, 'SELECT * FROM "ticks"."trades" WHERE "exchange" = \'binance\'')
    columns = await influx_columns(influx, 'SELECT * FROM "ticks"."trades" WHERE "exchange" = \'binance\' LIMIT 1')
    at = columns.index("trade_id") if "trade_id" in columns else 1
    got = {str(r[at]) for r in rows}
    seen: dict[str, list[object]] = {}
    doubled = []
    for r in rows:
        if str(r[at]) in seen:
            doubled.append((seen[str(r[at])], r))
        seen[str(r[at])] = r
    lost = sorted(int(i) for i in set(expected_ids) - got)
    ranges: list[str] = []
    for i in lost:
        if ranges and int(ranges[-1].split("..")[-1]) == i - 1:
            ranges[-1] = f"{ranges[-1].split('..')[0]}..{i}"
        else:
            ranges.append(str(i))
    redis = bus.client()
    try:
        st = await status_mod.collect(redis)
        behind = [f"{s.name}/{g.name} lag={g.lag} pending={g.pending}" for s in st.streams for g in s.groups
                  if (g.lag or 0) + g.pending]
        gaps = sum([await redis.xlen(name) for name in await bus.every(redis, streams.GAPS)])
    finally:
        await redis.aclose()
    return (f"InfluxDB holds {len(rows)} binance trades ({len(got)} distinct); {len(lost)} missing: "
            f"{', '.join(ranges[:20])}; stored twice ({len(doubled)}; columns {columns}): {doubled[:5]}; "
            f"streams behind: {behind or 'none'}; mdp:gaps entries: {gaps}")


async def influx_columns(url: str, q: str) -> list[str]:
    async with aiohttp.ClientSession() as http, \
            http.get(f"{url}/query", params={"db": "market_data", "q": q, "epoch": "ms"}) as resp:
        body = await resp.json()
    series = body["results"][0].get("series") or []
    return list(series[0]["columns"]) if series else []


async def test_every_trade_and_closed_candle_lands_exactly_once_even_after_kill_9(
        pipeline: Pipeline, influx_server: LocalServer, postgres_dsn: str) -> None:
    # Arrange: what the recording holds. The last candle is never followed by another, so it never closes.
    recording = Recording.load()
    expected_ids = [str(t.id) for t in recording.trades]
    expected_candles = recording.candles[:-1]
    influx = influx_server.url
    async with aiohttp.ClientSession() as http, \
            http.post(f"{pipeline.sim_url}/_sim/fault", json={"kind": "malformed_klines", "count": 1}) as r:  # type: ignore[attr-defined]
        assert r.status == 200

    # Act 1: kill -9 the InfluxDB writer while the replay is in full flow.
    await wait_for(lambda: _at_least(influx_count(influx, "trades"), 3000), 90, "3000 trades in InfluxDB", pipeline)
    pid = int(pipeline.ctl("pid", "influx_writer:influx_writer-0").strip())
    os.kill(pid, signal.SIGKILL)

    async def restarted() -> bool:
        line = pipeline.ctl("status", "influx_writer:influx_writer-0")
        return " RUNNING " in line and f"pid {pid}," not in line
    await wait_for(restarted, 30, "supervisord to restart the killed influx_writer", pipeline)

    # Act 2: let the replay finish and every stage drain.
    await wait_for(lambda: _equal(influx_count(influx, "trades"), len(expected_ids)), 150,
                   f"{len(expected_ids)} trades in InfluxDB", pipeline,
                   explain=lambda: missing_trades(influx, pipeline.bus, expected_ids))
    await wait_for(lambda: _equal(influx_count(influx, "ohlcv"), len(expected_candles)), 60,
                   f"{len(expected_candles)} closed candles in InfluxDB", pipeline)
    bus = pipeline.bus
    redis = bus.client()
    await wait_for(lambda: _alert_seen(redis, bus), 60, "the malformed body's alert", pipeline)
    await wait_for(lambda: _drained(redis), 60, "every consumer group drained", pipeline)
    await asyncio.sleep(2)  # anything late (a doubled write) would land now
    dead = {k.decode(): await redis.xlen(k) async for k in redis.scan_iter(match="dlq:*", count=1000)}
    assert not dead, f"entries were dead-lettered: {dead}; the stages' logs say why:\n{pipeline.logs()}"

    # Assert: trades exactly once, with their exact values.
    rows = await influx_query(influx, 'SELECT "trade_id", "price", "amount" FROM "ticks"."trades" WHERE "symbol" = \'BTC/USDT\'')
    got_ids = [str(r[1]) for r in rows]
    assert len(got_ids) == len(expected_ids)
    assert sorted(got_ids) == sorted(expected_ids)
    by_id = {str(r[1]): r for r in rows}
    for t in recording.trades[::997]:
        assert Decimal(str(by_id[str(t.id)][2])) == Decimal(t.price)
        assert Decimal(str(by_id[str(t.id)][3])) == Decimal(t.qty)

    # Closed candles exactly once, equal to the recording's.
    candles = await influx_query(influx, 'SELECT "open", "high", "low", "close", "volume" FROM "candles_1m"."ohlcv" '
                                         'WHERE "exchange" = \'binance\' AND "symbol" = \'BTC/USDT\' AND "timeframe" = \'1m\'')
    assert [c[0] for c in candles] == [c.open_time for c in expected_candles]
    for got, want in zip(candles, expected_candles, strict=True):
        assert [Decimal(str(v)) for v in got[1:5]] == [Decimal(want.open), Decimal(want.high), Decimal(want.low),
                                                       Decimal(want.close)], \
            f"1m candle {got[0]} differs from the recording's; candle alerts: {await _candle_alerts(redis, bus)}"
        assert abs(Decimal(str(got[5])) - Decimal(want.volume)) < Decimal("1e-8")

    # The cache holds the recording's last trade, with a TTL (under the same name on a cluster).
    raw = await redis.get("price:binance:BTC/USDT")
    assert raw is not None
    price = json.loads(raw)
    assert Decimal(price["price"]) == Decimal(recording.trades[-1].price)
    assert 0 < await redis.ttl("price:binance:BTC/USDT") <= 300

    # The markets catalog and the alert are in PostgreSQL.
    conn = await asyncpg.connect(postgres_dsn)
    try:
        market = await conn.fetchrow("SELECT exchange_symbol, base, quote FROM markets "
                                     "WHERE exchange = 'binance' AND symbol = 'BTC/USDT'")
        assert market is not None and tuple(market) == ("BTCUSDT", "BTC", "USDT")
        stored_alerts = await conn.fetchval("SELECT count(*) FROM quality_alerts WHERE rule = 'fields.missing'")
        assert stored_alerts >= 1
    finally:
        await conn.close()

    # The pipeline kept running: every program RUNNING, every stage alive in `mdp status`.
    status_text = pipeline.ctl("status")
    assert status_text.count(" RUNNING ") == len(status_text.strip().splitlines()), status_text
    st = await status_mod.collect(redis)
    alive = {s.service for s in st.services if s.alive}
    assert alive >= {"collector", "validator", "normalizer", "influx_writer", "postgres_writer", "cache_publisher",
                     "aggregator"}
    # The aggregator: every complete minute built from the trades agrees with the exchange's; the 5m bars
    # that ended inside the recording are in InfluxDB.
    agg = next(s.counters for s in st.services if s.service == "aggregator")
    assert agg["reconcile_mismatch"] == 0 and agg["reconciled_ok"] >= 8, agg
    fives = await influx_query(influx, 'SELECT "close" FROM "candles_1m"."ohlcv" WHERE "timeframe" = \'5m\' '
                                       'AND "exchange" = \'binance\'')
    assert [r[0] for r in fives][-2:] == [1723161300000, 1723161600000]  # 23:55 and 00:00 UTC
    assert st.max_lag == 0

    # The three other markets streamed through the same pipeline: every trade Hyperliquid's replay sent is
    # stored once, each market's trades are stored, order books went out on md:book (and into the cache),
    # and the perpetuals' funding and open interest are stored.
    async with aiohttp.ClientSession() as http, \
            http.get(f"{pipeline.sim_url}/_sim/status") as resp:  # type: ignore[attr-defined]
        venues = (await resp.json())["venues"]
    hl_trades = await influx_query(influx, 'SELECT "trade_id" FROM "ticks"."trades" WHERE "exchange" = \'hyperliquid\'')
    assert len(hl_trades) == venues["hyperliquid"]["trades_replayed"] > 0
    for exchange, symbol in MARKETS:
        if exchange != "binance":
            rows = await influx_query(influx, f'SELECT "trade_id" FROM "ticks"."trades" WHERE "exchange" = \'{exchange}\'')
            assert rows, f"no {exchange} trades stored"
        assert await redis.xlen(bus.stream(streams.market_data("book", exchange, symbol))) > 0, (exchange, symbol)
        assert {"trades", "book"} <= {c.channel for c in st.channels if c.instance == f"{exchange}-0" and c.messages}, \
            f"mdp status shows no {exchange} trades/book channel with messages: {st.channels}"
    for exchange in ("binanceusdm", "hyperliquid"):
        for measurement in ("funding", "open_interest"):
            rows = await influx_query(influx, f'SELECT * FROM "ticks"."{measurement}" WHERE "exchange" = \'{exchange}\'')
            assert rows, f"no {exchange} {measurement} stored"
    await redis.aclose()


async def _at_least(count, n: int) -> bool:
    return await count >= n


async def _equal(count, n: int) -> bool:
    return await count == n


async def _alerts(redis: aioredis.Redis, bus: Bus) -> list[tuple[bytes, dict[bytes, bytes]]]:
    out = []
    for name in await bus.every(redis, streams.ALERTS):
        out.extend(await redis.xrange(name))
    return out


async def _alert_seen(redis: aioredis.Redis, bus: Bus) -> bool:
    codec = Codec()
    for _, fields in await _alerts(redis, bus):
        for a in codec.decode_entry(fields):
            if isinstance(a, Alert) and a.rule == "fields.missing" and a.kind == "candle":
                assert a.reason and a.values
                return True
    return False


async def _candle_alerts(redis: aioredis.Redis, bus: Bus) -> list[str]:
    codec = Codec()
    out = []
    for _, fields in await _alerts(redis, bus):
        for a in codec.decode_entry(fields):
            if isinstance(a, Alert) and a.kind.startswith("candle") and a.exchange == "binance":
                out.append(f"{a.rule} {a.source}: {a.reason[:300]} {a.values}")
    return out


async def _drained(redis: aioredis.Redis) -> bool:
    st = await status_mod.collect(redis)
    return bool(st.streams) and st.max_lag == 0
