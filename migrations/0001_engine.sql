-- The durable workflow engine: runs, their step checkpoints, fan-out item
-- checkpoints, the append-only history, operator audit and scheduler ticks.
-- PostgreSQL is the only source of truth; Redis only carries "run X is due".

CREATE TABLE runs (
    id                  uuid PRIMARY KEY,
    workflow            text        NOT NULL,
    workflow_version    int         NOT NULL,
    input               jsonb       NOT NULL,
    state               text        NOT NULL CHECK (state IN (
                            'queued', 'running', 'waiting', 'retrying',
                            'succeeded', 'failed', 'cancelled',
                            'cancelling', 'compensating')),
    -- Index of the step to run next (or being run).
    cursor              int         NOT NULL DEFAULT 0,
    -- Failed attempts of the step at `cursor` so far (reset when it succeeds).
    attempt             int         NOT NULL DEFAULT 0,
    -- Queue of the step at `cursor`: where a dispatch for this run goes.
    queue               text        NOT NULL,
    -- While compensating: index of the next completed step to undo (descending).
    compensate_cursor   int,
    -- Lease with fencing: every write of a worker is conditioned on `fence`.
    lease_owner         text,
    lease_until         timestamptz,
    fence               bigint      NOT NULL DEFAULT 0,
    -- A parked (waiting / retrying) run is not claimable before this.
    wake_at             timestamptz,
    -- Last time a dispatch was pushed (or is expected, for parked runs).
    dispatched_at       timestamptz,
    -- No progress past this instant makes the run "stuck".
    stuck_after         timestamptz,
    cancel_requested_at timestamptz,
    cancel_requested_by text,
    cancel_reason       text,
    error               text,
    output              jsonb,
    replays             int         NOT NULL DEFAULT 0,
    created_by          text,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    finished_at         timestamptz
);

-- The reconciler's scan: unfinished runs only, so the index stays small.
CREATE INDEX runs_unfinished ON runs (dispatched_at)
    WHERE state NOT IN ('succeeded', 'failed', 'cancelled');
CREATE INDEX runs_state ON runs (state, workflow);
CREATE INDEX runs_finished ON runs (finished_at) WHERE finished_at IS NOT NULL;

-- One row per step of a run, created at its first completed attempt (success
-- or failure). `output` is the checkpoint: non-null means the step is done and
-- is never run again for this run (unless an operator replays from it).
CREATE TABLE step_checkpoints (
    run_id          uuid        NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    step_index      int         NOT NULL,
    step            text        NOT NULL,
    output          jsonb,
    attempts        int         NOT NULL DEFAULT 0,
    last_error      text,
    -- How many times a waiting step parked the run; bounded history instead of a row per poll.
    polls           int         NOT NULL DEFAULT 0,
    started_at      timestamptz,
    finished_at     timestamptz,
    compensated_at  timestamptz,
    compensation_error text,
    PRIMARY KEY (run_id, step_index)
);

-- Fan-out steps: one checkpoint per item, so a retry repeats only the failures.
CREATE TABLE item_checkpoints (
    run_id      uuid        NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    step_index  int         NOT NULL,
    item        text        NOT NULL,
    output      jsonb       NOT NULL,
    finished_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, step_index, item)
);

-- Append-only, compact: one row per transition, bounded by steps x attempts.
CREATE TABLE run_history (
    id          bigserial   PRIMARY KEY,
    run_id      uuid        NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    at          timestamptz NOT NULL DEFAULT now(),
    event       text        NOT NULL,
    step        text,
    detail      jsonb
);
CREATE INDEX run_history_run ON run_history (run_id, id);

-- Every operator action: who, what, when, why.
CREATE TABLE operator_audit (
    id      bigserial   PRIMARY KEY,
    at      timestamptz NOT NULL DEFAULT now(),
    actor   text        NOT NULL,
    action  text        NOT NULL,
    run_id  uuid,
    reason  text,
    detail  jsonb
);

-- Cron guard: a (job, tick) pair fires once however many schedulers run.
CREATE TABLE schedule_ticks (
    job         text        NOT NULL,
    tick        timestamptz NOT NULL,
    fired_by    text        NOT NULL,
    fired_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job, tick)
);
