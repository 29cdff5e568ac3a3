"""The real Coinbase recordings the simulator's Coinbase Advanced Trade venue replays (see coinbase.py).

Sources, under the shared real-data folder's `cryptofeed-captures/` (bmoscon/cryptofeed sample_data; "This
product includes software developed by Bryant Moscon"). Both are the older Coinbase Exchange feed (ccxt's
`coinbaseexchange`, then "Coinbase Pro"), recorded 2021-04-17; nothing here is synthetic:
- `COINBASE.0`: one recorded REST response, `<url> -> <epoch s>: <json>`, of `GET /products` (Exchange shape).
- `COINBASE.ws.28.0`: about 31 s of WebSocket traffic for 10 products, channels level2, ticker and matches.
  Line forms: `<url> <-> <epoch s>` (connect), `<url> <- <epoch s>: <json>` (sent by the recorder),
  `<epoch s>: <json>` (received). Received types: subscriptions, snapshot, l2update, ticker, match, last_match.

This module only parses and checks: it keeps every received market message, in recorded order, with its
receive time and the exchange's own time, as typed records. Turning them into Advanced Trade messages is
coinbase.py's job. A line or message type it does not know is an error naming the file and line.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from simulator.recording import RecordingFormatError

PRODUCTS_FILE = "cryptofeed-captures/COINBASE.0"
WS_FILE = "cryptofeed-captures/COINBASE.ws.28.0"
US = 1_000_000

_RECEIVED = re.compile(r"^(\d+(?:\.\d+)?): (\{.*\})$")
_SENT = re.compile(r"^(wss?://\S+) <- (\d+(?:\.\d+)?): (\{.*\})$")
_CONNECT = re.compile(r"^(wss?://\S+) <-> (\d+(?:\.\d+)?)$")
_REST = re.compile(r"^(https?://\S+) -> (\d+(?:\.\d+)?): (\[.*\]|\{.*\})$")
_ISO = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?Z$")


@dataclass(frozen=True, slots=True)
class RecordedTrade:
    """A `match` (or the `last_match` sent at subscription: the product's previous trade)."""
    product_id: str
    trade_id: int
    price: str
    size: str
    maker_side: str  # "buy" | "sell": Coinbase Exchange reports the maker order's side
    time_us: int  # exchange time, microseconds since the epoch
    recv_us: int
    last_match: bool


@dataclass(frozen=True, slots=True)
class RecordedBookSnapshot:
    product_id: str
    bids: tuple[tuple[str, str], ...]  # (price, size), best first, as recorded
    asks: tuple[tuple[str, str], ...]
    recv_us: int  # the Exchange snapshot carries no time of its own


@dataclass(frozen=True, slots=True)
class RecordedBookUpdate:
    product_id: str
    changes: tuple[tuple[str, str, str], ...]  # (side "buy"|"sell", price, new size; "0" removes the level)
    time_us: int
    recv_us: int


@dataclass(frozen=True, slots=True)
class RecordedTicker:
    product_id: str
    price: str
    best_bid: str
    best_ask: str
    open_24h: str
    volume_24h: str
    low_24h: str
    high_24h: str
    trade_id: int
    time_us: int
    recv_us: int


RecordedEvent = RecordedTrade | RecordedBookSnapshot | RecordedBookUpdate | RecordedTicker


def parse_time_us(text: str, where: str) -> int:
    """Coinbase's ISO time ('2021-04-17T16:43:30.244075Z') as integer microseconds since the epoch."""
    m = _ISO.match(text)
    if m is None:
        raise RecordingFormatError(f"{where}: time {text!r} is not ISO-8601 UTC like 2021-04-17T16:43:30.244075Z")
    whole = datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC)
    frac = (m.group(2) or "").ljust(9, "0")[:6]
    return int(whole.timestamp()) * US + int(frac)


def format_time_us(time_us: int) -> str:
    """Microseconds since the epoch as Coinbase prints them: '2021-04-17T16:43:30.244075Z'."""
    seconds, micros = divmod(time_us, US)
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S") + f".{micros:06d}Z"


def _seconds_to_us(text: str) -> int:
    whole, _, frac = text.partition(".")
    return int(whole) * US + int((frac or "0").ljust(6, "0")[:6])


