"""`mdp export`: stored candles or trades to Parquet (or CSV) files, one per UTC day (docs/export.md).

    mdp export --exchange binance --symbol BTC/USDT --kind candles --timeframe 1m \\
               --start 2024-08-01 --end 2024-09-01 --out exports
    mdp export --exchange binance --symbol BTC/USDT --kind trades --start 2024-08-08 --end 2024-08-10 \\
               --out exports --format csv

Files: OUT/{kind}/exchange=../symbol=..[/timeframe=..]/date=YYYY-MM-DD/part.{parquet|csv}, the symbol
percent-encoded (BTC%2FUSDT). Safe to kill at any moment: a day's file appears whole or not at all, and the
same command resumes, skipping the days already complete. Exit status: 0 done, 1 a store failed, 2 bad
arguments or a value the format cannot hold exactly, 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

from common.config import load_settings


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("export", help="stored candles or trades to Parquet/CSV files (see docs/export.md)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=argparse.SUPPRESS, help="config file (also accepted before the command)")
    p.add_argument("--exchange", required=True, help="exchange id as stored, e.g. binance")
    p.add_argument("--symbol", required=True, help="unified symbol as stored, e.g. BTC/USDT")
    p.add_argument("--kind", required=True, choices=("candles", "trades"))
    p.add_argument("--timeframe", help="candles only: a stored timeframe (1m, 5m, 15m, 1h, 4h, 1d; default 1m)")
    p.add_argument("--start", required=True, help="first instant, ISO 8601 UTC: 2024-08-08 or 2024-08-08T12:00:00Z")
    p.add_argument("--end", help="end, exclusive, ISO 8601 UTC (default: now)")
    p.add_argument("--out", required=True, type=Path, help="folder to write into (created if missing)")
    p.add_argument("--format", dest="fmt", default="parquet", choices=("parquet", "csv"))
    p.add_argument("--force", action="store_true", help="write again the days that already have a complete file")
    p.add_argument("--page-rows", type=int, default=10_000, help="rows per InfluxDB request (default 10000)")
    p.add_argument("--json", action="store_true", help="print the final summary as JSON (with every day's file)")
    bar = p.add_mutually_exclusive_group()
    bar.add_argument("--progress", dest="progress", action="store_true", default=None,
                     help="draw the progress line even when stderr is not a terminal")
    bar.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=main)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # SIGTERM like Ctrl-C: the day being written is dropped, finished ones stay


def main(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return asyncio.run(run(args))
    except KeyboardInterrupt:
        print("interrupted: the days written are complete; run the same command again to resume", file=sys.stderr)
        return 130


async def run(args: argparse.Namespace) -> int:
    from common.errors import StoreUnavailable
    from common.history.api import HistoryRangeError, to_ns
    from common.history.export import ExportError, ExportRequest, export

    # The progress line of `mdp backfill`, reused as it is (a command may import a service's module; the
    # engine in common/history/export.py takes any object with update/finish/label).
    from common.history.progress import Progress
    from common.stores.influx import InfluxClient, InfluxError

    settings = load_settings(getattr(args, "config", None))
    timeframe = args.timeframe or ("1m" if args.kind == "candles" else None)
    try:
        start = to_ns(args.start, "--start")
        end = to_ns(args.end, "--end") if args.end else time.time_ns()
        request = ExportRequest(args.kind, args.exchange, args.symbol, timeframe, start, end, args.out, args.fmt,
                                args.force, args.page_rows)
        request.check()
    except (HistoryRangeError, ExportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    progress = Progress(0, f"export {args.kind} {args.symbol}", enabled=args.progress, unit="days")
    async with InfluxClient(settings.influx) as client:
        progress.requests = lambda: client.requests
        try:
            stats = await export(request, client, progress=progress,
                                 say=lambda line: print(line, file=sys.stderr, flush=True))
        except ExportError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except (StoreUnavailable, InfluxError) as exc:
            print(f"error: {exc}; the days written so far are complete, run the same command again to resume",
                  file=sys.stderr)
            return 1
    print(json.dumps(stats.to_dict()) if args.json else stats.summary(), flush=True)
    return 0
