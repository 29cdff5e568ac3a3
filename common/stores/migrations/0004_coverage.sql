-- 0004: the coverage ledger of historical data, written by services/backfill (mdp backfill, mdp import) and
-- read by `mdp coverage`. Never edit this file after it has been applied anywhere; add a new one instead.
--
-- One row is one time range of one series (exchange, symbol, timeframe) in one state from one source:
--   state 'covered': every candle opening in the range was fetched, validated and durably written to
--                    InfluxDB before the row was written (the backfill writes the row after InfluxDB's 204);
--   state 'empty':   the source answered for the range and had no candle in it (exchange outage, trading
--                    halt, a minute without trades), with the evidence: which request or file, what was
--                    on either side.
-- A time that is in no row is a hole: never fetched, fetched but rejected by validation (an alert says so),
-- or not fetchable (an exchange that keeps only recent history).
-- Ranges are half-open [start, end) on candle open times. Rows of one (series, state, source) never overlap
-- or touch: writers merge them under a per-series advisory lock (services/backfill/ledger.py), and a range
-- recorded as covered is cut out of the 'empty' rows of every source.
CREATE TABLE coverage (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    exchange    text        NOT NULL CHECK (exchange <> ''),
    symbol      text        NOT NULL CHECK (symbol <> ''),       -- ccxt unified, e.g. BTC/USDT
    timeframe   text        NOT NULL CHECK (timeframe <> ''),    -- ccxt timeframe, e.g. 1m
    state       text        NOT NULL CHECK (state IN ('covered', 'empty')),
    source      text        NOT NULL CHECK (source IN ('rest', 'archive', 'live')),
    span        tstzrange   NOT NULL CHECK (NOT isempty(span) AND lower_inc(span) AND NOT upper_inc(span)
                                            AND NOT lower_inf(span) AND NOT upper_inf(span)),
    -- For 'empty': a JSON array of evidence objects (at most a few; "more" counts the rest). '[]' for covered.
    evidence    jsonb       NOT NULL DEFAULT '[]' CHECK (jsonb_typeof(evidence) = 'array'),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE coverage IS 'Coverage ledger: fetched-and-verified and known-empty ranges per series and source';
CREATE INDEX coverage_series_idx ON coverage (exchange, symbol, timeframe, state, source, lower(span));
CREATE INDEX coverage_span_idx ON coverage USING gist (span);
