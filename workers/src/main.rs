//! `orrery-worker`: consumes queues (`--queues provision,ssh`) and/or runs the
//! scheduler (`--scheduler`: reconciler and cron jobs). Scale by running more.

use clap::Parser;
use orrery_workflows::{telemetry, EngineConfig};
use tokio::task::JoinSet;

#[derive(Parser, Debug)]
#[command(
    name = "orrery-worker",
    about = "Orrery worker: queue consumers and/or the scheduler"
)]
struct Args {
    /// Comma-separated queues to consume (e.g. provision,ssh,ambari).
    #[arg(long, value_delimiter = ',')]
    queues: Vec<String>,
    /// Run the reconciler and the cron jobs (safe to run several).
    #[arg(long)]
    scheduler: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    telemetry::init();
    let args = Args::parse();
    let queues: Vec<String> = args
        .queues
        .into_iter()
        .filter(|q| !q.trim().is_empty())
        .collect();
    if queues.is_empty() && !args.scheduler {
        anyhow::bail!("nothing to do: pass --queues <q1,q2,...> and/or --scheduler");
    }
    let config = EngineConfig::from_env()?;
    let shutdown = orrery_workers::shutdown_on_signals();
    let rt = orrery_workers::start(config, shutdown.clone()).await?;
    let mut tasks = JoinSet::new();
    if !queues.is_empty() {
        orrery_workers::spawn_consumers(&mut tasks, &rt, &queues, &shutdown);
    }
    if args.scheduler {
        orrery_workers::spawn_scheduler(&mut tasks, &rt, &shutdown)?;
    }
    tracing::info!(worker_id = %rt.engine.worker_id, ?queues, scheduler = args.scheduler, "worker started");
    while tasks.join_next().await.is_some() {}
    let left = rt.engine.drain(std::time::Duration::from_secs(60)).await;
    if left > 0 {
        tracing::warn!(left, "stopping with steps still running; their leases will expire and another worker resumes them");
    }
    tracing::info!("worker stopped");
    Ok(())
}
