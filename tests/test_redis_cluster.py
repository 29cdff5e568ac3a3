"""The bus on a Redis Cluster ([bus] cluster = true; docs/scaling.md, "Redis Cluster"), on the local cluster of
tools/localstores.py `start_redis_cluster`: three real masters (Debian's redis-server in cluster mode on loopback
ports, joined with `redis-cli --cluster create`), each with AOF.

- a MULTI/EXEC whose keys share a hash tag runs on the cluster, XADD + XACK + a checkpoint, as a partition's
  commit does with every key tagged `{p<k>}`, and survives its master SIGKILLed and restarted; the same commit
  with one node's key names is refused with CROSSSLOT before anything runs (why the keys are tagged);
- the names, and a commit over two slots refused before it is sent;
- two instances each of the validator, the normalizer, the aggregator and the cache publisher run on the cluster
  partition by partition, every key they write tagged, and make of the real capture exactly what one instance
  each makes on one node; the cache's lists are right and the ticks arrive;
- a collector against the simulator commits each round partition by partition, and loses and doubles nothing
  while the master of one partition is killed and started again; a round that fails in one partition keeps
  that part in doubt and puts the rest back;
- redis-py's errors for a connection closed under a command are connection errors; every program of
  supervisord.conf runs on a cluster.
(The end-to-end test and the short chaos suite also run on a cluster: tests/test_end_to_end.py,
tests/chaos/test_chaos_short.py.)
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import ClusterDownError, MovedError, RedisClusterException, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError

from common.bus import streams
from common.config import ExchangeSettings, Settings
from common.redis_client import connect, stream_keys
from common.stores.cache import recent_trades_key
from services.aggregator import Aggregator
from services.cache_publisher.service import CachePublisher
from services.normalizer import Normalizer
from services.validator import Validator
from tests.test_aggregator import settings  # noqa: F401 - the fixture
from tests.test_partitions import (
    SYMBOLS,
    Chain,
    finish,
    one_instance_each,
    parts,
    pieces_of_five_symbols,
    wait_until,
)
from tests.test_stages import market, read
from tools.localstores import LocalCluster, LocalServer, start_redis_cluster

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    started = start_redis_cluster(tmp_path / "cluster")
    try:
        yield started
    finally:
        started.stop()


def _port_of(client: RedisCluster, key: str) -> int:
    """The port of the master serving `key`'s slot, from the client's slot map (CLUSTER SLOTS)."""
    node = client.get_node_from_key(key)
    assert node is not None, key
    return int(node.port)


async def _commit(client: RedisCluster, inbound: str, outbound: str, state: str, entry_id: str) -> list[object]:
    """A stage's commit: publish an output, acknowledge the input, checkpoint, in one MULTI/EXEC."""
    async with client.pipeline(transaction=True) as pipe:
        pipe.xadd(outbound, {"events": b"[1]"})
        pipe.xack(inbound, "validator", entry_id)
        pipe.set(state, entry_id)
        return list(await pipe.execute())


