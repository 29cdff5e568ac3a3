"""Exchange collector service: ccxt.pro WebSocket + REST fallback -> raw:{exchange}."""
