"""A per-exchange REST request-weight budget held in Redis, shared by every process that calls that exchange.

Why: exchanges limit an IP, not a process. Binance spot allows 6,000 request weight per minute (klines cost 2,
so about 50 requests/s); a collector polling REST and a backfill running beside it must share that, and
ccxt's own limiter is per object and never reads the server's answer (FACTS.md). Going over costs HTTP 429,
and going on after 429s costs an IP ban (HTTP 418, 2 minutes to 3 days) for every process on the machine.

How (one Redis hash per exchange, `ratelimit:{exchange}`, changed only by atomic Lua scripts on Redis's clock):
- Pace: GCRA (a leaky bucket keyed by the "theoretical arrival time"): weight is granted at
  `utilization` x the published limit per window, with at most `burst_s` of the full rate ahead of the pace.
- Window cap: the exchange counts weight per clock window (Binance: per minute, reset at :00). The hash
  keeps the weight granted in the current window and never grants past `utilization` x the limit in it.
  With pacing at 97% and a 0.5 s burst a Binance minute sees at most ~5,870 of 6,000: the rest absorbs
  clock skew between us and the exchange at window edges.
- The server's count wins: `observe()` reads `X-MBX-USED-WEIGHT-1M` from each answer and raises the
  window's count to it (other users of the same IP, or calls that bypass the budget), except for requests
  granted within `BOUNDARY_GUARD_MS` of a window start, whose count may belong to the previous window.
- 429: the answer's `Retry-After` (seconds) becomes a cool-down for every process (default: to the end of
  the window). 418: the IP is banned; `Retry-After` is the ban's length; every process stops calling that
  exchange until it ends. Both live in the hash (`hold_until`, `hold_reason`), so a process that starts
  during a ban honours it too. A caller whose wait would exceed `max_wait_s` gets `ExchangeBanned`.

Use:
    budget = RateBudget(redis, "binance", limit_for("binance", settings.backfill.ratelimit), settings...)
    rest = BudgetedExchange(exchange, budget)          # instruments the ccxt object's responses
    rows = await rest.call(2, exchange.fetch_ohlcv, "BTC/USDT", "1m", since=..., limit=1000)

`call()` acquires the weight, makes the ccxt call, feeds the answer's headers back, waits out a 429's
Retry-After and retries, records a 418 ban and then waits it out (or raises `ExchangeBanned`).
"""

from __future__ import annotations

import asyncio
import contextvars
import email.utils
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import ccxt
import redis.asyncio as aioredis

from common.config import RateLimitSettings
from common.errors import MdpError
from common.exchanges.venues import ExchangeLimit, venue

log = logging.getLogger(__name__)

T = TypeVar("T")
KEY_PREFIX = "ratelimit:"
BOUNDARY_GUARD_MS = 1000  # ignore the server's count for requests granted this close after a window start
DEFAULT_BAN_S = 120.0  # a 418 without Retry-After: Binance's shortest ban


def limit_for(exchange_id: str, settings: RateLimitSettings | None = None,
              rate_limit_ms: float | None = None) -> ExchangeLimit:
    """The limit of `exchange_id`: the venue table's (common/exchanges/venues.py), with `weight_per_minute` from
    the config replacing the weight; for an exchange without one, ccxt's `rateLimit` (ms per request) as requests
    per minute."""
    base = venue(exchange_id).limit
    if base is None:
        per_minute = int(60_000 / rate_limit_ms) if rate_limit_ms and rate_limit_ms > 0 else 60
        base = ExchangeLimit(per_minute, 60.0, 1, 1, None, f"ccxt rateLimit {rate_limit_ms} ms")
    override = (settings.weight_per_minute if settings else {}).get(exchange_id)
    if override is not None:
        if override <= 0:
            raise ValueError(f"backfill.ratelimit.weight_per_minute[{exchange_id!r}] = {override} must be > 0")
        base = ExchangeLimit(int(override * base.window_s / 60.0), base.window_s, base.ohlcv_weight,
                             base.markets_weight, base.used_weight_header, "config weight_per_minute")
    return base


class ExchangeBanned(MdpError):
    """The exchange refused us (HTTP 418 ban or a long 429 cool-down) for longer than we may wait."""

    def __init__(self, exchange: str, until_ms: int, reason: str) -> None:
        self.exchange = exchange
        self.until_ms = until_ms
        self.reason = reason
        until = datetime.fromtimestamp(until_ms / 1000, tz=UTC).isoformat(timespec="seconds")
        super().__init__(
            f"{exchange} REST calls are stopped until {until} ({reason}); every process sharing the budget "
            f"in Redis waits for it. Run again after that time: a backfill resumes where it stopped.")


