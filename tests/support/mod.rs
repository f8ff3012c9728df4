//! Test harness: each test gets its own PostgreSQL database (migrated with
//! the one `MIGRATOR`), its own Redis namespace, a scratch folder for logs
//! and effects files, an in-process engine for submitting and operating on
//! runs, and real `orrery-worker` processes that it kills when dropped.
//! Waiting is polling with a deadline, never a fixed sleep.
//!
//! `ORRERY_TEST_ADMIN_URL` (default postgres://postgres@127.0.0.1:5432/postgres)
//! and `ORRERY_TEST_REDIS_URL` (default redis://127.0.0.1:6379) say where the
//! servers are. Worker logs are printed when a test fails.

#![allow(dead_code, clippy::print_stdout)]

use std::{
    future::Future,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use orrery_workers::Runtime;
use orrery_workflows::{
    store::{self, RunSummary},
    EngineConfig, RunState, MIGRATOR,
};
use serde_json::Value;
use sqlx::{Connection, PgPool};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub const LEASE_MS: u64 = 2000;

pub fn admin_url() -> String {
    std::env::var("ORRERY_TEST_ADMIN_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A loopback port nobody listened on a moment ago (for a server a test
/// starts, or to be refused).
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

pub fn default_redis_url() -> String {
    std::env::var("ORRERY_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// One line of an effects file: a step (or item, or compensation) execution.
#[derive(Debug, Clone, PartialEq)]
pub struct Effect {
    pub run_id: Uuid,
    pub what: String,
    pub worker: String,
    pub attempt: u32,
    pub at_ms: u128,
}

pub struct Worker {
    pub child: Child,
    pub log: PathBuf,
}

impl Worker {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill -{sig} failed");
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

pub struct TestEnv {
    pub name: String,
    /// Owns the database: dropping it drops the database.
    pub db: TestDb,
    pub db_name: String,
    pub db_url: String,
    pub pool: PgPool,
    pub redis_url: String,
    pub namespace: String,
    pub dir: PathBuf,
    pub rt: Runtime,
    pub workers: Vec<Worker>,
    shutdown: CancellationToken,
}

impl TestEnv {
    pub async fn new(name: &str) -> Self {
        Self::with_redis(name, &default_redis_url()).await
    }

    pub async fn with_redis(name: &str, redis_url: &str) -> Self {
        Self::with_servers(name, &admin_url(), redis_url).await
    }

    /// On the PostgreSQL server `admin_url` points at and the Redis at `redis_url`.
    pub async fn with_servers(name: &str, admin_url: &str, redis_url: &str) -> Self {
        let db = TestDb::on(admin_url, name).await;
        let (db_name, db_url, pool) = (db.db_name.clone(), db.db_url.clone(), db.pool.clone());
        let suffix = Uuid::new_v4().simple().to_string();
        let dir = std::env::temp_dir().join(format!("orrery-test-{name}-{}", &suffix[..10]));
        std::fs::create_dir_all(&dir).unwrap();
        let namespace = format!("t{}", &suffix[..12]);
        let config = EngineConfig {
            database_url: db_url.clone(),
            redis_url: redis_url.to_owned(),
            namespace: namespace.clone(),
            lease: Duration::from_millis(LEASE_MS),
            redispatch_after: Duration::from_millis(1000),
            reconcile_every: Duration::from_millis(200),
            concurrency: 16,
            db_pool: 5,
            stuck_queued: Duration::from_secs(300),
            retention_days: 30,
            claim_hold: Duration::from_millis(20),
            test_workflows: true,
        };
        let shutdown = CancellationToken::new();
        let rt = orrery_workers::start(config, shutdown.clone())
            .await
            .unwrap();
        TestEnv {
            name: name.to_owned(),
            db,
            db_name,
            db_url,
            pool,
            redis_url: redis_url.to_owned(),
            namespace,
            dir,
            rt,
            workers: Vec::new(),
            shutdown,
        }
    }

    pub fn effects_path(&self) -> String {
        self.dir.join("effects.log").to_string_lossy().into_owned()
    }

    /// Start an `orrery-worker` process with this test's database and namespace.
    pub fn spawn_worker(&mut self, args: &[&str]) -> usize {
        self.spawn_worker_env(args, &[])
    }

    /// Like [`TestEnv::spawn_worker`], with more environment variables.
    pub fn spawn_worker_env(&mut self, args: &[&str], extra: &[(String, String)]) -> usize {
        let index = self.workers.len();
        let log = self.dir.join(format!("worker-{index}.log"));
        let file = std::fs::File::create(&log).unwrap();
        // Defined for the tests of the package that builds the binary
        // (orrery-workers); the command-line tests start none.
        let Some(bin) = option_env!("CARGO_BIN_EXE_orrery-worker") else {
            panic!("worker processes are started by orrery-workers' tests only");
        };
        let child = Command::new(bin)
            .args(args)
            .env("ORRERY_DATABASE_URL", &self.db_url)
            .env("ORRERY_REDIS_URL", &self.redis_url)
            .env("ORRERY_NAMESPACE", &self.namespace)
            .env("ORRERY_LEASE_MS", LEASE_MS.to_string())
            .env("ORRERY_REDISPATCH_AFTER_MS", "1000")
            .env("ORRERY_RECONCILE_EVERY_MS", "200")
            .env("ORRERY_DB_POOL", "8")
            .env("ORRERY_TEST_WORKFLOWS", "1")
            .env("RUST_LOG", "info,orrery_workflows=debug")
            .env("ORRERY_SSH_KEY", self.dir.join("id_ed25519"))
            .envs(extra.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("orrery-worker binary");
        self.workers.push(Worker { child, log });
        index
    }

    pub async fn submit(&self, workflow: &str, input: Value) -> Uuid {
        self.rt
            .engine
            .submit(workflow, input, Some("test"))
            .await
            .unwrap()
    }

    /// A connection to this test's Redis.
    pub async fn redis(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.redis_url.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    /// A queued run of `workflow` on `queue`, committed but never pushed to
    /// Redis (like a submitter that died between the two).
    pub async fn insert_undispatched(&self, workflow: &str, queue: &str) -> Uuid {
        let run = store::NewRun {
            id: Uuid::new_v4(),
            workflow: workflow.into(),
            workflow_version: 1,
            input: serde_json::json!({}),
            queue: queue.into(),
            created_by: None,
            stuck_in: Duration::from_secs(60),
        };
        store::insert_run(&mut self.pool.acquire().await.unwrap(), &run)
            .await
            .unwrap();
        run.id
    }

    pub async fn run(&self, id: Uuid) -> RunSummary {
        store::get_run(&self.pool, id)
            .await
            .unwrap()
            .expect("run exists")
    }

    /// Wait until the run is in one of `states`; panics with the run on timeout.
    pub async fn wait_state(&self, id: Uuid, states: &[RunState], timeout: Duration) -> RunSummary {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let run = self.run(id).await;
            if states.contains(&run.state) {
                return run;
            }
            if tokio::time::Instant::now() > deadline {
                panic!("run {id} not in {states:?} after {timeout:?}: {run:#?}");
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Wait until `check` returns true; panics naming `what` on timeout.
    pub async fn wait_until<F, Fut>(&self, what: &str, timeout: Duration, mut check: F)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = bool>,
    {
        let deadline = tokio::time::Instant::now() + timeout;
        while !check().await {
            if tokio::time::Instant::now() > deadline {
                panic!("timed out after {timeout:?} waiting for {what}");
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub fn effects(&self) -> Vec<Effect> {
        let text = std::fs::read_to_string(self.effects_path()).unwrap_or_default();
        text.lines()
            .map(|l| {
                let p: Vec<&str> = l.split(' ').collect();
                Effect {
                    run_id: p[0].parse().unwrap(),
                    what: p[1].to_owned(),
                    worker: p[2].to_owned(),
                    attempt: p[3].parse().unwrap(),
                    at_ms: p[4].parse().unwrap(),
                }
            })
            .collect()
    }

    pub fn effects_of(&self, id: Uuid) -> Vec<Effect> {
        self.effects()
            .into_iter()
            .filter(|e| e.run_id == id)
            .collect()
    }

    /// How many times `what` ran for run `id`.
    pub fn count(&self, id: Uuid, what: &str) -> usize {
        self.effects_of(id)
            .iter()
            .filter(|e| e.what == what)
            .count()
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        self.shutdown.cancel();
        for w in &mut self.workers {
            let _ = Command::new("kill")
                .arg("-CONT")
                .arg(w.child.id().to_string())
                .status();
            let _ = w.child.kill();
            let _ = w.child.wait();
        }
        if std::thread::panicking() {
            for (i, w) in self.workers.iter().enumerate() {
                let text = w.log_text();
                let tail: Vec<&str> = text.lines().rev().take(60).collect();
                println!(
                    "---- {} worker {i} log (last 60 lines, newest first) ----",
                    self.name
                );
                for line in tail {
                    println!("{line}");
                }
            }
            println!("---- logs and effects kept in {} ----", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
        // The database goes with `self.db`.
    }
}

/// A private `redis-server` on a free loopback port, for tests that flush it.
pub struct PrivateRedis {
    child: Child,
    pub url: String,
}

impl PrivateRedis {
    pub async fn start() -> Self {
        let port = free_port();
        let child = Self::spawn(port);
        let redis = PrivateRedis {
            child,
            url: format!("redis://127.0.0.1:{port}"),
        };
        redis.wait_ready().await;
        redis
    }

    fn spawn(port: u16) -> Child {
        Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (run scripts/setup.sh)")
    }

    async fn wait_ready(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(client) = redis::Client::open(self.url.as_str()) {
                if let Ok(mut conn) = client.get_multiplexed_async_connection().await {
                    if redis::cmd("PING")
                        .query_async::<String>(&mut conn)
                        .await
                        .is_ok()
                    {
                        return;
                    }
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "private redis-server did not start"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// SIGKILL the server: it keeps nothing on disk, so everything it held
    /// is gone.
    pub fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Start an empty server on the port of the killed one.
    pub async fn restart(&mut self) {
        let port: u16 = self.url.rsplit(':').next().unwrap().parse().unwrap();
        self.child = Self::spawn(port);
        self.wait_ready().await;
    }

    pub async fn flushall(&self) {
        let client = redis::Client::open(self.url.as_str()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let _: () = redis::cmd("FLUSHALL").query_async(&mut conn).await.unwrap();
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A private PostgreSQL server (Debian's binaries, a fresh `initdb` in a
/// temporary folder, trust auth, a free loopback port) for tests that crash
/// and restart it. Run as the `postgres` user when the test runs as root
/// (`initdb` refuses root).
pub struct PrivatePostgres {
    bin: PathBuf,
    data: PathBuf,
    as_postgres: bool,
    port: u16,
    /// `postgres://postgres@127.0.0.1:<port>/postgres`
    pub admin_url: String,
}

impl PrivatePostgres {
    /// `Err` says why this machine cannot run one (no server binaries, no
    /// `postgres` user to run them as root).
    pub async fn start() -> Result<Self, String> {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .map_err(|e| format!("no PostgreSQL server binaries in /usr/lib/postgresql ({e}); run scripts/setup.sh"))?
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .max()
            .map(|v| PathBuf::from(format!("/usr/lib/postgresql/{v}/bin")))
            .filter(|b| b.join("initdb").exists())
            .ok_or("no /usr/lib/postgresql/<version>/bin/initdb; run scripts/setup.sh")?;
        let root = Command::new("id")
            .arg("-u")
            .output()
            .map(|o| o.stdout == b"0\n")
            .unwrap_or(false);
        if root
            && !Command::new("id")
                .arg("postgres")
                .stdout(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false)
        {
            return Err("running as root without a `postgres` user to run initdb as".into());
        }
        let port = free_port();
        let data = std::env::temp_dir().join(format!(
            "orrery-pg-{}",
            &Uuid::new_v4().simple().to_string()[..10]
        ));
        let pg = PrivatePostgres {
            bin,
            data,
            as_postgres: root,
            port,
            admin_url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
        };
        let data = pg.data.to_string_lossy().into_owned();
        pg.run(
            "initdb",
            &[
                "-D",
                &data,
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
                "-E",
                "UTF8",
            ],
        )?;
        pg.start_server().await?;
        Ok(pg)
    }

    /// [`PrivatePostgres::start`], or `None` after saying loudly on the real
    /// stderr why `test` is skipped.
    pub async fn start_or_skip(test: &str) -> Option<Self> {
        match Self::start().await {
            Ok(pg) => Some(pg),
            Err(why) => {
                use std::io::Write;
                let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
                None
            }
        }
    }

    /// [`PrivatePostgres::start_or_skip`] and a [`TestEnv`] named `name` on
    /// it (with the default Redis). Bind them in this order, `(pg, env)`: the
    /// environment (and its database) goes before the server.
    pub async fn with_env(test: &str, name: &str) -> Option<(Self, TestEnv)> {
        let pg = Self::start_or_skip(test).await?;
        let env = TestEnv::with_servers(name, &pg.admin_url, &default_redis_url()).await;
        Some((pg, env))
    }

    fn run(&self, tool: &str, args: &[&str]) -> Result<(), String> {
        let exe = self.bin.join(tool);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        let out = cmd
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("{tool}: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "{tool} {args:?}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(())
    }

    async fn start_server(&self) -> Result<(), String> {
        let data = self.data.to_string_lossy().into_owned();
        let log = self.data.join("server.log").to_string_lossy().into_owned();
        let opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {data} -c max_connections=60",
            self.port
        );
        self.run(
            "pg_ctl",
            &[
                "-D", &data, "-l", &log, "-o", &opts, "-w", "-t", "30", "start",
            ],
        )?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while sqlx::PgConnection::connect(&self.admin_url).await.is_err() {
            if tokio::time::Instant::now() > deadline {
                return Err(format!(
                    "private PostgreSQL on port {} does not answer",
                    self.port
                ));
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        Ok(())
    }

    /// Stop the server the way a crash does (`-m immediate`: every backend
    /// quits at once, no shutdown checkpoint, WAL recovery at the next start).
    pub fn crash(&self) {
        let data = self.data.to_string_lossy().into_owned();
        self.run("pg_ctl", &["-D", &data, "-m", "immediate", "-w", "stop"])
            .unwrap();
    }

    /// Start it again after [`PrivatePostgres::crash`], once it answers.
    pub async fn restart(&self) {
        self.start_server().await.unwrap();
    }

    /// Crash, stay down for `down`, start again.
    pub async fn crash_and_restart(&self, down: Duration) {
        self.crash();
        tokio::time::sleep(down).await;
        self.restart().await;
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let data = self.data.to_string_lossy().into_owned();
        let _ = self.run("pg_ctl", &["-D", &data, "-m", "immediate", "-w", "stop"]);
        let _ = std::fs::remove_dir_all(&self.data);
    }
}

/// Just a migrated database of its own (no engine, no Redis), dropped with it:
/// for tests of integrations that only need the inventory tables.
pub struct TestDb {
    pub db_name: String,
    pub db_url: String,
    pub pool: PgPool,
    admin_url: String,
}

impl TestDb {
    pub async fn new(name: &str) -> Self {
        Self::on(&admin_url(), name).await
    }

    /// A database on the server `admin_url` points at.
    pub async fn on(admin_url: &str, name: &str) -> Self {
        let suffix = Uuid::new_v4().simple().to_string();
        let db_name = format!("orrery_t_{}_{}", name, &suffix[..10]);
        let mut admin = sqlx::PgConnection::connect(admin_url)
            .await
            .expect("PostgreSQL must be reachable (run scripts/setup.sh)");
        sqlx::query(&format!("CREATE DATABASE {db_name}"))
            .execute(&mut admin)
            .await
            .unwrap();
        admin.close().await.unwrap();
        let db_url = format!("{}/{db_name}", &admin_url[..admin_url.rfind('/').unwrap()]);
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(10)
            .connect(&db_url)
            .await
            .unwrap();
        MIGRATOR.run(&pool).await.unwrap();
        TestDb {
            db_name,
            db_url,
            pool,
            admin_url: admin_url.to_owned(),
        }
    }

    /// A user and a `provisioning` cluster of `size` owned by them (machines
    /// reference clusters).
    pub async fn cluster(&self, size: i32) -> Uuid {
        let user = Uuid::new_v4();
        sqlx::query("INSERT INTO users (id, name) VALUES ($1, $2)")
            .bind(user)
            .bind(format!("u-{}", user.simple()))
            .execute(&self.pool)
            .await
            .unwrap();
        let cluster = Uuid::now_v7();
        sqlx::query(
            "INSERT INTO clusters (id, name, owner_id, size, services) \
             VALUES ($1, $2, $3, $4, ARRAY['HDFS','YARN','MAPREDUCE2','ZOOKEEPER'])",
        )
        .bind(cluster)
        .bind(format!("c-{}", &cluster.simple().to_string()[..8]))
        .bind(user)
        .bind(size)
        .execute(&self.pool)
        .await
        .unwrap();
        cluster
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let (db, admin_url) = (self.db_name.clone(), self.admin_url.clone());
        // FORCE ends this pool's connections too.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok(mut admin) = sqlx::PgConnection::connect(&admin_url).await {
                    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
                        .execute(&mut admin)
                        .await;
                }
            });
        })
        .join();
    }
}

/// True (after saying why on stderr) when this machine cannot run local
/// containers; container tests then return without passing silently.
pub fn skip_without_containers(test: &str) -> bool {
    match orrery_workflows::infra::local::LocalProvider::check() {
        Ok(()) => false,
        Err(e) => {
            // Written to the real stderr: libtest would swallow `eprintln!`
            // of a passing test.
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED {test}: local containers are not possible here: {e}"
            );
            true
        }
    }
}
