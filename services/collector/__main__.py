"""Exchange collector service: ccxt.pro WebSocket + REST -> raw:{exchange} (and Gap markers -> mdp:gaps)."""
import sys
from typing import Any

from common.bus.stage import service_main
from common.config import load_settings


def _configured(argv: list[str]) -> bool:
    """Whether --exchange names an [[exchanges]] entry of the config (--config or $MDP_CONFIG)."""
    exchange = argv[argv.index("--exchange") + 1] if "--exchange" in argv else ""
    config = argv[argv.index("--config") + 1] if "--config" in argv else None
    return any(ex.id == exchange for ex in load_settings(config).exchanges)


OPTIONS: list[tuple[str, dict[str, Any]]] = [
    ("--exchange", {"required": True, "help": "ccxt exchange id configured in [[exchanges]], e.g. binance"}),
    ("--shard", {"default": None, "help": "i/n: collect only shard i of n of the symbols (stable by name)"}),
]
IDLE: tuple[str, dict[str, Any]] = (
    "--idle-unless-configured", {"action": "store_true",
                                 "help": "when the config has no [[exchanges]] entry for --exchange, stay up "
                                         "idle, saying so in `mdp status`, instead of exiting (supervisord "
                                         "programs for exchanges a config may leave out)"})

if "--idle-unless-configured" in sys.argv and not _configured(sys.argv):
    from services.collector.idle import Unconfigured

    service_main(Unconfigured, extra=[*OPTIONS, IDLE])
else:
    from services.collector.service import Collector

    service_main(Collector, extra=[*OPTIONS, IDLE])
