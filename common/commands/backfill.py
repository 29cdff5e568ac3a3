"""`mdp backfill`: fetch history through ccxt into InfluxDB, resumable, recorded in the coverage ledger.

    mdp backfill --exchange binance --symbol BTC/USDT --timeframe 1m --since 2y [--until 2024-01-01]
    mdp backfill --exchange binance --symbol BTC/USDT --symbol ETH/USDT --timeframe 1m --timeframe 1h --since 90d
    mdp backfill --exchange hyperliquid --symbol BTC/USDC:USDC --since 2y --plan   # what it would do, no fetch

Exit status: 0 done (or nothing to do), 1 a fetch failed after its retries, the exchange banned us or InfluxDB
is unavailable (what was stored is recorded: run the same command again to resume), 2 bad arguments, 130 interrupted (SIGINT/SIGTERM).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import ccxt

from common.config import load_settings
from common.exchanges.ratelimit import ExchangeBanned


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "backfill", help="fetch history (resumable; see docs/backfill.md)",
        description="Fetch historical candles with ccxt fetch_ohlcv at the exchange's rate limit, validate them "
                    "like live data, store them in InfluxDB and record them in the coverage ledger. Safe to kill "
                    "at any moment: the same command resumes where it stopped.")
    p.add_argument("--config", default=argparse.SUPPRESS, help="config file (also accepted before the command)")
    p.add_argument("--exchange", required=True, help="ccxt exchange id, e.g. binance")
    p.add_argument("--symbol", action="append", required=True, help="unified symbol, e.g. BTC/USDT (repeatable)")
    p.add_argument("--timeframe", action="append", help="ccxt timeframe (repeatable; default 1m)")
    p.add_argument("--since", required=True, help="start: a date (2024-01-01) or a duration back from now (2y, 90d)")
    p.add_argument("--until", help="end (exclusive): a date or a duration back from now (default: now)")
    p.add_argument("--concurrency", type=int, help="pages in flight (default backfill.concurrency)")
    p.add_argument("--plan", action="store_true", help="print what would be fetched and stop")
    p.add_argument("--json", action="store_true", help="print the final summary as JSON")
    bar = p.add_mutually_exclusive_group()
    bar.add_argument("--progress", dest="progress", action="store_true", default=None,
                     help="draw the progress line even when stderr is not a terminal")
    bar.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """Runs on uvloop (like the services): the event loop's own cost is a visible share of a fast backfill."""
    import uvloop

    return uvloop.run(run(args))


async def run(args: argparse.Namespace) -> int:
    from common.domain.span import SpanError
    from common.errors import StoreUnavailable
    from common.history.archive import ArchiveError
    from common.history.backfill import BackfillRequest, run_backfill
    from common.history.rest import FetchError

    settings = load_settings(getattr(args, "config", None))
    request = BackfillRequest(exchange=args.exchange, symbols=args.symbol, timeframes=args.timeframe or ["1m"],
                              since=args.since, until=args.until, concurrency=args.concurrency,
                              plan_only=args.plan, progress=args.progress)
    try:
        stats = await run_backfill(settings, request, say=lambda line: print(line, flush=True))
    except (SpanError, ArchiveError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (FetchError, ExchangeBanned, StoreUnavailable) as exc:  # StoreUnavailable: InfluxDB down
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except ccxt.BaseError as exc:  # a refusal that retrying does not cure: bad symbol, timeframe, auth, ...
        print(f"error: {args.exchange} refused the request ({type(exc).__name__}: {str(exc)[:500]}); check "
              f"--symbol / --timeframe against the exchange's markets. What was stored is in the ledger.",
              file=sys.stderr)
        return 1
    if not args.plan and any(p.pages for p in stats.plans):
        print(json.dumps({k: v for k, v in vars(stats).items() if k != "plans"}) if args.json else stats.summary(),
              flush=True)
    return 130 if stats.interrupted else 0
