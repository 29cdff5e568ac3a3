"""The real Binance spot recordings the simulator replays, and the exact data a replay sends.

Sources (all under the shared real-data folder, see `real_data_dir`; nothing here is synthetic):
- `ws-captures/binance_spot_{symbol}_*.gz`: raw WebSocket traffic, one line per message,
  `<local receive ns> <combined-stream JSON>`. The `@trade` and `@bookTicker` messages are replayed in
  recorded order; with `depth=True` also the `@depth@100ms` diffs, and the REST depth snapshot line is kept as
  the symbol's snapshot (simulator/depth.py says how both are served). Files of one symbol are read in
  name order (they are consecutive); several symbols are merged by receive time.
- `binance-spot-1m-daily/BTCUSDT-1m-*.zip`: data.binance.vision daily 1m klines (12-column CSV), checked
  against their `.CHECKSUM` files, served by REST as they are.
- `cryptofeed-captures/BINANCE.0`: a recorded `GET /api/v3/exchangeInfo` response (2021-10-12).

Derived data (the captures hold no kline stream, so it is computed here, and documented as derived):
- 1m candles aggregated from the recorded trades, bucketed by trade time `T`: open/close = first/last trade
  price, high/low, volume = sum(qty), count, first/last trade id, taker-buy volume = sum(qty) of trades whose
  buyer was the taker (`m` false). Quote volumes are sum(price*qty) computed exactly and truncated to
  8 decimals. The first candle of a recording starts mid-minute, so it is partial; the last one is closed
  when the recording ends. A minute without trades between two traded minutes becomes an empty candle
  (o=h=l=c=previous close, zero volume, f=L=-1), as Binance publishes one.
- Kline events: after each trade an open-kline update (`x` false, optionally throttled by trade time), and
  the closed kline (`x` true) when the first trade of a later minute is replayed, or at the end of the
  recording. Their `E` is the event time of the trade that caused them.

Looping: loop k shifts every timestamp by k * `loop_shift_ms` (the recording's span rounded up to whole
minutes, so derived candles never collide and stay identical) and every trade id (and bookTicker update id)
by k * the recording's id span, so no two replayed trades share an id or a time bucket across loops.
`--shift-to-now` adds a further whole-minute offset for the same reason.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import heapq
import io
import os
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, cast

import msgspec

from simulator.depth import DepthDiff, DepthSnapshot, load_depth

MINUTE_MS = 60_000
SCALE = 10**8  # Binance prints prices and quantities with 8 decimals
DEFAULT_SYMBOLS: tuple[str, ...] = ("BTCUSDT",)
DATA_ENV = "MDP_REAL_DATA"


class RecordingFormatError(ValueError):
    """A recorded file is not in the format this loader reads; the message names the file and line."""


SHIPPED_DATA = Path("data") / "real"  # under the project root: the licensed recordings (data/real/NOTICE)
# Folders of the shared real-data set that are not shipped (their sources state no licence): read only from
# $MDP_REAL_DATA or ../shared/data/real.
UNSHIPPED_FOLDERS = ("binance-spot-1h", "binance-spot-1m-ccxt", "binance-usdm-1m", "binanceus-kraken-2023-03")


def real_data_dir(project_root: Path | None = None) -> Path:
    """The real-data folder, first found of: $MDP_REAL_DATA, `<project root>/../shared/data/real` (the full
    set), `<project root>/data/real` (the licensed recordings shipped with the project, enough for the demo).
    A folder named by $MDP_REAL_DATA that does not exist is an error, never skipped over."""
    env = os.environ.get(DATA_ENV)
    if env:
        path = Path(env)
        if not path.is_dir():
            raise FileNotFoundError(f"{DATA_ENV}={env} is not a folder; point it at a folder that holds "
                                    f"ws-captures/, binance-spot-1m-daily/ and cryptofeed-captures/, or unset it "
                                    f"to use ../shared/data/real or the shipped data/real")
        return path.resolve()
    root = project_root or Path(__file__).resolve().parents[1]
    candidates = (root.parent / "shared" / "data" / "real", root / SHIPPED_DATA)
    for path in candidates:
        if path.is_dir():
            return path.resolve()
    raise FileNotFoundError(f"real recordings not found at {candidates[0]} nor at {candidates[1]} (shipped with "
                            f"the repository: is the clone complete?); set {DATA_ENV} to the folder that holds "
                            f"ws-captures/, binance-spot-1m-daily/ and cryptofeed-captures/")


def is_shipped(data_dir: Path, project_root: Path | None = None) -> bool:
    """True when `data_dir` is the project's shipped data/real (without the unlicensed folders)."""
    root = project_root or Path(__file__).resolve().parents[1]
    return data_dir.resolve() == (root / SHIPPED_DATA).resolve()


