"""The gap repair service against the simulator through the real ccxt, a real InfluxDB, PostgreSQL ledger and
Redis: candle and trade gaps repaired into raw:{exchange} (once, also across a kill and redelivery), empty
windows proven, what cannot be repaired alerted, holes found by the scan; and the simulator's trade history
endpoints."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar, cast

import aiohttp
import msgspec
import pytest
import redis.asyncio as aioredis

from common.bus import streams
from common.bus.core import Producer
from common.bus.partitions import Partitions
from common.config import Settings, load_settings
from common.domain import quality
from common.domain.normalize import SymbolMap, canonical_decimal, normalize
from common.domain.series import StreamRules
from common.domain.span import NS, Span, from_datetime
from common.domain.state import SeriesBook
from common.history.ledger import Ledger, Series
from common.stores.influx import InfluxClient, encode_candles, encode_trades
from schemas import Alert, Candle, Codec, Event, Gap, Trade
from services.gap_repair.outcome import REPAIRED
from services.gap_repair.published import Published, key_of
from services.gap_repair.repair import Repairer
from services.gap_repair.service import GapRepair, build_repairer
from services.normalizer.service import Normalizer
from services.validator.service import Validator
from simulator import Simulator, start_simulator
from simulator.recording import Trade as RecordedTrade
from tools.localstores import LocalServer

ROOT = Path(__file__).resolve().parent.parent
MIN = 60 * NS
MS = 1_000_000
OUTAGE = from_datetime(datetime(2023, 3, 24, 13, 0))  # a real Binance outage hour: no candles served
DAY = from_datetime(datetime(2020, 1, 2))  # real 1m candles the simulator serves (the shipped daily zip)
T = TypeVar("T")


# ---------------------------------------------------------------------------------------------------------
# Arrange helpers


def gap_settings(sim: Simulator, redis_server: LocalServer, influx_server: LocalServer, dsn: str,
                 **gap_repair: Any) -> Settings:
    env = {"MDP_REDIS_URL": redis_server.url, "MDP_INFLUX_URL": influx_server.url, "MDP_POSTGRES_DSN": dsn,
           "MDP_INFLUX_DATABASE": f"gr_{uuid.uuid4().hex[:8]}", "MDP_SIMULATOR_URL": sim.rest_url}
    settings = load_settings(ROOT / "config" / "simulator.toml", env=env)
    cfg = msgspec.structs.replace(settings.gap_repair, **{"retries": 1, **gap_repair})
    return msgspec.structs.replace(settings, gap_repair=cfg)


@pytest.fixture
async def ledger(postgres_dsn: str) -> AsyncIterator[Ledger]:
    led = await Ledger.connect(postgres_dsn)
    await led.pool.execute("DELETE FROM coverage")
    yield led
    await led.close()


@asynccontextmanager
async def repairer(settings: Settings, ledger: Ledger) -> AsyncIterator[Repairer]:
    redis = aioredis.Redis.from_url(settings.redis.url)
    influx = InfluxClient(settings.influx)
    rep, venues = await build_repairer(settings, redis, Producer(redis, Codec(), settings.bus, "test"), ledger,
                                       influx)
    try:
        yield rep
    finally:
        await venues.close()
        await influx.close()
        await redis.aclose()


@asynccontextmanager
async def running_service(settings: Settings) -> AsyncIterator[GapRepair]:
    service = GapRepair(settings, "test")
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    try:
        yield service
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        await service.close()


async def until(what: str, check: Callable[[], Awaitable[T]], timeout: float = 30.0) -> T:
    """Poll `check` until it returns something true, within a bounded deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {value!r})")
        await asyncio.sleep(0.05)


def candle_gap(start: int, end: int, reason: str = "3 closed 1m bar(s) missing") -> Gap:
    return Gap(exchange="binance", symbol="BTC/USDT", channel="candle:1m", start=start, end=end, reason=reason,
               ts_event=end, ts_recv=time.time_ns())


async def stored_candles(settings: Settings, start: int, end: int) -> list[dict[str, Any]]:
    async with InfluxClient(settings.influx) as influx:
        await influx.ensure_tiers()
        return await influx.query_timeframe(
            "1m", "SELECT open, high, low, close, volume FROM ohlcv WHERE exchange = 'binance' AND "
            "symbol = 'BTC/USDT' AND timeframe = '1m' AND time >= $lo AND time < $hi",
            {"lo": start, "hi": end}, exact=True)


async def stored_trades(settings: Settings) -> list[dict[str, Any]]:
    async with InfluxClient(settings.influx) as influx:
        await influx.ensure_tiers()
        return await influx.query_timeframe(
            "ticks", "SELECT price, amount, side, trade_id FROM trades WHERE exchange = 'binance' AND "
            "symbol = 'BTC/USDT'", exact=True)


def as_served(sim: Simulator, start: int, end: int) -> list[dict[str, Any]]:
    rows = sim.candles_between("BTCUSDT", start // MS, end // MS - 1, 1000)
    return [{"time": c.open_time * MS, **{k: Decimal(getattr(c, k)).normalize() for k in
                                          ("open", "high", "low", "close", "volume")}} for c in rows]


def normalized(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: (Decimal(v).normalize() if k != "time" else v) for k, v in r.items()} for r in rows]


