"""1m klines for any requested range: the real recordings where they exist, derived candles elsewhere.

Why: a two-year backfill benchmark needs two years of 1m klines, and the real 1m recordings hold a few weeks.
So the simulator serves, for every minute before `end_ms` (see `Simulator`), in this order of preference:

1. real 1m rows: `binance-spot-1m-daily/` (data.binance.vision zips, 2020-01-01..03, every column real) and
   `binance-spot-1m-ccxt/BTCUSDT-1m-2024-03.csv` (2024-03-01..22, OHLCV real; the columns that file lacks are
   derived as below). Inside the span of a real file only its rows exist: a minute missing there is missing.
2. DERIVED candles (not real data, documented as such): each real 1h bar of `binance-spot-1h/` is split into
   60 1m bars by a deterministic path seeded by (symbol, hour), so the same hour always gives the same bars:
   - the 60 bars open at the hour's open, close at its close; one bar's high is the hour's high and one
     bar's low the hour's low; every price stays within [low, high], on the 0.01 tick;
   - each bar is consistent (low <= open, close <= high); the volumes add up exactly to the hour's volume;
   - quote volume = volume x (open + close) / 2, taker-buy volume = half the volume, trade count =
     1 + volume / 0.1 (when the volume is not zero): plausible, not real.
   An hour missing from the 1h series inside its range (2021-04-04..2023-12-30) is a real exchange outage
   (e.g. 2023-03-24 13:00-15:00 UTC): no candles are served for it, as Binance serves none.
3. Outside the 1h series' range the series is walked back and forth (ping-pong): after its last bar come
   the bars in reverse order, each reversed in time (open and close swapped), then forward again, and the
   same before its first bar. Adjacent hours stay continuous (an hour opens near where the previous one
   closed) and no hour is missing. These prices are the real 1h bars replayed at other times.

Symbols: those with a 1h series (BTCUSDT, ETHUSDT); BTCUSDT also has the real 1m files.
"""

from __future__ import annotations

import bisect
import csv
import functools
import logging
import random
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from simulator.recording import MINUTE_MS, SCALE, Candle, load_daily_klines, to_units, units_text

HOUR_MS = 60 * MINUTE_MS
TICK = 1_000_000  # 0.01 in units of 1e-8
_HOUR_CACHE = 512  # derived hours kept (60 candles each)
log = logging.getLogger("simulator")


@dataclass(frozen=True, slots=True)
class HourBar:
    open_time: int  # ms
    o: int  # units of 1e-8
    h: int
    low: int
    c: int
    v: int

    def reversed(self, open_time: int) -> HourBar:
        return HourBar(open_time, self.c, self.h, self.low, self.o, self.v)


def _units(text: str) -> int:
    """'61130.99' or '0.02000000' -> units of 1e-8 (more than 8 decimals are cut, as Binance prints 8)."""
    whole, _, frac = text.strip().partition(".")
    return to_units(f"{whole}.{frac[:8]}" if frac else whole)


@functools.lru_cache(maxsize=4)
def load_hours(path: Path) -> tuple[HourBar, ...]:
    """The python-binance 1h CSV: date (naive UTC text), open, high, low, close, volume, ticker."""
    out: list[HourBar] = []
    with path.open() as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or reader.fieldnames[:6] != ["date", "open", "high", "low", "close", "volume"]:
            raise ValueError(f"{path}: expected the columns date,open,high,low,close,volume,ticker; got "
                             f"{reader.fieldnames}")
        for row in reader:
            t = int(datetime.fromisoformat(row["date"]).replace(tzinfo=UTC).timestamp() * 1000)
            out.append(HourBar(t, _units(row["open"]), _units(row["high"]), _units(row["low"]),
                               _units(row["close"]), _units(row["volume"])))
    out.sort(key=lambda b: b.open_time)
    return tuple(out)


_PRICE_TEXT: dict[int, str] = {}


def _price(units: int) -> str:
    """units_text, remembered: prices repeat (a bar opens at the previous close, ticks recur); bounded."""
    text = _PRICE_TEXT.get(units)
    if text is None:
        if len(_PRICE_TEXT) >= 100_000:
            _PRICE_TEXT.clear()
        text = _PRICE_TEXT[units] = units_text(units)
    return text


