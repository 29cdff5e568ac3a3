"""`mdp validate FILE --format FORMAT [--json]`: judge a candle file by the pipeline's data-quality rules.

Reads one of the formats of common.domain.formats, runs common.domain.quality_frame.validate_frame over it and prints,
per rule, the count and the first open times (ISO UTC); with --json, ONE JSON object:

    {"file", "format", "rows", "timeframe", "issues": [{"rule", "severity", "timestamp", "row", ...values}],
     "summary": {rule: count}, ...}

where `timestamp` is the candle's open time in epoch milliseconds (for time.gap: the first missing open
time) and `row` the 0-based data row of the file, so that any tool can score the findings.

Exit status: 0 when no finding has severity error, 1 when at least one does (a rejected candle: missing
values, non-positive prices, inconsistent OHLC, conflicting duplicates, ...), 2 when the file could not be
judged (bad usage, unknown format, a file that is not of the named format, a CHECKSUM mismatch).
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from typing import Any

from common.domain.formats import CandleFile, FormatError, known_formats, load_candles
from common.domain.quality_frame import FrameError, Report, validate_frame


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "validate", help="check a candle file (Binance, ccxt, Kraken, ... CSV or zip) against the quality rules",
        description="Check a candle file against the data-quality rules (docs/quality.md). Exit status: 0 no "
                    "error-severity finding, 1 at least one, 2 the file could not be judged.")
    p.add_argument("file", help="the candle file")
    p.add_argument("--format", required=True, metavar="FORMAT", help=f"one of: {known_formats()}")
    p.add_argument("--json", action="store_true", help="print one JSON object with every finding")
    p.add_argument("--timeframe", help="bar length (1m, 1h, 1d, ...); default: inferred from the open times")
    p.add_argument("--reference", metavar="FILE",
                   help="the same symbol on another venue, for price.cross_venue")
    p.add_argument("--reference-format", metavar="FORMAT", help="format of --reference (default: --format)")
    p.add_argument("--no-checksum", action="store_true", help="read a zip without its .CHECKSUM file")
    p.add_argument("--now", type=int, metavar="EPOCH_MS",
                   help="the time judged as 'now' by time.future (default: this host's clock)")
    p.add_argument("--first", type=int, default=5, metavar="N", help="open times shown per rule (text report)")
    p.set_defaults(func=run)


def iso_ms(ms: int) -> str:
    """Epoch ms as ISO-8601 UTC ('2024-03-01T16:39:00Z'; milliseconds shown only when not zero)."""
    try:
        dt = datetime.fromtimestamp(ms / 1000, tz=UTC)
    except (OverflowError, OSError, ValueError):
        return f"{ms} (out of range)"
    text = dt.strftime("%Y-%m-%dT%H:%M:%S")
    return f"{text}.{ms % 1000:03d}Z" if ms % 1000 else f"{text}Z"


def run(args: argparse.Namespace) -> int:
    try:
        if args.reference_format and not args.reference:
            raise FormatError("--reference-format was given without --reference FILE")
        candles = load_candles(args.file, args.format, verify=not args.no_checksum)
        timeframe = args.timeframe or candles.timeframe
        if timeframe is None:
            raise FormatError(f"{args.file}: cannot infer the timeframe from {candles.rows} open time(s); pass "
                              f"--timeframe (e.g. --timeframe 1m)")
        reference = None
        if args.reference:
            reference = load_candles(args.reference, args.reference_format or args.format,
                                     verify=not args.no_checksum)
            if reference.timeframe not in (None, timeframe):
                raise FormatError(f"--reference {args.reference} has {reference.timeframe} bars but the file is "
                                  f"judged as {timeframe}: compare the same timeframe on both venues")
        report = validate_frame(candles.frame, timeframe, now_ms=args.now,
                                reference=reference.frame if reference is not None else None)
    except (FormatError, FrameError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(to_json(candles, report, reference), allow_nan=False))
    else:
        print(render(candles, report, reference, first=args.first))
    return 1 if report.has_errors else 0


def to_json(candles: CandleFile, report: Report, reference: CandleFile | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "file": str(candles.path), "format": candles.format, "rows": candles.rows, "timeframe": report.timeframe,
        "inferred_timeframe": candles.timeframe, "time_unit": candles.time_unit, "symbol": candles.symbol,
        "checksum": candles.checksum, "stored_rows": len(report.stored),
        "reference": str(reference.path) if reference is not None else None,
        "issues": report.issues(), "summary": report.summary(),
    }
    return out


def render(candles: CandleFile, report: Report, reference: CandleFile | None = None, first: int = 5) -> str:
    t = candles.frame["open_time"]
    span = f"{iso_ms(int(t.min()))} .. {iso_ms(int(t.max()))}" if len(t) else "empty"
    header = (f"  format {candles.format}, {candles.rows} rows, timeframe {report.timeframe} (inferred "
              f"{candles.timeframe or '?'}), open times in {candles.time_unit}, {span}")
    lines = [f"{candles.path}", header]
    if candles.checksum:
        lines.append(f"  sha256 {candles.checksum} matches its .CHECKSUM")
    if reference is not None:
        lines.append(f"  cross-venue reference: {reference.path} ({reference.rows} rows)")
    rows = list(report.iter_findings())
    if not rows:
        lines.append(f"  no findings: all {report.rows} rows pass every rule; {len(report.stored)} would be stored")
        return "\n".join(lines)
    width = max(len(rule.name) for rule, _ in rows)
    lines.append(f"  {'rule':<{width}}  {'severity':<8}  {'policy':<6}  {'count':>6}  first open times")
    for rule, frame in rows:
        stamps = frame["timestamp"].sort_values().head(first)
        shown = ", ".join(iso_ms(int(s)) for s in stamps)
        more = ", ..." if len(frame) > first else ""
        lines.append(f"  {rule.name:<{width}}  {rule.severity:<8}  {rule.policy:<6}  {len(frame):>6}  {shown}{more}")
    errors = sum(len(f) for r, f in rows if r.severity in ("error", "critical"))
    total = sum(len(f) for _, f in rows)
    verdict = f"{errors} error finding(s): exit 1" if errors else "no error findings: exit 0"
    lines.append(f"  {total} finding(s); {len(report.stored)} of {report.rows} rows would be stored; {verdict}")
    lines.append("  (policies: reject = never stored, repair = fixed with an audit, flag = stored with the rule "
                 "in its quality, alert = reported; see docs/quality.md)")
    return "\n".join(lines)


__all__ = ["iso_ms", "register", "render", "run", "to_json"]
