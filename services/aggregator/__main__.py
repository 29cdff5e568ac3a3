from common.service import service_main
from services.aggregator.service import Aggregator

service_main(Aggregator)
