//! The reconciler: Redis may lose dispatches, PostgreSQL does not.
//!
//! Each pass re-dispatches every run that could run now (unfinished, no live
//! lease, due) and has not been dispatched for `redispatch_after`: runs whose
//! dispatch was lost with Redis, runs whose worker died (expired lease), runs
//! whose wake-up timer died with its process. Several schedulers may run it
//! at once: `FOR UPDATE SKIP LOCKED` and the `dispatched_at` stamp make each
//! run picked by one pass, and a duplicate dispatch is harmless anyway.

use std::{sync::Arc, time::Duration};

use sqlx::{PgPool, Row};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{dispatch::Dispatcher, error::EngineError};

/// Runs re-dispatched by one pass at most (the rest wait for the next pass).
const BATCH: i64 = 1000;

/// Stamp and return the runs to re-dispatch.
pub async fn due_runs(
    pool: &PgPool,
    redispatch_after: Duration,
) -> Result<Vec<(Uuid, String)>, sqlx::Error> {
    let rows = sqlx::query(
        "UPDATE runs SET dispatched_at = now()
         WHERE id IN (
             SELECT id FROM runs r
             WHERE r.state NOT IN ('succeeded', 'failed', 'cancelled')
               AND (r.lease_until IS NULL OR r.lease_until < now())
               AND (r.wake_at IS NULL OR r.wake_at <= now() OR r.cancel_requested_at IS NOT NULL)
               AND (r.dispatched_at IS NULL OR r.dispatched_at < now() - make_interval(secs => $1))
             ORDER BY r.dispatched_at NULLS FIRST
             LIMIT $2
             FOR UPDATE SKIP LOCKED)
         RETURNING id, queue",
    )
    .bind(redispatch_after.as_secs_f64())
    .bind(BATCH)
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(|r| Ok((r.try_get("id")?, r.try_get("queue")?)))
        .collect()
}

/// One pass; returns how many runs were re-dispatched.
pub async fn reconcile_once(
    pool: &PgPool,
    dispatcher: &dyn Dispatcher,
    redispatch_after: Duration,
) -> Result<usize, EngineError> {
    let due = due_runs(pool, redispatch_after).await?;
    let mut sent = 0;
    for (run_id, queue) in &due {
        match dispatcher.dispatch(queue, *run_id).await {
            Ok(()) => sent += 1,
            Err(err) => {
                tracing::warn!(%run_id, queue, error = %err, "re-dispatch failed; next pass retries");
                // Redis is likely down: no point trying the rest now.
                break;
            }
        }
    }
    if sent > 0 {
        tracing::info!(count = sent, "re-dispatched runs");
    }
    Ok(sent)
}

/// Run passes every `every` until shutdown.
pub async fn run(
    pool: PgPool,
    dispatcher: Arc<dyn Dispatcher>,
    redispatch_after: Duration,
    every: Duration,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        if let Err(err) = reconcile_once(&pool, dispatcher.as_ref(), redispatch_after).await {
            tracing::warn!(error = %err, "reconciler pass failed");
        }
    }
}
