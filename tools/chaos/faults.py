"""The faults the chaos suite injects, and the seeded schedule that places them.

Every fault is one `Fault`: a kind, a target, when (seconds after the replay started), how long it lasts, and
what happened when it was injected (`detail`, filled by the harness). The schedule is a pure function of the
seed, so `--seed N` replays the same faults at the same moments.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Any

# The programs of supervisord.conf when this was written (the simulator aside: it plays the exchange), by
# supervisorctl name. The harness kills what `supervisorctl status` lists at the start of a run (sorted), so a
# program added to supervisord.conf is killed too; these are the default for the schedule functions.
PROGRAMS = (
    "collector-binance:collector-binance-0",
    "collector-binanceusdm:collector-binanceusdm-0",
    "collector-coinbase:collector-coinbase-0",
    "collector-hyperliquid:collector-hyperliquid-0",
    "validator:validator-0",
    "normalizer:normalizer-0",
    "aggregator:aggregator-0",
    "influx_writer:influx_writer-0",
    "postgres_writer:postgres_writer-0",
    "cache_publisher:cache_publisher-0",
    "gap_repair:gap_repair-0",
)
# kind -> (target, duration range in s): the store faults last a while, a kill -9 is instantaneous (supervisord
# restarts the program).
STORE_FAULTS: dict[str, tuple[str, tuple[float, float]]] = {
    "redis_kill9_restart": ("redis", (0.5, 2.0)),  # down this long, then the same server, port and AOF again
    "influx_freeze": ("influxd", (3.0, 6.0)),  # SIGSTOP, then SIGCONT
    "influx_kill9_restart": ("influxd", (1.0, 3.0)),
    "postgres_unreachable": ("postgres", (5.0, 15.0)),  # the proxy refuses and resets connections
}


@dataclass
class Fault:
    kind: str  # "kill9", "freeze" (a program SIGSTOPped, then SIGCONT) or a STORE_FAULTS key
    target: str
    at_s: float  # planned, seconds after the replay started
    duration_s: float = 0.0
    injected_s: float | None = None  # when it actually began (same clock)
    ended_s: float | None = None  # when the store came back / was thawed; for kill9 the kill itself
    detail: str = ""
    recovery: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def label(self) -> str:
        return f"{self.kind}({self.target})" + (f" for {self.duration_s:.1f}s" if self.duration_s else "")


PROGRAM_FREEZE_S = (12.0, 16.0)  # longer than a partition lease (7.5 s in the chaos config) plus a heartbeat key (5 s)


def short_schedule(seed: int, window_s: float, programs: tuple[str, ...] = PROGRAMS,
                   freezes: tuple[str, ...] = ()) -> list[Fault]:
    """Each fault once: kill -9 of every program and every store fault, at uniform random moments in the
    middle of the replay ([8%, 85%] of `window_s`), so each lands while data flows. `freezes`: programs also
    frozen once (SIGSTOP for PROGRAM_FREEZE_S, then SIGCONT), drawn after the others so they keep their times:
    a stage's instance frozen long enough that the other takes its partitions (a writer's: claims its pending
    entries), then thawed to find its leases gone (it exits, restarts and gets its share back)."""
    rng = random.Random(seed)
    faults = [Fault("kill9", p, 0.0) for p in programs]
    for kind, (target, (lo, hi)) in STORE_FAULTS.items():
        faults.append(Fault(kind, target, 0.0, round(rng.uniform(lo, hi), 2)))
    frozen = [Fault("freeze", p, 0.0, round(rng.uniform(*PROGRAM_FREEZE_S), 2)) for p in freezes]
    for f in faults:
        f.at_s = round(rng.uniform(0.08 * window_s, 0.85 * window_s), 2)
    for f in frozen:
        f.at_s = round(rng.uniform(0.08 * window_s, 0.6 * window_s), 2)
    return sorted([*faults, *frozen], key=lambda f: f.at_s)


def soak_schedule(seed: int, duration_s: float, every_s: tuple[float, float] = (3.0, 8.0),
                  programs: tuple[str, ...] = PROGRAMS) -> list[Fault]:
    """Faults every few seconds (uniform in `every_s`) for `duration_s`: kinds drawn with kill -9s of a
    random program three times as likely as each store fault, so every program dies many times."""
    rng = random.Random(seed)
    kinds = ["kill9"] * 3 * len(STORE_FAULTS) + list(STORE_FAULTS)
    out: list[Fault] = []
    t = rng.uniform(*every_s)
    while t < duration_s:
        kind = rng.choice(kinds)
        if kind == "kill9":
            out.append(Fault("kill9", rng.choice(programs), round(t, 2)))
        else:
            target, (lo, hi) = STORE_FAULTS[kind]
            out.append(Fault(kind, target, round(t, 2), round(rng.uniform(lo, hi), 2)))
        # a store fault lasts: the next fault comes after it ends, plus the usual interval
        t += out[-1].duration_s + rng.uniform(*every_s)
    return out
