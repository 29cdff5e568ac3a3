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

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = PROJECT_ROOT / "config" / "simulator.toml"


class ConfigError(ValueError):
    """A configuration value that cannot be used. The message names the key, the value and the fix."""


class RedisSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    url: str = "redis://127.0.0.1:6379/0"


class PostgresSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    dsn: str = "postgresql://postgres@127.0.0.1:5432/market_data"


class InfluxSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    url: str = "http://127.0.0.1:8086"
    database: str = "market_data"
    username: str = ""
    password: str = ""
    batch_points: int = 5000
    timeout_s: float = 10.0


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


class CacheSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    price_ttl_s: int = 300
    recent_trades: int = 1000


class ValidationSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # An event stamped further than this in the future (exchange time vs our clock) is rejected.
    max_future_skew_s: float = 5.0


class ExchangeSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    id: str
    symbols: list[str]
    channels: list[Literal["trades", "candles"]] = msgspec.field(default_factory=lambda: ["trades", "candles"])
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
    trades_limit: int = 100_000
    ohlcv_limit: int = 10_000
    ccxt_options: dict[str, object] = msgspec.field(default_factory=dict)


class Settings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    redis: RedisSettings = RedisSettings()
    postgres: PostgresSettings = PostgresSettings()
    influx: InfluxSettings = InfluxSettings()
    bus: BusSettings = BusSettings()
    cache: CacheSettings = CacheSettings()
    validation: ValidationSettings = ValidationSettings()
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
    for ex in settings.exchanges:
        if not ex.symbols:
            raise bad(f"exchanges[{ex.id}].symbols", ex.symbols, "is empty; list at least one unified symbol")
        for url_key in ("rest_url", "ws_url"):
            url = getattr(ex, url_key)
            schemes = ("http://", "https://") if url_key == "rest_url" else ("ws://", "wss://")
            if url and not url.startswith(schemes):
                raise bad(f"exchanges[{ex.id}].{url_key}", url, f"must start with {' or '.join(schemes)}")