async def test_a_tagged_commit_runs_on_the_cluster_and_survives_its_master_killed_and_restarted(
        cluster: LocalCluster) -> None:
    # Arrange: the keys of partition 3, tagged, and the cluster's three masters each serving slots.
    tag = "{p3}"
    inbound, outbound, state = f"raw:binance:{tag}", f"valid:binance:{tag}", f"mdp:state:validator:{tag}"
    assert len({key_slot(k.encode()) for k in (inbound, outbound, state)}) == 1
    client = RedisCluster.from_url(cluster.url)
    try:
        await client.initialize()
        assert len({_port_of(client, f"{{p{k}}}") for k in range(12)}) == 3  # partitions spread over the masters
        await client.xgroup_create(inbound, "validator", id="0", mkstream=True)
        ids = [await client.xadd(inbound, {"events": str(i).encode()}) for i in range(5)]
        await client.xreadgroup("validator", "validator-0.p3", {inbound: ">"}, count=5)

        # Act: five commits, one per entry.
        for entry_id in ids:
            replies = await _commit(client, inbound, outbound, state, entry_id.decode())
            assert replies[1] == 1 and replies[2] is True

        # Assert: every effect is there; then the master holding the partition dies and comes back.
        assert await client.xlen(outbound) == 5
        assert (await client.xpending(inbound, "validator"))["pending"] == 0
        owner = next(n for n in cluster.nodes if n.port == _port_of(client, tag))
        owner.kill()
        with pytest.raises((RedisConnectionError, ClusterDownError, RedisClusterException, TimeoutError)):
            async with asyncio.timeout(30):
                await client.xlen(outbound)  # its slots have no master until it is back
        owner.start(cluster.binary)
        cluster.wait_ok()
        await client.aclose()
        client = RedisCluster.from_url(cluster.url)
        assert await client.xlen(outbound) == 5
        assert await client.get(state) == ids[-1]
        assert (await client.xpending(inbound, "validator"))["pending"] == 0
    finally:
        await client.aclose()


async def test_today_s_key_names_span_slots_and_the_cluster_refuses_the_commit(cluster: LocalCluster) -> None:
    # Arrange: the unpartitioned validator's keys as they are named today.
    inbound, outbound, state = "raw:binance", "valid:binance", "mdp:state:validator"
    assert len({key_slot(k.encode()) for k in (inbound, outbound, state)}) == 3
    client = RedisCluster.from_url(cluster.url)
    try:
        entry_id = (await client.xadd(inbound, {"events": b"[1]"})).decode()
        # Act / Assert: refused as a whole, before any command runs (nothing published, nothing acknowledged).
        with pytest.raises((ResponseError, RedisClusterException)) as err:
            await _commit(client, inbound, outbound, state, entry_id)
        assert "CROSSSLOT" in str(err.value) or "same slot" in str(err.value), err.value
        assert await client.exists(outbound, state) == 0
        # A plain client on one node is redirected (MOVED) for keys of the other masters.
        node_client = aioredis.Redis.from_url(cluster.url)
        moved = 0
        for key in (inbound, outbound, state):
            try:
                await node_client.get(key) if key == state else await node_client.xlen(key)
            except MovedError:
                moved += 1
        await node_client.aclose()
        assert moved >= 1
    finally:
        await client.aclose()


def test_the_slot_audit_names_each_transaction_s_keys_and_slots(redis_server: LocalServer) -> None:
    """tools/slot_audit.py, which measured what the bus's commits span today (docs/scaling.md): it watches a
    real Redis with MONITOR and groups each client's WATCH + MULTI ... EXEC by the patterns of its keys."""
    import threading

    import redis as sync_redis

    from tools import slot_audit

    # Arrange: a watcher for 5 s; meanwhile one commit with today's names and one with tagged names.
    found: dict[tuple[str, ...], slot_audit.Shape] = {}
    watching = threading.Event()
    watcher = threading.Thread(target=lambda: found.update(slot_audit.audit(redis_server.url, 5.0, watching)))
    watcher.start()
    client = sync_redis.Redis.from_url(redis_server.url)
    assert watching.wait(10), "the audit did not start MONITOR within 10 s"
    for partition in ("p0", "{p1}"):
        with client.pipeline(transaction=True) as pipe:
            pipe.watch(f"mdp:lease:validator:{partition}")
            pipe.multi()
            pipe.xadd(f"valid:binance:{partition}", {"events": b"[]"})
            pipe.hset(f"mdp:state:validator:{partition}", "k", "v")
            pipe.execute()
    client.close()
    # Act
    watcher.join(timeout=10)
    # Assert: two shapes, the untagged one over three slots (WATCH's key included), the tagged one over one.
    assert not watcher.is_alive()
    by_slots = {shape.most_slots: key for key, shape in found.items()}
    assert by_slots.keys() == {1, 3}, found
    assert by_slots[3] == ("HSET mdp:state:validator:p{k}", "WATCH mdp:lease:validator:p{k}",
                           "XADD valid:binance:p{k}")
    assert by_slots[1] == ("HSET mdp:state:validator:{tag}", "WATCH mdp:lease:validator:{tag}",
                           "XADD valid:binance:{tag}")


