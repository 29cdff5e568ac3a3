"""InfluxDB writer: trades and closed candles into InfluxDB (python -m services.influx_writer)."""
from common.bus.stage import service_main
from services.influx_writer.service import InfluxWriter

service_main(InfluxWriter)
