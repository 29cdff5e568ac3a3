from common.service import service_main
from services.collector.service import Collector

service_main(Collector, extra=[
    ("--exchange", {"required": True, "help": "ccxt exchange id configured in [[exchanges]], e.g. binance"}),
    ("--shard", {"default": None, "help": "i/n: collect only shard i of n of the symbols (stable by name)"}),
])
