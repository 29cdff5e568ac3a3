"""The Redis cache, laid out as the plan says, and a small typed client for strategies to read and write it.

  price:{exchange}:{symbol}          string, JSON {"price": "<decimal>", "ts": <ns>, "source": "trade"|"ticker"|
                                     "candle"}, TTL cache.price_ttl_s (300 s). Written by the cache publisher,
                                     forward-only (an older event never replaces a newer price).
  orderbook:{exchange}:{symbol}      hash {bids, asks, sequence, ts}, TTL cache.orderbook_ttl_s (60 s). bids and
                                     asks are JSON [["<price>", "<amount>"], ...], best level first, at most
                                     cache.orderbook_depth levels a side; never crossed; forward-only by sequence.
  trades:{strategy}                  list, a strategy's own trades (its fills), newest first, capped at
                                     cache.strategy_trades (1000) by LTRIM; the oldest fall off.
  session:{strategy_id}              hash, a strategy's session state (field -> text); no TTL unless given.
  ticks:{symbol}                     pub/sub channel: every trade of `symbol` as tick JSON (the cache publisher
                                     publishes them; it names its exchange). At least once while subscribed,
                                     nothing kept for a subscriber that is not connected: use md:trade:* streams
                                     for completeness.
  indicator:{symbol}:{name}          string, JSON {"value": "<decimal>", "ts": <ns>}, TTL cache.indicator_ttl_s
                                     (300 s) unless given, so a stale indicator disappears rather than lingers.
  recent_trades:{exchange}:{symbol}  list, the market's newest cache.recent_trades trades as tick JSON (the cache
                                     publisher; renamed from trades:{exchange}:{symbol}, which collided with
                                     trades:{strategy}).

Every write that touches more than one command (orderbook, trade log) runs as one Lua script, so a reader never
sees half of it; every key that can grow is capped (lists) or expires (TTL).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping
from decimal import Decimal
from itertools import pairwise
from typing import Literal, Self

import msgspec
import redis.asyncio as aioredis

from common.config import CacheSettings, Settings
from common.errors import MdpError
from common.redis_client import connect
from schemas import Trade

Side = Literal["buy", "sell"]


# -- keys -------------------------------------------------------------------------------------------------

def price_key(exchange: str, symbol: str) -> str:
    return f"price:{exchange}:{symbol}"


def orderbook_key(exchange: str, symbol: str) -> str:
    return f"orderbook:{exchange}:{symbol}"


def strategy_trades_key(strategy: str) -> str:
    return f"trades:{strategy}"


def session_key(strategy_id: str) -> str:
    return f"session:{strategy_id}"


def ticks_channel(symbol: str) -> str:
    return f"ticks:{symbol}"


def indicator_key(symbol: str, name: str) -> str:
    return f"indicator:{symbol}:{name}"


def recent_trades_key(exchange: str, symbol: str) -> str:
    return f"recent_trades:{exchange}:{symbol}"


def recent_trades_hw_key(exchange: str, symbol: str, cluster: bool = False) -> str:
    """High-water mark of recent_trades:{exchange}:{symbol} (the cache publisher's idempotence). On a Redis
    Cluster it is `{recent_trades:{exchange}:{symbol}}:hw`, whose hash tag is the list's whole name: the two keys
    of the publisher's script are then in one slot."""
    if cluster:
        return f"{{{recent_trades_key(exchange, symbol)}}}:hw"
    return f"recent_trades_hw:{exchange}:{symbol}"


# -- values -----------------------------------------------------------------------------------------------

class Price(msgspec.Struct, frozen=True):
    price: Decimal
    ts: int
    source: str


class OrderBook(msgspec.Struct, frozen=True):
    """A bounded-depth snapshot: bids best (highest) first, asks best (lowest) first, each [price, amount]."""

    exchange: str
    symbol: str
    bids: list[tuple[Decimal, Decimal]]
    asks: list[tuple[Decimal, Decimal]]
    sequence: int
    ts: int


class StrategyTrade(msgspec.Struct, frozen=True, kw_only=True):
    """One of a strategy's own trades (a fill), as its trade log keeps it."""

    strategy: str
    exchange: str
    symbol: str
    side: Side
    price: Decimal
    amount: Decimal
    ts: int
    trade_id: str
    order_id: str = ""
    fee: Decimal | None = None
    fee_currency: str = ""


class Tick(msgspec.Struct, frozen=True):
    """A market trade as published on ticks:{symbol} and listed in recent_trades:{exchange}:{symbol}."""

    exchange: str
    symbol: str
    trade_id: str
    price: Decimal | None
    amount: Decimal | None
    side: Side | None
    ts: int
    ts_recv: int


class Indicator(msgspec.Struct, frozen=True):
    symbol: str
    name: str
    value: Decimal
    ts: int


class _IndicatorValue(msgspec.Struct, frozen=True):
    value: Decimal
    ts: int


_json = msgspec.json.Encoder()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _dec(value: Decimal | None) -> str | None:
    return None if value is None else format(value, "f")


def trade_json(t: Trade) -> bytes:
    """A market trade as tick JSON (what ticks:{symbol} and recent_trades:* carry); decimals as plain text."""
    return _json.encode({"exchange": t.exchange, "symbol": t.symbol, "trade_id": t.trade_id,
                         "price": _dec(t.price), "amount": _dec(t.amount), "side": t.side, "ts": t.ts_event,
                         "ts_recv": t.ts_recv})


def price_json(price: Decimal, ts: int, source: str) -> bytes:
    return _json.encode({"price": format(price, "f"), "ts": ts, "source": source})


# -- scripts ----------------------------------------------------------------------------------------------

# KEYS[1] orderbook hash; ARGV: sequence, bids JSON, asks JSON, ts, TTL s. 1 if written, 0 if not newer.
PUT_ORDERBOOK_LUA = """
local cur = redis.call('HGET', KEYS[1], 'sequence')
if cur and tonumber(cur) >= tonumber(ARGV[1]) then
  return 0
end
redis.call('HSET', KEYS[1], 'bids', ARGV[2], 'asks', ARGV[3], 'sequence', ARGV[1], 'ts', ARGV[4])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[5]))
return 1
"""

# KEYS[1] the trade log; ARGV: cap, trade JSON. 1 if pushed, 0 if already listed (a redelivered fill).
APPEND_TRADE_LUA = """
local cap = tonumber(ARGV[1])
if redis.call('LPOS', KEYS[1], ARGV[2], 'MAXLEN', cap) then
  return 0
end
redis.call('LPUSH', KEYS[1], ARGV[2])
redis.call('LTRIM', KEYS[1], 0, cap - 1)
return 1
"""


def orderbook_levels_json(levels: Iterable[tuple[Decimal, Decimal]]) -> bytes:
    """A book side as the orderbook:{exchange}:{symbol} hash stores it: JSON [["<price>", "<amount>"], ...]."""
    return _json.encode([[_dec(p), _dec(q)] for p, q in levels])


class CacheError(MdpError, ValueError):
    """A value the cache refuses to store (a crossed book, a non-positive price); the message names it."""


def _levels(levels: Iterable[tuple[Decimal | str, Decimal | str]], side: str, where: str,
            depth: int) -> list[tuple[Decimal, Decimal]]:
    out: list[tuple[Decimal, Decimal]] = []
    for price, amount in levels:
        p, a = Decimal(price), Decimal(amount)
        if not (p.is_finite() and a.is_finite()) or p <= 0 or a <= 0:
            raise CacheError(f"order book {where}: {side} level [{price}, {amount}] has a non-positive or "
                             f"non-finite price or amount; a snapshot holds only levels with quantity")
        out.append((p, a))
    out.sort(key=lambda lvl: lvl[0], reverse=(side == "bid"))
    for (p1, _), (p2, _) in pairwise(out):
        if p1 == p2:
            raise CacheError(f"order book {where}: two {side} levels at price {p1}; merge them first")
    return out[:depth]


class CacheClient:
    """Typed access to the cache for strategies. `CacheClient.connect(settings)` makes its own Redis client
    (close it with `await close()`); `CacheClient(redis, settings.cache)` uses yours."""

    def __init__(self, redis: aioredis.Redis, settings: CacheSettings | None = None) -> None:
        self.redis = redis
        self.settings = settings or CacheSettings()
        self._own = False
        self._put_book = redis.register_script(PUT_ORDERBOOK_LUA)
        self._append = redis.register_script(APPEND_TRADE_LUA)
        self._price = msgspec.json.Decoder(Price)
        self._trade = msgspec.json.Decoder(StrategyTrade)
        self._tick = msgspec.json.Decoder(Tick)
        self._indicator = msgspec.json.Decoder(_IndicatorValue)
        self._levels = msgspec.json.Decoder(list[tuple[Decimal, Decimal]])

    @classmethod
    def connect(cls, settings: Settings) -> CacheClient:
        client = cls(connect(settings.redis.url, settings.bus.cluster), settings.cache)
        client._own = True
        return client

    async def close(self) -> None:
        if self._own:
            await self.redis.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- prices ---------------------------------------------------------------------------------------

    async def get_price(self, exchange: str, symbol: str) -> Price | None:
        """The latest price of a market (None when not cached or expired: older than 300 s)."""
        raw = await self.redis.get(price_key(exchange, symbol))
        return None if raw is None else self._price.decode(raw)

    # -- order books ----------------------------------------------------------------------------------

    async def put_orderbook(self, exchange: str, symbol: str, bids: Iterable[tuple[Decimal | str, Decimal | str]],
                            asks: Iterable[tuple[Decimal | str, Decimal | str]], sequence: int, ts: int,
                            depth: int | None = None) -> bool:
        """Cache a snapshot: levels sorted best first and cut to `depth` (default cache.orderbook_depth) a side,
        TTL cache.orderbook_ttl_s. CacheError for a crossed or locked book (best bid >= best ask) or a bad level;
        False (nothing written) when the cached snapshot has the same or a later `sequence`."""
        where = f"{exchange}:{symbol}"
        n = depth or self.settings.orderbook_depth
        b = _levels(bids, "bid", where, n)
        a = _levels(asks, "ask", where, n)
        if b and a and b[0][0] >= a[0][0]:
            raise CacheError(f"order book {where} sequence {sequence} is crossed: best bid {b[0][0]} >= best ask "
                             f"{a[0][0]}; not cached (rebuild the book from a fresh snapshot)")
        written = await self._put_book(
            keys=[orderbook_key(exchange, symbol)],
            args=[sequence, _json.encode([[_dec(p), _dec(q)] for p, q in b]),
                  _json.encode([[_dec(p), _dec(q)] for p, q in a]), ts, self.settings.orderbook_ttl_s])
        return bool(written)

    async def get_orderbook(self, exchange: str, symbol: str) -> OrderBook | None:
        raw = await self.redis.hgetall(orderbook_key(exchange, symbol))
        if not raw:
            return None
        return OrderBook(exchange, symbol, self._levels.decode(raw[b"bids"]), self._levels.decode(raw[b"asks"]),
                         int(raw[b"sequence"]), int(raw[b"ts"]))

    # -- a strategy's trade log -----------------------------------------------------------------------

    async def append_trade(self, trade: StrategyTrade) -> bool:
        """Push a fill onto trades:{strategy} (newest first, capped at cache.strategy_trades). False when the
        same fill is already listed, so a retried append is harmless."""
        pushed = await self._append(keys=[strategy_trades_key(trade.strategy)],
                                    args=[self.settings.strategy_trades, _json.encode(trade)])
        return bool(pushed)

    async def recent_trades(self, strategy: str, count: int = 100) -> list[StrategyTrade]:
        """The strategy's newest `count` fills, newest first."""
        raw = await self.redis.lrange(strategy_trades_key(strategy), 0, max(0, count - 1))
        return [self._trade.decode(item) for item in raw]

    async def recent_market_trades(self, exchange: str, symbol: str, count: int = 100) -> list[Tick]:
        """The market's newest `count` trades (the cache publisher's list), newest first."""
        raw = await self.redis.lrange(recent_trades_key(exchange, symbol), 0, max(0, count - 1))
        return [self._tick.decode(item) for item in raw]

    # -- session state --------------------------------------------------------------------------------

    async def set_session(self, strategy_id: str, values: Mapping[str, str | int | Decimal],
                          ttl_s: int | None = None) -> None:
        """Set fields of session:{strategy_id} (others are kept); with `ttl_s` the hash expires."""
        if not values:
            return
        mapping = {k: format(v, "f") if isinstance(v, Decimal) else str(v) for k, v in values.items()}
        pipe = self.redis.pipeline(transaction=True)
        # redis-py types the mapping as an invariant dict[FieldT, EncodableT], refusing dict[str, str].
        pipe.hset(session_key(strategy_id), mapping=mapping)  # type: ignore[arg-type]
        if ttl_s:
            pipe.expire(session_key(strategy_id), ttl_s)
        await pipe.execute()

    async def get_session(self, strategy_id: str) -> dict[str, str]:
        raw = await self.redis.hgetall(session_key(strategy_id))
        return {_text(k): _text(v) for k, v in raw.items()}

    async def clear_session(self, strategy_id: str, *fields: str) -> None:
        """Remove `fields` of the session, or the whole session without fields."""
        if fields:
            await self.redis.hdel(session_key(strategy_id), *fields)
        else:
            await self.redis.delete(session_key(strategy_id))

    # -- ticks ----------------------------------------------------------------------------------------

    async def publish_tick(self, trade: Trade) -> int:
        """Publish a market trade on ticks:{symbol}; the number of subscribers that got it."""
        return int(await self.redis.publish(ticks_channel(trade.symbol), trade_json(trade)))

    async def ticks(self, *symbols: str) -> AsyncIterator[Tick]:
        """Ticks of `symbols` as they are published (subscribe first, then trades arrive). Stop iterating to
        unsubscribe. Pub/sub keeps nothing: what is published before the subscription is not seen."""
        pubsub = self.redis.pubsub()
        await pubsub.subscribe(*(ticks_channel(s) for s in symbols))
        try:
            while True:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if message is not None and message.get("type") == "message":
                    yield self._tick.decode(message["data"])
        finally:
            await pubsub.aclose()

    # -- indicators -----------------------------------------------------------------------------------

    async def set_indicator(self, symbol: str, name: str, value: Decimal | int | str, ts: int,
                            ttl_s: int | None = None) -> None:
        """Cache an indicator value at time `ts` (ns), expiring after `ttl_s` (default cache.indicator_ttl_s)."""
        number = Decimal(value)
        if not number.is_finite():
            raise CacheError(f"indicator {symbol}:{name} value {value!r} is not a finite number")
        await self.redis.set(indicator_key(symbol, name), _json.encode(_IndicatorValue(number, ts)),
                             ex=ttl_s or self.settings.indicator_ttl_s)

    async def get_indicator(self, symbol: str, name: str) -> Indicator | None:
        raw = await self.redis.get(indicator_key(symbol, name))
        if raw is None:
            return None
        found = self._indicator.decode(raw)
        return Indicator(symbol, name, found.value, found.ts)


__all__ = [
    "CacheClient", "CacheError", "Indicator", "OrderBook", "Price", "StrategyTrade", "Tick", "indicator_key",
    "orderbook_key", "orderbook_levels_json", "price_json", "price_key", "recent_trades_hw_key", "recent_trades_key", "session_key",
    "strategy_trades_key", "ticks_channel", "trade_json",
]
