"""A collector program whose exchange the config leaves out (`--idle-unless-configured`): it collects nothing
and says so in its heartbeat, so `mdp status` shows why and `make demo` keeps every supervisord program up.
Kept apart from service.py so that such a process does not even import ccxt."""

from __future__ import annotations

import asyncio
import logging

from common.bus.stage import Service
from common.config import Settings

log = logging.getLogger(__name__)


class Unconfigured(Service):
    """A collector program whose exchange the config leaves out: it collects nothing and says so in its
    heartbeat (state degraded), so `mdp status` shows why, and `make demo` keeps every program up."""

    name = "collector"
    cluster_ready = True  # it writes only its heartbeats

    def __init__(self, settings: Settings, instance: str | None = None, exchange: str = "",
                 shard: str | None = None, idle_unless_configured: bool = True) -> None:
        super().__init__(settings, instance)
        self.instance = f"{exchange}-{self.instance}"
        self.detail = (f"exchange {exchange!r} is not in the config's [[exchanges]]: collecting nothing; add it "
                       f"there (id = {exchange!r}) or remove [program:collector-{exchange}] from supervisord.conf")

    async def run(self, stop: asyncio.Event) -> None:
        log.warning("%s", self.detail)
        self.state = "degraded"
        await stop.wait()
