"""Gap repair: answers every hole in the stored data with the missing data, a proven-empty range, or an alert.

Modules: `outcome` (what became of one gap, and the alerts that say so), `venues` (ccxt REST objects under the
shared rate budget), `candles` (candle windows through the backfill's fetch, validation, InfluxDB and ledger),
`trades` (trade windows by id through Binance's historicalTrades), `scan` (holes in InfluxDB and the ledger
that no Gap event announced), `service` (the process: the mdp:gaps consumer and the periodic scan).
See docs/gap-repair.md.
"""
