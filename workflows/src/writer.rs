//! The checkpoint writer: every transition a worker commits goes through here.
//!
//! A transition is one [`RunUpdate`]: the run's new state and cursor, the
//! step checkpoint and the history event, written by a single statement (one
//! round-trip, one commit) and only if the worker still holds the run's lease
//! and fencing token. Updates that arrive while a statement is in flight are
//! batched into the next statement, so concurrent steps share one commit:
//! round-trips, not fsync, are what bound throughput on small machines.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::{
    batch::{BatchStatement, Batcher, Failed},
    state::RunState,
};

/// Largest number of transitions committed by one statement.
const MAX_BATCH: usize = 128;

/// Statements that may be in flight at once (one connection each). One: on
/// a machine where the database shares the cores, fewer, larger commits win.
/// Measured in alternating runs of `orrery-bench` (session 3): one writer
/// batched 8 steps per statement (0.225 commits per step) against 4.8 with
/// two (0.31), used 106–110 µs of PostgreSQL CPU per step against 113–148,
/// and ran at 45–54 % of the raw-INSERT baseline against 43–48 %.
const WRITERS: usize = 1;

/// What happens to `dispatched_at` with this write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DispatchMark {
    /// Leave it (the run stays with this worker or ends).
    Keep,
    /// The writer's caller pushes a dispatch right after the commit.
    Now,
    /// A parked run: its dispatch is due at `wake_at` (a local timer sends it;
    /// the reconciler sends it if that timer is lost).
    AtWake,
}

impl DispatchMark {
    fn as_str(self) -> &'static str {
        match self {
            DispatchMark::Keep => "keep",
            DispatchMark::Now => "now",
            DispatchMark::AtWake => "wake",
        }
    }
}

/// What the write records about one step.
#[derive(Clone, Debug, PartialEq)]
pub enum CheckpointKind {
    /// The step finished: its output is the checkpoint.
    Done(Value),
    /// An attempt failed (retryable or fatal).
    Failed(String),
    /// A waiting step parked the run once more.
    Polled,
    /// The step's compensation ran.
    Compensated,
    /// The step's compensation gave up.
    CompensationFailed(String),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    pub index: i32,
    pub step: String,
    pub kind: CheckpointKind,
    pub started_at: DateTime<Utc>,
}

/// One committed transition of a run.
#[derive(Clone, Debug, PartialEq)]
pub struct RunUpdate {
    /// Unique per transition: the same write sent again (its first answer
    /// lost) is recognised and not applied twice (`runs.last_write`).
    pub write_id: Uuid,
    /// This is such a second send: check whether the first one committed.
    pub resent: bool,
    pub run_id: Uuid,
    pub fence: i64,
    pub owner: String,
    pub state: RunState,
    pub cursor: i32,
    pub attempt: i32,
    pub queue: String,
    pub compensate_cursor: Option<i32>,
    /// Parked runs: claimable again after this delay.
    pub wake_in: Option<Duration>,
    /// Give up the lease with this write.
    pub release: bool,
    pub dispatch: DispatchMark,
    /// `Some(Some(e))` sets the run's error, `Some(None)` clears it, `None` keeps it.
    pub error: Option<Option<String>>,
    /// The run's result, when it succeeds.
    pub output: Option<Value>,
    /// No progress for longer than this makes the run stuck.
    pub stuck_in: Option<Duration>,
    pub checkpoint: Option<Checkpoint>,
    /// History row: event name and detail (the step is the checkpoint's).
    pub event: Option<(String, Option<Value>)>,
}

/// Handle to the background task that batches and commits [`RunUpdate`]s.
#[derive(Clone)]
pub struct CheckpointWriter {
    batcher: Batcher<WriteStatement>,
}

impl CheckpointWriter {
    pub fn spawn(pool: PgPool) -> Self {
        CheckpointWriter {
            batcher: Batcher::spawn(pool, WriteStatement, WRITERS, MAX_BATCH),
        }
    }

    /// Commit `update`; `Ok(false)` means the fence or lease no longer
    /// matched, so nothing was written and the caller has lost the run. A
    /// failed write is handed back (see [`Failed`]) so it can be sent again
    /// with `resent` set.
    pub async fn write(&self, update: RunUpdate) -> Result<bool, Failed<RunUpdate>> {
        self.batcher.call(update).await
    }
}

struct WriteStatement;

impl BatchStatement for WriteStatement {
    type Request = RunUpdate;
    type Answer = bool;
    const NAME: &'static str = "checkpoint writer";

    async fn execute(
        &self,
        conn: &mut PgConnection,
        requests: &[RunUpdate],
    ) -> Result<Vec<bool>, sqlx::Error> {
        let updates: Vec<&RunUpdate> = requests.iter().collect();
        let applied = write_batch(conn, &updates).await?;
        Ok(requests
            .iter()
            .map(|u| applied.contains(&u.run_id))
            .collect())
    }
}

