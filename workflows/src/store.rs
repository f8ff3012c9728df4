//! Every SQL statement of the engine except the batched transition write
//! (see [`crate::writer`]): claiming with a lease, heartbeats, fan-out item
//! checkpoints, inserting runs, cancel and replay requests, and the queries
//! operators and tests use.
//!
//! Runtime-checked queries (`sqlx::query`) are used throughout so the crate
//! builds without a database; every statement is exercised by the tests.

use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::{PgConnection, PgPool, Row};
use uuid::Uuid;

use crate::{batch::BatchStatement, error::EngineError, state::RunState};

/// A run as its claimer sees it, with every checkpointed output.
#[derive(Debug, Clone)]
pub struct ClaimedRun {
    pub id: Uuid,
    pub workflow: String,
    pub workflow_version: i32,
    pub input: Value,
    pub state: RunState,
    /// State before the claim: `running` means a worker died mid-step.
    pub prev_state: RunState,
    pub cursor: i32,
    pub attempt: i32,
    pub queue: String,
    pub compensate_cursor: Option<i32>,
    pub fence: i64,
    pub cancel_requested_by: Option<String>,
    pub cancel_reason: Option<String>,
    pub cancel_requested: bool,
    pub error: Option<String>,
    pub outputs: HashMap<String, Value>,
    /// Times the step at `cursor` parked the run so far.
    pub polls: i32,
    /// When the step at `cursor` first started (for waiting deadlines).
    pub step_started_at: Option<DateTime<Utc>>,
}

/// One claim: the run and the id its sends share.
#[derive(Debug, Clone, Copy)]
pub struct ClaimRequest {
    pub run_id: Uuid,
    pub claim_id: Uuid,
}

/// The claim statement of one worker process: sent by its checkpoint
/// writer's batches ([`crate::writer::CheckpointWriter::claim`], alone or
/// inside a batch's write) and by a claim held open ([`crate::hold`]).
pub struct ClaimStatement {
    owner: String,
    lease: Duration,
    stuck_in: Duration,
}

impl ClaimStatement {
    /// Claims for `owner`, each lease lasting `lease`, the run stuck if it
    /// makes no progress for `stuck_in`.
    pub fn new(owner: &str, lease: Duration, stuck_in: Duration) -> Self {
        ClaimStatement {
            owner: owner.to_owned(),
            lease,
            stuck_in,
        }
    }

    /// Bind [`claim_ctes`]'s parameters for `requests`, in order.
    pub(crate) fn bind<'q>(
        &'q self,
        query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
        requests: &[ClaimRequest],
    ) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
        let (ids, claims): (Vec<Uuid>, Vec<Uuid>) =
            requests.iter().map(|r| (r.run_id, r.claim_id)).unzip();
        query
            .bind(ids)
            .bind(self.owner.as_str())
            .bind(self.lease.as_secs_f64())
            .bind(self.stuck_in.as_secs_f64())
            .bind(claims)
    }
}

/// The requests of a batch worth sending: a run asked for twice goes to the
/// first asker only (the others are answered `None` by [`answer_claims`]).
pub(crate) fn first_claims<'a>(
    requests: impl Iterator<Item = &'a ClaimRequest>,
) -> Vec<ClaimRequest> {
    let mut seen = HashSet::new();
    requests
        .filter(|r| seen.insert(r.run_id))
        .copied()
        .collect()
}

/// Each request's run from the runs a statement claimed, in order.
pub(crate) fn answer_claims<'a>(
    requests: impl Iterator<Item = &'a ClaimRequest>,
    claimed: Vec<ClaimedRun>,
) -> Vec<Option<ClaimedRun>> {
    let mut claimed: HashMap<Uuid, ClaimedRun> =
        claimed.into_iter().map(|run| (run.id, run)).collect();
    requests.map(|r| claimed.remove(&r.run_id)).collect()
}

