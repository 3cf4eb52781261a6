-- One row per reconciler pass of a schedule ("<namespace>/<name>"), so the last result can be shown.
CREATE TABLE {reconcile_runs} (
    id              BIGSERIAL PRIMARY KEY,
    schedule        TEXT NOT NULL,
    started_at      TIMESTAMPTZ NOT NULL,
    finished_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    stalled_runs    BIGINT NOT NULL CHECK (stalled_runs >= 0),
    reconciled_runs BIGINT NOT NULL CHECK (reconciled_runs >= 0),
    failed_runs     BIGINT NOT NULL CHECK (failed_runs >= 0)
);

CREATE INDEX ON {reconcile_runs} (schedule, finished_at DESC);
