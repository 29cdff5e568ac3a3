"""Configuration errors name the key, the value and the fix; endpoint rewriting; heartbeats and `mdp status`."""

from __future__ import annotations

import asyncio
from pathlib import Path

import ccxt.pro
import pytest

from common import status
from common.bus import streams
from common.bus.core import Producer
from common.bus.stage import Service
from common.config import ConfigError, ExchangeSettings, Settings, load_settings
from common.exchanges.clients import apply_endpoints, rewrite_url
from tests import stubs

ROOT = Path(__file__).resolve().parent.parent


def test_shipped_configs_load() -> None:
    for name in ("simulator.toml", "live.toml"):
        s = load_settings(ROOT / "config" / name, env={})
        assert s.exchange("binance").symbols


def test_environment_overrides_store_addresses() -> None:
    s = load_settings(ROOT / "config" / "simulator.toml",
                      env={"MDP_REDIS_URL": "redis://10.0.0.1:1/2", "MDP_INFLUX_URL": "http://h:9"})
    assert s.redis.url == "redis://10.0.0.1:1/2"
    assert s.influx.url == "http://h:9"


@pytest.mark.parametrize(("text", "expected"), [
    ("[bus]\nstream_maxlen = 5\n", "bus.stream_maxlen = 5"),
    ("[bus]\nstream_maxlen = 'many'\n", "Expected `int`"),
    ("[redis]\nurll = 'x'\n", "unknown field `urll`"),
    ("[[exchanges]]\nid='binance'\nsymbols=['BTC/USDT']\nrest_url='ftp://x'\n", "must start with http:// or https://"),
    ("[[exchanges]]\nid='binance'\nsymbols=[]\n", "is empty"),
    ("[bus\n", "not valid TOML"),
])
def test_bad_config_values_are_refused_with_the_key_and_value(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_settings(path, env={})
    assert expected in str(err.value)
    assert str(path) in str(err.value)


def test_unknown_exchange_names_the_configured_ones() -> None:
    with pytest.raises(ConfigError, match="'kraken' is not configured .*binance"):
        load_settings(ROOT / "config" / "simulator.toml", env={}).exchange("kraken")


def test_every_ccxt_url_is_rewritten_keeping_host_and_path() -> None:
    ex = ccxt.pro.binance()
    apply_endpoints(ex, ExchangeSettings(id="binance", symbols=["BTC/USDT"], rest_url="http://127.0.0.1:1",
                                         ws_url="ws://127.0.0.1:1"))
    assert ex.urls["api"]["public"] == "http://127.0.0.1:1/api.binance.com/api/v3"
    assert ex.urls["api"]["ws"]["spot"] == "ws://127.0.0.1:1/stream.binance.com/ws"
    flat: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for v in node.values():
                walk(v)
        elif isinstance(node, str):
            flat.append(node)
    walk(ex.urls["api"])
    assert flat and all(u.startswith(("http://127.0.0.1:1/", "ws://127.0.0.1:1/")) for u in flat)
    assert rewrite_url("https://api.binance.com/api/v3", "http://sim:1/", "path") == "http://sim:1/api/v3"


class Ticking(Service):
    name = "ticking"

    def __init__(self, settings: Settings, instance: str | None = None) -> None:
        super().__init__(settings, instance)
        self.n = 0

    def counters(self) -> dict[str, int]:
        return {"events": self.n}

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.n += 100
            await asyncio.sleep(0.01)


async def test_status_shows_services_alive_with_rates_and_streams_with_lag(settings: Settings, redis) -> None:
    import msgspec
    fast = msgspec.structs.replace(settings, bus=msgspec.structs.replace(settings.bus, heartbeat_interval_s=0.2))
    svc = Ticking(fast, "7")
    task = asyncio.create_task(svc.main())
    await Producer(redis, svc.codec, fast.bus, "t").publish({"md:trade:binance:BTC/USDT": [stubs.trade(1)]})
    # The producer made the pipeline's own groups on the stream (influx_writer among them) when it first wrote.
    await asyncio.sleep(0.7)
    st = await status.collect(redis)
    text = status.render(st)
    [s] = [s for s in st.services if s.service == "ticking"]
    assert s.alive and s.instance == "7" and s.heartbeat_age_s < 1.0
    assert s.rates["events"] > 1000
    [stream] = [x for x in st.streams if x.name == "md:trade:binance:BTC/USDT"]
    assert stream.length == 1 and stream.groups[0].lag == 1
    assert "ticking" in text and "md:trade:binance:BTC/USDT" in text
    # A service that stops is shown dead once its alive key expires (here: deleted on stop is not done; TTL)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await redis.delete(streams.alive_key("ticking", "7"))
    st = await status.collect(redis)
    assert [s.state for s in st.services if s.service == "ticking"] == ["dead"]


async def test_status_shows_a_standby_instance_as_standby(settings: Settings, redis) -> None:
    # Arrange: a second copy of a single-instance stage waits for the lease; its heartbeat says "standby".
    svc = Ticking(settings, "standby-1")
    svc.state = "standby"  # type: ignore[assignment]
    svc.detail = "waiting for the lease mdp:lease:validator held by validator-0"

    # Act
    await svc.heartbeat_once()
    st = await status.collect(redis)

    # Assert: mdp status decodes it and names its state and why.
    row = next((s for s in st.services if s.instance == "standby-1"), None)
    assert row is not None, "the standby instance's heartbeat was not decoded"
    assert (row.alive, row.state) == (True, "standby") and "lease" in row.detail
    await svc.close()


async def test_a_redis_cluster_node_is_refused_with_the_reason_and_the_fix(settings: Settings, tmp_path: Path) -> None:
    """A real redis-server in cluster mode (Debian's, on a loopback port): a service stops at start with a
    ConfigError naming the URL, why (the bus's commits span hash slots) and what to do, instead of failing later
    with CROSSSLOT or MOVED in the middle of a commit."""
    import subprocess

    import msgspec

    from tools.localstores import free_port, port_open

    # The cluster bus port is given too: by default it is the port + 10,000, which a free port above 55,535 cannot
    # have (redis-server then refuses to start).
    port, bus_port = free_port(), free_port()
    server = await asyncio.create_subprocess_exec(
        "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
        "--cluster-enabled", "yes", "--cluster-port", str(bus_port), "--dir", str(tmp_path),
        "--cluster-config-file", str(tmp_path / "nodes.conf"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        async with asyncio.timeout(10):
            while not port_open(port):
                if server.returncode is not None:
                    out = await server.stdout.read() if server.stdout else b""
                    raise AssertionError(f"redis-server in cluster mode did not start: {out.decode()[-2000:]}")
                await asyncio.sleep(0.05)
        url = f"redis://127.0.0.1:{port}/0"
        svc = Ticking(msgspec.structs.replace(settings, redis=msgspec.structs.replace(settings.redis, url=url)))

        with pytest.raises(ConfigError) as err:
            await svc.wait_for_redis(asyncio.Event())

        message = str(err.value)
        assert f"127.0.0.1:{port}" in message and "cluster_enabled:1" in message
        assert "MDP_REDIS_URL or [redis] url" in message and "standalone" in message
        assert "Set [bus] cluster = true" in message
        await svc.close()
    finally:
        if server.returncode is None:
            server.terminate()
        await asyncio.wait_for(server.communicate(), 10)


async def test_bus_cluster_on_a_standalone_redis_is_refused_with_the_reason_and_the_fix(settings: Settings,
                                                                                        redis) -> None:
    import msgspec

    on_cluster = msgspec.structs.replace(settings, bus=msgspec.structs.replace(settings.bus, cluster=True))
    svc = Ticking(on_cluster)
    svc.cluster_ready = True  # type: ignore[misc]

    with pytest.raises(ConfigError) as err:
        await svc.wait_for_redis(asyncio.Event())

    message = str(err.value)
    assert "bus.cluster" in message and "not a Redis Cluster node" in message
    assert settings.redis.url.removesuffix("/0") in message
    assert "Set [bus] cluster = false" in message
    await svc.close()


async def test_a_service_not_ready_for_a_cluster_is_refused_at_start_with_the_fix(settings: Settings) -> None:
    import msgspec

    on_cluster = msgspec.structs.replace(settings, bus=msgspec.structs.replace(settings.bus, cluster=True))
    svc = Ticking(on_cluster)

    with pytest.raises(ConfigError, match=r"bus.cluster: ticking does not declare that it runs on a Redis Cluster "
                                          r".*Set \[bus\] cluster = false"):
        await svc.wait_for_redis(asyncio.Event())
    await svc.close()


async def test_a_standalone_redis_is_accepted(settings: Settings, redis) -> None:
    svc = Ticking(settings)
    assert await svc.wait_for_redis(asyncio.Event()) is True
    await svc.close()