@dataclass(frozen=True, slots=True)
class Grant:
    """Weight granted: in the exchange window starting at `window_ms`, at Redis time `at_ms`, after which
    the window's count was `used`."""

    weight: int
    window_ms: int
    at_ms: int
    used: int


# KEYS[1] hash. ARGV: weight, cap (weight per window we may use), window_ms, emission_us per weight,
# burst_us. Returns {granted 0/1, wait_ms, window_start_ms, used, now_ms, why (0 ok, 1 hold, 2 window, 3 pace)}.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local weight = tonumber(ARGV[1]); local cap = tonumber(ARGV[2]); local window = tonumber(ARGV[3]) * 1000
local emission = tonumber(ARGV[4]); local burst = tonumber(ARGV[5])
local h = redis.call('HMGET', KEYS[1], 'tat', 'win', 'used', 'hold_until')
local tat = tonumber(h[1]) or 0; local win = tonumber(h[2]) or -1; local used = tonumber(h[3]) or 0
local hold = tonumber(h[4]) or 0
local cur = now - (now % window)
if cur ~= win then win = cur; used = 0 end
local now_ms = math.floor(now / 1000)
if hold > now then
  return {0, math.ceil((hold - now) / 1000), math.floor(win / 1000), used, now_ms, 1}
end
if used + weight > cap then
  return {0, math.ceil((win + window - now) / 1000), math.floor(win / 1000), used, now_ms, 2}
end
local base = math.max(tat, now)
if base - now > burst then
  return {0, math.ceil((base - now - burst) / 1000), math.floor(win / 1000), used, now_ms, 3}
end
used = used + weight
redis.call('HSET', KEYS[1], 'tat', string.format('%.0f', base + weight * emission),
           'win', string.format('%.0f', win), 'used', used)
local ttl = math.max(window * 2, hold - now) / 1000
redis.call('PEXPIRE', KEYS[1], math.ceil(ttl) + 1000)
return {1, 0, math.floor(win / 1000), used, now_ms, 0}
"""

# KEYS[1] hash. ARGV: window_start_ms of the grant, weight the server reports. Raises the count, never lowers.
_OBSERVE = """
local win = tonumber(redis.call('HGET', KEYS[1], 'win') or '-1')
local reported = tonumber(ARGV[2])
if win == tonumber(ARGV[1]) * 1000 then
  local used = tonumber(redis.call('HGET', KEYS[1], 'used') or '0')
  if reported > used then redis.call('HSET', KEYS[1], 'used', reported); return reported end
  return used
end
return -1
"""

# KEYS[1] hash. ARGV: hold seconds, reason, kind. Extends (never shortens) the hold. Returns hold_until ms.
_HOLD = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local untilus = now + math.floor(tonumber(ARGV[1]) * 1000000)
local cur = tonumber(redis.call('HGET', KEYS[1], 'hold_until') or '0')
if untilus > cur then
  redis.call('HSET', KEYS[1], 'hold_until', string.format('%.0f', untilus), 'hold_reason', ARGV[2],
             'hold_kind', ARGV[3])
  redis.call('HINCRBY', KEYS[1], ARGV[3] .. 's', 1)
  local pttl = redis.call('PTTL', KEYS[1])
  local want = math.ceil((untilus - now) / 1000) + 120000
  if pttl < want then redis.call('PEXPIRE', KEYS[1], want) end
  cur = untilus
end
return math.floor(cur / 1000)
"""


@dataclass
class BudgetState:
    """A snapshot of the shared budget of one exchange (for `mdp status`-like displays and tests)."""

    window_ms: int
    used: int
    hold_until_ms: int
    hold_reason: str
    hold_kind: str
    cooldowns: int
    bans: int


