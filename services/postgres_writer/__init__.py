"""PostgreSQL writer: market catalog, quality alerts, strategies' events (python -m services.postgres_writer)."""