def test_a_cluster_s_keys_carry_their_partition_s_hash_tag() -> None:
    # partition k's keys: one slot each, whatever the key
    assert streams.tagged("md:trade:binanceusdm:BTC/USDT:USDT", 3) == "md:trade:binanceusdm:BTC/USDT:USDT:{p3}"
    assert streams.tagged("raw:binance:{p3}", 1) == "raw:binance:{p3}"  # a tagged key keeps its tag
    assert streams.raw_for("binance", "ETH/USDT", 4, cluster=True) == "raw:binance:{p3}"
    assert streams.raw_for("binance", "ETH/USDT", 1, cluster=True) == "raw:binance:{p0}"  # P = 1 too
    assert streams.raw_for("binance", "ETH/USDT", 4) == "raw:binance:p3"  # one node: as before
    assert streams.valid("binance", 2, cluster=True) == "valid:binance:{p2}"
    for key in ("md:trade:binance:ETH/USDT:{p3}", "dlq:raw:binance:{p3}", "mdp:lease:validator:{p3}"):
        assert streams.tag_of(key) == 3 and streams.partition_of_stream(key, 4) == 3
        assert key_slot(key.encode()) == key_slot(b"{p3}")
    assert streams.tag_of("md:trade:binance:ETH/USDT") is None and streams.tag_of("a:{x}:{p1}") is None


def test_a_commit_over_several_slots_is_refused_before_it_is_sent() -> None:
    from common.bus.client import commit_slot

    tagged = [("XADD", "valid:binance:{p1}", "*", "e", "1"), ("XACK", "raw:binance:{p1}", "validator", "1-0")]
    assert commit_slot(tagged, "mdp:lease:validator:{p1}") == key_slot(b"{p1}")
    with pytest.raises(ValueError, match=r"spans 2 hash slots .*XADD mdp:alerts.*partition tag"):
        commit_slot([*tagged, ("XADD", "mdp:alerts", "*", "e", "1")], None)


async def cluster_keys(client: aioredis.Redis, pattern: str) -> list[str]:
    """Every key matching `pattern` on every master of the cluster."""
    found = await client.keys(pattern, target_nodes=RedisCluster.PRIMARIES)  # type: ignore[call-arg]
    return sorted({k.decode() for k in found})


def untagged(key: str) -> str:
    k = streams.tag_of(key)
    return key.removesuffix(f":{{p{k}}}") if k is not None else key


