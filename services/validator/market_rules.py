"""Stateless rules for the snapshot channels the collector publishes beside trades and candles: order books,
funding rates and open interest. Same machinery as common.domain.quality (a Rule per check, reject policy), and
the same time rules (`time.invalid`, `time.future`) extended to these kinds.

  book.crossed          best bid >= best ask: a book built wrongly; never forwarded (the collector also refuses
                        to publish one and resyncs, so this firing means a producer other than ours, or a bug)
  book.levels           a level with a non-positive or non-finite price or amount, bids not strictly
                        descending or asks not strictly ascending, more levels than the stated depth
  funding.numeric       no funding rate, mark or index price at all, a non-finite one, or a mark/index <= 0
                        (a funding rate may be negative)
  open_interest.numeric amount missing, non-finite or negative (zero is real on a new market)
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable
from decimal import Decimal
from typing import TypeGuard

from common.domain import quality
from common.domain.quality import CheckContext, Issue, Rule
from schemas import Event, FundingRate, OpenInterest, OrderBook

SNAPSHOT_KINDS = frozenset({"book", "funding", "open_interest"})


def _finite(value: Decimal | None) -> TypeGuard[Decimal]:
    return value is not None and value.is_finite()


def _book_crossed(event: Event, ctx: CheckContext) -> Iterable[Issue]:
    assert isinstance(event, OrderBook)
    if event.bids and event.asks and event.bids[0][0] >= event.asks[0][0]:
        yield ((f"{quality.describe(event)} at sequence {event.sequence} is crossed: best bid {event.bids[0][0]} "
               f">= best ask {event.asks[0][0]}; rejected. The book was built from a missed or reordered diff; "
               f"the producer must rebuild it from a fresh snapshot."),
               {"best_bid": quality.text(event.bids[0][0]), "best_ask": quality.text(event.asks[0][0]),
                "sequence": None if event.sequence is None else str(event.sequence)})


def _book_levels(event: Event, ctx: CheckContext) -> Iterable[Issue]:
    assert isinstance(event, OrderBook)
    problems: list[str] = []
    for side, levels, descending in (("bid", event.bids, True), ("ask", event.asks, False)):
        for price, amount in levels:
            if not (_finite(price) and _finite(amount)) or price <= 0 or amount <= 0:
                problems.append(f"{side} level [{price}, {amount}] is not a positive price and amount")
                break
        prices = [p for p, _ in levels]
        ordered = all((a > b) if descending else (a < b) for a, b in itertools.pairwise(prices))
        if not ordered:
            problems.append(f"{side}s are not strictly {'descending' if descending else 'ascending'} by price")
        if len(levels) > event.depth:
            problems.append(f"{len(levels)} {side} levels exceed the stated depth {event.depth}")
    if problems:
        yield (f"{quality.describe(event)} is not a usable book ({'; '.join(problems)}); rejected.",
               {"problems": "; ".join(problems), "bids": str(len(event.bids)), "asks": str(len(event.asks))})


def _funding_numeric(event: Event, ctx: CheckContext) -> Iterable[Issue]:
    assert isinstance(event, FundingRate)
    values = {"funding_rate": event.funding_rate, "mark_price": event.mark_price, "index_price": event.index_price}
    present = {k: v for k, v in values.items() if v is not None}
    bad = {k: v for k, v in present.items() if not v.is_finite()}
    bad |= {k: v for k in ("mark_price", "index_price") if _finite(v := values[k]) and v <= 0}
    if not present or bad:
        what = ", ".join(f"{k}={quality.text(v)}" for k, v in (bad or values).items())
        yield ((f"{quality.describe(event)} has no usable funding numbers ({what}); rejected. Prices must be > 0 "
               f"and every value finite."), {k: quality.text(v) for k, v in values.items()})


def _open_interest_numeric(event: Event, ctx: CheckContext) -> Iterable[Issue]:
    assert isinstance(event, OpenInterest)
    if not _finite(event.amount) or event.amount < 0:
        yield ((f"{quality.describe(event)} has amount={quality.text(event.amount)}; open interest must be a "
               f"number >= 0; rejected."), {"amount": quality.text(event.amount),
                                            "value": quality.text(event.value)})


MARKET_RULES: tuple[Rule, ...] = (
    Rule("book.crossed", "error", "reject", frozenset({"book"}), "best bid >= best ask", _book_crossed),
    Rule("book.levels", "error", "reject", frozenset({"book"}),
         "a level <= 0, unsorted sides, more levels than the depth", _book_levels),
    Rule("funding.numeric", "error", "reject", frozenset({"funding"}),
         "no usable funding rate / mark / index, or a price <= 0", _funding_numeric),
    Rule("open_interest.numeric", "error", "reject", frozenset({"open_interest"}),
         "open interest missing or < 0", _open_interest_numeric),
    dataclasses.replace(quality.RULES_BY_NAME["time.invalid"], kinds=SNAPSHOT_KINDS),
    dataclasses.replace(quality.RULES_BY_NAME["time.future"], kinds=SNAPSHOT_KINDS),
)

VALIDATOR_RULES: tuple[Rule, ...] = (*quality.RULES, *MARKET_RULES)
