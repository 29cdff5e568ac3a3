"""Typed configuration: a TOML file (config/*.toml) plus environment overrides.

The file is chosen by `MDP_CONFIG` (default `config/simulator.toml` in the project). Environment variables
override the store addresses so the same file runs anywhere:
  MDP_REDIS_URL, MDP_POSTGRES_DSN, MDP_INFLUX_URL, MDP_INFLUX_DATABASE, MDP_INFLUX_USERNAME, MDP_INFLUX_PASSWORD,
  MDP_SIMULATOR_URL (replaces the host of every exchange endpoint that points at the simulator).
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Literal

import msgspec

from common.errors import MdpError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = PROJECT_ROOT / "config" / "simulator.toml"


class ConfigError(MdpError, ValueError):
    """A configuration value that cannot be used. The message names the key, the value and the fix."""


class RedisSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # The bus: the project's own Redis with AOF (tools/start-stores.sh, docker-compose.yml), not the machine's
    # 6379, which runs without persistence (docs/operations.md: what a crash may cost).
    url: str = "redis://127.0.0.1:6380/0"


class PostgresSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    dsn: str = "postgresql://postgres@127.0.0.1:5432/market_data"


def _influx_tiers() -> dict[str, list[str]]:
    # What each storage tier holds: "ticks" (trades) or candle timeframes. A timeframe not listed goes to the
    # tier of the longest listed timeframe not longer than it (2h -> candles_1h); see docs/storage.md.
    return {"ticks": ["ticks"], "candles_1m": ["1m", "3m", "5m", "15m", "30m"],
            "candles_1h": ["1h", "2h", "4h", "6h", "8h", "12h"], "candles_1d": ["1d", "3d", "1w", "1M"]}


def _influx_retention() -> dict[str, str]:
    # The plan: raw ticks 7 days, 1m candles 90 days, 1h candles 2 years, 1d candles forever ("inf").
    return {"ticks": "7d", "candles_1m": "90d", "candles_1h": "730d", "candles_1d": "inf"}


class InfluxSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    url: str = "http://127.0.0.1:8086"
    database: str = "market_data"
    username: str = ""
    password: str = ""
    batch_points: int = 5000
    timeout_s: float = 10.0
    # "auto" reads the server's generation from /ping (X-Influxdb-Version); "1", "2" or "3" forces it.
    generation: Literal["auto", "1", "2", "3"] = "auto"
    org: str = ""  # 2.x organization name
    token: str = ""  # 2.x / 3.x API token
    # The bucket (2.x) or database (3.x) of a tier; {database} and {tier} are replaced.
    bucket_template: str = "{database}_{tier}"
    verify_tls: bool = True
    ca_cert: str = ""  # PEM file of the CA that signed an https server's certificate
    write_concurrency: int = 4  # write requests in flight at once
    # The influx writer works on `writer_consumers` batches at once (some decode while others are written), each
    # of at most `writer_read_count` entries (XREADGROUP COUNT; it replaces bus.read_count for the writer). Small
    # batches keep InfluxDB fed: a batch's first request goes out after ~4 ms of decoding instead of ~20 ms
    # (docs/bench-storage.md). Memory: at most consumers x read count x bus.batch_max_events events.
    writer_consumers: int = 4
    writer_read_count: int = 20
    tiers: dict[str, list[str]] = msgspec.field(default_factory=_influx_tiers)
    retention: dict[str, str] = msgspec.field(default_factory=_influx_retention)


MAX_PARTITIONS = 256  # bus.partitions at most: each is a lease, a checkpoint hash and a consumer per instance


class BusSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # Bound of every stream, in entries (one entry = one batch of events). XADD trims approximately at it.
    stream_maxlen: int = 100_000
    # Producers pause when a consumer group has more than this many entries undelivered or pending.
    backpressure_high_water: int = 50_000
    # How long a producer waits for consumers before publishing anyway and raising an alert.
    backpressure_max_wait_s: float = 30.0
    # Events packed into one stream entry at most.
    batch_max_events: int = 500
    read_count: int = 100
    block_ms: int = 1000
    # An entry pending this long with its consumer is taken over by another (XAUTOCLAIM).
    claim_idle_ms: int = 15_000
    # After this many deliveries without success an entry moves to the dead-letter stream.
    max_deliveries: int = 5
    dead_letter_maxlen: int = 100_000
    heartbeat_interval_s: float = 2.0
    # A consumer group that is not one of the pipeline's own (a strategy's) never holds producers back; one whose
    # consumers have all been idle this long while it lags is reported abandoned (mdp status, an alert per hour).
    abandoned_group_s: float = 300.0
    # Destroy an abandoned group (XGROUP DESTROY, with an alert) instead of only reporting it.
    drop_abandoned_groups: bool = False
    # Partitions of the validator, the normalizer, the aggregator and the cache publisher: the events split by
    # the base asset of their symbol (raw:{exchange}:p{k}, valid:{exchange}:p{k}; md:* keeps its names), each
    # partition under its own lease (and checkpoint) in each stage, shared out among the instances alive
    # (docs/scaling.md, "Partitions"). 1: one lease per stateful stage, one instance works and the others
    # stand by (the cache publisher: run one).
    partitions: int = 1
    # The bus's Redis is a Redis Cluster ([redis] url names any of its masters). Every key of partition k then
    # carries the hash tag {p<k>} (raw:binance:{p3}, md:trade:binance:BTC/USDT:{p3}, mdp:alerts:{p3}), so each
    # commit touches one hash slot, and every consuming stage works partition by partition (docs/scaling.md,
    # "Redis Cluster"). Keep partitions a multiple of the masters so that they spread evenly.
    cluster: bool = False


class CacheSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    price_ttl_s: int = 300
    recent_trades: int = 1000
    orderbook_ttl_s: int = 60
    orderbook_depth: int = 50  # levels kept per side of an orderbook:{exchange}:{symbol} snapshot
    strategy_trades: int = 1000  # cap of a strategy's trade log trades:{strategy}
    indicator_ttl_s: int = 300  # TTL of indicator:{symbol}:{name} when the writer gives none


class PostgresWriterSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # Fills per batch from which the writer stages them with binary COPY instead of one unnest() INSERT
    # (docs/bench-postgres.md measures both paths; below this the fixed cost of COPY does not pay).
    copy_min_rows: int = 100


class ValidationSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # An event stamped further than this in the future (exchange time vs our clock) is rejected.
    max_future_skew_s: float = 5.0


def _sequential_id_exchanges() -> list[str]:
    # Exchanges whose trade ids count up by one per trade and symbol (measured on the real captures:
    # Binance spot, USD-M and COIN-M `@trade`, Coinbase Exchange `match`); Hyperliquid's are not.
    return ["binance", "binanceus", "binanceusdm", "binancecoinm", "coinbaseexchange"]


def _bar_timeframes() -> list[str]:
    return ["5m", "15m", "1h", "4h", "1d"]


class QualitySettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The live (stream) quality rules of the validator and the aggregator's bars; docs/quality-live.md.
    Defaults measured on the real recordings (docs/quality-live.md, "Thresholds")."""

    # time.stale: a trade or ticker received this long after its exchange time is flagged (0 disables).
    stale_after_s: float = 60.0
    # trade.id_gap runs for these exchange ids only.
    sequential_trade_ids: list[str] = msgspec.field(default_factory=_sequential_id_exchanges)
    # price.outlier: |log return - rolling median| > outlier_k * max(rolling MAD, outlier_min_mad), over the
    # last outlier_window closed candles, once outlier_min_samples returns are known; same test for wicks.
    outlier_window: int = 60
    outlier_min_samples: int = 20
    outlier_k: float = 15.0
    outlier_min_mad: float = 0.0002
    # candle.open_gap: |log(open / previous close)| > max(open_gap_k * MAD of those jumps, open_gap_min).
    open_gap_k: float = 15.0
    open_gap_min: float = 0.01
    # price.stuck: O=H=L=C at one unchanged price for this many consecutive closed bars.
    stuck_bars: int = 10
    # price.cross_venue: close further than this (relative) from the median close of other venues.
    cross_venue_tolerance: float = 0.02
    # trade.outside_book: price beyond the last bid/ask by more than this (relative), if that quote is
    # at most book_max_age_s older than the trade.
    outside_book_tolerance: float = 0.0025
    book_max_age_s: float = 10.0
    # Closed candles remembered per series for time.duplicate / time.conflict / time.gap repair.
    dedup_memory: int = 120
    # Series (exchange, symbol, kind, timeframe) kept in memory; the least recently used is forgotten.
    max_series: int = 5000
    # A flag's alert is published at most once per this interval per series and rule (flags are not).
    alert_interval_s: float = 10.0
    # Aggregator: timeframes built from closed 1m candles, and the reconciliation tolerances (relative).
    bar_timeframes: list[str] = msgspec.field(default_factory=_bar_timeframes)
    reconcile_price_rel: float = 1e-9
    reconcile_volume_rel: float = 1e-6


class RateLimitSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # The shared per-exchange REST budget (common/exchanges/ratelimit.py), honoured by every process calling an exchange.
    # Fraction of the exchange's published weight limit we spend; the rest absorbs clock skew at window edges.
    utilization: float = 0.97
    # Burst allowed above the steady pace, in seconds of the full rate.
    burst_s: float = 0.5
    # exchange id -> request weight per minute, replacing the built-in table (e.g. a VIP or shared-IP limit).
    weight_per_minute: dict[str, int] = msgspec.field(default_factory=dict)
    # A 418 ban (or a 429 cool-down) longer than this makes a caller raise instead of waiting it out.
    max_wait_s: float = 900.0


class BackfillSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # History backfill and archive import (common/history/, docs/backfill.md).
    concurrency: int = 4  # REST pages in flight at once per process (the shared budget still paces them)
    write_pages: int = 5  # pages (up to 1000 candles each) written to InfluxDB per request at most
    retries: int = 5  # attempts per page on network errors / 5xx before the run stops (a rerun resumes)
    # Base URL of data.binance.vision archives; empty: the real one, rewritten like exchanges[binance].rest_url.
    archive_url: str = ""
    ratelimit: RateLimitSettings = RateLimitSettings()


class GapRepairSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # The gap repair service (services/gap_repair, docs/gap-repair.md).
    scan_interval_s: float = 300.0  # how often InfluxDB and the ledger are scanned for holes no Gap announced
    scan_lookback_s: float = 21_600.0  # the scan looks at the candles of this recent window (6 h)
    # Candles that closed less than this ago are not scanned yet: the live pipeline may still be storing them.
    scan_settle_s: float = 180.0
    retries: int = 3  # attempts per REST request on network errors / 5xx before the gap becomes an alert
    max_trades: int = 200_000  # trades one Gap may repair at most; a longer window is an alert (use backfill)
    trades_page: int = 1000  # trades per historicalTrades / aggTrades request (Binance's maximum)


class MetricsSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # The Prometheus exporter (services/metrics_exporter, docs/metrics.md): one port for the whole pipeline.
    host: str = "127.0.0.1"  # loopback by default; "0.0.0.0" exposes the metrics to the network
    port: int = 9464


class ExchangeSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    id: str
    symbols: list[str]
    # ticker: best bid/ask (and last); book: bounded L2 snapshots; funding: funding rate with mark and index
    # price; open_interest: perpetuals only (services/collector/feeds.py says how each is fetched).
    channels: list[Literal["trades", "candles", "ticker", "book", "funding", "open_interest"]] = msgspec.field(
        default_factory=lambda: ["trades", "candles"])
    timeframe: str = "1m"
    market_types: list[str] = msgspec.field(default_factory=lambda: ["spot"])
    # Base URLs replacing ccxt's endpoints; empty means the exchange's own (live) endpoints.
    rest_url: str = ""
    ws_url: str = ""
    # "host-prefix": {base}/{original host}{original path}, so one server can stand in for all of an
    # exchange's hosts (our simulator). "path": {base}{original path}, for a server mirroring one host.
    url_rewrite: Literal["host-prefix", "path"] = "host-prefix"
    # Seconds without a WebSocket message before the collector falls back to REST polling.
    ws_stall_s: float = 10.0
    rest_poll_s: float = 5.0
    # ccxt.pro's caches (tradesLimit, OHLCVLimit per symbol): the collector reads them after every wake-up, so
    # they must hold only what can arrive between two reads: at most one drain of aiohttp's WebSocket queue
    # (512 KiB of payload, about 1,900 Binance trade messages). 10,000 trades keep 5x that (docs/collector.md,
    # "Batching and memory"); each cached trade costs about 1.6 KB, so 100,000 cost 160 MB a symbol.
    trades_limit: int = 10_000
    ohlcv_limit: int = 1_000
    ccxt_options: dict[str, object] = msgspec.field(default_factory=dict)
    # Order books: levels a side in each published snapshot, snapshots per second per symbol at most (the
    # latest book wins: updates in between are folded into the next snapshot), and the REST snapshot's size.
    book_depth: int = 20
    book_max_per_s: float = 10.0
    book_snapshot_limit: int = 1000
    # Stall watchdog: seconds without a message on a channel (per symbol) before its socket is reconnected
    # and a Gap published; channels not listed use ws_stall_s (candles then also poll REST meanwhile).
    stall_s: dict[str, float] = msgspec.field(default_factory=lambda: {"trades": 60.0, "open_interest": 60.0})
    # Reconnects: capped exponential backoff with full jitter (base * 2^attempt, at most the cap).
    reconnect_backoff_s: float = 0.5
    reconnect_backoff_max_s: float = 30.0
    # Subscriptions (WebSocket messages that open a channel) started per second at most, across the process,
    # so that hundreds of symbols start without tripping the exchange's connection/message limits.
    subscribe_per_s: float = 10.0
    # Channels an exchange only offers over REST (Binance USD-M open interest): poll interval in seconds.
    rest_channel_poll_s: float = 10.0
    rest_timeout_s: float = 30.0  # bound of one REST call (a ban is waited out before it, see ratelimit.py)
    # Collector: events taken from the exchange and not yet published (Redis down or slow), at most; beyond
    # it the oldest are dropped and named by a Gap and a collector.buffer_overflow alert (docs/collector.md).
    publish_buffer_events: int = 200_000
    # Collector micro-batching: the outbox is published (one MULTI/EXEC) once it holds publish_batch_events
    # events or publish_linger_ms after the previous round started, so a busy second costs at most 1000 /
    # publish_linger_ms Redis round trips rather than one per WebSocket message. An event waits at most the
    # linger (ts_recv -> cache target: p99 under 20 ms), the first after a quiet spell not at all; 0 publishes
    # every wake-up at once (docs/collector.md, "Batching and memory").
    publish_batch_events: int = 500
    publish_linger_ms: float = 5.0
    # The collector's decode fast path (docs/collector.md): per channel ("trades", "book"), whether the raw
    # WebSocket frames of this exchange are decoded by our own msgspec decoder instead of ccxt.pro's parser.
    # A channel not named here uses the fast path where one exists for this exchange (false turns it off).
    fast_path: dict[str, bool] = msgspec.field(default_factory=dict)


