"""InfluxDB 1.x: a tier is a retention policy of influx.database, writes go to `POST /write?db=..&rp=..` (line
protocol, basic auth with influx.username / influx.password), queries bind values as JSON `params`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from common.config import ConfigError
from common.stores.influx.errors import error_text
from common.stores.influx.generation import Generation
from common.stores.influx.influxql import quote_ident
from common.stores.influx.tiers import Tier, TierTarget, go_duration_seconds, retention_text


def _influxql_duration(tier: Tier) -> str:
    return "INF" if tier.retention_s is None else tier.retention


class Influx1(Generation):
    number: ClassVar[int] = 1
    credentials_hint: ClassVar[str] = \
        "fix influx.username / influx.password (MDP_INFLUX_USERNAME, MDP_INFLUX_PASSWORD)"

    def check_credentials(self) -> None:
        s = self.client.settings
        if s.token and not s.username:
            raise ConfigError(f"influx.token is set but {self.client._where()} has no API tokens; set "
                              f"influx.username and influx.password instead (MDP_INFLUX_USERNAME, "
                              f"MDP_INFLUX_PASSWORD)")

    def tier_target(self, tier: Tier) -> TierTarget:
        return TierTarget(tier, self.client.database, tier.name, "")

    async def ensure_tiers(self) -> list[str]:
        client = self.client
        db = quote_ident(client.database)
        await client.execute(f"CREATE DATABASE {db}")
        done = [f"database {client.database!r}: present (CREATE DATABASE is idempotent)"]
        existing = {str(r["name"]): go_duration_seconds(str(r["duration"]))
                    for r in await client.query(f"SHOW RETENTION POLICIES ON {db}", database=client.database)}
        for tier in client.plan.tiers:
            rp = quote_ident(tier.name)
            holds = ", ".join(tier.holds)
            if tier.name not in existing:
                await client.execute(f"CREATE RETENTION POLICY {rp} ON {db} DURATION {_influxql_duration(tier)} "
                                     f"REPLICATION 1")
                done.append(f"retention policy {tier.name!r} ({holds}): created, {tier.retention}")
            elif existing[tier.name] != tier.retention_s:
                await client.execute(f"ALTER RETENTION POLICY {rp} ON {db} DURATION {_influxql_duration(tier)}")
                done.append(f"retention policy {tier.name!r} ({holds}): retention changed from "
                            f"{retention_text(existing[tier.name])} to {tier.retention}")
            else:
                done.append(f"retention policy {tier.name!r} ({holds}): unchanged, {tier.retention}")
        return done

    async def write(self, database: str, rp: str, chunk: Sequence[str]) -> None:
        client = self.client
        params = {"db": database, "precision": "ns"}
        if rp:
            params["rp"] = rp
        status, body, _ = await client._request("POST", "/write", params, "\n".join(chunk).encode())
        if status >= 300:
            where = f"database {database!r}" + (f", retention policy {rp!r}" if rp else "")
            error = client._refused(len(chunk), where, status, error_text(body))
            if error is not None:
                raise error
            return
        client.points_written += len(chunk)
