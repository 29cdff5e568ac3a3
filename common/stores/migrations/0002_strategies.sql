-- 0002: strategies and what they do: their fills (trades), positions and performance metrics.
-- Written by strategies, not by the pipeline. Prices, amounts and money are numeric (exact).
-- Never edit this file after it has been applied anywhere; add a new numbered file instead.

CREATE FUNCTION mdp_set_updated_at() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END
$$;

CREATE TABLE strategies (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name        text        NOT NULL UNIQUE CHECK (btrim(name) <> ''),
    description text        NOT NULL DEFAULT '',
    params      jsonb       NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(params) = 'object'),
    active      boolean     NOT NULL DEFAULT true,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE TRIGGER strategies_updated_at BEFORE UPDATE ON strategies
    FOR EACH ROW EXECUTE FUNCTION mdp_set_updated_at();

-- A strategy's fills. Upsert with ON CONFLICT ON CONSTRAINT trades_fill_key: the exchange's trade id is unique
-- per exchange and symbol (Binance numbers trades per symbol); the strategy is part of the key because both
-- sides of one fill may be our own strategies on different accounts.
CREATE TABLE trades (
    id                bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    strategy_id       bigint      NOT NULL REFERENCES strategies (id) ON DELETE RESTRICT,
    exchange          text        NOT NULL CHECK (exchange <> ''),
    symbol            text        NOT NULL CHECK (symbol <> ''),
    side              text        NOT NULL CHECK (side IN ('buy', 'sell')),
    price             numeric     NOT NULL CHECK (price > 0),
    amount            numeric     NOT NULL CHECK (amount > 0),
    cost              numeric     GENERATED ALWAYS AS (price * amount) STORED,
    fee               numeric     NOT NULL DEFAULT 0,                -- negative for a maker rebate
    fee_currency      text,
    exchange_trade_id text        NOT NULL CHECK (exchange_trade_id <> ''),
    exchange_order_id text,
    ts                timestamptz NOT NULL,                          -- the exchange's fill time
    created_at        timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT trades_fill_key UNIQUE (strategy_id, exchange, symbol, exchange_trade_id),
    CHECK (fee = 0 OR fee_currency IS NOT NULL)
);
CREATE INDEX trades_strategy_ts_idx ON trades (strategy_id, ts DESC);
CREATE INDEX trades_market_ts_idx ON trades (exchange, symbol, ts DESC);
CREATE INDEX trades_order_idx ON trades (exchange, exchange_order_id) WHERE exchange_order_id IS NOT NULL;

-- A strategy's current position per market. quantity is signed (negative: short); avg_price is the average
-- entry price of the open quantity, NULL when flat.
CREATE TABLE positions (
    strategy_id  bigint      NOT NULL REFERENCES strategies (id) ON DELETE CASCADE,
    exchange     text        NOT NULL CHECK (exchange <> ''),
    symbol       text        NOT NULL CHECK (symbol <> ''),
    quantity     numeric     NOT NULL DEFAULT 0,
    avg_price    numeric     CHECK (avg_price > 0),
    realized_pnl numeric     NOT NULL DEFAULT 0,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (strategy_id, exchange, symbol),
    CHECK (quantity = 0 OR avg_price IS NOT NULL)
);
CREATE INDEX positions_market_idx ON positions (exchange, symbol);
CREATE TRIGGER positions_updated_at BEFORE UPDATE ON positions
    FOR EACH ROW EXECUTE FUNCTION mdp_set_updated_at();

-- Performance metrics of a strategy: one value per metric, period and time (e.g. pnl / 1d / 2024-08-09).
CREATE TABLE performance_metrics (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    strategy_id bigint      NOT NULL REFERENCES strategies (id) ON DELETE CASCADE,
    metric      text        NOT NULL CHECK (metric <> ''),           -- pnl, sharpe, max_drawdown, win_rate, ...
    period      text        NOT NULL DEFAULT 'all' CHECK (period <> ''),  -- 1h, 1d, 30d, all, ...
    ts          timestamptz NOT NULL,                                -- the end of the period the value covers
    value       numeric     NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT performance_metrics_key UNIQUE (strategy_id, metric, period, ts)
);
CREATE INDEX performance_metrics_metric_ts_idx ON performance_metrics (metric, period, ts DESC);
