"""Binance public kline archives (data.binance.vision): the fastest way to load years of Binance history.

Layout (spot; the same under any data.binance.vision-compatible base URL, e.g. our simulator):
    {base}/data/spot/daily/klines/{SYMBOL}/{tf}/{SYMBOL}-{tf}-{YYYY-MM-DD}.zip      (+ .zip.CHECKSUM)
    {base}/data/spot/monthly/klines/{SYMBOL}/{tf}/{SYMBOL}-{tf}-{YYYY-MM}.zip       (+ .zip.CHECKSUM)
A zip holds one CSV of the same name; a CHECKSUM file is `<sha256 hex>  <zip name>`. Every zip is verified
against its CHECKSUM before a byte of it is read: a mismatch raises `ArchiveError` and nothing of that file
is written. A zip without a CHECKSUM is refused too (pass verify=False for a file you trust).

The CSV (no header on spot; a header line is accepted and skipped): open_time, open, high, low, close,
volume, close_time, quote_volume, count, taker_buy_base, taker_buy_quote, ignore. Timestamps are
milliseconds up to 2024 and microseconds in spot files from 2025-01-01 on. The unit is read per row from
close_time - open_time (timeframe - 1 ms, or timeframe - 1 us); a row that is neither is refused with the
file and line, never guessed.

Which files: whole calendar months inside the range use the monthly zip (one download instead of ~30), the
rest daily zips; a monthly zip the server does not have (404: not published yet) falls back to its days.
Days from today on are not asked for (Binance publishes a day's file the next day).
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from pathlib import Path

import aiohttp

from common.config import Settings
from common.domain.span import MS, NS, Span, from_datetime, timeframe_ns
from common.errors import MdpError
from common.exchanges.clients import rewrite_url
from schemas import Candle

REAL_BASE = "https://data.binance.vision"
QUOTES = ("USDT", "FDUSD", "USDC", "TUSD", "BUSD", "BTC", "ETH", "BNB", "EUR", "TRY", "BRL", "JPY", "DAI")
_NAME = re.compile(r"^(?P<symbol>[A-Z0-9]+)-(?P<tf>\d+[smhdwM])-(?P<date>\d{4}-\d{2}(?:-\d{2})?)\.zip$")
US = 1_000


class ArchiveError(MdpError, ValueError):
    """An archive that cannot be used: checksum mismatch, missing CHECKSUM, unreadable CSV. The message names
    the file, what is wrong and what to do; nothing of that file has been written."""


@dataclass(frozen=True, slots=True)
class ArchiveFile:
    """One archive zip: which market, timeframe and period it holds."""

    symbol_id: str  # BTCUSDT
    timeframe: str
    period: str  # YYYY-MM-DD (daily) or YYYY-MM (monthly)

    @property
    def monthly(self) -> bool:
        return len(self.period) == 7

    @property
    def name(self) -> str:
        return f"{self.symbol_id}-{self.timeframe}-{self.period}.zip"

    @property
    def span(self) -> Span:
        if self.monthly:
            y, m = (int(x) for x in self.period.split("-"))
            first = datetime(y, m, 1, tzinfo=UTC)
            nxt = datetime(y + (m == 12), m % 12 + 1, 1, tzinfo=UTC)
        else:
            first = datetime.fromisoformat(self.period).replace(tzinfo=UTC)
            nxt = first + timedelta(days=1)
        return Span(from_datetime(first), from_datetime(nxt))

    def url(self, base: str) -> str:
        kind = "monthly" if self.monthly else "daily"
        return f"{base.rstrip('/')}/data/spot/{kind}/klines/{self.symbol_id}/{self.timeframe}/{self.name}"

    @classmethod
    def from_name(cls, name: str) -> ArchiveFile:
        m = _NAME.match(name)
        if not m:
            raise ArchiveError(f"{name!r} is not a Binance kline archive name (SYMBOL-TF-YYYY-MM-DD.zip or "
                               f"SYMBOL-TF-YYYY-MM.zip, e.g. BTCUSDT-1m-2020-01-01.zip)")
        return cls(m["symbol"], m["tf"], m["date"])


def archive_base(settings: Settings, override: str | None = None) -> str:
    """The archive base URL: `override`, else backfill.archive_url, else data.binance.vision rewritten the way
    exchanges[binance].rest_url rewrites Binance's hosts (so the simulator config serves archives too)."""
    if override:
        return override.rstrip("/")
    if settings.backfill.archive_url:
        return settings.backfill.archive_url.rstrip("/")
    for ex in settings.exchanges:
        if ex.id == "binance" and ex.rest_url:
            return rewrite_url(REAL_BASE, ex.rest_url, ex.url_rewrite).rstrip("/")
    return REAL_BASE


