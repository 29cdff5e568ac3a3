"""Venues: the other exchanges the simulator serves beside Binance spot, on the same port.

Each venue is one exchange (a ccxt id) in its own module, speaking that exchange's REST and WebSocket wire
formats under its real host names (`/{host}{path}`, see common/exchanges/clients.py "host-prefix"), replaying the
real recordings, enforcing its rate limits and injecting its faults. The `Simulator` (server.py) mounts the
venues named in `SimulatorOptions.venues`, forwards `/_sim/fault` bodies with `"exchange": id` to the venue's
`inject`, lists each venue's `status()` under `"venues"` in `/_sim/status`, and starts/stops them with itself.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web

if TYPE_CHECKING:
    from simulator.server import SimulatorOptions

# ccxt id -> "module:class". A venue class takes (options: SimulatorOptions) and satisfies `Venue`.
VENUES: dict[str, str] = {
    "binanceusdm": "simulator.usdm:BinanceUsdm",
    "coinbase": "simulator.coinbase:CoinbaseVenue",
    "hyperliquid": "simulator.hyperliquid:HyperliquidVenue",
}


class Venue(Protocol):
    exchange: str  # the ccxt id, e.g. "binanceusdm"

    def add_routes(self, router: web.UrlDispatcher) -> None:
        """Register this venue's REST and WebSocket routes (host-prefixed, e.g. /fapi.binance.com/...)."""

    def inject(self, kind: str, **params: Any) -> dict[str, Any]:
        """Apply a fault now; return the venue's fault state. Raise `FaultError` (server.py) for a bad one."""

    def status(self) -> dict[str, Any]:
        """What the venue has done: replay position, messages sent, connections, REST weight, faults."""

    async def start(self) -> None:
        """Called once the HTTP server listens."""

    async def stop(self) -> None:
        """Close every connection and cancel every task."""


def build_venues(names: tuple[str, ...], options: SimulatorOptions) -> list[Venue]:
    """The venues named, built from `VENUES`; an unknown name is an error that lists the known ones."""
    venues = []
    for name in names:
        target = VENUES.get(name)
        if target is None:
            raise ValueError(f"simulator venue {name!r} is unknown; known: binance (always served), "
                             f"{', '.join(sorted(VENUES)) or '(none)'}")
        module, cls = target.split(":")
        venues.append(getattr(importlib.import_module(module), cls)(options))
    return venues
