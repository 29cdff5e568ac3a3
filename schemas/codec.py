"""Encoding of bus entries: one stream entry holds a batch of events, msgpack-encoded.

Build one Codec per process and reuse it (msgspec's encoders and decoders are made for reuse).
"""

from __future__ import annotations

import msgspec

from schemas.events import Event

# Entry field names, part of the public stream contract.
FIELD_VERSION = b"v"
FIELD_DATA = b"d"
WIRE_VERSION = b"1"


class DecodeError(ValueError):
    """A stream entry whose payload is not a valid batch of events."""


class Codec:
    def __init__(self) -> None:
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(list[Event])

    def encode(self, events: list[Event]) -> bytes:
        return self._encoder.encode(events)

    def decode(self, payload: bytes) -> list[Event]:
        try:
            return self._decoder.decode(payload)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise DecodeError(f"stream entry is not a batch of events: {exc}") from exc

    def entry(self, events: list[Event]) -> dict[bytes, bytes]:
        return {FIELD_VERSION: WIRE_VERSION, FIELD_DATA: self.encode(events)}

    def decode_entry(self, fields: dict[bytes, bytes]) -> list[Event]:
        version = fields.get(FIELD_VERSION)
        if version != WIRE_VERSION:
            raise DecodeError(f"stream entry has wire version {version!r}, this code reads {WIRE_VERSION!r}")
        data = fields.get(FIELD_DATA)
        if data is None:
            raise DecodeError("stream entry has no 'd' field")
        return self.decode(data)
