"""Ground truth for the chaos suite, computed from the raw recordings alone.

Reads `ws-captures/binance_spot_btcusdt_*.gz` (one message a line: `<receive ns> <combined-stream JSON>`) with
gzip and json, and nothing of the pipeline or of the simulator's code: the suite must not share a bug with
what it judges. From the `btcusdt@trade` messages it keeps (id, price, qty, trade time T in ms) and builds the
bars a correct pipeline must store: 1m candles and 5m/15m/1h bars (open = first trade's price, high, low,
close = last trade's price, volume = sum of qty), only for windows that lie wholly inside what was replayed.

Looping (`--loop`, docs/simulator.md): loop k moves every trade id by k * id_span (max id - min id + 1) and
every time by k * loop_shift_ms (the recording's span in whole minutes, from its first trade's minute to its
last's). A run that replayed loops 0..k-1 and part of loop k is described by `Truth.replayed`.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

MINUTE_MS = 60_000
TIMEFRAMES_MS = {"1m": MINUTE_MS, "5m": 5 * MINUTE_MS, "15m": 15 * MINUTE_MS, "1h": 60 * MINUTE_MS}


class CaptureError(ValueError):
    """A capture file that is not what this reader understands; the message names the file and line."""


@dataclass(frozen=True, slots=True)
class TrueTrade:
    id: int
    price: Decimal
    qty: Decimal
    time_ms: int


@dataclass(frozen=True, slots=True)
class TrueBar:
    timeframe: str
    open_time_ms: int
    open: Decimal
    high: Decimal
    low: Decimal
    close: Decimal
    volume: Decimal
    trades: int


def read_spot_trades(data_dir: Path, symbol: str = "btcusdt") -> list[TrueTrade]:
    """Every recorded `<symbol>@trade` message of the spot captures, in file order; ids must increase."""
    files = sorted((data_dir / "ws-captures").glob(f"binance_spot_{symbol}_*.gz"))
    if not files:
        raise CaptureError(f"no binance_spot_{symbol}_*.gz under {data_dir / 'ws-captures'}; the chaos suite "
                           f"needs the real captures (../shared/data/real or MDP_REAL_DATA)")
    out: list[TrueTrade] = []
    for path in files:
        with gzip.open(path, "rt") as fh:
            for n, line in enumerate(fh, 1):
                _, _, body = line.partition(" ")
                try:
                    msg = json.loads(body)
                except json.JSONDecodeError as exc:
                    raise CaptureError(f"{path}:{n}: not JSON after the receive time: {exc}") from exc
                if msg.get("stream") != f"{symbol}@trade":
                    continue
                d = msg["data"]
                t = TrueTrade(int(d["t"]), Decimal(d["p"]), Decimal(d["q"]), int(d["T"]))
                if out and t.id <= out[-1].id:
                    raise CaptureError(f"{path}:{n}: trade id {t.id} does not follow {out[-1].id}")
                out.append(t)
    return out


def bars(trades: list[TrueTrade], timeframe: str, first_ms: int, last_ms: int) -> list[TrueBar]:
    """The bars of `timeframe` whose window [open, open + tf) lies inside [first_ms, last_ms] (the span the
    replay covered: a window that starts before the first trade sent or ends after the last is partial)."""
    tf = TIMEFRAMES_MS[timeframe]
    acc: dict[int, list[TrueTrade]] = {}
    for t in trades:
        acc.setdefault(t.time_ms // tf * tf, []).append(t)
    out = []
    for open_ms in sorted(acc):
        if open_ms < first_ms or open_ms + tf - 1 > last_ms:
            continue
        ts = acc[open_ms]
        out.append(TrueBar(timeframe, open_ms, ts[0].price, max(t.price for t in ts), min(t.price for t in ts),
                           ts[-1].price, sum((t.qty for t in ts), Decimal(0)), len(ts)))
    return out


@dataclass
class Truth:
    """One loop of the recording, and how loops move ids and times."""

    trades: list[TrueTrade]

    @classmethod
    def load(cls, data_dir: Path) -> Truth:
        return cls(read_spot_trades(data_dir))

    @property
    def id_span(self) -> int:
        return self.trades[-1].id - self.trades[0].id + 1

    @property
    def loop_shift_ms(self) -> int:
        first = self.trades[0].time_ms // MINUTE_MS
        last = max(t.time_ms for t in self.trades) // MINUTE_MS
        return (last - first + 1) * MINUTE_MS

    def loop(self, k: int, time_offset_ms: int = 0) -> list[TrueTrade]:
        di, dt = k * self.id_span, k * self.loop_shift_ms + time_offset_ms
        return [TrueTrade(t.id + di, t.price, t.qty, t.time_ms + dt) for t in self.trades]

    def replayed(self, loops_done: int, last_id: int | None, time_offset_ms: int = 0) -> list[TrueTrade]:
        """Trades of loops 0..loops_done-1, then those of the current loop up to `last_id` (None: none)."""
        out: list[TrueTrade] = []
        for k in range(loops_done):
            out.extend(self.loop(k, time_offset_ms))
        if last_id is not None:
            out.extend(t for t in self.loop(loops_done, time_offset_ms) if t.id <= last_id)
        return out

    @staticmethod
    def expected_bars(trades: list[TrueTrade], timeframe: str) -> list[TrueBar]:
        """Bars wholly inside the replay: windows from the first whole window after the first trade to the last
        window that ends before the last trade's minute. A window with no trade has no bar (the recording has
        trades in every minute; a stored bar where the truth has none is reported as extra by the checks)."""
        if not trades:
            return []
        first = trades[0].time_ms
        last = max(t.time_ms for t in trades)
        # The first minute of the replay starts mid-minute: only windows that start at or after the first
        # trade's minute boundary + 1 minute are whole (the exchange had trades before the capture began).
        tf = TIMEFRAMES_MS[timeframe]
        whole_from = (first // MINUTE_MS + 1) * MINUTE_MS
        whole_from = -(-whole_from // tf) * tf
        return bars(trades, timeframe, whole_from, last // MINUTE_MS * MINUTE_MS - 1)
