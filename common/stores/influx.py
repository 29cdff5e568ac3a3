"""InfluxDB for the pipeline: the line-protocol encoding of our schema, the storage tiers, and one async client
that serves InfluxDB 1.x, 2.x and 3.x.

Generations (docs/storage.md). `influx.generation = "auto"` reads the server's generation from `/ping`'s
`X-Influxdb-Version` header ("1.6.7~rc0", "v2.7.11", "3.0.1"); "1", "2" or "3" forces it.
- writes: 1.x line protocol to `POST /write?db=..&rp=..&precision=ns` (aiohttp); 2.x and 3.x through
  influxdb-client's async write API (`POST /api/v2/write?org=..&bucket=..&precision=ns`).
- queries: InfluxQL on `GET /query` everywhere (no Flux: 3.x has none). 2.x finds a tier through its DBRP
  mapping (database + retention policy -> bucket); 3.x takes the tier's database, and since its /query does
  not bind parameters, `$name` parameters are inlined client-side as quoted InfluxQL literals there.
- auth: 1.x basic auth (influx.username / influx.password); 2.x `Authorization: Token` (influx.token) or a
  session from `/api/v2/signin` (username / password); 3.x `Authorization: Token` (influx.token). TLS with
  influx.verify_tls and influx.ca_cert.

Storage tiers (`TierPlan`, from influx.tiers and influx.retention; defaults are the plan's: raw ticks 7 days,
1m candles 90 days, 1h candles 2 years, 1d candles forever). A tier is a retention policy of the database on
1.x, a bucket with a retention rule on 2.x, a database with a retention period on 3.x (named by
influx.bucket_template, default `{database}_{tier}`: 3 Core refuses `/` in the names it creates).
`InfluxClient.ensure_tiers()` creates and corrects them idempotently; `tier_for(timeframe)` says where a
timeframe lives, `query_timeframe` queries there.

Errors:
- `StoreUnavailable` (from common.bus.core): connection refused or reset, timeout, HTTP 5xx (and 429). The message
  names the server, its generation and what to do; the bus retries the same batch in place, nothing is lost.
- `InfluxWriteError`: a write the server refused with a 4xx (unparsable line, field type conflict, missing
  database / retention policy / bucket, authentication). It carries the HTTP status and the server's error
  text ({"error"} on 1.x and 3.x, {"code","message"} on 2.x). Points older than their retention policy that
  1.x drops ("partial write: points beyond retention policy dropped=N") are not an error: they are counted in
  `expired_dropped` (their tier does not keep them).
- `InfluxQueryError`: a query the server refused (4xx, or an `error` in a statement's result).

Encoding (the hot path: one f-string per point, series keys cached per (exchange, symbol[, timeframe])):
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

import asyncio
import logging
import re
import ssl
import zlib
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Protocol, Self

import aiohttp
import msgspec
from influxdb_client.client.influxdb_client_async import InfluxDBClientAsync
from influxdb_client.client.write_api_async import WriteApiAsync
from influxdb_client.domain.write_precision import WritePrecision
from influxdb_client.rest import ApiException

from common.config import ConfigError, InfluxSettings
from common.errors import MdpError, StoreUnavailable
from schemas import Candle, FundingRate, OpenInterest, Trade

log = logging.getLogger(__name__)

TRADES = "trades"
OHLCV = "ohlcv"
TICKS = "ticks"  # what a tier lists in influx.tiers to hold the raw trades (measurement `trades`)

NS_PER_MS = 1_000_000
NS_PER_S = 1_000_000_000
_OFFSET_MOD = 1_000_000  # ns in a millisecond: the offset of a trade inside its millisecond


class InfluxError(MdpError):
    """The server refused a request (4xx). `status` is the HTTP status, `body` the server's error text."""

    def __init__(self, message: str, status: int = 0, body: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.body = body


class InfluxWriteError(InfluxError):
    """A write refused with a 4xx: bad line protocol, field type conflict, missing target, auth.
    `partial` is True when the server stored the points it could parse and dropped the rest."""

    @property
    def partial(self) -> bool:
        return "partial write" in self.body

    @property
    def database_not_found(self) -> bool:
        """The write's target does not exist: database (1.x, 3.x), retention policy (1.x), bucket (2.x)."""
        return (self.status == 404 and "not found" in self.body) or "retention policy not found" in self.body

    @property
    def unauthorized(self) -> bool:
        return self.status in (401, 403)

    @property
    def beyond_retention(self) -> int:
        """Points dropped only for being older than the retention policy (1.x, 2.x), else 0."""
        if "beyond retention policy" not in self.body:
            return 0
        if "field type conflict" in self.body or "unable to parse" in self.body:
            return 0
        found = re.search(r"dropped=(\d+)", self.body)
        return int(found.group(1)) if found else 0


class InfluxQueryError(InfluxError):
    """A query the server refused: a parse error (4xx) or an error reported in a statement's result."""


# -- line protocol --------------------------------------------------------------------------------------

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


def _trade_key(exchange: str, symbol: str) -> str:
    if len(_trade_keys) >= _SERIES_CACHE_MAX:
        _trade_keys.clear()
    key = _trade_keys[(exchange, symbol)] = series_key(TRADES, (("exchange", exchange), ("symbol", symbol)))
    return key


def _candle_key(exchange: str, symbol: str, timeframe: str) -> str:
    if len(_candle_keys) >= _SERIES_CACHE_MAX:
        _candle_keys.clear()
    key = _candle_keys[(exchange, symbol, timeframe)] = series_key(
        OHLCV, (("exchange", exchange), ("symbol", symbol), ("timeframe", timeframe)))
    return key


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
    return ',quality="' + ",".join(rules).translate(_STR_ESCAPES) + '"' if rules else ""


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


FUNDING = "funding"
OPEN_INTEREST = "open_interest"


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


# -- storage tiers --------------------------------------------------------------------------------------

_RETENTION = re.compile(r"^(\d+)([hdw])$")
_RETENTION_UNITS = {"h": 3600, "d": 86400, "w": 604800}
_TIMEFRAME = re.compile(r"^(\d+)([smhdwMy])$")
_TIMEFRAME_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "M": 30 * 86400, "y": 365 * 86400}
# Names valid as a 1.x retention policy, a 2.x bucket and a 3.x database alike.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


