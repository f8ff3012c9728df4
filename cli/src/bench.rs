#![allow(clippy::print_stdout)]
//! `orrery-bench`: how fast the engine drives no-op steps, measured against
//! what the same PostgreSQL does with bare single-row commits.
//!
//! Everything runs against a fresh database `orrery_bench_<random>` (dropped
//! at the end, `WITH (FORCE)`) and a fresh Redis namespace, with real
//! `orrery-worker` processes (the binary next to this one, started with
//! `ORRERY_TEST_WORKFLOWS=true --queues bench`, stopped with SIGTERM).
//!
//! Phases, in order:
//!
//! 1. **Baseline**: autocommit `INSERT INTO bench_raw (id uuid PK, payload jsonb)`
//!    from 1, 4 and `--concurrency` connections (each its own connection, no
//!    pool): one round-trip and one commit per row, the ceiling any engine
//!    write path on this PostgreSQL is held to. Then the **statement
//!    ceiling** (`bench_ceiling.rs`): the checkpoint writer's statement sent
//!    straight from this program at the shapes of phases 4 and 5 (1
//!    connection × `--concurrency` steps per statement, `--workers`
//!    connections × `--concurrency / --workers`), with no engine: what
//!    PostgreSQL alone allows for that statement, so the engine's own share
//!    of the gap to the baseline shows.
//! 2. **Submission cost**: `--runs` runs of `bench.noop10` submitted with no
//!    worker running; the database's commit counter (`pg_stat_database.xact_commit`)
//!    before and after gives the commits one `Engine::submit` costs.
//! 3. **Wire counts**: one worker, connected to PostgreSQL through a counting
//!    proxy inside this process, drains those runs (`--concurrency` in
//!    flight), then the same with 1 run in flight (`--runs / 10` runs). The
//!    proxy parses the PostgreSQL protocol and counts every round-trip (each
//!    `ReadyForQuery`) and what it was: a statement, a prepare, or a bare
//!    `Sync` (sqlx's pool pings a connection when it is checked out and again
//!    when it is returned). Commits are counted both by the proxy (a statement
//!    after which the session is idle, without error) and by
//!    `pg_stat_database`. The proxy does not count as commits the statements
//!    that only set a session up (`SET`, `LISTEN`, `UNLISTEN`, sent once by
//!    each connection the worker opens: they write no data and are no
//!    per-step cost); it prints how many there were. The proxy adds a hop, so this
//!    phase's speed is not reported.
//! 4. **Throughput, 1 worker**: a worker with `ORRERY_WORKER_CONCURRENCY=--concurrency`
//!    (so at most that many runs in flight), warmed up; then `--runs` runs of
//!    `bench.noop10` are submitted at once (8 submits at a time) and left to
//!    queue. steps/s = runs × 10 / (last `finished_at` − PostgreSQL's
//!    `clock_timestamp()` taken just before the first submit). Commits per
//!    step come from `pg_stat_database` (read once every connection to the
//!    database is closed, so every backend has flushed its counters), minus
//!    the submissions (phase 2) and this program's own statements (counted),
//!    over the timed and warm-up steps; they are cross-checked against the
//!    rows: `runs.fence` counts claims, and the distinct
//!    `step_checkpoints.finished_at` values count the checkpoint writer's
//!    statements (every row one statement writes carries that statement's
//!    `now()`). CPU time of the workers, of the PostgreSQL backends serving
//!    the database and of this program is read from `/proc` around the timed
//!    window.
//! 5. **Throughput, N workers** (`--workers`, 4): the same with N processes
//!    at `--concurrency / N` each, so total in-flight runs stay equal.
//! 6. **Latency**: one idle worker; `--latency-runs` runs of `bench.noop1`
//!    submitted one at a time (each waited for, then 2–5 ms idle). Latency =
//!    the step's `started_at` (stamped by the worker) − `SELECT
//!    clock_timestamp()` taken by this program right before calling `submit`,
//!    so it covers everything a caller's submit does (pool checkout, insert
//!    and commit, Redis push and wake-up) and then the worker's fetch and
//!    claim; the query's own return trip (well under 0.1 ms) is included too.
//!    Both clocks are this host's clock. `runs.created_at` (the insert's
//!    `now()`) would leave out the caller's pool checkout and statement
//!    send; the figure measured from it is printed alongside.
//!
//! The end of the output compares the figures with the targets: at most 1
//! commit and 2 round-trips per no-op step, engine steps/s at least 50% of
//! raw INSERT commits/s at equal concurrency, p50 submission-to-start under
//! 10 ms.
//!
//! Keep the machine otherwise idle for meaningful figures.

mod bench_ceiling;
mod bench_common;

use bench_common::{
    cpu_delta, cpu_of, raw_inserts, redis_cleanup, with_database, Baseline, RAW_TABLE_SQL,
};
use std::{
    collections::{HashMap, VecDeque},
    path::PathBuf,
    process::Stdio,
    str::FromStr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use chrono::{DateTime, Utc};
use clap::Parser;
use futures::{StreamExt, TryStreamExt};
use orrery_workers::Runtime;
use orrery_workflows::{EngineConfig, MIGRATOR};
use serde_json::json;
use sqlx::{
    postgres::{PgConnectOptions, PgPoolOptions},
    Connection, PgConnection, Row,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    process::{Child, Command},
};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "orrery-bench",
    about = "Engine no-op step throughput, commits and round-trips per step, and submission latency, against a raw-INSERT baseline"
)]
struct Args {
    /// Runs of `bench.noop10` (10 no-op steps each) per throughput phase.
    #[arg(long, default_value_t = 2000)]
    runs: usize,
    /// Runs in flight at once (total worker concurrency), and the baseline's
    /// connection count it is compared with.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// A database on the server where the benchmark database is created.
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/postgres")]
    database_admin_url: String,
    #[arg(
        long,
        env = "ORRERY_REDIS_URL",
        default_value = "redis://127.0.0.1:6379"
    )]
    redis_url: String,
    /// Rows inserted per baseline measurement at `--concurrency` (measured
    /// before and after the throughput phases); c=1 and c=4 insert a fifth.
    /// The default matches the steps of one throughput phase.
    #[arg(long, default_value_t = 20000)]
    raw_inserts: usize,
    /// Runs of `bench.noop1` in the latency phase.
    #[arg(long, default_value_t = 200)]
    latency_runs: usize,
    /// Worker processes in the multi-worker phase.
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// Give up on a phase whose runs have not all succeeded by then.
    #[arg(long, default_value_t = 120)]
    deadline_secs: u64,
}

