"""The runs behind `mdp backfill` and `mdp import`: plan from the ledger, fetch, validate, store, record.

    stats = await run_backfill(settings, BackfillRequest("binance", ["BTC/USDT"], ["1m"], "2y"))
    stats = await run_import(settings, ImportRequest(symbol="BTC/USDT", timeframe="1m", start=..., end=...))

Safe to kill at any moment (SIGKILL included): the ledger records a page only after InfluxDB stored it, and
a run fetches only what the ledger does not know (its covered spans checked against InfluxDB first: what the
store does not hold is fetched again and the ledger corrected, common/history/verify.py), so the next run resumes where the last one stopped and a
finished one fetches nothing (idempotent: the same points, the same ledger). SIGINT/SIGTERM stop taking new
pages, finish and record the pages in flight, and return (`stats.interrupted`).

Pipelining: up to `backfill.concurrency` pages are fetched at once (the shared budget still paces every
request), answered pages are validated as they arrive, and a writer task stores them `write_pages` at a time
while the next pages are being fetched. Memory is bounded by concurrency + 2 x write_pages pages.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Self

import aiohttp

from common.bus.core import Producer
from common.config import ConfigError, ExchangeSettings, Settings
from common.domain.span import NS, Span, iso, requested_span, subtract, timeframe_ns, total
from common.exchanges.clients import make_rest_exchange
from common.exchanges.ratelimit import BudgetedExchange, RateBudget, limit_for
from common.history import archive as arc
from common.history.ingest import Batch, Checker, Sink, empty_evidence, gaps, retention_cutoff, runs
from common.history.ledger import Ledger, Series
from common.history.plan import BackfillPlan, history_of, plan_backfill
from common.history.progress import Progress
from common.history.rest import PageFetcher
from common.history.verify import verify_coverage
from common.redis_client import connect
from common.stores.influx import InfluxClient
from schemas import Codec

log = logging.getLogger(__name__)

Say = Callable[[str], None]


@dataclass
class BackfillRequest:
    exchange: str
    symbols: list[str]
    timeframes: list[str]
    since: str
    until: str | None = None
    concurrency: int | None = None
    plan_only: bool = False
    progress: bool | None = None  # None: when stderr is a terminal


@dataclass
class RunStats:
    pages: int = 0
    requests: int = 0
    weight: int = 0
    candles: int = 0
    rejected: int = 0
    empty_candles: int = 0
    unfetchable_candles: int = 0  # requested but older than the exchange keeps (recorded as unfetchable)
    ledger_corrected: int = 0  # candles the ledger marked covered that InfluxDB did not hold: fetched again
    alerts: int = 0
    throttled_429: int = 0
    banned_418: int = 0
    budget_waits: int = 0
    files: int = 0
    elapsed_s: float = 0.0  # the whole run, start-up (migrations, markets) included
    fetch_s: float = 0.0  # from the first page request to the last page recorded
    interrupted: bool = False
    plans: list[BackfillPlan] = field(default_factory=list)

    def summary(self) -> str:
        rate = self.requests / self.fetch_s if self.fetch_s else 0.0
        return (f"{'interrupted' if self.interrupted else 'done'}: {self.candles:,} candles stored, "
                f"{self.empty_candles:,} known empty, "
                + (f"{self.unfetchable_candles:,} unfetchable (older than the exchange keeps), "
                   if self.unfetchable_candles else "")
                + (f"{self.ledger_corrected:,} marked covered in the ledger but missing from InfluxDB "
                   f"(fetched again), " if self.ledger_corrected else "")
                + f"{self.rejected:,} rejected ({self.alerts:,} alerts), "
                f"{self.pages:,} pages, {self.requests:,} requests ({rate:.1f}/s while fetching, weight {self.weight:,}), "
                f"{self.throttled_429} x 429, {self.banned_418} x 418, in {self.elapsed_s:.1f} s")


def _exchange_settings(settings: Settings, exchange_id: str, symbols: list[str], say: Say) -> ExchangeSettings:
    try:
        return settings.exchange(exchange_id)
    except ConfigError:
        say(f"note: {exchange_id} is not configured; using ccxt's own (live) endpoints for it")
        return ExchangeSettings(id=exchange_id, symbols=list(symbols))


class _Stop:
    """SIGINT/SIGTERM -> stop taking new work (the pages in flight are finished and recorded)."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self._installed: list[int] = []

    def __enter__(self) -> Self:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, self.event.set)
                self._installed.append(sig)
        return self

    def __exit__(self, *exc: object) -> None:
        loop = asyncio.get_running_loop()
        for sig in self._installed:
            loop.remove_signal_handler(sig)


