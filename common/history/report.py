"""The coverage report of one series (what `mdp coverage` prints): shares of a window that are covered,
known empty, unfetchable (beyond the exchange's history cap) and holes, and the ranges in time order."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from common.domain.span import (
    Span,
    ceil_to,
    floor_to,
    intersect,
    iso,
    parse_when,
    subtract,
    timeframe_ns,
    total,
)
from common.history.ledger import Coverage, percent


@dataclass
class Entry:
    state: str  # covered | empty | unfetchable | hole
    span: Span
    sources: list[str] = field(default_factory=list)
    evidence: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class CoverageReport:
    coverage: Coverage
    window: Span | None
    step: int
    covered: int = 0  # candle slots
    covered_by_source: dict[str, int] = field(default_factory=dict)
    empty: int = 0
    unfetchable: int = 0
    holes: int = 0
    entries: list[Entry] = field(default_factory=list)

    @property
    def slots(self) -> int:
        return self.window.duration // self.step if self.window else 0

    def to_dict(self) -> dict[str, Any]:
        s = self.coverage.series
        return {
            "exchange": s.exchange, "symbol": s.symbol, "timeframe": s.timeframe,
            "window": [iso(self.window.start), iso(self.window.end)] if self.window else None,
            "candles": self.slots, "covered": self.covered, "covered_by_source": self.covered_by_source,
            "empty": self.empty, "unfetchable": self.unfetchable, "holes": self.holes,
            "covered_pct": round(percent(self.covered, self.slots), 4),
            "empty_pct": round(percent(self.empty, self.slots), 4),
            "unfetchable_pct": round(percent(self.unfetchable, self.slots), 4),
            "holes_pct": round(percent(self.holes, self.slots), 4),
            "ranges": [{"state": e.state, "start": iso(e.span.start), "end": iso(e.span.end),
                        "sources": e.sources, "evidence": e.evidence} for e in self.entries],
        }


def coverage_report(cov: Coverage, since: str | None, until: str | None, now_ns: int) -> CoverageReport:
    step = timeframe_ns(cov.series.timeframe)
    extent = cov.extent()
    if since or until:
        start = floor_to(parse_when(since, now_ns, "--since"), step) if since else (extent.start if extent else
                                                                                     floor_to(now_ns, step))
        end = ceil_to(parse_when(until, now_ns, "--until"), step) if until else floor_to(now_ns, step)
        window = Span(start, end) if end > start else None
    else:
        window = extent
    report = CoverageReport(cov, window, step)
    if window is None:
        return report
    covered = intersect(cov.covered_all(), window)
    empty = subtract(intersect(cov.empty_all(), window), covered)
    unfetchable = subtract(intersect(cov.unfetchable_all(), window), [*covered, *empty])
    holes = subtract([window], [*covered, *empty, *unfetchable])
    report.covered = total(covered) // step
    report.covered_by_source = {src: total(intersect(spans, window)) // step for src, spans in cov.covered.items()}
    report.empty = total(empty) // step
    report.unfetchable = total(unfetchable) // step
    report.holes = total(holes) // step
    for span in covered:
        sources = sorted(src for src, spans in cov.covered.items() if intersect(spans, span))
        report.entries.append(Entry("covered", span, sources))
    for e in cov.empty:
        for piece in subtract(intersect([e.span], window), covered):
            report.entries.append(Entry("empty", piece, [e.source], list(e.evidence)))
    for e in cov.unfetchable:
        for piece in subtract(intersect([e.span], window), [*covered, *empty]):
            report.entries.append(Entry("unfetchable", piece, [e.source], list(e.evidence)))
    report.entries.extend(Entry("hole", h) for h in holes)
    report.entries.sort(key=lambda e: (e.span.start, e.state))
    return report


def render(report: CoverageReport, max_ranges: int = 20) -> str:
    s = report.coverage.series
    if report.window is None:
        return f"{s}: nothing recorded in the window"
    n = report.slots
    kinds = {k: sum(1 for e in report.entries if e.state == k) for k in ("covered", "empty", "unfetchable", "hole")}
    by_source = ", ".join(f"{src} {v:,}" for src, v in sorted(report.covered_by_source.items()) if v)
    lines = [
        f"{s}  {iso(report.window.start)} .. {iso(report.window.end)}  ({n:,} candles)",
        f"  covered {percent(report.covered, n):8.3f}%  {report.covered:,} candles in {kinds['covered']} "
        f"range(s)" + (f" ({by_source})" if by_source else ""),
        (f"  empty   {percent(report.empty, n):8.3f}%  {report.empty:,} candles in {kinds['empty']} range(s), "
         f"known empty at the source"),
        (f"  holes   {percent(report.holes, n):8.3f}%  {report.holes:,} candles in {kinds['hole']} range(s), "
         f"never fetched or rejected"),
    ]
    if report.unfetchable:
        lines.insert(3, f"  unfetchable {percent(report.unfetchable, n):4.3f}%  {report.unfetchable:,} candles in "
                        f"{kinds['unfetchable']} range(s), older than the exchange keeps (not fetchable)")
    for e in report.entries[:max_ranges]:
        line = f"    {e.state:<11} {e.span}"
        if e.sources:
            line += f"  {','.join(e.sources)}"
        if e.evidence:
            first = e.evidence[0]
            line += f": {first.get('reason', first)}"
            if len(e.evidence) > 1:
                line += f" (+{len(e.evidence) - 1} more evidence)"
        lines.append(line)
    if len(report.entries) > max_ranges:
        lines.append(f"    ... {len(report.entries) - max_ranges} more range(s); --ranges N shows more")
    return "\n".join(lines)
