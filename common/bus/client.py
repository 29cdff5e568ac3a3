"""The bus on a Redis Cluster (`[bus] cluster = true`; the client is made by common/redis_client.py `connect`).

On a cluster every key of partition k carries the hash tag {p<k>} (common/bus/streams.py `tagged`), so each of
the bus's commits touches one hash slot, and every consuming stage works partition by partition (one consumer, one
slot per read). The cluster client serves the single-key commands and the reads as redis-py routes them; the
commits go over a lean RESP connection to the master serving their slot (`Transactions` in core.py), never
through redis-py's cluster pipeline, which re-sends a transaction after a connection error (a published batch
would be published twice).

What differs from one node, asked with common/redis_client.py `is_cluster`: a pipeline with `transaction=True`
(a cluster runs it only within one slot: the bus's go through `Transactions`), and the connection pool (a
cluster has one per node).
"""

from __future__ import annotations

from typing import cast

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from common.bus.resp import Command


def slot_of(command: Command) -> int:
    """The hash slot of a command's key: the first argument after the verb, or after EVAL's script and key
    count."""
    verb = str(command[0]).upper() if not isinstance(command[0], bytes) else command[0].decode().upper()
    key = command[3] if verb in ("EVAL", "EVALSHA") else command[1]
    return key_slot(key if isinstance(key, bytes) else str(key).encode())


def commit_slot(commands: list[Command] | tuple[Command, ...], watch_key: str | None) -> int:
    """The one hash slot of a commit on a cluster; ValueError naming the commands if they span several (a key
    that lacks its partition's hash tag: a defect, which a cluster would refuse with CROSSSLOT)."""
    slots = {slot_of(c): c for c in commands}
    if watch_key is not None:
        slots.setdefault(key_slot(watch_key.encode()), ("WATCH", watch_key))
    if len(slots) != 1:
        shown = "; ".join(" ".join(str(a) for a in c[:2]) for c in slots.values())
        raise ValueError(f"a commit spans {len(slots)} hash slots ({shown}): on a Redis Cluster every key of "
                         f"one commit must carry the same partition tag {{p<k>}} (common/bus/streams.py `tagged`)")
    return next(iter(slots))


def node_address(redis: aioredis.Redis, slot: int) -> tuple[str, int]:
    """Host and port of the master serving `slot`, from the cluster client's slot map."""
    node = cast(RedisCluster, redis).nodes_manager.get_node_from_slot(slot)
    return str(node.host), int(node.port)


def node_client(redis: aioredis.Redis, host: str, port: int) -> aioredis.Redis:
    """A plain client of one node of a Redis Cluster (the cluster client `redis`), with the cluster client's
    credentials and timeouts, as resp.master_connection takes them: for what a cluster pipeline refuses (PUBLISH,
    which has no key)."""
    kw = cast(RedisCluster, redis).connection_kwargs
    return aioredis.Redis(host=host, port=port, username=kw.get("username"), password=kw.get("password"),
                          socket_timeout=kw.get("socket_timeout"),
                          socket_connect_timeout=kw.get("socket_connect_timeout"))


async def refresh_slots(redis: aioredis.Redis) -> None:
    """Read the cluster's slot map again (after a MOVED, or a master that stopped answering)."""
    await cast(RedisCluster, redis).nodes_manager.initialize()


def cluster_url(redis: aioredis.Redis) -> str:
    """Where a cluster client points (the node it started from), without credentials (for messages)."""
    nodes = cast(RedisCluster, redis).nodes_manager.startup_nodes
    first = next(iter(nodes.values()), None)
    return f"redis://{first.host}:{first.port}" if first is not None else "redis://(no node given)"