def symbol_id(symbol: str) -> str:
    """BTC/USDT -> BTCUSDT (Binance spot ids); BTCUSDT stays. Archives here are spot only."""
    if ":" in symbol:
        raise ArchiveError(f"symbol {symbol!r} is a derivative; `mdp import` reads spot archives only "
                           f"(data/spot/...), give a spot symbol such as BTC/USDT")
    return symbol.replace("/", "").upper()


def unified_symbol(sym_id: str) -> str:
    """BTCUSDT -> BTC/USDT by the quote assets Binance lists most; ArchiveError when it cannot tell."""
    if "/" in sym_id:
        return sym_id
    for quote in QUOTES:
        if sym_id.endswith(quote) and len(sym_id) > len(quote):
            return f"{sym_id[:-len(quote)]}/{quote}"
    raise ArchiveError(f"cannot tell base and quote of {sym_id!r}; give the unified symbol with --symbol, "
                       f"e.g. --symbol BTC/USDT")


def files_for(sym_id: str, timeframe: str, start: date, end: date, today: date) -> list[ArchiveFile]:
    """The files covering days start..end (inclusive): monthly zips for whole months that ended before today,
    daily zips for the rest, no day from today on."""
    last = min(end, today - timedelta(days=1))
    out: list[ArchiveFile] = []
    day = start
    while day <= last:
        month_end = (day.replace(day=28) + timedelta(days=4)).replace(day=1) - timedelta(days=1)
        if day.day == 1 and month_end <= last and month_end < today:
            out.append(ArchiveFile(sym_id, timeframe, f"{day:%Y-%m}"))
            day = month_end + timedelta(days=1)
        else:
            out.append(ArchiveFile(sym_id, timeframe, f"{day:%Y-%m-%d}"))
            day += timedelta(days=1)
    return out


def days_of(f: ArchiveFile) -> list[ArchiveFile]:
    """The daily files of a monthly one (its fallback)."""
    span = f.span
    first = datetime.fromtimestamp(span.start / NS, tz=UTC).date()
    n = span.duration // (86_400 * NS)
    return [ArchiveFile(f.symbol_id, f.timeframe, f"{first + timedelta(days=i):%Y-%m-%d}") for i in range(n)]


def verify(blob: bytes, checksum_text: str | None, name: str) -> str:
    """The zip's sha256 if it matches its CHECKSUM text; ArchiveError otherwise."""
    actual = hashlib.sha256(blob).hexdigest()
    if checksum_text is None:
        raise ArchiveError(f"{name}: no CHECKSUM file to verify it against; refusing an unverifiable archive "
                           f"(download {name}.CHECKSUM from the same place, or import with verification off "
                           f"if you trust the file)")
    parts = checksum_text.split()
    expected = parts[0].lower() if parts else ""
    if len(parts) > 1 and parts[1].lstrip("*") != name:
        raise ArchiveError(f"{name}: its CHECKSUM file names {parts[1]!r}, not this file; nothing written")
    if not re.fullmatch(r"[0-9a-f]{64}", expected):
        raise ArchiveError(f"{name}: CHECKSUM file does not start with a sha256 hex digest "
                           f"({checksum_text[:80]!r}); nothing written")
    if actual != expected:
        raise ArchiveError(f"{name}: sha256 {actual} does not match its CHECKSUM {expected}: the download is "
                           f"corrupt or the file was changed; nothing of it was written. Download it again "
                           f"(or delete the local copy) and rerun.")
    return actual


