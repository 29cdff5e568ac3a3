"""`mdp backfill` against the simulator through the real ccxt, into a real InfluxDB and PostgreSQL ledger:
plan, history caps, ledger merging, resume after SIGKILL, idempotent reruns, the validation fast path."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis

from common.config import Settings, load_settings
from common.domain.admit import clears_candle_rules
from common.domain.normalize import SymbolMap, normalize
from common.domain.span import (
    NS,
    Span,
    SpanError,
    from_datetime,
    merge,
    parse_when,
    requested_span,
    subtract,
)
from common.exchanges.events import candle_event
from common.history.backfill import BackfillRequest, run_backfill
from common.history.ingest import Checker, rest_candle
from common.history.ledger import EVIDENCE_CAP, Ledger, Series, join_evidence
from common.history.plan import plan_backfill
from common.history.report import coverage_report
from common.stores.influx import InfluxClient, InfluxQueryError
from simulator import Simulator, start_simulator
from tools.localstores import LocalServer

ROOT = Path(__file__).resolve().parent.parent
MIN = 60 * NS
NOW = from_datetime(datetime(2026, 11, 23, 12, 0, 30))
OUTAGE = from_datetime(datetime(2023, 3, 24, 13, 0))  # a real Binance outage hour


def ts(text: str) -> int:
    return parse_when(text, NOW)


# ---------------------------------------------------------------------------------------------------------
# Fixtures: settings for the simulator, a fresh InfluxDB database and an empty ledger per test


def sim_settings(sim: Simulator, redis_server: LocalServer, influx_server: LocalServer, dsn: str,
                 database: str) -> tuple[Settings, dict[str, str]]:
    env = {"MDP_REDIS_URL": redis_server.url, "MDP_INFLUX_URL": influx_server.url, "MDP_POSTGRES_DSN": dsn,
           "MDP_INFLUX_DATABASE": database, "MDP_SIMULATOR_URL": sim.rest_url,
           "MDP_CONFIG": str(ROOT / "config" / "simulator.toml")}
    return keep_everything(load_settings(ROOT / "config" / "simulator.toml", env=env)), env


def keep_everything(settings: Settings) -> Settings:
    """The settings with every storage tier keeping its data forever: the tests write 2022-2023 candles,
    older than the default 1m tier's retention (docs/storage.md)."""
    if not hasattr(settings.influx, "retention"):
        return settings
    forever = {tier: "inf" for tier in settings.influx.retention}
    return msgspec.structs.replace(settings, influx=msgspec.structs.replace(settings.influx, retention=forever))


def retention_toml(settings: Settings, base_config: str = "") -> str:
    if not hasattr(settings.influx, "retention") or "\nretention = " in base_config:
        return ""  # the base config sets every tier's retention itself (config/simulator.toml keeps them all)
    return "\n[influx.retention]\n" + "".join(f'{tier} = "inf"\n' for tier in settings.influx.retention)


async def ohlcv(influx: InfluxClient) -> tuple[str, str | None]:
    """(FROM clause, database) of 1m candles: their storage tier's retention policy when there are tiers."""
    if hasattr(influx, "tier_for"):
        await influx.connect()
        database, rp = influx.tier_for("1m")
        return (f'"{rp}".ohlcv' if rp else "ohlcv"), database
    return "ohlcv", None


@pytest.fixture
async def ledger(postgres_dsn: str) -> AsyncIterator[Ledger]:
    led = await Ledger.connect(postgres_dsn)
    await led.pool.execute("DELETE FROM coverage")
    yield led
    await led.close()


async def stored(settings: Settings, start: int, end: int) -> list[dict[str, Any]]:
    async with InfluxClient(settings.influx) as influx:
        source, database = await ohlcv(influx)
        return await influx.query(
            f"SELECT open, high, low, close, volume FROM {source} WHERE exchange = $ex AND symbol = $sym "
            "AND timeframe = '1m' AND time >= $start AND time < $end",
            params={"ex": "binance", "sym": "BTC/USDT", "start": start, "end": end}, exact=True, database=database)


