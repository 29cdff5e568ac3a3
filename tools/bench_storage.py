"""`python -m tools.bench_storage`: the InfluxDB storage figures of docs/bench-storage.md, printed as Markdown.

1. storage: bytes on disk per tick and per candle (1m, 1h, 1d) in InfluxDB 1.6.7 after full compaction, each in
   its tier (the plan's retention policies), from real data, and how many symbols fit the plan's 1 GB a month.
2. throughput: the influx writer through the bus (one process, a pre-filled stream drained as fast as it goes)
   against the raw server (the same lines, pre-encoded, batched `POST /write` of 5,000 lines with 1, 2 and 4
   requests at once), same run, same machine.
3. clients: the client side of the 2.x / 3.x write path (`POST /api/v2/write`): influxdb-client's async API,
   its synchronous API in a thread, and plain aiohttp, against a sink process that answers 204 without
   parsing; CPU of this process per request of 5,000 lines.

Everything runs on private servers started here (influxd, redis-server on free ports; a sink subprocess).
Data (read from ../shared/data/real, never copied; each file's format named where it is read):
- ticks: the Binance spot BTCUSDT trades of ws-captures/ (19,904 trades over 650 s), repeated back to back
  with every loop shifted by the capture's span and its trade ids by their span, ending a minute ago;
- 1m candles: 6 real 1m series (Binance spot BTC/USDT 2024-03, USD-M ALGOUSDT 2024-09, Binance.US
  BTC/USDT, BTC/USDC, BTC/USD 2023-03, Kraken XBT/USDC 2023 Q1), each shifted to end an hour ago and cut to
  80 days, repeated under new symbol names until there are enough;
- 1h candles: Binance spot BTCUSDT and ETHUSDT 1h 2021-04..2023-12, cut to the last 700 days, likewise;
- 1d candles: derived from those 1h series (daily open/high/low/close/sum of volume), likewise.

    python -m tools.bench_storage [--only storage,throughput,clients] [--ticks N] [--candles N]
                                  [--writer-trades N]
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import gzip
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import aiohttp
import msgspec
import redis.asyncio as aioredis
import uvloop

from common.bus.core import Producer
from common.config import BusSettings, InfluxSettings, RedisSettings, Settings
from common.stores.influx import InfluxClient, encode_candles, encode_trades
from schemas import Candle, Codec, Event, Trade
from simulator.recording import real_data_dir
from tools.localstores import INFLUXD_CONFIG, LocalServer, free_port, start_influxd, start_redis, wait_influx

REAL = real_data_dir()  # $MDP_REAL_DATA, ../shared/data/real, or the shipped data/real
NS = 1_000_000_000
MINUTE_NS = 60 * NS
GB = 1_000_000_000
MONTH_DAYS = 30


# -- real data ------------------------------------------------------------------------------------------------

def capture_trades() -> list[Trade]:
    """Binance spot BTCUSDT `@trade` messages of ws-captures (`<recv ns> <combined-stream JSON>` lines)."""
    out: list[Trade] = []
    for name in ("binance_spot_btcusdt_20240808.gz", "binance_spot_btcusdt_20240809.gz"):
        with gzip.open(REAL / "ws-captures" / name, "rt") as f:
            for line in f:
                if "@trade" not in line:
                    continue
                recv, _, raw = line.partition(" ")
                msg = json.loads(raw).get("data", {})
                if msg.get("e") != "trade":
                    continue
                out.append(Trade(exchange="binance", symbol="BTC/USDT", trade_id=str(msg["t"]),
                                 price=Decimal(msg["p"]), amount=Decimal(msg["q"]),
                                 side="sell" if msg["m"] else "buy", ts_event=msg["T"] * 1_000_000,
                                 ts_recv=int(recv)))
    if not out:
        raise SystemExit(f"no trades found in {REAL / 'ws-captures'}")
    return out


def ticks(n: int, base: list[Trade], end_ns: int) -> Iterator[Trade]:
    """n trades: the capture back to back, loop k shifted by k spans (time and ids), the last one at end_ns."""
    span_ns = (base[-1].ts_event - base[0].ts_event) // MINUTE_NS * MINUTE_NS + MINUTE_NS
    id_span = int(base[-1].trade_id) - int(base[0].trade_id) + 1
    loops = -(-n // len(base))
    shift0 = end_ns - base[-1].ts_event - (loops - 1) * span_ns
    for i in range(n):
        t = base[i % len(base)]
        k = i // len(base)
        ts = t.ts_event + shift0 + k * span_ns
        yield msgspec.structs.replace(t, trade_id=str(int(t.trade_id) + k * id_span), ts_event=ts, ts_recv=ts)


Row = tuple[int, str, str, str, str, str]  # open time (ms), open, high, low, close, volume as text
Series = tuple[str, str, list[Row]]  # exchange, symbol, rows oldest first


def _ms(iso: str) -> int:
    return int(datetime.fromisoformat(iso).astimezone(UTC).timestamp() * 1000)


def _last_days(rows: list[Row], days: int) -> list[Row]:
    return [r for r in rows if r[0] > rows[-1][0] - days * 86_400_000]


def series_1m() -> list[Series]:
    """The real 1m series, oldest first, each (exchange, symbol, rows). Formats are stated per file."""
    out: list[Series] = []
    # ccxt fetch_ohlcv CSV with header: timestamp (ms), open, high, low, close, volume
    with open(REAL / "binance-spot-1m-ccxt" / "BTCUSDT-1m-2024-03.csv") as f:
        r = csv.reader(f)
        assert next(r) == ["timestamp", "open", "high", "low", "close", "volume"]
        out.append(("binance", "BTC/USDT", [(int(a), b, c, d, e, v) for a, b, c, d, e, v in r]))
    # data.binance.vision monthly CSV with its header: open_time (ms), open, high, low, close, volume, ...
    with open(REAL / "binance-usdm-1m" / "ALGOUSDT-1m-2024-09.csv") as f:
        r = csv.reader(f)
        assert next(r)[:6] == ["open_time", "open", "high", "low", "close", "volume"]
        out.append(("binanceusdm", "ALGO/USDT:USDT", [(int(x[0]), x[1], x[2], x[3], x[4], x[5]) for x in r]))
    # Binance.US: open_time ISO text with offset, open, high, low, close, volume
    for quote in ("USDT", "USDC", "USD"):
        with open(REAL / "binanceus-kraken-2023-03" / f"binanceus_BTC{quote}_1m_20230301_20230321.csv") as f:
            r = csv.reader(f)
            assert next(r) == ["open_time", "open", "high", "low", "close", "volume"]
            out.append(("binanceus", f"BTC/{quote}", [(_ms(x[0]), x[1], x[2], x[3], x[4], x[5]) for x in r]))
    # Kraken OHLCVT: no header; unix seconds, open, high, low, close, volume, trades
    with open(REAL / "binanceus-kraken-2023-03" / "kraken_XBTUSDC_1m_ohlcvt_2023Q1.csv") as f:
        rows = [(int(x[0]) * 1000, x[1], x[2], x[3], x[4], x[5]) for x in csv.reader(f)]
        out.append(("kraken", "XBT/USDC", _last_days(rows, 80)))
    return out


def series_1h() -> list[Series]:
    """Binance spot 1h as re-saved by python-binance: header date (naive UTC), open, high, low, close, volume, ticker."""
    out: list[Series] = []
    for sym in ("BTC", "ETH"):
        with open(REAL / "binance-spot-1h" / f"{sym}USDT-1h-2021-04-2023-12.csv") as f:
            r = csv.reader(f)
            assert next(r) == ["date", "open", "high", "low", "close", "volume", "ticker"]
            rows = [(_ms(x[0] + "+00:00"), x[1], x[2], x[3], x[4], x[5]) for x in r]
            out.append(("binance", f"{sym}/USDT", _last_days(rows, 700)))
    return out


def series_1d(hourly: list[Series]) -> list[Series]:
    """Daily bars derived from the 1h series (UTC days with all 24 hours)."""
    out: list[Series] = []
    for exchange, sym, rows in hourly:
        days: dict[int, list[Row]] = {}
        for row in rows:
            days.setdefault(row[0] // 86_400_000 * 86_400_000, []).append(row)
        bars: list[Row] = []
        for day, hours in sorted(days.items()):
            if len(hours) != 24:
                continue
            bars.append((day, hours[0][1], str(max(Decimal(h[2]) for h in hours)),
                         str(min(Decimal(h[3]) for h in hours)), hours[-1][4], str(sum(Decimal(h[5]) for h in hours))))
        out.append((exchange, sym, bars))
    return out


def candles(n: int, series: list[Series], timeframe: str, end_ns: int) -> Iterator[Candle]:
    """n candles: every series shifted to end at end_ns, repeated under new symbol names ("BTC/USDT#2")."""
    made = 0
    copy = 0
    while made < n:
        copy += 1
        for exchange, sym, rows in series:
            name = sym if copy == 1 else f"{sym}#{copy}"
            shift = end_ns - rows[-1][0] * 1_000_000
            step = (rows[1][0] - rows[0][0]) * 1_000_000
            shift -= shift % step  # keep bars aligned
            for t, o, h, lo, c, v in rows:
                if made >= n:
                    return
                open_time = t * 1_000_000 + shift
                yield Candle(exchange=exchange, symbol=name, timeframe=timeframe, open_time=open_time,
                             open=Decimal(o), high=Decimal(h), low=Decimal(lo), close=Decimal(c), volume=Decimal(v),
                             closed=True, ts_event=open_time, ts_recv=open_time)
                made += 1


def chunks(items: Iterator[Trade] | Iterator[Candle], size: int) -> Iterator[list[str]]:
    batch: list[Trade | Candle] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield _encode(batch)
            batch = []
    if batch:
        yield _encode(batch)


def _encode(batch: list[Trade | Candle]) -> list[str]:
    if isinstance(batch[0], Trade):
        return encode_trades(batch)  # type: ignore[arg-type]
    return encode_candles(batch)  # type: ignore[arg-type]


# -- 1. storage -----------------------------------------------------------------------------------------------

def start_compacting_influxd(data_dir: Path) -> LocalServer:
    """influxd 1.6.7 that snapshots its cache after 1 s and fully compacts a shard 5 s after its last write
    (defaults: 10 min and 4 h), so the on-disk size settles within the run."""
    port = free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    config = INFLUXD_CONFIG.format(dir=data_dir, port=port, rpc_port=free_port()).replace(
        'cache-snapshot-write-cold-duration = "10s"',
        'cache-snapshot-write-cold-duration = "1s"\n  compact-full-write-cold-duration = "5s"')
    (data_dir / "influxdb.conf").write_text(config)
    log_path = data_dir / "influxd.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(["influxd", "-config", str(data_dir / "influxdb.conf")], stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    wait_influx(url, 30, log_path)
    return LocalServer("influxd-bench", url, proc, log_path)


def disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def tsm_files(path: Path) -> int:
    return sum(1 for _ in path.rglob("*.tsm"))


async def settle(data: Path, wal: Path, timeout: float = 240) -> float:
    """Wait until the WAL is flushed and the TSM files stop changing; seconds waited."""
    t0 = time.monotonic()
    last, stable = -1, 0
    while time.monotonic() - t0 < timeout:
        size = disk_bytes(data)
        if size == last and disk_bytes(wal) < 4096:
            stable += 1
            if stable >= 8:
                break
        else:
            stable = 0
        last = size
        await asyncio.sleep(1)
    return time.monotonic() - t0


@dataclass
class Stored:
    tier: str
    what: str
    points: int
    bytes: int
    series: int
    shards: int


async def bench_storage(tmp: Path, n_ticks: int, n_candles: int) -> list[Stored]:
    server = start_compacting_influxd(tmp / "influx-storage")
    end = time.time_ns() - MINUTE_NS
    settings = InfluxSettings(url=server.url, database="storage", batch_points=5000)
    hourly = series_1h()
    plan = [("ticks", "trades (ticks)", chunks(ticks(n_ticks, capture_trades(), end), 50_000)),
            ("candles_1m", "1m candles", chunks(candles(n_candles, series_1m(), "1m", end - 3600 * NS), 50_000)),
            ("candles_1h", "1h candles", chunks(candles(n_candles, hourly, "1h", end - 3600 * NS), 50_000)),
            ("candles_1d", "1d candles", chunks(candles(n_candles, series_1d(hourly), "1d", end - 86400 * NS),
                                                50_000)),
            # The same 1d candles with 52-week shard groups instead of the 7 days 1.x gives an INF policy.
            ("candles_1d_52w", "1d candles, SHARD DURATION 52w",
             chunks(candles(n_candles, series_1d(hourly), "1d", end - 86400 * NS), 50_000))]
    out: list[Stored] = []
    try:
        async with InfluxClient(settings) as client:
            await client.ensure_tiers()
            await client.execute('CREATE RETENTION POLICY "candles_1d_52w" ON "storage" DURATION INF REPLICATION 1 '
                                 'SHARD DURATION 52w')
            for tier, what, lines in plan:
                for batch in lines:
                    await client.write_lines(batch, rp=tier)
                field = "price" if tier == "ticks" else "close"
                measurement = "trades" if tier == "ticks" else "ohlcv"
                rows = await client.query(f"SELECT count({field}) FROM {measurement}", rp=tier)
                series = await client.query(f"SHOW SERIES FROM {measurement}", rp=tier)
                out.append(Stored(tier, what, int(rows[0]["count"]), 0, len(series), 0))
            if client.expired_dropped:
                raise SystemExit(f"{client.expired_dropped} points were older than their tier: fix the data shift")
        waited = await settle(tmp / "influx-storage" / "data", tmp / "influx-storage" / "wal")
        print(f"storage: on-disk size settled {waited:.0f} s after the last write", file=sys.stderr)
        for s in out:
            rp_dir = tmp / "influx-storage" / "data" / "storage" / s.tier
            s.bytes = disk_bytes(rp_dir)
            s.shards = sum(1 for p in rp_dir.iterdir() if p.is_dir())
    finally:
        server.stop()
    return out


def budget_rows(stored: list[Stored], trades_per_s: float) -> list[str]:
    """Markdown rows: per tier, bytes per symbol per month and symbols fitting 1 GB a month."""
    per = {s.tier: s.bytes / s.points for s in stored}
    month_s = MONTH_DAYS * 86400
    rows = []
    points = {"candles_1m": month_s / 60, "candles_1h": month_s / 3600, "candles_1d": MONTH_DAYS}
    keep: dict[str, float] = {"candles_1m": 90 * 86400 / 60, "candles_1h": 730 * 24}
    for tier, label in (("candles_1m", "1m candles (kept 90 d)"), ("candles_1h", "1h candles (kept 2 y)"),
                        ("candles_1d", "1d candles (kept forever)")):
        month = points[tier] * per[tier]
        steady = (f"{keep[tier] * per[tier] / 1e6:,.2f} MB" if tier in keep
                  else f"+{365 * per[tier] / 1e3:,.1f} kB a year")
        rows.append(f"| {label} | {per[tier]:.1f} | {points[tier]:,.0f} | {month / 1e6:,.3f} MB | {GB / month:,.0f} | "
                    f"{steady} |")
    candle_month = sum(points[t] * per[t] for t in points)
    kept = sum(keep[t] * per[t] for t in keep)
    rows.append(f"| all three candle tiers | | {sum(points.values()):,.0f} | {candle_month / 1e6:,.3f} MB | "
                f"{GB / candle_month:,.0f} | {kept / 1e6:,.2f} MB + 1d |")
    for rate, label in ((trades_per_s, f"ticks at {trades_per_s:.1f} trades/s (BTC/USDT in the capture)"),
                        (1.0, "ticks at 1 trade/s"), (0.1, "ticks at 0.1 trade/s")):
        month = rate * month_s * per["ticks"]
        rows.append(f"| {label}, kept 7 d | {per['ticks']:.1f} | {rate * month_s:,.0f} | {month / 1e6:,.1f} MB | "
                    f"{GB / month:,.1f} | {rate * 7 * 86400 * per['ticks'] / 1e6:,.1f} MB |")
    return rows


# -- 2. throughput ------------------------------------------------------------------------------------------

def process_cpu_s(server: LocalServer) -> float:
    """CPU seconds (user + system) a server process has used so far, from /proc/<pid>/stat."""
    assert server.process is not None
    fields = Path(f"/proc/{server.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class CpuWindow:
    """CPU seconds of influxd, redis-server and this process over a timed window, and its wall seconds."""
    influxd: float = 0.0
    redis: float = 0.0
    client: float = 0.0
    wall: float = 0.0

    @classmethod
    async def measure(cls, servers: tuple[LocalServer, LocalServer], run: Awaitable[float]) -> tuple[float, CpuWindow]:
        before = (process_cpu_s(servers[0]), process_cpu_s(servers[1]), time.process_time(), time.perf_counter())
        elapsed = await run
        after = (process_cpu_s(servers[0]), process_cpu_s(servers[1]), time.process_time(), time.perf_counter())
        return elapsed, cls(*(a - b for a, b in zip(after, before, strict=True)))

    @property
    def cores(self) -> float:
        return (self.influxd + self.redis + self.client) / self.wall


async def raw_write(url: str, database: str, bodies: list[bytes], concurrency: int) -> float:
    """Seconds to POST every body to /write (rp ticks), `concurrency` requests at once."""
    slots = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as http:
        async def one(body: bytes) -> None:
            async with slots, http.post(f"{url}/write", params={"db": database, "rp": "ticks", "precision": "ns"},
                                        data=body) as resp:
                if resp.status != 204:
                    raise SystemExit(f"raw write refused: {resp.status} {await resp.text()}")
        t0 = time.perf_counter()
        await asyncio.gather(*(one(b) for b in bodies))
        return time.perf_counter() - t0


async def writer_run(redis_url: str, influx: InfluxSettings, trades: list[Trade],
                     servers: tuple[LocalServer, LocalServer]) -> tuple[float, dict[str, int], CpuWindow]:
    """Seconds for the influx writer to drain a stream pre-filled with `trades` (ack of the last entry), and
    the CPU that influxd, redis-server and the writer used over that window."""
    from services.influx_writer.service import InfluxWriter

    bus = BusSettings(stream_maxlen=1_000_000, backpressure_high_water=900_000)
    settings = Settings(redis=RedisSettings(url=redis_url), influx=influx, bus=bus)
    redis = aioredis.Redis.from_url(redis_url)
    await redis.flushdb()
    producer = Producer(redis, Codec(), bus, "bench")
    for i in range(0, len(trades), 50_000):
        await producer.publish({"md:trade:binance:BTC/USDT": list[Event](trades[i:i + 50_000])})
    entries = await redis.xlen("md:trade:binance:BTC/USDT")
    await redis.aclose()
    writer = InfluxWriter(settings, "bench")
    await writer.prepare()
    stop = asyncio.Event()
    task = asyncio.create_task(asyncio.sleep(0))

    async def drain() -> float:
        nonlocal task
        t0 = time.perf_counter()
        task = asyncio.create_task(writer.consumer.run(writer.handle, stop))
        async with asyncio.timeout(600):
            while writer.consumer.stats.acked < entries:
                if task.done():
                    task.result()
                await asyncio.sleep(0.002)
        return time.perf_counter() - t0
    try:
        elapsed, cpu = await CpuWindow.measure(servers, drain())
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        counters = writer.counters()
        await writer.close()
    counters["cpu_ns_per_point"] = int(cpu.client / len(trades) * 1e9)
    return elapsed, counters, cpu


async def bench_throughput(tmp: Path, n: int, rounds: int) -> list[str]:
    """Rounds of: raw with 1, 2, 4 requests in flight, the writer, raw with 4 again. The writer is compared
    with the raw runs of its own round (this machine is shared: rates drift between rounds)."""
    influxd = start_influxd(tmp / "influx-throughput")
    redis_srv = start_redis(tmp / "redis")
    end = time.time_ns() - MINUTE_NS
    trades = list(ticks(n, capture_trades(), end))
    lines = encode_trades(trades)
    bodies = ["\n".join(lines[i:i + 5000]).encode() for i in range(0, len(lines), 5000)]
    order = ("raw 1", "raw 2", "raw 4", "writer", "raw 4 after")
    results: dict[str, list[float]] = {k: [] for k in order}
    cpus: dict[str, list[CpuWindow]] = {k: [] for k in order}
    loads: list[float] = []
    writer_cpu: list[int] = []
    try:
        run = 0
        for _ in range(rounds):
            for kind in order:
                run += 1
                db = f"tp{run}"
                settings = InfluxSettings(url=influxd.url, database=db, batch_points=5000)
                load = os.getloadavg()[0]
                loads.append(load)
                if kind == "writer":
                    elapsed, counters, cpu = await writer_run(redis_srv.url, settings, trades, (influxd, redis_srv))
                    if counters["points_written"] != n:
                        raise SystemExit(f"the writer wrote {counters['points_written']} of {n} points: {counters}")
                    writer_cpu.append(counters["cpu_ns_per_point"])
                else:
                    async with InfluxClient(settings) as c:
                        await c.ensure_tiers()
                    elapsed, cpu = await CpuWindow.measure((influxd, redis_srv),
                                                           raw_write(influxd.url, db, bodies, int(kind.split()[1])))
                async with InfluxClient(settings) as c:
                    stored = int((await c.query("SELECT count(price) FROM trades", rp="ticks"))[0]["count"])
                    await c.execute(f'DROP DATABASE "{db}"')
                if stored != n:
                    raise SystemExit(f"{kind}: {stored} of {n} points stored")
                results[kind].append(n / elapsed)
                cpus[kind].append(cpu)
                print(f"throughput: {kind}: {n / elapsed:,.0f} points/s (load average before: {load:.2f}; CPU per "
                      f"point: influxd {cpu.influxd / n * 1e6:.2f} us, client {cpu.client / n * 1e6:.2f} us, "
                      f"redis {cpu.redis / n * 1e6:.2f} us; {cpu.cores:.2f} cores busy)", file=sys.stderr)
    finally:
        influxd.stop()
        redis_srv.stop()
    rows: list[str] = []
    for kind in order:
        what = ("influx writer: Redis stream -> decode -> encode -> /write rp=ticks, acknowledged"
                if kind == "writer" else f"raw /write of the same pre-encoded lines, {kind.split()[1]} request(s) in "
                                         f"flight{' (after the writer)' if 'after' in kind else ''}")
        rates = results[kind]
        rows.append(f"| {what} | {', '.join(f'{r:,.0f}' for r in rates)} | {statistics.median(rates):,.0f} |")
    vs4 = [w / ((a + b) / 2) for w, a, b in zip(results["writer"], results["raw 4"], results["raw 4 after"],
                                                 strict=True)]
    vs_best = [w / max(r1, r2, r4, r4b) for w, r1, r2, r4, r4b in zip(
        results["writer"], results["raw 1"], results["raw 2"], results["raw 4"], results["raw 4 after"], strict=True)]
    rows.append(f"\nWriter / raw with 4 in flight (mean of the runs just before and after it), per round: "
                f"{', '.join(f'{r:.0%}' for r in vs4)}; median **{statistics.median(vs4):.0%}**. Writer / the "
                f"fastest raw run of its round: {', '.join(f'{r:.0%}' for r in vs_best)}; median "
                f"**{statistics.median(vs_best):.0%}**.")
    rows.append(f"\nThe writer process used {statistics.median(writer_cpu) / 1000:.2f} us of CPU per point (median of "
                f"{', '.join(f'{c / 1000:.2f}' for c in writer_cpu)}): Redis read, decode, encode, HTTP, ack.")
    rows.append(f"\nLoad average (1 min) before each run: {min(loads):.2f} to {max(loads):.2f}. Cores busy with this "
                f"bench's processes (influxd, redis-server, the client or writer) per round, raw 4 / writer / raw 4 after: "
                + ", ".join(f"{a.cores:.2f}/{w.cores:.2f}/{b.cores:.2f}" for a, w, b in
                            zip(cpus["raw 4"], cpus["writer"], cpus["raw 4 after"], strict=True))
                + " (below ~1.8: another process took CPU during that run).")

    def total(c: CpuWindow) -> float:
        return c.influxd + c.redis + c.client
    by_cpu = [(total(a) + total(b)) / 2 / total(w) for a, w, b in
              zip(cpus["raw 4"], cpus["writer"], cpus["raw 4 after"], strict=True)]
    rows.append(f"\nCPU per point of raw 4 (influxd + client) / CPU per point of the writer run (influxd + writer + "
                f"redis-server), per round: {', '.join(f'{r:.0%}' for r in by_cpu)}; median "
                f"**{statistics.median(by_cpu):.0%}**: the ratio both would reach with the same cores busy (what "
                f"other processes on the machine take changes the cores left, not this).")
    rows.append("\nCPU over each timed window (medians of the rounds; `/proc/<pid>/stat` of influxd and redis-server, "
                "`process_time` of this process, which is the raw client or the writer):\n\n"
                "| run | points/s | influxd CPU per point | client / writer CPU per point | redis-server CPU per point "
                "| cores busy |\n|---|---:|---:|---:|---:|---:|")
    for kind in order:
        med = statistics.median
        rows.append(f"| {kind} | {med(results[kind]):,.0f} | {med(c.influxd for c in cpus[kind]) / n * 1e6:.2f} us | "
                    f"{med(c.client for c in cpus[kind]) / n * 1e6:.2f} us | "
                    f"{med(c.redis for c in cpus[kind]) / n * 1e6:.2f} us | {med(c.cores for c in cpus[kind]):.2f} |")
    return rows


# -- 3. 2.x / 3.x client side ----------------------------------------------------------------------------------

SINK = """
import sys
from aiohttp import web
async def ok(request):
    await request.read()
    return web.Response(status=204)