/// What every phase needs.
struct Ctx {
    args: Args,
    db_name: String,
    db_url: String,
    namespace: String,
    worker_bin: PathBuf,
    log_dir: PathBuf,
    /// Connection to the admin database: reads `pg_stat_*` without touching
    /// the benchmark database's counters.
    admin: tokio::sync::Mutex<PgConnection>,
    deadline: Duration,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.runs == 0 || args.concurrency == 0 || args.workers == 0 {
        bail!("--runs, --concurrency and --workers must be at least 1");
    }
    let worker_bin = std::env::current_exe()?
        .parent()
        .context("the benchmark binary has no parent directory")?
        .join("orrery-worker");
    if !worker_bin.exists() {
        bail!(
            "{} not found: build it next to orrery-bench (cargo build --release -p orrery-workers)",
            worker_bin.display()
        );
    }
    let suffix = Uuid::new_v4().simple().to_string()[..10].to_owned();
    let db_name = format!("orrery_bench_{suffix}");
    let namespace = format!("orrery_bench_{suffix}");
    let log_dir = std::env::temp_dir().join(&db_name);
    std::fs::create_dir_all(&log_dir)?;
    let mut admin = PgConnection::connect(&args.database_admin_url)
        .await
        .with_context(|| format!("cannot connect to {}", args.database_admin_url))?;
    sqlx::raw_sql(&format!("CREATE DATABASE \"{db_name}\""))
        .execute(&mut admin)
        .await?;
    let ctx = Ctx {
        db_url: with_database(&args.database_admin_url, &db_name),
        deadline: Duration::from_secs(args.deadline_secs),
        args,
        db_name,
        namespace,
        worker_bin,
        log_dir,
        admin: tokio::sync::Mutex::new(admin),
    };
    println!(
        "orrery-bench: database {}, Redis namespaces {}_<phase>, worker logs in {}",
        ctx.db_name,
        ctx.namespace,
        ctx.log_dir.display()
    );
    let result = run(&ctx).await;
    // Clean up whatever happened.
    let mut admin = ctx.admin.lock().await;
    if let Err(err) = sqlx::raw_sql(&format!(
        "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
        ctx.db_name
    ))
    .execute(&mut *admin)
    .await
    {
        println!("warning: could not drop database {}: {err}", ctx.db_name);
    }
    if let Err(err) = redis_cleanup(&ctx.args.redis_url, &ctx.namespace).await {
        println!(
            "warning: could not delete Redis keys of {}: {err:#}",
            ctx.namespace
        );
    }
    match &result {
        Ok(()) => {
            let _ = std::fs::remove_dir_all(&ctx.log_dir);
        }
        Err(_) => println!("worker logs kept in {}", ctx.log_dir.display()),
    }
    result
}

