"""`make bench-pipeline`: the whole pipeline under supervisord on this machine, offered load stepped up until it
no longer keeps up (issue 13, item 4; docs/scaling.md).

    python -m tools.bench_pipeline                          # 20 symbols, 2k -> 30k trades/s, 20 s windows
    python -m tools.bench_pipeline --rates 5000,10000 --symbols 50 --window 30
    python -m tools.bench_pipeline --rates 2000,4000,6000 --partitions 2       # only the 2-partition ladder (default: 1, then 2)
    python -m tools.bench_pipeline --rates 2000 --partitions 2 --redis node,cluster   # one Redis node, then a cluster

Every program of supervisord.conf runs (the collector of Binance spot, validator, normalizer, aggregator,
influx_writer, postgres_writer, cache_publisher, gap_repair, metrics_exporter; the other venues' collectors idle)
on private stores: a redis-server with AOF (`appendfsync everysec`, as docs/operations.md runs it; with `--redis
cluster` a local 3-master Redis Cluster with the same AOF, `[bus] cluster = true`), a private influxd, a scratch
PostgreSQL database. The simulator (itself a supervisord program, with `--symbols`/`--rate`)
serves the real Binance spot capture under N symbols of the recorded exchangeInfo at a total trade rate, with the
capture's book tickers and depth diffs in their recorded proportion; the collector takes trades, book tickers
(`ticker`) and order books (`book`) of every symbol, and 1m candles come from the aggregator.

Each rung: the pipeline started fresh, a warm-up, then a window in which we measure
- **offered / achieved**: trades the simulator sent per second;
- **stored**: trades the InfluxDB writer wrote per second (its `trades` counter, from the heartbeats);
- **backlog**: entries not yet acknowledged over every pipeline consumer group (lag + pending), at the window's
  start and end; a rung is **sustained** when at least 95% of the offered rate is achieved and stored, the
  backlog grew by less than one second of trades and the p99 latency below is under 1 s (a stage short of CPU
  queues in its socket or its process, where the stream backlog does not show it);
- **latency ts_recv -> cache**: receipt time of the cache publisher's tick (pub/sub `ticks:{symbol}`, three of
  the symbols, so the listener stays a small load) minus the trade's `ts_recv` (stamped by the collector when
  its frame arrived), p50/p99/max;
- **latency ts_recv -> InfluxDB**: for every trade stored in the window, the time InfluxDB acknowledged its write
  minus its `ts_recv`, p50/p99, from the InfluxDB writer's cumulative buckets (heartbeat counters
  `stored_ms_le_*`, common/status.py; interpolated within a bucket: 5, 10, 20, 50, 100, 200, 300, 500, 750 ms,
  1, 1.5, 2, 3, 5, 10 s);
- **CPU per trade** of every program: its CPU time in the window (/proc/PID/stat) over the trades stored;
- **Redis commands per trade**: calls and microseconds of execution of each command in the window (INFO
  commandstats), over the trades stored.

The stepping stops after the first rung that is not sustained. The report (markdown and JSON) goes to
var/bench/pipeline-*.{md,json} and stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import ccxt
import redis.asyncio as aioredis

from common.redis_client import connect
from common.status import STORED_LATENCY_KEYS, collect, stored_latency_quantile
from simulator.market import PriceLevels, select_symbols
from simulator.recording import Recording, load_exchange_info, real_data_dir
from tools import PARTITIONED
from tools.bench_collector import TickLatency, proc_cpu_s, sent_trades
from tools.chaos.stores import (
    DurableCluster,
    DurableRedis,
    RestartableInflux,
    create_scratch_db,
    drop_scratch_db,
)
from tools.localstores import free_port

ROOT = Path(__file__).resolve().parents[1]
LATENCY_SYMBOLS = 3
# A rung whose ticks reach the cache later than this (p99) is queueing somewhere the stream backlog does not show
# (a collector or a stage short of CPU): not sustained.
LATENCY_BOUND_MS = 1000.0


@dataclass
class Rung:
    offered: int
    partitions: int = 1  # bus.partitions (P > 1: two instances of each partitioned stage, tools.PARTITIONED)
    redis: str = "node"  # "node": one redis-server; "cluster": three masters (their CPU and commands summed)
    achieved: float = 0.0  # trades/s the simulator sent in the window
    stored: float = 0.0  # trades/s the InfluxDB writer wrote in the window
    backlog_start: int = 0
    backlog_end: int = 0
    latency_ms: dict[str, float] = field(default_factory=dict)  # p50, p99, max, n
    # ts_recv -> acknowledged by InfluxDB, p50 and p99, from the writer's buckets (common.status) in the window
    stored_latency_ms: dict[str, float] = field(default_factory=dict)
    cpu_us: dict[str, float] = field(default_factory=dict)  # program -> CPU us per stored trade
    cpu_share: dict[str, float] = field(default_factory=dict)  # program -> share of one core in the window
    # Redis command -> (calls, usec of execution) per stored trade in the window (INFO commandstats)
    redis_commands: dict[str, tuple[float, float]] = field(default_factory=dict)
    sustained: bool = False
    note: str = ""


def symbols_for(n: int) -> tuple[list[str], list[str]]:
    """(exchange ids, unified symbols) of the first n symbols the simulator's market mode can serve."""
    data = real_data_dir(ROOT)
    info = load_exchange_info(data)
    shapes = select_symbols(info, PriceLevels(Recording.load(data)), n)
    by_name = {s["symbol"]: s for s in info["symbols"]}
    ids = [s.symbol for s in shapes]
    code = ccxt.binance().safe_currency_code  # ccxt's names: YOYO is YOYOW, BCHSV is BSV, ...
    return ids, [f"{code(by_name[i]['baseAsset'])}/{code(by_name[i]['quoteAsset'])}" for i in ids]




