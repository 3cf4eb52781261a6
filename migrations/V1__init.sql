-- Flowcraft run state: contexts, status rows and node results.
-- Placeholders ({contexts}, {statuses}, {results}) are replaced by the validated, double-quoted table names.
-- Indexes are left unnamed so PostgreSQL picks a unique name that fits in 63 bytes whatever the table names are.

CREATE TABLE {contexts} (
    run_id       TEXT PRIMARY KEY,
    context_data JSONB NOT NULL
);

CREATE TABLE {statuses} (
    run_id            TEXT PRIMARY KEY,
    blueprint_id      TEXT NOT NULL,
    blueprint_version TEXT NULL,
    status            TEXT NOT NULL CHECK (status IN ('running', 'completed', 'failed', 'cancelled')),
    status_data       JSONB NOT NULL DEFAULT '{}'::jsonb,
    input             JSONB NOT NULL,
    created_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at        TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- The reconciler's stalled-run scan: status = 'running' AND updated_at < now() - threshold.
CREATE INDEX ON {statuses} (status, updated_at);

CREATE TABLE {results} (
    run_id      TEXT NOT NULL,
    node_id     TEXT NOT NULL,
    status      TEXT NOT NULL CHECK (status IN ('done', 'failed', 'skipped')),
    action      TEXT NULL,
    output      JSONB NULL,
    taken       JSONB NOT NULL DEFAULT '[]'::jsonb,
    attempts    INT NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    error       TEXT NULL,
    finished_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, node_id)
);
