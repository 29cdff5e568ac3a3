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

from common.stores.influx import NS_PER_MS, TRADES, TradeFields, encode_trades, series_key
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
    ts_recv: int = 0  # for the writer's ts_recv -> stored latency
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


# -- the trade hot path -------------------------------------------------------------------------------------

_OFFSET_DIGITS = 6  # a numeric trade id's offset inside its millisecond is its last 6 digits (id % NS_PER_MS)
assert NS_PER_MS == 10 ** _OFFSET_DIGITS
_heads: dict[tuple[str, str], str] = {}  # (exchange, symbol) -> "trades,exchange=..,symbol=.. price="
_HEADS_MAX = 100_000


def _head(exchange: str, symbol: str) -> str:
    if len(_heads) >= _HEADS_MAX:
        _heads.clear()
    head = _heads[(exchange, symbol)] = series_key(TRADES, (("exchange", exchange), ("symbol", symbol))) + " price="
    return head


def encode_trade_lines(trades: typing.Iterable[TradeFields], not_before: int | None = None) -> list[str]:
    """The lines `common.stores.influx.encode_trades(trades, not_before=not_before)` gives, byte for byte, in about
    three quarters of its CPU (docs/bench-storage.md): the encoding is the largest part of the writer's work
    per point, and on a 2-core machine that CPU is taken from InfluxDB.

    The usual trade (a numeric id of 6 digits or more, no quality flags, a positive timestamp) gets its
    timestamp as text: `trade_timestamp` is the millisecond floor of ts_event plus id % 1,000,000, and
    for such an id that sum is written as ts_event // 1,000,000 followed by the id's last 6 digits. Every
    other trade (no price or amount, other ids, flags) goes through `encode_trades` itself."""
    lines: list[str] = []
    append = lines.append
    heads = _heads
    oldest = -(1 << 63) if not_before is None else not_before
    exchange = symbol = None
    head = ""
    for t in trades:
        ts = t.ts_event
        if ts < oldest:
            continue
        price = t.price
        amount = t.amount
        tid = t.trade_id
        if price is None or amount is None or t.quality or ts < NS_PER_MS or len(tid) < _OFFSET_DIGITS \
                or not (tid.isascii() and tid.isdigit()):
            encode_trades((t,), lines)
            continue
        if t.exchange != exchange or t.symbol != symbol:
            exchange, symbol = t.exchange, t.symbol
            head = heads.get((exchange, symbol)) or _head(exchange, symbol)
        side = t.side
        if side is None:
            append(f'{head}{price},amount={amount},trade_id="{tid}" {ts // NS_PER_MS}{tid[-6:]}')
        else:
            append(f'{head}{price},amount={amount},side="{side}",trade_id="{tid}" {ts // NS_PER_MS}{tid[-6:]}')
    return lines
