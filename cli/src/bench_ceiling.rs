//! `orrery-bench`'s statement ceiling: the engine's checkpoint statement
//! (`writer::write_batch`, the very statement the workers send) driven
//! straight from this program, with no engine around it: no steps, no
//! claims, no Redis, no worker process. Each connection owns a set of leased
//! runs and advances all of them by one no-op step per statement, as fast as
//! its commits come back.
//!
//! It answers "how much of the gap to the raw-INSERT baseline is PostgreSQL
//! executing our statement, and how much is the engine": the engine's
//! throughput at the same shape (connections × runs per statement) cannot
//! exceed this, since the workers add their own CPU on the same cores.

use chrono::Utc;
use orrery_workflows::{
    writer::{write_batch, Checkpoint, CheckpointKind, DispatchMark, RunUpdate},
    RunState,
};
use serde_json::json;
use sqlx::{Connection, Executor, PgConnection};
use uuid::Uuid;

use crate::bench_common::{backend_pid, timed};

const OWNER: &str = "orrery-bench-ceiling";

/// Steps/s and PostgreSQL backend CPU (µs) per step, with `conns`
/// connections each committing `per_stmt` steps per statement,
/// `statements` times.
pub async fn checkpoint_ceiling(
    db_url: &str,
    conns: usize,
    per_stmt: usize,
    statements: usize,
) -> anyhow::Result<(f64, f64)> {
    let mut owned = Vec::with_capacity(conns);
    let mut pids = Vec::with_capacity(conns);
    for _ in 0..conns {
        let mut conn = PgConnection::connect(db_url).await?;
        // As the engine's writer connection (config::connect_keyed).
        conn.execute(orrery_workflows::config::KEYED_SESSION)
            .await?;
        pids.push(backend_pid(&mut conn).await?);
        let runs: Vec<Uuid> = (0..per_stmt).map(|_| Uuid::now_v7()).collect();
        sqlx::query(
            "INSERT INTO runs (id, workflow, workflow_version, input, state, queue,
                               lease_owner, lease_until, fence)
             SELECT id, 'bench.ceiling', 1, '{}', 'running', 'bench', $2, now() + interval '1 hour', 1
             FROM unnest($1::uuid[]) AS id",
        )
        .bind(&runs)
        .bind(OWNER)
        .execute(&mut conn)
        .await?;
        // Warm-up: prepare the statement and plan it.
        advance(&mut conn, &runs, 0).await?;
        owned.push((conn, runs));
    }
    let (elapsed, pg_cpu) = timed(&pids, || {
        owned
            .into_iter()
            .map(|(mut conn, runs)| {
                tokio::spawn(async move {
                    for step in 1..=statements {
                        advance(&mut conn, &runs, step as i32).await?;
                    }
                    Ok(conn)
                })
            })
            .collect()
    })
    .await?;
    let steps = (conns * per_stmt * statements) as f64;
    Ok((steps / elapsed, pg_cpu * 1e6 / steps))
}

/// One statement: every run of `runs` checkpoints step `index` as done.
async fn advance(conn: &mut PgConnection, runs: &[Uuid], index: i32) -> anyhow::Result<()> {
    let updates: Vec<RunUpdate> = runs
        .iter()
        .map(|&run_id| RunUpdate {
            write_id: Uuid::now_v7(),
            resent: false,
            run_id,
            fence: 1,
            owner: OWNER.into(),
            state: RunState::Running,
            cursor: index + 1,
            attempt: 0,
            queue: "bench".into(),
            compensate_cursor: None,
            wake_in: None,
            release: false,
            dispatch: DispatchMark::Keep,
            error: None,
            output: None,
            stuck_in: Some(std::time::Duration::from_secs(300)),
            checkpoint: Some(Checkpoint {
                index,
                step: format!("s{index}"),
                kind: CheckpointKind::Done(json!(null)),
                started_at: Utc::now(),
            }),
            event: Some(("step_succeeded".into(), None)),
        })
        .collect();
    let refs: Vec<&RunUpdate> = updates.iter().collect();
    let applied = write_batch(&mut *conn, &refs).await?;
    anyhow::ensure!(
        applied.len() == runs.len(),
        "checkpoint ceiling: {} of {} runs written (fence or lease lost)",
        applied.len(),
        runs.len()
    );
    Ok(())
}
