"""`mdp`: the pipeline's command line.

  mdp status [--json] [--watch S]   services alive (heartbeat age, rate), streams (length, pending, lag)
  mdp migrate                       apply PostgreSQL migrations (idempotent)
  mdp simulate [...]                run the exchange simulator (a plugin: the `simulator` package registers it)
  mdp alerts [--count N]            the latest alerts, newest first
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import cast

import asyncpg
from redis.exceptions import ConnectionError as RedisConnectionError

from common import status as status_mod
from common.bus.core import StreamEntries, alert_streams
from common.config import ConfigError, load_settings
from common.redis_client import connect
from common.stores.postgres import MigrationError
from schemas import Codec


async def _status(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    redis = connect(settings.redis.url, settings.bus.cluster)
    try:
        while True:
            st = await status_mod.collect(redis, abandoned_group_s=settings.bus.abandoned_group_s)
            if args.json:
                print(json.dumps(st.to_dict(), indent=2))
            else:
                if args.watch:
                    print("\033[2J\033[H", end="")
                print(status_mod.render(st))
            if not args.watch:
                return 0
            await asyncio.sleep(args.watch)
    finally:
        await redis.aclose()


async def _alerts(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    redis = connect(settings.redis.url, settings.bus.cluster)
    codec = Codec()
    try:
        shown = 0
        newest: list[tuple[bytes, dict[bytes, bytes]]] = []
        for name in await alert_streams(settings.bus.cluster).resolve(redis):
            newest.extend(cast(StreamEntries, await redis.xrevrange(name, count=args.count)))
        newest.sort(key=lambda e: tuple(int(x) for x in e[0].split(b"-")), reverse=True)
        for entry_id, fields in newest[:args.count]:
            for alert in codec.decode_entry(fields):
                print(json.dumps({"entry": entry_id.decode(), **_plain(alert)}))
                shown += 1
        if not shown:
            print("no alerts", file=sys.stderr)
    finally:
        await redis.aclose()
    return 0


def _plain(event: object) -> dict[str, object]:
    import msgspec
    return cast(dict[str, object], msgspec.to_builtins(event))


async def _migrate(args: argparse.Namespace) -> int:
    from common.stores.postgres import migrate

    settings = load_settings(args.config)
    applied = await migrate(settings.postgres.dsn)
    print(f"applied {len(applied)} migration(s): {', '.join(applied) or 'none, schema is current'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mdp", description="market-data pipeline")
    parser.add_argument("--config", help="config file (default: $MDP_CONFIG or config/simulator.toml)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("status", help="services, rates, streams, pending and lag")
    p.add_argument("--json", action="store_true")
    p.add_argument("--watch", type=float, default=0, metavar="SECONDS", help="refresh every SECONDS")
    a = sub.add_parser("alerts", help="latest alerts")
    a.add_argument("--count", type=int, default=20)
    sub.add_parser("migrate", help="apply PostgreSQL migrations")
    import importlib
    import pkgutil
    from importlib.metadata import entry_points

    import common.commands
    for info in sorted(pkgutil.iter_modules(common.commands.__path__), key=lambda m: m.name):
        importlib.import_module(f"common.commands.{info.name}").register(sub)
    # Commands from other installed packages (entry point group `mdp.commands`, a `register(subparsers)` each):
    # the simulator adds `mdp simulate` this way, so this package never imports it.
    for plugin in sorted(entry_points(group="mdp.commands"), key=lambda ep: ep.name):
        plugin.load()(sub)
    args, rest = parser.parse_known_args(argv)
    try:
        if getattr(args, "passthrough", False):  # the plugin parses its own arguments
            return int(args.func(args, rest) or 0)
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        builtin = {"status": _status, "alerts": _alerts, "migrate": _migrate}
        if args.command in builtin:
            return asyncio.run(builtin[args.command](args))
        result = args.func(args)
        if asyncio.iscoroutine(result):
            result = asyncio.run(result)
        return int(result or 0)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except MigrationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except asyncpg.PostgresError as exc:
        print(f"error: PostgreSQL refused: {exc}", file=sys.stderr)
        return 1
    except (ConnectionError, OSError, RedisConnectionError) as exc:
        print(f"error: cannot reach a store ({exc}); start the stores with `make stores` or check the config",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
