"""A local fake of InfluxDB 2.x (OSS 2.7) and 3.x (3 Core), for what cannot run here: only 1.6.7 is packaged
for these machines (docs/facts.md). It speaks their wire format and records every request, so tests check each
request our code makes (method, path, parameters, headers, body) and our handling of each answer.

What it models, from the servers' sources (influxdata/influxdb: 2.x `dbrp/http_server_dbrp.go`,
`tenant/service_bucket.go`; 3.x `influxdb3_server/src/http.rs`, `http/v1.rs`, `influxdb3_types/src/http.rs`):

2.x
- `GET|HEAD /ping` 204 with `X-Influxdb-Build: OSS`, `X-Influxdb-Version: v2.7.11`; `GET /health` 200 JSON.
- auth: `Authorization: Token <token>`, or the session cookie of `POST /api/v2/signin` (basic auth with a
  user's password; 204 + `Set-Cookie: influxdb-oss-session=...`), `POST /api/v2/signout`. Else 401
  `{"code":"unauthorized","message":"unauthorized access"}`.
- errors are `{"code": ..., "message": ...}`: "invalid" 400, "unauthorized" 401, "not found" 404,
  "conflict" / "unprocessable entity" 422, "request too large" 413.
- `GET /api/v2/orgs?org=`; `GET /api/v2/buckets?orgID=&name=` (404 for an unknown name, as 2.x's
  FindBuckets does), `POST /api/v2/buckets` (201; a taken name 422 "conflict"), `PATCH /api/v2/buckets/{id}`.
- `GET /api/v2/dbrps?orgID=&db=&rp=` lists physical mappings and the virtual one of every bucket
  ("{db}" -> rp "autogen", "{db}/{rp}" -> rp), `POST /api/v2/dbrps` 201 with the mapping (the first one of
  a database becomes its default).
- `POST /api/v2/write?org=&bucket=&precision=`: 204; line protocol errors 400 "invalid"
  ("unable to parse '<line>': <why>"); a missing bucket 404 "not found"; a field type conflict or points
  older than the bucket's retention 422 "failure writing points to database: partial write: ... dropped=N"
  (the other points are stored).
- `GET /query` (v1 compatibility): `db`, `rp` (resolved through the DBRP mappings), `q`, `epoch`, `params`.
3.x (3 Core)
- `GET|POST /ping` 200 JSON {"version","revision","process_id"} with `X-Influxdb-Build: Core`,
  `X-Influxdb-Version: 3.x`; `GET /health` "OK". Both need the token unless `public_ping`.
- auth: `Authorization: Bearer|Token <token>` or `Basic` with the token as password; a missing or wrong token
  401 with an empty body; another scheme 400 {"error": "Authorization header was malformed, ..."}.
- errors are `{"error": ..., "data": ...}` (or plain text for some, as the real server).
- `GET /api/v3/configure/database?format=json` -> [{"iox::database": name}, ...];
  `POST` {"db", "retention_period"} (200; a name with '/' 400; an existing one 409);
  `PUT` {"db", "retention_period"} sets or clears the retention (404 "not found" when the fake plays a
  release without that route: `can_update_retention=False`).
- `POST /api/v2/write?bucket=&precision=` (org ignored; the database is created on first write, with no
  retention; legacy writes accept no partial write: one bad line refuses the request,
  400 {"error": "parsing failed for write_lp endpoint", "data": {"original_line", "line_number",
  "error_message"}}).
- `GET /query`: `db`, `q`, `epoch`; no `rp` and no bound `params` (3 Core's v1 API ignores both: an
  unreplaced `$name` fails the query); SELECT and SHOW DATABASES / RETENTION POLICIES / MEASUREMENTS only.

Queries run on the stored points with a small evaluator: `SELECT *|fields|count(f)|last(f) FROM m [WHERE
tag = 'v' | tag = $p [AND ...]] [ORDER BY time [DESC]] [LIMIT n]`, which is what the tests ask.
"""

from __future__ import annotations

import base64
import json
import math
import re
import secrets
import ssl
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Self

from aiohttp import web

V2_VERSION = "v2.7.11"
V3_VERSION = "3.1.0"


