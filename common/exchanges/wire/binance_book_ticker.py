"""Binance bookTicker frames -> `schemas.Ticker`, without ccxt (the collector's decode fast path, docs/collector.md).

Spot (`<symbol>@bookTicker`) and USD-M send one best bid/ask per frame: raw on a `/ws` connection (spot:
`{"u":..,"s":"BTCUSDT","b":"..","B":"..","a":"..","A":".."}`, no event type and no time; USD-M:
`{"e":"bookTicker","u":..,"s":..,"b":..,"B":..,"a":..,"A":..,"T":..,"E":..}`), or wrapped in the combined-stream
envelope on `/stream` (`{"stream":"btcusdt@bookTicker","data":{..}}`, the form the recordings in
data/real/ws-captures hold). One msgspec decoder per form, built once.

The event is exactly the one ccxt's path makes (ccxt.pro binance `handle_bids_asks` -> `parse_ws_ticker`, then
services/collector/events.py `ticker_event`); tests/test_fast_path_tickers.py compares both on every recorded
bookTicker:
- `bid`, `ask`, `bid_size`, `ask_size`: `b`, `a`, `B`, `A`, parsed into floats as ccxt does and restored to the
  exchange's text by the shortest repr (`dec`): `"61837.63000000"` -> `Decimal("61837.63")`; `last`: None;
- `ts_event`: `E` (event time, ms) in ns where the venue sends it (USD-M), else the receipt time (spot), as
  ccxt reads `E`; `symbol`: the unified symbol, which the caller resolves (ccxt's market).
A frame that is not such a ticker (another stream, a subscription reply, a field missing or of another type)
decodes to None: the caller hands it to ccxt, which treats it as it always did.
"""

from __future__ import annotations

import msgspec

from common.domain.timeframe import MS
from common.exchanges.events import dec
from common.exchanges.wire import ENVELOPE, decode_binance
from schemas import Ticker

RAW_SPOT = '{"u":'  # a spot bookTicker sent raw starts so (no event type)
MARK = '"e":"bookTicker"'  # USD-M's event type, first
STREAM = '@bookTicker"'  # the envelope's stream name
MARK_WITHIN = 64


class BinanceBookTicker(msgspec.Struct):
    """The fields of a Binance bookTicker payload the event needs (the others are ignored)."""

    u: int  # order book update id
    s: str  # exchange symbol, "BTCUSDT"
    b: float  # best bid price, sent as text; parsed as ccxt parses it (a float)
    B: float  # best bid quantity
    a: float  # best ask price
    A: float  # best ask quantity
    E: int | None = None  # event time, ms (USD-M; spot sends none)


class CombinedBookTicker(msgspec.Struct):
    """The combined-stream envelope of /stream connections; `stream` itself is not needed."""

    data: BinanceBookTicker


# strict=False: "61837.63000000" (JSON text) decodes into a float field, as ccxt's parse turns it into one.
_RAW = msgspec.json.Decoder(BinanceBookTicker, strict=False)
_COMBINED = msgspec.json.Decoder(CombinedBookTicker, strict=False)


def is_book_ticker_frame(frame: object) -> bool:
    """Whether a frame (text) looks like a Binance bookTicker, raw or enveloped: the cheap test before decoding."""
    if type(frame) is not str:
        return False
    if frame.startswith(ENVELOPE):
        return frame.find(STREAM, 0, MARK_WITHIN) >= 0
    return frame.startswith(RAW_SPOT) or frame.find(MARK, 0, MARK_WITHIN) >= 0


def decode(frame: str) -> BinanceBookTicker | None:
    """The bookTicker a text frame carries, or None when it is not a well-formed Binance bookTicker frame."""
    found: BinanceBookTicker | None = decode_binance(frame, _RAW, _COMBINED)
    return found


def to_ticker(exchange: str, symbol: str, raw: BinanceBookTicker, ts_recv: int) -> Ticker:
    """The event of a decoded bookTicker of unified `symbol`, received at `ts_recv` (ns)."""
    return Ticker(exchange=exchange, symbol=symbol, bid=dec(raw.b), ask=dec(raw.a), last=None,
                  bid_size=dec(raw.B), ask_size=dec(raw.A),
                  ts_event=raw.E * MS if raw.E is not None else ts_recv, ts_recv=ts_recv)


__all__ = ["BinanceBookTicker", "CombinedBookTicker", "decode", "is_book_ticker_frame", "to_ticker"]
