//! `orrery`: the operator's command line.
//!
//! - `orrery migrate` applies `migrations/` (the Procfile's `release`).
//! - `orrery run submit|show|watch|list|cancel|replay` drive runs directly
//!   against PostgreSQL and Redis (operator tooling; users get the REST API).
//! - `orrery dev` runs the API, a worker for every queue and the scheduler in
//!   one process, for a laptop.

mod admin;
mod infra;

use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use orrery_workflows::{
    config, store,
    store::{ReplayRequest, RunFilter},
    telemetry, EngineConfig, RunState, MIGRATOR,
};
use serde_json::Value;
use tokio::task::JoinSet;
use uuid::Uuid;

#[derive(Parser)]
#[command(
    name = "orrery",
    about = "Orrery control plane: migrations, runs, all-in-one dev mode"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Apply pending database migrations (creates the database if missing).
    Migrate,
    /// Work with workflow runs.
    Run {
        #[command(subcommand)]
        command: RunCommand,
    },
    /// API, workers for every queue and the scheduler, in one process.
    Dev,
    /// Accounts: the first operator of a fresh install, groups, extra keys.
    Admin {
        #[command(subcommand)]
        command: admin::AdminCommand,
    },
    /// Machines: prepare local containers, register pool machines, list.
    Infra {
        #[command(subcommand)]
        command: infra::InfraCommand,
    },
}

