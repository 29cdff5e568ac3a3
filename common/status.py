"""`mdp status`: each service's liveness and rate, each stream's length, and each group's pending and lag.

Liveness comes from `mdp:alive:{service}:{instance}` keys (TTL = 5 heartbeats); rates from the difference
between an instance's last two heartbeats in `mdp:heartbeats`. Warnings: a bus Redis without persistence;
consumer groups that are not the pipeline's own and look abandoned (docs/bus.md).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from common.bus import streams
from common.bus.core import (
    GroupState,
    StreamEntries,
    abandoned_groups,
    group_lag,
    last_generated_id,
    redis_url,
)
from schemas import Codec, DecodeError, Heartbeat


@dataclass
class ServiceStatus:
    service: str
    instance: str
    alive: bool
    state: str
    heartbeat_age_s: float
    uptime_s: float
    rates: dict[str, float]
    counters: dict[str, int]
    detail: str


@dataclass
class GroupStatus:
    name: str
    consumers: int
    pending: int
    lag: int | None


@dataclass
class StreamStatus:
    name: str
    length: int
    groups: list[GroupStatus] = field(default_factory=list)


@dataclass
class ChannelStatus:
    """One channel of one collector instance: message rate, age of its newest message (any symbol) and of
    its stalest symbol's last message, gaps published since start (collector `channel.{c}.*` counters)."""

    service: str
    instance: str
    channel: str
    rate: float | None
    last_age_s: float | None
    stalest_age_s: float | None
    messages: int
    gaps: int


@dataclass
class Status:
    services: list[ServiceStatus]
    streams: list[StreamStatus]
    channels: list[ChannelStatus] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    abandoned: list[GroupState] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def max_lag(self) -> int:
        return max((g.lag or 0) + g.pending for s in self.streams for g in s.groups) if self.streams else 0


async def persistence_warning(redis: aioredis.Redis) -> str:
    """One line if the bus's Redis keeps nothing across a restart (no AOF, no RDB save points)."""
    try:
        # The bus client returns bytes (decode_responses=False); redis-py types CONFIG GET's reply as text.
        config = cast(dict[bytes | str, bytes | str], await redis.config_get("appendonly"))
        aof = _s(config.get("appendonly") or config.get(b"appendonly") or "no") == "yes"
        save = cast(dict[bytes | str, bytes | str], await redis.config_get("save"))
        rdb = bool(_s(save.get("save") or save.get(b"save") or "").strip())
    except ResponseError:  # CONFIG disabled (a managed Redis): INFO says whether AOF is on
        info = await redis.info("persistence")
        aof, rdb = bool(int(info.get("aof_enabled", 0))), False
    if aof or rdb:
        return ""
    return (f"Redis at {redis_url(redis)} has no persistence: a Redis restart loses every stream; "
            f"set appendonly yes (docs/bus.md)")


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def collect(redis: aioredis.Redis, abandoned_group_s: float = 300.0) -> Status:
    codec = Codec()
    now = time.time_ns()
    history: dict[tuple[str, str], list[Heartbeat]] = {}
    for _, fields in cast(StreamEntries, await redis.xrevrange(streams.HEARTBEATS, count=2000)):
        try:
            decoded = codec.decode_entry(fields)
        except DecodeError:
            continue
        for b in decoded:
            if isinstance(b, Heartbeat):
                key = (b.service, b.instance)
                if len(history.setdefault(key, [])) < 2:
                    history[key].append(b)
    alive_keys = {k.decode() async for k in redis.scan_iter(match=streams.ALIVE_PREFIX + "*", count=1000)}
    services = []
    for (service, instance), beats in sorted(history.items()):
        latest = beats[0]
        rates: dict[str, float] = {}
        if len(beats) == 2:
            dt = (beats[0].ts_event - beats[1].ts_event) / 1e9
            if dt > 0:
                rates = {k: round((v - beats[1].counters.get(k, 0)) / dt, 1) for k, v in latest.counters.items()}
        alive = streams.alive_key(service, instance) in alive_keys
        services.append(ServiceStatus(
            service=service, instance=instance, alive=alive, state=latest.state if alive else "dead",
            heartbeat_age_s=round((now - latest.ts_event) / 1e9, 1),
            uptime_s=round((latest.ts_event - latest.started_at) / 1e9, 1), rates=rates,
            counters=latest.counters, detail=latest.detail))
    names = {m.decode() for m in cast(set[bytes], await redis.smembers(streams.REGISTRY))}
    names |= {streams.ALERTS}
    names |= {k.decode() async for k in redis.scan_iter(match="dlq:*", count=1000)}
    stream_list = []
    abandoned: list[GroupState] = []
    for name in sorted(names):
        try:
            length = await redis.xlen(name)
            groups = await redis.xinfo_groups(name)
        except ResponseError:
            continue
        last = await last_generated_id(redis, name) if groups else None
        stream_list.append(StreamStatus(name=name, length=length, groups=[
            GroupStatus(name=g["name"].decode() if isinstance(g["name"], bytes) else g["name"],
                        consumers=int(g["consumers"]), pending=int(g["pending"]), lag=group_lag(g, last))
            for g in groups]))
        states = [GroupState(name, g.name, g.consumers, g.pending, g.lag, None) for g in stream_list[-1].groups]
        abandoned += await abandoned_groups(redis, name, abandoned_group_s, states)
    warning = await persistence_warning(redis)
    return Status(services=services, streams=stream_list, channels=channel_status(services, now),
                  warnings=[warning] if warning else [], abandoned=abandoned)