async def test_the_stages_run_on_the_cluster_partition_by_partition_and_make_what_they_make_on_one_node(
        cluster: LocalCluster, redis, settings: Settings) -> None:  # noqa: F811
    # Arrange: what one instance each makes of five symbols' capture on one node; then the same settings on the
    # cluster, with four partitions (the five symbols fall in all four; the four tags' slots on all three masters).
    replace = msgspec.structs.replace
    small = replace(settings, bus=replace(settings.bus, batch_max_events=20, read_count=10, heartbeat_interval_s=0.2))
    pieces = pieces_of_five_symbols()
    expected = await one_instance_each(redis, small, pieces)
    on_cluster = replace(small, redis=replace(small.redis, url=cluster.url),
                         bus=replace(small.bus, partitions=4, cluster=True))
    assert {streams.partition_of(s, 4) for s in SYMBOLS} == {0, 1, 2, 3}
    client = connect(cluster.url, True)
    await client.initialize()  # type: ignore[attr-defined]
    assert len({_port_of(client, streams.part(k, cluster=True)) for k in range(4)}) == 3  # type: ignore[arg-type]
    chain = Chain(client, on_cluster)
    # two instances of each stage, sharing the partitions (with the cache publisher, which reads md:*)
    stages = [cls(on_cluster, i) for cls in (Validator, Normalizer, Aggregator, CachePublisher) for i in "ab"]
    for svc in stages:
        assert svc.partitions is not None  # on a cluster every stage works partition by partition
        svc.partitions.refresh_s = 0.05
    stop = asyncio.Event()
    tasks = [asyncio.create_task(f(stop)) for svc in stages for f in (svc.run, svc._heartbeats)]
    ticks = connect(cluster.url, False).pubsub(ignore_subscribe_messages=True)  # a node's subscriber
    await ticks.psubscribe("ticks:*")
    try:
        # Act: the collector's events, piece by piece, through the stages.
        await wait_until("each instance of each stage holding two partitions",
                         lambda: all(len(parts(s)) == 2 for s in stages), tasks)
        for piece in pieces:
            await chain.publish(piece)
        await chain.drained(tasks)

        # Assert: every trade once and in order on its tagged md:trade stream, every minute and bar as on one node
        got: dict[str, list[object]] = {}
        for key in await cluster_keys(client, "md:*"):
            events = await read(client, key)
            if key.startswith("md:trade:"):
                got[untagged(key)] = [e.trade_id for e in events]  # type: ignore[union-attr]
            elif key.startswith("md:candle"):
                ours = [e for e in events if getattr(e, "source", "") == "aggregate"]
                if ours:
                    got[untagged(key)] = list(ours)
        for name, ids in expected.items():
            assert got.get(name) == ids, f"{name} differs"
        assert got.keys() == expected.keys()
        # Every key of the partitions' work carries its partition's tag: inputs, outputs, alerts, leases, checkpoints.
        for key in await cluster_keys(client, "*"):
            if key.startswith(("raw:", "valid:", "md:", "mdp:lease:", "mdp:state:", "mdp:alerts", "mdp:gaps")):
                assert streams.tag_of(key) is not None, key
        assert {untagged(k) for k in await cluster_keys(client, "mdp:state:*")} == {"mdp:state:validator",
                                                                                     "mdp:state:aggregator"}
        # The cache: each market's newest trades listed, newest first; the ticks reached a node's subscriber.
        last = {name: ids[-1] for name, ids in expected.items() if name.startswith("md:trade:")}
        async with asyncio.timeout(30):
            while True:
                heads = {s: await client.lindex(recent_trades_key("binance", s), 0) for s in SYMBOLS}
                if all(h is not None and json.loads(h)["trade_id"] == last[streams.market_data("trade", "binance", s)]
                       for s, h in heads.items()):
                    break
                await asyncio.sleep(0.1)
        listed = await client.lrange(recent_trades_key("binance", "BTC/USDT"), 0, -1)
        assert len(listed) == settings.cache.recent_trades
        ids = [int(json.loads(x)["trade_id"]) for x in listed]
        assert ids == sorted(ids, reverse=True) and len(set(ids)) == len(ids)
        assert not await cluster_keys(client, "dlq:*"), "nothing dead-lettered"
        seen = None
        async with asyncio.timeout(10):
            while seen is None:  # None also for the subscription's own confirmation (ignored)
                seen = await ticks.get_message(timeout=1)
        assert seen["channel"].startswith(b"ticks:")
    finally:
        stop.set()
        await finish(tasks, "stopping the stages")
        await chain.producer.aclose()
        await ticks.aclose()
        for svc in stages:
            await svc.close()
        await client.aclose()


