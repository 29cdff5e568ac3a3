"""One test per exchange fault (issue 3), end to end from the collector's side: the simulator injects the fault
(real wire format, real ccxt.pro), the collector runs against it on real Redis, and where the loss can be
repaired the validator, normalizer, InfluxDB writer and gap repair service run too, on real InfluxDB and
PostgreSQL. Each test asserts the expected behaviour and that nothing is lost: trade ids continuous in what
was published, or a Gap whose window covers the loss followed by its repair (every trade in InfluxDB once),
or, where no exchange API can repair it, an explicit alert. What a user sees for each: docs/faults.md."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import msgspec
import redis.asyncio as aioredis

from common.bus import streams
from common.bus.stage import Service
from common.config import Settings, load_settings
from common.exchanges.ratelimit import RateBudget, limit_for
from common.stores.influx import InfluxClient
from schemas import Alert, Codec, Gap, OrderBook, Trade
from services.collector.service import Collector
from services.gap_repair.service import GapRepair
from services.influx_writer.service import InfluxWriter
from services.normalizer.service import Normalizer
from services.validator.service import Validator
from simulator import Simulator, start_simulator
from tools.localstores import LocalServer

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")
SPOT = "BTC/USDT"
TRADES = ("btcusdt@trade",)


# ---------------------------------------------------------------------------------------------------------
# Arrange: the pipeline around one collector


@dataclass
class Rig:
    """A collector (and the stages asked for) running against a simulator until the block ends."""

    settings: Settings
    collector: Collector
    redis: aioredis.Redis
    stages: list[Service] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def until(self, what: str, check: Callable[[], Awaitable[T] | T], timeout: float = 30.0) -> T:
        """Poll `check` until it is true, within a bounded deadline; a crashed stage fails at once."""
        deadline = time.monotonic() + timeout
        while True:
            for task in self.tasks:
                if task.done():
                    task.result()
                    raise AssertionError(f"{task.get_name()} stopped while waiting for {what}")
            value = check()
            if asyncio.iscoroutine(value):
                value = await value
            if value:
                return value  # type: ignore[return-value]
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {value!r})")
            await asyncio.sleep(0.05)

    def trades(self, n: int) -> Callable[[], bool]:
        base = self.collector.count["trades"]
        return lambda: self.collector.count["trades"] >= base + n

    def service(self, kind: type[Service]) -> Any:
        return next(s for s in self.stages if isinstance(s, kind))


def fault_settings(sim: Simulator, redis_server: LocalServer, influx_server: LocalServer, dsn: str,
                   exchange: str, **fields: Any) -> Settings:
    """config/simulator.toml on the test's stores and simulator, one exchange, its fields overridden."""
    env = {"MDP_REDIS_URL": redis_server.url, "MDP_INFLUX_URL": influx_server.url, "MDP_POSTGRES_DSN": dsn,
           "MDP_INFLUX_DATABASE": f"faults_{uuid.uuid4().hex[:8]}", "MDP_SIMULATOR_URL": sim.rest_url}
    settings = load_settings(ROOT / "config" / "simulator.toml", env=env)
    ex = msgspec.structs.replace(settings.exchange(exchange), **fields)
    repair = msgspec.structs.replace(settings.gap_repair, retries=1, trades_page=500)
    return msgspec.structs.replace(settings, exchanges=[ex], gap_repair=repair)


@asynccontextmanager
async def running(settings: Settings, exchange: str, stages: tuple[type[Service], ...] = ()) -> AsyncIterator[Rig]:
    redis = aioredis.Redis.from_url(settings.redis.url)
    await redis.flushdb()
    rig = Rig(settings, Collector(settings, "t", exchange=exchange), redis, [s(settings, "t") for s in stages])
    for svc in [rig.collector, *rig.stages]:
        rig.tasks.append(asyncio.create_task(svc.run(rig.stop), name=f"{svc.name}"))
    try:
        yield rig
    finally:
        rig.stop.set()
        await asyncio.wait_for(asyncio.gather(*rig.tasks, return_exceptions=True), 30)
        for svc in [rig.collector, *rig.stages]:
            await svc.close()
        await redis.aclose()


