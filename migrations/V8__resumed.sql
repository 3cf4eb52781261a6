-- Resumed records whose job may have been lost (docs/architecture.md, "Timer service"): a node is resumed in one
-- transaction and its job published after the commit, so a crash in between leaves a `resumed` record that no job
-- routes. The timer service republishes the jobs of records resumed more than a short grace ago; only `resumed`
-- records (a handful at any time: each is routed by its job within moments) are indexed, by resume time.
CREATE INDEX ON {results} (finished_at) WHERE status = 'resumed';
