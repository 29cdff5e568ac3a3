"""The aggregator: 1m candles from trades (reconciled with the exchange's), higher timeframes from 1m."""

from services.aggregator.service import Aggregator

__all__ = ["Aggregator"]
