"""The chaos harness: the whole pipeline under supervisord on private stores, the real Binance spot capture
(and the other venues) replayed by the simulator, faults at seeded moments, then checks against ground truth.

    python -m tools.chaos.run --seed 7                 # the short run (about 4 minutes), report in var/chaos/
    python -m tools.chaos.run --soak 1800 --seed 7     # 30 minutes, --loop, faults every few seconds
    CHAOS_SEEDS=1,2,3 make chaos                       # several seeds

Exit status 0 when every check passed, 1 otherwise; the report (JSON and markdown) says what failed, with the
trade ids, bars, gaps and programs concerned and the faults with their times. docs/chaos.md explains it all.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from common.redis_client import connect
from tools import STAGES
from tools.chaos import checks
from tools.chaos.faults import Fault, short_schedule, soak_schedule
from tools.chaos.stores import (
    DurableCluster,
    DurableRedis,
    PgProxy,
    RestartableInflux,
    create_scratch_db,
    drop_scratch_db,
)
from tools.chaos.truth import TrueTrade, Truth
from tools.localstores import free_port

ROOT = Path(__file__).resolve().parents[2]
TRADE_STREAM = "md:trade:binance:BTC/USDT"
RECENT_TRADES_KEY = "recent_trades:binance:BTC/USDT"  # the cache publisher's list (README, "The cache")
RECENT_TRADES = 1000  # [cache] recent_trades of the chaos config
ABANDONED = "chaos-abandoned"  # the README's `my-strategy`: created, read once, never again
SLOW = "chaos-slow"  # reads and acknowledges a few entries a second
OUR_GROUPS = (ABANDONED, SLOW)
RECORDING_S = 660  # the spot capture spans about 11 minutes of exchange time


def real_data_dir() -> Path:
    env = os.environ.get("MDP_REAL_DATA")
    for d in ([Path(env)] if env else []) + [ROOT.parent / "shared" / "data" / "real", ROOT / "data" / "real"]:
        if (d / "ws-captures").is_dir():
            return d.resolve()
    raise SystemExit("error: the real recordings are not found: set MDP_REAL_DATA or provide ../shared/data/real")


@dataclass
class Options:
    seed: int
    speed: float = 6.0  # the 11-minute capture in about 110 s
    soak_s: float = 0.0  # 0: the short run (one replay, each fault once); else loop and fault for this long
    high_water: int = 300  # bus.backpressure_high_water (entries): low, so a stuck group shows in minutes
    drain_s: float = 90.0  # how long to wait, at most, for the pipeline to drain after the replay
    out_dir: Path = ROOT / "var" / "chaos"
    keep: bool = False
    # fault kinds left out (the schedule is still drawn from the seed, so the other faults keep their times):
    # kill9, redis_kill9_restart, influx_freeze, influx_kill9_restart, postgres_unreachable, abandoned_groups,
    # slow_group. To tell one defect from another; a full run skips nothing.
    skip: tuple[str, ...] = ()
    # bus.partitions for the run; > 1 also runs two instances of every stage (tools.STAGES, supervisord
    # numprocs), each killed in its turn, instance 0 of each frozen: the partitions move between them.
    partitions: int = 1
    # The bus on a local 3-master Redis Cluster ([bus] cluster = true); redis_kill9_restart then kills the
    # master serving md:trade:binance:BTC/USDT's partition and starts it again.
    cluster: bool = False

    def partition(self, base: str = "BTC") -> int:
        """The partition of a base asset: crc32 modulo P (docs/scaling.md), worked out here rather than taken
        from common/ (the harness checks the pipeline, it does not reuse it)."""
        return zlib.crc32(base.encode()) % self.partitions if self.partitions > 1 else 0

    def stream(self, name: str) -> str:
        """Where BTC/USDT's stream `name` is: on a cluster with its partition's hash tag."""
        return f"{name}:{{p{self.partition()}}}" if self.cluster else name

    @property
    def instances(self) -> int:
        """Instances of each stage (tools.STAGES)."""
        return 2 if self.partitions > 1 else 1


@dataclass
class Sample:
    t: float  # seconds after the replay started
    influx_trades: int | None  # binance BTC/USDT trades in InfluxDB (None: it did not answer within 1 s)
    stream_len: int | None  # XLEN md:trade:binance:BTC/USDT
    backlog: int | None  # lag + pending over every pipeline consumer group (ours excluded)


@dataclass
class Run:
    opts: Options
    tmp: Path
    started: float = 0.0  # monotonic time the replay started
    faults: list[Fault] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    events: list[str] = field(default_factory=list)  # harness notes with times

    def now(self) -> float:
        return round(time.monotonic() - self.started, 2)

    def note(self, text: str) -> None:
        line = f"[{self.now():7.2f}s] {text}"
        self.events.append(line)
        print(line, flush=True)


class Pipeline:
    def __init__(self, env: dict[str, str], run_dir: Path) -> None:
        self.env = env
        self.run_dir = run_dir

    def ctl(self, *args: str, timeout: float = 30) -> str:
        # tools/supervise.sh renders supervisord.conf into a private run dir (its socket, logs, simulator args)
        rendered = self.run_dir / "supervisord.conf"
        conf = str(rendered if rendered.exists() else ROOT / "supervisord.conf")
        out = subprocess.run([str(ROOT / ".venv/bin/supervisorctl"), "-c", conf, *args],
                             check=False, env=self.env, capture_output=True, text=True, timeout=timeout)
        return out.stdout

    async def actl(self, *args: str) -> str:
        return await asyncio.to_thread(self.ctl, *args)

    def log_tail(self, program: str, lines: int = 12) -> str:
        name = program.split(":")[-1]
        path = self.run_dir / "logs" / f"{name}.log"
        if not path.exists():
            return f"(no log {path})"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def fatal_history(self) -> list[str]:
        """supervisord's own log lines where a program gave up (FATAL) or exited unexpectedly."""
        out = []
        for log in sorted((self.run_dir / "logs").glob("supervisord.log*")):
            for line in log.read_text(errors="replace").splitlines():
                if "FATAL" in line or "gave up" in line:
                    out.append(line)
        return out

    def own_exits(self) -> list[str]:
        """supervisord's lines for programs that exited by themselves (not the harness's SIGKILL): a crash, a
        LeaseLost after a freeze (expected), a stop nobody asked for. The report lists them, so a failure shows
        which program left on its own and when (then its log says why)."""
        out = []
        for log in sorted((self.run_dir / "logs").glob("supervisord.log*")):
            for line in log.read_text(errors="replace").splitlines():
                if "exited: " in line and "terminated by SIGKILL" not in line:
                    out.append(line)
        return out


