"""Does InfluxDB hold what the coverage ledger says is covered? The ledger is checked against the store.

The ledger lives in PostgreSQL, the candles in InfluxDB: a new, wiped or different InfluxDB (or a tier whose
data was dropped) leaves the ledger claiming candles the store does not hold, and a backfill that trusted it
would say "nothing to fetch" over an empty store (issue 10, defect 6). So before a span marked covered is
skipped, the store is asked:

1. one query per series and window: the number of stored candles per UTC day
   (`SELECT count(close) ... GROUP BY time(1d)`, cheap: two years of 1m candles is 730 rows);
2. a day whose count equals the covered candles the ledger claims for it, and which the ledger knows whole
   (covered, known empty or unfetchable: no stored candle can sit in a slot the ledger does not claim), is
   held; a day with no stored candle misses all of its covered slots;
3. any other day (a partial count, or a day the ledger knows only in part) is looked at candle by candle
   (its open times, at most one day of rows) and its covered slots without a stored candle are missing.

Only covered spans are checked: known-empty and unfetchable spans are what the exchange proved, not claims
about the store. Covered spans older than the storage tier keeps are not checked (InfluxDB dropped them by
design, and a backfill does not fetch them: common/history/ingest.retention_cutoff). A database or
retention policy that does not exist holds nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from common.domain.span import Span, ceil_to, floor_to, intersect, iso, merge, subtract, total
from common.domain.span import timeframe_ns as step_of
from common.history.ingest import retention_cutoff, runs
from common.history.ledger import Coverage, Series
from common.stores.influx import InfluxClient, InfluxError

DAY_NS = 86_400 * 1_000_000_000


@dataclass
class Verdict:
    """Ledger against store for one series in `window`: the covered spans InfluxDB does not hold."""

    series: Series
    window: Span | None  # the covered hull checked (None: the ledger covers nothing there)
    step: int
    covered: int = 0  # candles the ledger marks covered in the window
    missing: list[Span] = field(default_factory=list)  # covered in the ledger, absent from InfluxDB
    queries: int = 0

    @property
    def missing_candles(self) -> int:
        return total(self.missing) // self.step

    @property
    def agrees(self) -> bool:
        return not self.missing

    def describe(self, max_ranges: int = 10) -> str:
        s = self.series
        if self.agrees:
            return f"{s}: ledger and InfluxDB agree ({self.covered:,} covered candles held)"
        ranges = ", ".join(f"[{iso(m.start)}, {iso(m.end)})" for m in self.missing[:max_ranges])
        more = f" and {len(self.missing) - max_ranges} more range(s)" if len(self.missing) > max_ranges else ""
        return (f"{s}: DISAGREE: the ledger marks {self.covered:,} candles covered but InfluxDB is missing "
                f"{self.missing_candles:,} of them, in {ranges}{more}. Fix: `mdp backfill --exchange "
                f"{s.exchange} --symbol {s.symbol} --timeframe {s.timeframe} --since {iso(self.missing[0].start)}` "
                f"fetches them again and corrects the ledger.")

    def to_dict(self) -> dict[str, object]:
        s = self.series
        return {"exchange": s.exchange, "symbol": s.symbol, "timeframe": s.timeframe, "agrees": self.agrees,
                "covered": self.covered, "missing_candles": self.missing_candles,
                "missing": [[iso(m.start), iso(m.end)] for m in self.missing]}


def _absent(exc: InfluxError) -> bool:
    """The query's database or retention policy does not exist: it holds nothing."""
    text = f"{exc} {exc.body}".lower()
    return "database not found" in text or "retention policy not found" in text


async def _query(influx: InfluxClient, series: Series, select: str, window: Span) -> list[dict[str, object]]:
    try:
        return await influx.query_timeframe(
            series.timeframe,
            f"SELECT {select} FROM ohlcv WHERE exchange = $ex AND symbol = $sym AND timeframe = $tf AND "
            f"time >= $lo AND time < $hi" + (" GROUP BY time(1d)" if "count(" in select else ""),
            {"ex": series.exchange, "sym": series.symbol, "tf": series.timeframe, "lo": window.start,
             "hi": window.end})
    except InfluxError as exc:
        if _absent(exc):
            return []
        raise


async def verify_coverage(influx: InfluxClient, coverage: Coverage, now_ns: int,
                          window: Span | None = None) -> Verdict:
    """The covered spans of `coverage` (inside `window`) that InfluxDB does not hold (module docstring)."""
    series = coverage.series
    step = step_of(series.timeframe)
    covered = coverage.covered_all()
    if window is not None:
        covered = intersect(covered, window)
    cutoff, _tier = retention_cutoff(influx, series.timeframe, now_ns)
    if cutoff is not None and covered and covered[0].start < ceil_to(cutoff, step):
        covered = subtract(covered, [Span(covered[0].start, ceil_to(cutoff, step))])
    verdict = Verdict(series, None, step)
    if not covered:
        return verdict
    verdict.window = Span(covered[0].start, covered[-1].end)
    verdict.covered = total(covered) // step
    known = coverage.known()
    days = Span(floor_to(verdict.window.start, DAY_NS), ceil_to(verdict.window.end, DAY_NS))
    rows = await _query(influx, series, "count(close)", days)
    verdict.queries += 1
    counts = {int(r["time"]): int(r.get("count") or 0) for r in rows}  # type: ignore[call-overload]
    missing: list[Span] = []
    for day_start in range(days.start, days.end, DAY_NS):
        day = Span(day_start, day_start + DAY_NS)
        claimed = intersect(covered, day)
        if not claimed:
            continue
        have = counts.get(day_start, 0)
        if have == 0:
            missing.extend(claimed)
            continue
        if have == total(claimed) // step and not subtract([day], known):
            continue
        stored = await _query(influx, series, "open", Span(claimed[0].start, claimed[-1].end))
        verdict.queries += 1
        missing.extend(subtract(claimed, runs((int(r["time"]) for r in stored), step)))  # type: ignore[call-overload]
    verdict.missing = merge(missing)
    return verdict


__all__ = ["Verdict", "verify_coverage"]
