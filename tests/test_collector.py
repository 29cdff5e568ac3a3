"""The collector in-process against the simulator replaying the real Binance capture, through the real ccxt.pro."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import msgspec
import pytest

from common.bus import streams
from common.config import Settings
from schemas import Candle, Codec, Market, Trade
from services.collector.service import Collector
from simulator import start_simulator
from tests.collecting import RestartableRedis, collector_settings, read, run_collector

N = 3000
BOTH = ("btcusdt@trade", "btcusdt@kline_1m")


async def test_collects_every_recorded_trade_and_closed_candle_exactly_once(settings: Settings, redis) -> None:
    # Arrange
    async with start_simulator(speed=0, max_trades=N, wait_for_streams=BOTH) as sim:
        cfg = collector_settings(settings, sim.rest_url, sim.ws_url)
        collector = Collector(cfg, "t", exchange="binance")
        expected_trades = sim.expected_trades()
        expected_candles = sim.expected_candles()[:-1]  # the last one is never followed by a later candle

        async def done() -> bool:
            return collector.count["trades"] >= N and collector.count["candles_closed"] >= len(expected_candles)

        # Act
        await run_collector(collector, done)
    # Assert
    events = await read(redis, streams.raw("binance"))
    trades = [e for e in events if isinstance(e, Trade)]
    assert [t.trade_id for t in trades] == [str(t.id) for t in expected_trades]
    assert [(t.price, t.amount) for t in trades[:3]] == [(Decimal(t.price), Decimal(t.qty))
                                                         for t in expected_trades[:3]]
    assert all(t.ts_event == x.time * 1_000_000 for t, x in zip(trades, expected_trades, strict=True))
    closed = [e for e in events if isinstance(e, Candle) and e.closed]
    assert [c.open_time // 1_000_000 for c in closed] == [c.open_time for c in expected_candles]
    for got, want in zip(closed, expected_candles, strict=True):
        assert (got.open, got.high, got.low, got.close) == tuple(Decimal(x) for x in (want.open, want.high, want.low, want.close))
        assert got.volume == Decimal(want.volume)
    markets = [e for e in events if isinstance(e, Market)]
    assert any(m.symbol == "BTC/USDT" and m.exchange_symbol == "BTCUSDT" for m in markets)


async def test_malformed_rest_body_is_passed_on_for_rejection_and_collection_goes_on(settings: Settings, redis) -> None:
    async with start_simulator(speed=0, max_trades=N, wait_for_streams=BOTH) as sim:
        cfg = collector_settings(settings, sim.rest_url, sim.ws_url, ws_stall_s=1.0, rest_poll_s=0.5)
        collector = Collector(cfg, "t", exchange="binance")
        sim.inject("malformed_klines", count=1)

        async def done() -> bool:
            # The replay ends, the candle socket goes quiet, the collector polls REST: first the malformed body,
            # then a good one.
            return collector.count["rest_polls"] >= 2 and collector.count["trades"] >= N

        await run_collector(collector, done)
    events = await read(redis, streams.raw("binance"))
    broken = [e for e in events if isinstance(e, Candle) and e.open is None]
    assert broken, "the malformed body's rows should reach raw:binance for the validator to reject"
    assert all(c.source == "rest" for c in broken)
    assert collector.count["trades"] == N


async def test_disconnect_is_survived_with_a_reconnect(settings: Settings, redis) -> None:
    async with start_simulator(speed=5, max_trades=N, wait_for_streams=BOTH) as sim:
        cfg = collector_settings(settings, sim.rest_url, sim.ws_url)
        collector = Collector(cfg, "t", exchange="binance")
        stop = asyncio.Event()
        task = asyncio.create_task(collector.run(stop))
        async with asyncio.timeout(30):
            while collector.count["trades"] < 100:
                await asyncio.sleep(0.05)
        before = collector.count["trades"]
        await sim.disconnect_all()
        async with asyncio.timeout(30):
            while collector.count["trades"] < before + 200:
                await asyncio.sleep(0.05)
        stop.set()
        await asyncio.wait_for(task, 20)
        await collector.close()
    assert collector.count["reconnects"] >= 1
    ids = [int(e.trade_id) for e in await read(redis, streams.raw("binance")) if isinstance(e, Trade)]
    assert ids == sorted(set(ids)), "no trade published twice, none out of order"


def test_shards_split_symbols_stably() -> None:
    symbols = [f"S{i}/USDT" for i in range(200)]
    shards = [Collector._shard(symbols, f"{i}/3") for i in range(3)]
    assert sorted(s for shard in shards for s in shard) == sorted(symbols)
    assert all(shards)
    assert Collector._shard(symbols, "1/3") == shards[1]
    with pytest.raises(SystemExit, match="must be i/n"):
        Collector._shard(symbols, "3/3")


async def test_redis_outage_loses_no_trade(settings: Settings, tmp_path) -> None:
    """Redis goes away mid-replay and comes back (with its append-only file): every trade still lands once."""
    import redis.asyncio as aioredis

    server = RestartableRedis(tmp_path)
    await server.start()
    try:
        async with start_simulator(speed=20, max_trades=N, wait_for_streams=BOTH) as sim:
            cfg = collector_settings(msgspec.structs.replace(settings, redis=msgspec.structs.replace(
                settings.redis, url=server.url)), sim.rest_url, sim.ws_url)
            collector = Collector(cfg, "t", exchange="binance")
            stop = asyncio.Event()
            task = asyncio.create_task(collector.run(stop))
            async with asyncio.timeout(30):
                while collector.count["trades"] < 300:
                    await asyncio.sleep(0.02)
            server.stop()
            await asyncio.sleep(2.0)  # the replay goes on; publishing fails meanwhile
            await server.start()
            async with asyncio.timeout(60):
                while collector.count["trades"] < N:
                    assert not task.done(), task
                    await asyncio.sleep(0.05)
            stop.set()
            await asyncio.wait_for(task, 20)
            await collector.close()
        client = aioredis.Redis.from_url(server.url)
        ids = [int(e.trade_id) for _, f in await client.xrange(streams.raw("binance"))
               for e in Codec().decode_entry(f) if isinstance(e, Trade)]
        await client.aclose()
        first = 3735683259
        assert collector.count["publish_retries"] >= 1, "the outage should have been felt"
        assert ids == list(range(first, first + N))
    finally:
        server.stop()


async def test_a_burst_four_times_the_trade_cache_loses_no_trade(settings: Settings, redis, monkeypatch) -> None:
    """ccxt.pro's trade cache only has to hold what arrives between two reads by the feed: ccxt drains aiohttp's
    WebSocket queue (at most 512 KiB of payload, about 1,900 Binance trade messages) and the woken feed reads the
    cache before the next drain. So the whole replay sent at once (speed 0) through a cache of a quarter of its
    size, on ccxt's own decode path, loses no trade (docs/collector.md, "Batching and memory")."""
    from services.collector.symbols import SymbolState

    burst, limit = 8_000, 2_000
    taken: list[int] = []
    new_trades = SymbolState.new_trades

    def counting(self: SymbolState, trades: list[dict[str, object]]) -> list[dict[str, object]]:
        fresh = new_trades(self, trades)
        taken.append(len(fresh))
        return fresh

    monkeypatch.setattr(SymbolState, "new_trades", counting)
    # Arrange
    async with start_simulator(speed=0, max_trades=burst, wait_for_streams=("btcusdt@trade",)) as sim:
        cfg = collector_settings(settings, sim.rest_url, sim.ws_url, channels=["trades"], trades_limit=limit,
                                 fast_path={"trades": False})
        collector = Collector(cfg, "t", exchange="binance")
        expected = [str(t.id) for t in sim.expected_trades()]

        async def done() -> bool:
            return collector.count["trades"] >= burst

        # Act
        await run_collector(collector, done)
    # Assert
    trades = [e for e in await read(redis, streams.raw("binance")) if isinstance(e, Trade)]
    assert [t.trade_id for t in trades] == expected, "every trade of the burst, once, in order"
    assert len(expected) == burst > 3 * limit
    assert 1 < max(taken) <= limit, f"a wake-up took {max(taken)} trades: more than one drain of aiohttp's queue"