impl BatchStatement for ClaimStatement {
    type Request = ClaimRequest;
    type Answer = Option<ClaimedRun>;
    const NAME: &'static str = "claimer";

    async fn execute(
        &self,
        conn: &mut PgConnection,
        requests: &[ClaimRequest],
    ) -> Result<Vec<Option<ClaimedRun>>, sqlx::Error> {
        let claimed = self.claim(conn, requests.iter()).await?;
        Ok(answer_claims(requests.iter(), claimed))
    }
}

impl ClaimStatement {
    /// Claim the claimable runs of `requests` by one statement (a run
    /// asked for twice is claimed once, see [`first_claims`]).
    pub(crate) async fn claim<'a>(
        &self,
        conn: &mut PgConnection,
        requests: impl Iterator<Item = &'a ClaimRequest>,
    ) -> Result<Vec<ClaimedRun>, sqlx::Error> {
        let first = first_claims(requests);
        let rows = self
            .bind(sqlx::query(&CLAIM_SQL), &first)
            .fetch_all(conn)
            .await?;
        rows.iter().map(claimed_run).collect()
    }
}

/// Parameters of [`claim_ctes`].
pub(crate) const CLAIM_PARAMS: usize = 5;

/// A claim's CTEs `p` (the requested runs, locked, and whether each is
/// claimable) and `c` (the claimed runs), parameters from `$first`: run
/// ids, owner, lease and stuck bound in seconds, claim ids
/// ([`ClaimStatement::bind`]). `but` excludes runs (an SQL array of ids)
/// that the same statement writes otherwise: one statement must not update
/// a row twice.
///
/// A run is claimable when it is unfinished, nobody holds a live lease and
/// it is due (or a cancel is waiting for it), or when the live lease is the
/// one this very claim took (`last_write` is its claim id: a send whose
/// answer was lost; nothing was written since). Such a run comes back with
/// `prev_state` `running`, as a run whose worker died does: a step that is
/// not safe to repeat is not run again on the chance that it started.
///
/// Whether a run is claimable is decided on the locked rows (`p`), so the
/// update itself has no condition on `state`. With one, the planner reached
/// the rows through the partial index of unfinished runs whenever the
/// statistics said few runs were unfinished (the usual state of a running
/// installation): every claim read every unfinished run, so a backlog (an
/// outage, a burst) made each claim slower until the next `ANALYZE`.
///
/// Rows are locked in id order, so two claimers asking for the same runs
/// cannot deadlock, and `FOR NO KEY UPDATE`, the lock the update takes
/// anyway: it excludes every other claim of the run, and, unlike `FOR
/// UPDATE`, does not hold up inserts whose foreign keys name the run while
/// a claim is held open ([`crate::hold`]).
pub(crate) fn claim_ctes(first: usize, but: Option<&str>) -> String {
    let p = placeholders(first, CLAIM_PARAMS);
    let (ids, owner, lease, stuck, claim_ids) = (&p[0], &p[1], &p[2], &p[3], &p[4]);
    let but = but.map_or_else(String::new, |ids| format!("WHERE r.id <> ALL({ids})"));
    format!(
        "p AS (SELECT r.id, r.state AS prev_state, t.claim_id,
                      r.state NOT IN ('succeeded', 'failed', 'cancelled')
                      AND ((r.lease_owner = {owner} AND r.last_write = t.claim_id)
                           OR ((r.lease_until IS NULL OR r.lease_until < now())
                               AND (r.wake_at IS NULL OR r.wake_at <= now()
                                    OR r.cancel_requested_at IS NOT NULL))) AS claimable
               FROM runs r JOIN unnest({ids}::uuid[], {claim_ids}::uuid[]) AS t(id, claim_id)
                    ON r.id = t.id
               {but}
               ORDER BY r.id FOR NO KEY UPDATE OF r),
         c AS (
            UPDATE runs r SET
                lease_owner = {owner},
                lease_until = now() + make_interval(secs => {lease}),
                fence = r.fence + 1,
                state = CASE WHEN r.state IN ('queued', 'waiting', 'retrying') THEN 'running' ELSE r.state END,
                wake_at = NULL,
                stuck_after = now() + make_interval(secs => {stuck}),
                updated_at = now(),
                last_write = p.claim_id
            FROM p
            WHERE r.id = p.id AND p.claimable
            RETURNING r.*, p.prev_state
         )"
    )
}