def candle_rows(events: list[Any]) -> list[dict[str, Any]]:
    """Repaired candle events in as_served's form, checking each is shaped as the collector's closed REST bar."""
    out = []
    for c in events:
        assert isinstance(c, Candle) and c.closed and c.source == "rest" and c.quality == REPAIRED
        assert c.timeframe == "1m" and c.ts_event == c.open_time + MIN - MS and c.ts_recv > c.ts_event
        out.append({"time": c.open_time, **{k: Decimal(getattr(c, k)).normalize() for k in
                                            ("open", "high", "low", "close", "volume")}})
    return out


def through_validator_and_normalizer(settings: Settings, events: list[Any]) -> list[Any]:
    """What the validator's per-event rules and the normalizer make of repaired events (none may be rejected)."""
    ctx = quality.CheckContext.from_settings(settings.validation)
    symbols = SymbolMap()
    out = []
    for e in events:
        assert not quality.rejects(quality.check(e, ctx)), e
        out.append(normalize(e, symbols)[0])
    return out


async def store_as_pipeline(settings: Settings, candles: list[Any]) -> None:
    """Store raw candles as the pipeline would (normalizer, then the influx writer's encoder and tier)."""
    symbols = SymbolMap()
    lines: list[str] = []
    encode_candles([normalize(c, symbols)[0] for c in candles], lines)  # type: ignore[misc]
    async with InfluxClient(settings.influx) as influx:
        await influx.ensure_tiers()
        await influx.write_tier(influx.plan.for_timeframe("1m"), lines)


async def raw_events(redis: aioredis.Redis, exchange: str = "binance", stream: str | None = None) -> list[Event]:
    """The events of raw:{exchange} (or of `stream`)."""
    codec = Codec()
    out: list[Event] = []
    for _id, fields in await redis.xrange(stream or streams.raw(exchange)):
        out.extend(codec.decode_entry(fields))
    return out


async def alerts_on_bus(redis: aioredis.Redis) -> list[Alert]:
    codec = Codec()
    out: list[Alert] = []
    for _id, fields in await redis.xrange(streams.ALERTS):
        out.extend(e for e in codec.decode_entry(fields) if isinstance(e, Alert))
    return out


async def replay_dropping(sim: Simulator, after: int, count: int) -> list[int]:
    """Replay the recording flat out, dropping `count` trades once `after` trades went by; the dropped ids."""
    sim.restart()
    while sim.trades_replayed < after:
        await asyncio.sleep(0)
    sim.inject("drop_trades", count=count)
    await sim.wait_finished(60)
    dropped: list[int] = sim.status()["dropped_trade_ids"]
    assert len(dropped) == count
    return dropped


def live_trade(t: RecordedTrade) -> Trade:
    """The trade the live pipeline stores for a recorded one (what the normalizer publishes)."""
    return Trade(exchange="binance", symbol="BTC/USDT", trade_id=str(t.id), price=canonical_decimal(Decimal(t.price)),
                 amount=canonical_decimal(Decimal(t.qty)), side=t.side, ts_event=t.time * MS, ts_recv=t.time * MS)


async def store_live(settings: Settings, trades: list[Trade]) -> None:
    """Write trades as the influx writer does (same encoder, same tier)."""
    async with InfluxClient(settings.influx) as influx:
        await influx.ensure_tiers()
        await influx.write_tier(influx.plan.ticks, encode_trades(trades))


def validator_gaps(settings: Settings, trades: list[Trade]) -> list[Gap]:
    """The Gap events the validator's stream rules publish for this sequence of live trades."""
    rules, book = StreamRules(settings.quality), SeriesBook(10)
    gaps: list[Gap] = []
    for t in trades:
        staging = book.stage()
        gaps.extend(rules.judge(t, staging, t.ts_event).gaps)
        staging.commit()
    return gaps


# ---------------------------------------------------------------------------------------------------------
# Candles


async def test_candle_gap_is_repaired_into_raw_as_the_collectors_closed_candles(
        redis_server: LocalServer, influx_server: LocalServer, postgres_dsn: str, ledger: Ledger) -> None:
    async with start_simulator(speed=0, max_trades=100, start="manual") as sim:
        settings = gap_settings(sim, redis_server, influx_server, postgres_dsn)
        start, end = DAY + 10 * 60 * MIN, DAY + 10 * 60 * MIN + 30 * MIN
        async with repairer(settings, ledger) as rep:
            # Act
            first = await rep.repair_gap(candle_gap(start, end))
            klines_after_first = sim.status()["rest"]["requests"]["klines"]
            stored_before_pipeline = await stored_candles(settings, start, end)
            await store_as_pipeline(settings, first.events)  # the pipeline stored what was published
            again = await rep.repair_gap(candle_gap(start, end))

        # Assert: the 30 candles as the exchange serves them, as events for raw:binance shaped like the
        # collector's closed REST candles; no direct InfluxDB write nor "covered" ledger record (effects before
        # the acknowledgement); an audit alert; once stored, the repeated Gap fetches nothing.
        assert first.state == "repaired" and first.repaired == 30 and first.unrepaired == []
        assert candle_rows(first.events) == as_served(sim, start, end)
        assert len(as_served(sim, start, end)) == 30
        passed = through_validator_and_normalizer(settings, first.events)
        assert len(passed) == 30 and all(c.quality == REPAIRED for c in passed)
        assert stored_before_pipeline == []
        assert await ledger.rows(Series("binance", "BTC/USDT", "1m")) == []
        assert [a.rule for a in first.alerts] == ["gap.repaired"] and first.alerts[0].severity == "info"
        assert "raw:binance" in first.alerts[0].reason
        assert again.state == "explained" and again.repaired == 0 and again.events == []
        assert sim.status()["rest"]["requests"]["klines"] == klines_after_first
        assert rep.counts["gaps_repaired"] == 1 and rep.counts["gaps_explained"] == 1
        assert rep.counts["candles_repaired"] == 30