# ts_recv -> stored: the InfluxDB writer counts each trade it wrote by how long after its receipt InfluxDB
# acknowledged it, in cumulative buckets (heartbeat counters stored_ms_le_{bound}, the last stored_ms_le_inf), as
# a Prometheus histogram counts; `stored_latency_quantile` reads a quantile from two readings of them.
STORED_LATENCY_BUCKETS_MS = (5, 10, 20, 50, 100, 200, 300, 500, 750, 1000, 1500, 2000, 3000, 5000, 10000)
STORED_LATENCY_KEYS = (*(f"stored_ms_le_{b}" for b in STORED_LATENCY_BUCKETS_MS), "stored_ms_le_inf")


def stored_latency_quantile(before: dict[str, int], after: dict[str, int], q: float) -> float | None:
    """The q-quantile (0..1) of ts_recv -> stored in ms over the trades counted between two readings of the
    cumulative buckets, interpolated within its bucket (as Prometheus's histogram_quantile); None without
    trades. Beyond the last bound the answer is that bound."""
    counts = [after.get(k, 0) - before.get(k, 0) for k in STORED_LATENCY_KEYS]
    total = counts[-1]
    if total <= 0:
        return None
    rank, low, below = q * total, 0.0, 0
    for bound, cumulative in zip((*STORED_LATENCY_BUCKETS_MS, None), counts, strict=True):
        if cumulative >= rank:
            if bound is None:
                return float(STORED_LATENCY_BUCKETS_MS[-1])
            inside = cumulative - below
            return low + (bound - low) * ((rank - below) / inside if inside else 1.0)
        low, below = float(bound or low), cumulative
    return float(STORED_LATENCY_BUCKETS_MS[-1])


def channel_status(services: list[ServiceStatus], now_ns: int) -> list[ChannelStatus]:
    """Per-channel rows from the collectors' `channel.{c}.messages|gaps|last_ms|oldest_ms` counters."""
    rows = []
    for s in services:
        names = sorted({k.split(".")[1] for k in s.counters if k.startswith("channel.") and k.count(".") == 2})
        for c in names:
            rows.append(ChannelStatus(service=s.service, instance=s.instance, channel=c,
                                      rate=s.rates.get(f"channel.{c}.messages"),
                                      last_age_s=_age_s(s.counters.get(f"channel.{c}.last_ms", 0), now_ns),
                                      stalest_age_s=_age_s(s.counters.get(f"channel.{c}.oldest_ms", 0), now_ns),
                                      messages=s.counters.get(f"channel.{c}.messages", 0),
                                      gaps=s.counters.get(f"channel.{c}.gaps", 0)))
    return rows


