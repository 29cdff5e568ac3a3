"""WebSocket faults that change what goes on the wire, shared by the spot simulator and the venues.

Each fault is armed with a count (or a duration) and consumed by the messages that follow it:
- malformed_ws: the next `count` messages are sent as text that is not JSON (the payload cut in half).
- duplicate:    the next `count` messages are sent twice in a row.
- reorder:      the next `count` messages are each held back and sent after the message that follows them on the
                same stream (a swapped pair).
- sequence_gap: after `after` more depth diffs (default 0), the next `count` are not sent (the exchange's book
                still moves: U/pu stop chaining).
- clock_skew:   every event time (`E`, `T`) is shifted by `ms` from now on (0 puts it back).
Only streams whose name contains `stream_filter` (default: every stream; e.g. "@depth") are affected.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

WIRE_FAULT_KINDS = ("malformed_ws", "duplicate", "reorder", "sequence_gap", "clock_skew")


@dataclass
class WireFaults:
    malformed: int = 0
    duplicate: int = 0
    reorder: int = 0
    sequence_gap: int = 0
    gap_after: int = 0  # depth diffs still sent before the gap
    skew_ms: int = 0
    stream_filter: str = ""
    held: dict[str, str] = field(default_factory=dict)  # stream -> a message held back by `reorder`
    dropped_depth_ids: list[int] = field(default_factory=list)  # `u` of each diff the gap fault dropped

    def arm(self, kind: str, params: dict[str, Any]) -> None:
        """Arm `kind` (one of WIRE_FAULT_KINDS) with its parameters; raises KeyError/ValueError on bad ones."""
        if kind == "clock_skew":
            self.skew_ms = int(params["ms"])
            return
        count = int(params.get("count", 1))
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        self.stream_filter = str(params.get("stream", ""))
        if kind == "malformed_ws":
            self.malformed = count
        elif kind == "duplicate":
            self.duplicate = count
        elif kind == "reorder":
            self.reorder = count
        elif kind == "sequence_gap":
            self.sequence_gap, self.gap_after = count, int(params.get("after", 0))
        else:
            raise ValueError(f"unknown wire fault {kind!r}")

    def skew(self, payload: dict[str, Any]) -> dict[str, Any]:
        """The payload with its event/transaction times shifted by the clock skew (the same dict when none)."""
        if not self.skew_ms:
            return payload
        out = dict(payload)
        for key in ("E", "T"):
            if isinstance(out.get(key), int):
                out[key] += self.skew_ms
        return out

    def drop_depth(self, stream: str, final_id: int) -> bool:
        """True when this depth diff must not be sent (the sequence_gap fault)."""
        if self.sequence_gap > 0 and self.stream_filter in stream:
            if self.gap_after > 0:
                self.gap_after -= 1
                return False
            self.sequence_gap -= 1
            self.dropped_depth_ids.append(final_id)
            del self.dropped_depth_ids[:-1000]
            return True
        return False

    def frames(self, stream: str, text: str) -> list[str]:
        """The frames to send for one encoded message of `stream` (0, 1, 2 or 3 of them)."""
        held = self.held.pop(stream, None)
        if self.stream_filter not in stream:
            return [text] if held is None else [text, held]
        if self.reorder > 0 and held is None:
            self.reorder -= 1
            self.held[stream] = text
            return []
        out = [text]
        if self.malformed > 0:
            self.malformed -= 1
            out = [text[: len(text) // 2]]
        elif self.duplicate > 0:
            self.duplicate -= 1
            out = [text, text]
        if held is not None:
            out.append(held)
        return out

    def as_dict(self) -> dict[str, Any]:
        return {"malformed_ws": self.malformed, "duplicate": self.duplicate, "reorder": self.reorder,
                "sequence_gap": self.sequence_gap, "clock_skew_ms": self.skew_ms, "stream": self.stream_filter,
                "held_back": len(self.held), "dropped_depth_ids": self.dropped_depth_ids[-20:]}
