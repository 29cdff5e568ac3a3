"""Building ccxt / ccxt.pro exchange objects from config, with every endpoint overridable.

ccxt's `hostname` option does not reach every URL (FACTS.md), so we rewrite each URL in
`exchange.urls['api']` (a nested dict, or a plain string for some exchanges' `ws`):
  url_rewrite = "host-prefix":  https://api.binance.com/api/v3  ->  {rest_url}/api.binance.com/api/v3
                                wss://stream.binance.com:9443/ws -> {ws_url}/stream.binance.com/ws
  url_rewrite = "path":         https://api.binance.com/api/v3  ->  {rest_url}/api/v3
"host-prefix" lets one server stand in for all of an exchange's hosts (our simulator); it also keeps the
host name in the URL, which ccxt.pro binance reads to tell spot (`/stream`) from futures sockets.
"""

from __future__ import annotations

from typing import Any, cast
from urllib.parse import urlsplit

import ccxt
import ccxt.pro as ccxtpro

from common.config import ConfigError, ExchangeSettings


def rewrite_url(url: str, base: str, mode: str) -> str:
    parts = urlsplit(url)
    base = base.rstrip("/")
    if mode == "host-prefix":
        return f"{base}/{parts.hostname}{parts.path}" + (f"?{parts.query}" if parts.query else "")
    return f"{base}{parts.path}" + (f"?{parts.query}" if parts.query else "")


def _rewrite_tree(node: Any, rest_base: str, ws_base: str, mode: str) -> Any:
    if isinstance(node, dict):
        return {k: _rewrite_tree(v, rest_base, ws_base, mode) for k, v in node.items()}
    if isinstance(node, str) and "://" in node:
        is_ws = node.startswith(("ws://", "wss://"))
        base = ws_base if is_ws else rest_base
        return rewrite_url(node, base, mode) if base else node
    return node


def apply_endpoints(exchange: ccxt.Exchange, settings: ExchangeSettings) -> None:
    """Point every REST and WebSocket URL of `exchange` at the configured bases (no-op when both empty)."""
    if not settings.rest_url and not settings.ws_url:
        return
    exchange.urls["api"] = _rewrite_tree(exchange.urls["api"], settings.rest_url, settings.ws_url,
                                         settings.url_rewrite)


def ccxt_config(settings: ExchangeSettings) -> dict[str, Any]:
    options: dict[str, Any] = {
        # Raised so that bursts between two watch_* calls lose nothing (ccxt's default keeps 1000).
        "tradesLimit": settings.trades_limit,
        "OHLCVLimit": settings.ohlcv_limit,
        "fetchMarkets": {"types": list(settings.market_types)},
    }
    options.update(settings.ccxt_options)
    return {"enableRateLimit": True, "options": options}


def _build(module: Any, family: str, settings: ExchangeSettings) -> Any:
    """`settings.id`'s class of ccxt `module` (ccxt.pro or ccxt.async_support), configured and rewritten."""
    cls = getattr(module, settings.id, None)
    if cls is None:
        raise ConfigError(f"exchanges[{settings.id}].id = {settings.id!r} is not a {family} exchange id; "
                          f"see {family}.exchanges for the list")
    exchange = cls(ccxt_config(settings))
    apply_endpoints(exchange, settings)
    return exchange


def make_pro_exchange(settings: ExchangeSettings) -> ccxtpro.Exchange:
    return cast("ccxtpro.Exchange", _build(ccxtpro, "ccxt.pro", settings))


def make_rest_exchange(settings: ExchangeSettings) -> ccxt.async_support.Exchange:
    import ccxt.async_support as ccxt_async

    return cast("ccxt.async_support.Exchange", _build(ccxt_async, "ccxt", settings))
