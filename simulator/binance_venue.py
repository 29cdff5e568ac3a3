"""What Binance spot (spot.py) and Binance USD-M futures (usdm.py) share as venues: named streams subscribed at
connect (`/ws/<stream>`, `/stream?streams=a/b`) or live (SUBSCRIBE / UNSUBSCRIBE, binance.subscription_reply),
raw or combined (`{"stream","data"}`) frames, and the wire faults of wirefaults.py on every frame sent."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar

from aiohttp import web

from simulator import binance
from simulator.depth import DepthDiff
from simulator.limits import WeightLimiter
from simulator.venue import Connection, Faults, Handler, Venue
from simulator.wirefaults import WIRE_FAULT_KINDS, WireFaults

if TYPE_CHECKING:
    from simulator.server import SimulatorOptions


@dataclass(eq=False)
class StreamConnection(Connection):
    combined: bool = False  # /stream: frames wrapped as {"stream": name, "data": payload}
    streams: set[str] = field(default_factory=set)


@dataclass
class BinanceFaults(Faults):
    wire: WireFaults = field(default_factory=WireFaults)

    def as_dict(self) -> dict[str, Any]:
        return {**super().as_dict(), **self.wire.as_dict()}


Weight = Callable[[web.Request], int]
BinanceFaultsT = TypeVar("BinanceFaultsT", bound=BinanceFaults)


class BinanceRecording(Protocol):
    """What the replay needs of a Binance recording (recording.Recording, usdm.UsdmRecording)."""

    @property
    def events(self) -> Sequence[Any]: ...  # each with `recv_ns`
    @property
    def first_recv_ns(self) -> int: ...
    @property
    def loop_shift_ms(self) -> int: ...


class BinanceVenue(Venue[StreamConnection, BinanceFaultsT]):
    """A Binance-style venue: subscribers per stream name, frames through the wire faults."""

    recording: BinanceRecording

    FUTURES: ClassVar[bool] = False  # USD-M: its error messages and depth limits

    def __init__(self, options: SimulatorOptions, data_streams: set[str], weight_limit: int) -> None:
        self._data_streams = data_streams  # the streams the recording carries data for
        self._subscribers: dict[str, set[StreamConnection]] = {}
        self.limiter = WeightLimiter(weight_limit, options.weight_window_s, options.ban_after_429s, options.ban_s)
        super().__init__(options)

    def _events(self) -> Sequence[Any]:
        return self.recording.events

    def _event_offset_s(self, event: Any) -> float:
        return (event.recv_ns - self.recording.first_recv_ns) / 1e9

    def _loop_span_s(self) -> float:
        return self.recording.loop_shift_ms / 1000

    def _inject(self, kind: str, params: dict[str, Any]) -> bool:
        if kind not in WIRE_FAULT_KINDS:
            return False
        self._faults.wire.arm(kind, params)
        return True

    def _ws_refusal(self) -> web.Response | None:
        if time.monotonic() < self._faults.down_until:
            return web.json_response(binance.error_body(-1001, "simulator: WebSocket is down (fault)"), status=503)
        return None

    def _reset_replay_state(self) -> None:
        super()._reset_replay_state()
        self.sent_by_stream: Counter[str] = Counter()

    def _new_connection(self, ws: web.WebSocketResponse, request: web.Request) -> StreamConnection:
        return StreamConnection(ws=ws, path=request.path_qs, remote=str(request.remote),
                                combined=request.path.rstrip("/").endswith("/stream"))

    async def _on_connect(self, conn: StreamConnection, request: web.Request) -> None:
        """Streams named in the URL: `?streams=a/b` on /stream, a path segment with '@' on /ws/..."""
        if conn.combined:
            initial = [s for s in request.query.get("streams", "").split("/") if s]
        else:
            initial = [s for s in request.match_info.get("tail", "").split("/") if "@" in s]
        if initial:
            self._subscribe(conn, initial)

    async def _on_text(self, conn: StreamConnection, text: str) -> None:
        reply = binance.subscription_reply(text, conn.streams, conn.combined,
                                           lambda streams: self._subscribe(conn, streams),
                                           lambda streams: self._unsubscribe(conn, streams))
        await conn.ws.send_str(json.dumps(reply, separators=(",", ":")))

    def _subscribe(self, conn: StreamConnection, streams: list[str]) -> None:
        for s in streams:
            conn.streams.add(s)
            self._subscribers.setdefault(s, set()).add(conn)
            if s not in self._data_streams:
                self.log.warning("%s subscription to %s: the simulator has no data for it (it serves %s)",
                                 self.exchange, s, ", ".join(sorted(self._data_streams)))
        self.log.info("%s %s subscribed to %s", self.exchange, conn.path, ", ".join(streams))
        self._start_on_subscription(self._ready_to_start())

    def _ready_to_start(self) -> bool:
        return any(self._subscribers.get(s) for s in self._data_streams)

    def _unsubscribe(self, conn: StreamConnection, streams: list[str]) -> None:
        for s in streams:
            conn.streams.discard(s)
            self._subscribers.get(s, set()).discard(conn)

    def _forget(self, conn: StreamConnection) -> None:
        self._unsubscribe(conn, list(conn.streams))
        super()._forget(conn)

    def _connections_status(self) -> list[dict[str, Any]]:
        return [{"path": c.path, "remote": c.remote, "combined": c.combined, "streams": sorted(c.streams),
                 "sent": c.sent} for c in self._connections]

    async def _send(self, stream: str, payload: dict[str, Any]) -> None:
        """One event to the subscribers of `stream`, through the wire faults (skew, malformed, duplicate,
        reorder); nothing while a stall lasts (in 'drop' mode the data is lost)."""
        subscribers = self._subscribers.get(stream)
        if not subscribers or self._faults.stalled():
            return
        wire = self._faults.wire
        for raw in wire.frames(stream, binance.encode(wire.skew(payload))):
            wrapped = binance.combined(stream, raw)
            for conn in list(subscribers):
                if await self._write(conn, wrapped if conn.combined else raw):
                    self.sent_by_stream[stream] += 1

    async def _send_diff(self, stream: str, diff: DepthDiff) -> None:
        """A depth diff, unless nobody listens or the sequence_gap fault drops it."""
        if not self._subscribers.get(stream) or self._faults.wire.drop_depth(stream, diff.final_id):
            return
        await self._send(stream, diff.wire())

    # ------------------------------------------------------------------------------------------------------
    # REST

    def _rest(self, name: str, weight: Weight, handler: Handler) -> Handler:
        """An endpoint with request counting, the IP weight limit (limits.py: 429, then 418 bans) and the
        http_error fault, which strikes before the limit is judged (as an outage does)."""
        return self._counted(lambda request: self._rest_answer(name, weight, handler, request))

    async def _rest_answer(self, name: str, weight: Weight, handler: Handler, request: web.Request) -> web.Response:
        self._rest_requests[name] += 1
        now = time.time()
        verdict = self.limiter.count(weight(request), now)
        if verdict.status == 200 and self._faults.take_http_error():
            f = self._faults
            return self._rest_error(f.http_status, f.retry_after_s, verdict.headers)
        if verdict.status == 200:
            verdict = self.limiter.judge(now)
        if verdict.status != 200:
            if verdict.status == 418 and verdict.headers:  # a new ban (a banned client's requests carry none)
                self.log.warning("%s: banning the client for %d s (HTTP 418): %d requests after 429 in this window",
                                 self.exchange, verdict.retry_after_s, self.limiter.throttled_in_window - 1)
            return self._rest_error(verdict.status, verdict.retry_after_s, verdict.headers, verdict.banned_until)
        self.log.debug("%s REST %s", self.exchange, request.path_qs)
        try:
            response = await handler(request)
        except ValueError as exc:  # a parameter that is not a number
            response = web.json_response(binance.error_body(
                -1100, f"Illegal characters found in a parameter ({exc})."), status=400)
        response.headers.update(verdict.headers)
        return response

    def _rest_error(self, status: int, retry_after_s: int, headers: dict[str, str],
                    banned_until: float | None = None) -> web.Response:
        """Binance's error answers: 429 / 418 with Retry-After (and the ban's end), -1001 for 5xx."""
        if status in (418, 429):
            headers = {**headers, "Retry-After": str(retry_after_s)}
            if banned_until is not None and status == 418:
                msg = (f"Way too many requests; IP banned until {int(banned_until * 1000)}." if self.FUTURES else
                       f"Way too much request weight used; IP banned until {int(banned_until * 1000)}. Please use "
                       f"WebSocket Streams for live updates to avoid bans.")
            else:
                msg = ("Too many requests; current request has limited." if self.FUTURES else
                       "Too many requests; current limit of IP(127.0.0.1) is exceeded. Please use WebSocket "
                       "Streams for live updates.")
            body = binance.error_body(-1003, msg)
        elif status >= 500:
            body = binance.error_body(-1001, "Internal error; unable to process your request. Please try again.")
        else:
            body = binance.error_body(-1000, "An unknown error occurred while processing the request.")
        return web.json_response(body, status=status, headers=headers)

    def _now_ms(self) -> int:
        """The exchange's clock (moved by the clock_skew fault)."""
        return int(time.time() * 1000) + self._faults.wire.skew_ms

    async def _ping(self, request: web.Request) -> web.Response:
        return web.json_response({})

    async def _time(self, request: web.Request) -> web.Response:
        return web.json_response({"serverTime": self._now_ms()})

    def _rest_status(self) -> dict[str, Any]:
        lim = self.limiter
        return {**self._rest_counts(), "weight_used_1m": lim.current(), "limit": lim.limit,
                "banned_remaining_s": round(max(0.0, lim.ban_until - time.time()), 3), "bans": lim.bans}