def _age_s(ms: int, now_ns: int) -> float | None:
    """Seconds since a wall-clock ms stamp; None for 0 (never)."""
    return round((now_ns / 1e6 - ms) / 1000, 1) if ms > 0 else None


MAIN_RATE = {"collector": "published_events"}  # consuming stages: events_consumed (common.bus.stage)


def render(status: Status) -> str:
    lines = [f"WARNING: {w}" for w in status.warnings]
    lines.append("SERVICE          INSTANCE      STATE     HEARTBEAT  UPTIME    RATE (events/s)   RSS MB  DETAIL")
    for s in status.services:
        key = MAIN_RATE.get(s.service, "events_consumed")
        rate = s.rates.get(key)
        if rate is None and s.rates:
            rate = max(s.rates.values())
        rss = s.counters.get("rss_bytes")  # the processes that report their resident memory (the collector)
        lines.append(f"{s.service:<16} {s.instance:<13} {s.state:<9} {s.heartbeat_age_s:>7.1f} s "
                     f"{s.uptime_s:>7.0f} s {'' if rate is None else f'{rate:>10.1f}':>15} "
                     f"{'' if rss is None else f'{rss / 2**20:.0f}':>8}  {s.detail[:60]}")
    if not status.services:
        lines.append("(no service has sent a heartbeat: is the pipeline running? `make demo` starts it)")
    if status.channels:
        lines.append("")
        lines.append("CHANNEL (collector)             RATE (msg/s)  LAST MSG  STALEST SYMBOL  MESSAGES    GAPS")
        for c in status.channels:
            def fmt(age: float | None) -> str:
                return "never" if age is None else f"{age:.1f} s"
            rate_text = "" if c.rate is None else f"{c.rate:.1f}"
            lines.append(f"{c.instance + ' ' + c.channel:<31} {rate_text:>12} {fmt(c.last_age_s):>9} "
                         f"{fmt(c.stalest_age_s):>15} {c.messages:>9} {c.gaps:>7}")
    quality = [(s.service, k, v) for s in status.services for k, v in sorted(s.counters.items())
               if k.startswith(("rejected.", "flagged.", "repaired.")) and v]
    if quality:
        lines.append("")
        lines.append("QUALITY (since each service started)   COUNT")
        for service, key, value in quality:
            lines.append(f"{service + ' ' + key:<38} {value:>6}")
    lines.append("")
    lines.append("STREAM                                   LENGTH   GROUP             CONSUMERS  PENDING      LAG")
    for st in status.streams:
        if not st.groups:
            lines.append(f"{st.name:<40} {st.length:>7}   (no consumer group)")
        for i, g in enumerate(st.groups):
            head = f"{st.name:<40} {st.length:>7}" if i == 0 else " " * 48
            lag = "?" if g.lag is None else str(g.lag)
            lines.append(f"{head}   {g.name:<17} {g.consumers:>9} {g.pending:>8} {lag:>8}")
    if status.abandoned:
        lines.append("")
        lines.append("GROUPS abandoned (not the pipeline's own; idle while behind; they never slow producers)")
        for a in status.abandoned:
            idle = "no consumer" if a.idle_ms is None else f"idle {a.idle_ms / 1000:.0f} s"
            lines.append(f"{a.stream:<40} {a.name:<17} {a.backlog:>9} behind, {idle}: resume its reader or "
                         f"XGROUP DESTROY {a.stream} {a.name}")
    return "\n".join(lines)
