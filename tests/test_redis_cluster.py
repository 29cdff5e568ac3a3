"""The local Redis Cluster the cluster work of issue 13 builds on (tools/localstores.py `start_redis_cluster`):
three real masters (Debian's redis-server in cluster mode on loopback ports, joined with `redis-cli --cluster
create`), each with AOF.

What it shows, with redis-py's cluster client (the one the bus will use):
- a MULTI/EXEC whose keys share a hash tag runs on the cluster, XADD + XACK + a checkpoint, as a partition's
  commit would with every key tagged `{p<k>}` (docs/scaling.md, "Redis Cluster (item 2)");
- the same commit with today's key names (`raw:binance`, `valid:binance`, `mdp:state:validator`) is refused
  with CROSSSLOT before anything runs: why services refuse a cluster node today (`refuse_cluster`);
- a master killed (SIGKILL) and started again comes back with its slots and every committed entry (AOF).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import ClusterDownError, MovedError, RedisClusterException, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError

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
