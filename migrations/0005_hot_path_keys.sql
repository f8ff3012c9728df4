-- The checkpoint writer inserts `step_checkpoints` and `run_history` rows only
-- by joining the run row it has just updated in the same statement (and the
-- other writers do so inside a transaction holding that row), so these two
-- foreign keys can never catch anything, while their per-row trigger checks
-- are a measurable share of every step's database work. The cron purge deletes
-- these rows explicitly instead of by cascade.
ALTER TABLE step_checkpoints DROP CONSTRAINT step_checkpoints_run_id_fkey;
ALTER TABLE run_history DROP CONSTRAINT run_history_run_id_fkey;