@dataclass(frozen=True, slots=True)
class ArchiveRow:
    open_time_ns: int
    close_time_ns: int
    open: Decimal
    high: Decimal
    low: Decimal
    close: Decimal
    volume: Decimal
    unit: str  # "ms" or "us"


def read_rows(blob: bytes, name: str, timeframe: str) -> Iterator[ArchiveRow]:
    """The rows of a kline zip (checksum verified by the caller), each with its timestamp unit."""
    step = timeframe_ns(timeframe)
    try:
        with zipfile.ZipFile(io.BytesIO(blob)) as zf:
            members = [n for n in zf.namelist() if n.endswith(".csv")]
            if len(members) != 1:
                raise ArchiveError(f"{name}: expected one CSV inside, found {members}")
            text = zf.read(members[0]).decode("utf-8")
    except zipfile.BadZipFile as exc:
        raise ArchiveError(f"{name}: not a zip file ({exc}); nothing written") from None
    for lineno, cols in enumerate(csv.reader(io.StringIO(text)), 1):
        if not cols:
            continue
        if lineno == 1 and not cols[0].strip().isdigit():
            continue  # a header line (futures archives have one)
        if len(cols) < 7 or not cols[0].isdigit() or not cols[6].isdigit():
            raise ArchiveError(f"{name}:{lineno}: expected the 12-column kline CSV (open_time first), got "
                               f"{','.join(cols)[:100]!r}")
        open_t, close_t = int(cols[0]), int(cols[6])
        if close_t - open_t == step // MS - 1:
            unit, scale = "ms", MS
        elif close_t - open_t == step // US - 1:
            unit, scale = "us", US
        else:
            raise ArchiveError(f"{name}:{lineno}: open_time {open_t} and close_time {close_t} are not one "
                               f"{timeframe} apart in milliseconds nor in microseconds; refusing to guess the "
                               f"unit")
        try:
            o, h, lo, c, v = (Decimal(x) for x in cols[1:6])
        except InvalidOperation:
            raise ArchiveError(f"{name}:{lineno}: a price or volume is not a number: {cols[1:6]}") from None
        yield ArchiveRow(open_t * scale, (close_t + 1) * scale - 1 if unit == "ms" else close_t * scale,
                         o, h, lo, c, v, unit)


def to_candle(row: ArchiveRow, exchange: str, symbol: str, timeframe: str, ts_recv: int) -> Candle:
    """The Candle the live pipeline would carry for this bar: ts_event = the bar's last millisecond, as the
    collector stamps closed candles."""
    close_ms = row.open_time_ns // MS + timeframe_ns(timeframe) // MS - 1
    return Candle(exchange=exchange, symbol=symbol, timeframe=timeframe, open_time=row.open_time_ns,
                  open=row.open, high=row.high, low=row.low, close=row.close, volume=row.volume, closed=True,
                  ts_event=close_ms * MS, ts_recv=ts_recv, source="archive")


async def download(session: aiohttp.ClientSession, url: str) -> bytes | None:
    """The body of `url`; None for 404 (a file the server does not have); ArchiveError for other refusals."""
    async with session.get(url) as resp:
        if resp.status == 404:
            return None
        body = await resp.read()
        if resp.status != 200:
            raise ArchiveError(f"GET {url} answered HTTP {resp.status}: {body[:200]!r}")
        return body


def read_local(path: Path) -> tuple[bytes, str | None]:
    """A local zip and the text of its sibling CHECKSUM file (None when there is none)."""
    blob = path.read_bytes()
    checksum = path.with_name(path.name + ".CHECKSUM")
    return blob, checksum.read_text() if checksum.exists() else None


__all__ = ["REAL_BASE", "ArchiveError", "ArchiveFile", "ArchiveRow", "archive_base", "days_of", "download",
           "files_for", "read_local", "read_rows", "symbol_id", "to_candle", "unified_symbol", "verify"]
