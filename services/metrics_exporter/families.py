"""The pipeline's state as Prometheus metric families: pure functions of what the exporter gathered (no I/O),
so the exporter and the tests build them the same way. Names and labels: docs/metrics.md.

Labels: `service` and `instance_id` name a process as its heartbeat does (`instance_id`, not `instance`:
Prometheus gives every scraped series an `instance` label of its own, the exporter's address).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from common.bus.core import GroupState
from common.config import Settings
from common.status import MAIN_RATE, ChannelStatus, ServiceStatus, Status, StreamStatus

STATES = ("starting", "running", "degraded", "stopping", "dead")
# supervisord's process states (supervisor.states.ProcessStates)
PROGRAM_STATES = ("STOPPED", "STARTING", "RUNNING", "BACKOFF", "STOPPING", "EXITED", "FATAL", "UNKNOWN")
# Heartbeat counters that are sizes, not counts since the process started: exported as gauges.
SIZES = frozenset({"symbols", "series", "known_markets", "markets", "subscriptions"})
RSS = "rss_bytes"  # resident memory, in the heartbeat of the processes that report it: its own gauge
# What a store-writing stage counts as written, by store. A stage missing here writes no store of its own.
STORE_WRITES: dict[str, tuple[str, tuple[str, ...]]] = {
    "influx_writer": ("influxdb", ("points_written",)),
    "postgres_writer": ("postgresql", ("markets_upserted", "alerts_stored", "strategies_registered",
                                       "fills_stored", "positions_updated", "position_history_stored",
                                       "metrics_stored")),
    "cache_publisher": ("redis", ("prices_written", "trades_listed", "books_written")),
}
GAP_OUTCOMES = ("repaired", "empty", "explained", "unrepaired")
GAP_SOURCES = {"gaps_": "announced", "scan_": "scan"}  # gap_repair's counter prefixes
DEAD_LETTER_PREFIX = "dlq:"


def _is_channel_key(name: str) -> bool:
    return name.startswith("channel.")


def service_families(services: Iterable[ServiceStatus]) -> Iterator[Metric]:
    """Per process: alive, heartbeat age, uptime, state, headline rate and throughput, dead letters, store
    retries and writes, gaps opened and gap outcomes, and every other heartbeat counter."""
    services = list(services)
    keys = ["service", "instance_id"]
    up = GaugeMetricFamily("mdp_service_up", "1 while the process's alive key is in Redis (it sent a heartbeat "
                           "within 5 heartbeat intervals), else 0", labels=keys)
    age = GaugeMetricFamily("mdp_service_heartbeat_age_seconds", "Seconds since the process's newest heartbeat",
                            labels=keys)
    uptime = GaugeMetricFamily("mdp_service_uptime_seconds", "Seconds the process had run at its newest heartbeat",
                               labels=keys)
    state = GaugeMetricFamily("mdp_service_state", "1 for the process's state (dead: no alive key), 0 for the "
                              "others", labels=[*keys, "state"])
    rate = GaugeMetricFamily("mdp_service_events_per_second", "Headline rate between the last two heartbeats "
                             "(collector: events published; other stages: events consumed), as mdp status shows",
                             labels=keys)
    events = CounterMetricFamily("mdp_service_events", "Events through the stage since the process started "
                                 "(collector: published; other stages: consumed)", labels=keys)
    dead = CounterMetricFamily("mdp_service_dead_lettered", "Entries the stage moved to dlq:{stream}",
                               labels=keys)
    retries = CounterMetricFamily("mdp_store_retries", "Times a writer retried a batch because its store "
                                  "failed (the batch stays pending meanwhile)", labels=keys)
    writes = CounterMetricFamily("mdp_store_writes", "Rows, points or keys a stage wrote to its store",
                                 labels=[*keys, "store"])
    opened = CounterMetricFamily("mdp_gaps_opened", "Gaps a collector (reconnects, stalls) or the validator "
                                 "(missing candles, trade ids) announced on mdp:gaps", labels=keys)
    outcomes = CounterMetricFamily("mdp_gap_outcomes", "What became of each gap gap_repair handled: repaired, "
                                   "empty, explained, unrepaired (source: announced Gap or its own scan)",
                                   labels=[*keys, "source", "outcome"])
    counter = CounterMetricFamily("mdp_service_counter", "Every counter of the process's heartbeat, as `mdp "
                                  "status` shows it (counts since the process started)", labels=[*keys, "counter"])
    size = GaugeMetricFamily("mdp_service_size", "Heartbeat values that are sizes (symbols, series, markets...)",
                             labels=[*keys, "name"])
    rss = GaugeMetricFamily("mdp_service_rss_bytes", "Resident memory of the process at its newest heartbeat "
                            "(processes that report it: the collector)", labels=keys)
    for s in services:
        ids = [s.service, s.instance]
        up.add_metric(ids, 1.0 if s.alive else 0.0)
        age.add_metric(ids, s.heartbeat_age_s)
        uptime.add_metric(ids, s.uptime_s)
        for st in STATES:
            state.add_metric([*ids, st], 1.0 if s.state == st else 0.0)
        main = MAIN_RATE.get(s.service, "events_consumed")
        if main in s.counters:
            events.add_metric(ids, s.counters[main])
            if main in s.rates:
                rate.add_metric(ids, s.rates[main])
        if "entries_dead_lettered" in s.counters:
            dead.add_metric(ids, s.counters["entries_dead_lettered"])
        if "store_retries" in s.counters:
            retries.add_metric(ids, s.counters["store_retries"])
        if s.service in STORE_WRITES:
            store, names = STORE_WRITES[s.service]
            writes.add_metric([*ids, store], sum(s.counters.get(n, 0) for n in names))
        if s.service in ("collector", "validator") and "gaps" in s.counters:
            opened.add_metric(ids, s.counters["gaps"])
        if s.service == "gap_repair":
            for prefix, source in GAP_SOURCES.items():
                for outcome in GAP_OUTCOMES:
                    if f"{prefix}{outcome}" in s.counters:
                        outcomes.add_metric([*ids, source, outcome], s.counters[f"{prefix}{outcome}"])
        for name, value in sorted(s.counters.items()):
            if _is_channel_key(name):
                continue  # per channel below
            if name == RSS:
                rss.add_metric(ids, value)
            elif name in SIZES:
                size.add_metric([*ids, name], value)
            else:
                counter.add_metric([*ids, name], value)
    yield from (up, age, uptime, state, rate, events, dead, retries, writes, opened, outcomes, counter, size, rss)


def exchange_of(instance: str) -> str:
    """A collector's instance is `{exchange}-{n}` (services/collector/service.py)."""
    return instance.rsplit("-", 1)[0]


