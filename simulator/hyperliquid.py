"""The simulator's Hyperliquid venue: `POST /info` and the `/ws` WebSocket in Hyperliquid's wire format.

Mounted by the Simulator (server.py) as a `Venue` (venue.py) on its port under the real host name:
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

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
from simulator.venue import Connection, FaultError, JsonFaults, Venue

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


@dataclass(eq=False)
class _Connection(Connection):
    subs: set[SubKey] = field(default_factory=set)
    # Held while a reply batch (ack, then the snapshot computed with it) is written, so replayed data that is
    # newer than the snapshot cannot overtake it.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass
class _Faults(JsonFaults):
    http_status: int = 500
    gap: Counter[str] = field(default_factory=Counter)  # channel -> l2Book snapshots / trades to skip
    duplicate: Counter[str] = field(default_factory=Counter)  # channel -> messages to send twice
    reorder: Counter[str] = field(default_factory=Counter)  # channel -> messages to swap with their successor
    skew_ms: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {**super().as_dict(), "sequence_gap": dict(self.gap), "duplicate": dict(self.duplicate),
                "reorder": dict(self.reorder),
                "clock_skew_ms": self.skew_ms}


class HyperliquidVenue(Venue[_Connection, _Faults]):
    """Hyperliquid perpetuals (ccxt id `hyperliquid`), replaying the real BTC capture."""

    exchange = "hyperliquid"
    log = log
    FAULT_KINDS = FAULT_KINDS
    HTTP_ERROR_DEFAULT = 500
    HTTP_ERROR_ANY_4XX = False
    YIELD_PACED = YIELD_FLAT_OUT = 1
    YIELD_AFTER_SLEEP = True

    def __init__(self, options: SimulatorOptions, recording: HyperliquidRecording | None = None) -> None:
        self.recording = recording or HyperliquidRecording.load(options.data_dir or real_data_dir())
        rec = self.recording
        self.coin = rec.coin
        self.universe = [u["name"] for u in rec.meta["universe"]]
        # Whole minutes covering every recorded exchange time (the first trades message reaches 49 s before
        # the capture began) and the receive span: looped trades never go back in time nor share a candle.
        times = [t["time"] for t in rec.trades] + [ev.data["time"] for ev in rec.events if ev.channel == "l2Book"]
        span = max(max(times) - min(times) // MINUTE_MS * MINUTE_MS, rec.duration_ms)
        self.loop_shift_ms = (span // MINUTE_MS + 1) * MINUTE_MS
        self.weight_limit = WEIGHT_LIMIT
        self.weight_window_s = WEIGHT_WINDOW_S
        self._subscribers: dict[SubKey, set[_Connection]] = {}
        self._held: dict[str, list[tuple[SubKey, str]]] = {}  # reorder fault: messages waiting for a successor
        self._weights: deque[tuple[float, int]] = deque()
        super().__init__(options)

    # ------------------------------------------------------------------------------------------------------
    # Venue protocol

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_post(f"{HOST}/info", self._counted(self._info_answer))
        router.add_get(f"{HOST}/ws", self._ws_session)

    def _describe(self) -> str:
        rec = self.recording
        return (f"simulated hyperliquid at /api.hyperliquid.xyz/{{info,ws}}: {len(rec.events)} recorded messages of "
                f"{self.coin} ({len(rec.trades)} trades, {rec.duration_ms / 1000:.1f} s)")

    def _new_faults(self) -> _Faults:
        return _Faults()

    def status(self) -> dict[str, Any]:
        return {**self._replay_status(), "trades_replayed": self.market.trades,
                "sent_by_channel": dict(self.sent_by_channel), "last_book_time": self.market.book["time"],
                "gap_trade_ids": self.gap_trade_ids[-1000:], "gap_book_times": self.gap_book_times[-1000:],
                "halted_trade_ids": self.halted_trade_ids[-1000:], "time_offset_ms": self.time_offset_ms,
                "connections": [{"remote": c.remote, "subscriptions": [list(k) for k in sorted(c.subs)],
                                 "sent": c.sent} for c in self._connections],
                "faults": self._faults.as_dict(),
                "rest": {**self._rest_counts(), "weight_used": self.weight_used(),
                         "weight_limit": self.weight_limit}}

    # ------------------------------------------------------------------------------------------------------
    # Python API

    def expected_trades(self, loop: int = 0) -> list[dict[str, Any]]:
        """The trades the replay sends in loop `loop` (times and tids shifted as sent, without faults)."""
        shift = self.time_offset_ms + loop * self.loop_shift_ms
        return [self._shift_trade(t, shift, loop * TID_LOOP_STRIDE, 0) for t in self.recording.trades]

    def weight_used(self) -> int:
        horizon = time.monotonic() - self.weight_window_s
        while self._weights and self._weights[0][0] < horizon:
            self._weights.popleft()
        return sum(w for _, w in self._weights)

    # ------------------------------------------------------------------------------------------------------
    # Faults

    def _inject(self, kind: str, params: dict[str, Any]) -> bool:
        """Hyperliquid's own kinds beside the common ones (venue.py: a stall holds the replay whatever its mode,
        nothing lost; http_error takes 429, body `null`, or 5xx; halt is a trading halt: the recording moves on
        but nothing trades, nothing is sent on data channels and REST shows the market as it was, the skipped
        trade ids in status `halted_trade_ids`; clear sends the reordered messages still held):
        - malformed_json: count=1, target='rest'|'ws': the next `count` /info bodies (HTTP 200) or WebSocket data
          messages are cut in half.
        - sequence_gap: channel='l2Book'|'trades', count=1: skip the next `count` book snapshots or trades (tids).
        - duplicate: channel (a WS channel), count=1: send the next `count` messages of it twice.
        - reorder: channel, count=1: send each of the next `count` messages after the one that follows it.
        - clock_skew: ms: add ms to the `time` of every trade and book sent (WS and REST) and to exchangeStatus.
        """
        f = self._faults
        if kind == "malformed_json":
            f.arm_malformed(params, "rest")
        elif kind in ("sequence_gap", "duplicate", "reorder"):
            channel = params.get("channel", "l2Book")
            allowed = ("l2Book", "trades") if kind == "sequence_gap" else CHANNELS
            if channel not in allowed:
                raise FaultError(f"channel must be one of {', '.join(allowed)}, got {channel!r}")
            counter = {"sequence_gap": f.gap, "duplicate": f.duplicate, "reorder": f.reorder}[kind]
            counter[channel] = int(params.get("count", 1))
        elif kind == "clock_skew":
            f.skew_ms = int(params["ms"])
        else:
            return False
        return True

    def _on_clear(self) -> None:
        asyncio.get_running_loop().create_task(self._flush_held())

    def _holds_replay(self) -> bool:
        return self._faults.stalled()  # a halt skips the events instead (see `_emit`)

    # ------------------------------------------------------------------------------------------------------
    # Replay

    def _reset_replay_state(self) -> None:
        super()._reset_replay_state()
        self.sent_by_channel: Counter[str] = Counter()
        self.gap_trade_ids: list[int] = []
        self.gap_book_times: list[int] = []
        self.halted_trade_ids: list[int] = []
        self.time_offset_ms = 0
        # Before the first replayed snapshot, REST shows the first recorded book.
        self.market = MarketState(self.coin, next(ev.data for ev in self.recording.events if ev.channel == "l2Book"))
        self.recent_trades: deque[dict[str, Any]] = deque(maxlen=RECENT_TRADES)

    def _events(self) -> Sequence[CaptureEvent]:
        return self.recording.events

    def _event_offset_s(self, event: CaptureEvent) -> float:
        return (event.recv_ns - self.recording.events[0].recv_ns) / 1e9

    def _loop_span_s(self) -> float:
        return self.loop_shift_ms / 1000

    def _replay_begins(self) -> None:
        if self.options.shift_to_now:
            first_ms = self.recording.events[0].recv_ns // 1_000_000
            self.time_offset_ms = (int(time.time() * 1000) - first_ms) // MINUTE_MS * MINUTE_MS

    async def _dispatch(self, event: CaptureEvent, loop: int) -> None:
        await self._emit(event, self.time_offset_ms + loop * self.loop_shift_ms, loop * TID_LOOP_STRIDE)

    async def _replay_ends(self) -> None:
        await self._flush_held()
        self.log.info("hyperliquid replay finished: %d trades, %d messages sent", self.market.trades,
                      self.messages_sent)

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
        return await self._write(conn, text)

    # ------------------------------------------------------------------------------------------------------
    # WebSocket

    def _ws_refusal(self) -> web.Response | None:
        refused = super()._ws_refusal()
        if refused is None and len(self._connections) >= MAX_CONNECTIONS:
            return web.Response(status=429, text=f"too many WebSocket connections (max {MAX_CONNECTIONS})")
        return refused

    def _ws_heartbeat(self) -> float | None:
        return None  # Hyperliquid does not ping: clients send {"method":"ping"}

    def _new_connection(self, ws: web.WebSocketResponse, request: web.Request) -> _Connection:
        return _Connection(ws=ws, path=request.path_qs, remote=str(request.remote))

    async def _on_text(self, conn: _Connection, text: str) -> None:
        replies = self._on_client_message(conn, text)
        async with conn.lock:
            for reply in replies:
                await self._send_unlocked(conn, encode(reply))
        self._start_on_subscription(any(self._carries_data(k) for k in conn.subs))

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
        super()._forget(conn)
        for key in conn.subs:
            self._subscribers.get(key, set()).discard(conn)
        conn.subs.clear()

    # ------------------------------------------------------------------------------------------------------
    # REST: POST /info

    async def _info_answer(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            body = None
        kind = body.get("type") if isinstance(body, dict) else None
        handler = self._info_handlers().get(kind) if isinstance(kind, str) else None
        self._rest_requests[cast(str, kind) if handler else "invalid"] += 1
        f = self._faults
        if f.take_http_error():
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


