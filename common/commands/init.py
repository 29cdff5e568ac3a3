"""`mdp init`: build every storage tier, idempotently, and say what was done.

  mdp init                  InfluxDB tiers (1.x retention policies, 2.x buckets + DBRP mappings, 3.x databases,
                            each with its configured retention) and the PostgreSQL migrations
  mdp init --influx-only    only InfluxDB
  mdp init --postgres-only  only PostgreSQL

Safe to run again at any time: what exists with the right settings is left alone, a tier whose retention
differs from the config gets the configured one, nothing is dropped. The Redis cache needs no set-up (its
keys carry their own TTLs and caps). Exit code 0 when everything asked for is in place, 1 when a store
refused or could not be reached (the message names it and what to do), 2 for a configuration error.
"""

from __future__ import annotations

import argparse
import sys

from common.config import InfluxSettings, load_settings
from common.errors import StoreUnavailable
from common.stores.influx import InfluxClient, InfluxError


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("init", help="build the InfluxDB storage tiers and apply PostgreSQL migrations")
    only = p.add_mutually_exclusive_group()
    only.add_argument("--influx-only", action="store_true", help="only the InfluxDB tiers")
    only.add_argument("--postgres-only", action="store_true", help="only the PostgreSQL migrations")
    p.set_defaults(func=init)


async def init(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    failed = False
    if not args.postgres_only:
        failed |= not await init_influx(settings.influx)
    if not args.influx_only:
        failed |= not await init_postgres(settings.postgres.dsn)
    return 1 if failed else 0


async def init_influx(influx_settings: InfluxSettings) -> bool:
    """Print what ensure_tiers did; False (with the reason on stderr) when InfluxDB refused or is down."""
    async with InfluxClient(influx_settings) as client:
        try:
            version = await client.connect()
            print(f"InfluxDB {version} (generation {client.generation}) at {client.url}:")
            for step in await client.ensure_tiers():
                print(f"  {step}")
            for tier in client.plan.tiers:
                database, rp = client.tier_for(tier.holds[0])
                where = f"database {database!r}" + (f", retention policy {rp!r}" if rp else "")
                print(f"  tier {tier.name}: {', '.join(tier.holds)} -> {where} (query with InfluxQL there)")
        except (StoreUnavailable, InfluxError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return False
    return True


async def init_postgres(dsn: str) -> bool:
    from common.stores.postgres import migrate

    try:
        applied = await migrate(dsn)
    except OSError as exc:
        print(f"error: PostgreSQL at {_safe_dsn(dsn)} cannot be reached ({exc}); start it (`make stores`) or fix "
              f"postgres.dsn / MDP_POSTGRES_DSN", file=sys.stderr)
        return False
    print(f"PostgreSQL at {_safe_dsn(dsn)}: applied {len(applied)} migration(s): "
          f"{', '.join(applied) or 'none, the schema is current'}")
    return True


def _safe_dsn(dsn: str) -> str:
    """The DSN without its password."""
    if "@" not in dsn or "://" not in dsn:
        return dsn
    scheme, rest = dsn.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    return f"{scheme}://{creds.split(':', 1)[0]}@{host}"