REPAIR_PATH = (Validator, Normalizer, InfluxWriter, GapRepair)


# ---------------------------------------------------------------------------------------------------------
# Reading what the pipeline did


async def events(redis: aioredis.Redis, stream: str) -> list[Any]:
    codec = Codec()
    return [e for _, f in await redis.xrange(stream) for e in codec.decode_entry(f)]


async def raw_trades(rig: Rig, exchange: str = "binance") -> list[Trade]:
    """The trades the collector published on raw:{exchange} (not those gap_repair publishes there, marked
    quality "gap.repaired")."""
    return [e for e in await events(rig.redis, streams.raw(exchange))
            if isinstance(e, Trade) and "gap.repaired" not in e.quality]


async def gaps(rig: Rig, channel: str = "trades") -> list[Gap]:
    return [g for g in await events(rig.redis, streams.GAPS) if isinstance(g, Gap) and g.channel == channel]


async def alerts(rig: Rig) -> list[Alert]:
    return [a for a in await events(rig.redis, streams.ALERTS) if isinstance(a, Alert)]


async def stored_trade_ids(settings: Settings, exchange: str = "binance", symbol: str = SPOT) -> list[int]:
    """Every trade id InfluxDB holds for the series, one per stored point (a doubled trade shows twice)."""
    async with InfluxClient(settings.influx) as influx:
        await influx.ensure_tiers()
        rows = await influx.query_timeframe(
            "ticks", "SELECT trade_id FROM trades WHERE exchange = $ex AND symbol = $sym",
            {"ex": exchange, "sym": symbol}, exact=True)
    return sorted(int(r["trade_id"]) for r in rows)


def ids_of(trades: list[Trade]) -> list[int]:
    return [int(t.trade_id) for t in trades]


def missing(ids: list[int]) -> list[int]:
    present = set(ids)
    return [i for i in range(min(ids), max(ids) + 1) if i not in present]


def covers(gap: Gap, lost: list[int]) -> bool:
    return (gap.first_missing_id, gap.last_missing_id) == (str(lost[0]), str(lost[-1])) and \
        len(lost) == lost[-1] - lost[0] + 1


async def repaired_to_completeness(rig: Rig, sim: Simulator) -> list[int]:
    """Wait until InfluxDB holds every trade the replay sent (live or repaired); the stored ids."""
    await sim.wait_finished(60)
    expected = [t.id for t in sim.expected_trades()]

    async def complete() -> bool:
        return await stored_trade_ids(rig.settings) == expected

    await rig.until("every replayed trade in InfluxDB", complete, timeout=60)
    return expected


# ---------------------------------------------------------------------------------------------------------
# Binance spot: disconnect, stall, halt, malformed frame, duplicates, reorder, clock skew


async def test_disconnect_gap_is_repaired_to_completeness(redis_server: LocalServer, influx_server: LocalServer,
                                                          postgres_dsn: str) -> None:
    """Every socket closed and dials refused for 0.5 s: a Gap names the missing ids; the repair fills them."""
    async with start_simulator(speed=10, max_trades=2000, wait_for_streams=TRADES) as sim:
        cfg = fault_settings(sim, redis_server, influx_server, postgres_dsn, "binance", channels=["trades"])
        async with running(cfg, "binance", REPAIR_PATH) as rig:
            await rig.until("trades flowing", rig.trades(100))
            sim.inject("disconnect", down_s=0.5)
            await rig.until("the collector reconnected and published a Gap", lambda: rig.collector.count["gaps"])
            expected = await repaired_to_completeness(rig, sim)
            repair = rig.service(GapRepair).counters()
            published = await raw_trades(rig)
            trade_gaps = await gaps(rig)
    lost = missing(ids_of(published))
    assert lost, "the replay ran on while the socket was down: ids are missing from what was published"
    assert any(covers(g, lost) for g in trade_gaps), (lost[:3], trade_gaps)
    assert rig.collector.count["reconnects"] >= 1
    assert repair["trades_repaired"] == len(lost) and repair["gaps_unrepaired"] == 0
    assert len(expected) == len(set(expected)), "each trade stored once"


