"""The normalizer: valid:{exchange} -> md:{kind}:{exchange}:{symbol} and md:market:{exchange}."""

from services.normalizer.service import Normalizer

__all__ = ["Normalizer"]