def as_served(sim: Simulator, start: int, end: int) -> list[dict[str, Any]]:
    """What the simulator's REST serves for [start, end), as InfluxDB returns it (exact decimals)."""
    out = []
    t = start
    while t < end:
        page = sim.candles_between("BTCUSDT", t // 1_000_000, end // 1_000_000 - 1, 1000)
        if not page:
            break
        for c in page:
            out.append({"time": c.open_time * 1_000_000, **{k: Decimal(getattr(c, k)).normalize() for k in
                                                              ("open", "high", "low", "close", "volume")}})
        t = page[-1].open_time * 1_000_000 + MIN
    return out


def normalized(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: (Decimal(v).normalize() if k != "time" else v) for k, v in r.items()} for r in rows]


# ---------------------------------------------------------------------------------------------------------
# Pure parts


def test_dates_durations_and_requested_span() -> None:
    assert ts("2y") == NOW - 730 * 86_400 * NS
    assert ts("90d") == NOW - 90 * 86_400 * NS and ts("12h") == NOW - 12 * 3600 * NS
    assert ts("2024-01-01") == ts("2024-01-01T00:00:00Z") == 1704067200 * NS
    assert ts("2024-01-01 12:30+02:00") == (1704067200 + 10 * 3600 + 1800) * NS
    with pytest.raises(SpanError, match="neither a duration"):
        ts("yesterday")
    # The candle holding --since is included; the end never passes the last closed candle.
    span = requested_span("10m", None, NOW, "1m")
    assert span == Span(NOW - NOW % MIN - 10 * MIN, NOW - NOW % MIN)
    with pytest.raises(SpanError, match="nothing to fetch"):
        requested_span("2024-01-02", "2024-01-01", NOW, "1m")


def test_span_algebra() -> None:
    a, b, c = Span(0, 10), Span(10, 20), Span(30, 40)
    assert merge([c, b, a]) == [Span(0, 20), Span(30, 40)]
    assert subtract([Span(0, 40)], [Span(5, 10), Span(20, 35)]) == [Span(0, 5), Span(10, 20), Span(35, 40)]
    assert subtract([a], [Span(-5, 50)]) == []


