"""Process lifecycle shared by every service: logging, uvloop, signals, Redis connection, heartbeats.

A service subclasses `Service`, implements `run(stop)` (return when `stop` is set) and `counters()`.
SIGTERM/SIGINT set `stop`: the service stops taking new work and finishes what is in flight; whatever
was not acknowledged stays pending in its consumer group and is redelivered after restart.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
from typing import Any, ClassVar

import redis.asyncio as aioredis
import uvloop
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from common.bus import streams
from common.bus.core import redis_url, sleep_unless
from common.config import ConfigError, Settings, load_settings
from schemas import Codec, Heartbeat

log = logging.getLogger(__name__)
REDIS_TIMEOUT_S = 10.0
REDIS_WAIT_MAX_S = 5.0  # cap of the backoff while a starting service waits for Redis


def setup_logging(service: str) -> None:
    level = os.environ.get("MDP_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(
        level=level, stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s {service}[%(process)d] %(name)s: %(message)s",
    )


class Service:
    name: ClassVar[str] = "service"

    def __init__(self, settings: Settings, instance: str | None = None) -> None:
        self.settings = settings
        self.instance = instance or os.environ.get("MDP_INSTANCE", "0")
        self.codec = Codec()
        # Bounded waits: a Redis that stops answering raises instead of hanging (XREADGROUP blocks 1 s at most).
        self.redis: aioredis.Redis = aioredis.Redis.from_url(
            settings.redis.url, decode_responses=False, socket_timeout=REDIS_TIMEOUT_S,
            socket_connect_timeout=REDIS_TIMEOUT_S, health_check_interval=30)
        self.started_at = time.time_ns()
        self.state = "starting"
        self.detail = ""

    @property
    def consumer_name(self) -> str:
        """Stable across restarts, so a restarted process finds its own pending entries at once."""
        return f"{self.name}-{self.instance}"

    def counters(self) -> dict[str, int]:
        return {}

    async def run(self, stop: asyncio.Event) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        producer = getattr(self, "producer", None)
        if producer is not None and hasattr(producer, "aclose"):
            await producer.aclose()
        await self.redis.aclose()

    async def wait_for_redis(self, stop: asyncio.Event) -> bool:
        """Wait until Redis answers (True) or `stop` (False): a stage started while Redis is down (a machine
        boot, a Redis restart) waits with capped backoff instead of exiting, which supervisord would give up
        on after `startretries` (FATAL)."""
        backoff, waited_since = 0.5, time.monotonic()
        while True:
            try:
                await self.redis.ping()
                if time.monotonic() - waited_since > 1:
                    log.info("%s: Redis at %s answers after %.1f s", self.name, redis_url(self.redis),
                             time.monotonic() - waited_since)
                return True
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                self.state = "degraded"
                self.detail = f"waiting for Redis at {redis_url(self.redis)}: {exc}"
                log.warning("%s: Redis at %s is unreachable (%s); waiting %.1f s (start Redis, or fix "
                            "MDP_REDIS_URL / [redis] url)", self.name, redis_url(self.redis), exc, backoff)
            if await sleep_unless(stop, backoff):
                return False
            backoff = min(backoff * 2, REDIS_WAIT_MAX_S)

    async def heartbeat_once(self) -> None:
        now = time.time_ns()
        counters = self.counters()
        state, detail = self.state, self.detail
        consumer = getattr(self, "consumer", None)
        if consumer is not None:  # every consuming stage reports the same headline counters
            counters["events_consumed"] = consumer.stats.events
            counters["entries_dead_lettered"] = consumer.stats.dead_lettered
            # The bus's own view wins while it waits for a store or Redis, or stands by for a lease.
            if consumer.stats.state in ("degraded", "standby") and state in ("running", "starting"):
                state = consumer.stats.state
                detail = detail or getattr(consumer.stats, "detail", "") or consumer.stats.last_error
        beat = Heartbeat(service=self.name, instance=self.instance, pid=os.getpid(), started_at=self.started_at,
                         # state is a plain str on Service (subclasses set it); msgspec checks the Literal
                         counters=counters, state=state, detail=detail,  # type: ignore[arg-type]
                         ts_event=now, ts_recv=now)
        payload = self.codec.encode([beat])
        ttl = max(5, int(self.settings.bus.heartbeat_interval_s * 5))
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(streams.alive_key(self.name, self.instance), payload, ex=ttl)
        # redis-py types xadd's fields as dict[FieldT, EncodableT], which (invariant) refuses dict[bytes, bytes].
        pipe.xadd(streams.HEARTBEATS, self.codec.entry([beat]), maxlen=10_000, approximate=True)  # type: ignore[arg-type]
        await pipe.execute()

    async def _heartbeats(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.heartbeat_once()
            except Exception as exc:  # noqa: BLE001 - a missed heartbeat must not kill the service
                log.warning("heartbeat failed: %s", exc)
            try:
                await asyncio.wait_for(stop.wait(), timeout=self.settings.bus.heartbeat_interval_s)
            except TimeoutError:
                pass

    async def main(self) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        log.info("starting %s instance %s (redis %s)", self.name, self.instance, redis_url(self.redis))
        if not await self.wait_for_redis(stop):
            await self.close()
            return
        self.state, self.detail = "starting", ""
        beats = asyncio.create_task(self._heartbeats(stop))
        work = asyncio.create_task(self.run(stop))
        try:
            done, _ = await asyncio.wait({beats, work}, return_when=asyncio.FIRST_COMPLETED)
            if work in done:
                work.result()  # re-raise a crash so supervisord sees a non-zero exit
        finally:
            stop.set()
            self.state = "stopping"
            for task in (work, beats):
                if not task.done():
                    try:
                        await asyncio.wait_for(task, timeout=10)
                    except TimeoutError:
                        log.error("%s did not stop within 10 s; cancelling", self.name)
                        task.cancel()
            try:
                await self.heartbeat_once()  # the "stopping" heartbeat, so mdp status shows a clean stop
            except Exception as exc:  # noqa: BLE001 - the store may be what stopped us; stopping goes on
                log.warning("%s: the last heartbeat was not sent (%s)", self.name, exc)
            await self.close()
            log.info("%s stopped", self.name)


def service_main(cls: type[Service], argv: list[str] | None = None,
                 extra: list[tuple[str, dict[str, Any]]] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=f"python -m services.{cls.name}")
    parser.add_argument("--config", help="config file (default: $MDP_CONFIG or config/simulator.toml)")
    parser.add_argument("--instance", help="instance id, stable across restarts (default: $MDP_INSTANCE or 0)")
    for flag, kwargs in extra or []:
        parser.add_argument(flag, **kwargs)
    args = parser.parse_args(argv)
    setup_logging(cls.name)
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        log.error("%s", exc)
        raise SystemExit(2) from None
    kwargs = {k: v for k, v in vars(args).items() if k not in ("config", "instance")}
    service = cls(settings, args.instance, **kwargs) if kwargs else cls(settings, args.instance)
    uvloop.run(service.main())
