"""Partitioned stages on the real Redis with the real capture (docs/scaling.md, "Partitions"): partitions by
base asset; two aggregators over four partitions sharing them, handing two over when one joins and taking them
back when it dies with a batch in hand; two instances each of the validator, the normalizer and the aggregator
over two partitions, one of each killed mid-piece; the outputs equal those of one instance without partitions
(no trade lost, doubled or out of order, no minute or bar wrong). And a collector routing each symbol to its
partition's raw stream."""

from __future__ import annotations

import asyncio
import contextlib
import io
import zlib
from collections.abc import Awaitable, Callable, Sequence

import msgspec
import pytest
import redis.asyncio as aioredis

from common.bus import streams
from common.bus.core import Delivery, Producer
from common.bus.partitions import Share
from common.bus.stage import Stage
from common.config import ConfigError, ExchangeSettings, Settings, load_settings
from common.stores.cache import price_key, recent_trades_hw_key, recent_trades_key
from common.tasks import cancel_and_wait
from schemas import Codec, Event, Heartbeat, Market, Trade
from services.aggregator import Aggregator
from services.cache_publisher.service import CachePublisher, order_key
from services.collector.service import Collector
from services.normalizer import Normalizer
from services.validator import Validator
from simulator import start_simulator
from tests.collecting import collector_settings, run_collector
from tests.collecting import read as read_events
from tests.test_aggregator import (
    aggregate_in_pieces,
    all_done,
    by_time,
    capture,
    everything_published,
    settings,  # noqa: F401 - the fixture
    streams_of,
)
from tests.test_stages import read

replace = msgspec.structs.replace
# Five symbols over the four partitions (BTC and SOL share partition 2): the real BTC/USDT capture under each.
SYMBOLS = {"BTC/USDT": 2, "ETH/USDT": 3, "XRP/USDT": 0, "LINK/USDT": 1, "SOL/USDT": 2}


def test_a_symbol_s_partition_is_the_crc32_of_its_base_asset() -> None:
    for symbol, k in SYMBOLS.items():
        assert streams.partition_of(symbol, 4) == k == zlib.crc32(symbol.split("/")[0].encode()) % 4
    # every venue and quote of an asset meets in one partition
    assert {streams.partition_of(s, 7) for s in ("BTC/USDT", "BTC/USDT:USDT", "BTC/USD", "BTC/USDC:USDC")} == {
        streams.partition_of("BTC/EUR", 7)}
    assert streams.partition_of_stream("md:trade:binanceusdm:ETH/USDT:USDT", 4) == 3
    # a symbol's Gaps go to its partition's mdp:gaps:p{k}, which that partition's gap_repair instance reads
    k = streams.partition_of("ETH/USDT", 4)
    assert streams.gaps_for("ETH/USDT:USDT", 4) == f"mdp:gaps:p{k}" and streams.gaps_for("ETH/USDT", 1) == "mdp:gaps"
    assert streams.partition_of_stream(f"mdp:gaps:p{k}", 4) == k
    assert streams.gaps_for("ETH/USDT", 4, cluster=True) == f"mdp:gaps:{{p{k}}}"
    assert streams.partition_of("ETH/USDT", 1) == 0


def test_the_tools_run_instances_of_exactly_the_partitioned_stages() -> None:
    """tools.PARTITIONED (what the chaos suite and the pipeline benchmark scale with P) is every service whose
    class is partitioned, by its supervisord program name."""
    from services.gap_repair.service import GapRepair
    from services.influx_writer.service import InfluxWriter
    from services.postgres_writer.service import PostgresWriter
    from tools import PARTITIONED, SHARED, STAGES

    stages = (Validator, Normalizer, Aggregator, CachePublisher, GapRepair, InfluxWriter, PostgresWriter)
    assert {cls.name for cls in stages if cls.partitioned} == set(PARTITIONED)
    assert {cls.name for cls in stages if not cls.partitioned} == set(SHARED)
    assert set(STAGES) == {cls.name for cls in stages}


