"""One root for the errors the pipeline raises on purpose.

Every such error derives from `MdpError` (and, where a caller may already catch it that way, from the builtin
it always was: `ValueError` for bad input or configuration, `RuntimeError` for a failed operation), and its
message names the thing, the value and the fix. Callers that want "any of ours" catch `MdpError`; the
command line turns one into `error: ...` and exit status 2 (bad input) or 1 (an operation failed).
The wire codec's `schemas.DecodeError` is the one exception: `schemas` imports nothing of ours, so it is a
plain `ValueError`.
"""

from __future__ import annotations


class MdpError(Exception):
    """Root of the pipeline's own errors."""


class StoreUnavailable(MdpError):
    """A store (InfluxDB, PostgreSQL, Redis) cannot be reached: retry the same batch later, lose nothing.
    `store` names it for the `store.unavailable` alert (default: the message up to its first colon)."""

    def __init__(self, message: str, *, store: str = "") -> None:
        super().__init__(message)
        self.store = store or _store_named_in(message)


def _store_named_in(message: str) -> str:
    """"InfluxDB at http://h:8086, database 'x' is unavailable (...)" -> the part before " is unavailable"."""
    cuts = [i for i in (message.find(sep) for sep in (" is unavailable", " refused", ": ")) if i > 0]
    return message[:min(cuts)][:100] if cuts else (message[:100] or "store")
