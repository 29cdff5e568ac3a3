"""The simulator's Coinbase Advanced Trade venue (ccxt id `coinbase`): REST and WebSocket in Advanced Trade's
wire format, replaying the real Coinbase Exchange capture (coinbase_recording.py), with Coinbase's public rate
limits and faults on command. What is recorded and what is converted: docs/simulator-coinbase.md.

URLs (common/exchanges/clients.py "host-prefix" rewrite of ccxt's `https://api.coinbase.com` and
`wss://advanced-trade-ws.coinbase.com`):
- REST  /api.coinbase.com/api/v3/brokerage/market/{products, products/{id}, products/{id}/candles,
        products/{id}/ticker, product_book}, /api.coinbase.com/api/v3/brokerage/time,
        /api.coinbase.com/v2/{currencies, currencies/crypto, exchange-rates, time}
- WS    /advanced-trade-ws.coinbase.com: {"type":"subscribe","product_ids":[..],"channel":".."} for the
        channels heartbeats, market_trades, level2 (messages on `l2_data`), ticker and candles.

Every message carries `channel`, `client_id`, `timestamp` (the server's clock, skewed by the clock_skew
fault), `sequence_num` (per connection, +1 per message of any channel, as Coinbase numbers them) and `events`.
The replay starts at the first subscription to a market channel (at once with start="immediate"; only through
`restart()` with start="manual"), paced by
the recorded receive times divided by `speed` (0: as fast as the clients read).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Literal

import aiohttp
from aiohttp import web

from simulator.coinbase_recording import (
    US,
    CoinbaseRecording,
    RecordedBookSnapshot,
    RecordedBookUpdate,
    RecordedEvent,
    RecordedTicker,
    RecordedTrade,
    format_time_us,
)
from simulator.recording import real_data_dir
from simulator.replay import ReplayTask
from simulator.server import FaultError

if TYPE_CHECKING:
    from simulator.server import SimulatorOptions

log = logging.getLogger("simulator.coinbase")

REST_HOST = "api.coinbase.com"
WS_HOST = "advanced-trade-ws.coinbase.com"
PUBLIC_REQUESTS_PER_S = 10  # Advanced Trade public endpoints: 10 requests/s per IP
V2_REQUESTS_PER_HOUR = 10_000  # the v2 data API ("Sign in with Coinbase"): 10,000 requests/hour
GRANULARITIES = {"ONE_MINUTE": 60, "FIVE_MINUTE": 300, "FIFTEEN_MINUTE": 900, "THIRTY_MINUTE": 1800,
                 "ONE_HOUR": 3600, "TWO_HOUR": 7200, "SIX_HOUR": 21600, "ONE_DAY": 86400}
MAX_CANDLES = 350  # Coinbase refuses a candles range of more than 350 buckets
WS_CANDLE_S = 300  # the candles channel's buckets are five minutes
TRADES_SNAPSHOT = 50  # market_trades sends the latest trades of a product as a snapshot at subscription
TICKER_DEFAULT_LIMIT, TICKER_MAX_LIMIT = 100, 1000
FIAT = ("USD", "EUR", "GBP")  # the recorded quote currencies that are fiat (v2 /currencies lists fiat only)
MINUTE_US = 60 * US
MARKET_CHANNELS = ("market_trades", "level2", "ticker", "candles")
NOT_SIMULATED = {"status": "not simulated", "ticker_batch": "not simulated",
                 "user": "requires authentication (jwt)", "futures_balance_summary": "requires authentication (jwt)"}
FAULT_KINDS = ("disconnect", "stall", "http_error", "malformed_json", "sequence_gap", "duplicate", "reorder",
               "clock_skew", "halt", "clear")
BOOK_SIDES = {"buy": "bid", "sell": "offer"}


def encode(payload: Any) -> str:
    return json.dumps(payload, separators=(",", ":"))


# ----------------------------------------------------------------------------------------------------------
# The replayed market: books, trades and tickers as the replay has reached them


@dataclass(frozen=True, slots=True)
class ReplayTrade:
    product_id: str
    trade_id: int
    price: str
    size: str
    side: str  # "BUY" | "SELL": the recorded (maker) side, upper-cased as Advanced Trade prints it
    time_us: int

    def wire(self, skew_us: int) -> dict[str, str]:
        return {"trade_id": str(self.trade_id), "product_id": self.product_id, "price": self.price,
                "size": self.size, "side": self.side, "time": format_time_us(self.time_us + skew_us)}


class Book:
    """One product's level-2 book: price -> (price text, size text) per side, as recorded."""

    def __init__(self, snapshot: RecordedBookSnapshot) -> None:
        self.sides: dict[str, dict[Decimal, tuple[str, str]]] = {
            "bid": {Decimal(p): (p, s) for p, s in snapshot.bids},
            "offer": {Decimal(p): (p, s) for p, s in snapshot.asks}}

    def apply(self, side: str, price: str, size: str) -> None:
        levels = self.sides[side]
        if Decimal(size) == 0:
            levels.pop(Decimal(price), None)
        else:
            levels[Decimal(price)] = (price, size)

    def levels(self, side: str, limit: int | None = None) -> list[tuple[str, str]]:
        """Best first: bids descending, offers ascending."""
        keys = sorted(self.sides[side], reverse=side == "bid")
        return [self.sides[side][k] for k in keys[:limit]]

    def best(self, side: str) -> tuple[str, str] | None:
        levels = self.sides[side]
        if not levels:
            return None
        return levels[max(levels) if side == "bid" else min(levels)]


