"""The cache publisher: reads md:trade:*, md:ticker:* and md:candle:* (consumer group "cache_publisher") and
keeps the live view of the market in Redis (the same Redis as the bus, settings.redis.url). The key layout is
common/stores/cache.py's (the plan's cache); strategies read it with common.stores.cache.CacheClient.

  price:{exchange}:{symbol}    JSON {"price": "<decimal text>", "ts": <ts_event ns>,
                               "source": "trade"|"ticker"|"candle"}, TTL cache.price_ttl_s (counted from the
                               write). The price of a trade, a ticker's `last` (a ticker without `last`
                               sets nothing) or a candle's `close`.
                               It only moves forward: a Lua script compares ts_event with the stored one and
                               keeps the stored price when it is newer (equal ts: the later write wins, so of
                               several trades in one millisecond the last one processed stands).
  recent_trades:{exchange}:{symbol}  the market's newest cache.recent_trades trades, newest first, as tick JSON
                               {"exchange", "symbol", "trade_id", "price", "amount", "side", "ts", "ts_recv"}.
                               (Not trades:{exchange}:{symbol}: trades:{strategy} is a strategy's own log.)
  recent_trades_hw:{exchange}:{symbol}  the list's high-water mark: ts_event (20 digits) "|" trade id
                               (zero-padded to 20 digits when numeric) of the newest trade pushed.
  ticks:{symbol} (pub/sub)     every trade as the same tick JSON (it names its exchange).
  orderbook:{exchange}:{symbol}  hash {bids, asks, sequence, ts} from md:book:* (common/stores/cache.py), the newest
                               snapshot of the batch per market, cut to cache.orderbook_depth levels a side, TTL
                               cache.orderbook_ttl_s (60 s): a feed that stops lets it expire rather than lie.
                               Forward-only by `sequence` (the book's update id; its ts_event when the exchange
                               gives none), so a redelivered or older snapshot never replaces a newer one.

Every write of a batch goes in one MULTI/EXEC pipeline, so readers never see half a batch; the inputs are
acknowledged after it (by the bus), so a crash in between redelivers the batch.

Instances: with bus.partitions = P > 1 it is a partitioned stage (common/bus/partitions.py): a market's
streams belong to its base asset's partition, held by one instance at a time under mdp:lease:cache_publisher:p{k},
so one market's writes never race (the recent-trades list refuses a trade older than its newest: two
instances writing one market concurrently would drop trades from it). Run up to P instances (supervisord
numprocs). With P = 1 run one: a second would share the consumer group without a lease.

Idempotence on redelivery:
  * price: yes - an older or equal event rewrites nothing newer (an equal-ts redelivery rewrites the same
    or a same-millisecond value and refreshes the TTL).
  * recent trades: yes - a trade is pushed only if it is newer than the high-water mark, or has the same
    ts_event and is not already in the list (bytewise order key, so it does not depend on the server's
    locale). Consequence: a trade older than the newest listed one (e.g. a late REST backfill) is not
    added to the recent list (it still reaches md:trade and the stores).
  * ticks pub/sub: no - at-least-once: every delivery of a trade is published again, so subscribers
    de-duplicate on (exchange, trade_id). It is also at-most-once towards a subscriber that is not
    connected at that moment (Redis pub/sub keeps nothing); use md:trade:* streams for completeness.
"""

from __future__ import annotations

import logging
from decimal import Decimal
from typing import Any

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.crc import key_slot

from common.bus.client import node_address, node_client
from common.bus.core import REDIS_DOWN, Delivery
from common.bus.stage import Stage
from common.config import Settings
from common.errors import StoreUnavailable
from common.stores.cache import (
    PUT_ORDERBOOK_LUA,
    orderbook_key,
    orderbook_levels_json,
    price_json,
    price_key,
    recent_trades_hw_key,
    recent_trades_key,
    ticks_channel,
    trade_json,
)
from schemas import Candle, OrderBook, Ticker, Trade

log = logging.getLogger(__name__)

GROUP = "cache_publisher"
INPUT_PATTERNS = ("md:trade:*", "md:ticker:*", "md:candle:*", "md:book:*")

