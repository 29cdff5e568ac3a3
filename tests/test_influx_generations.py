"""InfluxDB 2.x and 3.x: the requests our client and writer make, checked one by one against a local fake that
answers in their wire format (tests/fakes/influx2.py; only 1.6.7 runs here, tested for real in
tests/test_influx.py). Also the tier plan and generation detection, which every generation shares."""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest

from common.bus.core import Delivery, Producer
from common.config import ConfigError, InfluxSettings, RedisSettings, Settings
from common.errors import StoreUnavailable
from common.stores.influx import (
    InfluxClient,
    InfluxError,
    InfluxQueryError,
    InfluxWriteError,
    TierPlan,
    encode_candles,
    encode_trades,
    generation_of,
    inline_params,
)
from schemas import Codec
from services.influx_writer import InfluxWriter
from tests.fakes.influx2 import FakeInflux, Recorded
from tests.test_influx import (
    CANDLE_STREAM,
    FAST,
    TRADE_STREAM,
    Running,
    recent_candle,
    recent_trade,
    wait_for,
)
from tools.localstores import LocalServer

replace = msgspec.structs.replace
TOKEN = "test-token"
DEFAULT = InfluxSettings()
TIERS = ("ticks", "candles_1m", "candles_1h", "candles_1d")
SECONDS = {"ticks": 7 * 86400, "candles_1m": 90 * 86400, "candles_1h": 730 * 86400, "candles_1d": 0}


def settings_for(fake: FakeInflux, **kw: object) -> InfluxSettings:
    base: dict[str, object] = {"url": fake.url, "token": TOKEN, "org": "mdp", "timeout_s": 5.0}
    base.update(kw)
    return msgspec.convert(base, InfluxSettings)


@pytest.fixture
async def v2() -> AsyncIterator[FakeInflux]:
    async with FakeInflux(2, token=TOKEN) as fake:
        yield fake


@pytest.fixture
async def v3() -> AsyncIterator[FakeInflux]:
    async with FakeInflux(3, token=TOKEN) as fake:
        yield fake


def only(fake: FakeInflux, method: str, path: str) -> Recorded:
    found = fake.calls(method, path)
    assert len(found) == 1, [(r.method, r.path) for r in fake.requests]
    return found[0]


# -- shared: generations and tiers -------------------------------------------------------------------------

def test_generation_is_read_from_the_version_header() -> None:
    assert [generation_of(v) for v in ("1.6.7~rc0", "1.8.10", "v2.7.11", "2.7.4", "3.0.1", "v3.2.0")] == \
        [1, 1, 2, 2, 3, 3]
    assert generation_of("unknown") is None and generation_of("4.0.0") is None and generation_of("") is None


def test_tier_plan_routes_listed_and_unlisted_timeframes() -> None:
    plan = TierPlan(DEFAULT)
    assert [t.name for t in plan.tiers] == list(TIERS)
    assert [(t.name, t.retention) for t in plan.tiers] == [("ticks", "7d"), ("candles_1m", "90d"),
                                                           ("candles_1h", "730d"), ("candles_1d", "inf")]
    assert plan.ticks.name == "ticks"
    route = {tf: plan.for_timeframe(tf).name for tf in ("1s", "1m", "10m", "30m", "45m", "1h", "3h", "12h",
                                                        "1d", "2d", "1w", "1M", "1y")}
    assert route == {"1s": "candles_1m", "1m": "candles_1m", "10m": "candles_1m", "30m": "candles_1m",
                     "45m": "candles_1m", "1h": "candles_1h", "3h": "candles_1h", "12h": "candles_1h",
                     "1d": "candles_1d", "2d": "candles_1d", "1w": "candles_1d", "1M": "candles_1d",
                     "1y": "candles_1d"}
    with pytest.raises(ValueError, match="'minute' is not a ccxt timeframe"):
        plan.for_timeframe("minute")
    assert plan.bucket_name("ticks") == "market_data_ticks"


