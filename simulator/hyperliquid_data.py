"""The real Hyperliquid recordings the simulator's Hyperliquid venue serves, and what it derives from them.

Real (read from the shared real-data folder, see `recording.real_data_dir`; nothing here is synthetic):
- `ws-captures/hyperliquid_btcusd_20250126.gz`: mainnet WebSocket traffic for BTC, 2025-01-26, one message a
  line, `<local receive ns> <raw JSON>`: 46 `l2Book` snapshots (20 levels a side, each with `time`) and 9
  `trades` messages (64 trades; the first message is the snapshot of recent trades the server sends on
  subscription). Replayed in recorded order, paced by the receive times.
- `hyperliquid-rest/*.yaml`: vcrpy cassettes of mainnet `POST /info` (2023-07-17): `meta` (28 perps, BTC at
  index 0, so no extension is needed), `allMids`, `candleSnapshot` kPEPE 1h (24 candles), `l2Book` DYDX,
  `fundingHistory` BTC (1,038 hourly rows).

Derived (the recordings hold none of it; computed deterministically, documented in docs/simulator-hyperliquid.md):
- Candles of every fixed-length interval from the replayed trades (open/close = first/last trade price,
  high/low, volume = sum(sz), n = trade count), bucketed by trade time, as Hyperliquid's own candles are.
- The asset context of BTC (`metaAndAssetCtxs`, `activeAssetCtx`) from the replay position: see `asset_ctx`.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

CAPTURE = Path("ws-captures") / "hyperliquid_btcusd_20250126.gz"
CASSETTES = Path("hyperliquid-rest")
MINUTE_MS = 60_000
# Hyperliquid's candle intervals of fixed length (3d, 1w and 1M are calendar-aligned there: not derived here).
INTERVAL_MS: dict[str, int] = {"1m": MINUTE_MS, "3m": 3 * MINUTE_MS, "5m": 5 * MINUTE_MS, "15m": 15 * MINUTE_MS,
                               "30m": 30 * MINUTE_MS, "1h": 60 * MINUTE_MS, "2h": 120 * MINUTE_MS,
                               "4h": 240 * MINUTE_MS, "8h": 480 * MINUTE_MS, "12h": 720 * MINUTE_MS,
                               "1d": 1440 * MINUTE_MS}
IMPACT_NOTIONAL = Decimal(20_000)  # USDC walked into the book for impactPxs (Hyperliquid: BTC and ETH)
INTEREST_RATE = Decimal("0.0000125")  # Hyperliquid's fixed interest component, per hour (0.01% per 8 h)
FUNDING_CLAMP = Decimal("0.0005")


class HyperliquidDataError(ValueError):
    """A recorded Hyperliquid file is not in the format this loader reads; the message names file and line."""


@dataclass(frozen=True, slots=True)
class CaptureEvent:
    """One recorded WebSocket message: receive time (local ns), channel, and its `data` as received."""

    recv_ns: int
    channel: Literal["trades", "l2Book"]
    data: Any


def load_capture(path: Path) -> list[CaptureEvent]:
    """Every line of the capture, in file order. Each line must be `<int ns> <JSON>` with channel `trades` or
    `l2Book`, and its JSON must re-encode to the same bytes (so what the venue sends is what was received)."""
    events: list[CaptureEvent] = []
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            where = f"{path}:{n}"
            stamp, sep, raw = line.rstrip("\n").partition(" ")
            if not sep or not stamp.isdigit():
                raise HyperliquidDataError(f"{where}: expected '<receive ns> <JSON>', got {line[:80]!r}")
            try:
                msg = json.loads(raw)
            except ValueError as exc:
                raise HyperliquidDataError(f"{where}: not JSON ({exc})") from exc
            channel = msg.get("channel") if isinstance(msg, dict) else None
            if channel not in ("trades", "l2Book"):
                raise HyperliquidDataError(f"{where}: channel {channel!r} is not read here (trades, l2Book)")
            if encode(msg) != raw:
                raise HyperliquidDataError(f"{where}: the message does not re-encode to its recorded bytes")
            events.append(CaptureEvent(int(stamp), channel, msg["data"]))
    if not events:
        raise HyperliquidDataError(f"{path}: no messages")
    return events


def encode(obj: Any) -> str:
    """Hyperliquid's compact JSON (no spaces), keys in the given order."""
    return json.dumps(obj, separators=(",", ":"))