async def test_a_candle_loss_announced_twice_is_fetched_and_published_once(
        redis_server: LocalServer, influx_server: LocalServer, postgres_dsn: str, ledger: Ledger,
        redis: aioredis.Redis) -> None:
    async with start_simulator(speed=0, max_trades=100, start="manual") as sim:
        settings = gap_settings(sim, redis_server, influx_server, postgres_dsn)
        start, end = DAY + 10 * 60 * MIN, DAY + 10 * 60 * MIN + 30 * MIN
        producer = Producer(redis, Codec(), settings.bus, "test")
        collectors = Gap(exchange="binance", symbol="BTC/USDT", channel="candles", start=start, end=end,
                         reason="websocket reconnect", ts_event=end, ts_recv=end)
        async with running_service(settings) as service:
            # Act: the collector's Gap for its outage, then the validator's for the same candles, before the
            # pipeline stored the repaired ones
            await producer.publish({streams.GAPS: [collectors]})
            await until("the collector's Gap acknowledged", lambda: _acked(service, 1))
            await producer.publish({streams.GAPS: [candle_gap(start, end)]})
            await until("the validator's Gap acknowledged", lambda: _acked(service, 2))
            counters = service.counters()

        # Assert: one request, the 30 candles on raw:binance once; the second Gap is explained
        assert candle_rows(await raw_events(redis)) == as_served(sim, start, end)
        assert sim.status()["rest"]["requests"]["klines"] == 1
        assert counters["gaps_repaired"] == 1 and counters["gaps_explained"] == 1
        assert counters["candles_repaired"] == 30


async def test_a_window_the_exchange_answers_empty_becomes_known_empty_not_an_alert(
        redis_server: LocalServer, influx_server: LocalServer, postgres_dsn: str, ledger: Ledger) -> None:
    async with start_simulator(speed=0, max_trades=100, start="manual") as sim:
        settings = gap_settings(sim, redis_server, influx_server, postgres_dsn)
        async with repairer(settings, ledger) as rep:
            # Act: a Gap over a real Binance outage hour
            out = await rep.repair_gap(candle_gap(OUTAGE, OUTAGE + 60 * MIN, "60 closed 1m bar(s) missing"))

        # Assert
        assert out.state == "empty" and out.empty == 60 and out.repaired == 0
        assert [(a.rule, a.severity) for a in out.alerts] == [("gap.explained", "info")]
        cov = await ledger.coverage(Series("binance", "BTC/USDT", "1m"))
        assert [e.span for e in cov.empty] == [Span(OUTAGE, OUTAGE + 60 * MIN)]
        assert cov.empty[0].evidence[0]["kind"] == "rest_no_candles"
        assert await stored_candles(settings, OUTAGE, OUTAGE + 60 * MIN) == []
        assert rep.counts["gaps_empty"] == 1 and rep.counts["candles_empty"] == 60


async def test_rest_down_after_bounded_retries_is_an_unrepaired_alert(
        redis_server: LocalServer, influx_server: LocalServer, postgres_dsn: str, ledger: Ledger) -> None:
    async with start_simulator(speed=0, max_trades=100, start="manual") as sim:
        settings = gap_settings(sim, redis_server, influx_server, postgres_dsn, retries=1)
        start, end = DAY, DAY + 5 * MIN
        async with repairer(settings, ledger) as rep:
            await rep.candles.venues.get("binance")  # markets loaded: the klines requests are what fails
            sim.inject("http_error", status=503, count=1000)

            # Act
            out = await rep.repair_gap(candle_gap(start, end))

        # Assert: an error alert naming the series, the window, the cause and what to do; nothing recorded
        assert out.state == "unrepaired"
        (alert,) = [a for a in out.alerts if a.rule == "gap.unrepaired"]
        assert alert.severity == "error" and alert.exchange == "binance" and alert.symbol == "BTC/USDT"
        assert alert.values["part_start"] == str(start) and alert.values["part_end"] == str(end)
        assert "REST failed" in alert.reason and "Internal error" in alert.reason and "mdp backfill" in alert.reason
        assert await ledger.rows(Series("binance", "BTC/USDT", "1m")) == []
        assert rep.counts["gaps_unrepaired"] == 1


