-- Subflows (docs/architecture.md, "Subflows"): a child run started by a `subflow` node keeps the node instance
-- that waits for it. Additive: NULL for every other run (all runs written before this migration).
ALTER TABLE {statuses}
    ADD COLUMN parent_run_id   TEXT NULL,
    ADD COLUMN parent_node_id  TEXT NULL,
    ADD COLUMN parent_instance TEXT NULL;

-- The reconciler's scan for ended children whose parent node still waits (a lost resume): only the waiting
-- records of `subflow` nodes are indexed.
CREATE INDEX ON {results} (run_id) WHERE status = 'waiting' AND wait ->> 'reason' = 'subflow';