async def test_stall_while_answering_pings_is_reconnected_and_loses_nothing(
        redis_server: LocalServer, influx_server: LocalServer, postgres_dsn: str) -> None:
    """The server holds every message but keeps the socket and answers pings (ccxt alone waits forever): the
    watchdog reconnects after stall_s; the held messages come after, so the Gap says no id is missing (unless a
    reconnect of the watchdog overlaps the resumption: then the Gap names the ids and they are repaired)."""
    async with start_simulator(speed=10, max_trades=2000, wait_for_streams=TRADES) as sim:
        cfg = fault_settings(sim, redis_server, influx_server, postgres_dsn, "binance", channels=["trades"],
                             stall_s={"trades": 0.8})
        async with running(cfg, "binance", (GapRepair,)) as rig:
            await rig.until("trades flowing", rig.trades(100))
            sim.inject("stall", seconds=2.0, mode="pause")
            await rig.until("the watchdog saw the stall", lambda: rig.collector.count["stalls"])
            await rig.until("data flowing again", rig.trades(100))
            trade_gaps, found, repair = await settled_outcome(rig)
            published = ids_of(await raw_trades(rig))
    assert len(trade_gaps) == 1 and trade_gaps[0].reason.startswith("stall: no trades message")
    assert_lost_only_what_was_repaired(published, trade_gaps[0], found, repair)


async def settled_outcome(rig: Rig) -> tuple[list[Gap], list[Alert], dict[str, int]]:
    """The trade Gaps, the repair's gap.* alerts and its counters once every Gap has its outcome."""
    async def settled() -> bool:
        acked = rig.service(GapRepair).counters()["acked"]
        return acked >= 1 and acked == len(await redis_entries(rig, streams.GAPS))

    await rig.until("every Gap's outcome", settled)
    found = [a for a in await alerts(rig) if a.rule.startswith("gap.")]
    return await gaps(rig), found, rig.service(GapRepair).counters()


async def redis_entries(rig: Rig, stream: str) -> list[Any]:
    return list(await rig.redis.xrange(stream))


def assert_lost_only_what_was_repaired(published: list[int], gap: Gap, found: list[Alert],
                                       repair: dict[str, int]) -> None:
    """Nothing lost: either the ids are continuous and the Gap is explained (one info alert), or exactly the
    missing ids are named by the Gap and repaired (one gap.repaired alert). Never unrepaired, no storm."""
    assert len(published) == len(set(published)), "no trade published twice"
    lost = missing(published)
    if not lost:
        assert "no trade id missing" in gap.reason
        assert [(a.rule, a.severity) for a in found] == [("gap.explained", "info")], found
    else:
        assert covers(gap, lost), (lost, gap)
        assert [(a.rule, a.severity) for a in found] == [("gap.repaired", "info")], found
        assert repair["trades_repaired"] == len(lost)
    assert repair["gaps_unrepaired"] == 0


async def test_halt_reconnects_quietly_and_the_gap_is_explained_without_an_alert_storm(
        redis_server: LocalServer, influx_server: LocalServer, postgres_dsn: str) -> None:
    """A trading halt (no message at all for 3 s, pings answered): the watchdog reconnects (possibly several
    times), one Gap covers the whole silence, and it is explained: nothing was missed. One info alert. (The
    window is in exchange time: a halted market's clock shows no trade in it, however long the wall clock.)"""
    async with start_simulator(speed=10, max_trades=2000, wait_for_streams=TRADES) as sim:
        cfg = fault_settings(sim, redis_server, influx_server, postgres_dsn, "binance", channels=["trades"],
                             stall_s={"trades": 0.8})
        async with running(cfg, "binance", (GapRepair,)) as rig:
            await rig.until("trades flowing", rig.trades(100))
            sim.inject("halt", seconds=3.0)
            await rig.until("the watchdog saw the silence", lambda: rig.collector.count["stalls"])
            await rig.until("trading resumed", rig.trades(100), timeout=20)
            trade_gaps, found, repair = await settled_outcome(rig)
            published = ids_of(await raw_trades(rig))
            every_alert = await alerts(rig)
    assert len(trade_gaps) == 1, "one Gap for the whole halt, however many reconnects"
    assert rig.collector.count["stalls"] >= 1, "the silence was noticed and the socket redialled"
    assert_lost_only_what_was_repaired(published, trade_gaps[0], found, repair)
    assert len(every_alert) == 1, "no alert storm"


