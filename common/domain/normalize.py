"""Normalization: an event made canonical (symbols, timestamps, decimals, candle alignment, base-unit amounts).
Used by the normalizer stage (services/normalizer), backfill and gap repair alike (through `common.domain.admit`).
The normalizer stage reads valid:{exchange} (consumer group "normalizer") and publishes the canonical public
feeds md:trade|candle|ticker:{exchange}:{symbol} and md:market:{exchange}. Events it cannot normalize become
Alerts on mdp:alerts; outputs and alerts are returned from the handler, so they are published and the inputs
acknowledged in one MULTI/EXEC.

What "canonical" means (the heuristics):

Symbols - ccxt unified symbols: 'BASE/QUOTE' (spot), 'BASE/QUOTE:SETTLE' (swaps), with an optional
  '-suffix' on the settle part for dated futures/options ('BTC/USD:BTC-240927'). Case is left as is.
  * A symbol containing '/' must have exactly one '/', at most one ':' and no whitespace (surrounding
    whitespace is stripped); otherwise it is rejected with `symbol.invalid`.
  * A symbol without '/' is taken as the exchange's own id ('BTCUSDT', or 'btcusdt' as in Binance stream
    names) and looked up among the Market events this process has seen for that exchange: those flowing
    through valid:{exchange} (learned in order, so a market earlier in a batch maps a trade later in it)
    and, at start, the newest MARKET_BOOTSTRAP_ENTRIES entries of every md:market:* stream. The id is
    tried as is, then upper-cased. Exactly one unified symbol -> mapped. None, or several (Binance uses
    'BTCUSDT' for both spot BTC/USDT and USD-M BTC/USDT:USDT) -> rejected with `symbol.unmapped`, listing
    the candidates. ccxt collectors always emit unified symbols, so this path is for other producers.

Timestamps - integer ns since the epoch, UTC. ts_event, ts_recv and a candle's open_time are each read by
  magnitude (common.domain.quality.to_ns): < 1e11 seconds, < 1e14 milliseconds, < 1e17 microseconds, else ns.
  E.g. 1723161255342 (ms) -> 1723161255342000000. A value <= 0 is rejected (`time.invalid`; the validator
  normally rejects it first).

Decimals - every Decimal field (prices, amounts, OHLCV, bid/ask sizes, market precisions) in its shortest
  exact form: trailing zeros stripped, never a positive exponent, no negative zero.
  Decimal('61837.63000000') -> Decimal('61837.63'); Decimal('0.02000000') -> Decimal('0.02');
  Decimal('1E+2') and Decimal('100.00') -> Decimal('100'); Decimal('0E-8') -> Decimal('0'). The value is
  unchanged; equal values always get the same digits. (str() of a value below 1e-6 still prints with an
  exponent, e.g. '1.23E-8': a consumer wanting fixed-point text uses format(value, 'f').)

Candles - open_time must fall on the timeframe's boundary (`common.domain.timeframe.Timeframe.alignment`), else
  `candle.misaligned`:
  * durations dividing one day (1s..1d: '1m', '5m', '15m', '1h', '4h', '12h', '1d', ...): a multiple of the
    duration since the epoch (UTC midnight alignment, as Binance and most exchanges do);
  * '1w': Monday 00:00 UTC; '1M': the 1st of the month 00:00 UTC;
  * others ('3d', '2w', '3M', '5h', ...) have exchange-specific anchors (Binance's 3d bars do not start on
    epoch multiples): passed unchecked and counted as `unaligned_unchecked`.
  A timeframe that is not <number><s|m|h|d|w|M|y>, written canonically ('1m', not '01m'), is rejected with
  `candle.timeframe`.

Amounts - in base units. A contract market (a unified symbol with a settle part, 'BASE/QUOTE:SETTLE') counts
  trade amounts and ticker bid/ask sizes in contracts (ccxt's unified `amount`: ccxt's own trade cost is
  amount * contractSize * price); its Market's `contract_size` says what one contract is worth:
  * linear (settle != base, e.g. 'BTC/USDT:USDT', 'ETH/USD:USDC'): contract_size is in base units, so
    base = contracts * contract_size (OKX BTC-USDT-SWAP: 0.01 BTC per contract; Binance USD-M: 1);
  * inverse (settle == base, e.g. 'BTC/USD:BTC'): contract_size is in quote units, so
    base = contracts * contract_size / price (Binance COIN-M BTCUSD_PERP: 100 USD per contract), with 28
    significant digits. A ticker size uses its own side's price.
  Candle volumes are left as they come: ccxt's parse_ohlcv already picks the base-unit volume column for
  contracts (Binance kline[7] for inverse, OKX volCcy, Bybit turnover for inverse). Spot symbols (no ':')
  are unchanged. A contract Market without contract_size counts as 1, as ccxt itself assumes. A contract
  symbol whose Market was not seen is rejected with `market.unknown` (its unit cannot be known), one whose
  contract_size is not a positive number with `market.contract_size`; note `contract_scaled` counts the
  events whose amounts were scaled.

Alerts found on valid:* are forwarded to mdp:alerts unchanged; heartbeats are dropped (counted `ignored`).
"""

