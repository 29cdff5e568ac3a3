from common.bus.stage import service_main
from services.normalizer.service import Normalizer

service_main(Normalizer)
