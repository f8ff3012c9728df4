-- The id of the last transition the checkpoint writer committed for a run.
-- A worker whose write failed without an answer (the connection cut by a
-- database restart, possibly after the commit) sends the same write again
-- when the database is back; the writer sees its id already here and answers
-- "applied" without writing the checkpoint and history rows a second time.
-- Not indexed: it never blocks a HOT update.
ALTER TABLE runs ADD COLUMN last_write uuid;