async def test_malformed_frame_fails_the_connection_the_collector_reconnects_and_the_gap_is_repaired(
        redis_server: LocalServer, influx_server: LocalServer, postgres_dsn: str) -> None:
    """A frame that is not JSON: the collector's frame reader (services/collector/frame_tap.py, which replaces
    ccxt.pro's receive loop on the connections of the decode fast path) logs it with its traceback and fails
    the connection as ccxt fails one on an error; the collector reconnects at once and the Gap's window is
    repaired. (ccxt.pro's own loop dies on such a frame and leaves watch_trades hanging with the socket open
    until the stall watchdog drops it: still the case with `fast_path = {trades = false}`.)"""
    async with start_simulator(speed=10, max_trades=2000, wait_for_streams=TRADES) as sim:
        cfg = fault_settings(sim, redis_server, influx_server, postgres_dsn, "binance", channels=["trades"],
                             stall_s={"trades": 0.8})
        async with running(cfg, "binance", REPAIR_PATH) as rig:
            await rig.until("trades flowing", rig.trades(100))
            sim.inject("malformed_ws", count=1, stream="@trade")
            await rig.until("the collector reconnected", lambda: rig.collector.count["reconnects"])
            await rig.until("data flowing again", rig.trades(50))
            await repaired_to_completeness(rig, sim)
            repair = rig.service(GapRepair).counters()
            published = ids_of(await raw_trades(rig))
            trade_gaps = await gaps(rig)
    lost = missing(published)
    assert lost, "the malformed frame and what came while ccxt hung were not published"
    assert any(covers(g, lost) for g in trade_gaps), (lost[:3], trade_gaps)
    assert repair["trades_repaired"] == len(lost) and repair["gaps_unrepaired"] == 0


async def test_duplicated_messages_publish_no_trade_twice(redis_server: LocalServer, influx_server: LocalServer,
                                                           postgres_dsn: str) -> None:
    async with start_simulator(speed=10, max_trades=1000, wait_for_streams=TRADES) as sim:
        cfg = fault_settings(sim, redis_server, influx_server, postgres_dsn, "binance", channels=["trades"])
        async with running(cfg, "binance") as rig:
            await rig.until("trades flowing", rig.trades(100))
            sim.inject("duplicate", count=20, stream="@trade")
            await sim.wait_finished(30)
            total = len(sim.expected_trades())
            await rig.until("every trade published", lambda: rig.collector.count["trades"] >= total)
            published = ids_of(await raw_trades(rig))
    assert sim.status()["faults"]["duplicate"] == 0, "the 20 duplicates were sent"
    assert published == [t.id for t in sim.expected_trades()], "each trade once, in order"


async def test_reordered_messages_lose_nothing_and_the_order_is_restored_downstream(
        redis_server: LocalServer, influx_server: LocalServer, postgres_dsn: str) -> None:
    """Swapped trade messages: every trade is still published once; the validator passes the late one (an id
    below the last one changes nothing) and InfluxDB, keyed by time, holds each trade once."""
    async with start_simulator(speed=10, max_trades=1000, wait_for_streams=TRADES) as sim:
        cfg = fault_settings(sim, redis_server, influx_server, postgres_dsn, "binance", channels=["trades"])
        async with running(cfg, "binance", (Validator, Normalizer, InfluxWriter)) as rig:
            await rig.until("trades flowing", rig.trades(100))
            sim.inject("reorder", count=20, stream="@trade")
            expected = [t.id for t in sim.expected_trades()]
            await sim.wait_finished(30)

            async def stored() -> bool:
                return await stored_trade_ids(cfg) == expected

            await rig.until("every trade stored once", stored)
            published = ids_of(await raw_trades(rig))
            md = ids_of([e for e in await events(rig.redis, streams.market_data("trade", "binance", SPOT))
                         if isinstance(e, Trade)])
    assert sorted(published) == expected, "nothing lost, nothing doubled by the collector"
    assert published != expected, "the swaps reached the collector (published in arrival order)"
    assert sorted(md) == expected


