"""The exchange simulator: an aiohttp server speaking Binance spot's REST and WebSocket formats.

It replays a `Recording` (real captured trades and bookTickers, plus klines derived from those trades) to
the WebSocket clients that subscribed, paced by the recorded receive times, and serves REST klines from the
real daily zips plus the derived candles the replay has reached (closed ones and the open one), so REST
never shows data "from the future" of the replay, as a real exchange would not.

URL layout (see common/exchanges/clients.py): `{base}/{original host}{original path}` and `{base}{original path}`:
- REST   /api.binance.com/api/v3/{ping,time,exchangeInfo,klines,depth}  and  /api/v3/...
- WS     /stream.binance.com/ws[/{anything}]  and  /ws[/...]: raw event payloads (Binance's `/ws`);
         a last path segment containing '@' is a stream subscribed at connect, as on Binance.
         /stream.binance.com/stream?streams=a/b  and  /stream?...: combined `{"stream","data"}` envelopes.
- Control under /_sim/: GET status, POST fault, POST replay (see `Simulator.inject` / `Simulator.restart`).

The replay starts, by default, when the first client subscribes to a stream that carries recorded data (or
once every stream of `wait_for_streams` has a subscriber), so nothing is sent before a collector listens;
after the last event it stops for good unless `loop` is set or it is restarted through /_sim/replay.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import heapq
import json
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import aiohttp
from aiohttp import web

from simulator import archives, binance, depth
from simulator.history import History
from simulator.recording import (
    DEFAULT_SYMBOLS,
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
from simulator.replay import ReplayTask
from simulator.spot_trades import SpotTrades
from simulator.venue import Venue, build_venues
from simulator.wirefaults import WIRE_FAULT_KINDS, WireFaults

log = logging.getLogger("simulator")

StartMode = Literal["subscribe", "manual", "immediate"]
FAULT_KINDS = ("malformed_klines", "disconnect", "stall", "http_error", "drop_trades", "corrupt_archive", "halt",
               *WIRE_FAULT_KINDS, "clear")
DEFAULT_EXCHANGE_INFO_SYMBOLS: tuple[str, ...] = ("BTCUSDT", "ETHUSDT", "ETHBTC", "BNBUSDT", "SOLUSDT")


@dataclass(frozen=True)
class SimulatorOptions:
    speed: float = 1.0  # 1.0 = recorded pace, 2.0 = twice as fast, 0 = as fast as the clients read
    loop: bool = False
    shift_to_now: bool = False  # shift timestamps by whole minutes so the recording starts (about) now
    max_trades: int | None = None  # replay only the first N trades
    symbols: tuple[str, ...] = DEFAULT_SYMBOLS
    start: StartMode = "subscribe"
    wait_for_streams: tuple[str, ...] = ()  # with start="subscribe": start once all of these have subscribers
    book_ticker: bool = True
    kline_throttle_ms: int = 0  # 0: an open-kline update after every trade
    data_dir: Path | None = None
    exchange_info_symbols: tuple[str, ...] | None = DEFAULT_EXCHANGE_INFO_SYMBOLS  # None: all 1,695 symbols
    weight_limit: int = 6000  # REQUEST_WEIGHT per window; above it: HTTP 429 with Retry-After
    weight_window_s: float = 60.0  # Binance counts weight per clock minute
    ban_after_429s: int = 5  # requests answered 429 in one window before the IP is banned (HTTP 418)
    ban_s: float = 120.0  # the first ban's length; each further ban doubles it, up to 3 days (as Binance)
    history: bool = True  # serve 1m klines for any range before the replay (simulator/history.py)
    ws_ping_s: float | None = 20.0  # server pings like Binance; None disables
    rest_candle_cap: int = 100_000  # derived candles kept for REST per symbol (looping forever grows it)
    venues: tuple[str, ...] = ()  # other exchanges served on the same port (simulator/venue.py)
    depth: bool = True  # replay the recorded depth diffs and serve GET /api/v3/depth (simulator/depth.py)

    def __post_init__(self) -> None:
        for name in ("symbols", "wait_for_streams", "exchange_info_symbols", "venues"):  # lists from JSON/CLI/kwargs
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))
        if self.speed < 0:
            raise ValueError(f"speed must be >= 0 (0 = as fast as possible), got {self.speed}")
        if self.start not in ("subscribe", "manual", "immediate"):
            raise ValueError(f"start must be subscribe, manual or immediate, got {self.start!r}")


@dataclass(eq=False)
class _Connection:
    ws: web.WebSocketResponse
    path: str
    remote: str
    combined: bool
    streams: set[str] = field(default_factory=set)
    sent: int = 0
    connected_at: float = field(default_factory=time.time)


@dataclass
class _Faults:
    malformed_klines: int = 0
    malformed_shape: str = "null_values"
    http_error: int = 0
    http_status: int = 503
    retry_after_s: int = 1
    stall_until: float = 0.0  # time.monotonic()
    stall_mode: Literal["pause", "drop"] = "pause"
    drop_trades: int = 0
    down_until: float = 0.0  # time.monotonic(): WebSocket upgrades refused until then
    corrupt_archive: int = 0  # the next N archive zips are served with one byte changed (CHECKSUM mismatch)
    halt_until: float = 0.0  # time.monotonic(): the market is halted (replay held, nothing sent) until then
    wire: WireFaults = field(default_factory=WireFaults)

    def as_dict(self) -> dict[str, Any]:
        now = time.monotonic()
        return {"halt_remaining_s": round(max(0.0, self.halt_until - now), 3), **self.wire.as_dict(), "malformed_klines": self.malformed_klines, "malformed_shape": self.malformed_shape,
                "http_error": self.http_error, "http_status": self.http_status,
                "stall_remaining_s": round(max(0.0, self.stall_until - now), 3), "stall_mode": self.stall_mode,
                "drop_trades": self.drop_trades, "ws_down_remaining_s": round(max(0.0, self.down_until - now), 3),
                "corrupt_archive": self.corrupt_archive}


class FaultError(ValueError):
    """A fault request the simulator cannot apply (unknown kind or bad parameter)."""


class Simulator:
    """One simulated Binance spot exchange. Build it, then `await start(host, port)` (or use
    `start_simulator`); the Python API mirrors the /_sim/ control endpoints."""

    def __init__(self, options: SimulatorOptions | None = None, recording: Recording | None = None) -> None:
        self.options = options or SimulatorOptions()
        opts = self.options
        self.data_dir = opts.data_dir or real_data_dir()
        self.recording = recording or Recording.load(self.data_dir, opts.symbols, opts.max_trades,
                                                     opts.book_ticker, opts.kline_throttle_ms, opts.depth)
        self._recorded_info = load_exchange_info(self.data_dir)
        binance.trim_exchange_info(self._recorded_info, opts.exchange_info_symbols, 0, 0)  # fail fast on typos
        self.history = History(self.data_dir, self._history_end_ms()) if opts.history else None
        self._daily: dict[str, list[Candle]] = {} if self.history else {
            s: load_daily_klines(self.data_dir, s) for s in self._symbol_ids()}
        self._archives: OrderedDict[str, bytes | None] = OrderedDict()
        self._data_streams = {binance.stream_name(s, ch) for s in self.recording.symbols
                              for ch in ("trade", "kline_1m", "bookTicker")}
        self._data_streams |= {binance.stream_name(s, ch) for s in self.recording.snapshots
                               for ch in ("depth", "depth@100ms")}
        self._stream_names: dict[tuple[str, str], str] = {}
        self.speed = opts.speed
        self.loop = opts.loop
        self.state: Literal["idle", "running", "finished", "stopped"] = "idle"
        self.host = "127.0.0.1"
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._replay_task = ReplayTask("simulator-replay", on_failure=self._replay_failed)
        self._connections: set[_Connection] = set()
        self._subscribers: dict[str, set[_Connection]] = {}
        self._faults = _Faults()
        self._reset_replay_state()
        self._rest_requests: Counter[str] = Counter()
        self._weight_minute = 0  # index of the current weight window
        self._weight_used = 0
        self._throttled_in_window = 0
        self._ban_until = 0.0  # time.time()
        self._bans = 0
        self._rest_status: Counter[int] = Counter()
        self.venues: dict[str, Venue] = {v.exchange: v for v in build_venues(opts.venues, opts)}
        self.app = self._build_app()

    # ------------------------------------------------------------------------------------------------------
    # Lifecycle

    async def start(self, host: str = "127.0.0.1", port: int = 0, access_log: bool = False) -> None:
        self._runner = web.AppRunner(self.app, access_log=logging.getLogger("aiohttp.access") if access_log
                                     else None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        self.host = host
        self.port = int(self._runner.addresses[0][1])
        rec = self.recording
        log.info("simulated binance spot on %s (REST) and %s/stream.binance.com/ws (WebSocket): %d trades of "
                 "%s, ids %d..%d, %.0f s recorded, %d closed 1m candles derived; speed %s%s%s; start on %s",
                 self.rest_url, self.ws_url, len(rec.trades), ",".join(rec.symbols), rec.trades[0].id,
                 rec.trades[-1].id, rec.duration_s, len(rec.candles), self.speed or "max",
                 ", looping" if self.loop else "", ", shifted to now" if self.options.shift_to_now else "",
                 self.options.start)
        for venue in self.venues.values():
            await venue.start()
        if self.options.start == "immediate":
            self.restart()

    async def stop(self) -> None:
        for venue in self.venues.values():
            await venue.stop()
        await self._cancel_replay()
        self.state = "stopped"
        await self.disconnect_all(code=aiohttp.WSCloseCode.GOING_AWAY)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def rest_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.port}"

    # ------------------------------------------------------------------------------------------------------
    # Python API (the same operations as /_sim/)

    def restart(self, speed: float | None = None, loop: bool | None = None, arm: bool = False) -> None:
        """(Re)start the replay from the first event now; with `arm`, wait for the next subscription instead.
        The REST store of derived candles is reset with it."""
        if speed is not None:
            if speed < 0:
                raise ValueError(f"speed must be >= 0, got {speed}")
            self.speed = speed
        if loop is not None:
            self.loop = loop
        self._replay_task.cancel_nowait()
        self._reset_replay_state()
        if arm:
            self._replay_task.finished.clear()
            self.state = "idle"
            log.info("replay armed: it starts at the next subscription")
            return
        self.state = "running"
        self._replay_task.start(self._replay)

    async def wait_finished(self, timeout: float | None = None) -> None:
        """Until the replay has sent its last event (raises TimeoutError; never returns while looping)."""
        await self._replay_task.wait_finished(timeout)

    def inject(self, kind: str, **params: Any) -> dict[str, Any]:
        """Apply a fault now; returns the fault state. Kinds and parameters:
        - malformed_klines: count=1, shape='null_values' (see binance.MALFORMED_SHAPES): the next `count`
          klines responses are HTTP 200 with a malformed body; ccxt's fetch_ohlcv returns rows with None.
        - disconnect: code=1001, down_s=0: close every WebSocket now; refuse new ones (HTTP 503) for down_s.
        - stall: seconds (required), mode='pause'|'drop': send nothing for `seconds`, connections stay open
          and pings are answered. 'pause' holds the replay (nothing lost, later data comes late); 'drop'
          lets the replay run on and discards what falls in the stall (a real gap).
        - http_error: status=503, count=1, retry_after=1: the next `count` REST requests fail with `status`
          (429/418 carry Retry-After, as Binance sends).
        - drop_trades: count: the next `count` trade messages are not sent (a gap in trade ids; klines still
          count them, as the exchange's own candles would).
        - corrupt_archive: count=1: the next `count` archive zips are served with one byte changed, so they no
          longer match their CHECKSUM files.
        - halt: seconds (required): a trading halt: the replay holds (no message of any stream, nothing lost),
          connections stay open, pings and REST are answered; then it resumes where it stopped.
        - malformed_ws, duplicate, reorder, sequence_gap: count=1, stream='' (a substring of the stream name,
          e.g. '@depth'); clock_skew: ms: see simulator/wirefaults.py.
        - clear: remove every pending fault.
        """
        f = self._faults
        try:
            if kind == "malformed_klines":
                shape = str(params.get("shape", "null_values"))
                if shape not in binance.MALFORMED_SHAPES:
                    raise FaultError(f"unknown shape {shape!r}; one of {sorted(binance.MALFORMED_SHAPES)}")
                f.malformed_klines, f.malformed_shape = int(params.get("count", 1)), shape
            elif kind == "disconnect":
                f.down_until = time.monotonic() + float(params.get("down_s", 0))
                code = int(params.get("code", aiohttp.WSCloseCode.GOING_AWAY))
                asyncio.get_running_loop().create_task(self.disconnect_all(code))
            elif kind == "stall":
                if "seconds" not in params:
                    raise FaultError("stall needs 'seconds'")
                mode = params.get("mode", "pause")
                if mode not in ("pause", "drop"):
                    raise FaultError(f"stall mode must be 'pause' or 'drop', got {mode!r}")
                f.stall_until, f.stall_mode = time.monotonic() + float(params["seconds"]), mode
            elif kind == "http_error":
                status = int(params.get("status", 503))
                if not 400 <= status <= 599:
                    raise FaultError(f"http_error status must be 4xx or 5xx, got {status}")
                f.http_error, f.http_status = int(params.get("count", 1)), status
                f.retry_after_s = int(params.get("retry_after", 1))
            elif kind == "drop_trades":
                f.drop_trades = int(params["count"])
            elif kind == "corrupt_archive":
                f.corrupt_archive = int(params.get("count", 1))
            elif kind == "halt":
                if "seconds" not in params:
                    raise FaultError("halt needs 'seconds'")
                f.halt_until = time.monotonic() + float(params["seconds"])
            elif kind in WIRE_FAULT_KINDS:
                f.wire.arm(kind, params)
            elif kind == "clear":
                self._faults = _Faults()
            else:
                raise FaultError(f"unknown fault kind {kind!r}; one of {', '.join(FAULT_KINDS)}")
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, FaultError):
                raise
            raise FaultError(f"bad parameters for fault {kind!r}: {params} ({exc})") from exc
        log.warning("fault injected: %s %s", kind, params)
        return self._faults.as_dict()

    async def disconnect_all(self, code: int = aiohttp.WSCloseCode.GOING_AWAY) -> int:
        connections = list(self._connections)
        for conn in connections:
            self._forget(conn)
        await asyncio.gather(*(c.ws.close(code=code, message=b"simulator disconnect") for c in connections),
                             return_exceptions=True)
        if connections:
            log.info("closed %d WebSocket connection(s) with code %d", len(connections), code)
        return len(connections)

    def expected_trades(self, loop: int = 0) -> list[Trade]:
        """The trades this simulator sends in loop `loop` of the current replay (with its time offset)."""
        return self.recording.trades_in_loop(loop, self.time_offset_ms)

    def expected_candles(self, loop: int = 0) -> list[Candle]:
        """The closed 1m candles (`x` true) this simulator sends in loop `loop` of the current replay."""
        return self.recording.candles_in_loop(loop, self.time_offset_ms)

    def status(self) -> dict[str, Any]:
        rec = self.recording
        return {
            "state": self.state, "speed": self.speed, "loop_enabled": self.loop, "loop": self.loop_index,
            "loops_done": self.loops_done, "position": self.position, "events": len(rec.events),
            "trades_replayed": self.trades_replayed, "messages_sent": self.messages_sent,
            "sent_by_stream": dict(self.sent_by_stream), "dropped_trade_ids": self.dropped_trade_ids[-1000:],
            "last_trade_id": self.last_trade_id, "replay_time_ms": self.replay_time_ms,
            "time_offset_ms": self.time_offset_ms, "loop_shift_ms": rec.loop_shift_ms,
            "connections": [{"path": c.path, "remote": c.remote, "combined": c.combined,
                             "streams": sorted(c.streams), "sent": c.sent} for c in self._connections],
            "subscriptions": {s: len(c) for s, c in self._subscribers.items() if c},
            "faults": self._faults.as_dict(),
            "depth": {sym: {"last_update_id": b.last_update_id, "passed_snapshot": b.passed_snapshot,
                            "snapshot_last_update_id": b.snapshot.last_update_id, "snapshots_served": b.served}
                      for sym, b in self._books.items()},
            "rest": {"requests": dict(self._rest_requests), "weight_used_1m": self._current_weight(),
                     "status": {str(k): v for k, v in sorted(self._rest_status.items())},
                     "banned_remaining_s": round(max(0.0, self._ban_until - time.time()), 3), "bans": self._bans,
                     "history_end_ms": self.history.end_ms if self.history else None},
            "venues": {name: venue.status() for name, venue in self.venues.items()},
            "recording": {"symbols": list(rec.symbols), "trades": len(rec.trades), "candles": len(rec.candles),
                          "first_trade_id": rec.trades[0].id, "last_trade_id": rec.trades[-1].id,
                          "first_trade_time": rec.trades[0].time, "last_trade_time": rec.trades[-1].time,
                          "duration_s": round(rec.duration_s, 3)},
        }

    # ------------------------------------------------------------------------------------------------------
    # Replay

    def _reset_replay_state(self) -> None:
        self.loop_index = 0
        self.loops_done = 0
        self.position = 0
        self.trades_replayed = 0
        self.messages_sent = 0
        self.sent_by_stream: Counter[str] = Counter()
        self.dropped_trade_ids: list[int] = []
        self.last_trade_id: int | None = None
        self.replay_time_ms: int | None = None
        self.time_offset_ms = 0
        self._rest_closed: dict[str, list[Candle]] = {s: [] for s in self.recording.symbols}
        self._rest_open: dict[str, Candle] = {}
        self._books = {sym: depth.DepthBook(snap) for sym, snap in self.recording.snapshots.items()}
        self._depth_pending: dict[str, list[depth.DepthDiff]] = {}  # diffs of the current second, for `@depth`

    async def _cancel_replay(self) -> None:
        await self._replay_task.cancel()

    def _replay_failed(self) -> None:
        self.state = "finished"

    async def _replay(self) -> None:
        rec = self.recording
        events = rec.events
        if self.options.shift_to_now:
            # A whole number of minutes, so derived candles keep their trades; the first trade lands <= now.
            self.time_offset_ms = (int(time.time() * 1000) - rec.trades[0].time) // MINUTE_MS * MINUTE_MS
        log.info("replay started: %d events, speed %s, time offset %+d ms", len(events), self.speed or "max",
                 self.time_offset_ms)
        started = time.monotonic()
        paused = 0.0
        next_log = started + 10
        k = 0
        while True:
            self.loop_index = k
            shift_ms = self.time_offset_ms + k * rec.loop_shift_ms
            loop_ns = k * rec.loop_shift_ms * 1_000_000 - rec.first_recv_ns
            id_shift = {s: k * n for s, n in rec.id_span.items()}
            book_shift = {s: k * n for s, n in rec.book_id_span.items()}
            for sym, book in self._books.items():
                book.reset(k * rec.depth_id_span[sym])
                self._depth_pending.pop(sym, None)
            for i, ev in enumerate(events):
                self.position = i
                if self.speed > 0:
                    delay = started + paused + (ev.recv_ns + loop_ns) / 1e9 / self.speed - time.monotonic()
                    if delay > 0.001:
                        await asyncio.sleep(delay)
                    elif i & 255 == 0:
                        await asyncio.sleep(0)
                elif i & 255 == 0:
                    await asyncio.sleep(0)  # let the server answer requests while replaying flat out
                if self._faults.stall_until > time.monotonic() and self._faults.stall_mode == "pause":
                    paused += await self._sit_out_stall()
                if self._faults.halt_until > time.monotonic():
                    paused += await self._sit_out_halt()
                await self._dispatch(ev, shift_ms, id_shift, book_shift)
                if time.monotonic() >= next_log:
                    next_log = time.monotonic() + 10
                    self._log_progress()
            self.loops_done = k + 1
            if not self.loop:
                break
            k += 1
        self.position = len(events)
        self.state = "finished"
        self._replay_task.finished.set()
        self._log_progress()
        log.info("replay finished after %d loop(s); it restarts only through POST /_sim/replay", self.loops_done)

    async def _sit_out_stall(self) -> float:
        began = time.monotonic()
        while (remaining := self._faults.stall_until - time.monotonic()) > 0 and self._faults.stall_mode == "pause":
            await asyncio.sleep(min(remaining, 0.05))
        return time.monotonic() - began

    async def _sit_out_halt(self) -> float:
        began = time.monotonic()
        while (remaining := self._faults.halt_until - time.monotonic()) > 0:
            await asyncio.sleep(min(remaining, 0.05))
        return time.monotonic() - began

    def _log_progress(self) -> None:
        log.info("replay loop %d at event %d/%d: %d trades replayed, %d messages sent, last trade id %s, "
                 "%d connection(s), REST %s", self.loop_index, self.position, len(self.recording.events),
                 self.trades_replayed, self.messages_sent, self.last_trade_id, len(self._connections),
                 dict(self._rest_requests) or "-")

    def _stream(self, symbol: str, channel: str) -> str:
        key = (symbol, channel)
        name = self._stream_names.get(key)
        if name is None:
            name = self._stream_names[key] = binance.stream_name(symbol, channel)
        return name

    async def _dispatch(self, ev: ReplayEvent, shift_ms: int, id_shift: dict[str, int],
                        book_shift: dict[str, int]) -> None:
        payload: dict[str, Any]
        if isinstance(ev, TradeEvent):
            trade = ev.trade.shifted(id_shift[ev.trade.symbol], shift_ms)
            self.trades_replayed += 1
            self.last_trade_id, self.replay_time_ms = trade.id, trade.time
            stream = self._stream(trade.symbol, "trade")
            if self._faults.drop_trades > 0:
                self._faults.drop_trades -= 1
                self.dropped_trade_ids.append(trade.id)
                return
            subscribers = self._subscribers.get(stream)
            if not subscribers:
                return
            payload = binance.trade_event(trade)
        elif isinstance(ev, KlineEvent):
            candle = ev.candle.shifted(id_shift[ev.candle.symbol], shift_ms)
            self._store_candle(candle, ev.closed)
            stream = self._stream(candle.symbol, "kline_1m")
            subscribers = self._subscribers.get(stream)
            if not subscribers:
                return
            payload = binance.kline_event(candle, ev.event_time + shift_ms, ev.closed)
        elif isinstance(ev, DepthEvent):
            await self._dispatch_depth(ev.diff, shift_ms)
            return
        else:
            book = ev.book
            stream = self._stream(book.symbol, "bookTicker")
            subscribers = self._subscribers.get(stream)
            if not subscribers:
                return
            payload = binance.book_ticker_event(book, book.update_id + book_shift[book.symbol])
        await self._send(stream, payload, subscribers)

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

    async def _send_diff(self, stream: str, diff: depth.DepthDiff) -> None:
        subscribers = self._subscribers.get(stream)
        if not subscribers or self._faults.wire.drop_depth(stream, diff.final_id):
            return
        await self._send(stream, diff.wire(), subscribers)

    async def _send(self, stream: str, payload: dict[str, Any], subscribers: set[_Connection]) -> None:
        """One event to the subscribers of `stream`, through the wire faults (skew, malformed, duplicate,
        reorder); nothing while a stall in 'drop' mode lasts (the data is lost)."""
        if self._faults.stall_until > time.monotonic():
            return
        wire = self._faults.wire
        for raw in wire.frames(stream, binance.encode(wire.skew(payload))):
            wrapped: str | None = None
            for conn in list(subscribers):
                if conn.combined:
                    wrapped = wrapped or binance.combined(stream, raw)
                try:
                    await conn.ws.send_str(wrapped if conn.combined and wrapped else raw)
                except (ConnectionError, RuntimeError) as exc:
                    log.info("dropping WebSocket %s (%s)", conn.path, exc)
                    self._forget(conn)
                    continue
                conn.sent += 1
                self.messages_sent += 1
                self.sent_by_stream[stream] += 1

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
    # WebSocket

    def _subscribe(self, conn: _Connection, streams: list[str]) -> None:
        for s in streams:
            conn.streams.add(s)
            self._subscribers.setdefault(s, set()).add(conn)
            if s not in self._data_streams:
                log.warning("subscription to %s: the simulator has no data for it (it serves %s)", s,
                            ", ".join(sorted(self._data_streams)))
        log.info("%s subscribed to %s", conn.path, ", ".join(streams))
        if self.state == "idle" and self.options.start == "subscribe" and self._ready_to_start():
            self.restart()

    def _ready_to_start(self) -> bool:
        wanted = self.options.wait_for_streams
        if wanted:
            return all(self._subscribers.get(s) for s in wanted)
        return any(self._subscribers.get(s) for s in self._data_streams)

    def _unsubscribe(self, conn: _Connection, streams: list[str]) -> None:
        for s in streams:
            conn.streams.discard(s)
            self._subscribers.get(s, set()).discard(conn)

    def _forget(self, conn: _Connection) -> None:
        self._unsubscribe(conn, list(conn.streams))
        self._connections.discard(conn)

    async def _ws_handler(self, request: web.Request) -> web.StreamResponse:
        if time.monotonic() < self._faults.down_until:
            return web.json_response(binance.error_body(-1001, "simulator: WebSocket is down (fault)"),
                                     status=503)
        combined = request.path.rstrip("/").endswith("/stream")
        ws = web.WebSocketResponse(heartbeat=self.options.ws_ping_s, compress=False)
        await ws.prepare(request)
        conn = _Connection(ws=ws, path=request.path_qs, remote=str(request.remote), combined=combined)
        self._connections.add(conn)
        log.info("WebSocket connected: %s from %s", conn.path, conn.remote)
        initial: list[str] = []
        if combined:
            initial = [s for s in request.query.get("streams", "").split("/") if s]
        else:
            tail = request.match_info.get("tail", "")
            initial = [s for s in tail.split("/") if "@" in s]
        if initial:
            self._subscribe(conn, initial)
        try:
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    reply = self._on_client_message(conn, msg.data)
                    if reply is not None:
                        await ws.send_str(json.dumps(reply, separators=(",", ":")))
                elif msg.type == aiohttp.WSMsgType.ERROR:
                    break
        except (ConnectionError, RuntimeError) as exc:
            log.info("WebSocket %s failed: %s", conn.path, exc)
        finally:
            self._forget(conn)
            log.info("WebSocket closed: %s (%d messages sent)", conn.path, conn.sent)
        return ws

    def _on_client_message(self, conn: _Connection, text: str) -> dict[str, Any] | None:
        """Binance's live-subscription requests; replies in Binance's format."""
        return binance.subscription_reply(text, conn.streams, conn.combined,
                                          lambda streams: self._subscribe(conn, streams),
                                          lambda streams: self._unsubscribe(conn, streams))

    # ------------------------------------------------------------------------------------------------------
    # REST

    def _symbol_ids(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((*self.recording.symbols, "BTCUSDT")))

    def _current_weight(self) -> int:
        return self._weight_used if self._weight_minute == int(time.time() // self.options.weight_window_s) else 0

    def _history_end_ms(self) -> int:
        """History is served up to the replay's first minute (the replay serves its own candles as it reaches
        them); with shift_to_now the replay starts now, so history reaches up to the simulator's start."""
        if self.options.shift_to_now:
            now = int(time.time() * 1000)
            return now - now % MINUTE_MS
        first = min(t.time for t in self.recording.trades)
        return first - first % MINUTE_MS

    def _rest(self, name: str, weight: Callable[[web.Request], int],
              handler: Callable[[web.Request], Awaitable[web.Response]]) -> Callable[
                  [web.Request], Awaitable[web.Response]]:
        """Wraps an endpoint with request counting, weight accounting, Binance's 429 / 418 and the http_error
        fault. Weight is counted per clock window (`weight_window_s`, a minute on Binance) and reported in
        X-MBX-USED-WEIGHT-1M. Over the limit: 429 with Retry-After = seconds to the window's end. A client
        that keeps calling after `ban_after_429s` 429s in one window is banned (418, Retry-After = the ban):
        every request is refused until the ban ends; each further ban doubles, up to 3 days."""
        async def wrapped(request: web.Request) -> web.Response:
            response = await self._rest_answer(name, weight, handler, request)
            self._rest_status[response.status] += 1
            return response
        return wrapped

    async def _rest_answer(self, name: str, weight: Callable[[web.Request], int],
                           handler: Callable[[web.Request], Awaitable[web.Response]],
                           request: web.Request) -> web.Response:
        self._rest_requests[name] += 1
        now = time.time()
        window_s = self.options.weight_window_s
        if now < self._ban_until:
            return self._http_error(418, max(1, int(self._ban_until - now + 0.999)), {}, self._ban_until)
        window = int(now // window_s)
        if window != self._weight_minute:
            self._weight_minute, self._weight_used, self._throttled_in_window = window, 0, 0
        self._weight_used += weight(request)
        headers = {"X-MBX-USED-WEIGHT-1M": str(self._weight_used), "X-MBX-USED-WEIGHT": str(self._weight_used)}
        f = self._faults
        if f.http_error > 0:
            f.http_error -= 1
            return self._http_error(f.http_status, f.retry_after_s, headers)
        if self._weight_used > self.options.weight_limit:
            self._throttled_in_window += 1
            if self._throttled_in_window > self.options.ban_after_429s:
                ban_s = min(self.options.ban_s * 2 ** self._bans, 3 * 86_400.0)
                self._bans += 1
                self._ban_until = now + ban_s
                log.warning("banning the client for %.0f s (HTTP 418): %d requests after 429 in this window",
                            ban_s, self._throttled_in_window - 1)
                return self._http_error(418, max(1, int(ban_s + 0.999)), headers, self._ban_until)
            retry = max(1, int((window + 1) * window_s - now + 0.999))
            return self._http_error(429, retry, headers)
        log.debug("REST %s", request.path_qs)
        response = await handler(request)
        response.headers.update(headers)
        return response

    @staticmethod
    def _http_error(status: int, retry_after_s: int, headers: dict[str, str],
                    banned_until: float | None = None) -> web.Response:
        if status == 418 and banned_until is not None:
            headers = {**headers, "Retry-After": str(retry_after_s)}
            body = binance.error_body(-1003, f"Way too much request weight used; IP banned until "
                                             f"{int(banned_until * 1000)}. Please use WebSocket Streams for live "
                                             f"updates to avoid bans.")
        elif status in (418, 429):
            headers = {**headers, "Retry-After": str(retry_after_s)}
            body = binance.error_body(-1003, "Too many requests; current limit of IP(127.0.0.1) is exceeded. "
                                             "Please use WebSocket Streams for live updates.")
        elif status >= 500:
            body = binance.error_body(-1001, "Internal error; unable to process your request. Please try again.")
        else:
            body = binance.error_body(-1000, "An unknown error occurred while processing the request.")
        return web.json_response(body, status=status, headers=headers)

    async def _ping(self, request: web.Request) -> web.Response:
        return web.json_response({})

    async def _time(self, request: web.Request) -> web.Response:
        return web.json_response({"serverTime": int(time.time() * 1000) + self._faults.wire.skew_ms})

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
            log.warning("serving a malformed klines body (%s), %d more to come", f.malformed_shape,
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

    async def _not_served(self, request: web.Request) -> web.Response:
        log.warning("not served: %s %s", request.method, request.path_qs)
        return web.json_response(binance.error_body(-1000, f"simulator: {request.path} is not simulated"),
                                 status=404)

    # ------------------------------------------------------------------------------------------------------
    # Control endpoints

    async def _sim_status(self, request: web.Request) -> web.Response:
        return web.json_response(self.status())

    async def _sim_fault(self, request: web.Request) -> web.Response:
        body = await self._json_body(request)
        kind = body.pop("kind", None)
        exchange = body.pop("exchange", "binance")
        if exchange != "binance":
            venue = self.venues.get(exchange)
            if venue is None:
                return web.json_response({"error": f"exchange {exchange!r} is not served here; served: "
                                                   f"{', '.join(['binance', *self.venues])}"}, status=400)
            try:
                return web.json_response({"ok": True, "faults": venue.inject(str(kind), **body)})
            except FaultError as exc:
                return web.json_response({"error": str(exc)}, status=400)
        if not isinstance(kind, str):
            return web.json_response({"error": f"'kind' is required: one of {', '.join(FAULT_KINDS)}"},
                                     status=400)
        try:
            faults = self.inject(kind, **body)
        except FaultError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response({"ok": True, "faults": faults})

    async def _sim_replay(self, request: web.Request) -> web.Response:
        body = await self._json_body(request)
        try:
            self.restart(speed=body.get("speed"), loop=body.get("loop"), arm=bool(body.get("arm", False)))
        except (TypeError, ValueError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response({"ok": True, "state": self.state, "speed": self.speed, "loop": self.loop})

    @staticmethod
    async def _json_body(request: web.Request) -> dict[str, Any]:
        if not request.can_read_body:
            return {}
        try:
            body = await request.json()
        except ValueError as exc:
            raise web.HTTPBadRequest(text=f"body is not JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise web.HTTPBadRequest(text="body must be a JSON object")
        return body

    def _build_app(self) -> web.Application:
        app = web.Application()
        r = app.router
        endpoints: list[tuple[str, Callable[[web.Request], int], Callable[[web.Request], Awaitable[web.Response]]]] = [
            ("ping", lambda _: binance.REST_WEIGHTS["ping"], self._ping),
            ("time", lambda _: binance.REST_WEIGHTS["time"], self._time),
            ("exchangeInfo", lambda _: binance.REST_WEIGHTS["exchangeInfo"], self._exchange_info_endpoint),
            ("klines", self._klines_weight, self._klines),
            ("depth", self._depth_weight, self._depth),
            *SpotTrades(self).endpoints(),  # historicalTrades, aggTrades (simulator/spot_trades.py)
        ]
        for name, weight, handler in endpoints:
            wrapped = self._rest(name, weight, handler)
            for prefix in ("/api.binance.com", ""):
                r.add_get(f"{prefix}/api/v3/{name}", wrapped)
        for prefix in ("/data.binance.vision", ""):
            r.add_get(f"{prefix}/data/spot/{{period:daily|monthly}}/klines/{{symbol}}/{{interval}}/{{name}}",
                      self._archive)
        for prefix in ("/stream.binance.com", ""):
            r.add_get(f"{prefix}/ws", self._ws_handler)
            r.add_get(f"{prefix}/ws/{{tail:.*}}", self._ws_handler)
            r.add_get(f"{prefix}/stream", self._ws_handler)
        for venue in self.venues.values():
            venue.add_routes(r)
        r.add_get("/_sim/status", self._sim_status)
        r.add_post("/_sim/fault", self._sim_fault)
        r.add_post("/_sim/replay", self._sim_replay)
        r.add_route("*", "/{tail:.*}", self._not_served)
        return app


@contextlib.asynccontextmanager
async def start_simulator(port: int = 0, host: str = "127.0.0.1", recording: Recording | None = None,
                          access_log: bool = False, **options: Any) -> AsyncIterator[Simulator]:
    """Run a simulator for the duration of the block: `async with start_simulator(speed=0) as sim:`.
    `options` are `SimulatorOptions` fields; port 0 picks a free port (see `sim.port`, `sim.rest_url`)."""
    sim = Simulator(SimulatorOptions(**options), recording)
    await sim.start(host, port, access_log=access_log)
    try:
        yield sim
    finally:
        await sim.stop()
