"""Venues: the exchanges the simulator serves, each one a `Venue`, all on the same port.

Each venue is one exchange (a ccxt id) in its own module, speaking that exchange's REST and WebSocket wire
formats under its real host names (`/{host}{path}`, see common/exchanges/clients.py "host-prefix"), replaying the
real recordings, enforcing its rate limits and injecting its faults. Binance spot (spot.py) is always served; the
`Simulator` (server.py) hosts it and the venues named in `SimulatorOptions.venues`, forwards `/_sim/fault` bodies
to the venue's `inject` (by `"exchange": id`, Binance spot by default), lists each other venue's `status()` under
`"venues"` in `/_sim/status`, and starts/stops them with itself.

`Venue` holds what every exchange does alike, once: the faults every venue takes (disconnect, stall, halt,
http_error, clear; `inject`), the replay's lifecycle and pacing (`restart`, `start`, `stop`, `_replay`: events
sent at their recorded receive times divided by `speed`, held while a halt or a stall in 'pause' mode lasts) and
the WebSocket connections (`_ws_session`, `_write`, `disconnect_all`). A venue module adds its recording, its
wire format, its own fault kinds (`_inject`) and its REST endpoints.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Literal, TypeVar

import aiohttp
from aiohttp import web

from simulator.replay import ReplayTask

if TYPE_CHECKING:
    from simulator.server import SimulatorOptions

# ccxt id -> "module:class" of the venues served on request (Binance spot, spot.py, is always served).
VENUES: dict[str, str] = {
    "binanceusdm": "simulator.usdm:BinanceUsdm",
    "coinbase": "simulator.coinbase:CoinbaseVenue",
    "hyperliquid": "simulator.hyperliquid:HyperliquidVenue",
}
COMMON_FAULT_KINDS = ("disconnect", "stall", "halt", "http_error", "clear")
ReplayState = Literal["idle", "running", "finished", "stopped"]
Handler = Callable[[web.Request], Awaitable[web.Response]]


class FaultError(ValueError):
    """A fault request a venue cannot apply (unknown kind or bad parameter); /_sim/fault answers it with 400."""


@dataclass
class Faults:
    """The fault state every venue has; a venue's subclass adds its own kinds' counters."""

    down_until: float = 0.0  # time.monotonic(): WebSocket upgrades refused until then
    stall_until: float = 0.0  # time.monotonic(): nothing sent until then
    stall_mode: Literal["pause", "drop"] = "pause"  # pause: the replay holds; drop: it runs on, unsent
    halt_until: float = 0.0  # time.monotonic(); math.inf: until cleared
    http_error: int = 0  # the next N REST requests fail with http_status
    http_status: int = 503
    retry_after_s: int = 1

    def stalled(self) -> bool:
        return time.monotonic() < self.stall_until

    def halted(self) -> bool:
        return time.monotonic() < self.halt_until

    def take_http_error(self) -> bool:
        """True (and one fewer to come) when this REST request is to fail with the http_error fault."""
        if self.http_error <= 0:
            return False
        self.http_error -= 1
        return True

    def as_dict(self) -> dict[str, Any]:
        now = time.monotonic()

        def remaining(until: float) -> float | str:
            return "until cleared" if until == math.inf else round(max(0.0, until - now), 3)
        return {"ws_down_remaining_s": remaining(self.down_until), "stall_remaining_s": remaining(self.stall_until),
                "stall_mode": self.stall_mode, "halt_remaining_s": remaining(self.halt_until),
                "http_error": self.http_error, "http_status": self.http_status}


@dataclass
class JsonFaults(Faults):
    """Faults of venues whose own malformed_json fault cuts a JSON document in half (Coinbase, Hyperliquid)."""

    malformed_ws: int = 0  # the next N WebSocket data messages
    malformed_rest: int = 0  # the next N REST bodies (HTTP 200)

    def arm_malformed(self, params: dict[str, Any], default_target: Literal["ws", "rest"]) -> None:
        """malformed_json: count=1, target='ws'|'rest'."""
        target = params.get("target", default_target)
        if target not in ("ws", "rest"):
            raise FaultError(f"malformed_json target must be 'ws' or 'rest', got {target!r}")
        setattr(self, f"malformed_{target}", int(params.get("count", 1)))

    def as_dict(self) -> dict[str, Any]:
        return {**super().as_dict(), "malformed_ws": self.malformed_ws, "malformed_rest": self.malformed_rest}


@dataclass(eq=False)
class Connection:
    """One client WebSocket; a venue's subclass adds its subscriptions."""

    ws: web.WebSocketResponse
    path: str
    remote: str
    sent: int = 0


