"""`mdp backfill` against every exchange the simulator serves besides Binance spot, through the real ccxt,
into a real InfluxDB and PostgreSQL ledger: Binance USD-M (1000-candle pages, weight 5), Coinbase (300-candle
pages, no candle for minutes without trades) and Hyperliquid (only the latest 5,000 candles exist).

Per venue: what is stored is exactly what the venue's own REST answers (asked here in its wire format, without
ccxt), a rerun is idempotent, and the ledger tells covered, known-empty and unfetchable ranges apart."""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from common.config import Settings
from common.domain.span import NS, Span, parse_when, requested_span
from common.history.backfill import BackfillRequest, RunStats, run_backfill
from common.history.ledger import Ledger, Series
from common.history.report import coverage_report, render
from common.stores.influx import InfluxClient
from simulator import Simulator, start_simulator
from tests.test_backfill import sim_settings
from tools.localstores import LocalServer

ROOT = Path(__file__).resolve().parent.parent
MIN = 60 * NS
MS = 1_000_000
Row = dict[str, Any]  # {"time": open time ns, "open": Decimal, ...}


@pytest.fixture
async def ledger(postgres_dsn: str) -> AsyncIterator[Ledger]:
    led = await Ledger.connect(postgres_dsn)
    await led.pool.execute("DELETE FROM coverage")
    yield led
    await led.close()