@dataclass
class Recorded:
    """One request as the fake received it."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Point:
    measurement: str
    tags: dict[str, str]
    fields: dict[str, Any]
    time: int


@dataclass
class Bucket:
    id: str
    org_id: str
    name: str
    every_seconds: int  # 0: forever
    points: dict[tuple[str, tuple[tuple[str, str], ...], int], Point] = field(default_factory=dict)

    def json(self) -> dict[str, Any]:
        return {"id": self.id, "orgID": self.org_id, "type": "user", "name": self.name,
                "retentionRules": [{"type": "expire", "everySeconds": self.every_seconds,
                                    "shardGroupDurationSeconds": 86400 if self.every_seconds else 604800}],
                "createdAt": "2026-01-01T00:00:00Z", "updatedAt": "2026-01-01T00:00:00Z",
                "links": {"self": f"/api/v2/buckets/{self.id}"}, "labels": []}


class LineProtocolError(ValueError):
    pass


class FakeInflux:
    """`await FakeInflux(2).start()` ... `await fake.stop()`; `fake.url`, `fake.requests`."""

    def __init__(self, generation: int, token: str = "test-token", org: str = "mdp",
                 users: dict[str, str] | None = None, ssl_context: ssl.SSLContext | None = None,
                 public_ping: bool = False, can_update_retention: bool = True, version: str | None = None) -> None:
        if generation not in (2, 3):
            raise ValueError("the fake plays InfluxDB 2.x or 3.x; 1.x runs for real (influxd 1.6.7)")
        self.generation = generation
        self.token = token
        self.org = org
        self.org_id = "0a1b2c3d4e5f6071"
        self.users = users or {}
        self.ssl_context = ssl_context
        self.public_ping = public_ping
        self.can_update_retention = can_update_retention
        self.version = version or (V2_VERSION if generation == 2 else V3_VERSION)
        self.requests: list[Recorded] = []
        self.sessions: set[str] = set()
        self.buckets: dict[str, Bucket] = {}  # by id (2.x); 3.x keeps its databases here too, by name
        self.dbrps: list[dict[str, Any]] = []
        self.fail_writes: list[tuple[int, bytes]] = []  # answers to give the next writes instead (status, body)
        self._ids = 0x0a00000000000000
        self._runner: web.AppRunner | None = None
        self.url = ""

    # -- lifecycle ------------------------------------------------------------------------------------

    async def start(self) -> FakeInflux:
        app = web.Application(client_max_size=64 * 1024 * 1024, middlewares=[self._record])
        app.router.add_route("*", "/{tail:.*}", self._route)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self.ssl_context)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"{'https' if self.ssl_context else 'http'}://127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def calls(self, method: str | None = None, path: str | None = None) -> list[Recorded]:
        return [r for r in self.requests if (method is None or r.method == method)
                and (path is None or r.path == path)]

    def points(self, bucket: str) -> list[Point]:
        found = self._bucket_by_name(bucket)
        return sorted(found.points.values(), key=lambda p: p.time) if found else []

    def bucket(self, name: str) -> Bucket | None:
        return self._bucket_by_name(name)

    # -- plumbing -------------------------------------------------------------------------------------

    @web.middleware
    async def _record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        body = await request.read()
        self.requests.append(Recorded(request.method, request.path, dict(request.query),
                                      dict(request.headers), body))
        response: web.StreamResponse = await handler(request)
        return response

    def _new_id(self) -> str:
        self._ids += 1
        return f"{self._ids:016x}"

    def _error(self, status: int, message: str, code: str | None = None, data: Any = None) -> web.Response:
        if self.generation == 2:
            codes = {400: "invalid", 401: "unauthorized", 403: "forbidden", 404: "not found", 413: "request too large",
                     422: "unprocessable entity", 500: "internal error", 503: "unavailable"}
            return web.json_response({"code": code or codes.get(status, "internal error"), "message": message},
                                     status=status)
        return web.json_response({"error": message, "data": data}, status=status)

    def _text(self, status: int, text: str) -> web.Response:
        return web.Response(status=status, text=text)

    def _authorized(self, request: web.Request) -> web.Response | None:
        header = request.headers.get("Authorization", "")
        if self.generation == 2:
            if header == f"Token {self.token}":
                return None
            cookie = request.cookies.get("influxdb-oss-session")
            if cookie and cookie in self.sessions:
                return None
            return self._error(401, "unauthorized access")
        if not header:
            return web.Response(status=401)
        scheme, _, value = header.partition(" ")
        if scheme not in ("Bearer", "Token", "Basic") or not value or " " in value:
            return web.Response(status=400, text='{"error": "Authorization header was malformed, the request was not '
                                                 'in the form of \'Authorization: <auth-scheme> <token>\', supported '
                                                 'auth-schemes are Bearer, Token and Basic"}')
        if scheme == "Basic":
            try:
                value = base64.b64decode(value).decode().rsplit(":", 1)[1]
            except (ValueError, IndexError):
                return web.Response(status=400, text='{"error": "Authorization header was malformed"}')
        return None if value == self.token else web.Response(status=401)

    # -- routing --------------------------------------------------------------------------------------

    async def _route(self, request: web.Request) -> web.StreamResponse:
        method, path = request.method, request.path
        if path == "/ping" and method in ("GET", "HEAD", "POST"):
            return await self._ping(request)
        if path == "/health" and method == "GET":
            if self.generation == 3 and not self.public_ping and (denied := self._authorized(request)):
                return denied
            if self.generation == 2:
                return web.json_response({"name": "influxdb", "message": "ready for queries and writes",
                                          "status": "pass", "checks": [], "version": self.version,
                                          "commit": "fa3b5b7"})
            return self._text(200, "OK")
        if self.generation == 2 and path == "/api/v2/signin" and method == "POST":
            return self._signin(request)
        denied = self._authorized(request)
        if denied is not None:
            return denied
        if path == "/api/v2/write" and method == "POST":
            return await self._write(request)
        if path == "/query" and method in ("GET", "POST"):
            return await self._query(request)
        if self.generation == 2:
            return await self._route_v2(request)
        return await self._route_v3(request)

    async def _ping(self, request: web.Request) -> web.StreamResponse:
        if self.generation == 2:
            return web.Response(status=204, headers={"X-Influxdb-Build": "OSS", "X-Influxdb-Version": self.version})
        if not self.public_ping and (denied := self._authorized(request)):
            return denied
        body = {"version": self.version, "revision": "0a1b2c3", "process_id": str(uuid.uuid4())}
        rid = str(uuid.uuid4())
        return web.json_response(body, headers={"X-Influxdb-Build": "Core", "X-Influxdb-Version": self.version,
                                                "Request-Id": rid, "X-Request-Id": rid})

    def _signin(self, request: web.Request) -> web.Response:
        header = request.headers.get("Authorization", "")
        if header.startswith("Basic "):
            try:
                user, password = base64.b64decode(header[6:]).decode().split(":", 1)
            except ValueError:
                user, password = "", ""
            if user in self.users and self.users[user] == password:
                sid = secrets.token_urlsafe(16)
                self.sessions.add(sid)
                resp = web.Response(status=204)
                resp.headers["Set-Cookie"] = (f"influxdb-oss-session={sid}; Path=/api/; "
                                              f"Expires=Thu, 01 Jan 2099 00:00:00 GMT; HttpOnly")
                return resp
        return self._error(401, "Unauthorized")

    # -- 2.x management ---------------------------------------------------------------------------------

    async def _route_v2(self, request: web.Request) -> web.StreamResponse:
        method, path, q = request.method, request.path, request.query
        if path == "/api/v2/signout" and method == "POST":
            cookie = request.cookies.get("influxdb-oss-session")
            self.sessions.discard(cookie or "")
            return web.Response(status=204)
        if path == "/api/v2/orgs" and method == "GET":
            name = q.get("org")
            if name and name != self.org:
                return self._error(404, f"organization name \"{name}\" not found")
            return web.json_response({"links": {"self": "/api/v2/orgs"},
                                      "orgs": [{"id": self.org_id, "name": self.org}]})
        if path == "/api/v2/buckets" and method == "GET":
            org_id = q.get("orgID") or (self.org_id if q.get("org") == self.org else None)
            if org_id is None and q.get("org"):
                return self._error(404, f"organization name \"{q.get('org')}\" not found")
            found = [b for b in self.buckets.values() if (org_id is None or b.org_id == org_id)]
            if q.get("name") is not None:
                found = [b for b in found if b.name == q["name"]]
                if org_id is not None and not found:
                    return self._error(404, f"bucket \"{q['name']}\" not found")
            return web.json_response({"links": {"self": "/api/v2/buckets"}, "buckets": [b.json() for b in found]})
        if path == "/api/v2/buckets" and method == "POST":
            return self._create_bucket(await request.json())
        if path.startswith("/api/v2/buckets/") and method == "PATCH":
            bucket = self.buckets.get(path.rsplit("/", 1)[1])
            if bucket is None:
                return self._error(404, "bucket not found")
            body = await request.json()
            if "retentionRules" in body:
                every = _every_seconds(body["retentionRules"])
                if every is None:
                    return self._error(422, "retention policy duration must be at least 1h0m0s")
                bucket.every_seconds = every
            if "name" in body:
                bucket.name = body["name"]
            return web.json_response(bucket.json())
        if path == "/api/v2/dbrps" and method == "GET":
            return self._list_dbrps(q)
        if path == "/api/v2/dbrps" and method == "POST":
            return self._create_dbrp(await request.json())
        return self._error(404, "path not found")

    def _create_bucket(self, body: dict[str, Any]) -> web.Response:
        if body.get("orgID") != self.org_id:
            return self._error(400 if not body.get("orgID") else 404,
                               "orgID is required" if not body.get("orgID") else "organization not found")
        name = str(body.get("name") or "")
        if not name:
            return self._error(400, "bucket name is required")
        if any(b.name == name and b.org_id == self.org_id for b in self.buckets.values()):
            return self._error(422, f"bucket with name {name} already exists", code="conflict")
        every = _every_seconds(body.get("retentionRules") or [])
        if every is None:
            return self._error(422, "retention policy duration must be at least 1h0m0s")
        bucket = Bucket(self._new_id(), self.org_id, name, every)
        self.buckets[bucket.id] = bucket
        return web.json_response(bucket.json(), status=201)

    def _mappings(self) -> list[dict[str, Any]]:
        """Physical mappings, then a virtual one per bucket not mapped physically (as 2.x's FindMany)."""
        out = [dict(m) for m in self.dbrps]
        mapped = {m["bucketID"] for m in self.dbrps}
        for b in self.buckets.values():
            db, _, rp = b.name.partition("/")
            out.append({"id": b.id, "database": db, "retention_policy": rp or "autogen",
                        "default": b.id not in mapped, "orgID": b.org_id, "bucketID": b.id, "virtual": True})
        return out

    def _list_dbrps(self, q: Any) -> web.Response:
        org_id = q.get("orgID") or (self.org_id if q.get("org") == self.org else None)
        if org_id is None:
            return self._error(400, "Please provide either orgID or org")
        found = [m for m in self._mappings() if m["orgID"] == org_id
                 and (not q.get("db") or m["database"] == q["db"])
                 and (not q.get("rp") or m["retention_policy"] == q["rp"])
                 and (not q.get("bucketID") or m["bucketID"] == q["bucketID"])]
        return web.json_response({"content": found})

    def _create_dbrp(self, body: dict[str, Any]) -> web.Response:
        org_id = body.get("orgID") or (self.org_id if body.get("org") == self.org else "")
        if org_id != self.org_id:
            return self._error(400, "Please provide either orgID or org")
        if str(body.get("bucketID")) not in self.buckets:
            return self._error(404, "bucket not found")
        db, rp = str(body.get("database") or ""), str(body.get("retention_policy") or "")
        if not db or not rp:
            return self._error(400, "database and retention_policy are required")
        if any(m["database"] == db and m["retention_policy"] == rp for m in self.dbrps):
            return self._error(422, "another DBRP mapping with same orgID, db, and rp exists", code="conflict")
        first = not any(m["database"] == db for m in self.dbrps)
        mapping = {"id": self._new_id(), "database": db, "retention_policy": rp,
                   "default": bool(body.get("default")) or first, "orgID": org_id,
                   "bucketID": str(body["bucketID"])}
        self.dbrps.append(mapping)
        return web.json_response(mapping, status=201)

    # -- 3.x management ---------------------------------------------------------------------------------

    async def _route_v3(self, request: web.Request) -> web.StreamResponse:
        method, path = request.method, request.path
        if path == "/api/v3/configure/database":
            if method == "GET":
                fmt = request.query.get("format")
                if fmt is None:
                    return self._text(400, "serde error: missing field `format`")
                rows = [{"iox::database": b.name} for b in sorted(self.buckets.values(), key=lambda b: b.name)]
                return web.json_response(rows)
            if method == "POST":
                body, error = await self._json_body(request)
                if error is not None:
                    return error
                name = str(body.get("db") or "")
                if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name):
                    return self._error(400, "invalid character in database name: must be ASCII, containing only "
                                            "letters, numbers, underscores, or hyphens")
                if self._bucket_by_name(name):
                    return self._text(409, "attempted to create resource that already exists")
                seconds = _humantime_seconds(body.get("retention_period"))
                self.buckets[name] = Bucket(name, "", name, seconds)
                return web.Response(status=200)
            if method == "PUT" and self.can_update_retention:
                body, error = await self._json_body(request)
                if error is not None:
                    return error
                bucket = self._bucket_by_name(str(body.get("db") or ""))
                if bucket is None:
                    return self._text(404, "Database not found")
                bucket.every_seconds = _humantime_seconds(body.get("retention_period"))
                return web.Response(status=200)
        return self._text(404, "not found")

    async def _json_body(self, request: web.Request) -> tuple[dict[str, Any], web.Response | None]:
        if request.content_type != "application/json":
            return {}, self._text(415, "unacceptable content-type, expected: application/json")
        try:
            return json.loads(await request.read()), None
        except ValueError as exc:
            return {}, self._text(400, f"serde json error: {exc}")

    # -- writes -----------------------------------------------------------------------------------------

    def _bucket_by_name(self, name: str) -> Bucket | None:
        return next((b for b in self.buckets.values() if b.name == name), None)

    async def _write(self, request: web.Request) -> web.Response:
        q = request.query
        if self.fail_writes:
            status, body = self.fail_writes.pop(0)
            return web.Response(status=status, body=body, content_type="application/json")
        precision = q.get("precision", "ns")
        if precision not in ("ns", "us", "ms", "s"):
            return self._error(400, f"invalid precision {precision!r}")
        name = q.get("bucket", "")
        if self.generation == 2:
            if not (q.get("org") == self.org or q.get("orgID") == self.org_id):
                if not q.get("org") and not q.get("orgID"):
                    return self._error(400, "Please provide either orgID or org")
                return self._error(404, f"organization name \"{q.get('org')}\" not found")
            bucket = self._bucket_by_name(name)
            if bucket is None:
                return self._error(404, f"bucket \"{name}\" not found")
        else:
            if not name:
                return self._error(400, "missing query parameter 'bucket'")
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name):
                return self._error(400, "invalid character in database name: must be ASCII, containing only "
                                        "letters, numbers, underscores, or hyphens")
            bucket = self._bucket_by_name(name)
            if bucket is None:  # 3.x makes the database on first write, with no retention
                bucket = self.buckets[name] = Bucket(name, "", name, 0)
        text = (await request.read()).decode()
        points: list[Point] = []
        for number, line in enumerate(text.split("\n"), 1):
            if not line.strip() or line.startswith("#"):
                continue
            try:
                points.append(parse_line(line, precision))
            except LineProtocolError as exc:
                if self.generation == 2:
                    return self._error(400, f"unable to parse '{line}': {exc}")
                return self._error(400, "parsing failed for write_lp endpoint",
                                   data={"original_line": line, "line_number": number, "error_message": str(exc)})
        return self._store(bucket, points)

    def _store(self, bucket: Bucket, points: list[Point]) -> web.Response:
        types: dict[tuple[str, str], type] = {}
        for p in bucket.points.values():
            for k, v in p.fields.items():
                types[(p.measurement, k)] = type(v)
        cutoff = time.time_ns() - bucket.every_seconds * 1_000_000_000 if bucket.every_seconds else None
        conflicts: list[str] = []
        expired = 0
        for p in points:
            bad = [k for k, v in p.fields.items() if types.get((p.measurement, k), type(v)) is not type(v)]
            if bad:
                conflicts.append(f"field type conflict: input field \"{bad[0]}\" on measurement \"{p.measurement}\" "
                                 f"is type {_type_name(p.fields[bad[0]])}, already exists as type "
                                 f"{_type_name_of(types[(p.measurement, bad[0])])}")
                continue
            if cutoff is not None and p.time < cutoff and self.generation == 2:
                expired += 1
                continue
            for k, v in p.fields.items():
                types[(p.measurement, k)] = type(v)
            key = (p.measurement, tuple(sorted(p.tags.items())), p.time)
            old = bucket.points.get(key)
            bucket.points[key] = Point(p.measurement, p.tags, {**(old.fields if old else {}), **p.fields}, p.time)
        if conflicts and self.generation == 2:
            return self._error(422, f"failure writing points to database: partial write: {conflicts[0]} "
                                    f"dropped={len(conflicts) + expired}")
        if conflicts:
            return self._error(400, "partial write of line protocol occurred",
                               data=[{"original_line": "", "line_number": 0, "error_message": conflicts[0]}])
        if expired:
            return self._error(422, f"failure writing points to database: partial write: points beyond retention "
                                    f"policy dropped={expired}")
        return web.Response(status=204)

    # -- queries ----------------------------------------------------------------------------------------

    async def _query(self, request: web.Request) -> web.Response:
        q = dict(request.query)
        if request.method == "POST" and request.content_type == "application/x-www-form-urlencoded":
            q.update({k: str(v) for k, v in (await request.post()).items()})
        text = q.get("q", "")
        if not text:
            return self._error(400, "missing query parameter 'q'") if self.generation == 3 else \
                web.json_response({"error": "missing required parameter \"q\""}, status=400)
        epoch = q.get("epoch")
        statement = text.strip().rstrip(";")
        upper = statement.upper()
        if upper == "SHOW DATABASES":
            names = sorted({b.name for b in self.buckets.values()}) if self.generation == 3 else \
                sorted({m["database"] for m in self._mappings()})
            return self._results([{"name": "databases", "columns": ["name"], "values": [[n] for n in names]}])
        db = q.get("db", "")
        if self.generation == 2:
            bucket = self._resolve_dbrp(db, q.get("rp", ""))
            if bucket is None:
                return web.json_response({"code": "not found", "message":
                                          f"no dbrp mapping found for database \"{db}\" and retention policy "
                                          f"\"{q.get('rp', '')}\""}, status=404)
            params = json.loads(q["params"]) if q.get("params") else {}
        else:
            if not upper.startswith(("SELECT", "SHOW")):
                return self._error(400, "error in InfluxQL statement: this statement is not supported by "
                                        "InfluxDB 3's v1 query API")
            if "$" in statement:
                return self._error(400, f"error while planning query: No value found for placeholder with name "
                                        f"{re.search(r'[$][A-Za-z_]+', statement).group(0)}")  # type: ignore[union-attr]
            bucket = self._bucket_by_name(db)
            if bucket is None:
                return self._error(404, f"query error: database not found: {db}")
            params = {}
        # 3.x enforces retention when it reads (FACTS / 3 Core docs): older points are not returned.
        cutoff = time.time_ns() - bucket.every_seconds * 10**9 if self.generation == 3 and bucket.every_seconds \
            else None
        try:
            series = evaluate(statement, bucket, params, epoch, cutoff)
        except ValueError as exc:
            if self.generation == 2:
                return web.json_response({"results": [{"statement_id": 0, "error": str(exc)}]})
            return self._error(400, f"error while planning query: {exc}")
        return self._results(series)

    def _resolve_dbrp(self, db: str, rp: str) -> Bucket | None:
        candidates = [m for m in self._mappings() if m["database"] == db]
        physical = [m for m in candidates if not m.get("virtual")]
        pool = physical or candidates
        chosen = next((m for m in pool if m["retention_policy"] == rp), None) if rp else \
            next((m for m in pool if m["default"]), None)
        return self.buckets.get(chosen["bucketID"]) if chosen else None

    def _results(self, series: list[dict[str, Any]]) -> web.Response:
        result: dict[str, Any] = {"statement_id": 0}
        if series:
            result["series"] = series
        return web.Response(body=json.dumps({"results": [result]}).encode() + b"\r\n" if self.generation == 3
                            else json.dumps({"results": [result]}).encode() + b"\n",
                            content_type="application/json")