@dataclass
class Market:
    """What the replay has reached: REST answers and subscription snapshots are built from it."""
    books: dict[str, Book] = field(default_factory=dict)
    trades: dict[str, list[ReplayTrade]] = field(default_factory=dict)
    tickers: dict[str, dict[str, str]] = field(default_factory=dict)

    def candles(self, product_id: str, seconds: int, start_s: int, end_s: int) -> list[dict[str, str]]:
        """Buckets of `seconds` whose start is in [start_s, end_s), newest first; no bucket without trades
        (Coinbase makes none)."""
        buckets: dict[int, list[ReplayTrade]] = {}
        for t in self.trades.get(product_id, []):
            start = t.time_us // US // seconds * seconds
            if start_s <= start < end_s:
                buckets.setdefault(start, []).append(t)
        return [candle(start, trades) for start, trades in sorted(buckets.items(), reverse=True)]


def candle(start_s: int, trades: list[ReplayTrade]) -> dict[str, str]:
    prices = [Decimal(t.price) for t in trades]
    volume = sum((Decimal(t.size) for t in trades), Decimal(0))
    return {"start": str(start_s), "low": str(min(prices)), "high": str(max(prices)), "open": trades[0].price,
            "close": trades[-1].price, "volume": str(volume)}


def advanced_product(row: dict[str, Any], market: Market, halted: bool) -> dict[str, Any]:
    """A recorded Coinbase Exchange /products row in Advanced Trade's `products` shape (mapping documented in
    docs/simulator-coinbase.md); price and 24h figures come from the replay's latest trade and ticker."""
    pid = row["id"]
    trades = market.trades.get(pid)
    ticker = market.tickers.get(pid, {})
    disabled = bool(row.get("trading_disabled")) or halted
    return {
        "product_id": pid, "price": trades[-1].price if trades else "",
        "price_percentage_change_24h": ticker.get("price_percent_chg_24_h", ""),
        "volume_24h": ticker.get("volume_24_h", ""), "volume_percentage_change_24h": "",
        "base_increment": row["base_increment"], "quote_increment": row["quote_increment"],
        "quote_min_size": row["min_market_funds"], "quote_max_size": row["max_market_funds"],
        "base_min_size": row["base_min_size"], "base_max_size": row["base_max_size"],
        "base_name": row["base_currency"], "quote_name": row["quote_currency"], "watched": False,
        "is_disabled": row.get("status") != "online", "new": False,
        "status": "offline" if halted else row.get("status", "online"), "cancel_only": bool(row.get("cancel_only")),
        "limit_only": bool(row.get("limit_only")), "post_only": bool(row.get("post_only")),
        "trading_disabled": disabled, "auction_mode": False, "product_type": "SPOT",
        "quote_currency_id": row["quote_currency"], "base_currency_id": row["base_currency"],
        "fcm_trading_session_details": None, "mid_market_price": "", "alias": "", "alias_to": [],
        "base_display_symbol": row["base_currency"], "quote_display_symbol": row["quote_currency"],
        "view_only": False, "price_increment": row["quote_increment"], "display_name": pid, "product_venue": "CBE",
        "approximate_quote_24h_volume": "",
    }


# ----------------------------------------------------------------------------------------------------------
# Connections and faults


@dataclass(eq=False)
class _Client:
    ws: web.WebSocketResponse
    remote: str
    subs: dict[str, set[str]] = field(default_factory=dict)  # channel -> product ids
    books_sent: set[str] = field(default_factory=set)  # products whose l2_data snapshot this client has had
    seq: int = 0  # the next sequence_num
    gap_pending: int = 0  # sequence numbers to skip before the next message (sequence_gap fault)
    held: str | None = None  # a message held back to be sent after the next one (reorder fault)
    heartbeat_counter: int = 0
    heartbeat_task: asyncio.Task[None] | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    sent: int = 0

    def subscribed(self, channel: str, product_id: str) -> bool:
        return product_id in self.subs.get(channel, ())


@dataclass
class _Faults:
    down_until: float = 0.0  # time.monotonic(): WebSocket upgrades refused until then
    stall_until: float = 0.0
    stall_mode: Literal["pause", "drop"] = "pause"
    http_error: int = 0
    http_status: int = 503
    retry_after_s: int = 1
    malformed_ws: int = 0
    malformed_rest: int = 0
    duplicate: int = 0
    reorder: int = 0
    skew_us: int = 0
    halt_until: float = 0.0  # time.monotonic(); math.inf: until cleared

    def stalled(self) -> bool:
        return time.monotonic() < self.stall_until

    def halted(self) -> bool:
        return time.monotonic() < self.halt_until

    def as_dict(self) -> dict[str, Any]:
        now = time.monotonic()

        def remaining(until: float) -> float | str:
            return "until cleared" if until == math.inf else round(max(0.0, until - now), 3)
        return {"ws_down_remaining_s": remaining(self.down_until), "stall_remaining_s": remaining(self.stall_until),
                "stall_mode": self.stall_mode, "http_error": self.http_error, "http_status": self.http_status,
                "malformed_ws": self.malformed_ws, "malformed_rest": self.malformed_rest,
                "duplicate": self.duplicate, "reorder": self.reorder, "clock_skew_s": self.skew_us / US,
                "halt_remaining_s": remaining(self.halt_until)}


class _RateWindow:
    """A sliding window of request times: at most `limit` in any `seconds`."""

    def __init__(self, limit: int, seconds: float) -> None:
        self.limit, self.seconds = limit, seconds
        self.times: deque[float] = deque()

    def admit(self, now: float) -> int:
        """0 if the request is admitted (and counted), else the whole seconds to wait (Retry-After)."""
        while self.times and self.times[0] <= now - self.seconds:
            self.times.popleft()
        if len(self.times) >= self.limit:
            return max(1, math.ceil(self.times[0] + self.seconds - now))
        self.times.append(now)
        return 0


