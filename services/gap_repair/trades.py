"""Repairing a window of trades by trade id: Binance's historicalTrades, published into raw:{exchange} once.

How the missing trades are found:
- a Gap from the validator's `trade.id_gap` names the missing ids in its reason ("trade ids A..B missing");
  they are fetched with `GET /api/v3/historicalTrades?fromId=A` page by page up to B;
- a Gap that gives only a time window (a collector reconnect or stall) is first turned into the id of the
  first trade at or after its start: `GET /api/v3/aggTrades?startTime&endTime` (ccxt `fetch_trades`, its
  spot default) answers aggregates whose `f` is the first trade id they hold. Aggregate ids (`a`, what ccxt
  calls the trade id there) are NOT trade ids and aggregates merge trades, so aggTrades only locates the
  window; the trades themselves come from historicalTrades, until the first one at or after the end.
  When a window holds more aggregates than one page the exchange may answer the last ones of the window
  (ccxt 4.5.90 documents that caveat), so the window is narrowed to the first answered aggregate until an
  answer is not full.
ccxt 4.5.90's binance refuses to send historicalTrades without an apiKey (its `sign()` raises
AuthenticationError), while Binance serves it without one (security type NONE, weight 25). So the request is
built on ccxt's own URL (`urls['api']['public']`) and sent with ccxt's own transport (`fetch`: its session,
its error mapping, the rate-budget instrumentation), and the rows parsed by ccxt's `parse_trades`: the same
dicts ccxt.pro's `watch_trades` yields live.

Where the repaired trades go: into raw:{exchange}, as the collector's own Trade events (built from ccxt's
rows by `common.exchanges.events.trade_event`, field for field what the collector publishes), so that they cross
validator -> normalizer -> md:trade:* -> influx writer, aggregator and cache like live trades: what
strategies read and what the 1m..1d bars are built from holds them, not only InfluxDB. They are the
handler's outputs: the bus publishes them and acknowledges the Gap entry in one MULTI/EXEC, so a repair
killed after its REST fetch publishes nothing, its Gap is redelivered and fetched again, and the trades
reach raw:{exchange} once. What a repaired trade carries: `ts_recv` = when this service received the REST
answer (the truth: it is late, and the validator's `time.stale` flag says so), `quality` = ("gap.repaired",)
(kept by the validator, normalizer and influx writer, so the stored point and md:trade:* say how it came).
Of the trades fetched for the window, those InfluxDB does not hold yet are published: a trade reaches
InfluxDB only through md:trade:* (the influx writer reads it), so a stored trade has reached strategies
too, and a collector's reconnect window, which mostly holds trades that arrived live, is not sent through
the pipeline again. A live trade still in flight (not stored yet) may be published again: the validator
drops a trade id it has already forwarded (exact id memory with holes), so the overlap is harmless. No
direct InfluxDB write: the influx writer stores the repaired trade as the same point a live one is (keyed
by its time and id), and trades have no ledger that would need to know when they are durable.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

import msgspec

from common.bus import streams
from common.config import Settings
from common.domain.span import Span
from common.domain.timeframe import MS
from common.exchanges.events import trade_event
from common.exchanges.venues import VENUES, TradeHistoryApi
from common.history.ingest import Sink
from common.stores.influx import InfluxClient
from schemas import Gap, Trade
from services.gap_repair.outcome import REPAIRED, Outcome, Where
from services.gap_repair.published import Published, trade_key
from services.gap_repair.venues import Venues, VenueUnavailable

log = logging.getLogger(__name__)

# Exchanges whose REST serves trades by id (fromId) and whose trade ids count up by one: the venue table's.
BY_ID: dict[str, TradeHistoryApi] = {v.id: v.trades_by_id for v in VENUES.values() if v.trades_by_id}
_IDS = re.compile(r"trade ids (\d+)(?:\.\.(\d+))? missing")
NARROW_MAX = 40  # narrowing steps of an aggTrades window at most (halving a day of ms takes 27)


def missing_ids(gap: Gap) -> tuple[int, int] | None:
    """The (first, last) missing trade id a Gap names: its `first_missing_id`/`last_missing_id`, or for Gaps
    published before those fields existed, its reason's "trade ids A..B missing"; None if none."""
    if gap.first_missing_id.isdigit() and gap.last_missing_id.isdigit():
        return int(gap.first_missing_id), int(gap.last_missing_id)
    m = _IDS.search(gap.reason)
    if m is None:
        return None
    first = int(m.group(1))
    return first, int(m.group(2) or first)


