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