# Byte-wise comparison: Lua's `<` on strings uses strcoll, and redis-server sets LC_COLLATE from the
# environment, so a locale could reorder punctuation or letters.
_LUA_CMP = """
local function bytes_gt(a, b)
  if a == b then return false end
  local n = math.min(#a, #b)
  for i = 1, n do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x > y end
  end
  return #a > #b
end
"""

# KEYS[1] price key; ARGV[1] ts_event (decimal digits), ARGV[2] JSON, ARGV[3] TTL s. Returns 1 if written.
SET_PRICE_LUA = _LUA_CMP + """
local cur = redis.call('GET', KEYS[1])
if cur then
  local cts = string.match(cur, '"ts":%s*(%d+)')
  local nts = ARGV[1]
  if cts and (#cts > #nts or (#cts == #nts and bytes_gt(cts, nts))) then
    return 0
  end
end
redis.call('SET', KEYS[1], ARGV[2], 'EX', tonumber(ARGV[3]))
return 1
"""

# KEYS[1] list, KEYS[2] high-water key; ARGV[1] max length, then pairs (order key, JSON) in ascending order.
# Returns the number of trades pushed.
PUSH_TRADES_LUA = _LUA_CMP + """
local maxlen = tonumber(ARGV[1])
local hw = redis.call('GET', KEYS[2])
local pushed = 0
for i = 2, #ARGV, 2 do
  local key, json = ARGV[i], ARGV[i + 1]
  local push = false
  if not hw or bytes_gt(key, hw) then
    push = true
    hw = key
  elseif string.sub(key, 1, 20) == string.sub(hw, 1, 20) then
    push = not redis.call('LPOS', KEYS[1], json, 'MAXLEN', maxlen)
  end
  if push then
    redis.call('LPUSH', KEYS[1], json)
    pushed = pushed + 1
  end
end
if pushed > 0 then
  redis.call('LTRIM', KEYS[1], 0, maxlen - 1)
  redis.call('SET', KEYS[2], hw)
end
return pushed
"""


def order_key(t: Trade) -> str:
    tid = t.trade_id.zfill(20) if t.trade_id.isdigit() else t.trade_id
    return f"{t.ts_event:020d}|{tid}"


def price_of(event: Trade | Ticker | Candle) -> tuple[Decimal, str] | None:
    if isinstance(event, Trade):
        return (event.price, "trade") if event.price is not None else None
    if isinstance(event, Ticker):
        return (event.last, "ticker") if event.last is not None else None
    return (event.close, "candle") if event.close is not None else None


def book_sequence(book: OrderBook) -> int:
    """What orders a market's snapshots: the exchange's update id, else the exchange time."""
    return book.sequence if book.sequence is not None else book.ts_event