class RateBudget:
    """The shared request-weight budget of one exchange (see the module docstring)."""

    def __init__(self, redis: aioredis.Redis, exchange_id: str, limit: ExchangeLimit,
                 settings: RateLimitSettings | None = None) -> None:
        settings = settings or RateLimitSettings()
        if not 0 < settings.utilization <= 1:
            raise ValueError(f"backfill.ratelimit.utilization = {settings.utilization} must be in (0, 1]")
        self.redis = redis
        self.exchange = exchange_id
        self.limit = limit
        self.key = f"{KEY_PREFIX}{exchange_id}"
        self.window_ms = int(limit.window_s * 1000)
        self.cap = max(1, int(limit.weight * settings.utilization))
        per_weight_us = limit.window_s * 1_000_000 / (limit.weight * settings.utilization)
        self.emission_us = per_weight_us
        self.burst_us = max(0.0, settings.burst_s * 1_000_000 * settings.utilization)
        self.max_wait_s = settings.max_wait_s
        self._acquire = redis.register_script(_ACQUIRE)
        self._observe = redis.register_script(_OBSERVE)
        self._hold = redis.register_script(_HOLD)
        self.granted = 0
        self.waits = 0
        self.waited_s = 0.0

    @property
    def steady_weight_per_s(self) -> float:
        """The pace the budget grants at (weight per second)."""
        return 1_000_000 / self.emission_us

    async def try_acquire(self, weight: int) -> tuple[Grant | None, int, int]:
        """One atomic attempt: (grant or None, ms to wait before trying again, why: 0 ok 1 hold 2 window 3 pace)."""
        if weight > self.cap:
            raise ValueError(f"a request of weight {weight} can never fit the {self.exchange} budget of "
                             f"{self.cap} per {self.limit.window_s:g} s")
        r = await self._acquire(keys=[self.key], args=[weight, self.cap, self.window_ms,
                                                       f"{self.emission_us:.3f}", f"{self.burst_us:.0f}"])
        granted, wait_ms, window_ms, used, now_ms, why = (int(x) for x in r)
        if granted:
            self.granted += weight
            return Grant(weight, window_ms, now_ms, used), 0, 0
        return None, wait_ms, why

    async def acquire(self, weight: int) -> Grant:
        """Wait until `weight` may be spent on the exchange, then return the grant.
        ExchangeBanned when the exchange holds us (418 ban / 429 cool-down) for longer than `max_wait_s`."""
        while True:
            grant, wait_ms, why = await self.try_acquire(weight)
            if grant is not None:
                return grant
            if why == 1 and wait_ms > self.max_wait_s * 1000:
                state = await self.state()
                raise ExchangeBanned(self.exchange, state.hold_until_ms, state.hold_reason)
            if why == 1 and wait_ms > 2000:
                state = await self.state()
                log.warning("%s REST calls held for %.1f s more (%s)", self.exchange, wait_ms / 1000,
                            state.hold_reason)
            self.waits += 1
            seconds = max(wait_ms, 1) / 1000
            self.waited_s += seconds
            await asyncio.sleep(seconds)

    async def observe(self, grant: Grant, headers: Mapping[str, str] | None) -> None:
        """Raise the window's count to what the server reports for it (`used_weight_header`)."""
        name = self.limit.used_weight_header
        if not headers or not name or grant.at_ms - grant.window_ms < BOUNDARY_GUARD_MS:
            return
        value = _header(headers, name)
        if value is None:
            return
        try:
            reported = int(value)
        except ValueError:
            log.warning("%s sent %s: %r, not a number; ignored", self.exchange, name, value)
            return
        await self._observe(keys=[self.key], args=[grant.window_ms, reported])

    async def hold(self, seconds: float, reason: str, kind: str = "cooldown") -> int:
        """Stop every process's calls to this exchange for `seconds` (kind 'cooldown' after a 429, 'ban' after
        a 418). Returns the hold's end (ms since the epoch); a longer existing hold is kept."""
        return int(await self._hold(keys=[self.key], args=[f"{max(0.0, seconds):.3f}", reason, kind]))

    async def state(self) -> BudgetState:
        h = await self.redis.hgetall(self.key)
        get = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
               for k, v in h.items()}
        return BudgetState(window_ms=int(float(get.get("win", -1000))) // 1000, used=int(get.get("used", 0)),
                           hold_until_ms=int(float(get.get("hold_until", 0))) // 1000,
                           hold_reason=get.get("hold_reason", ""), hold_kind=get.get("hold_kind", ""),
                           cooldowns=int(get.get("cooldowns", 0)), bans=int(get.get("bans", 0)))


def _header(headers: Mapping[str, str], name: str) -> str | None:
    lower = name.lower()
    for k, v in headers.items():
        if k.lower() == lower:
            return v
    return None


