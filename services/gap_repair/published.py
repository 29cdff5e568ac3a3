"""What this process's repairs published into raw:{exchange}, remembered so that the same loss announced twice
(the collector's Gap and the validator's, a Gap and the scan) is not fetched and published twice before the
pipeline has stored the first copy (which is when InfluxDB starts saying "held").

A repair of a Gap entry stages its keys; they become remembered only when the bus acknowledged the entry
(published and acknowledged in one MULTI/EXEC: `commit`, from the consumer's on_acked), and are dropped when
the batch is handled again (`discard`: nothing of it was published). Staging is per partition: an instance
holding several partitions handles their batches concurrently, and one partition's acknowledgement must not
remember what another's batch staged and may yet fail to publish (a redelivered Gap would then skip trades
never published: a loss), nor its retry drop another's staging. The scan remembers what it published
once its publish returned. At most `cap` keys (oldest forgotten first): a loss announced again after that is
fetched and published again, and the validator drops what it already forwarded (trade ids, identical closed
candles). The memory is this process's: a restarted gap_repair starts empty, so a Gap redelivered after a
kill is repaired and published in full.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from schemas import Candle, Trade

Key = tuple[str, ...]
CAP = 200_000  # keys of about 100 bytes: ~20 MB at most


def key_of(event: Trade | Candle) -> Key:
    if isinstance(event, Trade):
        return ("trade", event.exchange, event.symbol, event.trade_id)
    return ("candle", event.exchange, event.symbol, event.timeframe, str(event.open_time))


def trade_key(exchange: str, symbol: str, trade_id: str) -> Key:
    return ("trade", exchange, symbol, trade_id)


def candle_key(exchange: str, symbol: str, timeframe: str, open_time: int) -> Key:
    return ("candle", exchange, symbol, timeframe, str(open_time))


class Published:
    def __init__(self, cap: int = CAP) -> None:
        self.cap = cap
        self._acked: OrderedDict[Key, None] = OrderedDict()
        self._staged: dict[int | None, set[Key]] = {}  # partition (None: not partitioned) -> keys

    def __contains__(self, key: Key) -> bool:
        return key in self._acked or any(key in keys for keys in self._staged.values())

    def __len__(self) -> int:
        return len(self._acked)

    def stage(self, events: Iterable[Trade | Candle], partition: int | None = None) -> None:
        """Published by the batch of `partition` being handled, not acknowledged yet."""
        self._staged.setdefault(partition, set()).update(key_of(e) for e in events)

    def commit(self, partition: int | None = None) -> None:
        """The batch of `partition` was acknowledged: what it staged is on raw:{exchange}."""
        self._remember(self._staged.pop(partition, ()))

    def discard(self, partition: int | None = None) -> None:
        """The batch of `partition` is handled again: nothing it staged was published."""
        self._staged.pop(partition, None)

    def remember(self, events: Iterable[Trade | Candle]) -> None:
        """Published outside a Gap entry's acknowledgement (the scan), after the publish returned."""
        self._remember(key_of(e) for e in events)

    def _remember(self, keys: Iterable[Key]) -> None:
        for key in keys:
            self._acked[key] = None
            self._acked.move_to_end(key)
        while len(self._acked) > self.cap:
            self._acked.popitem(last=False)


__all__ = ["Published", "candle_key", "key_of", "trade_key"]