def config_text(sim_port: int, symbols: list[str], partitions: int = 1, cluster: bool = False) -> str:
    """config/simulator.toml with Binance spot on the simulator's port and `symbols` (the other venues off)."""
    text = (ROOT / "config" / "simulator.toml").read_text().replace("127.0.0.1:8765", f"127.0.0.1:{sim_port}")
    head, _, _ = text.partition("[[exchanges]]")
    quoted = ", ".join(f'"{s}"' for s in symbols)
    return (head + f"""[[exchanges]]
id = "binance"
symbols = [{quoted}]
channels = ["trades", "ticker", "book"]
market_types = ["spot"]
rest_url = "http://127.0.0.1:{sim_port}"
ws_url = "ws://127.0.0.1:{sim_port}"
url_rewrite = "host-prefix"

[bus]
heartbeat_interval_s = 1.0
partitions = {partitions}
cluster = {"true" if cluster else "false"}

# The replay keeps the recording's 2024 exchange times (at --rate the recorded minutes pass faster than real
# ones, so times shifted to now would run ahead of the clock and fail time.future): time.stale is off here.
[quality]
stale_after_s = 0
""")


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="mdp-bench-pipeline-"))
        self.redis_store: DurableRedis | DurableCluster = DurableRedis(self.tmp / "redis")
        self.influx = RestartableInflux(self.tmp / "influxdb")
        self.admin_dsn = os.environ.get("MDP_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
        self.db_name = f"mdp_bench_pipeline_{os.getpid()}"
        self.ids, self.symbols = symbols_for(args.symbols)
        self.env: dict[str, str] = {}

    def ctl(self, *args: str) -> str:
        conf = self.tmp / "run" / "supervisord.conf"
        out = subprocess.run([str(ROOT / ".venv/bin/supervisorctl"), "-c", str(conf), *args], check=False,
                             env=self.env, capture_output=True, text=True, timeout=60)
        return out.stdout

    @property
    def cluster(self) -> bool:
        return isinstance(self.redis_store, DurableCluster)

    def client(self, node: bool = False) -> aioredis.Redis:
        """A client of the bus's Redis (`node`: of the node the URL names, for pub/sub)."""
        return connect(self.redis_store.url, self.cluster and not node)

    def redis_pids(self) -> dict[str, int]:
        """redis-server's pid, or each master's (redis-server:k, summed as one program in the report)."""
        store = self.redis_store
        if isinstance(store, DurableCluster):
            assert store.cluster is not None
            return {f"redis-server:{k}": n.process.pid if n.process else 0 for k, n in enumerate(store.cluster.nodes)}
        return {"redis-server": store.process.pid if store.process else 0}

    async def commandstats(self) -> dict[str, Any]:
        """INFO commandstats, summed over the cluster's masters."""
        store = self.redis_store
        if not isinstance(store, DurableCluster):
            async with aioredis.Redis.from_url(store.url) as r:
                return dict(await r.info("commandstats"))
        assert store.cluster is not None
        out: dict[str, Any] = {}
        for node in store.cluster.nodes:
            async with aioredis.Redis(port=node.port) as r:
                for key, stats in (await r.info("commandstats")).items():
                    if isinstance(stats, dict) and "calls" in stats:
                        was = out.setdefault(key, {"calls": 0, "usec": 0})
                        was["calls"] += int(stats["calls"])
                        was["usec"] += int(stats["usec"])
        return out

    def pids(self) -> dict[str, int]:
        """Running programs -> pid (`supervisorctl status`), and the stores' servers (redis-server, influxd)."""
        out = {**self.redis_pids(), "influxd": self.influx.pid}
        for line in self.ctl("status").splitlines():
            parts = line.split()
            if len(parts) >= 4 and parts[1] == "RUNNING" and parts[2] == "pid":
                out[parts[0]] = int(parts[3].rstrip(","))
        return out

    async def start_pipeline(self, rate: int, partitions: int) -> int:
        sim_port = free_port()
        config = self.tmp / f"pipeline-{rate}-p{partitions}.toml"
        config.write_text(config_text(sim_port, self.symbols, partitions, self.cluster))
        dsn = await create_scratch_db(self.admin_dsn, self.db_name)
        redis = self.client()
        await redis.flushall()
        await redis.aclose()
        sim_args = (f"--port {sim_port} --loop --market-symbols {','.join(self.ids)} "
                    f"--rate {rate}")
        self.env = dict(os.environ, MDP_RUN_DIR=str(self.tmp / "run"), MDP_REDIS_URL=self.redis_store.url,
                        MDP_INFLUX_URL=self.influx.url, MDP_INFLUX_DATABASE=f"bench_{rate}",
                        MDP_POSTGRES_DSN=dsn, MDP_SIMULATOR="true", MDP_SIM_ARGS=sim_args,
                        MDP_START_TIMEOUT="150", MDP_CONFIG=str(config), MDP_LOG_LEVEL="WARNING",
                        MDP_NUMPROCS=",".join(f"{p}=2" for p in PARTITIONED) if partitions > 1 else "")
        started = await asyncio.to_thread(
            subprocess.run, ["bash", str(ROOT / "tools/supervise.sh"), "start", str(config)], env=self.env,
            capture_output=True, text=True, timeout=240)
        if started.returncode != 0:
            await self.stop_pipeline()
            raise RuntimeError(f"supervise.sh start failed:\n{started.stdout}\n{started.stderr}")
        return sim_port

    async def stop_pipeline(self) -> None:
        await asyncio.to_thread(subprocess.run, ["bash", str(ROOT / "tools/supervise.sh"), "stop"], env=self.env,
                                capture_output=True, timeout=150)

    async def counters(self, redis: aioredis.Redis) -> tuple[int, int]:
        """(trades the InfluxDB writer wrote, pipeline backlog: lag + pending over every group)."""
        written, backlog, _ = await self.readings(redis)
        return written, backlog

    async def readings(self, redis: aioredis.Redis) -> tuple[int, int, dict[str, int]]:
        """`counters`, and the InfluxDB writers' ts_recv -> stored buckets summed over their instances."""
        status = await collect(redis)
        writers = [s.counters for s in status.services if s.service == "influx_writer"]
        written = sum(c.get("trades", 0) for c in writers)
        backlog = sum((g.lag or 0) + g.pending for st in status.streams for g in st.groups)
        return written, backlog, {k: sum(c.get(k, 0) for c in writers) for k in STORED_LATENCY_KEYS}

    async def rung(self, rate: int, partitions: int = 1) -> Rung:
        out = Rung(rate)
        sim_port = await self.start_pipeline(rate, partitions)
        redis, node = self.client(), self.client(node=True)
        try:
            async with TickLatency(node, [f"ticks:{s}" for s in self.symbols[:LATENCY_SYMBOLS]]) as ticks:
                deadline = time.monotonic() + 120
                while (await self.counters(redis))[0] == 0:
                    failed = [line for line in self.ctl("status").splitlines()
                              if any(state in line for state in ("BACKOFF", "FATAL", "EXITED"))]
                    if failed:
                        raise RuntimeError(f"at {rate}/s a program stopped: {failed}; logs in {self.tmp}/run/logs")
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"no trade reached InfluxDB within 120 s at {rate}/s; logs in "
                                           f"{self.tmp}/run")
                    await asyncio.sleep(0.5)
                # Warm-up: at least --warmup seconds, then until the stages have worked off their start-up backlog
                # (the ticks of the last second had a median under 50 ms twice in a row), at most 60 s more.
                await asyncio.sleep(self.args.warmup)
                if not await ticks.settle(1.0, 60):
                    out.note = "the latency did not settle under 50 ms (median) within 60 s of warm-up; "
                pids = self.pids()
                cpu0 = {p: proc_cpu_s(pid) for p, pid in pids.items() if pid}
                sent0, (stored0, out.backlog_start, buckets0) = sent_trades(sim_port), await self.readings(redis)
                commands0 = await self.commandstats()
                seen0, t0 = len(ticks.values), time.monotonic()
                await asyncio.sleep(self.args.window)
                dt = time.monotonic() - t0
                now_running = set(self.pids().values())
                cpu1 = {p: proc_cpu_s(pid) for p, pid in pids.items() if pid and pid in now_running}
                sent1, (stored1, out.backlog_end, buckets1) = sent_trades(sim_port), await self.readings(redis)
                commands1 = await self.commandstats()
                window = ticks.values[seen0:]
        finally:
            await redis.aclose()
            await node.aclose()
            await self.stop_pipeline()
        out.achieved = (sent1 - sent0) / dt
        out.stored = (stored1 - stored0) / dt
        trades = max(stored1 - stored0, 1)
        for program, c0 in cpu0.items():
            if program in cpu1:  # a program's instances summed (validator:validator-0 and -1)
                name = program.split(":")[0]
                out.cpu_us[name] = round(out.cpu_us.get(name, 0.0) + (cpu1[program] - c0) / trades * 1e6, 1)
                out.cpu_share[name] = round(out.cpu_share.get(name, 0.0) + (cpu1[program] - c0) / dt, 3)
        out.redis_commands = command_costs(commands0, commands1, trades)
        for name, rank in (("p50", 0.5), ("p99", 0.99)):
            found = stored_latency_quantile(buckets0, buckets1, rank)
            if found is not None:
                out.stored_latency_ms[name] = round(found, 1)
        if window:
            q = statistics.quantiles(window, n=100)
            out.latency_ms = {"p50": round(q[49], 1), "p99": round(q[98], 1), "max": round(max(window), 1),
                              "n": len(window)}
        grew = out.backlog_end - out.backlog_start
        out.sustained = (out.achieved >= 0.95 * rate and out.stored >= 0.95 * out.achieved
                         and grew < max(out.achieved, 1.0) and out.latency_ms.get("p99", LATENCY_BOUND_MS) < LATENCY_BOUND_MS)
        if not out.sustained:
            out.note += (f"achieved {out.achieved:,.0f}/s of {rate:,}/s, stored {out.stored:,.0f}/s, backlog "
                         f"{out.backlog_start:,} -> {out.backlog_end:,}, p99 ts_recv->cache "
                         f"{out.latency_ms.get('p99', '-')} ms")
        return out

    async def run(self) -> list[Rung]:
        await asyncio.to_thread(self.influx.start)
        rungs: list[Rung] = []
        try:
            for kind in self.args.redis:
                self.redis_store = (DurableCluster(self.tmp / "cluster", victim_key="") if kind == "cluster"
                                    else DurableRedis(self.tmp / "redis"))
                await asyncio.to_thread(self.redis_store.start)
                try:
                    for partitions in self.args.partitions:
                        for rate in self.args.rates:
                            r = await self.rung(rate, partitions)
                            r.partitions, r.redis = partitions, kind
                            rungs.append(r)
                            print(f"{kind} P={partitions} {rate:>7,}/s offered: achieved {r.achieved:,.0f}/s, stored "
                                  f"{r.stored:,.0f}/s, backlog {r.backlog_start:,} -> {r.backlog_end:,}, ts_recv->cache "
                                  f"{r.latency_ms}, {'sustained' if r.sustained else 'NOT sustained'} {r.note}",
                                  flush=True)
                            if not r.sustained:
                                break
                finally:
                    self.redis_store.stop()
        finally:
            with contextlib.suppress(Exception):
                self.influx.stop()
            with contextlib.suppress(Exception):
                await drop_scratch_db(self.admin_dsn, self.db_name)
        return rungs