async def test_scan_finds_and_repairs_a_hole_no_gap_announced(
        redis_server: LocalServer, influx_server: LocalServer, postgres_dsn: str, ledger: Ledger) -> None:
    async with start_simulator(speed=0, max_trades=100, start="manual") as sim:
        settings = gap_settings(sim, redis_server, influx_server, postgres_dsn, scan_lookback_s=7200.0,
                                scan_settle_s=180.0)
        now = DAY + 12 * 60 * MIN + 30 * NS
        stored_from, hole = DAY + 10 * 60 * MIN + 30 * MIN, Span(DAY + 11 * 60 * MIN, DAY + 11 * 60 * MIN + 7 * MIN)
        async with repairer(settings, ledger) as rep:
            # Arrange: the series is recorded from 10:30 on, except 11:00-11:07, and not in the ledger
            for part in (Span(stored_from, hole.start), Span(hole.end, now - now % MIN)):
                out = await rep.candles.repair(Series("binance", "BTC/USDT", "1m"), part, [part], now, "arrange")
                await store_as_pipeline(settings, out.events)
            await ledger.pool.execute("DELETE FROM coverage")
            klines_before = sim.status()["rest"]["requests"]["klines"]

            # Act
            outputs = await rep.scan(now)

        # Assert: only the hole was fetched (not 10:00-10:30, before the series was recorded, nor the last
        # settling minutes); its candles, as served, go to raw:binance with the alert.
        assert rep.counts["scan_holes"] == 1 and rep.counts["scan_repaired"] == 1
        assert sim.status()["rest"]["requests"]["klines"] == klines_before + 1
        assert sorted(outputs) == [streams.ALERTS, "raw:binance"]
        assert candle_rows(outputs["raw:binance"]) == as_served(sim, hole.start, hole.end)
        alerts = outputs[streams.ALERTS]
        assert [a.rule for a in alerts] == ["gap.repaired"] and alerts[0].values["repaired"] == "7"


async def test_scan_does_not_trust_a_ledger_that_claims_candles_influxdb_lacks(
        redis_server: LocalServer, influx_server: LocalServer, postgres_dsn: str, ledger: Ledger) -> None:
    async with start_simulator(speed=0, max_trades=100, start="manual") as sim:
        settings = gap_settings(sim, redis_server, influx_server, postgres_dsn, scan_lookback_s=7200.0,
                                scan_settle_s=180.0)
        now = DAY + 12 * 60 * MIN + 30 * NS
        series = Series("binance", "BTC/USDT", "1m")
        recorded, hole = Span(DAY + 10 * 60 * MIN, now - now % MIN), Span(DAY + 11 * 60 * MIN, DAY + 11 * 60 * MIN + 7 * MIN)
        async with repairer(settings, ledger) as rep:
            # Arrange: the ledger says the whole window is covered (a backfill recorded it), but InfluxDB lost
            # seven minutes of it (wiped and partly reloaded, or another InfluxDB)
            for part in (Span(recorded.start, hole.start), Span(hole.end, recorded.end)):
                out = await rep.candles.repair(series, part, [part], now, "arrange")
                await store_as_pipeline(settings, out.events)
            await ledger.record(series, "rest", covered=[recorded])

            # Act
            outputs = await rep.scan(now)

        # Assert: the store decides: the seven minutes are a hole, fetched and published
        assert rep.counts["scan_holes"] == 1 and rep.counts["scan_repaired"] == 1
        assert candle_rows(outputs.get("raw:binance", [])) == as_served(sim, hole.start, hole.end)


# ---------------------------------------------------------------------------------------------------------
# Trades


def test_what_one_partition_staged_is_neither_remembered_nor_dropped_by_another_partitions_batch() -> None:
    """An instance holding several partitions handles their batches concurrently: partition 1's acknowledgement
    must not remember what partition 2's batch staged (2's commit may yet fail; its redelivered Gap would then
    skip trades never published), and partition 1's retry must not drop partition 2's staging."""
    published = Published()
    eth = [Trade(exchange="binance", symbol="ETH/USDT", trade_id=str(n), price=Decimal(1), amount=Decimal(1),
                 side="buy", ts_event=n, ts_recv=n) for n in (1, 2)]
    btc = [msgspec.structs.replace(t, symbol="BTC/USDT") for t in eth]
    published.stage(eth, partition=1)
    published.stage(btc, partition=2)

    published.discard(1)  # partition 1's batch handled again
    published.stage(eth, partition=1)
    published.commit(1)  # and acknowledged
    assert all(key_of(t) in published for t in eth) and len(published) == 2
    assert all(key_of(t) in published for t in btc), "staged by partition 2, still there"
    published.discard(2)  # partition 2's commit failed: its batch is handled again
    assert not any(key_of(t) in published for t in btc), "never remembered as published"


def assert_repaired_trades(events: list[Event], expected: list[RecordedTrade]) -> None:
    """`events` are the recorded trades, each once, as the collector publishes them, marked repaired."""
    assert all(isinstance(e, Trade) for e in events)
    trades = [e for e in events if isinstance(e, Trade)]
    assert [int(t.trade_id) for t in trades] == [t.id for t in expected]
    for t, r in zip(trades, expected, strict=True):
        assert (t.exchange, t.symbol, t.price, t.amount, t.side, t.ts_event) == (
            "binance", "BTC/USDT", Decimal(r.price), Decimal(r.qty), r.side, r.time * MS)
        assert t.quality == REPAIRED and t.ts_recv > t.ts_event  # received now, over REST: late and saying so


