-- Node instances (docs/architecture.md, "Node instances"): a node inside a loop or a batch has one record per
-- instance, so the key of a node record becomes (run_id, node_id, instance). The instance of a node outside
-- loops and batches is '' (every record written before this migration).
-- Not additive: the previous release's `ON CONFLICT (run_id, node_id)` needs the old key, so its workers fail
-- their record statements against the migrated table (their jobs are requeued) until they are replaced.
ALTER TABLE {results} ADD COLUMN instance TEXT NOT NULL DEFAULT '';

DO $$
DECLARE
    pk text;
BEGIN
    SELECT conname INTO pk FROM pg_constraint WHERE conrelid = '{results}'::regclass AND contype = 'p';
    EXECUTE format('ALTER TABLE {results} DROP CONSTRAINT %I', pk);
END $$;

ALTER TABLE {results} ADD PRIMARY KEY (run_id, node_id, instance);

-- Batch items are recorded `pending` until they resolve. V5 (waiting nodes) allows that status already; when it
-- has not run yet, the status CHECK of V1 is replaced by one that allows it (V5 replaces any status CHECK).
DO $$
DECLARE
    c record;
    allows_pending boolean := false;
BEGIN
    FOR c IN SELECT conname, pg_get_constraintdef(oid) AS def FROM pg_constraint
              WHERE contype = 'c' AND conrelid = '{results}'::regclass AND pg_get_constraintdef(oid) LIKE '%status%'
    LOOP
        IF c.def LIKE '%pending%' THEN
            allows_pending := true;
        ELSE
            EXECUTE format('ALTER TABLE {results} DROP CONSTRAINT %I', c.conname);
        END IF;
    END LOOP;
    IF NOT allows_pending THEN
        ALTER TABLE {results} ADD CHECK (status IN ('done', 'failed', 'skipped', 'pending'));
    END IF;
END $$;