async def until(check: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        await asyncio.sleep(0.05)


async def stored(settings: Settings, exchange: str, symbol: str, span: Span) -> list[Row]:
    """The 1m candles of the series in InfluxDB, exact decimals, by open time."""
    async with InfluxClient(settings.influx) as influx:
        await influx.connect()
        database, rp = influx.tier_for("1m")
        rows = await influx.query(
            f'SELECT open, high, low, close, volume FROM "{rp}".ohlcv WHERE exchange = $ex AND symbol = $sym '
            "AND timeframe = '1m' AND time >= $start AND time < $end",
            params={"ex": exchange, "sym": symbol, "start": span.start, "end": span.end}, exact=True,
            database=database)
    return [{k: (v if k == "time" else Decimal(v).normalize()) for k, v in r.items()} for r in rows]


def at(text: str) -> int:
    """A UTC date or time as ns."""
    return parse_when(text, 0)


def row(t_ms: int, o: str, h: str, lo: str, c: str, v: str) -> Row:
    return {"time": t_ms * MS, "open": Decimal(o).normalize(), "high": Decimal(h).normalize(),
            "low": Decimal(lo).normalize(), "close": Decimal(c).normalize(), "volume": Decimal(v).normalize()}


# The venues' own REST answers in their wire formats (no ccxt), paged by each venue's own limit.

async def usdm_served(session: aiohttp.ClientSession, base: str, span: Span) -> list[Row]:
    out: list[Row] = []
    cursor = span.start // MS
    while cursor < span.end // MS:
        async with session.get(f"{base}/fapi.binance.com/fapi/v1/klines", params={
                "symbol": "BTCUSDT", "interval": "1m", "startTime": cursor, "endTime": span.end // MS - 1,
                "limit": 1000}) as r:
            page = await r.json()
        if not page:
            break
        out += [row(k[0], *k[1:6]) for k in page]
        cursor = page[-1][0] + 60_000
    return out


async def coinbase_served(session: aiohttp.ClientSession, base: str, span: Span) -> list[Row]:
    out: list[Row] = []
    for start in range(span.start // NS, span.end // NS, 300 * 60):
        end = min(start + 300 * 60, span.end // NS)
        async with session.get(f"{base}/api.coinbase.com/api/v3/brokerage/market/products/SKL-USD/candles",
                               params={"granularity": "ONE_MINUTE", "start": start, "end": end}) as r:
            body = await r.json()
        out += [row(int(c["start"]) * 1000, c["open"], c["high"], c["low"], c["close"], c["volume"])
                for c in body["candles"] if int(c["start"]) < end]
    return sorted(out, key=lambda r: r["time"])


async def hyperliquid_served(session: aiohttp.ClientSession, base: str, span: Span) -> list[Row]:
    body = {"type": "candleSnapshot", "req": {"coin": "BTC", "interval": "1m", "startTime": span.start // MS,
                                              "endTime": span.end // MS - 1}}
    async with session.post(f"{base}/api.hyperliquid.xyz/info", json=body) as r:
        return [row(c["t"], c["o"], c["h"], c["l"], c["c"], c["v"]) for c in await r.json()]


Served = Callable[[aiohttp.ClientSession, str, Span], Awaitable[list[Row]]]


async def served(fetch: Served, sim: Simulator, span: Span) -> list[Row]:
    async with aiohttp.ClientSession() as session:
        return await fetch(session, sim.rest_url, span)


def runs_of(rows: list[Row]) -> list[Span]:
    out: list[Span] = []
    for t in (r["time"] for r in rows):
        if out and out[-1].end == t:
            out[-1] = Span(out[-1].start, t + MIN)
        else:
            out.append(Span(t, t + MIN))
    return out


async def backfill_twice(settings: Settings, request: BackfillRequest, ledger: Ledger, series: Series
                         ) -> tuple[RunStats, RunStats, list[str], list[Any], list[Any]]:
    lines: list[str] = []
    first = await run_backfill(settings, request, say=lines.append)
    rows_first = await ledger.pool.fetch("SELECT state, source, span, evidence, updated_at FROM coverage ORDER BY id")
    again = await run_backfill(settings, request, say=lines.append)
    rows_again = await ledger.pool.fetch("SELECT state, source, span, evidence, updated_at FROM coverage ORDER BY id")
    return first, again, lines, rows_first, rows_again


# ---------------------------------------------------------------------------------------------------------


async def test_binanceusdm_backfill_stores_what_the_venue_serves_in_1000_candle_pages(
        redis_server: LocalServer, influx_server: LocalServer, postgres_dsn: str, ledger: Ledger) -> None:
    # Arrange: the USD-M capture (2024-08-08 23:54..23:59) replayed to its end; a day ending with it.
    async with start_simulator(speed=0, start="manual", venues=("binanceusdm",)) as sim:
        venue = sim.venues["binanceusdm"]
        venue.restart()  # type: ignore[attr-defined]
        await until(lambda: venue.state == "finished", "the USD-M replay to finish")  # type: ignore[attr-defined]
        settings, _ = sim_settings(sim, redis_server, influx_server, postgres_dsn, f"bfv_{uuid.uuid4().hex[:8]}")
        span = Span(at("2024-08-08"), at("2024-08-09"))
        series = Series("binanceusdm", "BTC/USDT:USDT", "1m")
        request = BackfillRequest("binanceusdm", [series.symbol], ["1m"], "2024-08-08", "2024-08-09", progress=False)

        # Act
        first, again, lines, rows_first, rows_again = await backfill_twice(settings, request, ledger, series)

        # Assert: exactly the venue's candles, in two pages of 1000 and 440 slots; the rest known empty with
        # the request as evidence; the rerun fetches nothing and changes nothing.
        want = await served(usdm_served, sim, span)
        assert len(want) >= 5
        assert await stored(settings, "binanceusdm", series.symbol, span) == want
        assert first.candles == len(want) and first.empty_candles == 1440 - len(want) and first.rejected == 0
        assert first.pages == 2 and first.throttled_429 == 0
        assert sim.status()["venues"]["binanceusdm"]["rest"]["requests"]["klines"] >= 2
        cov = await ledger.coverage(series)
        assert cov.covered_all() == runs_of(want)
        assert cov.holes(span) == [] and cov.unfetchable == []
        assert all(e.evidence[0]["kind"] == "rest_no_candles" for e in cov.empty)
        assert again.requests == 0 and any("nothing to fetch" in line for line in lines)
        assert rows_again == rows_first


async def test_coinbase_backfill_pages_300_and_records_minutes_without_candles_as_known_empty(
        redis_server: LocalServer, influx_server: LocalServer, postgres_dsn: str, ledger: Ledger) -> None:
    # Arrange: the Coinbase capture (SKL-USD trades 2021-04-17 16:43..16:44) replayed to its end; 12 hours
    # around it: three pages of 300, 300 and 120 minutes, most of them without a candle.
    async with start_simulator(speed=0, start="manual", venues=("coinbase",)) as sim:
        venue = sim.venues["coinbase"]
        venue.restart(speed=0, loop=False)  # type: ignore[attr-defined]
        await venue.wait_finished(60)  # type: ignore[attr-defined]
        settings, _ = sim_settings(sim, redis_server, influx_server, postgres_dsn, f"bfv_{uuid.uuid4().hex[:8]}")
        span = Span(at("2021-04-17T12:00Z"), at("2021-04-18"))
        series = Series("coinbase", "SKL/USD", "1m")
        request = BackfillRequest("coinbase", ["SKL/USD"], ["1m"], "2021-04-17T12:00Z", "2021-04-18",
                                  progress=False)

        # Act
        first, again, lines, rows_first, rows_again = await backfill_twice(settings, request, ledger, series)

        # Assert: the venue's candles exactly; one request per page (an answer of a start..end range proves
        # the minutes it lacks: no confirming requests); every other minute known empty, with the page and
        # the request as evidence; nothing is a hole; the rerun fetches nothing.
        want = await served(coinbase_served, sim, span)
        assert [r["time"] for r in want] == [at("2021-04-17T16:43Z"), at("2021-04-17T16:44Z")]
        assert await stored(settings, "coinbase", "SKL/USD", span) == want
        assert first.candles == 2 and first.empty_candles == 720 - 2 and first.pages == 3
        assert first.requests == 3 + 1  # three pages and the markets load
        assert any("no 1m candle for an interval without trades" in line for line in lines)
        cov = await ledger.coverage(series)
        assert cov.covered_all() == runs_of(want)
        assert cov.empty_all() == [Span(span.start, want[0]["time"]), Span(want[-1]["time"] + MIN, span.end)]
        assert cov.holes(span) == [] and cov.unfetchable == []
        before = next(e for e in cov.empty if e.span.end == want[0]["time"])
        evidence = before.evidence[-1]
        assert evidence["kind"] == "rest_no_candles" and evidence["after"] == "2021-04-17T16:43:00Z"
        assert evidence["page"].startswith("[2021-04-17T12:00:00Z") and "-> 2 rows" in evidence["requests"][0]
        assert again.requests == 0 and rows_again == rows_first


async def test_hyperliquid_backfill_reports_the_cap_fetches_what_exists_and_records_the_rest_unfetchable(
        redis_server: LocalServer, influx_server: LocalServer, postgres_dsn: str, ledger: Ledger,
        tmp_path: Path) -> None:
    # Arrange: the Hyperliquid BTC capture replayed with its trades moved to about 10 minutes ago (whole
    # minutes), so its candles are closed and among the latest 5,000; two years asked for.
    async with start_simulator(speed=0, start="manual", venues=("hyperliquid",)) as sim:
        venue = sim.venues["hyperliquid"]
        venue.restart(speed=0, loop=False)  # type: ignore[attr-defined]
        first_trade_ms = venue.recording.trades[0]["time"]  # type: ignore[attr-defined]
        venue.time_offset_ms = (time.time_ns() // MS - 12 * 60_000 - first_trade_ms) // 60_000 * 60_000  # type: ignore[attr-defined]
        await venue.wait_finished(60)  # type: ignore[attr-defined]
        settings, env = sim_settings(sim, redis_server, influx_server, postgres_dsn, f"bfv_{uuid.uuid4().hex[:8]}")
        series = Series("hyperliquid", "BTC/USDC:USDC", "1m")
        env = {**os.environ, **env}
        args = ["backfill", "--exchange", "hyperliquid", "--symbol", series.symbol, "--since", "2y", "--no-progress"]

        # Act: the command itself (its output is what the user reads), twice, then `mdp coverage`.
        started_ns = time.time_ns()
        out1 = await mdp(args, env)
        out2 = await mdp(args, env)
        coverage_out = await mdp(["coverage", "--exchange", "hyperliquid"], env)
        now_ns = time.time_ns()

        # Assert: the output says older history does not exist there and that it is recorded as unfetchable;
        # the summary counts it.
        assert "only the latest 5,000 candles" in out1 and "older history does not exist on the exchange" in out1
        assert "recorded as unfetchable" in out1 and "forward" in out1
        assert "unfetchable (older than the exchange keeps)" in out1
        # The span the first run asked for, as its plan line prints it (two years up to its last closed minute).
        start = at(out1.split(f"plan: hyperliquid {series.symbol} 1m [")[1].split(",")[0])
        assert requested_span("2y", None, started_ns, "1m").start <= start <= requested_span("2y", None, now_ns, "1m").start
        cov = await ledger.coverage(series)
        known = cov.extent()
        assert known is not None and known.start == start and known.end >= requested_span("2y", None, started_ns, "1m").end
        oldest = cov.unfetchable[0].span.end
        assert started_ns - 5000 * MIN <= oldest <= now_ns - 4999 * MIN
        # What exists was fetched: exactly the venue's candles of the fetchable window.
        fetchable = Span(oldest, known.end)
        want = await served(hyperliquid_served, sim, fetchable)
        assert len(want) == 2
        assert await stored(settings, "hyperliquid", series.symbol, Span(start, known.end + MIN)) == want
        # The ledger: unfetchable before the cap (with the cap as evidence), covered candles, the rest empty.
        assert [e.span for e in cov.unfetchable] == [Span(start, oldest)]
        cap = cov.unfetchable[0].evidence
        assert cap == ({"kind": "exchange_history_cap", "cap_candles": 5000,
                        "reason": "hyperliquid keeps only the latest 5,000 candles per timeframe: older 1m "
                                  "candles do not exist there"},)
        assert cov.covered_all() == runs_of(want)
        assert cov.holes(known) == []
        assert all(e.evidence[0]["kind"] == "rest_no_candles" for e in cov.empty)
        # Rerun: no candle fetched again (at most the minute that closed meanwhile is asked for).
        assert "candles to fetch" in out2 and ("nothing to fetch" in out2 or "done: 0 candles stored" in out2)
        # `mdp coverage` shows the unfetchable range with its reason, not as a hole.
        assert "unfetchable" in coverage_out and "older than the exchange keeps" in coverage_out
        assert "hyperliquid keeps only the latest 5,000 candles" in coverage_out
        report = coverage_report(cov, None, None, now_ns)
        assert report.unfetchable == (oldest - start) // MIN and report.holes == 0
        assert "unfetchable" in render(report)


async def mdp(args: list[str], env: dict[str, str]) -> str:
    """Run `mdp ARGS` (python -m common.cli) to its end; its output, which must end with exit status 0."""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "common.cli", *args, env=env, cwd=ROOT,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    text = out.decode()
    assert proc.returncode == 0, text
    return text