# -- line protocol ------------------------------------------------------------------------------------------

_PRECISION = {"ns": 1, "us": 1_000, "ms": 1_000_000, "s": 1_000_000_000}


def _split(text: str, sep: str) -> list[str]:
    """Split on `sep` outside double quotes, honouring backslash escapes."""
    parts, cur, quoted, i = [], [], False, 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            cur.append(text[i:i + 2])
            i += 2
            continue
        if ch == '"':
            quoted = not quoted
        if ch == sep and not quoted:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    if quoted:
        raise LineProtocolError("unbalanced quotes")
    parts.append("".join(cur))
    return parts


def _unescape(text: str) -> str:
    return re.sub(r"\\([ ,=\\\"])", r"\1", text)


def parse_line(line: str, precision: str = "ns") -> Point:
    sections = _split(line, " ")
    if len(sections) < 2:
        raise LineProtocolError("missing fields")
    if len(sections) > 3:
        raise LineProtocolError("invalid field format")
    series, fields_text = sections[0], sections[1]
    keys = _split(series, ",")
    measurement = _unescape(keys[0])
    if not measurement:
        raise LineProtocolError("missing measurement")
    tags: dict[str, str] = {}
    for item in keys[1:]:
        k, eq, v = item.partition("=")
        if not eq or not k or not v:
            raise LineProtocolError("missing tag value")
        tags[_unescape(k)] = _unescape(v)
    fields: dict[str, Any] = {}
    for item in _split(fields_text, ","):
        k, eq, v = item.partition("=")
        if not eq or not k or not v:
            raise LineProtocolError("missing field value")
        fields[_unescape(k)] = _field_value(v)
    if len(sections) == 3:
        try:
            ts = int(sections[2]) * _PRECISION[precision]
        except ValueError:
            raise LineProtocolError("bad timestamp") from None
    else:
        ts = time.time_ns()
    return Point(measurement, tags, fields, ts)


