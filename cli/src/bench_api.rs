#![allow(clippy::print_stdout)]
//! `orrery-bench-api`: how fast the REST API accepts cluster requests and
//! answers task polls, beside the raw PostgreSQL INSERT baseline measured the
//! same way as `orrery-bench` (autocommit single-row INSERTs, one connection
//! per client), in the same run against the same server.
//!
//! Everything runs against a fresh database `orrery_benchapi_<random>`
//! (dropped at the end) and a fresh Redis namespace. The API runs in this
//! process on 127.0.0.1:0 with the stand-in cluster workflows
//! (`ORRERY_CLUSTER_WORKFLOWS=fake`: `POST /v1/clusters` records a cluster,
//! its owner's account, a run and a task in one transaction, then dispatches
//! to Redis) and with quotas and capacity large enough never to refuse. No
//! worker runs: this measures the API, not the workflow.
//!
//! Clients are plain HTTP/1.1 keep-alive connections written by hand (one
//! per client, `--concurrency` of them, each authenticated as its own user
//! with a Bearer key), so the client costs as little CPU as possible on the
//! same machine.
//!
//! 1. Baseline: `--inserts` raw INSERT commits from `--concurrency` connections,
//!    measured again after the polls; the reference is the mean of the two.
//! 2. Submissions: `--submissions` `POST /v1/clusters`, all answered 202.
//! 3. Polls: `GET /v1/tasks/{id}` of the submitted tasks for `--poll-secs`.

mod bench_common;

use bench_common::{raw_inserts, with_database, Baseline, RAW_TABLE_SQL};

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use clap::Parser;
use orrery_api::{
    accounts::{self, NewUser},
    app::{App, ClusterWorkflows},
    ApiConfig,
};
use orrery_workflows::{EngineConfig, MIGRATOR};
use serde_json::json;
use sqlx::{Connection, PgConnection};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use uuid::Uuid;

#[derive(Parser)]
#[command(
    name = "orrery-bench-api",
    about = "REST API submissions/s and task polls/s against a raw-INSERT baseline"
)]
struct Args {
    #[arg(
        long,
        env = "ORRERY_TEST_ADMIN_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    database_admin_url: String,
    #[arg(
        long,
        env = "ORRERY_REDIS_URL",
        default_value = "redis://127.0.0.1:6379"
    )]
    redis_url: String,
    /// Concurrent clients (and baseline connections).
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    #[arg(long, default_value_t = 8000)]
    inserts: usize,
    #[arg(long, default_value_t = 4000)]
    submissions: usize,
    #[arg(long, default_value_t = 5)]
    poll_secs: u64,
    /// API connections to PostgreSQL.
    #[arg(long, default_value_t = 16)]
    db_pool: u32,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
    let suffix = Uuid::new_v4().simple().to_string()[..10].to_owned();
    let db_name = format!("orrery_benchapi_{suffix}");
    let mut admin = PgConnection::connect(&args.database_admin_url)
        .await
        .with_context(|| format!("cannot connect to {}", args.database_admin_url))?;
    sqlx::raw_sql(&format!("CREATE DATABASE \"{db_name}\""))
        .execute(&mut admin)
        .await?;
    let db_url = with_database(&args.database_admin_url, &db_name);
    let namespace = format!("benchapi{suffix}");
    let result = run(&args, &db_url, &namespace).await;
    if let Err(err) = bench_common::redis_cleanup(&args.redis_url, &namespace).await {
        eprintln!("warning: Redis keys of {namespace} not removed: {err}");
    }
    let _ = sqlx::raw_sql(&format!(
        "DROP DATABASE IF EXISTS \"{db_name}\" WITH (FORCE)"
    ))
    .execute(&mut admin)
    .await;
    result
}