async def _pipeline(plan: BackfillPlan, fetcher: PageFetcher, sink: Sink, concurrency: int, write_pages: int,
                    stop: asyncio.Event, progress: Progress, stats: RunStats) -> None:
    """Fetch the plan's pages `concurrency` at a time, store them in order, `write_pages` per write."""
    queue: asyncio.Queue[Batch | None] = asyncio.Queue(maxsize=max(2, write_pages * 2))

    async def fetch_all() -> None:
        pages = iter(plan.pages)
        inflight: list[asyncio.Task[Batch]] = []
        try:
            while True:
                while len(inflight) < concurrency and not stop.is_set():
                    page = next(pages, None)
                    if page is None:
                        break
                    inflight.append(asyncio.create_task(fetcher.page(page.span)))
                if not inflight:
                    break
                batch = await inflight.pop(0)
                await queue.put(batch)
        finally:
            for t in inflight:
                t.cancel()
            await queue.put(None)

    async def write_all() -> None:
        done = False
        while not done:
            item = await queue.get()
            group: list[Batch] = []
            while item is not None:
                group.append(item)
                if len(group) >= write_pages or queue.empty():
                    break
                item = await queue.get()
            done = item is None
            if group:
                await sink.store(group)
                slots = sum(total([*b.covered, *(s for s, _ in b.empty)]) for b in group) // plan.step_ns
                stats.pages += len(group)
                stats.candles += sum(len(b.candles) for b in group)
                stats.rejected += sum(b.rejected for b in group)
                stats.alerts += sum(len(b.alerts) for b in group)
                stats.empty_candles += sum(total(s for s, _ in b.empty) for b in group) // plan.step_ns
                progress.update(done=slots + sum(b.rejected for b in group))

    try:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(fetch_all())
            tg.create_task(write_all())
    except BaseExceptionGroup as group:  # the first failure is the one to report (FetchError, ExchangeBanned..)
        first = group.exceptions[0]
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise first from None


async def run_backfill(settings: Settings, request: BackfillRequest, say: Say = print) -> RunStats:
    """Backfill every (symbol, timeframe) of `request`; see the module docstring."""
    started = time.monotonic()
    stats = RunStats()
    now_ns = time.time_ns()
    history = history_of(request.exchange)
    ledger = await Ledger.connect(settings.postgres.dsn, migrate_first=not request.plan_only)
    redis = connect(settings.redis.url, settings.bus.cluster)
    influx = InfluxClient(settings.influx)
    exchange = None
    try:
        plans: list[BackfillPlan] = []
        for symbol in request.symbols:
            for timeframe in request.timeframes:
                series = Series(request.exchange, symbol, timeframe)
                wanted = requested_span(request.since, request.until, now_ns, timeframe)
                cutoff, where = retention_cutoff(influx, timeframe, now_ns)
                if cutoff is not None and wanted.start < cutoff:
                    step = timeframe_ns(timeframe)
                    keep = cutoff - cutoff % step + (step if cutoff % step else 0)
                    say(f"notice: the {where} keeps {timeframe} candles from {iso(keep)} on; InfluxDB would drop "
                        f"older ones, so they are not fetched. To store them, raise influx.retention of that "
                        f"tier (docs/storage.md).")
                    if keep >= wanted.end:
                        continue
                    wanted = Span(keep, wanted.end)
                known = await _trusted_known(ledger, influx, series, wanted, now_ns, request.plan_only, stats, say)
                plan = plan_backfill(request.exchange, symbol, timeframe, wanted, now_ns, known)
                for notice in plan.notices:
                    say(f"notice: {notice}")
                say(f"plan: {plan.describe()}")
                plans.append(plan)
                if plan.unfetchable is not None and not request.plan_only:
                    stats.unfetchable_candles += plan.unfetchable.duration // plan.step_ns
                    await _record_unfetchable(ledger, series, plan, known)
        stats.plans = plans
        if request.plan_only or not any(p.pages for p in plans):
            if not request.plan_only:
                say("nothing to fetch: the ledger already covers the requested range")
            return stats
        ex_settings = _exchange_settings(settings, request.exchange, request.symbols, say)
        exchange = make_rest_exchange(ex_settings)
        budget = RateBudget(redis, request.exchange,
                            limit_for(request.exchange, settings.backfill.ratelimit, exchange.rateLimit),
                            settings.backfill.ratelimit)
        rest = BudgetedExchange(exchange, budget)
        say(f"rate budget: {budget.cap:,} weight per {budget.limit.window_s:g} s window, paced at "
            f"{budget.steady_weight_per_s:.1f} weight/s = {budget.steady_weight_per_s / budget.limit.ohlcv_weight:.1f} "
            f"OHLCV requests/s, shared in Redis ({budget.key})")
        await rest.call(budget.limit.markets_weight, exchange.load_markets)
        producer = Producer(redis, Codec(), settings.bus, source="backfill")
        sink = Sink(influx, ledger, producer, "rest")
        checker = Checker(settings, "backfill")
        concurrency = max(1, request.concurrency or settings.backfill.concurrency)
        total_slots = sum(p.candles_todo for p in plans)
        progress = Progress(total_slots, f"{request.exchange}", enabled=request.progress,
                            requests=lambda: rest.stats.requests)
        fetch_started = time.monotonic()
        with _Stop() as stop:
            for plan in plans:
                if stop.event.is_set() or not plan.pages:
                    continue
                series = Series(plan.exchange, plan.symbol, plan.timeframe)
                fetcher = PageFetcher(rest, series, plan.step_ns, history.page_limit, budget.limit.ohlcv_weight,
                                      checker, settings.backfill.retries, whole_range=history.whole_range)
                progress.label = f"{plan.exchange} {plan.symbol} {plan.timeframe}"
                await _pipeline(plan, fetcher, sink, concurrency, max(1, settings.backfill.write_pages),
                                stop.event, progress, stats)
                if fetcher.dropped_outside:
                    say(f"warning: {fetcher.dropped_outside} rows outside the requested pages were ignored")
            stats.interrupted = stop.event.is_set()
        stats.fetch_s = time.monotonic() - fetch_started
        progress.finish()
        stats.requests = rest.stats.requests
        stats.weight = rest.stats.weight
        stats.throttled_429 = rest.stats.throttled_429
        stats.banned_418 = rest.stats.banned_418
        stats.budget_waits = budget.waits
        return stats
    finally:
        stats.elapsed_s = time.monotonic() - started
        if exchange is not None:
            await exchange.close()
        await influx.close()
        await redis.aclose()
        await ledger.close()