def tree_state() -> str:
    """The commit the run judged, and the files changed in the work tree beside it (engineers share it)."""
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], check=False,
                          capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"], check=False,
                           capture_output=True, text=True).stdout.split("\n")
    changed = sorted(line[3:] for line in dirty if line.strip())
    return f"{head or 'unknown'}" + (f" + uncommitted changes to {', '.join(changed)}" if changed else "")


def chaos_config(sim_port: int, high_water: int, partitions: int = 1, cluster: bool = False) -> str:
    text = (ROOT / "config" / "simulator.toml").read_text().replace("127.0.0.1:8765", f"127.0.0.1:{sim_port}")
    bus = (f"heartbeat_interval_s = 0.5\nclaim_idle_ms = 5000\nbackpressure_high_water = {high_water}\n"
           f"partitions = {partitions}\n" + ("cluster = true\n" if cluster else ""))
    cache = f"recent_trades = {RECENT_TRADES}\n"
    for table, ours in (("bus", bus), ("cache", cache)):
        if f"\n[{table}]\n" in text:  # someone gave simulator.toml this table: ours go first in it
            text = text.replace(f"\n[{table}]\n", f"\n[{table}]\n" + ours, 1)
        else:
            text += f"\n[{table}]\n" + ours
    return text


async def pipeline_groups(redis: aioredis.Redis) -> dict[str, list[dict[str, Any]]]:
    """Every stream and its consumer groups (XINFO GROUPS), ours left out."""
    out: dict[str, list[dict[str, Any]]] = {}
    async for key in redis.scan_iter(match="*", _type="stream", count=1000):
        name = key.decode()
        groups = await redis.xinfo_groups(name)
        out[name] = [{k if isinstance(k, str) else k.decode(): v for k, v in g.items()} for g in groups
                     if _s(g.get("name")) not in OUR_GROUPS]
    return out


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


async def undelivered(redis: aioredis.Redis, stream: str, last_delivered: str, cap: int = 1000) -> int:
    """Entries after the group's last-delivered-id (at most `cap`). Not XINFO's `lag`: Redis 7.0 keeps a
    group's entries-read counter in memory, so after a restart from the AOF `lag` stays above 0 (or None)
    although the group has read everything (seen in the chaos runs)."""
    newest: list[tuple[bytes, Any]] = await redis.xrevrange(stream, "+", "-", count=1)  # type: ignore[assignment]
    if not newest or _id(newest[0][0]) <= _id(last_delivered):
        return 0
    after: list[Any] = await redis.xrange(stream, f"({last_delivered}", "+", count=cap)  # type: ignore[assignment]
    return len(after)


def _id(entry_id: bytes | str) -> tuple[int, int]:
    ms, _, seq = _s(entry_id).partition("-")
    return int(ms), int(seq or 0)


async def backlog(redis: aioredis.Redis) -> tuple[int, list[str]]:
    """lag + pending over the pipeline's groups, and the groups not drained (stream/group lag=N pending=M)."""
    total = 0
    behind = []
    for stream, groups in (await pipeline_groups(redis)).items():
        for g in groups:
            pending = int(g.get("pending") or 0)
            lag = await undelivered(redis, stream, _s(g.get("last-delivered-id") or "0-0"))
            n = pending + lag
            total += n
            if n:
                behind.append(f"{stream}/{_s(g.get('name'))} undelivered={lag} pending={pending} "
                              f"(XINFO lag {g.get('lag')})")
    return total, behind




