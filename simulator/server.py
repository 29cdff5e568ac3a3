"""The exchange simulator: one aiohttp server that hosts the simulated exchanges (venues, venue.py) on one port.

Binance spot (spot.py) is always served; the venues named in `SimulatorOptions.venues` (usdm.py, coinbase.py,
hyperliquid.py) are served beside it, each under its real host names (`/{host}{path}`, see
common/exchanges/clients.py "host-prefix"). The server adds the control endpoints under /_sim/:
- GET  /_sim/status: Binance spot's status, with each other venue's under "venues".
- POST /_sim/fault:  {"kind": ..., "exchange": "binance" (default) | a venue, ...parameters}: the venue's `inject`.
- POST /_sim/replay: {"speed", "loop", "arm"}: restart Binance spot's replay (`Simulator.restart`).
Any other path answers 404 in Binance's error format, and is logged as not served.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import aiohttp
from aiohttp import web

from simulator import binance
from simulator.history import History
from simulator.market import MarketSpot
from simulator.recording import DEFAULT_SYMBOLS, Candle, Recording, Trade
from simulator.spot import BinanceSpot
from simulator.venue import FaultError, ReplayState, Venue, build_venues

__all__ = ["DEFAULT_EXCHANGE_INFO_SYMBOLS", "FaultError", "Simulator", "SimulatorOptions", "start_simulator"]

log = logging.getLogger("simulator")

StartMode = Literal["subscribe", "manual", "immediate"]
DEFAULT_EXCHANGE_INFO_SYMBOLS: tuple[str, ...] = ("BTCUSDT", "ETHUSDT", "ETHBTC", "BNBUSDT", "SOLUSDT")


@dataclass(frozen=True)
class SimulatorOptions:
    speed: float = 1.0  # 1.0 = recorded pace, 2.0 = twice as fast, 0 = as fast as the clients read
    loop: bool = False
    shift_to_now: bool = False  # shift timestamps by whole minutes so the recording starts (about) now
    max_trades: int | None = None  # replay only the first N trades
    symbols: tuple[str, ...] = DEFAULT_SYMBOLS
    start: StartMode = "subscribe"
    wait_for_streams: tuple[str, ...] = ()  # with start="subscribe": start once all of these have subscribers
    book_ticker: bool = True
    kline_throttle_ms: int = 0  # 0: an open-kline update after every trade
    data_dir: Path | None = None
    exchange_info_symbols: tuple[str, ...] | None = DEFAULT_EXCHANGE_INFO_SYMBOLS  # None: all 1,695 symbols
    weight_limit: int = 6000  # REQUEST_WEIGHT per window; above it: HTTP 429 with Retry-After
    weight_window_s: float = 60.0  # Binance counts weight per clock minute
    ban_after_429s: int = 5  # requests answered 429 in one window before the IP is banned (HTTP 418)
    ban_s: float = 120.0  # the first ban's length; each further ban doubles it, up to 3 days (as Binance)
    history: bool = True  # serve 1m klines for any range before the replay (simulator/history.py)
    ws_ping_s: float | None = 20.0  # server pings like Binance; None disables
    rest_candle_cap: int = 100_000  # derived candles kept for REST per symbol (looping forever grows it)
    venues: tuple[str, ...] = ()  # other exchanges served on the same port (simulator/venue.py)
    depth: bool = True  # replay the recorded depth diffs and serve GET /api/v3/depth (simulator/depth.py)
    rate: float | None = None  # Binance spot: this many trades a second, evenly spaced (benchmarks); None: recorded pace
    # Binance spot: the capture of `symbols` replayed under many exchangeInfo symbols (simulator/market.py): the
    # first N TRADING ones, or these names; `rate` is then the total over all of them. None: the recorded symbols.
    market_symbols: int | tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        # lists from JSON/CLI/kwargs
        for name in ("symbols", "wait_for_streams", "exchange_info_symbols", "venues", "market_symbols"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple | int):
                object.__setattr__(self, name, tuple(value))
        if self.speed < 0:
            raise ValueError(f"speed must be >= 0 (0 = as fast as possible), got {self.speed}")
        if self.rate is not None and self.rate <= 0:
            raise ValueError(f"rate must be above 0 trades a second (or None: the recorded pace), got {self.rate}")
        if self.start not in ("subscribe", "manual", "immediate"):
            raise ValueError(f"start must be subscribe, manual or immediate, got {self.start!r}")


class Simulator:
    """The simulated exchanges on one port. Build it, then `await start(host, port)` (or use `start_simulator`).
    Binance spot is `spot`; the other venues are `venues` (ccxt id -> venue). The Python API mirrors the
    /_sim/ control endpoints and, for the tests, Binance spot's replay (`restart`, `expected_trades`, ...)."""

    def __init__(self, options: SimulatorOptions | None = None, recording: Recording | None = None) -> None:
        self.options = options or SimulatorOptions()
        self.spot = (MarketSpot if self.options.market_symbols is not None else BinanceSpot)(self.options, recording)
        self.venues: dict[str, Venue[Any, Any]] = {v.exchange: v for v in build_venues(self.options.venues,
                                                                                       self.options)}
        self.host = "127.0.0.1"
        self.port = 0
        self._runner: web.AppRunner | None = None
        self.app = self._build_app()

    def _hosted(self) -> dict[str, Venue[Any, Any]]:
        return {self.spot.exchange: self.spot, **self.venues}

    # ------------------------------------------------------------------------------------------------------
    # Lifecycle

    async def start(self, host: str = "127.0.0.1", port: int = 0, access_log: bool = False) -> None:
        self._runner = web.AppRunner(self.app, access_log=logging.getLogger("aiohttp.access") if access_log
                                     else None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        self.host = host
        self.port = int(self._runner.addresses[0][1])
        log.info("simulator listening on %s (REST) and %s (WebSocket): %s", self.rest_url, self.ws_url,
                 ", ".join(self._hosted()))
        for venue in self._hosted().values():
            await venue.start()

    async def stop(self) -> None:
        for venue in [*self.venues.values(), self.spot]:
            await venue.stop()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def rest_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.port}"

    # ------------------------------------------------------------------------------------------------------
    # Python API: Binance spot's replay (the same operations as /_sim/)

    @property
    def recording(self) -> Recording:
        return self.spot.recording

    @property
    def history(self) -> History | None:
        return self.spot.history

    @property
    def data_dir(self) -> Path:
        return self.spot.data_dir

    @property
    def state(self) -> ReplayState:
        return self.spot.state

    @property
    def speed(self) -> float:
        return self.spot.speed

    @property
    def loop(self) -> bool:
        return self.spot.loop

    @property
    def trades_replayed(self) -> int:
        return self.spot.trades_replayed

    @property
    def time_offset_ms(self) -> int:
        return self.spot.time_offset_ms

    def restart(self, speed: float | None = None, loop: bool | None = None, arm: bool = False) -> None:
        """(Re)start Binance spot's replay from the first event now; with `arm`, wait for the next subscription
        instead. The REST store of derived candles is reset with it."""
        self.spot.restart(speed, loop, arm)

    async def wait_finished(self, timeout: float | None = None) -> None:
        """Until Binance spot's replay has sent its last event (raises TimeoutError; never returns while looping)."""
        await self.spot.wait_finished(timeout)

    def inject(self, kind: str, **params: Any) -> dict[str, Any]:
        """A Binance spot fault now (kinds: spot.FAULT_KINDS, see `Venue.inject` and `BinanceSpot._inject`)."""
        return self.spot.inject(kind, **params)

    async def disconnect_all(self, code: int = aiohttp.WSCloseCode.GOING_AWAY) -> int:
        return await self.spot.disconnect_all(code)

    def expected_trades(self, loop: int = 0) -> list[Trade]:
        return self.spot.expected_trades(loop)

    def expected_candles(self, loop: int = 0) -> list[Candle]:
        return self.spot.expected_candles(loop)

    def candles_between(self, symbol: str, start: int | None, end: int | None, limit: int) -> list[Candle]:
        return self.spot.candles_between(symbol, start, end, limit)

    def archive_zip(self, name: str) -> bytes | None:
        return self.spot.archive_zip(name)

    def status(self) -> dict[str, Any]:
        return {**self.spot.status(), "venues": {name: venue.status() for name, venue in self.venues.items()}}

    # ------------------------------------------------------------------------------------------------------
    # Control endpoints

    async def _sim_status(self, request: web.Request) -> web.Response:
        return web.json_response(self.status())

    async def _sim_fault(self, request: web.Request) -> web.Response:
        body = await self._json_body(request)
        kind = body.pop("kind", None)
        exchange = body.pop("exchange", self.spot.exchange)
        venue = self._hosted().get(exchange)
        if venue is None:
            return web.json_response({"error": f"exchange {exchange!r} is not served here; served: "
                                               f"{', '.join(self._hosted())}"}, status=400)
        if not isinstance(kind, str):
            return web.json_response({"error": f"'kind' is required: one of {', '.join(venue.FAULT_KINDS)}"},
                                     status=400)
        try:
            return web.json_response({"ok": True, "faults": venue.inject(kind, **body)})
        except FaultError as exc:
            return web.json_response({"error": str(exc)}, status=400)

    async def _sim_replay(self, request: web.Request) -> web.Response:
        body = await self._json_body(request)
        try:
            self.restart(speed=body.get("speed"), loop=body.get("loop"), arm=bool(body.get("arm", False)))
        except (TypeError, ValueError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response({"ok": True, "state": self.state, "speed": self.speed, "loop": self.loop})

    @staticmethod
    async def _json_body(request: web.Request) -> dict[str, Any]:
        if not request.can_read_body:
            return {}
        try:
            body = await request.json()
        except ValueError as exc:
            raise web.HTTPBadRequest(text=f"body is not JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise web.HTTPBadRequest(text="body must be a JSON object")
        return body

    async def _not_served(self, request: web.Request) -> web.Response:
        log.warning("not served: %s %s", request.method, request.path_qs)
        return web.json_response(binance.error_body(-1000, f"simulator: {request.path} is not simulated"),
                                 status=404)

    def _build_app(self) -> web.Application:
        app = web.Application()
        r = app.router
        for venue in self._hosted().values():
            venue.add_routes(r)
        r.add_get("/_sim/status", self._sim_status)
        r.add_post("/_sim/fault", self._sim_fault)
        r.add_post("/_sim/replay", self._sim_replay)
        r.add_route("*", "/{tail:.*}", self._not_served)
        return app


@contextlib.asynccontextmanager
async def start_simulator(port: int = 0, host: str = "127.0.0.1", recording: Recording | None = None,
                          access_log: bool = False, **options: Any) -> AsyncIterator[Simulator]:
    """Run a simulator for the duration of the block: `async with start_simulator(speed=0) as sim:`.
    `options` are `SimulatorOptions` fields; port 0 picks a free port (see `sim.port`, `sim.rest_url`)."""
    sim = Simulator(SimulatorOptions(**options), recording)
    await sim.start(host, port, access_log=access_log)
    try:
        yield sim
    finally:
        await sim.stop()
