//! `orrery-ambari-sim`: the Ambari REST emulator for development (the `ambari`
//! line of the Procfile) and manual testing. Everything lives in memory; see
//! `docs/AMBARI_EMULATOR.md` and `orrery_workflows::ambari::sim`.
//!
//! Every flag has an `ORRERY_AMBARI_SIM_*` variable; a bad value fails
//! start-up naming the flag or variable.

use std::{collections::BTreeSet, net::SocketAddr, time::Duration};

use anyhow::Context;
use clap::Parser;
use orrery_workflows::{
    ambari::sim::{self, Faults, RequestKind, SimConfig},
    telemetry,
};

#[derive(Parser, Debug)]
#[command(
    name = "orrery-ambari-sim",
    about = "In-memory Ambari REST API v1 emulator, with an agent port and fault injection"
)]
struct Args {
    /// Address of the REST API (`/api/v1`) and the fault endpoint (`/_sim/faults`).
    /// 8081 by default, beside `orrery-api` on 8080 (a real Ambari uses 8080).
    #[arg(long, env = "ORRERY_AMBARI_SIM_ADDR", default_value = "127.0.0.1:8081")]
    listen: SocketAddr,
    /// Address agents register and heartbeat on (the real agent's port is
    /// 8440). Containers must be able to reach it: by default the local
    /// provider's bridge address (`orrery infra prepare` creates the bridge).
    #[arg(
        long,
        env = "ORRERY_AMBARI_SIM_AGENT_ADDR",
        default_value = "10.77.0.1:8440"
    )]
    agent_listen: SocketAddr,
    #[arg(long, env = "ORRERY_AMBARI_SIM_USER", default_value = "admin")]
    user: String,
    #[arg(long, env = "ORRERY_AMBARI_SIM_PASSWORD", default_value = "admin")]
    password: String,
    /// How long an asynchronous request (cluster creation, service start)
    /// takes in total, in milliseconds.
    #[arg(long, env = "ORRERY_AMBARI_SIM_REQUEST_MS", default_value_t = 10_000)]
    request_ms: u64,
    /// A host without a heartbeat for this long is reported UNKNOWN.
    #[arg(
        long,
        env = "ORRERY_AMBARI_SIM_HEARTBEAT_TIMEOUT_MS",
        default_value_t = 30_000
    )]
    heartbeat_timeout_ms: u64,
    /// Heartbeat interval suggested to agents, in seconds.
    #[arg(
        long,
        env = "ORRERY_AMBARI_SIM_HEARTBEAT_INTERVAL_S",
        default_value_t = 5
    )]
    heartbeat_interval_s: u64,
    /// Share (0–1) of API calls answered 500.
    #[arg(long, env = "ORRERY_AMBARI_SIM_ERROR_RATE", default_value_t = 0.0)]
    error_rate: f64,
    /// Seed of the generator behind --error-rate.
    #[arg(long, env = "ORRERY_AMBARI_SIM_SEED", default_value_t = 0)]
    seed: u64,
    /// Latency added to every API call, in milliseconds.
    #[arg(long, env = "ORRERY_AMBARI_SIM_LATENCY_MS", default_value_t = 0)]
    latency_ms: u64,
    /// The next N asynchronous requests of --fail-kind end FAILED.
    #[arg(long, env = "ORRERY_AMBARI_SIM_FAIL_REQUESTS", default_value_t = 0)]
    fail_requests: u32,
    /// any, cluster_create or service_state.
    #[arg(long, env = "ORRERY_AMBARI_SIM_FAIL_KIND", default_value = "any")]
    fail_kind: RequestKind,
    /// The role whose task fails (default: the middle task).
    #[arg(long, env = "ORRERY_AMBARI_SIM_FAIL_ROLE")]
    fail_role: Option<String>,
    /// Agents (host names) to treat as lost; repeat or comma-separate.
    #[arg(long, env = "ORRERY_AMBARI_SIM_DROP_AGENTS", value_delimiter = ',')]
    drop_agent: Vec<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    telemetry::init();
    let args = Args::parse();
    let faults = Faults {
        error_rate: args.error_rate,
        seed: args.seed,
        latency_ms: args.latency_ms,
        fail_requests: args.fail_requests,
        fail_kind: args.fail_kind,
        fail_role: args.fail_role.filter(|r| !r.trim().is_empty()),
        drop_agents: args
            .drop_agent
            .iter()
            .map(|h| h.trim().to_ascii_lowercase())
            .filter(|h| !h.is_empty())
            .collect::<BTreeSet<_>>(),
    };
    faults
        .validate()
        .map_err(anyhow::Error::msg)
        .context("--error-rate / ORRERY_AMBARI_SIM_ERROR_RATE")?;
    let config = SimConfig {
        user: args.user,
        password: args.password,
        request_duration: Duration::from_millis(args.request_ms),
        heartbeat_timeout: Duration::from_millis(args.heartbeat_timeout_ms.max(1)),
        heartbeat_interval: Duration::from_secs(args.heartbeat_interval_s.max(1)),
        faults,
    };
    let shutdown = orrery_workers::shutdown_on_signals();
    let running = sim::serve(config, args.listen, args.agent_listen, shutdown.clone())
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} (--listen) or {} (--agent-listen)",
                args.listen, args.agent_listen
            )
        })?;
    tracing::info!(
        api = %running.api_addr,
        agent = %running.agent_addr,
        config = ?running.sim.config(),
        "Ambari emulator listening (state is in memory only)"
    );
    shutdown.cancelled().await;
    running.shutdown().await;
    tracing::info!("Ambari emulator stopped");
    Ok(())
}