def test_partitions_out_of_bounds_is_a_config_error(tmp_path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[bus]\npartitions = 0\n")
    with pytest.raises(ConfigError, match=r"bus.partitions = 0 must be from 1 to 256"):
        load_settings(path, env={})


def pieces_of_five_symbols() -> list[list[Event]]:
    """The real capture's trades and exchange candles under each symbol, cut by time into three pieces."""
    _, trades, candles = capture()
    cuts = [len(trades) // 3, 2 * len(trades) // 3]
    pieces: list[list[Event]] = [[], [], []]
    for symbol in SYMBOLS:
        mine = by_time([replace(t, symbol=symbol) for t in trades], [replace(c, symbol=symbol) for c in candles], cuts)
        for whole, piece in zip(pieces, mine, strict=True):
            whole.extend(piece)
    return pieces


async def wait_until(what: str, predicate: Callable[[], bool], tasks: Sequence[asyncio.Task[None]],
                     timeout: float = 60.0, why: Callable[[], Awaitable[str]] | None = None) -> None:
    """Wait for `predicate`, failing with `what` (and `why()`) on timeout or with a task's own exception if one
    ends."""
    try:
        async with asyncio.timeout(timeout):
            while not predicate():
                for t in tasks:
                    if t.done():
                        t.result()
                        raise AssertionError(f"a service stopped while waiting for {what}")
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout} s waiting for {what}; "
                             f"{await why() if why is not None else ''}") from None


async def finish(tasks: Sequence[asyncio.Task[None]], what: str, timeout: float = 30.0, cancel: bool = False) -> None:
    """Wait for `tasks` to end (stopped, or cancelled: `cancel`, as often as it takes, common/tasks.py); if
    one does not within `timeout`, fail with the stack of every task still running."""
    if not tasks:
        return
    if cancel:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await cancel_and_wait(*tasks)
    _, pending = await asyncio.wait(tasks, timeout=timeout)
    if pending:
        stacks = []
        for t in asyncio.all_tasks():
            out = io.StringIO()
            t.print_stack(limit=12, file=out)
            stacks.append(f"--- {t.get_name()} (cancelling {t.cancelling()}):\n{out.getvalue()}")
        raise AssertionError(f"{what}: {len(pending)} task(s) did not end within {timeout} s; every task:\n"
                             + "\n".join(stacks))


def diagnose(redis: aioredis.Redis, *services: Aggregator) -> Callable[[], Awaitable[str]]:
    """What each instance holds and sees, and who holds each lease in Redis (for a timeout's message)."""
    async def why() -> str:
        lines = []
        for svc in services:
            p = svc.partitions
            assert p is not None
            lines.append(f"{svc.instance}: live {sorted(p.live)}, share held {sorted(p.share.held)} giving "
                         f"{sorted(p.share.giving)} quota {p.share.quota} alive {sorted(p.share.alive)}, stats "
                         f"{p.stats.state} acked {p.stats.acked}")
            for k, (consumer, _) in sorted(p.live.items()):
                pending = [await redis.xpending(st, "aggregator") for st in consumer.streams]
                lines.append(f"  p{k}: handed_over {consumer.handed_over} streams {consumer.streams} pending "
                             f"{[(x['pending'], x['consumers']) for x in pending]}")
        leases = [await redis.get(f"mdp:lease:aggregator:p{k}") for k in range(4)]
        alive = sorted(k.decode() for k in await redis.keys("mdp:alive:*"))
        stacks = [f"{t.get_name()}: {t.get_stack(limit=8)}" for t in asyncio.all_tasks()
                  if "lease" in t.get_name() or "work" in t.get_name()]
        return "; ".join([*lines, f"leases {leases}", f"alive keys {alive}", *stacks])
    return why


async def test_the_share_counts_the_instances_alive_from_the_instance_set(redis) -> None:
    """Share.refresh looks only at the stage's instance set (no keyspace SCAN): a member with a live heartbeat
    counts, one whose last heartbeat says "stopping" does not, one whose key expired does not and leaves the
    set. 8 partitions over 2 alive: a share of 4."""
    codec = Codec()

    def beat(instance: str, state: str) -> bytes:
        return codec.encode([Heartbeat(service="aggregator", instance=instance, pid=1, started_at=0, counters={},
                                       state=state, detail="", ts_event=0, ts_recv=0)])  # type: ignore[arg-type]

    await redis.sadd(streams.instances_key("aggregator"), "a", "b", "c", "d")
    for instance in ("a", "b"):
        await redis.set(streams.alive_key("aggregator", instance), beat(instance, "running"), ex=30)
    await redis.set(streams.alive_key("aggregator", "c"), beat("c", "stopping"), ex=30)  # d: expired, no key
    share = Share(redis, codec, "aggregator", "a", 8)

    await share.refresh()

    assert share.alive == {"a", "b"} and share.quota == 4
    assert await redis.smembers(streams.instances_key("aggregator")) == {b"a", b"b", b"c"}, "d is gone"


