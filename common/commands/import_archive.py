"""`mdp import`: load Binance public kline archives (data.binance.vision zips) into InfluxDB and the ledger.

    mdp import --symbol BTC/USDT --timeframe 1m --from 2020-01-01 --to 2020-12-31 [--base-url URL]
    mdp import BTCUSDT-1m-2020-01-01.zip BTCUSDT-1m-2020-01.zip        # local files (+ FILE.CHECKSUM beside)

Every zip is checked against its CHECKSUM (sha256) before it is read; a mismatch stops the import with an
error naming the file, and nothing of that file is written. Exit status: 0 done, 1 a file was refused or a
download failed (files before it are stored and recorded; rerun to continue), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import sys
from datetime import date
from pathlib import Path
from typing import Any

from common.config import load_settings


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "import", help="load data.binance.vision kline archives (verified by CHECKSUM)",
        description="Import Binance spot kline archives, daily and monthly zips, millisecond or microsecond "
                    "timestamps, from a data.binance.vision-compatible URL or local files.")
    p.add_argument("--config", default=argparse.SUPPRESS, help="config file (also accepted before the command)")
    p.add_argument("files", nargs="*", type=Path, help="local archive zips (their .CHECKSUM files beside them)")
    p.add_argument("--symbol", help="unified symbol (BTC/USDT) or Binance id (BTCUSDT)")
    p.add_argument("--timeframe", default="1m", help="kline interval of the archives (default 1m)")
    p.add_argument("--from", dest="start", type=date.fromisoformat, help="first day, YYYY-MM-DD (UTC)")
    p.add_argument("--to", dest="end", type=date.fromisoformat, help="last day, inclusive, YYYY-MM-DD (UTC)")
    p.add_argument("--base-url", help="archive base URL (default: backfill.archive_url, or data.binance.vision "
                                      "rewritten like exchanges[binance].rest_url)")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="import local files that have no CHECKSUM (never for downloads you did not check)")
    p.add_argument("--force", action="store_true", help="import files the ledger already covers")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """Runs on uvloop (like the services): the event loop's own cost is a visible share of a fast backfill."""
    import uvloop

    return uvloop.run(run(args))


async def run(args: argparse.Namespace) -> int:
    from common.history.archive import ArchiveError
    from common.history.backfill import ImportRequest, run_import

    settings = load_settings(getattr(args, "config", None))
    if not args.files and (args.symbol is None or args.start is None or args.end is None):
        print("error: give archive files, or --symbol, --from and --to", file=sys.stderr)
        return 2
    if args.start and args.end and args.end < args.start:
        print(f"error: --to {args.end} is before --from {args.start}", file=sys.stderr)
        return 2
    request = ImportRequest(symbol=args.symbol, timeframe=args.timeframe, start=args.start, end=args.end,
                            files=list(args.files), base_url=args.base_url, verify=args.verify,
                            force=args.force, progress=args.progress)
    try:
        stats = await run_import(settings, request, say=lambda line: print(line, flush=True))
    except (ArchiveError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"imported {stats.files} file(s): {stats.candles:,} candles stored, {stats.empty_candles:,} known "
          f"empty, {stats.rejected:,} rejected, in {stats.elapsed_s:.1f} s", flush=True)
    return 0