/// What a claim answers for each run of `c` ([`claim_ctes`]), read by
/// [`claimed_run`]: the run with every checkpointed output.
pub(crate) const CLAIMED_COLUMNS: &str =
    "c.id, c.workflow, c.workflow_version, c.input, c.state, c.prev_state, c.cursor,
     c.attempt, c.queue, c.compensate_cursor, c.fence, c.cancel_requested_by,
     c.cancel_reason, c.cancel_requested_at IS NOT NULL AS cancel_requested, c.error,
     COALESCE((SELECT jsonb_object_agg(s.step, s.output) FROM step_checkpoints s
               WHERE s.run_id = c.id AND s.output IS NOT NULL), '{}'::jsonb) AS outputs,
     COALESCE((SELECT s.polls FROM step_checkpoints s
               WHERE s.run_id = c.id AND s.step_index = c.cursor), 0) AS polls,
     (SELECT s.started_at FROM step_checkpoints s
      WHERE s.run_id = c.id AND s.step_index = c.cursor) AS step_started_at";

/// The claim statement alone ([`claim_ctes`] from `$1`).
pub static CLAIM_SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "WITH {} SELECT {CLAIMED_COLUMNS} FROM c",
        claim_ctes(1, None)
    )
});

pub(crate) fn claimed_run(row: &sqlx::postgres::PgRow) -> Result<ClaimedRun, sqlx::Error> {
    let outputs: Value = row.try_get("outputs")?;
    let outputs = match outputs {
        Value::Object(map) => map.into_iter().collect(),
        _ => HashMap::new(),
    };
    Ok(ClaimedRun {
        id: row.try_get("id")?,
        workflow: row.try_get("workflow")?,
        workflow_version: row.try_get("workflow_version")?,
        input: row.try_get("input")?,
        state: parse_state(row.try_get("state")?)?,
        prev_state: parse_state(row.try_get("prev_state")?)?,
        cursor: row.try_get("cursor")?,
        attempt: row.try_get("attempt")?,
        queue: row.try_get("queue")?,
        compensate_cursor: row.try_get("compensate_cursor")?,
        fence: row.try_get("fence")?,
        cancel_requested_by: row.try_get("cancel_requested_by")?,
        cancel_reason: row.try_get("cancel_reason")?,
        cancel_requested: row.try_get("cancel_requested")?,
        error: row.try_get("error")?,
        outputs,
        polls: row.try_get("polls")?,
        step_started_at: row.try_get("step_started_at")?,
    })
}

fn parse_state(s: String) -> Result<RunState, sqlx::Error> {
    s.parse()
        .map_err(|e: crate::state::UnknownState| sqlx::Error::Decode(Box::new(e)))
}

/// Heartbeat answer: whether the lease is still ours, and whether a cancel was requested.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Beat {
    Held { cancel_requested: bool },
    Lost,
}

pub async fn heartbeat(
    pool: &PgPool,
    run_id: Uuid,
    fence: i64,
    owner: &str,
    lease: Duration,
) -> Result<Beat, sqlx::Error> {
    let row: Option<bool> = sqlx::query_scalar(
        "UPDATE runs SET lease_until = now() + make_interval(secs => $4)
         WHERE id = $1 AND fence = $2 AND lease_owner = $3
         RETURNING cancel_requested_at IS NOT NULL",
    )
    .bind(run_id)
    .bind(fence)
    .bind(owner)
    .bind(lease.as_secs_f64())
    .fetch_optional(pool)
    .await?;
    Ok(match row {
        Some(cancel_requested) => Beat::Held { cancel_requested },
        None => Beat::Lost,
    })
}

