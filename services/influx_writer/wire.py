"""The influx writer's view of the bus: trades and candles decoded with their decimals left as text.

Why: the writer only turns numbers back into text (line protocol). Decoding "61837.63" into a Decimal and
formatting it again costs about as much as everything else the writer does per point (docs/bench-storage.md),
and on a 2-core machine every microsecond the writer spends is taken from InfluxDB. The text on the wire is
exactly what `str(Decimal)` gives (msgspec encodes a Decimal as its str), so the lines are byte for byte those
of `encode_trades` / `encode_candles` on the decoded events.

The views declare only the fields the writer uses; fields added to the schema later are ignored (msgspec
drops unknown fields), and every other event type is decoded as the schema defines it, so an entry decodes
here exactly when it decodes with `schemas.Codec`. A decimal that is not a number reaches InfluxDB as it is
and is refused there, as before (the validator rejects such events first).
"""

from __future__ import annotations

import typing
from typing import Literal

import msgspec

from schemas import Candle, Codec, Trade
from schemas.events import Event


# gc=False: these hold only str, int and tuples of str, so they can never be part of a reference cycle; the
# writer holds hundreds of thousands of them at once and the cycle collector need not scan them.
class TradeText(msgspec.Struct, tag="trade", frozen=True, kw_only=True, gc=False):
    exchange: str
    symbol: str
    trade_id: str
    price: str | None
    amount: str | None
    side: Literal["buy", "sell"] | None
    ts_event: int
    quality: tuple[str, ...] = ()


class CandleText(msgspec.Struct, tag="candle", frozen=True, kw_only=True, gc=False):
    exchange: str
    symbol: str
    timeframe: str
    open_time: int
    open: str | None
    high: str | None
    low: str | None
    close: str | None
    volume: str | None
    closed: bool
    quality: tuple[str, ...] = ()


_OTHERS = tuple(t for t in typing.get_args(Event) if t not in (Trade, Candle))
WireEvent = typing.Union[(TradeText, CandleText, *_OTHERS)]  # type: ignore[valid-type]


class WireCodec(Codec):
    """`schemas.Codec` whose decode yields TradeText / CandleText for trades and candles."""

    def __init__(self) -> None:
        super().__init__()
        self._decoder = msgspec.msgpack.Decoder(list[WireEvent])
