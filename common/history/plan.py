"""What a backfill will fetch, before it fetches anything: the requested span minus what the ledger already
knows, cut into pages, and what the exchange cannot give (history caps).

Exchanges differ in how much history REST serves: candles per request, how far back, whether a minute without
trades has a candle. The venue table (common/exchanges/venues.py, `ExchangeHistory`) holds it per exchange;
docs/backfill.md ("Per exchange") tabulates it.

For a capped exchange the plan says so (`notices`), fetches what exists and records the older part of the
requested span as 'unfetchable' in the ledger (`unfetchable`, with `unfetchable_evidence`): not empty (the
market traded then) and not a hole (no request can fill it). The live collector records forward from now
on, so the range does not grow.

`plan_backfill` is pure (no network, no database): tests and `mdp backfill --plan` use it as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from common.domain.span import Span, ceil_to, intersect, iso, subtract, timeframe_ns, total
from common.exchanges.venues import ExchangeHistory, venue


def history_of(exchange_id: str) -> ExchangeHistory:
    """How `exchange_id` serves historical candles (the venue table, common/exchanges/venues.py)."""
    return venue(exchange_id).history


@dataclass(frozen=True, slots=True)
class Page:
    """One request's worth of time: candles opening in `span` (at most `page_limit` of them)."""

    span: Span


@dataclass
class BackfillPlan:
    exchange: str
    symbol: str
    timeframe: str
    requested: Span
    fetchable: Span | None  # the part of `requested` the exchange still has (None: nothing)
    todo: list[Span]  # fetchable minus what the ledger knows, sorted
    pages: list[Page]
    step_ns: int
    notices: list[str] = field(default_factory=list)
    unfetchable: Span | None = None  # the part of `requested` older than the exchange keeps
    unfetchable_evidence: dict[str, Any] = field(default_factory=dict)

    @property
    def candles_todo(self) -> int:
        return total(self.todo) // self.step_ns

    @property
    def candles_known(self) -> int:
        fetchable = [self.fetchable] if self.fetchable else []
        return (total(fetchable) - total(self.todo)) // self.step_ns

    @property
    def candles_unfetchable(self) -> int:
        fetchable = [self.fetchable] if self.fetchable else []
        return (self.requested.duration - total(fetchable)) // self.step_ns

    def describe(self) -> str:
        return (f"{self.exchange} {self.symbol} {self.timeframe} {self.requested}: "
                f"{self.candles_todo:,} candles to fetch in {len(self.pages):,} requests, "
                f"{self.candles_known:,} already in the ledger"
                + (f", {self.candles_unfetchable:,} beyond the exchange's history" if self.candles_unfetchable
                   else ""))


def plan_backfill(exchange: str, symbol: str, timeframe: str, requested: Span, now_ns: int,
                  known: list[Span] | None = None, page_limit: int | None = None) -> BackfillPlan:
    """The pages to fetch for `requested`, skipping `known` (covered or known-empty ranges of the ledger).

    Pages start at the start of each range to fetch and hold `page_limit` candle slots each, so one request
    per page answers for the whole page (the last one may be shorter)."""
    history = history_of(exchange)
    step = timeframe_ns(timeframe)
    limit = min(page_limit or history.page_limit, history.page_limit)
    notices: list[str] = []
    fetchable: Span | None = requested
    unfetchable: Span | None = None
    evidence: dict[str, Any] = {}
    if history.depth_candles is not None:
        oldest = ceil_to(now_ns - history.depth_candles * step, step)
        notices.append(
            f"{exchange} {history.note}: the oldest {timeframe} candle it still has opens about {iso(oldest)}; "
            f"older history does not exist on the exchange and cannot be fetched there. Fetching what exists; "
            f"the live collector records {symbol} forward from now (docs/backfill.md, 'Per exchange').")
        if oldest > requested.start:
            unfetchable = Span(requested.start, min(oldest, requested.end))
            fetchable = Span(oldest, requested.end) if oldest < requested.end else None
            notices.append(f"{unfetchable.duration // step:,} of the {requested.duration // step:,} "
                           f"requested {timeframe} candles ({iso(unfetchable.start)} .. {iso(unfetchable.end)}) "
                           f"are older than that: recorded as unfetchable in the ledger (`mdp coverage` shows "
                           f"them)")
            # Stable across runs (no times in it), so a rerun that extends the range keeps one evidence entry.
            evidence = {"kind": "exchange_history_cap",
                        "reason": f"{exchange} {history.note}: older {timeframe} candles do not exist there",
                        "cap_candles": history.depth_candles}
    if history.sparse:
        notices.append(f"{exchange} makes no {timeframe} candle for an interval without trades: such intervals "
                       f"are recorded as known empty, with the request as evidence")
    todo = subtract(intersect([fetchable], fetchable) if fetchable else [], known or [])
    pages = [Page(Span(t, min(t + limit * step, span.end)))
             for span in todo for t in range(span.start, span.end, limit * step)]
    return BackfillPlan(exchange, symbol, timeframe, requested, fetchable, todo, pages, step, notices,
                        unfetchable, evidence)


__all__ = ["BackfillPlan", "Page", "history_of", "plan_backfill"]
