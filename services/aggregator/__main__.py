from common.bus.stage import service_main
from services.aggregator.service import Aggregator

service_main(Aggregator)