async def _trusted_known(ledger: Ledger, influx: InfluxClient, series: Series, wanted: Span, now_ns: int,
                         plan_only: bool, stats: RunStats, say: Say) -> list[Span]:
    """What the ledger knows of `series`, less the covered spans InfluxDB does not hold (checked against the
    store, common/history/verify.py): those are fetched again, and the ledger is corrected (not with
    --plan, which changes nothing)."""
    coverage = await ledger.coverage(series)
    verdict = await verify_coverage(influx, coverage, now_ns, wanted)
    if verdict.agrees:
        return coverage.known()
    stats.ledger_corrected += verdict.missing_candles
    log.warning("ledger disagrees with InfluxDB: %s", verdict.describe())
    say(f"warning: the ledger marks {verdict.missing_candles:,} {series.timeframe} candles of {series} covered "
        f"that InfluxDB ({influx.database}) does not hold (a new, wiped or different InfluxDB?), first "
        f"{iso(verdict.missing[0].start)}; they are fetched again"
        + ("" if plan_only else " and the ledger corrected"))
    if not plan_only:
        await ledger.forget_covered(series, verdict.missing)
    return subtract(coverage.known(), verdict.missing)


async def _record_unfetchable(ledger: Ledger, series: Series, plan: BackfillPlan, known: list[Span]) -> None:
    """Record the part of the request older than the exchange keeps as 'unfetchable' (with the cap as the
    evidence), less what the ledger already knows: `mdp coverage` then shows it as such, not as a hole.
    Nothing is stored for it, so recording it first claims nothing about InfluxDB."""
    assert plan.unfetchable is not None
    pieces = subtract([plan.unfetchable], known)
    if pieces:
        await ledger.record(series, "rest", unfetchable=[(piece, plan.unfetchable_evidence) for piece in pieces])


# ---------------------------------------------------------------------------------------------------------
# Archives


@dataclass
class ImportRequest:
    symbol: str | None = None  # unified (BTC/USDT) or Binance id (BTCUSDT)
    timeframe: str = "1m"
    start: date | None = None
    end: date | None = None  # inclusive
    files: list[Path] = field(default_factory=list)
    base_url: str | None = None
    verify: bool = True
    force: bool = False  # import files whose span the ledger already knows
    progress: bool | None = None