@pytest.mark.parametrize(("change", "message"), [
    ({"retention": {"ticks": "7d"}}, "influx.retention has tiers"),
    ({"retention": {**DEFAULT.retention, "ticks": "0h"}}, r"influx.retention.ticks = '0h'.*shorter than 1h"),
    ({"retention": {**DEFAULT.retention, "ticks": "a week"}}, "is not a duration"),
    ({"tiers": {**DEFAULT.tiers, "ticks": ["ticks", "1m"]}}, "'1m' is listed in both"),
    ({"tiers": {**DEFAULT.tiers, "candles_1m": ["1 minute"]}}, "'1 minute' is not a ccxt timeframe"),
    ({"tiers": {k: v for k, v in DEFAULT.tiers.items() if k != "ticks"},
      "retention": {k: v for k, v in DEFAULT.retention.items() if k != "ticks"}}, "no tier holds \"ticks\""),
    ({"tiers": {"ticks": ["ticks"]}, "retention": {"ticks": "7d"}}, "no tier holds a candle timeframe"),
    ({"bucket_template": "{database}/{tier}"}, "no '/'"),
    ({"bucket_template": "{db}_{tier}"}, "only the fields"),
    ({"tiers": {}, "retention": {}}, "influx.tiers is empty"),
])
def test_tier_config_errors_name_the_key_the_value_and_the_fix(change: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TierPlan(replace(DEFAULT, **change))


def test_parameters_are_inlined_as_quoted_literals_for_3x() -> None:
    q = inline_params("SELECT * FROM t WHERE s = $s AND n = $n AND ok = $ok",
                      {"s": "it's a \\ test", "n": 2.5, "ok": True})
    assert q == "SELECT * FROM t WHERE s = 'it\\'s a \\\\ test' AND n = 2.5 AND ok = true"
    with pytest.raises(InfluxQueryError, match=r"uses \$x but params has no 'x'"):
        inline_params("SELECT * FROM t WHERE s = $x", {})


# -- 2.x -----------------------------------------------------------------------------------------------------

async def test_v2_every_request_of_connect_init_write_and_query(v2: FakeInflux) -> None:
    async with InfluxClient(settings_for(v2)) as client:
        # Act 1: connect and build the tiers
        version = await client.connect()
        steps = await client.ensure_tiers()
        # Assert: /ping, the org, then per tier its bucket (with the retention rule) and DBRP mapping
        assert (version, client.generation) == ("v2.7.11", 2)
        paths = [(r.method, r.path) for r in v2.requests]
        assert paths == [("GET", "/ping"), ("GET", "/api/v2/orgs")] + [
            ("GET", "/api/v2/buckets"), ("POST", "/api/v2/buckets"), ("GET", "/api/v2/dbrps"),
            ("POST", "/api/v2/dbrps")] * 4
        assert all(r.headers["Authorization"] == f"Token {TOKEN}" for r in v2.requests)
        assert v2.requests[1].query == {"org": "mdp"}
        creates = v2.calls("POST", "/api/v2/buckets")
        for tier, call in zip(TIERS, creates, strict=True):
            assert call.headers["Content-Type"] == "application/json"
            body = call.json()
            assert body["orgID"] == v2.org_id and body["name"] == f"market_data_{tier}"
            assert body["retentionRules"] == [{"type": "expire", "everySeconds": SECONDS[tier]}]
        lookups = v2.calls("GET", "/api/v2/buckets")
        assert [r.query for r in lookups] == [{"orgID": v2.org_id, "name": f"market_data_{t}"} for t in TIERS]
        mappings = [r.json() for r in v2.calls("POST", "/api/v2/dbrps")]
        assert [(m["database"], m["retention_policy"], m["default"]) for m in mappings] == \
            [("market_data", t, False) for t in TIERS]
        assert [m["bucketID"] for m in mappings] == [v2.bucket(f"market_data_{t}").id for t in TIERS]  # type: ignore[union-attr]
        assert [r.query for r in v2.calls("GET", "/api/v2/dbrps")] == \
            [{"orgID": v2.org_id, "db": "market_data", "rp": t} for t in TIERS]
        assert sum("created" in s for s in steps) == 8

        # Act 2: again: nothing is created or changed
        v2.requests.clear()
        again = await client.ensure_tiers()
        assert {r.method for r in v2.requests} == {"GET"} and all("unchanged" in s for s in again[1:])

        # Act 3: write trades into the ticks tier, through influxdb-client
        v2.requests.clear()
        trades = [recent_trade(i) for i in range(3)]
        lines = encode_trades(trades)
        assert await client.write_tier("ticks", lines) == 3
        write = only(v2, "POST", "/api/v2/write")
        assert write.query == {"org": "mdp", "bucket": "market_data_ticks", "precision": "ns"}
        assert write.headers["Authorization"] == f"Token {TOKEN}"
        assert write.headers["User-Agent"].startswith("influxdb-client-python/")
        assert write.body == "\n".join(lines).encode()
        assert len(v2.points("market_data_ticks")) == 3

        # Act 4: query the tier with InfluxQL through its DBRP mapping, parameters bound as data
        v2.requests.clear()
        rows = await client.query_timeframe("ticks", "SELECT price, trade_id FROM trades WHERE symbol = $s",
                                            params={"s": "BTC/USDT"}, exact=True)
        query = only(v2, "GET", "/query")
        assert query.query == {"db": "market_data", "rp": "ticks", "epoch": "ns", "params": '{"s":"BTC/USDT"}',
                               "q": "SELECT price, trade_id FROM trades WHERE symbol = $s"}
        assert query.headers["Authorization"] == f"Token {TOKEN}"
        assert [(r["trade_id"], r["price"]) for r in rows] == [(t.trade_id, t.price) for t in trades]
        assert client.tier_for("4h") == ("market_data", "candles_1h")


async def test_v2_changed_retention_is_patched_and_a_wrong_dbrp_is_refused(v2: FakeInflux) -> None:
    async with InfluxClient(settings_for(v2)) as client:
        await client.ensure_tiers()
        v2.requests.clear()
        longer = replace(client.settings, retention={**client.settings.retention, "candles_1m": "120d"})
        async with InfluxClient(longer) as c2:
            steps = await c2.ensure_tiers()
        patch = only(v2, "PATCH", f"/api/v2/buckets/{v2.bucket('market_data_candles_1m').id}")  # type: ignore[union-attr]
        assert patch.json() == {"retentionRules": [{"type": "expire", "everySeconds": 120 * 86400}]}
        assert "bucket 'market_data_candles_1m' (1m, 3m, 5m, 15m, 30m): retention changed from 90d to 120d" in steps
        assert v2.bucket("market_data_candles_1m").every_seconds == 120 * 86400  # type: ignore[union-attr]
        # A DBRP mapping that points elsewhere is not silently overwritten.
        v2.dbrps[0]["bucketID"] = v2.bucket("market_data_candles_1d").id  # type: ignore[union-attr]
        with pytest.raises(InfluxError, match=r"DBRP mapping market_data/ticks points at bucket id .* delete it"):
            await client.ensure_tiers()


async def test_v2_username_and_password_sign_in_and_use_the_session() -> None:
    async with FakeInflux(2, token="not-given-to-the-client", users={"ops": "pw"}) as fake:
        async with InfluxClient(settings_for(fake, token="", username="ops", password="pw")) as client:
            await client.ensure_tiers()
            await client.write_tier("ticks", encode_trades([recent_trade(0)]))
        signins = fake.calls("POST", "/api/v2/signin")
        assert len(signins) == 2  # ours, and influxdb-client's own for its writes
        assert signins[0].headers["Authorization"] == "Basic " + base64.b64encode(b"ops:pw").decode()
        assert all(r.headers.get("Cookie", "").startswith("influxdb-oss-session=") for r in fake.requests
                   if r.path.startswith("/api/v2/") and r.path != "/api/v2/signin")
        assert len(fake.points("market_data_ticks")) == 1
        async with InfluxClient(settings_for(fake, token="", username="ops", password="wrong")) as bad:
            with pytest.raises(InfluxError, match="refused to sign in user 'ops': HTTP 401 Unauthorized"):
                await bad.connect()


async def test_v2_refusals_are_clear(v2: FakeInflux) -> None:
    async with InfluxClient(settings_for(v2, org="")) as no_org:
        with pytest.raises(ConfigError, match=r"influx.org is empty but InfluxDB 2.x v2.7.11 at .*needs the organization.*MDP_INFLUX_ORG"):
            await no_org.connect()
    async with InfluxClient(settings_for(v2, org="other")) as wrong_org:
        with pytest.raises(InfluxError, match="has no organization 'other'; fix influx.org"):
            await wrong_org.ensure_tiers()
    async with InfluxClient(settings_for(v2, token="wrong")) as wrong_token:
        with pytest.raises(InfluxError, match=r"HTTP 401 unauthorized access; fix influx.token"):
            await wrong_token.ensure_tiers()
        with pytest.raises(InfluxWriteError) as denied:
            await wrong_token.write_lines(encode_trades([recent_trade(0)]), "market_data_ticks")
        assert denied.value.unauthorized
    async with InfluxClient(settings_for(v2)) as client:
        with pytest.raises(InfluxWriteError, match='bucket "market_data_ticks" not found') as missing:
            await client.write_tier("ticks", encode_trades([recent_trade(0)]))
        assert missing.value.status == 404 and missing.value.database_not_found
        await client.ensure_tiers()
        with pytest.raises(InfluxWriteError, match="unable to parse 'not line protocol'") as bad:
            await client.write_tier("ticks", ["not line protocol"])
        assert bad.value.status == 400 and "InfluxDB 2.x v2.7.11" in str(bad.value)
        await client.write_tier("ticks", encode_trades([recent_trade(0)]))
        conflict = encode_trades([recent_trade(1)])[0].replace("price=61837.63", 'price="text"')
        with pytest.raises(InfluxWriteError, match="field type conflict") as typed:
            await client.write_tier("ticks", [conflict])
        assert typed.value.partial and typed.value.status == 422
        v2.fail_writes.append((503, b'{"code":"unavailable","message":"service unavailable: write paused"}'))
        with pytest.raises(StoreUnavailable, match=r"InfluxDB 2.x v2.7.11 at .* is unavailable .*HTTP 503 "
                                                   r"service unavailable: write paused"):
            await client.write_tier("ticks", encode_trades([recent_trade(2)]))


async def test_v2_points_beyond_the_bucket_retention_are_counted_not_an_error(v2: FakeInflux) -> None:
    async with InfluxClient(settings_for(v2)) as client:
        await client.ensure_tiers()
        lines = encode_trades([recent_trade(0, age_s=8 * 86400), recent_trade(1)])
        await client.write_tier("ticks", lines)
        assert client.expired_dropped == 1 and len(v2.points("market_data_ticks")) == 1


# -- 3.x -----------------------------------------------------------------------------------------------------

async def test_v3_every_request_of_connect_init_write_and_query(v3: FakeInflux) -> None:
    async with InfluxClient(settings_for(v3, org="")) as client:
        version = await client.connect()
        steps = await client.ensure_tiers()
        assert (version, client.generation) == ("3.1.0", 3)
        assert [(r.method, r.path) for r in v3.requests] == [("GET", "/ping"), ("GET", "/api/v3/configure/database")] \
            + [("POST", "/api/v3/configure/database")] * 4
        assert all(r.headers["Authorization"] == f"Token {TOKEN}" for r in v3.requests)
        assert v3.requests[1].query == {"format": "json"}
        assert [r.json() for r in v3.calls("POST", "/api/v3/configure/database")] == [
            {"db": "market_data_ticks", "retention_period": "7d"},
            {"db": "market_data_candles_1m", "retention_period": "90d"},
            {"db": "market_data_candles_1h", "retention_period": "730d"},
            {"db": "market_data_candles_1d"}]
        assert all(r.headers["Content-Type"] == "application/json" for r in v3.calls("POST"))
        assert steps[0] == "database 'market_data_ticks' (ticks): created, 7d"
        assert {b.name: b.every_seconds for b in v3.buckets.values()} == \
            {f"market_data_{t}": SECONDS[t] for t in TIERS}

        # Again: the databases exist; their retention is set (3.x lists none to compare with).
        v3.requests.clear()
        again = await client.ensure_tiers()
        assert [(r.method, r.path) for r in v3.requests] == [("GET", "/api/v3/configure/database")] + \
            [("PUT", "/api/v3/configure/database")] * 4
        assert v3.requests[1].json() == {"db": "market_data_ticks", "retention_period": "7d"}
        assert again[0] == "database 'market_data_ticks' (ticks): present, retention set to 7d"

        # Write candles into their tiers' databases.
        v3.requests.clear()
        bars = [recent_candle(0, "1m"), recent_candle(1, "1h")]
        await client.write_tier(client.plan.for_timeframe("1m"), encode_candles(bars[:1]))
        await client.write_tier(client.plan.for_timeframe("1h"), encode_candles(bars[1:]))
        writes = v3.calls("POST", "/api/v2/write")
        assert [w.query for w in writes] == [{"org": "", "bucket": "market_data_candles_1m", "precision": "ns"},
                                             {"org": "", "bucket": "market_data_candles_1h", "precision": "ns"}]
        assert [w.headers["Authorization"] for w in writes] == [f"Token {TOKEN}"] * 2

        # Query: the tier's database, no rp, parameters inlined (3.x's /query binds none).
        v3.requests.clear()
        rows = await client.query_timeframe("1m", "SELECT close FROM ohlcv WHERE symbol = $s",
                                            params={"s": "BTC/USDT"}, exact=True)
        hostile = await client.query_timeframe("1m", "SELECT close FROM ohlcv WHERE symbol = $s",
                                               params={"s": "BTC/USDT' OR symbol = 'x"})
        first = v3.requests[0]
        assert first.query == {"db": "market_data_candles_1m", "epoch": "ns",
                               "q": "SELECT close FROM ohlcv WHERE symbol = 'BTC/USDT'"}
        assert rows == [{"time": bars[0].open_time, "close": bars[0].close}] and hostile == []
        assert client.tier_for("1d") == ("market_data_candles_1d", "")


async def test_v3_retention_that_the_server_cannot_change_is_reported() -> None:
    async with FakeInflux(3, token=TOKEN, can_update_retention=False) as fake:
        async with InfluxClient(settings_for(fake)) as client:
            await client.ensure_tiers()
            steps = await client.ensure_tiers()
        assert "this server cannot change a database's retention (HTTP 404)" in steps[0]
        assert "if that is not 7d, recreate the database" in steps[0]


async def test_v3_refusals_are_clear(v3: FakeInflux) -> None:
    async with InfluxClient(settings_for(v3, token="")) as anonymous:
        with pytest.raises(InfluxError, match=r"refused /ping: HTTP 401 .*set influx.token"):
            await anonymous.connect()
    async with InfluxClient(settings_for(v3, generation="3", token="", username="admin")) as user:
        with pytest.raises(ConfigError, match="authenticates with tokens, not users; set influx.token"):
            await user.connect()
    async with InfluxClient(settings_for(v3)) as client:
        with pytest.raises(InfluxWriteError) as bad:
            await client.write_lines(["trades,symbol=X price=1 1", "broken"], "market_data_ticks")
        assert bad.value.status == 400
        assert "parsing failed for write_lp endpoint: missing fields (line 2: 'broken')" in str(bad.value)
        with pytest.raises(InfluxQueryError, match="HTTP 404 query error: database not found: nowhere"):
            await client.query("SELECT * FROM trades", database="nowhere")
        with pytest.raises(InfluxWriteError) as slash:
            await client.write_lines(encode_trades([recent_trade(0)]), "market_data/ticks")
        assert "invalid character in database name" in slash.value.body


async def test_unrecognised_version_asks_for_influx_generation() -> None:
    async with FakeInflux(2, version="nightly") as fake:
        async with InfluxClient(settings_for(fake)) as client:
            with pytest.raises(ConfigError, match="version 'nightly'.* set influx.generation"):
                await client.connect()
        async with InfluxClient(settings_for(fake, generation="2")) as forced:
            assert await forced.connect() == "nightly" and forced.generation == 2


# -- TLS -------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (openssl), its own CA."""
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    return cert, key


async def test_tls_with_the_servers_ca_and_refused_without_it(certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    async with FakeInflux(3, token=TOKEN, ssl_context=server_tls) as fake:
        assert fake.url.startswith("https://")
        async with InfluxClient(settings_for(fake, ca_cert=str(cert))) as client:
            await client.ensure_tiers()
            await client.write_tier("ticks", encode_trades([recent_trade(0)]))  # influxdb-client, same CA
            assert len(await client.query_timeframe("ticks", "SELECT price FROM trades")) == 1
        async with InfluxClient(settings_for(fake)) as untrusted:
            with pytest.raises(StoreUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
                await untrusted.connect()
        async with InfluxClient(settings_for(fake, verify_tls=False)) as unverified:
            await unverified.write_tier("ticks", encode_trades([recent_trade(1)]))
        assert len(fake.points("market_data_ticks")) == 2
    with pytest.raises(ConfigError, match="influx.ca_cert = '/nonexistent.pem' cannot be read"):
        InfluxClient(InfluxSettings(url="https://127.0.0.1:1", ca_cert="/nonexistent.pem"))


# -- the writer, through the bus --------------------------------------------------------------------------------

@pytest.mark.parametrize("generation", [2, 3])
async def test_writer_routes_tiers_into_buckets_and_remakes_a_dropped_one(
        generation: int, redis, redis_server: LocalServer) -> None:
    async with FakeInflux(generation, token=TOKEN) as fake:
        settings = Settings(redis=RedisSettings(url=redis_server.url), bus=FAST,
                            influx=settings_for(fake, org="mdp" if generation == 2 else ""))
        producer = Producer(redis, Codec(), FAST, "test")
        trades = [recent_trade(i) for i in range(20)]
        candles = [recent_candle(0, "1m"), recent_candle(1, "5m"), recent_candle(2, "4h"), recent_candle(3, "1d")]
        await producer.publish({TRADE_STREAM: trades, CANDLE_STREAM: candles})
        writer = InfluxWriter(settings)
        async with Running(writer):
            await wait_for(lambda: writer.counters()["points_written"] == 24, what="every point written")
            # A tier dropped behind the writer's back is made again on the next write.
            ticks = fake.bucket("market_data_ticks")
            assert ticks is not None
            del fake.buckets[ticks.id]
            if generation == 2:
                fake.dbrps = [m for m in fake.dbrps if m["bucketID"] != ticks.id]
            await producer.publish({TRADE_STREAM: [recent_trade(100)]})
            await wait_for(lambda: writer.counters()["points_written"] == 25, what="the write after the drop")
        # 2.x: the bucket was made again by the writer; 3.x makes a database on first write by itself
        # (with no retention: run `mdp init` again after dropping one, see docs/storage.md).
        assert len(fake.points("market_data_ticks")) == 1
        assert [p.tags["timeframe"] for p in fake.points("market_data_candles_1m")] == ["1m", "5m"]
        assert [p.tags["timeframe"] for p in fake.points("market_data_candles_1h")] == ["4h"]
        assert [p.tags["timeframe"] for p in fake.points("market_data_candles_1d")] == ["1d"]
        writes = fake.calls("POST", "/api/v2/write")
        assert {w.query["bucket"] for w in writes} == {f"market_data_{t}" for t in TIERS}
        assert all(w.query["precision"] == "ns" for w in writes)
        if generation == 2:
            assert writer.counters()["database_creates"] >= 2  # at start, and after the 404
        assert writer.consumer.stats.dead_lettered == 0


async def test_writer_takes_a_refused_token_as_the_store_being_unusable(
        v2: FakeInflux, redis_server: LocalServer) -> None:
    settings = Settings(redis=RedisSettings(url=redis_server.url), bus=FAST, influx=settings_for(v2, token="wrong"))
    writer = InfluxWriter(settings)
    try:
        with pytest.raises(StoreUnavailable, match="refused our credentials .*fix influx.token"):
            await writer.handle([Delivery(TRADE_STREAM, "1-0", [recent_trade(0)])])
        assert writer.state == "degraded" and writer.count["write_errors"] == 1
    finally:
        await writer.close()


def test_fake_error_bodies_have_each_generations_shape() -> None:
    """The shapes the client parses, as the fake sends them (2.x {code, message}; 3.x {error, data})."""
    async def run() -> tuple[bytes, bytes]:
        async with FakeInflux(2, token=TOKEN) as f2, FakeInflux(3, token=TOKEN) as f3, \
                InfluxClient(settings_for(f2)) as c2, InfluxClient(settings_for(f3)) as c3:
            await c2.connect()
            await c3.connect()
            s2, b2, _ = await c2._request("POST", "/api/v2/write", {"org": "mdp", "bucket": "nope"}, b"x")
            s3, b3, _ = await c3._request("POST", "/api/v2/write", {"bucket": "db"}, b"x")
            assert (s2, s3) == (404, 400)
            return b2, b3
    b2, b3 = asyncio.run(run())
    assert json.loads(b2) == {"code": "not found", "message": 'bucket "nope" not found'}
    assert json.loads(b3) == {"error": "parsing failed for write_lp endpoint",
                              "data": {"original_line": "x", "line_number": 1, "error_message": "missing fields"}}
