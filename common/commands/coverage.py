"""`mdp coverage`: what the coverage ledger knows, per exchange, symbol and timeframe.

    mdp coverage [--exchange binance] [--symbol BTC/USDT] [--timeframe 1m] [--since 2y] [--until DATE] [--json]

For each series: the window (from --since/--until, else first to last recorded time), the share of it that is
covered (by source), known empty (with the evidence) and holes, then the ranges in time order (merged; at most
--ranges of them, the rest counted).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from common.config import load_settings


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("coverage", help="covered, known-empty and missing ranges of stored history",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=argparse.SUPPRESS, help="config file (also accepted before the command)")
    p.add_argument("--exchange")
    p.add_argument("--symbol")
    p.add_argument("--timeframe")
    p.add_argument("--since", help="window start: a date or a duration back from now (default: first recorded)")
    p.add_argument("--until", help="window end (default: last recorded, or now with --since)")
    p.add_argument("--ranges", type=int, default=20, help="ranges listed per series at most (default 20)")
    p.add_argument("--json", action="store_true", help="one JSON object per series")
    p.set_defaults(func=run)


async def run(args: argparse.Namespace) -> int:
    from services.backfill.ledger import Ledger
    from services.backfill.report import coverage_report, render

    settings = load_settings(getattr(args, "config", None))
    ledger = await Ledger.connect(settings.postgres.dsn, migrate_first=False)  # read-only
    try:
        series = await ledger.series(args.exchange, args.symbol, args.timeframe)
        if not series:
            print("the coverage ledger holds nothing" + (" for that selection" if
                  (args.exchange or args.symbol or args.timeframe) else "; run `mdp backfill` or `mdp import`"))
            return 0
        now_ns = time.time_ns()
        for s in series:
            report = coverage_report(await ledger.coverage(s), args.since, args.until, now_ns)
            print(json.dumps(report.to_dict()) if args.json else render(report, args.ranges))
    finally:
        await ledger.close()
    return 0
