"""A lean RESP connection for the bus's hottest commit: one MULTI/EXEC packed here, its replies parsed by hiredis.

redis-py's asyncio pipeline costs about 170-200 us of CPU per MULTI/EXEC on these machines (a task for each
`wait_for` and `shield`, per-command packing and response callbacks, the pool's bookkeeping); this connection
sends the same bytes for about 30 us. Every commit of the bus goes through it (`core.Transactions`: the
collector's rounds, each stage's outputs, acknowledgements and state checkpoint; docs/collector.md, "Batching
and memory"); reads and the cold calls keep redis-py.

Same guarantees as the redis-py client made by `core.without_retries`: a transaction is sent once and never
re-sent; a connection that fails or times out is closed (the next call connects again) and the failure is
raised as redis-py's ConnectionError or TimeoutError, so callers handle one set of exceptions; an error reply
is raised as redis-py's ResponseError naming the command, except LOADING (a restarted Redis reading its AOF),
raised as redis-py's BusyLoadingError, a ConnectionError, as redis-py raises it: Redis is not there yet. Plain TCP and unix sockets; a TLS URL (`rediss://`)
gets None from `lean_connection` and its caller keeps redis-py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import hiredis
import redis.asyncio as aioredis
from redis.exceptions import BusyLoadingError, ResponseError, WatchError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

Arg = bytes | str | int | float
Command = Sequence[Arg]

READ_CHUNK = 65536


class WatchMismatch(Exception):
    """A guarded transaction did not run: its watched key did not hold the expected value."""

    def __init__(self, key: str, found: bytes | None) -> None:
        super().__init__(f"{key} holds {found!r}")
        self.key = key
        self.found = found


def _arg(a: Arg) -> bytes:
    if isinstance(a, bytes):
        return a
    if isinstance(a, str):
        return a.encode()
    return repr(a).encode() if isinstance(a, float) else str(a).encode()


def pack(commands: Sequence[Command]) -> bytes:
    """The RESP bytes of `commands` (arrays of bulk strings), as redis-py's pack_command writes them."""
    out: list[bytes] = []
    for command in commands:
        out.append(b"*%d\r\n" % len(command))
        for a in command:
            b = _arg(a)
            out.append(b"$%d\r\n" % len(b))
            out.append(b)
            out.append(b"\r\n")
    return b"".join(out)


