"""Which keys each MULTI/EXEC of a running pipeline touches, and in how many Redis Cluster hash slots.

The bus can run on a Redis Cluster only if every atomic commit touches one slot (docs/scaling.md, "Redis
Cluster (item 2)"). This watches a running pipeline's Redis with MONITOR for a while, groups the commands of
each transaction (by client, from MULTI to EXEC), names each key by its pattern (numbers, symbols and
partitions replaced by placeholders) and prints, per shape of transaction: how many ran, the key patterns, and
the most slots one of them spanned (CRC16 as Redis Cluster computes it, hash tags included).

    python -m tools.slot_audit --url redis://127.0.0.1:6379/0 --seconds 15

MONITOR costs the server a lot (every command is copied to the watcher): run it on a demo or a bench, never
on production.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import redis
from redis.crc import key_slot

# The commands of the bus's transactions and where their keys are (positions after the command name).
KEY_POSITIONS: dict[str, tuple[int, ...] | str] = {
    "xadd": (0,), "xack": (0,), "xtrim": (0,), "xdel": (0,), "sadd": (0,), "srem": (0,), "set": (0,),
    "get": (0,), "hset": (0,), "hdel": (0,), "hincrby": (0,), "expire": (0,), "pexpire": (0,), "del": "all",
    "incr": (0,), "incrby": (0,), "zadd": (0,), "zrem": (0,), "xgroup": (1,), "xclaim": (0,),
    "xautoclaim": (0,), "xsetid": (0,), "watch": "all", "unlink": "all", "exists": "all", "hmset": (0,),
    "setex": (0,), "psetex": (0,), "publish": (), "eval": "eval", "evalsha": "eval", "fcall": "eval",
}
LINE = re.compile(r'^(?P<ts>[\d.]+) \[(?P<db>\d+) (?P<client>[^\]]+)\] (?P<cmd>.*)$')


def pattern(key: str) -> str:
    """A key with its varying parts replaced: symbols, partitions, numbers, instance names."""
    key = re.sub(r"\{[^}]*\}", "{tag}", key)
    key = re.sub(r"^(md:[a-z_]+:[a-z]+):.+$", r"\1:{symbol}", key)
    key = re.sub(r":p\d+\b", ":p{k}", key)
    key = re.sub(r"\d+", "N", key)
    return key


def keys_of(args: list[str]) -> list[str]:
    if not args:
        return []
    cmd, rest = args[0].lower(), args[1:]
    where = KEY_POSITIONS.get(cmd)
    if where is None or where == ():
        return []
    if where == "all":
        return list(rest)
    if where == "eval":
        count = int(rest[1]) if len(rest) > 1 and rest[1].isdigit() else 0
        return list(rest[2:2 + count])
    assert isinstance(where, tuple)
    return [rest[i] for i in where if i < len(rest)]


@dataclass
class Shape:
    count: int = 0
    most_slots: int = 0
    patterns: Counter[str] = field(default_factory=Counter)
    example: list[str] = field(default_factory=list)


def audit(url: str, seconds: float, watching: threading.Event | None = None) -> dict[tuple[str, ...], Shape]:
    """Watch `url` with MONITOR for `seconds` and return the transactions by shape (`watching` is set once
    MONITOR is on: what ran before it is not seen)."""
    client = redis.Redis.from_url(url, decode_responses=True)
    open_tx: dict[str, list[list[str]]] = {}
    watched: dict[str, list[list[str]]] = {}  # WATCH before MULTI: its key must be in the transaction's slot too
    shapes: dict[tuple[str, ...], Shape] = defaultdict(Shape)
    deadline = time.monotonic() + seconds
    with client.monitor() as monitor:
        conn = monitor.connection  # MONITOR was sent and answered by entering the context
        assert conn is not None
        if watching is not None:
            watching.set()
        while time.monotonic() < deadline:
            if not conn.can_read(timeout=0.5):
                continue
            raw = conn.read_response()
            match = LINE.match(raw if isinstance(raw, str) else raw.decode(errors="replace"))
            if match is None:
                continue
            try:
                args = shlex.split(match["cmd"])
            except ValueError:
                continue
            who, name = match["client"], args[0].lower() if args else ""
            if name == "watch":
                watched[who] = [["watch", *args[1:]]]
            elif name == "multi":
                open_tx[who] = watched.pop(who, [])
            elif name == "exec" and who in open_tx:
                commands = open_tx.pop(who)
                keys = [k for c in commands for k in keys_of(c)]
                if not keys:
                    continue
                shape_key = tuple(sorted({f"{c[0].upper()} {pattern(k)}" for c in commands for k in keys_of(c)}))
                shape = shapes[shape_key]
                shape.count += 1
                shape.most_slots = max(shape.most_slots, len({key_slot(k.encode()) for k in keys}))
                shape.patterns.update(pattern(k) for k in keys)
                if not shape.example:
                    shape.example = sorted(set(keys))[:12]
            elif who in open_tx:
                open_tx[who].append(args)
    client.close()
    return shapes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.slot_audit", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--seconds", type=float, default=15.0)
    args = parser.parse_args(argv)
    shapes = audit(args.url, args.seconds)
    if not shapes:
        print(f"no MULTI/EXEC seen on {args.url} in {args.seconds:.0f} s: is a pipeline running there?",
              file=sys.stderr)
        return 1
    multi_slot = sum(s.count for s in shapes.values() if s.most_slots > 1)
    total = sum(s.count for s in shapes.values())
    print(f"{total} transactions in {args.seconds:.0f} s on {args.url}; {multi_slot} of them span more than one "
          f"hash slot (a Redis Cluster refuses those with CROSSSLOT)\n")
    for shape_key, shape in sorted(shapes.items(), key=lambda kv: -kv[1].count):
        print(f"{shape.count:>7} transactions, up to {shape.most_slots} slot(s):")
        for line in shape_key:
            print(f"          {line}")
        print(f"          e.g. {' '.join(shape.example)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
