"""The replay of one simulated exchange as one asyncio task, shared by the spot simulator and its venues."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from typing import Any

log = logging.getLogger("simulator")


class ReplayTask:
    """Start (cancelling the one running), cancel and wait, and wait for the end of a venue's replay. A replay
    that raises is logged and counts as finished (`on_failure` runs first), so nobody waits forever on it."""

    def __init__(self, name: str, on_failure: Callable[[], None]) -> None:
        self.name = name
        self.on_failure = on_failure
        self.finished = asyncio.Event()  # set by the replay when it sent its last event, or when it failed
        self._task: asyncio.Task[None] | None = None

    def start(self, replay: Callable[[], Coroutine[Any, Any, None]]) -> None:
        self.cancel_nowait()
        self.finished.clear()
        self._task = asyncio.get_running_loop().create_task(replay(), name=self.name)
        self._task.add_done_callback(self._done)

    def cancel_nowait(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()

    async def cancel(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def wait_finished(self, timeout: float | None = None) -> None:
        """Until the replay has sent its last event (raises TimeoutError; never returns while looping)."""
        await asyncio.wait_for(self.finished.wait(), timeout)

    def _done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("%s failed: %r", self.name, exc, exc_info=exc)
            self.on_failure()
            self.finished.set()
