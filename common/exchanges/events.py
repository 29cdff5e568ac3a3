"""ccxt trade and OHLCV structures -> our events, as received (what the collector publishes on raw:{exchange}).

Here, in common/, because two services build them: the collector (live) and gap_repair (repaired data it
publishes into raw:{exchange} so that it flows through validator -> normalizer -> md:* like live data). A
service never imports a sibling service, so the builders of the events both publish live here. Numbers become
exact Decimals (ccxt parses the exchange's text into floats; the shortest repr of such a float restores the
text), times integer nanoseconds.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any, Literal

from common.domain.timeframe import MS, Timeframe
from schemas import Candle, Trade


def length_ms(timeframe: str) -> int:
    """A bar's fixed length in ms (0 for what has none: months, years, or a name that is no timeframe)."""
    tf = Timeframe.find(timeframe)
    ns = tf.ns if tf is not None else None
    return ns // MS if ns else 0


# Recent floats -> their Decimal: a trade stream repeats its prices and sizes, and Decimal(repr(x)) is most of
# building a trade event (0.6 of 1.7 us a trade on the Binance capture). Decimals are immutable, so sharing one
# is safe; 0.0 and -0.0 (equal keys, different reprs) are never cached. Cleared when full: bounded.
_DECIMALS: dict[float, Decimal] = {}
_DECIMALS_MAX = 4096


def dec(value: Any) -> Decimal | None:
    """Exact decimal of a ccxt number: floats via their shortest repr, which restores the exchange's text."""
    if value.__class__ is float:
        cached = _DECIMALS.get(value)
        if cached is None or not value:
            cached = Decimal(repr(value))
            if len(_DECIMALS) >= _DECIMALS_MAX:
                _DECIMALS.clear()
            _DECIMALS[value] = cached
        return cached
    if value is None:
        return None
    if isinstance(value, float):  # a float subclass (numpy.float64): not cached
        return Decimal(repr(value))
    try:
        return Decimal(str(value))
    except ArithmeticError:
        return None


def trade_event(exchange: str, symbol: str, t: dict[str, Any], ts_recv: int) -> Trade:
    """A ccxt trade (watch_trades, fetch_trades, parse_trades) as the collector publishes it."""
    ts = t.get("timestamp")
    side = t.get("side")
    return Trade(exchange=exchange, symbol=t.get("symbol") or symbol, trade_id=str(t.get("id") or ""),
                 price=dec(t.get("price")), amount=dec(t.get("amount")),
                 side=side if side == "buy" or side == "sell" else None,
                 ts_event=int(ts) * MS if ts is not None else 0, ts_recv=ts_recv)


def candle_event(exchange: str, symbol: str, timeframe: str, row: list[Any], closed: bool, ts_recv: int,
                 source: Literal["ws", "rest", "archive", "aggregate"]) -> Candle:
    """A ccxt OHLCV row as the collector publishes it (a closed candle's ts_event is its last millisecond)."""
    open_ms = row[0] if row and row[0] is not None else None
    values = [dec(v) for v in (list(row[1:6]) + [None] * 5)[:5]]
    open_time = int(open_ms) * MS if open_ms is not None else 0
    close_ms = (int(open_ms) + length_ms(timeframe) - 1) if open_ms is not None else 0
    return Candle(exchange=exchange, symbol=symbol, timeframe=timeframe, open_time=open_time,
                  open=values[0], high=values[1], low=values[2], close=values[3], volume=values[4],
                  closed=closed, ts_event=close_ms * MS if closed else ts_recv, ts_recv=ts_recv,
                  source=source)


__all__ = ["candle_event", "dec", "trade_event"]