@dataclass(frozen=True, slots=True)
class Interaction:
    """One recorded request/response pair of a vcrpy cassette."""

    request: dict[str, Any]
    status: int
    body: str


def read_cassette(path: Path) -> list[Interaction]:
    """The interactions of a vcrpy YAML cassette. Reads only the subset these cassettes use (single-quoted
    scalars for bodies, possibly folded over several lines) and refuses anything else, naming the line."""
    lines = path.read_text(encoding="utf-8").splitlines()
    out: list[Interaction] = []
    request: dict[str, Any] | None = None
    body: str | None = None
    i = 0
    while i < len(lines):
        stripped = lines[i].strip()
        if stripped.startswith(("body: '", "string: '")):
            text, i = _single_quoted(lines, i, path)
            if stripped.startswith("body: '"):
                try:
                    request = json.loads(text)
                except ValueError as exc:
                    raise HyperliquidDataError(f"{path}:{i}: request body is not JSON ({exc})") from exc
            else:
                body = text
        elif stripped.startswith("code: "):
            if request is None or body is None:
                raise HyperliquidDataError(f"{path}:{i + 1}: a status code before its request and body")
            out.append(Interaction(request, int(stripped.removeprefix("code: ")), body))
            request = body = None
        i += 1
    if not out:
        raise HyperliquidDataError(f"{path}: no interactions found")
    return out


def _single_quoted(lines: list[str], i: int, path: Path) -> tuple[str, int]:
    """A YAML single-quoted scalar starting on line i: '' is a quote; a line break folds to one space."""
    first = lines[i].split("'", 1)[1]
    parts = [first]
    while not _closes(parts[-1]):
        i += 1
        if i >= len(lines):
            raise HyperliquidDataError(f"{path}: unterminated quoted scalar")
        parts.append(lines[i].strip())
    return " ".join(parts)[:-1].replace("''", "'"), i


def _closes(fragment: str) -> bool:
    stripped = fragment.rstrip()
    if not stripped.endswith("'"):
        return False
    run = len(stripped) - len(stripped.rstrip("'"))
    return run % 2 == 1


def _recorded(path: Path, kind: str) -> Interaction:
    for it in read_cassette(path):
        if it.request.get("type") == kind:
            if it.status != 200:
                raise HyperliquidDataError(f"{path}: recorded {kind} answered HTTP {it.status}")
            return it
    raise HyperliquidDataError(f"{path}: no recorded {kind!r} request")