async def join_freeze_and_take_back(redis: aioredis.Redis, a: Stage, b: Stage, pieces: list[list[Event]],
                                    why: Callable[[], Awaitable[str]]) -> tuple[set[int], dict[str, int]]:
    """Two instances of a partitioned stage over four partitions, the three pieces published to md:* in turn:
    A alone takes the four and handles the first piece; B joins, A hands two over between batches; B freezes
    with a batch of the second piece in hand (its lease still renewed) and is killed; A takes B's partitions
    back once B's heartbeat and leases expire, B's pending batch first, and handles the third piece. Returns
    the partitions B held and A's counters at the end; A and B are stopped and closed."""
    names = sorted({s for piece in pieces for s in streams_of(piece)})
    stuck = asyncio.Event()
    for svc in (a, b):
        assert svc.partitions is not None
        svc.partitions.refresh_s = 0.05
    b.handle = freeze_after(b, 5, stuck)  # type: ignore[method-assign]
    stop_a, stop_b = asyncio.Event(), asyncio.Event()
    tasks_a = [asyncio.create_task(a.run(stop_a)), asyncio.create_task(a._heartbeats(stop_a))]
    tasks_b: list[asyncio.Task[None]] = []
    producer = Producer(redis, a.codec, a.settings.bus, "test")
    try:
        await wait_until("A holding all four partitions", lambda: parts(a) == {0, 1, 2, 3}, tasks_a, why=why)
        await producer.publish(streams_of(pieces[0]))
        await drained_for(redis, a.group_name, names, tasks_a, why)
        tasks_b = [asyncio.create_task(b.run(stop_b)), asyncio.create_task(b._heartbeats(stop_b))]
        await wait_until("A and B holding two partitions each",
                         lambda: len(parts(a)) == 2 and len(parts(b)) == 2 and not parts(a) & parts(b),
                         [*tasks_a, *tasks_b], why=why)
        taken_by_b = parts(b)
        await producer.publish(streams_of(pieces[1]))
        await wait_until("B frozen with a batch in hand", stuck.is_set, [*tasks_a, *tasks_b], why=why)
        await finish(tasks_b, "B killed", cancel=True)
        await producer.publish(streams_of(pieces[2]))
        await wait_until("A holding all four partitions again", lambda: parts(a) == {0, 1, 2, 3}, tasks_a, why=why)
        await drained_for(redis, a.group_name, names, tasks_a, why)
        return taken_by_b, a.counters()
    finally:
        stop_a.set()
        stop_b.set()
        await finish([*tasks_a, *tasks_b], "stopping A and B")
        await producer.aclose()
        for svc in (a, b):
            await svc.close()


async def drained_for(redis: aioredis.Redis, group: str, names: list[str], tasks: Sequence[asyncio.Task[None]],
                      why: Callable[[], Awaitable[str]] | None = None) -> None:
    """Until `group` has read and acknowledged every entry of `names` (or a task ends: its error)."""
    try:
        async with asyncio.timeout(90):
            while not await all_done(redis, names, group):
                for t in tasks:
                    if t.done():
                        t.result()
                        raise AssertionError(f"a {group} stopped before the streams were drained")
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"{group} did not drain {names} within 90 s; {await why() if why else ''}") from None


async def test_two_partitioned_aggregators_share_hand_over_and_take_back_without_loss(redis, settings) -> None:  # noqa: F811
    # Arrange: what one aggregator without partitions publishes from the three pieces (many small batches)
    small = replace(settings, bus=replace(settings.bus, batch_max_events=20, read_count=10, heartbeat_interval_s=0.2))
    pieces = pieces_of_five_symbols()
    await aggregate_in_pieces(redis, small, pieces)
    expected = await everything_published(redis)
    assert all(len(expected[streams.candle_built("binance", s)]) >= 9 for s in SYMBOLS)  # every symbol's minutes
    await redis.flushdb()
    four = replace(small, bus=replace(small.bus, partitions=4))
    a, b = Aggregator(four, instance="a"), Aggregator(four, instance="b")
    # Act: A alone, then B joins, freezes with a batch in hand and is killed, and A takes B's partitions back
    taken_by_b, counters = await join_freeze_and_take_back(redis, a, b, pieces, diagnose(redis, a, b))
    # Assert: one process's outputs, nothing lost, doubled or wrong; B's pending batch was taken over
    assert await everything_published(redis) == expected
    assert len(taken_by_b) == 2
    assert a.consumer.stats.claimed > 0
    assert counters["partitions_held"] == 4 and counters["series_loaded"] >= 2  # B's symbols, from checkpoints
    for k in range(4):
        assert await redis.hlen(f"mdp:state:aggregator:p{k}") == sum(1 for p in SYMBOLS.values() if p == k)


