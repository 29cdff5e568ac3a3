"""Start private store servers from Debian's binaries: InfluxDB 1.x (`influxd`), Redis (`redis-server`), and a
Redis Cluster of three masters (`start_redis_cluster`).

Used by `make demo` (InfluxDB under var/ on 8086 when none answers there) and by the tests (private
instances on free ports, so a test never touches a user's data). Every wait is bounded; a server that
does not come up raises `StoreStartError` naming the binary, the port and the log file to read.

    python -m tools.localstores influxd --dir var/influxdb --port 8086     # start and wait, then exit
    python -m tools.localstores wait-influx http://127.0.0.1:8086
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path


class StoreStartError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


@dataclass
class LocalServer:
    name: str
    url: str
    process: subprocess.Popen[bytes] | None
    log_path: Path

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


def _require(binary: str, package: str) -> str:
    path = shutil.which(binary) or (f"/usr/bin/{binary}" if Path(f"/usr/bin/{binary}").exists() else None)
    if path is None:
        raise StoreStartError(f"{binary} is not installed; install Debian's {package!r} package "
                              f"(`make deps` does it: apt-get install -y {package})")
    return path


def influx_ping(url: str, timeout: float = 0.5) -> str | None:
    """The server's version from /ping's X-Influxdb-Version header, or None if it does not answer."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/ping", timeout=timeout) as resp:
            return str(resp.headers.get("X-Influxdb-Version") or "unknown")
    except (urllib.error.URLError, OSError):
        return None


def wait_influx(url: str, timeout: float = 30.0, log_path: Path | None = None) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        version = influx_ping(url)
        if version:
            return version
        time.sleep(0.1)
    hint = f"; read {log_path}" if log_path else ""
    raise StoreStartError(f"InfluxDB at {url} did not answer /ping within {timeout:.0f} s{hint}")


INFLUXD_CONFIG = """\
reporting-disabled = true
bind-address = "127.0.0.1:{rpc_port}"
[meta]
  dir = "{dir}/meta"
  logging-enabled = false
[data]
  dir = "{dir}/data"
  wal-dir = "{dir}/wal"
  query-log-enabled = false
  cache-snapshot-write-cold-duration = "10s"
  index-version = "inmem"
[monitor]
  store-enabled = false
[http]
  bind-address = "127.0.0.1:{port}"
  log-enabled = false
  pprof-enabled = false
  max-body-size = 50000000
[continuous_queries]
  log-enabled = false
"""


def start_influxd(data_dir: Path, port: int | None = None, timeout: float = 30.0) -> LocalServer:
    binary = _require("influxd", "influxdb")
    port = port or free_port()
    if port_open(port):
        raise StoreStartError(f"cannot start influxd on 127.0.0.1:{port}: the port is taken; stop what "
                              f"listens there or choose another port")
    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    config = data_dir / "influxdb.conf"
    config.write_text(INFLUXD_CONFIG.format(dir=data_dir, port=port, rpc_port=free_port()))
    log_path = data_dir / "influxd.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([binary, "-config", str(config)], stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_influx(url, timeout, log_path)
    except StoreStartError:
        proc.kill()
        raise
    return LocalServer("influxd", url, proc, log_path)


