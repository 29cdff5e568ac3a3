"""The errors of the InfluxDB client: what a server refused, and the server's reason read from its error body.

`StoreUnavailable` (common.errors) is the other outcome: the server could not be reached (connection refused or
reset, timeout, HTTP 5xx or 429); the bus retries the same batch in place, nothing is lost.
"""

from __future__ import annotations

import re

import msgspec

from common.errors import MdpError


class InfluxError(MdpError):
    """The server refused a request (4xx). `status` is the HTTP status, `body` the server's error text."""

    def __init__(self, message: str, status: int = 0, body: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.body = body


class InfluxWriteError(InfluxError):
    """A write refused with a 4xx: bad line protocol, field type conflict, missing target, auth.
    `partial` is True when the server stored the points it could parse and dropped the rest."""

    @property
    def partial(self) -> bool:
        return "partial write" in self.body

    @property
    def database_not_found(self) -> bool:
        """The write's target does not exist: database (1.x, 3.x), retention policy (1.x), bucket (2.x)."""
        return (self.status == 404 and "not found" in self.body) or "retention policy not found" in self.body

    @property
    def unauthorized(self) -> bool:
        return self.status in (401, 403)

    @property
    def beyond_retention(self) -> int:
        """Points dropped only for being older than the retention policy (1.x, 2.x), else 0."""
        if "beyond retention policy" not in self.body:
            return 0
        if "field type conflict" in self.body or "unable to parse" in self.body:
            return 0
        found = re.search(r"dropped=(\d+)", self.body)
        return int(found.group(1)) if found else 0


class InfluxQueryError(InfluxError):
    """A query the server refused: a parse error (4xx) or an error reported in a statement's result."""


def error_text(body: bytes) -> str:
    """The error of an InfluxDB error body: `error` (1.x, 3.x; with 3.x's first line detail), `message`
    (2.x), else the body's text (bounded)."""
    text = body.decode(errors="replace").strip()
    try:
        parsed = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return text[:2000]
    if isinstance(parsed, dict):
        if isinstance(parsed.get("message"), str):
            return str(parsed["message"])
        if isinstance(parsed.get("error"), str):
            error = str(parsed["error"])
            data = parsed.get("data")
            detail = data[0] if isinstance(data, list) and data else data
            if isinstance(detail, dict) and detail.get("error_message"):
                error += f": {detail['error_message']}"
                if detail.get("original_line"):
                    error += f" (line {detail.get('line_number')}: {str(detail['original_line'])[:200]!r})"
            return error
    return text[:2000]
