"""Gap repair: answers every hole in the stored data with the missing data, a proven-empty range, or an alert.

Modules: `outcome` (what became of one gap, and the alerts that say so), `venues` (ccxt REST objects under the
shared rate budget), `candles` (candle windows through the backfill's fetch), `trades` (trade windows by id
through Binance's historicalTrades), both published into raw:{exchange} to flow like live data, `published`
(what acknowledged repairs published, so a loss announced twice is published once), `scan` (holes in
InfluxDB that no Gap event announced), `service` (the process: the mdp:gaps consumer and the periodic scan).
See docs/gap-repair.md.
"""