# ----------------------------------------------------------------------------------------------------------
# Data the replay sends


class Trade(msgspec.Struct, frozen=True):
    """One recorded spot trade (Binance `trade` event fields), in replay order."""

    symbol: str  # exchange id, e.g. "BTCUSDT"
    id: int  # t
    price: str  # p, as recorded ("61837.63000000")
    qty: str  # q
    time: int  # T, trade time in ms
    event_time: int  # E, ms
    is_buyer_maker: bool  # m
    best_match: bool  # M
    recv_ns: int  # local receive time in the capture (drives replay pacing)

    @property
    def side(self) -> Literal["buy", "sell"]:
        """The taker's side, as ccxt reports it: the buyer was the maker, so the taker sold."""
        return "sell" if self.is_buyer_maker else "buy"

    def shifted(self, id_shift: int, time_shift_ms: int, recv_shift_ns: int = 0) -> Trade:
        if not (id_shift or time_shift_ms or recv_shift_ns):
            return self
        return msgspec.structs.replace(self, id=self.id + id_shift, time=self.time + time_shift_ms,
                                       event_time=self.event_time + time_shift_ms,
                                       recv_ns=self.recv_ns + recv_shift_ns)


class Candle(msgspec.Struct, frozen=True):
    """A 1m candle in Binance's text format (8-decimal strings), from a daily zip or derived from trades."""

    symbol: str
    open_time: int  # ms
    close_time: int  # open_time + 59_999
    open: str
    high: str
    low: str
    close: str
    volume: str
    quote_volume: str
    count: int
    taker_buy_volume: str
    taker_buy_quote_volume: str
    first_trade_id: int = -1
    last_trade_id: int = -1

    def rest_row(self) -> list[Any]:
        """The row of `GET /api/v3/klines`."""
        return [self.open_time, self.open, self.high, self.low, self.close, self.volume, self.close_time,
                self.quote_volume, self.count, self.taker_buy_volume, self.taker_buy_quote_volume, "0"]

    def ccxt_row(self) -> list[float | int]:
        """What ccxt's `fetch_ohlcv` / `watch_ohlcv` return for this candle: [t, o, h, l, c, v]."""
        return [self.open_time, float(self.open), float(self.high), float(self.low), float(self.close),
                float(self.volume)]

    def shifted(self, id_shift: int, time_shift_ms: int) -> Candle:
        if not (id_shift or time_shift_ms):
            return self
        has_trades = self.first_trade_id >= 0
        return msgspec.structs.replace(
            self, open_time=self.open_time + time_shift_ms, close_time=self.close_time + time_shift_ms,
            first_trade_id=self.first_trade_id + id_shift if has_trades else -1,
            last_trade_id=self.last_trade_id + id_shift if has_trades else -1)


class BookTicker(msgspec.Struct, frozen=True):
    """A recorded `bookTicker` message (spot: no event time; `u` is the order book update id)."""

    symbol: str
    update_id: int
    bid: str
    bid_qty: str
    ask: str
    ask_qty: str
    recv_ns: int


class TradeEvent(msgspec.Struct, frozen=True):
    recv_ns: int
    trade: Trade


class KlineEvent(msgspec.Struct, frozen=True):
    recv_ns: int
    event_time: int
    candle: Candle
    closed: bool


class BookTickerEvent(msgspec.Struct, frozen=True):
    recv_ns: int
    book: BookTicker


class DepthEvent(msgspec.Struct, frozen=True):
    recv_ns: int
    diff: DepthDiff


ReplayEvent = TradeEvent | KlineEvent | BookTickerEvent | DepthEvent
# Loop k shifts depth update ids by k * (the recording's id span + this), so the chain visibly breaks at a loop:
# the book restarts from the recorded snapshot and clients resync, as after a gap.
DEPTH_LOOP_JUMP = 1_000_000


