from common.bus.stage import service_main
from services.metrics_exporter.service import MetricsExporter

service_main(MetricsExporter)
