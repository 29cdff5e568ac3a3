"""The metrics exporter: the whole pipeline's state in Prometheus text format on one port (metrics.host,
metrics.port; default 127.0.0.1:9464), GET /metrics.

One process for the pipeline rather than a port per process: every service already reports its counters in
its heartbeat, and `common.status.collect()` gathers them with the streams' lag and pending (what `mdp status`
shows), so one exporter sees every process, including those scaled with numprocs, with one scrape target and
no port to assign per process; it also sees what no process can report about itself (a process that died,
its heartbeat stale; a stream's backlog). Each scrape refreshes from Redis (at most every MIN_REFRESH_S).

Beside the heartbeats it keeps three things of its own:
- alerts by rule and severity, counted from mdp:alerts (read with its own cursor, no consumer group, from the
  newest entry at start: counters restart at 0 with the exporter, as Prometheus counters may);
- latency from the collector's receipt (`ts_recv`) to the cache: it subscribes to the cache publisher's
  `ticks:*` pub/sub, which goes out in the same MULTI/EXEC as the cache writes, and observes now - ts_recv
  of every trade in a histogram. Bounded by Redis: a subscriber that falls behind the pub/sub output buffer
  limit is disconnected by Redis (the pipeline is not slowed); the exporter reconnects and says so;
- supervisord's process states (through SUPERVISOR_SERVER_URL, set by supervisord for its programs) and the
  bus Redis's persistence and memory.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections.abc import Iterator, Mapping
from typing import Any, cast

import msgspec
import redis.asyncio as aioredis
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, disable_created_metrics, generate_latest
from prometheus_client import Counter as PromCounter
from prometheus_client import Histogram as PromHistogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from redis.exceptions import RedisError, ResponseError

from common import status as status_mod
from common.backoff import EXACT, sleep_unless
from common.bus import streams
from common.bus.core import StreamEntries, alert_streams
from common.bus.stage import Service
from common.config import Settings
from common.domain.quality import CATALOG
from common.stores.cache import ticks_channel
from schemas import Alert, DecodeError
from services.metrics_exporter.families import pipeline_families, program_families, redis_families

log = logging.getLogger(__name__)

BIND_RETRY_S = 10.0
WARN_EVERY_S = 60.0
MIN_REFRESH_S = 0.5  # scrapes closer together than this share one refresh from Redis
SUPERVISOR_TIMEOUT_S = 5.0
ALERTS_READ_COUNT = 500
# Alert rules raised outside the quality catalog (gap repair, bus, aggregator, postgres writer, normalizer):
# counted from 0 at start, so the first alert of a rule is an increase Prometheus can see.
OTHER_RULES = ("gap.repaired", "gap.explained", "gap.unrepaired", "bus.backpressure_timeout",
               "bus.trimmed_while_pending", "bus.group_abandoned", "bus.group_dropped", "bus.group_recreated",
               "bus.redis_unavailable", "bus.redis_recovered", "candle.reconcile", "book.crossed",
               "collector.buffer_overflow", "postgres_writer.rejected", "postgres_writer.strategy_auto_registered")
SEVERITIES = ("info", "warning", "error", "critical")
# ts_recv -> cache, seconds: from a millisecond to a backlog of minutes
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                   300.0)


class _Tick(msgspec.Struct):
    exchange: str
    ts_recv: int


class _Snapshot:
    """What one refresh gathered; the registry's collector turns it into metric families."""

    def __init__(self) -> None:
        self.status: status_mod.Status | None = None
        self.redis_up = False
        self.redis_info: dict[str, Any] = {}
        self.rdb_save: str | None = None
        self.programs: list[dict[str, Any]] | None = None
        self.refresh_seconds = 0.0


