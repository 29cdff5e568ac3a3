from common.bus.stage import service_main
from services.cache_publisher.service import CachePublisher

service_main(CachePublisher)
