"""Storage tiers: which tier holds the raw trades ("ticks") and each candle timeframe, and how long it keeps them.

`TierPlan` reads influx.tiers and influx.retention (defaults are the plan's: raw ticks 7 days, 1m candles 90 days,
1h candles 2 years, 1d candles forever). A tier is a retention policy of the database on 1.x, a bucket with a
retention rule on 2.x, a database with a retention period on 3.x (named by influx.bucket_template, default
`{database}_{tier}`: 3 Core refuses `/` in the names it creates); `TierTarget` says where a tier lives on a
server of a given generation. Durations: `parse_retention` and `retention_text` for the config's "7d" / "inf",
`go_duration_seconds` for 1.x's "168h0m0s", `timeframe_seconds` for ccxt timeframes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from common.config import ConfigError, InfluxSettings
from common.domain.timeframe import NS, Timeframe
from common.stores.influx.line import NS_PER_S

TICKS = "ticks"  # what a tier lists in influx.tiers to hold the raw trades (measurement `trades`)

_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "M": 30 * 86400, "y": 365 * 86400}
_RETENTION = re.compile(r"^(\d+)([hdw])$")

_GO_DURATION_PART = re.compile(r"(\d+)(h|m|s)")
# Names valid as a 1.x retention policy, a 2.x bucket and a 3.x database alike.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


def parse_retention(text: str) -> int | None:
    """Seconds of a retention like "7d", "90d", "730d", "12h", "2w"; None for "inf" (forever).
    ValueError for anything else, or for less than an hour (no generation keeps less)."""
    value = text.strip()
    if value.lower() in ("inf", "infinite", "forever"):
        return None
    found = _RETENTION.match(value)
    if not found:
        raise ValueError(f"retention {text!r} is not a duration like \"7d\", \"90d\", \"12h\", \"2w\" or \"inf\"")
    seconds = int(found.group(1)) * _UNIT_SECONDS[found.group(2)]
    if seconds < 3600:
        raise ValueError(f"retention {text!r} is shorter than 1h, the least InfluxDB keeps")
    return seconds


def retention_text(seconds: int | None) -> str:
    """The shortest of "inf", "Nd", "Nh", "Ns" for a retention in seconds (also valid InfluxQL)."""
    if not seconds:
        return "inf"
    for unit in ("d", "h"):
        if seconds % _UNIT_SECONDS[unit] == 0:
            return f"{seconds // _UNIT_SECONDS[unit]}{unit}"
    return f"{seconds}s"


def go_duration_seconds(text: str) -> int | None:
    """Seconds of a Go duration as 1.x's SHOW RETENTION POLICIES prints it ("168h0m0s"); None for "0s"."""
    total = 0
    for amount, unit in _GO_DURATION_PART.findall(text):
        total += int(amount) * _UNIT_SECONDS[unit]
    return total or None


def timeframe_seconds(timeframe: str) -> int:
    """Seconds of a timeframe as ccxt counts it ("1m", "4h", "1d", "1w", "1M" = 30 days): common.domain's
    Timeframe; TimeframeError (a ValueError naming the value and the accepted forms) otherwise."""
    return Timeframe.parse(timeframe).nominal_ns // NS


@dataclass(frozen=True, slots=True)
class Tier:
    """One storage tier: what it holds ("ticks" and/or candle timeframes) and how long it keeps it."""

    name: str
    retention_s: int | None  # None: forever
    holds: tuple[str, ...]

    @property
    def retention(self) -> str:
        return retention_text(self.retention_s)

    def cutoff_ns(self, now_ns: int) -> int | None:
        """Points older than this are beyond the tier's retention (None: it keeps everything)."""
        return None if self.retention_s is None else now_ns - self.retention_s * NS_PER_S


@dataclass(frozen=True, slots=True)
class TierTarget:
    """Where a tier lives on a server of a given generation.

    `database` and `rp` are what InfluxQL `/query` takes (1.x: the database and the tier's retention policy;
    2.x: the same pair, resolved by the DBRP mapping `ensure_tiers` creates; 3.x: the tier's own database and
    no retention policy). `bucket` is where 2.x / 3.x writes go (the tier's bucket or database; "" on 1.x)."""

    tier: Tier
    database: str
    rp: str
    bucket: str