def test_plan_pages_skip_what_the_ledger_knows() -> None:
    wanted = Span(ts("2024-01-01"), ts("2024-01-03"))  # 2,880 candles
    known = [Span(ts("2024-01-01T10:00"), ts("2024-01-02"))]
    plan = plan_backfill("binance", "BTC/USDT", "1m", wanted, NOW, known)
    assert plan.todo == [Span(ts("2024-01-01"), ts("2024-01-01T10:00")), Span(ts("2024-01-02"), ts("2024-01-03"))]
    assert [p.span.duration // MIN for p in plan.pages] == [600, 1000, 440]
    assert plan.candles_todo == 2040 and plan.candles_known == 840 and not plan.notices


def test_hyperliquid_plan_says_history_is_capped_and_fetches_what_exists() -> None:
    # Arrange: two years wanted from an exchange that keeps only its latest 5,000 candles.
    wanted = requested_span("2y", None, NOW, "1m")

    # Act
    plan = plan_backfill("hyperliquid", "BTC/USDC:USDC", "1m", wanted, NOW)

    # Assert: the notice says so; only the last 5,000 minutes are planned, in one request; the rest is a hole.
    text = " ".join(plan.notices)
    assert "only the latest 5,000 candles" in text and "record" in text and "forward" in text
    assert plan.fetchable is not None and plan.fetchable.end == wanted.end
    assert plan.candles_todo == 4999  # the 5,000th-oldest candle still forming at NOW is not closed
    assert len(plan.pages) == 1
    assert plan.candles_unfetchable == wanted.duration // MIN - 4999
    assert "beyond the exchange's history" in plan.describe()
    # Binance keeps everything: no notice.
    assert not plan_backfill("binance", "BTC/USDT", "1m", wanted, NOW).notices


def test_fast_path_agrees_with_the_live_rules(real_data: Path) -> None:
    # Arrange: real rows of the daily zip as ccxt returns them, plus broken ones of every kind.
    import csv
    import io
    import zipfile
    with zipfile.ZipFile(real_data / "binance-spot-1m-daily" / "BTCUSDT-1m-2020-01-01.zip") as zf:
        rows = [[int(r[0]), *(float(x) for x in r[1:6])]
                for r in csv.reader(io.StringIO(zf.read("BTCUSDT-1m-2020-01-01.csv").decode()))]
    broken = [
        [rows[0][0], None, None, None, None, None], [rows[1][0], 0.0, 1.0, 0.0, 1.0, 1.0],
        [rows[2][0], 10.0, 9.0, 8.0, 9.5, 1.0], [rows[3][0], 10.0, 11.0, 9.0, 10.0, -1.0],
        [rows[4][0] + 1, 10.0, 11.0, 9.0, 10.0, 1.0], [4_102_444_800_000, 10.0, 11.0, 9.0, 10.0, 1.0],
        [rows[5][0], 10.0, 11.0, 9.0, 12.0, 1.0], [rows[6][0], float("nan"), 11.0, 9.0, 10.0, 1.0],
        [rows[7][0], 1e-05, 2e-05, 1e-05, 2e-05, 0.0],
    ]
    settings = load_settings(ROOT / "config" / "simulator.toml")
    now = time.time_ns()
    step = MIN

    # Act: the fast path (canonical candles) and the full live path (collector's candle + rules + normalize).
    every = rows + broken

    def live(i: int) -> Any:
        return candle_event("binance", "BTC/USDT", "1m", every[i], True, now, "rest")

    checker = Checker(settings, "backfill")
    assert checker.fast
    fast = checker.check([rest_candle("binance", "BTC/USDT", "1m", step, r, now) for r in every], now, True, step,
                         live)
    slow = Checker(settings, "backfill").check([live(i) for i in range(len(every))], now)

    # Assert: same stored candles, same rejections, same alerts (rule and values); clean rows took the fast path.
    assert checker.fast_passed == len(rows) + 1
    assert fast.stored == slow.stored
    assert len(fast.stored) == len(rows) + 1  # the tiny-price row is valid
    assert fast.rejected == slow.rejected == len(broken) - 1
    assert [(a.rule, a.values) for a in fast.alerts] == [(a.rule, a.values) for a in slow.alerts]
    assert {a.rule for a in fast.alerts} >= {"fields.missing", "price.non_positive", "ohlc.consistency",
                                             "volume.negative", "candle.misaligned", "time.future"}
    # And a clean candle from rest_candle is exactly what the live normalizer makes of the collector's one.
    live = normalize(candle_event("binance", "BTC/USDT", "1m", rows[0], True, now, "rest"), SymbolMap())[0]
    assert live == rest_candle("binance", "BTC/USDT", "1m", step, rows[0], now)
    assert clears_candle_rules(live, now)


# ---------------------------------------------------------------------------------------------------------
# The ledger


async def test_ledger_merges_ranges_and_covered_cuts_empty(ledger: Ledger) -> None:
    s = Series("binance", "BTC/USDT", "1m")
    ev = {"kind": "rest_no_candles", "reason": "none returned"}

    # Act: two touching covered ranges, an overlapping one, an empty range later partly covered by an archive.
    await ledger.record(s, "rest", [Span(0, 10 * MIN)])
    await ledger.record(s, "rest", [Span(10 * MIN, 20 * MIN)], [(Span(20 * MIN, 30 * MIN), ev)])
    await ledger.record(s, "rest", [Span(5 * MIN, 15 * MIN), Span(40 * MIN, 50 * MIN)])
    await ledger.record(s, "archive", [Span(22 * MIN, 24 * MIN)])
    await ledger.record(s, "rest", [], [(Span(30 * MIN, 35 * MIN), {"kind": "rest_no_candles", "reason": "b"})])

    # Assert
    rows = await ledger.rows(s)
    assert [(st, src, sp) for st, src, sp, _ in rows] == [
        ("covered", "rest", Span(0, 20 * MIN)),
        ("empty", "rest", Span(20 * MIN, 22 * MIN)),
        ("covered", "archive", Span(22 * MIN, 24 * MIN)),
        ("empty", "rest", Span(24 * MIN, 35 * MIN)),
        ("covered", "rest", Span(40 * MIN, 50 * MIN)),
    ]
    assert [e["reason"] for e in rows[3][3]] == ["none returned", "b"]
    cov = await ledger.coverage(s)
    assert cov.holes() == [Span(35 * MIN, 40 * MIN)]
    report = coverage_report(cov, None, None, NOW)
    assert (report.covered, report.empty, report.holes, report.slots) == (32, 13, 5, 50)

    # Re-recording what is recorded changes nothing, not even updated_at.
    before = await ledger.pool.fetch("SELECT * FROM coverage ORDER BY id")
    await ledger.record(s, "rest", [Span(0, 20 * MIN), Span(41 * MIN, 42 * MIN)], [(Span(30 * MIN, 31 * MIN), ev)])
    assert await ledger.pool.fetch("SELECT * FROM coverage ORDER BY id") == before
    # An empty range inside covered data is not recorded as empty.
    await ledger.record(s, "rest", [], [(Span(2 * MIN, 3 * MIN), ev)])
    assert await ledger.pool.fetch("SELECT * FROM coverage ORDER BY id") == before


def test_evidence_is_capped() -> None:
    many = [{"reason": str(i)} for i in range(EVIDENCE_CAP + 3)]
    joined = join_evidence(many[:5], many[5:])
    assert len(joined) == EVIDENCE_CAP + 1 and joined[-1] == {"more": 3}
    assert join_evidence(joined, [{"reason": "x"}])[-1] == {"more": 4}


# ---------------------------------------------------------------------------------------------------------
# Backfill against the simulator


@pytest.mark.unshipped_data  # the simulator's history derived from the unlicensed 1h series
async def test_backfill_stores_validated_candles_records_the_outage_and_reruns_idempotently(
        redis_server: LocalServer, influx_server: LocalServer, postgres_dsn: str, ledger: Ledger) -> None:
    # Arrange: three days around a real Binance outage (2023-03-24 13:00-14:00 has no 1h bar).
    async with start_simulator(speed=0, max_trades=100, start="manual") as sim:
        settings, _env = sim_settings(sim, redis_server, influx_server, postgres_dsn, f"bf_{uuid.uuid4().hex[:8]}")
        request = BackfillRequest("binance", ["BTC/USDT"], ["1m"], "2023-03-23", "2023-03-26", progress=False)
        lines: list[str] = []
        start, end = ts("2023-03-23"), ts("2023-03-26")

        # Act
        stats = await run_backfill(settings, request, say=lines.append)
        rows_after_first = await ledger.pool.fetch("SELECT * FROM coverage ORDER BY id")
        again = await run_backfill(settings, request, say=lines.append)

        # Assert: every served candle is stored exactly (values as served), the outage is known empty with
        # evidence, nothing else is missing; the rerun fetches nothing and changes nothing.
        assert stats.candles == 3 * 1440 - 60 and stats.empty_candles == 60 and stats.rejected == 0
        assert stats.throttled_429 == 0 and stats.requests == 5 + 1  # 5 pages + the markets load
        assert normalized(await stored(settings, start, end)) == as_served(sim, start, end)
        cov = await ledger.coverage(Series("binance", "BTC/USDT", "1m"))
        assert cov.covered_all() == [Span(start, OUTAGE), Span(OUTAGE + 60 * MIN, end)]
        assert [e.span for e in cov.empty] == [Span(OUTAGE, OUTAGE + 60 * MIN)]
        evidence = cov.empty[0].evidence[0]
        assert evidence["kind"] == "rest_no_candles" and evidence["before"] == "2023-03-24T12:59:00Z"
        assert evidence["after"] == "2023-03-24T14:00:00Z"
        assert again.requests == 0 and again.pages == 0
        assert any("nothing to fetch" in line for line in lines)
        assert await ledger.pool.fetch("SELECT * FROM coverage ORDER BY id") == rows_after_first


@pytest.mark.unshipped_data  # the simulator's history derived from the unlicensed 1h series
async def test_backfill_survives_429_and_malformed_answers(
        redis_server: LocalServer, influx_server: LocalServer, postgres_dsn: str, ledger: Ledger) -> None:
    async with start_simulator(speed=0, max_trades=100, start="manual") as sim:
        settings, _env = sim_settings(sim, redis_server, influx_server, postgres_dsn, f"bf_{uuid.uuid4().hex[:8]}")
        sim.inject("malformed_klines", count=1)
        request = BackfillRequest("binance", ["BTC/USDT"], ["1m"], "2022-06-01", "2022-06-02", concurrency=1,
                                  progress=False)

        async def throttle_soon() -> None:
            while sim.status()["rest"]["requests"].get("klines", 0) < 1:
                await asyncio.sleep(0.001)
            sim.inject("http_error", status=429, retry_after=1)

        # Act
        stats, _ = await asyncio.gather(run_backfill(settings, request, say=lambda _: None), throttle_soon())

        # Assert: one 429 waited out, the malformed answer asked again; every candle stored, none rejected.
        assert stats.throttled_429 == 1 and stats.rejected == 0 and stats.candles == 1440
        assert len(await stored(settings, ts("2022-06-01"), ts("2022-06-02"))) == 1440


@pytest.mark.unshipped_data  # the simulator's history derived from the unlicensed 1h series
async def test_backfill_resumes_after_sigkill(redis_server: LocalServer, influx_server: LocalServer,
                                              postgres_dsn: str, ledger: Ledger, tmp_path: Path) -> None:
    # Arrange: 20 days (29 pages) at a budget slowed to 5 requests/s, so the process is killed mid-way.
    async with start_simulator(speed=0, max_trades=100, start="manual") as sim:
        settings, env = sim_settings(sim, redis_server, influx_server, postgres_dsn, f"bf_{uuid.uuid4().hex[:8]}")
        config = tmp_path / "slow.toml"
        base = (ROOT / "config" / "simulator.toml").read_text()
        config.write_text(base + "\n[backfill]\nconcurrency = 2\nwrite_pages = 1\n"
                          "[backfill.ratelimit]\nweight_per_minute = { binance = 640 }\n" + retention_toml(settings, base))
        env = {**os.environ, **env, "MDP_CONFIG": str(config)}
        args = [sys.executable, "-m", "common.cli", "backfill", "--exchange", "binance", "--symbol", "BTC/USDT",
                "--since", "2023-03-10", "--until", "2023-03-30", "--no-progress"]
        series = Series("binance", "BTC/USDT", "1m")
        start, end = ts("2023-03-10"), ts("2023-03-30")
        redis = aioredis.Redis.from_url(redis_server.url)
        await redis.delete("ratelimit:binance")
        await redis.aclose()

        # Act 1: start, wait until some pages are recorded, SIGKILL.
        proc = await asyncio.create_subprocess_exec(*args, env=env, cwd=ROOT, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while not (await ledger.coverage(series)).covered_all():
            assert proc.returncode is None and time.monotonic() < deadline
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        partial = (await ledger.coverage(series)).known()

        # Act 2: the same command again.
        proc = await asyncio.create_subprocess_exec(*args, env=env, cwd=ROOT, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.STDOUT)
        out, _ = await proc.communicate()

        # Assert: the first run stopped part-way; the second fetched only the rest; the result is complete and
        # identical to what the exchange serves.
        assert partial and sum(s.duration for s in partial) < end - start
        assert proc.returncode == 0, out.decode()
        text = out.decode()
        assert "already in the ledger" in text
        todo = int(text.split("candles to fetch")[0].rsplit(":", 1)[1].replace(",", "").strip())
        assert 0 < todo < (end - start) // MIN
        cov = await ledger.coverage(series)
        assert cov.known() == [Span(start, end)] and cov.holes(Span(start, end)) == []
        assert normalized(await stored(settings, start, end)) == as_served(sim, start, end)
        assert set(sim.status()["rest"]["status"]) == {"200"}


async def test_plan_only_fetches_nothing(redis_server: LocalServer, influx_server: LocalServer,
                                         postgres_dsn: str, ledger: Ledger) -> None:
    async with start_simulator(speed=0, max_trades=100, start="manual") as sim:
        settings, _env = sim_settings(sim, redis_server, influx_server, postgres_dsn, "bf_plan")
        lines: list[str] = []
        stats = await run_backfill(settings, BackfillRequest("binance", ["BTC/USDT", "ETH/USDT"], ["1m"], "3d",
                                                             plan_only=True), say=lines.append)
        assert len(stats.plans) == 2 and all(p.candles_todo > 4000 for p in stats.plans)
        assert sim.status()["rest"]["requests"] == {}
        assert sum(line.startswith("plan:") for line in lines) == 2


async def test_history_older_than_the_storage_tier_keeps_is_not_fetched(
        redis_server: LocalServer, influx_server: LocalServer, postgres_dsn: str, ledger: Ledger) -> None:
    # Arrange: the default tiers (1m candles kept 90 days) and a request for 2023.
    env = {"MDP_REDIS_URL": redis_server.url, "MDP_INFLUX_URL": influx_server.url, "MDP_POSTGRES_DSN": postgres_dsn}
    settings = load_settings(ROOT / "config" / "simulator.toml", env=env)
    # config/simulator.toml keeps every tier forever (it replays old recordings); this test needs the plan's.
    from common.config import InfluxSettings
    settings = msgspec.structs.replace(settings, influx=msgspec.structs.replace(
        settings.influx, retention=InfluxSettings().retention))
    lines: list[str] = []

    # Act
    stats = await run_backfill(settings, BackfillRequest("binance", ["BTC/USDT"], ["1m"], "2023-03-23",
                                                         "2023-03-26", plan_only=True), say=lines.append)

    # Assert: it says why and plans nothing, rather than fetching what InfluxDB would drop.
    assert stats.plans == []
    assert any("InfluxDB would drop older ones" in line and "influx.retention" in line for line in lines)


# ---------------------------------------------------------------------------------------------------------
# The ledger checked against the store (issue 10, defect 6)


async def coverage_verify(env: dict[str, str], *extra: str) -> tuple[int, str]:
    """`mdp coverage --verify` for binance BTC/USDT 1m, as a user runs it: (exit status, output)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "common.cli", "coverage", "--verify", "--exchange", "binance", "--symbol", "BTC/USDT",
        "--timeframe", "1m", *extra, env={**os.environ, **env}, cwd=ROOT, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode()


async def influx_execute(settings: Settings, statement: str) -> None:
    async with InfluxClient(settings.influx) as influx:
        _source, database = await ohlcv(influx)
        await influx.execute(statement, database=database or settings.influx.database)


@pytest.mark.unshipped_data  # the simulator's history derived from the unlicensed 1h series
async def test_a_wiped_influxdb_is_fetched_again_and_the_ledger_says_so(
        redis_server: LocalServer, influx_server: LocalServer, postgres_dsn: str, ledger: Ledger) -> None:
    async with start_simulator(speed=0, max_trades=100, start="manual") as sim:
        database = f"bf_{uuid.uuid4().hex[:8]}"
        settings, env = sim_settings(sim, redis_server, influx_server, postgres_dsn, database)
        request = BackfillRequest("binance", ["BTC/USDT"], ["1m"], "2023-03-23", "2023-03-26", progress=False)
        start, end = ts("2023-03-23"), ts("2023-03-26")
        series = Series("binance", "BTC/USDT", "1m")
        first = await run_backfill(settings, request, say=lambda _: None)
        rows_after_first = await ledger.rows(series)
        verified_before_wipe = await coverage_verify(env)
        # Arrange: the store is wiped (a new InfluxDB, or DROP DATABASE); the ledger in PostgreSQL still
        # claims the three days
        await influx_execute(settings, f'DROP DATABASE "{database}"')
        with pytest.raises(InfluxQueryError, match="database not found"):
            await stored(settings, start, end)

        # Act
        verified_after_wipe = await coverage_verify(env)
        lines: list[str] = []
        again = await run_backfill(settings, request, say=lines.append)
        verified_after_backfill = await coverage_verify(env)

        # Assert: --verify agrees before the wipe, names the missing candles after it (exit 1); the backfill
        # does not trust the ledger: it fetches everything again, says so, counts it; the ledger ends as it was
        # and the store holds every candle as served.
        assert first.candles == 3 * 1440 - 60
        assert verified_before_wipe[0] == 0 and "agree" in verified_before_wipe[1], verified_before_wipe[1]
        status, text = verified_after_wipe
        assert status == 1, text
        assert "DISAGREE" in text and "missing 4,260 of them" in text
        assert "[2023-03-23T00:00:00Z, 2023-03-24T13:00:00Z)" in text
        assert "[2023-03-24T14:00:00Z, 2023-03-26T00:00:00Z)" in text
        assert again.ledger_corrected == 3 * 1440 - 60 and again.candles == 3 * 1440 - 60
        assert not any("nothing to fetch" in line for line in lines)
        assert any("covered that InfluxDB" in line and "fetched again" in line for line in lines)
        assert normalized(await stored(settings, start, end)) == as_served(sim, start, end)
        assert await ledger.rows(series) == rows_after_first
        assert verified_after_backfill[0] == 0 and "agree" in verified_after_backfill[1]


@pytest.mark.unshipped_data  # the simulator's history derived from the unlicensed 1h series
async def test_candles_deleted_from_a_covered_day_are_found_exactly_and_fetched_again(
        redis_server: LocalServer, influx_server: LocalServer, postgres_dsn: str, ledger: Ledger) -> None:
    async with start_simulator(speed=0, max_trades=100, start="manual") as sim:
        settings, env = sim_settings(sim, redis_server, influx_server, postgres_dsn, f"bf_{uuid.uuid4().hex[:8]}")
        request = BackfillRequest("binance", ["BTC/USDT"], ["1m"], "2023-03-23", "2023-03-26", progress=False)
        start, end = ts("2023-03-23"), ts("2023-03-26")
        hole = Span(ts("2023-03-25T10:00"), ts("2023-03-25T12:00"))
        await run_backfill(settings, request, say=lambda _: None)
        klines_before = sim.status()["rest"]["requests"]["klines"]
        # Arrange: two hours of one covered day are lost from the store (the day still holds 1,320 candles)
        await influx_execute(settings, f"DELETE FROM ohlcv WHERE time >= {hole.start} AND time < {hole.end}")

        # Act
        status, text = await coverage_verify(env)
        json_status, json_text = await coverage_verify(env, "--json")
        unreachable = await coverage_verify({**env, "MDP_INFLUX_URL": "http://127.0.0.1:9"})
        again = await run_backfill(settings, request, say=lambda _: None)

        # Assert: exactly the two hours are named and fetched again (one request), nothing else; --json says
        # the same; an InfluxDB that cannot be asked is exit status 2, not "agree"
        assert status == 1 and "missing 120 of them, in [2023-03-25T10:00:00Z, 2023-03-25T12:00:00Z)." in text, text
        verdict = json.loads(json_text.splitlines()[0])["verify"]
        assert json_status == 1 and verdict == {
            "exchange": "binance", "symbol": "BTC/USDT", "timeframe": "1m", "agrees": False, "covered": 4260,
            "missing_candles": 120, "missing": [["2023-03-25T10:00:00Z", "2023-03-25T12:00:00Z"]]}
        assert unreachable[0] == 2 and "cannot verify" in unreachable[1], unreachable[1]
        assert again.ledger_corrected == 120 and again.candles == 120
        assert sim.status()["rest"]["requests"]["klines"] == klines_before + 1
        assert normalized(await stored(settings, start, end)) == as_served(sim, start, end)
