"""Stopping asyncio tasks for sure.

On Python 3.11 a cancellation can be lost: `asyncio.wait_for` returns the inner result instead of raising
CancelledError when the inner awaitable finishes in the same turn as the cancellation lands (fixed in 3.12).
redis-py wraps every command's send in `wait_for` when the client has a socket timeout (ours do), so a task
cancelled while it talks to Redis may run on, its cancellation consumed: a lease renewal that keeps renewing,
a claim loop that keeps claiming entries nobody processes. So a task that must end is asked twice: its loop
watches a flag or event its owner sets, and `cancel_and_wait` cancels again until it has ended.
This module is in the bottom layer: it imports nothing of ours.
"""

from __future__ import annotations

import asyncio

__all__ = ["cancel_and_wait"]


async def cancel_and_wait(*tasks: asyncio.Task[object], poll_s: float = 0.1) -> None:
    """Cancel `tasks` and return once every one has ended, cancelling again (every `poll_s`) a task that runs
    on. The tasks' own outcomes (a result, an exception, the cancellation) are left on them, retrieved."""
    pending = {t for t in tasks if not t.done()}
    while pending:
        for t in pending:
            t.cancel()
        _, pending = await asyncio.wait(pending, timeout=poll_s)
    for t in tasks:
        if not t.cancelled():
            t.exception()  # retrieved: asyncio does not log it as never retrieved
