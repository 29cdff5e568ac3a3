"""Binance spot (ccxt `binance`) as a venue, the one the simulator always serves: Binance spot's REST and WebSocket
formats, replaying a `Recording`.

It replays a `Recording` (real captured trades and bookTickers, plus klines derived from those trades) to
the WebSocket clients that subscribed, paced by the recorded receive times, and serves REST klines from the
real daily zips plus the derived candles the replay has reached (closed ones and the open one), so REST
never shows data "from the future" of the replay, as a real exchange would not.

URL layout (see common/exchanges/clients.py): `{base}/{original host}{original path}` and `{base}{original path}`:
- REST   /api.binance.com/api/v3/{ping,time,exchangeInfo,klines,depth,historicalTrades,aggTrades}  and  /api/v3/...
- WS     /stream.binance.com/ws[/{anything}]  and  /ws[/...]: raw event payloads (Binance's `/ws`);
         a last path segment containing '@' is a stream subscribed at connect, as on Binance.
         /stream.binance.com/stream?streams=a/b  and  /stream?...: combined `{"stream","data"}` envelopes.
- Archives /data.binance.vision/data/spot/{daily,monthly}/klines/... (archives.py)

The replay starts, by default, when the first client subscribes to a stream that carries recorded data (or
once every stream of `wait_for_streams` has a subscriber), so nothing is sent before a collector listens;
after the last event it stops for good unless `loop` is set or it is restarted (`restart`, POST /_sim/replay).
"""

from __future__ import annotations

import bisect
import heapq
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web

from simulator import archives, binance, depth
from simulator.binance_venue import BinanceFaults, BinanceVenue, Handler, Weight
from simulator.history import History
from simulator.recording import (
    MINUTE_MS,
    Candle,
    DepthEvent,
    KlineEvent,
    Recording,
    ReplayEvent,
    Trade,
    TradeEvent,
    load_daily_klines,
    load_exchange_info,
    real_data_dir,
)
from simulator.spot_trades import SpotTrades
from simulator.wirefaults import WIRE_FAULT_KINDS

if TYPE_CHECKING:
    from simulator.server import SimulatorOptions

FAULT_KINDS = ("malformed_klines", "disconnect", "stall", "http_error", "drop_trades", "corrupt_archive", "halt",
               *WIRE_FAULT_KINDS, "clear")


@dataclass
class SpotFaults(BinanceFaults):
    malformed_klines: int = 0
    malformed_shape: str = "null_values"
    drop_trades: int = 0
    corrupt_archive: int = 0  # the next N archive zips are served with one byte changed (CHECKSUM mismatch)

    def as_dict(self) -> dict[str, Any]:
        return {**super().as_dict(), "malformed_klines": self.malformed_klines,
                "malformed_shape": self.malformed_shape, "drop_trades": self.drop_trades,
                "corrupt_archive": self.corrupt_archive}


