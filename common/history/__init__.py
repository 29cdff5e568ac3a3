"""History: what is stored, read back (the API strategies use) and how it got there.

For strategies (README "History"): `history()` / `history_sync()` return stored closed candles as a pandas
DataFrame, `candles()` yields stored candles and then continues live from `md:candle:*` (module `api`).

For operators (`mdp backfill`, `mdp import`, `mdp coverage`, `mdp export`; docs/backfill.md, docs/export.md), and
for gap_repair, which fetches through the same engine:
`plan` (what to fetch, exchange history caps), `ledger` (the PostgreSQL coverage ledger), `ingest` (admit,
write to InfluxDB, then record), `rest` (paginated ccxt fetch_ohlcv under the shared rate budget), `archive`
(data.binance.vision zips), `verify` (the ledger's covered ranges checked against what InfluxDB holds),
`report` (coverage tables), `progress` (the progress line), `backfill` (the runs that tie them together),
`export` (Parquet/CSV files from InfluxDB).
"""

from common.history.api import CandleFeed, FeedGapError, HistoryRangeError, candles, history, history_sync

__all__ = ["CandleFeed", "FeedGapError", "HistoryRangeError", "candles", "history", "history_sync"]
