"""What the writer's stores share: an event with its place on the bus, and row-building helpers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from schemas import Event

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Item:
    """An event with where it came from on the bus: to key it by delivery, or to dead-letter it."""

    stream: str
    entry_id: str
    idx: int
    event: Event


def ts(ns: int) -> datetime:
    """Nanoseconds since the epoch as an aware datetime (PostgreSQL keeps microseconds)."""
    return EPOCH + timedelta(microseconds=ns // 1000)


def rows_of(status: str) -> int:
    """The row count of a command status such as 'INSERT 0 17'."""
    try:
        return int(status.rsplit(" ", 1)[-1])
    except ValueError:
        return 0


def columns(rows: Sequence[tuple[Any, ...]], width: int) -> list[list[Any]]:
    """Rows as column arrays, for INSERT ... SELECT FROM unnest($1::type[], ...)."""
    cols: list[list[Any]] = [[] for _ in range(width)]
    for row in rows:
        for col, value in zip(cols, row, strict=True):
            col.append(value)
    return cols
