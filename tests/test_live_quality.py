"""The validator's stream rules (common/domain/series.py), each firing and not firing, through the real
validator service on the real Redis; real candles (the shipped data/real) where the rule is statistical, and
the whole real Binance capture to show that none of them rejects clean data."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal

import msgspec
import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from common import status as status_mod
from common.bus import streams
from common.bus.core import Delivery, Producer
from common.config import QualitySettings, RedisSettings, Settings
from common.domain.series import StreamRules
from common.domain.state import SeriesBook
from schemas import Alert, Candle, Codec, Event, Gap, Ticker, Trade
from services.validator import Validator
from simulator import Recording
from tests import stubs
from tests.conftest import shipped_btc_minutes
from tests.test_stages import FAST, read, run_until

codec = Codec()
replace = msgspec.structs.replace
MINUTE = 60_000_000_000
NOW_TS = 1_723_161_255_342_000_000


@pytest.fixture
def settings(redis_server) -> Settings:
    return Settings(redis=RedisSettings(url=redis_server.url), bus=FAST)


@dataclass
class Outcome:
    valid: list[Event]
    alerts: list[Alert]
    gaps: list[Gap]
    counters: dict[str, int]

    def rules(self) -> list[str]:
        return [a.rule for a in self.alerts]

    def flagged(self, rule: str) -> list[Event]:
        return [e for e in self.valid if rule in getattr(e, "quality", ())]


async def validate(redis: aioredis.Redis, settings: Settings, events: Sequence[Event],
                   exchange: str = "binance") -> Outcome:
    """Publish `events` on raw:{exchange}, run one validator until it has acknowledged them all."""
    producer = Producer(redis, codec, settings.bus, "test")
    entries = 0
    for e in events:  # one entry per event: the validator reads them in this order
        await producer.publish({streams.raw(exchange): [e]})
        entries += 1
    svc = Validator(settings)
    await run_until([svc], lambda: svc.consumer.stats.acked == entries)
    valid = [e for s in await redis.keys("valid:*") for e in await read(redis, s.decode())]
    alerts = [a for a in await read(redis, streams.ALERTS) if isinstance(a, Alert)]
    gaps = [g for g in await read(redis, streams.GAPS) if isinstance(g, Gap)]
    return Outcome(valid, alerts, gaps, svc.counters())


def bar(i: int, o: str, h: str, lo: str, c: str, v: str = "12.5", exchange: str = "binance",
        symbol: str = "BTC/USDT") -> Candle:
    return stubs.candle(i, o=o, h=h, lo=lo, c=c, v=v, exchange=exchange, symbol=symbol)


def real_bars(n: int, start: int = 0) -> list[Candle]:
    """`n` consecutive closed 1m candles of the real Binance BTC/USDT daily zips shipped in data/real
    (2020-01-01 on), as the collector makes them (Decimals from the text)."""
    out = []
    for row in shipped_btc_minutes(start + n, dtype=str).iloc[start:].itertuples():
        t = int(row.timestamp) * 1_000_000
        out.append(Candle(exchange="binance", symbol="BTC/USDT", timeframe="1m", open_time=t,
                          open=Decimal(row.open), high=Decimal(row.high), low=Decimal(row.low),
                          close=Decimal(row.close), volume=Decimal(row.volume), closed=True,
                          ts_event=t + MINUTE - 1_000_000, ts_recv=t + MINUTE + 50_000_000))
    return out


# --- closed candles: duplicates, conflicts, order, gaps --------------------------------------------------

async def test_time_duplicate_drops_the_identical_copy_with_an_info_alert(redis, settings) -> None:
    c0, c1 = stubs.candle(0), stubs.candle(1)
    out = await validate(redis, settings, [c0, c1, c1])
    assert out.valid == [c0, c1]
    assert out.rules() == ["time.duplicate"]
    a = out.alerts[0]
    assert (a.severity, a.values["open_time"]) == ("info", str(c1.open_time))
    assert out.counters["repaired.time.duplicate"] == 1 and out.counters["repaired"] == 1


async def test_time_duplicate_quiet_on_distinct_bars_and_open_updates(redis, settings) -> None:
    update = stubs.candle(1, closed=False)
    events = [stubs.candle(0), update, update, stubs.candle(1)]  # an unclosed update may repeat
    out = await validate(redis, settings, events)
    assert out.valid == events and out.alerts == []


async def test_time_conflict_rejects_the_second_version_and_keeps_the_first(redis, settings) -> None:
    c1 = stubs.candle(1)
    other = stubs.candle(1, c="61860.00")
    out = await validate(redis, settings, [stubs.candle(0), c1, other])
    assert out.valid == [stubs.candle(0), c1]
    assert out.rules() == ["time.conflict"]
    a = out.alerts[0]
    assert a.severity == "error" and "rejected" in a.reason
    assert (a.values["first_close"], a.values["close"]) == ("61850.10", "61860.00")
    assert out.counters["rejected.time.conflict"] == 1 and out.counters["rejected"] == 1


async def test_time_gap_publishes_a_gap_event_and_alert_and_passes_the_bar(redis, settings) -> None:
    c0, c1, c4 = stubs.candle(0), stubs.candle(1), stubs.candle(4)
    out = await validate(redis, settings, [c0, c1, c4])
    assert out.valid == [c0, c1, c4]  # the bar after the hole is fine
    assert out.rules() == ["time.gap"]
    a = out.alerts[0]
    assert a.severity == "warning"
    assert (a.values["first_missing_open_time"], a.values["missing"]) == (str(stubs.candle(2).open_time), "2")
    assert len(out.gaps) == 1
    g = out.gaps[0]
    assert (g.channel, g.start, g.end) == ("candle:1m", stubs.candle(2).open_time, c4.open_time)
    assert out.counters["alerted.time.gap"] == 1 and out.counters["gaps"] == 1


async def test_time_gap_quiet_on_consecutive_bars(redis, settings) -> None:
    out = await validate(redis, settings, [stubs.candle(i) for i in range(4)])
    assert out.alerts == [] and out.gaps == []


async def test_time_out_of_order_passes_a_late_bar_that_fills_a_gap(redis, settings) -> None:
    c0, c1, c2, c4 = stubs.candle(0), stubs.candle(1), stubs.candle(2), stubs.candle(4)
    out = await validate(redis, settings, [c0, c1, c4, c2, c2])
    assert out.valid == [c0, c1, c4, c2]  # late bar passed once; its copy is a duplicate
    assert out.rules() == ["time.gap", "time.out_of_order", "time.duplicate"]
    late = out.alerts[1]
    assert (late.severity, late.values["fills_gap"]) == ("warning", "true")
    assert out.counters["repaired.time.out_of_order"] == 1


async def test_time_out_of_order_says_when_the_bar_is_older_than_memory(redis, settings) -> None:
    old = stubs.candle(-50)
    out = await validate(redis, settings, [stubs.candle(0), stubs.candle(1), old])
    assert out.valid == [stubs.candle(0), stubs.candle(1), old]
    assert out.rules() == ["time.out_of_order"] and out.alerts[0].values["fills_gap"] == "false"


# --- closed candles: values ------------------------------------------------------------------------------

async def test_price_outlier_flags_a_spike_after_real_bars(redis, settings) -> None:
    bars = real_bars(41)
    last = bars[-1]
    prev_close = bars[-2].close
    assert prev_close is not None
    spike_close = (prev_close * Decimal("1.05")).quantize(Decimal("0.01"))
    spiked = replace(last, open=prev_close, close=spike_close, high=spike_close, low=prev_close)
    out = await validate(redis, settings, [*bars[:-1], spiked])
    assert out.valid[:-1] == bars[:-1]
    assert out.flagged("price.outlier") == [replace(spiked, quality=("price.outlier",))]
    a = next(a for a in out.alerts if a.rule == "price.outlier")
    assert a.severity == "warning" and float(a.values["log_return"]) > 0.04  # type: ignore[arg-type]


async def test_price_outlier_flags_a_flash_crash_wick(redis, settings) -> None:
    bars = real_bars(41)
    last = bars[-1]
    assert last.low is not None
    wick = replace(last, low=(last.low * Decimal("0.9")).quantize(Decimal("0.01")))  # 10% wick, close normal
    out = await validate(redis, settings, [*bars[:-1], wick])
    assert [e.open_time for e in out.flagged("price.outlier")] == [wick.open_time]  # type: ignore[attr-defined]
    assert float(next(a for a in out.alerts if a.rule == "price.outlier").values["wick"]) > 0.1  # type: ignore[arg-type]


async def test_price_outlier_quiet_on_two_real_hours(redis, settings) -> None:
    bars = real_bars(120)
    out = await validate(redis, settings, bars)
    assert out.valid == bars and out.alerts == []


async def test_price_stuck_flags_from_the_nth_flat_bar(redis, settings) -> None:
    n = QualitySettings().stuck_bars
    flat = [bar(i, "61837.63", "61837.63", "61837.63", "61837.63", v="0.001") for i in range(n + 1)]
    out = await validate(redis, settings, flat)
    assert [e.open_time for e in out.flagged("price.stuck")] == [c.open_time for c in flat[n - 1:]]  # type: ignore[attr-defined]
    assert out.counters["flagged.price.stuck"] == 2


async def test_price_stuck_quiet_when_the_flat_price_moves(redis, settings) -> None:
    n = QualitySettings().stuck_bars
    flat = [bar(i, p, p, p, p, v="0.001") for i in range(n) for p in [f"61837.{63 + i % 2}"]]
    out = await validate(redis, settings, flat)
    assert out.flagged("price.stuck") == []


async def test_volume_zero_is_flagged_and_stored(redis, settings) -> None:
    empty = bar(1, "61850.10", "61850.10", "61850.10", "61850.10", v="0")
    out = await validate(redis, settings, [stubs.candle(0), empty, stubs.candle(2)])
    assert out.valid == [stubs.candle(0), replace(empty, quality=("volume.zero",)), stubs.candle(2)]
    assert out.rules() == ["volume.zero"] and out.alerts[0].severity == "info"


async def test_candle_open_gap_flags_an_open_far_from_the_previous_close(redis, settings) -> None:
    c0 = stubs.candle(0)  # closes at 61850.10
    jumped = bar(1, "63100.00", "63200.00", "63000.00", "63150.00")  # opens 2% above
    near = bar(2, "63150.50", "63200.00", "63100.00", "63120.00")  # opens at the last price
    out = await validate(redis, settings, [c0, jumped, near])
    assert [e.open_time for e in out.flagged("candle.open_gap")] == [jumped.open_time]  # type: ignore[attr-defined]
    a = next(a for a in out.alerts if a.rule == "candle.open_gap")
    assert a.values["open"] == "63100.00" and float(a.values["jump"]) > 0.019  # type: ignore[arg-type]


async def test_price_cross_venue_flags_a_close_far_from_the_other_venue(redis, settings) -> None:
    same = stubs.candle(0, exchange="kraken")
    far = bar(0, "61837.63", "64000.00", "61800.00", "63900.00", exchange="kraken")  # 3.3% above binance
    out = await validate(redis, settings, [stubs.candle(0), replace(far, open_time=stubs.candle(0).open_time)],
                         exchange="mixed")
    assert [e.exchange for e in out.flagged("price.cross_venue")] == ["kraken"]  # type: ignore[attr-defined]
    await redis.flushdb()
    quiet = await validate(redis, settings, [stubs.candle(0), same], exchange="mixed")
    assert quiet.flagged("price.cross_venue") == [] and quiet.alerts == []


# --- trades and tickers ----------------------------------------------------------------------------------

async def test_trade_id_gap_flags_the_trade_after_the_hole_and_publishes_a_gap(redis, settings) -> None:
    t0, t1, t5 = stubs.trade(0), stubs.trade(1), stubs.trade(5)
    out = await validate(redis, settings, [t0, t1, t5, stubs.trade(6)])
    assert out.valid == [t0, t1, replace(t5, quality=("trade.id_gap",)), stubs.trade(6)]
    a = out.alerts[0]
    assert (a.rule, a.values["first_missing_id"], a.values["last_missing_id"], a.values["missing"]) == \
        ("trade.id_gap", str(int(t1.trade_id) + 1), str(int(t5.trade_id) - 1), "3")
    g = out.gaps[0]
    assert (g.channel, g.start, g.end) == ("trades", t1.ts_event, t5.ts_event)
    assert f"{int(t1.trade_id) + 1}..{int(t5.trade_id) - 1}" in g.reason
    assert (g.first_missing_id, g.last_missing_id) == (str(int(t1.trade_id) + 1), str(int(t5.trade_id) - 1))


async def test_trade_id_gap_quiet_on_exchanges_without_sequential_ids(redis, settings) -> None:
    trades = [stubs.trade(i, exchange="hyperliquid", symbol="BTC/USDC:USDC") for i in (0, 7, 100)]
    out = await validate(redis, settings, trades, exchange="hyperliquid")
    assert out.valid == trades and out.alerts == []


async def test_trade_outside_book_flags_a_print_beyond_the_quote(redis, settings) -> None:
    quote = stubs.ticker(bid="61837.63", ask="61837.64")
    inside, outside = stubs.trade(0, price="61837.64"), stubs.trade(1, price="62500.00")  # 1.1% above the ask
    out = await validate(redis, settings, [quote, inside, outside])
    assert out.valid == [quote, inside, replace(outside, quality=("trade.outside_book",))]
    a = out.alerts[0]
    assert a.rule == "trade.outside_book" and a.values["price"] == "62500.00"


async def test_trade_outside_book_ignores_an_old_quote(redis, settings) -> None:
    minute_ago = stubs.T0_NS - 60_000_000_000
    quote = replace(stubs.ticker(), ts_event=minute_ago, ts_recv=minute_ago)  # a minute before the trade
    out = await validate(redis, settings, [quote, stubs.trade(1, price="62500.00")])
    assert out.alerts == [] and out.flagged("trade.outside_book") == []


async def test_time_stale_flags_old_data_and_throttles_its_alerts(redis, settings) -> None:
    late = [replace(stubs.trade(i), ts_recv=stubs.trade(i).ts_event + 120_000_000_000) for i in range(3)]
    fresh = stubs.trade(3)
    out = await validate(redis, settings, [*late, fresh])
    assert [e.trade_id for e in out.flagged("time.stale")] == [t.trade_id for t in late]  # type: ignore[attr-defined]
    assert out.rules() == ["time.stale"]  # one alert for the series within alert_interval_s ...
    assert out.counters["flagged.time.stale"] == 3  # ... every flag counted
    assert out.alerts[0].values["lag_s"] == "120.000"
    stale_ticker = replace(stubs.ticker(), ts_recv=stubs.T0_NS + 90_000_000_000)
    await redis.flushdb()
    out = await validate(redis, settings, [stale_ticker])
    assert out.valid == [stale_ticker] and out.rules() == ["time.stale"]


# --- the machinery ---------------------------------------------------------------------------------------

def test_a_batch_that_was_not_committed_is_judged_again_against_the_same_state() -> None:
    rules = StreamRules(QualitySettings())
    book = SeriesBook(10)
    first = book.stage()
    assert rules.judge(stubs.candle(0), first, NOW_TS).event == stubs.candle(0)
    first.commit()
    failed = book.stage()  # judged, then its publish failed: never committed
    assert rules.judge(stubs.candle(1), failed, NOW_TS).event == stubs.candle(1)
    retry = book.stage()
    verdict = rules.judge(stubs.candle(1), retry, NOW_TS)
    assert verdict.event == stubs.candle(1) and verdict.findings == []  # not a duplicate
    retry.commit()
    again = book.stage()
    assert [f.rule for f in rules.judge(stubs.candle(1), again, NOW_TS).findings] == ["time.duplicate"]


async def test_a_failed_publish_leaves_the_state_and_the_entry_for_redelivery(redis, settings) -> None:
    producer = Producer(redis, codec, FAST, "test")
    await producer.publish({streams.raw("binance"): [stubs.candle(0), stubs.candle(1)]})
    svc = Validator(settings)
    await svc.consumer.ensure_group(streams.raw("binance"))
    resp = await redis.xreadgroup("validator", svc.consumer_name, {streams.raw("binance"): ">"})
    deliveries = [Delivery(streams.raw("binance"), entry_id.decode(), codec.decode_entry(fields))
                  for _, entries in resp for entry_id, fields in entries]
    consumer = svc.consumer  # the bus path: handler, then publish + ack in one MULTI, then the on_acked commit
    consumer._stop, consumer._handler = asyncio.Event(), svc.handle
    assert await svc.lease.try_acquire()  # what consumer.run does first
    commit = svc.producer.commit

    async def refused(*args: object, **kwargs: object) -> None:
        raise ResponseError("EXECABORT Transaction discarded (simulated)")  # the MULTI/EXEC did not run
    svc.producer.commit = refused  # type: ignore[method-assign]
    await consumer._handle(deliveries)
    assert consumer.stats.failures >= 1 and consumer.stats.acked == 0
    assert len(svc.book) == 0  # nothing committed
    assert await redis.hlen("mdp:state:validator") == 0  # nor checkpointed
    assert int((await redis.xpending(streams.raw("binance"), "validator"))["pending"]) == len(deliveries)  # left
    svc.producer.commit = commit  # type: ignore[method-assign]
    await consumer._handle(deliveries)  # the bus's retry of the same entries
    assert await read(redis, streams.valid("binance")) == [stubs.candle(0), stubs.candle(1)]
    assert svc.counters()["repaired"] == 0  # the retried bar is not taken for a duplicate
    assert len(svc.book) > 0  # committed once published and acknowledged
    assert await redis.hlen("mdp:state:validator") == len(svc.book)  # and checkpointed with them
    assert int((await redis.xpending(streams.raw("binance"), "validator"))["pending"]) == 0
    await svc.close()


def test_series_beyond_the_cap_are_forgotten_least_recently_used_first() -> None:
    rules = StreamRules(QualitySettings())
    book = SeriesBook(4)  # each candle series also touches its (symbol, timeframe) venue table: 2 per symbol

    def judge(symbol: str) -> list[str]:
        staging = book.stage()
        verdict = rules.judge(stubs.candle(0, symbol=symbol), staging, NOW_TS)
        staging.commit()
        return [f.rule for f in verdict.findings]

    assert judge("A/USDT") == [] and judge("B/USDT") == []
    assert judge("A/USDT") == ["time.duplicate"]  # remembered, and now the most recently used
    assert judge("C/USDT") == []  # evicts B, the least recently used
    assert (len(book), book.evicted) == (4, 2)
    assert judge("A/USDT") == ["time.duplicate"]
    assert judge("B/USDT") == []  # forgotten: judged as the first bar of a new series


async def test_rule_counters_reach_the_heartbeat_and_mdp_status(redis, settings) -> None:
    events = [stubs.candle(0), stubs.candle(1), stubs.candle(1, c="61860.00"), stubs.trade(0, price="0"),
              bar(2, "61850.10", "61850.10", "61850.10", "61850.10", v="0")]
    producer = Producer(redis, codec, FAST, "test")
    await producer.publish({streams.raw("binance"): events})
    svc = Validator(settings)
    await run_until([svc], lambda: svc.consumer.stats.events == len(events))
    svc.redis = aioredis.Redis.from_url(settings.redis.url)
    await svc.heartbeat_once()
    st = await status_mod.collect(redis)
    counters = next(s.counters for s in st.services if s.service == "validator")
    assert counters["rejected.time.conflict"] == 1 and counters["rejected.price.non_positive"] == 1
    assert counters["flagged.volume.zero"] == 1 and counters["rejected"] == 2 and counters["flagged"] == 1
    await svc.redis.aclose()


# --- the real capture ------------------------------------------------------------------------------------

async def test_no_stream_rule_rejects_the_real_binance_capture(redis, settings) -> None:
    recording = Recording.load()
    trades: list[Event] = [Trade(exchange="binance", symbol="BTC/USDT", trade_id=str(t.id), price=Decimal(t.price),
                                 amount=Decimal(t.qty), side=t.side, ts_event=t.time * 1_000_000,
                                 ts_recv=t.recv_ns) for t in recording.trades]
    candles: list[Event] = [Candle(exchange="binance", symbol="BTC/USDT", timeframe="1m",
                                   open_time=c.open_time * 1_000_000, open=Decimal(c.open), high=Decimal(c.high),
                                   low=Decimal(c.low), close=Decimal(c.close), volume=Decimal(c.volume),
                                   closed=True, ts_event=c.close_time * 1_000_000,
                                   ts_recv=(c.close_time + 1) * 1_000_000) for c in recording.candles]
    packed = replace(FAST, batch_max_events=500, read_count=100)  # 40 entries: well under FAST's stream bound
    await Producer(redis, codec, packed, "test").publish({streams.raw("binance"): [*trades, *candles]})
    svc = Validator(Settings(redis=RedisSettings(url=settings.redis.url), bus=packed))
    await run_until([svc], lambda: svc.consumer.stats.events == len(trades) + len(candles), timeout=60)
    c = svc.counters()
    assert (c["passed"], c["rejected"], c["repaired"]) == (len(trades) + len(candles), 0, 0)
    assert c.get("flagged.trade.id_gap", 0) == 0 and c.get("alerted.time.gap", 0) == 0
    assert c["flagged"] == 0  # nothing in 11 real minutes trips a flag either
    valid = await read(redis, streams.valid("binance"))
    assert valid == [*trades, *candles]


def test_every_stream_rule_is_in_the_catalog() -> None:
    from common.domain.quality import CATALOG
    live = {n for n, e in CATALOG.items() if e.live}
    assert {"time.gap", "time.duplicate", "time.conflict", "time.out_of_order", "time.stale", "price.outlier",
            "price.cross_venue", "price.stuck", "volume.zero", "candle.open_gap", "trade.outside_book",
            "trade.id_gap"} <= live
    assert isinstance(Ticker, type)


# --- state across restarts, a second instance, trades never doubled (issue 10, defects 4 and 5) ------------

def capture_events() -> tuple[list[Trade], list[Candle]]:
    recording = Recording.load()
    trades = [Trade(exchange="binance", symbol="BTC/USDT", trade_id=str(t.id), price=Decimal(t.price),
                    amount=Decimal(t.qty), side=t.side, ts_event=t.time * 1_000_000, ts_recv=t.recv_ns)
              for t in recording.trades]
    candles = [Candle(exchange="binance", symbol="BTC/USDT", timeframe="1m", open_time=c.open_time * 1_000_000,
                      open=Decimal(c.open), high=Decimal(c.high), low=Decimal(c.low), close=Decimal(c.close),
                      volume=Decimal(c.volume), closed=True, ts_event=c.close_time * 1_000_000,
                      ts_recv=(c.close_time + 1) * 1_000_000) for c in recording.candles]
    return trades, candles


def faulty_feed(n: int = 3000) -> list[Event]:
    """`n` real trades with what a live feed does: a resent burst, a hole (trade.id_gap), the hole's trades
    arriving later (a repair), a redelivered old trade; and the real closed candles with a copy and a gap."""
    trades, candles = capture_events()
    t = trades[:n]
    feed: list[Event] = [*t[:500], *t[480:520], *t[520:900], *t[910:2000], *t[900:910], t[100], *t[2000:]]
    cs: list[Event] = [candles[0], candles[1], candles[1], *candles[3:6]]
    return [*feed[:1000], *cs[:3], *feed[1000:], *cs[3:]]


def comparable(events: list[Event]) -> list[Event]:
    """Outputs without the processing-time stamps (an alert's or a gap's ts_recv is the validator's clock)."""
    return [replace(e, ts_recv=0) if isinstance(e, (Alert, Gap)) else e for e in events]


async def outputs(redis: aioredis.Redis) -> dict[str, list[Event]]:
    return {s: comparable(await read(redis, s)) for s in (streams.valid("binance"), streams.ALERTS, streams.GAPS)}


async def publish_one_per_entry(redis: aioredis.Redis, settings: Settings, events: Sequence[Event]) -> None:
    small = replace(settings.bus, batch_max_events=1, stream_maxlen=100_000, backpressure_high_water=90_000)
    await Producer(redis, codec, small, "test").publish({streams.raw("binance"): list(events)})


async def test_a_restart_mid_stream_gives_the_outputs_of_an_uninterrupted_run(redis, settings) -> None:
    # Arrange: every flag alerted (no throttle by wall-clock time), entries of one event, read 50 at a time
    settings = replace(settings, quality=QualitySettings(alert_interval_s=0))
    feed = faulty_feed()
    await publish_one_per_entry(redis, settings, feed)
    whole = Validator(settings)
    await run_until([whole], lambda: whole.consumer.stats.acked == len(feed), timeout=60)
    expected = await outputs(redis)
    assert [a.rule for a in expected[streams.ALERTS]].count("trade.duplicate") == 21  # 20 resent + 1 old
    hole = capture_events()[0][900:910]
    assert [(g.channel, g.first_missing_id, g.last_missing_id) for g in expected[streams.GAPS]] == [  # type: ignore[union-attr]
        ("trades", hole[0].trade_id, hole[-1].trade_id), ("candle:1m", "", "")]
    await redis.flushdb()
    # Act: a new process (empty memory) after each cut: inside the resent burst, after the hole opened and
    # before its trades come, between the duplicated candle's copies
    cuts = [0, 510, 930, 1002, len(feed)]
    for start, end in itertools.pairwise(cuts):
        await publish_one_per_entry(redis, settings, feed[start:end])
        last = Validator(settings)
        await run_until([last], lambda v=last, n=end - start: v.consumer.stats.acked == n, timeout=60)  # type: ignore[misc]
    # Assert: the same valid events, alerts and gaps as without restarts; the last process loaded the state
    assert await outputs(redis) == expected
    assert last.checkpoint.loaded >= 2 and last.counters()["series_loaded"] >= 2


async def test_a_gap_and_a_duplicate_spanning_a_restart_are_seen(redis, settings) -> None:
    before = [stubs.trade(i) for i in range(10)] + [stubs.candle(0), stubs.candle(1)]
    await validate(redis, settings, before)
    # a new process: trades 10..14 and the 02:00 candle never come, trade 7 and candle 1 come again
    out = await validate(redis, settings, [stubs.trade(7), stubs.trade(15), stubs.candle(1), stubs.candle(3)])
    assert [e.trade_id if isinstance(e, Trade) else e.open_time for e in out.valid[len(before):]] == \
        [stubs.trade(15).trade_id, stubs.candle(3).open_time]
    assert [(g.channel, g.first_missing_id) for g in out.gaps] == [("trades", stubs.trade(10).trade_id),
                                                                  ("candle:1m", "")]
    assert sorted(out.rules()) == ["time.duplicate", "time.gap", "trade.duplicate", "trade.id_gap"]


async def test_trade_duplicate_keeps_exact_memory_of_ids_and_holes(redis, settings) -> None:
    # sequential ids: 3..4 become a hole; 3 fills it later (a repair), 1 and the second 5 were forwarded before
    seq = [stubs.trade(i) for i in (0, 1, 2, 5, 3, 1, 5, 4, 3)]
    out = await validate(redis, settings, seq)
    assert [e.trade_id for e in out.valid] == [stubs.trade(i).trade_id for i in (0, 1, 2, 5, 3, 4)]  # type: ignore[union-attr]
    assert out.rules().count("trade.duplicate") == 1  # then throttled like a flag: every copy is counted
    assert out.counters["repaired.trade.duplicate"] == 3 and out.counters["repaired"] == 3
    dup = next(a for a in out.alerts if a.rule == "trade.duplicate")
    assert dup.severity == "info" and dup.values["trade_id"] == stubs.trade(1).trade_id
    # ids in no order (Hyperliquid's tid): a recent-id set
    await redis.flushdb()
    hl = [replace(stubs.trade(i, exchange="hyperliquid", symbol="BTC/USDC:USDC"), trade_id=tid)
          for i, tid in enumerate(["913", "12", "500", "12", "77", "913"])]
    out = await validate(redis, settings, hl, exchange="hyperliquid")
    assert [e.trade_id for e in out.valid] == ["913", "12", "500", "77"]  # type: ignore[union-attr]
    assert out.counters["repaired.trade.duplicate"] == 2 and out.gaps == []


async def test_a_second_validator_waits_as_standby_and_takes_over_when_the_first_dies(redis, settings) -> None:
    # Arrange: one process's outputs
    settings = replace(settings, quality=QualitySettings(alert_interval_s=0))
    feed = faulty_feed(2500)
    await publish_one_per_entry(redis, settings, feed)
    one = Validator(settings)
    await run_until([one], lambda: one.consumer.stats.acked == len(feed), timeout=60)
    expected = await outputs(redis)
    await redis.flushdb()
    await publish_one_per_entry(redis, settings, feed)
    # Act: two at once; the holder is killed (no release: its lease must expire) with a batch in hand
    a, b = Validator(settings, instance="a"), Validator(settings, instance="b")
    stuck = asyncio.Event()
    for svc in (a, b):
        svc.handle = hang_after(svc, len(feed) // 2, stuck)  # type: ignore[method-assign]
    stop = asyncio.Event()
    tasks = {svc: asyncio.create_task(svc.run(stop)) for svc in (a, b)}
    try:
        async with asyncio.timeout(60):
            await stuck.wait()
            holder, standby = (a, b) if a.consumer.stats.acked else (b, a)
            assert standby.consumer.stats.acked == 0 and standby.consumer.stats.state == "standby"
            assert standby.counters() and standby.state == "standby"
            assert await pending(redis, "validator") > 0
            tasks[holder].cancel()  # killed: no clean stop, its entries left pending, lease not released
            while await pending(redis, "validator") or await lag(redis, "validator"):
                assert not tasks[standby].done()
                await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
        for svc in (a, b):
            await svc.close()
    # Assert: exactly one process's outputs, nothing doubled
    assert await outputs(redis) == expected
    assert standby.consumer.stats.acked > 0 and standby.checkpoint.loaded >= 1


def hang_after(svc: Validator, entries: int, stuck: asyncio.Event):
    """svc.handle, except that the batch after `entries` entries hangs (a process that froze, then is killed)."""
    handle = svc.handle

    async def gated(batch: list[Delivery]) -> object:
        if svc.consumer.stats.acked >= entries:
            stuck.set()
            await asyncio.Event().wait()
        return await handle(batch)
    return gated


async def pending(redis: aioredis.Redis, group: str) -> int:
    return int((await redis.xpending(streams.raw("binance"), group))["pending"])


async def lag(redis: aioredis.Redis, group: str) -> int:
    return int(next(g for g in await redis.xinfo_groups(streams.raw("binance")) if g["name"] == group.encode())["lag"])