async def test_clock_skew_future_trades_are_rejected_then_refetched_past_ones_flagged_stale(
        redis_server: LocalServer, influx_server: LocalServer, postgres_dsn: str) -> None:
    """The validator's time rules on the exchange's clock: an event time beyond now + max_future_skew_s (5 s)
    is rejected (`time.future`, error alert); its trade.id_gap rule then names the rejected ids in a Gap and
    the repair fetches them over REST (where this simulator's times are not skewed). One older than
    stale_after_s (60 s) passes flagged (`time.stale`, warning alert). The replay is shifted to now (to the
    minute: its first trade lands 0-60 s before now) and runs at real speed, so that only the injected skews
    move times: at speed N > 1 the event times run ahead of the clock by (N-1)/N of the replayed time and
    crossed the 5 s bound on their own before the skew (seen once in CI). +120 s puts every trade sent after it
    60-120 s ahead; -120 s puts the later ones 120-180 s behind. 300 trades span 19 s of the recording."""
    async with start_simulator(speed=1, max_trades=300, wait_for_streams=TRADES, shift_to_now=True) as sim:
        cfg = fault_settings(sim, redis_server, influx_server, postgres_dsn, "binance", channels=["trades"])
        async with running(cfg, "binance", REPAIR_PATH) as rig:
            await rig.until("trades flowing", rig.trades(50))
            sim.inject("clock_skew", ms=120_000)
            await rig.until("skewed trades", rig.trades(50))
            sim.inject("clock_skew", ms=-120_000)
            await rig.until("trades from the past", rig.trades(50))

            async def judged() -> list[Alert]:
                found = await alerts(rig)
                return found if {"time.future", "time.stale", "gap.repaired"} <= {a.rule for a in found} else []

            found = await rig.until("the validator's verdicts and the repair", judged)
            await repaired_to_completeness(rig, sim)
            published = await raw_trades(rig)
            valid = [e for e in await events(rig.redis, streams.valid("binance")) if isinstance(e, Trade)]
            trade_gaps = await gaps(rig)
    now = time.time_ns()
    future = sorted(int(t.trade_id) for t in published if t.ts_event > t.ts_recv + 5_000_000_000)
    # (their repaired copies, fetched over REST with the exchange's unskewed times and marked "gap.repaired",
    # flow through the validator like live trades)
    received_live = [t for t in valid if "gap.repaired" not in t.quality]
    assert future and not set(future) & set(ids_of(received_live)), "future-stamped trades never pass"
    assert all(a.severity == "error" for a in found if a.rule == "time.future")
    assert any((g.first_missing_id, g.last_missing_id) == (str(future[0]), str(future[-1])) for g in trade_gaps)
    stale = [t for t in valid if "time.stale" in t.quality]
    assert stale and all(t.ts_event < now - 60_000_000_000 for t in stale), "past trades pass, flagged stale"


