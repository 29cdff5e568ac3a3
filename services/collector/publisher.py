"""The collector's publishing: the outbox (outbox.py) and the one task that sends it to Redis.

Feeds put each wake-up's events in the bounded outbox and never wait for Redis; `Publisher.run` sends it,
oldest first, each round in one MULTI/EXEC with the feeds' positions (`mdp:collector:pos:{exchange}`), so a
position never claims more than the stream holds. Micro-batching: a round starts once the outbox holds
`batch_events` events or `linger_s` after the previous round started, at once when stopping or retrying. So
rounds come at most every `linger_s` while events keep arriving (one round trip carries many wake-ups), an
event waits at most `linger_s` for its round, and the first event after a quiet spell goes out at once. A trade counts as published only after that succeeded. While
Redis is down the process's state is degraded with the reason and the outbox's overflow becomes a Gap; when Redis
is back, the positions it holds tell whether it lost what we had published (then a Gap). At stop, `drain`
publishes what is left for a bounded time and logs what it could not.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Sequence

from common.backoff import EXACT, Backoff
from common.bus import streams
from common.bus.core import REDIS_DOWN, Producer
from common.bus.resp import Command
from common.bus.stage import Service
from common.domain.timeframe import MS
from common.tasks import cancel_and_wait
from schemas import Event, Trade
from services.collector.gaps import dropped_gap, lost_gap
from services.collector.outbox import Batch, Dropped, Outbox, Position, position_field, position_key
from services.collector.symbols import SymbolState

log = logging.getLogger(__name__)

PUBLISH_BACKOFF_S, PUBLISH_BACKOFF_MAX_S = 0.2, 5.0  # retrying a publish while Redis is down
WAKE_S = 0.5  # the publisher looks at the outbox at least this often
# A round due in less than this goes now: uvloop's timers count whole milliseconds, so a shorter wait ends at
# once and the loop would spin until the clock reaches the due time (measured: ten wake-ups per round).
LINGER_SLACK_S = 0.001


class Publisher:
    """Sends what the feeds took to `raw:{exchange}` (and Gaps to `mdp:gaps`, alerts to `mdp:alerts`; with
    partitions > 1 each event and Gap to its symbol's partition's raw:{exchange}:p{k} and mdp:gaps:p{k}).

    `service` is the collector process: its `state`/`detail` say when Redis is down, its `redis` holds the
    positions, its `started_at` bounds what a Redis that lost everything lost."""

    def __init__(self, service: Service, producer: Producer, exchange_id: str,
                 state_by_symbol: dict[str, SymbolState], count: Counter[str], sequential_ids: bool,
                 buffer_events: int, batch_events: int = 1, linger_s: float = 0.0, partitions: int = 1,
                 cluster: bool = False) -> None:
        self.service = service
        self.producer = producer
        self.exchange_id = exchange_id
        self.stream = streams.raw(exchange_id)
        self.partitions = partitions  # > 1: each event to raw:{exchange}:p{k} by its symbol (streams.raw_for)
        # On a Redis Cluster a round is committed partition by partition (`_publish`), each commit in its
        # partition's slot: raw:{exchange}:{p<k>}, mdp:gaps:{p<k>}, mdp:alerts:{p<k>} and the positions of its
        # feeds, mdp:collector:pos:{exchange}:{p<k>}.
        self.cluster = cluster
        self.state_by_symbol = state_by_symbol
        self.count = count
        self.sequential_ids = sequential_ids
        self.outbox = Outbox(buffer_events)
        self.batch_events = batch_events  # a round starts once this many events are queued...
        self.linger_s = linger_s  # ...or this long after the previous round started
        self.round_started = 0.0  # monotonic
        self.ready = asyncio.Event()
        self.draining = asyncio.Event()
        self.published_pos: dict[tuple[str, str], Position] = {}  # (channel, symbol) -> as stored in Redis
        self.redis_down_since = 0.0  # monotonic; 0 while publishing works

    async def publish(self, events: Sequence[Event], gaps: list[Event] | None = None, symbol: str = "",
                      channel: str = "", position: Position | None = None) -> None:
        """Queue events for raw:{exchange} (and Gaps for mdp:gaps) in the outbox; the publisher task sends
        them. Never waits for Redis: while it is down, feeds keep reading their sockets into the bounded
        outbox (`publish_buffer_events`; at the bound the oldest batches become a Gap, see outbox.py)."""
        if not events and not gaps:
            return
        ids = [e.trade_id for e in events if isinstance(e, Trade)] if channel == "trades" else []
        outbox = self.outbox
        outbox.put(Batch(symbol, channel, list(events), list(gaps or []), ids, position))
        self.settle_dropped()
        # Wake the publisher when the outbox was empty (it may be idle) or the round is full; a batch in between
        # waits for the round that is due anyway, so a busy second does not wake it once per message.
        if len(outbox) == 1 or outbox.events >= self.batch_events:
            self.ready.set()

    def settle_dropped(self) -> None:
        """Trades dropped at the outbox's bound are named by a Gap: never taken from ccxt again."""
        if not self.outbox.dropped_trades:
            return
        by_symbol: dict[str, list[tuple[str, int]]] = {}
        for symbol, tid, ms in self.outbox.dropped_trades:
            by_symbol.setdefault(symbol, []).append((tid, ms))
        self.outbox.dropped_trades = []
        for symbol, trades in by_symbol.items():
            self.state_by_symbol[symbol].settle(trades)

    def linger_left(self) -> float:
        """Seconds until the next round is due: `linger_s` after the previous round started, or at once with
        `batch_events` queued, when stopping, or for a round with only Gaps or drop records."""
        outbox = self.outbox
        if not outbox.queued or outbox.events >= self.batch_events or self.draining.is_set():
            return 0.0
        return self.next_round_in()

    def next_round_in(self) -> float:
        """Seconds until the next round is due by the linger alone (<= 0: due now). The feeds time their sweeps
        by it, so their events are in the outbox when the round is due."""
        return self.round_started + self.linger_s - time.monotonic()

    async def run(self, round_events: int) -> None:
        """Publish the outbox, oldest first, each round in one MULTI/EXEC with the feeds' new positions (so a
        position never claims more than the stream holds), at most `round_events` events a round (at least one
        batch), once `linger_left` says it is due. A Redis that is down is retried with capped backoff, the same
        batches first; the state is `degraded` with the reason meanwhile. Returns once `draining` is set and
        the outbox is empty."""
        backoff = Backoff(PUBLISH_BACKOFF_S, PUBLISH_BACKOFF_MAX_S, spread=EXACT)
        recheck = False
        # The round whose MULTI/EXEC got a connection error: Redis may have run it (the reply was lost). Held
        # aside, out of the outbox's bound (at most one round), until Redis answers whether it ran: its feeds'
        # positions are written in the same EXEC.
        in_doubt: tuple[list[Batch], list[Event], list[Dropped]] | None = None
        while True:
            if in_doubt is None and not self.outbox.queued and not self.outbox.notices and not self.outbox.dropped:
                if self.draining.is_set():
                    return
                await self._wait_ready(WAKE_S)
                continue
            linger = self.linger_left()
            if linger > LINGER_SLACK_S:
                await self._wait_ready(linger)  # a full round or a stop ends it early
                continue
            self.round_started = time.monotonic()
            batches = self.outbox.take(round_events)
            notices, dropped = self.outbox.take_notices()
            try:
                if recheck:  # Redis is back: did the round in doubt run, and did it keep what we published?
                    if in_doubt is not None:
                        if await self._ran(in_doubt[0]):
                            log.info("the round sent as Redis went away had run (its reply was lost): not "
                                     "publishing its %d events again", sum(len(b.events) for b in in_doubt[0]))
                        else:
                            batches = [*in_doubt[0], *batches]
                            notices, dropped = [*in_doubt[1], *notices], [*in_doubt[2], *dropped]
                        in_doubt = None
                    notices = [*await self._lost_while_down(), *notices]
                    recheck = False
                await self._publish(batches, notices, dropped)
            except REDIS_DOWN as exc:
                if in_doubt is None:
                    in_doubt = (batches, notices, dropped)
                else:
                    self.outbox.give_back(batches, notices, dropped)
                self.settle_dropped()
                recheck = True
                self.redis_down(exc, backoff.delay)
                try:
                    await asyncio.sleep(backoff.next())
                except BaseException:
                    assert in_doubt is not None
                    self.outbox.give_back(*in_doubt)  # cancelled (the end of a drain): left in the outbox, logged
                    raise
                continue
            except BaseException:
                self.outbox.give_back(batches, notices, dropped)  # cancelled at the end of a drain: logged
                if in_doubt is not None:
                    self.outbox.give_back(*in_doubt)  # older: in front
                raise
            backoff.reset()
            if self.redis_down_since and not self.outbox.queued:
                log.info("Redis is back after %.1f s; the buffered events are published",
                         time.monotonic() - self.redis_down_since)
                self.redis_down_since = 0.0
                self.service.state, self.service.detail = "running", ""

    async def _wait_ready(self, timeout_s: float) -> None:
        # A timer that sets `ready`, not asyncio.timeout: the linger wait usually runs out, once a round, and a
        # timeout that expires cancels the task and raises through it (measured: about 60 us of CPU a round more).
        self.ready.clear()
        timer = asyncio.get_running_loop().call_later(timeout_s, self.ready.set)
        try:
            await self.ready.wait()
        finally:
            timer.cancel()

    async def _publish(self, batches: list[Batch], notices: list[Event], dropped: list[Dropped]) -> None:
        """Publish a round: in one MULTI/EXEC on one Redis node; on a cluster one per partition it touches, in
        turn. If one fails, the lists passed in are left holding that partition's part only (the part in doubt,
        as a whole round is on one node), the partitions before it are published, and those after it go back
        to the front of the outbox, unsent."""
        if not self.cluster:
            await self._publish_round(batches, notices, dropped)
            return
        parts = self._by_partition(batches, notices, dropped)
        for i, (k, part) in enumerate(parts):
            try:
                await self._publish_round(*part, partition=k)
            except BaseException:
                later = [p for _, p in parts[i + 1:]]
                self.outbox.give_back([b for p in later for b in p[0]], [g for p in later for g in p[1]],
                                      [d for p in later for d in p[2]])
                batches[:], notices[:], dropped[:] = part
                raise

    def _by_partition(self, batches: list[Batch], notices: list[Event], dropped: list[Dropped]
                      ) -> list[tuple[int, tuple[list[Batch], list[Event], list[Dropped]]]]:
        """A round's parts by partition, in partition order: a feed's batch (one symbol) whole, the market
        catalog's (no symbol) split event by event, Gaps and drop records by their symbol."""
        parts: dict[int, tuple[list[Batch], list[Event], list[Dropped]]] = {}
        n = self.partitions

        def part(symbol: str) -> tuple[list[Batch], list[Event], list[Dropped]]:
            return parts.setdefault(streams.partition_of(symbol, n), ([], [], []))

        for b in batches:
            if b.symbol or not b.events:
                part(b.symbol)[0].append(b)
                continue
            split: dict[int, list[Event]] = {}
            for e in b.events:
                split.setdefault(streams.partition_of(getattr(e, "symbol", None) or "", n), []).append(e)
            for k, events in split.items():
                parts.setdefault(k, ([], [], []))[0].append(Batch(b.symbol, b.channel, events, seq=b.seq))
            for g in b.gaps:
                part(getattr(g, "symbol", None) or "")[1].append(g)
        for g in notices:
            part(getattr(g, "symbol", None) or "")[1].append(g)
        for d in dropped:
            part(d.symbol)[2].append(d)
        return sorted(parts.items())

    async def _publish_round(self, batches: list[Batch], notices: list[Event], dropped: list[Dropped],
                             partition: int | None = None) -> None:
        """One MULTI/EXEC: the events, Gaps and alerts, and the feeds' new positions; on a cluster, those of
        `partition`, in its slot."""
        events = [e for b in batches for e in b.events]
        gaps = [*notices, *(g for b in batches for g in b.gaps)]
        alerts: list[Event] = []
        for run in dropped:
            gap, alert = dropped_gap(self.exchange_id, self.sequential_ids, run, self.outbox.limit)
            if run.channel:  # not the market catalog or an alert: a feed's window
                gaps.append(gap)
            alerts.append(alert)
        positions: dict[tuple[str, str], Position] = {}
        for b in batches:
            if b.position is not None:
                positions[(b.channel, b.symbol)] = b.position
        extra: list[Command] = []
        if positions:
            extra.append(("HSET", self.positions_key(partition),
                          *(x for (c, s), p in positions.items() for x in (position_field(c, s), p.encode()))))
        if partition is not None:
            outputs: dict[str, list[Event]] = {streams.raw(self.exchange_id, partition, cluster=True): events,
                                               streams.gaps(partition, cluster=True): gaps,
                                               streams.tagged(streams.ALERTS, partition): alerts}
        else:
            outputs = {self.stream: events} if self.partitions == 1 else self._partitioned(batches)
            for g in gaps:  # mdp:gaps, or with partitions > 1 the Gap's symbol's mdp:gaps:p{k}
                outputs.setdefault(streams.gaps_for(getattr(g, "symbol", None) or "", self.partitions), []).append(g)
            outputs[streams.ALERTS] = alerts
        self.count["publish_round_trips"] += 1  # one MULTI/EXEC (the heartbeat's rate of them)
        await self.producer.commit(outputs, extra)
        for b in batches:
            if b.trade_ids:
                self.state_by_symbol[b.symbol].settle(
                    [(e.trade_id, e.ts_event // MS) for e in b.events if isinstance(e, Trade)])
        for k, p in positions.items():
            self.published_pos[k] = p

    def _partitioned(self, batches: list[Batch]) -> dict[str, list[Event]]:
        """The round's events by partition stream: a feed's batch (one symbol) whole, the market catalog's
        (no symbol) event by event."""
        out: dict[str, list[Event]] = {}
        ex, n = self.exchange_id, self.partitions
        for b in batches:
            if b.symbol:
                out.setdefault(streams.raw_for(ex, b.symbol, n), []).extend(b.events)
                continue
            for e in b.events:
                out.setdefault(streams.raw_for(ex, getattr(e, "symbol", None) or "", n), []).append(e)
        return out

    def redis_down(self, exc: BaseException, delay: float) -> None:
        """Count a failed attempt and say so in the state (degraded, with how long and what is buffered)."""
        now = time.monotonic()
        if not self.redis_down_since:
            self.redis_down_since = now
        self.count["publish_retries"] += 1
        self.service.state = "degraded"
        self.service.detail = (
            f"Redis unreachable for {now - self.redis_down_since:.0f} s ({type(exc).__name__}: {exc}); "
            f"{self.outbox.events} events buffered (bound publish_buffer_events={self.outbox.limit}), "
            f"{self.outbox.dropped_events} dropped so far as Gaps")
        where = f"{self.stream}:{{p*}}" if self.cluster else self.stream if self.partitions == 1 else f"{self.stream}:p*"
        log.error("cannot publish to %s: %s; retrying in %.1f s", where, self.service.detail, delay)

    async def _ran(self, batches: list[Batch]) -> bool:
        """Whether the round of `batches`, whose reply was lost, ran: Redis holds its feeds' positions (written in
        the same MULTI/EXEC, and no later round ran since). Then they are published (as `_publish_round` records
        it). A round without positions cannot tell: False, and it is published again (its market entries, Gaps
        and alerts are idempotent for their readers)."""
        positions = {(b.channel, b.symbol): b.position for b in batches if b.position is not None}
        if not positions:
            return False
        stored = await self.read_positions()
        if any(stored.get(k) != p for k, p in positions.items()):
            return False
        for b in batches:
            if b.trade_ids:
                self.state_by_symbol[b.symbol].settle(
                    [(e.trade_id, e.ts_event // MS) for e in b.events if isinstance(e, Trade)])
        self.published_pos.update(positions)
        self.count["rounds_in_doubt_ran"] += 1
        return True

    async def _lost_while_down(self) -> list[Event]:
        """Gaps for what Redis lost of what we had published (it restarted from an older AOF or snapshot, or
        empty): the position it holds per feed, written with the XADDs, is behind ours."""
        stored = await self.read_positions()
        gaps: list[Event] = []
        for (channel, symbol), ours in self.published_pos.items():
            theirs = stored.get((channel, symbol))
            if theirs is not None and theirs.ts_event >= ours.ts_event and theirs.trade_id == ours.trade_id:
                continue
            self.count["positions_lost"] += 1
            self.count["gaps"] += 1
            gaps.append(lost_gap(self.exchange_id, self.sequential_ids, channel, symbol, ours, theirs,
                                 self.service.started_at))
        return gaps

    def positions_key(self, partition: int | None) -> str:
        """Where the feeds' positions are kept: one hash per exchange, on a cluster one per partition."""
        key = position_key(self.exchange_id)
        return key if partition is None else streams.tagged(key, partition)

    async def read_positions(self) -> dict[tuple[str, str], Position]:
        """The positions Redis holds for this exchange: (channel, symbol) -> Position."""
        keys = [self.positions_key(k) for k in range(self.partitions)] if self.cluster else [self.positions_key(None)]
        out: dict[tuple[str, str], Position] = {}
        for key in keys:
            for f, v in (await self.service.redis.hgetall(key)).items():
                channel, _, symbol = (f.decode() if isinstance(f, bytes) else f).partition(":")
                out[(channel, symbol)] = Position.decode(v)
        return out

    async def stored_positions(self, stop: asyncio.Event) -> dict[tuple[str, str], Position] | None:
        """`read_positions`, retried with capped backoff while Redis is down; None if `stop` is set first."""
        backoff = Backoff(PUBLISH_BACKOFF_S, PUBLISH_BACKOFF_MAX_S)
        while True:
            try:
                return await self.read_positions()
            except REDIS_DOWN as exc:
                self.redis_down(exc, backoff.delay)
                if await backoff.sleep(stop):
                    return None

    async def drain(self, task: asyncio.Task[None], bound_s: float) -> None:
        """At stop: let `task` (running `run`) publish what the outbox holds, for at most `bound_s`, without
        waiting for slow consumers (`Producer.hurry`: backpressure must not turn taken events into a Gap); what
        is left then, or what a publisher that crashed left, is logged as the Gap it leaves (the next start opens
        it from the stored positions)."""
        self.draining.set()
        self.ready.set()
        self.producer.hurry()
        started = time.monotonic()
        if not task.done():
            try:
                await asyncio.wait_for(asyncio.shield(task), bound_s)
                log.info("stopped collecting; the outbox was published in %.2f s", time.monotonic() - started)
                return
            except TimeoutError:
                await cancel_and_wait(task)
            except Exception:  # noqa: BLE001, S110 - the publisher's own error: the collector re-raises it after us
                pass
            why = f"could not publish within {bound_s:.0f} s of the stop"
        else:
            why = "the publisher had stopped"
        self.settle_dropped()
        if not self.outbox.events:
            return
        runs: dict[tuple[str, str], list[Event]] = {}
        for batch in self.outbox.queued:
            runs.setdefault((batch.symbol, batch.channel), []).extend(batch.events)
        log.error("%s (%s): %d events of %d batches not published", why,
                  self.service.detail or "Redis slow or unreachable", self.outbox.events, len(self.outbox))
        for (symbol, channel), events in runs.items():
            times = [int(getattr(e, "ts_event", 0)) for e in events]
            ids = [e.trade_id for e in events if isinstance(e, Trade)]
            named = f"; trade ids {ids[0]}..{ids[-1]}" if ids else ""
            log.error("gap in %s %s %s from %d to %d (not published at stop): %d events%s; the next start "
                      "opens its Gap from the stored position (written with the XADDs, so it also tells if a "
                      "write sent before the stop was applied after all)", self.exchange_id, symbol,
                      channel or "-", min(times), max(times), len(events), named)
