"""The collector under faults, against the simulator (real wire format, real ccxt.pro) and real Redis: every
break publishes a Gap with the right window and data flows again; a stalled socket is reconnected by the
watchdog; a 418 stops REST for the ban; many symbols subscribe paced; reconnect waits are bounded."""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from typing import Any

import aiohttp

from common import streams
from common.config import Settings
from common.ratelimit import RateBudget, limit_for
from schemas import Gap, Trade
from services.collector.service import Collector, Pacer, backoff_delay
from services.simulator import start_simulator
from tests.collecting import collector_settings, read

N = 3000
BOTH = ("btcusdt@trade", "btcusdt@kline_1m")


async def wait_for(predicate, task: asyncio.Task[None], timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(timeout):
        while not await predicate():
            if task.done():
                task.result()
            await asyncio.sleep(0.02)


async def stop_collector(collector: Collector, stop: asyncio.Event, task: asyncio.Task[None]) -> None:
    stop.set()
    await asyncio.wait_for(task, 20)
    await collector.close()


def assert_gap_matches_trades(gap: Gap, trades: list[Trade]) -> tuple[Trade, Trade]:
    """The gap spans two consecutive published trades: the last before the break and the first after."""
    for before, after in itertools.pairwise(trades):
        if before.ts_event == gap.start and after.ts_event == gap.end:
            assert f"last_trade_id={before.trade_id}" in gap.reason, gap.reason
            return before, after
    raise AssertionError(f"no consecutive published trades bound the gap {gap}")


async def test_disconnect_publishes_a_gap_with_the_lost_window_and_data_flows_again(settings: Settings, redis) -> None:  # type: ignore[no-untyped-def]
    # Arrange
    async with start_simulator(speed=5, max_trades=N, wait_for_streams=BOTH) as sim:
        cfg = collector_settings(settings, sim.rest_url, sim.ws_url)
        collector = Collector(cfg, "t", exchange="binance")
        stop = asyncio.Event()
        task = asyncio.create_task(collector.run(stop))

        async def started() -> bool:
            return collector.count["trades"] >= 100

        await wait_for(started, task)
        before = collector.count["trades"]
        # Act: the server drops every socket and refuses new ones for 0.5 s; the replay runs on meanwhile
        sim.inject("disconnect", down_s=0.5)

        async def recovered() -> bool:
            return collector.count["trades"] >= before + 200 and collector.count["gaps"] >= 1

        await wait_for(recovered, task)
        await stop_collector(collector, stop, task)
    # Assert
    gaps = [g for g in await read(redis, streams.GAPS) if isinstance(g, Gap) and g.channel == "trades"]
    assert len(gaps) == 1, gaps
    gap = gaps[0]
    assert (gap.exchange, gap.symbol) == ("binance", "BTC/USDT")
    trades = [e for e in await read(redis, streams.raw("binance")) if isinstance(e, Trade)]
    before_t, after_t = assert_gap_matches_trades(gap, trades)
    lost = int(after_t.trade_id) - int(before_t.trade_id) - 1
    assert lost > 0, "the replay ran on while the socket was down"
    assert f"trade ids {int(before_t.trade_id) + 1}..{int(after_t.trade_id) - 1} missing" in gap.reason
    assert (gap.first_missing_id, gap.last_missing_id) == (str(int(before_t.trade_id) + 1),
                                                          str(int(after_t.trade_id) - 1))
    ids = [int(t.trade_id) for t in trades]
    assert ids == sorted(set(ids)), "no trade published twice, none out of order"
    assert collector.count["reconnects"] >= 1


async def test_stalled_socket_is_reconnected_by_the_watchdog_with_a_gap(settings: Settings, redis) -> None:  # type: ignore[no-untyped-def]
    """The server goes silent but keeps the connection and answers pings (ccxt alone would wait forever)."""
    async with start_simulator(speed=5, max_trades=N, wait_for_streams=("btcusdt@trade",)) as sim:
        cfg = collector_settings(settings, sim.rest_url, sim.ws_url, channels=["trades"],
                                 stall_s={"trades": 1.0})
        collector = Collector(cfg, "t", exchange="binance")
        stop = asyncio.Event()
        task = asyncio.create_task(collector.run(stop))

        async def started() -> bool:
            return collector.count["trades"] >= 100

        await wait_for(started, task)
        sim.inject("stall", seconds=2.5, mode="drop")

        async def recovered() -> bool:
            return collector.count["gaps"] >= 1 and collector.count["stalls"] >= 1

        await wait_for(recovered, task)
        flowing = collector.count["trades"]

        async def flows() -> bool:
            return collector.count["trades"] >= flowing + 100

        await wait_for(flows, task)
        await stop_collector(collector, stop, task)
    gaps = [g for g in await read(redis, streams.GAPS) if isinstance(g, Gap)]
    assert len(gaps) == 1 and gaps[0].reason.startswith("stall: no trades message"), gaps
    trades = [e for e in await read(redis, streams.raw("binance")) if isinstance(e, Trade)]
    before_t, after_t = assert_gap_matches_trades(gaps[0], trades)
    assert int(after_t.trade_id) > int(before_t.trade_id) + 1, "the stall dropped trades: ids jump"
    assert gaps[0].end - gaps[0].start >= 1_000_000_000, "the window covers the silence"


async def test_418_stops_rest_calls_for_the_ban(settings: Settings, redis) -> None:  # type: ignore[no-untyped-def]
    """Candles fall back to REST while the socket is quiet; a 418 holds every REST call for Retry-After."""
    async with start_simulator(speed=0, max_trades=300, wait_for_streams=BOTH) as sim:
        cfg = collector_settings(settings, sim.rest_url, sim.ws_url, channels=["candles"], ws_stall_s=0.3,
                                 rest_poll_s=0.1, stall_s={"candles": 30.0})
        collector = Collector(cfg, "t", exchange="binance")
        stop = asyncio.Event()
        task = asyncio.create_task(collector.run(stop))

        def klines() -> int:
            return int(sim.status()["rest"]["requests"].get("klines", 0))

        async def polling() -> bool:
            return klines() >= 2

        await wait_for(polling, task)
        sim.inject("http_error", status=418, retry_after=2, count=1)

        async def banned() -> bool:
            return collector.rest is not None and collector.rest.stats.banned_418 == 1

        await wait_for(banned, task)
        state = await RateBudget(redis, "binance", limit_for("binance")).state()
        assert state.hold_kind == "ban" and state.bans == 1
        during = klines()
        while time.time() * 1000 < state.hold_until_ms - 50:  # the whole ban: not one REST call
            assert klines() == during, "a REST call went out during the ban"
            await asyncio.sleep(0.02)

        async def resumed() -> bool:
            return klines() > during

        await wait_for(resumed, task, timeout=10)
        await stop_collector(collector, stop, task)
    assert collector.rest is not None and collector.rest.stats.banned_418 == 1


async def exchange_info(rest_url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, http.get(f"{rest_url}/api.binance.com/api/v3/exchangeInfo") as resp:
        return await resp.json()  # type: ignore[no-any-return]


async def test_two_hundred_symbols_subscribe_paced_without_errors(settings: Settings, redis) -> None:  # type: ignore[no-untyped-def]
    async with start_simulator(speed=20, max_trades=N, exchange_info_symbols=None) as sim:
        info = await exchange_info(sim.rest_url)
        symbols = sorted(f"{s['baseAsset']}/{s['quoteAsset']}" for s in info["symbols"]
                         if s["status"] == "TRADING" and s["quoteAsset"] == "USDT")
        symbols = ["BTC/USDT", *[s for s in symbols if s != "BTC/USDT"]][:200]
        assert len(symbols) == 200
        cfg = collector_settings(settings, sim.rest_url, sim.ws_url, symbols=symbols, channels=["trades"],
                                 subscribe_per_s=100.0)
        collector = Collector(cfg, "t", exchange="binance")
        stop = asyncio.Event()
        task = asyncio.create_task(collector.run(stop))

        async def subscribed() -> bool:
            subs = sim.status()["subscriptions"]
            return sum(1 for s in subs if s.endswith("@trade")) == 200 and collector.count["trades"] > 0

        await wait_for(subscribed, task, timeout=60)
        status = sim.status()
        await stop_collector(collector, stop, task)
    assert collector.pacer.granted == 200
    assert collector.count["errors"] == 0 and collector.count["reconnects"] == 0
    assert not {k: v for k, v in status["rest"]["status"].items() if k in ("418", "429")}
    assert len(status["connections"]) <= 50, "ccxt spreads streams over at most 50 sockets"


async def test_pacer_spaces_subscriptions() -> None:
    pacer = Pacer(per_s=50.0)
    stop = asyncio.Event()
    started = time.monotonic()
    for _ in range(10):
        await pacer.wait(stop)
    assert time.monotonic() - started >= 9 / 50 - 0.005
    assert pacer.granted == 10


def test_backoff_is_capped_exponential_with_jitter() -> None:
    rng = random.Random(7)
    delays = [backoff_delay(a, 0.5, 30.0, rng) for a in range(1, 60)]
    assert all(0 < d <= 30.0 for d in delays)
    assert delays[0] <= 0.5 and max(delays[-20:]) > 15.0, "grows to the cap"
    assert min(delays[-20:]) >= 15.0, "never below half the cap once there"
    assert len({round(d, 6) for d in delays[-20:]}) > 1, "jittered"


async def test_reconnects_while_the_server_refuses_then_flows_again(settings: Settings, redis) -> None:  # type: ignore[no-untyped-def]
    """Connections are refused (HTTP 503) for 2 s: the collector retries with bounded waits and resumes."""
    async with start_simulator(speed=5, max_trades=N, wait_for_streams=("btcusdt@trade",)) as sim:
        cfg = collector_settings(settings, sim.rest_url, sim.ws_url, channels=["trades"],
                                 reconnect_backoff_max_s=0.5)
        collector = Collector(cfg, "t", exchange="binance")
        stop = asyncio.Event()
        task = asyncio.create_task(collector.run(stop))

        async def started() -> bool:
            return collector.count["trades"] >= 50

        await wait_for(started, task)
        sim.inject("disconnect", down_s=2.0)
        before = collector.count["trades"]

        async def recovered() -> bool:
            return collector.count["trades"] >= before + 100 and collector.count["gaps"] == 1

        await wait_for(recovered, task)
        await stop_collector(collector, stop, task)
    assert collector.count["reconnects"] >= 2, "refused dials are retried"
