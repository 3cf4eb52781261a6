-- Waiting nodes (docs/architecture.md, "Waiting nodes"): the non-terminal record statuses `waiting` and `resumed`,
-- what a waiting node waits for, its timer and its webhook token; the run status `awaiting`.
-- The CHECK constraints of V1 were left unnamed: they are found by their definition and replaced. `pending` is
-- allowed here too (batch items, a later migration), so that no further constraint swap is needed.

DO $$
DECLARE c record;
BEGIN
    FOR c IN SELECT conname, conrelid::regclass AS tbl FROM pg_constraint
              WHERE contype = 'c' AND conrelid IN ('{results}'::regclass, '{statuses}'::regclass)
                AND pg_get_constraintdef(oid) LIKE '%status%'
    LOOP
        EXECUTE format('ALTER TABLE %s DROP CONSTRAINT %I', c.tbl, c.conname);
    END LOOP;
END $$;

ALTER TABLE {results} ADD CHECK (status IN ('done', 'failed', 'skipped', 'waiting', 'resumed', 'pending'));
ALTER TABLE {statuses} ADD CHECK (status IN ('running', 'awaiting', 'completed', 'failed', 'cancelled'));

ALTER TABLE {results}
    ADD COLUMN wait    JSONB NULL,
    ADD COLUMN wake_at TIMESTAMPTZ NULL,
    ADD COLUMN token   TEXT NULL;

-- The timer service's scan: due timers, earliest first. Only armed timers of waiting nodes are indexed.
CREATE INDEX ON {results} (wake_at) WHERE status = 'waiting' AND wake_at IS NOT NULL;
-- A webhook request finds its node by token.
CREATE UNIQUE INDEX ON {results} (token) WHERE token IS NOT NULL;
