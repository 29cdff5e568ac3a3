-- 0001: the market catalog and the data-quality alerts, written by services/postgres_writer.
-- Applied once by common/migrate.py inside a transaction. Never edit this file after it has been applied
-- anywhere: its checksum is recorded and a changed file is refused. Add 0003_*.sql instead.

-- One row per market of an exchange, as ccxt's load_markets reports it (events on md:market:{exchange}).
CREATE TABLE markets (
    exchange         text        NOT NULL CHECK (exchange <> ''),
    symbol           text        NOT NULL CHECK (symbol <> ''),      -- ccxt unified, e.g. BTC/USDT
    exchange_symbol  text        NOT NULL,                           -- the exchange's id, e.g. BTCUSDT
    base             text        NOT NULL,
    quote            text        NOT NULL,
    market_type      text        NOT NULL,                           -- spot, swap, future, option, ...
    active           boolean,                                        -- NULL: the exchange does not say
    -- Exact numbers. Precisions are as ccxt reports them: a tick size (0.01) or a count of digits (2).
    contract_size    numeric     CHECK (contract_size > 0),
    price_precision  numeric     CHECK (price_precision >= 0),
    amount_precision numeric     CHECK (amount_precision >= 0),
    first_seen       timestamptz NOT NULL,                           -- catalog time of the first event
    last_seen        timestamptz NOT NULL,                           -- catalog time of the latest event
    updated_at       timestamptz NOT NULL DEFAULT now(),             -- when this row was last written
    PRIMARY KEY (exchange, symbol),
    CHECK (last_seen >= first_seen)
);
COMMENT ON TABLE markets IS 'Market catalog per exchange (ccxt load_markets), upserted by postgres_writer';
-- Lookups by the exchange's own id (not unique: spot BTCUSDT and swap BTCUSDT share it) and by currency.
CREATE INDEX markets_exchange_symbol_idx ON markets (exchange, exchange_symbol);
CREATE INDEX markets_base_quote_idx ON markets (base, quote);

-- Data-quality and pipeline alerts (events on mdp:alerts). A row is keyed by where it came from on the bus:
-- the stream, the entry id and the alert's index within the entry, so a redelivered entry is not stored twice.
CREATE TABLE quality_alerts (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    stream      text        NOT NULL CHECK (stream <> ''),
    entry_id    text        NOT NULL CHECK (entry_id ~ '^[0-9]+-[0-9]+$'),
    idx         integer     NOT NULL CHECK (idx >= 0),
    rule        text        NOT NULL CHECK (rule <> ''),
    severity    text        NOT NULL CHECK (severity IN ('info', 'warning', 'error', 'critical')),
    source      text        NOT NULL,
    exchange    text,                                                -- NULL for pipeline-wide alerts
    symbol      text,
    kind        text,
    reason      text        NOT NULL,
    "values"    jsonb       NOT NULL DEFAULT '{}' CHECK (jsonb_typeof("values") = 'object'),
    ts_event    timestamptz NOT NULL,
    ts_recv     timestamptz,
    created_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT quality_alerts_delivery_key UNIQUE (stream, entry_id, idx)
);
COMMENT ON TABLE quality_alerts IS 'Alerts of mdp:alerts, one row per alert, idempotent by (stream, entry_id, idx)';
CREATE INDEX quality_alerts_ts_event_idx ON quality_alerts (ts_event DESC);
CREATE INDEX quality_alerts_market_idx ON quality_alerts (exchange, symbol, ts_event DESC);
CREATE INDEX quality_alerts_rule_idx ON quality_alerts (rule, ts_event DESC);
CREATE INDEX quality_alerts_severe_idx ON quality_alerts (ts_event DESC) WHERE severity IN ('error', 'critical');
