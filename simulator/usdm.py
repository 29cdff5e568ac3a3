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

import bisect
import functools
import gzip
import logging
import statistics
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import msgspec
from aiohttp import web

from simulator import binance, depth
from simulator.binance_venue import BinanceFaults, BinanceVenue, Handler, Weight
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
from simulator.wirefaults import WIRE_FAULT_KINDS

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


class BinanceUsdm(BinanceVenue[BinanceFaults]):
    """The `binanceusdm` venue (see the module docstring); built by venue.build_venues."""

    exchange = EXCHANGE
    log = log
    FAULT_KINDS = FAULT_KINDS
    FUTURES = True
    recording: UsdmRecording

    def __init__(self, options: SimulatorOptions, recording: UsdmRecording | None = None) -> None:
        data_dir = options.data_dir or real_data_dir()
        self.recording = recording or UsdmRecording(data_dir, options.max_trades)
        self._info = _load_exchange_info(data_dir)
        super().__init__(options, {"btcusdt@trade", "btcusdt@bookTicker", "btcusdt@depth@0ms", *MERGED_DEPTH,
                                   "btcusdt@markPrice", "btcusdt@markPrice@1s", "btcusdt@kline_1m",
                                   "btcusdt@ticker", "btcusdt@miniTicker"}, WEIGHT_LIMIT)

    def _new_faults(self) -> BinanceFaults:
        return BinanceFaults()

    def _describe(self) -> str:
        return (f"simulated binance usd-m at /fapi.binance.com (REST) and /fstream.binance.com (WebSocket): "
                f"{len(self.recording.trades)} trades of BTCUSDT")

    def _reset_replay_state(self) -> None:
        super()._reset_replay_state()
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

    def status(self) -> dict[str, Any]:
        return {**self._replay_status(), "sent_by_stream": dict(self.sent_by_stream),
                "connections": self._connections_status(),
                "depth": {"last_update_id": self.book.last_update_id, "passed_snapshot": self.book.passed_snapshot,
                          "snapshot_last_update_id": self.recording.snapshot.last_update_id,
                          "snapshots_served": self.book.served},
                "faults": self._faults.as_dict(), "rest": self._rest_status()}

    # -- replay --------------------------------------------------------------------------------------------

    def _replay_begins(self) -> None:
        if self.options.shift_to_now:
            first = self.recording.trades[0].time
            self.time_offset_ms = (int(time.time() * 1000) - first) // MINUTE_MS * MINUTE_MS

    def _loop_begins(self, loop: int) -> None:
        self._shift_ms = self.time_offset_ms + loop * self.recording.loop_shift_ms
        self.book.reset(loop * self.recording.update_id_span)
        self._pending_depth = {}

    async def _dispatch(self, event: Any, loop: int) -> None:
        rec = self.recording
        ev, k, shift_ms = event, loop, self._shift_ms
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
                if self._subscribers.get(stream):
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

    def add_routes(self, r: web.UrlDispatcher) -> None:
        fixed = {"ping": 1, "time": 1, "exchangeInfo": 1, "openInterest": 1, "fundingRate": 1, "trades": 5,
                 "historicalTrades": 20, "aggTrades": 20}
        endpoints: list[tuple[str, Weight, Handler]] = [
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
                r.add_get(f"{host}{kind}/ws", self._ws_session)
                r.add_get(f"{host}{kind}/ws/{{tail:.*}}", self._ws_session)
                r.add_get(f"{host}{kind}/stream", self._ws_session)

    def _symbol(self, request: web.Request, replayed: bool = True) -> str | web.Response:
        symbol = request.query.get("symbol")
        if not symbol:
            return web.json_response(binance.missing_parameter("symbol"), status=400)
        known = {s["symbol"] for s in self._info["symbols"]}
        if symbol not in known or (replayed and symbol != "BTCUSDT"):
            return web.json_response(binance.error_body(
                -1121, f"Invalid symbol. (the simulator replays USD-M BTCUSDT only; {symbol!r})"), status=400)
        return symbol

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