class Harness:
    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.run = Run(opts, Path(tempfile.mkdtemp(prefix=f"mdp-chaos-{opts.seed}-")))
        self.truth = Truth.load(real_data_dir())
        self.trade_stream = opts.stream(TRADE_STREAM)
        self.redis_store: DurableRedis | DurableCluster = (
            DurableCluster(self.run.tmp / "redis", self.trade_stream) if opts.cluster
            else DurableRedis(self.run.tmp / "redis"))
        self.influx = RestartableInflux(self.run.tmp / "influxdb")
        self.admin_dsn = os.environ.get("MDP_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
        self.db_name = f"mdp_chaos_{os.getpid()}_{opts.seed}"
        u = urllib.parse.urlsplit(self.admin_dsn)
        self.proxy = PgProxy(u.hostname or "127.0.0.1", u.port or 5432)
        self.sim_port = free_port()
        self.locks: dict[str, asyncio.Lock] = {}
        self.pipe: Pipeline | None = None
        self.stop_sampling = asyncio.Event()
        self.redis_down = asyncio.Event()  # set while our Redis is killed (samplers skip)

    # --- setup and teardown -------------------------------------------------------------------------------

    async def start(self) -> None:
        o, run = self.opts, self.run
        await asyncio.to_thread(self.redis_store.start)
        await asyncio.to_thread(self.influx.start)
        await self.proxy.start()
        dsn = await create_scratch_db(self.admin_dsn, self.db_name)
        u = urllib.parse.urlsplit(dsn)
        via_proxy = urllib.parse.urlunsplit(u._replace(netloc=f"{u.username or 'postgres'}@127.0.0.1:{self.proxy.port}"))
        config = run.tmp / "chaos.toml"
        config.write_text(chaos_config(self.sim_port, o.high_water, o.partitions, o.cluster))
        sim_args = (f"--port {self.sim_port} --speed {o.speed} {'--loop ' if o.soak_s else ''}"
                    "--wait-for btcusdt@trade --wait-for btcusdt@kline_1m "
                    "--venue binanceusdm --venue coinbase --venue hyperliquid")
        env = dict(os.environ, MDP_RUN_DIR=str(run.tmp / "run"), MDP_REDIS_URL=self.redis_store.url,
                   MDP_INFLUX_URL=self.influx.url, MDP_POSTGRES_DSN=via_proxy, MDP_SIMULATOR="true",
                   MDP_SIM_ARGS=sim_args, MDP_START_TIMEOUT="150", MDP_CONFIG=str(config),
                   MDP_NUMPROCS=",".join(f"{p}={o.instances}" for p in STAGES) if o.instances > 1 else "")
        self.pipe = Pipeline(env, run.tmp / "run")
        print(f"chaos seed {o.seed}: stores in {run.tmp}; Redis {self.redis_store.url} (AOF"
              f"{', a 3-master cluster' if o.cluster else ''}), InfluxDB "
              f"{self.influx.url}, PostgreSQL {self.db_name} via proxy :{self.proxy.port}, simulator :{self.sim_port} "
              f"speed {o.speed}", flush=True)
        started = await asyncio.to_thread(
            subprocess.run, ["bash", str(ROOT / "tools/supervise.sh"), "start", str(config)], env=env,
            capture_output=True, text=True, timeout=200)
        if started.returncode != 0:
            raise RuntimeError(f"supervise.sh start failed:\n{started.stdout}\n{started.stderr}")

    async def stop(self) -> None:
        if self.pipe is not None:
            await asyncio.to_thread(subprocess.run, ["bash", str(ROOT / "tools/supervise.sh"), "stop"],
                                    env=self.pipe.env, capture_output=True, timeout=120)
        with contextlib.suppress(Exception):
            self.influx.stop()
        self.redis_store.stop()
        await self.proxy.stop()
        with contextlib.suppress(Exception):
            await drop_scratch_db(self.admin_dsn, self.db_name)

    # --- the simulator ------------------------------------------------------------------------------------

    async def sim(self, http: aiohttp.ClientSession, body: dict[str, Any] | None = None) -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.sim_port}/_sim/" + ("fault" if body else "status")
        async with (http.post(url, json=body) if body else http.get(url)) as resp:
            out: dict[str, Any] = await resp.json()
            if resp.status != 200:
                raise RuntimeError(f"simulator {url} {body}: {resp.status} {out}")
            return out

    # --- observers ----------------------------------------------------------------------------------------

    async def sampler(self, http: aiohttp.ClientSession, redis: aioredis.Redis) -> None:
        q = ('SELECT count("price") FROM "ticks"."trades" WHERE "exchange" = \'binance\' '
             'AND "symbol" = \'BTC/USDT\'')
        while not self.stop_sampling.is_set():
            t = self.run.now()
            try:
                rows = await checks.influx_query(http, self.influx.url, q, timeout=1.0)
                influx_n: int | None = int(rows[0][1]) if rows else 0
            except (aiohttp.ClientError, TimeoutError, RuntimeError, OSError):
                influx_n = None
            stream_n = lag = None
            with contextlib.suppress(RedisError, OSError, TimeoutError):  # Redis killed: None
                stream_n = int(await asyncio.wait_for(redis.xlen(self.trade_stream), 1.0))
                lag = (await asyncio.wait_for(backlog(redis), 2.0))[0]
            self.run.samples.append(Sample(t, influx_n, stream_n, lag))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop_sampling.wait(), 0.5)

    async def consumer_groups(self, redis: aioredis.Redis) -> None:
        """The abandoned groups (md:trade and mdp:alerts) and a slow one on md:trade."""
        if "abandoned_groups" not in self.opts.skip:
            for stream in (self.trade_stream, self.opts.stream("mdp:alerts")):
                with contextlib.suppress(ResponseError):  # BUSYGROUP
                    await redis.xgroup_create(stream, ABANDONED, id="$", mkstream=True)
                await redis.xreadgroup(ABANDONED, "gone", {stream: ">"}, count=10, block=100)
            self.run.note(f"consumer group {ABANDONED} on {self.trade_stream} and mdp:alerts: read once, never again")
        if "slow_group" in self.opts.skip:
            return
        with contextlib.suppress(ResponseError):
            await redis.xgroup_create(self.trade_stream, SLOW, id="0", mkstream=True)
        self.run.note(f"consumer group {SLOW} on {self.trade_stream}: one entry read and acknowledged every 0.5 s")
        while not self.stop_sampling.is_set():
            try:
                got: list[tuple[bytes, list[tuple[bytes, Any]]]] = await redis.xreadgroup(  # type: ignore[assignment]
                    SLOW, "slow-0", {self.trade_stream: ">"}, count=1, block=100)
                for _, entries in got:
                    for entry_id, _ in entries:
                        await redis.xack(self.trade_stream, SLOW, entry_id)
            except (RedisError, OSError):
                pass  # Redis is being restarted by a fault: try again after the pause
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop_sampling.wait(), 0.5)


    # --- faults -------------------------------------------------------------------------------------------

    async def inject(self, f: Fault) -> None:
        run = self.run
        await asyncio.sleep(max(0.0, run.started + f.at_s - time.monotonic()))
        lock = self.locks.setdefault(f.target, asyncio.Lock())
        async with lock:  # two faults of one store never overlap (a freeze inside a restart means nothing)
            f.injected_s = run.now()
            try:
                await self._inject(f)
            except Exception as exc:  # noqa: BLE001 - a fault the harness could not inject is reported, not hidden
                f.detail += f" HARNESS ERROR: {exc!r}"
            if f.ended_s is None:
                f.ended_s = run.now()
            run.note(f"fault {f.label()}: {f.detail.strip()}")

    async def _running_pid(self, f: Fault, verb: str) -> int:
        """The pid of the program `f` targets, or 0 with the fault's detail saying it was not running."""
        assert self.pipe is not None
        out = (await self.pipe.actl("pid", f.target)).strip()
        pid = int(out) if out.isdigit() else 0
        if pid <= 0:
            f.detail = f"not running, nothing to {verb} ({(await self.pipe.actl('status', f.target)).strip()})"
        return pid

    async def _inject(self, f: Fault) -> None:
        assert self.pipe is not None
        if f.kind == "kill9":
            pid = await self._running_pid(f, "kill")
            if not pid:
                return
            os.kill(pid, signal.SIGKILL)
            f.ended_s = self.run.now()
            f.detail = f"SIGKILL pid {pid}"
        elif f.kind == "freeze":
            pid = await self._running_pid(f, "freeze")
            if not pid:
                return
            os.kill(pid, signal.SIGSTOP)
            await asyncio.sleep(f.duration_s)
            os.kill(pid, signal.SIGCONT)
            f.ended_s = self.run.now()
            f.detail = f"SIGSTOP pid {pid}, SIGCONT after {f.duration_s}s"
        elif f.kind == "redis_kill9_restart":
            self.redis_down.set()
            await asyncio.to_thread(self.redis_store.kill9)
            await asyncio.sleep(f.duration_s)
            t = time.monotonic()
            await asyncio.to_thread(self.redis_store.start)
            self.redis_down.clear()
            f.ended_s = self.run.now()
            what = "the master serving md:trade:binance:BTC/USDT" if self.opts.cluster else "redis-server"
            f.detail = f"SIGKILL {what}, down {f.duration_s}s, AOF reloaded in {time.monotonic() - t:.2f}s"
        elif f.kind == "influx_freeze":
            self.influx.freeze()
            await asyncio.sleep(f.duration_s)
            self.influx.thaw()
            f.ended_s = self.run.now()
            f.detail = f"SIGSTOP influxd pid {self.influx.pid}, SIGCONT after {f.duration_s}s"
        elif f.kind == "influx_kill9_restart":
            old = self.influx.pid
            await asyncio.to_thread(self.influx.kill9)
            await asyncio.sleep(f.duration_s)
            t = time.monotonic()
            await asyncio.to_thread(self.influx.start)
            f.ended_s = self.run.now()
            f.detail = (f"SIGKILL influxd pid {old}, down {f.duration_s}s, new pid {self.influx.pid} answered "
                        f"/ping after {time.monotonic() - t:.2f}s")
        elif f.kind == "postgres_unreachable":
            await self.proxy.cut()
            await asyncio.sleep(f.duration_s)
            await self.proxy.restore()
            f.ended_s = self.run.now()
            f.detail = f"proxy refused and reset PostgreSQL connections for {f.duration_s}s"
        else:
            raise ValueError(f"unknown fault kind {f.kind!r}")

    # --- the run ------------------------------------------------------------------------------------------

    async def wait_replay_started(self, http: aiohttp.ClientSession, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = await self.sim(http)
            if st.get("trades_replayed", 0) > 0:
                return
            await asyncio.sleep(0.2)
        raise RuntimeError(f"the simulator replayed no trade within {timeout:.0f} s of the pipeline starting; "
                           f"read {self.run.tmp}/run/logs/")

    async def replay_end(self, http: aiohttp.ClientSession) -> dict[str, Any]:
        """Short run: until the spot replay finished (bounded). Soak: until soak_s, then halt it for good."""
        o = self.opts
        if o.soak_s:
            await asyncio.sleep(max(0.0, self.run.started + o.soak_s - time.monotonic()))
            await self.sim(http, {"kind": "halt", "seconds": 24 * 3600})
            await asyncio.sleep(1.0)  # a message being sent as the halt came in is out by now
            st = await self.sim(http)
            self.run.note(f"replay halted for the checks: loop {st['loop']}, {st['loops_done']} loop(s) done, "
                          f"last trade id {st['last_trade_id']}")
            return st
        deadline = time.monotonic() + 3 * RECORDING_S / o.speed + 60
        while time.monotonic() < deadline:
            st = await self.sim(http)
            if st["state"] == "finished":
                self.run.note(f"replay finished: {st['trades_replayed']} trades sent")
                return st
            await asyncio.sleep(0.5)
        raise RuntimeError(f"the simulator's replay did not finish within {3 * RECORDING_S / o.speed + 60:.0f} s")

    def expected(self, st: dict[str, Any]) -> list[TrueTrade]:
        if not self.opts.soak_s:
            return list(self.truth.trades)
        if st["loop_shift_ms"] != self.truth.loop_shift_ms:  # the docs' rule and the simulator disagree
            raise RuntimeError(f"simulator loop_shift_ms {st['loop_shift_ms']} != {self.truth.loop_shift_ms} "
                               f"computed from the capture (docs/simulator.md); the truth would be wrong")
        return self.truth.replayed(int(st["loop"]), st["last_trade_id"], int(st.get("time_offset_ms") or 0))

    async def drain(self, http: aiohttp.ClientSession, r: aioredis.Redis, expected: int) -> dict[str, Any]:
        """Until every pipeline group is drained and the stored trades stopped changing for 15 s (or all of
        them are there), bounded by drain_s. Returns how it ended."""
        t0 = time.monotonic()
        deadline = t0 + self.opts.drain_s + (120 if self.opts.soak_s else 0)
        last_change = time.monotonic()
        last: tuple[int | None, int | None] = (None, None)
        behind: list[str] = []
        while time.monotonic() < deadline:
            s = self.run.samples[-1] if self.run.samples else None
            now = (s.influx_trades, s.stream_len) if s else (None, None)
            if now != last:
                last, last_change = now, time.monotonic()
            try:
                total, behind = await backlog(r)
            except (RedisError, OSError):
                total, behind = -1, ["Redis did not answer"]
            complete = now[0] == expected
            if total == 0 and complete and time.monotonic() - last_change > 3:
                return {"ended": "complete and drained", "waited_s": round(time.monotonic() - t0, 1)}
            if total == 0 and time.monotonic() - last_change > 15:
                return {"ended": "drained, stored trades unchanged for 15 s", "waited_s": round(time.monotonic() - t0, 1)}
            await asyncio.sleep(0.5)
        return {"ended": f"NOT drained after {self.opts.drain_s:.0f} s", "waited_s": round(time.monotonic() - t0, 1),
                "behind": behind[:30]}

    async def execute(self) -> dict[str, Any]:
        o, run = self.opts, self.run
        report: dict[str, Any] = {"seed": o.seed, "mode": "soak" if o.soak_s else "short", "speed": o.speed,
                                  "skipped": list(o.skip), "partitions": o.partitions, "cluster": o.cluster,
                                  "backpressure_high_water": o.high_water, "tmp": str(run.tmp),
                                  "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        report["tree"] = tree_state()
        wall = time.monotonic()
        await self.start()
        assert self.pipe is not None
        r = connect(self.redis_store.url, o.cluster, socket_timeout=5, socket_connect_timeout=2)
        async with aiohttp.ClientSession() as http:
            await self.wait_replay_started(http)
            run.started = time.monotonic()
            run.note("replay started")
            window = o.soak_s or RECORDING_S / o.speed
            programs = tuple(sorted(line.split()[0] for line in (await self.pipe.actl("status")).splitlines()
                                    if line.strip() and not line.startswith("simulator")))
            report["programs"] = list(programs)
            freezes = tuple(p for p in programs if o.partitions > 1 and p.endswith("-0")
                            and p.split(":")[0] in STAGES)
            run.faults = (soak_schedule(o.seed, window, programs=programs) if o.soak_s
                          else short_schedule(o.seed, window, programs, freezes))
            run.faults = [f for f in run.faults if f.kind not in o.skip]
            if o.skip:
                run.note(f"SKIPPED fault kinds (not a full chaos run): {', '.join(o.skip)}")
            run.note(f"seed {o.seed}: {len(run.faults)} faults planned: "
                     + ", ".join(f"{f.at_s}s {f.label()}" for f in run.faults[:40])
                     + (" ..." if len(run.faults) > 40 else ""))
            observers = [asyncio.create_task(self.sampler(http, r)), asyncio.create_task(self.consumer_groups(r))]
            fault_tasks = [asyncio.create_task(self.inject(f)) for f in run.faults]
            try:
                st = await self.replay_end(http)
                await asyncio.gather(*fault_tasks)
                expected = self.expected(st)
                report["drain"] = await self.drain(http, r, len(expected))
                run.note(f"drain: {report['drain']}")
            finally:
                self.stop_sampling.set()
                for t in fault_tasks:
                    t.cancel()
                await asyncio.gather(*observers, *fault_tasks, return_exceptions=True)
            report["checks"] = [c.as_dict() for c in await self.check(http, r, expected)]
        report["supervisor_fatal_history"] = self.pipe.fatal_history()
        report["own_exits"] = self.pipe.own_exits()
        report["alerts"] = await checks.alert_counts(r)
        report["dead_letters"] = await checks.dead_letters(r)
        await r.aclose()
        recovery(run)
        report["faults"] = [f.as_dict() for f in run.faults]
        report["recovery_summary"] = recovery_summary(run.faults)
        report["events"] = run.events
        report["samples"] = [vars(s) for s in run.samples]
        report["passed"] = all(c["passed"] for c in report["checks"])
        report["wall_s"] = round(time.monotonic() - wall, 1)
        return report

    async def locate_lost(self, r: aioredis.Redis, expected: list[TrueTrade], stream_check: checks.Check) -> None:
        """For trades missing from md:trade: how far each got (raw:binance = the collector or gap_repair published
        it; valid:binance = the validator passed it on), so a failure names the stage that dropped or holds it."""
        if not stream_check.counts.get("lost"):
            return
        got = {int(t[0]) for t in await checks.stream_trades(r, self.trade_stream)}
        lost = [t.id for t in expected if t.id not in got]
        # raw:binance, or with partitions its partition's (on a cluster tagged)
        o = self.opts
        k = o.partition()
        suffix = f":{{p{k}}}" if o.cluster else f":p{k}" if o.partitions > 1 else ""
        raw_stream, valid_stream = f"raw:binance{suffix}", f"valid:binance{suffix}"
        raw = {int(t[0]) for t in await checks.stream_trades(r, raw_stream)}
        valid = {int(t[0]) for t in await checks.stream_trades(r, valid_stream)}
        in_valid = [i for i in lost if i in valid]
        only_raw = [i for i in lost if i in raw and i not in valid]
        neither = [i for i in lost if i not in raw and i not in valid]
        stream_check.evidence.append(
            f"where the {len(lost)} missing from {self.trade_stream} are: {len(in_valid)} on valid:binance (the normalizer "
            f"has not published them: ids {checks.id_ranges(in_valid)}); {len(only_raw)} only on raw:binance (the "
            f"validator has not passed them on: ids {checks.id_ranges(only_raw)}); {len(neither)} on neither "
            f"(never published by the collector or gap_repair, or trimmed: ids {checks.id_ranges(neither)})")

    async def check(self, http: aiohttp.ClientSession, r: aioredis.Redis,
                    expected: list[TrueTrade]) -> list[checks.Check]:
        assert self.pipe is not None
        first, last = expected[0].time_ms, max(t.time_ms for t in expected)
        on_stream = await checks.stream_trades(r, self.trade_stream)
        out = [checks.compare_trades("InfluxDB ticks.trades", expected,
                                     await checks.stored_trades(http, self.influx.url, first, last),
                                     "influx_writer (or upstream: normalizer/validator/collector/gap_repair)"),
               checks.compare_trades(self.trade_stream, expected, on_stream,
                                     "normalizer (or upstream: validator/collector/gap_repair)")]
        await self.locate_lost(r, expected, out[1])
        out.append(await checks.check_recent_trades(r, RECENT_TRADES_KEY, on_stream, expected, RECENT_TRADES))
        for tf in ("1m", "5m", "15m", "1h"):
            want = Truth.expected_bars(expected, tf)
            lo = (first // 60_000 + 1) * 60_000
            hi = last // 60_000 * 60_000 - 1
            got = await checks.stored_bars(http, self.influx.url, tf, lo, hi)
            # only the stored bars whose whole window lies in the checked span can be judged
            got = {t: v for t, v in got.items() if t + checks.TIMEFRAMES_MS[tf] - 1 <= hi}
            owner = "collector/normalizer (exchange klines) + gap_repair" if tf == "1m" else "aggregator"
            out.append(checks.compare_bars(tf, want, got, owner))
        out.append(await checks.check_gaps(r))
        status = (await self.pipe.actl("status")).strip().splitlines()
        bad = [line for line in status if " RUNNING " not in line and not line.startswith("simulator")]
        ev = [f"{line}\n    log tail: " + self.pipe.log_tail(line.split()[0]).replace("\n", "\n    ")
              for line in bad]
        fatal = self.pipe.fatal_history()
        if fatal:
            ev.append("supervisord gave up on a program during the run: " + " | ".join(fatal[:10]))
        out.append(checks.Check("every program RUNNING at the end, none FATAL during the run",
                                not bad and not fatal, {"programs": len(status), "not_running": len(bad),
                                                        "fatal_events": len(fatal)}, ev, "the program named"))
        missed = [f"{f.injected_s}s {f.label()}: {f.detail.strip()}" for f in self.run.faults
                  if f.injected_s is None or "not running" in f.detail or "HARNESS ERROR" in f.detail]
        out.append(checks.Check("every planned fault injected (a program to kill was running)", not missed,
                                {"planned": len(self.run.faults), "not_injected": len(missed)}, missed,
                                "the program named (down when its kill came), or the chaos harness"))
        return out


# ----------------------------------------------------------------------------------------------------------
# Recovery times, from the samples (every 0.5 s: InfluxDB trade count, md:trade length, pipeline backlog)


def _first_growth(samples: list[Sample], te: float, attr: str) -> float | None:
    prev = None
    for s in samples:
        v = getattr(s, attr)
        if v is None:
            continue
        if s.t >= te and prev is not None and v > prev:
            return round(s.t - te, 2)
        if s.t >= te or prev is None or s.t < te:
            prev = v
    return None


def recovery(run: Run) -> None:
    """Per fault: seconds from its end (store back, program killed) until trades grow again in InfluxDB and on
    md:trade, and until the pipeline backlog (lag + pending of its groups) is back to what it was in the 3 s
    before the fault. Faults overlap in the short run and every few seconds in the soak: a time is an upper
    bound for that fault alone."""
    samples = run.samples
    for f in run.faults:
        if f.injected_s is None or f.ended_s is None:
            continue
        before = [s.backlog for s in samples if f.injected_s - 3 <= s.t < f.injected_s and s.backlog is not None]
        baseline = max(before) if before else 0
        rec: dict[str, Any] = {"backlog_before": baseline,
                               "influx_flowing_s": _first_growth(samples, f.ended_s, "influx_trades"),
                               "stream_flowing_s": _first_growth(samples, f.ended_s, "stream_len")}
        peak = [s.backlog for s in samples if s.t >= f.injected_s and s.backlog is not None]
        drained = next((s for s in samples if s.t >= f.ended_s and s.backlog is not None and s.backlog <= baseline),
                       None)
        rec["drained_s"] = round(drained.t - f.ended_s, 2) if drained else None
        rec["backlog_peak_after"] = max(peak[:60]) if peak else None  # within 30 s of the fault
        f.recovery = rec


def recovery_summary(faults: list[Fault]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    kinds = sorted({f.kind if f.kind != "kill9" else f"kill9 {f.target.split(':')[0]}" for f in faults})
    for kind in kinds:
        fs = [f for f in faults if (f.kind if f.kind != "kill9" else f"kill9 {f.target.split(':')[0]}") == kind]
        row: dict[str, Any] = {"n": len(fs)}
        for key in ("influx_flowing_s", "stream_flowing_s", "drained_s"):
            vals: list[float] = [f.recovery[key] for f in fs if f.recovery.get(key) is not None]
            row[key] = {"median": round(statistics.median(vals), 2), "max": max(vals)} if vals else None
            row[key.replace("_s", "_never")] = sum(1 for f in fs if f.recovery.get(key) is None)
        out[kind] = row
    return out


# ----------------------------------------------------------------------------------------------------------
# Reports


def markdown(report: dict[str, Any]) -> str:
    verdict = "PASSED" if report["passed"] else "FAILED"
    rerun = (f"python -m tools.chaos.run --seed {report['seed']} --speed {report['speed']}"
             + (f" --soak {report.get('soak_s', 0):.0f}" if report["mode"] == "soak" else "")
             + (f" --high-water {report['backpressure_high_water']}" if report["backpressure_high_water"] != 300 else "")
             + (f" --partitions {report['partitions']}" if report.get("partitions", 1) > 1 else "")
             + (" --cluster" if report.get("cluster") else "")
             + "".join(f" --skip {k}" for k in report.get("skipped", [])))
    parts = report.get("partitions", 1)
    mode = report["mode"] + (f", {parts} partitions, 2 instances each of {', '.join(STAGES)}" if parts > 1 else "")
    mode += ", the bus on a 3-master Redis Cluster" if report.get("cluster") else ""
    lines = [f"# Chaos run, seed {report['seed']} ({mode}): {verdict}", "",
             (f"Started {report['started_utc']}, wall time {report['wall_s']} s, simulator speed {report['speed']}, "
             f"`bus.backpressure_high_water` {report['backpressure_high_water']}. Re-run: `{rerun}`. "
             f"Tree: {report.get('tree', 'not recorded')}."),
             f"Drain: {report['drain']}."
             + (f" **Skipped fault kinds: {', '.join(report['skipped'])}** (not a full run)." if report["skipped"]
                else ""), "", "## Checks", "",
             "| check | result | counts | route to |", "|---|---|---|---|"]
    for c in report["checks"]:
        counts = ", ".join(f"{k} {v}" for k, v in c["counts"].items())
        lines.append(f"| {c['name']} | {'ok' if c['passed'] else '**FAIL**'} | {counts} | {c['owner']} |")
    for c in report["checks"]:
        if c["evidence"]:
            lines += ["", f"### {c['name']}: {'ok' if c['passed'] else 'FAIL'}", ""]
            lines += [f"- {e}" for e in c["evidence"]]
    lines += ["", "## Faults injected (seconds after the replay started)", "",
              "| at | fault | what happened | InfluxDB flowing again | md:trade flowing again | backlog drained |",
              "|---|---|---|---|---|---|"]
    for f in report["faults"]:
        rec = f["recovery"]
        lines.append(f"| {f['injected_s']} | {f['kind']} {f['target']} {f['duration_s'] or ''} | {f['detail']} | "
                     f"{_sec(rec.get('influx_flowing_s'))} | {_sec(rec.get('stream_flowing_s'))} | "
                     f"{_sec(rec.get('drained_s'))} |")
    lines += ["", "## Recovery per kind of fault (s after the fault ended; median / max; never = not within the run)",
              "", "| fault | n | InfluxDB flowing | md:trade flowing | drained |", "|---|---|---|---|---|"]
    for kind, row in report["recovery_summary"].items():
        cells = []
        for key in ("influx_flowing_s", "stream_flowing_s", "drained_s"):
            v = row[key]
            never = row[key.replace("_s", "_never")]
            cells.append((f"{v['median']} / {v['max']}" if v else "-") + (f" ({never} never)" if never else ""))
        lines.append(f"| {kind} | {row['n']} | " + " | ".join(cells) + " |")
    lines += ["", "## Alerts raised (rule, severity: count)", "",
              ", ".join(f"{k}: {v}" for k, v in report["alerts"].items()) or "none",
              "", f"Dead-letter streams: {report['dead_letters'] or 'none'}.", ""]
    if report["supervisor_fatal_history"]:
        lines += ["supervisord gave up on:", ""] + [f"- `{x}`" for x in report["supervisor_fatal_history"][:20]]
    if report.get("own_exits"):
        head = ("Programs that exited by themselves (not killed by the harness; a frozen instance's LeaseLost "
                "is expected):")
        lines += ["", head, ""] + [f"- `{x}`" for x in report["own_exits"][:30]]
    return "\n".join(lines) + "\n"


def _sec(v: Any) -> str:
    return "never" if v is None else f"{v}"


async def run_one(opts: Options) -> dict[str, Any]:
    h = Harness(opts)
    try:
        report = await h.execute()
    finally:
        await h.stop()
    if opts.soak_s:
        report["soak_s"] = opts.soak_s
    out = opts.out_dir / (f"seed-{opts.seed}{'-soak' if opts.soak_s else ''}"
                          f"{f'-p{opts.partitions}' if opts.partitions > 1 else ''}{'-cluster' if opts.cluster else ''}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "report.md").write_text(markdown(report))
    if not report["passed"] or opts.keep:  # the logs say why: keep them beside the report
        with contextlib.suppress(OSError):
            shutil.copytree(h.run.tmp / "run" / "logs", out / "logs", dirs_exist_ok=True)
    if not opts.keep:
        shutil.rmtree(h.run.tmp, ignore_errors=True)
    report["report_dir"] = str(out)
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.chaos.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, action="append",
                   help="repeatable; default: $CHAOS_SEEDS (comma-separated) or one random seed, printed")
    p.add_argument("--speed", type=float, default=None, help="replay speed (short: 6, soak: 5)")
    p.add_argument("--soak", type=float, default=0.0, metavar="SECONDS", help="soak for this long (1800)")
    p.add_argument("--high-water", type=int, default=300, help="bus.backpressure_high_water for the run")
    p.add_argument("--partitions", type=int, default=1,
                   help="bus.partitions; > 1 also two instances of every stage (tools.STAGES)")
    p.add_argument("--cluster", action="store_true",
                   help="run the bus on a local 3-master Redis Cluster (use --partitions 4: all three masters)")
    p.add_argument("--out", type=Path, default=ROOT / "var" / "chaos")
    p.add_argument("--soak-report", type=Path, default=None, help="also write the markdown report here")
    p.add_argument("--keep", action="store_true", help="keep the stores' temp dir and copy the logs")
    p.add_argument("--skip", action="append", default=[], metavar="KIND",
                   help="leave out a fault kind (repeatable): kill9, redis_kill9_restart, influx_freeze, "
                        "influx_kill9_restart, postgres_unreachable, abandoned_groups, slow_group")
    args = p.parse_args(argv)
    seeds = args.seed or [int(s) for s in os.environ.get("CHAOS_SEEDS", "").replace(" ", "").split(",") if s]
    seeds = seeds or [random.SystemRandom().randrange(1, 1_000_000)]
    failed = []
    for seed in seeds:
        speed = args.speed or (5.0 if args.soak else 6.0)
        opts = Options(seed=seed, speed=speed, soak_s=args.soak, high_water=args.high_water, out_dir=args.out,
                       keep=args.keep, drain_s=90.0, skip=tuple(args.skip), partitions=args.partitions,
                       cluster=args.cluster)
        report = asyncio.run(run_one(opts))
        md = markdown(report)
        if args.soak_report:
            args.soak_report.write_text(md)
        print(md)
        print(f"seed {seed}: {'PASSED' if report['passed'] else 'FAILED'}; report in {report['report_dir']}")
        if not report["passed"]:
            failed.append(seed)
    if failed:
        print(f"chaos: FAILED for seed(s) {', '.join(map(str, failed))}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
