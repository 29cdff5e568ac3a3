"""A client of the project's Redis: one node (redis-py's `Redis`), or a Redis Cluster (redis-py's `RedisCluster`)
with `[bus] cluster = true`; every part of common (the bus, the cache client, history) and every service makes
its client here. What the bus does on a cluster: common/bus/client.py.

The cluster client is handed around typed as `aioredis.Redis`: it answers the same commands. What differs is
asked with `is_cluster`.
"""

from __future__ import annotations

from typing import Any, cast

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterPipeline, RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException

CLOSED_UNDER = ("'NoneType' object has no attribute", "the handler is closed")


def _closed_under(exc: AttributeError | RuntimeError, what: object) -> RedisConnectionError:
    """What redis-py's asyncio cluster connections raise when a node's connections are closed under a command
    that is writing to one (AttributeError: 'NoneType' object has no attribute 'writelines'; with uvloop also
    RuntimeError: unable to perform operation on <TCPTransport closed=True ...>; the handler is closed), as a
    ConnectionError; any other AttributeError or RuntimeError is re-raised as it is."""
    if not any(text in str(exc) for text in CLOSED_UNDER):
        raise exc
    return RedisConnectionError(f"the connection closed under {what} as a node went away ({exc})")


class _ClusterPipeline(ClusterPipeline):
    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> list[Any]:
        try:
            return await super().execute(raise_on_error, allow_redirections)
        except (AttributeError, RuntimeError) as exc:
            raise _closed_under(exc, "a pipeline") from exc


def stream_keys(command: str, args: tuple[Any, ...]) -> list[Any] | None:
    """The keys of an XREADGROUP or XREAD (the first half of what follows STREAMS), or None for any other
    command. XREADGROUP's keys are "movable" (COMMAND INFO), so redis-py asks a server with COMMAND GETKEYS
    before every one to find its slot: measured 0.67-0.79 extra round trips per trade through the pipeline."""
    name = command.upper()
    if name not in ("XREADGROUP", "XREAD"):
        return None
    start = 3 if name == "XREADGROUP" else 0  # GROUP <group> <consumer> come first: names, never the token
    for i in range(start, len(args)):
        token = args[i]
        if (token.decode() if isinstance(token, bytes) else str(token)).upper() == "STREAMS":
            rest = args[i + 1:]
            return list(rest[:len(rest) // 2])
    return None


class _Cluster(RedisCluster):
    """redis-py's cluster client, with one failure of its asyncio connections raised as what it is, and the slot
    of a stream read worked out here.

    - When a master goes away, redis-py closes that node's connections, also one another command or pipeline is
      writing to at that moment, which then fails with AttributeError or RuntimeError (`_closed_under`; seen in
      the chaos suite with a master SIGKILLed). Here it is a ConnectionError, which every caller treats as Redis
      unreachable for a moment.
    - XREADGROUP's slot comes from its keys (`stream_keys`) instead of a COMMAND GETKEYS round trip; the rest of
      redis-py's routing (MOVED, refreshing the slot map, retries) is unchanged."""

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().execute_command(*args, **kwargs)
        except (AttributeError, RuntimeError) as exc:
            raise _closed_under(exc, repr(args[0])) from exc

    async def _determine_slot(self, command: str, *args: Any) -> int:
        keys = stream_keys(command, args)
        if not keys:
            return await super()._determine_slot(command, *args)
        slots = {self.keyslot(key) for key in keys}
        if len(slots) != 1:
            raise RedisClusterException(f"{command} - all keys must map to the same key slot (keys: {keys})")
        return slots.pop()

    def pipeline(self, transaction: Any | None = None, shard_hint: Any | None = None) -> ClusterPipeline:
        super().pipeline(transaction, shard_hint)  # its checks
        return _ClusterPipeline(self, transaction)  # type: ignore[abstract]  # as redis-py makes its own


def connect(url: str, cluster: bool, **kwargs: Any) -> aioredis.Redis:
    """A client of the Redis at `url`: a cluster client when `cluster` (any master's URL will do)."""
    if cluster:
        return cast(aioredis.Redis, _Cluster.from_url(url, **kwargs))
    return aioredis.Redis.from_url(url, **kwargs)


def is_cluster(redis: object) -> bool:
    return isinstance(redis, RedisCluster)