async def test_trade_gap_from_dropped_trades_is_repaired_into_raw_through_the_bus(
        redis_server: LocalServer, influx_server: LocalServer, postgres_dsn: str, ledger: Ledger,
        redis: aioredis.Redis) -> None:
    async with start_simulator(speed=0, max_trades=3000, start="manual") as sim:
        settings = gap_settings(sim, redis_server, influx_server, postgres_dsn, trades_page=100)
        # Arrange: the socket lost 250 trades; the live pipeline stored the others, the validator saw the hole
        dropped = await replay_dropping(sim, after=1000, count=250)
        recorded = sim.expected_trades()
        live = [live_trade(t) for t in recorded if t.id not in set(dropped)]
        await store_live(settings, live)
        gaps = validator_gaps(settings, live)
        assert [(g.channel, g.reason) for g in gaps] == [
            ("trades", f"trade ids {dropped[0]}..{dropped[-1]} missing (250)")]
        producer = Producer(redis, Codec(), settings.bus, "test")
        await producer.publish({streams.GAPS: gaps})

        async with running_service(settings) as service:
            # Act: the service consumes the Gap, then the same loss announced again (the collector and the
            # validator both announce it) before the pipeline stored the repaired trades
            await until("the Gap acknowledged", lambda: _acked(service, 1))
            await producer.publish({streams.GAPS: gaps})
            await until("the second Gap acknowledged", lambda: _acked(service, 2))
            counters = service.counters()

        # Assert: the dropped trades on raw:binance (where the validator reads live ones) exactly once, as
        # recorded; InfluxDB is left to the pipeline; nothing pending; one audit alert
        on_raw = await raw_events(redis)
        assert_repaired_trades(on_raw, [t for t in recorded if t.id in set(dropped)])
        passed = through_validator_and_normalizer(settings, on_raw)
        assert len(passed) == 250 and all(t.quality == REPAIRED for t in passed)
        assert len(await stored_trades(settings)) == len(live)
        assert counters["gaps_repaired"] == 1 and counters["trades_repaired"] == 250
        assert counters["gaps_explained"] == 1 and counters["gaps_unrepaired"] == 0
        assert (await redis.xpending(streams.GAPS, "gap_repair"))["pending"] == 0
        rules = [a.rule for a in await alerts_on_bus(redis)]
        assert rules.count("gap.repaired") == 1 and "gap.unrepaired" not in rules
        assert sim.status()["rest"]["requests"]["historicalTrades"] == 3 * 2  # 250 ids / 100 per page, twice


async def test_repaired_trades_reach_md_trade_through_the_real_validator_and_normalizer_once(
        redis_server: LocalServer, influx_server: LocalServer, postgres_dsn: str, ledger: Ledger,
        redis: aioredis.Redis) -> None:
    async with start_simulator(speed=0, max_trades=3000, start="manual") as sim:
        settings = gap_settings(sim, redis_server, influx_server, postgres_dsn, trades_page=100)
        dropped = await replay_dropping(sim, after=1000, count=250)
        recorded = sim.expected_trades()
        # The collector's trades as it publishes them (received on time), without the 250 the socket lost
        received = [msgspec.structs.replace(live_trade(t), price=Decimal(t.price), amount=Decimal(t.qty))
                    for t in recorded if t.id not in set(dropped)]
        stages = [Validator(settings, "t"), Normalizer(settings, "t"), GapRepair(settings, "t")]
        stop = asyncio.Event()
        tasks = [asyncio.create_task(svc.run(stop)) for svc in stages]
        md = streams.market_data("trade", "binance", "BTC/USDT")

        async def on_md() -> list[Trade]:
            return [e for e in await raw_events(redis, stream=md) if isinstance(e, Trade)]

        try:
            # Act: the live trades go in; the validator announces the hole, gap_repair answers it into
            # raw:binance, and the pipeline carries the repaired trades on
            await Producer(redis, Codec(), settings.bus, "collector:binance").publish({streams.raw("binance"): received})
            await until("every recorded trade on md:trade", lambda: _all_there(on_md, len(recorded)), timeout=60)
            # then every stage idle (nothing read but unacknowledged, nothing unread): what is on md:trade
            # is final, a doubled trade would be there
            await until("the pipeline drained", lambda: _drained(redis, [
                (streams.GAPS, "gap_repair"), (streams.raw("binance"), "validator"),
                (streams.valid("binance"), "normalizer")]))
            trades = await on_md()
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
            for svc in stages:
                await svc.close()

        # Assert: what strategies read holds every trade exactly once, the repaired ones marked as such
        assert sorted(int(t.trade_id) for t in trades) == [t.id for t in recorded]
        repaired = {int(t.trade_id) for t in trades if "gap.repaired" in t.quality}
        assert repaired == set(dropped)


