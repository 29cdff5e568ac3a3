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
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any

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
from simulator.venue import Connection, FaultError, Handler, JsonFaults, Venue

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
class _Client(Connection):
    subs: dict[str, set[str]] = field(default_factory=dict)  # channel -> product ids
    books_sent: set[str] = field(default_factory=set)  # products whose l2_data snapshot this client has had
    seq: int = 0  # the next sequence_num
    gap_pending: int = 0  # sequence numbers to skip before the next message (sequence_gap fault)
    held: str | None = None  # a message held back to be sent after the next one (reorder fault)
    heartbeat_counter: int = 0
    heartbeat_task: asyncio.Task[None] | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def subscribed(self, channel: str, product_id: str) -> bool:
        return product_id in self.subs.get(channel, ())


@dataclass
class _Faults(JsonFaults):
    duplicate: int = 0
    reorder: int = 0
    skew_us: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {**super().as_dict(), "duplicate": self.duplicate, "reorder": self.reorder, "clock_skew_s": self.skew_us / US}


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


class CoinbaseVenue(Venue[_Client, _Faults]):
    exchange = "coinbase"
    log = log
    FAULT_KINDS = FAULT_KINDS
    HTTP_ERROR_ANY_4XX = False
    HALT_DEFAULT_S = math.inf  # a halt without 'seconds' lasts until cleared
    YIELD_FLAT_OUT = 64

    def __init__(self, options: SimulatorOptions, recording: CoinbaseRecording | None = None) -> None:
        self.recording = recording or CoinbaseRecording.load(options.data_dir or real_data_dir())
        rec = self.recording
        self._products = {row["id"]: row for row in rec.products}
        self._id_span = {p: max(t.trade_id for t in ts) - min(t.trade_id for t in ts) + 1
                         for p in rec.product_ids if (ts := rec.trades(p))}
        # Loop k moves times by k whole minutes past the recording's span, so candles of two loops never mix.
        self.loop_shift_us = (rec.duration_us // MINUTE_US + 2) * MINUTE_US
        self.rate_public = _RateWindow(PUBLIC_REQUESTS_PER_S, 1.0)
        self.rate_v2 = _RateWindow(V2_REQUESTS_PER_HOUR, 3600.0)
        super().__init__(options)

    # --------------------------------------------------------------------------------------------------
    # Venue protocol

    def add_routes(self, router: web.UrlDispatcher) -> None:
        rest: list[tuple[str, str, Handler]] = [
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
        router.add_get(f"/{WS_HOST}", self._ws_session)
        router.add_get(f"/{WS_HOST}/", self._ws_session)

    def _inject(self, kind: str, params: dict[str, Any]) -> bool:
        """Coinbase's own kinds beside the common ones (venue.py; http_error takes 429, with Retry-After and
        Coinbase's rate_limit_exceeded body, or 5xx, a plain-text gateway body; halt without seconds lasts until
        clear, and shows REST products as trading_disabled and offline; a stall in 'drop' mode still uses each
        lost message's sequence_num, so the client sees a sequence gap):
        - malformed_json: count=1, target='ws'|'rest': the next `count` market messages (or REST bodies,
          HTTP 200) are cut in half, so they are not valid JSON.
        - sequence_gap: skip=1: the next message on every open connection skips `skip` sequence numbers.
        - duplicate: count=1: the next `count` market messages are sent twice (same bytes, same sequence_num).
        - reorder: count=1: the next `count` market messages are each held back and sent after the message
          that follows them on their connection (their sequence_num arrives out of order).
        - clock_skew: seconds (required, may be negative): every exchange time sent from now on (envelope
          timestamps, trade/book/heartbeat times, REST times) is moved by `seconds`; 0 removes it.
        """
        f = self._faults
        if kind == "malformed_json":
            f.arm_malformed(params, "ws")
        elif kind == "sequence_gap":
            skip = int(params.get("skip", 1))
            if skip < 1:
                raise FaultError(f"sequence_gap skip must be >= 1, got {skip}")
            for client in self._connections:
                client.gap_pending += skip
        elif kind == "duplicate":
            f.duplicate = int(params.get("count", 1))
        elif kind == "reorder":
            f.reorder = int(params.get("count", 1))
        elif kind == "clock_skew":
            if "seconds" not in params:
                raise FaultError("clock_skew needs 'seconds' (negative: the exchange clock is behind)")
            f.skew_us = round(float(params["seconds"]) * US)
        else:
            return False
        return True

    def _on_clear(self) -> None:
        for client in self._connections:
            client.gap_pending = 0

    def _new_faults(self) -> _Faults:
        return _Faults()

    def status(self) -> dict[str, Any]:
        rec = self.recording
        return {
            **self._replay_status(), "trades_replayed": self.trades_replayed,
            "sent_by_channel": dict(self.sent_by_channel), "time_offset_s": self.time_offset_us / US,
            "connections": [{"remote": c.remote, "subscriptions": {ch: sorted(p) for ch, p in c.subs.items()},
                             "next_sequence_num": c.seq, "sent": c.sent} for c in self._connections],
            "faults": self._faults.as_dict(),
            "rest": self._rest_counts(),
            "recording": {"products": list(rec.product_ids), "events": len(rec.events),
                          "duration_s": rec.duration_us / US, "rest_products": len(rec.products)},
        }

    def _describe(self) -> str:
        rec = self.recording
        return (f"simulated coinbase advanced trade at /{REST_HOST} (REST) and /{WS_HOST} (WebSocket): "
                f"{len(rec.events)} recorded events of {','.join(rec.product_ids)}, {rec.duration_us / US:.1f} s")

    # --------------------------------------------------------------------------------------------------
    # Replay

    def _reset_replay_state(self) -> None:
        super()._reset_replay_state()
        self.market = Market()
        self.trades_replayed = 0
        self.sent_by_channel: Counter[str] = Counter()
        self.time_offset_us = 0
        if self.options.shift_to_now:  # whole minutes, so candles keep their trades
            now = int(time.time() * US)
            self.time_offset_us = (now - self.recording.first_recv_us) // MINUTE_US * MINUTE_US

    def _replay_trade(self, t: RecordedTrade, loop: int) -> ReplayTrade:
        return ReplayTrade(t.product_id, t.trade_id + loop * self._id_span[t.product_id], t.price, t.size,
                           t.maker_side.upper(), t.time_us + self.time_offset_us + loop * self.loop_shift_us)

    def _events(self) -> Sequence[RecordedEvent]:
        return self.recording.events

    def _event_offset_s(self, event: RecordedEvent) -> float:
        return (event.recv_us - self.recording.first_recv_us) / US

    def _loop_span_s(self) -> float:
        return self.loop_shift_us / US

    def _replay_begins(self) -> None:
        self.log.info("coinbase replay started: %d events, speed %s, time offset %+.0f s", len(self.recording.events),
                      self.speed or "max", self.time_offset_us / US)

    async def _replay_ends(self) -> None:
        await self._flush_held()
        self.log.info("coinbase replay finished: %d trades, %d messages sent", self.trades_replayed,
                      self.messages_sent)

    async def _dispatch(self, ev: RecordedEvent, loop: int) -> None:
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
        for client in list(self._connections):
            async with client.lock:
                if client.held is not None:
                    held, client.held = client.held, None
                    await self._write(client, held)

    # --------------------------------------------------------------------------------------------------
    # Sending

    def _subscribers(self, channel: str, product_id: str) -> list[_Client]:
        return [c for c in self._connections if c.subscribed(channel, product_id)]

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

    def _new_connection(self, ws: web.WebSocketResponse, request: web.Request) -> _Client:
        return _Client(ws=ws, path=request.path_qs, remote=str(request.remote))

    def _forget(self, client: _Client) -> None:
        super()._forget(client)
        client.subs.clear()
        if client.heartbeat_task is not None:
            client.heartbeat_task.cancel()

    async def _error(self, client: _Client, message: str) -> None:
        log.warning("coinbase: refused client request: %s", message)
        async with client.lock:
            await self._write(client, encode({"type": "error", "message": message}))

    async def _on_text(self, client: _Client, text: str) -> None:
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

    def _rest(self, bucket: str, name: str, handler: Handler) -> Handler:
        """Counts, rate-limits (Coinbase: 10 public requests/s per IP; v2 10,000/hour) and applies REST faults."""
        return self._counted(lambda request: self._rest_answer(bucket, name, handler, request))

    async def _rest_answer(self, bucket: str, name: str, handler: Handler, request: web.Request) -> web.Response:
        self._rest_requests[name] += 1
        f = self._faults
        if f.take_http_error():
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
