"""Binance USD-M futures (ccxt `binanceusdm`) as a simulator venue: REST under /fapi.binance.com/fapi/v1/ and the
market-data WebSocket under /fstream.binance.com/, replaying the real USD-M BTCUSDT capture.

Real (ws-captures/binance_usdm_btcusdt_20240808.gz, 2024-08-08 23:54:15..23:59:59 UTC): every `trade`,
`bookTicker` and `depthUpdate` (`@depth@0ms`, with `pu`) message, in recorded order and pacing, and the REST depth
snapshot (received after the first 6 diffs; depth.py says how depth is served). exchangeInfo: the recorded
2021-07-22 response (cryptofeed-captures/BINANCE_FUTURES.0), trimmed to `SYMBOLS`, with BTCUSDT's tickSize set to
0.10 (it was 0.01 in 2021; the 2024 capture prices move in 0.10 steps); ccxt 4.5.90 needs nothing else.

Derived, deterministically, from the recorded data (no USD-M capture holds these streams):
- kline_1m: 1m candles from the trades, exactly as the spot simulator does (recording.py `_with_klines`).
- markPrice@1s (and @markPrice every 3 s), at the first event of each new second of recorded event time:
  index `i` = mid of the recorded Binance SPOT BTCUSDT bookTicker at that receive time (the spot capture covers
  the same minutes; the real index is a weighted spot average over several exchanges); premium = futures
  bookTicker mid / index - 1; funding rate `r` = mean premium since the last 8h boundary + clamp(0.01% - mean,
  -0.05%, +0.05%) (Binance's formula with interest 0.01%/8h); mark `p` = median(index * (1 + r * time left /
  8h), index + 300 s moving average of (mid - index), last trade), to the 0.10 tick; `P` (estimated settle
  price) = mean index of the last hour; `T` = the next 00/08/16 UTC.
- @ticker (24hrTicker) and @miniTicker every second: statistics over the trades replayed so far (not 24 hours: the capture is
  6 minutes long).
- REST trades/aggTrades/historicalTrades: the last 10,000 trades the replay has reached.
- openInterest: not in any recording: `OPEN_INTEREST_BASE` BTC (an arbitrary starting figure) plus the signed
  taker volume replayed so far (taker buys +, taker sells -). fundingRate history: one row per 8h boundary the
  replay has crossed (rate as above); none within the unshifted capture.
Loop k shifts times by k * the recording's whole-minute span, trade ids by k * their span, depth/bookTicker
update ids by k * (their span + 1,000,000): the depth chain breaks at a loop and clients resync.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import functools
import gzip
import json
import logging
import statistics
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import aiohttp
import msgspec
from aiohttp import web

from simulator import binance, depth
from simulator.limits import WeightLimiter
from simulator.recording import (
    DEPTH_LOOP_JUMP,
    MINUTE_MS,
    Candle,
    DepthEvent,
    KlineEvent,
    RecordingFormatError,
    Trade,
    TradeEvent,
    _read_capture,
    _with_klines,
    capture_files,
    real_data_dir,
)
from simulator.wirefaults import WIRE_FAULT_KINDS, WireFaults

if TYPE_CHECKING:
    from simulator.server import SimulatorOptions

log = logging.getLogger("simulator.usdm")

EXCHANGE = "binanceusdm"
SYMBOLS = ("BTCUSDT", "ETHUSDT", "ALGOUSDT")  # kept in exchangeInfo; BTCUSDT is the one replayed
WEIGHT_LIMIT = 2400  # USD-M REQUEST_WEIGHT per minute
OPEN_INTEREST_BASE = "75000.000"
FUNDING_INTERVAL_MS = 8 * 3_600_000
INTEREST = 0.0001
FAULT_KINDS = ("disconnect", "stall", "halt", "http_error", *WIRE_FAULT_KINDS, "clear")
# Binance's slower diff streams (`@depth` is 250 ms), built from the recorded real-time (0 ms) diffs.
MERGED_DEPTH = {"btcusdt@depth": 250, "btcusdt@depth@100ms": 100, "btcusdt@depth@250ms": 250,
                "btcusdt@depth@500ms": 500}


# ----------------------------------------------------------------------------------------------------------
# The recording


class FutBookTicker(msgspec.Struct, frozen=True):
    update_id: int
    symbol: str
    bid: str
    bid_qty: str
    ask: str
    ask_qty: str
    trans_time: int
    event_time: int
    recv_ns: int


class BookEvent(msgspec.Struct, frozen=True):
    recv_ns: int
    book: FutBookTicker


class SecondEvent(msgspec.Struct, frozen=True):
    """A derived once-a-second tick: markPriceUpdate (and 24hrTicker) values at `event_time`."""

    recv_ns: int
    event_time: int
    mark: str
    index: str
    settle: str
    rate: float
    next_funding: int


class _RawTrade(msgspec.Struct):
    e: str
    E: int
    T: int
    s: str
    t: int
    p: str
    q: str
    m: bool
    X: str = "MARKET"


class _RawBook(msgspec.Struct):
    u: int
    s: str
    b: str
    B: str
    a: str
    A: str
    T: int
    E: int


class _Envelope(msgspec.Struct):
    stream: str
    data: msgspec.Raw


_env = msgspec.json.Decoder(_Envelope)
_trade = msgspec.json.Decoder(_RawTrade)
_book = msgspec.json.Decoder(_RawBook)


@functools.lru_cache(maxsize=4)
def _read_usdm(path: Path, mtime_ns: int) -> tuple[tuple[Trade, ...], tuple[FutBookTicker, ...]]:
    del mtime_ns
    trades: list[Trade] = []
    books: list[FutBookTicker] = []
    with gzip.open(path, "rb") as fh:
        for lineno, line in enumerate(fh, 1):
            ts, _, payload = line.partition(b" ")
            head = payload[:48]
            if b"@trade" in head:
                r = _trade.decode(_env.decode(payload).data)
                if r.e != "trade":
                    raise RecordingFormatError(f"{path}:{lineno}: trade stream carries {r.e!r}")
                trades.append(Trade(r.s, r.t, r.p, r.q, r.T, r.E, r.m, False, int(ts)))
            elif b"@bookTicker" in head:
                b = _book.decode(_env.decode(payload).data)
                books.append(FutBookTicker(b.u, b.s, b.b, b.B, b.a, b.A, b.T, b.E, int(ts)))
    return tuple(trades), tuple(books)


def _spot_mids(data_dir: Path) -> tuple[list[int], list[float]]:
    """(receive ns, mid) of the recorded spot BTCUSDT bookTickers: the index price's source."""
    recv: list[int] = []
    mids: list[float] = []
    for path in capture_files(data_dir, "BTCUSDT"):
        for b in _read_capture(path, path.stat().st_mtime_ns)[1]:
            recv.append(b.recv_ns)
            mids.append((float(b.bid) + float(b.ask)) / 2)
    return recv, mids


