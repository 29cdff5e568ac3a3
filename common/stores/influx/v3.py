"""InfluxDB 3.x: a tier is a database of its own with a retention period (named by influx.bucket_template); writes
go through influxdb-client like 2.x's; `/query` binds no parameters, so `$name` values are inlined as quoted
InfluxQL literals; auth with influx.token only."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from common.config import ConfigError
from common.stores.influx.errors import InfluxError, error_text
from common.stores.influx.influxql import inline_params
from common.stores.influx.tiers import Tier, TierTarget
from common.stores.influx.v2 import ApiWrites


class Influx3(ApiWrites):
    number: ClassVar[int] = 3
    writes_to: ClassVar[str] = "database"
    passwords: ClassVar[bool] = False

    def check_credentials(self) -> None:
        s = self.client.settings
        if s.username and not s.token:
            raise ConfigError(f"{self.client._where()} authenticates with tokens, not users; set influx.token "
                              f"(MDP_INFLUX_TOKEN) and clear influx.username")

    def tier_target(self, tier: Tier) -> TierTarget:
        bucket = self.client.plan.bucket_name(tier.name)
        return TierTarget(tier, bucket, "", bucket)

    def bind(self, query: dict[str, str], influxql: str, params: Mapping[str, Any] | None, rp: str) -> str:
        """A retention policy addresses the database "{db}/{rp}"; values are inlined as literals."""
        if rp:
            query["db"] = f"{query['db']}/{rp}"
        return inline_params(influxql, params) if params else influxql

    async def ensure_tiers(self) -> list[str]:
        client = self.client
        _, found = await client._api("GET", "/api/v3/configure/database", {"format": "json"})
        existing = {str(row.get("iox::database")) for row in found or [] if isinstance(row, dict)}
        done: list[str] = []
        for tier in client.plan.tiers:
            target = self.tier_target(tier)
            holds = ", ".join(tier.holds)
            body: dict[str, object] = {"db": target.bucket}
            if tier.retention_s is not None:
                body["retention_period"] = tier.retention
            if target.bucket not in existing:
                status, _ = await client._api("POST", "/api/v3/configure/database", json_body=body, ok=(200, 201, 409))
                if status != 409:  # 409: created meanwhile by someone else; set its retention below
                    done.append(f"database {target.bucket!r} ({holds}): created, {tier.retention}")
                    continue
            # 3.x lists no retention periods: set it, which is idempotent, where the server allows it.
            status, body_text, _ = await client._request("PUT", "/api/v3/configure/database", json_body=body)
            if status < 300:
                done.append(f"database {target.bucket!r} ({holds}): present, retention set to {tier.retention}")
            elif status in (404, 405):
                done.append(f"database {target.bucket!r} ({holds}): present; this server cannot change a "
                            f"database's retention (HTTP {status}), so it keeps the one it was created with: if "
                            f"that is not {tier.retention}, recreate the database")
            else:
                text = error_text(body_text)
                raise InfluxError(f"{client._where()} refused to set the retention of database {target.bucket!r} to "
                                  f"{tier.retention}: HTTP {status} {text}", status, text)
        return done
