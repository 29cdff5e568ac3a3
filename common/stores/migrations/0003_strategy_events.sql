-- 0003: what the strategy-events stream (strategy:{strategy}) needs on top of 0002, written by
-- services/postgres_writer: the ordering keys that let every upsert move only forward, a position history,
-- checks PostgreSQL's numeric would otherwise let through, and a PnL view.
-- Never edit this file after it has been applied anywhere; add a new numbered file instead.

-- strategies: the ts_event (ns) of the registration stored in the row; 0 means "auto-registered by the writer
-- because a fill, position or metric named it before the strategy registered itself". A registration only
-- replaces a row registered earlier, so a late redelivery of an old one cannot bring old params back.
ALTER TABLE strategies ADD COLUMN registered_ns bigint NOT NULL DEFAULT 0 CHECK (registered_ns >= 0);
COMMENT ON COLUMN strategies.registered_ns IS
    'ts_event (ns) of the registration stored; 0: auto-registered, the strategy never registered itself';

-- numeric accepts NaN and +-Infinity, and NaN > 0 is true in PostgreSQL: the checks of 0002 alone let them in.
-- NOT VALID then VALIDATE: existing rows are checked without holding the table's exclusive lock for the scan.
ALTER TABLE trades ADD CONSTRAINT trades_numbers_finite
    CHECK (price NOT IN ('NaN', 'Infinity') AND amount NOT IN ('NaN', 'Infinity')
           AND fee NOT IN ('NaN', 'Infinity', '-Infinity')) NOT VALID;
ALTER TABLE trades VALIDATE CONSTRAINT trades_numbers_finite;
ALTER TABLE trades ADD CONSTRAINT trades_fee_currency_named CHECK (fee_currency <> '') NOT VALID;
ALTER TABLE trades VALIDATE CONSTRAINT trades_fee_currency_named;

-- positions: the time the stored position is as of. as_of_ns is the exact ordering key (the event's ts_event
-- in ns; PostgreSQL timestamps keep only microseconds), as_of the same instant for people and queries.
-- Rows written before this migration have as_of_ns 0: any update replaces them.
ALTER TABLE positions ADD COLUMN as_of timestamptz;
ALTER TABLE positions ADD COLUMN as_of_ns bigint NOT NULL DEFAULT 0 CHECK (as_of_ns >= 0);
ALTER TABLE positions ADD CONSTRAINT positions_numbers_finite
    CHECK (quantity NOT IN ('NaN', 'Infinity', '-Infinity') AND avg_price NOT IN ('NaN', 'Infinity')
           AND realized_pnl NOT IN ('NaN', 'Infinity', '-Infinity')) NOT VALID;
ALTER TABLE positions VALIDATE CONSTRAINT positions_numbers_finite;
CREATE INDEX positions_strategy_as_of_idx ON positions (strategy_id, as_of DESC);

-- Every position update a strategy published, in order: positions holds only the latest per market, this
-- holds how it got there (equity curves, audits). Idempotent by (strategy, market, as_of_ns). It grows by one
-- row per update: prune it with DELETE ... WHERE as_of < now() - interval '...' if you do not need it all.
CREATE TABLE position_history (
    strategy_id  bigint      NOT NULL REFERENCES strategies (id) ON DELETE CASCADE,
    exchange     text        NOT NULL CHECK (exchange <> ''),
    symbol       text        NOT NULL CHECK (symbol <> ''),
    as_of_ns     bigint      NOT NULL CHECK (as_of_ns > 0),
    as_of        timestamptz NOT NULL,
    quantity     numeric     NOT NULL CHECK (quantity NOT IN ('NaN', 'Infinity', '-Infinity')),
    avg_price    numeric     CHECK (avg_price > 0 AND avg_price NOT IN ('NaN', 'Infinity')),
    realized_pnl numeric     NOT NULL DEFAULT 0 CHECK (realized_pnl NOT IN ('NaN', 'Infinity', '-Infinity')),
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (strategy_id, exchange, symbol, as_of_ns),
    CHECK (quantity = 0 OR avg_price IS NOT NULL)
);
COMMENT ON TABLE position_history IS
    'Every position update of a strategy (positions keeps the latest), idempotent by (strategy, market, as_of_ns)';