from __future__ import annotations

import decimal
import re
from decimal import Decimal
from typing import overload

import msgspec

from common.domain import quality
from common.domain.timeframe import ACCEPTED, Alignment, Timeframe, TimeframeError
from common.errors import MdpError
from schemas import Candle, FundingRate, Market, OpenInterest, OrderBook, Ticker, Trade

RULE_SYMBOL_INVALID = "symbol.invalid"
RULE_SYMBOL_UNMAPPED = "symbol.unmapped"
RULE_CANDLE_MISALIGNED = "candle.misaligned"
RULE_CANDLE_TIMEFRAME = "candle.timeframe"
RULE_TIME_INVALID = "time.invalid"
RULE_MARKET_UNKNOWN = "market.unknown"
RULE_CONTRACT_SIZE = "market.contract_size"

_UNIFIED = re.compile(r"^[^/:\s]+/[^/:\s]+(?::[^/:\s]+)?$")
_DEC = decimal.Context(prec=200)
_DIV = decimal.Context(prec=28)  # inverse contracts: base = contracts * size / price rarely terminates
_ONE = Decimal(1)
_ZERO = Decimal(0)
_CANONICAL: dict[float, Decimal] = {}  # canonical_number's memory of floats


@overload
def canonical_decimal(value: Decimal) -> Decimal: ...
@overload
def canonical_decimal(value: None) -> None: ...
@overload
def canonical_decimal(value: Decimal | None) -> Decimal | None: ...
def canonical_decimal(value: Decimal | None) -> Decimal | None:
    """The shortest exact form of `value`: Decimal('61837.63000000') -> Decimal('61837.63'), 1E+2 -> 100."""
    if value is None or not value.is_finite():
        return value
    if value.is_zero():
        return _ZERO
    n = value.normalize(_DEC)
    # typeshed's exponent includes "n"/"N"/"F", the exponents of non-finite values, returned above.
    if n.as_tuple().exponent > 0:  # type: ignore[operator]
        n = n.quantize(_ONE, context=_DEC)
    return n


def canonical_number(x: object) -> Decimal | None:
    """A ccxt number (a float parsed from the exchange's text, or a str/int) as `canonical_decimal` gives it,
    fast: the float's shortest repr (which restores the exchange's text, as `common.exchanges.events.dec`
    does) without a trailing '.0' is already canonical, and floats repeat (a candle's open is the previous
    close), so they are remembered; anything else goes through `canonical_decimal`. None for None and for
    what is not a number."""
    if x is None:
        return None
    if type(x) is float:
        d = _CANONICAL.get(x)
        if d is not None:
            return d
        if len(_CANONICAL) >= 200_000:  # bounded: prices repeat, volumes rarely
            _CANONICAL.clear()
        d = _CANONICAL[x] = _canonical_float(x)
        return d
    try:
        return canonical_decimal(Decimal(str(x)))
    except decimal.InvalidOperation:
        return None