@dataclass
class HyperliquidRecording:
    """Everything the venue serves that was recorded. `candles[(coin, interval)]` are recorded candles in
    Hyperliquid's REST format, ascending by `t`; tests may add series (e.g. to exercise the 5,000 cap)."""

    events: list[CaptureEvent]
    meta: dict[str, Any]
    all_mids: dict[str, str]
    candles: dict[tuple[str, str], list[dict[str, Any]]]
    funding_history: dict[str, list[dict[str, Any]]]
    books: dict[str, dict[str, Any]]  # recorded REST l2Book snapshots of coins the capture lacks (DYDX)
    coin: str = "BTC"  # the coin of the capture
    trades: list[dict[str, Any]] = field(init=False)

    def __post_init__(self) -> None:
        self.trades = [t for ev in self.events if ev.channel == "trades" for t in ev.data]
        coins = {t["coin"] for t in self.trades} | {ev.data["coin"] for ev in self.events if ev.channel == "l2Book"}
        if coins != {self.coin}:
            raise HyperliquidDataError(f"the capture holds coins {sorted(coins)}; this venue replays {self.coin}")
        names = [u["name"] for u in self.meta["universe"]]
        if self.coin not in names:
            raise HyperliquidDataError(f"recorded meta has no {self.coin}; it lists {names}")

    @classmethod
    def load(cls, data_dir: Path) -> HyperliquidRecording:
        rest = data_dir / CASSETTES
        events = load_capture(data_dir / CAPTURE)
        meta = json.loads(_recorded(rest / "info.yaml", "meta").body)
        mids = json.loads(_recorded(rest / "all_mids.yaml", "allMids").body)
        snapshot = _recorded(rest / "candles_snapshot.yaml", "candleSnapshot")
        rows = json.loads(snapshot.body)
        req = snapshot.request["req"]
        funding = json.loads(_recorded(rest / "funding_history_all.yaml", "fundingHistory").body)
        dydx = json.loads(_recorded(rest / "l2_snapshot.yaml", "l2Book").body)
        return cls(events=events, meta=meta, all_mids=mids,
                   candles={(req["coin"], req["interval"]): sorted(rows, key=lambda c: c["t"])},
                   funding_history={"BTC": sorted(funding, key=lambda r: r["time"])},
                   books={dydx["coin"]: dydx})

    @property
    def duration_ms(self) -> int:
        return (self.events[-1].recv_ns - self.events[0].recv_ns) // 1_000_000


# ----------------------------------------------------------------------------------------------------------
# Derived data


def fmt(value: Decimal) -> str:
    """A decimal as Hyperliquid prints prices and sizes: plain notation, at least one decimal."""
    text = format(value.normalize(), "f")
    return text if "." in text else text + ".0"


def fmt_rate(value: Decimal) -> str:
    """Rates (funding, premium) at 8 decimals, as Hyperliquid prints them."""
    return fmt(value.quantize(Decimal("1e-8")))


class CandleSeries:
    """Candles of one coin and interval built from trades, in Hyperliquid's format (strings for prices)."""

    def __init__(self, coin: str, interval: str) -> None:
        self.coin, self.interval, self.ms = coin, interval, INTERVAL_MS[interval]
        self.rows: dict[int, dict[str, Any]] = {}
        self._low_high: dict[int, tuple[Decimal, Decimal, Decimal]] = {}  # t -> (low, high, volume)

    def add(self, time_ms: int, px: str, sz: str) -> dict[str, Any]:
        """Fold one trade in; returns the candle it landed in (to publish on the `candle` channel)."""
        t = time_ms - time_ms % self.ms
        price, size = Decimal(px), Decimal(sz)
        row = self.rows.get(t)
        if row is None:
            row = self.rows[t] = {"T": t + self.ms - 1, "c": px, "h": px, "i": self.interval, "l": px, "n": 0,
                                  "o": px, "s": self.coin, "t": t, "v": "0.0"}
            self._low_high[t] = (price, price, Decimal(0))
        low, high, volume = self._low_high[t]
        if price < low:
            low, row["l"] = price, px
        if price > high:
            high, row["h"] = price, px
        volume += size
        self._low_high[t] = (low, high, volume)
        row["c"], row["n"], row["v"] = px, row["n"] + 1, fmt(volume)
        return row

    def sorted_rows(self) -> list[dict[str, Any]]:
        return [self.rows[t] for t in sorted(self.rows)]


