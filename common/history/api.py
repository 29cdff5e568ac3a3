"""History for strategies: stored candles from InfluxDB as a DataFrame, and a feed that continues them live.

    from common.history import history, candles

    frame = await history("binance", "BTC/USDT", "1m", "2024-08-08", "2024-08-09")   # a pandas.DataFrame
    async with candles("binance", "BTC/USDT", "1m", start, redis=r) as feed:          # stored, then live
        async for candle in feed: ...

It lives in common/ beside the other strategy-facing helpers (common.stores.cache, common.strategy_events), so a
strategy imports one package for everything it reads and writes; it needs nothing beyond the InfluxDB client
and the bus encoding the services already use.

`history` reads the closed candles of one series in a required, bounded range [start, end) (one row per
open_time: a redelivered candle overwrote its point in InfluxDB). Exchange, symbol and timeframe travel as
bound query parameters (InfluxQL `params`: JSON data on 1.x and 2.x, escaped literals on 3.x, see
InfluxClient.query), never as query text. The range is capped at `max_rows` candles, so a query never asks
the server for an unbounded answer; a range of more than `SPLIT_ROWS` candles is read as windows of at most
`PAGE_ROWS`, two requests at a time (docs/bench-query.md).

`candles` is the seam between stored and live. The race it closes: candles published on
`md:candle:{exchange}:{symbol}` that the influx writer has not stored yet when InfluxDB is queried. So the
feed notes the stream's last entry id P BEFORE querying InfluxDB, yields the stored candles, then scans the
stream backwards from P to the newest entry that holds a candle it has already yielded, replays that entry
and those after it, and follows the stream from P with its own cursor. It yields a candle only if its open_time is
newer than the last one yielded: no duplicate, in order. A stream trimmed past the needed position (MAXLEN)
is detected (Redis 7 XINFO STREAM: entries removed and the first entry newer than the position): the feed
reads InfluxDB again, and raises FeedGapError when the candles after the seam are in neither place.
The feed reads with XREAD and its own cursor, not a consumer group: its position comes from what it has
yielded, and a group left behind by a stopped strategy would hold back every producer (backpressure counts
every group of a stream).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Self, cast

import numpy as np
import pandas as pd
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from common.bus import streams
from common.bus.core import StreamEntries
from common.config import Settings, load_settings
from common.errors import MdpError
from common.stores.influx import NS_PER_S, OHLCV, InfluxClient, InfluxQueryError, timeframe_seconds
from schemas import Candle, Codec, DecodeError

log = logging.getLogger(__name__)

DEFAULT_MAX_ROWS = 1_000_000  # ~1.9 years of 1m candles: a bound on one answer, not on what is stored
PAGE_ROWS = 10_000  # rows per request when a range is read in pages
COLUMNS = ("open", "high", "low", "close", "volume")
FIELDS = ("time", *COLUMNS, "quality")  # the columns of SELECT_CANDLES as InfluxDB answers them
SPLIT_ROWS = 2_000  # ranges of more candles are read as windows, QUERY_CONCURRENCY at a time
QUERY_CONCURRENCY = 2
# A closed candle is published at or after its close; entries XADDed (Redis clock) this long before a candle
# could close cannot hold it. Allows for that much skew between the exchange's clock and Redis's.
CLOCK_SKEW_NS = 300 * NS_PER_S
_MIN_NS = 10**15  # below this an int is seconds or milliseconds (1970-01-12 in ns), not nanoseconds

SELECT_CANDLES = ('SELECT "open", "high", "low", "close", "volume", "quality" FROM "' + OHLCV + '" '
                  'WHERE "exchange" = $exchange AND "symbol" = $symbol AND "timeframe" = $timeframe '
                  'AND time >= $start AND time < $end')


class HistoryRangeError(MdpError, ValueError):
    """A history range that is missing, inverted, unreadable or larger than the cap."""


class FeedGapError(MdpError, RuntimeError):
    """The candles after the seam are neither in InfluxDB nor in the stream (trimmed before they were stored)."""


def to_ns(value: datetime | int | str, name: str = "time") -> int:
    """Nanoseconds UTC of a timezone-aware datetime (or pandas.Timestamp), an int of ns, or ISO 8601 text
    (text without an offset is UTC). HistoryRangeError for anything else."""
    if isinstance(value, bool):
        raise HistoryRangeError(f"{name} = {value!r} is not a time; give a datetime, ns int or ISO text")
    if isinstance(value, int):
        if 0 < value < _MIN_NS:
            raise HistoryRangeError(f"{name} = {value} looks like seconds or milliseconds; give nanoseconds "
                                    f"(e.g. {value * NS_PER_S if value < 10**11 else value * 1_000_000})")
        return value
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.strip())
        except ValueError:
            raise HistoryRangeError(f"{name} = {value!r} is not ISO 8601 text like \"2024-08-08T00:00:00Z\"") \
                from None
        value = parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    if isinstance(value, pd.Timestamp):
        if value.tzinfo is None:
            raise HistoryRangeError(f"{name} = {value!r} has no timezone; use pd.Timestamp(..., tz='UTC')")
        return int(value.value)
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise HistoryRangeError(f"{name} = {value!r} has no timezone; use datetime(..., tzinfo=timezone.utc)")
        delta = value - datetime(1970, 1, 1, tzinfo=UTC)
        return (delta.days * 86_400 + delta.seconds) * NS_PER_S + delta.microseconds * 1000
    raise HistoryRangeError(f"{name} = {value!r} is a {type(value).__name__}; give a datetime, ns int or ISO text")


def _series(exchange: str, symbol: str, timeframe: str) -> int:
    """The timeframe's length in ns, after checking the series' names (ValueError names the bad one)."""
    for name, value in (("exchange", exchange), ("symbol", symbol), ("timeframe", timeframe)):
        if not isinstance(value, str) or not value:
            raise ValueError(f"{name} = {value!r}: give a non-empty string like 'binance', 'BTC/USDT', '1m'")
    return timeframe_seconds(timeframe) * NS_PER_S


def _bounds(start_ns: int, end_ns: int, tf_ns: int, max_rows: int, last: int | None) -> None:
    if end_ns <= start_ns:
        raise HistoryRangeError(f"end ({end_ns}) is not after start ({start_ns}); the range is [start, end)")
    if last is not None:
        if not 0 < last <= max_rows:
            raise HistoryRangeError(f"last = {last}: give 1..{max_rows} (max_rows)")
        return
    rows = -(-(end_ns - start_ns) // tf_ns)
    if rows > max_rows:
        raise HistoryRangeError(f"the range spans {rows} candles, more than max_rows = {max_rows}; narrow the range, "
                                f"read it in parts, pass a larger max_rows, or use candles() to stream it")


async def stored_values(client: InfluxClient, exchange: str, symbol: str, timeframe: str, start_ns: int,
                        end_ns: int, *, last: int | None = None, exact: bool = False,
                        page_rows: int = PAGE_ROWS) -> AsyncIterator[list[list[Any]]]:
    """Pages of stored rows of one series with start_ns <= time < end_ns, oldest first, each row a list in
    the order of `FIELDS` (time in ns first). Pages of `page_rows` rows, each request continuing after the
    last time of the previous one (keyset pagination). With `last`, one page: the newest `last` rows."""
    try:
        database, rp = client.tier_for(timeframe)
    except RuntimeError:  # the server's generation, hence where the tier lives, is learnt on connecting
        await client.connect()
        database, rp = client.tier_for(timeframe)
    params: dict[str, Any] = {"exchange": exchange, "symbol": symbol, "timeframe": timeframe,
                              "start": start_ns, "end": end_ns}
    if last is not None:
        newest = f"{SELECT_CANDLES} ORDER BY time DESC LIMIT {int(last)}"
        columns, rows = await client.query_values(newest, params, database, exact, rp)
        _check_columns(columns)
        rows.reverse()
        yield rows
        return
    query = f"{SELECT_CANDLES} ORDER BY time ASC LIMIT {int(page_rows)}"
    while True:
        columns, rows = await client.query_values(query, params, database, exact, rp)
        _check_columns(columns)
        if rows:
            yield rows
        if len(rows) < page_rows:
            return
        params["start"] = int(rows[-1][0]) + 1


def _check_columns(columns: list[str]) -> None:
    if columns and tuple(columns) != FIELDS:
        raise InfluxQueryError(f"InfluxDB answered columns {columns}, not {list(FIELDS)}: the query is wrong")


async def _stored_range(client: InfluxClient, exchange: str, symbol: str, timeframe: str, start_ns: int,
                        end_ns: int, tf_ns: int) -> list[list[Any]]:
    """Every stored row of the range. A range of more than SPLIT_ROWS candles is read as windows, two at
    a time: the server's time grows with rows x fields, and two requests use both of its cores (a year of 1h
    candles: ~50 ms as one request, ~30 ms as two, measured in docs/bench-query.md)."""
    expected = -(-(end_ns - start_ns) // tf_ns)
    if expected <= SPLIT_ROWS:
        windows = [(start_ns, end_ns)]
    else:
        size = min(PAGE_ROWS, -(-expected // QUERY_CONCURRENCY)) * tf_ns
        windows = [(t, min(t + size, end_ns)) for t in range(start_ns, end_ns, size)]
    slots = asyncio.Semaphore(QUERY_CONCURRENCY)

    async def window(first: int, stop: int) -> list[list[Any]]:
        async with slots:
            return [row async for page in stored_values(client, exchange, symbol, timeframe, first, stop)
                    for row in page]

    parts = await asyncio.gather(*(window(a, b) for a, b in windows))
    return [row for part in parts for row in part]


def frame(rows: Sequence[Sequence[Any]]) -> pd.DataFrame:
    """The DataFrame of stored rows (`FIELDS` order): index open_time (UTC), OHLCV as float64, quality ("" when
    none). Built column-wise from the rows, with no object per row."""
    columns = list(zip(*rows, strict=True)) if rows else [()] * len(FIELDS)
    index = pd.DatetimeIndex(np.array(columns[0], dtype=np.int64).view("M8[ns]"), name="open_time")
    data: dict[str, Any] = {name: np.array(columns[i + 1], dtype=np.float64) for i, name in enumerate(COLUMNS)}
    data["quality"] = np.array([q or "" for q in columns[-1]], dtype=object)
    return pd.DataFrame(data, index=index.tz_localize("UTC"), copy=False)


async def history(exchange: str, symbol: str, timeframe: str, start: datetime | int | str,
                  end: datetime | int | str, *, settings: Settings | None = None,
                  client: InfluxClient | None = None, max_rows: int = DEFAULT_MAX_ROWS,
                  last: int | None = None) -> pd.DataFrame:
    """The stored closed candles of one series with start <= open_time < end, as a DataFrame (see `frame`).

    `last=N` keeps only the newest N candles of the range (one request: ORDER BY time DESC LIMIT N).
    Pass an open `client` (InfluxClient) to reuse its connection across calls; otherwise one is made from
    `settings` (default: load_settings(), i.e. MDP_CONFIG and MDP_* overrides) and closed after the call.
    HistoryRangeError for a bad or too large range; InfluxQueryError / StoreUnavailable from the server."""
    tf_ns = _series(exchange, symbol, timeframe)
    start_ns, end_ns = to_ns(start, "start"), to_ns(end, "end")
    _bounds(start_ns, end_ns, tf_ns, max_rows, last)
    own = client is None
    influx = InfluxClient((settings or load_settings()).influx) if client is None else client
    try:
        if last is None:
            return frame(await _stored_range(influx, exchange, symbol, timeframe, start_ns, end_ns, tf_ns))
        return frame([row async for page in stored_values(influx, exchange, symbol, timeframe, start_ns, end_ns,
                                                          last=last) for row in page])
    finally:
        if own:
            await influx.close()


def history_sync(exchange: str, symbol: str, timeframe: str, start: datetime | int | str,
                 end: datetime | int | str, *, settings: Settings | None = None,
                 max_rows: int = DEFAULT_MAX_ROWS, last: int | None = None) -> pd.DataFrame:
    """`history` for code without an event loop (a notebook cell, a script). Inside async code, await
    `history` instead: this one refuses to run in a running event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(history(exchange, symbol, timeframe, start, end, settings=settings, max_rows=max_rows,
                                   last=last))
    raise RuntimeError("history_sync() was called inside a running event loop; use `await history(...)` there")