def _canonical_float(x: float) -> Decimal:
    r = repr(x)
    if "e" in r or "n" in r:  # exponent, nan, inf
        return canonical_decimal(Decimal(r))
    d = Decimal(r.removesuffix(".0"))
    return _ZERO if d.is_zero() else d


def canonical_timeframe(text: str) -> Timeframe | None:
    """The timeframe of a candle the normalizer publishes: a ccxt timeframe written canonically ('1m', not
    '01m'); None otherwise."""
    tf = Timeframe.find(text)
    return tf if tf is not None and str(tf) == text else None


def candle_alignment(open_time_ns: int, timeframe: str) -> Alignment:
    """Whether a bar opening at `open_time_ns` sits on its timeframe's boundary (see the module docstring).
    TimeframeError (a ValueError) for a timeframe that is not <number><unit> written canonically."""
    tf = canonical_timeframe(timeframe)
    if tf is None:
        raise TimeframeError(f"timeframe {timeframe!r} is not a canonical ccxt timeframe; use {ACCEPTED}")
    return tf.alignment(open_time_ns)


class SymbolMap:
    """Exchange ids -> ccxt unified symbols, and contract sizes of contract markets, learned from Markets."""

    def __init__(self) -> None:
        self._ids: dict[str, dict[str, set[str]]] = {}
        self.contract_sizes: dict[tuple[str, str], Decimal | None] = {}

    def learn(self, market: Market) -> None:
        if market.exchange_symbol and market.symbol:
            by_id = self._ids.setdefault(market.exchange, {})
            by_id.setdefault(market.exchange_symbol, set()).add(market.symbol)
        if ":" in market.symbol:
            self.contract_sizes[(market.exchange, market.symbol)] = market.contract_size

    def candidates(self, exchange: str, exchange_symbol: str) -> list[str]:
        ids = self._ids.get(exchange, {})
        found = ids.get(exchange_symbol) or ids.get(exchange_symbol.upper()) or set()
        return sorted(found)

    def known(self, exchange: str) -> int:
        return len(self._ids.get(exchange, {}))

    def __len__(self) -> int:
        return sum(len(v) for v in self._ids.values())


class Rejected(MdpError):
    """An event the normalizer will not publish; carries the finding for the alert."""

    def __init__(self, rule: str, reason: str, values: dict[str, str | None]) -> None:
        super().__init__(reason)
        self.finding = quality.Finding(rule, "error", "reject", reason, values)


Normalizable = Trade | Candle | Ticker | Market | OrderBook | FundingRate | OpenInterest


def canonical_symbol(event: Normalizable, symbols: SymbolMap) -> tuple[str, bool]:
    """(unified symbol, whether it was mapped from an exchange id); raises Rejected."""
    raw = event.symbol
    symbol = raw.strip()
    if "/" in symbol:
        if not _UNIFIED.match(symbol):
            raise Rejected(RULE_SYMBOL_INVALID,
                           f"{quality.describe(event)}: symbol {raw!r} is not a ccxt unified symbol (need "
                           f"'BASE/QUOTE' or 'BASE/QUOTE:SETTLE', one '/', at most one ':', no spaces); "
                           f"rejected. Fix the producer's symbol mapping.", {"symbol": raw})
        return symbol, False
    if isinstance(event, Market):
        raise Rejected(RULE_SYMBOL_INVALID,
                       f"{quality.describe(event)}: market symbol {raw!r} is not a ccxt unified symbol; "
                       f"rejected. Markets must carry the unified symbol in 'symbol' and the exchange's "
                       f"id in 'exchange_symbol'.", {"symbol": raw, "exchange_symbol": event.exchange_symbol})
    found = symbols.candidates(event.exchange, symbol)
    if len(found) == 1:
        return found[0], True
    if found:
        why = (f"is the exchange id of several markets ({', '.join(found)}), so the market type is "
               f"ambiguous; the producer must send the unified symbol")
    else:
        why = (f"is not a unified symbol and no market with that exchange id is known for {event.exchange} "
               f"({symbols.known(event.exchange)} known); publish the exchange's markets to md:market "
               f"(collector load_markets) before its data, or send unified symbols")
    raise Rejected(RULE_SYMBOL_UNMAPPED, f"{quality.describe(event)}: symbol {raw!r} {why}; rejected.",
                   {"symbol": raw, "candidates": ", ".join(found) or None,
                    "known_markets": str(symbols.known(event.exchange))})