def channel_families(channels: Iterable[ChannelStatus], services: Iterable[ServiceStatus],
                     settings: Settings) -> Iterator[Metric]:
    """Per collector channel: messages, gaps, age of the newest message and of the stalest symbol's; per
    configured exchange and channel, the stall limit the collector's watchdog uses."""
    keys = ["exchange", "instance_id", "channel"]
    uptime = {(s.service, s.instance): s.uptime_s + s.heartbeat_age_s for s in services}
    messages = CounterMetricFamily("mdp_channel_messages", "Messages the collector received on the channel",
                                   labels=keys)
    gaps = CounterMetricFamily("mdp_channel_gaps", "Gaps the collector announced on the channel", labels=keys)
    last = GaugeMetricFamily("mdp_channel_last_message_age_seconds", "Seconds since the channel's newest "
                             "message of any symbol (never: since the process started)", labels=keys)
    stalest = GaugeMetricFamily("mdp_channel_stalest_symbol_age_seconds", "Seconds since the last message of the "
                                "symbol heard from longest ago (never: since the process started)", labels=keys)
    for c in channels:
        ids = [exchange_of(c.instance), c.instance, c.channel]
        never = uptime.get((c.service, c.instance), 0.0)
        messages.add_metric(ids, c.messages)
        gaps.add_metric(ids, c.gaps)
        last.add_metric(ids, never if c.last_age_s is None else c.last_age_s)
        stalest.add_metric(ids, never if c.stalest_age_s is None else c.stalest_age_s)
    limit = GaugeMetricFamily("mdp_channel_stall_limit_seconds", "The collector's stall limit for the channel "
                              "(exchanges[].stall_s.{channel}, else ws_stall_s): silence longer than this is a "
                              "stall", labels=["exchange", "channel"])
    for ex in settings.exchanges:
        for channel in ex.channels:
            limit.add_metric([ex.id, channel], ex.stall_s.get(channel, ex.ws_stall_s))
    yield from (messages, gaps, last, stalest, limit)