# ----------------------------------------------------------------------------------------------------------
# Decimal text <-> scaled integers (exact arithmetic for the derived candles)


def to_units(text: str) -> int:
    """'61837.63000000' -> 6183763000000 (units of 1e-8); refuses signs and more than 8 decimals."""
    whole, _, frac = text.partition(".")
    if len(frac) > 8 or not whole.isdigit() or (frac and not frac.isdigit()):
        raise RecordingFormatError(f"not a Binance 8-decimal number: {text!r}")
    return int(whole) * SCALE + int(frac.ljust(8, "0"))


def units_text(units: int) -> str:
    return f"{units // SCALE}.{units % SCALE:08d}"


class _CandleBuilder:
    """Accumulates the trades of one minute in exact integer units."""

    __slots__ = ("c", "first_id", "h", "l", "last_id", "n", "o", "open_time", "qv", "symbol", "tqv", "tv", "v")

    def __init__(self, symbol: str, open_time: int) -> None:
        self.symbol = symbol
        self.open_time = open_time
        self.o = self.h = self.l = self.c = 0
        self.v = self.qv = self.tv = self.tqv = 0  # qv, tqv in units of 1e-16
        self.n = 0
        self.first_id = self.last_id = -1

    @classmethod
    def empty(cls, symbol: str, open_time: int, previous_close: int) -> _CandleBuilder:
        b = cls(symbol, open_time)
        b.o = b.h = b.l = b.c = previous_close
        return b

    def add(self, trade: Trade) -> None:
        p, q = to_units(trade.price), to_units(trade.qty)
        if self.n == 0:
            self.o = self.h = self.l = p
            self.first_id = trade.id
        self.h = max(self.h, p)
        self.l = min(self.l, p)
        self.c = p
        self.v += q
        self.qv += p * q
        if not trade.is_buyer_maker:
            self.tv += q
            self.tqv += p * q
        self.n += 1
        self.last_id = trade.id

    def candle(self) -> Candle:
        return Candle(
            symbol=self.symbol, open_time=self.open_time, close_time=self.open_time + MINUTE_MS - 1,
            open=units_text(self.o), high=units_text(self.h), low=units_text(self.l), close=units_text(self.c),
            volume=units_text(self.v), quote_volume=units_text(self.qv // SCALE), count=self.n,
            taker_buy_volume=units_text(self.tv), taker_buy_quote_volume=units_text(self.tqv // SCALE),
            first_trade_id=self.first_id, last_trade_id=self.last_id)


# ----------------------------------------------------------------------------------------------------------
# Reading the captures


class _Envelope(msgspec.Struct):
    stream: str
    data: msgspec.Raw


class _RawTrade(msgspec.Struct):
    e: str
    E: int
    s: str
    t: int
    p: str
    q: str
    T: int
    m: bool
    M: bool


class _RawBookTicker(msgspec.Struct):
    u: int
    s: str
    b: str
    B: str
    a: str
    A: str


_envelope = msgspec.json.Decoder(_Envelope)
_raw_trade = msgspec.json.Decoder(_RawTrade)
_raw_book = msgspec.json.Decoder(_RawBookTicker)


@functools.lru_cache(maxsize=16)
def _read_capture(path: Path, mtime_ns: int) -> tuple[tuple[Trade, ...], tuple[BookTicker, ...]]:
    """Trades and bookTickers of one capture file (cached per file version: parsing is the slow part)."""
    del mtime_ns  # part of the cache key only
    trades: list[Trade] = []
    books: list[BookTicker] = []
    with gzip.open(path, "rb") as fh:
        for lineno, line in enumerate(fh, 1):
            ts, sep, payload = line.partition(b" ")
            if not sep or not ts.isdigit() or not payload.startswith(b"{"):
                raise RecordingFormatError(f"{path}:{lineno}: expected '<receive ns> <json>', got {line[:80]!r}")
            if not payload.startswith(b'{"stream":'):
                continue  # the REST depth snapshot line
            head = payload[:64]
            if b"@trade" in head:
                env = _envelope.decode(payload)
                if not env.stream.endswith("@trade"):
                    continue
                raw = _raw_trade.decode(env.data)
                if raw.e != "trade":
                    raise RecordingFormatError(f"{path}:{lineno}: stream {env.stream} carries event {raw.e!r}")
                trades.append(Trade(symbol=raw.s, id=raw.t, price=raw.p, qty=raw.q, time=raw.T, event_time=raw.E,
                                    is_buyer_maker=raw.m, best_match=raw.M, recv_ns=int(ts)))
            elif b"@bookTicker" in head:
                env = _envelope.decode(payload)
                rb = _raw_book.decode(env.data)
                books.append(BookTicker(symbol=rb.s, update_id=rb.u, bid=rb.b, bid_qty=rb.B, ask=rb.a,
                                        ask_qty=rb.A, recv_ns=int(ts)))
    return tuple(trades), tuple(books)


def capture_files(data_dir: Path, symbol: str) -> list[Path]:
    folder = data_dir / "ws-captures"
    files = sorted(folder.glob(f"binance_spot_{symbol.lower()}_*.gz"))
    if not files:
        raise FileNotFoundError(f"no spot capture for {symbol} in {folder} (expected binance_spot_"
                                f"{symbol.lower()}_YYYYMMDD.gz)")
    return files


def _events_of(data_dir: Path, symbol: str, book_ticker: bool,
               depth: list[DepthDiff] | None = None) -> Iterator[TradeEvent | BookTickerEvent | DepthEvent]:
    """One symbol's trade (and bookTicker, and depth) events in recorded order, checked to be in order."""
    last_recv = -1
    last_id: int | None = None
    depth_events = iter([DepthEvent(d.recv_ns, d) for d in depth or ()])
    pending_depth = next(depth_events, None)
    files = capture_files(data_dir, symbol)
    for path in files:
        trades, books = _read_capture(path, path.stat().st_mtime_ns)
        end_ns = max([t.recv_ns for t in trades[-1:]] + [b.recv_ns for b in books[-1:]] + [0])
        file_depth: list[DepthEvent] = []  # the diffs of this file: those up to its last trade/bookTicker
        while pending_depth is not None and (pending_depth.recv_ns <= end_ns or path == files[-1]):
            file_depth.append(pending_depth)
            pending_depth = next(depth_events, None)
        merged: Iterable[TradeEvent | BookTickerEvent | DepthEvent] = heapq.merge(
            (TradeEvent(t.recv_ns, t) for t in trades),
            (BookTickerEvent(b.recv_ns, b) for b in books) if book_ticker else (),
            file_depth,
            key=lambda e: e.recv_ns)
        for ev in merged:
            if ev.recv_ns < last_recv:
                raise RecordingFormatError(f"{path}: receive times go backwards at {ev.recv_ns}")
            last_recv = ev.recv_ns
            if isinstance(ev, TradeEvent):
                if ev.trade.symbol != symbol:
                    raise RecordingFormatError(f"{path}: trade of {ev.trade.symbol} in the {symbol} capture")
                if last_id is not None and ev.trade.id <= last_id:
                    raise RecordingFormatError(f"{path}: trade id {ev.trade.id} after {last_id}")
                last_id = ev.trade.id
            yield ev


# ----------------------------------------------------------------------------------------------------------
# The recording


class Recording:
    """What one pass of the replay sends, in order; built by `Recording.load`.

    `trades` and `candles` (the closed 1m candles) are those of loop 0 with no time offset; use
    `trades_in_loop` / `candles_in_loop` for later loops or a `--shift-to-now` offset.
    """

    def __init__(self, symbols: tuple[str, ...], events: list[ReplayEvent], data_dir: Path,
                 snapshots: dict[str, DepthSnapshot] | None = None) -> None:
        self.symbols = symbols
        self.events = events
        self.data_dir = data_dir
        self.snapshots: dict[str, DepthSnapshot] = snapshots or {}  # recorded REST depth snapshot per symbol
        self.trades: list[Trade] = [e.trade for e in events if isinstance(e, TradeEvent)]
        self.candles: list[Candle] = [e.candle for e in events if isinstance(e, KlineEvent) and e.closed]
        if not self.trades:
            raise RecordingFormatError(f"no trades recorded for {symbols} in {data_dir}")
        first_minute = min(t.time for t in self.trades) // MINUTE_MS
        last_minute = max(t.time for t in self.trades) // MINUTE_MS
        self.loop_shift_ms = (last_minute - first_minute + 1) * MINUTE_MS
        self.first_recv_ns = events[0].recv_ns
        self.id_span: dict[str, int] = {}
        self.book_id_span: dict[str, int] = {}
        for sym in symbols:
            ids = [t.id for t in self.trades if t.symbol == sym]
            self.id_span[sym] = (max(ids) - min(ids) + 1) if ids else 0
            uids = [e.book.update_id for e in events if isinstance(e, BookTickerEvent) and e.book.symbol == sym]
            self.book_id_span[sym] = (max(uids) - min(uids) + 1) if uids else 0
        self.depth_id_span: dict[str, int] = {}
        for sym in self.snapshots:
            ids = [i for e in events if isinstance(e, DepthEvent) and e.diff.symbol == sym
                   for i in (e.diff.first_id, e.diff.final_id)]
            self.depth_id_span[sym] = (max(ids) - min(ids) + 1 + DEPTH_LOOP_JUMP) if ids else 0

    @classmethod
    def load(cls, data_dir: Path | None = None, symbols: Sequence[str] = DEFAULT_SYMBOLS,
             max_trades: int | None = None, book_ticker: bool = True, kline_throttle_ms: int = 0,
             depth: bool = False) -> Recording:
        """Read the captures of `symbols` and build the replay: only the first `max_trades` trades (in replay
        order, all symbols together) and the bookTickers (and depth diffs) received before the last of them,
        when given."""
        data_dir = data_dir or real_data_dir()
        syms = tuple(s.upper() for s in symbols)
        if max_trades is not None and max_trades < 1:
            raise ValueError(f"max_trades must be >= 1, got {max_trades}")
        depth_of = {s: load_depth(capture_files(data_dir, s)) for s in syms} if depth else {}
        streams = [_events_of(data_dir, s, book_ticker, depth_of[s][0] if depth else None) for s in syms]
        merged = heapq.merge(*streams, key=lambda e: e.recv_ns) if len(streams) > 1 else streams[0]
        base: list[TradeEvent | BookTickerEvent | DepthEvent] = []
        n_trades = 0
        for ev in merged:
            if max_trades is not None and n_trades >= max_trades:
                break
            base.append(ev)
            n_trades += isinstance(ev, TradeEvent)
        return cls(syms, _with_klines(base, kline_throttle_ms), data_dir, {s: d[1] for s, d in depth_of.items()})

    def trades_in_loop(self, loop: int = 0, time_offset_ms: int = 0) -> list[Trade]:
        """The trades the replay sends in loop `loop` (0-based) with the given `--shift-to-now` offset."""
        shift = time_offset_ms + loop * self.loop_shift_ms
        return [t.shifted(loop * self.id_span[t.symbol], shift) for t in self.trades]

    def candles_in_loop(self, loop: int = 0, time_offset_ms: int = 0) -> list[Candle]:
        """The closed 1m candles the replay sends (`x` true) in loop `loop`."""
        shift = time_offset_ms + loop * self.loop_shift_ms
        return [c.shifted(loop * self.id_span[c.symbol], shift) for c in self.candles]

    @property
    def duration_s(self) -> float:
        return (self.events[-1].recv_ns - self.first_recv_ns) / 1e9


def _with_klines(base: list[TradeEvent | BookTickerEvent | DepthEvent], throttle_ms: int) -> list[ReplayEvent]:
    """Insert the derived kline events (see the module docstring) after the trades that cause them."""
    out: list[ReplayEvent] = []
    open_: dict[str, _CandleBuilder] = {}
    last_update_at: dict[str, int] = {}
    last_trade: dict[str, Trade] = {}
    for ev in base:
        out.append(ev)
        if not isinstance(ev, TradeEvent):
            continue
        trade = ev.trade
        minute = trade.time // MINUTE_MS * MINUTE_MS
        builder = open_.get(trade.symbol)
        if builder is not None and minute != builder.open_time:
            if minute < builder.open_time:
                raise RecordingFormatError(f"trade {trade.id} of {trade.symbol} at {trade.time} is older than "
                                           f"the open candle {builder.open_time}; trade times must not go back")
            out.pop()  # the closed kline goes out before the trade that opens the next minute
            out.append(KlineEvent(ev.recv_ns, trade.event_time, builder.candle(), True))
            for gap in range(builder.open_time + MINUTE_MS, minute, MINUTE_MS):
                empty = _CandleBuilder.empty(trade.symbol, gap, builder.c)
                out.append(KlineEvent(ev.recv_ns, trade.event_time, empty.candle(), True))
            out.append(ev)
            builder = None
        if builder is None:
            builder = open_[trade.symbol] = _CandleBuilder(trade.symbol, minute)
            last_update_at.pop(trade.symbol, None)
        builder.add(trade)
        last_trade[trade.symbol] = trade
        previous = last_update_at.get(trade.symbol)
        if previous is None or trade.time - previous >= throttle_ms:
            out.append(KlineEvent(ev.recv_ns, trade.event_time, builder.candle(), False))
            last_update_at[trade.symbol] = trade.time
    end_ns = base[-1].recv_ns if base else 0
    for sym, builder in open_.items():
        out.append(KlineEvent(end_ns, last_trade[sym].event_time, builder.candle(), True))
    return out


# ----------------------------------------------------------------------------------------------------------
# REST sources: daily kline zips, exchangeInfo


def load_daily_klines(data_dir: Path, symbol: str = "BTCUSDT") -> list[Candle]:
    """All 1m candles of `binance-spot-1m-daily/{symbol}-1m-*.zip`, checksum-verified, sorted by open time."""
    folder = data_dir / "binance-spot-1m-daily"
    out: list[Candle] = []
    for path in sorted(folder.glob(f"{symbol}-1m-*.zip")):
        out.extend(_read_daily_zip(path, path.stat().st_mtime_ns))
    out.sort(key=lambda c: c.open_time)
    return out


@functools.lru_cache(maxsize=32)
def _read_daily_zip(path: Path, mtime_ns: int) -> tuple[Candle, ...]:
    del mtime_ns
    blob = path.read_bytes()
    checksum = path.with_name(path.name + ".CHECKSUM")
    if checksum.exists():
        expected = checksum.read_text().split()[0]
        if hashlib.sha256(blob).hexdigest() != expected:
            raise RecordingFormatError(f"{path}: sha256 does not match {checksum.name}")
    symbol = path.name.split("-", 1)[0]
    rows: list[Candle] = []
    with zipfile.ZipFile(io.BytesIO(blob)) as zf:
        names = [n for n in zf.namelist() if n.endswith(".csv")]
        if len(names) != 1:
            raise RecordingFormatError(f"{path}: expected one CSV inside, found {names}")
        text = zf.read(names[0]).decode()
    for lineno, line in enumerate(text.splitlines(), 1):
        cols = line.strip().split(",")
        if len(cols) != 12 or not cols[0].isdigit():
            raise RecordingFormatError(f"{path}:{lineno}: expected the 12-column headerless kline CSV "
                                       f"(open_time ms first), got {line[:80]!r}")
        open_time, close_time = int(cols[0]), int(cols[6])
        if open_time > 10**13:  # data.binance.vision switched to microseconds in 2025: refuse, do not guess
            raise RecordingFormatError(f"{path}:{lineno}: open_time {open_time} is not in milliseconds")
        rows.append(Candle(symbol=symbol, open_time=open_time, close_time=close_time, open=cols[1],
                           high=cols[2], low=cols[3], close=cols[4], volume=cols[5], quote_volume=cols[7],
                           count=int(cols[8]), taker_buy_volume=cols[9], taker_buy_quote_volume=cols[10]))
    return tuple(rows)


def load_exchange_info(data_dir: Path) -> dict[str, Any]:
    """The recorded `GET /api/v3/exchangeInfo` body (Binance spot, 2021-10-12, all symbols)."""
    path = data_dir / "cryptofeed-captures" / "BINANCE.0"
    return cast(dict[str, Any], msgspec.json.decode(_exchange_info_bytes(path, path.stat().st_mtime_ns)))


@functools.lru_cache(maxsize=2)
def _exchange_info_bytes(path: Path, mtime_ns: int) -> bytes:
    del mtime_ns
    marker = b"https://api.binance.com/api/v3/exchangeInfo -> "
    with path.open("rb") as fh:
        for line in fh:
            if line.startswith(marker):
                _ts, sep, body = line[len(marker):].partition(b": ")
                if sep:
                    return body
    raise RecordingFormatError(f"{path}: no '<url> -> <ts>: <json>' line for /api/v3/exchangeInfo")
