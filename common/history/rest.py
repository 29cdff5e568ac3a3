"""Fetching one page of history through the real ccxt `fetch_ohlcv`, under the shared rate budget.

A page is a time span of at most `page_limit` candle slots, asked for with startTime = the page's start and
endTime = its end - 1 ms, so one request normally answers for the whole page. What the answers prove:
- candles returned: the exchange has them (validated before they are stored);
- a missing open time between two returned candles, or before the first one returned for a startTime: the
  exchange has no candle there (it returns the first `limit` candles at or after startTime, in order);
- after the last candle returned: proven only by an answer with startTime just after it that returns
  nothing; such a confirming request is made (it is one more request for pages that end in a gap, e.g. an
  outage or the end of a market, and it also catches an exchange that returns fewer rows than asked) -
  except on exchanges whose answer holds every candle of the requested time range (`whole_range`: Coinbase's
  start..end of at most 300 buckets, Hyperliquid's startTime..endTime of at most 5,000): there the one
  answer proves the whole page, and a sparse market (Coinbase makes no candle for a minute without trades)
  costs no extra requests.
Each empty range is recorded with that evidence: the page, the requests, and the candles on either side.

Answers that are HTTP 200 but malformed (ccxt then returns rows of None, FACTS.md) are asked again up to
twice; what stays malformed goes to validation, which rejects it with an alert, and the minute stays a hole
in the ledger (a rerun fetches it again). Network errors and 5xx are retried `retries` times with backoff,
then `FetchError` stops the run (everything stored so far is in the ledger: a rerun resumes).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import ccxt

from common.backoff import Backoff
from common.domain.span import MS, Span, iso
from common.errors import MdpError
from common.exchanges.events import candle_event
from common.exchanges.ratelimit import BudgetedExchange, ExchangeBanned
from common.history.ingest import Batch, Checker, empty_evidence, gaps, rest_candle, runs
from common.history.ledger import Series
from schemas import Candle

log = logging.getLogger(__name__)

MALFORMED_RETRIES = 2


class FetchError(MdpError, RuntimeError):
    """A page could not be fetched after every retry; the message names the page, the request and the cause."""


class PageFetcher:
    def __init__(self, rest: BudgetedExchange, series: Series, step_ns: int, page_limit: int, weight: int,
                 checker: Checker, retries: int = 5, whole_range: bool = False, keep_received: bool = False) -> None:
        self.rest = rest
        self.series = series
        self.step = step_ns
        self.page_limit = page_limit
        self.weight = weight
        self.checker = checker
        self.retries = retries
        self.whole_range = whole_range
        self.keep_received = keep_received  # also return the rows as the collector's events (gap_repair)
        self.dropped_outside = 0
        self.malformed_retries = 0
        self.confirm_requests = 0

    async def _fetch(self, since_ns: int, until_ns: int, limit: int) -> list[list[Any]]:
        ex = self.rest.exchange
        s = self.series
        params = {"until": until_ns // MS - 1}
        backoff = Backoff(0.5, 30.0)
        for attempt in range(self.retries + 1):
            try:
                rows = await self.rest.call(self.weight, ex.fetch_ohlcv, s.symbol, s.timeframe,
                                            since=since_ns // MS, limit=limit, params=params)
                return list(rows or [])
            except ExchangeBanned:
                raise
            except (ccxt.NetworkError, ccxt.ExchangeNotAvailable) as exc:
                if attempt >= self.retries:
                    raise FetchError(
                        f"{ex.id} fetch_ohlcv {s.symbol} {s.timeframe} since {iso(since_ns)} limit {limit} "
                        f"failed {attempt + 1} times, last: {type(exc).__name__}: {str(exc)[:300]}. "
                        f"Everything stored so far is in the ledger; run the same command again to resume."
                    ) from exc
                delay = backoff.next()
                log.warning("%s fetch_ohlcv %s %s since %s failed (%s: %s); retry %d/%d in %.1f s", ex.id,
                            s.symbol, s.timeframe, iso(since_ns), type(exc).__name__, str(exc)[:200],
                            attempt + 1, self.retries, delay)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def page(self, span: Span) -> Batch:
        """Fetch, validate and describe one page: the candles to store, covered and empty ranges."""
        s, step = self.series, self.step
        raw: dict[int, list[Any]] = {}
        requests: list[str] = []
        cursor = span.start
        while cursor < span.end:
            limit = max(1, min(self.page_limit, (span.end - cursor) // step))
            rows = await self._fetch(cursor, span.end, limit)
            for extra in range(MALFORMED_RETRIES):
                if not any(r is None or any(v is None for v in r[:6]) for r in rows):
                    break
                self.malformed_retries += 1
                log.warning("%s answered %s %s since %s with malformed rows (None values); asking again "
                            "(%d/%d)", s.exchange, s.symbol, s.timeframe, iso(cursor), extra + 1,
                            MALFORMED_RETRIES)
                rows = await self._fetch(cursor, span.end, limit)
            requests.append(f"since={cursor // MS} until={span.end // MS - 1} limit={limit} -> {len(rows)} rows")
            got = 0
            for r in rows:
                if not r or r[0] is None:
                    continue
                t = int(r[0]) * MS
                if cursor <= t < span.end:
                    raw[t] = r
                    got += 1
                else:
                    self.dropped_outside += 1
            if not got or self.whole_range:
                break  # the exchange has nothing (more) in [cursor, span.end)
            cursor = max(raw) + step
            if cursor < span.end:
                self.confirm_requests += 1
        now_ns = time.time_ns()
        times = sorted(raw)
        clean = all(all(v is not None for v in raw[t][1:6]) for t in times)

        def live(i: int) -> Candle:  # what the collector would publish for row i: judged by the live rules
            return candle_event(s.exchange, s.symbol, s.timeframe, raw[times[i]], True, now_ns, "rest")

        if clean:
            candles = [rest_candle(s.exchange, s.symbol, s.timeframe, step, raw[t], now_ns) for t in times]
        else:
            candles = [live(i) for i in range(len(times))]
        checked = self.checker.check(candles, now_ns, canonical=clean, step_ns=step, live=live)
        empty = []
        for gap, before, after in gaps(span, times, step):
            empty.append((gap, empty_evidence(
                "rest_no_candles",
                f"{s.exchange} returned no {s.timeframe} candle opening in {gap} to fetch_ohlcv "
                f"(startTime/endTime bounded requests of this page)",
                before, after, page=str(span), requests=requests[-3:])))
        return Batch(series=s, candles=checked.stored, covered=runs((c.open_time for c in checked.stored), step),
                     empty=empty, alerts=checked.alerts, rejected=checked.rejected,
                     received=[live(i) for i in range(len(times))] if self.keep_received else [])


__all__ = ["FetchError", "PageFetcher"]