/// Give the lease back without changing anything else (a run this worker
/// cannot drive: unknown workflow version, wrong queue).
pub async fn release(
    pool: &PgPool,
    run_id: Uuid,
    fence: i64,
    owner: &str,
) -> Result<bool, sqlx::Error> {
    let res = sqlx::query(
        "UPDATE runs SET lease_owner = NULL, lease_until = NULL,
             state = CASE WHEN state = 'running' THEN 'queued' ELSE state END
         WHERE id = $1 AND fence = $2 AND lease_owner = $3",
    )
    .bind(run_id)
    .bind(fence)
    .bind(owner)
    .execute(pool)
    .await?;
    Ok(res.rows_affected() == 1)
}

/// Outputs of the fan-out items of one step already checkpointed.
pub async fn item_outputs(
    pool: &PgPool,
    run_id: Uuid,
    step_index: i32,
) -> Result<HashMap<String, Value>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT item, output FROM item_checkpoints WHERE run_id = $1 AND step_index = $2",
    )
    .bind(run_id)
    .bind(step_index)
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(|r| Ok((r.try_get("item")?, r.try_get("output")?)))
        .collect()
}

/// Checkpoint one fan-out item, fenced like every other write. `false`: lease lost.
pub async fn write_item(
    pool: &PgPool,
    run_id: Uuid,
    fence: i64,
    owner: &str,
    step_index: i32,
    item: &str,
    output: &Value,
) -> Result<bool, sqlx::Error> {
    let row = sqlx::query(
        "INSERT INTO item_checkpoints (run_id, step_index, item, output)
         SELECT $1, $4, $5, $6 WHERE EXISTS
             (SELECT 1 FROM runs WHERE id = $1 AND fence = $2 AND lease_owner = $3)
         ON CONFLICT (run_id, step_index, item) DO UPDATE SET output = EXCLUDED.output, finished_at = now()
         RETURNING 1",
    )
    .bind(run_id)
    .bind(fence)
    .bind(owner)
    .bind(step_index)
    .bind(item)
    .bind(output)
    .fetch_optional(pool)
    .await?;
    Ok(row.is_some())
}

/// A new run, ready to be inserted (see [`insert_run`]).
#[derive(Debug, Clone)]
pub struct NewRun {
    pub id: Uuid,
    pub workflow: String,
    pub workflow_version: i32,
    pub input: Value,
    pub queue: String,
    pub created_by: Option<String>,
    pub stuck_in: Duration,
}

/// Insert a queued run with its first dispatch mark and history event. Takes a
/// connection so callers can commit it together with their own intent (a
/// cluster row) before anything is pushed to Redis.
pub async fn insert_run(conn: &mut PgConnection, run: &NewRun) -> Result<(), sqlx::Error> {
    insert_runs(conn, &[run]).await
}

/// [`insert_run`] for many runs in one statement (the API's group commit of
/// submissions writes a whole batch this way).
pub async fn insert_runs(conn: &mut PgConnection, runs: &[&NewRun]) -> Result<(), sqlx::Error> {
    if runs.is_empty() {
        return Ok(());
    }
    let sql = format!("WITH {} SELECT 1", runs_cte(1));
    bind_runs(sqlx::query(&sql), runs).execute(conn).await?;
    Ok(())
}

/// Parameters of [`runs_cte`].
pub const RUNS_CTE_PARAMS: usize = 7;