def _field_value(text: str) -> Any:
    if text.startswith('"'):
        if not text.endswith('"') or len(text) < 2:
            raise LineProtocolError("invalid field format")
        return re.sub(r'\\(["\\])', r"\1", text[1:-1])
    if text in ("t", "T", "true", "True", "TRUE"):
        return True
    if text in ("f", "F", "false", "False", "FALSE"):
        return False
    if text.endswith("i"):
        try:
            return int(text[:-1])
        except ValueError:
            raise LineProtocolError(f"invalid integer {text!r}") from None
    try:
        value = float(text)
    except ValueError:
        raise LineProtocolError(f"invalid number {text!r}") from None
    if math.isnan(value) or math.isinf(value):
        raise LineProtocolError(f"invalid number {text!r}")
    return value


def _type_name(value: Any) -> str:
    return _type_name_of(type(value))


def _type_name_of(kind: type) -> str:
    return {float: "float", int: "integer", str: "string", bool: "boolean"}.get(kind, "unknown")


def _every_seconds(rules: list[dict[str, Any]]) -> int | None:
    """Seconds of the "expire" rule (0: forever); None when below 2.x's minimum of 1h."""
    for rule in rules:
        if rule.get("type", "expire") == "expire":
            every = int(rule.get("everySeconds") or 0)
            return every if every == 0 or every >= 3600 else None
    return 0