def parse_retention(text: str) -> int | None:
    """Seconds of a retention like "7d", "90d", "730d", "12h", "2w"; None for "inf" (forever).
    ValueError for anything else, or for less than an hour (no generation keeps less)."""
    value = text.strip()
    if value.lower() in ("inf", "infinite", "forever"):
        return None
    found = _RETENTION.match(value)
    if not found:
        raise ValueError(f"retention {text!r} is not a duration like \"7d\", \"90d\", \"12h\", \"2w\" or \"inf\"")
    seconds = int(found.group(1)) * _RETENTION_UNITS[found.group(2)]
    if seconds < 3600:
        raise ValueError(f"retention {text!r} is shorter than 1h, the least InfluxDB keeps")
    return seconds


def retention_text(seconds: int | None) -> str:
    """The shortest of "inf", "Nw", "Nd", "Nh" for a retention in seconds (also valid InfluxQL)."""
    if not seconds:
        return "inf"
    for unit, size in (("d", 86400), ("h", 3600)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def timeframe_seconds(timeframe: str) -> int:
    """Seconds of a ccxt timeframe ("1m", "4h", "1d", "1w", "1M" = 30 days); ValueError otherwise."""
    found = _TIMEFRAME.match(timeframe)
    if not found or int(found.group(1)) == 0:
        raise ValueError(f"timeframe {timeframe!r} is not a ccxt timeframe like \"1m\", \"4h\", \"1d\", \"1M\"")
    return int(found.group(1)) * _TIMEFRAME_UNITS[found.group(2)]


@dataclass(frozen=True, slots=True)
class Tier:
    """One storage tier: what it holds ("ticks" and/or candle timeframes) and how long it keeps it."""

    name: str
    retention_s: int | None  # None: forever
    holds: tuple[str, ...]

    @property
    def retention(self) -> str:
        return retention_text(self.retention_s)

    def cutoff_ns(self, now_ns: int) -> int | None:
        """Points older than this are beyond the tier's retention (None: it keeps everything)."""
        return None if self.retention_s is None else now_ns - self.retention_s * NS_PER_S


@dataclass(frozen=True, slots=True)
class TierTarget:
    """Where a tier lives on a server of a given generation.

    `database` and `rp` are what InfluxQL `/query` takes (1.x: the database and the tier's retention policy;
    2.x: the same pair, resolved by the DBRP mapping `ensure_tiers` creates; 3.x: the tier's own database and
    no retention policy). `bucket` is where 2.x / 3.x writes go (the tier's bucket or database; "" on 1.x)."""

    tier: Tier
    database: str
    rp: str
    bucket: str


class TierPlan:
    """The tiers of influx.tiers / influx.retention, checked, and the tier of every timeframe.

    A timeframe listed in a tier lives there. One not listed goes to the tier of the longest listed timeframe
    not longer than it (2h -> the tier of 1h), or, if it is shorter than all of them, to the tier of the
    shortest one. ConfigError names the key, the value and the fix."""

    def __init__(self, settings: InfluxSettings) -> None:
        self.database = settings.database
        self.bucket_template = settings.bucket_template
        tiers, retention = settings.tiers, settings.retention
        if not tiers:
            raise ConfigError("influx.tiers is empty; list at least one tier holding \"ticks\" and one holding "
                              "candle timeframes (see docs/storage.md), or remove the key for the defaults")
        if set(tiers) != set(retention):
            raise ConfigError(f"influx.retention has tiers {sorted(retention)} but influx.tiers has {sorted(tiers)}; "
                              f"give every tier of influx.tiers exactly one retention (\"7d\", \"inf\", ...)")
        built: list[Tier] = []
        owner: dict[str, str] = {}
        for name, holds in tiers.items():
            if not _NAME.match(name):
                raise ConfigError(f"influx.tiers key {name!r} is not a valid tier name; use letters, digits, "
                                  f"'_' and '-', starting with a letter or digit, at most 64 characters")
            try:
                seconds = parse_retention(retention[name])
            except ValueError as exc:
                raise ConfigError(f"influx.retention.{name} = {retention[name]!r}: {exc}") from None
            for item in holds:
                if item != TICKS:
                    try:
                        timeframe_seconds(item)
                    except ValueError as exc:
                        raise ConfigError(f"influx.tiers.{name} = {holds!r}: {exc}, or \"{TICKS}\"") from None
                if item in owner:
                    raise ConfigError(f"influx.tiers: {item!r} is listed in both {owner[item]!r} and {name!r}; "
                                      f"list it in one tier only")
                owner[item] = name
            built.append(Tier(name, seconds, tuple(holds)))
            bucket = self.bucket_name(name)
            if not _NAME.match(bucket):
                raise ConfigError(f"influx.bucket_template = {settings.bucket_template!r} gives {bucket!r} for tier "
                                  f"{name!r}, which InfluxDB 2.x/3.x would refuse; use letters, digits, '_', '-' "
                                  f"(no '/': InfluxDB 3 does not create such databases), at most 64 characters")
        self.tiers: tuple[Tier, ...] = tuple(built)
        by_name = {t.name: t for t in built}
        if TICKS not in owner:
            raise ConfigError(f"influx.tiers: no tier holds \"{TICKS}\" (the raw trades); add it to one tier")
        self.ticks = by_name[owner[TICKS]]
        self._exact: dict[str, Tier] = {tf: by_name[name] for tf, name in owner.items()}
        ladder = sorted((timeframe_seconds(tf), by_name[name]) for tf, name in owner.items() if tf != TICKS)
        if not ladder:
            raise ConfigError("influx.tiers: no tier holds a candle timeframe; list \"1m\" (and others) in a tier")
        self._ladder: list[tuple[int, Tier]] = ladder

    def bucket_name(self, tier: str) -> str:
        """The 2.x bucket / 3.x database of a tier (influx.bucket_template)."""
        try:
            return self.bucket_template.format(database=self.database, tier=tier)
        except (KeyError, IndexError, ValueError) as exc:
            raise ConfigError(f"influx.bucket_template = {self.bucket_template!r} cannot be filled ({exc}); use "
                              f"only the fields {{database}} and {{tier}}") from None

    def tier(self, name: str) -> Tier:
        for t in self.tiers:
            if t.name == name:
                return t
        raise KeyError(f"no storage tier named {name!r}; tiers: {', '.join(t.name for t in self.tiers)}")

    def for_timeframe(self, timeframe: str) -> Tier:
        """The tier of "ticks" or of a candle timeframe; ValueError for a timeframe that is not one."""
        found = self._exact.get(timeframe)
        if found is not None:
            return found
        seconds = timeframe_seconds(timeframe)
        chosen = self._ladder[0][1]
        for tf_seconds, tier in self._ladder:
            if tf_seconds <= seconds:
                chosen = tier
        self._exact[timeframe] = chosen
        return chosen


def generation_of(version: str) -> int | None:
    """1, 2 or 3 from a server version ("1.6.7~rc0", "v2.7.11", "3.0.1"); None if it is none of them."""
    found = re.match(r"^[vV]?(\d+)\.", version.strip())
    if not found or int(found.group(1)) not in (1, 2, 3):
        return None
    return int(found.group(1))


_PARAM = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)")