async fn run(ctx: &Ctx) -> anyhow::Result<()> {
    let args = &ctx.args;
    let started = Instant::now();
    {
        let pool = PgPoolOptions::new()
            .max_connections(2)
            .connect(&ctx.db_url)
            .await?;
        MIGRATOR.run(&pool).await?;
        sqlx::raw_sql(RAW_TABLE_SQL).execute(&pool).await?;
        pool.close().await;
    }
    // What opening (and closing) one connection adds to the commit counter.
    let conn_overhead = {
        let before = xact_commits(ctx).await?;
        PgConnection::connect(&ctx.db_url).await?.close().await?;
        xact_commits(ctx).await? - before
    };

    // 1. Baseline.
    let mut levels = vec![1, 4, args.concurrency];
    levels.sort_unstable();
    levels.dedup();
    let mut baseline = Vec::new();
    let mut base_cpu = f64::NAN;
    for &c in &levels {
        let total = if c == args.concurrency {
            args.raw_inserts
        } else {
            (args.raw_inserts / 5).max(c)
        };
        let (rate, cpu_us) = raw_inserts(&ctx.db_url, c, total).await?;
        println!(
            "[baseline] c={c:<3} {rate:>8.0} INSERT commits/s over {total} commits; PostgreSQL backends used {cpu_us:.0} µs CPU per commit"
        );
        if c == args.concurrency {
            base_cpu = cpu_us;
        }
        baseline.push((c, rate));
    }

    // 1b. The checkpoint statement alone, at the shapes of the two
    // throughput phases.
    let per = (args.concurrency / args.workers).max(1);
    let mut ceilings = Vec::new();
    for (conns, per_stmt) in [(1, args.concurrency), (args.workers, per)] {
        let statements = (args.runs * 10 / (conns * per_stmt)).max(10);
        let (rate, cpu_us) =
            bench_ceiling::checkpoint_ceiling(&ctx.db_url, conns, per_stmt, statements).await?;
        println!(
            "[ceiling]  {conns} connection(s) x {per_stmt} steps per checkpoint statement, no engine: {rate:>6.0} steps/s over {} steps; PostgreSQL backends used {cpu_us:.0} µs CPU per step",
            conns * per_stmt * statements
        );
        ceilings.push(rate);
    }

    // 2. and 3. Submission cost, then wire counts: a worker through the
    // counting proxy drains the submitted runs, at full and at 1 run in flight.
    let wire = wire_phase(ctx, "wire", args.runs, args.concurrency, conn_overhead).await?;
    let commits_per_submit = wire.commits_per_submit;
    let wire1 = wire_phase(ctx, "wire1", (args.runs / 10).max(10), 1, conn_overhead).await?;

    // 4. and 5. Throughput.
    let one = throughput_phase(
        ctx,
        "tp1",
        1,
        args.concurrency,
        commits_per_submit,
        conn_overhead,
    )
    .await?;
    let many = throughput_phase(
        ctx,
        "tp4",
        args.workers,
        per,
        commits_per_submit,
        conn_overhead,
    )
    .await?;

    // The c=--concurrency baseline again, right after the phases it is
    // compared with.
    let (after, _) = raw_inserts(&ctx.db_url, args.concurrency, args.raw_inserts).await?;
    println!(
        "[baseline] c={:<3} {after:>8.0} INSERT commits/s over {} commits (after the throughput phases)",
        args.concurrency, args.raw_inserts
    );
    let before = baseline
        .iter()
        .find(|(c, _)| *c == args.concurrency)
        .map(|(_, r)| *r)
        .unwrap_or(f64::NAN);
    let base = Baseline { before, after };
    let base_eq = base.mean();

    // 6. Latency.
    let lat = latency_phase(ctx).await?;

    // What the engine's writes did to its tables over the whole run (read
    // once every backend has exited, so the counters are flushed).
    xact_commits(ctx).await?;
    let table_stats = {
        let mut conn = PgConnection::connect(&ctx.db_url).await?;
        let rows = sqlx::raw_sql(
            "SELECT relname::text, n_tup_ins, n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables
             WHERE relname IN ('runs', 'step_checkpoints', 'run_history') ORDER BY relname DESC",
        )
        .fetch_all(&mut conn)
        .await?;
        conn.close().await?;
        rows.iter()
            .map(|r| {
                let (name, ins, upd, hot): (String, i64, i64, i64) =
                    (r.try_get(0)?, r.try_get(1)?, r.try_get(2)?, r.try_get(3)?);
                Ok(format!("{name}: {ins} inserted, {upd} updated ({hot} HOT)"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?
            .join("; ")
    };

    let steps = (args.runs * 10) as f64;
    let c = args.concurrency;
    let row = |key: &str, label: &str, value: String| println!("{key:<9} {label:<50} {value}");
    println!();
    println!(
        "=== orrery-bench: {} runs x 10 no-op steps, {c} runs in flight, {} cores, {:.0}s total ===",
        args.runs,
        cores(),
        started.elapsed().as_secs_f64()
    );
    let base_line = baseline
        .iter()
        .map(|(c, r)| format!("c={c}: {r:.0}"))
        .collect::<Vec<_>>()
        .join("  ");
    row("baseline", "raw INSERT commits/s", base_line);
    row(
        "baseline",
        &format!("reference at c={c} (before and after the engine)"),
        base.describe(),
    );
    let tps = [
        (format!("1 worker x {c}"), &one),
        (format!("{} workers x {per}", args.workers), &many),
    ];
    for ((label, _), ceiling) in tps.iter().zip(&ceilings) {
        row(
            "ceiling",
            &format!("checkpoint statement alone ({label} shape)"),
            format!(
                "{ceiling:.0} steps/s  ({:.0}% of c={c} baseline; no engine, no claims, no worker CPU)",
                100.0 * ceiling / base_eq
            ),
        );
    }
    for ((label, tp), ceiling) in tps.iter().zip(&ceilings) {
        row(
            "engine",
            &format!("no-op steps/s ({label}, {c} runs in flight)"),
            format!(
                "{:.0}  ({:.0}% of c={c} baseline, {:.0}% of its statement ceiling)",
                tp.steps_per_sec,
                100.0 * tp.steps_per_sec / base_eq,
                100.0 * tp.steps_per_sec / ceiling
            ),
        );
    }
    row(
        "latency",
        "submit→first step start (idle worker)",
        format!(
            "p50 {:.2} ms  p99 {:.2} ms   [from runs.created_at: p50 {:.2} ms  p99 {:.2} ms; \
             submit→run done p50 {:.2} ms; submit() call p50 {:.2} ms]",
            lat.submit_p50,
            lat.submit_p99,
            lat.created_p50,
            lat.created_p99,
            lat.done_p50,
            lat.call_p50
        ),
    );
    for (label, tp) in &tps {
        row(
            "db",
            &format!("commits/step ({label})"),
            format!(
                "{:.3} measured (pg_stat_database)   [rows: {:.3} claims made (within checkpoint statements when they coincide), {:.3} checkpoint statements; \
                 {:.1} steps per checkpoint statement; {:.0} commits/s]",
                tp.commits_per_step,
                tp.claims_per_step,
                tp.writer_per_step,
                tp.steps_per_writer_stmt,
                tp.commits_per_sec
            ),
        );
    }
    for (label, w) in [
        (format!("{c} runs in flight"), &wire),
        ("1 run in flight".to_owned(), &wire1),
    ] {
        row(
            "db",
            &format!("round-trips/step (1 worker, {label})"),
            format!(
                "{:.3} measured on the wire   [statements {:.3} + empty Syncs (pool pings) {:.3} + prepares {:.3}; \
                 commits/step {:.3} on the wire (not counting {} session set-up statements), {:.3} by pg_stat_database; \
                 {:.1} steps per checkpoint statement]",
                w.round_trips / w.steps,
                w.statements / w.steps,
                w.pings / w.steps,
                w.prepares / w.steps,
                w.commits / w.steps,
                w.settings,
                w.pg_commits / w.steps,
                w.steps / w.writer_stmts.max(1.0),
            ),
        );
    }
    row(
        "db",
        "commits per submission",
        format!("{commits_per_submit:.3} measured (pg_stat_database)"),
    );
    for (label, tp) in &tps {
        let (cw, cp, cm, cwall) = tp.cpu;
        row(
            "cpu",
            &format!("per step, timed window ({label})"),
            format!(
                "workers {:.0} µs, PostgreSQL backends {:.0} µs (raw INSERT c={c}: {base_cpu:.0} µs/commit), \
                 bench {:.0} µs; these used {:.0}% of {} cores",
                cw * 1e6 / steps,
                cp * 1e6 / steps,
                cm * 1e6 / steps,
                100.0 * (cw + cp + cm) / (cwall * cores()),
                cores(),
            ),
        );
    }
    row("db", "table writes, whole benchmark", table_stats);
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    println!();
    println!("targets");
    let (w16, w1) = (&wire, &wire1);
    println!(
        "  <=1 commit per no-op step:       {} at {c} in flight ({:.3}); {} at 1 in flight ({:.3})",
        verdict(one.commits_per_step <= 1.0),
        one.commits_per_step,
        verdict(w1.commits / w1.steps <= 1.0),
        w1.commits / w1.steps
    );
    println!(
        "  <=2 round-trips per no-op step:  {} at {c} in flight ({:.3}); {} at 1 in flight ({:.3})",
        verdict(w16.round_trips / w16.steps <= 2.0),
        w16.round_trips / w16.steps,
        verdict(w1.round_trips / w1.steps <= 2.0),
        w1.round_trips / w1.steps
    );
    println!(
        "  steps/s >= 50% of raw INSERT commits/s at c={c}: {} with 1 worker ({:.0}%); {} with {} workers ({:.0}%)",
        verdict(one.steps_per_sec >= 0.5 * base_eq),
        100.0 * one.steps_per_sec / base_eq,
        verdict(many.steps_per_sec >= 0.5 * base_eq),
        args.workers,
        100.0 * many.steps_per_sec / base_eq
    );
    println!(
        "  p50 submission-to-start < 10 ms: {} ({:.2} ms)",
        verdict(lat.submit_p50 < 10.0),
        lat.submit_p50
    );
    Ok(())
}

fn cores() -> f64 {
    std::thread::available_parallelism()
        .map(|n| n.get() as f64)
        .unwrap_or(1.0)
}

/// The same database reached through the proxy on `port`, without TLS (the
/// proxy reads the protocol).
fn through_proxy(url: &str, port: u16) -> String {
    let authority_start = url.find("://").map(|i| i + 3).unwrap_or(0);
    let rest = &url[authority_start..];
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let authority = &rest[..end];
    let userinfo = authority
        .rfind('@')
        .map(|at| &authority[..=at])
        .unwrap_or("");
    let tail = &rest[end..];
    let sep = if tail.contains('?') { '&' } else { '?' };
    format!(
        "{}{userinfo}127.0.0.1:{port}{tail}{sep}sslmode=disable",
        &url[..authority_start]
    )
}

/// Commits of the benchmark database, read once no backend is connected to
/// it (a backend flushes its counters when it exits; a live one may hold
/// them back for up to a second or more).
async fn xact_commits(ctx: &Ctx) -> anyhow::Result<i64> {
    let mut admin = ctx.admin.lock().await;
    let t = Instant::now();
    loop {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE datname = $1")
            .bind(&ctx.db_name)
            .fetch_one(&mut *admin)
            .await?;
        if n == 0 {
            break;
        }
        if t.elapsed() > Duration::from_secs(15) {
            println!(
                "warning: {n} backends still connected to {}; commit counts may be short",
                ctx.db_name
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let commits: i64 =
        sqlx::query_scalar("SELECT xact_commit FROM pg_stat_database WHERE datname = $1")
            .bind(&ctx.db_name)
            .fetch_one(&mut *admin)
            .await?;
    Ok(commits)
}

/// CPU of the workers, of the PostgreSQL backends serving the benchmark
/// database, and of this program.
struct CpuSample {
    workers: HashMap<u32, f64>,
    backends: HashMap<u32, f64>,
    me: HashMap<u32, f64>,
    at: Instant,
}

async fn sample_cpu(ctx: &Ctx, workers: &Workers) -> anyhow::Result<CpuSample> {
    let backends: Vec<i32> = {
        let mut admin = ctx.admin.lock().await;
        sqlx::query_scalar("SELECT pid FROM pg_stat_activity WHERE datname = $1")
            .bind(&ctx.db_name)
            .fetch_all(&mut *admin)
            .await?
    };
    let backends: Vec<u32> = backends.into_iter().map(|p| p as u32).collect();
    let worker_pids: Vec<u32> = workers.children.iter().filter_map(|c| c.id()).collect();
    Ok(CpuSample {
        workers: cpu_of(&worker_pids),
        backends: cpu_of(&backends),
        me: cpu_of(&[std::process::id()]),
        at: Instant::now(),
    })
}

/// CPU seconds used between two samples: (workers, backends, this program, wall).
fn cpu_between(a: &CpuSample, b: &CpuSample) -> (f64, f64, f64, f64) {
    (
        cpu_delta(&a.workers, &b.workers),
        cpu_delta(&a.backends, &b.backends),
        cpu_delta(&a.me, &b.me),
        (b.at - a.at).as_secs_f64(),
    )
}

/// The Redis namespace of one phase. Each phase has its own: a stopped
/// worker's never-acknowledged dispatches are re-enqueued as orphans about
/// 15 s later (see docs/BENCHMARKS.md), and must not land in a later phase.
fn phase_namespace(ctx: &Ctx, tag: &str) -> String {
    format!("{}_{tag}", ctx.namespace)
}

/// An in-process engine that only submits, to the Redis namespace of phase `tag`.
async fn submitter(ctx: &Ctx, db_url: &str, tag: &str) -> anyhow::Result<Runtime> {
    let mut cfg = EngineConfig::from_env()?;
    cfg.database_url = db_url.to_owned();
    cfg.redis_url = ctx.args.redis_url.clone();
    cfg.namespace = phase_namespace(ctx, tag);
    cfg.test_workflows = true;
    cfg.db_pool = 8;
    orrery_workers::start(cfg, CancellationToken::new()).await
}

/// Submit `n` runs, 8 at a time, tagged `tag` (their `created_by`).
async fn submit_all(
    rt: &Runtime,
    workflow: &str,
    n: usize,
    tag: &str,
) -> anyhow::Result<Vec<Uuid>> {
    let engine = &rt.engine;
    let ids = futures::stream::iter(0..n)
        .map(|_| engine.submit(workflow, json!({}), Some(tag)))
        .buffer_unordered(8)
        .try_collect()
        .await?;
    Ok(ids)
}

/// A connection of this program to the benchmark database that counts its
/// statements (each a simple-protocol query, so exactly one commit each).
struct Poller {
    conn: PgConnection,
    statements: i64,
}

impl Poller {
    async fn connect(ctx: &Ctx) -> anyhow::Result<Self> {
        Ok(Poller {
            conn: PgConnection::connect(&ctx.db_url).await?,
            statements: 0,
        })
    }

    async fn row(&mut self, sql: &str) -> anyhow::Result<sqlx::postgres::PgRow> {
        self.statements += 1;
        Ok(sqlx::raw_sql(sql).fetch_one(&mut self.conn).await?)
    }

    async fn now(&mut self) -> anyhow::Result<DateTime<Utc>> {
        Ok(self.row("SELECT clock_timestamp()").await?.try_get(0)?)
    }

    /// Wait until all `expected` runs tagged `tag` have succeeded; fail loudly
    /// on a failed run or at the deadline.
    async fn wait_done(
        &mut self,
        tag: &str,
        expected: usize,
        deadline: Duration,
        workers: &mut Workers,
    ) -> anyhow::Result<()> {
        let start = Instant::now();
        loop {
            // Unfinished and failed runs only, each through an index
            // (`runs_unfinished`, `runs_state`): this query shares the cores
            // with the phase it waits for, and a scan of every run of the
            // benchmark every few milliseconds cost PostgreSQL CPU that the
            // per-step figures counted as the engine's.
            let row = self
                .row(&format!(
                    "SELECT (SELECT count(*) FROM runs WHERE created_by = '{tag}'
                               AND state NOT IN ('succeeded', 'failed', 'cancelled')),
                            (SELECT count(*) FROM runs WHERE created_by = '{tag}'
                               AND state IN ('failed', 'cancelled'))"
                ))
                .await?;
            let (pending, bad): (i64, i64) = (row.try_get(0)?, row.try_get(1)?);
            if bad > 0 {
                bail!(
                    "{bad} `{tag}` runs failed; worker logs: {}",
                    workers.describe()
                );
            }
            if pending == 0 {
                let ok: i64 = self
                    .row(&format!(
                        "SELECT count(*) FROM runs WHERE created_by = '{tag}' AND state = 'succeeded'"
                    ))
                    .await?
                    .try_get(0)?;
                if ok as usize >= expected {
                    return Ok(());
                }
                bail!("only {ok}/{expected} `{tag}` runs exist and none is pending");
            }
            if start.elapsed() > deadline {
                bail!(
                    "{pending} of {expected} `{tag}` runs still unfinished after {deadline:?}; worker logs: {}",
                    workers.describe()
                );
            }
            workers.check_alive()?;
            // The figures come from `finished_at`, not from when this loop
            // notices: polling less often loses no precision.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Claims (sum of fencing tokens), checkpoint-writer statements (distinct
    /// commit timestamps of the checkpoints) and steps of the runs tagged `tag`.
    async fn accounting(&mut self, tag: &str) -> anyhow::Result<(f64, f64, f64)> {
        let row = self
            .row(&format!(
                "SELECT (SELECT COALESCE(sum(fence), 0)::float8 FROM runs WHERE created_by = '{tag}'),
                        count(DISTINCT s.finished_at)::float8,
                        count(*)::float8
                 FROM step_checkpoints s JOIN runs r ON r.id = s.run_id
                 WHERE r.created_by = '{tag}'"
            ))
            .await?;
        Ok((row.try_get(0)?, row.try_get(1)?, row.try_get(2)?))
    }

    async fn close(self) -> anyhow::Result<i64> {
        self.conn.close().await?;
        Ok(self.statements)
    }
}

/// Worker processes, stopped with SIGTERM (and killed if dropped).
struct Workers {
    children: Vec<Child>,
    logs: Vec<PathBuf>,
}

impl Workers {
    async fn spawn(
        ctx: &Ctx,
        tag: &str,
        count: usize,
        concurrency: usize,
        db_url: &str,
    ) -> anyhow::Result<Self> {
        let mut workers = Workers {
            children: Vec::new(),
            logs: Vec::new(),
        };
        for i in 0..count {
            let log = ctx.log_dir.join(format!("{tag}-worker-{i}.log"));
            let file = std::fs::File::create(&log)?;
            let child = Command::new(&ctx.worker_bin)
                .args(["--queues", "bench"])
                .env("ORRERY_DATABASE_URL", db_url)
                .env("ORRERY_REDIS_URL", &ctx.args.redis_url)
                .env("ORRERY_NAMESPACE", phase_namespace(ctx, tag))
                .env("ORRERY_WORKER_CONCURRENCY", concurrency.to_string())
                // `true` rather than `1`: older parsers of this flag took only a Rust bool.
                .env("ORRERY_TEST_WORKFLOWS", "true")
                // The worker's default filter, whatever this shell has set.
                .env(
                    "RUST_LOG",
                    "info,sqlx=warn,apalis=warn,apalis_core=warn,apalis_redis=warn",
                )
                .env_remove("ORRERY_LOG_JSON")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(file)
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("cannot start {}", ctx.worker_bin.display()))?;
            workers.children.push(child);
            workers.logs.push(log);
        }
        // Ready once every worker logged that it consumes the queue.
        let start = Instant::now();
        for log in workers.logs.clone() {
            while !std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("consuming")
            {
                workers.check_alive()?;
                if start.elapsed() > Duration::from_secs(30) {
                    bail!("worker not consuming after 30s; see {}", log.display());
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Ok(workers)
    }

    fn describe(&self) -> String {
        self.logs
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn check_alive(&mut self) -> anyhow::Result<()> {
        for (child, log) in self.children.iter_mut().zip(&self.logs) {
            if let Some(status) = child.try_wait()? {
                bail!("a worker exited early ({status}); see {}", log.display());
            }
        }
        Ok(())
    }

    /// SIGTERM every worker, then wait for each to exit.
    async fn stop(mut self) -> anyhow::Result<()> {
        for child in &self.children {
            if let Some(pid) = child.id() {
                let status = std::process::Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status()?;
                if !status.success() {
                    println!("warning: kill -TERM {pid} failed");
                }
            }
        }
        for (child, log) in self.children.iter_mut().zip(&self.logs) {
            match tokio::time::timeout(Duration::from_secs(20), child.wait()).await {
                Ok(status) => {
                    let status = status?;
                    if !status.success() {
                        println!(
                            "warning: worker exited with {status}; see {}",
                            log.display()
                        );
                    }
                }
                Err(_) => {
                    println!(
                        "warning: worker ignored SIGTERM for 20s; killing it (see {})",
                        log.display()
                    );
                    child.kill().await?;
                }
            }
        }
        Ok(())
    }
}

struct Throughput {
    steps_per_sec: f64,
    /// Claims + checkpoint statements of the timed runs per second (from rows).
    commits_per_sec: f64,
    /// Worker commits per step from `pg_stat_database` (timed and warm-up runs).
    commits_per_step: f64,
    /// The same two kinds of statement, counted from the rows, per step.
    claims_per_step: f64,
    writer_per_step: f64,
    steps_per_writer_stmt: f64,
    /// CPU seconds over the timed window: workers, PostgreSQL backends, this program, wall.
    cpu: (f64, f64, f64, f64),
}

async fn throughput_phase(
    ctx: &Ctx,
    tag: &str,
    workers_n: usize,
    per_worker: usize,
    commits_per_submit: f64,
    conn_overhead: i64,
) -> anyhow::Result<Throughput> {
    let args = &ctx.args;
    let warm_tag = format!("{tag}-warm");
    let warm = (2 * workers_n * per_worker).max(16);
    let s0 = xact_commits(ctx).await?;
    let mut workers = Workers::spawn(ctx, tag, workers_n, per_worker, &ctx.db_url).await?;
    let rt = submitter(ctx, &ctx.db_url, tag).await?;
    let mut poller = Poller::connect(ctx).await?;
    // Warm up: every worker connected, statements prepared.
    submit_all(&rt, "bench.noop10", warm, &warm_tag).await?;
    poller
        .wait_done(&warm_tag, warm, ctx.deadline, &mut workers)
        .await?;

    let cpu0 = sample_cpu(ctx, &workers).await?;
    let t0 = poller.now().await?;
    submit_all(&rt, "bench.noop10", args.runs, tag).await?;
    poller
        .wait_done(tag, args.runs, ctx.deadline, &mut workers)
        .await?;
    let cpu1 = sample_cpu(ctx, &workers).await?;
    let end: DateTime<Utc> = poller
        .row(&format!(
            "SELECT max(finished_at) FROM runs WHERE created_by = '{tag}'"
        ))
        .await?
        .try_get(0)?;
    let (claims, writer_stmts, steps) = poller.accounting(tag).await?;
    let (warm_claims, warm_stmts, warm_steps) = poller.accounting(&warm_tag).await?;
    if steps as usize != args.runs * 10 {
        bail!(
            "expected {} checkpoints of `{tag}` runs, found {steps}",
            args.runs * 10
        );
    }
    workers.stop().await?;
    rt.engine.pool.close().await;
    drop(rt);
    let bench_statements = poller.close().await?;
    let s1 = xact_commits(ctx).await?;

    let wall = (end - t0).num_microseconds().unwrap_or(0) as f64 / 1e6;
    // Everything the database committed, less the submissions and this
    // program's own queries and connection; the rest is the workers'. The
    // window holds the warm-up runs too (same workflow), so they count in
    // both the commits and the steps.
    let submits = (args.runs + warm) as f64 * commits_per_submit;
    let engine_all = (s1 - s0) as f64 - submits - bench_statements as f64 - conn_overhead as f64;
    let all_steps = steps + warm_steps;
    let tp = Throughput {
        steps_per_sec: steps / wall,
        commits_per_sec: (claims + writer_stmts) / wall,
        commits_per_step: engine_all / all_steps,
        claims_per_step: (claims + warm_claims) / all_steps,
        writer_per_step: (writer_stmts + warm_stmts) / all_steps,
        steps_per_writer_stmt: all_steps / (writer_stmts + warm_stmts).max(1.0),
        cpu: cpu_between(&cpu0, &cpu1),
    };
    let (cw, cp, cm, cwall) = tp.cpu;
    println!(
        "[{tag}]      CPU over {cwall:.2}s ({:.2} core-s available): workers {cw:.2}s ({:.0} µs/step), \
         PostgreSQL backends {cp:.2}s ({:.0} µs/step, incl. submissions and polling), this program {cm:.2}s",
        cwall * cores(),
        cw * 1e6 / steps,
        cp * 1e6 / steps,
    );
    println!(
        "[{tag}]      {workers_n} worker(s) x {per_worker}: {} steps in {wall:.2}s = {:.0} steps/s; \
         workers committed {engine_all:.0} times for {} steps (incl. {warm_steps} warm-up) = {:.3}/step; \
         rows say {claims} claims + {writer_stmts} checkpoint statements",
        steps,
        tp.steps_per_sec,
        all_steps,
        tp.commits_per_step,
    );
    Ok(tp)
}

struct Wire {
    commits_per_submit: f64,
    steps: f64,
    round_trips: f64,
    statements: f64,
    pings: f64,
    prepares: f64,
    commits: f64,
    settings: f64,
    pg_commits: f64,
    writer_stmts: f64,
}

async fn wire_phase(
    ctx: &Ctx,
    tag: &str,
    runs: usize,
    concurrency: usize,
    conn_overhead: i64,
) -> anyhow::Result<Wire> {
    // Submission cost, no worker running.
    let s0 = xact_commits(ctx).await?;
    let submit_elapsed = {
        let rt = submitter(ctx, &ctx.db_url, tag).await?;
        let t = Instant::now();
        submit_all(&rt, "bench.noop10", runs, tag).await?;
        let e = t.elapsed();
        rt.engine.pool.close().await;
        e
    };
    let s_before = xact_commits(ctx).await?;
    let commits_per_submit = (s_before - s0) as f64 / runs as f64;
    println!(
        "[{tag}]     {runs} submissions, no worker, in {:.2}s ({:.0}/s, 8 at a time): {} commits = {commits_per_submit:.3}/submission",
        submit_elapsed.as_secs_f64(),
        runs as f64 / submit_elapsed.as_secs_f64(),
        s_before - s0
    );
    // A worker drains them through the counting proxy.
    let opts = PgConnectOptions::from_str(&ctx.db_url)?;
    let upstream = format!("{}:{}", opts.get_host(), opts.get_port());
    let stats = Arc::new(WireStats::default());
    let stop = CancellationToken::new();
    let port = start_proxy(upstream, stats.clone(), stop.clone()).await?;
    let proxied = through_proxy(&ctx.db_url, port);
    let mut workers = Workers::spawn(ctx, tag, 1, concurrency, &proxied).await?;
    let mut poller = Poller::connect(ctx).await?;
    poller
        .wait_done(tag, runs, ctx.deadline, &mut workers)
        .await?;
    let (claims, writer_stmts, steps) = poller.accounting(tag).await?;
    workers.stop().await?;
    let bench_statements = poller.close().await?;
    stop.cancel();
    let s_after = xact_commits(ctx).await?;
    if stats.unparsed.load(Ordering::SeqCst) {
        bail!("the proxy met a protocol it does not parse (TLS?); wire counts unavailable");
    }
    let get = |a: &AtomicU64| a.load(Ordering::SeqCst) as f64;
    let wire = Wire {
        commits_per_submit,
        steps,
        round_trips: get(&stats.round_trips),
        statements: get(&stats.statements),
        pings: get(&stats.pings),
        prepares: get(&stats.prepares),
        commits: get(&stats.commits),
        settings: get(&stats.settings),
        pg_commits: (s_after - s_before - bench_statements - conn_overhead) as f64,
        writer_stmts,
    };
    println!(
        "[{tag}]     1 worker x {concurrency} through the counting proxy, {steps} steps: {} connections, {} round-trips \
         ({} statements of which {} session set-up, {} empty Syncs = pool pings, {} prepares), {} commits on the wire, {} by pg_stat_database; \
         rows say {claims} claims + {writer_stmts} checkpoint statements",
        stats.connections.load(Ordering::SeqCst),
        wire.round_trips,
        wire.statements,
        wire.settings,
        wire.pings,
        wire.prepares,
        wire.commits,
        wire.pg_commits,
    );
    Ok(wire)
}

struct Latency {
    submit_p50: f64,
    submit_p99: f64,
    created_p50: f64,
    created_p99: f64,
    done_p50: f64,
    call_p50: f64,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn ms(d: chrono::TimeDelta) -> f64 {
    d.num_microseconds().unwrap_or(i64::MAX) as f64 / 1000.0
}

async fn latency_phase(ctx: &Ctx) -> anyhow::Result<Latency> {
    let n = ctx.args.latency_runs;
    let mut workers = Workers::spawn(ctx, "lat", 1, ctx.args.concurrency, &ctx.db_url).await?;
    let rt = submitter(ctx, &ctx.db_url, "lat").await?;
    let mut poller = Poller::connect(ctx).await?;
    submit_all(&rt, "bench.noop1", 16, "lat-warm").await?;
    poller
        .wait_done("lat-warm", 16, ctx.deadline, &mut workers)
        .await?;
    let (mut from_submit, mut from_created, mut to_done, mut call) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let phase_start = Instant::now();
    for _ in 0..n {
        // Leave the worker idle a little, jittered so nothing phase-locks.
        let jitter = u64::from(Uuid::new_v4().as_bytes()[0] % 4);
        tokio::time::sleep(Duration::from_millis(2 + jitter)).await;
        let t_sub = poller.now().await?;
        let called = Instant::now();
        let id = rt
            .engine
            .submit("bench.noop1", json!({}), Some("lat"))
            .await?;
        call.push(called.elapsed().as_secs_f64() * 1000.0);
        let wait = Instant::now();
        let (created, finished) = loop {
            let row = poller
                .row(&format!(
                    "SELECT state, created_at, finished_at FROM runs WHERE id = '{id}'"
                ))
                .await?;
            let state: String = row.try_get(0)?;
            match state.as_str() {
                "succeeded" => {
                    let created: DateTime<Utc> = row.try_get(1)?;
                    let finished: DateTime<Utc> = row.try_get(2)?;
                    break (created, finished);
                }
                "failed" | "cancelled" => bail!("latency run {id} {state}"),
                _ => {}
            }
            if wait.elapsed() > Duration::from_secs(10) {
                bail!(
                    "latency run {id} not done after 10s ({state}); see {}",
                    workers.describe()
                );
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        let started: DateTime<Utc> = poller
            .row(&format!(
                "SELECT started_at FROM step_checkpoints WHERE run_id = '{id}' AND step_index = 0"
            ))
            .await?
            .try_get(0)?;
        from_submit.push(ms(started - t_sub));
        from_created.push(ms(started - created));
        to_done.push(ms(finished - t_sub));
    }
    let elapsed = phase_start.elapsed();
    workers.stop().await?;
    rt.engine.pool.close().await;
    poller.close().await?;
    for v in [&mut from_submit, &mut from_created, &mut to_done, &mut call] {
        v.sort_by(f64::total_cmp);
    }
    let lat = Latency {
        submit_p50: percentile(&from_submit, 0.5),
        submit_p99: percentile(&from_submit, 0.99),
        created_p50: percentile(&from_created, 0.5),
        created_p99: percentile(&from_created, 0.99),
        done_p50: percentile(&to_done, 0.5),
        call_p50: percentile(&call, 0.5),
    };
    println!(
        "[latency]  {n} runs one at a time in {:.1}s: submit→step start p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; \
         created_at→step start p50 {:.2} ms, p99 {:.2} ms",
        elapsed.as_secs_f64(),
        lat.submit_p50,
        lat.submit_p99,
        from_submit.last().copied().unwrap_or(f64::NAN),
        lat.created_p50,
        lat.created_p99
    );
    Ok(lat)
}

// ---------------------------------------------------------------------------
// The counting proxy.
// ---------------------------------------------------------------------------

/// What crossed the wire between the workers and PostgreSQL.
#[derive(Default)]
struct WireStats {
    connections: AtomicU64,
    /// Every `ReadyForQuery` after start-up: one per client round-trip.
    round_trips: AtomicU64,
    /// Round-trips that executed a statement (`Execute` or a simple `Query`).
    statements: AtomicU64,
    /// Round-trips made of a bare `Sync`: sqlx's health check on pool checkout.
    pings: AtomicU64,
    /// Round-trips that only parsed/described (first use of a statement on a connection).
    prepares: AtomicU64,
    /// Statements after which the session was idle, without error: autocommits
    /// (and explicit COMMITs), session set-up excepted.
    commits: AtomicU64,
    /// Statements that only set the session up (`SET`, `LISTEN`, `UNLISTEN`,
    /// once per connection a worker opens): no data written, no per-step work.
    settings: AtomicU64,
    /// Set if a stream could not be parsed (e.g. TLS); counts are then void.
    unparsed: AtomicBool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Exchange {
    Ping,
    Prepare,
    Statement,
    /// A statement that only sets the session up ([`is_setting`]).
    Setting,
}

/// Whether `sql` only sets the session up: a parameter (`SET`) or the
/// notification channels it listens to (`LISTEN`, `UNLISTEN`).
fn is_setting(sql: &[u8]) -> bool {
    let sql = String::from_utf8_lossy(sql)
        .trim_start()
        .to_ascii_uppercase();
    ["SET ", "LISTEN ", "UNLISTEN "]
        .iter()
        .any(|verb| sql.starts_with(verb))
}

/// The first NUL-terminated string of a message body, and what follows it.
fn cstr(body: &[u8]) -> (&[u8], &[u8]) {
    match body.iter().position(|&b| b == 0) {
        Some(end) => (&body[..end], &body[end + 1..]),
        None => (body, &[]),
    }
}

async fn start_proxy(
    upstream: String,
    stats: Arc<WireStats>,
    stop: CancellationToken,
) -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                accepted = listener.accept() => {
                    let Ok((client, _)) = accepted else { continue };
                    let (upstream, stats) = (upstream.clone(), stats.clone());
                    tokio::spawn(async move {
                        if let Err(err) = proxy_connection(client, &upstream, stats).await {
                            tracing::debug!(error = %err, "proxy connection ended");
                        }
                    });
                }
            }
        }
    });
    Ok(port)
}

async fn proxy_connection(
    client: TcpStream,
    upstream: &str,
    stats: Arc<WireStats>,
) -> std::io::Result<()> {
    let server = TcpStream::connect(upstream).await?;
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    stats.connections.fetch_add(1, Ordering::SeqCst);
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    // What each pending Sync / Query asked for, in order; answered by ReadyForQuery.
    let pending: Arc<Mutex<VecDeque<Exchange>>> = Arc::default();

    let up = {
        let (pending, stats) = (pending.clone(), stats.clone());
        async move {
            let mut framer = Framer::new(true);
            let (mut parsed, mut executed, mut any) = (false, false, false);
            // Prepared statements by name: whether each only sets the session up.
            let mut setting_names: HashMap<Vec<u8>, bool> = HashMap::new();
            let mut setting = false;
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = cr.read(&mut buf).await?;
                if n == 0 {
                    let _ = sw.shutdown().await;
                    return Ok::<_, std::io::Error>(());
                }
                // Record what was asked before forwarding it, so the answer
                // can never overtake the record.
                let ok = framer.feed(&buf[..n], |ty, body| match ty {
                    Some(b'P') => {
                        let (name, rest) = cstr(body);
                        setting = is_setting(cstr(rest).0);
                        setting_names.insert(name.to_vec(), setting);
                        parsed = true;
                        any = true;
                    }
                    Some(b'B') => {
                        let statement = cstr(cstr(body).1).0;
                        setting = setting_names.get(statement).copied().unwrap_or(false);
                        any = true;
                    }
                    Some(b'E') => {
                        executed = true;
                        any = true;
                    }
                    Some(b'S') => {
                        let ex = if executed && setting {
                            Exchange::Setting
                        } else if executed {
                            Exchange::Statement
                        } else if parsed || any {
                            Exchange::Prepare
                        } else {
                            Exchange::Ping
                        };
                        if let Ok(mut p) = pending.lock() {
                            p.push_back(ex);
                        }
                        (parsed, executed, any, setting) = (false, false, false, false);
                    }
                    Some(b'Q') => {
                        let ex = if is_setting(cstr(body).0) {
                            Exchange::Setting
                        } else {
                            Exchange::Statement
                        };
                        if let Ok(mut p) = pending.lock() {
                            p.push_back(ex);
                        }
                    }
                    Some(b'X') | Some(b'H') | None => {}
                    Some(_) => any = true,
                });
                if !ok {
                    stats.unparsed.store(true, Ordering::SeqCst);
                }
                sw.write_all(&buf[..n]).await?;
            }
        }
    };
    let down = {
        let stats = stats.clone();
        async move {
            let mut framer = Framer::new(false);
            let (mut started, mut failed) = (false, false);
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = sr.read(&mut buf).await?;
                if n == 0 {
                    let _ = cw.shutdown().await;
                    return Ok::<_, std::io::Error>(());
                }
                cw.write_all(&buf[..n]).await?;
                let ok = framer.feed(&buf[..n], |ty, body| match ty {
                    Some(b'E') => failed = true,
                    Some(b'Z') => {
                        if !started {
                            started = true;
                            return;
                        }
                        let ex = pending.lock().ok().and_then(|mut p| p.pop_front());
                        stats.round_trips.fetch_add(1, Ordering::SeqCst);
                        match ex {
                            Some(Exchange::Ping) => {
                                stats.pings.fetch_add(1, Ordering::SeqCst);
                            }
                            Some(Exchange::Prepare) => {
                                stats.prepares.fetch_add(1, Ordering::SeqCst);
                            }
                            Some(Exchange::Setting) => {
                                stats.statements.fetch_add(1, Ordering::SeqCst);
                                stats.settings.fetch_add(1, Ordering::SeqCst);
                            }
                            Some(Exchange::Statement) => {
                                stats.statements.fetch_add(1, Ordering::SeqCst);
                                if body.first() == Some(&b'I') && !failed {
                                    stats.commits.fetch_add(1, Ordering::SeqCst);
                                }
                            }
                            None => stats.unparsed.store(true, Ordering::SeqCst),
                        }
                        failed = false;
                    }
                    _ => {}
                });
                if !ok {
                    stats.unparsed.store(true, Ordering::SeqCst);
                }
            }
        }
    };
    // Either side closing ends the connection.
    tokio::select! {
        r = up => r,
        r = down => r,
    }
}

/// Splits a PostgreSQL protocol stream into messages. The client's first
/// messages (start-up) have no type byte.
struct Framer {
    buf: Vec<u8>,
    untyped: bool,
    broken: bool,
}

impl Framer {
    fn new(client: bool) -> Self {
        Framer {
            buf: Vec::new(),
            untyped: client,
            broken: false,
        }
    }

    /// Feed bytes; `f` gets each complete message (type, body). `false` once
    /// the stream is not one this framer understands.
    fn feed(&mut self, data: &[u8], mut f: impl FnMut(Option<u8>, &[u8])) -> bool {
        if self.broken {
            return false;
        }
        self.buf.extend_from_slice(data);
        let mut pos = 0;
        loop {
            let rest = &self.buf[pos..];
            let header = if self.untyped { 4 } else { 5 };
            if rest.len() < header {
                break;
            }
            let len_at = header - 4;
            let len = u32::from_be_bytes([
                rest[len_at],
                rest[len_at + 1],
                rest[len_at + 2],
                rest[len_at + 3],
            ]) as usize;
            if len < 4 {
                self.broken = true;
                return false;
            }
            let total = len_at + len;
            if rest.len() < total {
                break;
            }
            let body = &rest[header..total];
            if self.untyped {
                let code = body
                    .get(..4)
                    .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
                    .unwrap_or(0);
                // SSLRequest / GSSENCRequest: the answer is a bare byte we do
                // not track; give up rather than count wrong.
                if code == 80_877_103 || code == 80_877_104 {
                    self.broken = true;
                    return false;
                }
                f(None, body);
                // A StartupMessage (or CancelRequest) ends the untyped part.
                self.untyped = false;
            } else {
                f(Some(rest[0]), body);
            }
            pos += total;
        }
        self.buf.drain(..pos);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_rewritten() {
        assert_eq!(
            through_proxy("postgres://u:p@h:5432/b", 7000),
            "postgres://u:p@127.0.0.1:7000/b?sslmode=disable"
        );
        assert_eq!(
            through_proxy("postgres://h/b?x=1", 7000),
            "postgres://127.0.0.1:7000/b?x=1&sslmode=disable"
        );
    }

    #[test]
    fn the_framer_splits_messages_across_reads() {
        let mut f = Framer::new(true);
        let mut seen = Vec::new();
        // Startup (untyped), then Sync, then a Query split over two reads.
        let mut bytes = vec![0, 0, 0, 8, 0, 3, 0, 0];
        bytes.extend([b'S', 0, 0, 0, 4]);
        bytes.extend([b'Q', 0, 0, 0, 6, b'x']);
        assert!(f.feed(&bytes, |t, _| seen.push(t)));
        assert!(f.feed(&[0], |t, _| seen.push(t)));
        assert_eq!(seen, vec![None, Some(b'S'), Some(b'Q')]);
    }

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let v: Vec<f64> = (1..=200).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 100.0);
        assert_eq!(percentile(&v, 0.99), 198.0);
    }
}
