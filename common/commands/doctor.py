"""`mdp doctor`: check a deployment and say what to fix, one line per check.

  mdp doctor [--json] [--run-dir DIR]

Checks, each OK, WARN or FAIL (with the fix):
  redis                 the bus Redis answers; its version
  redis.persistence     AOF on with appendfsync everysec/always (a process kill loses nothing, a machine crash at
                        most 1 s with everysec); RDB snapshots only: WARN; no persistence: FAIL
  influx                InfluxDB answers; its version and generation
  influx.tier.<name>    each configured storage tier exists with the configured retention (1.x retention
                        policies; on 2.x/3.x a WARN says it is not checked here: `mdp init` ensures them)
  postgres              PostgreSQL answers; its version
  postgres.migrations   every migration file of common/migrations is applied, unchanged
  exchange.<id>         each configured exchange's REST answers, and the offset of its clock from ours
                        (WARN above 1 s, FAIL above validation.max_future_skew_s: the validator would reject)
  supervisord           every program RUNNING (a program never started because autostart=false is fine)
Exit code: 1 when any check FAILs, else 0 (2 for a configuration error, as every mdp command).
"""

from __future__ import annotations

import argparse
import asyncio
import email.utils
import json
import os
import time
import xmlrpc.client
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import asyncpg
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from common.config import PROJECT_ROOT, ExchangeSettings, Settings, load_settings
from common.errors import StoreUnavailable
from common.exchanges.clients import make_rest_exchange
from common.stores.influx import InfluxClient, InfluxError, quote_ident, retention_text
from common.stores.influx import go_duration_seconds as _go_duration_seconds
from common.stores.postgres import MigrationError, load_migrations

STORE_TIMEOUT_S = 5.0
EXCHANGE_TIMEOUT_S = 10.0
CLOCK_WARN_S = 1.0
DEFAULT_RUN_DIR = PROJECT_ROOT / "var" / "run"


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    status: str  # "OK", "WARN" or "FAIL"
    detail: str
    fix: str = ""

    def line(self) -> str:
        return f"{self.status:<4} {self.name:<24} {self.detail}" + (f" -> fix: {self.fix}" if self.fix else "")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("doctor", help="check the deployment (stores, bus persistence, tiers, migrations, "
                                             "exchanges, supervisord programs) and say what to fix")
    p.add_argument("--json", action="store_true", help="one JSON object: ok and the list of checks")
    p.add_argument("--run-dir", type=Path, default=None,
                   help="supervisord's run dir (default: $MDP_RUN_DIR or var/run; its supervisor.sock is asked)")
    p.set_defaults(func=doctor)


