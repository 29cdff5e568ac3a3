"""Benchmark of the collector side by side (issue 14, item 5): our collector against bare ccxt.pro and against
cryptofeed, the same replay for everyone, one trade per WebSocket message as Binance sends them.

    python -m tools.bench_collector [--window 10] [--rates 4000,10000] [--ladder 16000,20000,...]
                                    [--only ccxt,ours-ccxt,ours-fast,cryptofeed,null] [--disconnects 10]
                                    [--latency-rate 5000]

Everything real and on 127.0.0.1: a private redis-server, the simulator as its own process (`python -m
simulator --rate N`: the real Binance BTCUSDT trade capture, looped with ids and times moving on, its trades
evenly at N a second, one per message), and each contender as its own process:
- `ccxt.pro + XADD`: bare ccxt.pro `watch_trades` in a loop and one XADD per new trade (msgspec msgpack), one
  pipelined round trip per wake-up (`--contender ccxt`, this file);
- `collector (ccxt parser)`: services/collector, trades channel, with `fast_path = {trades = false}`;
- `collector (fast path)`: services/collector, trades channel, default settings (Binance trades decoded by our
  msgspec decoder beside ccxt);
- `cryptofeed 2.4.1`: its Binance feed and Redis Streams backend (tools/bench_cryptofeed_client.py) in a venv this
  benchmark builds (var/bench/cryptofeed-venv); 2.4.1 is the newest release that installs on Python 3.11
  (3.0.1 requires Python >= 3.13, which none of the registries this machine reaches provides);
- `null reader` (harness ceiling): reads the frames and throws them away; what the simulator and loopback give.

One run = one contender at one offered rate: a fresh simulator and a flushed Redis, the contender started,
`--warmup` s after its first trade a window of `--window` s, then the replay is held (`halt` fault) and the
contender given up to 30 s to write what it holds (the drain: until nothing more reaches Redis and the process
is idle for 0.5 s); then a few more trades are let out and held again, because ccxt.pro's watch_trades returns
the trades that arrived while nobody waited only with the next message. Measured, for the contender's process
only (/proc/PID/stat): CPU time from the window's start to the end, divided by the trades it wrote in that
time (read back from Redis); its RSS at the end (VmRSS); the rate the simulator achieved in the window (it waits
on the socket when a reader falls behind); loss: of the trades sent before the first hold (their ids run on
without a hole from the recording's first), those not in Redis; the drain in seconds (the backlog the contender
carried). A rate is sustained when nothing was lost, the simulator achieved at least 97% of it and the drain
took at most 2 s.
Each contender runs at `--rates`, then up `--ladder` until the first rate it does not sustain.

Then, if it fits: reconnects (the collector in this process, the replay at 5x real speed, `--disconnects`
times the simulator drops every socket; time from the fault to the collector's Gap, i.e. its first trade
after the reconnect), and p99 ts_recv -> cache through the whole pipeline (simulator at `--latency-rate` ->
collector -> validator -> normalizer -> cache_publisher, each its own process; a subscriber on the ticks
channel takes receipt time - the trade's ts_recv, which the collector stamps when the frame arrives).
Prints Markdown (the figures of docs/bench-collector.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import msgspec

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CRYPTOFEED_VERSION = "2.4.1"
CRYPTOFEED_VENV = ROOT / "var" / "bench" / "cryptofeed-venv"
CLK_TCK = os.sysconf("SC_CLK_TCK")
SYMBOL = "BTC/USDT"


# ---------------------------------------------------------------------------------------------------------------
# The contenders this file runs itself (each in its own process: `--contender ccxt|null`)

async def contender_ccxt(ws: str, rest: str, redis_url: str) -> None:
    """Bare ccxt.pro: watch_trades, and one XADD per new trade (msgspec msgpack), one round trip per wake-up."""
    import ccxt.pro
    import redis.asyncio as aioredis

    from common.config import ExchangeSettings
    from common.exchanges.clients import apply_endpoints

    # The trade cache as large as our collector's (trades_limit, 10,000): with ccxt's default (1,000) a slow
    # wake-up at 10,000/s already loses trades out of the cache before watch_trades returns them.
    exchange = ccxt.pro.binance({"options": {"fetchMarkets": {"types": ["spot"]}, "tradesLimit": 10_000}})
    apply_endpoints(exchange, ExchangeSettings(id="binance", symbols=[SYMBOL], rest_url=rest, ws_url=ws,
                                               url_rewrite="host-prefix"))
    redis = aioredis.Redis.from_url(redis_url)
    encode = msgspec.msgpack.Encoder().encode
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    try:
        await exchange.load_markets()
        while not stop.is_set():
            watch = asyncio.ensure_future(exchange.watch_trades(SYMBOL))
            halt = asyncio.ensure_future(stop.wait())
            await asyncio.wait([watch, halt], return_when=asyncio.FIRST_COMPLETED)
            halt.cancel()
            if not watch.done():
                watch.cancel()
                break
            pipe = redis.pipeline(transaction=False)
            for t in watch.result():
                pipe.xadd("bench:ccxt", {"id": t["id"], "d": encode(
                    {"id": t["id"], "price": t["price"], "amount": t["amount"], "side": t["side"],
                     "ts": t["timestamp"]})})
            await pipe.execute()
    finally:
        await exchange.close()
        await redis.aclose()


async def contender_null(ws: str) -> None:
    """Reads the trade frames and throws them away: the harness's own ceiling (simulator + loopback)."""
    import aiohttp

    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with aiohttp.ClientSession() as http, http.ws_connect(f"{ws}/stream.binance.com/ws/btcusdt@trade") as conn:
        reader = asyncio.ensure_future(_drain(conn))
        await stop.wait()
        reader.cancel()