class TradeRepair:
    def __init__(self, settings: Settings, venues: Venues, sink: Sink, published: Published) -> None:
        self.settings = settings
        self.venues = venues
        self.sink = sink
        self.influx: InfluxClient = sink.influx
        self.published = published
        self.page = max(1, min(1000, settings.gap_repair.trades_page))
        self.sequential = frozenset(settings.quality.sequential_trade_ids)

    async def repair(self, exchange: str, symbol: str, window: Span, ids: tuple[int, int] | None, now_ns: int,
                     origin: str) -> Outcome:
        """Fetch the trades of `window` (or of the id range `ids`): the outcome's events, for raw:{exchange}."""
        out = Outcome(Where(exchange, symbol, "trades"), window)
        try:
            await self._repair(out, exchange, symbol, window, ids, now_ns)
        except VenueUnavailable as exc:
            out.lose(window, f"{exc}. Trades are not in the periodic scan: repair this window "
                             f"by hand once the exchange answers (historicalTrades fromId), or "
                             f"accept the loss; the exchange's own candles still cover it")
        return out.finish(now_ns, origin)

    async def _repair(self, out: Outcome, exchange: str, symbol: str, window: Span, ids: tuple[int, int] | None,
                      now_ns: int) -> None:
        api = BY_ID.get(exchange)
        if api is None:
            out.lose(window, f"{exchange} has no trade-history-by-id endpoint this service can use "
                             f"(supported: {', '.join(sorted(BY_ID))}); the trades of the window "
                             f"are lost to storage, the exchange's candles still cover it")
            return
        rest = await self.venues.get(exchange)
        ex = rest.exchange
        if symbol not in ex.markets:
            raise VenueUnavailable(f"{exchange} lists no market {symbol!r}")
        market = ex.market(symbol)
        if ids is None:
            first = await self._first_id_at(rest, market, window, api)
            if first is None:
                out.explained = (f"{exchange} reports no trade in {window} (aggTrades startTime/endTime answered "
                                 f"nothing): nothing was missed")
                out.empty = 1
                return
        else:
            first = ids[0]
        rows = await self._walk(rest, market, first, ids[1] if ids else None, window, api, out)
        if ids is not None:
            self._check_complete(out, ids, rows)
        elif rows and exchange in self.sequential:
            got = sorted(int(r["id"]) for r in rows)
            if got[-1] - got[0] + 1 != len(got):
                self._check_complete(out, (got[0], got[-1]), rows)
        await self._publish(out, exchange, symbol, rows, now_ns)

    # -- fetching -------------------------------------------------------------------------------------

    async def _first_id_at(self, rest: Any, market: dict[str, Any], window: Span,
                           api: TradeHistoryApi) -> int | None:
        """The id of the first trade at or after window.start (and before its end), from aggTrades."""
        ex = rest.exchange
        lo, hi = window.start // MS, (window.end - 1) // MS
        for _ in range(NARROW_MAX):
            hi = min(hi, lo + 3_600_000 - 1)  # Binance refuses windows over one hour
            aggs = await self.venues.call(rest, api.agg_weight, f"{ex.id} aggTrades {market['symbol']} {lo}..{hi}",
                                          ex.fetch_trades, market["symbol"], lo, self.page,
                                          {"until": hi, "fetchTradesMethod": api.agg_method})
            if not aggs:
                if hi >= (window.end - 1) // MS:
                    return None
                lo, hi = hi + 1, (window.end - 1) // MS  # an empty hour: look at the next one
                continue
            head = min(aggs, key=lambda a: (a["timestamp"], int(a["info"]["f"])))
            if len(aggs) < self.page or head["timestamp"] >= hi:
                return int(head["info"]["f"])
            hi = int(head["timestamp"])  # a full page may be the window's last aggregates: narrow to the first
        raise VenueUnavailable(f"{ex.id} aggTrades did not settle on the first trade of {window} in {NARROW_MAX} "
                               f"requests")

    async def _walk(self, rest: Any, market: dict[str, Any], first: int, last: int | None, window: Span,
                    api: TradeHistoryApi, out: Outcome) -> list[dict[str, Any]]:
        """historicalTrades from `first` up to id `last` (or the first trade at or after window.end)."""
        ex = rest.exchange
        base = ex.urls["api"][api.base]
        end_ms = -(-window.end // MS)  # trades of a millisecond starting before the window's end are in it
        cap = self.settings.gap_repair.max_trades
        rows: list[dict[str, Any]] = []
        cursor = first
        while True:
            url = f"{base}/historicalTrades?" + ex.urlencode({"symbol": market["id"], "fromId": cursor,
                                                             "limit": self.page})
            raw = await self.venues.call(rest, api.historical_weight, f"{ex.id} historicalTrades fromId={cursor}",
                                         ex.fetch, url)
            page = ex.parse_trades(raw if isinstance(raw, list) else [], market)
            if not page:
                break
            if cursor == first and int(page[0]["id"]) > first:
                lost_to = int(page[0]["id"]) - 1
                out.lose(window, f"{ex.id} no longer serves trade ids {first}..{lost_to} (its "
                                 f"oldest served id from there is {page[0]['id']}): older than "
                                 f"the exchange keeps; these trades are lost to storage")
            done = False
            for t in page:
                tid = int(t["id"])
                if (last is not None and tid > last) or (last is None and t["timestamp"] >= end_ms):
                    done = True
                    break
                if tid >= cursor:
                    rows.append(t)
            if done or len(page) < self.page:
                break
            cursor = int(page[-1]["id"]) + 1
            if len(rows) > cap:
                raise VenueUnavailable(f"the window holds more than gap_repair.max_trades = {cap} trades; "
                                       f"raise it if such a repair is wanted")
        return rows

    def _check_complete(self, out: Outcome, ids: tuple[int, int], rows: Sequence[dict[str, Any]]) -> None:
        got = {int(r["id"]) for r in rows}
        missing = [i for i in range(ids[0], ids[1] + 1) if i not in got]
        if missing and not any("no longer serves" in why for _, why in out.unrepaired):
            out.lose(out.window, f"{len(missing)} of the trade ids {ids[0]}..{ids[1]} did not come "
                                 f"back from the exchange (first: {missing[0]}); the ones that did "
                                 f"are published. Ask the exchange again later, or accept the loss")

    # -- publishing ------------------------------------------------------------------------------------

    async def _publish(self, out: Outcome, exchange: str, symbol: str, rows: Sequence[dict[str, Any]],
                       now_ns: int) -> None:
        """The fetched trades InfluxDB does not hold, as the collector's events, for raw:{exchange} (published
        with the Gap's acknowledgement)."""
        if not rows:
            return
        trades = [msgspec.structs.replace(trade_event(exchange, symbol, row, now_ns), quality=REPAIRED)
                  for row in sorted(rows, key=lambda r: int(r["id"]))]
        unstored = await self._not_stored(exchange, symbol, trades)
        fresh = [t for t in unstored if trade_key(exchange, symbol, t.trade_id) not in self.published]
        out.events.extend(fresh)
        out.repaired += len(fresh)
        if not fresh:
            out.explained = (f"all {len(trades)} trade(s) of the window are already stored (so they reached "
                             f"md:trade:* too) or published by an earlier repair: delivered live, or repaired "
                             f"before")
        log.info("%s %s trades %s: %d fetched, %d already stored, %d already published, %d published to %s",
                 exchange, symbol, out.window, len(trades), len(trades) - len(unstored),
                 len(unstored) - len(fresh), len(fresh), streams.raw(exchange))

    async def _not_stored(self, exchange: str, symbol: str, trades: list[Trade]) -> list[Trade]:
        """The trades whose id InfluxDB does not hold yet (in their time range)."""
        await self.sink.prepare()  # the database or tiers may not exist yet
        lo = min(t.ts_event for t in trades)
        hi = max(t.ts_event for t in trades)
        lo -= lo % MS
        hi = hi - hi % MS + MS
        rows = await self.influx.query_timeframe(
            "ticks", "SELECT trade_id FROM trades WHERE exchange = $ex AND symbol = $sym AND time >= $lo AND "
            "time < $hi", {"ex": exchange, "sym": symbol, "lo": lo, "hi": hi})
        stored = {str(r.get("trade_id")) for r in rows}
        return [t for t in trades if t.trade_id not in stored]


__all__ = ["BY_ID", "TradeRepair", "missing_ids"]