class TierPlan:
    """The tiers of influx.tiers / influx.retention, checked, and the tier of every timeframe.

    A timeframe listed in a tier lives there. One not listed goes to the tier of the longest listed timeframe
    not longer than it (2h -> the tier of 1h), or, if it is shorter than all of them, to the tier of the
    shortest one. ConfigError names the key, the value and the fix."""

    def __init__(self, settings: InfluxSettings) -> None:
        self.database = settings.database
        self.bucket_template = settings.bucket_template
        tiers, retention = settings.tiers, settings.retention
        if not tiers:
            raise ConfigError("influx.tiers is empty; list at least one tier holding \"ticks\" and one holding "
                              "candle timeframes (see docs/storage.md), or remove the key for the defaults")
        if set(tiers) != set(retention):
            raise ConfigError(f"influx.retention has tiers {sorted(retention)} but influx.tiers has {sorted(tiers)}; "
                              f"give every tier of influx.tiers exactly one retention (\"7d\", \"inf\", ...)")
        built: list[Tier] = []
        owner: dict[str, str] = {}
        for name, holds in tiers.items():
            if not _NAME.match(name):
                raise ConfigError(f"influx.tiers key {name!r} is not a valid tier name; use letters, digits, "
                                  f"'_' and '-', starting with a letter or digit, at most 64 characters")
            try:
                seconds = parse_retention(retention[name])
            except ValueError as exc:
                raise ConfigError(f"influx.retention.{name} = {retention[name]!r}: {exc}") from None
            for item in holds:
                if item != TICKS:
                    try:
                        timeframe_seconds(item)
                    except ValueError as exc:
                        raise ConfigError(f"influx.tiers.{name} = {holds!r}: {exc}, or \"{TICKS}\"") from None
                if item in owner:
                    raise ConfigError(f"influx.tiers: {item!r} is listed in both {owner[item]!r} and {name!r}; "
                                      f"list it in one tier only")
                owner[item] = name
            built.append(Tier(name, seconds, tuple(holds)))
            bucket = self.bucket_name(name)
            if not _NAME.match(bucket):
                raise ConfigError(f"influx.bucket_template = {settings.bucket_template!r} gives {bucket!r} for tier "
                                  f"{name!r}, which InfluxDB 2.x/3.x would refuse; use letters, digits, '_', '-' "
                                  f"(no '/': InfluxDB 3 does not create such databases), at most 64 characters")
        self.tiers: tuple[Tier, ...] = tuple(built)
        by_name = {t.name: t for t in built}
        if TICKS not in owner:
            raise ConfigError(f"influx.tiers: no tier holds \"{TICKS}\" (the raw trades); add it to one tier")
        self.ticks = by_name[owner[TICKS]]
        self._exact: dict[str, Tier] = {tf: by_name[name] for tf, name in owner.items()}
        ladder = sorted((timeframe_seconds(tf), by_name[name]) for tf, name in owner.items() if tf != TICKS)
        if not ladder:
            raise ConfigError("influx.tiers: no tier holds a candle timeframe; list \"1m\" (and others) in a tier")
        self._ladder: list[tuple[int, Tier]] = ladder

    def bucket_name(self, tier: str) -> str:
        """The 2.x bucket / 3.x database of a tier (influx.bucket_template)."""
        try:
            return self.bucket_template.format(database=self.database, tier=tier)
        except (KeyError, IndexError, ValueError) as exc:
            raise ConfigError(f"influx.bucket_template = {self.bucket_template!r} cannot be filled ({exc}); use "
                              f"only the fields {{database}} and {{tier}}") from None

    def tier(self, name: str) -> Tier:
        for t in self.tiers:
            if t.name == name:
                return t
        raise KeyError(f"no storage tier named {name!r}; tiers: {', '.join(t.name for t in self.tiers)}")

    def for_timeframe(self, timeframe: str) -> Tier:
        """The tier of "ticks" or of a candle timeframe; ValueError for a timeframe that is not one."""
        found = self._exact.get(timeframe)
        if found is not None:
            return found
        seconds = timeframe_seconds(timeframe)
        chosen = self._ladder[0][1]
        for tf_seconds, tier in self._ladder:
            if tf_seconds <= seconds:
                chosen = tier
        self._exact[timeframe] = chosen
        return chosen