async def test_a_collector_commits_partition_by_partition_and_rides_out_a_master_killed_and_restarted(
        cluster: LocalCluster, settings: Settings) -> None:  # noqa: F811
    from schemas import Market, Trade
    from services.collector.service import Collector
    from simulator import start_simulator
    from tests.collecting import collector_settings
    from tests.collecting import read as read_events

    # Arrange: the simulator serving four Binance symbols, one per partition; the master of ETH's partition is
    # the one that will be killed.
    replace = msgspec.structs.replace
    served = {"BTC/USDT": 2, "ETH/USDT": 3, "XRP/USDT": 0, "LINK/USDT": 1}
    client = connect(cluster.url, True)
    await client.initialize()  # type: ignore[attr-defined]
    victim = next(n for n in cluster.nodes if n.port == _port_of(client, "{p3}"))  # type: ignore[arg-type]

    async def trades_of(k: int) -> list[Trade]:
        return [e for e in await read_events(client, streams.raw("binance", k, cluster=True)) if isinstance(e, Trade)]

    async def at_least(n: int) -> None:
        async with asyncio.timeout(90):
            while min([len(await trades_of(k)) for k in range(4)]) < n:
                if task.done():
                    task.result()
                await asyncio.sleep(0.1)

    async with start_simulator(market_symbols=[s.replace("/", "") for s in served], rate=400, loop=True,
                               history=False, depth=False) as sim:
        binance = ExchangeSettings(id="binance", symbols=list(served), channels=["trades"])
        on_cluster = replace(settings, redis=replace(settings.redis, url=cluster.url),
                             bus=replace(settings.bus, partitions=4, cluster=True), exchanges=[binance])
        collector = Collector(collector_settings(on_cluster, sim.rest_url, sim.ws_url), "t", exchange="binance")
        stop = asyncio.Event()
        task = asyncio.create_task(collector.run(stop))
        try:
            # Act: collect, kill the master of partition 3 for a few seconds, start it again, collect more.
            await at_least(100)
            victim.kill()
            await asyncio.sleep(3)
            assert collector.state == "degraded", collector.detail
            victim.start(cluster.binary)
            cluster.wait_ok()
            before = len(await trades_of(3))
            await at_least(before + 200)
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
            await collector.close()

    # Assert: each partition's stream holds its symbol's trades, every id once and in order, none missing
    for symbol, k in served.items():
        events = await read_events(client, streams.raw("binance", k, cluster=True))
        trades = [e for e in events if isinstance(e, Trade)]
        assert {t.symbol for t in trades} == {symbol}
        ids = [int(t.trade_id) for t in trades]
        assert ids == sorted(ids) and len(ids) == len(set(ids)), f"{symbol}: out of order or doubled"
        assert ids[-1] - ids[0] + 1 == len(ids), f"{symbol}: {ids[-1] - ids[0] + 1 - len(ids)} trades missing"
        assert symbol in {m.symbol for m in events if isinstance(m, Market)}
    assert collector.count["positions_lost"] == 0
    positions = await cluster_keys(client, "mdp:collector:pos:*")
    assert {streams.tag_of(key) for key in positions} == {0, 1, 2, 3}
    assert not await cluster_keys(client, "raw:binance"), "nothing untagged"
    await client.aclose()


async def test_a_cluster_round_that_fails_in_one_partition_keeps_that_part_in_doubt_and_the_rest_unsent() -> None:
    """Publisher._publish on a cluster: one commit per partition, in partition order. When the second fails, the
    first is published, the failed part is what the caller holds (in doubt: its reply may be lost), and the
    parts after it are back at the front of the outbox, unsent."""
    from collections import Counter
    from decimal import Decimal
    from types import SimpleNamespace

    from redis.exceptions import ConnectionError as RedisConnectionError

    from schemas import Market, Trade
    from services.collector.outbox import Batch
    from services.collector.publisher import Publisher
    from services.collector.symbols import SymbolState

    committed: list[list[str]] = []

    class FailingSecond:
        async def commit(self, outputs: dict[str, list[object]], commands: object = ()) -> None:
            if len(committed) == 1:
                raise RedisConnectionError("the master of this partition went away")
            committed.append(sorted(s for s, events in outputs.items() if events))

    def trade(symbol: str, tid: int) -> Trade:
        return Trade(exchange="binance", symbol=symbol, trade_id=str(tid), price=Decimal(1), amount=Decimal(1),
                     side="buy", ts_event=tid, ts_recv=tid)

    served = {"XRP/USDT": 0, "LINK/USDT": 1, "BTC/USDT": 2, "ETH/USDT": 3}
    assert all(streams.partition_of(s, 4) == k for s, k in served.items())
    publisher = Publisher(SimpleNamespace(), FailingSecond(), "binance",  # type: ignore[arg-type]
                          {s: SymbolState() for s in served}, Counter(), True, 1000, partitions=4, cluster=True)
    batches = [Batch(s, "trades", [trade(s, 10 * k + i) for i in range(3)]) for s, k in served.items()]
    batches.append(Batch("", "", [market(s, s.replace("/", "")) for s in served]))  # the catalog: split by symbol
    notices: list[object] = []
    dropped: list[object] = []

    with pytest.raises(RedisConnectionError):
        await publisher._publish(batches, notices, dropped)  # type: ignore[arg-type]

    assert committed == [["raw:binance:{p0}"]]  # partition 0's trades and XRP's market, in its slot
    assert {b.symbol for b in batches} == {"LINK/USDT", ""}  # the caller holds partition 1's part, in doubt
    assert [e.symbol for b in batches for e in b.events if isinstance(e, Market)] == ["LINK/USDT"]
    left = list(publisher.outbox.queued)
    assert [b.symbol for b in left if b.symbol] == ["BTC/USDT", "ETH/USDT"]  # unsent, back at the front
    assert sorted(e.symbol for b in left for e in b.events if isinstance(e, Market)) == ["BTC/USDT", "ETH/USDT"]