async def _import_blob(blob: bytes, checksum: str | None, f: arc.ArchiveFile, symbol: str, verify: bool,
                       checker: Checker, sink: Sink, stats: RunStats) -> None:
    if verify:
        arc.verify(blob, checksum, f.name)
    now_ns = time.time_ns()
    rows = list(arc.read_rows(blob, f.name, f.timeframe))
    span = f.span
    step = timeframe_ns(f.timeframe)
    inside = [r for r in rows if r.open_time_ns in span]
    if len(inside) != len(rows):
        raise arc.ArchiveError(f"{f.name}: {len(rows) - len(inside)} rows open outside {span}; nothing written")
    cutoff, where = retention_cutoff(sink.influx, f.timeframe, now_ns)
    if cutoff is not None and any(r.open_time_ns < cutoff for r in rows):
        log.warning("%s: %d rows older than the %s are not stored (InfluxDB would drop them)", f.name,
                    sum(r.open_time_ns < cutoff for r in rows), where)
        rows = [r for r in rows if r.open_time_ns >= cutoff]
        keep = cutoff - cutoff % step + (step if cutoff % step else 0)
        if keep >= span.end:
            return  # nothing of this file can be stored
        span = Span(max(span.start, keep), span.end)
    candles = [arc.to_candle(r, "binance", symbol, f.timeframe, now_ns) for r in rows]
    checked = checker.check(candles, now_ns)
    times = sorted(r.open_time_ns for r in rows)
    units = sorted({r.unit for r in rows})
    empty = [(gap, empty_evidence("archive_no_rows", f"the Binance archive {f.name} has no row opening in {gap}",
                                  before, after, file=f.name))
             for gap, before, after in gaps(span, times, step)]
    batch = Batch(Series("binance", symbol, f.timeframe), checked.stored,
                  runs((c.open_time for c in checked.stored), step), empty, checked.alerts, checked.rejected)
    await sink.store([batch])
    stats.files += 1
    stats.candles += len(batch.candles)
    stats.rejected += batch.rejected
    stats.alerts += len(batch.alerts)
    stats.empty_candles += total(s for s, _ in empty) // step
    log.info("imported %s: %d candles (%s timestamps), %d rejected", f.name, len(batch.candles),
             "/".join(units) or "-", batch.rejected)


async def run_import(settings: Settings, request: ImportRequest, say: Say = print) -> RunStats:
    """Import Binance kline archives: local `files`, or downloads for days `start`..`end` (inclusive)."""
    started = time.monotonic()
    stats = RunStats()
    ledger = await Ledger.connect(settings.postgres.dsn)
    redis = connect(settings.redis.url, settings.bus.cluster)
    influx = InfluxClient(settings.influx)
    checker = Checker(settings, "import")
    sink = Sink(influx, ledger, Producer(redis, Codec(), settings.bus, source="import"), "archive")
    try:
        if request.files:
            progress = Progress(len(request.files), "import", enabled=request.progress, unit="files")
            for path in request.files:
                f = arc.ArchiveFile.from_name(path.name)
                symbol = arc.unified_symbol(request.symbol or f.symbol_id)
                blob, checksum = arc.read_local(path)
                await _import_blob(blob, checksum, f, symbol, request.verify, checker, sink, stats)
                progress.update(done=1)
            progress.finish()
            return stats
        if request.symbol is None or request.start is None or request.end is None:
            raise arc.ArchiveError("give --symbol, --from and --to (or archive files to import)")
        symbol = arc.unified_symbol(request.symbol)
        sym_id = arc.symbol_id(symbol)
        base = arc.archive_base(settings, request.base_url)
        today = datetime.now(UTC).date()
        files = arc.files_for(sym_id, request.timeframe, request.start, request.end, today)
        series = Series("binance", symbol, request.timeframe)
        known = [] if request.force or not files else await _trusted_known(
            ledger, influx, series, Span(files[0].span.start, files[-1].span.end), time.time_ns(), False, stats, say)
        todo = [f for f in files if subtract([f.span], known)]
        say(f"import: {len(files)} archive files of {sym_id} {request.timeframe} from {base} "
            f"({len(files) - len(todo)} already in the ledger)")
        progress = Progress(len(todo), f"import {sym_id} {request.timeframe}", enabled=request.progress,
                            unit="files")
        timeout = aiohttp.ClientTimeout(total=120)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            queue = list(todo)
            while queue:
                f = queue.pop(0)
                body = await arc.download(session, f.url(base))
                if body is None:
                    if f.monthly:
                        say(f"{f.name} is not published there (404); taking its days instead")
                        queue[:0] = [d for d in arc.days_of(f) if request.force or subtract([d.span], known)]
                        progress.total += len(arc.days_of(f)) - 1
                        continue
                    say(f"warning: {f.url(base)} does not exist (404); that day stays a hole in the ledger")
                    progress.update(done=1)
                    continue
                checksum_body = await arc.download(session, f.url(base) + ".CHECKSUM") if request.verify else b""
                text = checksum_body.decode() if checksum_body is not None else None
                await _import_blob(body, text, f, symbol, request.verify, checker, sink, stats)
                progress.update(done=1)
        progress.finish()
        return stats
    finally:
        stats.elapsed_s = time.monotonic() - started
        await influx.close()
        await redis.aclose()
        await ledger.close()


def day_of(ns: int) -> date:
    return datetime.fromtimestamp(ns / NS, tz=UTC).date()


__all__ = ["BackfillRequest", "ImportRequest", "RunStats", "day_of", "run_backfill", "run_import"]
