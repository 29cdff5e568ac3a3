"""Many symbols at once: the real Binance spot capture replayed under each of K symbols of the recorded
exchangeInfo, so a collector sees load that looks like the market (issue 13, item 3).

Nothing here is a new recording. One recorded symbol's capture (`SimulatorOptions.symbols`, BTCUSDT by default:
its trades, bookTickers, depth diffs and REST depth snapshot, and the 1m klines derived from its trades, see
recording.py) is replayed under every served symbol, transformed per symbol by fixed, deterministic rules:

- Symbols: `market_symbols=N` serves the first N symbols of the recorded exchangeInfo (its order) whose status
  is TRADING and whose PRICE_FILTER can hold the recording's price levels (below); a list serves those symbols
  (any status) and names any that cannot. k is a symbol's position in the served list.
- Ids: every id of symbol k (trade `t`, kline `f`/`L`, bookTicker `u`, depth `U`/`u`, the snapshot's
  `lastUpdateId`) is the recorded id plus k * ID_STRIDE (10^12). Each symbol's ids are therefore the recorded
  sequence, unique and increasing, and the snapshot's `lastUpdateId` straddles the symbol's shifted diffs
  exactly as the recorded one does. Loops shift them further as in a one-symbol replay.
- Times: event times (`E` of trades, klines, depth diffs) are the recorded ones plus a phase of k % 50 ms.
  Trade times `T` and the candles' minutes are the recorded ones, so each symbol's klines stay exactly the
  candles of its trades (a phase on `T` would move trades across minute boundaries).
- Price levels: price = tickSize_k * (centre_k + r(p)), where r is one monotone, one-to-one map of the recorded
  prices to whole ticks: r(p) = p / 0.01 - n0 (n0 = the first recorded trade's price in ticks of 0.01, BTCUSDT's
  tick) when the symbol's [minPrice, maxPrice] holds that whole span (18.5 million ticks: the depth diffs carry
  far levels from 15,432.50 to 200,000); otherwise the same inside the range of the recorded trades and
  bookTickers, and beyond it the recorded depth levels one tick apart in their order (the far levels squeezed).
  Every level is a multiple of the symbol's tick and inside its PRICE_FILTER; the order of levels, the best
  bid/ask at every update, and which price each trade hit are the recording's. centre_k is n0 * (1 + (k % 10) /
  10) (the recorded price level, scaled by 1.0 to 1.9, in the symbol's ticks) when that fits the filter, else
  50-90% of the highest centre it allows (by k % 5), else the lowest. Quantities are the recorded ones.
- Klines: the derived candles of the recording with the same price map on open/high/low/close, ids shifted,
  and the quote volumes recomputed exactly from the mapped prices (sum of price * qty, truncated to 8 decimals,
  as recording.py derives them): each symbol's klines are the candles of its own trades.

Order and pace: the replay sends the recorded events in order, each one under every symbol in turn (event j of
the recording for symbols 0..K-1, then event j+1), so every symbol moves through the recording at once. At the
recorded pace the total rate is K times the recording's; with `rate` (total trades a second) trade number
t * K + k of a loop (recorded trade t, symbol k) is due (t * K + k) / rate s after the loop began, and every
other event goes with the trade before it: each symbol gets rate / K trades a second.

REST historicalTrades / aggTrades (spot_trades.py) serve each symbol's trades the replay has reached, ids and prices
as on the wire; aggregates are the recording's (same times, sides and order of prices), aggregate ids from half
the symbol's first trade id. Not served for the derived symbols: the real daily kline zips and the derived
history before the replay (simulator/history.py covers only recorded symbols).
Memory: the depth book of each symbol starts from the 1,000-level snapshot (about 0.3 MB a symbol).
"""

from __future__ import annotations

import bisect
import copy
import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, overload

from simulator.depth import DepthDiff, DepthSnapshot, Level
from simulator.recording import (
    SCALE,
    BookTicker,
    BookTickerEvent,
    Candle,
    DepthEvent,
    KlineEvent,
    Recording,
    ReplayEvent,
    Trade,
    TradeEvent,
    load_exchange_info,
    real_data_dir,
    to_units,
    units_text,
)
from simulator.spot import BinanceSpot
from simulator.spot_trades import SpotTrades, _SymbolHistory, histories

if TYPE_CHECKING:
    from simulator.server import SimulatorOptions

