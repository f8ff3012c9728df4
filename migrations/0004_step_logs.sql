-- What steps said while they ran (SSH stdout/stderr, Ambari request summaries),
-- for operators. Bounded per entry by the engine; purged with the run.
CREATE TABLE step_logs (
    id          bigserial   PRIMARY KEY,
    run_id      uuid        NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    step        text        NOT NULL,
    attempt     int         NOT NULL,
    at          timestamptz NOT NULL DEFAULT now(),
    stream      text        NOT NULL,
    text        text        NOT NULL
);
CREATE INDEX step_logs_run ON step_logs (run_id, id);
