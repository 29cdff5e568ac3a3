"""Binance trade frames -> `schemas.Trade`, without ccxt (the collector's decode fast path, docs/collector.md).

Spot (`<symbol>@trade`), USD-M and COIN-M send one trade per frame, in the same shape: raw on a `/ws` connection
(what ccxt.pro opens: `{"e":"trade","E":..,"s":"BTCUSDT","t":..,"p":"..","q":"..","T":..,"m":..}`, USD-M adds
`X`), or wrapped in the combined-stream envelope on `/stream` (`{"stream":"btcusdt@trade","data":{..}}`, the form
the recordings in data/real/ws-captures hold). One msgspec decoder per form, built once.

The event is exactly the one ccxt's path makes (ccxt.pro binance `parse_ws_trade`, then
common/exchanges/events.py `trade_event`); tests/test_fast_path_trades.py compares both on every recorded trade:
- `trade_id`: the decimal text of `t`;
- `price`, `amount`: ccxt parses `p`, `q` into floats and `trade_event` restores the text from the shortest repr
  (`dec`), so the same happens here: `"61837.63000000"` -> `Decimal("61837.63")`, `"0.00001000"` -> `Decimal("1E-5")`;
- `side`: the taker's, `m` (the buyer is the maker) -> "sell", else "buy";
- `ts_event`: `T` (trade time, ms) in ns; `symbol`: the unified symbol, which the caller resolves (ccxt's market).
A frame that is not such a trade (another stream, a subscription reply, a frame cut short, a field missing or of
another type) decodes to None: the caller hands it to ccxt, which treats it as it always did.
"""

from __future__ import annotations

import msgspec

from common.domain.timeframe import MS
from common.exchanges.events import dec
from common.exchanges.wire import decode_binance
from schemas import Trade

# Binance writes the event type first: found in a frame's first bytes (the envelope's stream name comes before it).
MARK = '"e":"trade"'
MARK_WITHIN = 96


class BinanceTrade(msgspec.Struct, tag_field="e", tag="trade"):
    """The fields of a Binance trade payload the event needs (the others are ignored)."""

    s: str  # exchange symbol, "BTCUSDT"
    t: int  # trade id
    p: float  # price, sent as text; parsed as ccxt parses it (a float)
    q: float  # quantity, likewise
    T: int  # trade time, ms (Binance names it T)
    m: bool  # the buyer is the maker


class CombinedTrade(msgspec.Struct):
    """The combined-stream envelope of /stream connections; `stream` itself is not needed."""

    data: BinanceTrade


# strict=False: "61837.63000000" (JSON text) decodes into a float field, as ccxt's parse turns it into one.
_RAW = msgspec.json.Decoder(BinanceTrade, strict=False)
_COMBINED = msgspec.json.Decoder(CombinedTrade, strict=False)


def is_trade_frame(frame: object) -> bool:
    """Whether a frame (text) looks like a Binance trade, raw or enveloped: the cheap test before decoding."""
    return type(frame) is str and frame.find(MARK, 0, MARK_WITHIN) >= 0


def decode(frame: str) -> BinanceTrade | None:
    """The trade a text frame carries, or None when it is not a well-formed Binance trade frame."""
    found: BinanceTrade | None = decode_binance(frame, _RAW, _COMBINED)
    return found


def to_trade(exchange: str, symbol: str, raw: BinanceTrade, ts_recv: int) -> Trade:
    """The event of a decoded trade of unified `symbol`, received at `ts_recv` (ns)."""
    return Trade(exchange=exchange, symbol=symbol, trade_id=str(raw.t), price=dec(raw.p), amount=dec(raw.q),
                 side="sell" if raw.m else "buy", ts_event=raw.T * MS, ts_recv=ts_recv)


__all__ = ["MARK", "BinanceTrade", "CombinedTrade", "decode", "is_trade_frame", "to_trade"]