async def test_sequence_gap_in_depth_resyncs_the_book_to_the_exchanges(
        redis_server: LocalServer, influx_server: LocalServer, postgres_dsn: str) -> None:
    """Depth diffs go missing (U/pu stop chaining): ccxt throws, the collector publishes a `book` Gap and
    resyncs from a new snapshot; once the replay is over the published book equals the exchange's."""
    depth = "btcusdt@depth@100ms"
    async with start_simulator(speed=10, max_trades=1500, wait_for_streams=(depth,)) as sim:
        cfg = fault_settings(sim, redis_server, influx_server, postgres_dsn, "binance", channels=["book"],
                             book_depth=10, book_max_per_s=20.0)
        async with running(cfg, "binance", (GapRepair,)) as rig:
            await rig.until("books flowing", lambda: rig.collector.count["books"] >= 3)
            sim.inject("sequence_gap", count=2, stream="@depth")
            await rig.until("the book resynced", lambda: rig.collector.count["book_resyncs"])
            await sim.wait_finished(60)
            exchange_book = await rest_depth(sim, 10)

            async def final_book() -> OrderBook | None:
                books = [e for e in await events(rig.redis, streams.raw("binance")) if isinstance(e, OrderBook)]
                last = books[-1] if books else None
                return last if last and last.sequence == exchange_book["lastUpdateId"] else None

            book = await rig.until("the book at the exchange's last update", final_book)
            await rig.until("the book Gap explained", lambda: rig.service(GapRepair).counters()["gaps_explained"])
            book_gaps = await gaps(rig, "book")
    assert len(book_gaps) >= 1 and "sequence break" in book_gaps[0].reason
    assert [[Decimal(p), Decimal(q)] for p, q in exchange_book["bids"]] == [list(lv) for lv in book.bids]
    assert [[Decimal(p), Decimal(q)] for p, q in exchange_book["asks"]] == [list(lv) for lv in book.asks]


async def rest_depth(sim: Simulator, limit: int) -> dict[str, Any]:
    url = f"{sim.rest_url}/api.binance.com/api/v3/depth?symbol=BTCUSDT&limit={limit}"
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        return await resp.json()  # type: ignore[no-any-return]


# ---------------------------------------------------------------------------------------------------------
# Binance spot REST: 5xx, 429 (418: tests/test_collector_resilience.py::test_418_stops_rest_calls_for_the_ban)


async def test_5xx_on_load_markets_is_retried_not_fatal(redis_server: LocalServer, influx_server: LocalServer,
                                                       postgres_dsn: str) -> None:
    """Two 503s with Binance's -1001 body (ccxt 4.5.90 raises OperationFailed, not NetworkError): load_markets
    is retried with backoff and the collector starts; the failures show in its error counter and detail."""
    async with start_simulator(speed=10, max_trades=1000, wait_for_streams=TRADES) as sim:
        sim.inject("http_error", status=503, count=2)
        cfg = fault_settings(sim, redis_server, influx_server, postgres_dsn, "binance", channels=["trades"])
        async with running(cfg, "binance") as rig:
            await rig.until("trades flowing after the retries", rig.trades(50), timeout=20)
    assert rig.collector.count["errors"] == 2 and rig.collector.count["markets"] > 0
    assert sim.status()["rest"]["status"].get("503") == 2


async def test_5xx_on_candle_fallback_is_retried_and_candles_continue(
        redis_server: LocalServer, influx_server: LocalServer, postgres_dsn: str) -> None:
    """While the candle socket is quiet, candles come from REST; two 503s there cost two polls, not the feed."""
    async with start_simulator(speed=0, max_trades=300, wait_for_streams=("btcusdt@kline_1m",)) as sim:
        cfg = fault_settings(sim, redis_server, influx_server, postgres_dsn, "binance", channels=["candles"],
                             ws_stall_s=0.3, rest_poll_s=0.1, stall_s={"candles": 30.0})
        async with running(cfg, "binance") as rig:
            await rig.until("polling REST", lambda: rig.collector.count["rest_polls"] >= 2)
            sim.inject("http_error", status=503, count=2)
            await rig.until("both 503s answered", lambda: sim.status()["rest"]["status"].get("503") == 2)
            polls = rig.collector.count["rest_polls"]
            await rig.until("polls go on", lambda: rig.collector.count["rest_polls"] >= polls + 3)
    assert rig.collector.count["errors"] == 2


