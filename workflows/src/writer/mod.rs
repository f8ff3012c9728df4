//! The checkpoint writer: every transition a worker commits goes through here.
//!
//! A transition is one [`RunUpdate`]: the run's new state and cursor, the
//! step checkpoint and the history event, written by a single statement (one
//! round-trip, one commit) and only if the worker still holds the run's lease
//! and fencing token. Updates that arrive while a statement is in flight are
//! batched into the next statement, so concurrent steps share one commit:
//! round-trips, not fsync, are what bound throughput on small machines.
//!
//! The process' claims go through the same batches
//! ([`CheckpointWriter::claim`]): a claim waiting while a write is in flight
//! is made by the next write's statement, so it costs that statement's rows,
//! not a statement and a commit of its own.

mod advance;

pub use advance::is_advance;

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{PgConnection, PgPool, Row};
use uuid::Uuid;

use crate::{
    batch::{BatchStatement, Batcher, Failed},
    error::EngineError,
    state::RunState,
    store::{self, ClaimRequest, ClaimStatement, ClaimedRun},
};

/// Largest number of transitions (writes and claims) committed by one
/// statement.
const MAX_BATCH: usize = 128;

/// Statements that may be in flight at once (one connection each). One: on
/// a machine where the database shares the cores, fewer, larger commits win
/// (claims included: before session 11 they had 4 connections of their own,
/// and at 16 runs in flight made about as many commits as every checkpoint).
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

/// What one worker process asks its writer for.
// Moved once into the batch's channel and answered once: a box would add
// an allocation per transition to save a few bytes of a short-lived queue.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Transition {
    Write(RunUpdate),
    Claim(ClaimRequest),
}

/// The answer to a [`Transition`].
#[allow(clippy::large_enum_variant)] // as for `Transition`
#[derive(Debug)]
pub enum Outcome {
    /// Whether the update's fence and lease matched (it was written).
    Written(bool),
    /// The run, when it was claimable.
    Claimed(Option<ClaimedRun>),
}

/// Handle to the background task that batches and commits [`RunUpdate`]s
/// and claims.
#[derive(Clone)]
pub struct CheckpointWriter {
    batcher: Batcher<TransitionStatement>,
}

impl CheckpointWriter {
    /// The writer of the worker `owner`: its claims lease runs for `lease`,
    /// stuck if they make no progress for `stuck_in`.
    pub fn spawn(pool: PgPool, owner: &str, lease: Duration, stuck_in: Duration) -> Self {
        let statement = TransitionStatement {
            claims: ClaimStatement::new(owner, lease, stuck_in),
        };
        CheckpointWriter {
            batcher: Batcher::spawn(pool, statement, WRITERS, MAX_BATCH),
        }
    }

    /// Commit `update`; `Ok(false)` means the fence or lease no longer
    /// matched, so nothing was written and the caller has lost the run. A
    /// failed write is handed back (see [`Failed`]) so it can be sent again
    /// with `resent` set.
    pub async fn write(&self, update: RunUpdate) -> Result<bool, Failed<RunUpdate>> {
        match self.batcher.call(Transition::Write(update)).await {
            Ok(Outcome::Written(applied)) => Ok(applied),
            Ok(Outcome::Claimed(_)) => unreachable!("a write is answered as a write"),
            Err(Failed { error, request }) => Err(Failed {
                error,
                request: request.map(|r| match r {
                    Transition::Write(update) => update,
                    Transition::Claim(_) => unreachable!("a write is handed back as a write"),
                }),
            }),
        }
    }

    /// Take the run's lease if it is runnable and nobody holds a live lease.
    /// Increments the fencing token, so whoever held it before can no longer
    /// commit. `None`: not claimable (finished, leased, not yet due, unknown,
    /// or asked for twice in one batch: only the first asker gets it).
    ///
    /// `claim_id` names this claim across its sends: a claim sent again
    /// because the first send's answer was lost (the database went away
    /// after committing it) finds the lease it took itself and gets the run,
    /// instead of finding it leased and leaving it for the lease to expire.
    /// A new dispatch of a run this process holds is a new claim and is
    /// refused, as for any live lease.
    pub async fn claim(
        &self,
        run_id: Uuid,
        claim_id: Uuid,
    ) -> Result<Option<ClaimedRun>, EngineError> {
        let request = Transition::Claim(ClaimRequest { run_id, claim_id });
        match self.batcher.call(request).await {
            Ok(Outcome::Claimed(run)) => Ok(run),
            Ok(Outcome::Written(_)) => unreachable!("a claim is answered as a claim"),
            Err(failed) => Err(failed.error),
        }
    }
}

struct TransitionStatement {
    claims: ClaimStatement,
}

impl BatchStatement for TransitionStatement {
    type Request = Transition;
    type Answer = Outcome;
    const NAME: &'static str = "checkpoint writer";

