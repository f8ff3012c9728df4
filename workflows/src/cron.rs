//! Scheduled jobs of the scheduler process, guarded in PostgreSQL.
//!
//! Each job has a cron expression (with seconds, as the `cron` crate reads
//! them). A tick fires once however many schedulers run: the first to insert
//! `(job, tick)` into `schedule_ticks` runs it, the others skip it. Ticks
//! older than a minute at start-up are not caught up, so a restarted
//! scheduler does not replay a backlog.

use std::{
    collections::HashMap, future::Future, pin::Pin, str::FromStr, sync::Arc, time::Duration,
};

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

type JobFn =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<String, String>> + Send>> + Send + Sync>;

pub struct CronJob {
    pub name: String,
    pub schedule: cron::Schedule,
    run: JobFn,
}

impl CronJob {
    /// `expr` is a 6-field cron expression (`sec min hour dom month dow`).
    pub fn new<F, Fut>(name: &str, expr: &str, f: F) -> Result<Self, cron::error::Error>
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<String, String>> + Send + 'static,
    {
        Ok(CronJob {
            name: name.to_owned(),
            schedule: cron::Schedule::from_str(expr)?,
            run: Arc::new(move || Box::pin(f())),
        })
    }

    /// The most recent tick in `(now - window, now]`, if any.
    pub fn due_tick(&self, now: DateTime<Utc>, window: Duration) -> Option<DateTime<Utc>> {
        let from = now - chrono::Duration::from_std(window).unwrap_or_default();
        self.schedule.after(&from).take_while(|t| *t <= now).last()
    }
}

/// Claim a tick; `true` for exactly one caller across all schedulers.
pub async fn claim_tick(
    pool: &PgPool,
    job: &str,
    tick: DateTime<Utc>,
    owner: &str,
) -> Result<bool, sqlx::Error> {
    let row: Option<i32> = sqlx::query_scalar(
        "INSERT INTO schedule_ticks (job, tick, fired_by) VALUES ($1, $2, $3)
         ON CONFLICT DO NOTHING RETURNING 1",
    )
    .bind(job)
    .bind(tick)
    .bind(owner)
    .fetch_optional(pool)
    .await?;
    Ok(row.is_some())
}

pub async fn run(pool: PgPool, jobs: Vec<CronJob>, owner: String, shutdown: CancellationToken) {
    let mut last: HashMap<String, DateTime<Utc>> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let now = Utc::now();
        for job in &jobs {
            let Some(due) = job.due_tick(now, Duration::from_secs(60)) else {
                continue;
            };
            if last.get(&job.name) == Some(&due) {
                continue;
            }
            last.insert(job.name.clone(), due);
            match claim_tick(&pool, &job.name, due, &owner).await {
                Ok(true) => {
                    let (name, run) = (job.name.clone(), job.run.clone());
                    tokio::spawn(async move {
                        match run().await {
                            Ok(summary) => tracing::info!(job = name, summary, "cron job done"),
                            Err(error) => tracing::warn!(job = name, error, "cron job failed"),
                        }
                    });
                }
                Ok(false) => {
                    tracing::debug!(job = job.name, "tick already fired by another scheduler")
                }
                Err(err) => tracing::warn!(job = job.name, error = %err, "cannot claim tick"),
            }
        }
    }
}

/// Delete finished runs older than `days` with their checkpoints and history
/// (explicitly: those two tables have no foreign key, see migration 0005;
/// item checkpoints and step logs go by cascade).
pub async fn purge_finished_runs(pool: &PgPool, days: u32) -> Result<u64, sqlx::Error> {
    let deleted: i64 = sqlx::query_scalar(
        "WITH gone AS (DELETE FROM runs WHERE finished_at < now() - make_interval(days => $1) RETURNING id),
              ck AS (DELETE FROM step_checkpoints WHERE run_id IN (SELECT id FROM gone)),
              h AS (DELETE FROM run_history WHERE run_id IN (SELECT id FROM gone))
         SELECT count(*) FROM gone",
    )
    .bind(days as i32)
    .fetch_one(pool)
    .await?;
    Ok(deleted as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_due_tick_is_the_latest_one_within_the_window() {
        let job = CronJob::new("j", "0 */5 * * * *", || async { Ok(String::new()) }).unwrap();
        let now: DateTime<Utc> = "2026-01-01T10:07:30Z".parse().unwrap();
        assert_eq!(job.due_tick(now, Duration::from_secs(60)), None);
        assert_eq!(
            job.due_tick(now, Duration::from_secs(600)),
            Some("2026-01-01T10:05:00Z".parse().unwrap())
        );
    }
}