class BinanceSpot(BinanceVenue[SpotFaults]):
    """One simulated Binance spot exchange (see the module docstring), hosted by `Simulator` (server.py)."""

    exchange = "binance"
    log = logging.getLogger("simulator")
    FAULT_KINDS = FAULT_KINDS
    recording: Recording

    def __init__(self, options: SimulatorOptions, recording: Recording | None = None) -> None:
        opts = options
        self.data_dir = opts.data_dir or real_data_dir()
        self.recording = recording or Recording.load(self.data_dir, opts.symbols, opts.max_trades,
                                                     opts.book_ticker, opts.kline_throttle_ms, opts.depth)
        # With a rate (benchmarks): trade k of a loop is due k / rate s after the loop began, every other event
        # with the trade before it, instead of at its recorded receive time.
        self._rate_offsets = self._rate_plan(opts.rate) if opts.rate else None
        self._recorded_info = load_exchange_info(self.data_dir)
        binance.trim_exchange_info(self._recorded_info, opts.exchange_info_symbols, 0, 0)  # fail fast on typos
        self.history = History(self.data_dir, self._history_end_ms(opts)) if opts.history else None
        self._daily: dict[str, list[Candle]] = {} if self.history else {
            s: load_daily_klines(self.data_dir, s) for s in self._symbol_ids()}
        self._archives: OrderedDict[str, bytes | None] = OrderedDict()
        data_streams = {binance.stream_name(s, ch) for s in self.recording.symbols
                        for ch in ("trade", "kline_1m", "bookTicker")}
        data_streams |= {binance.stream_name(s, ch) for s in self.recording.snapshots
                         for ch in ("depth", "depth@100ms")}
        self._stream_names: dict[tuple[str, str], str] = {}
        super().__init__(options, data_streams, opts.weight_limit)

    def _new_faults(self) -> SpotFaults:
        return SpotFaults()

    def _rate_plan(self, rate: float) -> Sequence[float]:
        """Seconds from a loop's start to each event at `rate` trades a second (market.py makes its own)."""
        return _rate_offsets(self.recording.events, rate)

    def _event_offset_s(self, event: Any) -> float:
        if self._rate_offsets is None:
            return super()._event_offset_s(event)
        return self._rate_offsets[self.position]  # the replay sets position to the event's index before pacing it

    def _loop_span_s(self) -> float:
        if self.options.rate is None:
            return super()._loop_span_s()
        return len(self.recording.trades) / self.options.rate

    def _describe(self) -> str:
        rec = self.recording
        return (f"simulated binance spot at /api.binance.com (REST) and /stream.binance.com/ws (WebSocket): "
                f"{len(rec.trades)} trades of {','.join(rec.symbols)}, ids {rec.trades[0].id}..{rec.trades[-1].id}, "
                f"{rec.duration_s:.0f} s recorded, {len(rec.candles)} closed 1m candles derived"
                f"{', shifted to now' if self.options.shift_to_now else ''}")

    # ------------------------------------------------------------------------------------------------------
    # Faults

    def _inject(self, kind: str, params: dict[str, Any]) -> bool:
        """Binance spot's own kinds beside the common ones (venue.py) and the wire faults (wirefaults.py):
        - malformed_klines: count=1, shape='null_values': the next `count` REST klines bodies are malformed
          (shapes: binance.MALFORMED_SHAPES).
        - drop_trades: count: the next `count` trade messages are not sent (a gap in trade ids; klines still
          count them, as the exchange's own candles would).
        - corrupt_archive: count=1: the next `count` archive zips are served with one byte changed, so they no
          longer match their CHECKSUM files.
        The halt fault holds the replay (no message of any stream, nothing lost); connections stay open, pings
        and REST are answered; then it resumes where it stopped."""
        f = self._faults
        if kind == "malformed_klines":
            shape = str(params.get("shape", "null_values"))
            if shape not in binance.MALFORMED_SHAPES:
                raise ValueError(f"unknown shape {shape!r}; one of {sorted(binance.MALFORMED_SHAPES)}")
            f.malformed_klines, f.malformed_shape = int(params.get("count", 1)), shape
        elif kind == "drop_trades":
            f.drop_trades = int(params["count"])
        elif kind == "corrupt_archive":
            f.corrupt_archive = int(params.get("count", 1))
        else:
            return super()._inject(kind, params)
        return True

    # ------------------------------------------------------------------------------------------------------
    # Python API

    def expected_trades(self, loop: int = 0) -> list[Trade]:
        """The trades this simulator sends in loop `loop` of the current replay (with its time offset)."""
        return self.recording.trades_in_loop(loop, self.time_offset_ms)

    def expected_candles(self, loop: int = 0) -> list[Candle]:
        """The closed 1m candles (`x` true) this simulator sends in loop `loop` of the current replay."""
        return self.recording.candles_in_loop(loop, self.time_offset_ms)

    def status(self) -> dict[str, Any]:
        rec = self.recording
        return {
            **self._replay_status(), "trades_replayed": self.trades_replayed,
            "sent_by_stream": dict(self.sent_by_stream), "dropped_trade_ids": self.dropped_trade_ids[-1000:],
            "last_trade_id": self.last_trade_id, "replay_time_ms": self.replay_time_ms,
            "time_offset_ms": self.time_offset_ms, "loop_shift_ms": rec.loop_shift_ms,
            "connections": self._connections_status(),
            "subscriptions": {s: len(c) for s, c in self._subscribers.items() if c},
            "faults": self._faults.as_dict(),
            "depth": {sym: {"last_update_id": b.last_update_id, "passed_snapshot": b.passed_snapshot,
                            "snapshot_last_update_id": b.snapshot.last_update_id, "snapshots_served": b.served}
                      for sym, b in self._books.items()},
            "rest": {**self._rest_status(), "history_end_ms": self.history.end_ms if self.history else None},
            "recording": {"symbols": list(rec.symbols), "trades": len(rec.trades), "candles": len(rec.candles),
                          "first_trade_id": rec.trades[0].id, "last_trade_id": rec.trades[-1].id,
                          "first_trade_time": rec.trades[0].time, "last_trade_time": rec.trades[-1].time,
                          "duration_s": round(rec.duration_s, 3)},
        }

    # ------------------------------------------------------------------------------------------------------
    # Replay

    def _reset_replay_state(self) -> None:
        super()._reset_replay_state()
        self.trades_replayed = 0
        self.dropped_trade_ids: list[int] = []
        self.last_trade_id: int | None = None
        self.replay_time_ms: int | None = None
        self.time_offset_ms = 0
        self._rest_closed: dict[str, list[Candle]] = {s: [] for s in self.recording.symbols}
        self._rest_open: dict[str, Candle] = {}
        self._books = {sym: depth.DepthBook(snap) for sym, snap in self.recording.snapshots.items()}
        self._depth_pending: dict[str, list[depth.DepthDiff]] = {}  # diffs of the current second, for `@depth`

    def _ready_to_start(self) -> bool:
        wanted = self.options.wait_for_streams
        if wanted:
            return all(self._subscribers.get(s) for s in wanted)
        return super()._ready_to_start()

    def _replay_begins(self) -> None:
        rec = self.recording
        if self.options.shift_to_now:
            # A whole number of minutes, so derived candles keep their trades; the first trade lands <= now.
            self.time_offset_ms = (int(time.time() * 1000) - rec.trades[0].time) // MINUTE_MS * MINUTE_MS
        self.log.info("replay started: %d events, speed %s, time offset %+d ms", len(rec.events),
                      self.speed or "max", self.time_offset_ms)

    def _loop_begins(self, loop: int) -> None:
        rec = self.recording
        self._shift_ms = self.time_offset_ms + loop * rec.loop_shift_ms
        self._id_shift = {s: loop * n for s, n in rec.id_span.items()}
        self._book_shift = {s: loop * n for s, n in rec.book_id_span.items()}
        for sym, book in self._books.items():
            book.reset(loop * rec.depth_id_span[sym])
            self._depth_pending.pop(sym, None)

    def _log_progress(self) -> None:
        self.log.info("replay loop %d at event %d/%d: %d trades replayed, %d messages sent, last trade id %s, "
                      "%d connection(s), REST %s", self.loop_index, self.position, len(self.recording.events),
                      self.trades_replayed, self.messages_sent, self.last_trade_id, len(self._connections),
                      dict(self._rest_requests) or "-")

    def _stream(self, symbol: str, channel: str) -> str:
        key = (symbol, channel)
        name = self._stream_names.get(key)
        if name is None:
            name = self._stream_names[key] = binance.stream_name(symbol, channel)
        return name

    async def _dispatch(self, event: ReplayEvent, loop: int) -> None:
        shift_ms = self._shift_ms
        payload: dict[str, Any]
        if isinstance(event, TradeEvent):
            trade = event.trade.shifted(self._id_shift[event.trade.symbol], shift_ms)
            self.trades_replayed += 1
            self.last_trade_id, self.replay_time_ms = trade.id, trade.time
            stream = self._stream(trade.symbol, "trade")
            if self._faults.drop_trades > 0:
                self._faults.drop_trades -= 1
                self.dropped_trade_ids.append(trade.id)
                return
            if not self._subscribers.get(stream):
                return
            payload = binance.trade_event(trade)
        elif isinstance(event, KlineEvent):
            candle = event.candle.shifted(self._id_shift[event.candle.symbol], shift_ms)
            self._store_candle(candle, event.closed)
            stream = self._stream(candle.symbol, "kline_1m")
            if not self._subscribers.get(stream):
                return
            payload = binance.kline_event(candle, event.event_time + shift_ms, event.closed)
        elif isinstance(event, DepthEvent):
            await self._dispatch_depth(event.diff, shift_ms)
            return
        else:
            book = event.book
            stream = self._stream(book.symbol, "bookTicker")
            if not self._subscribers.get(stream):
                return
            payload = binance.book_ticker_event(book, book.update_id + self._book_shift[book.symbol])
        await self._send(stream, payload)

    async def _dispatch_depth(self, recorded: depth.DepthDiff, shift_ms: int) -> None:
        """A recorded diff: the exchange's book takes it (even when the gap fault keeps it off the wire); sent
        as is on `@depth@100ms`, merged per second of event time on `@depth` (Binance's 1000ms stream)."""
        sym = recorded.symbol
        book = self._books[sym]
        diff = recorded.shifted(book.id_shift, shift_ms)
        book.apply(diff)
        pending = self._depth_pending.setdefault(sym, [])
        if pending and pending[-1].event_time // 1000 != diff.event_time // 1000:
            await self._send_diff(self._stream(sym, "depth"), depth.merge_diffs(pending))
            pending.clear()
        pending.append(diff)
        await self._send_diff(self._stream(sym, "depth@100ms"), diff)

    def _store_candle(self, candle: Candle, closed: bool) -> None:
        sym = candle.symbol
        if not closed:
            self._rest_open[sym] = candle
            return
        store = self._rest_closed[sym]
        store.append(candle)
        if len(store) > self.options.rest_candle_cap:
            del store[: len(store) - self.options.rest_candle_cap]
        open_ = self._rest_open.get(sym)
        if open_ is not None and open_.open_time <= candle.open_time:
            del self._rest_open[sym]

    # ------------------------------------------------------------------------------------------------------
    # REST

    def _symbol_ids(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((*self.recording.symbols, "BTCUSDT")))

    def _history_end_ms(self, options: SimulatorOptions) -> int:
        """History is served up to the replay's first minute (the replay serves its own candles as it reaches
        them); with shift_to_now the replay starts now, so history reaches up to the simulator's start."""
        if options.shift_to_now:
            now = int(time.time() * 1000)
            return now - now % MINUTE_MS
        first = min(t.time for t in self.recording.trades)
        return first - first % MINUTE_MS

    @staticmethod
    def _depth_weight(request: web.Request) -> int:
        try:
            return depth.depth_weight(int(request.query.get("limit", 100)), futures=False)
        except ValueError:
            return 5

    async def _depth(self, request: web.Request) -> web.Response:
        """`GET /api/v3/depth`: the recorded snapshot, or the book the replay has reached (depth.py)."""
        symbol = request.query.get("symbol")
        if not symbol:
            return web.json_response(binance.missing_parameter("symbol"), status=400)
        book = self._books.get(symbol)
        if book is None:
            return web.json_response(binance.error_body(
                -1121, f"Invalid symbol. (the simulator has depth for {', '.join(self._books) or 'no symbol'})"),
                status=400)
        try:
            limit = int(request.query.get("limit", 100))
        except ValueError:
            return web.json_response(binance.error_body(-1100, "Illegal characters found in parameter 'limit'."),
                                     status=400)
        if limit not in depth.SPOT_DEPTH_LIMITS:
            return web.json_response(binance.error_body(
                -1100, f"Illegal characters found in parameter 'limit'; legal range is "
                       f"'{', '.join(map(str, depth.SPOT_DEPTH_LIMITS))}'."), status=400)
        return web.Response(text=binance.encode(book.rest_body(limit, False, int(time.time() * 1000))),
                            content_type="application/json")

    async def _exchange_info_endpoint(self, request: web.Request) -> web.Response:
        info = binance.trim_exchange_info(self._recorded_info, self.options.exchange_info_symbols,
                                          int(time.time() * 1000), self.options.weight_limit)
        return web.Response(text=binance.encode(info), content_type="application/json")

    @staticmethod
    def _klines_weight(request: web.Request) -> int:
        try:
            return binance.klines_weight(int(request.query.get("limit", binance.KLINES_DEFAULT_LIMIT)))
        except ValueError:
            return 1

    async def _klines(self, request: web.Request) -> web.Response:
        q = request.query
        for name in ("symbol", "interval"):
            if not q.get(name):
                return web.json_response(binance.missing_parameter(name), status=400)
        symbol, interval = q["symbol"], q["interval"]
        if interval not in binance.KLINE_INTERVALS:
            return web.json_response(binance.error_body(-1120, "Invalid interval."), status=400)
        if interval != binance.SERVED_INTERVAL:
            return web.json_response(binance.error_body(
                -1120, f"Invalid interval. (the simulator serves {binance.SERVED_INTERVAL} only)"), status=400)
        if not any(s["symbol"] == symbol for s in self._recorded_info["symbols"]):
            return web.json_response(binance.error_body(-1121, "Invalid symbol."), status=400)
        try:
            limit = int(q.get("limit", binance.KLINES_DEFAULT_LIMIT))
            start = int(q["startTime"]) if "startTime" in q else None
            end = int(q["endTime"]) if "endTime" in q else None
        except ValueError:
            return web.json_response(binance.error_body(-1100, "Illegal characters found in a parameter."),
                                     status=400)
        if not 1 <= limit <= binance.KLINES_MAX_LIMIT:
            return web.json_response(binance.error_body(-1130, "Data sent for parameter 'limit' is not valid."),
                                     status=400)
        rows = [c.rest_row() for c in self.candles_between(symbol, start, end, limit)]
        f = self._faults
        if f.malformed_klines > 0:
            f.malformed_klines -= 1
            self.log.warning("serving a malformed klines body (%s), %d more to come", f.malformed_shape,
                             f.malformed_klines)
            return web.Response(text=binance.malformed_klines_body(rows, f.malformed_shape),
                                content_type="application/json")
        return web.Response(text=binance.encode(rows), content_type="application/json")

    def candles_between(self, symbol: str, start: int | None, end: int | None, limit: int) -> list[Candle]:
        """Binance's klines selection: from `start` ascending (first `limit`), else the last `limit` up to
        `end` (or up to now); open times inclusive. The open candle of the replay is included."""
        sources: list[list[Candle]] = [self._daily.get(symbol, []), self._rest_closed.get(symbol, [])]
        if self.history is not None:
            sources.append(self.history.between(symbol, start, end, limit, start is not None,
                                                int(time.time() * 1000)))
        if symbol in self._rest_open:
            sources.append([self._rest_open[symbol]])
        lo = start if start is not None else -(2**62)
        hi = end if end is not None else 2**62
        parts = []
        for src in sources:
            i = bisect.bisect_left(src, lo, key=lambda c: c.open_time)
            j = bisect.bisect_right(src, hi, key=lambda c: c.open_time)
            parts.append(src[i:j])
        merged = list(heapq.merge(*parts, key=lambda c: c.open_time))
        return merged[:limit] if start is not None else merged[-limit:]

    # ------------------------------------------------------------------------------------------------------
    # data.binance.vision archives

    def archive_zip(self, name: str) -> bytes | None:
        """The zip `name` (e.g. BTCUSDT-1m-2020-01-01.zip) as data.binance.vision would serve it, or None."""
        if name in self._archives:
            self._archives.move_to_end(name)
            return self._archives[name]
        blob = archives.build(name, self.data_dir, self.history, time.time())
        self._archives[name] = blob
        if len(self._archives) > 64:
            self._archives.popitem(last=False)
        return blob

    async def _archive(self, request: web.Request) -> web.Response:
        m = request.match_info
        name = m["name"]
        want_checksum = name.endswith(".CHECKSUM")
        zip_name = name.removesuffix(".CHECKSUM")
        parsed = archives.parse_name(zip_name)
        ok = (parsed is not None and parsed[0] == m["symbol"] and parsed[1] == m["interval"]
              and (len(parsed[2]) == 7) == (m["period"] == "monthly"))
        blob = self.archive_zip(zip_name) if ok else None
        if blob is None:
            return web.Response(status=404, content_type="application/xml", text=archives.not_found(request.path))
        if want_checksum:
            return web.Response(body=archives.checksum_text(blob, zip_name).encode(), content_type="text/plain")
        self._rest_requests["archive"] += 1
        if self._faults.corrupt_archive > 0:
            self._faults.corrupt_archive -= 1
            blob = archives.corrupt(blob)
        return web.Response(body=blob, content_type="application/zip")

    def _trade_history_endpoints(self) -> list[tuple[str, Any, Any]]:
        return SpotTrades(self).endpoints()  # simulator/spot_trades.py

    def add_routes(self, router: web.UrlDispatcher) -> None:
        endpoints: list[tuple[str, Weight, Handler]] = [
            ("ping", lambda _: binance.REST_WEIGHTS["ping"], self._ping),
            ("time", lambda _: binance.REST_WEIGHTS["time"], self._time),
            ("exchangeInfo", lambda _: binance.REST_WEIGHTS["exchangeInfo"], self._exchange_info_endpoint),
            ("klines", self._klines_weight, self._klines),
            ("depth", self._depth_weight, self._depth),
            *self._trade_history_endpoints(),  # historicalTrades, aggTrades
        ]
        for name, weight, handler in endpoints:
            wrapped = self._rest(name, weight, handler)
            for prefix in ("/api.binance.com", ""):
                router.add_get(f"{prefix}/api/v3/{name}", wrapped)
        for prefix in ("/data.binance.vision", ""):
            router.add_get(f"{prefix}/data/spot/{{period:daily|monthly}}/klines/{{symbol}}/{{interval}}/{{name}}",
                           self._archive)
        for prefix in ("/stream.binance.com", ""):
            router.add_get(f"{prefix}/ws", self._ws_session)
            router.add_get(f"{prefix}/ws/{{tail:.*}}", self._ws_session)
            router.add_get(f"{prefix}/stream", self._ws_session)


def _rate_offsets(events: list[ReplayEvent], rate: float) -> list[float]:
    """Seconds from a loop's start to each event when trades come evenly at `rate` a second (one per message)."""
    out: list[float] = []
    trades = 0
    for ev in events:
        if isinstance(ev, TradeEvent):
            out.append(trades / rate)
            trades += 1
        else:
            out.append(max(0, trades - 1) / rate)
    return out