CONTAINERS = ("exec", "evalsha", "eval", "fcall")  # their usec includes the commands they run (counted as well)


def command_costs(before: dict[str, Any], after: dict[str, Any], trades: int) -> dict[str, tuple[float, float]]:
    """Per Redis command, its calls and microseconds of execution per stored trade between two INFO
    commandstats (execution only: reading, parsing and replying are not in Redis's usec)."""
    out: dict[str, tuple[float, float]] = {}
    for key, stats in after.items():
        if not isinstance(stats, dict) or "calls" not in stats:
            continue
        was = before.get(key) or {}
        calls = int(stats["calls"]) - int(was.get("calls", 0))
        usec = int(stats["usec"]) - int(was.get("usec", 0))
        if calls > 0:
            out[key.removeprefix("cmdstat_")] = (round(calls / trades, 3), round(usec / trades, 2))
    return out


def markdown(args: argparse.Namespace, rungs: list[Rung], head: str) -> str:
    lines = [f"# make bench-pipeline ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {head})", "",
             (f"{args.symbols} Binance spot symbols (trades, book tickers, order books; 1m candles aggregated), "
             f"every program under supervisord, Redis with AOF, InfluxDB and PostgreSQL on this machine "
             f"({os.cpu_count()} cores); {args.warmup:.0f} s warm-up, {args.window:.0f} s window per rung."), "",
             "P: `bus.partitions`; with P > 1 two instances of each of " + ", ".join(PARTITIONED) + ". Redis: "
             "one node, or a local 3-master cluster (its three servers' CPU and commands summed).", "",
             ("| Redis | P | offered/s | achieved/s | stored/s | backlog start -> end | ts_recv->cache p50 / p99 / max ms "
             "| ts_recv->InfluxDB p50 / p99 ms | sustained |"), "|---|---:|---:|---:|---:|---|---|---|---|"]
    for r in rungs:
        lat = r.latency_ms
        lat_text = f"{lat['p50']} / {lat['p99']} / {lat['max']}" if lat else "-"
        st = r.stored_latency_ms
        stored_text = f"{st['p50']} / {st['p99']}" if st else "-"
        lines.append(f"| {r.redis} | {r.partitions} | {r.offered:,} | {r.achieved:,.0f} | {r.stored:,.0f} | {r.backlog_start:,} -> "
                     f"{r.backlog_end:,} | {lat_text} | {stored_text} | {'yes' if r.sustained else 'no'} |")
    programs = sorted({p for r in rungs for p in r.cpu_us})
    lines += ["", "CPU per stored trade (us) and share of one core, per program (its instances summed):", "",
              "| Redis | P | offered/s | " + " | ".join(programs) + " |", "|---|---:|---:|" + "---:|" * len(programs)]
    for r in rungs:
        cells = [f"{r.cpu_us.get(p, 0):.1f} ({r.cpu_share.get(p, 0):.0%})" for p in programs]
        lines.append(f"| {r.redis} | {r.partitions} | {r.offered:,} | " + " | ".join(cells) + " |")
    top = sorted({c for r in rungs for c, (_, us) in r.redis_commands.items() if us >= 0.5},
                 key=lambda c: -max(r.redis_commands.get(c, (0, 0))[1] for r in rungs))
    if top:
        lines += ["", ("Redis commands per stored trade: calls / us of execution (INFO commandstats; commands "
                  "taking at least 0.5 us a trade in some rung). EXEC and EVALSHA include the commands they run, "
                  "which are counted on their own lines too: the total leaves them out."), "",
                  "| Redis | P | offered/s | " + " | ".join(top) + " | total: calls / us |",
                  "|---|---:|---:|" + "---:|" * (len(top) + 1)]
        for r in rungs:
            cells = [f"{r.redis_commands[c][0]:.2f} / {r.redis_commands[c][1]:.1f}" if c in r.redis_commands else "-"
                     for c in top]
            own = [v for c, v in r.redis_commands.items() if c not in CONTAINERS]
            total = (sum(v[0] for v in own), sum(v[1] for v in own))
            lines.append(f"| {r.redis} | {r.partitions} | {r.offered:,} | " + " | ".join(cells)
                         + f" | {total[0]:.2f} / {total[1]:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rates", type=lambda s: [int(x) for x in s.split(",")],
                   default=[2000, 4000, 6000, 8000, 10000, 15000, 20000],
                   help="offered trades/s, total over the symbols")
    p.add_argument("--symbols", type=int, default=20)
    p.add_argument("--partitions", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2],
                   help="bus.partitions of each ladder, e.g. 1,2 (P > 1 runs two instances of each partitioned "
                        "stage: tools.PARTITIONED)")
    p.add_argument("--redis", type=lambda s: s.split(","), default=["node"],
                   help="the bus's Redis for the ladders, in turn: node (one redis-server), cluster (a local "
                        "3-master Redis Cluster; use --partitions 4 or more to spread over all three)")
    p.add_argument("--window", type=float, default=20.0)
    p.add_argument("--warmup", type=float, default=15.0)
    args = p.parse_args(argv)
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], check=False,
                          capture_output=True, text=True).stdout.strip() or "unknown"
    rungs = asyncio.run(Bench(args).run())
    report = markdown(args, rungs, head)
    out_dir = ROOT / "var" / "bench"
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    (out_dir / f"pipeline-{stamp}.md").write_text(report)
    (out_dir / f"pipeline-{stamp}.json").write_text(json.dumps([asdict(r) for r in rungs], indent=1))
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