class CachePublisher(Stage):
    name = "cache_publisher"
    group = GROUP
    inputs = INPUT_PATTERNS
    partitioned = True  # with P > 1: one instance at a time per market (the module's docstring)
    # On a cluster each script's keys are one slot (a market's price; its recent trades and their high-water
    # mark, `recent_trades_hw_key`), and a batch's writes go in a plain pipeline: they are idempotent and
    # forward-only, so the MULTI that keeps a batch together on one node is not needed for them.
    cluster_ready = True
    bus_counters = ("delivered", "acked", "dead_lettered", "failures", "store_retries")

    def __init__(self, settings: Settings, instance: str | None = None) -> None:
        super().__init__(settings, instance)
        self.set_price = self.redis.register_script(SET_PRICE_LUA)
        self.push_trades = self.redis.register_script(PUSH_TRADES_LUA)
        self.put_book = self.redis.register_script(PUT_ORDERBOOK_LUA)
        self.cluster = settings.bus.cluster
        self.tickers: dict[tuple[str, int], aioredis.Redis] = {}  # on a cluster: master address -> its client

    async def close(self) -> None:
        for client in self.tickers.values():
            await client.aclose()
        await super().close()

    def ticker(self, key: str) -> aioredis.Redis:
        """On a cluster, a client of the master serving `key`'s slot, the batch's partition's (one per master,
        kept): a cluster pipeline refuses PUBLISH (no key), and Redis Cluster carries a PUBLISH from any node to
        the subscribers of every node. The partition's own master, so that while another master is down this
        partition's ticks still go out with its writes."""
        address = node_address(self.redis, key_slot(key.encode()))
        client = self.tickers.get(address)
        if client is None:
            client = self.tickers[address] = node_client(self.redis, *address)
        return client

    async def _run(self, pipe: Any, script: AsyncScript, keys: list[str], args: list[Any]) -> None:
        """Queue `script` in `pipe`: by its SHA on one node (loaded at the pipeline's execution if need be), by its
        text on a cluster (a master restarted without its script cache would refuse the SHA)."""
        if self.cluster:
            pipe.eval(script.script, len(keys), *keys, *args)
        else:
            await script(keys=keys, args=args, client=pipe)

    async def handle(self, batch: list[Delivery]) -> None:
        cache = self.settings.cache
        prices: dict[str, tuple[int, bytes]] = {}  # key -> newest (ts, JSON) of the batch
        trades: dict[tuple[str, str], list[tuple[str, bytes]]] = {}
        ticks: list[tuple[str, bytes]] = []
        books: dict[str, OrderBook] = {}  # key -> newest snapshot of the batch
        for delivery in batch:
            for event in delivery.events:
                self.count["events_in"] += 1
                if isinstance(event, OrderBook):
                    key = orderbook_key(event.exchange, event.symbol)
                    if key not in books or book_sequence(event) >= book_sequence(books[key]):
                        books[key] = event
                    continue
                if not isinstance(event, (Trade, Ticker, Candle)):
                    self.count["ignored"] += 1
                    continue
                found = price_of(event)
                if found is not None:
                    key = price_key(event.exchange, event.symbol)
                    current = prices.get(key)
                    if current is None or event.ts_event >= current[0]:
                        prices[key] = (event.ts_event, price_json(found[0], event.ts_event, found[1]))
                if isinstance(event, Trade):
                    body = trade_json(event)
                    trades.setdefault((event.exchange, event.symbol), []).append((order_key(event), body))
                    ticks.append((ticks_channel(event.symbol), body))
        if not prices and not trades and not books:
            return
        pipe = self.redis.pipeline(transaction=not self.cluster)
        for key, (ts, body) in prices.items():
            await self._run(pipe, self.set_price, [key], [str(ts), body, cache.price_ttl_s])
        for (exchange, symbol), items in trades.items():
            items.sort(key=lambda kb: kb[0])
            args: list[str | bytes | int] = [cache.recent_trades]
            for k, body in items[-cache.recent_trades:]:
                args += [k, body]
            keys = [recent_trades_key(exchange, symbol), recent_trades_hw_key(exchange, symbol, self.cluster)]
            await self._run(pipe, self.push_trades, keys, args)
        for key, book in books.items():
            depth = cache.orderbook_depth
            await self._run(pipe, self.put_book, [key], [book_sequence(book), orderbook_levels_json(book.bids[:depth]),
                                                         orderbook_levels_json(book.asks[:depth]), book.ts_event,
                                                         cache.orderbook_ttl_s])
        # A cluster's pipeline refuses PUBLISH (no key): the ticks go through a client of the partition's master,
        # after the writes, and Redis Cluster carries them to the subscribers of every node.
        ticker = self.ticker(recent_trades_key(*next(iter(trades)))).pipeline(transaction=False) \
            if self.cluster and ticks else pipe
        for channel, body in ticks:
            ticker.publish(channel, body)
        try:
            results = await pipe.execute()
            if ticker is not pipe and ticks:
                await ticker.execute()
        except REDIS_DOWN as exc:
            raise StoreUnavailable(f"redis (cache): {exc}") from exc
        written = sum(int(r) for r in results[:len(prices)])
        pushed = sum(int(r) for r in results[len(prices):len(prices) + len(trades)])
        listed = sum(min(len(v), cache.recent_trades) for v in trades.values())
        self.count["prices_written"] += written
        self.count["prices_stale"] += len(prices) - written
        self.count["trades_listed"] += pushed
        self.count["trades_not_listed"] += listed - pushed
        self.count["ticks_published"] += len(ticks)
        first_book = len(prices) + len(trades)
        books_written = sum(int(r) for r in results[first_book:first_book + len(books)])
        self.count["books_written"] += books_written
        self.count["books_stale"] += len(books) - books_written
