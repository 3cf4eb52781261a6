-- How many times the timer service has republished the job of a `resumed` record (docs/architecture.md, "Timer
-- service"): the record is next republished only once `grace * 2^min(republished, cap)` has passed since its last
-- republish, so that under a backlog longer than the grace a resumed job is not republished once per grace. A
-- constant default: adding the column rewrites no row.
ALTER TABLE {results} ADD COLUMN republished INT NOT NULL DEFAULT 0;