class RespConnection:
    """One connection to the server a redis-py client points at (host/port or unix path, db, credentials), for
    `transaction`. Tasks that share it take turns (a lock: one transaction on the wire at a time)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 6379, path: str = "", db: int = 0,
                 username: str | None = None, password: str | None = None, timeout_s: float = 5.0) -> None:
        self.host, self.port, self.path, self.db = host, port, path, db
        self.username, self.password = username, password
        self.timeout_s = timeout_s
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._parser = hiredis.Reader(replyError=ResponseError)
        self._lock = asyncio.Lock()

    @property
    def where(self) -> str:
        return f"unix://{self.path}" if self.path else f"redis://{self.host}:{self.port}/{self.db}"

    async def _connect(self) -> None:
        if self.path:
            self._reader, self._writer = await asyncio.open_unix_connection(self.path, limit=READ_CHUNK)
        else:
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port, limit=READ_CHUNK)
        self._parser = hiredis.Reader(replyError=ResponseError)
        hello: list[Command] = []
        if self.password is not None:
            hello.append(("AUTH", self.username, self.password) if self.username else ("AUTH", self.password))
        if self.db:
            hello.append(("SELECT", self.db))
        if hello:
            self._writer.write(pack(hello))
            for reply in await self._replies(len(hello)):
                if isinstance(reply, ResponseError):
                    raise RedisConnectionError(f"{self.where} refused the connection's set-up: {reply}")

    async def _replies(self, n: int) -> list[Any]:
        assert self._reader is not None
        parser = self._parser
        out: list[Any] = []
        while len(out) < n:
            reply = parser.gets()
            if reply is False:
                chunk = await self._reader.read(READ_CHUNK)
                if not chunk:
                    raise RedisConnectionError(f"{self.where} closed the connection")
                parser.feed(chunk)
                continue
            out.append(reply)
        return out

    async def transaction(self, commands: Sequence[Command], watch: tuple[str, bytes] | None = None) -> list[Any]:
        """Run `commands` in one MULTI/EXEC; their replies, in order. With `watch` (key, value): first WATCH the
        key and read it (one round trip); if it does not hold `value` nothing runs and `WatchMismatch` is
        raised, and if it changes before the EXEC the EXEC aborts and redis-py's WatchError is raised (a lease
        guard: core.Transactions). Raises ResponseError for a command Redis refused (naming it),
        ConnectionError/TimeoutError when the connection failed (it is closed; whether the EXEC ran is for the
        caller to find out: it is never re-sent)."""
        async with self._lock:
            if watch is not None:
                key, expected = watch
                ok, found = await self._io([("WATCH", key), ("GET", key)], 2)
                for verb, reply in (("WATCH", ok), ("GET", found)):
                    if isinstance(reply, ResponseError):
                        self.close()  # the WATCH may stand: a fresh connection has none
                        raise _error((verb, key), reply, self.where)
                if found != expected:
                    self.close()
                    raise WatchMismatch(key, found)
            replies = await self._io([("MULTI",), *commands, ("EXEC",)], len(commands) + 2)
        result = replies[-1]
        # Refused when queued (MULTI itself, or a command): Redis then answers EXECABORT for the whole.
        for command, reply in zip([("MULTI",), *commands], replies[:-1], strict=True):
            if isinstance(reply, ResponseError):
                raise _error(command, reply, self.where)
        if result is None and watch is not None:
            raise WatchError(f"{watch[0]} changed between WATCH and EXEC; nothing ran")
        if isinstance(result, ResponseError) or result is None:
            raise _error(("EXEC", f"of {len(commands)} commands"), result or ResponseError("aborted"), self.where)
        for command, reply in zip(commands, result, strict=True):
            if isinstance(reply, ResponseError):
                raise _error(command, reply, self.where)
        return list(result)

    async def _io(self, commands: Sequence[Command], n: int) -> list[Any]:
        """Send `commands` in one write and read `n` replies (connecting first if need be)."""
        try:
            async with asyncio.timeout(self.timeout_s):
                if self._writer is None:
                    await self._connect()
                assert self._writer is not None
                self._writer.write(pack(commands))
                return await self._replies(n)
        except TimeoutError:
            self.close()
            raise RedisTimeoutError(f"no reply from {self.where} within {self.timeout_s:g} s") from None
        except (OSError, EOFError, asyncio.IncompleteReadError, hiredis.ProtocolError) as exc:
            self.close()
            raise RedisConnectionError(f"connection to {self.where} failed: {type(exc).__name__}: {exc}") from exc
        except BaseException:  # refused at set-up, closed by the server, or cancelled with commands on the
            self.close()       # wire (their replies would answer the next call's)
            raise

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None

    async def aclose(self) -> None:
        writer = self._writer
        self.close()
        if writer is not None:
            try:
                await writer.wait_closed()
            except OSError:
                pass


class SlotMoved(RedisConnectionError):
    """A Redis Cluster answered MOVED, ASK, TRYAGAIN or CLUSTERDOWN: the slot is served elsewhere, or not yet.
    Nothing ran (a transaction with a refused command is aborted whole, EXECABORT); callers treat it as Redis
    unreachable for a moment, and the slot map is read afresh (core.Transactions)."""


CLUSTER_REDIRECTS = ("MOVED ", "ASK ", "TRYAGAIN", "CLUSTERDOWN")


def _name(command: Command) -> str:
    return " ".join(_arg(a).decode(errors="replace") for a in command[:2])


def _error(command: Command, reply: ResponseError, where: str) -> RedisConnectionError | ResponseError:
    """The exception for an error reply to `command`: BusyLoadingError (a ConnectionError) while Redis loads its
    data, as redis-py raises it; SlotMoved (a ConnectionError) when a cluster node does not serve its slot;
    else ResponseError naming the command."""
    if str(reply).startswith("LOADING"):
        return BusyLoadingError(f"{where} is loading its data ({reply}); {_name(command)} not run")
    if str(reply).startswith(CLUSTER_REDIRECTS):
        return SlotMoved(f"{where} does not serve {_name(command)} now ({reply}); nothing ran")
    return ResponseError(f"{_name(command)}: {reply}")


def lean_connection(redis: aioredis.Redis) -> RespConnection | None:
    """A RespConnection to the server `redis` points at, or None when it cannot speak for it (TLS)."""
    pool = redis.connection_pool
    kw = pool.connection_kwargs
    if "ssl" in pool.connection_class.__name__.lower() or kw.get("ssl"):
        return None
    timeout = kw.get("socket_timeout") or 5.0
    return RespConnection(host=kw.get("host", "127.0.0.1"), port=int(kw.get("port", 6379)), path=kw.get("path", ""),
                          db=int(kw.get("db", 0) or 0), username=kw.get("username"), password=kw.get("password"),
                          timeout_s=float(timeout))


def master_connection(cluster: Any, host: str, port: int) -> RespConnection:
    """A RespConnection to one master of a Redis Cluster (redis-py's RedisCluster `cluster`), with the client's
    credentials and timeout."""
    kw = cluster.connection_kwargs
    return RespConnection(host=host, port=port, username=kw.get("username"), password=kw.get("password"),
                          timeout_s=float(kw.get("socket_timeout") or 5.0))
