"""ccxt structures -> our events (schemas/events.py), as received: the validator judges them, the normalizer
makes them canonical. Numbers become exact Decimals (ccxt parses the exchange's text into floats; the shortest
repr of such a float restores the text), times integer nanoseconds. Trades and candles are built by
common.exchanges.events, which gap_repair shares; the other channels are the collector's alone."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from common.domain.timeframe import MS
from common.exchanges.events import dec
from schemas import FundingRate, Market, OpenInterest, OrderBook, Ticker


def ms_to_ns(ms: Any, default: int) -> int:
    """An exchange time in ms as ns; `default` (usually the receipt time) when the exchange gives none."""
    return int(ms) * MS if ms is not None else default


def market_event(exchange: str, m: dict[str, Any], ts: int) -> Market:
    precision = m.get("precision") or {}
    return Market(exchange=exchange, symbol=m["symbol"], exchange_symbol=str(m.get("id") or ""),
                  base=str(m.get("base") or ""), quote=str(m.get("quote") or ""),
                  market_type=str(m.get("type") or ""), active=m.get("active"),
                  contract_size=dec(m.get("contractSize")), price_precision=dec(precision.get("price")),
                  amount_precision=dec(precision.get("amount")), ts_event=ts, ts_recv=ts)


def ticker_event(exchange: str, symbol: str, t: dict[str, Any], ts_recv: int) -> Ticker:
    """Best bid/ask (with sizes) and last. Binance's bookTicker carries no time on spot: receipt time then."""
    return Ticker(exchange=exchange, symbol=symbol, bid=dec(t.get("bid")), ask=dec(t.get("ask")),
                  last=dec(t.get("last")), bid_size=dec(t.get("bidVolume")), ask_size=dec(t.get("askVolume")),
                  ts_event=ms_to_ns(t.get("timestamp"), ts_recv), ts_recv=ts_recv)


def _levels(side: Any, depth: int) -> tuple[tuple[Decimal, Decimal], ...]:
    out = []
    for level in side[:depth]:
        price, amount = dec(level[0]), dec(level[1])
        if price is not None and amount is not None:
            out.append((price, amount))
    return tuple(out)


def book_event(exchange: str, symbol: str, ob: Any, depth: int, ts_recv: int) -> OrderBook:
    """The top `depth` levels of ccxt's order book (kept sorted best first by ccxt), with its nonce."""
    nonce = ob.get("nonce")
    return OrderBook(exchange=exchange, symbol=symbol, bids=_levels(ob["bids"], depth),
                     asks=_levels(ob["asks"], depth), depth=depth,
                     sequence=int(nonce) if nonce is not None else None,
                     ts_event=ms_to_ns(ob.get("timestamp"), ts_recv), ts_recv=ts_recv)


def crossed(book: OrderBook) -> bool:
    """Best bid >= best ask: a book that must never be published (it was built wrongly)."""
    return bool(book.bids and book.asks and book.bids[0][0] >= book.asks[0][0])


def funding_from_mark_price(exchange: str, symbol: str, t: dict[str, Any], ts_recv: int) -> FundingRate:
    """Binance USD-M markPrice stream, as ccxt.pro's watch_mark_price returns it: mark and index price parsed,
    funding rate (`r`) and next funding time (`T`) left in `info`."""
    info = t.get("info") or {}
    next_ms: Any = info.get("T")
    return FundingRate(exchange=exchange, symbol=symbol, funding_rate=dec(info.get("r")),
                       mark_price=dec(t.get("markPrice")), index_price=dec(t.get("indexPrice")),
                       next_funding_time=int(next_ms) * MS if next_ms not in (None, 0, "0") else None,
                       ts_event=ms_to_ns(t.get("timestamp"), ts_recv), ts_recv=ts_recv)


def funding_from_asset_context(exchange: str, symbol: str, t: dict[str, Any], ts_recv: int) -> FundingRate:
    """Hyperliquid activeAssetCtx (ccxt.pro watch_ticker's `info`): funding, markPx, oraclePx (its index).
    Hyperliquid funds hourly, on the hour."""
    info = t.get("info") or {}
    hour_ns = 3_600 * 1_000_000_000
    return FundingRate(exchange=exchange, symbol=symbol, funding_rate=dec(info.get("funding")),
                       mark_price=dec(info.get("markPx")), index_price=dec(info.get("oraclePx")),
                       next_funding_time=(ts_recv // hour_ns + 1) * hour_ns,
                       ts_event=ms_to_ns(t.get("timestamp"), ts_recv), ts_recv=ts_recv)


def funding_from_rest(exchange: str, symbol: str, f: dict[str, Any], ts_recv: int) -> FundingRate:
    """ccxt's unified fetch_funding_rate structure."""
    return FundingRate(exchange=exchange, symbol=symbol, funding_rate=dec(f.get("fundingRate")),
                       mark_price=dec(f.get("markPrice")), index_price=dec(f.get("indexPrice")),
                       next_funding_time=ms_to_ns(f.get("fundingTimestamp"), 0) or None,
                       ts_event=ms_to_ns(f.get("timestamp"), ts_recv), ts_recv=ts_recv)


def open_interest_from_asset_context(exchange: str, symbol: str, t: dict[str, Any], ts_recv: int) -> OpenInterest:
    info = t.get("info") or {}
    return OpenInterest(exchange=exchange, symbol=symbol, amount=dec(info.get("openInterest")), value=None,
                        ts_event=ms_to_ns(t.get("timestamp"), ts_recv), ts_recv=ts_recv)


def open_interest_from_rest(exchange: str, symbol: str, oi: dict[str, Any], ts_recv: int) -> OpenInterest:
    """ccxt's unified fetch_open_interest structure (contracts in `openInterestAmount`)."""
    return OpenInterest(exchange=exchange, symbol=symbol, amount=dec(oi.get("openInterestAmount")),
                        value=dec(oi.get("openInterestValue")),
                        ts_event=ms_to_ns(oi.get("timestamp"), ts_recv), ts_recv=ts_recv)