def stream_families(streams: Iterable[StreamStatus], abandoned: Iterable[GroupState] = ()) -> Iterator[Metric]:
    """Per stream: length; per consumer group: lag (entries not yet delivered), pending (delivered, not
    acknowledged), consumers, abandoned (a group not the pipeline's own, lagging, its consumers idle longer than
    bus.abandoned_group_s); per dead-letter stream: its entries, labelled with the stream they came from."""
    streams = list(streams)
    length = GaugeMetricFamily("mdp_stream_length", "Entries in the stream (one entry packs up to "
                               "bus.batch_max_events events)", labels=["stream"])
    lag = GaugeMetricFamily("mdp_consumer_group_lag", "Entries of the stream not yet delivered to the group "
                            "(XINFO GROUPS lag)", labels=["stream", "group"])
    pending = GaugeMetricFamily("mdp_consumer_group_pending", "Entries delivered to the group and not yet "
                                "acknowledged", labels=["stream", "group"])
    consumers = GaugeMetricFamily("mdp_consumer_group_consumers", "Consumers in the group", labels=["stream", "group"])
    dead = GaugeMetricFamily("mdp_dead_letter_entries", "Entries in dlq:{stream}: failed bus.max_deliveries times "
                             "or undecodable", labels=["stream"])
    for st in streams:
        if st.name.startswith(DEAD_LETTER_PREFIX):
            dead.add_metric([st.name.removeprefix(DEAD_LETTER_PREFIX)], st.length)
            continue
        length.add_metric([st.name], st.length)
        for g in st.groups:
            pending.add_metric([st.name, g.name], g.pending)
            consumers.add_metric([st.name, g.name], g.consumers)
            if g.lag is not None:
                lag.add_metric([st.name, g.name], g.lag)
    gone = {(g.stream, g.name) for g in abandoned}
    left = GaugeMetricFamily("mdp_consumer_group_abandoned", "1 for a group that is not the pipeline's own, lags, "
                             "and whose consumers have been idle longer than bus.abandoned_group_s (it never holds "
                             "producers back; docs/bus.md), else 0", labels=["stream", "group"])
    for st in streams:
        if not st.name.startswith(DEAD_LETTER_PREFIX):
            for g in st.groups:
                left.add_metric([st.name, g.name], 1.0 if (st.name, g.name) in gone else 0.0)
    yield from (length, lag, pending, consumers, left, dead)


def redis_families(up: bool, info: Mapping[str, object], rdb_save: str | None) -> Iterator[Metric]:
    """The bus Redis: reachable, persistence (AOF, RDB snapshots), memory. `rdb_save` is CONFIG GET save's
    value, None when the server refuses CONFIG (then only AOF counts)."""
    yield GaugeMetricFamily("mdp_redis_up", "1 when the bus Redis answered the exporter's last refresh",
                            value=1.0 if up else 0.0)
    if not up:
        return
    aof = 1.0 if str(info.get("aof_enabled", "0")) == "1" else 0.0
    rdb = 1.0 if rdb_save else 0.0
    yield GaugeMetricFamily("mdp_redis_aof_enabled", "1 when the bus Redis appends every write to its AOF",
                            value=aof)
    if rdb_save is not None:
        yield GaugeMetricFamily("mdp_redis_rdb_snapshots_enabled", "1 when the bus Redis has RDB `save` points",
                                value=rdb)
    yield GaugeMetricFamily("mdp_redis_persistence_enabled", "1 when the bus Redis persists (AOF or RDB "
                            "snapshots); 0: a Redis restart loses every stream, pending entry and cursor",
                            value=max(aof, rdb))
    if "used_memory" in info:
        yield GaugeMetricFamily("mdp_redis_used_memory_bytes", "Memory the bus Redis uses",
                                value=float(str(info["used_memory"])))


def program_families(programs: Iterable[Mapping[str, object]]) -> Iterator[Metric]:
    """supervisord's view (getAllProcessInfo): each program process up (RUNNING) or not, and its state."""
    keys = ["group", "name"]
    up = GaugeMetricFamily("mdp_program_up", "1 when supervisord reports the program's process RUNNING, else 0",
                           labels=keys)
    state = GaugeMetricFamily("mdp_program_state", "1 for the process's supervisord state, 0 for the others",
                              labels=[*keys, "state"])
    for p in programs:
        ids = [str(p["group"]), str(p["name"])]
        current = str(p["statename"])
        up.add_metric(ids, 1.0 if current == "RUNNING" else 0.0)
        for st in PROGRAM_STATES:
            state.add_metric([*ids, st], 1.0 if current == st else 0.0)
    yield from (up, state)


def pipeline_families(status: Status, settings: Settings) -> Iterator[Metric]:
    yield from service_families(status.services)
    yield from channel_families(status.channels, status.services, settings)
    yield from stream_families(status.streams, status.abandoned)


__all__ = ["GAP_OUTCOMES", "PROGRAM_STATES", "STATES", "STORE_WRITES", "channel_families", "exchange_of",
           "pipeline_families", "program_families", "redis_families", "service_families", "stream_families"]
