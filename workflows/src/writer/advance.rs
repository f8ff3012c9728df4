//! The checkpoint statement of the commonest transitions: a step done and
//! its run going on inline (still `running`, same lease, same queue), or a
//! run's last step done and the run succeeding with its result.
//!
//! Every write of a run of no-op steps is of this kind. The general
//! statement ([`super::WRITE_SQL`]) binds 25 arrays and evaluates a CASE
//! for every field any transition may set; PostgreSQL compiles each of those
//! expressions again at every execution, whatever the batch holds. A batch
//! made only of advances takes this statement instead: 14 arrays, the
//! fields an advance sets, the same rows written. Measured with
//! `pg_stat_statements` over `orrery-bench` (docs/BENCHMARKS.md, "Session
//! 12"): 194 µs per execution against 334 µs for the general statement
//! with about as many rows.

use serde_json::Value;
use sqlx::{postgres::PgArguments, query::Query, Postgres};

use super::{CheckpointKind, DispatchMark, RunUpdate};
use crate::state::RunState;

/// Event of a step done: the only one an advance records.
const STEP_SUCCEEDED: &str = "step_succeeded";

/// Whether `u` is an advance: the general statement would write exactly
/// what [`SQL`] writes for it.
pub fn is_advance(u: &RunUpdate) -> bool {
    let step_done = !u.resent
        && u.compensate_cursor.is_none()
        && u.wake_in.is_none()
        && u.dispatch == DispatchMark::Keep
        && matches!(
            &u.checkpoint,
            Some(c) if matches!(c.kind, CheckpointKind::Done(_))
        )
        && matches!(&u.event, Some((name, None)) if name == STEP_SUCCEEDED);
    let goes_on =
        u.state == RunState::Running && !u.release && u.error.is_none() && u.output.is_none();
    step_done && (goes_on || is_last(u))
}

/// The run's last step done: it succeeds with its result, the lease given
/// back and its error cleared.
fn is_last(u: &RunUpdate) -> bool {
    u.state == RunState::Succeeded && u.release && u.error == Some(None) && u.output.is_some()
}

/// Whether a whole batch can be written by [`SQL`].
pub(super) fn all(updates: &[&RunUpdate]) -> bool {
    !updates.is_empty() && updates.iter().all(|u| is_advance(u))
}

/// Parameters of [`SQL`] (bound by [`bind`]); the ids are `$1`, as in the
/// general statement, so the claim CTEs leave them out the same way.
pub(super) const PARAMS: usize = 14;

/// The run update, checkpoint and history CTEs for a batch of advances.
/// What the general statement sets from fields an advance leaves at their
/// defaults (no wake-up, no compensation) is written as constants, what it
/// keeps (the dispatch mark) is not touched, and only a run's last step
/// (`v.last`) gives the lease back, sets the result, clears the error and
/// finishes the run. `make_interval` is strict: no `stuck_in`, no
/// `stuck_after`, as in the general statement.
macro_rules! advance_rows {
    () => {
        r#"
u AS (
    UPDATE runs r SET
        state = CASE WHEN v.last THEN 'succeeded' ELSE 'running' END,
        cursor = v.cursor,
        attempt = v.attempt,
        queue = v.queue,
        compensate_cursor = NULL,
        wake_at = NULL,
        lease_owner = CASE WHEN v.last THEN NULL ELSE r.lease_owner END,
        lease_until = CASE WHEN v.last THEN NULL ELSE r.lease_until END,
        error = CASE WHEN v.last THEN NULL ELSE r.error END,
        output = CASE WHEN v.last THEN v.output ELSE r.output END,
        stuck_after = now() + make_interval(secs => v.stuck_in),
        finished_at = CASE WHEN v.last THEN now() END,
        updated_at = now(),
        last_write = v.write_id
    FROM unnest($1::uuid[], $2::int8[], $3::text[], $4::int4[], $5::int4[], $6::text[],
                $7::float8[], $8::int4[], $9::text[], $10::jsonb[], $11::timestamptz[],
                $12::uuid[], $13::bool[], $14::jsonb[])
         AS v(id, fence, owner, cursor, attempt, queue, stuck_in, ck_index, ck_step,
              ck_output, ck_started, write_id, last, output)
    WHERE r.id = v.id AND r.fence = v.fence AND r.lease_owner = v.owner
      AND r.last_write IS DISTINCT FROM v.write_id
    RETURNING r.id, v.ck_index, v.ck_step, v.ck_output, v.ck_started
),
ck AS (
    INSERT INTO step_checkpoints AS s (run_id, step_index, step, output, attempts,
                                       started_at, finished_at)
    SELECT u.id, u.ck_index, u.ck_step, u.ck_output, 1, u.ck_started, now()
    FROM u
    ON CONFLICT (run_id, step_index) DO UPDATE SET
        output = EXCLUDED.output,
        attempts = s.attempts + 1,
        started_at = COALESCE(s.started_at, EXCLUDED.started_at),
        finished_at = EXCLUDED.finished_at
),
h AS (
    INSERT INTO run_history (run_id, event, step)
    SELECT u.id, 'step_succeeded', u.ck_step
    FROM u
)
"#
    };
}

