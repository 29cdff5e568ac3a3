"""PostgreSQL writer: the market catalog and quality alerts (python -m services.postgres_writer)."""