def retry_after_s(headers: Mapping[str, str] | None) -> float | None:
    """Seconds of a `Retry-After` header (delta-seconds or an HTTP date); None when absent or unreadable."""
    value = _header(headers or {}, "retry-after")
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        log.warning("unreadable Retry-After header %r; using the default wait", value)
        return None
    return max(0.0, when.timestamp() - time.time())


# ---------------------------------------------------------------------------------------------------------
# ccxt objects whose REST calls go through a budget


@dataclass
class _Response:
    """The HTTP status and headers of the last answer ccxt got inside one `call()` (per asyncio task)."""

    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)


_current: contextvars.ContextVar[_Response | None] = contextvars.ContextVar("mdp_rest_response", default=None)


def instrument(exchange: Any) -> None:
    """Make `exchange` (a ccxt object) report each answer's status and headers to the `call()` that made it.
    ccxt keeps only the last answer's headers per object, which concurrent calls overwrite; its
    `on_rest_response` hook runs inside the calling task, so a context variable tells the calls apart."""
    if getattr(exchange, "_mdp_instrumented", False):
        return
    original = exchange.on_rest_response

    def on_rest_response(code: int, reason: str, url: str, method: str, response_headers: dict[str, str],
                         response_body: str, request_headers: Any, request_body: Any) -> Any:
        slot = _current.get()
        if slot is not None:
            slot.status = int(code)
            slot.headers = dict(response_headers or {})
        return original(code, reason, url, method, response_headers, response_body, request_headers,
                        request_body)

    exchange.on_rest_response = on_rest_response
    exchange._mdp_instrumented = True


@dataclass
class CallStats:
    requests: int = 0
    weight: int = 0
    throttled_429: int = 0
    banned_418: int = 0


class BudgetedExchange:
    """A ccxt exchange object whose REST calls spend the shared budget. ccxt's own per-object limiter is
    switched off (the budget paces every process together; two limiters would only add jitter)."""

    def __init__(self, exchange: Any, budget: RateBudget) -> None:
        self.exchange = exchange
        self.budget = budget
        self.stats = CallStats()
        exchange.enableRateLimit = False
        instrument(exchange)

    async def call(self, weight: int, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        """`await fn(*args, **kwargs)` once the budget grants `weight`. A 429 holds every process for its
        Retry-After and the call is made again; a 418 records the ban and the call is made again after it
        (or ExchangeBanned if the ban is longer than `max_wait_s`). Other errors propagate."""
        while True:
            grant = await self.budget.acquire(weight)
            slot = _Response()
            token = _current.set(slot)
            self.stats.requests += 1
            self.stats.weight += weight
            try:
                return await fn(*args, **kwargs)
            except ccxt.DDoSProtection as exc:
                status = slot.status or _status_in(str(exc))
                if status not in (418, 429):
                    raise
                await self._penalty(status, slot.headers, exc)
            finally:
                _current.reset(token)
                if slot.headers:
                    await self.budget.observe(grant, slot.headers)

    async def _penalty(self, status: int, headers: dict[str, str], exc: Exception) -> None:
        wait = retry_after_s(headers)
        ex = self.budget.exchange
        if status == 429:
            self.stats.throttled_429 += 1
            if wait is None:
                wait = self.budget.limit.window_s - (time.time() % self.budget.limit.window_s)
            until = await self.budget.hold(wait, f"HTTP 429 from {ex}, Retry-After {wait:g} s", "cooldown")
            log.warning("%s answered 429 (too much request weight); every caller pauses %.1f s (until %s)",
                        ex, wait, _iso(until))
        else:
            self.stats.banned_418 += 1
            if wait is None:
                wait = DEFAULT_BAN_S
            until = await self.budget.hold(wait, f"HTTP 418 from {ex}: IP banned, Retry-After {wait:g} s",
                                           "ban")
            log.error("%s banned this IP (HTTP 418) for %.0f s, until %s: every process stops calling it "
                      "until then (%s)", ex, wait, _iso(until), str(exc)[:200])


def _status_in(message: str) -> int:
    for code in (418, 429):
        if f" {code} " in f" {message} ":
            return code
    return 0


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="seconds")


__all__ = [
    "BudgetState", "BudgetedExchange", "CallStats", "ExchangeBanned", "ExchangeLimit",
    "Grant", "RateBudget", "instrument", "limit_for", "retry_after_s",
]
