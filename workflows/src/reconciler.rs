//! The reconciler: Redis may lose dispatches, PostgreSQL does not.
//!
//! Each pass re-dispatches every run that could run now (unfinished, no live
//! lease, due) and has not been dispatched for `redispatch_after`: runs whose
//! dispatch was lost with Redis, runs whose worker died (expired lease), runs
//! whose wake-up timer died with its process. Several schedulers may run it
//! at once: `FOR UPDATE SKIP LOCKED` and the `dispatched_at` stamp make each
//! run picked by one pass, and a duplicate dispatch is harmless anyway.
//!
//! Harmless, but not free: while a queue has a backlog its runs wait in
//! Redis longer than `redispatch_after`, and sending each of them again
//! every `redispatch_after` multiplied the backlog by the wait and made the
//! workers claim every copy. A queue's Redis list is first in, first out, so
//! every run dispatched after the oldest dispatch still waiting there is
//! waiting too; the pass re-sends only runs dispatched `redispatch_after`
//! before that oldest one (they left the list and were lost), or before now
//! when the list is empty.

use std::{sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use sqlx::{PgPool, Row};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{dispatch::Dispatcher, error::EngineError};

/// Runs re-dispatched by one pass at most (the rest wait for the next pass).
const BATCH: i64 = 1000;

/// Stamp and return the runs to re-dispatch. `waiting` gives, per queue
/// with a backlog, when its oldest waiting dispatch was pushed: runs of that
/// queue are re-sent only if dispatched `redispatch_after` before it.
pub async fn due_runs(
    pool: &PgPool,
    redispatch_after: Duration,
    waiting: &[(String, DateTime<Utc>)],
) -> Result<Vec<(Uuid, String)>, sqlx::Error> {
    let (queues, oldest): (Vec<&str>, Vec<DateTime<Utc>>) =
        waiting.iter().map(|(q, t)| (q.as_str(), *t)).unzip();
    let rows = sqlx::query(
        "UPDATE runs SET dispatched_at = now()
         WHERE id IN (
             SELECT r.id FROM runs r
             LEFT JOIN unnest($3::text[], $4::timestamptz[]) AS w(queue, oldest)
                    ON w.queue = r.queue
             WHERE r.state NOT IN ('succeeded', 'failed', 'cancelled')
               AND (r.lease_until IS NULL OR r.lease_until < now())
               AND (r.wake_at IS NULL OR r.wake_at <= now() OR r.cancel_requested_at IS NOT NULL)
               AND (r.dispatched_at IS NULL
                    OR r.dispatched_at < LEAST(now(), w.oldest) - make_interval(secs => $1))
             ORDER BY r.dispatched_at NULLS FIRST
             LIMIT $2
             FOR UPDATE OF r SKIP LOCKED)
         RETURNING id, queue",
    )
    .bind(redispatch_after.as_secs_f64())
    .bind(BATCH)
    .bind(queues)
    .bind(oldest)
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(|r| Ok((r.try_get("id")?, r.try_get("queue")?)))
        .collect()
}

/// For each of `queues` with dispatches not fetched yet, when the oldest
/// was pushed. A queue whose backlog cannot be read (Redis down) counts as
/// empty: its re-dispatches fail and the next pass tries again anyway.
pub async fn oldest_waiting(
    dispatcher: &dyn Dispatcher,
    queues: &[String],
) -> Vec<(String, DateTime<Utc>)> {
    let mut waiting = Vec::new();
    for queue in queues {
        match dispatcher.oldest_waiting(queue).await {
            Ok(None) => {}
            Ok(Some(at)) => waiting.push((queue.clone(), at)),
            Err(err) => {
                tracing::debug!(queue, error = %err, "queue backlog unknown; counted as empty");
            }
        }
    }
    waiting
}

/// One pass over the runs of every queue (`queues` are those whose backlog
/// is looked at); returns how many runs were re-dispatched.
pub async fn reconcile_once(
    pool: &PgPool,
    dispatcher: &dyn Dispatcher,
    queues: &[String],
    redispatch_after: Duration,
) -> Result<usize, EngineError> {
    let waiting = oldest_waiting(dispatcher, queues).await;
    let due = due_runs(pool, redispatch_after, &waiting).await?;
    // One push per queue (after a lost Redis, a pass re-sends up to BATCH
    // runs: two round trips per queue instead of two per run).
    let mut by_queue: std::collections::BTreeMap<&str, Vec<Uuid>> = Default::default();
    for (run_id, queue) in &due {
        by_queue.entry(queue.as_str()).or_default().push(*run_id);
    }
    let mut sent = 0;
    for (queue, run_ids) in by_queue {
        match dispatcher.dispatch_many(queue, &run_ids).await {
            Ok(()) => sent += run_ids.len(),
            Err(err) => {
                tracing::warn!(queue, runs = run_ids.len(), error = %err, "re-dispatch failed; a later pass retries");
                // Redis is likely down: no point trying the other queues now.
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
    queues: Vec<String>,
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
        if let Err(err) =
            reconcile_once(&pool, dispatcher.as_ref(), &queues, redispatch_after).await
        {
            tracing::warn!(error = %err, "reconciler pass failed");
        }
    }
}