def freeze_after(svc: Stage, entries: int | list[int], stuck: asyncio.Event):
    """svc.handle, except that its batch after `entries` acknowledged entries (or `entries[0]`, as it is
    when the batch comes) hangs: a process that froze with the batch in hand, then is killed."""
    handle = svc.handle

    async def gated(batch: list[Delivery]) -> object:
        if svc.consumer.stats.acked >= (entries[0] if isinstance(entries, list) else entries):
            stuck.set()
            await asyncio.Event().wait()
        return await handle(batch)
    return gated


# --- every stateful stage partitioned, two instances each -------------------------------------------------

async def chain_outputs(redis: aioredis.Redis) -> dict[str, list[object]]:
    """What strategies read: each symbol's md:trade ids in stream order, and the aggregator's minutes and bars."""
    out: dict[str, list[object]] = {}
    for symbol in SYMBOLS:
        name = streams.market_data("trade", "binance", symbol)
        out[name] = [e.trade_id for e in await read(redis, name) if isinstance(e, Trade)]
    for key, events in (await everything_published(redis)).items():
        if key != streams.ALERTS:  # the validator's alerts are throttled by the clock, not by the data
            out[key] = list(events)
    return out


class Chain:
    """The collector's side of a validator -> normalizer -> aggregator chain under test: publishes pieces of
    events on their raw streams (partition by partition with P > 1, tagged on a cluster) and waits until every
    stage has read everything written for it."""

    def __init__(self, redis: aioredis.Redis, config: Settings) -> None:
        self.redis = redis
        self.bus = config.bus
        self.producer = Producer(redis, Codec(), config.bus, "collector:binance")
        self.names: dict[str, set[str]] = {"validator": set(), "normalizer": set(), "aggregator": set()}

    async def publish(self, piece: list[Event]) -> None:
        by_stream: dict[str, list[Event]] = {}
        p, cluster = self.bus.partitions, self.bus.cluster
        for e in piece:
            symbol = e.symbol  # type: ignore[union-attr]
            stream = streams.raw_for("binance", symbol, p, cluster)
            by_stream.setdefault(stream, []).append(e)
            self.names["validator"].add(stream)
            k = streams.partition_of(symbol, p) if p > 1 or cluster else None
            self.names["normalizer"].add(streams.valid("binance", k, cluster))
            for name in streams_of([e]):
                self.names["aggregator"].add(streams.tagged(name, streams.partition_of(symbol, p)) if cluster else name)
        await self.producer.publish(by_stream)

    async def _done(self, group: str, names: set[str]) -> bool:
        for name in names:
            if not await self.redis.exists(name):  # not written yet (the stage before has not got to it)
                return False
        return await all_done(self.redis, sorted(names), group)

    async def drained(self, tasks: Sequence[asyncio.Task[None]], timeout: float = 90) -> None:
        async with asyncio.timeout(timeout):
            while not all([await self._done(g, n) for g, n in self.names.items()]):
                for t in tasks:
                    if t.done():
                        t.result()
                await asyncio.sleep(0.05)

    def clear(self) -> None:
        for n in self.names.values():
            n.clear()


async def one_instance_each(redis: aioredis.Redis, small: Settings, pieces: list[list[Event]]) -> dict[str, list[object]]:
    """What one instance each of the validator, the normalizer and the aggregator make of `pieces` on one Redis
    node without partitions (`chain_outputs`); the database is emptied after."""
    chain = Chain(redis, small)
    one = [Validator(small, "x"), Normalizer(small, "x"), Aggregator(small, "x")]
    stop = asyncio.Event()
    tasks = [asyncio.create_task(svc.run(stop)) for svc in one]
    try:
        for piece in pieces:
            await chain.publish(piece)
        await chain.drained(tasks)
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        await chain.producer.aclose()
        for svc in one:
            await svc.close()
    expected = await chain_outputs(redis)
    assert all(len(expected[streams.market_data("trade", "binance", s)]) == 19_904 for s in SYMBOLS)
    await redis.flushdb()
    return expected