async def test_the_cache_publisher_s_ticks_go_through_the_master_of_their_partition(
        cluster: LocalCluster, settings: Settings) -> None:  # noqa: F811
    """A cluster pipeline refuses PUBLISH, so the ticks go through a client of one node: the master serving the
    batch's partition, so that a master down stalls only its own partitions' cache, not every partition's."""
    # Arrange: a cache publisher on the cluster, four partitions over the three masters
    on_cluster = msgspec.structs.replace(settings, redis=msgspec.structs.replace(settings.redis, url=cluster.url),
                                         bus=msgspec.structs.replace(settings.bus, partitions=4, cluster=True))
    publisher = CachePublisher(on_cluster, "a")
    keys = {k: recent_trades_key("binance", next(s for s in SYMBOLS if streams.partition_of(s, 4) == k))
            for k in range(4)}
    try:
        await publisher.redis.initialize()  # type: ignore[attr-defined]
        masters = {k: _port_of(publisher.redis, key) for k, key in keys.items()}  # type: ignore[arg-type]
        assert len(set(masters.values())) >= 2

        # Act: the ticker of each partition's recent-trades key, each asked twice
        tickers = {k: publisher.ticker(key) for k, key in keys.items()}
        again = {k: publisher.ticker(key) for k, key in keys.items()}
        answered = {k: await t.ping() for k, t in tickers.items()}
    finally:
        await publisher.close()

    # Assert: each partition's ticker is a client of that partition's master, one client per master
    assert {k: t.connection_pool.connection_kwargs["port"] for k, t in tickers.items()} == masters
    assert all(again[k] is tickers[k] for k in keys) and len(publisher.tickers) == len(set(masters.values()))
    assert all(answered.values())


def test_a_stream_read_s_keys_are_read_from_the_command_itself() -> None:
    # the arguments after the command's name, as redis-py's routing gets them; a group and a consumer may be
    # called STREAMS
    assert stream_keys("XREADGROUP", (b"GROUP", "STREAMS", "STREAMS", b"COUNT", 5, b"BLOCK", 100,
                                      b"STREAMS", "raw:a:{p1}", "raw:b:{p1}", ">", ">")) == ["raw:a:{p1}", "raw:b:{p1}"]
    assert stream_keys("xread", ("COUNT", 1, "STREAMS", "s", "0")) == ["s"]
    assert stream_keys("XADD", ("s", "*", "f", "v")) is None


