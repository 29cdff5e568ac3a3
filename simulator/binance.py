"""Binance spot wire format: WebSocket event payloads, REST bodies, errors and request weights.

Field names, order and types follow Binance's spot API docs and the recorded traffic: a trade event
re-encoded here from a recorded one (no shift) is byte-for-byte the recorded `data` object.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import msgspec

from simulator.recording import BookTicker, Candle, Trade

KLINE_INTERVALS = ("1s", "1m", "3m", "5m", "15m", "30m", "1h", "2h", "4h", "6h", "8h", "12h", "1d", "3d", "1w",
                   "1M")
SERVED_INTERVAL = "1m"
KLINES_DEFAULT_LIMIT = 500
KLINES_MAX_LIMIT = 1000

_encode = msgspec.json.Encoder().encode


def trade_event(t: Trade) -> dict[str, Any]:
    return {"e": "trade", "E": t.event_time, "s": t.symbol, "t": t.id, "p": t.price, "q": t.qty, "T": t.time,
            "m": t.is_buyer_maker, "M": t.best_match}


def kline_event(c: Candle, event_time: int, closed: bool) -> dict[str, Any]:
    return {"e": "kline", "E": event_time, "s": c.symbol, "k": {
        "t": c.open_time, "T": c.close_time, "s": c.symbol, "i": SERVED_INTERVAL,
        "f": c.first_trade_id, "L": c.last_trade_id, "o": c.open, "c": c.close, "h": c.high, "l": c.low,
        "v": c.volume, "n": c.count, "x": closed, "q": c.quote_volume, "V": c.taker_buy_volume,
        "Q": c.taker_buy_quote_volume, "B": "0"}}


def book_ticker_event(b: BookTicker, update_id: int) -> dict[str, Any]:
    return {"u": update_id, "s": b.symbol, "b": b.bid, "B": b.bid_qty, "a": b.ask, "A": b.ask_qty}


def encode(payload: object) -> str:
    return _encode(payload).decode()


def combined(stream: str, payload_json: str) -> str:
    """The `/stream?streams=` envelope, built around an already encoded payload."""
    return f'{{"stream":"{stream}","data":{payload_json}}}'


def stream_name(symbol: str, channel: str) -> str:
    """'BTCUSDT', 'trade' -> 'btcusdt@trade' (Binance stream names use lowercase symbols)."""
    return f"{symbol.lower()}@{channel}"


def error_body(code: int, msg: str) -> dict[str, Any]:
    return {"code": code, "msg": msg}


def missing_parameter(name: str) -> dict[str, Any]:
    return error_body(-1102, f"Mandatory parameter '{name}' was not sent, was empty/null, or malformed.")


def klines_weight(limit: int) -> int:
    """Spot `GET /api/v3/klines` weight: 2 at any limit (Binance spot API docs since the 2023-08-25 weight
    change; ccxt 4.5 agrees: cost 0.4 at 0.2 per weight unit). The 1/2/5/10-by-limit table is USD-M futures'."""
    del limit
    return 2


REST_WEIGHTS = {"ping": 1, "time": 1, "exchangeInfo": 20}


def trim_exchange_info(info: dict[str, Any], symbols: tuple[str, ...] | None, now_ms: int,
                       weight_limit: int) -> dict[str, Any]:
    """The recorded exchangeInfo with `serverTime` set to now, the REQUEST_WEIGHT limit set to what the
    simulator enforces, and only `symbols` kept (all when None)."""
    out = dict(info)
    out["serverTime"] = now_ms
    out["rateLimits"] = [dict(r, limit=weight_limit) if r.get("rateLimitType") == "REQUEST_WEIGHT" else r
                         for r in info.get("rateLimits", [])]
    if symbols is not None:
        wanted = set(symbols)
        out["symbols"] = [s for s in info["symbols"] if s["symbol"] in wanted]
        missing = wanted - {s["symbol"] for s in out["symbols"]}
        if missing:
            raise ValueError(f"symbols {sorted(missing)} are not in the recorded exchangeInfo")
    return out


def malformed_klines_body(rows: list[list[Any]], shape: str) -> str:
    """A klines body that is HTTP 200 but not what Binance sends; see `MALFORMED_SHAPES`."""
    if not rows:
        rows = [[0] + [None] * 11]
    if shape == "null_values":
        return encode([[row[0]] + [None] * 11 for row in rows])
    if shape == "nulls":
        return encode([[None] * 12 for _ in rows])
    if shape == "objects":
        return encode([{} for _ in rows])
    if shape == "truncated":
        text = encode(rows)
        return text[: len(text) // 2]
    if shape == "object":
        return encode({"rows": rows})
    raise ValueError(f"unknown malformed shape {shape!r}; one of {sorted(MALFORMED_SHAPES)}")


# What ccxt 4.5.90 binance `fetch_ohlcv` makes of each (measured in tests/test_simulator.py). ccxt drops rows
# whose timestamp is None when `since` is given, so only `null_values` reaches a caller that passes `since`.
MALFORMED_SHAPES = {
    "null_values": "each row keeps its open time, the 11 other fields null: rows [t, None, None, None, None, "
                   "None], with or without `since`; no exception",
    "nulls": "each row 12 nulls: rows of 6 None without `since`, [] with `since`; no exception",
    "objects": "each row {}: rows of 6 None without `since`, [] with `since`; no exception",
    "truncated": "the JSON cut in half: ccxt parses the text as rows of garbage ([9, None, ...]) without "
                 "`since`, [] with it; no exception",
    "object": "a JSON object instead of an array: one row of None without `since`, [] with it",
}


def subscription_reply(text: str, streams: set[str], combined: bool, subscribe: Callable[[list[str]], None],
                       unsubscribe: Callable[[list[str]], None]) -> dict[str, Any]:
    """The answer to a client's WebSocket request in Binance's live-subscription protocol (spot and USD-M
    alike): SUBSCRIBE / UNSUBSCRIBE (applied through the callbacks), LIST_SUBSCRIPTIONS over `streams`,
    SET_PROPERTY / GET_PROPERTY (`combined`), and Binance's error codes for everything else."""
    try:
        request = json.loads(text)
    except ValueError as exc:
        return {"code": 3, "msg": f"Invalid JSON: {exc}", "id": None}
    if not isinstance(request, dict):
        return {"code": 2, "msg": "Invalid request: expected a JSON object", "id": None}
    method, params, req_id = request.get("method"), request.get("params", []), request.get("id")
    if method in ("SUBSCRIBE", "UNSUBSCRIBE"):
        if not isinstance(params, list) or not all(isinstance(p, str) and "@" in p for p in params):
            return {"code": 2, "msg": "Invalid request: params must be a list of stream names", "id": req_id}
        (subscribe if method == "SUBSCRIBE" else unsubscribe)(params)
        return {"result": None, "id": req_id}
    if method == "LIST_SUBSCRIPTIONS":
        return {"result": sorted(streams), "id": req_id}
    if method == "SET_PROPERTY":
        return {"result": None, "id": req_id}
    if method == "GET_PROPERTY":
        return {"result": combined, "id": req_id}
    return {"code": 2, "msg": f"Invalid request: unknown method {method!r}", "id": req_id}
