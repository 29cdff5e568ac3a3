"""Stores: InfluxDB (`influx`, every generation), PostgreSQL (`postgres`: connections and migrations) and the Redis
cache strategies read (`cache`).
"""