/// The data-modifying CTE `new_runs` that inserts queued runs, its
/// parameters numbered from `$first` ([`RUNS_CTE_PARAMS`] of them, bound by
/// [`bind_runs`]): a caller puts it in its own statement to write runs and
/// its own rows in one round trip (`new_runs` can be read: `id`,
/// `created_by`). A run's `submitted` event is its row's `created_at` and
/// `created_by`, not a history row ([`history`]).
pub fn runs_cte(first: usize) -> String {
    let p = placeholders(first, RUNS_CTE_PARAMS);
    format!(
        "new_runs AS (
            INSERT INTO runs (id, workflow, workflow_version, input, state, queue, created_by,
                              dispatched_at, stuck_after)
            SELECT id, workflow, version, input, 'queued', queue, created_by,
                   now(), now() + make_interval(secs => stuck_secs)
            FROM unnest({}::uuid[], {}::text[], {}::int[], {}::jsonb[], {}::text[], {}::text[],
                        {}::float8[])
                 AS t(id, workflow, version, input, queue, created_by, stuck_secs)
            RETURNING id, created_by
         )",
        p[0], p[1], p[2], p[3], p[4], p[5], p[6]
    )
}

/// `$first` up to `$(first + n - 1)`: the placeholders of a CTE fragment
/// whose `n` parameters come after those of the fragments before it.
pub fn placeholders(first: usize, n: usize) -> Vec<String> {
    (first..first + n).map(|i| format!("${i}")).collect()
}

/// Bind the parameters of [`runs_cte`] for `runs`, in order.
pub fn bind_runs<'q>(
    query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    runs: &[&'q NewRun],
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    query
        .bind(runs.iter().map(|r| r.id).collect::<Vec<_>>())
        .bind(runs.iter().map(|r| r.workflow.as_str()).collect::<Vec<_>>())
        .bind(runs.iter().map(|r| r.workflow_version).collect::<Vec<_>>())
        .bind(runs.iter().map(|r| &r.input).collect::<Vec<_>>())
        .bind(runs.iter().map(|r| r.queue.as_str()).collect::<Vec<_>>())
        .bind(
            runs.iter()
                .map(|r| r.created_by.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(
            runs.iter()
                .map(|r| r.stuck_in.as_secs_f64())
                .collect::<Vec<_>>(),
        )
}

/// Record a cancel request. A run no worker holds moves to `cancelling` at
/// once and is returned for dispatch; a running one is told through NOTIFY
/// (and its next heartbeat) and winds down within its step's grace period.
pub async fn request_cancel(
    pool: &PgPool,
    run_id: Uuid,
    by: &str,
    reason: Option<&str>,
) -> Result<CancelOutcome, EngineError> {
    let mut tx = pool.begin().await?;
    let row = sqlx::query(
        "UPDATE runs r SET
             cancel_requested_at = COALESCE(r.cancel_requested_at, now()),
             cancel_requested_by = COALESCE(r.cancel_requested_by, $2),
             cancel_reason = COALESCE(r.cancel_reason, $3),
             state = CASE WHEN r.lease_owner IS NULL OR r.lease_until < now()
                          THEN CASE WHEN r.state IN ('queued', 'waiting', 'retrying', 'running')
                                    THEN 'cancelling' ELSE r.state END
                          ELSE r.state END,
             wake_at = NULL,
             dispatched_at = now(),
             updated_at = now()
         WHERE r.id = $1 AND r.state NOT IN ('succeeded', 'failed', 'cancelled')
         RETURNING r.queue, r.lease_owner IS NOT NULL AND r.lease_until >= now() AS leased",
    )
    .bind(run_id)
    .bind(by)
    .bind(reason)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(row) = row else {
        let exists: Option<String> = sqlx::query_scalar("SELECT state FROM runs WHERE id = $1")
            .bind(run_id)
            .fetch_optional(&mut *tx)
            .await?;
        return match exists {
            None => Err(EngineError::UnknownRun(run_id)),
            Some(state) => Err(EngineError::Conflict(format!(
                "run {run_id} is already {state}; nothing to cancel"
            ))),
        };
    };
    audit(&mut tx, by, "cancel", Some(run_id), reason, None).await?;
    sqlx::query(
        "INSERT INTO run_history (run_id, event, detail) VALUES ($1, 'cancel_requested', jsonb_build_object('by', $2::text, 'reason', $3::text))",
    )
    .bind(run_id)
    .bind(by)
    .bind(reason)
    .execute(&mut *tx)
    .await?;
    sqlx::query("SELECT pg_notify('orrery_cancel', $1)")
        .bind(run_id.to_string())
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(CancelOutcome {
        queue: row.try_get("queue")?,
        running: row.try_get("leased")?,
    })
}

#[derive(Debug, Clone)]
pub struct CancelOutcome {
    pub queue: String,
    /// A worker holds the run: it will see the request; no dispatch is needed.
    pub running: bool,
}

pub async fn audit(
    conn: &mut PgConnection,
    actor: &str,
    action: &str,
    run_id: Option<Uuid>,
    reason: Option<&str>,
    detail: Option<Value>,
) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO operator_audit (actor, action, run_id, reason, detail) VALUES ($1, $2, $3, $4, $5)")
        .bind(actor)
        .bind(action)
        .bind(run_id)
        .bind(reason)
        .bind(detail)
        .execute(conn)
        .await?;
    Ok(())
}

/// What an operator asks of a replay.
#[derive(Debug, Clone, Default)]
pub struct ReplayRequest {
    /// Step to start from; default: the step the run failed or stopped at.
    pub from_step: Option<String>,
    /// Replace the run's input (validated by the caller against the workflow).
    pub input: Option<Value>,
    /// Allow replaying a run that is not finished (a stuck one).
    pub force: bool,
    pub reason: Option<String>,
}

/// Summary row of a run for listings.
#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    pub id: Uuid,
    pub workflow: String,
    pub workflow_version: i32,
    pub state: RunState,
    pub cursor: i32,
    pub attempt: i32,
    pub queue: String,
    pub error: Option<String>,
    pub output: Option<Value>,
    pub input: Value,
    pub fence: i64,
    pub replays: i32,
    pub cancel_requested_by: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub stuck: bool,
}