def test_the_collector_process_imports_only_the_ccxt_exchanges_it_uses() -> None:
    """services/collector/lazy_ccxt.py: ccxt's packages import an exchange on first use, not all ~110 x 3 at
    start (109 MB resident); a fresh process importing the collector and building one exchange loads only it
    (and what it inherits from)."""
    import subprocess
    import sys
    from pathlib import Path

    code = """
import sys
import services.collector.service
import ccxt, ccxt.pro
exchange = ccxt.pro.binanceusdm()
packages = {"ccxt": ccxt.exchanges, "ccxt.async_support": ccxt.async_support.exchanges, "ccxt.pro": ccxt.pro.exchanges}
loaded = sorted(m for p, ids in packages.items() for m in sys.modules if m.rpartition(".")[0] == p
                and m.rpartition(".")[2] in ids)
print(" ".join(loaded), len(ccxt.pro.exchanges), type(exchange).__name__)
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parent.parent, check=True,
                         capture_output=True, text=True, timeout=60).stdout.split()
    *loaded, known, name = out
    assert name == "binanceusdm" and int(known) > 50
    assert loaded == ["ccxt.async_support.binance", "ccxt.async_support.binanceusdm", "ccxt.pro.binance",
                      "ccxt.pro.binanceusdm"], loaded