def _tick(x: float, tick: float = 0.1) -> str:
    return f"{round(x / tick) * tick:.8f}"


class UsdmRecording:
    """The USD-M BTCUSDT replay: recorded trades, bookTickers and depth diffs merged by receive time, with the
    derived klines and once-a-second mark/index/funding ticks (see the module docstring)."""

    def __init__(self, data_dir: Path, max_trades: int | None = None) -> None:
        files = sorted((data_dir / "ws-captures").glob("binance_usdm_btcusdt_*.gz"))
        if not files:
            raise FileNotFoundError(f"no USD-M capture in {data_dir / 'ws-captures'} "
                                    f"(expected binance_usdm_btcusdt_YYYYMMDD.gz)")
        trades: list[Trade] = []
        books: list[FutBookTicker] = []
        for path in files:
            t, b = _read_usdm(path, path.stat().st_mtime_ns)
            trades.extend(t)
            books.extend(b)
        diffs, self.snapshot = depth.load_depth(files)
        if max_trades is not None:
            trades = trades[:max_trades]
            end = trades[-1].recv_ns
            books = [b for b in books if b.recv_ns <= end]
            diffs = [d for d in diffs if d.recv_ns <= end]
        base: list[Any] = sorted([*(TradeEvent(t.recv_ns, t) for t in trades),
                                  *(BookEvent(b.recv_ns, b) for b in books),
                                  *(DepthEvent(d.recv_ns, d) for d in diffs)], key=lambda e: e.recv_ns)
        self.events: list[Any] = self._with_seconds(_with_klines(base, 0), *_spot_mids(data_dir))
        self.trades = trades
        self.first_second: SecondEvent = next(e for e in self.events if isinstance(e, SecondEvent))
        self.candles: list[Candle] = [e.candle for e in self.events if isinstance(e, KlineEvent) and e.closed]
        self.first_recv_ns = self.events[0].recv_ns
        first_min, last_min = trades[0].time // MINUTE_MS, trades[-1].time // MINUTE_MS
        self.loop_shift_ms = (last_min - first_min + 1) * MINUTE_MS
        self.trade_id_span = trades[-1].id - trades[0].id + 1
        self.update_id_span = diffs[-1].final_id - diffs[0].first_id + 1 + DEPTH_LOOP_JUMP

    @staticmethod
    def _with_seconds(events: list[Any], spot_recv: list[int], spot_mid: list[float]) -> list[Any]:
        out: list[Any] = []
        second = None
        mid = last_price = None
        basis: deque[float] = deque(maxlen=300)
        index_hour: deque[float] = deque(maxlen=3600)
        premiums: list[float] = []
        interval: int | None = None
        for ev in events:
            if isinstance(ev, BookEvent):
                mid = (float(ev.book.bid) + float(ev.book.ask)) / 2
                now = ev.book.event_time
            elif isinstance(ev, TradeEvent):
                last_price = float(ev.trade.price)
                now = ev.trade.event_time
            else:
                out.append(ev)
                continue
            if second is not None and now // 1000 != second and mid is not None and last_price is not None:
                i = bisect.bisect_right(spot_recv, ev.recv_ns) - 1
                index = spot_mid[i] if i >= 0 else mid
                t = now // 1000 * 1000
                if interval != t // FUNDING_INTERVAL_MS:
                    interval, premiums = t // FUNDING_INTERVAL_MS, []
                premiums.append(mid / index - 1)
                basis.append(mid - index)
                index_hour.append(index)
                avg = sum(premiums) / len(premiums)
                rate = round(avg + min(max(INTEREST - avg, -0.0005), 0.0005), 8)
                next_funding = (cast(int, interval) + 1) * FUNDING_INTERVAL_MS  # set just above
                left = (next_funding - t) / FUNDING_INTERVAL_MS
                mark = statistics.median([index * (1 + rate * left), index + sum(basis) / len(basis), last_price])
                out.append(SecondEvent(ev.recv_ns, t, _tick(mark), f"{index:.8f}",
                                       f"{sum(index_hour) / len(index_hour):.8f}", rate, next_funding))
            second = now // 1000
            out.append(ev)
        return out