@dataclass(frozen=True)
class CoinbaseRecording:
    events: tuple[RecordedEvent, ...]
    products: tuple[dict[str, Any], ...]  # the recorded GET /products rows, Coinbase Exchange shape
    products_recorded_us: int
    product_ids: tuple[str, ...]  # the products that have WebSocket data, in recorded subscription order

    @classmethod
    def load(cls, data_dir: Path) -> CoinbaseRecording:
        products, products_us = load_products(data_dir / PRODUCTS_FILE)
        events, product_ids = load_ws(data_dir / WS_FILE)
        known = {p["id"] for p in products}
        missing = [p for p in product_ids if p not in known]
        if missing:
            raise RecordingFormatError(f"{data_dir / WS_FILE}: products {missing} have WebSocket data but are not "
                                       f"in the recorded /products of {data_dir / PRODUCTS_FILE}")
        return cls(events=events, products=products, products_recorded_us=products_us, product_ids=product_ids)

    @property
    def first_recv_us(self) -> int:
        return self.events[0].recv_us

    @property
    def duration_us(self) -> int:
        return self.events[-1].recv_us - self.events[0].recv_us

    def trades(self, product_id: str) -> list[RecordedTrade]:
        return [e for e in self.events if isinstance(e, RecordedTrade) and e.product_id == product_id]


def load_products(path: Path) -> tuple[tuple[dict[str, Any], ...], int]:
    """The recorded `GET https://api.pro.coinbase.com/products` response and when it was recorded (µs)."""
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            m = _REST.match(line.rstrip("\n"))
            if m is None:
                continue  # the cryptofeed header lines (configuration) that follow the response
            url, ts, body = m.groups()
            if not url.endswith("/products"):
                raise RecordingFormatError(f"{path}:{n}: expected a recorded GET .../products, found {url}")
            rows = json.loads(body)
            if not isinstance(rows, list) or not all(isinstance(r, dict) and "id" in r for r in rows):
                raise RecordingFormatError(f"{path}:{n}: /products body is not a list of products with 'id'")
            return tuple(rows), _seconds_to_us(ts)
    raise RecordingFormatError(f"{path}: no '<url> -> <ts>: <json>' REST response line found")


def load_ws(path: Path) -> tuple[tuple[RecordedEvent, ...], tuple[str, ...]]:
    """Every received market message of the capture as a typed record, in recorded order."""
    events: list[RecordedEvent] = []
    product_ids: list[str] = []
    with path.open(encoding="utf-8") as fh:
        for n, raw in enumerate(fh, 1):
            line = raw.rstrip("\n")
            where = f"{path}:{n}"
            if not line or _CONNECT.match(line):  # the capture ends with blank lines
                continue
            if m := _SENT.match(line):
                request = json.loads(m.group(3))
                product_ids.extend(p for p in request.get("product_ids", []) if p not in product_ids)
                continue
            m = _RECEIVED.match(line)
            if m is None:
                raise RecordingFormatError(f"{where}: not a cryptofeed capture line ('<ts>: <json>', "
                                           f"'<url> <- <ts>: <json>' or '<url> <-> <ts>'): {line[:80]!r}")
            event = _event(json.loads(m.group(2)), _seconds_to_us(m.group(1)), where)
            if event is not None:
                events.append(event)
    if not events:
        raise RecordingFormatError(f"{path}: no market messages")
    return tuple(events), tuple(product_ids)


def _event(msg: dict[str, Any], recv_us: int, where: str) -> RecordedEvent | None:
    kind = msg.get("type")
    try:
        if kind == "subscriptions":
            return None
        if kind in ("match", "last_match"):
            return RecordedTrade(msg["product_id"], int(msg["trade_id"]), msg["price"], msg["size"], msg["side"],
                                 parse_time_us(msg["time"], where), recv_us, kind == "last_match")
        if kind == "snapshot":
            return RecordedBookSnapshot(msg["product_id"], tuple((p, s) for p, s in msg["bids"]),
                                        tuple((p, s) for p, s in msg["asks"]), recv_us)
        if kind == "l2update":
            changes = tuple((side, p, s) for side, p, s in msg["changes"])
            if any(side not in ("buy", "sell") for side, _, _ in changes):
                raise RecordingFormatError(f"{where}: l2update side must be buy or sell: {changes}")
            return RecordedBookUpdate(msg["product_id"], changes, parse_time_us(msg["time"], where), recv_us)
        if kind == "ticker":
            return RecordedTicker(msg["product_id"], msg["price"], msg["best_bid"], msg["best_ask"], msg["open_24h"],
                                  msg["volume_24h"], msg["low_24h"], msg["high_24h"], int(msg["trade_id"]),
                                  parse_time_us(msg["time"], where), recv_us)
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, RecordingFormatError):
            raise
        raise RecordingFormatError(f"{where}: {kind} message lacks or mangles a field ({exc!r})") from exc
    raise RecordingFormatError(f"{where}: unknown Coinbase Exchange message type {kind!r}; this loader reads "
                               f"subscriptions, snapshot, l2update, ticker, match, last_match")