    async fn execute(
        &self,
        conn: &mut PgConnection,
        requests: &[Transition],
    ) -> Result<Vec<Outcome>, sqlx::Error> {
        let mut updates: Vec<&RunUpdate> = Vec::with_capacity(requests.len());
        let mut claims: Vec<&ClaimRequest> = Vec::new();
        for r in requests {
            match r {
                Transition::Write(u) => updates.push(u),
                Transition::Claim(c) => claims.push(c),
            }
        }
        let (applied, claimed) = if claims.is_empty() {
            (write_batch(conn, &updates).await?, Vec::new())
        } else if updates.is_empty() {
            let claimed = self.claims.claim(conn, claims.iter().copied()).await?;
            (Vec::new(), claimed)
        } else {
            write_and_claim(conn, &updates, &self.claims, &claims).await?
        };
        let mut claimed = store::answer_claims(claims.iter().copied(), claimed).into_iter();
        Ok(requests
            .iter()
            .map(|r| match r {
                Transition::Write(u) => Outcome::Written(applied.contains(&u.run_id)),
                Transition::Claim(_) => {
                    Outcome::Claimed(claimed.next().expect("an answer per claim"))
                }
            })
            .collect())
    }
}

/// One statement writing `updates` and claiming `claims`: the write's CTEs,
/// then the claim's ([`store::claim_ctes`], which leave out any run this
/// statement writes), answered by one row per claimed run (at least one
/// row) each carrying the ids written. Returns the ids written (as
/// [`write_batch`]) and the runs claimed (a run asked for twice is claimed
/// once).
pub async fn write_and_claim(
    conn: &mut PgConnection,
    updates: &[&RunUpdate],
    claims_of: &ClaimStatement,
    claims: &[&ClaimRequest],
) -> Result<(Vec<Uuid>, Vec<ClaimedRun>), sqlx::Error> {
    let first = store::first_claims(claims.iter().copied());
    let forms = [
        ADVANCE_AND_CLAIM_SQL.as_str(),
        RESEND_AND_CLAIM_SQL.as_str(),
        WRITE_AND_CLAIM_SQL.as_str(),
    ];
    let rows = claims_of
        .bind(bound(updates, forms), &first)
        .fetch_all(conn)
        .await?;
    // Every row carries the ids written; a row without a run (`LEFT JOIN`
    // of no claimed run) carries only them.
    let written = match rows.first() {
        Some(row) => row
            .try_get::<Option<Vec<Uuid>>, _>("written")?
            .unwrap_or_default(),
        None => Vec::new(),
    };
    let mut claimed = Vec::with_capacity(rows.len());
    for row in &rows {
        if row.try_get::<Option<Uuid>, _>("id")?.is_some() {
            claimed.push(store::claimed_run(row)?);
        }
    }
    Ok((written, claimed))
}

/// Parameters of the write statements (bound by [`bind_updates`]).
const WRITE_PARAMS: usize = 25;

