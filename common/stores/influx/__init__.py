"""InfluxDB for the pipeline: the line-protocol encoding of our schema, the storage tiers, InfluxQL, and one async
client that serves InfluxDB 1.x, 2.x and 3.x (docs/storage.md).

Modules, from the bottom:
- `errors`: InfluxError (a refused request), InfluxWriteError, InfluxQueryError, and the server's error text.
- `line`: line protocol: escaping, series keys, the trade timestamp rule, encode_trades / _candles / _snapshots.
- `tiers`: TierPlan (influx.tiers, influx.retention), Tier, TierTarget, retention and timeframe durations.
- `influxql`: quoting, parameter binding and the rows of a `/query` answer.
- `generation`: what differs between generations, as the `Generation` interface, and `generation_of(version)`.
- `v1`, `v2`, `v3`: one `Generation` each (retention policies / buckets + DBRP / databases; how they write).
- `client`: InfluxClient: HTTP, auth, errors, counters, connecting, writing in chunks, querying.

Errors:
- `StoreUnavailable` (from common.errors): connection refused or reset, timeout, HTTP 5xx (and 429). The message
  names the server, its generation and what to do; the bus retries the same batch in place, nothing is lost.
- `InfluxWriteError`: a write the server refused with a 4xx (unparsable line, field type conflict, missing
  database / retention policy / bucket, authentication). It carries the HTTP status and the server's error
  text ({"error"} on 1.x and 3.x, {"code","message"} on 2.x). Points older than their retention policy that
  1.x drops ("partial write: points beyond retention policy dropped=N") are not an error: they are counted in
  `expired_dropped` (their tier does not keep them).
- `InfluxQueryError`: a query the server refused (4xx, or an `error` in a statement's result).
"""

from common.errors import StoreUnavailable
from common.stores.influx.client import InfluxClient
from common.stores.influx.errors import InfluxError, InfluxQueryError, InfluxWriteError
from common.stores.influx.generation import generation_of
from common.stores.influx.influxql import influxql_literal, inline_params, quote_ident
from common.stores.influx.line import (
    FUNDING,
    NS_PER_MS,
    NS_PER_S,
    OHLCV,
    OPEN_INTEREST,
    TRADES,
    CandleFields,
    TradeFields,
    candle_line,
    encode_candles,
    encode_snapshots,
    encode_trades,
    escape_measurement,
    escape_string_field,
    escape_tag,
    series_key,
    trade_id_offset,
    trade_line,
    trade_timestamp,
)
from common.stores.influx.tiers import (
    TICKS,
    Tier,
    TierPlan,
    TierTarget,
    go_duration_seconds,
    parse_retention,
    retention_text,
    timeframe_seconds,
)

__all__ = [
    "FUNDING", "NS_PER_MS", "NS_PER_S", "OHLCV", "OPEN_INTEREST", "TICKS", "TRADES",
    "CandleFields", "InfluxClient", "InfluxError", "InfluxQueryError", "InfluxWriteError", "StoreUnavailable",
    "Tier", "TierPlan", "TierTarget", "TradeFields",
    "candle_line", "encode_candles", "encode_snapshots", "encode_trades", "escape_measurement",
    "escape_string_field", "escape_tag", "generation_of", "go_duration_seconds", "influxql_literal",
    "inline_params", "parse_retention", "quote_ident", "retention_text", "series_key", "timeframe_seconds",
    "trade_id_offset", "trade_line", "trade_timestamp",
]
