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
import logging

__all__ = ["cancel_and_wait"]

log = logging.getLogger(__name__)


async def cancel_and_wait(*tasks: asyncio.Task[object], poll_s: float = 0.1) -> None:
    """Cancel `tasks` and return once every one has ended, cancelling again (every `poll_s`) a task that runs
    on. The tasks' own outcomes (a result, an exception, the cancellation) are left on them, retrieved.

    If the caller is itself cancelled meanwhile (a partitioned stage stopping every slot after one failed),
    the tasks still running are left to end by the cancellation already sent; an exception one of them ends
    with is logged as one line naming the task, not by asyncio as "Task exception was never retrieved" with
    a traceback (its cause has been raised by the owner that stopped them)."""
    pending = {t for t in tasks if not t.done()}
    try:
        while pending:
            for t in pending:
                t.cancel()
            _, pending = await asyncio.wait(pending, timeout=poll_s)
    finally:
        for t in tasks:
            if not t.done():
                t.add_done_callback(_left_running)
            elif not t.cancelled():
                t.exception()  # retrieved: asyncio does not log it as never retrieved


def _left_running(task: asyncio.Task[object]) -> None:
    exc = None if task.cancelled() else task.exception()
    if exc is not None:
        log.warning("task %s, stopped while its owner was being cancelled, ended with %s: %s", task.get_name(),
                    type(exc).__name__, exc)