def _ns(event: Normalizable, name: str, value: int) -> int:
    ns = quality.to_ns(value)
    if ns <= 0:
        raise Rejected(RULE_TIME_INVALID,
                       f"{quality.describe(event)} has {name}={value}, not a positive timestamp; rejected. "
                       f"The producer must send the exchange's time.", {name: str(value)})
    return ns


def contract_scale(event: Trade | Ticker | OrderBook, symbol: str, symbols: SymbolMap) -> tuple[Decimal, bool] | None:
    """(contract size, inverse) of a contract market's event; None for spot; raises Rejected when unknown."""
    if ":" not in symbol:
        return None
    key = (event.exchange, symbol)
    if key not in symbols.contract_sizes:
        raise Rejected(RULE_MARKET_UNKNOWN,
                       f"{quality.describe(event)}: {symbol} is a contract market but no Market for it is known "
                       f"to the normalizer, so the size of one contract (and the amount in base units) is "
                       f"unknown; rejected. Publish the exchange's markets (collector load_markets) before its "
                       f"data.", {"symbol": symbol})
    size = symbols.contract_sizes[key]
    if size is None:
        size = _ONE  # as ccxt itself does (safe_value(market, 'contractSize', 1))
    if not size.is_finite() or size <= 0:
        raise Rejected(RULE_CONTRACT_SIZE,
                       f"{quality.describe(event)}: the Market of {symbol} has contract_size={text_of(size)}, so "
                       f"its amounts (in contracts) cannot be put in base units; rejected. Check what ccxt's "
                       f"load_markets reports as contractSize for it.",
                       {"symbol": symbol, "contract_size": text_of(size)})
    base = symbol.partition("/")[0]
    settle = symbol.partition(":")[2].partition("-")[0]
    return size, settle == base


def text_of(value: Decimal | None) -> str | None:
    return quality.text(value)


def to_base(amount: Decimal | None, price: Decimal | None, size: Decimal, inverse: bool) -> Decimal | None:
    """Contracts -> base units (see the module docstring); None stays None, and so does an inverse amount
    without a usable price."""
    if amount is None or not amount.is_finite():
        return amount
    if not inverse:
        return amount * size
    if price is None or not price.is_finite() or price <= 0:
        return None
    return _DIV.divide(amount * size, price)


