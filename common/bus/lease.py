"""A lease in Redis: at most one process of a stage does the work, the others wait as standby.

`SET key owner NX PX ttl` takes it; the holder renews it every ttl/3 (only while the key still names it) and
every commit verifies it (`WATCH key`, compare, then MULTI/EXEC: the EXEC aborts if the key changed, and if
it is no longer ours the commit raises `LeaseLost`). A holder that cannot renew for a whole ttl (Redis
unreachable) gives the lease up, since another process may hold it by then. A stage that loses its lease
stops processing and exits non-zero; supervisord restarts it, and it waits as standby.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import cast

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from common.backoff import EXACT, sleep_unless
from common.errors import MdpError

log = logging.getLogger(__name__)

STANDBY_LOG_EVERY_S = 10.0

# Renew only while the key still names us: a plain PEXPIRE would extend a lease another process holds now.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""


class LeaseLost(MdpError):
    """This process no longer holds its lease: stop processing (exit non-zero; supervisord restarts it as
    standby)."""


class Lease:
    def __init__(self, redis: aioredis.Redis, key: str, owner: str, ttl_ms: int = 10_000) -> None:
        if ttl_ms < 30:
            raise ValueError(f"lease {key}: ttl_ms={ttl_ms} is too short to renew every ttl/3; use >= 1000")
        self.redis = redis
        self.key = key
        self.owner = owner
        self.ttl_ms = ttl_ms
        self.state = "starting"
        self._held = False
        self._renewed_at = 0.0  # monotonic time of the last successful take or renewal

    @property
    def held(self) -> bool:
        """True while we hold it as far as we know: taken or renewed less than a ttl ago."""
        return self._held and time.monotonic() - self._renewed_at < self.ttl_ms / 1000

    def _owner_bytes(self) -> bytes:
        return self.owner.encode()

    def lost(self, why: str) -> LeaseLost:
        self._held = False
        self.state = "lost"
        return LeaseLost(f"lease {self.key} lost by {self.owner}: {why}; this process stops processing "
                         f"and restarts as standby")

    async def try_acquire(self) -> bool:
        """One attempt: take the free lease, or keep ours (a restarted process with the same owner name)."""
        now = time.monotonic()
        if await self.redis.set(self.key, self.owner, nx=True, px=self.ttl_ms):
            self._held, self._renewed_at = True, now
            return True
        if await self.redis.eval(_RENEW, 1, self.key, self.owner, self.ttl_ms):
            self._held, self._renewed_at = True, now
            return True
        return False

    async def acquire(self, stop: asyncio.Event) -> bool:
        """Wait until the lease is ours (True) or `stop` is set (False). While another owner holds it the
        state is "standby", logged every 10 s."""
        logged_at = 0.0
        while not stop.is_set():
            try:
                if await self.try_acquire():
                    self.state = "leader"
                    log.info("lease %s taken by %s (ttl %d ms)", self.key, self.owner, self.ttl_ms)
                    return True
                self.state = "standby"
                if time.monotonic() - logged_at >= STANDBY_LOG_EVERY_S:
                    logged_at = time.monotonic()
                    holder = await self.redis.get(self.key)
                    log.info("standby: lease %s is held by %s; %s waits and takes over within %d ms of its "
                             "expiry", self.key, cast(bytes, holder).decode() if holder else "(expired just now)",
                             self.owner, self.ttl_ms)
            except (RedisError, OSError) as exc:
                self.state = "standby"
                if time.monotonic() - logged_at >= STANDBY_LOG_EVERY_S:
                    logged_at = time.monotonic()
                    log.warning("lease %s: Redis unreachable while waiting for it (%s); retrying", self.key, exc)
            await sleep_unless(stop, self.ttl_ms / 3000, EXACT)
        return False

    async def renew(self) -> None:
        """Extend the lease by a ttl; LeaseLost if the key names someone else or is gone."""
        if await self.redis.eval(_RENEW, 1, self.key, self.owner, self.ttl_ms):
            self._renewed_at = time.monotonic()
            return
        raise self.lost("the key expired or names another owner")

    async def run_renewal(self, stop: asyncio.Event, until: asyncio.Event | None = None) -> None:
        """Renew every ttl/3 until `stop` (or `until`, at the latest at the next renewal); raises LeaseLost when
        the lease is gone or could not be renewed for a whole ttl (Redis unreachable: another process may have
        taken it meanwhile)."""
        while not stop.is_set() and not (until is not None and until.is_set()):
            if await sleep_unless(stop, self.ttl_ms / 3000, EXACT) or (until is not None and until.is_set()):
                return
            try:
                await self.renew()
            except (RedisError, OSError) as exc:
                if not self.held:
                    raise self.lost(f"not renewed for {self.ttl_ms} ms (Redis: {exc})") from exc
                log.warning("lease %s: renewal failed (%s); retrying, the lease lasts until %d ms after the "
                            "last renewal", self.key, exc, self.ttl_ms)

    async def release(self) -> None:
        """Give the lease up at a clean stop so a standby takes over at once (only if it is still ours)."""
        if self._held:
            await self.redis.eval("if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', "
                                  "KEYS[1]) end return 0", 1, self.key, self.owner)
            self._held = False
