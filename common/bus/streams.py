"""Stream names: a public contract. Strategies may read any `md:*` stream with a consumer group of their own.

  raw:{exchange}                    collector -> validator: everything a collector saw, as received (internal)
  valid:{exchange}                  validator -> normalizer: events that passed validation (internal)
  raw:{exchange}:p{k}, valid:{exchange}:p{k}, mdp:gaps:p{k}
                                    the same with bus.partitions = P > 1: partition k = crc32 of the event's
                                    symbol's base asset modulo P (partition_of), docs/scaling.md
  {stream}:{p<k>}                   on a Redis Cluster ([bus] cluster = true): every stream of partition k (raw,
                                    valid, md:*, mdp:alerts, mdp:gaps, ...) with the hash tag of partition k as its
                                    last part, e.g. md:trade:binance:BTC/USDT:{p3} (`tagged`), so that a commit
                                    touches one hash slot (docs/scaling.md, "Redis Cluster")
  md:{kind}:{exchange}:{symbol}     normalized public feeds, kind in trade | candle | ticker | book | funding |
                                    open_interest (KIND_OF in schemas/events.py)
                                    e.g. md:trade:binance:BTC/USDT, md:candle:binance:BTC/USDT
  md:market:{exchange}              market catalog entries from ccxt's load_markets
  mdp:alerts                        quality and pipeline alerts (rejected events with reason and values)
  mdp:gaps                          Gap events, holes found in a feed (collector, validator) -> gap_repair
  mdp:heartbeats                    service heartbeats
  strategy:{strategy}               a strategy's fills, positions, metrics, registration -> postgres_writer
  dlq:{stream}                      dead letters of {stream}: entries that failed max_deliveries times
  mdp:streams (a set)               every md:* / raw:* / valid:* stream that has been published to
"""

from __future__ import annotations

import fnmatch
import zlib
from functools import lru_cache

from common.config import BusSettings

ALERTS = "mdp:alerts"
HEARTBEATS = "mdp:heartbeats"
REGISTRY = "mdp:streams"
ALIVE_PREFIX = "mdp:alive:"
GAPS = "mdp:gaps"  # Gap events: holes found in a feed (validator: candle open times, trade ids; collector:
#                    reconnects and stalls) -> the gap_repair service


def part(k: int, cluster: bool = False) -> str:
    """The last part of partition k's own keys: p{k} on one Redis node, its hash tag {p{k}} on a cluster."""
    return f"{{p{k}}}" if cluster else f"p{k}"


def tagged(key: str, k: int) -> str:
    """`key` as partition k's on a Redis Cluster: `{key}:{p<k>}`, so that every key of the partition hashes to
    one slot; a key that carries a hash tag already is returned as it is."""
    return key if tag_of(key) is not None else f"{key}:{{p{k}}}"


def tag_of(key: str) -> int | None:
    """k of the partition hash tag {p<k>} a key carries (Redis hashes the first {...} of a key), or None."""
    start = key.find("{")
    end = key.find("}", start + 1) if start >= 0 else -1
    inner = key[start + 1:end] if end > start else ""
    return int(inner[1:]) if inner[:1] == "p" and inner[1:].isdigit() else None


def located(name: str, bus: BusSettings) -> str:
    """Where stream `name` is on the bus `bus` configures: itself on one Redis node; on a Redis Cluster tagged
    with the partition `partition_of_stream` gives it (md:trade:binance:BTC/USDT -> ...:{p<k>} of BTC's k), as
    the pipeline writes it."""
    return tagged(name, partition_of_stream(name, bus.partitions)) if bus.cluster else name


def untagged(key: str) -> str:
    """`key` without the partition tag a cluster's keys end with (md:trade:binance:BTC/USDT:{p3} ->
    md:trade:binance:BTC/USDT); a key without one as it is."""
    k = tag_of(key)
    return key.removesuffix(f":{{p{k}}}") if k is not None else key


def raw(exchange: str, partition: int | None = None, cluster: bool = False) -> str:
    """raw:{exchange}, or partition k's raw:{exchange}:p{k} (raw:{exchange}:{p<k>} on a cluster)."""
    return f"raw:{exchange}" if partition is None else f"raw:{exchange}:{part(partition, cluster)}"


def valid(exchange: str, partition: int | None = None, cluster: bool = False) -> str:
    """valid:{exchange}, or partition k's valid:{exchange}:p{k} (valid:{exchange}:{p<k>} on a cluster)."""
    return f"valid:{exchange}" if partition is None else f"valid:{exchange}:{part(partition, cluster)}"


def raw_for(exchange: str, symbol: str, partitions: int, cluster: bool = False) -> str:
    """Where a collector (or a repair) publishes an event of `symbol`: raw:{exchange}, or its partition's (on
    a cluster always its partition's, with P = 1 too)."""
    if partitions <= 1 and not cluster:
        return raw(exchange)
    return raw(exchange, partition_of(symbol, partitions), cluster)


def gaps(partition: int | None = None, cluster: bool = False) -> str:
    """mdp:gaps, or partition k's mdp:gaps:p{k} (mdp:gaps:{p<k>} on a cluster)."""
    return GAPS if partition is None else f"{GAPS}:{part(partition, cluster)}"