async def _getkeys_calls(cluster: LocalCluster) -> int:
    """COMMAND GETKEYS calls served by the cluster's masters since their last CONFIG RESETSTAT."""
    total = 0
    for node in cluster.nodes:
        one = aioredis.Redis(host="127.0.0.1", port=node.port)
        try:
            total += int((await one.info("commandstats")).get("cmdstat_command|getkeys", {}).get("calls", 0))
        finally:
            await one.aclose()
    return total


async def test_a_partition_s_read_finds_its_master_without_asking_a_server_for_its_keys(cluster: LocalCluster) -> None:
    """redis-py asks a server (COMMAND GETKEYS) for the keys of every XREADGROUP, whose keys are "movable": one
    more round trip for most reads of the pipeline. Our client reads them from the command (`stream_keys`)."""
    # Arrange: two streams in each of four partitions, one entry each, the group created
    ours, theirs = connect(cluster.url, True), RedisCluster.from_url(cluster.url)
    names = {k: [f"raw:binance:{{p{k}}}", f"raw:coinbase:{{p{k}}}"] for k in range(4)}
    try:
        for k, pair in names.items():
            for name in pair:
                await ours.xadd(name, {"events": str(k).encode()})
                await ours.xgroup_create(name, "validator", id="0")
        for node in cluster.nodes:
            one = aioredis.Redis(host="127.0.0.1", port=node.port)
            await one.config_resetstat()
            await one.aclose()

        # Act: each partition's consumer reads its two streams, through our client, then through redis-py's own
        got = {k: await ours.xreadgroup("validator", f"v-0.p{k}", {n: ">" for n in pair}, count=10)
               for k, pair in names.items()}
        ours_calls = await _getkeys_calls(cluster)
        for k, pair in names.items():
            await theirs.xreadgroup("validator", f"v-1.p{k}", {n: "0" for n in pair}, count=10)
        theirs_calls = await _getkeys_calls(cluster) - ours_calls
    finally:
        await ours.aclose()
        await theirs.aclose()

    # Assert: every read found its master and its entries, without a GETKEYS; redis-py's own asks each time
    assert {k: sorted(_text(s) for s, _ in reply) for k, reply in got.items()} == {
        k: sorted(pair) for k, pair in names.items()}
    assert ours_calls == 0 and theirs_calls >= len(names)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def test_a_connection_closed_under_a_command_is_a_connection_error_and_other_errors_stay_as_they_are() -> None:
    """What redis-py's asyncio cluster connections raise when a master goes away while a command writes to one of
    its connections (both seen in the chaos runs) becomes a ConnectionError; any other error is left alone."""
    from common.redis_client import _closed_under

    for seen in (AttributeError("'NoneType' object has no attribute 'writelines'"),
                 RuntimeError("unable to perform operation on <TCPTransport closed=True reading=False 0x1>; the "
                              "handler is closed")):
        assert isinstance(_closed_under(seen, "'SMEMBERS'"), RedisConnectionError)
    for other in (AttributeError("'Trade' object has no attribute 'symbol'"), RuntimeError("event loop is closed")):
        with pytest.raises(type(other)):
            _closed_under(other, "'GET'")


def test_every_program_of_supervisord_conf_runs_on_a_cluster() -> None:
    """Each service class supervisord.conf starts declares that it runs on a Redis Cluster (`cluster_ready`: every
    key it writes is tagged by partition); a new one that does not is refused at start, and fails here."""
    import re

    from services.collector.idle import Unconfigured
    from services.collector.service import Collector
    from services.gap_repair.service import GapRepair
    from services.influx_writer.service import InfluxWriter
    from services.metrics_exporter.service import MetricsExporter
    from services.postgres_writer.service import PostgresWriter

    classes = {c.name: c for c in (Validator, Normalizer, Aggregator, CachePublisher, InfluxWriter, PostgresWriter,
                                   GapRepair, MetricsExporter, Collector)}
    conf = (Path(__file__).resolve().parent.parent / "supervisord.conf").read_text()
    modules = set(re.findall(r"-m services\.(\w+)", conf))
    assert modules == set(classes), modules ^ set(classes)
    assert all(c.cluster_ready for c in (*classes.values(), Unconfigured))
