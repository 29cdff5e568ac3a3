"""Per-series state of a stateful stage (the validator's stream rules, the aggregator's bars), staged per batch.

`SeriesBook` holds every series' state in memory, least recently used first, at most `max_series` of them.
A batch works on a `Staging` (a private copy of each series it touches); once the batch is durable the
staged copies become the book's (`Staging.commit()`), so a batch whose commit fails is judged again against
the same state. Persisting it is the bus's business (common/bus/checkpoint.py); this module is pure.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

SeriesKey = tuple[str, str, str, str]  # (exchange, symbol, kind, timeframe)


class _Copyable(Protocol):
    def copy(self) -> Any: ...


S = TypeVar("S", bound=_Copyable)


def field_of(key: SeriesKey) -> str:
    return "|".join(key)


def key_of(field: str) -> SeriesKey:
    exchange, rest = field.split("|", 1)
    symbol, kind, timeframe = rest.rsplit("|", 2)  # a symbol may hold '|', the other parts never do
    return exchange, symbol, kind, timeframe


class SeriesBook:
    """Every series' state, least recently used first, at most `max_series` of them."""

    def __init__(self, max_series: int) -> None:
        self.max_series = max(1, max_series)
        self.series: OrderedDict[SeriesKey, Any] = OrderedDict()
        self.evicted = 0

    def stage(self) -> Staging:
        return Staging(self)

    def forget(self) -> None:
        """Drop everything in memory (it is reloaded from the checkpoint series by series)."""
        self.series.clear()

    def __len__(self) -> int:
        return len(self.series)


class Staging:
    """The changes of one batch: a private copy of each series it touches, written back by `commit()`."""

    def __init__(self, book: SeriesBook) -> None:
        self.book = book
        self.touched: dict[SeriesKey, Any] = {}
        self._evictions: list[SeriesKey] | None = None

    def get(self, key: SeriesKey, new: Callable[[], S]) -> S:
        state = self.touched.get(key)
        if state is None:
            committed = self.book.series.get(key)
            state = self.touched[key] = committed.copy() if committed is not None else new()
        return state

    def evictions(self) -> list[SeriesKey]:
        """The series `commit()` will forget to stay within max_series (least recently used first); fixed on
        the first call, so the checkpoint deletes exactly what the commit evicts."""
        if self._evictions is None:
            series = self.book.series
            excess = len(series) + sum(1 for k in self.touched if k not in series) - self.book.max_series
            order = [k for k in series if k not in self.touched] + list(self.touched)
            self._evictions = order[:max(0, excess)]
        return self._evictions

    def commit(self) -> None:
        series = self.book.series
        evict = self.evictions()
        for key, state in self.touched.items():
            series[key] = state
            series.move_to_end(key)
        for key in evict:
            if series.pop(key, None) is not None:
                self.book.evicted += 1
        self.touched = {}
        self._evictions = None
