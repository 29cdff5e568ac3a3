"""What each exchange we collect from offers and costs: one table, read by the rate budget, the backfill planner,
the collector and the gap repair.

| exchange    | REST weight / min   | candles per request, history         | trades by id (REST) | collector specifics          |
|-------------|---------------------|--------------------------------------|---------------------|------------------------------|
| binance     | 6000 (header)       | 1000, since listing                  | historicalTrades    | depth snapshot 5..250 weight |
| binanceus   | ccxt's rateLimit    | 1000, since listing                  | historicalTrades    |                              |
| binanceusdm | 2400 (header)       | 1000 (weight 5), since listing       | historicalTrades    | depth snapshot 2..20 weight  |
| coinbase    | 600 (10 requests/s) | 300, sparse                          | no                  | numbered messages, checked   |
| hyperliquid | 1200                | 5000, only the latest 5,000, sparse  | no                  | activeAssetCtx: ticker, funding, open interest |

Sources: docs/backfill.md ("Per exchange") and FACTS.md. An exchange not in the table gets `venue()`'s default:
ccxt's own rateLimit for the budget, 500 candles per request and no known history cap, nothing by id.
Which channels an exchange serves is read from ccxt's `exchange.has` at start (services/collector/feeds.py);
this table holds only what ccxt does not say.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DEFAULT_HISTORY", "VENUES", "ExchangeHistory", "ExchangeLimit", "TradeHistoryApi", "Venue", "venue"]


@dataclass(frozen=True, slots=True)
class ExchangeLimit:
    """What an exchange allows one IP: `weight` per `window_s` (a clock-aligned fixed window), what one
    OHLCV page and one market-catalog load cost, and the header in which the server reports its count."""

    weight: int
    window_s: float
    ohlcv_weight: int
    markets_weight: int
    used_weight_header: str | None = None
    source: str = ""


@dataclass(frozen=True, slots=True)
class ExchangeHistory:
    """How an exchange serves historical candles over REST."""

    page_limit: int  # candles per request at most
    depth_candles: int | None = None  # only the latest N candles per timeframe exist (None: no cap)
    sparse: bool = False  # no candle for an interval without trades
    # One answer holds every candle of the page's time range (the request is a start..end range of at most
    # page_limit slots): no confirming request after the last candle returned (common/history/rest.py).
    whole_range: bool = False
    note: str = ""


@dataclass(frozen=True, slots=True)
class TradeHistoryApi:
    """Where an exchange serves trades by id (fromId) and by time, and what each request weighs."""

    base: str  # key of ccxt's urls["api"] that historicalTrades hangs off
    agg_method: str  # ccxt's fetchTradesMethod for aggregate trades by time
    historical_weight: int
    agg_weight: int


@dataclass(frozen=True, slots=True)
class Venue:
    """The facts of one exchange that ccxt does not give us."""

    id: str
    history: ExchangeHistory
    limit: ExchangeLimit | None = None  # the REST budget; None: ccxt's rateLimit (ratelimit.limit_for)
    # REST serves trades by id (fromId) and the ids count up by one: how gap_repair fetches them.
    trades_by_id: TradeHistoryApi | None = None
    # The depth snapshot ccxt.pro fetches to build a book: (up to this many levels, request weight), ascending;
    # a larger snapshot weighs the last weight, and an exchange with no table weighs 1.
    book_snapshot_weights: tuple[tuple[int, int], ...] = ()
    book_snapshot_option: str = ""  # the ccxt option that sets that snapshot's size ("" none)
    # Ticker, funding and open interest arrive together in one message per symbol (Hyperliquid activeAssetCtx,
    # through watch_ticker): one feed serves them.
    asset_context: bool = False
    # Every WebSocket message of a connection carries a number, +1 each (Coinbase `sequence_num`), which ccxt.pro
    # does not check: the collector does.
    numbered_messages: bool = False

    def book_snapshot_weight(self, limit: int) -> int:
        """Request weight of a REST depth snapshot of `limit` levels (the exchange's published table)."""
        for most, weight in self.book_snapshot_weights:
            if limit <= most:
                return weight
        return self.book_snapshot_weights[-1][1] if self.book_snapshot_weights else 1


_FULL = "full history since listing, 1000 candles per request"
_BINANCE_SPOT_TRADES = TradeHistoryApi("public", "publicGetAggTrades", 25, 4)

# Published limits (docs/backfill.md has the sources). Binance spot: REQUEST_WEIGHT 6000/min since 2023-08;
# GET /api/v3/klines weight 2 at any limit (ccxt's own table: cost 0.4 at 0.2 per weight unit); exchangeInfo 20;
# GET /api/v3/depth 5 up to 100 levels, 25 to 500, 50 to 1000, 250 to 5000. Binance USD-M: REQUEST_WEIGHT
# 2400/min; GET /fapi/v1/klines weight 5 at limit 500..1000; exchangeInfo 1; GET /fapi/v1/depth 2 up to 50,
# 5 to 100, 10 to 500, 20 to 1000. USD-M's historicalTrades wants an API key on the live exchange
# (MARKET_DATA): without one it answers an error, and the gap becomes a `gap.unrepaired` alert naming it.
# Coinbase Advanced Trade public REST: 10 requests/s per IP. Hyperliquid: 1200 weight/min per IP;
# /info candleSnapshot costs 20 plus more for long answers (we charge 20 + 5000/60 ~ 104 rounded up).
VENUES: dict[str, Venue] = {v.id: v for v in (
    Venue("binance", ExchangeHistory(1000, note=_FULL),
          ExchangeLimit(6000, 60.0, 2, 20, "x-mbx-used-weight-1m", "Binance spot REQUEST_WEIGHT"),
          trades_by_id=_BINANCE_SPOT_TRADES,
          book_snapshot_weights=((100, 5), (500, 25), (1000, 50), (5000, 250)),
          book_snapshot_option="watchOrderBookLimit"),
    Venue("binanceus", ExchangeHistory(1000, note=_FULL), trades_by_id=_BINANCE_SPOT_TRADES),
    Venue("binanceusdm", ExchangeHistory(1000, note=f"{_FULL} (weight 5)"),
          ExchangeLimit(2400, 60.0, 5, 1, "x-mbx-used-weight-1m", "Binance USD-M REQUEST_WEIGHT"),
          trades_by_id=TradeHistoryApi("fapiPublic", "fapiPublicGetAggTrades", 20, 20),
          book_snapshot_weights=((50, 2), (100, 5), (500, 10), (1000, 20)),
          book_snapshot_option="watchOrderBookLimit"),
    Venue("coinbase", ExchangeHistory(300, sparse=True, whole_range=True,
                                      note="300 candles per request; no candle for intervals without trades"),
          ExchangeLimit(600, 60.0, 1, 4, None, "Coinbase public REST 10 requests/s"),
          numbered_messages=True),
    Venue("hyperliquid", ExchangeHistory(5000, depth_candles=5000, sparse=True, whole_range=True,
                                         note="keeps only the latest 5,000 candles per timeframe"),
          ExchangeLimit(1200, 60.0, 104, 20, None, "Hyperliquid 1200 weight/min per IP"),
          asset_context=True),
)}
DEFAULT_HISTORY = ExchangeHistory(500, note="history depth unknown; 500 candles per request")


def venue(exchange_id: str) -> Venue:
    """The facts of `exchange_id`; for an exchange not in the table, the defaults (see the module docstring)."""
    return VENUES.get(exchange_id) or Venue(exchange_id, DEFAULT_HISTORY)