async fn run(args: &Args, db_url: &str, namespace: &str) -> anyhow::Result<()> {
    let c = args.concurrency;
    {
        let mut conn = PgConnection::connect(db_url).await?;
        MIGRATOR.run(&mut conn).await?;
        sqlx::raw_sql(RAW_TABLE_SQL).execute(&mut conn).await?;
    }
    let (before, _) = raw_inserts(db_url, c, args.inserts).await?;
    println!(
        "[baseline]    c={c:<3} {before:>8.0} raw INSERT commits/s over {} commits",
        args.inserts
    );

    let engine_cfg = EngineConfig {
        database_url: db_url.to_owned(),
        redis_url: args.redis_url.clone(),
        namespace: namespace.to_owned(),
        db_pool: args.db_pool,
        test_workflows: true,
        ..EngineConfig::from_env()?
    };
    let api_cfg = ApiConfig {
        workflows: ClusterWorkflows::fake(),
        local_capacity: 1_000_000_000,
        default_quota: 1_000_000_000,
        ..ApiConfig::default()
    };
    let shutdown = tokio_util::sync::CancellationToken::new();
    let app = App::connect(engine_cfg, api_cfg, shutdown.clone()).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(orrery_api::serve_app(
        app.clone(),
        listener,
        shutdown.clone(),
    ));
    let mut tokens = Vec::new();
    for i in 0..c {
        let u = NewUser {
            name: format!("bench{i}"),
            email: None,
            group: None,
            operator: false,
            quota_machines: None,
        };
        let (_, key) = accounts::create_user(&app.pool, &u, "bench")
            .await
            .map_err(|e| anyhow::anyhow!("creating bench users: {}", e.detail))?;
        tokens.push(key.token());
    }

    // Submissions.
    let next = Arc::new(AtomicUsize::new(0));
    let total = args.submissions;
    let start = Instant::now();
    let mut handles = Vec::new();
    for token in tokens.clone() {
        let next = next.clone();
        handles.push(tokio::spawn(async move {
            let mut client = Client::connect(addr, &token).await?;
            let mut ids = Vec::new();
            let mut lat = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < total {
                let t = Instant::now();
                let (status, body) = client
                    .request(
                        "POST",
                        "/v1/clusters",
                        Some(&json!({ "name": "bench", "size": 1 }).to_string()),
                    )
                    .await?;
                lat.push(t.elapsed());
                if status != 202 {
                    bail!("POST /v1/clusters answered {status}: {body}");
                }
                let v: serde_json::Value = serde_json::from_str(&body)?;
                ids.push(v["id"].as_str().unwrap_or_default().to_owned());
            }
            Ok::<_, anyhow::Error>((ids, lat))
        }));
    }
    let mut per_client = Vec::new();
    let mut lat = Vec::new();
    for h in handles {
        let (i, l) = h.await??;
        per_client.push(i);
        lat.extend(l);
    }
    let secs = start.elapsed().as_secs_f64();
    let subs = per_client.iter().map(Vec::len).sum::<usize>() as f64 / secs;
    lat.sort();
    let (subs_p50, subs_p99) = (pct(&lat, 0.5), pct(&lat, 0.99));

    // Polls.
    let until = Instant::now() + Duration::from_secs(args.poll_secs);
    let start = Instant::now();
    let mut handles = Vec::new();
    for (token, ids) in tokens.into_iter().zip(per_client) {
        handles.push(tokio::spawn(async move {
            let mut client = Client::connect(addr, &token).await?;
            let mut lat = Vec::new();
            let mut i = 0;
            // Each client polls, round-robin, the tasks its own user submitted.
            while Instant::now() < until && !ids.is_empty() {
                let id = &ids[i % ids.len()];
                i += 1;
                let t = Instant::now();
                let (status, body) = client
                    .request("GET", &format!("/v1/tasks/{id}"), None)
                    .await?;
                lat.push(t.elapsed());
                if status != 200 {
                    bail!("GET /v1/tasks answered {status}: {body}");
                }
            }
            Ok::<_, anyhow::Error>(lat)
        }));
    }
    let mut lat = Vec::new();
    for h in handles {
        lat.extend(h.await??);
    }
    let secs = start.elapsed().as_secs_f64();
    lat.sort();
    let polls = lat.len() as f64 / secs;
    let (polls_p50, polls_p99) = (pct(&lat, 0.5), pct(&lat, 0.99));
    shutdown.cancel();

    let (after, _) = raw_inserts(db_url, c, args.inserts).await?;
    println!(
        "[baseline]    c={c:<3} {after:>8.0} raw INSERT commits/s over {} commits (after)",
        args.inserts
    );
    let base = Baseline { before, after };
    let baseline = base.mean();
    println!("[baseline]    c={c:<3} reference {}", base.describe());
    println!(
        "[submissions] c={c:<3} {subs:>8.0} POST /v1/clusters/s ({:.0}% of the raw-INSERT baseline); p50 {subs_p50:.1} ms, p99 {subs_p99:.1} ms",
        subs / baseline * 100.0,
    );
    println!(
        "[polls]       c={c:<3} {polls:>8.0} GET /v1/tasks/{{id}}/s; p50 {polls_p50:.2} ms, p99 {polls_p99:.2} ms"
    );
    println!(
        "targets: submissions >= 40% of baseline: {}; polls > 5000/s: {}",
        if subs >= 0.4 * baseline {
            "met"
        } else {
            "NOT met"
        },
        if polls > 5000.0 { "met" } else { "NOT met" }
    );
    Ok(())
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i].as_secs_f64() * 1000.0
}

/// A minimal HTTP/1.1 keep-alive client: enough for JSON requests to axum.
struct Client {
    stream: BufReader<tokio::net::TcpStream>,
    auth: String,
}

impl Client {
    async fn connect(addr: std::net::SocketAddr, token: &str) -> anyhow::Result<Self> {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Client {
            stream: BufReader::new(stream),
            auth: format!("Bearer {token}"),
        })
    }

    async fn request(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> anyhow::Result<(u16, String)> {
        let body = body.unwrap_or("");
        let req = format!(
            "{method} {path} HTTP/1.1\r\nhost: bench\r\nauthorization: {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            self.auth,
            body.len()
        );
        self.stream.get_mut().write_all(req.as_bytes()).await?;
        let mut line = String::new();
        self.stream.read_line(&mut line).await?;
        let status: u16 = line.split(' ').nth(1).context("bad status line")?.parse()?;
        let mut len = 0usize;
        loop {
            line.clear();
            self.stream.read_line(&mut line).await?;
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse()?;
                }
            }
        }
        let mut buf = vec![0u8; len];
        self.stream.read_exact(&mut buf).await?;
        Ok((status, String::from_utf8_lossy(&buf).into_owned()))
    }
}
