//! Pieces the benchmark binaries share (each includes this module): the raw
//! PostgreSQL INSERT baseline every figure is compared with, CPU time read
//! from /proc, and scratch database and Redis namespace handling.
#![allow(dead_code)] // each binary uses its own subset

use std::collections::HashMap;
use std::time::Instant;

use serde_json::json;
use sqlx::{Connection, PgConnection, Row};
use uuid::Uuid;

/// The baseline's table, created in the benchmark's scratch database.
pub const RAW_TABLE_SQL: &str =
    "CREATE TABLE bench_raw (id uuid PRIMARY KEY, payload jsonb NOT NULL)";

/// Delete every Redis key of a benchmark's namespace.
pub async fn redis_cleanup(url: &str, namespace: &str) -> anyhow::Result<()> {
    let client = redis::Client::open(url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let mut cursor: u64 = 0;
    let mut keys = Vec::new();
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("*{namespace}*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await?;
        keys.extend(batch);
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    for chunk in keys.chunks(500) {
        let _: i64 = redis::cmd("DEL").arg(chunk).query_async(&mut conn).await?;
    }
    Ok(())
}

/// `url` with its database replaced by `db` (the scratch database a
/// benchmark creates next to the admin one it was given).
pub fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let authority_start = base.find("://").map(|i| i + 3).unwrap_or(0);
    let base = match base[authority_start..].find('/') {
        Some(slash) => &base[..authority_start + slash],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{db}?{q}"),
        None => format!("{base}/{db}"),
    }
}

/// Autocommit single-row inserts from `concurrency` connections: commits/s,
/// and CPU microseconds the PostgreSQL backends spent per commit.
pub async fn raw_inserts(
    url: &str,
    concurrency: usize,
    total: usize,
) -> anyhow::Result<(f64, f64)> {
    let per = (total / concurrency).max(1);
    let mut conns = Vec::with_capacity(concurrency);
    let mut pids = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let mut conn = PgConnection::connect(url).await?;
        pids.push(backend_pid(&mut conn).await?);
        // Prepare the statement and warm the connection up.
        for i in 0..5 {
            insert_raw(&mut conn, i).await?;
        }
        conns.push(conn);
    }
    let (elapsed, pg_cpu) = timed(&pids, || {
        conns
            .into_iter()
            .map(|mut conn| {
                tokio::spawn(async move {
                    for i in 0..per {
                        insert_raw(&mut conn, i).await?;
                    }
                    Ok(conn)
                })
            })
            .collect()
    })
    .await?;
    let commits = (per * concurrency) as f64;
    Ok((commits / elapsed, pg_cpu * 1e6 / commits))
}

/// The PostgreSQL backend serving `conn` (its CPU time is read from /proc).
pub async fn backend_pid(conn: &mut PgConnection) -> anyhow::Result<u32> {
    let pid: i32 = sqlx::raw_sql("SELECT pg_backend_pid()")
        .fetch_one(conn)
        .await?
        .try_get(0)?;
    Ok(pid as u32)
}

/// A timed load of one task per connection: starts `spawn()`'s tasks (each
/// hands its connection back), waits for all of them and closes their
/// connections. Returns the wall time in seconds and the CPU seconds the
/// backends `pids` used meanwhile.
pub async fn timed<F>(pids: &[u32], spawn: F) -> anyhow::Result<(f64, f64)>
where
    F: FnOnce() -> Vec<tokio::task::JoinHandle<anyhow::Result<PgConnection>>>,
{
    let cpu_before = cpu_of(pids);
    let start = Instant::now();
    let mut done = Vec::new();
    for task in spawn() {
        done.push(task.await??);
    }
    let elapsed = start.elapsed().as_secs_f64();
    let pg_cpu = cpu_delta(&cpu_before, &cpu_of(pids));
    for conn in done {
        conn.close().await?;
    }
    Ok((elapsed, pg_cpu))
}

/// CPU seconds (user + system) each process has used so far, from /proc
/// (ticks of USER_HZ = 100 on Linux); processes already gone are left out.
pub fn cpu_of(pids: &[u32]) -> HashMap<u32, f64> {
    pids.iter()
        .filter_map(|&pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
            let utime: f64 = fields.get(11)?.parse().ok()?;
            let stime: f64 = fields.get(12)?.parse().ok()?;
            Some((pid, (utime + stime) / 100.0))
        })
        .collect()
}

/// CPU seconds used between two samples (a process first seen in `after`
/// counts from zero).
pub fn cpu_delta(before: &HashMap<u32, f64>, after: &HashMap<u32, f64>) -> f64 {
    after
        .iter()
        .map(|(pid, t)| t - before.get(pid).copied().unwrap_or(0.0))
        .sum()
}

async fn insert_raw(conn: &mut PgConnection, i: usize) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO bench_raw (id, payload) VALUES ($1, $2)")
        .bind(Uuid::now_v7())
        .bind(json!({ "i": i }))
        .execute(conn)
        .await?;
    Ok(())
}

/// The raw-INSERT baseline at `concurrency`, measured before and after the
/// figures it is compared with: a short burst on a shared 2-core VM can be
/// a quarter off the rate the same server sustains a few seconds later, so
/// the reference is the mean of both, each `total` commits long, and both
/// are printed.
#[derive(Clone, Copy, Debug)]
pub struct Baseline {
    pub before: f64,
    pub after: f64,
}

impl Baseline {
    pub fn mean(&self) -> f64 {
        (self.before + self.after) / 2.0
    }

    pub fn describe(&self) -> String {
        format!(
            "{:.0} (mean of {:.0} before and {:.0} after)",
            self.mean(),
            self.before,
            self.after
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_urls_are_rewritten() {
        assert_eq!(
            with_database("postgres://postgres@127.0.0.1:5432/postgres", "b"),
            "postgres://postgres@127.0.0.1:5432/b"
        );
        assert_eq!(
            with_database("postgres://u:p@h/db?sslmode=disable", "b"),
            "postgres://u:p@h/b?sslmode=disable"
        );
        assert_eq!(with_database("postgres://h", "b"), "postgres://h/b");
    }
}
