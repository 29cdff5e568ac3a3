"""Message schemas. Import from here: `from schemas import Trade, Candle, Event, Codec`."""

from schemas.codec import Codec, DecodeError
from schemas.events import (
    KIND_OF,
    Alert,
    Candle,
    Event,
    FundingRate,
    Gap,
    Heartbeat,
    Market,
    MarketEvent,
    OpenInterest,
    OrderBook,
    Severity,
    Side,
    Ticker,
    Trade,
)

__all__ = [
    "KIND_OF", "Alert", "Candle", "Codec", "DecodeError", "Event", "FundingRate", "Gap", "Heartbeat", "Market",
    "MarketEvent", "OpenInterest", "OrderBook", "Severity", "Side", "Ticker", "Trade",
]