async def doctor(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    run_dir = args.run_dir or Path(os.environ.get("MDP_RUN_DIR") or DEFAULT_RUN_DIR)
    checks = await run_checks(settings, run_dir)
    failed = any(c.status == "FAIL" for c in checks)
    if args.json:
        print(json.dumps({"ok": not failed, "checks": [asdict(c) for c in checks]}, indent=2))
    else:
        for c in checks:
            print(c.line())
        worst = "FAIL" if failed else "WARN" if any(c.status == "WARN" for c in checks) else "OK"
        print(f"{worst}: {sum(c.status == 'OK' for c in checks)} OK, {sum(c.status == 'WARN' for c in checks)} "
              f"WARN, {sum(c.status == 'FAIL' for c in checks)} FAIL")
    return 1 if failed else 0


async def run_checks(settings: Settings, run_dir: Path) -> list[Check]:
    groups = await asyncio.gather(
        check_redis(settings.redis.url),
        check_influx(settings),
        check_postgres(settings.postgres.dsn),
        *(check_exchange(ex, settings.validation.max_future_skew_s) for ex in settings.exchanges),
        asyncio.to_thread(check_supervisord, run_dir),
    )
    return [c for group in groups for c in group]


# -- Redis ------------------------------------------------------------------------------------------------

async def check_redis(url: str) -> list[Check]:
    r = aioredis.Redis.from_url(url, socket_timeout=STORE_TIMEOUT_S, socket_connect_timeout=STORE_TIMEOUT_S)
    try:
        try:
            server = await r.info("server")
            persistence = await r.info("persistence")
        except (RedisError, OSError) as exc:
            return [Check("redis", "FAIL", f"the bus Redis at {url} does not answer ({exc})",
                          "start it (`make stores` starts the project's Redis with AOF) or fix redis.url / "
                          "MDP_REDIS_URL")]
        found = [Check("redis", "OK", f"Redis {server.get('redis_version', '?')} at {url}")]
        try:
            # str keys and values: redis-py types CONFIG GET's reply as optional text.
            config = cast(dict[str, str], {**await r.config_get("appendonly"), **await r.config_get("appendfsync"),
                                           **await r.config_get("save")})
        except RedisError as exc:  # CONFIG disabled (managed Redis): INFO says whether AOF is on, not the fsync
            config = {"appendonly": "yes" if int(persistence.get("aof_enabled", 0)) else "no",
                      "appendfsync": f"unknown (CONFIG GET refused: {exc})", "save": ""}
        found.append(_persistence(url, config, persistence))
        return found
    finally:
        await r.aclose()


def _persistence(url: str, config: dict[str, str], info: dict[str, Any]) -> Check:
    aof = config.get("appendonly") == "yes"
    fsync = str(config.get("appendfsync", ""))
    snapshots = str(config.get("save") or "").strip()
    fix = (f"run the bus on a Redis with AOF: `make stores` starts one on 127.0.0.1:6380 (var/redis), or on "
           f"{url}: CONFIG SET appendonly yes; CONFIG SET appendfsync everysec; CONFIG REWRITE "
           f"(docs/operations.md)")
    if aof and str(info.get("aof_last_write_status", "ok")) != "ok":
        return Check("redis.persistence", "FAIL", f"AOF on but its last write failed "
                     f"(aof_last_write_status={info.get('aof_last_write_status')})",
                     "read the Redis log (disk full? permissions?); acknowledged entries are not durable")
    if aof and fsync == "everysec":
        return Check("redis.persistence", "OK", "AOF on, appendfsync everysec: a process kill loses nothing, a "
                     "machine crash at most the last second")
    if aof and fsync == "always":
        return Check("redis.persistence", "OK", "AOF on, appendfsync always: nothing acknowledged is lost "
                     "(slowest)")
    if aof:
        return Check("redis.persistence", "WARN", f"AOF on, appendfsync {fsync}: a machine crash may lose what "
                     f"the OS had not written (about 30 s)", "CONFIG SET appendfsync everysec; CONFIG REWRITE")
    if snapshots:
        return Check("redis.persistence", "WARN", f"no AOF, RDB snapshots only (save {snapshots!r}): a Redis "
                     f"restart loses every stream entry since the last snapshot", fix)
    return Check("redis.persistence", "FAIL", "no persistence (appendonly no, no snapshots): a Redis restart "
                 "loses every stream, consumer group and pending entry", fix)


# -- InfluxDB ---------------------------------------------------------------------------------------------

async def check_influx(settings: Settings) -> list[Check]:
    async with InfluxClient(settings.influx) as client:
        try:
            version = await asyncio.wait_for(client.connect(), STORE_TIMEOUT_S)
        except (StoreUnavailable, InfluxError, TimeoutError) as exc:
            reason = str(exc).split(";")[0] or "timeout"  # the rest of the message is the fix, given below
            return [Check("influx", "FAIL", f"InfluxDB at {client.url} does not answer ({reason})",
                          "start it (`make stores` starts a private influxd on 8086) or fix influx.url / "
                          "MDP_INFLUX_URL")]
        found = [Check("influx", "OK", f"InfluxDB {version} (generation {client.generation}) at {client.url}")]
        if client.generation != 1:
            found.append(Check("influx.tiers", "WARN", f"retention tiers are checked on 1.x only (this server is "
                               f"{client.generation}.x)", "run `mdp init`: it creates and corrects every tier"))
            return found
        try:
            rows = await client.query(f"SHOW RETENTION POLICIES ON {quote_ident(client.database)}",
                                      database=client.database)
        except InfluxError as exc:
            return [*found, Check("influx.tiers", "FAIL", f"database {client.database!r}: {exc}",
                                  "run `mdp init` (creates the database and its tiers)")]
        existing = {str(r["name"]): _go_duration_seconds(str(r["duration"])) for r in rows}
        for tier in client.plan.tiers:
            name = f"influx.tier.{tier.name}"
            holds = ", ".join(tier.holds)
            if tier.name not in existing:
                found.append(Check(name, "FAIL", f"retention policy {tier.name!r} ({holds}) is missing in "
                                   f"{client.database!r}", "run `mdp init`"))
            elif existing[tier.name] != tier.retention_s:
                found.append(Check(name, "WARN", f"retention policy {tier.name!r} ({holds}) keeps "
                                   f"{retention_text(existing[tier.name])}, configured {tier.retention}",
                                   "run `mdp init` (it sets the configured retention)"))
            else:
                found.append(Check(name, "OK", f"{holds}: {tier.retention}"))
        return found


# -- PostgreSQL -------------------------------------------------------------------------------------------

async def check_postgres(dsn: str) -> list[Check]:
    from common.commands.init import _safe_dsn

    where = _safe_dsn(dsn)
    try:
        conn = await asyncpg.connect(dsn, timeout=STORE_TIMEOUT_S)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        return [Check("postgres", "FAIL", f"PostgreSQL at {where} does not answer ({exc or 'timeout'})",
                      "start it (`make stores`), create the database, or fix postgres.dsn / MDP_POSTGRES_DSN")]
    try:
        version = await conn.fetchval("SHOW server_version")
        found = [Check("postgres", "OK", f"PostgreSQL {version} at {where}")]
        try:
            files = load_migrations()
        except MigrationError as exc:
            return [*found, Check("postgres.migrations", "FAIL", str(exc), "restore common/migrations")]
        applied: dict[str, str] = {}
        if await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL"):
            applied = {r["version"]: r["checksum"]
                       for r in await conn.fetch("SELECT version, checksum FROM schema_migrations")}
        missing = [f"{m.version}_{m.name}" for m in files if m.version not in applied]
        changed = [f"{m.version}_{m.name}" for m in files
                   if m.version in applied and applied[m.version] != m.checksum]
        unknown = sorted(set(applied) - {m.version for m in files})
        if missing:
            found.append(Check("postgres.migrations", "FAIL", f"{len(missing)} of {len(files)} not applied: "
                               f"{', '.join(missing)}", "run `mdp migrate` (or `mdp init`)"))
        elif changed:
            found.append(Check("postgres.migrations", "FAIL", f"changed after they were applied: "
                               f"{', '.join(changed)}", "restore those files; put the change in a new migration"))
        elif unknown:
            found.append(Check("postgres.migrations", "WARN", f"the database has migrations this code does not "
                               f"know: {', '.join(unknown)}", "deploy the code that matches the database"))
        else:
            found.append(Check("postgres.migrations", "OK", f"all {len(files)} applied (latest "
                               f"{files[-1].version if files else 'none'})"))
        return found
    finally:
        await conn.close()


# -- Exchanges --------------------------------------------------------------------------------------------

async def check_exchange(ex: ExchangeSettings, max_skew_s: float) -> list[Check]:
    name = f"exchange.{ex.id}"
    where = ex.rest_url or "its live REST endpoint"
    exchange = make_rest_exchange(ex)
    exchange.timeout = int(min(ex.rest_timeout_s, EXCHANGE_TIMEOUT_S) * 1000)
    try:
        t0 = time.time()
        if exchange.has.get("fetchTime"):
            server_ms = float(await exchange.fetch_time())
            how, resolution = "fetch_time", 0.0
        else:  # no time endpoint (hyperliquid): the HTTP Date header of a cheap public call, to the second
            if ex.id == "hyperliquid":
                await exchange.publicPostInfo({"type": "meta"})
            else:
                await exchange.fetch_status()
            date = (exchange.last_response_headers or {}).get("Date") or \
                (exchange.last_response_headers or {}).get("date")
            if not date:
                return [Check(name, "WARN", f"REST at {where} answers, but gives no time to compare clocks with",
                              "compare the host clock with NTP (timedatectl / chronyc tracking)")]
            server_ms = email.utils.parsedate_to_datetime(date).timestamp() * 1000 + 500  # middle of the second
            how, resolution = "HTTP Date header", 1.0
        t1 = time.time()
    except Exception as exc:  # noqa: BLE001  any ccxt or network error means: not reachable; the line names it
        return [Check(name, "FAIL", f"REST at {where} does not answer ({type(exc).__name__}: "
                      f"{str(exc)[:160]})", "check the network / exchanges.rest_url, or remove the exchange from "
                      "the config")]
    finally:
        await exchange.close()
    offset_s = server_ms / 1000 - (t0 + t1) / 2
    detail = (f"REST at {where} answers in {(t1 - t0) * 1000:.0f} ms; its clock is {offset_s:+.3f} s from ours "
              f"({how}{', +/-0.5 s' if resolution else ''})")
    if abs(offset_s) > max_skew_s + resolution:
        return [Check(name, "FAIL", detail, f"sync the host clock (NTP: timedatectl set-ntp true); beyond "
                      f"validation.max_future_skew_s = {max_skew_s} s the validator rejects its events")]
    if abs(offset_s) > CLOCK_WARN_S + resolution:
        return [Check(name, "WARN", detail, "sync the host clock (NTP: timedatectl set-ntp true)")]
    return [Check(name, "OK", detail)]


# -- supervisord ------------------------------------------------------------------------------------------

def check_supervisord(run_dir: Path) -> list[Check]:
    from supervisor.xmlrpc import SupervisorTransport

    sock = run_dir / "supervisor.sock"
    ctl = ("supervisorctl -c supervisord.conf" if run_dir.resolve() == DEFAULT_RUN_DIR.resolve()
           else f"MDP_RUN_DIR={run_dir} tools/supervise.sh ctl")
    proxy = xmlrpc.client.ServerProxy("http://127.0.0.1", transport=SupervisorTransport(None, None,
                                                                                       f"unix://{sock}"))
    try:
        # xmlrpc's stubs type a reply as any marshallable value; supervisord documents a list of dicts.
        infos = cast(list[dict[str, Any]], proxy.supervisor.getAllProcessInfo())
    except (OSError, xmlrpc.client.Error) as exc:
        return [Check("supervisord", "FAIL", f"supervisord does not answer on {sock} ({exc})",
                      "start the pipeline (`make demo` or `make run`), or give its run dir (--run-dir / "
                      "MDP_RUN_DIR)")]
    down = []
    for info in infos:
        full = f"{info['group']}:{info['name']}" if info["group"] != info["name"] else info["name"]
        never_started = info["statename"] == "STOPPED" and not info["start"]  # autostart=false (the simulator)
        if info["statename"] != "RUNNING" and not never_started:
            down.append((full, info["statename"], info.get("stdout_logfile") or ""))
    running = sum(i["statename"] == "RUNNING" for i in infos)
    if down:
        names = " ".join(d[0] for d in down)
        return [Check("supervisord", "FAIL", f"{len(down)} program(s) not running: "
                      + ", ".join(f"{n} {state}" for n, state, _ in down)
                      + f" ({running} of {len(infos)} RUNNING)",
                      f"read {', '.join(d[2] for d in down if d[2]) or 'their logs'}, then `{ctl} start {names}`")]
    return [Check("supervisord", "OK", f"{running} of {len(infos)} programs RUNNING"
                  + (f" ({len(infos) - running} not started: autostart=false)" if running < len(infos) else ""))]