class MetricsExporter(Service):
    name = "metrics_exporter"
    # On a cluster: status from every master, alerts from each partition's stream; Redis's INFO is the node the
    # URL names (redis-py sends INFO and CONFIG GET to its default node).
    cluster_ready = True

    def __init__(self, settings: Settings, instance: str | None = None) -> None:
        super().__init__(settings, instance)
        self.snapshot = _Snapshot()
        self.refreshed_at = 0.0
        self.refresh_lock = asyncio.Lock()
        self.count.update({k: 0 for k in (
            "scrapes", "refreshes", "refresh_errors", "alerts_read", "latency_samples", "tick_subscriber_restarts",
            "supervisor_errors")})
        disable_created_metrics()  # no `_created` series beside every counter: Prometheus does not use them
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_PipelineCollector(self))
        self.alerts_by_rule = PromCounter("mdp_alerts", "Alerts on mdp:alerts since the exporter started, by rule",
                                          ["rule"], registry=self.registry)
        self.alerts_by_severity = PromCounter("mdp_alerts_by_severity", "Alerts on mdp:alerts since the exporter "
                                              "started, by severity", ["severity"], registry=self.registry)
        for rule in (*CATALOG, *OTHER_RULES):
            self.alerts_by_rule.labels(rule)
        for severity in SEVERITIES:
            self.alerts_by_severity.labels(severity)
        self.latency = PromHistogram("mdp_cache_latency_seconds", "Seconds from the collector's receipt of a trade "
                                     "(ts_recv) to its publication with the cache writes (ticks:{symbol})",
                                     ["exchange"], buckets=LATENCY_BUCKETS, registry=self.registry)
        for ex in settings.exchanges:
            self.latency.labels(ex.id)
        self._supervisor: Any = None
        self._supervisor_call: asyncio.Future[list[dict[str, Any]]] | None = None
        self._warned_at: dict[str, float] = {}

    # -- the HTTP side ----------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/", self._index)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._read_alerts(stop))
                tg.create_task(self._watch_ticks(stop))
                await self._serve(runner, stop)
        finally:
            await runner.cleanup()

    async def _serve(self, runner: web.AppRunner, stop: asyncio.Event) -> None:
        """Listen on metrics.host:port. A port taken (another pipeline on this machine) leaves the process up,
        degraded, saying so in `mdp status` and its log, and retrying: it must not fail the pipeline's start."""
        host, port = self.settings.metrics.host, self.settings.metrics.port
        while not stop.is_set():
            try:
                await web.TCPSite(runner, host, port).start()
            except OSError as exc:
                self.state = "degraded"
                self.detail = (f"metrics.port = {port}: cannot listen on {host}:{port} ({exc.strerror or exc}); "
                               f"set a free port in the config's [metrics] port, or stop what listens there; "
                               f"retrying every {BIND_RETRY_S:.0f} s")
                self._warn("bind", "%s", self.detail, level=logging.ERROR)
                await sleep_unless(stop, BIND_RETRY_S, EXACT)
                continue
            self.state, self.detail = "running", ""
            log.info("metrics on http://%s:%d/metrics (Prometheus text format; docs/metrics.md)", host, port)
            await stop.wait()

    async def _index(self, request: web.Request) -> web.Response:
        return web.Response(text="mdp metrics exporter: GET /metrics (docs/metrics.md)\n")

    async def _metrics(self, request: web.Request) -> web.Response:
        self.count["scrapes"] += 1
        await self.refresh()
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    # -- gathering --------------------------------------------------------------------------------

    async def refresh(self) -> None:
        """Gather heartbeats, streams, Redis and supervisord state, unless a refresh is fresh enough."""
        async with self.refresh_lock:
            if time.monotonic() - self.refreshed_at < MIN_REFRESH_S:
                return
            started = time.perf_counter()
            snap = _Snapshot()
            try:
                snap.status = await status_mod.collect(self.redis, self.settings.bus.abandoned_group_s)
                await self._gaps_stream(snap.status)
                snap.redis_info = await self.redis.info("persistence") | await self.redis.info("memory")
                snap.rdb_save = await self._rdb_save()
                snap.redis_up = True
            except (RedisError, OSError) as exc:
                self.count["refresh_errors"] += 1
                self._warn("redis", "metrics refresh: the bus Redis at %s did not answer (%s: %s); exporting "
                           "mdp_redis_up 0 until it does", self.settings.redis.url, type(exc).__name__, exc)
            snap.programs = await self._programs()
            snap.refresh_seconds = time.perf_counter() - started
            self.snapshot = snap
            self.refreshed_at = time.monotonic()
            self.count["refreshes"] += 1

    async def _gaps_stream(self, status: status_mod.Status) -> None:
        """mdp:gaps (gap_repair's input) is not in the stream registry collect() reads: add its group lag. (The
        partitions' mdp:gaps:p{k} and a cluster's mdp:gaps:{p<k>} are: their producers register each.)"""
        if any(s.name == streams.GAPS or s.name.startswith(f"{streams.GAPS}:") for s in status.streams):
            return
        try:
            length = await self.redis.xlen(streams.GAPS)
            groups = await self.redis.xinfo_groups(streams.GAPS)
        except ResponseError:
            return  # no such stream yet
        status.streams.append(status_mod.StreamStatus(name=streams.GAPS, length=length, groups=[
            status_mod.GroupStatus(name=_text(g["name"]), consumers=int(g["consumers"]), pending=int(g["pending"]),
                                   lag=None if g.get("lag") is None else int(g["lag"])) for g in groups]))

    async def _rdb_save(self) -> str | None:
        try:
            # bytes: the bus client is built with decode_responses=False (redis-py types the reply as text).
            reply = cast(dict[bytes | str, bytes | str], await self.redis.config_get("save"))
        except ResponseError:  # CONFIG renamed or refused (managed Redis): only AOF is known
            return None
        return _text(reply.get("save") or reply.get(b"save") or "")

    async def _programs(self) -> list[dict[str, Any]] | None:
        """supervisord's processes, or None when not run by supervisord (no SUPERVISOR_SERVER_URL) or when it
        does not answer (then mdp_program_* are left out and go stale in Prometheus)."""
        if "SUPERVISOR_SERVER_URL" not in os.environ:
            return None
        if self._supervisor_call is not None and not self._supervisor_call.done():
            self.count["supervisor_errors"] += 1  # the previous call still hangs in its thread: no second one
            return None
        self._supervisor_call = asyncio.ensure_future(asyncio.to_thread(self._supervisor_processes))
        try:
            return await asyncio.wait_for(asyncio.shield(self._supervisor_call), SUPERVISOR_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - supervisord's XML-RPC raises many kinds; the metric goes stale
            self.count["supervisor_errors"] += 1
            self._warn("supervisor", "metrics refresh: supervisord at %s did not list its processes (%s: %s); "
                       "mdp_program_* are left out until it does", os.environ.get("SUPERVISOR_SERVER_URL"),
                       type(exc).__name__, exc)
            self._supervisor = None
            return None

    def _warn(self, what: str, message: str, *args: object, level: int = logging.WARNING) -> None:
        """Log a repeated failure at most once a minute (a scrape every second would flood the log)."""
        now = time.monotonic()
        if now - self._warned_at.get(what, -math.inf) >= WARN_EVERY_S:
            self._warned_at[what] = now
            log.log(level, message, *args)

    def _supervisor_processes(self) -> list[dict[str, Any]]:
        if self._supervisor is None:
            from supervisor import childutils
            self._supervisor = childutils.getRPCInterface(dict(os.environ))
        return list(self._supervisor.supervisor.getAllProcessInfo())

    # -- alerts and latency -----------------------------------------------------------------------

    async def _read_alerts(self, stop: asyncio.Event) -> None:
        """Count every alert on mdp:alerts (a cluster's every mdp:alerts:{p<k>}) from the newest entry at start
        on, by rule and severity. One stream: a blocking read; a cluster's: each read in turn (a read names keys
        of one slot), then a second's pause when none had anything."""
        cursors: dict[str, str] = {}
        started = False
        while not stop.is_set():
            try:
                names = await alert_streams(self.settings.bus.cluster).resolve(self.redis)
                for name in names:
                    if name not in cursors:  # at start its newest entry; a stream that appears later from 0
                        newest = cast(StreamEntries, await self.redis.xrevrange(name, count=1)) if not started else []
                        cursors[name] = _text(newest[0][0]) if newest else "0-0"
                started = True
                reply: list[tuple[bytes, StreamEntries]] = []
                for name in names:
                    block = 1000 if len(names) == 1 else None
                    reply.extend(cast(list[tuple[bytes, StreamEntries]] | None, await self.redis.xread(
                        {name: cursors[name]}, count=ALERTS_READ_COUNT, block=block)) or [])
                if len(names) != 1 and not reply:
                    await sleep_unless(stop, 1.0, EXACT)
            except (RedisError, OSError) as exc:
                self._warn("alerts", "metrics: reading %s failed (%s: %s); retrying every second", streams.ALERTS,
                           type(exc).__name__, exc)
                await sleep_unless(stop, 1.0, EXACT)
                continue
            for stream, entries in reply:
                for entry_id, fields in entries:
                    cursor = cursors[_text(stream)] = _text(entry_id)
                    try:
                        events = self.codec.decode_entry(fields)
                    except DecodeError as exc:
                        log.warning("metrics: %s entry %s cannot be decoded (%s); not counted", streams.ALERTS,
                                    cursor, exc)
                        continue
                    for event in events:
                        if isinstance(event, Alert):
                            self.alerts_by_rule.labels(event.rule).inc()
                            self.alerts_by_severity.labels(event.severity).inc()
                            self.count["alerts_read"] += 1

    async def _watch_ticks(self, stop: asyncio.Event) -> None:
        """Observe now - ts_recv of every trade the cache publisher publishes on ticks:{symbol}."""
        decoder = msgspec.json.Decoder(_Tick)
        while not stop.is_set():
            client = aioredis.Redis.from_url(self.settings.redis.url, socket_connect_timeout=10)
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.psubscribe(ticks_channel("*"))
                while not stop.is_set():
                    message = await pubsub.get_message(timeout=1.0)
                    if message is None or message.get("type") != "pmessage":
                        continue
                    now = time.time_ns()
                    try:
                        tick = decoder.decode(message["data"])
                    except msgspec.DecodeError as exc:
                        log.warning("metrics: a ticks message is not tick JSON (%s); not observed", exc)
                        continue
                    self.latency.labels(tick.exchange).observe(max(0.0, (now - tick.ts_recv) / 1e9))
                    self.count["latency_samples"] += 1
            except (RedisError, OSError) as exc:
                self.count["tick_subscriber_restarts"] += 1
                self._warn("ticks", "metrics: the ticks:* subscription dropped (%s: %s; Redis disconnects a "
                           "subscriber that falls behind its pub/sub buffer); resubscribing every second",
                           type(exc).__name__, exc)
                await sleep_unless(stop, 1.0, EXACT)
            finally:
                await pubsub.aclose()
                await client.aclose()


class _PipelineCollector:
    """prometheus_client collector over the exporter's latest snapshot."""

    def __init__(self, exporter: MetricsExporter) -> None:
        self.exporter = exporter

    def collect(self) -> Iterator[Metric]:
        snap = self.exporter.snapshot
        if snap.status is not None:
            yield from pipeline_families(snap.status, self.exporter.settings)
        yield from redis_families(snap.redis_up, snap.redis_info, snap.rdb_save)
        if snap.programs is not None:
            yield from program_families(snap.programs)
        yield GaugeMetricFamily("mdp_exporter_refresh_seconds", "Seconds the exporter's last refresh from Redis "
                                "and supervisord took", value=snap.refresh_seconds)
        yield CounterMetricFamily("mdp_exporter_refresh_errors", "Refreshes in which the bus Redis did not answer",
                                  value=self.exporter.count["refresh_errors"])


def _text(value: bytes | str | Mapping[str, Any]) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


__all__ = ["MetricsExporter"]
