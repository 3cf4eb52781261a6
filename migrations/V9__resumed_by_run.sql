-- Whether a run has a node resumed and not yet routed (docs/architecture.md, "Waiting"): a job that fired nothing
-- in a run that may wait asks this before replaying the run, so that N batch items resumed together do not replay
-- it N times. Only `resumed` records are indexed (each is routed by its job within moments).
CREATE INDEX ON {results} (run_id) WHERE status = 'resumed';