class Settings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    redis: RedisSettings = RedisSettings()
    postgres: PostgresSettings = PostgresSettings()
    influx: InfluxSettings = InfluxSettings()
    bus: BusSettings = BusSettings()
    cache: CacheSettings = CacheSettings()
    validation: ValidationSettings = ValidationSettings()
    quality: QualitySettings = QualitySettings()
    postgres_writer: PostgresWriterSettings = PostgresWriterSettings()
    backfill: BackfillSettings = BackfillSettings()
    gap_repair: GapRepairSettings = GapRepairSettings()
    metrics: MetricsSettings = MetricsSettings()
    exchanges: list[ExchangeSettings] = msgspec.field(default_factory=list)

    def exchange(self, exchange_id: str) -> ExchangeSettings:
        for ex in self.exchanges:
            if ex.id == exchange_id:
                return ex
        known = ", ".join(ex.id for ex in self.exchanges) or "none"
        raise ConfigError(
            f"exchange {exchange_id!r} is not configured (configured: {known}); add an [[exchanges]] "
            f"table with id = {exchange_id!r} to the config file"
        )


_ENV_OVERRIDES: dict[str, tuple[str, str]] = {
    "MDP_REDIS_URL": ("redis", "url"),
    "MDP_POSTGRES_DSN": ("postgres", "dsn"),
    "MDP_INFLUX_URL": ("influx", "url"),
    "MDP_INFLUX_DATABASE": ("influx", "database"),
    "MDP_INFLUX_USERNAME": ("influx", "username"),
    "MDP_INFLUX_PASSWORD": ("influx", "password"),
    "MDP_INFLUX_TOKEN": ("influx", "token"),
    "MDP_INFLUX_ORG": ("influx", "org"),
    "MDP_INFLUX_GENERATION": ("influx", "generation"),
}


