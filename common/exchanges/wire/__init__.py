"""Pure decoders of exchanges' raw WebSocket frames into our events (the collector's decode fast path,
docs/collector.md): msgspec typed structs, no I/O, no ccxt. One module per exchange family and channel."""

from __future__ import annotations

from typing import Any

import msgspec

# Binance's combined-stream envelope (`/stream` connections) starts so: `{"stream":"..","data":{..}}`.
ENVELOPE = '{"stream"'


def decode_binance(frame: str, raw: msgspec.json.Decoder[Any], combined: msgspec.json.Decoder[Any]) -> Any:
    """A Binance frame's payload by `raw` (a `/ws` frame) or `combined` (the envelope, whose `data` it is), or
    None when the frame is not well formed for them (a field missing or mistyped, cut short)."""
    try:
        if frame.startswith(ENVELOPE):
            return combined.decode(frame).data
        return raw.decode(frame)
    except msgspec.DecodeError:  # ValidationError (a field missing or mistyped) is a DecodeError too
        return None
