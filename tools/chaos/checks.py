"""The chaos suite's checks: what the stores and streams hold, against the ground truth of tools/chaos/truth.py.

Each check returns a `Check`: its name, whether it passed, counts, and the precise evidence of a failure (which
trade ids are lost or doubled, on which stream or store; which bar differs and how; which Gap went unanswered;
which program is not RUNNING). Stream entries are read with XRANGE and decoded with plain msgpack (maps with a
`type` tag, the wire contract of the README), not with the pipeline's classes.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from typing import Any

import aiohttp
import msgspec
import redis.asyncio as aioredis

from tools.chaos.truth import TIMEFRAMES_MS, TrueBar, TrueTrade

SHOW = 25  # ids / bars listed in a failure, at most (the counts are always complete)
VOLUME_TOLERANCE = Decimal("1e-8")  # InfluxDB stores fields as float64: a sum of 8-decimal qtys may round
TIER = {"1m": "candles_1m", "5m": "candles_1m", "15m": "candles_1m", "1h": "candles_1h"}


@dataclass
class Check:
    name: str
    passed: bool
    counts: dict[str, int] = field(default_factory=dict)
    evidence: list[str] = field(default_factory=list)
    owner: str = ""  # who to route a failure to (the stage that produces what is checked)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def id_ranges(ids: list[int]) -> str:
    """12..15, 19, 30..31: a short text for many ids."""
    if not ids:
        return "-"
    ids = sorted(ids)
    parts: list[str] = []
    start = prev = ids[0]
    tail: list[int | None] = [*ids[1:], None]
    for i in tail:
        if i is not None and i == prev + 1:
            prev = i
            continue
        parts.append(str(start) if start == prev else f"{start}..{prev}")
        if i is not None:
            start = prev = i
    text = ", ".join(parts[:SHOW])
    return text + (f", ... ({len(parts) - SHOW} more ranges)" if len(parts) > SHOW else "")


def compare_trades(where: str, expected: list[TrueTrade], got: list[tuple[str, Any, Any, int]],
                   owner: str) -> Check:
    """`got`: (trade_id, price, amount, time_ms) as stored. Every expected id exactly once, values exact."""
    want = {t.id: t for t in expected}
    counts = Counter(int(g[0]) for g in got)
    lost = [i for i in want if i not in counts]
    doubled = {i: n for i, n in counts.items() if n > 1}
    extra = [i for i in counts if i not in want]
    wrong: list[str] = []
    for tid, price, amount, time_ms in got:
        t = want.get(int(tid))
        if t is None:
            continue
        problems = []
        if Decimal(str(price)) != t.price:
            problems.append(f"price {price} != {t.price}")
        if Decimal(str(amount)) != t.qty:
            problems.append(f"amount {amount} != {t.qty}")
        if time_ms != t.time_ms:
            problems.append(f"time {time_ms} ms != {t.time_ms} ms")
        if problems:
            wrong.append(f"id {tid}: " + ", ".join(problems))
    ev = []
    if lost:
        ev.append(f"{where}: {len(lost)} trade(s) LOST (absent after the drain), ids {id_ranges(lost)}")
    if doubled:
        ev.append(f"{where}: {len(doubled)} trade(s) DOUBLED ({sum(doubled.values()) - len(doubled)} extra copies), "
                  f"ids {id_ranges(list(doubled))}")
    if extra:
        ev.append(f"{where}: {len(extra)} trade id(s) that the exchange never sent, ids {id_ranges(extra)}")
    if wrong:
        ev.append(f"{where}: {len(wrong)} trade(s) with wrong values: " + "; ".join(wrong[:SHOW]))
    return Check(f"trades exactly once in {where}", not ev,
                 {"expected": len(want), "got_rows": len(got), "lost": len(lost), "doubled": len(doubled),
                  "extra": len(extra), "wrong": len(wrong)}, ev, owner)


def compare_bars(timeframe: str, expected: list[TrueBar], got: dict[int, list[Any]], owner: str) -> Check:
    """`got`: open time ms -> [open, high, low, close, volume] stored in InfluxDB (inside the checked span)."""
    want = {b.open_time_ms: b for b in expected}
    missing = [t for t in want if t not in got]
    extra = [t for t in got if t not in want]
    wrong: list[str] = []
    for t, b in want.items():
        row = got.get(t)
        if row is None:
            continue
        diffs = []
        for name, stored, true in zip(("open", "high", "low", "close"), row[:4], (b.open, b.high, b.low, b.close),
                                      strict=True):
            if stored is None or Decimal(str(stored)) != true:
                diffs.append(f"{name} {stored} != {true}")
        if row[4] is None or abs(Decimal(str(row[4])) - b.volume) > VOLUME_TOLERANCE:
            diffs.append(f"volume {row[4]} != {b.volume} ({b.trades} trades)")
        if diffs:
            wrong.append(f"{timeframe} bar {_iso(t)} ({t}): " + ", ".join(diffs))
    ev = []
    if missing:
        ev.append(f"{len(missing)} {timeframe} bar(s) MISSING: " + ", ".join(_iso(t) for t in missing[:SHOW]))
    if extra:
        ev.append(f"{len(extra)} {timeframe} bar(s) stored where no trade was: "
                  + ", ".join(_iso(t) for t in extra[:SHOW]))
    ev.extend(wrong[:SHOW])
    if len(wrong) > SHOW:
        ev.append(f"... {len(wrong) - SHOW} more wrong {timeframe} bars")
    return Check(f"{timeframe} bars equal to the truth", not ev,
                 {"expected": len(want), "stored": len(got), "missing": len(missing), "extra": len(extra),
                  "wrong": len(wrong)}, ev, owner)


def _iso(ms: int) -> str:
    import datetime as dt
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ----------------------------------------------------------------------------------------------------------
# Reading what the pipeline stored


async def influx_query(http: aiohttp.ClientSession, url: str, q: str, epoch: str = "ms",
                       timeout: float = 60.0) -> list[list[Any]]:
    async with http.get(f"{url}/query", params={"db": "market_data", "q": q, "epoch": epoch},
                        timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
        body = await resp.json(content_type=None)
    if resp.status != 200 or "error" in body or "error" in (body.get("results") or [{}])[0]:
        raise RuntimeError(f"InfluxDB query failed ({resp.status}): {q}: {body}")
    series = body["results"][0].get("series") or []
    return [row for s in series for row in s["values"]]


async def stored_trades(http: aiohttp.ClientSession, url: str, first_ms: int, last_ms: int,
                        chunk_ms: int = 3_600_000) -> list[tuple[str, Any, Any, int]]:
    """Binance BTC/USDT trades in InfluxDB's ticks tier between the times (queried an hour at a time)."""
    out: list[tuple[str, Any, Any, int]] = []
    t = first_ms
    while t <= last_ms:
        end = min(t + chunk_ms, last_ms + 1)
        rows = await influx_query(
            http, url, 'SELECT "trade_id", "price", "amount" FROM "ticks"."trades" WHERE "exchange" = \'binance\' '
            f'AND "symbol" = \'BTC/USDT\' AND time >= {t}ms AND time < {end}ms', epoch="ns")
        out.extend((str(r[1]), r[2], r[3], int(r[0]) // 1_000_000) for r in rows)
        t = end
    return out


async def stored_bars(http: aiohttp.ClientSession, url: str, timeframe: str, first_ms: int,
                      last_ms: int) -> dict[int, list[Any]]:
    rows = await influx_query(
        http, url, f'SELECT "open", "high", "low", "close", "volume" FROM "{TIER[timeframe]}"."ohlcv" '
        f'WHERE "exchange" = \'binance\' AND "symbol" = \'BTC/USDT\' AND "timeframe" = \'{timeframe}\' '
        f'AND time >= {first_ms}ms AND time <= {last_ms}ms')
    return {int(r[0]): r[1:6] for r in rows}


async def xrange_every(redis: aioredis.Redis, name: str) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """Every entry of `name` (mdp:alerts, mdp:gaps) and of its stream in each partition (`name`:p<k> on one
    node with bus.partitions > 1, `name`:{p<k>} on a Redis Cluster): the streams SCAN finds, on every master."""
    found = sorted({k.decode() async for k in redis.scan_iter(match=f"{name}*", _type="stream", count=1000)})
    out: list[tuple[bytes, dict[bytes, bytes]]] = []
    for stream in found:
        if stream == name or re.fullmatch(rf"{re.escape(name)}:(p\d+|\{{p\d+\}})", stream):
            out.extend(await xrange_all(redis, stream))
    return out


async def xrange_all(redis: aioredis.Redis, stream: str, count: int = 2000) -> list[tuple[bytes, dict[bytes, bytes]]]:
    out: list[tuple[bytes, dict[bytes, bytes]]] = []
    start: bytes | str = "-"
    while True:
        # redis-py types replies loosely; with decode_responses off an entry is (bytes id, {bytes: bytes})
        batch: list[tuple[bytes, dict[bytes, bytes]]] = await redis.xrange(stream, start, "+", count=count)  # type: ignore[assignment]
        if start != "-" and batch and batch[0][0] == start:
            batch = batch[1:]
        if not batch:
            return out
        out.extend(batch)
        start = batch[-1][0]


def decode_events(fields: dict[bytes, bytes]) -> list[dict[str, Any]]:
    """The events of one entry as plain maps (README: field `d` is a msgpack array of maps with `type`)."""
    events = msgspec.msgpack.decode(fields[b"d"])
    if not isinstance(events, list):
        raise TypeError(f"entry field d is a {type(events).__name__}, not an array of events")
    return events


async def stream_trades(redis: aioredis.Redis, stream: str) -> list[tuple[str, Any, Any, int]]:
    out = []
    for _, fields in await xrange_all(redis, stream):
        for e in decode_events(fields):
            if e.get("type") == "trade" and e.get("exchange") == "binance" and e.get("symbol") == "BTC/USDT":
                out.append((str(e["trade_id"]), e["price"], e["amount"], int(e["ts_event"]) // 1_000_000))
    return out


# ----------------------------------------------------------------------------------------------------------
# The cache


def in_order(stream: list[tuple[str, Any, Any, int]]) -> list[tuple[tuple[int, int], str]]:
    """The trades of md:trade (stream order) newer, by (exchange time, id), than every trade before them: the
    ones the cache publisher must list (services/cache_publisher: a trade older than the newest listed is
    not pushed, so one that reached md:trade late, a repair, may be missing; these may not)."""
    out: list[tuple[tuple[int, int], str]] = []
    for trade_id, _, _, ms in stream:
        key = (ms, int(trade_id))
        if not out or key > out[-1][0]:
            out.append((key, trade_id))
    return out


async def check_recent_trades(redis: aioredis.Redis, key: str, stream: list[tuple[str, Any, Any, int]],
                              expected: list[TrueTrade], size: int) -> Check:
    """The cache's recent-trades list (tick JSON, newest first) after the run: `size` trades (or all), the
    newest of md:trade at its head, none twice, newest first by time, each one of md:trade with the
    recording's price, amount and time, and none missing of the trades md:trade carried in order
    (`in_order`) since the oldest listed."""
    listed = [msgspec.json.decode(raw) for raw in await redis.lrange(key, 0, -1)]
    got = [str(t["trade_id"]) for t in listed]
    truth = {str(t.id): t for t in expected}
    on_stream = {t[0] for t in stream}
    ordered = in_order(stream)
    wrong = []
    for t in listed:
        want = truth.get(str(t["trade_id"]))
        seen = (Decimal(str(t["price"])), Decimal(str(t["amount"])), int(t["ts"]) // 1_000_000)
        if want is None or seen != (want.price, want.qty, want.time_ms):
            wrong.append(f"{t['trade_id']}: cached {seen[0]} x {seen[1]} at {seen[2]} ms, recorded "
                         + (f"{want.price} x {want.qty} at {want.time_ms} ms" if want else "no such trade"))
    doubled = [int(i) for i, n in Counter(got).items() if n > 1]
    foreign = [int(i) for i in got if i not in on_stream]
    keys = [(int(t["ts"]) // 1_000_000, int(t["trade_id"])) for t in listed]
    backwards = [got[i + 1] for i in range(len(keys) - 1) if keys[i + 1][0] > keys[i][0]]
    oldest = min(keys) if keys else None
    missing = [int(tid) for k, tid in ordered if oldest is not None and k > oldest and tid not in set(got)]
    head_ok = bool(got) and bool(ordered) and got[0] == ordered[-1][1]
    full = min(size, len(ordered)) <= len(got) <= size
    ev = []
    if not head_ok:
        ev.append(f"{key}: the head is {got[0] if got else 'nothing'}, md:trade's newest is "
                  f"{ordered[-1][1] if ordered else 'nothing'}")
    if missing:
        ev.append(f"{len(missing)} trade(s) md:trade carried in order are not listed: ids {id_ranges(missing)}")
    if doubled or foreign or backwards:
        ev.append(f"doubled ids {id_ranges(doubled)}; not on md:trade {id_ranges(foreign)}; listed after a "
                  f"newer one {', '.join(backwards[:SHOW]) or '-'}")
    if not full:
        ev.append(f"{len(got)} listed, {min(size, len(ordered))} expected (cache.recent_trades = {size})")
    if wrong:
        ev.append(f"{len(wrong)} listed trade(s) differ from the recording: " + "; ".join(wrong[:SHOW]))
    passed = head_ok and full and not (missing or doubled or foreign or backwards or wrong)
    return Check(f"the cache's {key}: md:trade's newest {size}, each once, none missing, values as recorded",
                 passed, {"listed": len(got), "missing": len(missing), "doubled": len(doubled),
                          "not_on_stream": len(foreign), "out_of_order": len(backwards), "wrong_values": len(wrong)},
                 ev, "cache_publisher")


# ----------------------------------------------------------------------------------------------------------
# Gaps


GAP_ANSWERS = ("gap.repaired", "gap.explained", "gap.unrepaired")


async def check_gaps(redis: aioredis.Redis) -> Check:
    """Every Gap on mdp:gaps answered by gap_repair: an alert (gap.repaired, gap.explained or gap.unrepaired)
    with the Gap's exchange, symbol, kind of channel and start. Unrepaired windows are listed (not a failure by
    themselves: the trade and bar checks say whether data is missing)."""
    gaps = [e for _, f in await xrange_every(redis, "mdp:gaps") for e in decode_events(f) if e.get("type") == "gap"]
    answers: dict[tuple[str, str, str, str], list[str]] = {}
    unrepaired: list[str] = []
    for _, f in await xrange_every(redis, "mdp:alerts"):
        for e in decode_events(f):
            if e.get("type") == "alert" and e.get("rule") in GAP_ANSWERS:
                v = e.get("values") or {}
                key = (e.get("exchange", ""), e.get("symbol", ""), _kind(str(v.get("channel", ""))),
                       str(v.get("start", "")))
                answers.setdefault(key, []).append(e["rule"])
                if e["rule"] == "gap.unrepaired":
                    unrepaired.append(f"{e.get('exchange')} {e.get('symbol')}: {e.get('reason')}")
    unanswered = []
    outcome: Counter[str] = Counter()
    for g in gaps:
        key = (g["exchange"], g["symbol"], _kind(g["channel"]), str(g["start"]))
        rules = answers.get(key)
        if not rules:
            unanswered.append(f"{g['exchange']} {g['symbol']} {g['channel']} [{_iso(g['start'] // 1_000_000)}, "
                              f"{_iso(g['end'] // 1_000_000)}) start={g['start']} end={g['end']} "
                              f"ids {g.get('first_missing_id') or '-'}..{g.get('last_missing_id') or '-'} "
                              f"reason {g['reason']!r}")
        else:
            outcome["unrepaired" if "gap.unrepaired" in rules else rules[0].split(".")[1]] += 1
    ev = [f"{len(unanswered)} Gap(s) on mdp:gaps with no gap_repair answer: " + "; ".join(unanswered[:SHOW])] \
        if unanswered else []
    info = [f"gap.unrepaired: {u}" for u in unrepaired[:SHOW]]
    return Check("every Gap repaired, explained or alerted gap.unrepaired", not unanswered,
                 {"gaps": len(gaps), "unanswered": len(unanswered), **outcome}, ev + info, "gap_repair")


def _kind(channel: str) -> str:
    """A Gap says `candles` or `trades`, gap_repair's alert `candle:1m` or `trades`: compare the kind."""
    return channel.partition(":")[0].rstrip("s")


async def alert_counts(redis: aioredis.Redis) -> dict[str, int]:
    c: Counter[str] = Counter()
    for _, f in await xrange_every(redis, "mdp:alerts"):
        for e in decode_events(f):
            if e.get("type") == "alert":
                c[f"{e.get('rule')} ({e.get('severity')})"] += 1
    return dict(c.most_common())


async def dead_letters(redis: aioredis.Redis) -> dict[str, int]:
    out = {}
    async for key in redis.scan_iter(match="dlq:*", _type="stream"):
        out[key.decode()] = await redis.xlen(key)
    return out


__all__ = [
    "TIMEFRAMES_MS",
    "Check",
    "alert_counts",
    "check_gaps",
    "compare_bars",
    "compare_trades",
    "dead_letters",
    "id_ranges",
    "stored_bars",
    "stored_trades",
    "stream_trades",
]
