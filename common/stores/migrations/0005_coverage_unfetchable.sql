-- 0005: a third state of the coverage ledger (services/backfill/ledger.py), written by `mdp backfill`:
--   state 'unfetchable': the exchange no longer serves the range (Hyperliquid keeps only its latest 5,000
--                        candles per timeframe), with the evidence: the cap and the oldest candle it still had.
--                        Not 'empty' (the market traded then) and not a hole (fetching it again cannot help);
--                        the live collector records forward so the range does not grow.
-- A range recorded as covered is cut out of 'unfetchable' rows as it is out of 'empty' ones.
ALTER TABLE coverage DROP CONSTRAINT coverage_state_check;
ALTER TABLE coverage ADD CONSTRAINT coverage_state_check CHECK (state IN ('covered', 'empty', 'unfetchable'));
