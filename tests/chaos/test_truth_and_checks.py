"""The chaos suite's own parts, fast: the ground truth read from the raw capture, and the checks that compare
what the pipeline stored with it (they must see a lost, a doubled, a wrong trade and a wrong bar)."""

from __future__ import annotations

import json
from decimal import Decimal
from itertools import pairwise
from pathlib import Path

from tools.chaos.checks import Check, check_recent_trades, compare_bars, compare_trades, id_ranges
from tools.chaos.faults import PROGRAMS, short_schedule, soak_schedule
from tools.chaos.truth import Truth


def test_truth_holds_every_recorded_trade_and_the_whole_bars(real_data: Path) -> None:
    truth = Truth.load(real_data)

    assert len(truth.trades) == 19_904  # README: the Binance spot capture's trades
    assert truth.trades[0].id == 3735683259 and truth.trades[0].price == Decimal("61837.63000000")
    assert truth.id_span == 19_904 and truth.loop_shift_ms == 12 * 60_000
    ones = truth.expected_bars(truth.trades, "1m")
    assert [b.open_time_ms for b in ones][:2] == [1723161300000, 1723161360000]  # 23:55, 23:56 (23:54 partial)
    assert len(ones) == 10 and sum(b.trades for b in ones) < len(truth.trades)
    fives = truth.expected_bars(truth.trades, "5m")
    assert [b.open_time_ms for b in fives] == [1723161300000, 1723161600000]
    assert fives[0].volume == sum((b.volume for b in ones[:5]), Decimal(0))
    assert truth.expected_bars(truth.trades, "15m") == []


def test_looped_truth_moves_ids_and_times_and_stops_at_the_last_id_sent(real_data: Path) -> None:
    truth = Truth.load(real_data)
    last = truth.trades[99].id + 2 * truth.id_span

    trades = truth.replayed(2, last)

    assert len(trades) == 2 * 19_904 + 100
    assert trades[19_904].id == truth.trades[0].id + truth.id_span
    assert trades[19_904].time_ms == truth.trades[0].time_ms + 12 * 60_000
    assert len({t.id for t in trades}) == len(trades)
    assert len(truth.expected_bars(trades, "15m")) == 1  # 00:00-00:15 lies inside two loops and a bit


def test_compare_trades_names_lost_doubled_foreign_and_wrong_trades(real_data: Path) -> None:
    truth = Truth.load(real_data)
    want = truth.trades[:10]
    got = [(str(t.id), str(t.price), str(t.qty), t.time_ms) for t in want[2:]]  # 0 and 1 lost
    got.append(got[0])  # doubled
    got.append(("1", "1", "1", 0))  # never sent
    got[3] = (got[3][0], "1.5", got[3][2], got[3][3])  # wrong price

    check = compare_trades("somewhere", want, got, "owner")

    assert not check.passed
    assert check.counts == {"expected": 10, "got_rows": 10, "lost": 2, "doubled": 1, "extra": 1, "wrong": 1}
    assert f"ids {want[0].id}..{want[1].id}" in check.evidence[0]
    assert "price 1.5 != " in check.evidence[3]
    assert compare_trades("x", want, [(str(t.id), t.price, t.qty, t.time_ms) for t in want], "o").passed


def test_compare_bars_names_the_bar_and_field_that_differ(real_data: Path) -> None:
    truth = Truth.load(real_data)
    bars = truth.expected_bars(truth.trades, "5m")
    got = {b.open_time_ms: [float(b.open), float(b.high), float(b.low), float(b.close), float(b.volume)]
           for b in bars}
    assert compare_bars("5m", bars, got, "aggregator").passed

    got[bars[1].open_time_ms][4] += 0.5
    del got[bars[0].open_time_ms]
    check = compare_bars("5m", bars, got, "aggregator")

    assert not check.passed and check.counts["missing"] == 1 and check.counts["wrong"] == 1
    assert "2024-08-09T00:00:00Z" in check.evidence[1] and "volume" in check.evidence[1]


def test_schedules_are_a_function_of_the_seed() -> None:
    a, b = short_schedule(5, 110), short_schedule(5, 110)

    assert [(f.kind, f.target, f.at_s, f.duration_s) for f in a] == [(f.kind, f.target, f.at_s, f.duration_s)
                                                                      for f in b]
    assert {f.target for f in a if f.kind == "kill9"} == set(PROGRAMS)  # every program once
    assert all(8.8 <= f.at_s <= 93.5 for f in a)
    soak = soak_schedule(5, 1800)
    assert len(soak) > 150 and all(x.at_s < y.at_s for x, y in pairwise(soak))
    assert id_ranges([5, 1, 2, 3, 9]) == "1..3, 5, 9"


async def test_the_cache_check_passes_the_rule_s_list_and_names_what_is_missing_or_doubled(real_data: Path,
                                                                                          redis) -> None:
    """check_recent_trades on a real Redis list: the list the cache publisher's rule makes passes, with a trade
    that reached md:trade late (a repair) left out; a trade md:trade carried in order missing, a trade twice,
    a wrong price or a stale head each fail it, named."""
    truth = Truth.load(real_data)
    trades = truth.trades[:40]
    as_stream = [(str(t.id), str(t.price), str(t.qty), t.time_ms) for t in trades]
    late = as_stream.pop(10)
    stream = [*as_stream[:30], late, *as_stream[30:]]  # trade 10 reached md:trade after 30 newer ones
    key = "recent_trades:binance:BTC/USDT"

    def tick(row: tuple[str, str, str, int], price: str | None = None) -> bytes:
        return json.dumps({"exchange": "binance", "symbol": "BTC/USDT", "trade_id": row[0], "price": price or row[1],
                           "amount": row[2], "side": "buy", "ts": row[3] * 1_000_000, "ts_recv": 0}).encode()

    async def check(rows: list[bytes], size: int = 20) -> Check:
        await redis.delete(key)
        if rows:
            await redis.rpush(key, *rows)
        return await check_recent_trades(redis, key, stream, trades, size)

    newest_first = [tick(r) for r in reversed(as_stream)]
    good = await check(newest_first[:20])
    whole = await check(newest_first, size=50)
    missing = await check([*newest_first[:5], *newest_first[6:21]])
    doubled = await check([*newest_first[:10], *newest_first[9:19]])
    wrong = await check([tick(as_stream[-1], "1.5"), *newest_first[1:20]])
    stale = await check(newest_first[1:21])

    assert good.passed and whole.passed, (good.evidence, whole.evidence)  # trade 10 (late) not listed: right
    assert whole.counts["listed"] == 39
    assert not missing.passed and missing.counts["missing"] == 1 and as_stream[-6][0] in missing.evidence[0]
    assert not doubled.passed and doubled.counts["doubled"] == 1
    assert not wrong.passed and wrong.counts["wrong_values"] == 1 and "cached 1.5 x" in wrong.evidence[-1]
    assert not stale.passed and "the head is" in stale.evidence[0]
