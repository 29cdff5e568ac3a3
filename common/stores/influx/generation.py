"""What differs between InfluxDB generations, as one interface the client calls: where a tier lives, how tiers are
made, how lines are written, how a query's values are bound, which credentials fit. `v1`, `v2` and `v3` implement
it; `generation_of` reads a server's generation from its version.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from common.stores.influx.influxql import encode_params
from common.stores.influx.tiers import Tier, TierTarget

if TYPE_CHECKING:
    from common.stores.influx.client import InfluxClient

TOKEN_HINT = "fix influx.token (MDP_INFLUX_TOKEN): a token with read and write access to the tiers' buckets"


def generation_of(version: str) -> int | None:
    """1, 2 or 3 from a server version ("1.6.7~rc0", "v2.7.11", "3.0.1"); None if it is none of them."""
    found = re.match(r"^[vV]?(\d+)\.", version.strip())
    if not found or int(found.group(1)) not in (1, 2, 3):
        return None
    return int(found.group(1))


class Generation(ABC):
    """The generation-specific half of one `InfluxClient` (the client does the HTTP, the errors and the counters).
    Made when the generation is known: from influx.generation, or when `connect()` has read it from the server."""

    number: ClassVar[int]
    credentials_hint: ClassVar[str] = TOKEN_HINT  # what to fix when the server refuses our credentials

    def __init__(self, client: InfluxClient) -> None:
        self.client = client

    def check_credentials(self) -> None:
        """ConfigError for credentials this generation cannot use."""

    async def session_cookie(self) -> str:
        """A session to authenticate with instead of a token or basic auth: its cookie, or "" for none (only
        2.x signs a user in)."""
        return ""

    @abstractmethod
    def tier_target(self, tier: Tier) -> TierTarget:
        """Where `tier` lives on a server of this generation."""

    @abstractmethod
    async def ensure_tiers(self) -> list[str]:
        """Create every tier that is missing and correct the retention of the others; one line per thing."""

    @abstractmethod
    async def write(self, database: str, rp: str, chunk: Sequence[str]) -> None:
        """Write one request's lines into `database` (1.x: with retention policy `rp`; 2.x / 3.x: the bucket or
        database named `database`). Counts the points written; InfluxWriteError when refused."""

    def bind(self, query: dict[str, str], influxql: str, params: Mapping[str, Any] | None, rp: str) -> str:
        """Put the retention policy and the bound values into the `/query` parameters `query` (which holds "db"
        and "epoch"); returns the query text to send. 1.x and 2.x bind values as JSON data."""
        if rp:
            query["rp"] = rp
        if params:
            query["params"] = encode_params(params)
        return influxql

    async def close(self) -> None:
        """Release what this generation opened besides the client's HTTP session."""