@dataclass
class MarketState:
    """What the replay has reached for the capture's coin: the last book, the trades so far, their candles."""

    coin: str
    book: dict[str, Any]
    trades: int = 0
    last_px: Decimal | None = None
    volume: Decimal = Decimal(0)
    notional: Decimal = Decimal(0)
    first_px: Decimal | None = None
    candles: dict[str, CandleSeries] = field(default_factory=dict)

    def add_trades(self, trades: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        """Fold trades in; returns the 1m..1d candles they touched (latest version of each)."""
        touched: dict[tuple[str, int], dict[str, Any]] = {}
        for tr in trades:
            px, sz = Decimal(tr["px"]), Decimal(tr["sz"])
            self.trades += 1
            self.first_px = self.first_px if self.first_px is not None else px
            self.last_px, self.volume, self.notional = px, self.volume + sz, self.notional + px * sz
            for interval in INTERVAL_MS:
                series = self.candles.get(interval)
                if series is None:
                    series = self.candles[interval] = CandleSeries(self.coin, interval)
                row = series.add(tr["time"], tr["px"], tr["sz"])
                touched[(interval, row["t"])] = row
        return list(touched.values())


def best(book: dict[str, Any]) -> tuple[Decimal, Decimal]:
    levels = book["levels"]
    return Decimal(levels[0][0]["px"]), Decimal(levels[1][0]["px"])


def impact_px(side: list[dict[str, Any]], notional: Decimal) -> Decimal:
    """The price reached when `notional` USDC is walked into one side of the book (the last level if the
    shown depth is thinner)."""
    filled = Decimal(0)
    px = Decimal(side[0]["px"])
    for level in side:
        px = Decimal(level["px"])
        filled += px * Decimal(level["sz"])
        if filled >= notional:
            break
    return px


def asset_ctx(state: MarketState) -> dict[str, Any]:
    """BTC's perpetual asset context, derived from the replay position (Hyperliquid's formulas where they
    need only what was recorded; stand-ins, documented, where they need what was not):
    - midPx = (best bid + best ask) / 2; impactPxs = the prices reached walking 20,000 USDC into each side;
    - oraclePx (stand-in for the external spot index): VWAP of the trades replayed so far, else midPx;
    - premium = (max(impact bid - oracle, 0) - max(oracle - impact ask, 0)) / oracle (Hyperliquid's formula);
    - funding = premium + clamp(0.0000125 - premium, +-0.0005) (Hyperliquid's hourly formula, unaveraged);
    - markPx = median(best bid, best ask, last trade) (Hyperliquid's local mark component);
    - openInterest (stand-in): the size traded so far; dayNtlVlm: the notional traded so far;
      prevDayPx: the first replayed trade's price (else midPx)."""
    bid, ask = best(state.book)
    mid = (bid + ask) / 2
    impact_bid = impact_px(state.book["levels"][0], IMPACT_NOTIONAL)
    impact_ask = impact_px(state.book["levels"][1], IMPACT_NOTIONAL)
    oracle = (state.notional / state.volume).quantize(Decimal("0.1")) if state.volume else mid
    premium = (max(impact_bid - oracle, Decimal(0)) - max(oracle - impact_ask, Decimal(0))) / oracle
    funding = premium + min(max(INTEREST_RATE - premium, -FUNDING_CLAMP), FUNDING_CLAMP)
    mark = sorted((bid, ask, state.last_px if state.last_px is not None else mid))[1]
    return {"funding": fmt_rate(funding), "openInterest": fmt(state.volume), "prevDayPx": fmt(state.first_px or mid),
            "dayNtlVlm": fmt(state.notional), "premium": fmt_rate(premium), "oraclePx": fmt(oracle),
            "markPx": fmt(mark), "midPx": fmt(mid), "impactPxs": [fmt(impact_bid), fmt(impact_ask)],
            "dayBaseVlm": fmt(state.volume)}


def static_ctx(mid: str) -> dict[str, Any]:
    """The asset context of a coin the capture lacks: its recorded allMids price everywhere, no funding
    premium, no volume, no open interest (documented as static)."""
    return {"funding": fmt_rate(INTEREST_RATE), "openInterest": "0.0", "prevDayPx": mid, "dayNtlVlm": "0.0",
            "premium": "0.0", "oraclePx": mid, "markPx": mid, "midPx": mid, "impactPxs": [mid, mid],
            "dayBaseVlm": "0.0"}