def _candle(symbol: str, t: int, o: int, h: int, lo: int, c: int, v: int, count: int | None = None) -> Candle:
    n = count if count is not None else (1 + v // (SCALE // 10) if v else 0)
    return Candle(symbol=symbol, open_time=t, close_time=t + MINUTE_MS - 1, open=_price(o), high=_price(h),
                  low=_price(lo), close=_price(c), volume=units_text(v),
                  quote_volume=units_text(v * (o + c) // 2 // SCALE), count=n, taker_buy_volume=units_text(v // 2),
                  taker_buy_quote_volume=units_text((v // 2) * (o + c) // 2 // SCALE))


def _tick(x: float) -> int:
    return round(x / TICK) * TICK


def split_hour(symbol: str, bar: HourBar, seed_time: int) -> list[Candle]:
    """The 60 derived 1m candles of `bar` (see the module docstring); deterministic in (symbol, seed_time)."""
    rng = random.Random(zlib.crc32(symbol.encode()) * 1_000_003 + seed_time // HOUR_MS)
    o, h, lo, c, v = bar.o, bar.h, bar.low, bar.c, bar.v
    span = h - lo
    # A Brownian bridge from open to close, scaled into the hour's range and clipped to it.
    walk = [0.0]
    for _ in range(60):
        walk.append(walk[-1] + rng.gauss(0.0, 1.0))
    bridge = [walk[k] - walk[60] * k / 60 for k in range(61)]
    scale = span / 4 / (max(abs(x) for x in bridge) or 1.0)
    points = [o] + [min(h, max(lo, _tick(o + (c - o) * k / 60 + bridge[k] * scale))) for k in range(1, 60)] + [c]
    i_high, i_low = rng.sample(range(60), 2)
    weights = [rng.random() + 0.1 for _ in range(60)]
    total_w = sum(weights)
    volumes = [int(v * w / total_w) for w in weights]
    volumes[-1] += v - sum(volumes)
    out = []
    for k in range(60):
        ok, ck = points[k], points[k + 1]
        hk = h if k == i_high else min(h, max(ok, ck) + _tick(rng.random() * 0.06 * span))
        lk = lo if k == i_low else max(lo, min(ok, ck) - _tick(rng.random() * 0.06 * span))
        out.append(_candle(symbol, bar.open_time + k * MINUTE_MS, ok, hk, lk, ck, volumes[k]))
    return out


def load_ccxt_minutes(path: Path, symbol: str) -> list[Candle]:
    """`timestamp,open,high,low,close,volume` rows (ccxt fetch_ohlcv, ms) as candles; other columns derived."""
    out = []
    with path.open() as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header != ["timestamp", "open", "high", "low", "close", "volume"]:
            raise ValueError(f"{path}: expected the header timestamp,open,high,low,close,volume; got {header}")
        for row in reader:
            o, h, lo, c, v = (_units(x) for x in row[1:6])
            out.append(_candle(symbol, int(row[0]), o, h, lo, c, v))
    out.sort(key=lambda x: x.open_time)
    return out


class History:
    """Closed 1m candles of every minute before `end_ms` (module docstring), for one data folder."""

    def __init__(self, data_dir: Path, end_ms: int) -> None:
        self.data_dir = data_dir
        self.end_ms = end_ms - end_ms % MINUTE_MS
        self._hours: dict[str, tuple[HourBar, ...]] = {}
        self._hour_index: dict[str, dict[int, int]] = {}
        self._real: dict[str, list[Candle]] = {}
        self._real_spans: dict[str, list[tuple[int, int]]] = {}
        for path in sorted((data_dir / "binance-spot-1h").glob("*-1h-*.csv")):
            sym = path.name.split("-", 1)[0]
            bars = load_hours(path)
            self._hours[sym] = bars
            self._hour_index[sym] = {b.open_time: i for i, b in enumerate(bars)}
        for sym in list(self._hours) + ["BTCUSDT"]:
            real: list[Candle] = list(load_daily_klines(data_dir, sym))
            spans = [(t, t + 86_400_000) for t in sorted({c.open_time - c.open_time % 86_400_000 for c in real})]
            for path in sorted((data_dir / "binance-spot-1m-ccxt").glob(f"{sym}-1m-*.csv")):
                rows = load_ccxt_minutes(path, sym)
                if rows:
                    real.extend(rows)
                    spans.append((rows[0].open_time, rows[-1].open_time + MINUTE_MS))
            real.sort(key=lambda x: x.open_time)
            self._real[sym] = real
            self._real_spans[sym] = sorted(spans)
        self._cache: OrderedDict[tuple[str, int], list[Candle]] = OrderedDict()
        missing = [f"{d}/" for d in ("binance-spot-1h", "binance-spot-1m-ccxt") if not (data_dir / d).is_dir()]
        if missing:  # e.g. the shipped data/real: those folders' sources state no licence, so they are not shipped
            log.warning("history: %s has no %s (not shipped with the project: no licence); REST klines are served "
                        "only where binance-spot-1m-daily/ has real days, nothing elsewhere; set MDP_REAL_DATA to "
                        "the full real-data folder for derived history of any range (docs/operations.md)",
                        data_dir, " ".join(missing))

    @property
    def symbols(self) -> tuple[str, ...]:
        return tuple(sorted(set(self._hours) | {s for s, r in self._real.items() if r}))

    def _real_span_at(self, symbol: str, t: int) -> tuple[int, int] | None:
        for a, b in self._real_spans.get(symbol, ()):
            if a <= t < b:
                return a, b
        return None

    def _bar(self, symbol: str, hour: int) -> HourBar | None:
        bars = self._hours.get(symbol)
        if not bars:
            return None
        first, last = bars[0].open_time, bars[-1].open_time
        if first <= hour <= last:
            i = self._hour_index[symbol].get(hour)
            return bars[i] if i is not None else None  # a real outage: no bar
        n = len(bars)
        v = (n - 1) + (hour - last) // HOUR_MS if hour > last else -((first - hour) // HOUR_MS)
        m = v % (2 * n)
        return HourBar(hour, *_fields(bars[m])) if m < n else bars[2 * n - 1 - m].reversed(hour)

    def _derived_hour(self, symbol: str, hour: int) -> list[Candle]:
        key = (symbol, hour)
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return cached
        bar = self._bar(symbol, hour)
        out = split_hour(symbol, bar, hour) if bar is not None else []
        self._cache[key] = out
        if len(self._cache) > _HOUR_CACHE:
            self._cache.popitem(last=False)
        return out

    def _hour(self, symbol: str, hour: int) -> list[Candle]:
        """Every candle of one hour: real rows inside real spans, derived ones elsewhere."""
        spans = [s for s in self._real_spans.get(symbol, ()) if s[0] < hour + HOUR_MS and hour < s[1]]
        if not spans:
            return self._derived_hour(symbol, hour)
        real = self._real[symbol]
        i = bisect.bisect_left(real, hour, key=lambda c: c.open_time)
        j = bisect.bisect_left(real, hour + HOUR_MS, key=lambda c: c.open_time)
        out = list(real[i:j])
        if any(not (a <= hour and hour + HOUR_MS <= b) for a, b in spans):  # the hour is only partly real
            out.extend(c for c in self._derived_hour(symbol, hour)
                       if not any(a <= c.open_time < b for a, b in spans))
            out.sort(key=lambda c: c.open_time)
        return out

    def between(self, symbol: str, lo: int | None, hi: int | None, limit: int, from_start: bool,
                now_ms: int) -> list[Candle]:
        """Binance's selection over history: open times in [lo, hi] (inclusive), the first `limit` from `lo`
        (from_start) or the last `limit` up to `hi`; only closed minutes before `end_ms`."""
        if symbol not in self._hours and not self._real.get(symbol):
            return []
        stop = min(self.end_ms, now_ms - now_ms % MINUTE_MS)  # exclusive
        earliest = self._earliest(symbol)
        if earliest is None:
            return []
        first = max(lo, earliest) if lo is not None else earliest
        last = min(hi if hi is not None else stop - 1, stop - 1)
        if last < first:
            return []
        out: list[Candle] = []
        if from_start:
            hour = first - first % HOUR_MS
            while hour <= last and len(out) < limit:
                out.extend(c for c in self._hour(symbol, hour) if first <= c.open_time <= last)
                hour += HOUR_MS
            return out[:limit]
        hour = last - last % HOUR_MS
        while hour + HOUR_MS > first and len(out) < limit:
            part = [c for c in self._hour(symbol, hour) if first <= c.open_time <= last]
            out[:0] = part
            hour -= HOUR_MS
        return out[-limit:]

    def _earliest(self, symbol: str) -> int | None:
        """The market's first candle ("listing"): the 1h series' first hour minus the series' length again (one
        ping-pong pass before it), or the first real row if earlier. Nothing is served before it."""
        bars = self._hours.get(symbol)
        real = self._real.get(symbol)
        starts = [bars[0].open_time - (bars[-1].open_time - bars[0].open_time)] if bars else []
        if real:
            starts.append(real[0].open_time)
        return min(starts) if starts else None


def _fields(b: HourBar) -> tuple[int, int, int, int, int]:
    return b.o, b.h, b.low, b.c, b.v


__all__ = ["HOUR_MS", "History", "HourBar", "load_ccxt_minutes", "load_hours", "split_hour"]
