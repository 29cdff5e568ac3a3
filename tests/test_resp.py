"""The lean RESP connection (common/bus/resp.py) against a real redis-server: replies as redis-py gives them,
error replies naming the command, and a server that is killed, frozen or restarted raising redis-py's
ConnectionError/TimeoutError, never re-sending, and reconnecting on the next call."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError, WatchError
from redis.exceptions import TimeoutError as RedisTimeoutError

from common.bus.resp import RespConnection, WatchMismatch, lean_connection, pack
from tools.chaos.stores import DurableRedis


def test_pack_writes_what_redis_py_writes() -> None:
    from redis.asyncio.connection import Connection

    command = ("XADD", "raw:binance", "MAXLEN", "~", 100000, "*", b"v", b"\x00\xff", "f", 1.5)
    assert pack([command]) == b"".join(Connection().pack_command(*command))


async def test_a_transaction_returns_every_reply_and_selects_the_clients_db(redis_server) -> None:  # type: ignore[no-untyped-def]
    client = aioredis.Redis.from_url(redis_server.url.rsplit("/", 1)[0] + "/3")
    await client.flushdb()
    lean = lean_connection(client)
    assert lean is not None and lean.db == 3
    try:
        replies = await lean.transaction([("SADD", "reg", "s"), ("XADD", "s", "MAXLEN", "~", 100, "*", "d", b"\x01"),
                                          ("HSET", "pos", "a", "1", "b", "2"), ("SADD", "reg", "s")])
        assert replies[0] == 1 and replies[2] == 2 and replies[3] == 0
        assert replies[1].count(b"-") == 1  # the entry id
        assert await client.xlen("s") == 1 and await client.hgetall("pos") == {b"a": b"1", b"b": b"2"}
    finally:
        await lean.aclose()
        await client.flushdb()
        await client.aclose()


async def test_an_error_reply_names_the_command_and_the_connection_stays_usable(redis) -> None:  # type: ignore[no-untyped-def]
    lean = lean_connection(redis)
    assert lean is not None
    await redis.set("k", "a string")
    try:
        with pytest.raises(ResponseError, match="XADD k: WRONGTYPE"):
            await lean.transaction([("XADD", "k", "*", "d", "1")])
        with pytest.raises(ResponseError, match="NOSUCHCOMMAND"):  # refused when queued: EXECABORT
            await lean.transaction([("NOSUCHCOMMAND", "x"), ("SADD", "reg", "s")])
        assert await redis.exists("reg") == 0  # nothing of an aborted transaction ran
        assert await lean.transaction([("SADD", "reg", "s")]) == [1]
    finally:
        await lean.aclose()


async def test_concurrent_and_cancelled_transactions_get_their_own_replies(redis) -> None:  # type: ignore[no-untyped-def]
    import asyncio

    lean = lean_connection(redis)
    assert lean is not None
    try:
        replies = await asyncio.gather(*(lean.transaction([("INCRBY", f"k{i}", i), ("GET", f"k{i}")])
                                         for i in range(1, 21)))
        assert replies == [[i, str(i).encode()] for i in range(1, 21)]
        slow = asyncio.create_task(lean.transaction([("BLPOP", "nothing", 0.2)]))  # BLPOP in MULTI returns at once
        await asyncio.sleep(0)
        slow.cancel()
        with pytest.raises(asyncio.CancelledError):
            await slow
        assert await lean.transaction([("GET", "k3")]) == [b"3"]
    finally:
        await lean.aclose()


async def test_a_guarded_transaction_runs_only_while_its_key_holds_the_value(redis) -> None:  # type: ignore[no-untyped-def]
    lean = lean_connection(redis)
    assert lean is not None
    guard = ("lease", b"me")
    await redis.set("lease", "me")
    try:
        assert await lean.transaction([("INCR", "n")], watch=guard) == [1]
        await redis.set("lease", "other")
        with pytest.raises(WatchMismatch, match="lease holds b'other'"):
            await lean.transaction([("INCR", "n")], watch=guard)
        await redis.set("lease", "me")
        # The key is written (same value) between the WATCH and the MULTI/EXEC: the EXEC aborts.
        io, calls = lean._io, []

        async def io_with_a_write_between(commands, n):  # type: ignore[no-untyped-def]
            calls.append(commands[0][0])
            if commands[0][0] == "MULTI":
                await redis.set("lease", "me")
            return await io(commands, n)

        lean._io = io_with_a_write_between  # type: ignore[method-assign]
        with pytest.raises(WatchError, match="lease changed"):
            await lean.transaction([("INCR", "n")], watch=guard)
        assert calls == ["WATCH", "MULTI"]
        lean._io = io  # type: ignore[method-assign]
        assert await redis.get("n") == b"1"  # neither refused transaction ran
        assert await lean.transaction([("INCR", "n")], watch=guard) == [2]
        assert await lean.transaction([("INCR", "n")]) == [3]  # no WATCH left standing
    finally:
        await lean.aclose()


@pytest.mark.parametrize("client", ["lean", "redis-py"])
async def test_a_lease_guarded_commit_retries_on_its_own_renewal_and_stops_on_a_foreign_owner(
        redis, client: str) -> None:  # type: ignore[no-untyped-def]
    from common.bus.core import Transactions
    from common.bus.lease import Lease, LeaseLost

    lease = Lease(redis, "mdp:lease:test", "me", ttl_ms=10_000)
    assert await lease.try_acquire()
    tx = Transactions(redis)
    if client == "redis-py":
        tx._lean = False  # as for a TLS URL
    try:
        assert await tx.run([("INCR", "n")], lease) == [1]
        if client == "lean":  # our own renewal lands between the WATCH and the EXEC: retried, committed once
            await tx.run([], None)  # connects
            assert isinstance(tx._lean, RespConnection)
            io, renewed = tx._lean._io, list[int]()

            async def renew_between(commands, n):  # type: ignore[no-untyped-def]
                if commands[0][0] == "MULTI" and not renewed:
                    await lease.renew()
                    renewed.append(1)
                return await io(commands, n)

            tx._lean._io = renew_between  # type: ignore[method-assign]
            assert await tx.run([("INCR", "n")], lease) == [2]
            assert renewed == [1]
        await redis.set("mdp:lease:test", "another")
        with pytest.raises(LeaseLost, match="at commit the key names another"):
            await tx.run([("INCR", "n")], lease)
        assert await redis.get("n") == (b"2" if client == "lean" else b"1")
    finally:
        await tx.aclose()


async def test_killed_frozen_and_restarted_redis(tmp_path: Path) -> None:
    server = DurableRedis(tmp_path / "redis")
    server.start()
    lean = RespConnection(port=server.port, timeout_s=0.5)
    try:
        assert await lean.transaction([("INCR", "n")]) == [1]
        assert server.process is not None
        os.kill(server.process.pid, signal.SIGSTOP)  # frozen: the reply never comes
        try:
            with pytest.raises(RedisTimeoutError, match=f"127.0.0.1:{server.port}.*within 0.5 s"):
                await lean.transaction([("INCR", "n")])
        finally:
            os.kill(server.process.pid, signal.SIGCONT)
        # The timed-out transaction was sent once and is not re-sent: it ran once when the server woke.
        assert await lean.transaction([("GET", "n")]) == [b"2"]
        server.kill9()
        with pytest.raises(RedisConnectionError, match=f"127.0.0.1:{server.port}"):
            await lean.transaction([("INCR", "n")])
        with pytest.raises(RedisConnectionError, match="Connect call failed|refused"):
            await lean.transaction([("INCR", "n")])
        server.start()  # the next call connects again (what the AOF kept is Redis's business, not tested here)
        assert await lean.transaction([("SET", "after", "1"), ("INCR", "after")]) == [b"OK", 2]
    finally:
        await lean.aclose()
        server.stop()


async def test_a_redis_loading_its_aof_is_not_there_yet(tmp_path: Path) -> None:
    """While a restarted Redis loads its data it answers LOADING: raised as BusyLoadingError, a ConnectionError
    (the collector retries, a stage waits), as redis-py raises it, not as a ResponseError (that would end the
    process)."""
    import asyncio
    import time

    from redis.exceptions import BusyLoadingError

    server = DurableRedis(tmp_path / "redis")
    server.start()
    lean = RespConnection(port=server.port, timeout_s=5)
    restarted: asyncio.subprocess.Process | None = None
    try:
        admin = aioredis.Redis(port=server.port)
        fill = "for i = ARGV[1], ARGV[1] + 499999 do redis.call('SET', 'key:' .. i, i) end"
        for start in range(0, 3_000_000, 500_000):  # 3 million SETs in the AOF: seconds to read back
            await admin.eval(fill, 0, start)
        await admin.aclose()
        assert server.process is not None
        args = [str(a) for a in server.process.args]  # type: ignore[union-attr]
        server.kill9()
        restarted = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.DEVNULL,
                                                         stderr=asyncio.subprocess.DEVNULL, start_new_session=True)
        seen_loading = False
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                await lean.transaction([("INCR", "n")])
                break
            except BusyLoadingError as exc:
                assert isinstance(exc, RedisConnectionError) and "loading" in str(exc)
                seen_loading = True
            except RedisConnectionError:
                pass  # not listening yet
            await asyncio.sleep(0.01)
        else:
            pytest.fail("Redis did not come back within 60 s")
        assert seen_loading, "Redis answered LOADING at least once while it read 3 million keys"
    finally:
        await lean.aclose()
        server.stop()
        if restarted is not None and restarted.returncode is None:
            restarted.kill()
            await restarted.wait()


def test_tls_urls_keep_redis_py() -> None:
    assert lean_connection(aioredis.Redis.from_url("rediss://127.0.0.1:6380/0")) is None
    unix = lean_connection(aioredis.Redis.from_url("unix:///tmp/redis.sock?db=2"))
    assert unix is not None and unix.where == "unix:///tmp/redis.sock"
