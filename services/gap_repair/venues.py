"""ccxt REST objects for the repairs, one per configured exchange, under the shared Redis rate budget.

Why the shared budget (common/exchanges/ratelimit.py): repairs run beside the collector's REST fallback and any
backfill, all against one IP limit. Markets are loaded once per exchange (with the same bounded retries as
every repair request); a failure is `VenueUnavailable`, which the caller turns into an unrepaired-gap alert.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import ccxt
import redis.asyncio as aioredis

from common.backoff import Backoff
from common.config import ConfigError, Settings
from common.errors import MdpError
from common.exchanges.clients import make_rest_exchange
from common.exchanges.ratelimit import BudgetedExchange, ExchangeBanned, RateBudget, limit_for

log = logging.getLogger(__name__)
T = TypeVar("T")


class VenueUnavailable(MdpError, RuntimeError):
    """An exchange could not be asked (not configured, REST down after every retry, or banned); the message
    says which, why, and what to do."""


class Venues:
    def __init__(self, settings: Settings, redis: aioredis.Redis) -> None:
        self.settings = settings
        self.redis = redis
        self._rest: dict[str, BudgetedExchange] = {}
        self._lock = asyncio.Lock()

    async def get(self, exchange_id: str) -> BudgetedExchange:
        """The budgeted ccxt object of a configured exchange, markets loaded."""
        async with self._lock:
            rest = self._rest.get(exchange_id)
            if rest is not None:
                return rest
            try:
                ex_settings = self.settings.exchange(exchange_id)
            except ConfigError as exc:
                raise VenueUnavailable(f"{exc}; the gap repair asks only configured exchanges") from None
            exchange = make_rest_exchange(ex_settings)
            budget = RateBudget(self.redis, exchange_id,
                                limit_for(exchange_id, self.settings.backfill.ratelimit, exchange.rateLimit),
                                self.settings.backfill.ratelimit)
            rest = BudgetedExchange(exchange, budget)
            try:
                await self.call(rest, budget.limit.markets_weight, f"{exchange_id} load_markets",
                                exchange.load_markets)
            except VenueUnavailable:
                await exchange.close()
                raise
            self._rest[exchange_id] = rest
            return rest

    async def call(self, rest: BudgetedExchange, weight: int, what: str, fn: Callable[..., Awaitable[T]],
                   *args: Any, **kwargs: Any) -> T:
        """`rest.call(...)` with `gap_repair.retries` retries on network errors and 5xx (capped, jittered
        backoff); VenueUnavailable after the last one or on a ban longer than the budget may wait."""
        retries = max(0, self.settings.gap_repair.retries)
        backoff = Backoff(first_s=0.5, cap_s=30.0)
        for attempt in range(retries + 1):
            try:
                return await rest.call(weight, fn, *args, **kwargs)
            except ExchangeBanned as exc:
                raise VenueUnavailable(str(exc)) from exc
            except (ccxt.NetworkError, ccxt.ExchangeNotAvailable, ccxt.OperationFailed) as exc:
                # OperationFailed: Binance's -1001 "Internal error; try again" (sent with a 5xx) maps there
                if attempt >= retries:
                    raise VenueUnavailable(
                        f"{what} failed {attempt + 1} times (REST down?), last: {type(exc).__name__}: "
                        f"{str(exc)[:300]}") from exc
                delay = backoff.next()
                log.warning("%s failed (%s: %s); retry %d/%d in %.1f s", what, type(exc).__name__,
                            str(exc)[:200], attempt + 1, retries, delay)
                await asyncio.sleep(delay)
            except ccxt.BaseError as exc:  # a refusal (4xx, bad symbol): asking again changes nothing
                raise VenueUnavailable(f"{what} was refused: {type(exc).__name__}: {str(exc)[:300]}") from exc
        raise AssertionError("unreachable")

    async def close(self) -> None:
        for rest in self._rest.values():
            await rest.exchange.close()
        self._rest.clear()


__all__ = ["VenueUnavailable", "Venues"]
