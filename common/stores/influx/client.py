"""The async InfluxDB client: one class for every generation. It does the HTTP (aiohttp; TLS with influx.verify_tls
and influx.ca_cert), the authentication headers, the errors and the counters, detects the server's generation,
and hands what differs between generations to that generation's `Generation` (v1, v2, v3).

- connecting: `/ping`'s `X-Influxdb-Version` header ("1.6.7~rc0", "v2.7.11", "3.0.1") gives the generation when
  influx.generation is "auto"; "1", "2" or "3" forces it.
- auth: 1.x basic auth (influx.username / influx.password); 2.x `Authorization: Token` (influx.token) or a
  session from `/api/v2/signin` (username / password); 3.x `Authorization: Token` (influx.token).
- writes: in requests of at most influx.batch_points lines, up to influx.write_concurrency at once.
- queries: InfluxQL on `GET /query` (`epoch=ns`) everywhere.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Self

import aiohttp
import msgspec

from common.config import ConfigError, InfluxSettings
from common.errors import StoreUnavailable
from common.stores.influx.errors import InfluxError, InfluxQueryError, InfluxWriteError, error_text
from common.stores.influx.generation import TOKEN_HINT, Generation, generation_of
from common.stores.influx.influxql import (
    RESULTS,
    RESULTS_EXACT,
    Results,
    encode_params,
    first_error,
    quote_ident,
    rows_of,
    values_of,
)
from common.stores.influx.tiers import Tier, TierPlan, TierTarget
from common.stores.influx.v1 import Influx1
from common.stores.influx.v2 import Influx2
from common.stores.influx.v3 import Influx3

log = logging.getLogger("common.stores.influx")

GENERATIONS: dict[int, type[Generation]] = {1: Influx1, 2: Influx2, 3: Influx3}


def _ssl_context(settings: InfluxSettings) -> ssl.SSLContext | None:
    """TLS for an https URL: the system CAs or influx.ca_cert, verification off only if verify_tls is false."""
    if not settings.url.startswith("https://"):
        return None
    try:
        context = ssl.create_default_context(cafile=settings.ca_cert or None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"influx.ca_cert = {settings.ca_cert!r} cannot be read as a PEM CA file ({exc}); point it "
                          f"at the CA certificate that signed the InfluxDB server's certificate") from None
    if not settings.verify_tls:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class InfluxClient:
    """Async client for InfluxDB 1.x, 2.x and 3.x. Use one per process; `await close()` at the end (or
    `async with InfluxClient(settings) as client:`). The first request detects the server's generation
    (`connect()`), unless influx.generation names it."""

    def __init__(self, settings: InfluxSettings, session: aiohttp.ClientSession | None = None) -> None:
        self.settings = settings
        self.url = settings.url.rstrip("/")
        self.database = settings.database
        self.batch_points = max(1, settings.batch_points)
        self.plan = TierPlan(settings)
        self._gen: Generation | None = None
        if settings.generation != "auto":
            self._gen = GENERATIONS[int(settings.generation)](self)
        self._connected = False
        self.version = ""
        self._ssl = _ssl_context(settings)
        self._timeout = aiohttp.ClientTimeout(total=settings.timeout_s)
        self._session = session
        self._own_session = session is None
        self._cookie = ""  # a 2.x session from /api/v2/signin (username/password instead of a token)
        self._slots: asyncio.Semaphore | None = None
        self.requests = 0
        self.points_written = 0
        self.expired_dropped = 0  # points the server dropped as older than their retention policy

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- plumbing -------------------------------------------------------------------------------------

    @property
    def generation(self) -> int:
        """1, 2 or 3; known after `connect()` (or from influx.generation)."""
        return self._generation_known.number

    @property
    def _generation_known(self) -> Generation:
        if self._gen is None:
            raise RuntimeError(f"the generation of InfluxDB at {self.url} is not known yet: await connect() first "
                               f"or set influx.generation")
        return self._gen

    @property
    def _generation(self) -> int | None:
        return None if self._gen is None else self._gen.number

    def _where(self) -> str:
        gen = f"{self._generation}.x" if self._generation else "(generation not yet known)"
        version = f" {self.version}" if self.version else ""
        return f"InfluxDB {gen}{version} at {self.url}"

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=self._timeout,
                connector=aiohttp.TCPConnector(limit=max(8, self.settings.write_concurrency * 2),
                                               enable_cleanup_closed=True, ssl=self._ssl if self._ssl else True))
            self._own_session = True
        return self._session

    async def close(self) -> None:
        if self._gen is not None:
            await self._gen.close()
        if self._session is not None and self._own_session and not self._session.closed:
            await self._session.close()
        self._session = None

    def _auth_headers(self) -> dict[str, str]:
        s = self.settings
        if s.token and self._generation != 1:
            return {"Authorization": f"Token {s.token}"}
        if self._cookie:
            return {"Cookie": self._cookie}
        if s.username:
            return {"Authorization": aiohttp.encode_basic_auth(s.username, s.password)}
        return {}

    def credentials_hint(self) -> str:
        return TOKEN_HINT if self._gen is None else self._gen.credentials_hint

    def _hint(self, status: int) -> str:
        """What to fix, after an error's text, when the server refused our credentials (HTTP 401, 403)."""
        return f"; {self.credentials_hint()}" if status in (401, 403) else ""

    def _unavailable(self, what: str, cause: str) -> StoreUnavailable:
        return StoreUnavailable(
            f"{self._where()} is unavailable ({what}: {cause}); start it (`make stores`) or fix influx.url / "
            f"MDP_INFLUX_URL; writers acknowledge nothing meanwhile, the backlog waits in Redis")

    def _tls_refused(self, what: str, exc: BaseException) -> StoreUnavailable:
        return StoreUnavailable(
            f"{self._where()}: TLS failed ({what}: {exc}); set influx.ca_cert to the CA certificate that signed the "
            f"server's certificate (or influx.verify_tls = false for a test server only); nothing is acknowledged "
            f"meanwhile")

    @contextmanager
    def _reaching(self, what: str, failures: tuple[type[BaseException], ...]) -> Iterator[None]:
        """One request (`what`, "POST /write"), counted: a timeout, a TLS failure or one of `failures` (the
        transport's) becomes StoreUnavailable saying what to do."""
        try:
            yield
        except TimeoutError as exc:  # first: aiohttp's timeouts are also ClientConnectionErrors
            raise self._unavailable(what, f"no answer within {self.settings.timeout_s:g} s") from exc
        except aiohttp.ClientSSLError as exc:
            raise self._tls_refused(what, exc) from exc
        except failures as exc:
            raise self._unavailable(what, f"{type(exc).__name__}: {exc}") from exc
        finally:
            self.requests += 1

    async def _request(self, method: str, path: str, params: Mapping[str, str] | None = None,
                       data: bytes | None = None, json_body: object = None,
                       headers: Mapping[str, str] | None = None) -> tuple[int, bytes, Any]:
        """(status, body, headers); StoreUnavailable on connection errors, timeouts, 5xx and 429 (except 1.x's
        HTTP 500 "retention policy not found", which is a missing tier, returned to the caller)."""
        session = self._get_session()
        what = f"{method} {path}"
        sent = dict(headers) if headers is not None else self._auth_headers()
        if data is not None:
            sent["Content-Type"] = "text/plain; charset=utf-8"
        elif json_body is not None:
            data = msgspec.json.encode(json_body)
            sent["Content-Type"] = "application/json"
        with self._reaching(what, (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, OSError)):
            async with session.request(method, self.url + path, params=params, data=data, headers=sent) as resp:
                body = await resp.read()
                status = resp.status
                got = resp.headers
        if (status >= 500 or status == 429) and b"retention policy not found" not in body:
            raise self._unavailable(what, f"HTTP {status} {error_text(body)}")
        return status, body, got

    async def _api(self, method: str, path: str, params: Mapping[str, str] | None = None,
                   json_body: object = None, ok: tuple[int, ...] = (200, 201, 204)) -> tuple[int, Any]:
        """A 2.x / 3.x management call; (status, decoded JSON or None). InfluxError when refused."""
        status, body, _ = await self._request(method, path, params, json_body=json_body)
        if status not in ok:
            text = error_text(body)
            raise InfluxError(f"{self._where()} refused {method} {path}: HTTP {status} {text}{self._hint(status)}",
                              status, text)
        if not body.strip():
            return status, None
        try:
            return status, msgspec.json.decode(body)
        except msgspec.DecodeError:
            return status, None

    # -- connecting -----------------------------------------------------------------------------------

    async def ping(self) -> str:
        """The server's version (X-Influxdb-Version of /ping); StoreUnavailable if it does not answer."""
        status, body, headers = await self._request("GET", "/ping")
        if status >= 400:
            text = error_text(body)
            hint = (" (InfluxDB 3 asks for a token on /ping unless started with --disable-authz ping: set "
                    "influx.token)") if status == 401 else ""
            raise InfluxError(f"InfluxDB at {self.url} refused /ping: HTTP {status} {text}{hint}", status, text)
        version = str(headers.get("X-Influxdb-Version") or "")
        if not version and body.startswith(b"{"):
            try:
                version = str(msgspec.json.decode(body).get("version") or "")
            except (msgspec.DecodeError, AttributeError):
                version = ""
        return version or "unknown"

    async def connect(self) -> str:
        """Ping, learn the generation (or check influx.generation against it), check the credentials the
        generation needs, and sign in on 2.x with username/password. Returns the server's version.
        ConfigError for settings this server cannot use; StoreUnavailable when it does not answer."""
        configured = self.settings.generation
        if configured != "auto":
            self._generation_known.check_credentials()
        version = await self.ping()
        self.version = version
        detected = generation_of(version)
        if configured == "auto":
            if detected is None:
                raise ConfigError(f"InfluxDB at {self.url} reports version {version!r}, which is not 1.x, 2.x or "
                                  f"3.x; set influx.generation = \"1\", \"2\" or \"3\" (MDP_INFLUX_GENERATION)")
            if self._gen is None or self._gen.number != detected:
                if self._gen is not None:
                    await self._gen.close()
                self._gen = GENERATIONS[detected](self)
        elif detected is not None and detected != int(configured):
            log.warning("influx.generation = %r but InfluxDB at %s reports version %s; using generation %s as "
                        "configured", configured, self.url, version, configured)
        gen = self._generation_known
        gen.check_credentials()
        if not self._cookie:
            self._cookie = await gen.session_cookie()
        self._connected = True
        return version

    async def _ready(self) -> None:
        if not self._connected:
            await self.connect()

    # -- tiers ----------------------------------------------------------------------------------------

    def tier_target(self, tier: Tier | str) -> TierTarget:
        return self._generation_known.tier_target(self.plan.tier(tier) if isinstance(tier, str) else tier)

    def target(self, timeframe: str) -> TierTarget:
        """Where "ticks" or a candle timeframe lives on this server."""
        return self.tier_target(self.plan.for_timeframe(timeframe))

    def tier_for(self, timeframe: str) -> tuple[str, str]:
        """(database, retention policy) to query "ticks" or a candle timeframe with InfluxQL on this server
        (the retention policy is "" on 3.x, where each tier is a database of its own)."""
        found = self.target(timeframe)
        return found.database, found.rp

    async def ensure_tiers(self) -> list[str]:
        """Create every tier that is missing and set the retention of those that differ from the config;
        idempotent. Returns one line per thing looked at, saying what was done."""
        await self._ready()
        return await self._generation_known.ensure_tiers()

    # -- writing --------------------------------------------------------------------------------------

    async def write_lines(self, lines: Sequence[str], database: str | None = None, rp: str = "") -> int:
        """Write line-protocol lines (ns precision) in requests of at most `batch_points` lines, up to
        influx.write_concurrency at once. 1.x: into `database` (default influx.database) and retention policy
        `rp` (default: the database's default); 2.x / 3.x: into bucket / database `database`.
        Returns when every request was answered 204 (the points are durable in the server's WAL), with the
        number of points sent. InfluxWriteError on a 4xx, StoreUnavailable when unreachable."""
        await self._ready()
        target = database or self.database
        gen = self._generation_known

        async def send(chunk: Sequence[str]) -> None:
            await gen.write(target, rp, chunk)
        await self._in_chunks(lines, send)
        return len(lines)

    async def write_tier(self, tier: Tier | str, lines: Sequence[str]) -> int:
        """Write lines into a storage tier (its retention policy, bucket or database)."""
        await self._ready()
        target = self.tier_target(tier)
        if self.generation == 1:
            return await self.write_lines(lines, target.database, target.rp)
        return await self.write_lines(lines, target.bucket)

    async def _in_chunks(self, lines: Sequence[str], send: Callable[[Sequence[str]], Awaitable[None]]) -> None:
        size = self.batch_points
        if len(lines) <= size:
            if lines:
                await send(lines)
            return
        if self._slots is None:
            self._slots = asyncio.Semaphore(max(1, self.settings.write_concurrency))
        slots = self._slots

        async def one(chunk: Sequence[str]) -> None:
            async with slots:
                await send(chunk)
        results = await asyncio.gather(*(one(lines[i:i + size]) for i in range(0, len(lines), size)),
                                       return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise next((e for e in errors if isinstance(e, StoreUnavailable)), errors[0])

    def _refused(self, n: int, where: str, status: int, text: str) -> InfluxWriteError | None:
        """The error for a refused write, or None when only points beyond retention were dropped."""
        error = InfluxWriteError(f"{self._where()} refused a write of {n} points to {where}: HTTP {status} {text}",
                                 status, text)
        dropped = error.beyond_retention
        if dropped:
            self.expired_dropped += dropped
            self.points_written += n - dropped
            log.info("%s dropped %d of %d points as older than the retention of %s", self._where(), dropped, n,
                     where)
            return None
        return error

    # -- querying -------------------------------------------------------------------------------------

    async def _get_query(self, influxql: str, params: Mapping[str, Any] | None, database: str | None,
                         rp: str) -> tuple[str, int, bytes]:
        """GET /query with the values bound (1.x, 2.x: JSON `params`; 3.x: inlined literals) and the retention
        policy picked; returns the query as sent, the HTTP status and the body."""
        await self._ready()
        query = {"db": database or self.database, "epoch": "ns"}
        influxql = self._generation_known.bind(query, influxql, params, rp)
        query["q"] = influxql
        status, body, _ = await self._request("GET", "/query", query)
        return influxql, status, body

    async def query(self, influxql: str, params: Mapping[str, Any] | None = None, database: str | None = None,
                    exact: bool = False, rp: str = "") -> list[dict[str, Any]]:
        """Run a read query (GET /query, `epoch=ns`) and return its rows as dicts: the columns (time in ns)
        plus the series' tags for GROUP BY queries, over every series and statement.

        Bind values with `params` (`WHERE symbol = $symbol`, params={"symbol": "BTC/USDT"}): on 1.x and 2.x
        they travel as JSON data, never as query text; on 3.x they are inlined as quoted literals. `rp` picks
        the retention policy (1.x, 2.x; on 3.x it addresses the database "{database}/{rp}"). With
        `exact=True` numbers with a fraction come back as Decimal, from the server's text (whole numbers stay
        int: InfluxDB's JSON writes the float 100.0 as `100`). InfluxQueryError when the server reports an
        error."""
        influxql, status, body = await self._get_query(influxql, params, database, rp)
        return rows_of(self._results(influxql, status, body, exact))

    async def query_values(self, influxql: str, params: Mapping[str, Any] | None = None,
                           database: str | None = None, exact: bool = False,
                           rp: str = "") -> tuple[list[str], list[list[Any]]]:
        """`query` for one series, without a dict per row: (columns, value rows) as the server sent them,
        the parts of a long series (1.x splits one every 10,000 rows) joined in order. Tags are not returned,
        so use it for queries without GROUP BY (common.history turns the rows into arrays: building a dict
        per row is most of the client's cost and garbage on a large answer)."""
        influxql, status, body = await self._get_query(influxql, params, database, rp)
        return values_of(self._results(influxql, status, body, exact))

    async def query_timeframe(self, timeframe: str, influxql: str, params: Mapping[str, Any] | None = None,
                              exact: bool = False) -> list[dict[str, Any]]:
        """`query` in the tier where "ticks" or candle `timeframe` lives (see `tier_for`)."""
        await self._ready()
        target = self.target(timeframe)
        return await self.query(influxql, params, database=target.database, exact=exact, rp=target.rp)

    async def execute(self, influxql: str, params: Mapping[str, Any] | None = None,
                      database: str | None = None) -> list[dict[str, Any]]:
        """Run a statement that changes something (CREATE, DROP, ...) with POST /query (1.x; 2.x's v1 API
        takes few such statements and 3.x none: use `ensure_tiers` there)."""
        await self._ready()
        query = {"q": influxql}
        if database:
            query["db"] = database
        if params:
            query["params"] = encode_params(params)
        status, body, _ = await self._request("POST", "/query", query)
        return rows_of(self._results(influxql, status, body, False))

    async def create_database(self, database: str | None = None) -> None:
        """CREATE DATABASE on 1.x (idempotent: an existing database is left as it is). On 2.x / 3.x databases
        are the tiers' buckets / databases: `ensure_tiers` makes them."""
        await self._ready()
        if self.generation != 1:
            await self.ensure_tiers()
            return
        await self.execute(f"CREATE DATABASE {quote_ident(database or self.database)}")

    def _results(self, influxql: str, status: int, body: bytes, exact: bool) -> Results:
        """The decoded answer of `/query`; InfluxQueryError when the server refused the query, answered with an
        unreadable body, or reports an error for the request or any statement."""
        if status >= 300:
            text = error_text(body)
            raise InfluxQueryError(
                f"{self._where()} refused the query {influxql!r}: HTTP {status} {text}{self._hint(status)}",
                status, text)
        try:
            parsed = (RESULTS_EXACT if exact else RESULTS).decode(body)
        except msgspec.DecodeError as exc:
            raise InfluxQueryError(
                f"{self._where()} answered the query {influxql!r} with an unreadable body: {exc}",
                status, body[:500].decode(errors="replace")) from exc
        error = first_error(parsed)
        if error:
            raise InfluxQueryError(f"query {influxql!r} failed on {self._where()}: {error}", status, error)
        return parsed