ID_STRIDE = 10**12  # symbol k's ids: the recorded ones + k * ID_STRIDE
PHASE_CYCLE_MS = 50  # symbol k's event times: the recorded ones + k % PHASE_CYCLE_MS ms
SOURCE_TICK_UNITS = 10**6  # the recorded prices are whole ticks of 0.01 (BTCUSDT's PRICE_FILTER)
_S = TypeVar("_S")
_T = TypeVar("_T")


class MarketSymbolError(ValueError):
    """A symbol the many-symbol replay cannot serve (unknown, or its PRICE_FILTER cannot hold the levels)."""


@dataclass(frozen=True)
class SymbolShape:
    """How one served symbol transforms the recorded events (see the module docstring)."""

    symbol: str
    k: int
    id_shift: int
    phase_ms: int
    tick_units: int  # tickSize in units of 1e-8
    centre: int  # in ticks
    linear: bool  # r(p) is p in ticks - n0 for every level (else the squeezed map)


class PriceLevels:
    """The recorded prices and the two maps r(p) onto whole ticks (linear, squeezed), shared by all symbols."""

    def __init__(self, source: Recording) -> None:
        core: set[str] = set()
        far: set[str] = set()
        for ev in source.events:
            if isinstance(ev, TradeEvent):
                core.add(ev.trade.price)
            elif isinstance(ev, BookTickerEvent):
                core.update((ev.book.bid, ev.book.ask))
            elif isinstance(ev, DepthEvent):
                far.update(p for p, _ in (*ev.diff.bids, *ev.diff.asks))
        for snap in source.snapshots.values():
            far.update(p for p, _ in (*snap.bids, *snap.asks))
        ticks = {p: self._ticks(p) for p in core | far}
        self.n0 = ticks[source.trades[0].price]
        self.linear = {p: n - self.n0 for p, n in ticks.items()}
        lo, hi = min(ticks[p] for p in core), max(ticks[p] for p in core)
        below = sorted((n for n in set(ticks.values()) if n < lo), reverse=True)
        above = sorted(n for n in set(ticks.values()) if n > hi)
        squeezed_of = {n: n - self.n0 for n in range(lo, hi + 1)}
        squeezed_of.update({n: lo - self.n0 - i for i, n in enumerate(below, 1)})
        squeezed_of.update({n: hi - self.n0 + i for i, n in enumerate(above, 1)})
        self.squeezed = {p: squeezed_of[n] for p, n in ticks.items()}
        self.spans = {True: (min(self.linear.values()), max(self.linear.values())),
                      False: (min(self.squeezed.values()), max(self.squeezed.values()))}

    @staticmethod
    def _ticks(price: str) -> int:
        units = to_units(price)
        if units % SOURCE_TICK_UNITS:
            raise MarketSymbolError(f"recorded price {price} is not a multiple of 0.01; the many-symbol replay "
                                    f"maps whole ticks of 0.01 (replay BTCUSDT's capture, or extend PriceLevels)")
        return units // SOURCE_TICK_UNITS

    def shape(self, info_symbol: dict[str, Any], k: int) -> SymbolShape | None:
        """Symbol k's transform, or None when its PRICE_FILTER cannot hold the recorded levels."""
        pf = next((f for f in info_symbol["filters"] if f["filterType"] == "PRICE_FILTER"), None)
        if pf is None:
            return None
        tick = to_units(pf["tickSize"])
        if tick <= 0:
            return None
        lo_ticks = max(1, math.ceil(to_units(pf["minPrice"]) / tick))
        max_price = to_units(pf["maxPrice"])
        hi_ticks = max_price // tick if max_price > 0 else 10**15
        for linear in (True, False):
            r_min, r_max = self.spans[linear]
            low, high = lo_ticks - r_min, hi_ticks - r_max  # the centres that keep every level in the filter
            if low > high:
                continue
            centre = self.n0 * (10 + k % 10) // 10
            if centre > high:
                centre = max(low, low + (high - low) * (5 + k % 5) // 10)
            centre = max(centre, low)
            return SymbolShape(info_symbol["symbol"], k, k * ID_STRIDE, k % PHASE_CYCLE_MS, tick, centre, linear)
        return None


def select_symbols(info: dict[str, Any], levels: PriceLevels, wanted: int | Sequence[str]) -> list[SymbolShape]:
    """The served symbols, in order (see the module docstring, "Symbols")."""
    by_name = {s["symbol"]: s for s in info["symbols"]}
    shapes: list[SymbolShape] = []
    if isinstance(wanted, int):
        if wanted < 1:
            raise MarketSymbolError(f"market_symbols must be >= 1 (or a list of symbols), got {wanted}")
        for s in info["symbols"]:
            if len(shapes) == wanted:
                break
            if s["status"] == "TRADING":
                shape = levels.shape(s, len(shapes))
                if shape is not None:
                    shapes.append(shape)
        if len(shapes) < wanted:
            raise MarketSymbolError(f"market_symbols={wanted}: the recorded exchangeInfo has only {len(shapes)} "
                                    f"TRADING symbols whose PRICE_FILTER holds the recorded price levels; ask "
                                    f"for at most {len(shapes)}, or name symbols with market_symbols=[...]")
        return shapes
    for name in wanted:
        s = by_name.get(name.upper())
        if s is None:
            raise MarketSymbolError(f"market symbol {name!r} is not in the recorded exchangeInfo (1,695 Binance "
                                    f"spot symbols, cryptofeed-captures/BINANCE.0); check the spelling")
        shape = levels.shape(s, len(shapes))
        if shape is None:
            raise MarketSymbolError(f"market symbol {name}: its PRICE_FILTER cannot hold the recorded price "
                                    f"levels (tick {s['filters'][0].get('tickSize')}); leave it out")
        shapes.append(shape)
    if len({s.symbol for s in shapes}) != len(shapes):
        raise MarketSymbolError(f"market symbols repeat a symbol: {list(wanted)}")
    return shapes


class _Sums:
    """Exact running sums over the recorded trades in id order, for the candles' quote volumes."""

    def __init__(self, trades: list[Trade]) -> None:
        self.ids = [t.id for t in trades]
        q = [0]
        nq = [0]
        tq = [0]
        tnq = [0]
        for t in trades:
            units = to_units(t.qty)
            n = to_units(t.price) // SOURCE_TICK_UNITS
            taker_buy = not t.is_buyer_maker
            q.append(q[-1] + units)
            nq.append(nq[-1] + n * units)
            tq.append(tq[-1] + (units if taker_buy else 0))
            tnq.append(tnq[-1] + (n * units if taker_buy else 0))
        self.q, self.nq, self.tq, self.tnq = q, nq, tq, tnq

    def between(self, first_id: int, last_id: int) -> tuple[int, int, int, int]:
        """(sum qty, sum ticks*qty, the same over taker buys) of the trades with ids first_id..last_id."""
        i = bisect.bisect_left(self.ids, first_id)
        j = bisect.bisect_right(self.ids, last_id)
        return (self.q[j] - self.q[i], self.nq[j] - self.nq[i], self.tq[j] - self.tq[i],
                self.tnq[j] - self.tnq[i])


class Transform:
    """The recorded events as one served symbol sends them (see the module docstring)."""

    def __init__(self, levels: PriceLevels, sums: _Sums) -> None:
        self.levels = levels
        self.sums = sums

    def price(self, s: SymbolShape, recorded: str) -> str:
        r = (self.levels.linear if s.linear else self.levels.squeezed)[recorded]
        return units_text((s.centre + r) * s.tick_units)

    def _levels(self, s: SymbolShape, levels: tuple[Level, ...]) -> tuple[Level, ...]:
        table = self.levels.linear if s.linear else self.levels.squeezed
        c, tick = s.centre, s.tick_units
        return tuple((units_text((c + table[p]) * tick), q) for p, q in levels)

    def trade(self, s: SymbolShape, t: Trade) -> Trade:
        return Trade(s.symbol, t.id + s.id_shift, self.price(s, t.price), t.qty, t.time, t.event_time + s.phase_ms,
                     t.is_buyer_maker, t.best_match, t.recv_ns)

    def candle(self, s: SymbolShape, c: Candle) -> Candle:
        if c.first_trade_id < 0:
            q = qq = tq = tqq = 0
        else:
            q, nq, tq, tnq = self.sums.between(c.first_trade_id, c.last_trade_id)
            shift = s.centre - self.levels.n0  # price_k = tick_k * (n + shift) inside the trades' range
            qq, tqq = s.tick_units * (nq + shift * q), s.tick_units * (tnq + shift * tq)
        return Candle(s.symbol, c.open_time, c.close_time, self.price(s, c.open), self.price(s, c.high),
                      self.price(s, c.low), self.price(s, c.close), c.volume, units_text(qq // SCALE), c.count,
                      c.taker_buy_volume, units_text(tqq // SCALE),
                      c.first_trade_id + s.id_shift if c.first_trade_id >= 0 else -1,
                      c.last_trade_id + s.id_shift if c.last_trade_id >= 0 else -1)

    def book(self, s: SymbolShape, b: BookTicker) -> BookTicker:
        return BookTicker(s.symbol, b.update_id + s.id_shift, self.price(s, b.bid), b.bid_qty, self.price(s, b.ask),
                          b.ask_qty, b.recv_ns)

    def diff(self, s: SymbolShape, d: DepthDiff) -> DepthDiff:
        return DepthDiff(s.symbol, d.first_id + s.id_shift, d.final_id + s.id_shift,
                         None if d.prev_final_id is None else d.prev_final_id + s.id_shift,
                         d.event_time + s.phase_ms, None if d.trans_time is None else d.trans_time + s.phase_ms,
                         self._levels(s, d.bids), self._levels(s, d.asks), d.recv_ns)

    def snapshot(self, s: SymbolShape, snap: DepthSnapshot) -> DepthSnapshot:
        return DepthSnapshot(snap.last_update_id + s.id_shift, self._levels(s, snap.bids),
                             self._levels(s, snap.asks), snap.recv_ns, snap.event_time, snap.trans_time)

    def event(self, s: SymbolShape, ev: ReplayEvent) -> ReplayEvent:
        if isinstance(ev, TradeEvent):
            return TradeEvent(ev.recv_ns, self.trade(s, ev.trade))
        if isinstance(ev, KlineEvent):
            return KlineEvent(ev.recv_ns, ev.event_time + s.phase_ms, self.candle(s, ev.candle), ev.closed)
        if isinstance(ev, DepthEvent):
            return DepthEvent(ev.recv_ns, self.diff(s, ev.diff))
        return BookTickerEvent(ev.recv_ns, self.book(s, ev.book))


class _Mapped(Sequence[_T]):
    """`fn` of each item of `items`, computed as read (indexing, iteration, bisect)."""

    def __init__(self, items: Sequence[_S], fn: Callable[[_S], _T]) -> None:
        self.items = items
        self.fn = fn

    def __len__(self) -> int:
        return len(self.items)

    @overload
    def __getitem__(self, i: int) -> _T: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[_T]: ...

    def __getitem__(self, i: int | slice) -> _T | Sequence[_T]:
        if isinstance(i, slice):
            return [self.fn(x) for x in self.items[i]]
        return self.fn(self.items[i])


def market_events(source: Sequence[ReplayEvent], shapes: list[SymbolShape],
                  transform: Transform) -> Sequence[ReplayEvent]:
    """The replay's events, made as they are read: index j * K + k is recorded event j under symbol k."""
    k = len(shapes)
    return _Mapped(range(len(source) * k), lambda i: transform.event(shapes[i % k], source[i // k]))


def market_rate_offsets(source: Sequence[ReplayEvent], symbols: int, rate: float) -> Sequence[float]:
    """Seconds from a loop's start to each event at `rate` trades a second in total (module docstring): trade
    number t * K + k is due at (t * K + k) / rate; any other event goes with the trade before it."""
    before: list[int] = []  # recorded trades before event j, times K
    is_trade: list[bool] = []
    n = 0
    for ev in source:
        before.append(n * symbols)
        is_trade.append(isinstance(ev, TradeEvent))
        n += isinstance(ev, TradeEvent)

    def offset(i: int) -> float:
        j, k = divmod(i, symbols)
        return (before[j] + k) / rate if is_trade[j] else max(0, before[j] - 1) / rate
    return _Mapped(range(len(source) * symbols), offset)


class MarketRecording(Recording):
    """A `Recording` whose events are the source recording's under every served symbol (made as read).

    `trades` and `candles` stay the source's (one symbol, loop 0): what the status and the start-up log report;
    `trades_in_loop` / `candles_in_loop` give every served symbol's."""

    def __init__(self, source: Recording, shapes: list[SymbolShape], levels: PriceLevels) -> None:
        # Recording.__init__ is not called: it derives its fields by reading every event, here K times the source's.
        if len(source.symbols) != 1:
            raise MarketSymbolError(f"the many-symbol replay replays one recorded symbol's capture, got "
                                    f"{', '.join(source.symbols)}; pass symbols=('BTCUSDT',)")
        self.source = source
        self.shapes = shapes
        self.transform = Transform(levels, _Sums(source.trades))
        src = source.symbols[0]
        self.symbols = tuple(s.symbol for s in shapes)
        self.events = market_events(source.events, shapes, self.transform)  # type: ignore[assignment]
        self.data_dir = source.data_dir
        self.snapshots = {s.symbol: self.transform.snapshot(s, snap) for s in shapes
                          for snap in source.snapshots.values()}
        self.trades = source.trades
        self.candles = source.candles
        self.loop_shift_ms = source.loop_shift_ms
        self.first_recv_ns = source.first_recv_ns
        self.id_span = {s.symbol: source.id_span[src] for s in shapes}
        self.book_id_span = {s.symbol: source.book_id_span[src] for s in shapes}
        self.depth_id_span = {s.symbol: source.depth_id_span[src] for s in shapes if src in source.depth_id_span}

    @classmethod
    def build(cls, source: Recording, info: dict[str, Any], wanted: int | Sequence[str]) -> MarketRecording:
        levels = PriceLevels(source)
        return cls(source, select_symbols(info, levels, wanted), levels)

    def trades_in_loop(self, loop: int = 0, time_offset_ms: int = 0) -> list[Trade]:
        """Every served symbol's trades in loop `loop`, in replay order."""
        shift = time_offset_ms + loop * self.loop_shift_ms
        return [self.transform.trade(s, t).shifted(loop * self.id_span[s.symbol], shift)
                for t in self.source.trades for s in self.shapes]

    def candles_in_loop(self, loop: int = 0, time_offset_ms: int = 0) -> list[Candle]:
        """Every served symbol's closed 1m candles in loop `loop`, in replay order."""
        shift = time_offset_ms + loop * self.loop_shift_ms
        return [self.transform.candle(s, c).shifted(loop * self.id_span[s.symbol], shift)
                for c in self.source.candles for s in self.shapes]


class MarketSpot(BinanceSpot):
    """Binance spot serving `options.market_symbols` from one recorded symbol's capture (module docstring)."""

    recording: MarketRecording

    def __init__(self, options: SimulatorOptions, recording: Recording | None = None) -> None:
        assert options.market_symbols is not None
        data_dir = options.data_dir or real_data_dir()
        source = recording or Recording.load(data_dir, options.symbols, options.max_trades, options.book_ticker,
                                             options.kline_throttle_ms, options.depth)
        market = MarketRecording.build(source, load_exchange_info(data_dir), options.market_symbols)
        served = options.exchange_info_symbols
        if served is not None:  # exchangeInfo lists the served symbols beside the usual ones
            served = tuple(dict.fromkeys((*served, *market.symbols)))
        super().__init__(dataclasses.replace(options, exchange_info_symbols=served), market)

    def _rate_plan(self, rate: float) -> Sequence[float]:
        return market_rate_offsets(self.recording.source.events, len(self.recording.shapes), rate)

    def _loop_span_s(self) -> float:
        if self.options.rate is None:
            return super()._loop_span_s()
        return len(self.recording.source.trades) * len(self.recording.shapes) / self.options.rate

    def _describe(self) -> str:
        rec = self.recording
        rate = self.options.rate
        pace = f"{rate:g} trades/s in total" if rate else "each at the recorded pace"
        return (f"simulated binance spot, many symbols: the {rec.source.symbols[0]} capture ({len(rec.trades)} "
                f"trades, {rec.duration_s:.0f} s) replayed under {len(rec.symbols)} symbols "
                f"({', '.join(rec.symbols[:5])}{', ...' if len(rec.symbols) > 5 else ''}), {pace}")

    def _trade_history_endpoints(self) -> list[tuple[str, Any, Any]]:
        """historicalTrades / aggTrades for every served symbol, over views of the source's trade history."""
        rec = self.recording
        source = histories(rec.source.events, rec.source.id_span)[rec.source.symbols[0]]
        return SpotTrades(self, {s.symbol: _market_history(source, s, len(rec.shapes), rec.transform)
                                 for s in rec.shapes}).endpoints()


def _market_history(source: _SymbolHistory, s: SymbolShape, symbols: int, transform: Transform) -> _SymbolHistory:
    """Symbol `s`'s trade history: the source's trades mapped, ids shifted, at their places among the replay's
    events; the aggregates are the source's (same times, sides and price order)."""
    h = copy.copy(source)
    h.trades = _Mapped(source.trades, functools.partial(transform.trade, s))
    h.ids = _Mapped(source.ids, lambda i: i + s.id_shift)
    h.event_index = _Mapped(source.event_index, lambda j: j * symbols + s.k)
    h.agg_base = (source.ids[0] + s.id_shift) // 2
    return h


__all__ = ["ID_STRIDE", "MarketRecording", "MarketSpot", "MarketSymbolError", "PriceLevels", "SymbolShape",
           "select_symbols"]
