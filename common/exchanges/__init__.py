"""Exchanges: ccxt clients with configurable endpoints (`clients`), the shared rate budget (`ratelimit`) and the
adapters from ccxt structures to our events (`events`).
"""