def start_redis(data_dir: Path, port: int | None = None, timeout: float = 10.0) -> LocalServer:
    binary = _require("redis-server", "redis-server")
    port = port or free_port()
    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir / "redis.log"
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(data_dir), "--logfile", str(log_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_open(port):
            return LocalServer("redis-server", f"redis://127.0.0.1:{port}/0", proc, log_path)
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    raise StoreStartError(f"redis-server did not listen on 127.0.0.1:{port} within {timeout:.0f} s; read {log_path}")


@dataclass
class ClusterNode:
    """One master of a `LocalCluster`: its own port, cluster bus port, directory (AOF, nodes.conf) and log."""

    port: int
    bus_port: int
    data_dir: Path
    process: subprocess.Popen[bytes] | None = None
    appendfsync: str = "always"  # or "everysec", as docs/operations.md runs the bus's Redis

    @property
    def log_path(self) -> Path:
        return self.data_dir / "redis.log"

    def start(self, binary: str, timeout: float = 10.0) -> None:
        """Start (or restart: the same nodes.conf and AOF, so it rejoins with its slots and its data)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
             "--cluster-port", str(self.bus_port), "--cluster-config-file", "nodes.conf",
             "--cluster-node-timeout", "2000", "--appendonly", "yes", "--appendfsync", self.appendfsync, "--save", "",
             "--dir", str(self.data_dir), "--logfile", str(self.log_path)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if port_open(self.port):
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        self.kill()
        raise StoreStartError(f"redis-server (cluster mode) did not listen on 127.0.0.1:{self.port} within "
                              f"{timeout:.0f} s; read {self.log_path}")

    def kill(self) -> None:
        """SIGKILL, as a crash: what the AOF holds is what comes back (everything with appendfsync always)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


@dataclass
class LocalCluster:
    """A real Redis Cluster of `len(nodes)` masters and no replicas on loopback ports (Debian's redis-server in
    cluster mode, joined with `redis-cli --cluster create`), every node with AOF, so a master killed and started
    again comes back with its slots and its data."""

    nodes: list[ClusterNode]
    binary: str

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.nodes[0].port}/0"

    def cli(self, node: ClusterNode, *args: str, timeout: float = 30.0) -> str:
        done = subprocess.run([_require("redis-cli", "redis-tools"), "-p", str(node.port), *args], check=False,
                              capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise StoreStartError(f"redis-cli -p {node.port} {' '.join(args)} failed ({done.returncode}): "
                                  f"{done.stdout}{done.stderr}")
        return done.stdout

    def state(self, node: ClusterNode) -> str:
        """cluster_state of CLUSTER INFO on `node`: "ok" once every slot is served."""
        for line in self.cli(node, "cluster", "info").splitlines():
            if line.startswith("cluster_state:"):
                return line.split(":", 1)[1].strip()
        return ""

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Until every node says cluster_state:ok (bounded; raises StoreStartError naming the logs)."""
        deadline = time.monotonic() + timeout
        states: list[str] = []
        while time.monotonic() < deadline:
            try:
                states = [self.state(n) for n in self.nodes]
            except (StoreStartError, subprocess.TimeoutExpired):
                states = []
            if states and all(s == "ok" for s in states):
                return
            time.sleep(0.1)
        raise StoreStartError(f"the local Redis Cluster on ports {[n.port for n in self.nodes]} did not reach "
                              f"cluster_state:ok within {timeout:.0f} s (states {states}); read "
                              f"{', '.join(str(n.log_path) for n in self.nodes)}")

    def serving(self, slot: int) -> ClusterNode:
        """The master serving hash slot `slot` (from CLUSTER NODES: each master's line ends with its ranges)."""
        for line in self.cli(self.nodes[0], "cluster", "nodes").splitlines():
            fields = line.split()
            if "master" not in fields[2]:
                continue
            port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
            for span in fields[8:]:
                low, _, high = span.partition("-")
                if low.isdigit() and int(low) <= slot <= int(high or low):
                    return next(n for n in self.nodes if n.port == port)
        raise StoreStartError(f"no master of the cluster on ports {[n.port for n in self.nodes]} serves slot {slot}")

    def stop(self) -> None:
        for node in self.nodes:
            if node.process is not None and node.process.poll() is None:
                node.process.terminate()
                try:
                    node.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    node.kill()


def start_redis_cluster(data_dir: Path, masters: int = 3, timeout: float = 30.0,
                        appendfsync: str = "always") -> LocalCluster:
    """Start `masters` cluster-mode redis-servers (each on a free port with its cluster bus on another: the
    default port + 10,000 does not exist above 55,535) and create the cluster over them."""
    binary = _require("redis-server", "redis-server")
    data_dir = data_dir.resolve()
    cluster = LocalCluster([ClusterNode(free_port(), free_port(), data_dir / f"node{i}", appendfsync=appendfsync)
                            for i in range(masters)], binary)
    try:
        for node in cluster.nodes:
            node.start(binary)
        cluster.cli(cluster.nodes[0], "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in cluster.nodes),
                    "--cluster-replicas", "0", "--cluster-yes", timeout=timeout)
        cluster.wait_ok(timeout)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.localstores")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("influxd", help="start a private influxd in the background and wait for it")
    p.add_argument("--dir", type=Path, required=True)
    p.add_argument("--port", type=int, default=8086)
    w = sub.add_parser("wait-influx", help="wait until InfluxDB answers /ping")
    w.add_argument("url")
    w.add_argument("--timeout", type=float, default=30.0)
    args = parser.parse_args(argv)
    try:
        if args.cmd == "influxd":
            url = f"http://127.0.0.1:{args.port}"
            version = influx_ping(url)
            if version:
                print(f"InfluxDB {version} already answers at {url}")
                return 0
            server = start_influxd(args.dir, args.port)
            (args.dir / "influxd.pid").write_text(str(server.process.pid if server.process else ""))
            print(f"InfluxDB {influx_ping(url)} started at {url} (data in {args.dir}, log {server.log_path})")
        else:
            print(f"InfluxDB {wait_influx(args.url, args.timeout)} answers at {args.url}")
    except StoreStartError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
