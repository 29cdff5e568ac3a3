"""The collector under faults, against the simulator (real wire format, real ccxt.pro) and real Redis: every
break publishes a Gap with the right window and data flows again; a stalled socket is reconnected by the
watchdog; a 418 stops REST for the ban; many symbols subscribe paced; reconnect waits are bounded."""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
import redis.asyncio as aioredis

from common.bus import streams
from common.config import Settings
from common.exchanges.ratelimit import RateBudget, limit_for
from common.tasks import cancel_and_wait
from schemas import Candle, Codec, Gap, Trade
from services.collector.service import Collector, Pacer, backoff_delay
from simulator import Simulator, start_simulator
from tests.collecting import RestartableRedis, collector_settings, read

ROOT = Path(__file__).resolve().parent.parent
N = 3000
BOTH = ("btcusdt@trade", "btcusdt@kline_1m")


async def wait_for(predicate, task: asyncio.Task[None], timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while not await predicate():
            if task.done():
                task.result()
            await asyncio.sleep(0.02)


async def stop_collector(collector: Collector, stop: asyncio.Event, task: asyncio.Task[None]) -> None:
    stop.set()
    await asyncio.wait_for(task, 20)
    await collector.close()


@dataclass
class Running:
    """A binance collector running against the simulator (`collecting`)."""

    sim: Simulator
    collector: Collector
    stop: asyncio.Event
    task: asyncio.Task[None]
    closed: bool = False

    async def until(self, holds: Callable[[Collector], bool], timeout: float = 30.0) -> None:
        """Until `holds(collector)`; the collector's own error if it ends first."""
        async def check() -> bool:
            return holds(self.collector)

        await wait_for(check, self.task, timeout)

    async def stop_and_close(self) -> None:
        """Stop it (run() must return within 20 s) and close it."""
        self.stop.set()
        await self.close_after(asyncio.wait_for(self.task, 20))

    async def close_after(self, stopped: Awaitable[None]) -> None:
        """Close it once `stopped` (a test's own way of stopping it) is done."""
        self.closed = True
        try:
            await stopped
        finally:
            await self.collector.close()


def trades_at_least(n: int) -> Callable[[Collector], bool]:
    return lambda c: c.count["trades"] >= n


@asynccontextmanager
async def collecting(settings: Settings, *, speed: float = 5, max_trades: int = N,
                     ready: tuple[str, ...] = ("btcusdt@trade",), redis_url: str | None = None,
                     started: Callable[[Collector], bool] | None = None,
                     **config: Any) -> AsyncIterator[Running]:
    """The simulator replaying at `speed` once `ready`'s streams are subscribed, and a binance collector
    (`collector_settings(**config)`, on `redis_url` if given) running until `started` holds (default: 100
    trades taken). A test that fails inside is stopped and closed on the way out."""
    async with start_simulator(speed=speed, max_trades=max_trades, wait_for_streams=ready) as sim:
        base = on_redis(settings, redis_url) if redis_url else settings
        collector = Collector(collector_settings(base, sim.rest_url, sim.ws_url, **config), "t", exchange="binance")
        stop = asyncio.Event()
        run = Running(sim, collector, stop, asyncio.create_task(collector.run(stop)))
        try:
            await run.until(started or trades_at_least(100))
            yield run
        finally:
            if not run.closed:
                stop.set()
                await cancel_and_wait(run.task)
                await collector.close()


def assert_gap_matches_trades(gap: Gap, trades: list[Trade]) -> tuple[Trade, Trade]:
    """The gap spans two consecutive published trades: the last before the break and the first after."""
    for before, after in itertools.pairwise(trades):
        if before.ts_event == gap.start and after.ts_event == gap.end:
            assert f"last_trade_id={before.trade_id}" in gap.reason, gap.reason
            return before, after
    raise AssertionError(f"no consecutive published trades bound the gap {gap}")


async def test_disconnect_publishes_a_gap_with_the_lost_window_and_data_flows_again(settings: Settings, redis) -> None:
    # Arrange
    async with collecting(settings, ready=BOTH) as run:
        collector = run.collector
        before = collector.count["trades"]
        # Act: the server drops every socket and refuses new ones for 0.5 s; the replay runs on meanwhile
        run.sim.inject("disconnect", down_s=0.5)
        await run.until(lambda c: c.count["trades"] >= before + 200 and c.count["gaps"] >= 1)
        await run.stop_and_close()
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


async def test_stalled_socket_is_reconnected_by_the_watchdog_with_a_gap(settings: Settings, redis) -> None:
    """The server goes silent but keeps the connection and answers pings (ccxt alone would wait forever)."""
    async with collecting(settings, channels=["trades"], stall_s={"trades": 1.0}) as run:
        run.sim.inject("stall", seconds=2.5, mode="drop")
        await run.until(lambda c: c.count["gaps"] >= 1 and c.count["stalls"] >= 1)
        await run.until(trades_at_least(run.collector.count["trades"] + 100))
        await run.stop_and_close()
    gaps = [g for g in await read(redis, streams.GAPS) if isinstance(g, Gap)]
    assert len(gaps) == 1 and gaps[0].reason.startswith("stall: no trades message"), gaps
    trades = [e for e in await read(redis, streams.raw("binance")) if isinstance(e, Trade)]
    before_t, after_t = assert_gap_matches_trades(gaps[0], trades)
    assert int(after_t.trade_id) > int(before_t.trade_id) + 1, "the stall dropped trades: ids jump"
    assert gaps[0].end - gaps[0].start >= 1_000_000_000, "the window covers the silence"


async def test_418_stops_rest_calls_for_the_ban(settings: Settings, redis) -> None:
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
        # A ban long enough that a loaded machine still reads it in force (2 s was read expired once in CI)
        sim.inject("http_error", status=418, retry_after=6, count=1)

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


async def test_two_hundred_symbols_subscribe_paced_without_errors(settings: Settings, redis) -> None:
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


async def test_reconnects_while_the_server_refuses_then_flows_again(settings: Settings, redis) -> None:
    """Connections are refused (HTTP 503) for 2 s: the collector retries with bounded waits and resumes."""
    async with collecting(settings, started=trades_at_least(50), channels=["trades"],
                          reconnect_backoff_max_s=0.5) as run:
        run.sim.inject("disconnect", down_s=2.0)
        before = run.collector.count["trades"]
        await run.until(lambda c: c.count["trades"] >= before + 100 and c.count["gaps"] == 1)
        await run.stop_and_close()
    assert run.collector.count["reconnects"] >= 2, "refused dials are retried"


# ---------------------------------------------------------------------------------------------------------
# Issue 10, defect 3: a collector stop, a kill or a Redis outage loses no trade silently


def trade_ids(events: list[object]) -> list[int]:
    return [int(e.trade_id) for e in events if isinstance(e, Trade)]


@pytest.fixture
async def own_redis(tmp_path: Path) -> AsyncIterator[RestartableRedis]:
    server = RestartableRedis(tmp_path)
    await server.start()
    try:
        yield server
    finally:
        server.stop()


def on_redis(settings: Settings, url: str) -> Settings:
    return msgspec.structs.replace(settings, redis=msgspec.structs.replace(settings.redis, url=url))


async def test_sigterm_publishes_what_was_taken_from_ccxt_before_exiting(settings: Settings, own_redis) -> None:
    """Redis is down when the stop comes and back a moment later: the trades already taken from ccxt are
    published within the drain bound (not cancelled with the feeds), and run() returns normally (exit 0)."""
    async with collecting(settings, redis_url=own_redis.url, channels=["trades"]) as run:
        collector = run.collector
        own_redis.stop()
        await run.until(lambda c: c.count["publish_retries"] >= 1)  # trades taken from ccxt wait for Redis
        run.stop.set()
        await asyncio.sleep(0.5)
        await own_redis.start()
        await run.close_after(asyncio.wait_for(run.task, 20))  # raises if run() failed
    client = aioredis.Redis.from_url(own_redis.url)
    ids = trade_ids([e for _, f in await client.xrange(streams.raw("binance")) for e in Codec().decode_entry(f)])
    await client.aclose()
    assert len(ids) == collector.count["trades"], "every trade taken from ccxt was published before the exit"
    assert ids == list(range(ids[0], ids[0] + len(ids))), "once each, in order, none skipped"


async def test_sigterm_drain_is_bounded_and_logs_the_gap_it_leaves(settings: Settings, redis, caplog) -> None:
    """Redis holds every write for longer than the drain bound: the collector stops anyway, within the bound,
    and logs what it could not publish as a Gap naming the trade ids."""
    from services.collector import service

    async with collecting(settings, channels=["trades"]) as run:
        await redis.execute_command("CLIENT", "PAUSE", str(int(service.DRAIN_S * 1000 + 15_000)), "WRITE")
        try:
            await run.until(trades_at_least(run.collector.count["trades"] + 20))
            run.stop.set()
            started_at = time.monotonic()
            await run.close_after(asyncio.wait_for(run.task, service.DRAIN_S + 5))
            stopped_in = time.monotonic() - started_at
        finally:
            await redis.execute_command("CLIENT", "UNPAUSE")
    assert stopped_in >= service.DRAIN_S - 0.5, "it waited for Redis up to the bound"
    logged = [r.getMessage() for r in caplog.records if "(not published at stop)" in r.getMessage()]
    assert len(logged) == 1 and "binance BTC/USDT trades" in logged[0] and "trade ids " in logged[0], logged


async def test_sigterm_publishes_past_a_consumer_that_holds_the_stream_back(settings: Settings, redis) -> None:
    """The validator's group on raw:binance is far behind (nobody reads it), so backpressure holds the publisher
    (for up to backpressure_max_wait_s, here longer than the drain bound). At the stop the collector publishes
    what it took anyway: every trade taken from ccxt is in the stream, once and in order, within the bound.
    Before the fix the drain waited on the consumer, timed out, and logged the trades as a Gap that a
    restarted collector opens only when the next trade arrives (the partitioned chaos run's loss)."""
    from services.collector import service

    bus = msgspec.structs.replace(settings.bus, backpressure_high_water=5, backpressure_max_wait_s=120.0)
    # the group has more than 5 entries unread: trades wait in the outbox
    held_back: Callable[[Collector], bool] = lambda c: (c.publisher.producer.backpressure_waits >= 1
                                                         and c.publisher.outbox.events >= 20)
    async with collecting(msgspec.structs.replace(settings, bus=bus), started=held_back, channels=["trades"]) as run:
        collector = run.collector
        run.stop.set()
        started_at = time.monotonic()
        await run.close_after(asyncio.wait_for(run.task, service.DRAIN_S + 5))  # raises if run() failed
        stopped_in = time.monotonic() - started_at
    ids = trade_ids(await read(redis, streams.raw("binance")))
    assert stopped_in < service.DRAIN_S, f"published past the backpressure at once, not at the bound ({stopped_in:.1f} s)"
    assert len(ids) == collector.count["trades"], "every trade taken from ccxt was published before the exit"
    assert ids == list(range(ids[0], ids[0] + len(ids))), "once each, in order, none skipped"


def test_a_trade_counts_as_published_only_after_its_xadd() -> None:
    """Taken trades are not handed out twice, nor remembered as published, until their publish succeeded."""
    from services.collector.service import SymbolState

    state = SymbolState()
    trades = [{"id": i, "timestamp": 1000 + i} for i in range(1, 4)]
    assert state.new_trades(trades) == trades
    assert state.new_trades(trades) == [], "taken: in the outbox, retried from there"
    assert not state.recent_trade_ids, "not published yet"
    state.settle([("1", 1001), ("2", 1002), ("3", 1003)])
    assert list(state.recent_trade_ids) == ["1", "2", "3"] and not state.taken
    assert state.new_trades(trades) == []


def test_trade_id_memory_is_bounded_and_forgets_the_oldest_first() -> None:
    from services.collector.service import SymbolState

    state = SymbolState()
    n = SymbolState.TRADE_ID_MEMORY + 5
    trades = [{"id": i, "timestamp": i} for i in range(n)]
    state.settle([(str(t["id"]), int(t["timestamp"])) for t in state.new_trades(trades)])
    assert len(state.recent_trade_ids) == SymbolState.TRADE_ID_MEMORY
    assert state.forgotten_trade_ms == 4 and "4" not in state and "5" in state
    assert state.new_trades([{"id": 2, "timestamp": 2}]) == [], "older than the memory: counts as published"


def collector_process(config: Path, redis_url: str, log: Path) -> subprocess.Popen[bytes]:
    """`python -m services.collector --exchange binance` as supervisord runs it, on the test's Redis."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MDP_")} | {"MDP_REDIS_URL": redis_url}
    with log.open("ab") as out:  # a file, not a pipe nobody reads (a full pipe would block the process)
        return subprocess.Popen([sys.executable, "-m", "services.collector", "--exchange", "binance", "--config",
                                 str(config), "--instance", "t"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                stderr=out)


def trades_only_config(path: Path, sim: Any) -> Path:
    path.write_text(f'[[exchanges]]\nid = "binance"\nsymbols = ["BTC/USDT"]\nchannels = ["trades"]\n'
                    f'rest_url = "{sim.rest_url}"\nws_url = "{sim.ws_url}"\n')
    return path


async def test_kill_9_mid_replay_ends_with_a_gap_naming_exactly_the_missing_ids(settings: Settings, redis,
                                                                                 tmp_path: Path) -> None:
    """The collector process is killed (SIGKILL: nothing drained) while the replay runs on, and started again:
    its first trade opens a Gap from the position stored with the last XADD, naming exactly the ids that
    never reached raw:binance. A SIGTERM then stops it with exit code 0."""
    async with start_simulator(speed=5, max_trades=N, wait_for_streams=("btcusdt@trade",)) as sim:
        config = trades_only_config(tmp_path / "collector.toml", sim)
        log = tmp_path / "collector.log"
        first = collector_process(config, settings.redis.url, log)
        second: subprocess.Popen[bytes] | None = None
        try:
            async def published(n: int) -> bool:
                return len(trade_ids(await read(redis, streams.raw("binance")))) >= n

            async with asyncio.timeout(60):
                while not await published(100):
                    assert first.poll() is None, log.read_text()[-3000:]
                    await asyncio.sleep(0.05)
            first.kill()
            first.wait(10)
            before = len(trade_ids(await read(redis, streams.raw("binance"))))
            await asyncio.sleep(1.0)  # the replay runs on: these trades reach no one
            second = collector_process(config, settings.redis.url, log)

            async def gap_and_more() -> bool:
                return bool(await read(redis, streams.GAPS)) and await published(before + 100)

            async with asyncio.timeout(60):
                while not await gap_and_more():
                    assert second.poll() is None, log.read_text()[-3000:]
                    await asyncio.sleep(0.05)
            second.send_signal(signal.SIGTERM)
            code = second.wait(20)
        finally:
            for p in (first, second):
                if p is not None and p.poll() is None:
                    p.kill()
                    p.wait(10)
    assert code == 0, log.read_text()[-3000:]
    assert "stopped collecting; the outbox was published" in log.read_text(), "SIGTERM drained"
    ids = trade_ids(await read(redis, streams.raw("binance")))
    assert ids == sorted(set(ids)), "no trade published twice, none out of order"
    lost = [i for i in range(ids[0], ids[-1] + 1) if i not in set(ids)]
    assert lost, "the replay ran on while no collector ran: ids are missing from raw:binance"
    gaps = [g for g in await read(redis, streams.GAPS) if isinstance(g, Gap)]
    assert len(gaps) == 1 and gaps[0].channel == "trades", gaps
    assert (gaps[0].first_missing_id, gaps[0].last_missing_id) == (str(lost[0]), str(lost[-1]))
    assert len(lost) == lost[-1] - lost[0] + 1, "one hole, the restart's"
    assert gaps[0].reason.startswith("collector restarted"), gaps[0].reason
    before_t, after_t = assert_gap_matches_trades(gaps[0], [e for e in await read(redis, streams.raw("binance"))
                                                            if isinstance(e, Trade)])
    assert (int(before_t.trade_id), int(after_t.trade_id)) == (lost[0] - 1, lost[-1] + 1)


async def test_redis_down_fills_a_bounded_buffer_whose_overflow_is_a_gap_and_an_alert(settings: Settings,
                                                                                       own_redis) -> None:
    """Redis goes away mid-replay: the collector keeps reading its socket into the outbox (bound 200 events
    here), says `degraded` and why, drops the oldest at the bound, and when Redis is back publishes the rest
    with one Gap and one alert naming exactly the dropped ids. It does not exit."""
    async with collecting(settings, speed=20, redis_url=own_redis.url, started=trades_at_least(300),
                          channels=["trades"], publish_buffer_events=200) as run:
        collector = run.collector
        own_redis.stop()
        await run.until(lambda c: c.counters()["buffer_dropped"] > 0 and c.state == "degraded")
        assert "Redis unreachable" in collector.detail and "publish_buffer_events=200" in collector.detail
        assert collector.outbox.events <= 200, "bounded"
        await own_redis.start()
        await run.until(lambda c: c.count["trades"] == N and not c.outbox.queued and c.state == "running",
                        timeout=60)
        await run.stop_and_close()
    client = aioredis.Redis.from_url(own_redis.url)
    codec = Codec()
    events = {s: [e for _, f in await client.xrange(s) for e in codec.decode_entry(f)]
              for s in (streams.raw("binance"), streams.GAPS, streams.ALERTS)}
    await client.aclose()
    ids = trade_ids(events[streams.raw("binance")])
    assert ids == sorted(set(ids)), "no trade published twice, none out of order"
    first = 3735683259
    dropped = [i for i in range(first, first + N) if i not in set(ids)]
    assert dropped and len(dropped) == collector.counters()["buffer_dropped"]
    gaps = [g for g in events[streams.GAPS] if isinstance(g, Gap)]
    named = sorted(i for g in gaps for i in range(int(g.first_missing_id), int(g.last_missing_id) + 1))
    assert named == dropped, (gaps, dropped[:3], dropped[-3:])
    assert all(g.reason.startswith("dropped at the collector's bound") for g in gaps), gaps
    alerts = [a for a in events[streams.ALERTS] if getattr(a, "rule", "") == "collector.buffer_overflow"]
    assert len(alerts) == len(gaps) and sum(int(a.values["dropped_events"]) for a in alerts) == len(dropped)
    assert collector.count["publish_retries"] >= 1


async def test_a_redis_restarted_empty_is_noticed_and_what_it_lost_is_a_gap(settings: Settings,
                                                                            tmp_path: Path) -> None:
    """Redis without persistence restarts while the collector runs: the positions written with the XADDs are
    gone, so the collector knows Redis lost what it had published, and says so with a Gap per feed."""
    server = RestartableRedis(tmp_path, appendonly=False)
    await server.start()
    try:
        async with collecting(settings, redis_url=server.url, channels=["trades"]) as run:
            collector = run.collector
            server.stop()
            await run.until(lambda c: c.count["publish_retries"] >= 1)
            await server.start()
            await run.until(lambda c: c.count["positions_lost"] >= 1 and c.state == "running")
            await run.stop_and_close()
        client = aioredis.Redis.from_url(server.url)
        gaps = [e for _, f in await client.xrange(streams.GAPS) for e in Codec().decode_entry(f)]
        await client.aclose()
    finally:
        server.stop()
    assert len(gaps) == 1 and isinstance(gaps[0], Gap), gaps
    assert gaps[0].reason.startswith("Redis lost published data: its position for trades BTC/USDT is gone")
    assert gaps[0].start == collector.started_at, "everything this process published before the restart"


def test_outbox_drops_the_oldest_batches_at_its_bound_as_runs_per_feed() -> None:
    from services.collector.outbox import Batch, Outbox

    def batch(first: int, n: int, symbol: str = "BTC/USDT") -> Batch:
        trades = [Trade(exchange="binance", symbol=symbol, trade_id=str(i), price=None, amount=None, side=None,
                        ts_event=i * 1_000_000, ts_recv=0) for i in range(first, first + n)]
        return Batch(symbol, "trades", list(trades), trade_ids=[t.trade_id for t in trades])

    outbox = Outbox(limit=10)
    outbox.put(batch(1, 4))
    in_flight = outbox.take(max_events=4)  # a publish attempt with ids 1..4
    for first in (5, 9, 13, 17):
        outbox.put(batch(first, 4))  # 16 events queued: 5..8 then 9..12 dropped, in that order
    assert outbox.events == 8 and [b.trade_ids[0] for b in outbox.queued] == ["13", "17"]
    outbox.give_back(in_flight, [], [])  # the attempt failed: 1..4 go back first, over the bound, dropped
    assert outbox.events == 8 and outbox.dropped_events == 12
    [run] = outbox.dropped
    assert (run.first_id, run.last_id, run.events) == ("1", "12", 12), "one run: the batches were consecutive"
    assert (run.first_ns, run.last_ns) == (1_000_000, 12_000_000)
    assert sorted(int(i) for _, i, _ in outbox.dropped_trades) == list(range(1, 13))


async def test_publisher_batches_a_busy_stretch_into_one_round_and_flushes_at_once_on_stop() -> None:
    """Micro-batching: the first event after a quiet spell goes out at once; events that follow within
    `linger_s` of that round wait and go out together in one MULTI/EXEC; a full round (`batch_events`) and a
    stop do not wait."""
    from collections import Counter

    from services.collector.publisher import Publisher
    from services.collector.symbols import SymbolState

    rounds: list[list[str]] = []

    class Producer:
        async def commit(self, outputs: dict[str, list[Trade]], extra: Any = ()) -> None:
            rounds.append([t.trade_id for t in outputs[streams.raw("binance")]])

        def hurry(self) -> None:  # the stop: no backpressure to skip here
            pass

    class Service:
        state, detail, started_at = "running", "", 0

    def trade(i: int) -> list[Trade]:
        return [Trade(exchange="binance", symbol="BTC/USDT", trade_id=str(i), price=None, amount=None, side=None,
                      ts_event=i * 1_000_000, ts_recv=0)]

    async def rounds_reach(n: int, within_s: float) -> float:
        """Wait (no fixed sleep) until `n` rounds went out; the seconds it took."""
        t0 = time.monotonic()
        while len(rounds) < n:
            assert time.monotonic() - t0 < within_s, f"{len(rounds)} rounds after {within_s} s, expected {n}"
            await asyncio.sleep(0.001)
        return time.monotonic() - t0

    linger_s = 1.0
    count: Counter[str] = Counter()
    publisher = Publisher(Service(), Producer(), "binance", {"BTC/USDT": SymbolState()},
                          count, True, buffer_events=1_000, batch_events=20, linger_s=linger_s)
    task = asyncio.create_task(publisher.run(1_000))
    # Act, Assert: the first event after a quiet spell is not held back
    await publisher.publish(trade(1), symbol="BTC/USDT", channel="trades")
    assert await rounds_reach(1, within_s=linger_s / 2) < linger_s / 2
    first_round_at = time.monotonic()
    for i in range(2, 12):  # a busy stretch: ten wake-ups within the linger
        await publisher.publish(trade(i), symbol="BTC/USDT", channel="trades")
        await asyncio.sleep(0)
    assert len(rounds) == 1, "held for the linger"
    await rounds_reach(2, within_s=5 * linger_s)
    assert time.monotonic() - first_round_at >= linger_s * 0.9, "the second round waited for the linger"
    assert rounds[1] == [str(i) for i in range(2, 12)], "one round for the ten wake-ups"
    for i in range(12, 32):  # a full round: published without waiting for the linger
        await publisher.publish(trade(i), symbol="BTC/USDT", channel="trades")
    assert await rounds_reach(3, within_s=linger_s / 2) < linger_s / 2
    assert rounds[2] == [str(i) for i in range(12, 32)]
    await publisher.publish(trade(32), symbol="BTC/USDT", channel="trades")
    await publisher.drain(task, linger_s / 2)  # the stop flushes at once, not after the linger
    assert rounds[3] == ["32"] and task.done()
    assert count["publish_round_trips"] == 4


async def test_a_candle_open_when_the_socket_broke_is_never_closed_from_its_stale_snapshot(settings: Settings,
                                                                                         redis) -> None:
    # Arrange: the replay at 20x; the socket goes down for 4 s (80 s of exchange time), so the candle open at the
    # break closes while the collector does not listen, and its last snapshot misses the minute's end.
    from simulator import Recording
    truth = {c.open_time: c for c in Recording.load().candles}
    async with collecting(settings, speed=20, max_trades=12_000, ready=BOTH,
                          started=lambda c: c.count["candle_updates"] >= 5) as run:
        before = run.collector.count["candles_closed"]
        # Act
        run.sim.inject("disconnect", down_s=4.0)
        await run.until(lambda c: c.count["candles_closed"] >= before + 3 and c.count["reconnects"] >= 1,
                        timeout=60)
        await run.stop_and_close()
    # Assert: every closed candle published equals the recording's candle of that minute.
    closed = [c for c in await read(redis, streams.raw("binance"))
              if isinstance(c, Candle) and c.closed and c.open is not None]
    assert len(closed) >= 3
    for c in closed:
        want = truth[c.open_time // 1_000_000]
        assert (c.open, c.high, c.low, c.close) == (Decimal(want.open), Decimal(want.high), Decimal(want.low),
                                                    Decimal(want.close)), (c, want)


async def test_a_round_whose_exec_reply_is_lost_is_not_published_again(settings: Settings, own_redis) -> None:
    """Redis runs a publish round's MULTI/EXEC but the reply never arrives (the connection drops right after,
    as when Redis stops at that moment): the collector holds the round aside, asks Redis when it answers
    again (the feeds' positions are written in the same EXEC), finds it ran and does not publish it again;
    no trade twice on raw:binance, none missing, and no Gap claiming Redis lost data."""
    from tests.test_bus_recovery import DropExecReply

    port = int(own_redis.url.rsplit(":", 1)[1].split("/")[0])
    proxy = DropExecReply(port)
    await proxy.start()
    async with collecting(settings, speed=20, redis_url=f"redis://127.0.0.1:{proxy.port}/0",
                          started=trades_at_least(300), channels=["trades"]) as run:
        proxy.armed = True  # the next EXEC's reply is lost
        await run.until(lambda c: (c.count["trades"] == N and not c.outbox.queued
                                   and c.count["publish_round_trips"] > 0 and proxy.dropped == 1), timeout=60)
        counters = run.collector.counters()
        await run.stop_and_close()
    await proxy.close()
    client = aioredis.Redis.from_url(own_redis.url)
    codec = Codec()
    events = {s: [e for _, f in await client.xrange(s) for e in codec.decode_entry(f)]
              for s in (streams.raw("binance"), streams.GAPS)}
    await client.aclose()
    ids = trade_ids(events[streams.raw("binance")])
    first = 3735683259
    assert proxy.dropped == 1
    assert ids == list(range(first, first + N)), "every trade once, in order"
    assert counters["rounds_in_doubt_ran"] == 1 and counters["positions_lost"] == 0
    assert not [g for g in events[streams.GAPS] if "lost published data" in getattr(g, "reason", "")]
