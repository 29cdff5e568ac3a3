"""Tools around the pipeline: benchmarks, the chaos suite, local stores, audits (not imported by it)."""

# The stages that run partitions x instances (their class sets `partitioned`; tests/test_partitions.py checks
# this list against the services): with bus.partitions = P > 1 the chaos suite and the pipeline benchmark run
# two instances of each (supervisord numprocs, tools/supervise.sh MDP_NUMPROCS), sharing the P partitions.
PARTITIONED = ("validator", "normalizer", "aggregator", "cache_publisher", "gap_repair")
# The stages whose instances share one consumer group's entries (XREADGROUP, XAUTOCLAIM of a dead one's), every
# write idempotent and order-free (InfluxDB points by time and tags; PostgreSQL by natural keys, forward-only).
SHARED = ("influx_writer", "postgres_writer")
# Every stage of the pipeline (what reads the bus); the partitioned chaos run has two instances of each. Not
# in it: the collectors (one per exchange, scaled by shards of the symbols) and the metrics exporter (reads).
STAGES = (*PARTITIONED, *SHARED)