app = web.Application(client_max_size=256 * 1024 * 1024)
app.router.add_post("/api/v2/write", ok)
app.router.add_post("/write", ok)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
"""


def start_sink() -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    return subprocess.Popen([sys.executable, "-c", SINK, str(port)], start_new_session=True), \
        f"http://127.0.0.1:{port}"


async def bench_clients(lines: list[str], requests: int) -> list[str]:
    from influxdb_client.client.influxdb_client import InfluxDBClient
    from influxdb_client.client.influxdb_client_async import InfluxDBClientAsync
    from influxdb_client.client.write_api import SYNCHRONOUS

    sink, url = await asyncio.to_thread(start_sink)
    try:
        for _ in range(100):
            try:
                async with aiohttp.ClientSession() as s, s.post(f"{url}/write", data=b"x") as r:
                    if r.status == 204:
                        break
            except aiohttp.ClientError:
                await asyncio.sleep(0.05)
        body = "\n".join(lines[:5000]).encode()
        out: list[str] = []

        async def measure(name: str, send: object) -> None:
            await send()  # type: ignore[operator]
            cpu0, t0 = time.process_time(), time.perf_counter()
            for _ in range(requests):
                await send()  # type: ignore[operator]
            cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
            out.append(f"| {name} | {requests / wall:,.0f} | {cpu / requests * 1e6:,.0f} | "
                       f"{cpu / requests / 5000 * 1e9:,.0f} |")

        async with aiohttp.ClientSession() as http:
            async def plain() -> None:
                async with http.post(f"{url}/api/v2/write", params={"org": "o", "bucket": "b", "precision": "ns"},
                                     data=body, headers={"Authorization": "Token t"}) as resp:
                    await resp.read()
            await measure("aiohttp, plain POST", plain)
        async with InfluxDBClientAsync(url=url, token="t", org="o") as client:
            api = client.write_api()

            async def async_api() -> None:
                await api.write(bucket="b", record=body, write_precision="ns")  # type: ignore[arg-type]
            await measure("influxdb-client async (WriteApiAsync) - used on 2.x/3.x", async_api)
        sync_client = InfluxDBClient(url=url, token="t", org="o")
        sync_api = sync_client.write_api(write_options=SYNCHRONOUS)

        async def sync_in_thread() -> None:
            await asyncio.to_thread(sync_api.write, bucket="b", record=body,
                                    write_precision="ns")  # type: ignore[arg-type]
        await measure("influxdb-client sync (WriteApi SYNCHRONOUS) in a thread", sync_in_thread)
        sync_client.close()
        return out
    finally:
        sink.terminate()
        sink.wait(10)


# -- main ---------------------------------------------------------------------------------------------------

async def main_async(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="mdp-bench-storage-"))
    try:
        await run_all(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the storage run leaves ~300 MB of TSM files


async def run_all(args: argparse.Namespace, tmp: Path) -> None:
    base = capture_trades()
    span_s = (base[-1].ts_event - base[0].ts_event) / NS
    rate = len(base) / span_s
    print(f"\nMachine: {platform.node()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"{args.influxd_version}\n")
    if "storage" in args.only:
        stored = await bench_storage(tmp, args.ticks, args.candles)
        print("### Bytes on disk per point (InfluxDB 1.6.7, after full compaction)\n")
        print("| tier | data | points | series | shards | bytes on disk | bytes per point |\n"
              "|---|---|---:|---:|---:|---:|---:|")
        for s in stored:
            print(f"| {s.tier} | {s.what} | {s.points:,} | {s.series:,} | {s.shards} | {s.bytes:,} | "
                  f"{s.bytes / s.points:.1f} |")
        print(f"\n### The plan's 1 GB a month ({MONTH_DAYS}-day month; 1 GB = 10^9 bytes)\n")
        print("| tier | bytes/point | points per symbol per month | per symbol per month | symbols in 1 GB/month "
              "| per symbol at steady state |\n|---|---:|---:|---:|---:|---:|")
        for row in budget_rows(stored, rate):
            print(row)
    if "throughput" in args.only:
        rows = await bench_throughput(tmp, args.writer_trades, args.rounds)
        print(f"\n### Write throughput into InfluxDB 1.6.7, {args.writer_trades:,} real trades per run, points/s "
              f"({args.rounds} rounds)\n")
        print("| path | points/s per round | median |\n|---|---:|---:|")
        for row in rows:
            print(row)
    if "clients" in args.only:
        lines = encode_trades(list(ticks(5000, base, time.time_ns())))
        rows = await bench_clients(lines, args.client_requests)
        print(f"\n### 2.x/3.x write path, client side: {args.client_requests} requests of 5,000 lines to a 204 sink\n")
        print("| client | requests/s | CPU us per request | CPU ns per line |\n|---|---:|---:|---:|")
        for row in rows:
            print(row)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.bench_storage")
    parser.add_argument("--only", default="storage,throughput,clients")
    parser.add_argument("--ticks", type=int, default=1_000_000, help="trades stored for the bytes-per-tick figure")
    parser.add_argument("--candles", type=int, default=1_000_000, help="candles stored per timeframe")
    parser.add_argument("--writer-trades", type=int, default=500_000, help="trades per throughput run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--client-requests", type=int, default=200)
    args = parser.parse_args()
    args.only = set(args.only.split(","))
    args.influxd_version = subprocess.run(["influxd", "version"], check=True, capture_output=True,
                                          text=True).stdout.strip()
    uvloop.run(main_async(args))  # the services' event loop (common.bus.stage.service_main)


if __name__ == "__main__":
    main()
