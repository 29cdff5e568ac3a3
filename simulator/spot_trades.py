"""Binance spot trade history over REST: `GET /api/v3/historicalTrades` and `GET /api/v3/aggTrades`.

Both answer from the recording's real trades, and only from those the replay has reached (sent, or dropped by
the `drop_trades` fault: the exchange had them, the socket lost them): never "future" data. Later loops
shift ids and times as the replay does (`Recording.trades_in_loop`), so the history is one continuous id
sequence per symbol, loop after loop.

Wire formats and rules as Binance documents them (spot API, "Old trade lookup" and "Compressed/Aggregate
trades list"):
- historicalTrades: symbol, limit (default 500, 1..1000), fromId (inclusive; default: the most recent
  trades); weight 25; no API key needed (security type NONE). Rows
  `{"id","price","qty","quoteQty","time","isBuyerMaker","isBestMatch"}`, ascending by id.
- aggTrades: symbol, fromId (aggregate id, inclusive), startTime / endTime (ms, inclusive), limit
  (default 500, 1..1000); weight 4. fromId together with a time bound is refused (-1128); startTime and
  endTime more than one hour apart are refused (-1127). Without any of them: the most recent aggregates.
  With only endTime: the last `limit` up to it. When a time window holds more than `limit` aggregates the
  last `limit` of the window are returned (ccxt 4.5.90 documents this caveat of the real exchange; a
  client that wants the first trade after a time must narrow the window). Rows
  `{"a","p","q","f","l","T","m","M"}`.
An aggregate is a run of consecutive trades with the same time, price and taker side (the simulator's
stand-in for "same taker order"); its quantity is their sum. Aggregate ids are their own sequence, NOT trade
ids: they start at half the first recorded trade id, so a client mixing the two up gets visibly wrong ids.
An aggregate is served once all its trades are reached.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from aiohttp import web

from simulator import binance
from simulator.recording import ReplayEvent, Trade, TradeEvent

if TYPE_CHECKING:
    from simulator.spot import BinanceSpot

HISTORICAL_TRADES_WEIGHT = 25
AGG_TRADES_WEIGHT = 4
DEFAULT_LIMIT = 500
MAX_LIMIT = 1000
MAX_WINDOW_MS = 3_600_000


class _BadRequest(Exception):
    def __init__(self, code: int, msg: str) -> None:
        super().__init__(msg)
        self.body = binance.error_body(code, msg)


@dataclass(frozen=True, slots=True)
class _Aggregate:
    first: int  # index of its first trade in the symbol's loop-0 trades
    last: int  # index of its last trade (inclusive)
    time: int  # ms (loop 0, no offset)


class _SymbolHistory:
    """One symbol's loop-0 trades, the replay event index of each, and their aggregates."""

    def __init__(self, trades: Sequence[Trade], event_index: Sequence[int], id_span: int) -> None:
        self.trades = trades
        self.ids: Sequence[int] = [t.id for t in trades]
        self.times = [t.time for t in trades]
        self.event_index = event_index
        self.id_span = id_span
        self.aggs: list[_Aggregate] = []
        for i, t in enumerate(trades):
            prev = trades[i - 1] if i else None
            if prev is not None and (prev.time, prev.price, prev.is_buyer_maker) == (t.time, t.price,
                                                                                      t.is_buyer_maker):
                a = self.aggs[-1]
                self.aggs[-1] = _Aggregate(a.first, i, a.time)
            else:
                self.aggs.append(_Aggregate(i, i, t.time))
        self.agg_last = [a.last for a in self.aggs]
        self.agg_times = [a.time for a in self.aggs]
        self.agg_base = trades[0].id // 2


def histories(events: Sequence[ReplayEvent], id_span: dict[str, int]) -> dict[str, _SymbolHistory]:
    """Each symbol's loop-0 trades and the index of each in `events`."""
    per_symbol: dict[str, tuple[list[Trade], list[int]]] = {}
    for i, ev in enumerate(events):
        if isinstance(ev, TradeEvent):
            trades, index = per_symbol.setdefault(ev.trade.symbol, ([], []))
            trades.append(ev.trade)
            index.append(i)
    return {s: _SymbolHistory(t, ix, id_span[s]) for s, (t, ix) in per_symbol.items()}


