"""A strategy's side of the relational store: publish fills, positions, metrics and its registration.

    events = StrategyEvents(redis, "mean-revert")
    await events.register(description="z-score mean reversion", params={"window": 20})
    await events.fill(exchange="binance", symbol="BTC/USDT", side="buy", price="61837.63", amount="0.01",
                      exchange_trade_id="3735683259", order_id="8389765", fee="0.0000075",
                      fee_currency="BNB", ts_event=fill_time_ns)
    await events.position(exchange="binance", symbol="BTC/USDT", quantity="0.01", avg_price="61837.63")
    await events.metric("pnl", "12.5", period="1d", ts_event=day_end_ns)

Everything goes to the strategy's own stream `strategy:{name}` through the bus (common.bus.core.Producer), and
services/postgres_writer stores it idempotently in `strategies`, `trades`, `positions` (+ `position_history`)
and `performance_metrics` (docs/postgres.md). Publishing returns once the event is in Redis; the bus's
backpressure applies (a writer far behind makes `publish` wait, see README "Bus semantics").

Events are checked here before they leave, with the same rules the writer applies (`problems`), so a
strategy hears about a negative price at once instead of finding it in `dlq:strategy:{name}` later.
Numbers may be given as Decimal, str or int (exact); a float is converted through its shortest repr.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping, Sequence
from decimal import Decimal

import msgspec
import redis.asyncio as aioredis

from common.bus import streams
from common.bus.core import Producer
from common.config import BusSettings
from common.errors import MdpError
from schemas import Codec, Side
from schemas.events import Fill, PerformanceMetric, PositionUpdate, StrategyEvent, StrategyInfo

Number = Decimal | str | int | float

# Bounds the binary numeric encoding and PostgreSQL's numeric hold exactly; real prices are far inside.
MAX_TEXT = 100  # characters of the number's decimal text
MAX_EXPONENT = 100  # magnitude 1e-100 .. 1e100
MAX_NAME = 200
MAX_NS = 2**63  # PostgreSQL bigint; year 2262


class StrategyEventError(MdpError, ValueError):
    """An event the store would refuse. The message names the event, the field, the value and the fix."""


def _decimal(field: str, value: Number) -> Decimal:
    if isinstance(value, Decimal):
        return value
    if isinstance(value, bool):
        raise StrategyEventError(f"{field} = {value!r} is a bool; pass a number (Decimal, str or int)")
    try:
        return Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
    except (ArithmeticError, ValueError, TypeError):
        raise StrategyEventError(f"{field} = {value!r} is not a number; pass a Decimal, str or int") from None


def _number_problem(field: str, value: Decimal, *, positive: bool = False) -> str | None:
    # The writer runs this on every number of every fill: the common case costs three C calls.
    if value.is_finite() and -MAX_EXPONENT <= value.adjusted() <= MAX_EXPONENT and len(str(value)) <= MAX_TEXT:
        return f"{field} = {value} must be positive" if positive and value <= 0 else None
    if not value.is_finite():
        return f"{field} = {value} is not a finite number"
    return (f"{field} = {str(value)[:40]}... is outside what is stored exactly (decimal text of at most "
            f"{MAX_TEXT} characters, magnitude 1e-{MAX_EXPONENT}..1e{MAX_EXPONENT})")


def _text_problem(field: str, value: str | None, *, required: bool = True) -> str | None:
    if value is None:
        return f"{field} is missing" if required else None
    if required and not value.strip():
        return f"{field} = {value!r} is empty; give the exchange's value"
    if not required and value == "":
        return f"{field} = '' is empty; leave it out (None) instead"
    if "\x00" in value:
        return f"{field} = {value[:40]!r} contains a NUL character, which PostgreSQL text cannot hold"
    return None


@functools.lru_cache(maxsize=4096)  # a strategy's name repeats on every event it publishes
def name_problem(name: str) -> str | None:
    """Why `name` cannot name a strategy (it becomes the stream `strategy:{name}` and a unique row), or None."""
    if not name or name != name.strip():
        return f"strategy name {name!r} is empty or has leading/trailing spaces"
    if len(name) > MAX_NAME:
        return f"strategy name {name[:40]!r}... is {len(name)} characters long; use at most {MAX_NAME}"
    if any(c in name for c in "*?[]") or any(ord(c) < 32 for c in name):
        return f"strategy name {name!r} contains a glob or control character (* ? [ ] or below space)"
    return None


def _clip(value: str, keep: int = 40) -> str:
    return value if len(value) <= keep else f"{value[:keep]}... ({len(value)} characters)"


def describe(event: StrategyEvent) -> str:
    """A short name of an event for error messages and alerts (long texts clipped)."""
    who = f"of strategy '{_clip(event.strategy)}'"
    where = f"on {_clip(getattr(event, 'exchange', ''))} {_clip(getattr(event, 'symbol', ''))}"
    if isinstance(event, Fill):
        return f"fill '{_clip(event.exchange_trade_id)}' {who} {where}"
    if isinstance(event, PositionUpdate):
        return f"position {who} {where} as of {event.ts_event}"
    if isinstance(event, PerformanceMetric):
        return f"metric '{_clip(event.metric)}'/'{_clip(event.period)}' {who} at {event.ts_event}"
    return f"registration {who}"


def problems(event: StrategyEvent) -> list[str]:
    """Everything the store would refuse in `event` (empty if none). Shared by this helper and the writer."""
    found: list[str | None] = [name_problem(event.strategy)]
    if not (0 < event.ts_event < MAX_NS and 0 <= event.ts_recv < MAX_NS):
        found.append(f"ts_event = {event.ts_event} / ts_recv = {event.ts_recv} must be ns since the epoch "
                     f"(positive, below 2**63)")
    if isinstance(event, Fill):
        found += [
            _text_problem("exchange", event.exchange), _text_problem("symbol", event.symbol),
            _text_problem("exchange_trade_id", event.exchange_trade_id),
            _text_problem("order_id", event.order_id, required=False),
            _text_problem("fee_currency", event.fee_currency, required=False),
            _number_problem("price", event.price, positive=True),
            _number_problem("amount", event.amount, positive=True),
            _number_problem("fee", event.fee),
        ]
        if event.side not in ("buy", "sell"):
            found.append(f"side = {event.side!r} must be 'buy' or 'sell'")
        if event.fee.is_finite() and event.fee != 0 and not event.fee_currency:
            found.append(f"fee = {event.fee} has no fee_currency; name the currency the fee was paid in")
    elif isinstance(event, PositionUpdate):
        found += [_text_problem("exchange", event.exchange), _text_problem("symbol", event.symbol),
                  _number_problem("quantity", event.quantity), _number_problem("realized_pnl", event.realized_pnl)]
        if event.avg_price is not None:
            found.append(_number_problem("avg_price", event.avg_price, positive=True))
        elif event.quantity.is_finite() and event.quantity != 0:
            found.append(f"quantity = {event.quantity} is open but avg_price is missing; give the average "
                         f"entry price of the open quantity")
    elif isinstance(event, PerformanceMetric):
        found += [_text_problem("metric", event.metric), _text_problem("period", event.period),
                  _number_problem("value", event.value)]
    elif isinstance(event, StrategyInfo):
        found.append(_text_problem("description", event.description, required=False)
                     if event.description else None)
        try:
            encoded = msgspec.json.encode(event.params)
        except (TypeError, msgspec.EncodeError) as exc:
            found.append(f"params cannot be stored as JSON ({exc}); use str, int, float, bool, list, dict")
        else:
            if b"\\u0000" in encoded:
                found.append("params contain a NUL character, which PostgreSQL jsonb cannot hold")
    return [p for p in found if p]


class StrategyEvents:
    """Publishes one strategy's events to `strategy:{name}`. One instance per strategy and process.

    Timestamps default to now and never repeat within an instance: a position update's `ts_event` must
    increase per market (the store keeps the newest), and a metric's `ts_recv` orders its revisions.
    """

    def __init__(self, redis: aioredis.Redis, strategy: str, bus: BusSettings | None = None,
                 codec: Codec | None = None) -> None:
        problem = name_problem(strategy)
        if problem:
            raise StrategyEventError(f"{problem}; choose a plain name such as 'mean-revert'")
        self.strategy = strategy
        self.stream = streams.strategy(strategy)
        self.producer = Producer(redis, codec or Codec(), bus or BusSettings(), source=self.stream)
        self._last_ns = 0
        self._position_ns: dict[tuple[str, str], int] = {}

    def now_ns(self) -> int:
        """Wall-clock ns, strictly increasing within this instance."""
        self._last_ns = max(time.time_ns(), self._last_ns + 1)
        return self._last_ns

    async def publish(self, events: Sequence[StrategyEvent]) -> None:
        """Check and publish several events at once (one round trip; packed into bus entries)."""
        for event in events:
            if event.strategy != self.strategy:
                raise StrategyEventError(f"{describe(event)} is for strategy {event.strategy!r}, but this "
                                         f"publisher is {self.strategy!r}; use a StrategyEvents of that strategy")
            found = problems(event)
            if found:
                raise StrategyEventError(f"{describe(event)}: {'; '.join(found)}")
        await self.producer.publish({self.stream: list(events)})

    async def register(self, description: str = "", params: Mapping[str, object] | None = None,
                       active: bool = True) -> StrategyInfo:
        """Create or update the strategy's row (by name). A strategy should register before trading; fills of
        an unregistered strategy are still stored (the writer registers it with empty params and alerts)."""
        now = self.now_ns()
        event = StrategyInfo(strategy=self.strategy, description=description, params=dict(params or {}),
                             active=active, ts_event=now, ts_recv=now)
        await self.publish([event])
        return event

    async def fill(self, *, exchange: str, symbol: str, side: Side, price: Number, amount: Number,
                   exchange_trade_id: str, fee: Number = 0, fee_currency: str | None = None,
                   order_id: str | None = None, ts_event: int | None = None) -> Fill:
        """One fill as the exchange reported it (`ts_event`: its fill time, ns; default now). Publishing the
        same fill again is harmless: the writer keeps the first and reports a differing copy."""
        now = self.now_ns()
        event = Fill(strategy=self.strategy, exchange=exchange, symbol=symbol, side=side,
                     price=_decimal("price", price), amount=_decimal("amount", amount), fee=_decimal("fee", fee),
                     fee_currency=fee_currency, exchange_trade_id=exchange_trade_id, order_id=order_id,
                     ts_event=now if ts_event is None else ts_event, ts_recv=now)
        await self.publish([event])
        return event

    async def position(self, *, exchange: str, symbol: str, quantity: Number, avg_price: Number | None = None,
                       realized_pnl: Number = 0, ts_event: int | None = None) -> PositionUpdate:
        """The whole position in one market (signed quantity) as of `ts_event` (default now), which must be
        later than this instance's previous update of the market."""
        now = self.now_ns()
        as_of = now if ts_event is None else ts_event
        last = self._position_ns.get((exchange, symbol), 0)
        if as_of <= last:
            raise StrategyEventError(f"position of {exchange} {symbol}: ts_event {as_of} is not after the "
                                     f"previous update's {last}; the store keeps only the newest position")
        event = PositionUpdate(strategy=self.strategy, exchange=exchange, symbol=symbol,
                               quantity=_decimal("quantity", quantity),
                               avg_price=None if avg_price is None else _decimal("avg_price", avg_price),
                               realized_pnl=_decimal("realized_pnl", realized_pnl), ts_event=as_of, ts_recv=now)
        await self.publish([event])
        self._position_ns[(exchange, symbol)] = as_of
        return event

    async def metric(self, metric: str, value: Number, period: str = "all",
                     ts_event: int | None = None) -> PerformanceMetric:
        """A metric over `period` ending at `ts_event` (default now). Publishing it again for the same period
        end replaces the stored value (the later publication wins)."""
        now = self.now_ns()
        event = PerformanceMetric(strategy=self.strategy, metric=metric, period=period,
                                  value=_decimal("value", value), ts_event=now if ts_event is None else ts_event,
                                  ts_recv=now)
        await self.publish([event])
        return event