# ----------------------------------------------------------------------------------------------------------
# The venue


class CoinbaseVenue:
    exchange = "coinbase"

    def __init__(self, options: SimulatorOptions, recording: CoinbaseRecording | None = None) -> None:
        self.options = options
        self.recording = recording or CoinbaseRecording.load(options.data_dir or real_data_dir())
        rec = self.recording
        self._products = {row["id"]: row for row in rec.products}
        self._id_span = {p: max(t.trade_id for t in ts) - min(t.trade_id for t in ts) + 1
                         for p in rec.product_ids if (ts := rec.trades(p))}
        # Loop k moves times by k whole minutes past the recording's span, so candles of two loops never mix.
        self.loop_shift_us = (rec.duration_us // MINUTE_US + 2) * MINUTE_US
        self.speed = options.speed
        self.loop = options.loop
        self.state: Literal["idle", "running", "finished", "stopped"] = "idle"
        self.rate_public = _RateWindow(PUBLIC_REQUESTS_PER_S, 1.0)
        self.rate_v2 = _RateWindow(V2_REQUESTS_PER_HOUR, 3600.0)
        self._clients: set[_Client] = set()
        self._faults = _Faults()
        self._replay_task = ReplayTask("coinbase-replay", on_failure=self._replay_failed)
        self._rest_requests: Counter[str] = Counter()
        self._rest_status: Counter[int] = Counter()
        self._reset_replay_state()

    # --------------------------------------------------------------------------------------------------
    # Venue protocol

    def add_routes(self, router: web.UrlDispatcher) -> None:
        rest: list[tuple[str, str, Callable[[web.Request], Awaitable[web.Response]]]] = [
            ("public", "/api/v3/brokerage/market/products", self._products_endpoint),
            ("public", "/api/v3/brokerage/market/products/{product_id}", self._product_endpoint),
            ("public", "/api/v3/brokerage/market/products/{product_id}/candles", self._candles_endpoint),
            ("public", "/api/v3/brokerage/market/products/{product_id}/ticker", self._ticker_endpoint),
            ("public", "/api/v3/brokerage/market/product_book", self._book_endpoint),
            ("public", "/api/v3/brokerage/time", self._v3_time),
            ("v2", "/v2/currencies", self._v2_currencies),
            ("v2", "/v2/currencies/crypto", self._v2_crypto),
            ("v2", "/v2/exchange-rates", self._v2_rates),
            ("v2", "/v2/time", self._v2_time),
        ]
        for bucket, path, handler in rest:
            router.add_get(f"/{REST_HOST}{path}", self._rest(bucket, path, handler))
        router.add_get(f"/{WS_HOST}", self._ws_handler)
        router.add_get(f"/{WS_HOST}/", self._ws_handler)

    def inject(self, kind: str, **params: Any) -> dict[str, Any]:
        """Apply a fault now; returns the fault state. Kinds and parameters:
        - disconnect: code=1001, down_s=0: close every WebSocket now; refuse new ones (HTTP 503) for down_s.
        - stall: seconds (required), mode='pause'|'drop': send nothing at all (heartbeats included) for
          `seconds`; WebSocket pings are still answered. 'pause' holds the replay (later data comes late);
          'drop' lets it run on and discards what falls in the stall, each lost message still using its
          sequence_num (the client sees a sequence gap).
        - http_error: status=503, count=1, retry_after=1: the next `count` REST requests fail with `status`
          (429 carries Retry-After and Coinbase's rate_limit_exceeded body; 5xx a plain-text gateway body).
        - malformed_json: count=1, target='ws'|'rest': the next `count` market messages (or REST bodies,
          HTTP 200) are cut in half, so they are not valid JSON.
        - sequence_gap: skip=1: the next message on every open connection skips `skip` sequence numbers.
        - duplicate: count=1: the next `count` market messages are sent twice (same bytes, same sequence_num).
        - reorder: count=1: the next `count` market messages are each held back and sent after the message
          that follows them on their connection (their sequence_num arrives out of order).
        - clock_skew: seconds (required, may be negative): every exchange time sent from now on (envelope
          timestamps, trade/book/heartbeat times, REST times) is moved by `seconds`; 0 removes it.
        - halt: seconds (default: until clear): a trading halt: no market messages (the replay holds, so
          nothing is lost), heartbeats go on, REST products show trading_disabled and status offline.
        - clear: remove every pending fault (and the skew).
        """
        f = self._faults
        try:
            if kind == "disconnect":
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
                if not (status == 429 or 500 <= status <= 599):
                    raise FaultError(f"http_error status must be 429 or 5xx, got {status}")
                f.http_error, f.http_status = int(params.get("count", 1)), status
                f.retry_after_s = int(params.get("retry_after", 1))
            elif kind == "malformed_json":
                target = params.get("target", "ws")
                if target not in ("ws", "rest"):
                    raise FaultError(f"malformed_json target must be 'ws' or 'rest', got {target!r}")
                if target == "ws":
                    f.malformed_ws = int(params.get("count", 1))
                else:
                    f.malformed_rest = int(params.get("count", 1))
            elif kind == "sequence_gap":
                skip = int(params.get("skip", 1))
                if skip < 1:
                    raise FaultError(f"sequence_gap skip must be >= 1, got {skip}")
                for client in self._clients:
                    client.gap_pending += skip
            elif kind == "duplicate":
                f.duplicate = int(params.get("count", 1))
            elif kind == "reorder":
                f.reorder = int(params.get("count", 1))
            elif kind == "clock_skew":
                if "seconds" not in params:
                    raise FaultError("clock_skew needs 'seconds' (negative: the exchange clock is behind)")
                f.skew_us = round(float(params["seconds"]) * US)
            elif kind == "halt":
                seconds = params.get("seconds")
                f.halt_until = math.inf if seconds is None else time.monotonic() + float(seconds)
            elif kind == "clear":
                self._faults = _Faults()
                for client in self._clients:
                    client.gap_pending = 0
            else:
                raise FaultError(f"unknown coinbase fault kind {kind!r}; one of {', '.join(FAULT_KINDS)}")
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, FaultError):
                raise
            raise FaultError(f"bad parameters for coinbase fault {kind!r}: {params} ({exc})") from exc
        log.warning("coinbase fault injected: %s %s", kind, params)
        return self._faults.as_dict()

    def status(self) -> dict[str, Any]:
        rec = self.recording
        return {
            "state": self.state, "speed": self.speed, "loop_enabled": self.loop, "loop": self.loop_index,
            "loops_done": self.loops_done, "position": self.position, "events": len(rec.events),
            "trades_replayed": self.trades_replayed, "messages_sent": self.messages_sent,
            "sent_by_channel": dict(self.sent_by_channel), "time_offset_s": self.time_offset_us / US,
            "connections": [{"remote": c.remote, "subscriptions": {ch: sorted(p) for ch, p in c.subs.items()},
                             "next_sequence_num": c.seq, "sent": c.sent} for c in self._clients],
            "faults": self._faults.as_dict(),
            "rest": {"requests": dict(self._rest_requests),
                     "status": {str(k): v for k, v in sorted(self._rest_status.items())}},
            "recording": {"products": list(rec.product_ids), "events": len(rec.events),
                          "duration_s": rec.duration_us / US, "rest_products": len(rec.products)},
        }

    async def start(self) -> None:
        log.info("simulated coinbase advanced trade at /%s (REST) and /%s (WebSocket): %d recorded events of %s, "
                 "%.1f s; start on %s", REST_HOST, WS_HOST, len(self.recording.events),
                 ",".join(self.recording.product_ids), self.recording.duration_us / US, self.options.start)
        if self.options.start == "immediate":
            self.restart()

    async def stop(self) -> None:
        await self._cancel_replay()
        self.state = "stopped"
        await self.disconnect_all(aiohttp.WSCloseCode.GOING_AWAY)

    # --------------------------------------------------------------------------------------------------
    # Python API for tests and tools

    def restart(self, speed: float | None = None, loop: bool | None = None) -> None:
        """(Re)start the replay from the recording's first message now."""
        if speed is not None:
            if speed < 0:
                raise ValueError(f"speed must be >= 0 (0 = as fast as the clients read), got {speed}")
            self.speed = speed
        if loop is not None:
            self.loop = loop
        self._replay_task.cancel_nowait()
        self._reset_replay_state()
        self.state = "running"
        self._replay_task.start(self._replay)

    async def wait_finished(self, timeout: float | None = None) -> None:
        await self._replay_task.wait_finished(timeout)

    async def disconnect_all(self, code: int = aiohttp.WSCloseCode.GOING_AWAY) -> int:
        clients = list(self._clients)
        for client in clients:
            self._forget(client)
        await asyncio.gather(*(c.ws.close(code=code, message=b"simulator disconnect") for c in clients),
                             return_exceptions=True)
        if clients:
            log.info("coinbase: closed %d WebSocket connection(s) with code %d", len(clients), code)
        return len(clients)

    # --------------------------------------------------------------------------------------------------
    # Replay

    def _reset_replay_state(self) -> None:
        self.market = Market()
        self.loop_index = 0
        self.loops_done = 0
        self.position = 0
        self.trades_replayed = 0
        self.messages_sent = 0
        self.sent_by_channel: Counter[str] = Counter()
        self.time_offset_us = 0
        if self.options.shift_to_now:  # whole minutes, so candles keep their trades
            now = int(time.time() * US)
            self.time_offset_us = (now - self.recording.first_recv_us) // MINUTE_US * MINUTE_US

    def _replay_trade(self, t: RecordedTrade, loop: int) -> ReplayTrade:
        return ReplayTrade(t.product_id, t.trade_id + loop * self._id_span[t.product_id], t.price, t.size,
                           t.maker_side.upper(), t.time_us + self.time_offset_us + loop * self.loop_shift_us)

    async def _cancel_replay(self) -> None:
        await self._replay_task.cancel()

    def _replay_failed(self) -> None:
        self.state = "finished"

    async def _replay(self) -> None:
        rec = self.recording
        started = time.monotonic()
        paused = 0.0
        log.info("coinbase replay started: %d events, speed %s, time offset %+.0f s", len(rec.events),
                 self.speed or "max", self.time_offset_us / US)
        k = 0
        while True:
            self.loop_index = k
            loop_s = k * self.loop_shift_us / US
            for i, ev in enumerate(rec.events):
                self.position = i
                if self.speed > 0:
                    delay = started + paused + (loop_s + (ev.recv_us - rec.first_recv_us) / US) / self.speed \
                        - time.monotonic()
                    if delay > 0.001:
                        await asyncio.sleep(delay)
                    elif i & 255 == 0:
                        await asyncio.sleep(0)
                elif i & 63 == 0:
                    await asyncio.sleep(0)  # let the server answer requests while replaying flat out
                paused += await self._sit_out_holds()
                await self._apply(ev, k)
            self.loops_done = k + 1
            if not self.loop:
                break
            k += 1
        self.position = len(rec.events)
        await self._flush_held()
        self.state = "finished"
        self._replay_task.finished.set()
        log.info("coinbase replay finished after %d loop(s): %d trades, %d messages sent", self.loops_done,
                 self.trades_replayed, self.messages_sent)

    async def _sit_out_holds(self) -> float:
        """A halt, or a stall in 'pause' mode, holds the replay; returns the seconds held."""
        began = time.monotonic()
        while self._faults.halted() or (self._faults.stalled() and self._faults.stall_mode == "pause"):
            await asyncio.sleep(0.02)
        return time.monotonic() - began

    async def _apply(self, ev: RecordedEvent, loop: int) -> None:
        m = self.market
        if isinstance(ev, RecordedTrade):
            trade = self._replay_trade(ev, loop)
            m.trades.setdefault(trade.product_id, []).append(trade)
            self.trades_replayed += 1
            await self._fan_out("market_trades", trade.product_id,
                                lambda skew: [{"type": "update", "trades": [trade.wire(skew)]}])
            await self._fan_out("candles", trade.product_id, lambda skew: [
                {"type": "update", "candles": [self._ws_candle(trade.product_id, trade.time_us)]}])
        elif isinstance(ev, RecordedBookSnapshot):
            m.books[ev.product_id] = Book(ev)
            for client in self._subscribers("level2", ev.product_id):
                await self._send_book_snapshot(client, ev.product_id)
        elif isinstance(ev, RecordedBookUpdate):
            book = m.books.get(ev.product_id)
            if book is None:
                raise RuntimeError(f"coinbase recording: l2update for {ev.product_id} before its snapshot")
            for side, price, size in ev.changes:
                book.apply(BOOK_SIDES[side], price, size)
            time_us = ev.time_us + self.time_offset_us + loop * self.loop_shift_us
            await self._fan_out("level2", ev.product_id, lambda skew: [{
                "type": "update", "product_id": ev.product_id,
                "updates": [{"side": BOOK_SIDES[side], "event_time": format_time_us(time_us + skew),
                             "price_level": price, "new_quantity": size} for side, price, size in ev.changes]}],
                only=lambda c: ev.product_id in c.books_sent)
        else:
            m.tickers[ev.product_id] = self._ticker(ev)
            await self._fan_out("ticker", ev.product_id,
                                lambda skew: [{"type": "update", "tickers": [m.tickers[ev.product_id]]}])

    def _ticker(self, ev: RecordedTicker) -> dict[str, str]:
        """A recorded Exchange ticker in Advanced Trade's shape; best bid/ask quantities come from the replayed
        book when its best price is the ticker's (they are not recorded)."""
        out = {"type": "ticker", "product_id": ev.product_id, "price": ev.price, "volume_24_h": ev.volume_24h,
               "low_24_h": ev.low_24h, "high_24_h": ev.high_24h,
               "price_percent_chg_24_h": _percent_change(ev.open_24h, ev.price),
               "best_bid": ev.best_bid, "best_ask": ev.best_ask}
        book = self.market.books.get(ev.product_id)
        for side, key in (("bid", "best_bid"), ("offer", "best_ask")):
            best = book.best(side) if book else None
            if best is not None and Decimal(best[0]) == Decimal(out[key]):
                out[f"{key}_quantity"] = best[1]
        return out

    def _ws_candle(self, product_id: str, time_us: int) -> dict[str, str]:
        start = time_us // US // WS_CANDLE_S * WS_CANDLE_S
        trades = [t for t in self.market.trades[product_id] if t.time_us // US // WS_CANDLE_S * WS_CANDLE_S == start]
        return {**candle(start, trades), "product_id": product_id}

    async def _flush_held(self) -> None:
        for client in list(self._clients):
            async with client.lock:
                if client.held is not None:
                    held, client.held = client.held, None
                    await self._write(client, held)

    # --------------------------------------------------------------------------------------------------
    # Sending

    def _subscribers(self, channel: str, product_id: str) -> list[_Client]:
        return [c for c in self._clients if c.subscribed(channel, product_id)]

    async def _fan_out(self, channel: str, product_id: str, events: Callable[[int], list[dict[str, Any]]],
                       only: Callable[[_Client], bool] | None = None) -> None:
        clients = [c for c in self._subscribers(channel, product_id) if only is None or only(c)]
        if not clients or self._faults.halted():
            return
        wire_channel = "l2_data" if channel == "level2" else channel
        body = events(self._faults.skew_us)
        for client in clients:
            await self._send(client, wire_channel, body, market=True)

    async def _send(self, client: _Client, channel: str, events: list[dict[str, Any]], market: bool) -> bool:
        """One Advanced Trade message to one client, through the faults; False if it was not written."""
        async with client.lock:
            while self._faults.stalled() and self._faults.stall_mode == "pause":
                await asyncio.sleep(0.02)
            seq = client.seq + client.gap_pending
            client.gap_pending = 0
            client.seq = seq + 1
            if self._faults.stalled():  # 'drop': lost on the way, its sequence_num with it
                return False
            f = self._faults
            text = encode({"channel": channel, "client_id": "", "timestamp": self._now_iso(),
                           "sequence_num": seq, "events": events})
            if market and f.malformed_ws > 0:
                f.malformed_ws -= 1
                text = text[: len(text) // 2]
            copies = 1
            if market and f.duplicate > 0:
                f.duplicate -= 1
                copies = 2
            held, client.held = client.held, None
            if market and f.reorder > 0 and held is None:
                f.reorder -= 1
                client.held = text
                return True
            ok = True
            for _ in range(copies):
                ok = await self._write(client, text) and ok
            if held is not None:
                ok = await self._write(client, held) and ok
        if ok:
            self.sent_by_channel[channel] += copies
        return ok

    async def _write(self, client: _Client, text: str) -> bool:
        try:
            await client.ws.send_str(text)
        except (ConnectionError, RuntimeError) as exc:
            log.info("coinbase: dropping WebSocket from %s (%s)", client.remote, exc)
            self._forget(client)
            return False
        client.sent += 1
        self.messages_sent += 1
        return True

    def _now_iso(self) -> str:
        return format_time_us(int(time.time() * US) + self._faults.skew_us)

    async def _send_book_snapshot(self, client: _Client, product_id: str) -> None:
        book = self.market.books[product_id]
        now = self._now_iso()
        updates = [{"side": side, "event_time": now, "price_level": p, "new_quantity": s}
                   for side in ("bid", "offer") for p, s in book.levels(side)]
        client.books_sent.add(product_id)
        await self._send(client, "l2_data", [{"type": "snapshot", "product_id": product_id, "updates": updates}],
                         market=True)

    async def _send_snapshots(self, client: _Client, channel: str, product_ids: Iterable[str]) -> None:
        """What Advanced Trade sends right after a subscription: the current state of each product."""
        m = self.market
        skew = self._faults.skew_us
        for pid in product_ids:
            if channel == "level2" and pid in m.books:
                await self._send_book_snapshot(client, pid)
            elif channel == "market_trades" and m.trades.get(pid):
                latest = m.trades[pid][-TRADES_SNAPSHOT:][::-1]  # newest first, as Coinbase sends them
                await self._send(client, channel, [{"type": "snapshot", "trades": [t.wire(skew) for t in latest]}],
                                 market=True)
            elif channel == "ticker" and pid in m.tickers:
                await self._send(client, channel, [{"type": "snapshot", "tickers": [m.tickers[pid]]}], market=True)
            elif channel == "candles" and m.trades.get(pid):
                last = m.trades[pid][-1]
                await self._send(client, channel, [{"type": "snapshot",
                                                    "candles": [self._ws_candle(pid, last.time_us)]}], market=True)

    async def _heartbeats(self, client: _Client) -> None:
        """Once a second while subscribed; not during a stall (the counter then jumps by the seconds missed)."""
        while "heartbeats" in client.subs:
            await asyncio.sleep(1.0)
            client.heartbeat_counter += 1
            if self._faults.stalled():
                continue
            now_us = int(time.time() * US) + self._faults.skew_us
            current = format_time_us(now_us).replace("T", " ").replace("Z", "") + " +0000 UTC"
            await self._send(client, "heartbeats", [{"current_time": current,
                                                     "heartbeat_counter": client.heartbeat_counter}], market=False)

    # --------------------------------------------------------------------------------------------------
    # WebSocket

    def _forget(self, client: _Client) -> None:
        self._clients.discard(client)
        client.subs.clear()
        if client.heartbeat_task is not None:
            client.heartbeat_task.cancel()

    async def _ws_handler(self, request: web.Request) -> web.StreamResponse:
        if time.monotonic() < self._faults.down_until:
            return web.Response(status=503, text="simulator: coinbase WebSocket is down (fault)")
        ws = web.WebSocketResponse(heartbeat=self.options.ws_ping_s, compress=False)
        await ws.prepare(request)
        client = _Client(ws=ws, remote=str(request.remote))
        self._clients.add(client)
        log.info("coinbase WebSocket connected from %s", client.remote)
        try:
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    await self._on_client_message(client, msg.data)
                elif msg.type == aiohttp.WSMsgType.ERROR:
                    break
        except (ConnectionError, RuntimeError) as exc:
            log.info("coinbase WebSocket from %s failed: %s", client.remote, exc)
        finally:
            self._forget(client)
            log.info("coinbase WebSocket from %s closed (%d messages sent)", client.remote, client.sent)
        return ws

    async def _error(self, client: _Client, message: str) -> None:
        log.warning("coinbase: refused client request: %s", message)
        async with client.lock:
            await self._write(client, encode({"type": "error", "message": message}))

    async def _on_client_message(self, client: _Client, text: str) -> None:
        """Advanced Trade's subscribe / unsubscribe: one channel per message."""
        try:
            request = json.loads(text)
        except ValueError as exc:
            await self._error(client, f"failure to parse message: {exc}")
            return
        if not isinstance(request, dict) or request.get("type") not in ("subscribe", "unsubscribe"):
            await self._error(client, "message type must be 'subscribe' or 'unsubscribe'")
            return
        channel, product_ids = request.get("channel"), request.get("product_ids", [])
        if not isinstance(channel, str):
            await self._error(client, "'channel' (one channel name per message) is required; Advanced Trade has "
                                      "no 'channels' list")
            return
        if channel in NOT_SIMULATED:
            await self._error(client, f"channel {channel!r}: {NOT_SIMULATED[channel]}")
            return
        if channel not in (*MARKET_CHANNELS, "heartbeats"):
            await self._error(client, f"unknown channel {channel!r}; channels: heartbeats, "
                                      f"{', '.join(MARKET_CHANNELS)}")
            return
        if not isinstance(product_ids, list) or not all(isinstance(p, str) for p in product_ids):
            await self._error(client, "'product_ids' must be a list of product ids such as ['SKL-USD']")
            return
        unknown = [p for p in product_ids if p not in self._products]
        if unknown:
            await self._error(client, f"failure to subscribe: unknown product_ids {unknown}")
            return
        if request["type"] == "subscribe":
            await self._subscribe(client, channel, product_ids)
        else:
            self._unsubscribe(client, channel, product_ids)
            await self._send_subscriptions(client)

    async def _subscribe(self, client: _Client, channel: str, product_ids: list[str]) -> None:
        if channel in MARKET_CHANNELS and not product_ids:
            await self._error(client, f"channel {channel!r} needs product_ids")
            return
        new = [p for p in product_ids if not client.subscribed(channel, p)]
        client.subs.setdefault(channel, set()).update(product_ids)
        log.info("coinbase: %s subscribed to %s %s", client.remote, channel, ",".join(product_ids))
        no_data = [p for p in new if p not in self.recording.product_ids]
        if no_data:
            log.warning("coinbase: subscription to %s %s: the recording has no data for them (it has %s)", channel,
                        no_data, ", ".join(self.recording.product_ids))
        await self._send_subscriptions(client)
        if channel == "heartbeats" and client.heartbeat_task is None:
            client.heartbeat_task = asyncio.get_running_loop().create_task(self._heartbeats(client))
        await self._send_snapshots(client, channel, new)
        if channel in MARKET_CHANNELS and self.state == "idle" and self.options.start == "subscribe":
            self.restart()

    def _unsubscribe(self, client: _Client, channel: str, product_ids: list[str]) -> None:
        products = client.subs.get(channel, set())
        products.difference_update(product_ids or list(products))
        if not products:
            client.subs.pop(channel, None)
        if channel == "level2":
            client.books_sent.difference_update(product_ids or list(client.books_sent))
        if channel == "heartbeats" and "heartbeats" not in client.subs and client.heartbeat_task is not None:
            client.heartbeat_task.cancel()
            client.heartbeat_task = None

    async def _send_subscriptions(self, client: _Client) -> None:
        subs = {ch: sorted(p) for ch, p in client.subs.items()}
        await self._send(client, "subscriptions", [{"subscriptions": subs}], market=False)

    # --------------------------------------------------------------------------------------------------
    # REST

    def _rest(self, bucket: str, name: str, handler: Callable[[web.Request], Awaitable[web.Response]]) -> Callable[
            [web.Request], Awaitable[web.Response]]:
        """Counts, rate-limits (Coinbase: 10 public requests/s per IP; v2 10,000/hour) and applies REST faults."""
        async def wrapped(request: web.Request) -> web.Response:
            response = await self._rest_answer(bucket, name, handler, request)
            self._rest_status[response.status] += 1
            return response
        return wrapped

    async def _rest_answer(self, bucket: str, name: str, handler: Callable[[web.Request], Awaitable[web.Response]],
                           request: web.Request) -> web.Response:
        self._rest_requests[name] += 1
        f = self._faults
        if f.http_error > 0:
            f.http_error -= 1
            return self._http_error(f.http_status, f.retry_after_s, bucket)
        retry = (self.rate_public if bucket == "public" else self.rate_v2).admit(time.monotonic())
        if retry:
            return self._http_error(429, retry, bucket)
        log.debug("coinbase REST %s", request.path_qs)
        response = await handler(request)
        if f.malformed_rest > 0 and response.status == 200 and response.text:
            f.malformed_rest -= 1
            response.text = response.text[: len(response.text) // 2]
        return response

    @staticmethod
    def _http_error(status: int, retry_after_s: int, bucket: str) -> web.Response:
        if status == 429:
            body: dict[str, Any] = (
                {"error": "rate_limit_exceeded", "error_details": "Too many requests",
                 "message": "Too many requests"} if bucket == "public"
                else {"errors": [{"id": "rate_limit_exceeded", "message": "Too many requests"}]})
            return web.json_response(body, status=429, headers={"Retry-After": str(retry_after_s)})
        return web.Response(status=status, text="upstream connect error or disconnect/reset before headers",
                            content_type="text/plain")

    @staticmethod
    def _bad_request(error: str, message: str, status: int = 400) -> web.Response:
        return web.json_response({"error": error, "error_details": message, "message": message}, status=status)

    def _product_or_404(self, product_id: str) -> dict[str, Any] | web.Response:
        row = self._products.get(product_id)
        if row is None:
            return self._bad_request("NOT_FOUND", f"ProductID {product_id!r} is invalid", 404)
        return row

    async def _products_endpoint(self, request: web.Request) -> web.Response:
        q = request.query
        if q.get("product_type", "SPOT").upper() != "SPOT":  # the recording has spot products only
            return web.json_response({"products": [], "num_products": 0})
        wanted = set(q.getall("product_ids", []))
        halted = self._faults.halted()
        rows = [advanced_product(r, self.market, halted) for r in self.recording.products
                if not wanted or r["id"] in wanted]
        try:
            offset, limit = int(q.get("offset", 0)), int(q.get("limit", len(rows) or 1))
        except ValueError:
            return self._bad_request("INVALID_ARGUMENT", "limit and offset must be integers")
        page = rows[offset: offset + limit]
        return web.json_response({"products": page, "num_products": len(page)})

    async def _product_endpoint(self, request: web.Request) -> web.Response:
        row = self._product_or_404(request.match_info["product_id"])
        if isinstance(row, web.Response):
            return row
        return web.json_response(advanced_product(row, self.market, self._faults.halted()))

    async def _candles_endpoint(self, request: web.Request) -> web.Response:
        pid = request.match_info["product_id"]
        row = self._product_or_404(pid)
        if isinstance(row, web.Response):
            return row
        q = request.query
        granularity = q.get("granularity", "")
        if granularity not in GRANULARITIES:
            return self._bad_request("INVALID_ARGUMENT", f"granularity {granularity!r} is not one of "
                                                         f"{', '.join(GRANULARITIES)}")
        try:
            start, end = int(q["start"]), int(q["end"])
        except (KeyError, ValueError):
            return self._bad_request("INVALID_ARGUMENT", "start and end (unix seconds) are required")
        seconds = GRANULARITIES[granularity]
        if end < start:
            return self._bad_request("INVALID_ARGUMENT", "end must be after start")
        if (end - start) / seconds > MAX_CANDLES:
            return self._bad_request("INVALID_ARGUMENT", f"number of candles requested should be less than "
                                                         f"{MAX_CANDLES}")
        try:
            limit = int(q.get("limit", MAX_CANDLES))
        except ValueError:
            return self._bad_request("INVALID_ARGUMENT", f"limit must be an integer, got {q['limit']!r}")
        candles = self.market.candles(pid, seconds, start, end)[:limit]
        return web.json_response({"candles": candles})

    async def _ticker_endpoint(self, request: web.Request) -> web.Response:
        pid = request.match_info["product_id"]
        row = self._product_or_404(pid)
        if isinstance(row, web.Response):
            return row
        try:
            limit = int(request.query.get("limit", TICKER_DEFAULT_LIMIT))
        except ValueError:
            return self._bad_request("INVALID_ARGUMENT", "limit must be an integer")
        if not 1 <= limit <= TICKER_MAX_LIMIT:
            return self._bad_request("INVALID_ARGUMENT", f"limit must be 1..{TICKER_MAX_LIMIT}, got {limit}")
        skew = self._faults.skew_us
        trades = [{**t.wire(skew), "bid": "", "ask": ""}
                  for t in self.market.trades.get(pid, [])[-limit:][::-1]]
        book = self.market.books.get(pid)
        bid, ask = (book.best("bid"), book.best("offer")) if book else (None, None)
        return web.json_response({"trades": trades, "best_bid": bid[0] if bid else "",
                                  "best_ask": ask[0] if ask else ""})

    async def _book_endpoint(self, request: web.Request) -> web.Response:
        pid = request.query.get("product_id", "")
        row = self._product_or_404(pid)
        if isinstance(row, web.Response):
            return row
        try:
            limit = int(request.query["limit"]) if "limit" in request.query else None
        except ValueError:
            return self._bad_request("INVALID_ARGUMENT", "limit must be an integer")
        book = self.market.books.get(pid)
        bids = book.levels("bid", limit) if book else []
        asks = book.levels("offer", limit) if book else []
        out: dict[str, Any] = {"pricebook": {"product_id": pid, "bids": [{"price": p, "size": s} for p, s in bids],
                                             "asks": [{"price": p, "size": s} for p, s in asks],
                                             "time": self._now_iso()}}
        trades = self.market.trades.get(pid)
        out["last"] = trades[-1].price if trades else ""
        if bids and asks:
            b, a = Decimal(bids[0][0]), Decimal(asks[0][0])
            mid = (a + b) / 2
            out.update(mid_market=str(mid), spread_absolute=str(a - b),
                       spread_bps=str((a - b) / mid * 10_000))
        return web.json_response(out)

    async def _v3_time(self, request: web.Request) -> web.Response:
        now_us = int(time.time() * US) + self._faults.skew_us
        return web.json_response({"iso": format_time_us(now_us), "epochSeconds": str(now_us // US),
                                  "epochMillis": str(now_us // 1000)})

    def _currencies(self) -> tuple[list[str], list[str]]:
        codes = sorted({r[k] for r in self.recording.products for k in ("base_currency", "quote_currency")})
        return [c for c in codes if c in FIAT], [c for c in codes if c not in FIAT]

    async def _v2_currencies(self, request: web.Request) -> web.Response:
        fiat, _ = self._currencies()
        return web.json_response({"data": [{"id": c, "name": c, "min_size": "0.01"} for c in fiat]})

    async def _v2_crypto(self, request: web.Request) -> web.Response:
        _, crypto = self._currencies()
        return web.json_response({"data": [
            {"code": c, "name": c, "color": "", "sort_index": i, "exponent": 8, "type": "crypto", "address_regex": "",
             "asset_id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"coinbase-simulator/{c}"))}
            for i, c in enumerate(crypto)]})

    async def _v2_rates(self, request: web.Request) -> web.Response:
        """Rates against `currency` (default USD) from the replay's latest X-{currency} trades; a currency
        without such a product has no rate (the recording holds no other prices)."""
        base = request.query.get("currency", "USD").upper()
        rates = {base: "1"}
        for pid, trades in self.market.trades.items():
            b, _, quote = pid.partition("-")
            if quote == base and trades:
                rates[b] = str(1 / Decimal(trades[-1].price))
        return web.json_response({"data": {"currency": base, "rates": rates}})

    async def _v2_time(self, request: web.Request) -> web.Response:
        now_us = int(time.time() * US) + self._faults.skew_us
        return web.json_response({"data": {"iso": format_time_us(now_us)[:19] + "Z", "epoch": now_us // US}})


def _percent_change(open_: str, price: str) -> str:
    o = Decimal(open_)
    return str(((Decimal(price) - o) / o * 100).quantize(Decimal("1e-14")).normalize()) if o else ""