class SpotTrades:
    """The two endpoints of one `BinanceSpot`, reading its replay position."""

    def __init__(self, sim: BinanceSpot, symbols: dict[str, _SymbolHistory] | None = None) -> None:
        """`symbols`: each symbol's history when the simulator builds its own (market.py); else read from the
        recording's events."""
        self.sim = sim
        self.symbols = symbols if symbols is not None else histories(sim.recording.events, sim.recording.id_span)

    # -- what the replay has reached ------------------------------------------------------------------

    def _reached(self, h: _SymbolHistory) -> int:
        """How many trades of the symbol the replay has reached, counted over all loops (global index)."""
        sim = self.sim
        if sim.state == "idle":
            return 0
        n = len(h.trades)
        loop = sim.loop_index
        pos = sim.position
        i = bisect.bisect_left(h.event_index, pos)
        if i < n and h.event_index[i] == pos and sim.last_trade_id == h.ids[i] + loop * h.id_span:
            i += 1  # the event at the position has been dispatched (position moves before each dispatch)
        return loop * n + i

    def _loop_shift(self, loop: int) -> int:
        return self.sim.time_offset_ms + loop * self.sim.recording.loop_shift_ms

    def _trade(self, h: _SymbolHistory, g: int) -> Trade:
        loop, i = divmod(g, len(h.trades))
        return h.trades[i].shifted(loop * h.id_span, self._loop_shift(loop))

    def _trade_index(self, h: _SymbolHistory, trade_id: int) -> int:
        """Global index of the first trade with id >= trade_id."""
        loop = max(0, (trade_id - h.ids[0]) // h.id_span)
        return loop * len(h.trades) + bisect.bisect_left(h.ids, trade_id - loop * h.id_span)

    def _aggs_reached(self, h: _SymbolHistory) -> int:
        loop, i = divmod(self._reached(h), len(h.trades))
        return loop * len(h.aggs) + bisect.bisect_left(h.agg_last, i)  # aggregates whose last trade < i

    def _agg_index_at(self, h: _SymbolHistory, time_ms: int, right: bool) -> int:
        """Global index of the first aggregate with time >= time_ms (> time_ms when `right`)."""
        rec = self.sim.recording
        loop = max(0, (time_ms - self.sim.time_offset_ms - h.agg_times[0]) // rec.loop_shift_ms)
        local = time_ms - self._loop_shift(loop)
        find = bisect.bisect_right if right else bisect.bisect_left
        return loop * len(h.aggs) + find(h.agg_times, local)

    def _agg_row(self, h: _SymbolHistory, g: int) -> dict[str, Any]:
        loop, j = divmod(g, len(h.aggs))
        a = h.aggs[j]
        first = self._trade(h, loop * len(h.trades) + a.first)
        qty = sum((Decimal(h.trades[k].qty) for k in range(a.first, a.last + 1)), Decimal(0))
        return {"a": h.agg_base + g, "p": first.price, "q": f"{qty:.8f}", "f": first.id,
                "l": first.id + (a.last - a.first), "T": first.time, "m": first.is_buyer_maker, "M": first.best_match}

    # -- endpoints ------------------------------------------------------------------------------------

    def _symbol(self, request: web.Request) -> _SymbolHistory:
        symbol = request.query.get("symbol")
        if not symbol:
            raise _BadRequest(-1102, "Mandatory parameter 'symbol' was not sent, was empty/null, or malformed.")
        h = self.symbols.get(symbol)
        if h is None:
            raise _BadRequest(-1121, "Invalid symbol.")
        return h

    @staticmethod
    def _int(request: web.Request, name: str) -> int | None:
        value = request.query.get(name)
        if value is None:
            return None
        try:
            return int(value)
        except ValueError:
            raise _BadRequest(-1100, f"Illegal characters found in parameter '{name}'; legal range is "
                                     f"'^[0-9]{{1,20}}$'.") from None

    def _limit(self, request: web.Request) -> int:
        limit = self._int(request, "limit")
        if limit is None:
            return DEFAULT_LIMIT
        if not 1 <= limit <= MAX_LIMIT:
            raise _BadRequest(-1130, "Data sent for parameter 'limit' is not valid.")
        return limit

    async def historical_trades(self, request: web.Request) -> web.Response:
        try:
            h = self._symbol(request)
            limit = self._limit(request)
            from_id = self._int(request, "fromId")
        except _BadRequest as exc:
            return web.json_response(exc.body, status=400)
        reached = self._reached(h)
        start = max(0, reached - limit) if from_id is None else self._trade_index(h, from_id)
        rows = []
        for g in range(start, min(start + limit, reached)):
            t = self._trade(h, g)
            rows.append({"id": t.id, "price": t.price, "qty": t.qty,
                         "quoteQty": _quote_qty(t.price, t.qty), "time": t.time,
                         "isBuyerMaker": t.is_buyer_maker, "isBestMatch": t.best_match})
        return web.Response(text=binance.encode(rows), content_type="application/json")

    async def agg_trades(self, request: web.Request) -> web.Response:
        try:
            h = self._symbol(request)
            limit = self._limit(request)
            from_id = self._int(request, "fromId")
            start_ms = self._int(request, "startTime")
            end_ms = self._int(request, "endTime")
            if from_id is not None and (start_ms is not None or end_ms is not None):
                raise _BadRequest(-1128, "Combination of optional parameters invalid.")
            if start_ms is not None and end_ms is not None and end_ms - start_ms > MAX_WINDOW_MS:
                raise _BadRequest(-1127, "More than 1 hours between startTime and endTime.")
        except _BadRequest as exc:
            return web.json_response(exc.body, status=400)
        reached = self._aggs_reached(h)
        if from_id is not None:
            lo = max(0, from_id - h.agg_base)
            hi = min(lo + limit, reached)
        elif start_ms is None and end_ms is None:
            hi = reached
            lo = max(0, hi - limit)
        else:
            lo = self._agg_index_at(h, start_ms, right=False) if start_ms is not None else 0
            hi = min(reached, self._agg_index_at(h, end_ms, right=True)) if end_ms is not None else reached
            if start_ms is not None and end_ms is None:
                hi = min(hi, lo + limit)
            lo = max(lo, hi - limit)
        rows = [self._agg_row(h, g) for g in range(lo, hi)]
        return web.Response(text=binance.encode(rows), content_type="application/json")

    def endpoints(self) -> list[tuple[str, Any, Any]]:
        """(name, weight function, handler) for `BinanceSpot.add_routes`'s endpoint list."""
        return [("historicalTrades", lambda _: HISTORICAL_TRADES_WEIGHT, self.historical_trades),
                ("aggTrades", lambda _: AGG_TRADES_WEIGHT, self.agg_trades)]


def _quote_qty(price: str, qty: str) -> str:
    """price x qty as Binance prints quoteQty: the exact product, trailing zeros dropped."""
    q = Decimal(price) * Decimal(qty)
    text = f"{q:f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


__all__ = ["AGG_TRADES_WEIGHT", "HISTORICAL_TRADES_WEIGHT", "SpotTrades"]
