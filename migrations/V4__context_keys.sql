-- The run context per key (docs/architecture.md, "The context, per key"): a job reads the keys its node needs by
-- primary key and upserts the keys it writes, so no statement reads or rewrites a document that grows with the
-- run. `_outputs.<node>` is no longer stored: it is served from the node's done record in {results}.
-- Not additive: the one-document table is converted in place (contexts of existing runs are exploded into keys),
-- so workers of an older release fail on it (their jobs are requeued until a new worker takes them).
CREATE TEMP TABLE flowcraft_v4_context_keys ON COMMIT DROP AS
SELECT c.run_id, e.key, e.value
  FROM {contexts} c, jsonb_each(CASE WHEN jsonb_typeof(c.context_data) = 'object' THEN c.context_data
                                     ELSE '{}'::jsonb END) AS e (key, value)
 WHERE e.key NOT LIKE '\_outputs.%';

DROP TABLE {contexts};

CREATE TABLE {contexts} (
    run_id TEXT  NOT NULL,
    key    TEXT  NOT NULL,
    value  JSONB NOT NULL,
    PRIMARY KEY (run_id, key)
);

INSERT INTO {contexts} (run_id, key, value) SELECT run_id, key, value FROM flowcraft_v4_context_keys;