def _humantime_seconds(value: Any) -> int:
    """3.x's retention_period ("7d", "90d", "12h", "2w"; humantime units); 0 when absent (forever)."""
    if not value:
        return 0
    found = re.fullmatch(r"(\d+)\s*(s|m|h|d|w)", str(value))
    if not found:
        raise ValueError(f"invalid retention_period {value!r}")
    return int(found.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[found.group(2)]


# -- a small InfluxQL evaluator -----------------------------------------------------------------------------

_SELECT = re.compile(
    r"^SELECT\s+(?P<fields>.+?)\s+FROM\s+(?P<from>\S+)(?:\s+WHERE\s+(?P<where>.+?))?"
    r"(?:\s+ORDER\s+BY\s+time(?:\s+(?P<order>ASC|DESC))?)?(?:\s+LIMIT\s+(?P<limit>\d+))?$",
    re.IGNORECASE)


def _ident(text: str) -> str:
    text = text.strip()
    return text[1:-1].replace('\\"', '"') if text.startswith('"') and text.endswith('"') else text


def _json_number(value: Any) -> Any:
    """Go's JSON for floats: 100.0 -> 100."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return int(value)
    return value


def evaluate(statement: str, bucket: Bucket, params: dict[str, Any], epoch: str | None,
             cutoff_ns: int | None = None) -> list[dict[str, Any]]:
    """The series of a SELECT over a bucket's points (ValueError for what the evaluator does not know)."""
    upper = statement.upper()
    if upper.startswith("SHOW RETENTION POLICIES"):
        return [{"columns": ["name", "duration"], "values": [["autogen", bucket.every_seconds * 10**9 or None]]}]
    if upper.startswith("SHOW MEASUREMENTS"):
        names = sorted({p.measurement for p in bucket.points.values()})
        return [{"name": "measurements", "columns": ["name"], "values": [[n] for n in names]}] if names else []
    found = _SELECT.match(statement)
    if not found:
        raise ValueError(f"error parsing query: found {statement.split()[0] if statement else 'EOF'}, "
                         f"expected SELECT or SHOW at line 1, char 1")
    measurement = _ident(found.group("from").split(".")[-1])
    rows = [p for p in bucket.points.values()
            if p.measurement == measurement and (cutoff_ns is None or p.time >= cutoff_ns)]
    for cond in re.split(r"\s+AND\s+", found.group("where") or "", flags=re.IGNORECASE):
        if not cond.strip():
            continue
        m = re.fullmatch(r"\s*(\"[^\"]+\"|\w+)\s*=\s*('(?:[^'\\]|\\.)*'|\$\w+)\s*", cond)
        if not m:
            raise ValueError(f"error parsing query: unsupported condition {cond!r}")
        key, raw = _ident(m.group(1)), m.group(2)
        if raw.startswith("$"):
            if raw[1:] not in params:
                raise ValueError(f"missing parameter: {raw[1:]}")
            want = params[raw[1:]]
        else:
            want = re.sub(r"\\(.)", r"\1", raw[1:-1])
        rows = [p for p in rows if p.tags.get(key, p.fields.get(key)) == want]
    rows.sort(key=lambda p: p.time, reverse=(found.group("order") or "").upper() == "DESC")
    if found.group("limit"):
        rows = rows[:int(found.group("limit"))]
    scale = _PRECISION.get(epoch or "", 0)
    fields = [f.strip() for f in found.group("fields").split(",")]
    agg = re.fullmatch(r"(count|last)\((\"?[\w]+\"?)\)", fields[0], re.IGNORECASE) if len(fields) == 1 else None
    if agg:
        name = _ident(agg.group(2))
        have = [p for p in rows if name in p.fields]
        if not have:
            return []
        if agg.group(1).lower() == "count":
            return [{"name": measurement, "columns": ["time", "count"], "values": [[0, len(have)]]}]
        last = max(have, key=lambda p: p.time)
        return [{"name": measurement, "columns": ["time", "last"],
                 "values": [[last.time // scale if scale else last.time, _json_number(last.fields[name])]]}]
    if fields == ["*"]:
        names = sorted({k for p in rows for k in (*p.fields, *p.tags)})
    else:
        names = [_ident(f) for f in fields]
    if not rows:
        return []
    values = [[p.time // scale if scale else p.time] + [_json_number(p.fields.get(n, p.tags.get(n))) for n in names]
              for p in rows]
    return [{"name": measurement, "columns": ["time", *names], "values": values}]
