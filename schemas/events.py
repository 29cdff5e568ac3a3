"""The message contract of the pipeline: one msgspec Struct per event, in one tagged union.

Rules for evolving it (see README "Schemas"):
- Tags are explicit and stable; renaming a class never changes the wire format.
- A new field gets a default, is appended at the end, and old consumers ignore it.
- A field's type is never changed and a field is never removed; a breaking change is a new tag,
  and both tags stay in `Event` until every consumer has moved.

Prices and amounts are `Decimal` so they stay exact to the exchange's precision; on the wire
(msgpack) they travel as decimal strings. Timestamps are integer nanoseconds since the epoch, UTC:
`ts_event` is the exchange's time, `ts_recv` the collector's receipt time.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Literal

import msgspec

Side = Literal["buy", "sell"]
Severity = Literal["info", "warning", "error", "critical"]


class Trade(msgspec.Struct, tag="trade", frozen=True, kw_only=True):
    exchange: str
    symbol: str
    trade_id: str
    price: Decimal | None
    amount: Decimal | None
    side: Side | None
    ts_event: int
    ts_recv: int
    # Names of the quality rules whose policy is "store with a flag" that this trade tripped.
    quality: tuple[str, ...] = ()


class Candle(msgspec.Struct, tag="candle", frozen=True, kw_only=True):
    """An OHLCV bar. `open_time` is the bar's start (ns). `closed` is False while the bar still updates.

    OHLCV fields may be None only before validation (ccxt yields rows of None for a malformed body);
    the validator rejects such candles, so everything after it carries numbers.
    """

    exchange: str
    symbol: str
    timeframe: str
    open_time: int
    open: Decimal | None
    high: Decimal | None
    low: Decimal | None
    close: Decimal | None
    volume: Decimal | None
    closed: bool
    ts_event: int
    ts_recv: int
    source: Literal["ws", "rest", "archive", "aggregate"] = "ws"
    # Names of the quality rules whose policy is "store with a flag" that this candle tripped.
    quality: tuple[str, ...] = ()


class Ticker(msgspec.Struct, tag="ticker", frozen=True, kw_only=True):
    exchange: str
    symbol: str
    bid: Decimal | None
    ask: Decimal | None
    last: Decimal | None
    bid_size: Decimal | None = None
    ask_size: Decimal | None = None
    ts_event: int
    ts_recv: int


class Market(msgspec.Struct, tag="market", frozen=True, kw_only=True):
    """One entry of an exchange's market catalog, as ccxt's load_markets reports it."""

    exchange: str
    symbol: str
    exchange_symbol: str
    base: str
    quote: str
    market_type: str
    active: bool | None
    contract_size: Decimal | None
    price_precision: Decimal | None
    amount_precision: Decimal | None
    ts_event: int
    ts_recv: int


class Alert(msgspec.Struct, tag="alert", frozen=True, kw_only=True):
    """A data-quality or pipeline alert: what (rule), where (exchange, symbol, kind, source), why (reason),
    and the offending values as text."""

    rule: str
    severity: Severity
    source: str
    exchange: str
    symbol: str
    kind: str
    reason: str
    values: dict[str, str | None]
    ts_event: int
    ts_recv: int


class Gap(msgspec.Struct, tag="gap", frozen=True, kw_only=True):
    """An explicit hole in a feed: no data of `channel` for (exchange, symbol) from `start` to `end` (ns, end
    exclusive), e.g. while a socket was down. A repairer answers it with the missing data or an Alert."""

    exchange: str
    symbol: str
    channel: str
    start: int
    end: int
    reason: str
    ts_event: int
    ts_recv: int
    # Trades on exchanges that number them one by one: the first and last missing trade id, inclusive ("" when
    # unknown). Producers also write them into `reason` as "trade ids A..B missing" for readers of the text.
    first_missing_id: str = ""
    last_missing_id: str = ""


class Heartbeat(msgspec.Struct, tag="heartbeat", frozen=True, kw_only=True):
    """A service saying it is alive, with its counters since start."""

    service: str
    instance: str
    pid: int
    started_at: int
    counters: dict[str, int]
    state: Literal["starting", "running", "degraded", "standby", "stopping"]  # standby: waits for a stage lease
    detail: str
    ts_event: int
    ts_recv: int


class StrategyInfo(msgspec.Struct, tag="strategy", frozen=True, kw_only=True):
    """A strategy saying who it is, on `strategy:{strategy}`; upserted into `strategies` by name.

    `ts_event` orders registrations: an older one (a late redelivery) never overwrites a newer one."""

    strategy: str
    description: str = ""
    params: dict[str, object] = msgspec.field(default_factory=dict)
    active: bool = True
    ts_event: int
    ts_recv: int


class Fill(msgspec.Struct, tag="fill", frozen=True, kw_only=True):
    """One fill of a strategy's order, keyed by (strategy, exchange, symbol, exchange_trade_id).

    `ts_event` is the exchange's fill time, `ts_recv` when the strategy published it. `fee` may be
    negative (a maker rebate); a non-zero fee needs its `fee_currency`."""

    strategy: str
    exchange: str
    symbol: str
    side: Side
    price: Decimal
    amount: Decimal
    fee: Decimal = Decimal(0)
    fee_currency: str | None = None
    exchange_trade_id: str
    order_id: str | None = None
    ts_event: int
    ts_recv: int


class PositionUpdate(msgspec.Struct, tag="position", frozen=True, kw_only=True):
    """A strategy's whole position in one market as of `ts_event` (signed quantity; negative is short).

    Updates of one (strategy, exchange, symbol) are ordered by `ts_event`, which must increase: the
    stored position only moves forward, and an update with the stored `ts_event` is a duplicate."""

    strategy: str
    exchange: str
    symbol: str
    quantity: Decimal
    avg_price: Decimal | None = None
    realized_pnl: Decimal = Decimal(0)
    ts_event: int
    ts_recv: int


class PerformanceMetric(msgspec.Struct, tag="metric", frozen=True, kw_only=True):
    """A strategy's metric (pnl, sharpe, ...) over `period` ending at `ts_event`.

    The same (strategy, metric, period, ts_event) may be recomputed while the period runs: the value
    computed last (the larger `ts_recv`) is kept."""

    strategy: str
    metric: str
    period: str = "all"
    value: Decimal
    ts_event: int
    ts_recv: int


BookLevel = tuple[Decimal, Decimal]  # (price, amount)


class OrderBook(msgspec.Struct, tag="book", frozen=True, kw_only=True):
    """A bounded-depth L2 snapshot of one market, never crossed (best bid < best ask), as built by the
    collector from the exchange's snapshot and diffs under the exchange's sequence rules.
    `bids` best (highest) first, `asks` best (lowest) first. `sequence` is the exchange's update id / nonce
    the book was built up to (Binance `u`/`lastUpdateId`, Coinbase `sequence_num`, Hyperliquid `time`);
    None when the exchange gives none. `depth` is the bound the collector was configured with."""

    exchange: str
    symbol: str
    bids: tuple[BookLevel, ...]
    asks: tuple[BookLevel, ...]
    depth: int
    sequence: int | None
    ts_event: int
    ts_recv: int
    quality: tuple[str, ...] = ()


class FundingRate(msgspec.Struct, tag="funding", frozen=True, kw_only=True):
    """Perpetuals: the current funding rate with the mark and index prices it was computed from."""

    exchange: str
    symbol: str
    funding_rate: Decimal | None
    mark_price: Decimal | None
    index_price: Decimal | None
    next_funding_time: int | None  # ns since epoch, None when the exchange does not say
    ts_event: int
    ts_recv: int
    quality: tuple[str, ...] = ()


class OpenInterest(msgspec.Struct, tag="open_interest", frozen=True, kw_only=True):
    """Perpetuals: open interest in contracts (`amount`) and, when the exchange gives it, in quote (`value`)."""

    exchange: str
    symbol: str
    amount: Decimal | None
    value: Decimal | None
    ts_event: int
    ts_recv: int
    quality: tuple[str, ...] = ()


MarketEvent = Trade | Candle | Ticker | OrderBook | FundingRate | OpenInterest
StrategyEvent = StrategyInfo | Fill | PositionUpdate | PerformanceMetric
Event = (Trade | Candle | Ticker | OrderBook | FundingRate | OpenInterest | Market | Alert | Gap | Heartbeat
         | StrategyInfo | Fill | PositionUpdate | PerformanceMetric)

KIND_OF: dict[type, str] = {
    Trade: "trade",
    Candle: "candle",
    Ticker: "ticker",
    OrderBook: "book",
    FundingRate: "funding",
    OpenInterest: "open_interest",
    Market: "market",
    Alert: "alert",
    Gap: "gap",
    Heartbeat: "heartbeat",
    StrategyInfo: "strategy",
    Fill: "fill",
    PositionUpdate: "position",
    PerformanceMetric: "metric",
}