# -- the feed: stored, then live ------------------------------------------------------------------------

def _id(entry_id: bytes | str) -> tuple[int, int]:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def _text(entry_id: bytes | str) -> str:
    return entry_id.decode() if isinstance(entry_id, bytes) else entry_id


def trimmed_past(cursor: str, info: Mapping[str, Any]) -> bool:
    """True when entries after `cursor` may have been removed from the stream unread: some entry was
    removed (XINFO STREAM entries-added > length, Redis 7.0+) and the first entry left is newer than the
    cursor (trimming removes the oldest entries, so the cursor's own entry is gone)."""
    removed = int(info["entries-added"]) - int(info["length"])
    first = info.get("recorded-first-entry-id") or (info.get("first-entry") or (b"0-0",))[0]
    return removed > 0 and _id(first) > _id(cursor)


def _decimal(value: Any) -> Decimal:
    return value if isinstance(value, Decimal) else Decimal(value)


class CandleFeed:
    """Closed candles of one series from `start` on: the stored ones, then live ones from the stream, each
    once and in open_time order. Use as `async with candles(...) as feed: async for candle in feed: ...`.

    Candles read from InfluxDB carry what InfluxDB keeps (OHLCV as Decimals equal to the stored values,
    from the server's text of the float64, so "61000.00" comes back as 61000; quality);
    InfluxDB keeps no `source` nor receipt times, so those have the schema's default source, and ts_event
    = ts_recv = the bar's last nanosecond. `live` turns True once candles come from the stream.
    A candle that reaches the stream after a newer one of its series was yielded is not yielded (it is
    stored, for a later `history` call): the feed never goes back in time."""

    def __init__(self, exchange: str, symbol: str, timeframe: str, start: datetime | int | str, *,
                 redis: aioredis.Redis, settings: Settings | None = None, client: InfluxClient | None = None,
                 block_ms: int = 1000, read_count: int = 100, scan_count: int = 100) -> None:
        self.tf_ns = _series(exchange, symbol, timeframe)
        self.exchange, self.symbol, self.timeframe = exchange, symbol, timeframe
        settings = settings or load_settings()
        self.stream = streams.located(streams.market_data("candle", exchange, symbol), settings.bus)
        self.redis = redis
        self.client = InfluxClient(settings.influx) if client is None else client
        self._own_client = client is None
        self.block_ms, self.read_count, self.scan_count = block_ms, read_count, scan_count
        self.codec = Codec()
        self.after = to_ns(start, "start") - 1  # open_time of the last candle yielded (or just before start)
        self.live = False
        self.resyncs = 0  # times the stream was found trimmed past the feed's position and InfluxDB read again
        self.from_store = 0
        self.from_stream = 0

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._own_client:
            await self.client.close()

    def __aiter__(self) -> AsyncIterator[Candle]:
        return self._run()

    async def _run(self) -> AsyncIterator[Candle]:
        while True:
            cursor = ""
            async for candle, cursor in self._catch_up():
                if candle is not None:
                    yield candle
            async for candle in self._follow(cursor):
                yield candle
            self.resyncs += 1
            self.live = False
            log.warning("%s was trimmed past this feed's position (after open_time %d); reading InfluxDB again",
                        self.stream, self.after)

    def _take(self, candle: Candle) -> bool:
        """Whether to yield this candle (closed, of this series, newer than the last yielded); records it."""
        if (not candle.closed or candle.timeframe != self.timeframe or candle.open_time <= self.after
                or candle.symbol != self.symbol or candle.exchange != self.exchange):
            return False
        self.after = candle.open_time
        return True

    def _candles(self, entry_id: bytes | str, fields: dict[bytes, bytes]) -> list[Candle]:
        try:
            events = self.codec.decode_entry(fields)
        except DecodeError as exc:
            raise DecodeError(f"entry {_text(entry_id)} of {self.stream} cannot be decoded ({exc}); it was written "
                              f"by a newer or foreign producer: upgrade this code") from exc
        return [e for e in events if isinstance(e, Candle) and e.timeframe == self.timeframe and e.closed]

    async def _last_id(self) -> str:
        newest = cast(StreamEntries, await self.redis.xrevrange(self.stream, "+", "-", count=1))
        return _text(newest[0][0]) if newest else "0-0"

    async def _info(self) -> dict[str, Any] | None:
        try:
            info: dict[str, Any] = await self.redis.xinfo_stream(self.stream)
        except ResponseError as exc:
            if "no such key" in str(exc).lower():
                return None
            raise
        return info

    async def _catch_up(self) -> AsyncIterator[tuple[Candle | None, str]]:
        """Stored candles after `self.after`, then the stream's entries the store may lack; the last pair
        carries the cursor to follow from. Reads InfluxDB again while the stream cannot bridge the seam."""
        while True:
            cursor = await self._last_id()  # BEFORE the store: whatever is published later is after it
            stored = 0
            until = time.time_ns()
            async for rows in stored_values(self.client, self.exchange, self.symbol, self.timeframe,
                                            self.after + 1, until, exact=True):
                for row in rows:
                    candle = self._stored_candle(row)
                    if self._take(candle):
                        stored += 1
                        self.from_store += 1
                        yield candle, cursor
            bridge = await self._bridge(cursor)
            if bridge is not None:
                self.live = True
                for candle in bridge:
                    if self._take(candle):
                        self.from_stream += 1
                        yield candle, cursor
                yield None, cursor
                return
            if not stored:
                raise FeedGapError(
                    f"{self.stream} was trimmed past the seam: the {self.timeframe} candles after open_time "
                    f"{self.after} are not in InfluxDB and no longer in the stream. The influx writer is behind by "
                    f"more than bus.stream_maxlen entries or not running: check `mdp status`, then start the "
                    f"feed again (or fill the hole with `mdp backfill`)")
            self.resyncs += 1  # InfluxDB had more: try the seam again from there

    def _stored_candle(self, row: Sequence[Any]) -> Candle:
        time_, open_, high, low, close, volume, quality = row
        open_time = int(time_)
        bar_end = open_time + self.tf_ns - 1
        return Candle(exchange=self.exchange, symbol=self.symbol, timeframe=self.timeframe, open_time=open_time,
                      open=_decimal(open_), high=_decimal(high), low=_decimal(low), close=_decimal(close),
                      volume=_decimal(volume), closed=True, ts_event=bar_end, ts_recv=bar_end,
                      quality=tuple(str(quality).split(",")) if quality else ())

    async def _bridge(self, cursor: str) -> list[Candle] | None:
        """The closed candles of the entries up to `cursor` that may be newer than the store's, oldest first:
        scanning back from `cursor` to the newest entry holding a candle already yielded (or one published
        before the next candle could close). None when the stream was trimmed past that point and its oldest
        candle does not follow the last yielded one."""
        if cursor == "0-0":
            return []
        newest_first: list[list[Candle]] = []
        high = cursor
        stop_before_ms = (self.after + self.tf_ns - CLOCK_SKEW_NS) // 1_000_000
        while True:
            page = cast(StreamEntries, await self.redis.xrevrange(self.stream, high, "-", count=self.scan_count))
            for entry_id, fields in page:
                found = self._candles(entry_id, fields)
                newest_first.append(found)
                if any(c.open_time <= self.after for c in found) or _id(entry_id)[0] < stop_before_ms:
                    return [c for batch in reversed(newest_first) for c in batch]
            if len(page) < self.scan_count:
                break
            high = "(" + _text(page[-1][0])
        info = await self._info()
        bridge = [c for batch in reversed(newest_first) for c in batch]
        if info is None or int(info["entries-added"]) == int(info["length"]):
            return bridge  # nothing ever removed: the scan saw the whole stream
        first_new = min((c.open_time for c in bridge if c.open_time > self.after), default=None)
        if first_new is not None and first_new <= self.after + self.tf_ns:
            return bridge  # the oldest candle left is the next one after the last yielded (or after start)
        return None

    async def _follow(self, cursor: str) -> AsyncIterator[Candle]:
        """Live candles after `cursor`; returns when the stream was trimmed past it (the caller resyncs).
        Each read is XREAD + XINFO STREAM in one MULTI, so the trim check sees what the read saw; when
        nothing is new, a blocking XREAD serves only as the wake-up."""
        while True:
            pipe = self.redis.pipeline(transaction=True)
            pipe.xread({self.stream: cursor}, count=self.read_count)
            pipe.xinfo_stream(self.stream)
            try:
                got, info = await pipe.execute()
            except ResponseError as exc:
                if "no such key" not in str(exc).lower():
                    raise
                got, info = [], None
            if info is not None and trimmed_past(cursor, info):
                return
            entries = got[0][1] if got else []
            for entry_id, fields in entries:
                for candle in self._candles(entry_id, fields):
                    if self._take(candle):
                        self.from_stream += 1
                        yield candle
                cursor = _text(entry_id)
            if not entries:
                await self.redis.xread({self.stream: cursor}, count=1, block=self.block_ms)


def candles(exchange: str, symbol: str, timeframe: str, start: datetime | int | str, *, redis: aioredis.Redis,
            settings: Settings | None = None, client: InfluxClient | None = None,
            block_ms: int = 1000) -> CandleFeed:
    """The closed candles of one series from `start` on: stored ones from InfluxDB, then live ones from
    `md:candle:{exchange}:{symbol}`, with no gap and no duplicate at the seam (see CandleFeed)."""
    return CandleFeed(exchange, symbol, timeframe, start, redis=redis, settings=settings, client=client,
                      block_ms=block_ms)


__all__ = ["DEFAULT_MAX_ROWS", "CandleFeed", "FeedGapError", "HistoryRangeError", "candles", "frame", "history",
           "history_sync", "stored_values", "to_ns", "trimmed_past"]
