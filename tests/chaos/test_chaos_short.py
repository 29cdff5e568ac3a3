"""The seeded short chaos run (tools/chaos, docs/chaos.md): the whole pipeline under supervisord on private
stores, the real Binance spot capture replayed, every program killed with SIGKILL once, Redis killed and
restarted on its AOF, InfluxDB frozen and killed, PostgreSQL unreachable, an abandoned and a slow consumer
group; then every trade exactly once in InfluxDB and on md:trade, the cache's newest 1,000 trades with none
missing or doubled, every 1m/5m bar equal to the one computed from the raw capture, every Gap answered, every
program RUNNING.

Seeds: $CHAOS_SEEDS (comma-separated), default 1. A failure prints the report: which trade ids were lost or
doubled and where, which bar is wrong, which Gap went unanswered, which program is down, and the faults with
their seeded times. The run takes about 4 minutes.

The same seed again with bus.partitions = 2 and two instances each of the validator, the normalizer, the
aggregator and the cache publisher: each instance killed in its turn, instance 0 of each frozen long enough to
lose its partitions to the other. About 3 minutes more.

The same seed on a local 3-master Redis Cluster (four partitions, two instances each): the master serving
md:trade:binance:BTC/USDT's partition is the Redis killed and restarted. About 3 minutes more.
"""

from __future__ import annotations

import os

import pytest

from tools import STAGES
from tools.chaos.run import Options, markdown, run_one

SEEDS = [int(s) for s in os.environ.get("CHAOS_SEEDS", "1").replace(" ", "").split(",") if s]
pytestmark = [pytest.mark.chaos, pytest.mark.e2e]


@pytest.mark.timeout(900)
@pytest.mark.parametrize("seed", SEEDS)
async def test_nothing_lost_nothing_doubled_under_infrastructure_faults(seed: int) -> None:
    # Arrange + Act: the seeded run (stores, pipeline, faults, drain, checks) in tools/chaos/run.py.
    report = await run_one(Options(seed=seed))

    # Assert: every check against the ground truth passed; if not, the report says what and where.
    failed = [c["name"] for c in report["checks"] if not c["passed"]]
    assert not failed, f"chaos seed {seed}: failed checks {failed}\n\n{markdown(report)}"


@pytest.mark.timeout(900)
async def test_two_instances_of_every_stage_lose_and_double_nothing_under_the_same_faults() -> None:
    # Arrange + Act: seed 1 with bus.partitions = 2 and two instances of every stage (tools.STAGES: the partitioned
    # ones, gap repair included, and the writers), each instance killed in its turn (restarted, it takes its own
    # partition back) and instance 0 of each frozen.
    report = await run_one(Options(seed=SEEDS[0], partitions=2))

    # Assert
    failed = [c["name"] for c in report["checks"] if not c["passed"]]
    assert not failed, f"chaos seed {SEEDS[0]}, 2 partitions: failed checks {failed}\n\n{markdown(report)}"
    assert sum(p.startswith(STAGES) for p in report["programs"]) == 2 * len(STAGES)
    frozen = [f for f in report["faults"] if f["kind"] == "freeze"]
    assert len(frozen) == len(STAGES) and all(f["injected_s"] is not None for f in frozen), \
        "each stage's instance 0 froze"


@pytest.mark.timeout(900)
async def test_on_a_redis_cluster_a_master_killed_and_restarted_loses_and_doubles_nothing() -> None:
    # Arrange + Act: seed 1 with the bus on a local 3-master Redis Cluster (AOF everysec), four partitions (their
    # slots on all three masters), two instances of each partitioned stage; redis_kill9_restart SIGKILLs the master
    # serving md:trade:binance:BTC/USDT's partition and starts it again.
    report = await run_one(Options(seed=SEEDS[0], partitions=4, cluster=True))

    # Assert
    failed = [c["name"] for c in report["checks"] if not c["passed"]]
    assert not failed, f"chaos seed {SEEDS[0]}, cluster: failed checks {failed}\n\n{markdown(report)}"
    killed = [f for f in report["faults"] if f["kind"] == "redis_kill9_restart"]
    assert len(killed) == 1 and "the master serving md:trade:binance:BTC/USDT" in killed[0]["detail"]
    assert sum(p.startswith(STAGES) for p in report["programs"]) == 2 * len(STAGES)