/// One statement for the whole batch (the advance statement when every
/// update is one, see [`advance`]); returns the ids whose fence matched.
pub async fn write_batch<'c, 'q, E>(
    db: E,
    updates: &[&'q RunUpdate],
) -> Result<Vec<Uuid>, sqlx::Error>
where
    E: sqlx::Executor<'c, Database = sqlx::Postgres>,
{
    written_ids(bound(updates, [advance::SQL, RESEND_SQL, WRITE_SQL]), db).await
}

/// The form of a write statement (`[advance, resend, first sends]`) that
/// `updates` need, with their parameters bound: the advance statement when
/// every update is one, the resend form when any update is sent again.
fn bound<'q>(
    updates: &[&'q RunUpdate],
    [advance, resend, write]: [&'q str; 3],
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    if advance::all(updates) {
        advance::bind(sqlx::query(advance), updates)
    } else if updates.iter().any(|u| u.resent) {
        bind_updates(sqlx::query(resend), updates)
    } else {
        bind_updates(sqlx::query(write), updates)
    }
}

/// Run a write statement and read the ids it answers (those written).
async fn written_ids<'c, 'q, E>(
    query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    db: E,
) -> Result<Vec<Uuid>, sqlx::Error>
where
    E: sqlx::Executor<'c, Database = sqlx::Postgres>,
{
    let rows = query.fetch_all(db).await?;
    rows.iter().map(|row| row.try_get("id")).collect()
}

/// [`write_batch`] with the general statement whatever the batch holds,
/// for the test that an advance writes through [`ADVANCE_SQL`] exactly what
/// it would write through this one.
#[doc(hidden)]
pub async fn write_batch_general(
    conn: &mut PgConnection,
    updates: &[&RunUpdate],
) -> Result<Vec<Uuid>, sqlx::Error> {
    written_ids(bind_updates(sqlx::query(WRITE_SQL), updates), conn).await
}

/// Bind the write statements' [`WRITE_PARAMS`] parameters for `updates`, in
/// order.
fn bind_updates<'q>(
    query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    updates: &[&'q RunUpdate],
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
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
    query
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
}

/// The batch as rows: one per update, the [`WRITE_PARAMS`] arrays bound by
/// [`bind_updates`] side by side.
macro_rules! write_values {
    () => {
        r#"unnest(
        $1::uuid[], $2::int8[], $3::text[], $4::text[], $5::int4[], $6::int4[], $7::text[],
        $8::int4[], $9::float8[], $10::bool[], $11::text[], $12::bool[], $13::text[],
        $14::jsonb[], $15::float8[], $16::int4[], $17::text[], $18::text[], $19::jsonb[],
        $20::text[], $21::timestamptz[], $22::text[], $23::jsonb[], $24::uuid[], $25::bool[]
    ) AS v(id, fence, owner, state, cursor, attempt, queue,
           comp_cursor, wake_in, release, dispatch, set_error, error,
           output, stuck_in, ck_index, ck_step, ck_kind, ck_output,
           ck_error, ck_started, ev, ev_detail, write_id, resent)"#
    };
}

/// The run update, checkpoint and history CTEs of both write statements.
///
/// The update reads the batch straight from `unnest` and its `RETURNING`
/// hands each written run's checkpoint and event to the two inserts: no
/// values CTE materialised and joined twice against the update's ids
/// (about 5 % less PostgreSQL CPU per step, docs/BENCHMARKS.md, "Session
/// 12").
macro_rules! write_rows {
    () => {
        concat!(
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
    FROM "#,
            write_values!(),
            r#"
    WHERE r.id = v.id AND r.fence = v.fence AND r.lease_owner = v.owner
      AND r.last_write IS DISTINCT FROM v.write_id
    RETURNING r.id, v.ck_index, v.ck_step, v.ck_kind, v.ck_output, v.ck_error,
              v.ck_started, v.ev, v.ev_detail
),
ck AS (
    INSERT INTO step_checkpoints AS s (run_id, step_index, step, output, attempts, last_error,
                                       polls, started_at, finished_at, compensated_at, compensation_error)
    SELECT u.id, u.ck_index, u.ck_step,
           CASE WHEN u.ck_kind = 'done' THEN u.ck_output END,
           CASE WHEN u.ck_kind IN ('done', 'failed') THEN 1 ELSE 0 END,
           CASE WHEN u.ck_kind = 'failed' THEN u.ck_error END,
           CASE WHEN u.ck_kind = 'polled' THEN 1 ELSE 0 END,
           u.ck_started,
           CASE WHEN u.ck_kind = 'done' THEN now() END,
           CASE WHEN u.ck_kind = 'compensated' THEN now() END,
           CASE WHEN u.ck_kind = 'compensation_failed' THEN u.ck_error END
    FROM u
    WHERE u.ck_index IS NOT NULL
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
    SELECT u.id, u.ev, u.ck_step, u.ev_detail
    FROM u
    WHERE u.ev IS NOT NULL
)
"#
        )
    };
}

/// The `again` CTE of the statements for a batch holding a write sent again.
macro_rules! resend_again {
    () => {
        r#"
-- Writes sent again after a lost answer whose first send committed (the
-- statement sees the rows as they were before it: no write of its own).
again AS (
    SELECT r.id
    FROM unnest($1::uuid[], $2::int8[], $24::uuid[], $25::bool[]) AS a(id, fence, write_id, resent)
    JOIN runs r ON r.id = a.id
    WHERE a.resent AND r.last_write = a.write_id AND r.fence = a.fence
),
"#
    };
}

/// The statement for batches of first sends (public for the test of its plan).
pub const WRITE_SQL: &str = concat!("WITH", write_rows!(), "SELECT id FROM u\n");

/// The statement for a batch holding a write sent again: also answers
/// "applied" for those whose first send had committed (`again`). Kept apart
/// so that the common statement does not pay for the extra join.
pub const RESEND_SQL: &str = concat!(
    "WITH",
    resend_again!(),
    write_rows!(),
    "SELECT id FROM u UNION ALL SELECT id FROM again\n"
);

/// [`write_and_claim`]'s statement from the given write CTEs (taking
/// `params` parameters, the written ids first) and the ids they answer.
fn with_claims(write_ctes: &str, params: usize, written: &str) -> String {
    format!(
        "{write_ctes}, {claims}
         SELECT w.written, {columns}
         FROM (SELECT array_agg(id) AS written FROM ({written}) x) w LEFT JOIN c ON true",
        claims = store::claim_ctes(params + 1, Some("$1::uuid[]")),
        columns = store::CLAIMED_COLUMNS,
    )
}

/// [`write_and_claim`]'s statement for a batch of first sends (public for
/// the test of its plan).
pub static WRITE_AND_CLAIM_SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    with_claims(
        concat!("WITH", write_rows!()),
        WRITE_PARAMS,
        "SELECT id FROM u",
    )
});

/// [`write_and_claim`]'s statement for a batch holding a write sent again.
pub static RESEND_AND_CLAIM_SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    with_claims(
        concat!("WITH", resend_again!(), write_rows!()),
        WRITE_PARAMS,
        "SELECT id FROM u UNION ALL SELECT id FROM again",
    )
});

/// [`write_and_claim`]'s statement for a batch of advances
/// ([`advance::all`]; public for the test of its plan).
pub static ADVANCE_AND_CLAIM_SQL: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| with_claims(advance::CTES, advance::PARAMS, "SELECT id FROM u"));

/// The advance statement ([`advance`]; public for the test of its plan).
pub const ADVANCE_SQL: &str = advance::SQL;
