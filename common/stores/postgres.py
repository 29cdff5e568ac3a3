"""PostgreSQL schema migrations: numbered SQL files in common/migrations, applied in order, each once.

    await migrate(dsn)      # -> versions applied now, e.g. ["0001", "0002"]; [] when the schema is current
    mdp migrate                   # the same from the command line (common/cli.py)

Files are named `NNNN_name.sql` (four digits, then lowercase words). Each file runs in its own transaction
together with its row in `schema_migrations(version, name, checksum, applied_at)`, so a failing file leaves
nothing behind and is retried on the next run. A file whose first line is `-- mdp:no-transaction` runs outside
a transaction (for `CREATE INDEX CONCURRENTLY`); keep such a file to one statement.

Safety:
- A session-level advisory lock serializes concurrent runs (several services starting together): the second
  waits, then finds everything applied and applies nothing.
- A file is immutable once applied: if its checksum (SHA-256 of the text, line endings normalized) differs
  from the recorded one, `migrate` refuses with `MigrationError` naming the file. Add a new file instead.
- A new file numbered below the latest applied one (e.g. from a merged branch) is refused: renumber it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg

from common.errors import MdpError

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
FILE_NAME = re.compile(r"^(?P<version>\d{4})_(?P<name>[a-z0-9_]+)\.sql$")
NO_TRANSACTION = "-- mdp:no-transaction"
# Advisory lock key of the migrator (any fixed bigint; the ASCII of "mdp-migr").
LOCK_KEY = 0x6D64702D6D696772

CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    text        PRIMARY KEY,
    name       text        NOT NULL,
    checksum   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


class MigrationError(MdpError, RuntimeError):
    """The migrations cannot be applied as they are. The message names the file and the fix."""


@dataclass(frozen=True, slots=True)
class Migration:
    version: str
    name: str
    path: Path
    sql: str
    checksum: str

    @property
    def transactional(self) -> bool:
        return not self.sql.lstrip().startswith(NO_TRANSACTION)


def checksum(sql: str) -> str:
    return hashlib.sha256(sql.replace("\r\n", "\n").encode()).hexdigest()


def load_migrations(directory: Path | str | None = None) -> list[Migration]:
    """The migration files of `directory` (default common/migrations), in version order."""
    directory = Path(directory) if directory is not None else MIGRATIONS_DIR
    if not directory.is_dir():
        raise MigrationError(f"migrations directory {str(directory)!r} does not exist")
    found: dict[str, Migration] = {}
    for path in sorted(directory.iterdir()):
        if path.suffix != ".sql":
            continue
        m = FILE_NAME.match(path.name)
        if m is None:
            raise MigrationError(f"migration file {str(path)!r} is misnamed: name it NNNN_words.sql, "
                                 f"e.g. 0003_add_index.sql (four digits, lowercase letters, digits, _)")
        version = m["version"]
        if version in found:
            raise MigrationError(f"migration files {found[version].path.name!r} and {path.name!r} share "
                                 f"version {version}; renumber one of them")
        sql = path.read_text(encoding="utf-8")
        found[version] = Migration(version, m["name"], path, sql, checksum(sql))
    return [found[v] for v in sorted(found)]


def safe_dsn(dsn: str) -> str:
    """The DSN without its password, for logs and error messages."""
    if "://" in dsn:
        parts = urlsplit(dsn)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, host = netloc.rsplit("@", 1)
            netloc = f"{userinfo.split(':', 1)[0]}@{host}"
        query = urlencode([(k, "***" if k.lower() == "password" else v)
                           for k, v in parse_qsl(parts.query, keep_blank_values=True)], safe="*")
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    return re.sub(r"(password\s*=\s*)('[^']*'|\S+)", r"\1***", dsn, flags=re.IGNORECASE)


async def _lock(conn: asyncpg.Connection, timeout_s: float) -> None:
    if await conn.fetchval("SELECT pg_try_advisory_lock($1)", LOCK_KEY):
        return
    holder = await conn.fetchval(
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted "
        "AND objid = ($1::bigint & 4294967295)::oid AND classid = ($1::bigint >> 32)::oid LIMIT 1", LOCK_KEY)
    log.info("waiting for the migration lock held by PostgreSQL backend %s (another process migrating)",
             holder)
    deadline = time.monotonic() + timeout_s
    while not await conn.fetchval("SELECT pg_try_advisory_lock($1)", LOCK_KEY):
        if time.monotonic() > deadline:
            raise MigrationError(f"the migration lock is still held by PostgreSQL backend {holder} after "
                                 f"{timeout_s:.0f} s; look at what it runs: SELECT * FROM pg_stat_activity "
                                 f"WHERE pid = {holder}")
        await asyncio.sleep(0.1)


def _check(migrations: list[Migration], applied: dict[str, tuple[str, str]]) -> list[Migration]:
    """Refuse changed or out-of-order files; return the ones to apply."""
    by_version = {m.version: m for m in migrations}
    for version, (name, recorded) in sorted(applied.items()):
        m = by_version.get(version)
        if m is None:
            log.warning("migration %s_%s is applied in the database but has no file here (older code?)",
                        version, name)
        elif m.checksum != recorded:
            raise MigrationError(
                f"migration file {str(m.path)!r} was changed after it was applied (recorded checksum "
                f"{recorded[:12]}..., file {m.checksum[:12]}...); applied migrations are immutable: revert "
                f"the edit and put the change in a new file numbered after the latest one")
    pending = [m for m in migrations if m.version not in applied]
    latest = max(applied, default="")
    early = [m for m in pending if m.version < latest]
    if early:
        raise MigrationError(
            f"migration file {str(early[0].path)!r} is numbered below {latest}, which is already applied; "
            f"renumber it after the latest migration")
    return pending


async def migrate(dsn: str, directory: Path | str | None = None, lock_timeout_s: float = 300.0) -> list[str]:
    """Apply the pending migrations of `directory` (default common/migrations) to `dsn`; return their
    versions.

    Idempotent and safe to call from several processes at once. Connection failures propagate as asyncpg or
    OSError exceptions; a changed or misnumbered file raises MigrationError.
    """
    migrations = load_migrations(directory)
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        await _lock(conn, lock_timeout_s)
        try:
            await conn.execute(CREATE_TABLE)
            rows = await conn.fetch("SELECT version, name, checksum FROM schema_migrations")
            applied = {r["version"]: (r["name"], r["checksum"]) for r in rows}
            done: list[str] = []
            for m in _check(migrations, applied):
                started = time.perf_counter()
                try:
                    if m.transactional:
                        async with conn.transaction():
                            await conn.execute(m.sql)
                            await _record(conn, m)
                    else:
                        await conn.execute(m.sql)
                        await _record(conn, m)
                except asyncpg.PostgresError as exc:
                    if isinstance(exc, (asyncpg.PostgresConnectionError, asyncpg.InterfaceError)):
                        raise
                    raise MigrationError(f"migration file {str(m.path)!r} failed and was rolled back: "
                                         f"{type(exc).__name__}: {exc}") from exc
                log.info("applied migration %s_%s in %.0f ms", m.version, m.name,
                         (time.perf_counter() - started) * 1000)
                done.append(m.version)
            return done
        finally:
            try:
                await conn.execute("SELECT pg_advisory_unlock($1)", LOCK_KEY)
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
                pass  # the connection is gone, and the session lock with it
    finally:
        await conn.close()


async def _record(conn: asyncpg.Connection, m: Migration) -> None:
    await conn.execute("INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                       m.version, m.name, m.checksum)
