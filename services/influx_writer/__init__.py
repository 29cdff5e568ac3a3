"""InfluxDB writer: md:trade:* and md:candle:* -> InfluxDB measurements `trades` and `ohlcv`."""

from services.influx_writer.service import InfluxWriter

__all__ = ["InfluxWriter"]
