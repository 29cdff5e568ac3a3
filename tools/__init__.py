"""Tools around the pipeline: benchmarks, the chaos suite, local stores, audits (not imported by it)."""

# The stages that run partitions x instances (their class sets `partitioned`; tests/test_partitions.py checks
# this list against the services): with bus.partitions = P > 1 the chaos suite and the pipeline benchmark run
# P instances of each (supervisord numprocs, tools/supervise.sh MDP_NUMPROCS).
PARTITIONED = ("validator", "normalizer", "aggregator", "cache_publisher")
