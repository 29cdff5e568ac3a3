"""The simulator's Hyperliquid venue: `POST /info` and the `/ws` WebSocket in Hyperliquid's wire format.

Mounted by the Simulator (server.py, venue.py) on its port under the real host name:
  REST  POST {base}/api.hyperliquid.xyz/info   {"type": "meta" | "metaAndAssetCtxs" | "l2Book" | ...}
  WS    {ws}/api.hyperliquid.xyz/ws            {"method": "subscribe", "subscription": {"type": "trades", ...}}
It replays the real BTC capture (hyperliquid_data.py) to the WebSocket subscribers in recorded order, paced by
the recorded receive times divided by `SimulatorOptions.speed`, starting at the first subscription (or at once,
or on `restart()`, per `SimulatorOptions.start`); REST answers from the replay position, so it never shows data
"from the future" of the replay. Rate limits as Hyperliquid's: REST weight 1200 per rolling minute per IP
(`INFO_WEIGHTS`; over it HTTP 429 with body `null`), at most 100 WebSocket connections and 1000 subscriptions.
Faults on command through `inject` (POST /_sim/fault with "exchange": "hyperliquid"): see `FAULT_KINDS`.
What is real and what is derived: docs/simulator-hyperliquid.md.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, cast

import aiohttp
from aiohttp import web

from simulator.hyperliquid_data import (
    INTERVAL_MS,
    MINUTE_MS,
    CaptureEvent,
    HyperliquidRecording,
    MarketState,
    asset_ctx,
    encode,
    static_ctx,
)
from simulator.recording import real_data_dir
from simulator.replay import ReplayTask

if TYPE_CHECKING:
    from simulator.server import SimulatorOptions

log = logging.getLogger("simulator.hyperliquid")

HOST = "/api.hyperliquid.xyz"
WEIGHT_LIMIT = 1200  # per rolling minute per IP
WEIGHT_WINDOW_S = 60.0
INFO_WEIGHTS = {"l2Book": 2, "allMids": 2, "clearinghouseState": 2, "orderStatus": 2, "spotClearinghouseState": 2,
                "exchangeStatus": 2, "userRole": 60}  # every other info type: 20
DEFAULT_INFO_WEIGHT = 20
ITEMS_PER_EXTRA_WEIGHT = {"candleSnapshot": 60, "fundingHistory": 20}  # + 1 per this many items returned
CANDLE_CAP = 5000  # Hyperliquid keeps only the latest 5,000 candles per coin and interval
FUNDING_PAGE = 500  # fundingHistory rows per response
MAX_CONNECTIONS = 100
MAX_SUBSCRIPTIONS = 1000
RECENT_TRADES = 100  # trades sent as the snapshot on a `trades` subscription
TID_LOOP_STRIDE = 10**16  # loop k adds k * this to every tid (recorded tids are < 2**50, unordered)
CHANNELS = ("trades", "l2Book", "candle", "activeAssetCtx", "allMids")
FAULT_KINDS = ("disconnect", "stall", "http_error", "malformed_json", "sequence_gap", "duplicate", "reorder",
               "clock_skew", "halt", "clear")
DESERIALIZE_ERROR = "Failed to deserialize the JSON body into the target type"

SubKey = tuple[str, ...]  # ("trades", coin) | ("l2Book", coin) | ("candle", coin, interval) | ("allMids",) | ...


class HyperliquidFaultError(ValueError):
    """A fault request the venue cannot apply; converted to server.FaultError by `inject`."""


@dataclass(eq=False)
class _Connection:
    ws: web.WebSocketResponse
    remote: str
    subs: set[SubKey] = field(default_factory=set)
    sent: int = 0
    # Held while a reply batch (ack, then the snapshot computed with it) is written, so replayed data that is
    # newer than the snapshot cannot overtake it.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass
class _Faults:
    down_until: float = 0.0  # time.monotonic(): WebSocket upgrades refused until then
    stall_until: float = 0.0  # replay held, pings answered
    halt_until: float = 0.0  # trading halted: replayed events are skipped, nothing is sent
    http_error: int = 0
    http_status: int = 500
    malformed_rest: int = 0
    malformed_ws: int = 0
    gap: Counter[str] = field(default_factory=Counter)  # channel -> l2Book snapshots / trades to skip
    duplicate: Counter[str] = field(default_factory=Counter)  # channel -> messages to send twice
    reorder: Counter[str] = field(default_factory=Counter)  # channel -> messages to swap with their successor
    skew_ms: int = 0

    def as_dict(self) -> dict[str, Any]:
        now = time.monotonic()
        return {"ws_down_remaining_s": round(max(0.0, self.down_until - now), 3),
                "stall_remaining_s": round(max(0.0, self.stall_until - now), 3),
                "halt_remaining_s": round(max(0.0, self.halt_until - now), 3),
                "http_error": self.http_error, "http_status": self.http_status,
                "malformed_rest": self.malformed_rest, "malformed_ws": self.malformed_ws,
                "sequence_gap": dict(self.gap), "duplicate": dict(self.duplicate), "reorder": dict(self.reorder),
                "clock_skew_ms": self.skew_ms}


class HyperliquidVenue:
    """Hyperliquid perpetuals (ccxt id `hyperliquid`), replaying the real BTC capture."""

    exchange = "hyperliquid"

    def __init__(self, options: SimulatorOptions, recording: HyperliquidRecording | None = None) -> None:
        self.options = options
        self.recording = recording or HyperliquidRecording.load(options.data_dir or real_data_dir())
        rec = self.recording
        self.coin = rec.coin
        self.universe = [u["name"] for u in rec.meta["universe"]]
        self.speed = options.speed
        self.loop = options.loop
        # Whole minutes covering every recorded exchange time (the first trades message reaches 49 s before
        # the capture began) and the receive span: looped trades never go back in time nor share a candle.
        times = [t["time"] for t in rec.trades] + [ev.data["time"] for ev in rec.events if ev.channel == "l2Book"]
        span = max(max(times) - min(times) // MINUTE_MS * MINUTE_MS, rec.duration_ms)
        self.loop_shift_ms = (span // MINUTE_MS + 1) * MINUTE_MS
        self.weight_limit = WEIGHT_LIMIT
        self.weight_window_s = WEIGHT_WINDOW_S
        self.state: Literal["idle", "running", "finished", "stopped"] = "idle"
        self._replay_task = ReplayTask("hyperliquid-replay", on_failure=self._replay_failed)
        self._connections: set[_Connection] = set()
        self._subscribers: dict[SubKey, set[_Connection]] = {}
        self._faults = _Faults()
        self._held: dict[str, list[tuple[SubKey, str]]] = {}  # reorder fault: messages waiting for a successor
        self._weights: deque[tuple[float, int]] = deque()
        self._rest_requests: Counter[str] = Counter()
        self._rest_status: Counter[int] = Counter()
        self._reset_replay_state()

    # ------------------------------------------------------------------------------------------------------
    # Venue protocol

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_post(f"{HOST}/info", self._info)
        router.add_get(f"{HOST}/ws", self._ws_handler)

    async def start(self) -> None:
        log.info("simulated hyperliquid at /api.hyperliquid.xyz/{info,ws}: %d recorded messages of %s (%d trades, "
                 "%.1f s), speed %s%s, start on %s", len(self.recording.events), self.coin,
                 len(self.recording.trades), self.recording.duration_ms / 1000, self.speed or "max",
                 ", looping" if self.loop else "", self.options.start)
        if self.options.start == "immediate":
            self.restart()

    async def stop(self) -> None:
        await self._replay_task.cancel()
        self.state = "stopped"
        await self.disconnect_all(aiohttp.WSCloseCode.GOING_AWAY)

    def inject(self, kind: str, **params: Any) -> dict[str, Any]:
        """Apply a fault now; returns the fault state. Kinds and parameters:
        - disconnect: code=1001, down_s=0: close every WebSocket; refuse new ones (HTTP 503) for down_s.
        - stall: seconds: hold the replay (nothing sent, nothing lost); pings are still answered.
        - http_error: status=500, count=1: the next `count` /info requests fail with `status` (429: body `null`).
        - malformed_json: count=1, target='rest'|'ws': the next `count` /info bodies (HTTP 200) or WebSocket data
          messages are cut in half.
        - sequence_gap: channel='l2Book'|'trades', count=1: skip the next `count` book snapshots or trades (tids).
        - duplicate: channel (a WS channel), count=1: send the next `count` messages of it twice.
        - reorder: channel, count=1: send each of the next `count` messages after the one that follows it.
        - clock_skew: ms: add ms to the `time` of every trade and book sent (WS and REST) and to exchangeStatus.
        - halt: seconds: trading halt: the recording moves on but nothing trades, nothing is sent on data
          channels and REST shows the market as it was (skipped trade ids in status `halted_trade_ids`).
        - clear: remove every pending fault (held reordered messages are sent).
        """
        from simulator.server import FaultError

        try:
            self._apply_fault(kind, params)
        except (HyperliquidFaultError, KeyError, TypeError, ValueError) as exc:
            reason = str(exc) if isinstance(exc, HyperliquidFaultError) else f"bad parameters {params} ({exc!r})"
            raise FaultError(f"hyperliquid fault {kind!r}: {reason}") from exc
        log.warning("fault injected: %s %s", kind, params)
        return self._faults.as_dict()

    def status(self) -> dict[str, Any]:
        return {"state": self.state, "speed": self.speed, "loop_enabled": self.loop, "loop": self.loop_index,
                "position": self.position, "events": len(self.recording.events),
                "trades_replayed": self.market.trades, "messages_sent": self.messages_sent,
                "sent_by_channel": dict(self.sent_by_channel), "last_book_time": self.market.book["time"],
                "gap_trade_ids": self.gap_trade_ids[-1000:], "gap_book_times": self.gap_book_times[-1000:],
                "halted_trade_ids": self.halted_trade_ids[-1000:], "time_offset_ms": self.time_offset_ms,
                "connections": [{"remote": c.remote, "subscriptions": [list(k) for k in sorted(c.subs)],
                                 "sent": c.sent} for c in self._connections],
                "faults": self._faults.as_dict(),
                "rest": {"requests": dict(self._rest_requests), "weight_used": self.weight_used(),
                         "weight_limit": self.weight_limit,
                         "status": {str(k): v for k, v in sorted(self._rest_status.items())}}}

    # ------------------------------------------------------------------------------------------------------
    # Python API

    def restart(self, speed: float | None = None, loop: bool | None = None) -> None:
        """(Re)start the replay from the first recorded message now."""
        if speed is not None:
            if speed < 0:
                raise ValueError(f"speed must be >= 0, got {speed}")
            self.speed = speed
        if loop is not None:
            self.loop = loop
        self._replay_task.cancel_nowait()
        self._reset_replay_state()
        self.state = "running"
        self._replay_task.start(self._replay)

    async def wait_finished(self, timeout: float | None = None) -> None:
        """Until the replay has sent its last message (raises TimeoutError; never returns while looping)."""
        await self._replay_task.wait_finished(timeout)

    def expected_trades(self, loop: int = 0) -> list[dict[str, Any]]:
        """The trades the replay sends in loop `loop` (times and tids shifted as sent, without faults)."""
        shift = self.time_offset_ms + loop * self.loop_shift_ms
        return [self._shift_trade(t, shift, loop * TID_LOOP_STRIDE, 0) for t in self.recording.trades]

    async def disconnect_all(self, code: int = aiohttp.WSCloseCode.GOING_AWAY) -> int:
        connections = list(self._connections)
        for conn in connections:
            self._forget(conn)
        await asyncio.gather(*(c.ws.close(code=code, message=b"simulator disconnect") for c in connections),
                             return_exceptions=True)
        return len(connections)

    def weight_used(self) -> int:
        horizon = time.monotonic() - self.weight_window_s
        while self._weights and self._weights[0][0] < horizon:
            self._weights.popleft()
        return sum(w for _, w in self._weights)

    # ------------------------------------------------------------------------------------------------------
    # Faults

    def _apply_fault(self, kind: str, params: dict[str, Any]) -> None:
        f = self._faults
        now = time.monotonic()
        if kind == "disconnect":
            f.down_until = now + float(params.get("down_s", 0))
            code = int(params.get("code", aiohttp.WSCloseCode.GOING_AWAY))
            asyncio.get_running_loop().create_task(self.disconnect_all(code))
        elif kind in ("stall", "halt"):
            if "seconds" not in params:
                raise HyperliquidFaultError("needs 'seconds'")
            until = now + float(params["seconds"])
            if kind == "stall":
                f.stall_until = until
            else:
                f.halt_until = until
        elif kind == "http_error":
            status = int(params.get("status", 500))
            if status != 429 and not 500 <= status <= 599:
                raise HyperliquidFaultError(f"status must be 429 or 5xx, got {status}")
            f.http_error, f.http_status = int(params.get("count", 1)), status
        elif kind == "malformed_json":
            target = params.get("target", "rest")
            if target not in ("rest", "ws"):
                raise HyperliquidFaultError(f"target must be 'rest' or 'ws', got {target!r}")
            if target == "rest":
                f.malformed_rest = int(params.get("count", 1))
            else:
                f.malformed_ws = int(params.get("count", 1))
        elif kind in ("sequence_gap", "duplicate", "reorder"):
            channel = params.get("channel", "l2Book")
            allowed = ("l2Book", "trades") if kind == "sequence_gap" else CHANNELS
            if channel not in allowed:
                raise HyperliquidFaultError(f"channel must be one of {', '.join(allowed)}, got {channel!r}")
            counter = {"sequence_gap": f.gap, "duplicate": f.duplicate, "reorder": f.reorder}[kind]
            counter[channel] = int(params.get("count", 1))
        elif kind == "clock_skew":
            f.skew_ms = int(params["ms"])
        elif kind == "clear":
            self._faults = _Faults()
            asyncio.get_running_loop().create_task(self._flush_held())
        else:
            raise HyperliquidFaultError(f"unknown kind; one of {', '.join(FAULT_KINDS)}")

    # ------------------------------------------------------------------------------------------------------
    # Replay

    def _reset_replay_state(self) -> None:
        self.loop_index = 0
        self.position = 0
        self.messages_sent = 0
        self.sent_by_channel: Counter[str] = Counter()
        self.gap_trade_ids: list[int] = []
        self.gap_book_times: list[int] = []
        self.halted_trade_ids: list[int] = []
        self.time_offset_ms = 0
        # Before the first replayed snapshot, REST shows the first recorded book.
        self.market = MarketState(self.coin, next(ev.data for ev in self.recording.events if ev.channel == "l2Book"))
        self.recent_trades: deque[dict[str, Any]] = deque(maxlen=RECENT_TRADES)

    def _replay_failed(self) -> None:
        self.state = "finished"

    async def _replay(self) -> None:
        events = self.recording.events
        if self.options.shift_to_now:
            first_ms = events[0].recv_ns // 1_000_000
            self.time_offset_ms = (int(time.time() * 1000) - first_ms) // MINUTE_MS * MINUTE_MS
        started, paused, k = time.monotonic(), 0.0, 0
        first_ns = events[0].recv_ns
        while True:
            self.loop_index = k
            shift_ms = self.time_offset_ms + k * self.loop_shift_ms
            loop_s = k * self.loop_shift_ms / 1000
            for i, ev in enumerate(events):
                self.position = i
                if self.speed > 0:
                    delay = started + paused + (loop_s + (ev.recv_ns - first_ns) / 1e9) / self.speed - time.monotonic()
                    if delay > 0.001:
                        await asyncio.sleep(delay)
                await asyncio.sleep(0)  # let the server answer requests while replaying flat out
                stalled_at = time.monotonic()
                while (remaining := self._faults.stall_until - time.monotonic()) > 0:
                    await asyncio.sleep(min(remaining, 0.05))
                paused += time.monotonic() - stalled_at  # later messages keep their spacing: they come late
                await self._emit(ev, shift_ms, k * TID_LOOP_STRIDE)
            if not self.loop:
                break
            k += 1
        self.position = len(events)
        await self._flush_held()
        self.state = "finished"
        self._replay_task.finished.set()
        log.info("hyperliquid replay finished: %d trades, %d messages sent", self.market.trades, self.messages_sent)

    @staticmethod
    def _shift_trade(trade: dict[str, Any], shift_ms: int, tid_shift: int, skew_ms: int) -> dict[str, Any]:
        return {**trade, "time": trade["time"] + shift_ms + skew_ms, "tid": trade["tid"] + tid_shift}

    async def _emit(self, ev: CaptureEvent, shift_ms: int, tid_shift: int) -> None:
        if self._faults.halt_until > time.monotonic():
            if ev.channel == "trades":
                self.halted_trade_ids.extend(t["tid"] + tid_shift for t in ev.data)
            return
        if ev.channel == "l2Book":
            await self._emit_book({**ev.data, "time": ev.data["time"] + shift_ms})
        else:
            await self._emit_trades([self._shift_trade(t, shift_ms, tid_shift, 0) for t in ev.data])
        await self._publish(("activeAssetCtx", self.coin), "activeAssetCtx",
                            {"coin": self.coin, "ctx": asset_ctx(self.market)})

    async def _emit_book(self, book: dict[str, Any]) -> None:
        self.market.book = book
        if self._faults.gap["l2Book"] > 0:
            self._faults.gap["l2Book"] -= 1
            self.gap_book_times.append(book["time"])
        else:
            await self._publish(("l2Book", self.coin), "l2Book", self._skewed_book(book))
        await self._publish(("allMids",), "allMids", {"mids": self._mids()})

    async def _emit_trades(self, trades: list[dict[str, Any]]) -> None:
        touched = self.market.add_trades(trades)
        self.recent_trades.extend(trades)
        sent = []
        for t in trades:
            if self._faults.gap["trades"] > 0:
                self._faults.gap["trades"] -= 1
                self.gap_trade_ids.append(t["tid"])
            else:
                sent.append({**t, "time": t["time"] + self._faults.skew_ms})
        if sent:
            await self._publish(("trades", self.coin), "trades", sent)
        for candle in touched:
            await self._publish(("candle", self.coin, candle["i"]), "candle", dict(candle))

    def _skewed_book(self, book: dict[str, Any]) -> dict[str, Any]:
        return {**book, "time": book["time"] + self._faults.skew_ms} if self._faults.skew_ms else book

    def _mids(self) -> dict[str, str]:
        """The recorded allMids (2023-07-17), with the capture's coin at the replay's mid."""
        return {**self.recording.all_mids, self.coin: asset_ctx(self.market)["midPx"]}

    async def _publish(self, key: SubKey, channel: str, data: Any) -> None:
        """Send one data message to the subscribers of `key`, through the duplicate / reorder / malformed
        faults (a message nobody subscribed to costs nothing and consumes no fault)."""
        subscribers = self._subscribers.get(key)
        if not subscribers:
            return
        f = self._faults
        text = encode({"channel": channel, "data": data})
        if f.malformed_ws > 0:
            f.malformed_ws -= 1
            text = text[: len(text) // 2]
        texts = [text]
        if f.duplicate[channel] > 0:
            f.duplicate[channel] -= 1
            texts = [text, text]
        if f.reorder[channel] > 0 and not self._held.get(channel):
            f.reorder[channel] -= 1
            self._held[channel] = [(key, t) for t in texts]
            return
        held = self._held.pop(channel, [])
        for k, t in [(key, t) for t in texts] + held:
            await self._send_all(k, channel, t)

    async def _flush_held(self) -> None:
        held, self._held = self._held, {}
        for channel, messages in held.items():
            for key, text in messages:
                await self._send_all(key, channel, text)

    async def _send_all(self, key: SubKey, channel: str, text: str) -> None:
        for conn in list(self._subscribers.get(key, ())):
            if await self._send(conn, text):
                self.sent_by_channel[channel] += 1

    async def _send(self, conn: _Connection, text: str) -> bool:
        async with conn.lock:
            return await self._send_unlocked(conn, text)

    async def _send_unlocked(self, conn: _Connection, text: str) -> bool:
        try:
            await conn.ws.send_str(text)
        except (ConnectionError, RuntimeError) as exc:
            log.info("dropping hyperliquid WebSocket from %s (%s)", conn.remote, exc)
            self._forget(conn)
            return False
        conn.sent += 1
        self.messages_sent += 1
        return True

    # ------------------------------------------------------------------------------------------------------
    # WebSocket

    async def _ws_handler(self, request: web.Request) -> web.StreamResponse:
        if time.monotonic() < self._faults.down_until:
            return web.Response(status=503, text="simulator: WebSocket is down (fault)")
        if len(self._connections) >= MAX_CONNECTIONS:
            return web.Response(status=429, text=f"too many WebSocket connections (max {MAX_CONNECTIONS})")
        ws = web.WebSocketResponse(compress=False)  # Hyperliquid does not ping: clients send {"method":"ping"}
        await ws.prepare(request)
        conn = _Connection(ws=ws, remote=str(request.remote))
        self._connections.add(conn)
        try:
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    replies = self._on_client_message(conn, msg.data)
                    async with conn.lock:
                        for reply in replies:
                            await self._send_unlocked(conn, encode(reply))
                    if self.state == "idle" and self.options.start == "subscribe" and any(
                            self._carries_data(k) for k in conn.subs):
                        self.restart()
                elif msg.type == aiohttp.WSMsgType.ERROR:
                    break
        except (ConnectionError, RuntimeError) as exc:
            log.info("hyperliquid WebSocket from %s failed: %s", conn.remote, exc)
        finally:
            self._forget(conn)
        return ws

    def _on_client_message(self, conn: _Connection, text: str) -> list[dict[str, Any]]:
        """Hyperliquid's client requests: ping, subscribe, unsubscribe. Errors on the `error` channel."""
        try:
            request = json.loads(text)
        except ValueError:
            return [_error(f"Error parsing JSON into valid websocket request: {text}")]
        method = request.get("method") if isinstance(request, dict) else None
        if method == "ping":
            return [{"channel": "pong"}]
        if method not in ("subscribe", "unsubscribe") or not isinstance(request.get("subscription"), dict):
            return [_error(f"Error parsing JSON into valid websocket request: {text}")]
        subscription = dict(request["subscription"])
        key, problem = self._sub_key(subscription)
        if key is None:
            return [_error(f"Invalid subscription {encode(subscription)}: {problem}")]
        if subscription.get("type") == "l2Book":
            subscription = {"nSigFigs": None, "mantissa": None, **subscription}
        ack = {"channel": "subscriptionResponse", "data": {"method": method, "subscription": subscription}}
        if method == "unsubscribe":
            if key not in conn.subs:
                return [_error(f"Already unsubscribed: {encode(request['subscription'])}")]
            conn.subs.discard(key)
            self._subscribers.get(key, set()).discard(conn)
            return [ack]
        if key in conn.subs:
            return [_error(f"Already subscribed: {encode(request['subscription'])}")]
        if sum(len(c.subs) for c in self._connections) >= MAX_SUBSCRIPTIONS:
            return [_error(f"Cannot track more than {MAX_SUBSCRIPTIONS} total subscriptions")]
        conn.subs.add(key)
        self._subscribers.setdefault(key, set()).add(conn)
        return [ack, *self._snapshot(key)]

    def _sub_key(self, sub: dict[str, Any]) -> tuple[SubKey | None, str]:
        kind, coin = sub.get("type"), sub.get("coin")
        if kind == "allMids":
            return ("allMids",), ""
        if kind not in CHANNELS:
            return None, f"type {kind!r} is not simulated (served: {', '.join(CHANNELS)})"
        if coin not in self.universe:
            return None, f"unknown coin {coin!r}"
        if kind == "candle":
            interval = sub.get("interval")
            if interval not in INTERVAL_MS:
                return None, f"interval {interval!r} is not simulated (served: {', '.join(INTERVAL_MS)})"
            return cast(SubKey, ("candle", coin, interval)), ""
        return cast(SubKey, (kind, coin)), ""

    def _carries_data(self, key: SubKey) -> bool:
        return key == ("allMids",) or key[1] == self.coin

    def _snapshot(self, key: SubKey) -> list[dict[str, Any]]:
        """What Hyperliquid sends right after the ack: recent trades, the current book, context, mids."""
        if not self._carries_data(key) or self.state == "idle":
            return []
        if key[0] == "trades" and self.recent_trades:
            skew = self._faults.skew_ms
            return [{"channel": "trades", "data": [{**t, "time": t["time"] + skew} for t in self.recent_trades]}]
        if key[0] == "l2Book" and self.market.trades + self.position > 0:
            return [{"channel": "l2Book", "data": self._skewed_book(self.market.book)}]
        if key[0] == "activeAssetCtx":
            return [{"channel": "activeAssetCtx", "data": {"coin": self.coin, "ctx": asset_ctx(self.market)}}]
        if key[0] == "allMids":
            return [{"channel": "allMids", "data": {"mids": self._mids()}}]
        return []

    def _forget(self, conn: _Connection) -> None:
        for key in conn.subs:
            self._subscribers.get(key, set()).discard(conn)
        conn.subs.clear()
        self._connections.discard(conn)

    # ------------------------------------------------------------------------------------------------------
    # REST: POST /info

    async def _info(self, request: web.Request) -> web.Response:
        response = await self._info_answer(request)
        self._rest_status[response.status] += 1
        return response

    async def _info_answer(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            body = None
        kind = body.get("type") if isinstance(body, dict) else None
        handler = self._info_handlers().get(kind) if isinstance(kind, str) else None
        self._rest_requests[cast(str, kind) if handler else "invalid"] += 1
        f = self._faults
        if f.http_error > 0:
            f.http_error -= 1
            return _http_error(f.http_status)
        weight = INFO_WEIGHTS.get(str(kind), DEFAULT_INFO_WEIGHT)
        if self.weight_used() + weight > self.weight_limit:
            return _http_error(429)
        self._weights.append((time.monotonic(), weight))
        if handler is None or not isinstance(body, dict):
            return web.Response(status=422, text=f"{DESERIALIZE_ERROR} (simulated info types: "
                                                 f"{', '.join(sorted(self._info_handlers()))})")
        try:
            payload = handler(body)
        except (KeyError, TypeError, ValueError) as exc:
            return web.Response(status=422, text=f"{DESERIALIZE_ERROR}: {exc!r}")
        per_item = ITEMS_PER_EXTRA_WEIGHT.get(cast(str, kind))
        if per_item and isinstance(payload, list) and len(payload) >= per_item:
            self._weights.append((time.monotonic(), len(payload) // per_item))
        text = encode(payload)
        if f.malformed_rest > 0:
            f.malformed_rest -= 1
            text = text[: len(text) // 2]
        return web.Response(text=text, content_type="application/json")

    def _info_handlers(self) -> dict[str, Callable[[dict[str, Any]], Any]]:
        return {"meta": lambda _: self.recording.meta, "metaAndAssetCtxs": self._meta_and_ctxs,
                "allMids": lambda _: self._mids(), "l2Book": self._l2_book, "candleSnapshot": self._candles,
                "fundingHistory": self._funding_history, "exchangeStatus": self._exchange_status,
                # No spot or builder-deployed (HIP-3) perp recording: empty, so ccxt's default load_markets works.
                "spotMeta": lambda _: {"tokens": [], "universe": []},
                "spotMetaAndAssetCtxs": lambda _: [{"tokens": [], "universe": []}, []],
                "perpDexs": lambda _: [None]}

    def _meta_and_ctxs(self, body: dict[str, Any]) -> list[Any]:
        mids = self.recording.all_mids
        ctxs = [asset_ctx(self.market) if name == self.coin else static_ctx(mids.get(name, "0.0"))
                for name in self.universe]
        return [self.recording.meta, ctxs]

    def _l2_book(self, body: dict[str, Any]) -> dict[str, Any] | None:
        coin = body["coin"]
        if coin == self.coin:
            return self._skewed_book(self.market.book)
        return self.recording.books.get(coin)  # None (JSON null) for a coin without a recorded book

    def _exchange_status(self, body: dict[str, Any]) -> dict[str, Any]:
        return {"specialStatuses": None, "time": int(time.time() * 1000) + self._faults.skew_ms}

    def _candles(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        """Candles of the coin and interval opening in [startTime, endTime], among the latest `CANDLE_CAP`
        (counted back from the series' newest candle, the exchange's current one); at most CANDLE_CAP."""
        req = body["req"]
        coin, interval = req["coin"], req["interval"]
        start, end = int(req["startTime"]), int(req.get("endTime") or 2**62)
        series = self.recording.candles.get((coin, interval))
        if series is None and coin == self.coin and interval in INTERVAL_MS:
            built = self.market.candles.get(interval)
            series = built.sorted_rows() if built else []
        if not series:
            return []
        ms = INTERVAL_MS.get(interval, series[-1]["T"] + 1 - series[-1]["t"])
        oldest = series[-1]["t"] - (CANDLE_CAP - 1) * ms
        rows = [dict(c) for c in series if max(start, oldest) <= c["t"] <= end]
        return rows[:CANDLE_CAP]

    def _funding_history(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        start, end = int(body["startTime"]), int(body.get("endTime") or 2**62)
        rows = self.recording.funding_history.get(body["coin"], [])
        return [r for r in rows if start <= r["time"] <= end][:FUNDING_PAGE]


def _error(text: str) -> dict[str, Any]:
    return {"channel": "error", "data": text}


def _http_error(status: int) -> web.Response:
    if status == 429:  # Hyperliquid answers a rate-limited request with HTTP 429 and the body `null`
        return web.Response(status=429, text="null", content_type="application/json")
    return web.Response(status=status, text=f"simulator: HTTP {status} (fault)", content_type="text/plain")


