"""Test data built from the real recordings' shapes (TestDataStubs in NautilusTrader's spirit)."""

from __future__ import annotations

from decimal import Decimal

from schemas import Alert, Candle, Ticker, Trade

T0_NS = 1_723_161_255_342_000_000  # 2024-08-08 23:54:15.342 UTC, the first trade of the spot capture


def trade(i: int = 0, price: str = "61837.63", amount: str = "0.02", exchange: str = "binance",
          symbol: str = "BTC/USDT", ts: int | None = None) -> Trade:
    ts = T0_NS + i * 1_000_000 if ts is None else ts
    return Trade(exchange=exchange, symbol=symbol, trade_id=str(3735683259 + i), price=Decimal(price),
                 amount=Decimal(amount), side="sell", ts_event=ts, ts_recv=ts + 500_000)


def candle(i: int = 0, o: str = "61837.63", h: str = "61900.00", lo: str = "61800.00", c: str = "61850.10",
           v: str = "12.5", closed: bool = True, exchange: str = "binance", symbol: str = "BTC/USDT") -> Candle:
    open_time = 1_723_161_240_000_000_000 + i * 60_000_000_000
    return Candle(exchange=exchange, symbol=symbol, timeframe="1m", open_time=open_time,
                  open=Decimal(o), high=Decimal(h), low=Decimal(lo), close=Decimal(c), volume=Decimal(v),
                  closed=closed, ts_event=open_time + 59_999_000_000, ts_recv=open_time + 60_000_000_000)


def ticker(bid: str = "61837.63", ask: str = "61837.64", last: str = "61837.63") -> Ticker:
    return Ticker(exchange="binance", symbol="BTC/USDT", bid=Decimal(bid), ask=Decimal(ask), last=Decimal(last),
                  ts_event=T0_NS, ts_recv=T0_NS + 1)


def alert(rule: str = "ohlc.consistency") -> Alert:
    return Alert(rule=rule, severity="error", source="validator", exchange="binance", symbol="BTC/USDT",
                 kind="candle", reason="high below low", values={"high": "1", "low": "2"},
                 ts_event=T0_NS, ts_recv=T0_NS)