#[derive(Subcommand)]
enum RunCommand {
    /// Submit a run; prints its id.
    Submit {
        workflow: String,
        /// The run's input as JSON.
        #[arg(default_value = "{}")]
        input: String,
        #[arg(long, default_value = "cli")]
        by: String,
    },
    /// Show a run with its steps and history, as JSON.
    Show { id: Uuid },
    /// Follow a run until it finishes; exit status 0 only if it succeeded.
    Watch {
        id: Uuid,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
    /// List runs.
    List {
        #[arg(long)]
        state: Option<String>,
        #[arg(long)]
        workflow: Option<String>,
        /// Only stuck runs.
        #[arg(long)]
        stuck: bool,
        #[arg(long, default_value_t = 50)]
        limit: i64,
    },
    /// Ask a run to stop; its compensations run, then it ends `cancelled`.
    Cancel {
        id: Uuid,
        #[arg(long)]
        reason: Option<String>,
        #[arg(long, default_value = "cli")]
        by: String,
    },
    /// Rerun a failed, cancelled (or, with --force, stuck) run from a step.
    Replay {
        id: Uuid,
        /// Step to start from (default: the step it failed at).
        #[arg(long)]
        from: Option<String>,
        /// Replacement input, as JSON.
        #[arg(long)]
        input: Option<String>,
        #[arg(long)]
        force: bool,
        #[arg(long)]
        reason: Option<String>,
        #[arg(long, default_value = "cli")]
        by: String,
    },
}

fn parse_json(what: &str, text: &str) -> anyhow::Result<Value> {
    serde_json::from_str(text).with_context(|| format!("{what} is not valid JSON: {text}"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    telemetry::init();
    let cli = Cli::parse();
    let cfg = EngineConfig::from_env()?;
    match cli.command {
        Command::Migrate => migrate(&cfg).await,
        Command::Dev => dev(cfg).await,
        Command::Admin { command } => admin::run(&cfg, command).await,
        Command::Infra { command } => infra::run(&cfg, command).await,
        Command::Run { command } => run_command(cfg, command).await,
    }
}

/// Create the database if it does not exist, then apply migrations.
async fn migrate(cfg: &EngineConfig) -> anyhow::Result<()> {
    use sqlx::migrate::MigrateDatabase;
    if !sqlx::Postgres::database_exists(&cfg.database_url)
        .await
        .unwrap_or(false)
    {
        sqlx::Postgres::create_database(&cfg.database_url)
            .await
            .context("cannot create the database named by ORRERY_DATABASE_URL")?;
        tracing::info!("database created");
    }
    let pool = config::connect_db(cfg)
        .await
        .context("cannot connect to PostgreSQL (ORRERY_DATABASE_URL)")?;
    MIGRATOR.run(&pool).await.context("applying migrations")?;
    tracing::info!("migrations applied");
    Ok(())
}

async fn run_command(cfg: EngineConfig, command: RunCommand) -> anyhow::Result<()> {
    let shutdown = tokio_util::sync::CancellationToken::new();
    let rt = orrery_workers::start(cfg, shutdown).await?;
    let engine = rt.engine;
    let out = |v: &Value| -> anyhow::Result<()> {
        let text = serde_json::to_string_pretty(v)?;
        std::io::Write::write_all(&mut std::io::stdout(), format!("{text}\n").as_bytes())?;
        Ok(())
    };
    match command {
        RunCommand::Submit {
            workflow,
            input,
            by,
        } => {
            let input = parse_json("the input", &input)?;
            let id = engine.submit(&workflow, input, Some(&by)).await?;
            std::io::Write::write_all(&mut std::io::stdout(), format!("{id}\n").as_bytes())?;
        }
        RunCommand::Show { id } => {
            let run = store::get_run(&engine.pool, id)
                .await?
                .with_context(|| format!("no run {id}"))?;
            let steps = store::steps(&engine.pool, id).await?;
            let history = store::history(&engine.pool, id).await?;
            out(&serde_json::json!({ "run": run, "steps": steps, "history": history }))?;
        }
        RunCommand::Watch { id, timeout } => {
            watch(&engine, id, Duration::from_secs(timeout)).await?
        }
        RunCommand::List {
            state,
            workflow,
            stuck,
            limit,
        } => {
            let state = state
                .map(|s| s.parse::<RunState>())
                .transpose()
                .map_err(|e| anyhow::anyhow!("--state: {e}; one of queued, running, waiting, retrying, succeeded, failed, cancelled, cancelling, compensating"))?;
            let filter = RunFilter {
                state,
                workflow,
                stuck: stuck.then_some(true),
                limit: Some(limit),
            };
            let runs = store::list_runs(&engine.pool, &filter).await?;
            out(&serde_json::to_value(runs)?)?;
        }
        RunCommand::Cancel { id, reason, by } => {
            engine.cancel(id, &by, reason.as_deref()).await?;
            tracing::info!(%id, "cancel requested");
        }
        RunCommand::Replay {
            id,
            from,
            input,
            force,
            reason,
            by,
        } => {
            let input = input.map(|t| parse_json("--input", &t)).transpose()?;
            let req = ReplayRequest {
                from_step: from,
                input,
                force,
                reason,
            };
            let outcome = engine.replay(id, &req, &by).await?;
            tracing::info!(%id, from = outcome.from_step, "replay queued");
        }
    }
    Ok(())
}

/// Print a line whenever the run's state or step changes.
async fn watch(
    engine: &orrery_workflows::Engine,
    id: Uuid,
    timeout: Duration,
) -> anyhow::Result<()> {
    let wf_steps = |name: &str, version: i32| {
        engine
            .registry
            .get(name, version)
            .map(|wf| wf.steps.len())
            .unwrap_or(0)
    };
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last = String::new();
    loop {
        let run = store::get_run(&engine.pool, id)
            .await?
            .with_context(|| format!("no run {id}"))?;
        let total = wf_steps(&run.workflow, run.workflow_version);
        let steps = store::steps(&engine.pool, id).await?;
        let done = steps.iter().filter(|s| s.output.is_some()).count();
        let current = steps_name(engine, &run);
        let line = format!(
            "run {id} [{}] {:<12} step {}/{} {}{}",
            run.workflow,
            run.state.as_str(),
            done,
            total,
            current,
            run.error
                .as_ref()
                .map(|e| format!(" error: {e}"))
                .unwrap_or_default()
        );
        if line != last {
            std::io::Write::write_all(&mut std::io::stdout(), format!("{line}\n").as_bytes())?;
            last = line;
        }
        if run.state.is_terminal() {
            if run.state == RunState::Succeeded {
                if let Some(output) = run.output {
                    std::io::Write::write_all(
                        &mut std::io::stdout(),
                        format!("result: {output}\n").as_bytes(),
                    )?;
                }
                return Ok(());
            }
            bail!("run {id} ended {}", run.state);
        }
        if tokio::time::Instant::now() > deadline {
            bail!("run {id} still {} after {timeout:?}", run.state);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn steps_name(engine: &orrery_workflows::Engine, run: &store::RunSummary) -> String {
    engine
        .registry
        .get(&run.workflow, run.workflow_version)
        .and_then(|wf| {
            wf.steps
                .get(run.cursor as usize)
                .map(|s| format!("({})", s.name))
        })
        .unwrap_or_default()
}

/// Everything in one process: API, a consumer per queue, the scheduler.
async fn dev(cfg: EngineConfig) -> anyhow::Result<()> {
    migrate(&cfg).await?;
    let addr: std::net::SocketAddr = config::var("ORRERY_API_ADDR", "127.0.0.1:8080".parse()?)?;
    let shutdown = orrery_workers::shutdown_on_signals();
    let rt = orrery_workers::start(cfg.clone(), shutdown.clone()).await?;
    let queues = orrery_workers::all_queues(&rt.engine.registry);
    let mut tasks = JoinSet::new();
    orrery_workers::spawn_consumers(&mut tasks, &rt, &queues, &shutdown);
    orrery_workers::spawn_scheduler(&mut tasks, &rt, &shutdown)?;
    let redis = redis_manager(&cfg).await?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    let app =
        orrery_api::app::App::new(rt.engine.clone(), redis, orrery_api::ApiConfig::from_env()?);
    let s = shutdown.clone();
    tasks.spawn(async move {
        if let Err(err) = orrery_api::serve_app(app, listener, s).await {
            tracing::error!(error = %err, "api stopped");
        }
    });
    tracing::info!(%addr, ?queues, "orrery dev: api, workers and scheduler running; Ctrl-C to stop");
    while tasks.join_next().await.is_some() {}
    Ok(())
}

async fn redis_manager(cfg: &EngineConfig) -> anyhow::Result<redis::aio::ConnectionManager> {
    let client = redis::Client::open(cfg.redis_url.as_str())
        .context("ORRERY_REDIS_URL is not a Redis URL")?;
    client
        .get_connection_manager()
        .await
        .context("cannot connect to Redis (ORRERY_REDIS_URL)")
}