/// The statement for a batch of advances (public for the test of its plan).
pub const SQL: &str = concat!("WITH", advance_rows!(), "SELECT id FROM u\n");

/// [`SQL`]'s CTEs and what they answer, for [`super::with_claims`].
pub(super) const CTES: &str = concat!("WITH", advance_rows!());

/// Bind [`SQL`]'s [`PARAMS`] parameters for `updates` (all advances).
pub(super) fn bind<'q>(
    query: Query<'q, Postgres, PgArguments>,
    updates: &[&'q RunUpdate],
) -> Query<'q, Postgres, PgArguments> {
    let mut ck_index = Vec::with_capacity(updates.len());
    let mut ck_step = Vec::with_capacity(updates.len());
    let mut ck_output: Vec<&Value> = Vec::with_capacity(updates.len());
    let mut ck_started = Vec::with_capacity(updates.len());
    for u in updates {
        let ck = u.checkpoint.as_ref().expect("an advance has a checkpoint");
        let CheckpointKind::Done(output) = &ck.kind else {
            unreachable!("an advance checkpoints a step done")
        };
        ck_index.push(ck.index);
        ck_step.push(ck.step.as_str());
        ck_output.push(output);
        ck_started.push(ck.started_at);
    }
    query
        .bind(updates.iter().map(|u| u.run_id).collect::<Vec<_>>())
        .bind(updates.iter().map(|u| u.fence).collect::<Vec<_>>())
        .bind(updates.iter().map(|u| u.owner.as_str()).collect::<Vec<_>>())
        .bind(updates.iter().map(|u| u.cursor).collect::<Vec<_>>())
        .bind(updates.iter().map(|u| u.attempt).collect::<Vec<_>>())
        .bind(updates.iter().map(|u| u.queue.as_str()).collect::<Vec<_>>())
        .bind(
            updates
                .iter()
                .map(|u| u.stuck_in.map(|d| d.as_secs_f64()))
                .collect::<Vec<_>>(),
        )
        .bind(ck_index)
        .bind(ck_step)
        .bind(ck_output)
        .bind(ck_started)
        .bind(updates.iter().map(|u| u.write_id).collect::<Vec<_>>())
        .bind(updates.iter().map(|u| is_last(u)).collect::<Vec<_>>())
        .bind(
            updates
                .iter()
                .map(|u| u.output.as_ref())
                .collect::<Vec<_>>(),
        )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        error::StepError,
        lifecycle::{self, fixture::*},
    };
    use chrono::Utc;
    use serde_json::json;

    #[test]
    fn a_step_done_and_continued_inline_or_the_last_one_is_an_advance_and_nothing_else_is() {
        let (wf, t, now) = (workflow(), timing(), Utc::now());
        // Step "b" then "c", both on q2: the run goes on inline.
        let inline = cursor(RunState::Running, 1, "q2");
        let (u, next) = lifecycle::step_done(&inline, &wf, json!({"k": 1}), now, t);
        assert_eq!(next, lifecycle::Next::Continue);
        assert!(is_advance(&u), "{u:?}");
        assert!(
            !is_advance(&RunUpdate {
                resent: true,
                ..u.clone()
            }),
            "a resend takes the general statement"
        );
        // The last step: the run succeeds (result, lease released).
        let last = cursor(RunState::Running, 2, "q2");
        let (u, next) = lifecycle::step_done(&last, &wf, json!(1), now, t);
        assert_eq!(next, lifecycle::Next::Finished);
        assert!(is_advance(&u), "{u:?}");
        // "a" then "b" on another queue: handed over.
        let handoff = cursor(RunState::Running, 0, "q1");
        let (u, _) = lifecycle::step_done(&handoff, &wf, json!(1), now, t);
        assert!(!is_advance(&u), "{u:?}");
        // A failed attempt, a parked run.
        let (u, _) = lifecycle::step_failed(&inline, &wf, &StepError::retryable("x"), now, t);
        assert!(!is_advance(&u), "{u:?}");
        let (u, _) =
            lifecycle::step_waiting(&inline, &wf, std::time::Duration::from_secs(1), now, t);
        assert!(!is_advance(&u), "{u:?}");
    }
}
