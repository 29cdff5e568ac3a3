"""CLI: `python -m simulator --port 8765 --speed 1 [--loop] [--shift-to-now] [--max-trades N]`.

Serves Binance spot REST at http://HOST:PORT/api.binance.com/api/v3/... (and /api/v3/...) and the spot
WebSocket at ws://HOST:PORT/stream.binance.com/ws/... ; control endpoints under /_sim/. SIGINT/SIGTERM stop it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from simulator.server import DEFAULT_EXCHANGE_INFO_SYMBOLS, Simulator, SimulatorOptions


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m simulator", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--speed", type=float, default=1.0,
                   help="replay speed: 1 = recorded pace, 10 = ten times faster, 0 = as fast as clients read")
    p.add_argument("--rate", type=float, default=None, metavar="N",
                   help="Binance spot: N trades a second, evenly spaced, one per message, instead of the recorded "
                        "pace (other events go with the trade before them; --speed multiplies N)")
    p.add_argument("--loop", action="store_true", help="replay forever, shifting times and trade ids each loop")
    p.add_argument("--shift-to-now", action="store_true",
                   help="shift timestamps by whole minutes so the recording starts now (default: original times)")
    p.add_argument("--max-trades", type=int, default=None, help="replay only the first N trades")
    p.add_argument("--symbols", default=",".join(SimulatorOptions.symbols),
                   help="recorded spot symbols to replay, comma-separated (BTCUSDT, ETHUSDT); or a number N: the "
                        "BTCUSDT capture replayed under the first N TRADING symbols of the recorded exchangeInfo "
                        "(ids, prices and event times shifted per symbol; --rate is then the total; "
                        "docs/simulator.md, Many symbols)")
    p.add_argument("--market-symbols", default=None, metavar="A,B,...",
                   help="as --symbols N, but these exchangeInfo symbols (e.g. ETHBTC,LTCBTC,BNBUSDT)")
    p.add_argument("--start", choices=("subscribe", "manual", "immediate"), default="subscribe",
                   help="when the replay starts: at the first subscription (default), only on POST /_sim/replay, "
                        "or at once")
    p.add_argument("--wait-for", action="append", default=[], metavar="STREAM",
                   help="with --start subscribe: start once this stream has a subscriber (repeatable), "
                        "e.g. --wait-for btcusdt@trade --wait-for btcusdt@kline_1m")
    p.add_argument("--no-book-ticker", action="store_true", help="do not replay bookTicker messages")
    p.add_argument("--kline-throttle-ms", type=int, default=0,
                   help="at most one open-kline update per this many ms of trade time (0: after every trade)")
    p.add_argument("--all-symbols", action="store_true",
                   help="serve all 1,695 symbols of the recorded exchangeInfo (default: "
                        f"{', '.join(DEFAULT_EXCHANGE_INFO_SYMBOLS)})")
    p.add_argument("--weight-limit", type=int, default=6000, help="REST request weight per minute before 429")
    p.add_argument("--weight-window", type=float, default=60.0, help="seconds of a weight window (Binance: 60)")
    p.add_argument("--ban-after", type=int, default=5,
                   help="429s in one window after which a client still calling is banned with 418")
    p.add_argument("--ban-seconds", type=float, default=120.0, help="length of the first 418 ban (doubles after)")
    p.add_argument("--no-history", action="store_true",
                   help="serve REST klines only from the real daily zips and the replay (no derived history)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="the real-data folder (default: $MDP_REAL_DATA, else ../shared/data/real, else the shipped data/real)")
    p.add_argument("--venue", action="append", default=[], metavar="EXCHANGE",
                   help="also serve this exchange on the same port (repeatable): a ccxt id of "
                        "simulator/venue.py VENUES, e.g. binanceusdm, coinbase, hyperliquid")
    p.add_argument("--access-log", action="store_true", help="log every HTTP request")
    return p.parse_args(argv)


def options_of(args: argparse.Namespace) -> SimulatorOptions:
    """The `SimulatorOptions` the command line asks for."""
    symbols = tuple(s.strip().upper() for s in args.symbols.split(",") if s.strip())
    market: int | tuple[str, ...] | None = None
    if len(symbols) == 1 and symbols[0].isdigit():  # --symbols N: many symbols from the default capture
        market, symbols = int(symbols[0]), SimulatorOptions.symbols
    if args.market_symbols:
        market = tuple(s.strip().upper() for s in args.market_symbols.split(",") if s.strip())
        if market and market[0].isdigit():
            raise SystemExit("--market-symbols takes symbol names; use --symbols N for a number of symbols")
    return SimulatorOptions(
        speed=args.speed, loop=args.loop, shift_to_now=args.shift_to_now, max_trades=args.max_trades,
        symbols=symbols, market_symbols=market, start=args.start,
        wait_for_streams=tuple(args.wait_for), book_ticker=not args.no_book_ticker,
        kline_throttle_ms=args.kline_throttle_ms, data_dir=args.data_dir,
        exchange_info_symbols=None if args.all_symbols else DEFAULT_EXCHANGE_INFO_SYMBOLS,
        weight_limit=args.weight_limit, weight_window_s=args.weight_window, ban_after_429s=args.ban_after,
        ban_s=args.ban_seconds, history=not args.no_history,
        venues=tuple(args.venue), rate=args.rate)


async def serve(args: argparse.Namespace) -> None:
    sim = Simulator(options_of(args))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await sim.start(args.host, args.port, access_log=args.access_log)
    try:
        await stop.wait()
    finally:
        logging.getLogger("simulator").info("stopping: %s", {k: v for k, v in sim.status().items()
                                                                       if k in ("state", "trades_replayed",
                                                                                "messages_sent", "loops_done")})
        await sim.stop()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=os.environ.get("MDP_LOG_LEVEL", "INFO").upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s simulator[%(process)d] %(name)s: %(message)s")
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args))
    else:
        uvloop.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
