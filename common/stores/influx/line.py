"""Line protocol: how our schema's trades, candles, funding rates and open interest are written as InfluxDB points.

The hot path is one f-string per point, with series keys cached per (exchange, symbol[, timeframe]).
- candles: `ohlcv,exchange=..,symbol=..,timeframe=.. open=..,high=..,low=..,close=..,volume=..[,quality=".."]
  <open_time ns>`. Fields are floats written from the Decimal's exact text (`open=61837.63`); callers store
  closed candles only. InfluxDB keeps float64: a value round-trips exactly up to 15 significant digits.
- trades: `trades,exchange=..,symbol=.. price=..,amount=..,side="buy",trade_id="123"[,quality=".."] <ts>`,
  with the timestamp rule of `trade_timestamp` so that distinct trades never share a point and a redelivered
  trade overwrites itself.
- `quality`: the comma-joined names of the quality rules the event tripped (policy "store with a flag"),
  written only when there is at least one.
Tag values are escaped generically (backslash before space, comma, equals sign); an empty tag value is
omitted, as line protocol has no empty tags.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from decimal import Decimal
from typing import Protocol, TypeVar

from common.domain.timeframe import MS, NS
from schemas import Candle, FundingRate, OpenInterest, Trade

TRADES = "trades"
OHLCV = "ohlcv"
FUNDING = "funding"
OPEN_INTEREST = "open_interest"

NS_PER_MS = MS  # the names line protocol code reads
NS_PER_S = NS
_OFFSET_MOD = 1_000_000  # ns in a millisecond: the offset of a trade inside its millisecond

_TAG_ESCAPES = str.maketrans({" ": "\\ ", ",": "\\,", "=": "\\="})
_STR_ESCAPES = str.maketrans({'"': '\\"', "\\": "\\\\"})
_SERIES_CACHE_MAX = 100_000


def escape_tag(value: str) -> str:
    """A tag key or value for line protocol: a backslash before each space, comma and equals sign.

    InfluxDB 1.x unescapes exactly those three pairs and keeps any other backslash literally, so backslashes
    are left as they are (`a\\b` is stored as `a\\b`). A value ending in a backslash or holding a newline
    cannot be written in line protocol at all: ValueError."""
    if value.endswith("\\") or "\n" in value:
        raise ValueError(f"tag value {value!r} cannot be written in line protocol "
                         f"(it ends with a backslash or holds a newline)")
    return value.translate(_TAG_ESCAPES)


def escape_measurement(value: str) -> str:
    """A measurement name: a backslash before each space and comma."""
    if value.endswith("\\") or "\n" in value:
        raise ValueError(f"measurement {value!r} cannot be written in line protocol")
    return value.replace(" ", "\\ ").replace(",", "\\,")


def escape_string_field(value: str) -> str:
    """The inside of a double-quoted string field: backslash before `"` and `\\`."""
    return value.translate(_STR_ESCAPES)


def series_key(measurement: str, tags: Iterable[tuple[str, str]]) -> str:
    """`measurement,k=v,...` with escaped keys and values; tags with an empty value are omitted.
    Pass the tags sorted by key (InfluxDB's own order, cheapest for the server)."""
    parts = [escape_measurement(measurement)]
    parts.extend(f"{escape_tag(k)}={escape_tag(v)}" for k, v in tags if v)
    return ",".join(parts)


_trade_keys: dict[tuple[str, str], str] = {}
_candle_keys: dict[tuple[str, str, str], str] = {}
_Key = TypeVar("_Key", tuple[str, str], tuple[str, str, str])


def _cached_key(cache: dict[_Key, str], key: _Key, measurement: str, tags: Iterable[tuple[str, str]]) -> str:
    """The series key of a cache miss, remembered (the cache is emptied when it reaches _SERIES_CACHE_MAX)."""
    if len(cache) >= _SERIES_CACHE_MAX:
        cache.clear()
    found = cache[key] = series_key(measurement, tags)
    return found


def _trade_key(exchange: str, symbol: str) -> str:
    return _cached_key(_trade_keys, (exchange, symbol), TRADES, (("exchange", exchange), ("symbol", symbol)))


def _candle_key(exchange: str, symbol: str, timeframe: str) -> str:
    return _cached_key(_candle_keys, (exchange, symbol, timeframe), OHLCV,
                       (("exchange", exchange), ("symbol", symbol), ("timeframe", timeframe)))


def trade_id_offset(trade_id: str) -> int:
    """The trade's nanosecond offset inside its millisecond: `int(id) % 1_000_000` for a decimal id,
    else CRC-32 of the id's UTF-8 bytes `% 1_000_000` (stable across processes and versions)."""
    if trade_id.isdigit() and trade_id.isascii():
        return int(trade_id) % _OFFSET_MOD
    return zlib.crc32(trade_id.encode()) % _OFFSET_MOD


def trade_timestamp(ts_event: int, trade_id: str) -> int:
    """The point timestamp of a trade (ns): `ts_event` floored to its millisecond, plus `trade_id_offset`.

    Points with the same measurement, tags and timestamp overwrite each other in InfluxDB, and exchanges
    stamp trades in milliseconds, so many trades share a `ts_event`. The id-derived offset (0..999,999 ns)
    keeps them apart, while the point stays inside the trade's millisecond:
    - numeric ids (Binance, most exchanges): `id % 1_000_000`. Two trades collide only if their ids are a
      multiple of 1,000,000 apart in the same millisecond, which does not happen.
    - other ids (UUIDs, ...): `crc32(id) % 1_000_000`; two such trades of one symbol in one millisecond
      collide with probability 1e-6 per pair (about n*n/2e6 for n such trades in one millisecond), and the
      later write wins: a small, bounded loss only for exchanges with non-numeric ids.
    - the same trade delivered twice gets the same timestamp and overwrites itself: writes are idempotent.
    Sub-millisecond precision of `ts_event` is not kept in the timestamp; order inside a millisecond is the
    id order (for numeric ids within a block of 1,000,000).
    """
    return ts_event - ts_event % NS_PER_MS + trade_id_offset(trade_id)


class TradeFields(Protocol):
    """What encode_trades reads: a schemas.Trade, or a view with its decimals as text (the influx writer's)."""

    @property
    def exchange(self) -> str: ...
    @property
    def symbol(self) -> str: ...
    @property
    def trade_id(self) -> str: ...
    @property
    def price(self) -> Decimal | str | None: ...
    @property
    def amount(self) -> Decimal | str | None: ...
    @property
    def side(self) -> str | None: ...
    @property
    def ts_event(self) -> int: ...
    @property
    def quality(self) -> tuple[str, ...]: ...


class CandleFields(Protocol):
    """What encode_candles reads: a schemas.Candle, or a view with its decimals as text."""

    @property
    def exchange(self) -> str: ...
    @property
    def symbol(self) -> str: ...
    @property
    def timeframe(self) -> str: ...
    @property
    def open_time(self) -> int: ...
    @property
    def open(self) -> Decimal | str | None: ...
    @property
    def high(self) -> Decimal | str | None: ...
    @property
    def low(self) -> Decimal | str | None: ...
    @property
    def close(self) -> Decimal | str | None: ...
    @property
    def volume(self) -> Decimal | str | None: ...
    @property
    def quality(self) -> tuple[str, ...]: ...


def _quality(rules: tuple[str, ...]) -> str:
    """`,quality="a,b"` for an event that tripped flag-only quality rules, else ""."""
    return ',quality="' + escape_string_field(",".join(rules)) + '"' if rules else ""


def trade_line(t: Trade) -> str:
    """One trade as a line (the caller ensures price and amount are not None)."""
    return encode_trades((t,))[0]


def candle_line(c: Candle) -> str:
    """One candle as a line, timestamp = open_time (the caller ensures OHLCV are not None)."""
    return encode_candles((c,))[0]


def encode_trades(trades: Iterable[TradeFields], out: list[str] | None = None,
                  not_before: int | None = None) -> list[str]:
    """Lines of the trades that carry a price and an amount (others are skipped), appended to `out`; with
    `not_before` (ns), trades whose ts_event is older are skipped too (beyond their tier's retention).
    The hot path of the influx writer: the series key is looked up again only when the series changes."""
    lines: list[str] = [] if out is None else out
    append = lines.append
    keys = _trade_keys
    crc32 = zlib.crc32
    last_exchange = last_symbol = None
    key = ""
    oldest = -(1 << 63) if not_before is None else not_before
    for t in trades:
        price = t.price
        amount = t.amount
        if price is None or amount is None or t.ts_event < oldest:
            continue
        exchange, symbol = t.exchange, t.symbol
        if exchange != last_exchange or symbol != last_symbol:
            key = keys.get((exchange, symbol)) or _trade_key(exchange, symbol)
            last_exchange, last_symbol = exchange, symbol
        tid = t.trade_id
        ts = t.ts_event
        # trade_timestamp, inlined: a call per trade is a measurable share of the writer's time.
        if tid.isdigit() and tid.isascii():
            ts = ts - ts % NS_PER_MS + int(tid) % _OFFSET_MOD
        else:
            ts = ts - ts % NS_PER_MS + crc32(tid.encode()) % _OFFSET_MOD
            tid = tid.translate(_STR_ESCAPES)
        side = t.side
        flags = _quality(t.quality) if t.quality else ""
        if side is None:
            append(f'{key} price={price},amount={amount},trade_id="{tid}"{flags} {ts}')
        else:
            append(f'{key} price={price},amount={amount},side="{side}",trade_id="{tid}"{flags} {ts}')
    return lines


def encode_candles(candles: Iterable[CandleFields], out: list[str] | None = None) -> list[str]:
    """Lines of the candles with all of OHLCV set (others are skipped), appended to `out`.
    Open and closed alike: filtering closed candles is the caller's decision."""
    lines: list[str] = [] if out is None else out
    append = lines.append
    keys = _candle_keys
    for c in candles:
        o, h, lo, cl, v = c.open, c.high, c.low, c.close, c.volume
        if o is None or h is None or lo is None or cl is None or v is None:
            continue
        key = keys.get((c.exchange, c.symbol, c.timeframe)) or _candle_key(c.exchange, c.symbol, c.timeframe)
        flags = _quality(c.quality) if c.quality else ""
        append(f"{key} open={o},high={h},low={lo},close={cl},volume={v}{flags} {c.open_time}")
    return lines




def encode_snapshots(events: Iterable[FundingRate | OpenInterest], out: list[str] | None = None) -> list[str]:
    """Lines of funding-rate and open-interest events (measurements `funding`: funding_rate, mark_price,
    index_price, next_funding_time (ns, integer); `open_interest`: amount (contracts), value), tags exchange
    and symbol, timestamp ts_event. Fields that are None are left out; an event with none is skipped.
    Idempotent like every point: a redelivered event rewrites the same point."""
    lines: list[str] = [] if out is None else out
    for e in events:
        if isinstance(e, FundingRate):
            measurement = FUNDING
            fields = [f"{k}={v}" for k, v in (("funding_rate", e.funding_rate), ("mark_price", e.mark_price),
                                               ("index_price", e.index_price)) if v is not None]
            if e.next_funding_time is not None:
                fields.append(f"next_funding_time={e.next_funding_time}i")
        else:
            measurement = OPEN_INTEREST
            fields = [f"{k}={v}" for k, v in (("amount", e.amount), ("value", e.value)) if v is not None]
        if not fields:
            continue
        key = series_key(measurement, (("exchange", e.exchange), ("symbol", e.symbol)))
        lines.append(f"{key} {','.join(fields)} {e.ts_event}")
    return lines