const SUMMARY_COLUMNS: &str =
    "id, workflow, workflow_version, state, cursor, attempt, queue, error, output, input,
    fence, replays, cancel_requested_by, created_at, updated_at, finished_at,
    (state NOT IN ('succeeded', 'failed', 'cancelled') AND stuck_after < now()) AS stuck";

fn summary(row: sqlx::postgres::PgRow) -> Result<RunSummary, sqlx::Error> {
    Ok(RunSummary {
        id: row.try_get("id")?,
        workflow: row.try_get("workflow")?,
        workflow_version: row.try_get("workflow_version")?,
        state: parse_state(row.try_get("state")?)?,
        cursor: row.try_get("cursor")?,
        attempt: row.try_get("attempt")?,
        queue: row.try_get("queue")?,
        error: row.try_get("error")?,
        output: row.try_get("output")?,
        input: row.try_get("input")?,
        fence: row.try_get("fence")?,
        replays: row.try_get("replays")?,
        cancel_requested_by: row.try_get("cancel_requested_by")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        finished_at: row.try_get("finished_at")?,
        stuck: row.try_get::<Option<bool>, _>("stuck")?.unwrap_or(false),
    })
}

pub async fn get_run(pool: &PgPool, run_id: Uuid) -> Result<Option<RunSummary>, sqlx::Error> {
    let row = sqlx::query(&format!("SELECT {SUMMARY_COLUMNS} FROM runs WHERE id = $1"))
        .bind(run_id)
        .fetch_optional(pool)
        .await?;
    row.map(summary).transpose()
}

/// Filter for [`list_runs`]; every field optional.
#[derive(Debug, Clone, Default)]
pub struct RunFilter {
    pub state: Option<RunState>,
    pub workflow: Option<String>,
    pub stuck: Option<bool>,
    pub limit: Option<i64>,
}