async def test_two_partitioned_instances_repair_each_hole_once_from_the_partitions_gap_stream(
        redis_server: LocalServer, influx_server: LocalServer, postgres_dsn: str, ledger: Ledger,
        redis: aioredis.Redis) -> None:
    """bus.partitions = 4 on one node: the validator announces the hole on its partition's mdp:gaps:p{k}, and
    of two gap_repair instances the one holding partition k repairs it, also when the loss is announced twice
    (in one consumer group of two instances the second announcement could go to the other instance, whose
    memory of what was published is its own, and the trades would be published twice)."""
    async with start_simulator(speed=0, max_trades=3000, start="manual") as sim:
        base = gap_settings(sim, redis_server, influx_server, postgres_dsn, trades_page=100)
        settings = msgspec.structs.replace(base, bus=msgspec.structs.replace(base.bus, partitions=4,
                                                                             heartbeat_interval_s=0.2))
        dropped = await replay_dropping(sim, after=1000, count=250)
        recorded = sim.expected_trades()
        received = [msgspec.structs.replace(live_trade(t), price=Decimal(t.price), amount=Decimal(t.qty))
                    for t in recorded if t.id not in set(dropped)]
        k = streams.partition_of("BTC/USDT", 4)
        gaps_k, raw_k = streams.gaps(k), streams.raw("binance", k)
        repairs = [GapRepair(settings, "a"), GapRepair(settings, "b")]
        stages = [Validator(settings, "t"), Normalizer(settings, "t"), *repairs]
        for svc in repairs:
            assert isinstance(svc.consumer, Partitions)
            svc.consumer.refresh_s = 0.05
        stop = asyncio.Event()
        tasks = [asyncio.create_task(svc.run(stop)) for svc in stages]
        tasks += [asyncio.create_task(svc._heartbeats(stop)) for svc in repairs]  # so each sees the other
        md = streams.market_data("trade", "binance", "BTC/USDT")

        async def on_md() -> list[Trade]:
            return [e for e in await raw_events(redis, stream=md) if isinstance(e, Trade)]

        async def gap_acked(n: int) -> bool:
            return sum(svc.consumer.stats.acked for svc in repairs) >= n

        async def shared() -> bool:  # two partitions each, none held twice
            held = [set(cast(Partitions, svc.consumer).live) for svc in repairs]
            return len(held[0]) == len(held[1]) == 2 and not held[0] & held[1]

        try:
            await until("the two gap_repair instances holding two partitions each", shared, timeout=60)
            holder = next(i for i, svc in enumerate(repairs) if k in cast(Partitions, svc.consumer).live)
            # Act: the live trades go into BTC's partition; the validator announces the hole on mdp:gaps:p{k}
            await Producer(redis, Codec(), settings.bus, "collector:binance").publish({streams.raw_for(
                "binance", "BTC/USDT", 4): received})
            await until("the validator's Gap acknowledged", lambda: gap_acked(1), timeout=60)
            # the same loss announced again (as a collector does for a reconnect) on the same partition
            entries = await redis.xrange(gaps_k)
            assert len(entries) == 1
            await Producer(redis, Codec(), settings.bus, "collector:binance").publish(
                {gaps_k: Codec().decode_entry(entries[0][1])})
            await until("every recorded trade on md:trade", lambda: _all_there(on_md, len(recorded)), timeout=60)
            await until("the second Gap acknowledged", lambda: gap_acked(2), timeout=60)
            await until("the pipeline drained", lambda: _drained(redis, [
                (gaps_k, "gap_repair"), (raw_k, "validator"), (streams.valid("binance", k), "normalizer")]))
            trades = await on_md()
            counters = [svc.counters() for svc in repairs]
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
            for svc in stages:
                await svc.close()

        # Assert: the Gaps went to partition k's stream only; the repaired trades are on raw:binance:p{k} once
        # (published by one instance: the second Gap was answered from its memory), md:trade holds every
        # trade once
        assert await redis.exists(streams.GAPS) == 0
        repaired_on_raw = [e for e in await raw_events(redis, stream=raw_k)
                           if isinstance(e, Trade) and e.quality == REPAIRED]
        assert_repaired_trades(repaired_on_raw, [t for t in recorded if t.id in set(dropped)])
        assert [c["gaps_in"] for c in counters] == [2 if i == holder else 0 for i in range(2)], counters
        assert [c["partitions_held"] for c in counters] == [2, 2]
        assert sum(c["gaps_repaired"] for c in counters) == 1 and sum(c["gaps_explained"] for c in counters) == 1
        assert sorted(int(t.trade_id) for t in trades) == [t.id for t in recorded]