async def _drain(conn: Any) -> None:
    async for _ in conn:
        pass


# ---------------------------------------------------------------------------------------------------------------
# Processes

def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (/proc/PID/stat fields 14 and 15)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def wait_port(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 60) -> None:
    from tools.localstores import port_open

    deadline = time.monotonic() + timeout
    while not port_open(port):
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError(f"{what} did not listen on port {port} within {timeout:.0f} s")
        time.sleep(0.1)


def start_simulator(port: int, log: Path, rate: float | None = None, speed: float = 1.0,
                    book_ticker: bool = False) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "simulator", "--port", str(port), "--loop", "--symbols", "BTCUSDT",
           "--kline-throttle-ms", "60000", "--wait-for", "btcusdt@trade", "--speed", str(speed)]
    if not book_ticker:
        cmd.append("--no-book-ticker")
    if rate:
        cmd += ["--rate", str(rate)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log.open("ab"))
    wait_port(port, proc, "the simulator")
    return proc


def spawn(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """`cmd` as its own process in the project folder, its output to `log`."""
    with log.open("wb") as out:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)


def stop(proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def sim_status(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/_sim/status", timeout=10) as r:
        return json.loads(r.read())


def sim_post(port: int, path: str, body: dict[str, Any]) -> None:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=10) as r:
        r.read()


def sent_trades(port: int) -> int:
    """Trade messages the simulator sent, over every symbol's `@trade` stream."""
    return sum(int(v) for k, v in sim_status(port).get("sent_by_stream", {}).items() if k.endswith("@trade"))


class TickLatency:
    """ms from each trade's `ts_recv` to the receipt of its tick on the cache publisher's pub/sub channels
    (`ticks:{symbol}`), collected while the block runs: `async with TickLatency(redis, channels) as ticks:`."""

    def __init__(self, redis: Any, channels: list[str]) -> None:
        self.pubsub = redis.pubsub()
        self.channels = channels
        self.values: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        await self.pubsub.subscribe(*self.channels)
        self._task = asyncio.create_task(self._listen())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.pubsub.aclose()

    async def _listen(self) -> None:
        async for msg in self.pubsub.listen():
            if msg["type"] == "message":
                self.values.append((time.time_ns() - json.loads(msg["data"])["ts_recv"]) / 1e6)

    async def settle(self, step_s: float, limit_s: float) -> bool:
        """Wait until the ticks of the last `step_s` had a median under 50 ms twice in a row (the stages have
        worked off their start-up backlog), at most `limit_s`; whether they did."""
        deadline, calm = time.monotonic() + limit_s, 0
        while calm < 2 and time.monotonic() < deadline:
            seen = len(self.values)
            await asyncio.sleep(step_s)
            recent = self.values[seen:]
            calm = calm + 1 if recent and statistics.median(recent) < 50 else 0
        return calm >= 2


def ensure_cryptofeed() -> Path:
    """The cryptofeed venv's python, built on first use (pip install cryptofeed==CRYPTOFEED_VERSION)."""
    python = CRYPTOFEED_VENV / "bin" / "python"
    probe = [str(python), "-c", ("import importlib.metadata as m, redis, cryptofeed; "
                                 f"assert m.version('cryptofeed') == {CRYPTOFEED_VERSION!r}")]
    if python.exists() and subprocess.run(probe, check=False, capture_output=True).returncode == 0:
        return python
    print(f"building {CRYPTOFEED_VENV} (cryptofeed {CRYPTOFEED_VERSION}) ...", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(CRYPTOFEED_VENV)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", f"cryptofeed=={CRYPTOFEED_VERSION}", "redis"],
                   check=True)
    subprocess.run(probe, check=True)
    return python


# ---------------------------------------------------------------------------------------------------------------
# Contenders: how to start each and how to read what it wrote

@dataclass(frozen=True)
class Contender:
    key: str  # --only name
    name: str
    stream: str  # the Redis stream it writes ("" for the null reader)

    def command(self, tmp: Path, sim_port: int, redis_url: str) -> list[str]:
        ws, rest = f"ws://127.0.0.1:{sim_port}", f"http://127.0.0.1:{sim_port}"
        if self.key in ("ccxt", "null"):
            return [sys.executable, "-m", "tools.bench_collector", "--contender", self.key, "--ws", ws, "--rest", rest,
                    "--redis-url", redis_url]
        if self.key == "cryptofeed":
            return [str(ensure_cryptofeed()), str(ROOT / "tools" / "bench_cryptofeed_client.py"), "--ws", ws,
                    "--rest", rest, "--redis-port", redis_url.rsplit(":", 1)[1].split("/")[0]]
        config = tmp / f"{self.key}.toml"
        config.write_text(collector_config(redis_url, sim_port, fast=self.key == "ours-fast"))
        return [sys.executable, "-m", "services.collector", "--config", str(config), "--exchange", "binance"]


CONTENDERS = [
    Contender("ccxt", "ccxt.pro + XADD", "bench:ccxt"),
    Contender("ours-ccxt", "our collector, ccxt parser (fast_path trades=false)", "raw:binance"),
    Contender("ours-fast", "our collector, fast path (default)", "raw:binance"),
    Contender("cryptofeed", f"cryptofeed {CRYPTOFEED_VERSION} (Redis Streams backend)", "trades-BINANCE-BTC-USDT"),
    Contender("null", "null reader (harness ceiling)", ""),
]


def collector_config(redis_url: str, sim_port: int, fast: bool, channels: str = '["trades"]') -> str:
    """A config for one collector of Binance BTC/USDT against the simulator; streams kept whole (no trimming)."""
    return f"""
[redis]
url = "{redis_url}"

[bus]
stream_maxlen = 50000000
backpressure_high_water = 40000000

[[exchanges]]
id = "binance"
symbols = ["{SYMBOL}"]
channels = {channels}
market_types = ["spot"]
rest_url = "http://127.0.0.1:{sim_port}"
ws_url = "ws://127.0.0.1:{sim_port}"
url_rewrite = "host-prefix"
{"" if fast else "fast_path = {trades = false}"}
"""


async def quiet(redis: Any, stream: str, pid: int, limit: float = 30.0) -> float:
    """Seconds until the contender went quiet (nothing more written to `stream` and at most one clock tick of
    CPU for 0.5 s: a large pipeline being built or sent counts as busy), at most `limit`."""
    async def state() -> tuple[int, int]:
        return (await redis.xlen(stream) if stream else 0), round(proc_cpu_s(pid) * CLK_TCK)

    start = time.monotonic()
    base, since = await state(), start
    while time.monotonic() - start < limit:
        await asyncio.sleep(0.05)
        now = await state()
        if now[0] != base[0] or now[1] - base[1] > 1:
            base, since = now, time.monotonic()
        elif time.monotonic() - since >= 0.5:
            break
    return since - start


async def trade_ids(redis: Any, stream: str, after: str = "-") -> list[str]:
    """The trade ids in `stream` after entry id `after` (exclusive; "-": all), in stream order."""
    from schemas import Codec, Trade

    codec = Codec()
    out: list[str] = []
    start = after if after == "-" else f"({after}"
    while True:
        entries = await redis.xrange(stream, start, "+", count=5000)
        if not entries:
            return out
        for entry_id, fields in entries:
            if stream == "raw:binance":
                out.extend(e.trade_id for e in codec.decode_entry(fields) if isinstance(e, Trade))
            else:
                out.append(fields[b"id"].decode())
        start = f"({entries[-1][0].decode()}"


async def last_entry(redis: Any, stream: str) -> str:
    last = await redis.xrevrange(stream, "+", "-", count=1)
    return last[0][0].decode() if last else "0-0"


@dataclass
class Run:
    contender: Contender
    rate: int
    achieved: float = 0.0  # trades/s the simulator sent in the window
    cpu_us: float = 0.0  # contender CPU per trade written, window start to drain end
    rss_mb: float = 0.0
    sent: int = 0
    arrived: int = 0  # distinct trade ids in Redis
    duplicates: int = 0
    drain_s: float = 0.0
    sim_cpu: float = 0.0  # the simulator's CPU share in the window (1.0 = one core)
    error: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def loss(self) -> int:
        """Trades sent before the first hold that are not in Redis after the release."""
        return self.sent - self.arrived

    @property
    def sustained(self) -> bool:
        if self.error:
            return False
        ok = self.achieved >= 0.97 * self.rate and self.drain_s <= 2.0
        return ok and (self.loss == 0 if self.contender.stream else True)


async def run_one(c: Contender, rate: int, redis_url: str, tmp: Path, args: argparse.Namespace) -> Run:
    import redis.asyncio as aioredis

    from tools.localstores import free_port

    run = Run(c, rate)
    redis = aioredis.Redis.from_url(redis_url)
    await redis.flushall()
    port = free_port()
    log = tmp / f"{c.key}-{rate}.log"
    sim = start_simulator(port, tmp / f"sim-{c.key}-{rate}.log", rate=rate)
    proc = spawn(c.command(tmp, port, redis_url), log, dict(os.environ, MDP_LOG_LEVEL="WARNING"))
    try:
        deadline = time.monotonic() + 60
        while sent_trades(port) == 0:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{c.name} sent no subscription within 60 s (exit {proc.poll()}); read {log}")
            await asyncio.sleep(0.2)
        await asyncio.sleep(args.warmup)
        t0, cpu0, scpu0, sent0 = time.monotonic(), proc_cpu_s(proc.pid), proc_cpu_s(sim.pid), sent_trades(port)
        mark = await last_entry(redis, c.stream) if c.stream else ""
        await asyncio.sleep(args.window)
        t1, sent1, scpu1 = time.monotonic(), sent_trades(port), proc_cpu_s(sim.pid)
        sim_post(port, "/_sim/fault", {"kind": "halt", "seconds": 3600})
        run.achieved = (sent1 - sent0) / (t1 - t0)
        run.sim_cpu = (scpu1 - scpu0) / (t1 - t0)
        run.drain_s = await quiet(redis, c.stream, proc.pid)
        run.sent = sent_trades(port)
        # ccxt.pro's watch_trades returns trades that arrived while nobody waited only with the next message: let
        # a few more trades out and hold again, so that what a contender holds reaches Redis (loss is judged on
        # the trades sent before the first hold).
        sim_post(port, "/_sim/fault", {"kind": "clear"})
        async with asyncio.timeout(10):
            while sent_trades(port) < run.sent + 10:
                await asyncio.sleep(0.005)
        sim_post(port, "/_sim/fault", {"kind": "halt", "seconds": 3600})
        await quiet(redis, c.stream, proc.pid)
        cpu1, run.rss_mb = proc_cpu_s(proc.pid), proc_rss_mb(proc.pid)
        if proc.poll() is not None:
            raise RuntimeError(f"{c.name} exited ({proc.returncode}) during the run; read {log}")
        if c.stream:
            ids = await trade_ids(redis, c.stream)
            # The replay's trade ids run on without a hole, loop after loop: the trades sent before the first hold
            # are the `sent` ids from the recording's first.
            first = int(sim_status(port)["recording"]["first_trade_id"])
            have = {int(i) for i in ids}
            run.duplicates = len(ids) - len(have)
            run.arrived = sum(1 for i in have if first <= i < first + run.sent)
            if run.loss:
                missing = [i for i in range(first, first + run.sent) if i not in have]
                run.notes.append(f"missing ids e.g. {missing[:3]} (first sent {first}, last sent "
                                 f"{first + run.sent - 1}, last arrived {max(have, default=0)})")
            written = len(await trade_ids(redis, c.stream, mark))
        else:
            run.arrived, written = run.sent, run.sent - sent0
        run.cpu_us = (cpu1 - cpu0) / max(1, written) * 1e6
    except Exception as exc:  # noqa: BLE001 - one failed run is a row saying why, not the end of the benchmark
        run.error = str(exc)
    finally:
        stop(proc)
        stop(sim)
        await redis.aclose()
    print(f"  {c.name} @ {rate:,}/s: achieved {run.achieved:,.0f}/s, {run.cpu_us:.1f} us/trade, "
          f"RSS {run.rss_mb:.0f} MB, sent {run.sent:,} arrived {run.arrived:,} loss {run.loss:,}, drain "
          f"{run.drain_s:.1f} s, simulator {run.sim_cpu:.0%} {run.error} {'; '.join(run.notes)}", file=sys.stderr, flush=True)
    return run


# ---------------------------------------------------------------------------------------------------------------
# Reconnects and whole-pipeline latency (our collector only)

async def reconnects(redis_url: str, tmp: Path, n: int) -> list[float]:
    """Seconds from a disconnect fault to the collector's Gap (its first trade after the reconnect), the
    collector in this process, the replay at 5x real speed."""
    from common.config import load_settings
    from services.collector.service import Collector
    from tools.localstores import free_port

    port = free_port()
    sim = start_simulator(port, tmp / "sim-reconnect.log", speed=5)
    config = tmp / "reconnect.toml"
    config.write_text(collector_config(redis_url, port, fast=True))
    collector = Collector(load_settings(config, env={}), "bench-reconnect", exchange="binance")
    stop_event = asyncio.Event()
    task = asyncio.create_task(collector.run(stop_event))
    out: list[float] = []
    try:
        async with asyncio.timeout(60):
            while collector.count["trades"] < 100:
                if task.done():
                    task.result()
                await asyncio.sleep(0.01)
        for _ in range(n):
            gaps = collector.count["gaps"]
            t0 = time.perf_counter()
            await asyncio.to_thread(sim_post, port, "/_sim/fault", {"kind": "disconnect"})
            async with asyncio.timeout(60):
                while collector.count["gaps"] == gaps:
                    await asyncio.sleep(0.002)
            out.append(time.perf_counter() - t0)
            await asyncio.sleep(1.0)  # let the new connection settle before the next fault
    finally:
        stop_event.set()
        await asyncio.wait_for(task, 30)
        await collector.close()
        stop(sim)
    return out


async def demo_rss(redis_url: str, tmp: Path, seconds: float) -> tuple[float, str]:
    """(MB, what ran): RSS of our collector (default settings) with config/simulator.toml's Binance entry
    (BTC/USDT: trades, candles, ticker, book), the simulator at the recorded pace with bookTickers and depth,
    after `seconds`."""
    from tools.localstores import free_port

    port = free_port()
    sim = start_simulator(port, tmp / "sim-demo.log", book_ticker=True)
    config = tmp / "demo.toml"
    config.write_text(collector_config(redis_url, port, fast=True, channels='["trades", "candles", "ticker", "book"]'))
    proc = spawn([sys.executable, "-m", "services.collector", "--config", str(config), "--exchange", "binance"],
                 tmp / "demo-collector.log", dict(os.environ, MDP_LOG_LEVEL="WARNING"))
    try:
        await asyncio.sleep(seconds)
        if proc.poll() is not None:
            raise RuntimeError(f"the collector exited ({proc.returncode}); read {tmp / 'demo-collector.log'}")
        rss = proc_rss_mb(proc.pid)
        sent = sim_status(port)["sent_by_stream"]
    finally:
        stop(proc)
        stop(sim)
    return rss, f"after {seconds:.0f} s at the recorded pace; messages sent: " + ", ".join(
        f"{k} {v:,}" for k, v in sorted(sent.items()))


async def pipeline_latency(redis_url: str, tmp: Path, rate: int, seconds: float) -> tuple[list[float], str]:
    """(ms per trade from ts_recv to the ticks channel, what ran): simulator at `rate` -> collector (default
    settings) -> validator -> normalizer -> cache_publisher, each its own process."""
    import redis.asyncio as aioredis

    from tools.localstores import free_port

    redis = aioredis.Redis.from_url(redis_url)
    await redis.flushall()
    port = free_port()
    sim = start_simulator(port, tmp / "sim-latency.log", rate=rate)
    config = tmp / "latency.toml"
    config.write_text(collector_config(redis_url, port, fast=True))
    env = dict(os.environ, MDP_CONFIG=str(config), MDP_LOG_LEVEL="WARNING")
    procs = [spawn([sys.executable, "-m", f"services.{name}", *extra], tmp / f"latency-{name}.log", env)
             for name, extra in (("validator", []), ("normalizer", []), ("cache_publisher", []),
                                 ("collector", ["--exchange", "binance"]))]
    try:
        async with TickLatency(redis, [f"ticks:{SYMBOL}"]) as ticks:
            deadline = time.monotonic() + 90
            while sent_trades(port) == 0:
                if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                    raise RuntimeError(f"the pipeline did not start within 90 s; read {tmp}/latency-*.log")
                await asyncio.sleep(0.2)
            # Warm-up: the stages find their streams (~2 s each) and work off what queued meanwhile; measure once
            # the ticks of the last half second had a median under 50 ms twice in a row (at most 40 s).
            await ticks.settle(0.5, 40)
            start, sent0 = len(ticks.values), sent_trades(port)
            await asyncio.sleep(seconds)
            latencies = ticks.values[start:]
            sent = sent_trades(port) - sent0
    finally:
        for p in procs:
            stop(p)
        stop(sim)
        await redis.aclose()
    return latencies, f"{sent / seconds:,.0f} trades/s sent, {len(latencies):,} ticks measured over {seconds:.0f} s"


# ---------------------------------------------------------------------------------------------------------------
# Report

def report(runs: list[Run], started: str, args: argparse.Namespace, reconnect_s: list[float],
           latency: tuple[list[float], str] | None, demo: tuple[float, str] | None) -> None:
    print(f"\nRun started {started}; machine: {platform.processor() or platform.machine()}, {os.cpu_count()} "
          f"cores (shared with other work), Python {platform.python_version()}; window {args.window:.0f} s after "
          f"{args.warmup:.0f} s warm-up.\n")
    print("| contender | offered /s | achieved /s | CPU us/trade | RSS MB | sent | lost | drain s | simulator CPU |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        if r.error:
            print(f"| {r.contender.name} | {r.rate:,} | failed: {r.error} | | | | | | |")
            continue
        lost = f"{r.loss:,}" if r.contender.stream else "n/a"
        print(f"| {r.contender.name} | {r.rate:,} | {r.achieved:,.0f} | {r.cpu_us:.1f} | {r.rss_mb:.0f} | "
              f"{r.sent:,} | {lost}{f' ({r.duplicates:,} dup)' if r.duplicates else ''} | {r.drain_s:.1f} | "
              f"{r.sim_cpu:.0%} |")
    print("\nSummary (CPU per trade written; most sustained = highest offered rate with no loss, >= 97% achieved "
          "and <= 2 s drain):\n")
    rates = [int(r) for r in args.rates.split(",")]
    print("| contender | " + " | ".join(f"{r:,}/s: CPU us/trade" for r in rates) + " | most sustained | RSS MB at end |")
    print("|---|" + "---|" * len(rates) + "---|---|")
    for c in CONTENDERS:
        mine = [r for r in runs if r.contender is c]
        if not mine:
            continue
        cells = []
        for rate in rates:
            at = next((x for x in mine if x.rate == rate), None)
            cells.append("-" if at is None or at.error else
                         f"{at.cpu_us:.1f}{'' if at.sustained else ' (not sustained)'}")
        ok = [r for r in mine if r.sustained]
        best = max(ok, key=lambda r: r.rate) if ok else None
        top = f"{best.rate:,}/s at {best.cpu_us:.1f} us" if best else "none"
        rss = max((r.rss_mb for r in mine if not r.error), default=0.0)
        print(f"| {c.name} | " + " | ".join(cells) + f" | {top} | {rss:.0f} |")
    if demo is not None:
        print(f"\nRSS of one collector with the demo's Binance symbols and channels: {demo[0]:.0f} MB ({demo[1]})")
    if reconnect_s:
        print(f"\nDisconnect -> data flowing again (our collector, {len(reconnect_s)} disconnects at 5x real speed): "
              f"median {statistics.median(reconnect_s) * 1000:.0f} ms, min {min(reconnect_s) * 1000:.0f} ms, "
              f"max {max(reconnect_s) * 1000:.0f} ms")
    if latency is not None:
        sample, what = latency
        if sample:
            s = sorted(sample)
            print(f"\nts_recv -> cache through the whole pipeline (simulator -> collector -> validator -> normalizer "
                  f"-> cache_publisher, ticks pub/sub) at {args.latency_rate:,} trades/s offered: p50 "
                  f"{statistics.median(s):.1f} ms, p99 {s[max(0, int(len(s) * 0.99) - 1)]:.1f} ms, max "
                  f"{s[-1]:.1f} ms ({what})")
        else:
            print(f"\nts_recv -> cache: no tick reached the cache ({what})")


async def main_async(args: argparse.Namespace) -> None:
    from tools.localstores import start_redis

    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    only = set(args.only.split(","))
    contenders = [c for c in CONTENDERS if c.key in only]
    if any(c.key == "cryptofeed" for c in contenders):
        ensure_cryptofeed()
    runs: list[Run] = []
    reconnect_s: list[float] = []
    latency: tuple[list[float], str] | None = None
    demo: tuple[float, str] | None = None
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        redis = start_redis(tmp / "redis")
        try:
            # Interleaved (every contender at one rate, then the next rate), so the load other work puts on the
            # machine falls on all of them alike.
            for rate in [int(r) for r in args.rates.split(",")]:
                for c in contenders:
                    runs.append(await run_one(c, rate, redis.url, tmp, args))
            climbing = list(contenders)
            for rate in [int(r) for r in args.ladder.split(",") if r]:
                for c in list(climbing):
                    runs.append(await run_one(c, rate, redis.url, tmp, args))
                    if not runs[-1].sustained:
                        climbing.remove(c)
            if args.demo_seconds:
                demo = await demo_rss(redis.url, tmp, args.demo_seconds)
            if args.disconnects:
                reconnect_s = await reconnects(redis.url, tmp, args.disconnects)
            if args.latency_rate:
                latency = await pipeline_latency(redis.url, tmp, args.latency_rate, args.latency_seconds)
        finally:
            redis.stop()
    report(runs, started, args, reconnect_s, latency, demo)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rates", default="4000,10000", help="offered trades/s every contender runs at")
    p.add_argument("--ladder", default="16000,20000,24000,28000,32000,40000,48000,56000",
                   help="then these, up to the first a contender does not sustain")
    p.add_argument("--only", default="ccxt,ours-ccxt,ours-fast,cryptofeed,null")
    p.add_argument("--window", type=float, default=10.0, help="measured seconds per run")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds after the first trade before measuring")
    p.add_argument("--disconnects", type=int, default=10)
    p.add_argument("--latency-rate", type=int, default=5000, help="0: skip the whole-pipeline latency run")
    p.add_argument("--latency-seconds", type=float, default=20.0)
    p.add_argument("--demo-seconds", type=float, default=30.0, help="0: skip the RSS run with the demo's channels")
    p.add_argument("--contender", choices=("ccxt", "null"), help=argparse.SUPPRESS)  # a contender process
    p.add_argument("--ws", help=argparse.SUPPRESS)
    p.add_argument("--rest", help=argparse.SUPPRESS)
    p.add_argument("--redis-url", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.contender:
        import uvloop

        uvloop.run(contender_ccxt(args.ws, args.rest, args.redis_url) if args.contender == "ccxt"
                   else contender_null(args.ws))
        return
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