def gaps_for(symbol: str, partitions: int, cluster: bool = False) -> str:
    """Where a Gap of `symbol` goes: mdp:gaps, or with partitions > 1 (or on a cluster) its symbol's partition's,
    which the one gap_repair instance holding that partition reads (services/gap_repair)."""
    if partitions <= 1 and not cluster:
        return GAPS
    return gaps(partition_of(symbol, partitions), cluster)


def candle_built(exchange: str, symbol: str) -> str:
    """1m candles the aggregator built from trades (source "aggregate"), apart from the exchange's own."""
    return f"md:candle_built:{exchange}:{symbol}"


def market_data(kind: str, exchange: str, symbol: str) -> str:
    return f"md:{kind}:{exchange}:{symbol}"


def markets(exchange: str) -> str:
    return f"md:market:{exchange}"


def strategy(name: str) -> str:
    """A strategy's own events (fills, positions, metrics, registration): one stream per strategy, so its
    events stay in order, its backlog and dead letters are its own, and a reader can follow one strategy."""
    return f"strategy:{name}"


STRATEGY_STREAMS = strategy("*")  # the postgres writer's pattern over the registry


def dead_letter(stream: str) -> str:
    return f"dlq:{stream}"


def alive_key(service: str, instance: str) -> str:
    return f"{ALIVE_PREFIX}{service}:{instance}"


def instances_key(service: str) -> str:
    """The set of a service's instance names, added to by each heartbeat: whose alive keys to look at (a
    partitioned stage's share), without scanning the keyspace. A member whose alive key has expired is removed
    by whoever finds it so; a live one adds itself again at its next heartbeat."""
    return f"mdp:instances:{service}"


def outage_key(group: str, store: str) -> str:
    """Set while `group`'s store is down (value: since when, ns): one store.unavailable alert per outage."""
    return f"mdp:outage:{group}:{store}"


def abandoned_alerted_key(stream: str, group: str) -> str:
    """Set for an hour after `group` of `stream` was reported abandoned: one alert per group per hour."""
    return f"mdp:abandoned:{stream}:{group}"


# The topology: which of the pipeline's own consumer groups must read each stream (each service's GROUP and
# INPUT_PATTERN(S) in services/*/service.py). A producer creates these groups when it first writes a stream, so
# what is written while a stage is down or restarting is kept for it and counts for backpressure; any other
# group (a strategy's) never holds a producer back.
OWN_READERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("raw:*", ("validator",)),
    ("valid:*", ("normalizer",)),
    ("md:trade:*", ("influx_writer", "cache_publisher", "aggregator")),
    ("md:candle:*", ("influx_writer", "cache_publisher", "aggregator")),
    ("md:ticker:*", ("cache_publisher",)),
    ("md:book:*", ("cache_publisher",)),
    ("md:funding:*", ("influx_writer",)),
    ("md:open_interest:*", ("influx_writer",)),
    ("md:market:*", ("postgres_writer",)),
    ("md:candle_built:*", ()),  # for strategies; no stage of ours reads it
    (ALERTS, ("postgres_writer",)),
    (f"{ALERTS}:*", ("postgres_writer",)),  # a cluster's, one per partition: mdp:alerts:{p<k>}
    (GAPS, ("gap_repair",)),
    (f"{GAPS}:*", ("gap_repair",)),
    (STRATEGY_STREAMS, ("postgres_writer",)),
)


@lru_cache(maxsize=8192)  # bounded: a process writes a bounded set of streams (evicted entries are recomputed)
def own_groups(stream: str) -> tuple[str, ...]:
    """The pipeline's own consumer groups that read `stream` (empty for heartbeats, dead letters, tests)."""
    found: list[str] = []
    for pattern, groups in OWN_READERS:
        if fnmatch.fnmatchcase(stream, pattern):
            found.extend(g for g in groups if g not in found)
    return tuple(found)


def base_asset(symbol: str) -> str:
    """The base asset of a unified symbol: BTC in BTC/USDT, BTC/USDT:USDT and BTC/USD."""
    return symbol.split("/", 1)[0]


def partition_of(symbol: str, partitions: int) -> int:
    """The partition of a unified symbol: crc32 of its base asset modulo `partitions`, the same in every
    process (Python's hash() of a str is salted per process), so every venue and quote of an asset meets in one
    partition."""
    return zlib.crc32(base_asset(symbol).encode()) % partitions if partitions > 1 else 0


def partition_of_stream(stream: str, partitions: int) -> int:
    """The partition of a stream: a tagged one ({stream}:{p<k>}, a cluster's) and a partition's raw:{exchange}:p{k},
    valid:{exchange}:p{k} or mdp:gaps:p{k} by its k (modulo `partitions`), a per-symbol one (md:{kind}:{exchange}:{symbol}) by
    its symbol, any other by its whole name."""
    if partitions <= 1:
        return 0
    k = tag_of(stream)
    if k is not None:
        return k % partitions
    parts = stream.split(":", 3)
    if len(parts) == 4 and parts[0] == "md":
        return partition_of(parts[3], partitions)
    if len(parts) == 3 and (parts[0] in ("raw", "valid") or stream.startswith(f"{GAPS}:")) \
            and parts[2][:1] == "p" and parts[2][1:].isdigit():
        return int(parts[2][1:]) % partitions
    return zlib.crc32(stream.encode()) % partitions


def exchange_of_stream(stream: str) -> str:
    """The exchange of raw:{exchange}[:p{k}] or valid:{exchange}[:p{k}]."""
    return stream.split(":", 2)[1] if ":" in stream else ""