async def test_429_holds_rest_for_retry_after_through_the_shared_budget(
        redis_server: LocalServer, influx_server: LocalServer, postgres_dsn: str) -> None:
    """A 429 with Retry-After: every process's REST to the exchange waits it out (the budget in Redis), so the
    exchange never escalates to a 418 ban."""
    async with start_simulator(speed=0, max_trades=300, wait_for_streams=("btcusdt@kline_1m",)) as sim:
        cfg = fault_settings(sim, redis_server, influx_server, postgres_dsn, "binance", channels=["candles"],
                             ws_stall_s=0.3, rest_poll_s=0.1, stall_s={"candles": 30.0})
        async with running(cfg, "binance") as rig:

            def klines() -> int:
                return int(sim.status()["rest"]["requests"].get("klines", 0))

            await rig.until("polling REST", lambda: klines() >= 2)
            sim.inject("http_error", status=429, retry_after=1, count=1)
            budget = RateBudget(rig.redis, "binance", limit_for("binance"))

            async def held() -> bool:
                return (await budget.state()).hold_kind == "cooldown"

            await rig.until("the 429's hold in the shared budget", held)
            state = await budget.state()
            during = klines()
            while time.time() * 1000 < state.hold_until_ms - 50:  # the whole Retry-After: not one REST call
                assert klines() == during, "a REST call went out during Retry-After"
                await asyncio.sleep(0.02)
            await rig.until("REST resumed", lambda: klines() >= during + 3)
    assert state.cooldowns == 1 and rig.collector.rest is not None and rig.collector.rest.stats.throttled_429 == 1
    assert "418" not in sim.status()["rest"]["status"]
    assert rig.collector.rest is not None and rig.collector.rest.stats.banned_418 == 0


async def test_418_at_start_holds_every_rest_call_for_the_ban_then_the_collector_starts(
        redis_server: LocalServer, influx_server: LocalServer, postgres_dsn: str) -> None:
    """An IP ban (418, Retry-After 2 s) on the first load_markets: no REST call reaches the exchange until the
    ban ends (the hold is in the shared budget), then markets load and trades flow. (A ban while running:
    tests/test_collector_resilience.py::test_418_stops_rest_calls_for_the_ban.)"""
    async with start_simulator(speed=10, max_trades=1000, wait_for_streams=TRADES) as sim:
        sim.inject("http_error", status=418, retry_after=2, count=1)
        cfg = fault_settings(sim, redis_server, influx_server, postgres_dsn, "binance", channels=["trades"])
        async with running(cfg, "binance") as rig:
            await rig.until("the ban seen", lambda: sim.status()["rest"]["status"].get("418"))
            budget = RateBudget(rig.redis, "binance", limit_for("binance"))

            async def held() -> Any:  # the simulator counts the 418 as it sends it, the budget once it arrived
                found = await budget.state()
                return found if found.hold_kind == "ban" else None

            state = await rig.until("the ban held in the shared budget", held, timeout=5)
            during = sum(sim.status()["rest"]["requests"].values())
            while time.time() * 1000 < state.hold_until_ms - 50:
                assert sum(sim.status()["rest"]["requests"].values()) == during, "a REST call during the ban"
                await asyncio.sleep(0.02)
            await rig.until("trades flowing after the ban", rig.trades(50), timeout=20)
    assert state.hold_kind == "ban" and sim.status()["rest"]["status"]["418"] == 1, "banned once, never again"
    assert rig.collector.rest is not None and rig.collector.rest.stats.banned_418 == 1
    assert rig.collector.count["markets"] > 0


# ---------------------------------------------------------------------------------------------------------
# The other venues: a disconnect on each; trades there cannot be fetched by id, so the loss is an alert


VENUES = {  # exchange: (symbol, market types, replay speed)
    "binanceusdm": ("BTC/USDT:USDT", ["linear"], 10.0),
    "coinbase": ("SKL/USD", ["spot"], 4.0),
    "hyperliquid": ("BTC/USDC:USDC", ["swap"], 10.0),
}