ConnT = TypeVar("ConnT", bound=Connection)
FaultsT = TypeVar("FaultsT", bound=Faults)


class Venue(Generic[ConnT, FaultsT]):
    """One simulated exchange: faults, replay pacing and WebSocket connections, shared by every venue.

    A subclass sets the class attributes and implements the replay hooks (`_reset_replay_state`,
    `_event_offset_s`, `_loop_span_s`, `_dispatch`, ...), `add_routes`, `status`, and `_on_text` for what its
    clients send."""

    exchange: ClassVar[str]  # the ccxt id, e.g. "binanceusdm"
    log: ClassVar[logging.Logger]
    FAULT_KINDS: ClassVar[tuple[str, ...]]
    HTTP_ERROR_DEFAULT: ClassVar[int] = 503
    HTTP_ERROR_ANY_4XX: ClassVar[bool] = True  # False: http_error takes 429 or 5xx only
    HALT_DEFAULT_S: ClassVar[float | None] = None  # halt without 'seconds': None refuses it; math.inf lasts
    # Replayed events between two yields to the server (so it answers requests) when the replay does not sleep:
    YIELD_PACED: ClassVar[int] = 256  # at speed > 0
    YIELD_FLAT_OUT: ClassVar[int] = 256  # at speed 0 (as fast as the clients read)
    YIELD_AFTER_SLEEP: ClassVar[bool] = False  # True: yield once more after each paced sleep

    def __init__(self, options: SimulatorOptions) -> None:
        self.options = options
        self.speed = options.speed
        self.loop = options.loop
        self.state: ReplayState = "idle"
        self._faults: FaultsT = self._new_faults()
        self._connections: set[ConnT] = set()
        self._replay_task = ReplayTask(f"{self.exchange}-replay", on_failure=self._replay_failed)
        self._rest_requests: Counter[str] = Counter()  # per endpoint
        self._rest_statuses: Counter[int] = Counter()  # per HTTP status answered
        self._reset_replay_state()

    # ------------------------------------------------------------------------------------------------------
    # What a venue defines

    def add_routes(self, router: web.UrlDispatcher) -> None:
        """Register this venue's REST and WebSocket routes (host-prefixed, e.g. /fapi.binance.com/...)."""
        raise NotImplementedError

    def status(self) -> dict[str, Any]:
        """What the venue has done: replay position, messages sent, connections, REST, faults."""
        raise NotImplementedError

    def _new_faults(self) -> FaultsT:
        raise NotImplementedError

    def _inject(self, kind: str, params: dict[str, Any]) -> bool:
        """Apply a fault kind of this venue's own; False for a kind it does not know."""
        return False

    def _on_clear(self) -> None:
        """After the `clear` fault replaced the fault state: undo what lives outside it."""

    def _events(self) -> Sequence[Any]:
        """The recorded events, in the order sent."""
        raise NotImplementedError

    def _event_offset_s(self, event: Any) -> float:
        """Seconds from the recording's first event to `event`, as received."""
        raise NotImplementedError

    def _loop_span_s(self) -> float:
        """Seconds one loop of the replay lasts (at speed 1)."""
        raise NotImplementedError

    def _replay_begins(self) -> None:
        """When the replay task starts (e.g. the shift_to_now time offset)."""

    def _loop_begins(self, loop: int) -> None:
        """Before loop `loop` (0, 1, ...): the loop's shifts of times and ids."""

    async def _dispatch(self, event: Any, loop: int) -> None:
        """One recorded event to the market state and to the subscribers."""
        raise NotImplementedError

    async def _replay_ends(self) -> None:
        """After the last event of the last loop (e.g. send what the reorder fault still holds)."""

    def _log_progress(self) -> None:
        self.log.info("%s replay loop %d at event %d/%d: %d messages sent, %d connection(s)", self.exchange,
                      self.loop_index, self.position, len(self._events()), self.messages_sent, len(self._connections))

    def _describe(self) -> str:
        """A line for the start-up log: what is served where."""
        return f"simulated {self.exchange}"

    # ------------------------------------------------------------------------------------------------------
    # Lifecycle

    async def start(self) -> None:
        """Called once the HTTP server listens."""
        self.log.info("%s; speed %s%s; start on %s", self._describe(), self.speed or "max",
                      ", looping" if self.loop else "", self.options.start)
        if self.options.start == "immediate":
            self.restart()

    async def stop(self) -> None:
        """Close every connection and cancel the replay."""
        await self._replay_task.cancel()
        self.state = "stopped"
        await self.disconnect_all(aiohttp.WSCloseCode.GOING_AWAY)

    def restart(self, speed: float | None = None, loop: bool | None = None, arm: bool = False) -> None:
        """(Re)start the replay from the first event now; with `arm`, wait for the next subscription instead."""
        if speed is not None:
            if speed < 0:
                raise ValueError(f"speed must be >= 0 (0 = as fast as the clients read), got {speed}")
            self.speed = speed
        if loop is not None:
            self.loop = loop
        self._replay_task.cancel_nowait()
        self._reset_replay_state()
        if arm:
            self._replay_task.finished.clear()
            self.state = "idle"
            self.log.info("%s replay armed: it starts at the next subscription", self.exchange)
            return
        self.state = "running"
        self._replay_task.start(self._replay)

    def _start_on_subscription(self, carries_data: bool) -> None:
        """A client subscribed: start the replay if it waits for that (start="subscribe") and the data is ours."""
        if carries_data and self.state == "idle" and self.options.start == "subscribe":
            self.restart()

    async def wait_finished(self, timeout: float | None = None) -> None:
        """Until the replay has sent its last event (raises TimeoutError; never returns while looping)."""
        await self._replay_task.wait_finished(timeout)

    # ------------------------------------------------------------------------------------------------------
    # Faults

    def inject(self, kind: str, **params: Any) -> dict[str, Any]:
        """Apply a fault now; return the venue's fault state. Raises `FaultError` for a bad one. Every venue takes:
        - disconnect: code=1001, down_s=0: close every WebSocket now; refuse new ones (HTTP 503) for down_s.
        - stall: seconds (required), mode='pause'|'drop': send nothing for `seconds`; pings are answered.
          'pause' holds the replay (nothing lost, later data comes late); 'drop' lets it run on and discards
          what falls in the stall (a real gap).
        - halt: seconds: a trading halt (what it does is the venue's: see its `_inject`).
        - http_error: status, count=1, retry_after=1: the next `count` REST requests fail with `status`.
        - clear: remove every pending fault.
        and its own kinds (`FAULT_KINDS`, the venue's `_inject`)."""
        try:
            if not self._inject_common(kind, params) and not self._inject(kind, params):
                raise FaultError(f"unknown kind; one of {', '.join(self.FAULT_KINDS)}")
        except (KeyError, TypeError, ValueError) as exc:
            reason = str(exc) if isinstance(exc, FaultError) else f"bad parameters {params} ({exc!r})"
            raise FaultError(f"{self.exchange} fault {kind!r}: {reason}") from exc
        self.log.warning("%s fault injected: %s %s", self.exchange, kind, params)
        return self._faults.as_dict()

    def _inject_common(self, kind: str, params: dict[str, Any]) -> bool:
        f = self._faults
        now = time.monotonic()
        if kind == "disconnect":
            f.down_until = now + float(params.get("down_s", 0))
            code = int(params.get("code", aiohttp.WSCloseCode.GOING_AWAY))
            asyncio.get_running_loop().create_task(self.disconnect_all(code))
        elif kind == "stall":
            if "seconds" not in params:
                raise FaultError("stall needs 'seconds'")
            mode = params.get("mode", "pause")
            if mode not in ("pause", "drop"):
                raise FaultError(f"stall mode must be 'pause' or 'drop', got {mode!r}")
            f.stall_until, f.stall_mode = now + float(params["seconds"]), mode
        elif kind == "halt":
            seconds = params.get("seconds")
            seconds = self.HALT_DEFAULT_S if seconds is None else seconds
            if seconds is None:
                raise FaultError("halt needs 'seconds'")
            f.halt_until = now + float(seconds)
        elif kind == "http_error":
            status = int(params.get("status", self.HTTP_ERROR_DEFAULT))
            valid = 400 <= status <= 599 if self.HTTP_ERROR_ANY_4XX else status == 429 or 500 <= status <= 599
            if not valid:
                raise FaultError(f"http_error status must be {'4xx' if self.HTTP_ERROR_ANY_4XX else '429'} or 5xx, "
                                 f"got {status}")
            f.http_error, f.http_status = int(params.get("count", 1)), status
            f.retry_after_s = int(params.get("retry_after", 1))
        elif kind == "clear":
            self._faults = self._new_faults()
            self._on_clear()
        else:
            return False
        return True

    def _holds_replay(self) -> bool:
        """The replay waits while this is true: a halt, or a stall in 'pause' mode."""
        f = self._faults
        return f.halted() or (f.stalled() and f.stall_mode == "pause")

    # ------------------------------------------------------------------------------------------------------
    # Replay

    def _replay_status(self) -> dict[str, Any]:
        """The replay's part of `status()`, alike on every venue."""
        return {"state": self.state, "speed": self.speed, "loop_enabled": self.loop, "loop": self.loop_index,
                "loops_done": self.loops_done, "position": self.position, "events": len(self._events()),
                "messages_sent": self.messages_sent}

    def _reset_replay_state(self) -> None:
        """Where a (re)started replay begins; a venue extends it with its market state."""
        self.loop_index = 0
        self.loops_done = 0
        self.position = 0
        self.messages_sent = 0

    def _replay_failed(self) -> None:
        self.state = "finished"

    async def _replay(self) -> None:
        """Every event at started + (loop span * k + its recorded offset) / speed, loop after loop while `loop`."""
        self._replay_begins()
        events = self._events()
        span_s = self._loop_span_s()
        started = time.monotonic()
        paused = 0.0
        next_log = started + 10
        k = 0
        while True:
            self.loop_index = k
            self._loop_begins(k)
            for i, ev in enumerate(events):
                self.position = i
                if self.speed > 0:
                    due = started + paused + (k * span_s + self._event_offset_s(ev)) / self.speed
                    delay = due - time.monotonic()
                    if delay > 0.001:
                        await asyncio.sleep(delay)
                        if self.YIELD_AFTER_SLEEP:
                            await asyncio.sleep(0)
                    elif i % self.YIELD_PACED == 0:
                        await asyncio.sleep(0)
                elif i % self.YIELD_FLAT_OUT == 0:
                    await asyncio.sleep(0)  # let the server answer requests while replaying flat out
                if self._holds_replay():
                    began = time.monotonic()
                    while self._holds_replay():
                        await asyncio.sleep(0.02)
                    paused += time.monotonic() - began  # later events keep their spacing: they come late
                await self._dispatch(ev, k)
                if time.monotonic() >= next_log:
                    next_log = time.monotonic() + 10
                    self._log_progress()
            self.loops_done = k + 1
            if not self.loop:
                break
            k += 1
        self.position = len(events)
        await self._replay_ends()
        self.state = "finished"
        self._replay_task.finished.set()
        self._log_progress()
        self.log.info("%s replay finished after %d loop(s); it restarts only through restart() (POST /_sim/replay "
                      "for Binance spot)", self.exchange, self.loops_done)

    # ------------------------------------------------------------------------------------------------------
    # REST

    def _counted(self, answer: Handler) -> Handler:
        """`answer` with the HTTP status of each of its responses counted (`_rest_counts`)."""
        async def counted(request: web.Request) -> web.Response:
            response = await answer(request)
            self._rest_statuses[response.status] += 1
            return response
        return counted

    def _rest_counts(self) -> dict[str, Any]:
        """The REST part of `status()`: requests per endpoint and responses per HTTP status."""
        return {"requests": dict(self._rest_requests),
                "status": {str(k): v for k, v in sorted(self._rest_statuses.items())}}

    # ------------------------------------------------------------------------------------------------------
    # WebSocket

    def _ws_refusal(self) -> web.Response | None:
        """The answer to a WebSocket upgrade refused (the disconnect fault's down time); None accepts it."""
        if time.monotonic() < self._faults.down_until:
            return web.Response(status=503, text=f"simulator: {self.exchange} WebSocket is down (fault)")
        return None

    def _ws_heartbeat(self) -> float | None:
        """Seconds between the server's pings (None: the exchange does not ping)."""
        return self.options.ws_ping_s

    def _new_connection(self, ws: web.WebSocketResponse, request: web.Request) -> ConnT:
        raise NotImplementedError

    async def _on_connect(self, conn: ConnT, request: web.Request) -> None:
        """Right after the upgrade (e.g. streams named in the URL)."""

    async def _on_text(self, conn: ConnT, text: str) -> None:
        """A text message from the client."""
        raise NotImplementedError

    async def _ws_session(self, request: web.Request) -> web.StreamResponse:
        """One client WebSocket, from the upgrade to its close: messages to `_on_text`, then `_forget`."""
        refused = self._ws_refusal()
        if refused is not None:
            return refused
        ws = web.WebSocketResponse(heartbeat=self._ws_heartbeat(), compress=False)
        await ws.prepare(request)
        conn = self._new_connection(ws, request)
        self._connections.add(conn)
        self.log.info("%s WebSocket connected: %s from %s", self.exchange, conn.path, conn.remote)
        try:
            await self._on_connect(conn, request)
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    await self._on_text(conn, msg.data)
                elif msg.type == aiohttp.WSMsgType.ERROR:
                    break
        except (ConnectionError, RuntimeError) as exc:
            self.log.info("%s WebSocket %s from %s failed: %s", self.exchange, conn.path, conn.remote, exc)
        finally:
            self._forget(conn)
            self.log.info("%s WebSocket closed: %s from %s (%d messages sent)", self.exchange, conn.path,
                          conn.remote, conn.sent)
        return ws

    async def _write(self, conn: ConnT, text: str) -> bool:
        """One frame to one client; a client that cannot take it is forgotten (False)."""
        try:
            await conn.ws.send_str(text)
        except (ConnectionError, RuntimeError) as exc:
            self.log.info("%s: dropping WebSocket %s from %s (%s)", self.exchange, conn.path, conn.remote, exc)
            self._forget(conn)
            return False
        conn.sent += 1
        self.messages_sent += 1
        return True

    def _forget(self, conn: ConnT) -> None:
        """The connection is gone (closed, failed or disconnected): drop it and its subscriptions."""
        self._connections.discard(conn)

    async def disconnect_all(self, code: int = aiohttp.WSCloseCode.GOING_AWAY) -> int:
        """Close every WebSocket with `code` (the disconnect fault, and stop); returns how many."""
        connections = list(self._connections)
        for conn in connections:
            self._forget(conn)
        await asyncio.gather(*(c.ws.close(code=code, message=b"simulator disconnect") for c in connections),
                             return_exceptions=True)
        if connections:
            self.log.info("%s: closed %d WebSocket connection(s) with code %d", self.exchange, len(connections),
                          code)
        return len(connections)


def build_venues(names: tuple[str, ...], options: SimulatorOptions) -> list[Venue[Any, Any]]:
    """The venues named, built from `VENUES`; an unknown name is an error that lists the known ones."""
    venues = []
    for name in names:
        target = VENUES.get(name)
        if target is None:
            raise ValueError(f"simulator venue {name!r} is unknown; known: binance (always served), "
                             f"{', '.join(sorted(VENUES)) or '(none)'}")
        module, cls = target.split(":")
        venues.append(getattr(importlib.import_module(module), cls)(options))
    return venues
