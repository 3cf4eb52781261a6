-- The console (`flowcraft ui`): blueprint definitions and paging runs newest first.
-- A blueprint definition, written insert-if-absent by `start_run` and by workers at start for the blueprints they
-- serve. Runs name their blueprint by id and version only; the console shows the latest definition seen with that
-- id and version (`first_seen` orders them).
CREATE TABLE {blueprints} (
    blueprint_id TEXT NOT NULL,
    version      TEXT NULL,
    content_hash TEXT NOT NULL,
    definition   JSONB NOT NULL,
    first_seen   TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (blueprint_id, content_hash)
);

CREATE INDEX ON {blueprints} (blueprint_id, first_seen DESC);

-- Runs newest first, paged by (created_at, run_id) (keyset cursor).
CREATE INDEX ON {statuses} (created_at DESC, run_id DESC);
