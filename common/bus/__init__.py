"""The bus: Redis Streams with consumer groups (`core`: Producer, Consumer, alerts, backpressure), stream names and
topology (`streams`), leases and checkpointed stage state (`lease`, `checkpoint`) and the process frame every stage
runs in (`stage`). docs/bus.md.
"""