async def venue_disconnect(exchange: str, redis_server: LocalServer, influx_server: LocalServer,
                           dsn: str) -> tuple[list[Gap], list[Alert]]:
    symbol, types, speed = VENUES[exchange]
    async with start_simulator(speed=speed, loop=True, venues=(exchange,)) as sim:
        cfg = fault_settings(sim, redis_server, influx_server, dsn, exchange, symbols=[symbol],
                             market_types=types, channels=["trades"])
        async with running(cfg, exchange, (GapRepair,)) as rig:
            await rig.until("trades flowing", rig.trades(3))
            sim.venues[exchange].inject("disconnect", down_s=0.5)
            await rig.until("a Gap after the reconnect", lambda: rig.collector.count["gaps"], timeout=40)
            await rig.until("data flowing again", rig.trades(3), timeout=40)
            await rig.until("the Gap handled", lambda: rig.service(GapRepair).counters()["gaps_in"])

            async def answered() -> list[Alert]:
                return [a for a in await alerts(rig) if a.rule.startswith("gap.")]

            found = await rig.until("the repair's verdict on the bus", answered)
            trade_gaps = await gaps(rig)
            published = await raw_trades(rig, exchange)
    ids = [t.trade_id for t in published]
    assert len(ids) == len(set(ids)), "no trade published twice across the reconnect"
    assert rig.collector.count["reconnects"] >= 1
    return trade_gaps, found


async def test_binanceusdm_disconnect_gap_names_the_ids_and_is_repaired_by_id(
        redis_server: LocalServer, influx_server: LocalServer, postgres_dsn: str) -> None:
    trade_gaps, found = await venue_disconnect("binanceusdm", redis_server, influx_server, postgres_dsn)
    assert len(trade_gaps) == 1 and "last_trade_id=" in trade_gaps[0].reason
    gap = trade_gaps[0]
    assert len(found) == 1, found
    alert = found[0]
    if gap.first_missing_id:  # USD-M serves trades by id (fromId, /fapi/v1/historicalTrades): fetched and stored
        missing = int(gap.last_missing_id) - int(gap.first_missing_id) + 1
        assert (alert.rule, alert.severity, alert.values["repaired"]) == ("gap.repaired", "info", str(missing)), alert
    else:  # the ids on both sides were consecutive
        assert "no trade id missing" in gap.reason and alert.rule == "gap.explained", (gap, alert)


async def test_coinbase_disconnect_is_an_explicit_alert_never_silence(
        redis_server: LocalServer, influx_server: LocalServer, postgres_dsn: str) -> None:
    trade_gaps, found = await venue_disconnect("coinbase", redis_server, influx_server, postgres_dsn)
    assert len(trade_gaps) == 1 and "no trade id missing" not in trade_gaps[0].reason, "ids are not sequential"
    assert_unrepaired_or_explained(trade_gaps[0], found)


async def test_hyperliquid_disconnect_is_an_explicit_alert_never_silence(
        redis_server: LocalServer, influx_server: LocalServer, postgres_dsn: str) -> None:
    trade_gaps, found = await venue_disconnect("hyperliquid", redis_server, influx_server, postgres_dsn)
    assert len(trade_gaps) == 1 and "no trade id missing" not in trade_gaps[0].reason, "ids are not sequential"
    assert_unrepaired_or_explained(trade_gaps[0], found)


def assert_unrepaired_or_explained(gap: Gap, found: list[Alert]) -> None:
    """A window with ids missing (or unknown) is an error `gap.unrepaired` naming the window; only a Gap whose
    ids on both sides are consecutive may be explained (info). Either way an alert, never silence."""
    assert len(found) == 1, found
    alert = found[0]
    assert (alert.exchange, alert.symbol) == (gap.exchange, gap.symbol)
    if "no trade id missing" in gap.reason:
        assert (alert.rule, alert.severity) == ("gap.explained", "info")
    else:
        assert (alert.rule, alert.severity) == ("gap.unrepaired", "error")
        assert "no trade-history-by-id endpoint" in alert.reason
        assert alert.values["start"] == str(gap.start)
