#![allow(clippy::print_stdout)]
//! `orrery-bench-provision`: how long provisioning takes against the Ambari
//! emulator with every emulated delay at zero, so what is left is the
//! containers, SSH and the engine itself.
//!
//! Two measurements:
//!
//! 1. **Bootstrap scaling**: clusters of 1, 4 and 8 hosts (`--sizes`), one
//!    after the other. For each, the `bootstrap` step's wall time
//!    (`step_checkpoints.finished_at − started_at`: from the worker taking the
//!    step to the commit of its checkpoint) and each host's time inside it
//!    (`item_checkpoints.finished_at − step started_at`). Hosts bootstrap in
//!    parallel, so the target is: 8 hosts in less than 1.5× the time of 1.
//!    Each cluster is terminated (`terminate_cluster`) before the next.
//! 2. **End to end** of a 3-node cluster (`--e2e-size`): from just before
//!    `Engine::submit` (PostgreSQL `clock_timestamp()`) to the run's
//!    `finished_at`, broken down per step: wall time, polls, attempts, and the
//!    gap between the previous step's `finished_at` and this step's
//!    `started_at` (dispatch and handoff between queues and workers: the
//!    engine's own overhead). The first gap is submission → first step start.
//!
//! A 1-node warm-up cluster is provisioned and terminated first (not counted).
//!
//! Everything is real except Ambari: containers with their own `sshd` on a
//! bridge of the bench's own (`orrb0`, 10.80.0.1/16, state in
//! `/var/tmp/orrery-bench-provision`, names `bp<random>-`), agents
//! bootstrapped over SSH that register with the emulator (run in this
//! process, `request_duration` zero, agent port on the bridge gateway),
//! `orrery-worker` processes (the binary next to this one: one each for the
//! `provision`, `ssh` and `ambari` queues and one `--scheduler`, with
//! `ORRERY_AMBARI_POLL_MS=--poll-ms`), a scratch database
//! `orrery_bench_prov_<random>` and its own Redis namespace.
//!
//! Needs root (namespaces, overlayfs, a bridge): otherwise it says why and
//! exits with status 2. Every wait has a deadline (`--deadline-secs`). At the
//! end, whatever happened (also on Ctrl-C): the workers are stopped, every
//! container with the bench's prefix is destroyed, the database is dropped
//! `WITH (FORCE)` and the Redis keys deleted. Worker logs are kept only on
//! failure.

mod bench_common;

