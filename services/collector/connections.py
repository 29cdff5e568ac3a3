"""The ccxt.pro connections of the collector's exchange object, and which feeds each one carries.

ccxt.pro opens connections by itself (one per URL) and reconnects silently on the next watch call, so the
collector watches them from outside: a connection that closes or fails opens an outage on the feeds it
carried (also when no task was waiting on it), a stalled feed's connection is closed to force a reconnect,
and on exchanges that number their messages (Coinbase) a skipped number drops the books and reconnects.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import ccxt

from services.collector.feeds import Feed

log = logging.getLogger(__name__)


class Connections:
    """The connections of `exchange` (a ccxt.pro object) and the feeds they carry (`feeds`, set once planned)."""

    def __init__(self, exchange: Any, exchange_id: str, count: Counter[str]) -> None:
        self.exchange = exchange
        self.exchange_id = exchange_id
        self.count = count
        self.feeds: list[Feed] = []

    def _needles(self, symbol: str) -> set[str]:
        """Strings that name `symbol` in ccxt's subscription keys ('btcusdt@trade', 'trade:BTC/USDC:USDC')."""
        market = (self.exchange.markets or {}).get(symbol) or {}
        needles = {symbol}
        for key in ("id", "lowercaseId"):
            value = str(market.get(key) or "")
            if len(value) >= 4:
                needles.add(value)
        return needles

    def _carries(self, client: Any, feed: Feed, by_hint: bool) -> bool:
        """Whether ccxt connection `client` carries `feed`: a subscription key names its symbol (and, with
        `by_hint`, its channel)."""
        keys = [str(k).lower() for k in (getattr(client, "subscriptions", None) or {})]
        needles = [n.lower() for n in self._needles(feed.symbol)]
        return any(any(n in k for n in needles) and (not by_hint or any(h in k for h in feed.hints))
                   for k in keys)

    def feeds_on(self, client: Any) -> list[Feed]:
        """The feeds a connection carries: matched by symbol and channel, else by symbol, else (cannot
        tell) every feed of the process."""
        for by_hint in (True, False):
            hit = [f for f in self.feeds if self._carries(client, f, by_hint)]
            if hit:
                return hit
        return list(self.feeds)

    def drop(self, feed: Feed, reason: str) -> int:
        """Close the ccxt connection(s) carrying `feed` (matched like `feeds_on`; all when none can be told
        apart), so the next watch call reconnects and resubscribes. Returns how many were closed."""
        clients = list((self.exchange.clients or {}).values())
        chosen: list[Any] = []
        for by_hint in (True, False):
            chosen = [c for c in clients if self._carries(c, feed, by_hint)]
            if chosen:
                break
        for client in chosen or clients:
            client.on_error(ccxt.NetworkError(reason))
        return len(chosen or clients)

    def watch(self, numbered_messages: bool) -> None:
        """Open an outage on the feeds of a ccxt connection that closes or fails, also when no task of ours
        was waiting on it at that moment (ccxt then reconnects silently on the next watch call); with
        `numbered_messages`, check each connection's message numbers too."""
        exchange = self.exchange
        on_close, on_error = exchange.on_close, exchange.on_error

        def current(client: Any) -> bool:  # a connection we already dropped closes late: not news
            return (exchange.clients or {}).get(client.url) is client

        def closed(client: Any, code: Any) -> Any:
            for feed in self.feeds_on(client) if current(client) else []:
                feed.open_outage(f"connection closed (code {code})")
            return on_close(client, code)

        def failed(client: Any, error: Any) -> Any:
            for feed in self.feeds_on(client) if current(client) else []:
                feed.open_outage(f"connection failed ({type(error).__name__}: {error})")
            return on_error(client, error)

        exchange.on_close, exchange.on_error = closed, failed
        if numbered_messages:
            self._check_sequence()

    def _check_sequence(self) -> None:
        """Coinbase Advanced Trade numbers every message of a connection (`sequence_num`, +1 each, any channel);
        ccxt.pro 4.5.90 does not look at it. A skipped number is a lost message, and a lost level2 update
        makes a wrong book: drop ccxt's books of that connection and reconnect (a fresh snapshot follows),
        with an outage (Gap) on every feed it carried."""
        exchange = self.exchange
        handle = exchange.handle_message

        def checked(client: Any, message: Any) -> Any:
            seq = message.get("sequence_num") if isinstance(message, dict) else None
            if isinstance(seq, int):
                last = getattr(client, "mdp_sequence", None)
                client.mdp_sequence = seq
                if last is not None and seq != last + 1:
                    self._on_sequence_gap(client, last, seq)
                    return None
            return handle(client, message)

        exchange.handle_message = checked

    def _on_sequence_gap(self, client: Any, last: int, seq: int) -> None:
        self.count["sequence_gaps"] += 1
        reason = f"sequence gap: message {seq} after {last} ({seq - last - 1} lost); books resynced"
        log.warning("%s %s; reconnecting %s", self.exchange_id, reason, client.url)
        for feed in self.feeds_on(client):
            feed.open_outage(reason)
            if "book" in feed.channels:
                (self.exchange.orderbooks or {}).pop(feed.symbol, None)
                self.count["book_resyncs"] += 1
        client.on_error(ccxt.NetworkError(reason))
