"""A small async InfluxDB client over HTTP (aiohttp), and the line-protocol encoding of our schema.

The client speaks only what every InfluxDB generation understands (FACTS.md, InfluxDB): line protocol to
`POST /write?db=..&precision=ns` and InfluxQL to `/query`, with basic auth when a username is configured.

Errors:
- `StoreUnavailable` (from common.bus): connection refused or reset, timeout, HTTP 5xx (and 429). The message
  names the URL and what to do; the bus retries the same batch in place, nothing is lost.
- `InfluxWriteError`: a write the server refused with a 4xx (unparsable line, field type conflict, database
  not found, authentication). It carries the HTTP status and the server's error text; for a partial write
  ("partial write: ... dropped=N") the points the server could parse were stored and the rest dropped.
- `InfluxQueryError`: a query the server refused (4xx, or an `error` in a statement's result).

Encoding (the hot path: one f-string per point, series keys cached per (exchange, symbol[, timeframe])):
- candles: `ohlcv,exchange=..,symbol=..,timeframe=.. open=..,high=..,low=..,close=..,volume=.. <open_time ns>`
  Fields are floats written from the Decimal's exact text (`open=61837.63`); callers store closed candles
  only. InfluxDB keeps float64: a value round-trips exactly up to 15 significant digits.
- trades: `trades,exchange=..,symbol=.. price=..,amount=..,side="buy",trade_id="123" <ts>`, with the timestamp
  rule of `trade_timestamp` so that distinct trades never share a point and a redelivered trade overwrites
  itself.
Tag values are escaped generically (backslash before space, comma, equals sign); an empty tag value is
omitted, as line protocol has no empty tags.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Iterable, Sequence
from decimal import Decimal
from typing import Any

import aiohttp
import msgspec

from common.bus import StoreUnavailable
from common.config import InfluxSettings
from schemas import Candle, Trade

log = logging.getLogger(__name__)

TRADES = "trades"
OHLCV = "ohlcv"

NS_PER_MS = 1_000_000
_OFFSET_MOD = 1_000_000  # ns in a millisecond: the offset of a trade inside its millisecond


class InfluxError(Exception):
    """The server refused a request (4xx). `status` is the HTTP status, `body` the server's error text."""

    def __init__(self, message: str, status: int = 0, body: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.body = body


class InfluxWriteError(InfluxError):
    """A write refused with a 4xx: bad line protocol, field type conflict, database not found, auth.
    `partial` is True when the server stored the points it could parse and dropped the rest."""

    @property
    def partial(self) -> bool:
        return "partial write" in self.body

    @property
    def database_not_found(self) -> bool:
        return self.status == 404 and "database not found" in self.body

    @property
    def unauthorized(self) -> bool:
        return self.status in (401, 403)


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


def trade_line(t: Trade) -> str:
    """One trade as a line (the caller ensures price and amount are not None)."""
    key = _trade_keys.get((t.exchange, t.symbol)) or _trade_key(t.exchange, t.symbol)
    tid = t.trade_id
    if tid.isdigit() and tid.isascii():
        ts = t.ts_event - t.ts_event % NS_PER_MS + int(tid) % _OFFSET_MOD
    else:
        ts = t.ts_event - t.ts_event % NS_PER_MS + zlib.crc32(tid.encode()) % _OFFSET_MOD
        tid = tid.translate(_STR_ESCAPES)
    if t.side is None:
        return f'{key} price={t.price!s},amount={t.amount!s},trade_id="{tid}" {ts}'
    return f'{key} price={t.price!s},amount={t.amount!s},side="{t.side}",trade_id="{tid}" {ts}'


def candle_line(c: Candle) -> str:
    """One candle as a line, timestamp = open_time (the caller ensures OHLCV are not None)."""
    key = (_candle_keys.get((c.exchange, c.symbol, c.timeframe))
           or _candle_key(c.exchange, c.symbol, c.timeframe))
    return (f"{key} open={c.open!s},high={c.high!s},low={c.low!s},close={c.close!s},volume={c.volume!s} "
            f"{c.open_time}")


def encode_trades(trades: Iterable[Trade], out: list[str] | None = None) -> list[str]:
    """Lines of the trades that carry a price and an amount (others are skipped), appended to `out`."""
    lines: list[str] = [] if out is None else out
    append = lines.append
    keys = _trade_keys
    crc32 = zlib.crc32
    for t in trades:
        price = t.price
        amount = t.amount
        if price is None or amount is None:
            continue
        key = keys.get((t.exchange, t.symbol)) or _trade_key(t.exchange, t.symbol)
        tid = t.trade_id
        ts = t.ts_event
        if tid.isdigit() and tid.isascii():
            ts = ts - ts % NS_PER_MS + int(tid) % _OFFSET_MOD
        else:
            ts = ts - ts % NS_PER_MS + crc32(tid.encode()) % _OFFSET_MOD
            tid = tid.translate(_STR_ESCAPES)
        side = t.side
        if side is None:
            append(f'{key} price={price!s},amount={amount!s},trade_id="{tid}" {ts}')
        else:
            append(f'{key} price={price!s},amount={amount!s},side="{side}",trade_id="{tid}" {ts}')
    return lines


def encode_candles(candles: Iterable[Candle], out: list[str] | None = None) -> list[str]:
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
        append(f"{key} open={o!s},high={h!s},low={lo!s},close={cl!s},volume={v!s} {c.open_time}")
    return lines


# -- the client -----------------------------------------------------------------------------------------

def quote_ident(name: str) -> str:
    """An InfluxQL identifier in double quotes (database, measurement names)."""
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


class _Results(msgspec.Struct):
    results: list[dict[str, Any]] = []
    error: str = ""


class InfluxClient:
    """Async InfluxDB 1.x-compatible HTTP client. Use one per process; `await close()` at the end
    (or `async with InfluxClient(settings) as client:`)."""

    def __init__(self, settings: InfluxSettings, session: aiohttp.ClientSession | None = None) -> None:
        self.settings = settings
        self.url = settings.url.rstrip("/")
        self.database = settings.database
        self.batch_points = max(1, settings.batch_points)
        self._headers = {"Authorization": aiohttp.encode_basic_auth(settings.username, settings.password)} \
            if settings.username else {}
        self._timeout = aiohttp.ClientTimeout(total=settings.timeout_s)
        self._session = session
        self._own_session = session is None
        self._results = msgspec.json.Decoder(_Results)
        self._results_exact = msgspec.json.Decoder(_Results, float_hook=Decimal)
        self.requests = 0
        self.points_written = 0

    async def __aenter__(self) -> InfluxClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=self._timeout, headers=self._headers,
                connector=aiohttp.TCPConnector(limit=8, enable_cleanup_closed=True))
            self._own_session = True
        return self._session

    async def close(self) -> None:
        if self._session is not None and self._own_session and not self._session.closed:
            await self._session.close()
        self._session = None

    def _unavailable(self, what: str, cause: str) -> StoreUnavailable:
        return StoreUnavailable(
            f"InfluxDB at {self.url} is unavailable ({what}: {cause}); start it (`make stores`) or fix "
            f"influx.url / MDP_INFLUX_URL; writers acknowledge nothing meanwhile, the backlog waits in Redis")

    async def _request(self, method: str, path: str, params: dict[str, str],
                       data: bytes | None = None) -> tuple[int, bytes, Any]:
        """(status, body, headers); StoreUnavailable on connection errors, timeouts, 5xx and 429."""
        session = self._get_session()
        what = f"{method} {path}"
        try:
            headers = {"Content-Type": "text/plain; charset=utf-8"} if data else None
            async with session.request(method, self.url + path, params=params, data=data,
                                       headers=headers) as resp:
                body = await resp.read()
                status = resp.status
                headers = resp.headers
        except TimeoutError as exc:  # first: aiohttp's timeouts are also ClientConnectionErrors
            raise self._unavailable(what, f"no answer within {self.settings.timeout_s:g} s") from exc
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, OSError) as exc:
            raise self._unavailable(what, f"{type(exc).__name__}: {exc}") from exc
        finally:
            self.requests += 1
        if status >= 500 or status == 429:
            raise self._unavailable(what, f"HTTP {status} {_error_text(body)}")
        return status, body, headers

    async def ping(self) -> str:
        """The server's version (X-Influxdb-Version of /ping); StoreUnavailable if it does not answer."""
        status, body, headers = await self._request("GET", "/ping", {})
        if status >= 400:
            raise InfluxError(f"InfluxDB at {self.url} refused /ping: HTTP {status} {_error_text(body)}",
                              status, _error_text(body))
        return str(headers.get("X-Influxdb-Version") or "unknown")

    async def write_lines(self, lines: Sequence[str], database: str | None = None) -> int:
        """Write line-protocol lines (ns precision) in requests of at most `batch_points` lines each.
        Returns when every request was answered 204, i.e. the points are durable in InfluxDB's WAL.
        Returns the number of points sent. InfluxWriteError on a 4xx, StoreUnavailable when unreachable."""
        db = database or self.database
        params = {"db": db, "precision": "ns"}
        size = self.batch_points
        for i in range(0, len(lines), size):
            chunk = lines[i:i + size]
            status, body, _ = await self._request("POST", "/write", params, "\n".join(chunk).encode())
            if status >= 300:
                text = _error_text(body)
                raise InfluxWriteError(
                    f"InfluxDB at {self.url} refused a write of {len(chunk)} points to database {db!r}: "
                    f"HTTP {status} {text}", status, text)
            self.points_written += len(chunk)
        return len(lines)

    async def query(self, influxql: str, params: dict[str, Any] | None = None, database: str | None = None,
                    exact: bool = False) -> list[dict[str, Any]]:
        """Run a read query (GET /query, `epoch=ns`) and return its rows as dicts: the columns (time in ns)
        plus the series' tags for GROUP BY queries, over every series and statement.

        Bind values with `params` (`WHERE symbol = $symbol`, params={"symbol": "BTC/USDT"}): values travel as
        JSON data, never as query text. With `exact=True` numbers with a fraction come back as Decimal, from
        the server's text (whole numbers stay int: InfluxDB's JSON writes the float 100.0 as `100`).
        InfluxQueryError when the server reports an error."""
        query = {"q": influxql, "db": database or self.database, "epoch": "ns"}
        if params:
            query["params"] = msgspec.json.encode(params).decode()
        status, body, _ = await self._request("GET", "/query", query)
        return self._rows(influxql, status, body, exact)

    async def execute(self, influxql: str, params: dict[str, Any] | None = None,
                      database: str | None = None) -> list[dict[str, Any]]:
        """Run a statement that changes something (CREATE, DROP, ...) with POST /query."""
        query = {"q": influxql}
        if database:
            query["db"] = database
        if params:
            query["params"] = msgspec.json.encode(params).decode()
        status, body, _ = await self._request("POST", "/query", query)
        return self._rows(influxql, status, body, False)

    async def create_database(self, database: str | None = None) -> None:
        """CREATE DATABASE (idempotent: an existing database is left as it is)."""
        await self.execute(f"CREATE DATABASE {quote_ident(database or self.database)}")

    def _rows(self, influxql: str, status: int, body: bytes, exact: bool) -> list[dict[str, Any]]:
        if status >= 300:
            text = _error_text(body)
            raise InfluxQueryError(
                f"InfluxDB at {self.url} refused the query {influxql!r}: HTTP {status} {text}", status, text)
        try:
            parsed = (self._results_exact if exact else self._results).decode(body)
        except msgspec.DecodeError as exc:
            raise InfluxQueryError(
                f"InfluxDB at {self.url} answered the query {influxql!r} with an unreadable body: {exc}",
                status, body[:500].decode(errors="replace")) from exc
        if parsed.error:
            raise InfluxQueryError(f"query {influxql!r} failed: {parsed.error}", status, parsed.error)
        rows: list[dict[str, Any]] = []
        for result in parsed.results:
            if result.get("error"):
                error = str(result["error"])
                raise InfluxQueryError(f"query {influxql!r} failed: {error}", status, error)
            for series in result.get("series") or ():
                columns = series.get("columns") or []
                tags = series.get("tags") or {}
                for values in series.get("values") or ():
                    row = dict(tags)
                    row.update(zip(columns, values, strict=False))
                    rows.append(row)
        return rows


def _error_text(body: bytes) -> str:
    """The `error` of an InfluxDB JSON error body, else the body's text (bounded)."""
    text = body.decode(errors="replace").strip()
    try:
        parsed = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return text[:2000]
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), str):
        return str(parsed["error"])
    return text[:2000]


__all__ = [
    "OHLCV", "TRADES", "InfluxClient", "InfluxError", "InfluxQueryError", "InfluxWriteError",
    "StoreUnavailable", "candle_line", "encode_candles", "encode_trades", "escape_measurement",
    "escape_string_field", "escape_tag", "quote_ident", "series_key", "trade_id_offset", "trade_line",
    "trade_timestamp",
]