def load_settings(path: str | Path | None = None, env: dict[str, str] | None = None) -> Settings:
    env = dict(os.environ) if env is None else env
    path = Path(path or env.get("MDP_CONFIG") or DEFAULT_CONFIG)
    if not path.is_absolute() and not path.exists():
        path = PROJECT_ROOT / path
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist; set MDP_CONFIG to a file in config/") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from None
    for var, (section, key) in _ENV_OVERRIDES.items():
        if env.get(var):
            raw.setdefault(section, {})[key] = env[var]
    simulator = env.get("MDP_SIMULATOR_URL")
    if simulator:
        for ex in raw.get("exchanges", []):
            if ex.get("rest_url"):
                ex["rest_url"] = simulator.rstrip("/")
            if ex.get("ws_url"):
                ex["ws_url"] = "ws" + simulator.rstrip("/").removeprefix("http")
    try:
        settings = msgspec.convert(raw, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"config file {str(path)!r}: {exc}; see config/simulator.toml for the keys") from None
    _check(settings, path)
    return settings


def _check(settings: Settings, path: Path) -> None:
    def bad(key: str, value: object, fix: str) -> ConfigError:
        return ConfigError(f"config file {str(path)!r}: {key} = {value!r} {fix}")

    bus = settings.bus
    if bus.stream_maxlen < 100:
        raise bad("bus.stream_maxlen", bus.stream_maxlen, "is too small; use at least 100 entries")
    if not 0 < bus.backpressure_high_water < bus.stream_maxlen:
        raise bad("bus.backpressure_high_water", bus.backpressure_high_water,
                  f"must be above 0 and below bus.stream_maxlen ({bus.stream_maxlen})")
    if bus.max_deliveries < 1:
        raise bad("bus.max_deliveries", bus.max_deliveries, "must be at least 1")
    if not 1 <= bus.partitions <= MAX_PARTITIONS:
        raise bad("bus.partitions", bus.partitions, f"must be from 1 to {MAX_PARTITIONS}")
    for ex in settings.exchanges:
        if not ex.symbols:
            raise bad(f"exchanges[{ex.id}].symbols", ex.symbols, "is empty; list at least one unified symbol")
        for url_key in ("rest_url", "ws_url"):
            url = getattr(ex, url_key)
            schemes = ("http://", "https://") if url_key == "rest_url" else ("ws://", "wss://")
            if url and not url.startswith(schemes):
                raise bad(f"exchanges[{ex.id}].{url_key}", url, f"must start with {' or '.join(schemes)}")
        for channel, seconds in ex.stall_s.items():
            if channel not in ("trades", "candles", "ticker", "book", "funding", "open_interest") or seconds <= 0:
                raise bad(f"exchanges[{ex.id}].stall_s.{channel}", seconds,
                          "must name a channel (trades, candles, ticker, book, funding, open_interest) with "
                          "seconds > 0")
        for key in ("book_depth", "book_max_per_s", "book_snapshot_limit", "reconnect_backoff_s",
                    "reconnect_backoff_max_s", "subscribe_per_s", "rest_channel_poll_s", "rest_timeout_s",
                    "publish_buffer_events", "publish_batch_events"):
            if getattr(ex, key) <= 0:
                raise bad(f"exchanges[{ex.id}].{key}", getattr(ex, key), "must be > 0")
        if ex.publish_linger_ms < 0:
            raise bad(f"exchanges[{ex.id}].publish_linger_ms", ex.publish_linger_ms,
                      "must be >= 0 (0 publishes every wake-up at once)")