def normalize(event: Normalizable, symbols: SymbolMap) -> tuple[Normalizable, set[str]]:
    """The canonical form of `event` and notes on what changed ('symbol_mapped', 'ts_rescaled');
    raises Rejected. A Market also teaches `symbols` its exchange id."""
    symbol, mapped = canonical_symbol(event, symbols)
    notes: set[str] = {"symbol_mapped"} if mapped else set()
    stamps = {"ts_event": event.ts_event, "ts_recv": event.ts_recv}
    if isinstance(event, Candle):
        stamps["open_time"] = event.open_time
    changes: dict[str, object] = {"symbol": symbol}
    for name, value in stamps.items():
        ns = _ns(event, name, value)
        if ns != value:
            notes.add("ts_rescaled")
        changes[name] = ns
    cd = canonical_decimal
    if isinstance(event, Trade):
        amount = event.amount
        scale = contract_scale(event, symbol, symbols)
        if scale is not None:
            amount = to_base(amount, event.price, *scale)
            notes.add("contract_scaled")
        changes.update(price=cd(event.price), amount=cd(amount))
    elif isinstance(event, Candle):
        changes.update(open=cd(event.open), high=cd(event.high), low=cd(event.low), close=cd(event.close),
                       volume=cd(event.volume))
        open_time = changes["open_time"]
        assert isinstance(open_time, int)
        tf = canonical_timeframe(event.timeframe)
        if tf is None:
            raise Rejected(RULE_CANDLE_TIMEFRAME,
                           f"{quality.describe(event)}: timeframe {event.timeframe!r} is not a ccxt "
                           f"timeframe (<number><s|m|h|d|w|M|y>, e.g. '1m'); rejected. Check the collector's "
                           f"timeframe setting.", {"timeframe": event.timeframe})
        alignment = tf.alignment(open_time)
        if alignment == "misaligned":
            expected = tf.floor(open_time) if tf.epoch_aligned else None  # 1w, 1M: no hint
            hint = f"; the bar containing it opens at {quality.iso(expected)} ({expected})" if expected else \
                ""
            raise Rejected(RULE_CANDLE_MISALIGNED,
                           f"{quality.describe(event)}: open_time {open_time} ({quality.iso(open_time)}) is "
                           f"not on a {event.timeframe} boundary{hint}; rejected. The producer sent the "
                           f"close or update time instead of the bar's open time, or a wrong timeframe.",
                           {"open_time": str(event.open_time), "open_time_ns": str(open_time),
                            "timeframe": event.timeframe,
                            "expected_open_time": str(expected) if expected is not None else None})
        if alignment == "unchecked":
            notes.add("unaligned_unchecked")
    elif isinstance(event, Ticker):
        bid_size, ask_size = event.bid_size, event.ask_size
        scale = contract_scale(event, symbol, symbols)
        if scale is not None and (bid_size is not None or ask_size is not None):
            bid_size = to_base(bid_size, event.bid, *scale)
            ask_size = to_base(ask_size, event.ask, *scale)
            notes.add("contract_scaled")
        changes.update(bid=cd(event.bid), ask=cd(event.ask), last=cd(event.last), bid_size=cd(bid_size),
                       ask_size=cd(ask_size))
    elif isinstance(event, Market):
        changes.update(contract_size=cd(event.contract_size), price_precision=cd(event.price_precision),
                       amount_precision=cd(event.amount_precision))
    elif isinstance(event, OrderBook):
        changes.update(bids=book_levels(event, event.bids, symbol, symbols, notes),
                       asks=book_levels(event, event.asks, symbol, symbols, notes))
    elif isinstance(event, FundingRate):
        changes.update(funding_rate=cd(event.funding_rate), mark_price=cd(event.mark_price),
                       index_price=cd(event.index_price),
                       next_funding_time=quality.to_ns(event.next_funding_time)
                       if event.next_funding_time else None)
    elif isinstance(event, OpenInterest):  # amount stays in contracts, as the schema says
        changes.update(amount=cd(event.amount), value=cd(event.value))
    out = msgspec.structs.replace(event, **changes)
    if isinstance(out, Market):
        symbols.learn(out)
    return out, notes


def book_levels(event: OrderBook, levels: tuple[tuple[Decimal, Decimal], ...], symbol: str, symbols: SymbolMap,
                notes: set[str]) -> tuple[tuple[Decimal, Decimal], ...]:
    """A book side with canonical decimals and, on a contract market, amounts in base units (as ticker sizes)."""
    scale = contract_scale(event, symbol, symbols)
    if scale is None:
        return tuple((canonical_decimal(p), canonical_decimal(a)) for p, a in levels)
    notes.add("contract_scaled")
    return tuple((canonical_decimal(p), canonical_decimal(to_base(a, p, *scale))) for p, a in levels)  # type: ignore[misc]
