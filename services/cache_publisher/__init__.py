"""The cache publisher: md:trade|ticker|candle:* -> price keys, recent-trade lists, ticks pub/sub in Redis."""

from services.cache_publisher.service import CachePublisher

__all__ = ["CachePublisher"]