/// One statement for the whole batch; returns the ids whose fence matched.
pub async fn write_batch<'c, E>(db: E, updates: &[&RunUpdate]) -> Result<Vec<Uuid>, sqlx::Error>
where
    E: sqlx::Executor<'c, Database = sqlx::Postgres>,
{
    let secs = |d: Option<Duration>| d.map(|d| d.as_secs_f64());
    let mut ck_kind: Vec<Option<&str>> = Vec::with_capacity(updates.len());
    let mut ck_output: Vec<Option<&Value>> = Vec::with_capacity(updates.len());
    let mut ck_error: Vec<Option<&str>> = Vec::with_capacity(updates.len());
    for u in updates {
        let (kind, output, error) = match u.checkpoint.as_ref().map(|c| &c.kind) {
            None => (None, None, None),
            Some(CheckpointKind::Done(v)) => (Some("done"), Some(v), None),
            Some(CheckpointKind::Failed(e)) => (Some("failed"), None, Some(e.as_str())),
            Some(CheckpointKind::Polled) => (Some("polled"), None, None),
            Some(CheckpointKind::Compensated) => (Some("compensated"), None, None),
            Some(CheckpointKind::CompensationFailed(e)) => {
                (Some("compensation_failed"), None, Some(e.as_str()))
            }
        };
        ck_kind.push(kind);
        ck_output.push(output);
        ck_error.push(error);
    }
    let sql = if updates.iter().any(|u| u.resent) {
        RESEND_SQL
    } else {
        WRITE_SQL
    };
    sqlx::query_scalar(sql)
        .bind(updates.iter().map(|u| u.run_id).collect::<Vec<_>>())
        .bind(updates.iter().map(|u| u.fence).collect::<Vec<_>>())
        .bind(updates.iter().map(|u| u.owner.as_str()).collect::<Vec<_>>())
        .bind(updates.iter().map(|u| u.state.as_str()).collect::<Vec<_>>())
        .bind(updates.iter().map(|u| u.cursor).collect::<Vec<_>>())
        .bind(updates.iter().map(|u| u.attempt).collect::<Vec<_>>())
        .bind(updates.iter().map(|u| u.queue.as_str()).collect::<Vec<_>>())
        .bind(
            updates
                .iter()
                .map(|u| u.compensate_cursor)
                .collect::<Vec<_>>(),
        )
        .bind(updates.iter().map(|u| secs(u.wake_in)).collect::<Vec<_>>())
        .bind(updates.iter().map(|u| u.release).collect::<Vec<_>>())
        .bind(
            updates
                .iter()
                .map(|u| u.dispatch.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            updates
                .iter()
                .map(|u| u.error.is_some())
                .collect::<Vec<_>>(),
        )
        .bind(
            updates
                .iter()
                .map(|u| u.error.clone().flatten())
                .collect::<Vec<_>>(),
        )
        .bind(updates.iter().map(|u| u.output.clone()).collect::<Vec<_>>())
        .bind(updates.iter().map(|u| secs(u.stuck_in)).collect::<Vec<_>>())
        .bind(
            updates
                .iter()
                .map(|u| u.checkpoint.as_ref().map(|c| c.index))
                .collect::<Vec<_>>(),
        )
        .bind(
            updates
                .iter()
                .map(|u| u.checkpoint.as_ref().map(|c| c.step.as_str()))
                .collect::<Vec<_>>(),
        )
        .bind(ck_kind)
        .bind(ck_output)
        .bind(ck_error)
        .bind(
            updates
                .iter()
                .map(|u| u.checkpoint.as_ref().map(|c| c.started_at))
                .collect::<Vec<_>>(),
        )
        .bind(
            updates
                .iter()
                .map(|u| u.event.as_ref().map(|e| e.0.clone()))
                .collect::<Vec<_>>(),
        )
        .bind(
            updates
                .iter()
                .map(|u| u.event.as_ref().and_then(|e| e.1.clone()))
                .collect::<Vec<_>>(),
        )
        .bind(updates.iter().map(|u| u.write_id).collect::<Vec<_>>())
        .bind(updates.iter().map(|u| u.resent).collect::<Vec<_>>())
        .fetch_all(db)
        .await
}

/// The `v` (values) CTE of both write statements.
macro_rules! write_values {
    () => {
        r#"
WITH v AS (
    SELECT * FROM unnest(
        $1::uuid[], $2::int8[], $3::text[], $4::text[], $5::int4[], $6::int4[], $7::text[],
        $8::int4[], $9::float8[], $10::bool[], $11::text[], $12::bool[], $13::text[],
        $14::jsonb[], $15::float8[], $16::int4[], $17::text[], $18::text[], $19::jsonb[],
        $20::text[], $21::timestamptz[], $22::text[], $23::jsonb[], $24::uuid[], $25::bool[]
    ) AS v(id, fence, owner, state, cursor, attempt, queue,
           comp_cursor, wake_in, release, dispatch, set_error, error,
           output, stuck_in, ck_index, ck_step, ck_kind, ck_output,
           ck_error, ck_started, ev, ev_detail, write_id, resent)
),
"#
    };
}

/// The run update, checkpoint and history CTEs of both write statements.
macro_rules! write_rows {
    () => {
        r#"
u AS (
    UPDATE runs r SET
        state = v.state,
        cursor = v.cursor,
        attempt = v.attempt,
        queue = v.queue,
        compensate_cursor = v.comp_cursor,
        wake_at = CASE WHEN v.wake_in IS NULL THEN NULL
                       ELSE now() + make_interval(secs => v.wake_in) END,
        lease_owner = CASE WHEN v.release THEN NULL ELSE r.lease_owner END,
        lease_until = CASE WHEN v.release THEN NULL ELSE r.lease_until END,
        dispatched_at = CASE v.dispatch
                            WHEN 'now' THEN now()
                            WHEN 'wake' THEN now() + make_interval(secs => COALESCE(v.wake_in, 0))
                            ELSE r.dispatched_at END,
        error = CASE WHEN v.set_error THEN v.error ELSE r.error END,
        output = COALESCE(v.output, r.output),
        stuck_after = CASE WHEN v.stuck_in IS NULL THEN NULL
                           ELSE now() + make_interval(secs => v.stuck_in) END,
        finished_at = CASE WHEN v.state IN ('succeeded', 'failed', 'cancelled') THEN now() END,
        updated_at = now(),
        last_write = v.write_id
    FROM v
    WHERE r.id = v.id AND r.fence = v.fence AND r.lease_owner = v.owner
      AND r.last_write IS DISTINCT FROM v.write_id
    RETURNING r.id
),
ck AS (
    INSERT INTO step_checkpoints AS s (run_id, step_index, step, output, attempts, last_error,
                                       polls, started_at, finished_at, compensated_at, compensation_error)
    SELECT v.id, v.ck_index, v.ck_step,
           CASE WHEN v.ck_kind = 'done' THEN v.ck_output END,
           CASE WHEN v.ck_kind IN ('done', 'failed') THEN 1 ELSE 0 END,
           CASE WHEN v.ck_kind = 'failed' THEN v.ck_error END,
           CASE WHEN v.ck_kind = 'polled' THEN 1 ELSE 0 END,
           v.ck_started,
           CASE WHEN v.ck_kind = 'done' THEN now() END,
           CASE WHEN v.ck_kind = 'compensated' THEN now() END,
           CASE WHEN v.ck_kind = 'compensation_failed' THEN v.ck_error END
    FROM v JOIN u ON u.id = v.id
    WHERE v.ck_index IS NOT NULL
    ON CONFLICT (run_id, step_index) DO UPDATE SET
        output = COALESCE(EXCLUDED.output, s.output),
        attempts = s.attempts + EXCLUDED.attempts,
        last_error = COALESCE(EXCLUDED.last_error, s.last_error),
        polls = s.polls + EXCLUDED.polls,
        started_at = COALESCE(s.started_at, EXCLUDED.started_at),
        finished_at = COALESCE(EXCLUDED.finished_at, s.finished_at),
        compensated_at = COALESCE(EXCLUDED.compensated_at, s.compensated_at),
        compensation_error = COALESCE(EXCLUDED.compensation_error, s.compensation_error)
),
h AS (
    INSERT INTO run_history (run_id, event, step, detail)
    SELECT v.id, v.ev, v.ck_step, v.ev_detail
    FROM v JOIN u ON u.id = v.id
    WHERE v.ev IS NOT NULL
)
"#
    };
}

/// The statement for batches of first sends (public for the test of its plan).
pub const WRITE_SQL: &str = concat!(write_values!(), write_rows!(), "SELECT id FROM u\n");

/// The statement for a batch holding a write sent again: also answers
/// "applied" for those whose first send had committed (`again`). Kept apart
/// so that the common statement does not pay for the extra join.
pub const RESEND_SQL: &str = concat!(
    write_values!(),
    r#"
-- Writes sent again after a lost answer whose first send committed (the
-- statement sees the rows as they were before it: no write of its own).
again AS (
    SELECT r.id FROM v JOIN runs r ON r.id = v.id
    WHERE v.resent AND r.last_write = v.write_id AND r.fence = v.fence
),
"#,
    write_rows!(),
    "SELECT id FROM u UNION ALL SELECT id FROM again\n"
);
