"""Stream names: a public contract. Strategies may read any `md:*` stream with a consumer group of their own.

  raw:{exchange}                    collector -> validator: everything a collector saw, as received (internal)
  valid:{exchange}                  validator -> normalizer: events that passed validation (internal)
  md:{kind}:{exchange}:{symbol}     normalized public feeds, kind in trade | candle | ticker
                                    e.g. md:trade:binance:BTC/USDT, md:candle:binance:BTC/USDT
  md:market:{exchange}              market catalog entries from ccxt's load_markets
  mdp:alerts                        quality and pipeline alerts (rejected events with reason and values)
  mdp:heartbeats                    service heartbeats
  dlq:{stream}                      dead letters of {stream}: entries that failed max_deliveries times
  mdp:streams (a set)               every md:* / raw:* / valid:* stream that has been published to
"""

from __future__ import annotations

ALERTS = "mdp:alerts"
HEARTBEATS = "mdp:heartbeats"
REGISTRY = "mdp:streams"
ALIVE_PREFIX = "mdp:alive:"


def raw(exchange: str) -> str:
    return f"raw:{exchange}"


def valid(exchange: str) -> str:
    return f"valid:{exchange}"


def market_data(kind: str, exchange: str, symbol: str) -> str:
    return f"md:{kind}:{exchange}:{symbol}"


def markets(exchange: str) -> str:
    return f"md:market:{exchange}"


def dead_letter(stream: str) -> str:
    return f"dlq:{stream}"


def alive_key(service: str, instance: str) -> str:
    return f"{ALIVE_PREFIX}{service}:{instance}"
