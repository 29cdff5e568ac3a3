"""The metrics exporter: the pipeline's heartbeats, streams, alerts, cache latency, Redis persistence and
supervisord states in Prometheus text format on one port (docs/metrics.md)."""

from services.metrics_exporter.service import MetricsExporter

__all__ = ["MetricsExporter"]