# ----------------------------------------------------------------------------------------------------------
# Wire format


def trade_event(t: Trade) -> dict[str, Any]:
    return {"e": "trade", "E": t.event_time, "T": t.time, "s": t.symbol, "t": t.id, "p": t.price, "q": t.qty,
            "X": "MARKET", "m": t.is_buyer_maker}


def book_ticker_event(b: FutBookTicker, update_id: int, shift_ms: int) -> dict[str, Any]:
    return {"e": "bookTicker", "u": update_id, "s": b.symbol, "b": b.bid, "B": b.bid_qty, "a": b.ask,
            "A": b.ask_qty, "T": b.trans_time + shift_ms, "E": b.event_time + shift_ms}


def mark_price_event(s: SecondEvent, symbol: str, shift_ms: int) -> dict[str, Any]:
    return {"e": "markPriceUpdate", "E": s.event_time + shift_ms, "s": symbol, "p": s.mark, "P": s.settle,
            "i": s.index, "r": f"{s.rate:.8f}", "T": _next_funding(s.event_time + shift_ms)}


def _next_funding(t_ms: int) -> int:
    return (t_ms // FUNDING_INTERVAL_MS + 1) * FUNDING_INTERVAL_MS


def kline_event(c: Candle, event_time: int, closed: bool) -> dict[str, Any]:
    return binance.kline_event(c, event_time, closed)


@dataclass
class _Stats:
    """24hrTicker statistics over the trades replayed so far."""

    open: float | None = None
    high: float = 0.0
    low: float = 0.0
    last: str = "0"
    last_qty: str = "0"
    volume: float = 0.0
    quote: float = 0.0
    count: int = 0
    first_id: int = 0
    last_id: int = 0
    open_time: int = 0
    signed_volume: float = 0.0

    def add(self, t: Trade) -> None:
        p, q = float(t.price), float(t.qty)
        if self.open is None:
            self.open, self.high, self.low, self.first_id, self.open_time = p, p, p, t.id, t.time
        self.high, self.low = max(self.high, p), min(self.low, p)
        self.last, self.last_qty, self.last_id = t.price, t.qty, t.id
        self.volume += q
        self.quote += p * q
        self.count += 1
        self.signed_volume += -q if t.is_buyer_maker else q

    def ticker(self, symbol: str, now: int) -> dict[str, Any]:
        o = self.open or 0.0
        c = float(self.last)
        return {"e": "24hrTicker", "E": now, "s": symbol, "p": f"{c - o:.2f}",
                "P": f"{(c - o) / o * 100 if o else 0:.3f}", "w": f"{self.quote / self.volume if self.volume else 0:.2f}",
                "c": self.last, "Q": self.last_qty, "o": f"{o:.2f}", "h": f"{self.high:.2f}", "l": f"{self.low:.2f}",
                "v": f"{self.volume:.3f}", "q": f"{self.quote:.2f}", "O": self.open_time, "C": now,
                "F": self.first_id, "L": self.last_id, "n": self.count}


# ----------------------------------------------------------------------------------------------------------
# The venue


@dataclass(eq=False)
class _Conn:
    ws: web.WebSocketResponse
    path: str
    combined: bool
    streams: set[str] = field(default_factory=set)
    sent: int = 0


@dataclass
class _Faults:
    http_error: int = 0
    http_status: int = 503
    retry_after_s: int = 1
    stall_until: float = 0.0
    stall_mode: str = "pause"
    halt_until: float = 0.0
    down_until: float = 0.0
    wire: WireFaults = field(default_factory=WireFaults)

    def as_dict(self) -> dict[str, Any]:
        now = time.monotonic()
        return {"http_error": self.http_error, "http_status": self.http_status,
                "stall_remaining_s": round(max(0.0, self.stall_until - now), 3), "stall_mode": self.stall_mode,
                "halt_remaining_s": round(max(0.0, self.halt_until - now), 3),
                "ws_down_remaining_s": round(max(0.0, self.down_until - now), 3), **self.wire.as_dict()}


class BinanceUsdm:
    """The `binanceusdm` venue (see the module docstring); built by venue.build_venues."""

    exchange = EXCHANGE

    def __init__(self, options: SimulatorOptions, recording: UsdmRecording | None = None) -> None:
        from simulator.server import FaultError  # the error type venues raise (venue.py)

        self._fault_error = FaultError
        self.options = options
        data_dir = options.data_dir or real_data_dir()
        self.recording = recording or UsdmRecording(data_dir, options.max_trades)
        self._info = _load_exchange_info(data_dir)
        self.speed = options.speed
        self.limiter = WeightLimiter(WEIGHT_LIMIT, options.weight_window_s, options.ban_after_429s, options.ban_s)
        self._faults = _Faults()
        self._conns: set[_Conn] = set()
        self._subs: dict[str, set[_Conn]] = {}
        self._task: asyncio.Task[None] | None = None
        self._requests: Counter[str] = Counter()
        self.state = "idle"
        self._data_streams = {"btcusdt@trade", "btcusdt@bookTicker", "btcusdt@depth@0ms", *MERGED_DEPTH,
                              "btcusdt@markPrice", "btcusdt@markPrice@1s", "btcusdt@kline_1m", "btcusdt@ticker",
                              "btcusdt@miniTicker"}
        self._reset()

    # -- lifecycle (Venue protocol) ------------------------------------------------------------------------

    async def start(self) -> None:
        if self.options.start == "immediate":
            self.restart()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.disconnect_all(aiohttp.WSCloseCode.GOING_AWAY)

    def restart(self) -> None:
        """(Re)start the replay from its first event now."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
        self._reset()
        self.state = "running"
        self._task = asyncio.get_running_loop().create_task(self._replay(), name="usdm-replay")

    def _reset(self) -> None:
        self.position = 0
        self.loop_index = 0
        self.messages_sent = 0
        self.sent_by_stream: Counter[str] = Counter()
        self.time_offset_ms = 0
        self.book = depth.DepthBook(self.recording.snapshot)
        self.stats = _Stats()
        self.trades_reached: deque[Trade] = deque(maxlen=10_000)
        self.last_book: dict[str, Any] | None = None
        self.last_second: SecondEvent | None = None
        self.candles: list[Candle] = []
        self.open_candle: Candle | None = None
        self.funding_history: list[dict[str, Any]] = []
        self._pending_depth: dict[str, list[depth.DepthDiff]] = {}

    # -- faults --------------------------------------------------------------------------------------------

    def inject(self, kind: str, **params: Any) -> dict[str, Any]:
        """Kinds as the spot simulator's (server.py `Simulator.inject`): disconnect (code, down_s), stall (seconds,
        mode), halt (seconds), http_error (status, count, retry_after), malformed_ws / duplicate / reorder /
        sequence_gap (count, stream), clock_skew (ms), clear."""
        f = self._faults
        try:
            if kind == "disconnect":
                f.down_until = time.monotonic() + float(params.get("down_s", 0))
                code = int(params.get("code", aiohttp.WSCloseCode.GOING_AWAY))
                asyncio.get_running_loop().create_task(self.disconnect_all(code))
            elif kind in ("stall", "halt"):
                until = time.monotonic() + float(params["seconds"])
                if kind == "halt":
                    f.halt_until = until
                else:
                    mode = params.get("mode", "pause")
                    if mode not in ("pause", "drop"):
                        raise ValueError(f"stall mode must be 'pause' or 'drop', got {mode!r}")
                    f.stall_until, f.stall_mode = until, mode
            elif kind == "http_error":
                status = int(params.get("status", 503))
                if not 400 <= status <= 599:
                    raise ValueError(f"http_error status must be 4xx or 5xx, got {status}")
                f.http_error, f.http_status = int(params.get("count", 1)), status
                f.retry_after_s = int(params.get("retry_after", 1))
            elif kind in WIRE_FAULT_KINDS:
                f.wire.arm(kind, params)
            elif kind == "clear":
                self._faults = _Faults()
            else:
                raise self._fault_error(f"unknown fault kind {kind!r} for {EXCHANGE}; one of "
                                        f"{', '.join(FAULT_KINDS)}")
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, self._fault_error):
                raise
            raise self._fault_error(f"bad parameters for {EXCHANGE} fault {kind!r}: {params} ({exc})") from exc
        log.warning("%s fault injected: %s %s", EXCHANGE, kind, params)
        return self._faults.as_dict()

    async def disconnect_all(self, code: int) -> int:
        conns = list(self._conns)
        for c in conns:
            self._forget(c)
        await asyncio.gather(*(c.ws.close(code=code, message=b"simulator disconnect") for c in conns),
                             return_exceptions=True)
        return len(conns)

    def status(self) -> dict[str, Any]:
        return {"state": self.state, "speed": self.speed, "position": self.position,
                "events": len(self.recording.events), "loop": self.loop_index,
                "messages_sent": self.messages_sent, "sent_by_stream": dict(self.sent_by_stream),
                "connections": [{"path": c.path, "streams": sorted(c.streams), "sent": c.sent} for c in self._conns],
                "depth": {"last_update_id": self.book.last_update_id, "passed_snapshot": self.book.passed_snapshot,
                          "snapshot_last_update_id": self.recording.snapshot.last_update_id,
                          "snapshots_served": self.book.served},
                "faults": self._faults.as_dict(),
                "rest": {"requests": dict(self._requests), **self.limiter.as_dict()}}

    # -- replay --------------------------------------------------------------------------------------------

    async def _replay(self) -> None:
        rec = self.recording
        if self.options.shift_to_now:
            first = rec.trades[0].time
            self.time_offset_ms = (int(time.time() * 1000) - first) // MINUTE_MS * MINUTE_MS
        started = time.monotonic()
        paused = 0.0
        k = 0
        while True:
            self.loop_index = k
            shift_ms = self.time_offset_ms + k * rec.loop_shift_ms
            loop_ns = k * rec.loop_shift_ms * 1_000_000 - rec.first_recv_ns
            self.book.reset(k * rec.update_id_span)
            self._pending_depth = {}
            for i, ev in enumerate(rec.events):
                self.position = i
                if self.speed > 0:
                    delay = started + paused + (ev.recv_ns + loop_ns) / 1e9 / self.speed - time.monotonic()
                    if delay > 0.001:
                        await asyncio.sleep(delay)
                    elif i & 255 == 0:
                        await asyncio.sleep(0)
                elif i & 255 == 0:
                    await asyncio.sleep(0)
                f = self._faults
                while (f.halt_until > time.monotonic()
                       or (f.stall_until > time.monotonic() and f.stall_mode == "pause")):
                    began = time.monotonic()
                    await asyncio.sleep(0.02)
                    paused += time.monotonic() - began
                    f = self._faults
                await self._dispatch(ev, shift_ms, k)
            if not self.options.loop:
                break
            k += 1
        self.position = len(rec.events)
        self.state = "finished"
        log.info("%s replay finished", EXCHANGE)

    async def _dispatch(self, ev: Any, shift_ms: int, k: int) -> None:
        rec = self.recording
        if isinstance(ev, TradeEvent):
            t = ev.trade.shifted(k * rec.trade_id_span, shift_ms)
            self.stats.add(t)
            self.trades_reached.append(t)
            await self._send("btcusdt@trade", trade_event(t))
        elif isinstance(ev, BookEvent):
            payload = book_ticker_event(ev.book, ev.book.update_id + self.book.id_shift, shift_ms)
            self.last_book = payload
            await self._send("btcusdt@bookTicker", payload)
        elif isinstance(ev, DepthEvent):
            diff = ev.diff.shifted(self.book.id_shift, shift_ms)
            self.book.apply(diff)
            await self._send_diff("btcusdt@depth@0ms", diff)
            for stream, period_ms in MERGED_DEPTH.items():  # the recorded 0ms diffs merged per period
                pending = self._pending_depth.setdefault(stream, [])
                if pending and pending[-1].event_time // period_ms != diff.event_time // period_ms:
                    await self._send_diff(stream, depth.merge_diffs(pending))
                    pending.clear()
                if self._subs.get(stream):
                    pending.append(diff)
        elif isinstance(ev, KlineEvent):
            c = ev.candle.shifted(k * rec.trade_id_span, shift_ms)
            if ev.closed:
                self.candles.append(c)
                del self.candles[:-100_000]
                self.open_candle = None
            else:
                self.open_candle = c
            await self._send("btcusdt@kline_1m", kline_event(c, ev.event_time + shift_ms, ev.closed))
        elif isinstance(ev, SecondEvent):
            self._on_second(ev, shift_ms)
            now = ev.event_time + shift_ms
            mark = mark_price_event(ev, "BTCUSDT", shift_ms)
            await self._send("btcusdt@markPrice@1s", mark)
            if (now // 1000) % 3 == 0:
                await self._send("btcusdt@markPrice", mark)
            ticker = self.stats.ticker("BTCUSDT", now)
            await self._send("btcusdt@ticker", ticker)
            await self._send("btcusdt@miniTicker", {"e": "24hrMiniTicker", **{k: ticker[k] for k in (
                "E", "s", "c", "o", "h", "l", "v", "q")}})

    def _on_second(self, ev: SecondEvent, shift_ms: int) -> None:
        previous = self.last_second
        self.last_second = ev
        t = ev.event_time + shift_ms
        if previous is not None and t // FUNDING_INTERVAL_MS != (previous.event_time + shift_ms) // \
                FUNDING_INTERVAL_MS:
            self.funding_history.append({"symbol": "BTCUSDT", "fundingTime": t // FUNDING_INTERVAL_MS *
                                         FUNDING_INTERVAL_MS, "fundingRate": f"{previous.rate:.8f}",
                                         "markPrice": previous.mark})

    async def _send_diff(self, stream: str, diff: depth.DepthDiff) -> None:
        if not self._subs.get(stream) or self._faults.wire.drop_depth(stream, diff.final_id):
            return
        await self._send(stream, diff.wire())

    async def _send(self, stream: str, payload: dict[str, Any]) -> None:
        subs = self._subs.get(stream)
        if not subs or self._faults.stall_until > time.monotonic():
            return
        wire = self._faults.wire
        for raw in wire.frames(stream, binance.encode(wire.skew(payload))):
            wrapped = binance.combined(stream, raw)
            for c in list(subs):
                try:
                    await c.ws.send_str(wrapped if c.combined else raw)
                except (ConnectionError, RuntimeError):
                    self._forget(c)
                    continue
                c.sent += 1
                self.messages_sent += 1
                self.sent_by_stream[stream] += 1

    # -- WebSocket -----------------------------------------------------------------------------------------

    def _forget(self, c: _Conn) -> None:
        for s in c.streams:
            self._subs.get(s, set()).discard(c)
        c.streams.clear()
        self._conns.discard(c)

    def _subscribe(self, c: _Conn, streams: list[str]) -> None:
        for s in streams:
            c.streams.add(s)
            self._subs.setdefault(s, set()).add(c)
            if s not in self._data_streams:
                log.warning("%s subscription to %s: no data for it (served: %s)", EXCHANGE, s,
                            ", ".join(sorted(self._data_streams)))
        if self.state == "idle" and self.options.start == "subscribe" and \
                any(s in self._data_streams for s in streams):
            self.restart()

    async def _ws(self, request: web.Request) -> web.StreamResponse:
        if time.monotonic() < self._faults.down_until:
            return web.json_response(binance.error_body(-1001, "simulator: WebSocket is down (fault)"), status=503)
        combined = "/stream" in request.path.removeprefix("/fstream.binance.com")
        ws = web.WebSocketResponse(heartbeat=self.options.ws_ping_s, compress=False)
        await ws.prepare(request)
        c = _Conn(ws, request.path_qs, combined)
        self._conns.add(c)
        initial = [s for s in request.query.get("streams", "").split("/") if s] if combined else \
            [s for s in request.match_info.get("tail", "").split("/") if "@" in s]
        if initial:
            self._subscribe(c, initial)
        try:
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    reply = self._on_message(c, msg.data)
                    await ws.send_str(json.dumps(reply, separators=(",", ":")))
                elif msg.type == aiohttp.WSMsgType.ERROR:
                    break
        except (ConnectionError, RuntimeError) as exc:
            log.info("%s WebSocket %s failed: %s", EXCHANGE, c.path, exc)
        finally:
            self._forget(c)
        return ws

    def _on_message(self, c: _Conn, text: str) -> dict[str, Any]:
        return binance.subscription_reply(text, c.streams, c.combined, lambda streams: self._subscribe(c, streams),
                                          lambda streams: self._unsubscribe(c, streams))

    def _unsubscribe(self, c: _Conn, streams: list[str]) -> None:
        for s in streams:
            c.streams.discard(s)
            self._subs.get(s, set()).discard(c)

    # -- REST ----------------------------------------------------------------------------------------------

    def _rest(self, name: str, weight: Callable[[web.Request], int],
              handler: Callable[[web.Request], Awaitable[web.Response]]) -> Callable[
                  [web.Request], Awaitable[web.Response]]:
        """Weight, 429 / 418 (limits.py) and the http_error fault around an endpoint."""
        async def wrapped(request: web.Request) -> web.Response:
            self._requests[name] += 1
            verdict = self.limiter.charge(weight(request))
            f = self._faults
            if verdict.status == 200 and f.http_error > 0:
                f.http_error -= 1
                response = _error(f.http_status, f.retry_after_s, verdict.headers)
            elif verdict.status != 200:
                response = _error(verdict.status, verdict.retry_after_s, verdict.headers, verdict.banned_until)
            else:
                try:
                    response = await handler(request)
                except ValueError as exc:  # a parameter that is not a number
                    response = web.json_response(binance.error_body(
                        -1100, f"Illegal characters found in a parameter ({exc})."), status=400)
                response.headers.update(verdict.headers)
            self.limiter.status_counts[response.status] += 1
            return response
        return wrapped

    def add_routes(self, r: web.UrlDispatcher) -> None:
        fixed = {"ping": 1, "time": 1, "exchangeInfo": 1, "openInterest": 1, "fundingRate": 1, "trades": 5,
                 "historicalTrades": 20, "aggTrades": 20}
        endpoints: list[tuple[str, Callable[[web.Request], int], Callable[[web.Request], Awaitable[web.Response]]]] = [
            ("ping", lambda _: fixed["ping"], self._ping),
            ("time", lambda _: fixed["time"], self._time),
            ("exchangeInfo", lambda _: fixed["exchangeInfo"], self._exchange_info),
            ("klines", _klines_weight, self._klines),
            ("depth", _depth_weight, self._depth),
            ("premiumIndex", lambda q: 1 if q.query.get("symbol") else 10, self._premium_index),
            ("fundingRate", lambda _: fixed["fundingRate"], self._funding_rate),
            ("openInterest", lambda _: fixed["openInterest"], self._open_interest),
            ("ticker/bookTicker", lambda q: 2 if q.query.get("symbol") else 5, self._book_ticker),
            ("trades", lambda _: fixed["trades"], self._trades),
            ("historicalTrades", lambda _: fixed["historicalTrades"], self._trades),
            ("aggTrades", lambda _: fixed["aggTrades"], self._agg_trades),
        ]
        for name, weight, handler in endpoints:
            r.add_get(f"/fapi.binance.com/fapi/v1/{name}", self._rest(name, weight, handler))
        for host in ("/fstream.binance.com",):
            for kind in ("", "/public", "/market"):
                r.add_get(f"{host}{kind}/ws", self._ws)
                r.add_get(f"{host}{kind}/ws/{{tail:.*}}", self._ws)
                r.add_get(f"{host}{kind}/stream", self._ws)

    def _symbol(self, request: web.Request, replayed: bool = True) -> str | web.Response:
        symbol = request.query.get("symbol")
        if not symbol:
            return web.json_response(binance.missing_parameter("symbol"), status=400)
        known = {s["symbol"] for s in self._info["symbols"]}
        if symbol not in known or (replayed and symbol != "BTCUSDT"):
            return web.json_response(binance.error_body(
                -1121, f"Invalid symbol. (the simulator replays USD-M BTCUSDT only; {symbol!r})"), status=400)
        return symbol

    async def _ping(self, request: web.Request) -> web.Response:
        return web.json_response({})

    def _now_ms(self) -> int:
        return int(time.time() * 1000) + self._faults.wire.skew_ms

    async def _time(self, request: web.Request) -> web.Response:
        return web.json_response({"serverTime": self._now_ms()})

    async def _exchange_info(self, request: web.Request) -> web.Response:
        info = dict(self._info, serverTime=self._now_ms())
        return web.Response(text=binance.encode(info), content_type="application/json")

    async def _klines(self, request: web.Request) -> web.Response:
        sym = self._symbol(request)
        if isinstance(sym, web.Response):
            return sym
        q = request.query
        if q.get("interval") != "1m":
            return web.json_response(binance.error_body(-1120, "Invalid interval. (the simulator serves 1m)"),
                                     status=400)
        try:
            limit = min(int(q.get("limit", 500)), 1500)
            start = int(q["startTime"]) if "startTime" in q else None
            end = int(q["endTime"]) if "endTime" in q else None
        except ValueError:
            return web.json_response(binance.error_body(-1100, "Illegal characters found in a parameter."),
                                     status=400)
        rows = [*self.candles, *([self.open_candle] if self.open_candle else [])]
        rows = [c for c in rows if (start is None or c.open_time >= start) and (end is None or c.open_time <= end)]
        rows = rows[:limit] if start is not None else rows[-limit:]
        return web.Response(text=binance.encode([c.rest_row() for c in rows]), content_type="application/json")

    async def _depth(self, request: web.Request) -> web.Response:
        sym = self._symbol(request)
        if isinstance(sym, web.Response):
            return sym
        try:
            limit = int(request.query.get("limit", 500))
        except ValueError:
            limit = -1
        if limit not in depth.USDM_DEPTH_LIMITS:
            return web.json_response(binance.error_body(
                -1100, f"Illegal characters found in parameter 'limit'; legal range is "
                       f"'{', '.join(map(str, depth.USDM_DEPTH_LIMITS))}'."), status=400)
        body = self.book.rest_body(limit, True, self._now_ms())
        return web.Response(text=binance.encode(body), content_type="application/json")

    def _premium(self) -> dict[str, Any]:
        s = self.last_second or self.recording.first_second  # before the replay: its opening values
        t = s.event_time + self.time_offset_ms + self.loop_index * self.recording.loop_shift_ms
        return {"symbol": "BTCUSDT", "markPrice": s.mark, "indexPrice": s.index, "estimatedSettlePrice": s.settle,
                "lastFundingRate": f"{s.rate:.8f}", "interestRate": f"{INTEREST:.8f}",
                "nextFundingTime": _next_funding(t), "time": t}

    async def _premium_index(self, request: web.Request) -> web.Response:
        if not request.query.get("symbol"):
            return web.json_response([self._premium()])
        sym = self._symbol(request)
        if isinstance(sym, web.Response):
            return sym
        return web.json_response(self._premium())

    async def _funding_rate(self, request: web.Request) -> web.Response:
        limit = int(request.query.get("limit", 100))
        return web.json_response(self.funding_history[-limit:])

    async def _open_interest(self, request: web.Request) -> web.Response:
        sym = self._symbol(request)
        if isinstance(sym, web.Response):
            return sym
        oi = float(OPEN_INTEREST_BASE) + self.stats.signed_volume
        t = self.trades_reached[-1].time if self.trades_reached else self._now_ms()
        return web.json_response({"openInterest": f"{oi:.3f}", "symbol": sym, "time": t})

    async def _book_ticker(self, request: web.Request) -> web.Response:
        b = self.last_book
        if b is None:
            return web.json_response([])
        row = {"symbol": b["s"], "bidPrice": b["b"], "bidQty": b["B"], "askPrice": b["a"], "askQty": b["A"],
               "time": b["T"], "lastUpdateId": b["u"]}
        return web.json_response(row if request.query.get("symbol") else [row])

    def _trades_limit(self, request: web.Request) -> list[Trade]:
        limit = min(max(int(request.query.get("limit", 500)), 1), 1000)
        trades = list(self.trades_reached)
        if "fromId" in request.query:
            from_id = int(request.query["fromId"])
            return [t for t in trades if t.id >= from_id][:limit]
        return trades[-limit:]

    async def _trades(self, request: web.Request) -> web.Response:
        sym = self._symbol(request)
        if isinstance(sym, web.Response):
            return sym
        return web.json_response([{"id": t.id, "price": t.price, "qty": t.qty,
                                   "quoteQty": f"{float(t.price) * float(t.qty):.5f}", "time": t.time,
                                   "isBuyerMaker": t.is_buyer_maker} for t in self._trades_limit(request)])

    async def _agg_trades(self, request: web.Request) -> web.Response:
        """One aggregate per trade (`a` = the trade id): the capture holds trades, not taker orders."""
        sym = self._symbol(request)
        if isinstance(sym, web.Response):
            return sym
        trades = self._trades_limit(request)
        q = request.query
        if "startTime" in q:
            trades = [t for t in self.trades_reached if t.time >= int(q["startTime"])
                      and ("endTime" not in q or t.time <= int(q["endTime"]))][: int(q.get("limit", 500))]
        return web.json_response([{"a": t.id, "p": t.price, "q": t.qty, "f": t.id, "l": t.id, "T": t.time,
                                   "m": t.is_buyer_maker} for t in trades])


def _error(status: int, retry_after_s: int, headers: dict[str, str], banned_until: float | None = None) -> web.Response:
    if status in (418, 429):
        headers = {**headers, "Retry-After": str(retry_after_s)}
        msg = (f"Way too many requests; IP banned until {int(banned_until * 1000)}." if banned_until
               else "Too many requests; current request has limited.")
        body = binance.error_body(-1003, msg)
    elif status >= 500:
        body = binance.error_body(-1001, "Internal error; unable to process your request. Please try again.")
    else:
        body = binance.error_body(-1000, "An unknown error occurred while processing the request.")
    return web.json_response(body, status=status, headers=headers)


def _klines_weight(request: web.Request) -> int:
    """USD-M klines weight by limit: [1,100) 1, [100,500) 2, [500,1000] 5, > 1000 10."""
    try:
        limit = int(request.query.get("limit", 500))
    except ValueError:
        return 1
    return 1 if limit < 100 else 2 if limit < 500 else 5 if limit <= 1000 else 10


def _depth_weight(request: web.Request) -> int:
    try:
        return depth.depth_weight(int(request.query.get("limit", 500)), futures=True)
    except ValueError:
        return 2


@functools.lru_cache(maxsize=2)
def _exchange_info_bytes(path: Path, mtime_ns: int) -> bytes:
    del mtime_ns
    marker = b"https://fapi.binance.com/fapi/v1/exchangeInfo -> "
    with path.open("rb") as fh:
        for line in fh:
            if line.startswith(marker):
                return line[len(marker):].partition(b": ")[2]
    raise RecordingFormatError(f"{path}: no '<url> -> <ts>: <json>' line for /fapi/v1/exchangeInfo")


def _load_exchange_info(data_dir: Path) -> dict[str, Any]:
    """The recorded USD-M exchangeInfo (2021-07-22) trimmed to SYMBOLS, BTCUSDT's tickSize set to 0.10."""
    path = data_dir / "cryptofeed-captures" / "BINANCE_FUTURES.0"
    info: dict[str, Any] = msgspec.json.decode(_exchange_info_bytes(path, path.stat().st_mtime_ns))
    symbols = [s for s in info["symbols"] if s["symbol"] in SYMBOLS]
    if {s["symbol"] for s in symbols} != set(SYMBOLS):
        raise RecordingFormatError(f"{path}: exchangeInfo lacks some of {SYMBOLS}")
    for s in symbols:
        if s["symbol"] == "BTCUSDT":
            s["filters"] = [dict(f, tickSize="0.10") if f["filterType"] == "PRICE_FILTER" else f
                            for f in s["filters"]]
    info["symbols"] = symbols
    return info
