"""The pure domain core: time units, spans, timeframes, decimals, normalization, the quality rules, the
staged per-series state and bar building. No Redis, ccxt, aiohttp, asyncpg or InfluxDB client here (an
import-linter contract in pyproject.toml holds it): everything is a function of its inputs, so the live stages,
backfill and gap repair share it and tests need no server.
"""