async def test_a_trade_repair_killed_after_its_rest_fetch_publishes_its_trades_once_after_redelivery(
        redis_server: LocalServer, influx_server: LocalServer, postgres_dsn: str, ledger: Ledger,
        redis: aioredis.Redis) -> None:
    async with start_simulator(speed=0, max_trades=3000, start="manual") as sim:
        settings = gap_settings(sim, redis_server, influx_server, postgres_dsn, trades_page=100)
        dropped = await replay_dropping(sim, after=1000, count=250)
        recorded = sim.expected_trades()
        gaps = validator_gaps(settings, [live_trade(t) for t in recorded if t.id not in set(dropped)])
        await Producer(redis, Codec(), settings.bus, "test").publish({streams.GAPS: gaps})

        # Act 1: a gap_repair process dies right after the REST fetch, before its outputs are published and the
        # Gap acknowledged (the task is cancelled there: like SIGKILL, nothing after that point runs)
        doomed = GapRepair(settings, "test")
        fetched = asyncio.Event()
        repair_and_return = doomed.handle

        async def repair_then_die(batch: Any) -> Any:
            await repair_and_return(batch)
            fetched.set()
            await asyncio.Event().wait()

        doomed.handle = repair_then_die  # type: ignore[method-assign]
        task = asyncio.create_task(doomed.run(asyncio.Event()))
        await asyncio.wait_for(fetched.wait(), 30)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await doomed.close()
        published_by_the_dead = await raw_events(redis)
        pending_after_death = (await redis.xpending(streams.GAPS, "gap_repair"))["pending"]

        # Act 2: the restarted process (same consumer name) finds its pending Gap and repairs it again
        async with running_service(settings) as service:
            await until("the redelivered Gap acknowledged", lambda: _acked(service, 1))

        # Assert: fetched twice, published once
        assert published_by_the_dead == [] and pending_after_death == 1
        assert sim.status()["rest"]["requests"]["historicalTrades"] == 3 * 2
        assert_repaired_trades(await raw_events(redis), [t for t in recorded if t.id in set(dropped)])
        assert (await redis.xpending(streams.GAPS, "gap_repair"))["pending"] == 0
        assert [a.rule for a in await alerts_on_bus(redis)].count("gap.repaired") == 1


async def test_trade_gap_given_as_a_time_window_is_located_with_aggtrades(
        redis_server: LocalServer, influx_server: LocalServer, postgres_dsn: str, ledger: Ledger) -> None:
    async with start_simulator(speed=0, max_trades=3000, start="manual") as sim:
        settings = gap_settings(sim, redis_server, influx_server, postgres_dsn, trades_page=50)
        dropped = await replay_dropping(sim, after=500, count=400)
        recorded = sim.expected_trades()
        by_id = {t.id: t for t in recorded}
        await store_live(settings, [live_trade(t) for t in recorded if t.id not in set(dropped)])
        # A collector's reconnect marker: only the time window, from the first lost trade to the next one
        start, end = by_id[dropped[0]].time * MS, by_id[dropped[-1] + 1].time * MS
        gap = Gap(exchange="binance", symbol="BTC/USDT", channel="trades", start=start, end=end,
                  reason="websocket reconnect", ts_event=end, ts_recv=end)
        async with repairer(settings, ledger) as rep:
            # Act
            out = await rep.repair_gap(gap)

        # Assert: the lost trades located by aggregate trades (narrowed: the window holds more than a page),
        # fetched by id, published each once; trades of the window that arrived live (stored, so they reached
        # md:trade:* too) are not sent through the pipeline again
        assert out.state == "repaired" and out.unrepaired == []
        lost_in_window = [i for i in dropped if by_id[i].time * MS < end]
        assert out.repaired == len(lost_in_window)
        assert sim.status()["rest"]["requests"]["aggTrades"] >= 2
        assert_repaired_trades(out.events, [by_id[i] for i in lost_in_window])


async def test_trades_older_than_the_exchange_serves_are_an_unrepaired_alert(
        redis_server: LocalServer, influx_server: LocalServer, postgres_dsn: str, ledger: Ledger) -> None:
    async with start_simulator(speed=0, max_trades=300, start="manual") as sim:
        settings = gap_settings(sim, redis_server, influx_server, postgres_dsn)
        sim.restart()
        await sim.wait_finished(60)
        first = sim.expected_trades()[0]
        gap = Gap(exchange="binance", symbol="BTC/USDT", channel="trades", start=first.time * MS - 10 * NS,
                  end=first.time * MS, reason=f"trade ids {first.id - 20}..{first.id - 1} missing (20)",
                  ts_event=first.time * MS, ts_recv=first.time * MS)
        async with repairer(settings, ledger) as rep:
            # Act
            out = await rep.repair_gap(gap)

        # Assert: nothing invented, an error alert saying the exchange no longer serves those ids
        assert out.state == "unrepaired" and out.repaired == 0
        (alert,) = [a for a in out.alerts if a.rule == "gap.unrepaired"]
        assert alert.severity == "error" and f"{first.id - 20}..{first.id - 1}" in alert.reason
        assert "no longer serves" in alert.reason
        assert out.events == []


async def test_an_id_gap_inside_one_millisecond_is_repaired(
        redis_server: LocalServer, influx_server: LocalServer, postgres_dsn: str, ledger: Ledger) -> None:
    async with start_simulator(speed=0, max_trades=300, start="manual") as sim:
        settings = gap_settings(sim, redis_server, influx_server, postgres_dsn)
        sim.restart()
        await sim.wait_finished(60)
        recorded = sim.expected_trades()
        # Arrange: a trade lost between two neighbours of the same millisecond (the validator's Gap then has
        # start == end)
        i = next(k for k in range(1, len(recorded) - 1) if recorded[k - 1].time == recorded[k + 1].time)
        lost = recorded[i]
        live = [live_trade(t) for t in recorded if t.id != lost.id]
        await store_live(settings, live)
        (gap,) = validator_gaps(settings, live)
        assert gap.start == gap.end and gap.reason == f"trade ids {lost.id} missing (1)"
        async with repairer(settings, ledger) as rep:
            out = await rep.repair_gap(gap)
        assert out.state == "repaired" and out.repaired == 1
        assert_repaired_trades(out.events, [lost])


