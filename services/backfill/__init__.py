"""History backfill (`mdp backfill`), Binance archive import (`mdp import`) and the coverage ledger
(`mdp coverage`). See docs/backfill.md.

Modules: `span` (time ranges, dates and durations), `plan` (what to fetch, exchange history caps),
`ledger` (the PostgreSQL coverage ledger), `ingest` (validate, write to InfluxDB, then record),
`rest` (paginated ccxt fetch_ohlcv under the shared rate budget), `archive` (data.binance.vision zips),
`verify` (the ledger's covered ranges checked against what InfluxDB holds),
`progress` (the progress line), `service` (the runs that tie them together).
"""
