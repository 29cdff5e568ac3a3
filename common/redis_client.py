"""A client of the project's Redis: one node (redis-py's `Redis`), or a Redis Cluster (redis-py's `RedisCluster`)
with `[bus] cluster = true`; every part of common (the bus, the cache client, history) and every service makes
its client here. What the bus does on a cluster: common/bus/client.py.

The cluster client is handed around typed as `aioredis.Redis`: it answers the same commands. What differs is
asked with `is_cluster`.
"""

from __future__ import annotations

from typing import Any, cast

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster


def connect(url: str, cluster: bool, **kwargs: Any) -> aioredis.Redis:
    """A client of the Redis at `url`: a cluster client when `cluster` (any master's URL will do)."""
    if cluster:
        return cast(aioredis.Redis, RedisCluster.from_url(url, **kwargs))
    return aioredis.Redis.from_url(url, **kwargs)


def is_cluster(redis: object) -> bool:
    return isinstance(redis, RedisCluster)