async def test_snapshot_channel_gap_is_explained_not_an_unrepaired_loss(
        redis_server: LocalServer, influx_server: LocalServer, postgres_dsn: str, ledger: Ledger) -> None:
    async with start_simulator(speed=0, max_trades=100, start="manual") as sim:
        settings = gap_settings(sim, redis_server, influx_server, postgres_dsn)
        gap = Gap(exchange="binance", symbol="BTC/USDT", channel="book", start=DAY, end=DAY + 5 * NS,
                  reason="websocket reconnect", ts_event=DAY, ts_recv=DAY)
        async with repairer(settings, ledger) as rep:
            out = await rep.repair_gap(gap)
        assert out.state == "explained"
        assert [(a.rule, a.severity) for a in out.alerts] == [("gap.explained", "info")]
        assert "snapshot channel" in out.alerts[0].reason


async def test_gaps_with_nothing_missing_are_explained_without_asking_the_exchange(
        redis_server: LocalServer, influx_server: LocalServer, postgres_dsn: str, ledger: Ledger) -> None:
    async with start_simulator(speed=0, max_trades=100, start="manual") as sim:
        settings = gap_settings(sim, redis_server, influx_server, postgres_dsn)

        def trades_gap(start: int, end: int, reason: str) -> Gap:
            return Gap(exchange="binance", symbol="BTC/USDT", channel="trades", start=start, end=end,
                       reason=reason, ts_event=end, ts_recv=end)

        async with repairer(settings, ledger) as rep:
            consecutive = await rep.repair_gap(trades_gap(DAY, DAY + 5 * NS, "websocket reconnect; "
                                                          "last_trade_id=7, first_trade_id_after=8; no trade id missing"))
            instant = await rep.repair_gap(trades_gap(DAY, DAY, "stall"))
            reversed_ = await rep.repair_gap(trades_gap(DAY, DAY - 1, "stall"))

        assert consecutive.state == "explained" and instant.state == "explained"
        assert reversed_.state == "unrepaired" and "reversed" in reversed_.alerts[0].reason
        assert sim.status()["rest"]["requests"] == {}  # nothing was asked


# ---------------------------------------------------------------------------------------------------------
# The simulator's trade history


async def test_simulator_serves_trade_history_only_up_to_the_replay_position() -> None:
    async with start_simulator(speed=0, max_trades=2000, start="manual") as sim, aiohttp.ClientSession() as http:
        url = f"{sim.rest_url}/api.binance.com/api/v3"
        first = sim.expected_trades()[0]

        async def get(path: str, **params: Any) -> tuple[int, Any]:
            async with http.get(f"{url}/{path}", params={"symbol": "BTCUSDT", **params}) as resp:
                return resp.status, await resp.json()

        # Before the replay: nothing has happened yet
        assert await get("historicalTrades", fromId=first.id) == (200, [])
        sim.restart()
        await sim.wait_finished(60)
        status, rows = await get("historicalTrades", fromId=first.id, limit=3)
        assert status == 200 and [r["id"] for r in rows] == [first.id, first.id + 1, first.id + 2]
        assert rows[0] == {"id": first.id, "price": first.price, "qty": first.qty,
                           "quoteQty": rows[0]["quoteQty"], "time": first.time,
                           "isBuyerMaker": first.is_buyer_maker, "isBestMatch": first.best_match}
        assert Decimal(rows[0]["quoteQty"]) == Decimal(first.price) * Decimal(first.qty)
        last = sim.expected_trades()[-1]
        assert (await get("historicalTrades", fromId=last.id + 1))[1] == []  # no future trades
        status, aggs = await get("aggTrades", startTime=first.time, endTime=first.time + 5_000, limit=1000)
        assert status == 200 and aggs[0]["f"] == first.id and aggs[0]["a"] != first.id
        assert all(a["l"] + 1 == b["f"] for a, b in itertools.pairwise(aggs))
        assert (await get("aggTrades", startTime=0, endTime=7_200_000))[1]["code"] == -1127
        assert (await get("aggTrades", fromId=1, startTime=0))[1]["code"] == -1128
        assert (await get("historicalTrades", limit=1001))[1]["code"] == -1130


async def _drained(redis: aioredis.Redis, groups: list[tuple[str, str]]) -> bool:
    """Every (stream, group) has read everything and acknowledged it."""
    for stream, group in groups:
        info = {(g["name"].decode() if isinstance(g["name"], bytes) else g["name"]): g
                for g in await redis.xinfo_groups(stream)}
        g = info.get(group)
        if g is None or g["pending"] or g.get("lag"):
            return False
    return True


async def _all_there(read: Callable[[], Awaitable[list[Trade]]], n: int) -> bool:
    return len(await read()) >= n


async def _acked(service: GapRepair, n: int) -> bool:
    return service.consumer.stats.acked >= n
