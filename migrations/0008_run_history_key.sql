-- Every read of `run_history` is one run's events in order (`WHERE run_id =
-- $1 ORDER BY id`), and the cron purge deletes by run. The primary key on `id`
-- alone served no query, yet every step and every submission paid for a
-- second B-tree insertion into it. One index, (run_id, id), now is the key.
ALTER TABLE run_history DROP CONSTRAINT run_history_pkey;
DROP INDEX run_history_run;
ALTER TABLE run_history ADD CONSTRAINT run_history_pkey PRIMARY KEY (run_id, id);
