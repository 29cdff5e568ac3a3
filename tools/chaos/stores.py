"""The chaos suite's private stores, each one the harness can break and mend.

- Redis: a private `redis-server` with `appendonly yes`, `appendfsync everysec`, in a temp dir, on a fixed free
  port, so that SIGKILL + restart brings back the same server (same port, same AOF) to the same clients.
  (tools/localstores.start_redis runs without persistence: the tests' throwaway instances.)
- InfluxDB: a private `influxd` (tools/localstores.start_influxd), frozen with SIGSTOP/SIGCONT, or killed and
  started again on the same port and data dir.
- PostgreSQL: a scratch database on the machine's server, reached only through `PgProxy`, a TCP proxy on
  127.0.0.1 that the harness cuts (listener closed, every open connection reset) and restores. A proxy rather
  than a private cluster: the server stays as the rest of the tests use it (no initdb/pg_ctl as the postgres
  user, no second cluster's memory on a 2-core machine), and "unreachable" is exactly what a client sees when
  the network or the server goes away (connection refused, connections dropped mid-query).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import asyncpg
from redis.crc import key_slot

from tools.localstores import (
    ClusterNode,
    LocalCluster,
    LocalServer,
    StoreStartError,
    free_port,
    port_open,
    start_influxd,
    start_redis_cluster,
)


class DurableRedis:
    """redis-server with AOF in `data_dir` on `port`; `kill9()` and `start()` again keep both."""

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = data_dir.resolve()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.log_path = self.data_dir / "redis.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
             "--appendfsync", "everysec", "--dir", str(self.data_dir), "--logfile", str(self.log_path)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:  # listening is not enough: it answers LOADING while replaying the AOF
            if port_open(self.port):
                out = subprocess.run(["redis-cli", "-p", str(self.port), "ping"], check=False, capture_output=True, text=True,
                                     timeout=5)
                if out.stdout.strip() == "PONG":
                    return
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise StoreStartError(f"redis-server (AOF) did not answer PING on 127.0.0.1:{self.port} within "
                              f"{timeout:.0f} s; read {self.log_path}")

    def kill9(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


class DurableCluster:
    """A local Redis Cluster of three masters with AOF (everysec, as DurableRedis); `kill9()` SIGKILLs the
    master serving `victim_key`'s hash slot and `start()` starts it again, with its nodes.conf and AOF."""

    def __init__(self, data_dir: Path, victim_key: str) -> None:
        self.data_dir = data_dir.resolve()
        self.victim_key = victim_key
        self.cluster: LocalCluster | None = None
        self.victim: ClusterNode | None = None

    @property
    def url(self) -> str:
        assert self.cluster is not None, "start() first"
        return self.cluster.url

    def start(self, timeout: float = 30.0) -> None:
        if self.cluster is None:
            self.cluster = start_redis_cluster(self.data_dir, timeout=timeout, appendfsync="everysec")
            return
        assert self.victim is not None
        self.victim.start(self.cluster.binary)
        self.cluster.wait_ok(timeout)

    def kill9(self) -> None:
        assert self.cluster is not None, "start() first"
        self.victim = self.cluster.serving(key_slot(self.victim_key.encode()))
        self.victim.kill()

    def stop(self) -> None:
        if self.cluster is not None:
            self.cluster.stop()


class RestartableInflux:
    """A private influxd that can be frozen, killed and started again on the same port and data dir."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.server: LocalServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.server is not None and self.server.process is not None
        return self.server.process.pid

    def start(self) -> None:
        self.server = start_influxd(self.data_dir, self.port, timeout=60.0)

    def freeze(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def kill9(self) -> None:
        assert self.server is not None and self.server.process is not None
        self.server.process.kill()
        self.server.process.wait(timeout=10)

    def stop(self) -> None:
        if self.server is not None:
            with contextlib.suppress(ProcessLookupError):
                self.thaw()
            self.server.stop()


class PgProxy:
    """A TCP proxy 127.0.0.1:port -> the PostgreSQL server; `cut()` makes it unreachable, `restore()` not."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.StreamWriter] = set()
        self.cut_now = False

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port, reuse_address=True)
        self.cut_now = False

    async def cut(self) -> None:
        self.cut_now = True
        if self._server is not None:
            self._server.close()
            self._server = None
        for w in list(self._conns):
            w.transport.abort()
        self._conns.clear()

    async def restore(self) -> None:
        await self.start()

    async def stop(self) -> None:
        await self.cut()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.wait_for(asyncio.open_connection(*self.target), 5)
        except (OSError, TimeoutError):
            writer.transport.abort()
            return
        self._conns.update((writer, up_w))

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass  # the other side went away (or the proxy was cut): both sockets are closed below
            finally:
                dst.transport.abort()

        await asyncio.gather(pump(reader, up_w), pump(up_r, writer))
        self._conns.discard(writer)
        self._conns.discard(up_w)


async def create_scratch_db(admin_dsn: str, name: str) -> str:
    """A fresh database `name` on the server of `admin_dsn`; returns its DSN."""
    admin = await asyncpg.connect(admin_dsn, timeout=10)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    return f"{admin_dsn.rsplit('/', 1)[0]}/{name}"


async def drop_scratch_db(admin_dsn: str, name: str) -> None:
    admin = await asyncpg.connect(admin_dsn, timeout=10)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()