use bench_common::{redis_cleanup, with_database};
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{ExitCode, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use chrono::{DateTime, Utc};
use clap::Parser;
use orrery_workers::Runtime;
use orrery_workflows::{
    ambari::sim::{self, RunningSim, SimConfig},
    infra::local::{parse_subnet, ContainerHost, HostConfig, LocalProvider},
    provisioning,
    ssh::PlatformKey,
    store, EngineConfig, RunState, MIGRATOR,
};
use serde_json::json;
use sqlx::{postgres::PgPoolOptions, Connection, PgConnection, PgPool, Row};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const BRIDGE: &str = "orrb0";
const SUBNET: &str = "10.80.0.1/16";
const GATEWAY: &str = "10.80.0.1";
const STATE_ROOT: &str = "/var/tmp/orrery-bench-provision";
const SERVICES: &[&str] = &["ZOOKEEPER", "HDFS", "YARN", "MAPREDUCE2"];

#[derive(Parser, Debug, Clone)]
#[command(
    name = "orrery-bench-provision",
    about = "Provisioning against the Ambari emulator with zero delays: bootstrap time of 1, 4 and 8 hosts, and a 3-node cluster end to end, per step"
)]
struct Args {
    /// Cluster sizes whose bootstrap is timed (the ratio is last / first).
    #[arg(long, value_delimiter = ',', default_value = "1,4,8")]
    sizes: Vec<usize>,
    /// Size of the cluster timed end to end, step by step.
    #[arg(long, default_value_t = 3)]
    e2e_size: usize,
    /// `ORRERY_AMBARI_POLL_MS` of the workers: how long a waiting step parks between polls.
    #[arg(long, default_value_t = 50)]
    poll_ms: u64,
    /// A database on the server where the benchmark database is created.
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/postgres")]
    database_admin_url: String,
    #[arg(
        long,
        env = "ORRERY_REDIS_URL",
        default_value = "redis://127.0.0.1:6379"
    )]
    redis_url: String,
    /// Give up on a run (create or terminate) that has not finished by then.
    #[arg(long, default_value_t = 180)]
    deadline_secs: u64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(why) = LocalProvider::check() {
        println!("orrery-bench-provision: local containers are not possible here: {why}");
        println!(
            "(it needs root with CAP_SYS_ADMIN and CAP_NET_ADMIN, overlayfs, sshd, ip and unshare)"
        );
        return ExitCode::from(2);
    }
    if args.sizes.is_empty() || args.sizes.contains(&0) || args.e2e_size == 0 {
        println!("orrery-bench-provision: --sizes and --e2e-size must be at least 1");
        return ExitCode::from(2);
    }
    let suffix = Uuid::new_v4().simple().to_string()[..8].to_owned();
    let dir = std::env::temp_dir().join(format!("orrery-bench-provision-{suffix}"));
    if let Err(err) = std::fs::create_dir_all(&dir) {
        println!(
            "orrery-bench-provision: cannot create {}: {err}",
            dir.display()
        );
        return ExitCode::FAILURE;
    }
    let key_path = dir.join("id_ed25519");
    // The in-process engine (it only submits) builds the provisioning service
    // too: point it at the bench's key and at the pool provider, so it neither
    // writes a key under /var/lib/orrery nor touches containers. Set before
    // any thread exists.
    std::env::set_var("ORRERY_SSH_KEY", &key_path);
    std::env::set_var("ORRERY_PROVIDER", "pool");
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            println!("orrery-bench-provision: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(bench(args, suffix, dir, key_path)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            println!("orrery-bench-provision failed: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Everything the bench set up, torn down by [`Bench::cleanup`].
struct Bench {
    args: Args,
    deadline: Duration,
    db_name: String,
    db_url: String,
    namespace: String,
    prefix: String,
    dir: PathBuf,
    key: Option<PlatformKey>,
    host: ContainerHost,
    pool: Option<PgPool>,
    submitter: Option<Runtime>,
    sim: Option<RunningSim>,
    workers: Vec<(String, Child, PathBuf)>,
    user: Uuid,
    clusters: usize,
    /// `/proc/stat` samples: (when, busy jiffies, all jiffies) of the whole machine.
    cpu: CpuSamples,
}

type CpuSamples = std::sync::Arc<std::sync::Mutex<Vec<(DateTime<Utc>, u64, u64)>>>;

async fn bench(args: Args, suffix: String, dir: PathBuf, key_path: PathBuf) -> anyhow::Result<()> {
    let worker_bin = std::env::current_exe()?
        .parent()
        .context("the benchmark binary has no parent directory")?
        .join("orrery-worker");
    if !worker_bin.exists() {
        bail!(
            "{} not found: build it next to orrery-bench-provision (cargo build --release -p orrery-cli -p orrery-workers --bins)",
            worker_bin.display()
        );
    }
    let (gateway, prefix_len) = parse_subnet(SUBNET).map_err(anyhow::Error::msg)?;
    let db_name = format!("orrery_bench_prov_{suffix}");
    let mut b = Bench {
        deadline: Duration::from_secs(args.deadline_secs),
        db_url: with_database(&args.database_admin_url, &db_name),
        args,
        db_name,
        namespace: format!("orrery_bench_prov_{suffix}"),
        prefix: format!("bp{}-", &suffix[..6]),
        dir,
        key: None,
        host: ContainerHost::new(HostConfig {
            state_root: PathBuf::from(STATE_ROOT),
            bridge: BRIDGE.into(),
            gateway,
            prefix_len,
            authorized_keys: vec![],
            start_timeout: Duration::from_secs(15),
        }),
        pool: None,
        submitter: None,
        sim: None,
        workers: Vec::new(),
        user: Uuid::new_v4(),
        clusters: 0,
        cpu: CpuSamples::default(),
    };
    println!(
        "orrery-bench-provision: database {}, Redis namespace {}, bridge {BRIDGE} ({SUBNET}), containers {}* in {STATE_ROOT}, logs in {}",
        b.db_name,
        b.namespace,
        b.prefix,
        b.dir.display()
    );
    let sampler = tokio::spawn(sample_cpu(b.cpu.clone()));
    let result = tokio::select! {
        r = run(&mut b, &worker_bin, &key_path) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    sampler.abort();
    let clean = b.cleanup(result.is_ok()).await;
    result.and(clean)
}

async fn run(b: &mut Bench, worker_bin: &Path, key_path: &Path) -> anyhow::Result<()> {
    // Database, created here and dropped in cleanup.
    let mut admin = PgConnection::connect(&b.args.database_admin_url)
        .await
        .with_context(|| format!("cannot connect to {}", b.args.database_admin_url))?;
    sqlx::raw_sql(&format!("CREATE DATABASE \"{}\"", b.db_name))
        .execute(&mut admin)
        .await?;
    admin.close().await?;
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect(&b.db_url)
        .await?;
    MIGRATOR.run(&pool).await?;
    b.pool = Some(pool.clone());

    // The bridge, then the emulator listening for agents on its gateway.
    b.host.ensure_bridge().context("cannot set up the bridge")?;
    let sim_config = SimConfig {
        request_duration: Duration::ZERO,
        heartbeat_interval: Duration::from_secs(1),
        ..Default::default()
    };
    let api: SocketAddr = "127.0.0.1:0".parse()?;
    let agent: SocketAddr = format!("{GATEWAY}:0").parse()?;
    let sim = sim::serve(sim_config, api, agent, CancellationToken::new())
        .await
        .context("cannot start the Ambari emulator")?;
    let (sim_url, agent_port) = (sim.url(), sim.agent_addr.port());
    b.sim = Some(sim);
    b.key = Some(PlatformKey::load_or_generate(key_path)?);

    // The in-process engine that submits.
    let mut cfg = EngineConfig::from_env()?;
    cfg.database_url = b.db_url.clone();
    cfg.redis_url = b.args.redis_url.clone();
    cfg.namespace = b.namespace.clone();
    cfg.test_workflows = false;
    cfg.db_pool = 2;
    b.submitter = Some(orrery_workers::start(cfg, CancellationToken::new()).await?);

    // Workers.
    let env: Vec<(&str, String)> = vec![
        ("ORRERY_DATABASE_URL", b.db_url.clone()),
        ("ORRERY_REDIS_URL", b.args.redis_url.clone()),
        ("ORRERY_NAMESPACE", b.namespace.clone()),
        ("ORRERY_SSH_KEY", key_path.display().to_string()),
        ("ORRERY_PROVIDER", "local".into()),
        ("ORRERY_LOCAL_BRIDGE", BRIDGE.into()),
        ("ORRERY_LOCAL_SUBNET", SUBNET.into()),
        ("ORRERY_LOCAL_STATE_DIR", STATE_ROOT.into()),
        ("ORRERY_LOCAL_PREFIX", b.prefix.clone()),
        ("ORRERY_LOCAL_CAPACITY", "16".into()),
        ("ORRERY_AMBARI_URL", sim_url),
        ("ORRERY_AMBARI_AGENT_SERVER", GATEWAY.into()),
        ("ORRERY_AMBARI_AGENT_PORT", agent_port.to_string()),
        ("ORRERY_AMBARI_POLL_MS", b.args.poll_ms.to_string()),
        ("ORRERY_TEST_WORKFLOWS", "false".into()),
        (
            "RUST_LOG",
            "info,sqlx=warn,apalis=warn,apalis_core=warn,apalis_redis=warn".into(),
        ),
    ];
    for (tag, args) in [
        ("provision", vec!["--queues", "provision"]),
        ("ssh", vec!["--queues", "ssh"]),
        ("ambari", vec!["--queues", "ambari"]),
        ("scheduler", vec!["--scheduler"]),
    ] {
        let log = b.dir.join(format!("worker-{tag}.log"));
        let file = std::fs::File::create(&log)?;
        let child = Command::new(worker_bin)
            .args(&args)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .env_remove("ORRERY_LOG_JSON")
            .env_remove("ORRERY_BOOTSTRAP_PRELUDE")
            .env_remove("ORRERY_WORKER_CONCURRENCY")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", worker_bin.display()))?;
        b.workers.push((tag.to_owned(), child, log));
    }
    let start = Instant::now();
    for i in 0..b.workers.len() {
        let (tag, log) = (b.workers[i].0.clone(), b.workers[i].2.clone());
        let ready = if tag == "scheduler" {
            "worker started"
        } else {
            "consuming"
        };
        while !std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains(ready)
        {
            b.check_workers()?;
            if start.elapsed() > Duration::from_secs(30) {
                bail!("worker {tag} not ready after 30 s; see {}", log.display());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if tag != "scheduler"
            && std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("provisioning is not configured")
        {
            bail!(
                "worker {tag} has no provisioning service; see {}",
                log.display()
            );
        }
    }
    sqlx::query("INSERT INTO users (id, name) VALUES ($1, 'bench')")
        .bind(b.user)
        .execute(&pool)
        .await?;
    println!(
        "emulator: request_duration 0, agent heartbeat 1 s; workers: provision, ssh, ambari, scheduler (ORRERY_AMBARI_POLL_MS={}); release build",
        b.args.poll_ms
    );
    println!(
        "machine: {} cores, load average {} at start",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!();

    // Warm-up: first SSH handshakes, connection pools, page cache.
    let warm = b.provision(1).await?;
    let warm_term = b.terminate(warm.cluster).await?;
    println!(
        "warm-up   1-node cluster running in {}, terminated in {} (not counted)",
        secs(warm.total),
        secs(warm_term)
    );
    println!();

    // 1. Bootstrap scaling.
    let mut boots = Vec::new();
    for &size in &b.args.sizes.clone() {
        let r = b.provision(size).await?;
        let term = b.terminate(r.cluster).await?;
        boots.push((size, r, term));
    }
    println!("bootstrap (step `bootstrap`, ssh queue, hosts in parallel; wall = started_at → finished_at of the step)");
    println!(
        "{:>5}  {:>10}  {:>34}  {:>24}  {:>10}  {:>10}  {:>14}",
        "hosts",
        "bootstrap",
        "per host min / median / max",
        "machine CPU in bootstrap",
        "allocate",
        "create e2e",
        "terminate e2e"
    );
    for (size, r, term) in &boots {
        let boot = r.step("bootstrap")?;
        let allocate = r.step("allocate")?;
        let mut items: Vec<f64> = r.items.clone();
        items.sort_by(f64::total_cmp);
        let per_host = if items.is_empty() {
            "-".to_owned()
        } else {
            format!(
                "{} / {} / {}",
                secs_f(items[0]),
                secs_f(items[items.len() / 2]),
                secs_f(items[items.len() - 1])
            )
        };
        println!(
            "{:>5}  {:>10}  {:>34}  {:>24}  {:>10}  {:>10}  {:>14}",
            size,
            secs(boot.wall()),
            per_host,
            b.cpu_during(boot.started, boot.finished),
            secs(allocate.wall()),
            secs(r.total),
            secs(*term)
        );
    }
    let (first, last) = (&boots[0], &boots[boots.len() - 1]);
    let ratio = last.1.step("bootstrap")?.wall().as_secs_f64()
        / first.1.step("bootstrap")?.wall().as_secs_f64();
    println!(
        "ratio     bootstrap {} hosts / {} host(s) = {ratio:.2}x   target < 1.5x: {}",
        last.0,
        first.0,
        if ratio < 1.5 { "met" } else { "NOT MET" }
    );
    println!();

    // 2. End to end, per step.
    let r = b.provision(b.args.e2e_size).await?;
    let queues: std::collections::HashMap<String, String> = provisioning::create_cluster()
        .steps
        .iter()
        .map(|s| (s.name.clone(), s.queue.clone()))
        .collect();
    println!(
        "{}-node cluster end to end: submit → run succeeded {}   (gap before = previous step's finished_at → this step's started_at; for step 0, submit → started_at)",
        b.args.e2e_size,
        secs(r.total)
    );
    println!(
        "{:>2}  {:<14} {:<10} {:>12} {:>11} {:>6} {:>8} {:>12}",
        "#", "step", "queue", "gap before", "wall", "polls", "attempts", "parked≈"
    );
    let poll = Duration::from_millis(b.args.poll_ms);
    let (mut gaps, mut inside, mut parked) = (0.0, Duration::ZERO, Duration::ZERO);
    let mut prev_end = r.submitted;
    for s in &r.steps {
        let gap = ms_signed(s.started - prev_end);
        let park = poll * s.polls as u32;
        gaps += gap;
        inside += s.wall();
        parked += park;
        println!(
            "{:>2}  {:<14} {:<10} {:>12} {:>11} {:>6} {:>8} {:>12}",
            s.index,
            s.name,
            queues.get(&s.name).map(String::as_str).unwrap_or("?"),
            format!("{gap:.1} ms"),
            ms_d(s.wall()),
            s.polls,
            s.attempts,
            if s.polls > 0 {
                ms_d(park)
            } else {
                String::new()
            }
        );
        prev_end = s.finished;
    }
    let tail = ms_signed(r.finished - prev_end);
    println!(
        "{:>2}  {:<14} {:<10} {:>12}",
        "",
        "(run finished)",
        "",
        format!("{tail:.1} ms")
    );
    let total = r.total.as_secs_f64();
    let pct = |d: Duration| 100.0 * d.as_secs_f64() / total;
    println!(
        "totals    inside steps {} ({:.0}%; of which parked between polls ≈ {} = polls × {} ms)",
        ms_d(inside),
        pct(inside),
        ms_d(parked),
        b.args.poll_ms
    );
    println!(
        "          engine overhead between steps (submit→first start, handoffs, dispatch) {:.1} ms ({:.1}%) over {} gaps, mean {:.1} ms",
        gaps + tail,
        100.0 * (gaps + tail) / 1000.0 / total,
        r.steps.len(),
        gaps / r.steps.len().max(1) as f64
    );
    let allocate = r.step("allocate")?;
    println!(
        "          container allocation (step `allocate`, {} containers started in parallel) {} ({:.0}%)",
        b.args.e2e_size,
        ms_d(allocate.wall()),
        pct(allocate.wall())
    );
    let boot = r.step("bootstrap")?;
    println!(
        "          agent bootstrap over SSH (step `bootstrap`) {} ({:.0}%, machine CPU {}); Ambari steps {} ({:.0}%)",
        ms_d(boot.wall()),
        pct(boot.wall()),
        b.cpu_during(boot.started, boot.finished),
        ms_d(r.queue_time(&queues, "ambari")),
        pct(r.queue_time(&queues, "ambari"))
    );
    let term = b.terminate(r.cluster).await?;
    println!("          terminate_cluster afterwards: {}", secs(term));
    Ok(())
}

/// One step of a finished run, from `step_checkpoints`.
struct StepTiming {
    index: i32,
    name: String,
    attempts: i32,
    polls: i32,
    started: DateTime<Utc>,
    finished: DateTime<Utc>,
}

impl StepTiming {
    fn wall(&self) -> Duration {
        to_std(self.finished - self.started)
    }
}

/// A provisioned cluster and how long its `create_cluster` run took.
struct Provisioned {
    cluster: Uuid,
    /// PostgreSQL `clock_timestamp()` just before the submit.
    submitted: DateTime<Utc>,
    finished: DateTime<Utc>,
    total: Duration,
    steps: Vec<StepTiming>,
    /// Seconds from the bootstrap step's start to each host's item checkpoint.
    items: Vec<f64>,
}

impl Provisioned {
    fn step(&self, name: &str) -> anyhow::Result<&StepTiming> {
        self.steps
            .iter()
            .find(|s| s.name == name)
            .with_context(|| format!("no finished step `{name}`"))
    }

    fn queue_time(
        &self,
        queues: &std::collections::HashMap<String, String>,
        queue: &str,
    ) -> Duration {
        self.steps
            .iter()
            .filter(|s| queues.get(&s.name).map(String::as_str) == Some(queue))
            .map(StepTiming::wall)
            .sum()
    }
}

impl Bench {
    /// How busy the whole machine was between `from` and `to` (from the
    /// `/proc/stat` samples around that window): share of all cores, and
    /// CPU-seconds.
    fn cpu_during(&self, from: DateTime<Utc>, to: DateTime<Utc>) -> String {
        let samples = self.cpu.lock().unwrap_or_else(|e| e.into_inner());
        let before = samples.iter().rev().find(|s| s.0 <= from);
        let after = samples.iter().find(|s| s.0 >= to).or(samples.last());
        match (before, after) {
            (Some(a), Some(b)) if b.2 > a.2 => {
                let (busy, all) = ((b.1 - a.1) as f64, (b.2 - a.2) as f64);
                let wall = (b.0 - a.0).num_microseconds().unwrap_or(0) as f64 / 1e6;
                let cores = std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1) as f64;
                format!(
                    "{:.0}% ({:.2} CPU-s)",
                    100.0 * busy / all,
                    busy / all * cores * wall
                )
            }
            _ => "-".into(),
        }
    }

    fn pool(&self) -> &PgPool {
        self.pool.as_ref().expect("database set up")
    }

    fn check_workers(&mut self) -> anyhow::Result<()> {
        for (tag, child, log) in &mut self.workers {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "worker {tag} exited early ({status}); see {}",
                    log.display()
                );
            }
        }
        Ok(())
    }

    async fn now(&self) -> anyhow::Result<DateTime<Utc>> {
        Ok(sqlx::query_scalar("SELECT clock_timestamp()")
            .fetch_one(self.pool())
            .await?)
    }

    /// Wait (bounded) until run `id` has finished; its summary.
    async fn wait_run(&mut self, id: Uuid, what: &str) -> anyhow::Result<store::RunSummary> {
        let start = Instant::now();
        loop {
            let run = store::get_run(self.pool(), id)
                .await?
                .context("run vanished")?;
            if matches!(
                run.state,
                RunState::Succeeded | RunState::Failed | RunState::Cancelled
            ) {
                return Ok(run);
            }
            self.check_workers()?;
            if start.elapsed() > self.deadline {
                bail!(
                    "{what}: run {id} still {} at step {} after {:?}",
                    run.state,
                    run.cursor,
                    self.deadline
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Insert a cluster of `size` owned by the bench user (what the API
    /// writes), submit `create_cluster` and wait for it to succeed.
    async fn provision(&mut self, size: usize) -> anyhow::Result<Provisioned> {
        self.clusters += 1;
        let cluster = Uuid::new_v4();
        let public_key = format!(
            "{} bench@orrery",
            self.key.as_ref().expect("key").public_line()
        );
        let pool = self.pool().clone();
        sqlx::query(
            "INSERT INTO clusters (id, name, owner_id, size, services) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(cluster)
        .bind(format!("bench{}", self.clusters))
        .bind(self.user)
        .bind(size as i32)
        .bind(SERVICES.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .execute(&pool)
        .await?;
        sqlx::query(
            "INSERT INTO cluster_users (cluster_id, username, user_id, public_key, is_sudoer)
             VALUES ($1, 'bench', $2, $3, true)",
        )
        .bind(cluster)
        .bind(self.user)
        .bind(public_key)
        .execute(&pool)
        .await?;
        let submitted = self.now().await?;
        let engine = self.submitter.as_ref().expect("submitter").engine.clone();
        let id = engine
            .submit(
                "create_cluster",
                json!({ "cluster_id": cluster }),
                Some("bench"),
            )
            .await?;
        let run = self
            .wait_run(id, &format!("create_cluster of {size} host(s)"))
            .await?;
        if run.state != RunState::Succeeded {
            bail!(
                "create_cluster of {size} host(s) ended {}: {}",
                run.state,
                run.error.unwrap_or_default()
            );
        }
        let finished: DateTime<Utc> =
            sqlx::query_scalar("SELECT finished_at FROM runs WHERE id = $1")
                .bind(id)
                .fetch_one(&pool)
                .await?;
        let rows = sqlx::query(
            "SELECT step_index, step, attempts, polls, started_at, finished_at
             FROM step_checkpoints WHERE run_id = $1 ORDER BY step_index",
        )
        .bind(id)
        .fetch_all(&pool)
        .await?;
        let mut steps = Vec::new();
        for row in rows {
            let name: String = row.try_get("step")?;
            let started: Option<DateTime<Utc>> = row.try_get("started_at")?;
            let finished: Option<DateTime<Utc>> = row.try_get("finished_at")?;
            let (Some(started), Some(finished)) = (started, finished) else {
                bail!("step {name} of run {id} has no start or end time");
            };
            steps.push(StepTiming {
                index: row.try_get("step_index")?,
                name,
                attempts: row.try_get("attempts")?,
                polls: row.try_get("polls")?,
                started,
                finished,
            });
        }
        let boot = steps
            .iter()
            .find(|s| s.name == "bootstrap")
            .context("no bootstrap step")?;
        let item_ends: Vec<DateTime<Utc>> = sqlx::query_scalar(
            "SELECT finished_at FROM item_checkpoints WHERE run_id = $1 AND step_index = $2",
        )
        .bind(id)
        .bind(boot.index)
        .fetch_all(&pool)
        .await?;
        let items = item_ends
            .iter()
            .map(|t| (*t - boot.started).num_microseconds().unwrap_or(0) as f64 / 1e6)
            .collect();
        Ok(Provisioned {
            cluster,
            submitted,
            finished,
            total: to_std(finished - submitted),
            steps,
            items,
        })
    }

    /// `terminate_cluster`, waited for; its duration (submit → run finished).
    async fn terminate(&mut self, cluster: Uuid) -> anyhow::Result<Duration> {
        let pool = self.pool().clone();
        sqlx::query("UPDATE clusters SET state = 'terminating' WHERE id = $1")
            .bind(cluster)
            .execute(&pool)
            .await?;
        let submitted = self.now().await?;
        let engine = self.submitter.as_ref().expect("submitter").engine.clone();
        let id = engine
            .submit(
                "terminate_cluster",
                json!({ "cluster_id": cluster }),
                Some("bench"),
            )
            .await?;
        let run = self.wait_run(id, "terminate_cluster").await?;
        if run.state != RunState::Succeeded {
            bail!(
                "terminate_cluster ended {}: {}",
                run.state,
                run.error.unwrap_or_default()
            );
        }
        let state: String = sqlx::query_scalar("SELECT state FROM clusters WHERE id = $1")
            .bind(cluster)
            .fetch_one(&pool)
            .await?;
        if state != "terminated" {
            bail!("cluster {cluster} is {state} after terminate_cluster");
        }
        let left: Vec<String> = self
            .host
            .list(&self.prefix)?
            .into_iter()
            .filter(|c| c.cluster_id == Some(cluster))
            .map(|c| c.name)
            .collect();
        if !left.is_empty() {
            bail!("containers left after terminate_cluster: {left:?}");
        }
        let finished: DateTime<Utc> =
            sqlx::query_scalar("SELECT finished_at FROM runs WHERE id = $1")
                .bind(id)
                .fetch_one(&pool)
                .await?;
        Ok(to_std(finished - submitted))
    }

    /// Stop workers, destroy containers, drop the database, delete the Redis
    /// keys, stop the emulator; keep the logs if the bench failed.
    async fn cleanup(&mut self, ok: bool) -> anyhow::Result<()> {
        let mut problems = Vec::new();
        for (_, child, _) in &self.workers {
            if let Some(pid) = child.id() {
                let _ = std::process::Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status();
            }
        }
        for (tag, child, log) in &mut self.workers {
            if tokio::time::timeout(Duration::from_secs(15), child.wait())
                .await
                .is_err()
            {
                println!(
                    "warning: worker {tag} ignored SIGTERM for 15 s; killing it (see {})",
                    log.display()
                );
                let _ = child.kill().await;
            }
        }
        self.workers.clear();
        if let Some(rt) = self.submitter.take() {
            rt.engine.pool.close().await;
        }
        match self.host.list(&self.prefix) {
            Ok(found) => {
                for c in found {
                    if let Err(err) = self.host.destroy(&c.name) {
                        problems.push(format!("container {} not destroyed: {err}", c.name));
                    }
                }
            }
            Err(err) => problems.push(format!("cannot list containers {}*: {err}", self.prefix)),
        }
        if let Some(pool) = self.pool.take() {
            pool.close().await;
        }
        match PgConnection::connect(&self.args.database_admin_url).await {
            Ok(mut admin) => {
                if let Err(err) = sqlx::raw_sql(&format!(
                    "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
                    self.db_name
                ))
                .execute(&mut admin)
                .await
                {
                    problems.push(format!("database {} not dropped: {err}", self.db_name));
                }
                let _ = admin.close().await;
            }
            Err(err) => problems.push(format!("database {} not dropped: {err}", self.db_name)),
        }
        if let Err(err) = redis_cleanup(&self.args.redis_url, &self.namespace).await {
            problems.push(format!(
                "Redis keys of {} not deleted: {err:#}",
                self.namespace
            ));
        }
        if let Some(sim) = self.sim.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), sim.shutdown()).await;
        }
        if ok && problems.is_empty() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            println!("worker logs kept in {}", self.dir.display());
        }
        if problems.is_empty() {
            Ok(())
        } else {
            bail!("cleanup: {}", problems.join("; "))
        }
    }
}

/// Sample the machine's CPU counters (first line of `/proc/stat`) every 10 ms.
async fn sample_cpu(samples: CpuSamples) {
    loop {
        let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let fields: Vec<u64> = text
            .lines()
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .skip(1)
            .take(8)
            .filter_map(|f| f.parse().ok())
            .collect();
        if fields.len() == 8 {
            // user nice system idle iowait irq softirq steal
            let all: u64 = fields.iter().sum();
            let busy = all - fields[3] - fields[4];
            samples
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((Utc::now(), busy, all));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A non-negative `TimeDelta` as a `Duration` (negative: zero).
fn to_std(d: chrono::TimeDelta) -> Duration {
    d.to_std().unwrap_or(Duration::ZERO)
}

/// A `TimeDelta` in milliseconds, keeping its sign.
fn ms_signed(d: chrono::TimeDelta) -> f64 {
    d.num_microseconds().unwrap_or(0) as f64 / 1000.0
}

fn secs(d: Duration) -> String {
    secs_f(d.as_secs_f64())
}

fn secs_f(s: f64) -> String {
    format!("{s:.3} s")
}

fn ms_d(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}