CREATE INDEX position_history_strategy_as_of_idx ON position_history (strategy_id, as_of DESC);

-- performance_metrics: a metric of a running period is recomputed; revision_ns (the publisher's ts_recv, ns)
-- orders the revisions so a late redelivery of an older value cannot replace a newer one.
ALTER TABLE performance_metrics ADD COLUMN revision_ns bigint NOT NULL DEFAULT 0 CHECK (revision_ns >= 0);
ALTER TABLE performance_metrics ADD CONSTRAINT performance_metrics_value_finite
    CHECK (value NOT IN ('NaN', 'Infinity', '-Infinity')) NOT VALID;
ALTER TABLE performance_metrics VALIDATE CONSTRAINT performance_metrics_value_finite;
-- "The latest value of every metric of a strategy" without scanning other strategies.
CREATE INDEX performance_metrics_strategy_ts_idx ON performance_metrics (strategy_id, ts DESC);

-- Per strategy and market, from its fills: volume, net quantity and cash flow in the quote currency, fees
-- paid in the quote currency (fees in other currencies, e.g. BNB, are counted, not converted), joined with
-- the position the strategy reports. Total PnL at a mark price P, in the quote currency:
--     cash_flow - fees_in_quote + net_quantity * P
-- (spot and linear contracts; contract_size of the market multiplies it for inverse ones).
CREATE VIEW strategy_pnl AS
WITH f AS (
    SELECT strategy_id, exchange, symbol,
           count(*)                                                          AS fills,
           sum(amount) FILTER (WHERE side = 'buy')                           AS bought,
           sum(amount) FILTER (WHERE side = 'sell')                          AS sold,
           sum(CASE side WHEN 'buy' THEN amount ELSE -amount END)            AS net_quantity,
           sum(CASE side WHEN 'sell' THEN cost ELSE -cost END)               AS cash_flow,
           coalesce(sum(fee) FILTER (
               WHERE fee_currency = split_part(split_part(symbol, ':', 1), '/', 2)), 0) AS fees_in_quote,
           count(*) FILTER (WHERE fee <> 0 AND fee_currency IS DISTINCT FROM
                                  split_part(split_part(symbol, ':', 1), '/', 2))          AS fills_with_other_fees,
           min(ts)                                                           AS first_fill,
           max(ts)                                                           AS last_fill
    FROM trades
    GROUP BY strategy_id, exchange, symbol
)
SELECT s.id AS strategy_id, s.name AS strategy, k.exchange, k.symbol,
       coalesce(f.fills, 0) AS fills, coalesce(f.bought, 0) AS bought, coalesce(f.sold, 0) AS sold,
       coalesce(f.net_quantity, 0) AS net_quantity, coalesce(f.cash_flow, 0) AS cash_flow,
       coalesce(f.fees_in_quote, 0) AS fees_in_quote, coalesce(f.fills_with_other_fees, 0) AS fills_with_other_fees,
       f.first_fill, f.last_fill,
       p.quantity AS position_quantity, p.avg_price AS position_avg_price, p.realized_pnl AS position_realized_pnl,
       p.as_of AS position_as_of
FROM (SELECT strategy_id, exchange, symbol FROM f
      UNION SELECT strategy_id, exchange, symbol FROM positions) AS k
JOIN strategies s ON s.id = k.strategy_id
LEFT JOIN f ON (f.strategy_id, f.exchange, f.symbol) = (k.strategy_id, k.exchange, k.symbol)
LEFT JOIN positions p ON (p.strategy_id, p.exchange, p.symbol) = (k.strategy_id, k.exchange, k.symbol);
COMMENT ON VIEW strategy_pnl IS
    'Per strategy and market: fills, volume, net quantity, cash flow and fees in quote, and the reported position';
