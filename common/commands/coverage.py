"""`mdp coverage`: what the coverage ledger knows, per exchange, symbol and timeframe.

    mdp coverage [--exchange binance] [--symbol BTC/USDT] [--timeframe 1m] [--since 2y] [--until DATE] [--json]
    mdp coverage --verify [...]   # also ask InfluxDB whether it holds what the ledger marks covered

For each series: the window (from --since/--until, else first to last recorded time), the share of it that is
covered (by source), known empty (with the evidence) and holes, then the ranges in time order (merged; at most
--ranges of them, the rest counted).

The ledger (PostgreSQL) records what was stored; it does not see InfluxDB being wiped or replaced. With
--verify each series is checked against the store (a count per day, candle by candle where a day disagrees:
common/history/verify.py) and the report says, per series, whether they agree or which covered ranges
InfluxDB is missing (N candles in [from, to)). Exit status: 0 when every series agrees (or without --verify),
1 when ledger and store disagree on any series (`mdp backfill` over the range fetches them again and corrects
the ledger), 2 when InfluxDB cannot be asked (unreachable).
"""

from __future__ import annotations

import argparse
import json
import sys
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
    p.add_argument("--verify", action="store_true",
                   help="check the ledger's covered ranges against InfluxDB; exit 1 where they disagree")
    p.set_defaults(func=run)


async def run(args: argparse.Namespace) -> int:
    from common.errors import StoreUnavailable
    from common.history.ledger import Ledger
    from common.history.report import coverage_report, render
    from common.history.verify import verify_coverage
    from common.stores.influx import InfluxClient

    settings = load_settings(getattr(args, "config", None))
    ledger = await Ledger.connect(settings.postgres.dsn, migrate_first=False)  # read-only
    try:
        series = await ledger.series(args.exchange, args.symbol, args.timeframe)
        if not series:
            print("the coverage ledger holds nothing" + (" for that selection" if
                  (args.exchange or args.symbol or args.timeframe) else "; run `mdp backfill` or `mdp import`"))
            return 0
        now_ns = time.time_ns()
        disagree = 0
        async with InfluxClient(settings.influx) as influx:
            for s in series:
                cov = await ledger.coverage(s)
                report = coverage_report(cov, args.since, args.until, now_ns)
                out = report.to_dict()
                verdict = None
                if args.verify:
                    try:
                        verdict = await verify_coverage(influx, cov, now_ns, report.window)
                    except StoreUnavailable as exc:
                        print(f"error: cannot verify {s} against InfluxDB: {exc}", file=sys.stderr)
                        return 2
                    disagree += not verdict.agrees
                    out["verify"] = verdict.to_dict()
                if args.json:
                    print(json.dumps(out))
                else:
                    print(render(report, args.ranges))
                    if verdict is not None:
                        print(f"  verify: {verdict.describe(args.ranges)}")
        if not args.verify and not args.json:
            print("(the ledger's view; `mdp coverage --verify` checks it against what InfluxDB holds)")
        if disagree:
            print(f"{disagree} series: the ledger marks candles covered that InfluxDB "
                  f"({settings.influx.url}, database {settings.influx.database}) does not hold", file=sys.stderr)
            return 1
    finally:
        await ledger.close()
    return 0
