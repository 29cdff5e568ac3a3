"""InfluxDB 2.x: a tier is a bucket with a retention rule, found by InfluxQL `/query` through its DBRP mapping
(influx.database + tier -> bucket); writes go through influxdb-client's async write API
(`POST /api/v2/write?org=..&bucket=..&precision=ns`, also 3.x's way); auth with influx.token or a session that
`/api/v2/signin` opens for influx.username / influx.password."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import aiohttp
from influxdb_client.client.influxdb_client_async import InfluxDBClientAsync
from influxdb_client.client.write_api_async import WriteApiAsync
from influxdb_client.domain.write_precision import WritePrecision
from influxdb_client.rest import ApiException

from common.config import ConfigError
from common.stores.influx.errors import InfluxError, error_text
from common.stores.influx.generation import Generation
from common.stores.influx.tiers import Tier, TierTarget, retention_text

if TYPE_CHECKING:
    from common.stores.influx.client import InfluxClient


class ApiWrites(Generation):
    """The generations that write through influxdb-client's async write API (2.x, 3.x; aiohttp underneath, so it
    runs on our event loop), made at the first write. `writes_to` names a write's target in errors ("bucket",
    "database"); with `passwords`, influx.username / influx.password sign the writes in when there is no token."""

    writes_to: ClassVar[str]
    passwords: ClassVar[bool]

    def __init__(self, client: InfluxClient) -> None:
        super().__init__(client)
        self._api: InfluxDBClientAsync | None = None
        self._write_api: WriteApiAsync | None = None

    def _writer(self) -> WriteApiAsync:
        if self._write_api is None:
            s = self.client.settings
            kwargs: dict[str, Any] = {"verify_ssl": s.verify_tls, "ssl_ca_cert": s.ca_cert or None,
                                      "connection_pool_maxsize": max(4, s.write_concurrency)}
            if s.token:
                kwargs["token"] = s.token
            elif s.username and self.passwords:
                kwargs["username"], kwargs["password"] = s.username, s.password
            self._api = InfluxDBClientAsync(url=self.client.url, org=s.org, timeout=int(s.timeout_s * 1000),
                                            **kwargs)
            self._write_api = self._api.write_api()
        return self._write_api

    async def write(self, database: str, rp: str, chunk: Sequence[str]) -> None:
        client = self.client
        what = "POST /api/v2/write"
        with client._reaching(what, (aiohttp.ClientError, OSError)):
            try:
                # 3.x ignores org, but influxdb-client requires one: "" when none is configured. Its write() types
                # write_precision as a WritePrecision instance while the values it documents are its str constants.
                await self._writer().write(bucket=database, org=client.settings.org,
                                           record="\n".join(chunk).encode(),
                                           write_precision=WritePrecision.NS)  # type: ignore[arg-type]
            except ApiException as exc:
                status = int(exc.status or 0)
                raw = exc.body if isinstance(exc.body, bytes) else str(exc.body or exc.reason or "").encode()
                text = error_text(raw)
                if status >= 500 or status == 429 or status == 0:
                    raise client._unavailable(what, f"HTTP {status} {text}") from exc
                error = client._refused(len(chunk), f"{self.writes_to} {database!r}", status, text)
                if error is not None:
                    raise error from exc
                return
        client.points_written += len(chunk)

    async def close(self) -> None:
        if self._api is not None:
            await self._api.close()
            self._api = None
            self._write_api = None


def _bucket_retention(bucket: Mapping[str, Any]) -> int | None:
    """Seconds a 2.x bucket keeps data (its "expire" rule); None when it keeps everything."""
    for rule in bucket.get("retentionRules") or ():
        if rule.get("type", "expire") == "expire" and int(rule.get("everySeconds") or 0) > 0:
            return int(rule["everySeconds"])
    return None


class Influx2(ApiWrites):
    number: ClassVar[int] = 2
    writes_to: ClassVar[str] = "bucket"
    passwords: ClassVar[bool] = True

    def check_credentials(self) -> None:
        if not self.client.settings.org:
            raise ConfigError(f"influx.org is empty but {self.client._where()} needs the organization that owns "
                              f"the buckets; set influx.org (MDP_INFLUX_ORG)")

    async def session_cookie(self) -> str:
        """With influx.username and no token: POST /api/v2/signin with basic auth, and the cookie it sets."""
        client, s = self.client, self.client.settings
        if s.token or not s.username:
            return ""
        basic = {"Authorization": aiohttp.encode_basic_auth(s.username, s.password)}
        status, body, headers = await client._request("POST", "/api/v2/signin", headers=basic)
        if status >= 300:
            text = error_text(body)
            raise InfluxError(f"{client._where()} refused to sign in user {s.username!r}: HTTP {status} "
                              f"{text}; fix influx.username / influx.password or use influx.token", status, text)
        cookie = str(headers.get("Set-Cookie") or "").split(";", 1)[0]
        if not cookie:
            raise InfluxError(f"{client._where()} signed in user {s.username!r} but set no session "
                              f"cookie; use influx.token instead", status, "")
        return cookie

    def tier_target(self, tier: Tier) -> TierTarget:
        return TierTarget(tier, self.client.database, tier.name, self.client.plan.bucket_name(tier.name))

    async def ensure_tiers(self) -> list[str]:
        client = self.client
        org = client.settings.org
        _, found = await client._api("GET", "/api/v2/orgs", {"org": org}, ok=(200, 404))
        orgs = (found or {}).get("orgs") or []
        if not orgs:
            raise InfluxError(f"{client._where()} has no organization {org!r}; fix influx.org (MDP_INFLUX_ORG) or "
                              f"create it (influx org create -n {org})", 404, "organization not found")
        org_id = str(orgs[0]["id"])
        done = [f"organization {org!r}: id {org_id}"]
        for tier in client.plan.tiers:
            target = self.tier_target(tier)
            holds = ", ".join(tier.holds)
            rules = [{"type": "expire", "everySeconds": tier.retention_s or 0}]
            status, found = await client._api("GET", "/api/v2/buckets", {"orgID": org_id, "name": target.bucket},
                                              ok=(200, 404))
            buckets = (found or {}).get("buckets") or [] if status == 200 else []
            if not buckets:
                _, bucket = await client._api("POST", "/api/v2/buckets", json_body={
                    "orgID": org_id, "name": target.bucket, "retentionRules": rules,
                    "description": f"mdp storage tier {tier.name}: {holds}"})
                done.append(f"bucket {target.bucket!r} ({holds}): created, {tier.retention}")
            else:
                bucket = buckets[0]
                have = _bucket_retention(bucket)
                if have != tier.retention_s:
                    await client._api("PATCH", f"/api/v2/buckets/{bucket['id']}", json_body={"retentionRules": rules})
                    done.append(f"bucket {target.bucket!r} ({holds}): retention changed from "
                                f"{retention_text(have)} to {tier.retention}")
                else:
                    done.append(f"bucket {target.bucket!r} ({holds}): unchanged, {tier.retention}")
            done.append(await self._ensure_dbrp(org_id, str(bucket["id"]), target))
        return done

    async def _ensure_dbrp(self, org_id: str, bucket_id: str, target: TierTarget) -> str:
        """The DBRP mapping (database, tier) -> bucket that InfluxQL /query resolves."""
        client = self.client
        _, found = await client._api("GET", "/api/v2/dbrps", {"orgID": org_id, "db": target.database,
                                                              "rp": target.rp})
        mappings = [m for m in (found or {}).get("content") or [] if not m.get("virtual")]
        name = f"DBRP mapping {target.database}/{target.rp} -> {target.bucket!r}"
        if not mappings:
            await client._api("POST", "/api/v2/dbrps", json_body={
                "orgID": org_id, "bucketID": bucket_id, "database": target.database,
                "retention_policy": target.rp, "default": False})
            return f"{name}: created"
        if str(mappings[0].get("bucketID")) != bucket_id:
            raise InfluxError(f"{client._where()}: the DBRP mapping {target.database}/{target.rp} points at bucket "
                              f"id {mappings[0].get('bucketID')}, not at {target.bucket!r} ({bucket_id}); delete it "
                              f"(influx v1 dbrp delete --id {mappings[0].get('id')}) and run `mdp init` again",
                              409, "dbrp conflict")
        return f"{name}: unchanged"