def influxql_literal(value: object) -> str:
    """An InfluxQL literal: a single-quoted string (backslash before \\ and '), a number, true/false."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, Decimal)):
        return str(value)
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    raise TypeError(f"query parameter value {value!r} is not a string, number or boolean")


def inline_params(influxql: str, params: Mapping[str, object]) -> str:
    """`$name` placeholders replaced by literals of `params` (for 3.x, whose /query binds no parameters).
    A placeholder without a value raises InfluxQueryError; keep `$` out of string literals in the query."""
    def literal(found: re.Match[str]) -> str:
        name = found.group(1)
        if name not in params:
            raise InfluxQueryError(f"query {influxql!r} uses ${name} but params has no {name!r}")
        return influxql_literal(params[name])
    return _PARAM.sub(literal, influxql)


# -- the client -----------------------------------------------------------------------------------------

def quote_ident(name: str) -> str:
    """An InfluxQL identifier in double quotes (database, retention policy, measurement names)."""
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


class _Results(msgspec.Struct):
    results: list[dict[str, Any]] = []
    error: str = ""


def _ssl_context(settings: InfluxSettings) -> ssl.SSLContext | None:
    """TLS for an https URL: the system CAs or influx.ca_cert, verification off only if verify_tls is false."""
    if not settings.url.startswith("https://"):
        return None
    try:
        context = ssl.create_default_context(cafile=settings.ca_cert or None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"influx.ca_cert = {settings.ca_cert!r} cannot be read as a PEM CA file ({exc}); point it "
                          f"at the CA certificate that signed the InfluxDB server's certificate") from None
    if not settings.verify_tls:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class InfluxClient:
    """Async client for InfluxDB 1.x, 2.x and 3.x. Use one per process; `await close()` at the end (or
    `async with InfluxClient(settings) as client:`). The first request detects the server's generation
    (`connect()`), unless influx.generation names it."""

    def __init__(self, settings: InfluxSettings, session: aiohttp.ClientSession | None = None) -> None:
        self.settings = settings
        self.url = settings.url.rstrip("/")
        self.database = settings.database
        self.batch_points = max(1, settings.batch_points)
        self.plan = TierPlan(settings)
        self._generation: int | None = None if settings.generation == "auto" else int(settings.generation)
        self._connected = False
        self.version = ""
        self._ssl = _ssl_context(settings)
        self._timeout = aiohttp.ClientTimeout(total=settings.timeout_s)
        self._session = session
        self._own_session = session is None
        self._cookie = ""  # a 2.x session from /api/v2/signin (username/password instead of a token)
        self._v2: InfluxDBClientAsync | None = None
        self._v2_write: WriteApiAsync | None = None
        self._slots: asyncio.Semaphore | None = None
        self._results = msgspec.json.Decoder(_Results)
        self._results_exact = msgspec.json.Decoder(_Results, float_hook=Decimal)
        self.requests = 0
        self.points_written = 0
        self.expired_dropped = 0  # points the server dropped as older than their retention policy

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- plumbing -------------------------------------------------------------------------------------

    @property
    def generation(self) -> int:
        """1, 2 or 3; known after `connect()` (or from influx.generation)."""
        if self._generation is None:
            raise RuntimeError(f"the generation of InfluxDB at {self.url} is not known yet: await connect() first "
                               f"or set influx.generation")
        return self._generation

    def _where(self) -> str:
        gen = f"{self._generation}.x" if self._generation else "(generation not yet known)"
        version = f" {self.version}" if self.version else ""
        return f"InfluxDB {gen}{version} at {self.url}"

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=self._timeout,
                connector=aiohttp.TCPConnector(limit=max(8, self.settings.write_concurrency * 2),
                                               enable_cleanup_closed=True, ssl=self._ssl if self._ssl else True))
            self._own_session = True
        return self._session

    async def close(self) -> None:
        if self._v2 is not None:
            await self._v2.close()
            self._v2 = None
            self._v2_write = None
        if self._session is not None and self._own_session and not self._session.closed:
            await self._session.close()
        self._session = None

    def _auth_headers(self) -> dict[str, str]:
        s = self.settings
        if s.token and self._generation != 1:
            return {"Authorization": f"Token {s.token}"}
        if self._cookie:
            return {"Cookie": self._cookie}
        if s.username:
            return {"Authorization": aiohttp.encode_basic_auth(s.username, s.password)}
        return {}

    def credentials_hint(self) -> str:
        if self._generation == 1:
            return "fix influx.username / influx.password (MDP_INFLUX_USERNAME, MDP_INFLUX_PASSWORD)"
        return "fix influx.token (MDP_INFLUX_TOKEN): a token with read and write access to the tiers' buckets"

    def _unavailable(self, what: str, cause: str) -> StoreUnavailable:
        return StoreUnavailable(
            f"{self._where()} is unavailable ({what}: {cause}); start it (`make stores`) or fix influx.url / "
            f"MDP_INFLUX_URL; writers acknowledge nothing meanwhile, the backlog waits in Redis")

    def _tls_refused(self, what: str, exc: BaseException) -> StoreUnavailable:
        return StoreUnavailable(
            f"{self._where()}: TLS failed ({what}: {exc}); set influx.ca_cert to the CA certificate that signed the "
            f"server's certificate (or influx.verify_tls = false for a test server only); nothing is acknowledged "
            f"meanwhile")

    async def _request(self, method: str, path: str, params: Mapping[str, str] | None = None,
                       data: bytes | None = None, json_body: object = None,
                       headers: Mapping[str, str] | None = None) -> tuple[int, bytes, Any]:
        """(status, body, headers); StoreUnavailable on connection errors, timeouts, 5xx and 429 (except 1.x's
        HTTP 500 "retention policy not found", which is a missing tier, returned to the caller)."""
        session = self._get_session()
        what = f"{method} {path}"
        sent = dict(headers) if headers is not None else self._auth_headers()
        if data is not None:
            sent["Content-Type"] = "text/plain; charset=utf-8"
        elif json_body is not None:
            data = msgspec.json.encode(json_body)
            sent["Content-Type"] = "application/json"
        try:
            async with session.request(method, self.url + path, params=params, data=data, headers=sent) as resp:
                body = await resp.read()
                status = resp.status
                got = resp.headers
        except TimeoutError as exc:  # first: aiohttp's timeouts are also ClientConnectionErrors
            raise self._unavailable(what, f"no answer within {self.settings.timeout_s:g} s") from exc
        except aiohttp.ClientSSLError as exc:
            raise self._tls_refused(what, exc) from exc
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, OSError) as exc:
            raise self._unavailable(what, f"{type(exc).__name__}: {exc}") from exc
        finally:
            self.requests += 1
        if (status >= 500 or status == 429) and b"retention policy not found" not in body:
            raise self._unavailable(what, f"HTTP {status} {_error_text(body)}")
        return status, body, got

    # -- connecting -----------------------------------------------------------------------------------

    async def ping(self) -> str:
        """The server's version (X-Influxdb-Version of /ping); StoreUnavailable if it does not answer."""
        status, body, headers = await self._request("GET", "/ping")
        if status >= 400:
            text = _error_text(body)
            hint = (" (InfluxDB 3 asks for a token on /ping unless started with --disable-authz ping: set "
                    "influx.token)") if status == 401 else ""
            raise InfluxError(f"InfluxDB at {self.url} refused /ping: HTTP {status} {text}{hint}", status, text)
        version = str(headers.get("X-Influxdb-Version") or "")
        if not version and body.startswith(b"{"):
            try:
                version = str(msgspec.json.decode(body).get("version") or "")
            except (msgspec.DecodeError, AttributeError):
                version = ""
        return version or "unknown"

    async def connect(self) -> str:
        """Ping, learn the generation (or check influx.generation against it), check the credentials the
        generation needs, and sign in on 2.x with username/password. Returns the server's version.
        ConfigError for settings this server cannot use; StoreUnavailable when it does not answer."""
        configured = self.settings.generation
        if configured != "auto":
            self._check_credentials(int(configured))
        version = await self.ping()
        self.version = version
        detected = generation_of(version)
        if configured == "auto":
            if detected is None:
                raise ConfigError(f"InfluxDB at {self.url} reports version {version!r}, which is not 1.x, 2.x or "
                                  f"3.x; set influx.generation = \"1\", \"2\" or \"3\" (MDP_INFLUX_GENERATION)")
            self._generation = detected
        elif detected is not None and detected != int(configured):
            log.warning("influx.generation = %r but InfluxDB at %s reports version %s; using generation %s as "
                        "configured", configured, self.url, version, configured)
        s = self.settings
        gen = self.generation
        self._check_credentials(gen)
        if gen == 2 and not s.token and s.username and not self._cookie:
            await self._signin()
        self._connected = True
        return version

    def _check_credentials(self, gen: int) -> None:
        """ConfigError for credentials generation `gen` cannot use."""
        s = self.settings
        if gen == 1 and s.token and not s.username:
            raise ConfigError(f"influx.token is set but {self._where()} has no API tokens; set influx.username and "
                              f"influx.password instead (MDP_INFLUX_USERNAME, MDP_INFLUX_PASSWORD)")
        if gen == 2 and not s.org:
            raise ConfigError(f"influx.org is empty but {self._where()} needs the organization that owns the "
                              f"buckets; set influx.org (MDP_INFLUX_ORG)")
        if gen == 3 and s.username and not s.token:
            raise ConfigError(f"{self._where()} authenticates with tokens, not users; set influx.token "
                              f"(MDP_INFLUX_TOKEN) and clear influx.username")

    async def _ready(self) -> None:
        if not self._connected:
            await self.connect()

    async def _signin(self) -> None:
        """2.x: a session for username/password (POST /api/v2/signin with basic auth; the cookie it sets)."""
        basic = {"Authorization": aiohttp.encode_basic_auth(self.settings.username, self.settings.password)}
        status, body, headers = await self._request("POST", "/api/v2/signin", headers=basic)
        if status >= 300:
            text = _error_text(body)
            raise InfluxError(f"{self._where()} refused to sign in user {self.settings.username!r}: HTTP {status} "
                              f"{text}; fix influx.username / influx.password or use influx.token", status, text)
        cookie = str(headers.get("Set-Cookie") or "").split(";", 1)[0]
        if not cookie:
            raise InfluxError(f"{self._where()} signed in user {self.settings.username!r} but set no session "
                              f"cookie; use influx.token instead", status, "")
        self._cookie = cookie

    # -- tiers ----------------------------------------------------------------------------------------

    def tier_target(self, tier: Tier | str) -> TierTarget:
        t = self.plan.tier(tier) if isinstance(tier, str) else tier
        gen = self.generation
        if gen == 1:
            return TierTarget(t, self.database, t.name, "")
        bucket = self.plan.bucket_name(t.name)
        if gen == 2:
            return TierTarget(t, self.database, t.name, bucket)
        return TierTarget(t, bucket, "", bucket)

    def target(self, timeframe: str) -> TierTarget:
        """Where "ticks" or a candle timeframe lives on this server."""
        return self.tier_target(self.plan.for_timeframe(timeframe))

    def tier_for(self, timeframe: str) -> tuple[str, str]:
        """(database, retention policy) to query "ticks" or a candle timeframe with InfluxQL on this server
        (the retention policy is "" on 3.x, where each tier is a database of its own)."""
        found = self.target(timeframe)
        return found.database, found.rp

    async def ensure_tiers(self) -> list[str]:
        """Create every tier that is missing and set the retention of those that differ from the config;
        idempotent. Returns one line per thing looked at, saying what was done."""
        await self._ready()
        if self.generation == 1:
            return await self._ensure_v1()
        if self.generation == 2:
            return await self._ensure_v2()
        return await self._ensure_v3()

    async def _ensure_v1(self) -> list[str]:
        db = quote_ident(self.database)
        await self.execute(f"CREATE DATABASE {db}")
        done = [f"database {self.database!r}: present (CREATE DATABASE is idempotent)"]
        existing = {str(r["name"]): _go_duration_seconds(str(r["duration"]))
                    for r in await self.query(f"SHOW RETENTION POLICIES ON {db}", database=self.database)}
        for tier in self.plan.tiers:
            rp = quote_ident(tier.name)
            holds = ", ".join(tier.holds)
            if tier.name not in existing:
                await self.execute(f"CREATE RETENTION POLICY {rp} ON {db} DURATION {_influxql_duration(tier)} "
                                   f"REPLICATION 1")
                done.append(f"retention policy {tier.name!r} ({holds}): created, {tier.retention}")
            elif existing[tier.name] != tier.retention_s:
                await self.execute(f"ALTER RETENTION POLICY {rp} ON {db} DURATION {_influxql_duration(tier)}")
                done.append(f"retention policy {tier.name!r} ({holds}): retention changed from "
                            f"{retention_text(existing[tier.name])} to {tier.retention}")
            else:
                done.append(f"retention policy {tier.name!r} ({holds}): unchanged, {tier.retention}")
        return done

    async def _api(self, method: str, path: str, params: Mapping[str, str] | None = None,
                   json_body: object = None, ok: tuple[int, ...] = (200, 201, 204)) -> tuple[int, Any]:
        """A 2.x / 3.x management call; (status, decoded JSON or None). InfluxError when refused."""
        status, body, _ = await self._request(method, path, params, json_body=json_body)
        if status not in ok:
            text = _error_text(body)
            hint = f"; {self.credentials_hint()}" if status in (401, 403) else ""
            raise InfluxError(f"{self._where()} refused {method} {path}: HTTP {status} {text}{hint}", status, text)
        if not body.strip():
            return status, None
        try:
            return status, msgspec.json.decode(body)
        except msgspec.DecodeError:
            return status, None

    async def _ensure_v2(self) -> list[str]:
        org = self.settings.org
        _, found = await self._api("GET", "/api/v2/orgs", {"org": org}, ok=(200, 404))
        orgs = (found or {}).get("orgs") or []
        if not orgs:
            raise InfluxError(f"{self._where()} has no organization {org!r}; fix influx.org (MDP_INFLUX_ORG) or "
                              f"create it (influx org create -n {org})", 404, "organization not found")
        org_id = str(orgs[0]["id"])
        done = [f"organization {org!r}: id {org_id}"]
        for tier in self.plan.tiers:
            target = self.tier_target(tier)
            holds = ", ".join(tier.holds)
            rules = [{"type": "expire", "everySeconds": tier.retention_s or 0}]
            status, found = await self._api("GET", "/api/v2/buckets", {"orgID": org_id, "name": target.bucket},
                                            ok=(200, 404))
            buckets = (found or {}).get("buckets") or [] if status == 200 else []
            if not buckets:
                _, bucket = await self._api("POST", "/api/v2/buckets", json_body={
                    "orgID": org_id, "name": target.bucket, "retentionRules": rules,
                    "description": f"mdp storage tier {tier.name}: {holds}"})
                done.append(f"bucket {target.bucket!r} ({holds}): created, {tier.retention}")
            else:
                bucket = buckets[0]
                have = _bucket_retention(bucket)
                if have != tier.retention_s:
                    await self._api("PATCH", f"/api/v2/buckets/{bucket['id']}", json_body={"retentionRules": rules})
                    done.append(f"bucket {target.bucket!r} ({holds}): retention changed from "
                                f"{retention_text(have)} to {tier.retention}")
                else:
                    done.append(f"bucket {target.bucket!r} ({holds}): unchanged, {tier.retention}")
            done.append(await self._ensure_dbrp(org_id, str(bucket["id"]), target))
        return done

    async def _ensure_dbrp(self, org_id: str, bucket_id: str, target: TierTarget) -> str:
        """2.x: the DBRP mapping (database, tier) -> bucket that InfluxQL /query resolves."""
        _, found = await self._api("GET", "/api/v2/dbrps", {"orgID": org_id, "db": target.database,
                                                            "rp": target.rp})
        mappings = [m for m in (found or {}).get("content") or [] if not m.get("virtual")]
        name = f"DBRP mapping {target.database}/{target.rp} -> {target.bucket!r}"
        if not mappings:
            await self._api("POST", "/api/v2/dbrps", json_body={
                "orgID": org_id, "bucketID": bucket_id, "database": target.database,
                "retention_policy": target.rp, "default": False})
            return f"{name}: created"
        if str(mappings[0].get("bucketID")) != bucket_id:
            raise InfluxError(f"{self._where()}: the DBRP mapping {target.database}/{target.rp} points at bucket id "
                              f"{mappings[0].get('bucketID')}, not at {target.bucket!r} ({bucket_id}); delete it "
                              f"(influx v1 dbrp delete --id {mappings[0].get('id')}) and run `mdp init` again",
                              409, "dbrp conflict")
        return f"{name}: unchanged"

    async def _ensure_v3(self) -> list[str]:
        _, found = await self._api("GET", "/api/v3/configure/database", {"format": "json"})
        existing = {str(row.get("iox::database")) for row in found or [] if isinstance(row, dict)}
        done: list[str] = []
        for tier in self.plan.tiers:
            target = self.tier_target(tier)
            holds = ", ".join(tier.holds)
            body: dict[str, object] = {"db": target.bucket}
            if tier.retention_s is not None:
                body["retention_period"] = tier.retention
            if target.bucket not in existing:
                status, _ = await self._api("POST", "/api/v3/configure/database", json_body=body, ok=(200, 201, 409))
                if status != 409:  # 409: created meanwhile by someone else; set its retention below
                    done.append(f"database {target.bucket!r} ({holds}): created, {tier.retention}")
                    continue
            # 3.x lists no retention periods: set it, which is idempotent, where the server allows it.
            status, body_text, _ = await self._request("PUT", "/api/v3/configure/database", json_body=body)
            if status < 300:
                done.append(f"database {target.bucket!r} ({holds}): present, retention set to {tier.retention}")
            elif status in (404, 405):
                done.append(f"database {target.bucket!r} ({holds}): present; this server cannot change a "
                            f"database's retention (HTTP {status}), so it keeps the one it was created with: if "
                            f"that is not {tier.retention}, recreate the database")
            else:
                text = _error_text(body_text)
                raise InfluxError(f"{self._where()} refused to set the retention of database {target.bucket!r} to "
                                  f"{tier.retention}: HTTP {status} {text}", status, text)
        return done

    # -- writing --------------------------------------------------------------------------------------

    async def write_lines(self, lines: Sequence[str], database: str | None = None, rp: str = "") -> int:
        """Write line-protocol lines (ns precision) in requests of at most `batch_points` lines, up to
        influx.write_concurrency at once. 1.x: into `database` (default influx.database) and retention policy
        `rp` (default: the database's default); 2.x / 3.x: into bucket / database `database`.
        Returns when every request was answered 204 (the points are durable in the server's WAL), with the
        number of points sent. InfluxWriteError on a 4xx, StoreUnavailable when unreachable."""
        await self._ready()
        target = database or self.database
        if self.generation == 1:
            params = {"db": target, "precision": "ns"}
            if rp:
                params["rp"] = rp

            async def send(chunk: Sequence[str]) -> None:
                await self._write_v1(params, chunk)
        else:
            async def send(chunk: Sequence[str]) -> None:
                await self._write_v2(target, chunk)
        await self._in_chunks(lines, send)
        return len(lines)

    async def write_tier(self, tier: Tier | str, lines: Sequence[str]) -> int:
        """Write lines into a storage tier (its retention policy, bucket or database)."""
        await self._ready()
        target = self.tier_target(tier)
        if self.generation == 1:
            return await self.write_lines(lines, target.database, target.rp)
        return await self.write_lines(lines, target.bucket)

    async def _in_chunks(self, lines: Sequence[str], send: Callable[[Sequence[str]], Awaitable[None]]) -> None:
        size = self.batch_points
        if len(lines) <= size:
            if lines:
                await send(lines)
            return
        if self._slots is None:
            self._slots = asyncio.Semaphore(max(1, self.settings.write_concurrency))
        slots = self._slots

        async def one(chunk: Sequence[str]) -> None:
            async with slots:
                await send(chunk)
        results = await asyncio.gather(*(one(lines[i:i + size]) for i in range(0, len(lines), size)),
                                       return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise next((e for e in errors if isinstance(e, StoreUnavailable)), errors[0])

    def _refused(self, n: int, where: str, status: int, text: str) -> InfluxWriteError | None:
        """The error for a refused write, or None when only points beyond retention were dropped."""
        error = InfluxWriteError(f"{self._where()} refused a write of {n} points to {where}: HTTP {status} {text}",
                                 status, text)
        dropped = error.beyond_retention
        if dropped:
            self.expired_dropped += dropped
            self.points_written += n - dropped
            log.info("%s dropped %d of %d points as older than the retention of %s", self._where(), dropped, n,
                     where)
            return None
        return error

    async def _write_v1(self, params: Mapping[str, str], chunk: Sequence[str]) -> None:
        status, body, _ = await self._request("POST", "/write", params, "\n".join(chunk).encode())
        if status >= 300:
            where = f"database {params['db']!r}" + (f", retention policy {params['rp']!r}" if "rp" in params else "")
            error = self._refused(len(chunk), where, status, _error_text(body))
            if error is not None:
                raise error
            return
        self.points_written += len(chunk)

    def _v2_writer(self) -> WriteApiAsync:
        """influxdb-client's async write API (aiohttp underneath, so it runs on our event loop)."""
        if self._v2_write is None:
            s = self.settings
            kwargs: dict[str, Any] = {"verify_ssl": s.verify_tls, "ssl_ca_cert": s.ca_cert or None,
                                      "connection_pool_maxsize": max(4, s.write_concurrency)}
            if s.token:
                kwargs["token"] = s.token
            elif s.username and self.generation == 2:
                kwargs["username"], kwargs["password"] = s.username, s.password
            self._v2 = InfluxDBClientAsync(url=self.url, org=s.org, timeout=int(s.timeout_s * 1000),
                                           **kwargs)
            self._v2_write = self._v2.write_api()
        return self._v2_write

    async def _write_v2(self, bucket: str, chunk: Sequence[str]) -> None:
        what = "POST /api/v2/write"
        try:
            # 3.x ignores org, but influxdb-client requires one: "" when none is configured. Its write() types
            # write_precision as a WritePrecision instance while the values it documents are its str constants.
            await self._v2_writer().write(bucket=bucket, org=self.settings.org,
                                          record="\n".join(chunk).encode(),
                                          write_precision=WritePrecision.NS)  # type: ignore[arg-type]
        except ApiException as exc:
            status = int(exc.status or 0)
            raw = exc.body if isinstance(exc.body, bytes) else str(exc.body or exc.reason or "").encode()
            text = _error_text(raw)
            if status >= 500 or status == 429 or status == 0:
                raise self._unavailable(what, f"HTTP {status} {text}") from exc
            where = f"bucket {bucket!r}" if self.generation == 2 else f"database {bucket!r}"
            error = self._refused(len(chunk), where, status, text)
            if error is not None:
                raise error from exc
            return
        except TimeoutError as exc:
            raise self._unavailable(what, f"no answer within {self.settings.timeout_s:g} s") from exc
        except aiohttp.ClientSSLError as exc:
            raise self._tls_refused(what, exc) from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise self._unavailable(what, f"{type(exc).__name__}: {exc}") from exc
        finally:
            self.requests += 1
        self.points_written += len(chunk)

    # -- querying -------------------------------------------------------------------------------------

    async def _get_query(self, influxql: str, params: Mapping[str, Any] | None, database: str | None,
                         rp: str) -> tuple[str, int, bytes]:
        """GET /query with the values bound (1.x, 2.x: JSON `params`; 3.x: inlined literals) and the retention
        policy picked; returns the query as sent, the HTTP status and the body."""
        await self._ready()
        db = database or self.database
        query = {"db": db, "epoch": "ns"}
        if self.generation == 3:
            if rp:
                query["db"] = f"{db}/{rp}"
            if params:
                influxql = inline_params(influxql, params)
        else:
            if rp:
                query["rp"] = rp
            if params:
                query["params"] = msgspec.json.encode(params).decode()
        query["q"] = influxql
        status, body, _ = await self._request("GET", "/query", query)
        return influxql, status, body

    async def query(self, influxql: str, params: Mapping[str, Any] | None = None, database: str | None = None,
                    exact: bool = False, rp: str = "") -> list[dict[str, Any]]:
        """Run a read query (GET /query, `epoch=ns`) and return its rows as dicts: the columns (time in ns)
        plus the series' tags for GROUP BY queries, over every series and statement.

        Bind values with `params` (`WHERE symbol = $symbol`, params={"symbol": "BTC/USDT"}): on 1.x and 2.x
        they travel as JSON data, never as query text; on 3.x they are inlined as quoted literals. `rp` picks
        the retention policy (1.x, 2.x; on 3.x it addresses the database "{database}/{rp}"). With
        `exact=True` numbers with a fraction come back as Decimal, from the server's text (whole numbers stay
        int: InfluxDB's JSON writes the float 100.0 as `100`). InfluxQueryError when the server reports an
        error."""
        influxql, status, body = await self._get_query(influxql, params, database, rp)
        return self._rows(influxql, status, body, exact)

    async def query_values(self, influxql: str, params: Mapping[str, Any] | None = None,
                           database: str | None = None, exact: bool = False,
                           rp: str = "") -> tuple[list[str], list[list[Any]]]:
        """`query` for one series, without a dict per row: (columns, value rows) as the server sent them,
        the parts of a long series (1.x splits one every 10,000 rows) joined in order. Tags are not returned,
        so use it for queries without GROUP BY (common.history turns the rows into arrays: building a dict
        per row is most of the client's cost and garbage on a large answer)."""
        influxql, status, body = await self._get_query(influxql, params, database, rp)
        try:
            parsed = (self._results_exact if exact else self._results).decode(body) if status < 300 else None
        except msgspec.DecodeError:
            parsed = None
        if parsed is None or parsed.error or any(result.get("error") for result in parsed.results):
            self._rows(influxql, status, body, exact)  # raises the InfluxQueryError that says why
            raise InfluxQueryError(f"{self._where()} answered the query {influxql!r} with HTTP {status}", status)
        columns: list[str] = []
        values: list[list[Any]] = []
        for result in parsed.results:
            for series in result.get("series") or ():
                columns = columns or list(series.get("columns") or ())
                values.extend(series.get("values") or ())
        return columns, values

    async def query_timeframe(self, timeframe: str, influxql: str, params: Mapping[str, Any] | None = None,
                              exact: bool = False) -> list[dict[str, Any]]:
        """`query` in the tier where "ticks" or candle `timeframe` lives (see `tier_for`)."""
        await self._ready()
        target = self.target(timeframe)
        return await self.query(influxql, params, database=target.database, exact=exact, rp=target.rp)

    async def execute(self, influxql: str, params: Mapping[str, Any] | None = None,
                      database: str | None = None) -> list[dict[str, Any]]:
        """Run a statement that changes something (CREATE, DROP, ...) with POST /query (1.x; 2.x's v1 API
        takes few such statements and 3.x none: use `ensure_tiers` there)."""
        await self._ready()
        query = {"q": influxql}
        if database:
            query["db"] = database
        if params:
            query["params"] = msgspec.json.encode(params).decode()
        status, body, _ = await self._request("POST", "/query", query)
        return self._rows(influxql, status, body, False)

    async def create_database(self, database: str | None = None) -> None:
        """CREATE DATABASE on 1.x (idempotent: an existing database is left as it is). On 2.x / 3.x databases
        are the tiers' buckets / databases: `ensure_tiers` makes them."""
        await self._ready()
        if self.generation != 1:
            await self.ensure_tiers()
            return
        await self.execute(f"CREATE DATABASE {quote_ident(database or self.database)}")

    def _rows(self, influxql: str, status: int, body: bytes, exact: bool) -> list[dict[str, Any]]:
        if status >= 300:
            text = _error_text(body)
            hint = f"; {self.credentials_hint()}" if status in (401, 403) else ""
            raise InfluxQueryError(f"{self._where()} refused the query {influxql!r}: HTTP {status} {text}{hint}",
                                   status, text)
        try:
            parsed = (self._results_exact if exact else self._results).decode(body)
        except msgspec.DecodeError as exc:
            raise InfluxQueryError(
                f"{self._where()} answered the query {influxql!r} with an unreadable body: {exc}",
                status, body[:500].decode(errors="replace")) from exc
        if parsed.error:
            raise InfluxQueryError(f"query {influxql!r} failed on {self._where()}: {parsed.error}", status,
                                   parsed.error)
        rows: list[dict[str, Any]] = []
        for result in parsed.results:
            if result.get("error"):
                error = str(result["error"])
                raise InfluxQueryError(f"query {influxql!r} failed on {self._where()}: {error}", status, error)
            for series in result.get("series") or ():
                columns = series.get("columns") or []
                tags = series.get("tags") or {}
                for values in series.get("values") or ():
                    row = dict(tags)
                    row.update(zip(columns, values, strict=False))
                    rows.append(row)
        return rows


def _influxql_duration(tier: Tier) -> str:
    return "INF" if tier.retention_s is None else tier.retention


def _go_duration_seconds(text: str) -> int | None:
    """Seconds of a Go duration as 1.x's SHOW RETENTION POLICIES prints it ("168h0m0s"); None for "0s"."""
    total = 0
    for amount, unit in re.findall(r"(\d+)(h|m|s)", text):
        total += int(amount) * {"h": 3600, "m": 60, "s": 1}[unit]
    return total or None


def _bucket_retention(bucket: Mapping[str, Any]) -> int | None:
    """Seconds a 2.x bucket keeps data (its "expire" rule); None when it keeps everything."""
    for rule in bucket.get("retentionRules") or ():
        if rule.get("type", "expire") == "expire" and int(rule.get("everySeconds") or 0) > 0:
            return int(rule["everySeconds"])
    return None


def _error_text(body: bytes) -> str:
    """The error of an InfluxDB error body: `error` (1.x, 3.x; with 3.x's first line detail), `message`
    (2.x), else the body's text (bounded)."""
    text = body.decode(errors="replace").strip()
    try:
        parsed = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return text[:2000]
    if isinstance(parsed, dict):
        if isinstance(parsed.get("message"), str):
            return str(parsed["message"])
        if isinstance(parsed.get("error"), str):
            error = str(parsed["error"])
            data = parsed.get("data")
            detail = data[0] if isinstance(data, list) and data else data
            if isinstance(detail, dict) and detail.get("error_message"):
                error += f": {detail['error_message']}"
                if detail.get("original_line"):
                    error += f" (line {detail.get('line_number')}: {str(detail['original_line'])[:200]!r})"
            return error
    return text[:2000]


__all__ = [
    "OHLCV", "TICKS", "TRADES", "InfluxClient", "InfluxError", "InfluxQueryError", "InfluxWriteError",
    "StoreUnavailable", "Tier", "TierPlan", "TierTarget", "candle_line", "encode_candles", "encode_snapshots",
    "encode_trades",
    "escape_measurement", "escape_string_field", "escape_tag", "generation_of", "influxql_literal",
    "inline_params", "parse_retention", "quote_ident", "retention_text", "series_key", "timeframe_seconds",
    "trade_id_offset", "trade_line", "trade_timestamp",
]