async def test_validator_normalizer_and_aggregator_two_instances_each_over_two_partitions(redis, settings) -> None:  # noqa: F811
    # Arrange: the collector's events of five symbols, and what one instance of each stage makes of them
    small = replace(settings, bus=replace(settings.bus, batch_max_events=20, read_count=10, heartbeat_interval_s=0.2))
    pieces = pieces_of_five_symbols()
    expected = await one_instance_each(redis, small, pieces)

    # Act: two instances of each stage over two partitions; B of each is killed in the middle of the second
    # piece (its validator frozen with a batch in hand, its leases left to expire); A takes its partitions over
    two = replace(small, bus=replace(small.bus, partitions=2))
    chain = Chain(redis, two)
    a = [Validator(two, "a"), Normalizer(two, "a"), Aggregator(two, "a")]
    b = [Validator(two, "b"), Normalizer(two, "b"), Aggregator(two, "b")]
    stop_a, stop_b = asyncio.Event(), asyncio.Event()
    for svc in (*a, *b):
        assert svc.partitions is not None
        svc.partitions.refresh_s = 0.05
    stuck, freeze_from = asyncio.Event(), [10**9]  # B's validator freezes once it has acknowledged this many
    b[0].handle = freeze_after(b[0], freeze_from, stuck)  # type: ignore[method-assign]
    tasks_a = [asyncio.create_task(f(stop_a)) for svc in a for f in (svc.run, svc._heartbeats)]
    tasks_b = [asyncio.create_task(f(stop_b)) for svc in b for f in (svc.run, svc._heartbeats)]
    why = diagnose_all(redis, a, b)
    try:
        await wait_until("each instance of each stage holding one partition",
                         lambda: all(len(parts(s)) == 1 for s in (*a, *b)), [*tasks_a, *tasks_b], why=why)
        await chain.publish(pieces[0])
        await chain.drained([*tasks_a, *tasks_b])
        freeze_from[0] = b[0].consumer.stats.acked + 30
        await chain.publish(pieces[1])
        await wait_until("B's validator frozen in the middle of the second piece", stuck.is_set,
                         [*tasks_a, *tasks_b], why=why)
        await finish(tasks_b, "B killed", cancel=True)
        await chain.publish(pieces[2])
        await wait_until("A holding both partitions of every stage",
                         lambda: all(parts(s) == {0, 1} for s in a), tasks_a, why=why)
        await chain.drained(tasks_a)
    finally:
        stop_a.set()
        stop_b.set()
        await finish([*tasks_a, *tasks_b], "stopping A and B")
        await chain.producer.aclose()
        for svc in (*a, *b):
            await svc.close()

    # Assert: every trade once and in order on md:trade, every minute and bar as one instance made them
    got = await chain_outputs(redis)
    for name, ids in expected.items():
        assert got.get(name) == ids, f"{name} differs"
    assert got.keys() == expected.keys()
    assert a[0].consumer.stats.claimed > 0  # B's validator's batch in hand was taken over


def parts(svc: Stage) -> set[int]:
    assert svc.partitions is not None
    return set(svc.partitions.live)


def diagnose_all(redis: aioredis.Redis, *groups: Sequence[Stage]) -> Callable[[], Awaitable[str]]:
    async def why() -> str:
        lines = []
        for svc in (s for g in groups for s in g):
            p = svc.partitions
            assert p is not None
            lines.append(f"{svc.name}-{svc.instance}: live {sorted(p.live)} quota {p.share.quota} alive "
                         f"{sorted(p.share.alive)} acked {p.stats.acked}")
        leases = {k.decode(): await redis.get(k) for k in await redis.keys("mdp:lease:*")}
        return "; ".join([*lines, f"leases {leases}"])
    return why


