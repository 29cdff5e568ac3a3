"""The one retry delay: exponential with a cap and jitter, and a sleep that a stop event cuts short.

Every loop that waits for something to come back (Redis, a store, an exchange) uses `Backoff`:

    backoff = Backoff(first_s=0.5, cap_s=30.0)
    while True:
        try:
            ...; backoff.reset(); break
        except StoreUnavailable as exc:
            log.error("... retrying in %.1f s", backoff.delay)
            if await backoff.sleep(stop):
                return                              # stopping

Jitter is a factor drawn uniformly from `spread` (default 0.8-1.2: retrying processes spread out yet wait
about the nominal delay); `EQUAL` (0.5-1.0, "equal jitter") never waits longer than the nominal delay.
This module is in the bottom layer: it imports nothing of ours.
"""

from __future__ import annotations

import asyncio
import random

__all__ = ["EQUAL", "EXACT", "SPREAD", "Backoff", "jittered", "sleep_unless"]

SPREAD = (0.8, 1.2)  # +-20% around the nominal delay
EQUAL = (0.5, 1.0)  # half fixed, half random: never longer than the nominal delay
EXACT = (1.0, 1.0)  # no jitter


def jittered(seconds: float, spread: tuple[float, float] = SPREAD, rng: random.Random | None = None) -> float:
    """`seconds` times a factor drawn uniformly from `spread` (low, high)."""
    low, high = spread
    if low == high:
        return seconds * low
    return seconds * (low + (high - low) * (rng or random).random())


async def sleep_unless(stop: asyncio.Event, seconds: float, spread: tuple[float, float] = SPREAD) -> bool:
    """Sleep about `seconds` (jittered by `spread`, +-20% unless told: retrying processes spread out; `EXACT`
    for a fixed period), or less if `stop` is set meanwhile; True if `stop` is set."""
    # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation of the caller that
    # arrives as the event is set, leaving a task that was told to stop running on.
    try:
        async with asyncio.timeout(jittered(seconds, spread)):
            await stop.wait()
        return True
    except TimeoutError:
        return stop.is_set()


class Backoff:
    """Delays first_s, 2*first_s, 4*first_s, ... capped at cap_s (`factor` 2 unless told), each jittered.
    `delay` is the nominal delay of the next wait (for log lines); `next()` draws it and moves on;
    `reset()` starts again from first_s after a success."""

    def __init__(self, first_s: float, cap_s: float, *, factor: float = 2.0,
                 spread: tuple[float, float] = SPREAD, rng: random.Random | None = None) -> None:
        if first_s <= 0 or cap_s < first_s or factor < 1:
            raise ValueError(f"Backoff(first_s={first_s}, cap_s={cap_s}, factor={factor}) is not a backoff: "
                             f"need 0 < first_s <= cap_s and factor >= 1")
        self.first_s, self.cap_s, self.factor = first_s, cap_s, factor
        self.spread, self.rng = spread, rng
        self.attempts = 0  # waits since the last reset
        self.delay = first_s

    def reset(self) -> None:
        self.attempts, self.delay = 0, self.first_s

    def next(self) -> float:
        """The jittered delay to wait now; the nominal delay grows for the wait after."""
        seconds = jittered(self.delay, self.spread, self.rng)
        self.attempts += 1
        self.delay = min(self.delay * self.factor, self.cap_s)
        return seconds

    async def sleep(self, stop: asyncio.Event) -> bool:
        """Wait the next delay, or less if `stop` is set meanwhile; True if `stop` is set."""
        return await sleep_unless(stop, self.next(), EXACT)