pub async fn list_runs(pool: &PgPool, filter: &RunFilter) -> Result<Vec<RunSummary>, sqlx::Error> {
    let rows = sqlx::query(&format!(
        "SELECT {SUMMARY_COLUMNS} FROM runs
         WHERE ($1::text IS NULL OR state = $1)
           AND ($2::text IS NULL OR workflow = $2)
           AND ($3::bool IS NULL OR
                (state NOT IN ('succeeded', 'failed', 'cancelled') AND stuck_after < now()) = $3)
         ORDER BY created_at DESC LIMIT $4"
    ))
    .bind(filter.state.map(RunState::as_str))
    .bind(&filter.workflow)
    .bind(filter.stuck)
    .bind(filter.limit.unwrap_or(100))
    .fetch_all(pool)
    .await?;
    rows.into_iter().map(summary).collect()
}

/// One step of a run as operators see it.
#[derive(Debug, Clone, Serialize)]
pub struct StepRecord {
    pub index: i32,
    pub step: String,
    pub output: Option<Value>,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub polls: i32,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub compensated_at: Option<DateTime<Utc>>,
    pub compensation_error: Option<String>,
}

pub async fn steps(pool: &PgPool, run_id: Uuid) -> Result<Vec<StepRecord>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT step_index, step, output, attempts, last_error, polls, started_at, finished_at,
                compensated_at, compensation_error
         FROM step_checkpoints WHERE run_id = $1 ORDER BY step_index",
    )
    .bind(run_id)
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(|r| {
            Ok(StepRecord {
                index: r.try_get("step_index")?,
                step: r.try_get("step")?,
                output: r.try_get("output")?,
                attempts: r.try_get("attempts")?,
                last_error: r.try_get("last_error")?,
                polls: r.try_get("polls")?,
                started_at: r.try_get("started_at")?,
                finished_at: r.try_get("finished_at")?,
                compensated_at: r.try_get("compensated_at")?,
                compensation_error: r.try_get("compensation_error")?,
            })
        })
        .collect()
}

#[derive(Debug, Clone, Serialize)]
pub struct HistoryEvent {
    pub at: DateTime<Utc>,
    pub event: String,
    pub step: Option<String>,
    pub detail: Option<Value>,
}

/// A run's history, oldest first: its `submitted` event, read from the run
/// itself (migrations/0012_submitted_from_runs.sql), then its `run_history`.
pub async fn history(pool: &PgPool, run_id: Uuid) -> Result<Vec<HistoryEvent>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT at, event, step, detail FROM (
             SELECT 0 AS part, 0::bigint AS id, created_at AS at, 'submitted' AS event,
                    NULL::text AS step, jsonb_build_object('by', created_by) AS detail
             FROM runs WHERE id = $1
             UNION ALL
             SELECT 1, id, at, event, step, detail FROM run_history WHERE run_id = $1
         ) AS h
         ORDER BY part, id",
    )
    .bind(run_id)
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(|r| {
            Ok(HistoryEvent {
                at: r.try_get("at")?,
                event: r.try_get("event")?,
                step: r.try_get("step")?,
                detail: r.try_get("detail")?,
            })
        })
        .collect()
}

#[derive(Debug, Clone, Serialize)]
pub struct LogEntry {
    pub at: DateTime<Utc>,
    pub step: String,
    pub attempt: i32,
    pub stream: String,
    pub text: String,
}

pub async fn step_logs(pool: &PgPool, run_id: Uuid) -> Result<Vec<LogEntry>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT at, step, attempt, stream, text FROM step_logs WHERE run_id = $1 ORDER BY id",
    )
    .bind(run_id)
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(|r| {
            Ok(LogEntry {
                at: r.try_get("at")?,
                step: r.try_get("step")?,
                attempt: r.try_get("attempt")?,
                stream: r.try_get("stream")?,
                text: r.try_get("text")?,
            })
        })
        .collect()
}