async def test_a_collector_routes_each_symbol_to_its_partition_stream(redis, settings) -> None:  # noqa: F811
    # Arrange: the simulator serving four Binance symbols (the real capture under each), one per partition
    served = {"BTC/USDT": 2, "ETH/USDT": 3, "XRP/USDT": 0, "LINK/USDT": 1}
    async with start_simulator(market_symbols=[s.replace("/", "") for s in served], rate=800, loop=True,
                               history=False, depth=False) as sim:
        binance = ExchangeSettings(id="binance", symbols=list(served), channels=["trades"])
        cfg = collector_settings(replace(settings, bus=replace(settings.bus, partitions=4), exchanges=[binance]),
                                 sim.rest_url, sim.ws_url)
        collector = Collector(cfg, "t", exchange="binance")

        async def enough() -> bool:
            counts = [sum(isinstance(e, Trade) for e in await read_events(redis, streams.raw("binance", k)))
                      for k in range(4)]
            return min(counts) >= 100

        # Act
        await run_collector(collector, enough, timeout=90)
    # Assert: partition k's stream holds its symbol's trades, in id order, and the markets of its base assets
    assert not await redis.exists(streams.raw("binance"))
    for symbol, k in served.items():
        events = await read_events(redis, streams.raw("binance", k))
        trades = [e for e in events if isinstance(e, Trade)]
        assert {t.symbol for t in trades} == {symbol}
        ids = [int(t.trade_id) for t in trades]
        assert ids == sorted(ids) and len(ids) == len(set(ids)) >= 100
        markets = [e for e in events if isinstance(e, Market)]
        assert markets and all(streams.partition_of(m.symbol, 4) == k for m in markets)
        assert symbol in {m.symbol for m in markets}


# --- the cache publisher partitioned ----------------------------------------------------------------------

async def cache_view(redis: aioredis.Redis) -> dict[str, object]:
    """What strategies read from the cache for the five markets: the price JSON, the recent trades' ids
    (newest first) and the list's high-water mark."""
    out: dict[str, object] = {}
    for symbol in SYMBOLS:
        out[f"price {symbol}"] = await redis.get(price_key("binance", symbol))
        listed = await redis.lrange(recent_trades_key("binance", symbol), 0, -1)
        out[f"recent {symbol}"] = [msgspec.json.decode(t)["trade_id"] for t in listed]
        out[f"hw {symbol}"] = await redis.get(recent_trades_hw_key("binance", symbol))
    return out


async def test_two_partitioned_cache_publishers_keep_every_trade_of_each_market_once_and_in_order(
        redis, settings) -> None:  # noqa: F811
    """Two cache publishers over four partitions: A alone, then B joins and takes two, freezes with a batch in
    hand and is killed, and A takes them back. The cache (price, every trade in the recent list, its
    high-water mark) is the one a single publisher leaves, and each list holds the market's every trade once,
    newest first: computed here from the capture."""
    # Arrange: lists long enough for every trade of the capture, so a trade dropped anywhere shows
    small = replace(settings, bus=replace(settings.bus, batch_max_events=20, read_count=10, heartbeat_interval_s=0.2),
                    cache=replace(settings.cache, recent_trades=20_000))
    pieces = pieces_of_five_symbols()
    names = sorted({s for piece in pieces for s in streams_of(piece)})
    truth = {symbol: [t.trade_id for t in sorted((e for piece in pieces for e in piece
                                                  if isinstance(e, Trade) and e.symbol == symbol),
                                                 key=order_key, reverse=True)]
             for symbol in SYMBOLS}
    assert all(len(ids) > 9000 and len(set(ids)) == len(ids) for ids in truth.values())
    producer = Producer(redis, Codec(), small.bus, "test")
    one = CachePublisher(small, instance="one")
    stop_one = asyncio.Event()
    task_one = asyncio.create_task(one.run(stop_one))
    try:
        for piece in pieces:
            await producer.publish(streams_of(piece))
        await drained_for(redis, "cache_publisher", names, [task_one])
    finally:
        stop_one.set()
        await finish([task_one], "stopping the single publisher")
        await one.close()
    expected = await cache_view(redis)
    assert all(expected[f"recent {s}"] == truth[s] for s in SYMBOLS)
    await redis.flushdb()

    four = replace(small, bus=replace(small.bus, partitions=4))
    a, b = CachePublisher(four, instance="a"), CachePublisher(four, instance="b")
    # Act: A alone, then B joins, freezes with a batch in hand and is killed, and A takes B's partitions back
    taken_by_b, counters = await join_freeze_and_take_back(redis, a, b, pieces, diagnose_all(redis, [a, b]))
    # Assert: the single publisher's cache, every trade once and in order; B's batch was taken over
    got = await cache_view(redis)
    assert {s: got[f"recent {s}"] == truth[s] for s in SYMBOLS} == dict.fromkeys(SYMBOLS, True)
    assert got == expected
    assert len(taken_by_b) == 2 and a.consumer.stats.claimed > 0
    assert counters["partitions_held"] == 4
