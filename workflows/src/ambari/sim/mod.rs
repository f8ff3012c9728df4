//! The Ambari emulator: an in-memory stand-in for an Ambari server, for
//! development and tests. It serves exactly the part of the REST API v1 that
//! [`AmbariClient`](super::AmbariClient) uses, the way the real server does
//! (Basic auth, the `X-Requested-By` CSRF check, `{"status","message"}` error
//! bodies, `202` + request for asynchronous work, requests whose tasks
//! progress over time), plus an agent-facing port where our agent script
//! registers hosts and heartbeats, plus fault injection.
//!
//! State lives in memory only: a restart forgets every host, blueprint and
//! cluster (agents re-register by themselves on their next heartbeat).
//!
//! Layout: [`faults`] (what goes wrong on purpose), `state` (the world and
//! its rules, time passed in explicitly), `http` (the REST API), `agent`
//! (the agent port). [`serve`] binds both ports; tests bind `127.0.0.1:0`.
//! `docs/AMBARI_EMULATOR.md` documents the surface and the knobs.

pub mod faults;

mod agent;
mod http;
mod state;

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use axum::{
    response::{IntoResponse, Response},
    Json, Router,
};
use serde_json::json;
use tokio::{net::TcpListener, time::Instant};
use tokio_util::sync::CancellationToken;

pub use faults::{Faults, RequestKind};

use self::{
    faults::{Injected, Rng},
    state::{FailPlan, World},
};
use super::model::HostStatus;

/// Settings fixed at start-up (faults can change later).
#[derive(Clone)]
pub struct SimConfig {
    /// Basic-auth login accepted on `/api/v1` (default `admin`/`admin`).
    pub user: String,
    pub password: String,
    /// How long an asynchronous request takes from start to end, whatever its
    /// number of tasks (they share it evenly and run one after the other).
    pub request_duration: Duration,
    /// A host whose last heartbeat is older than this is `UNKNOWN`
    /// (`host_state` `HEARTBEAT_LOST`).
    pub heartbeat_timeout: Duration,
    /// The heartbeat interval the emulator suggests to agents on registration.
    pub heartbeat_interval: Duration,
    pub faults: Faults,
}

impl std::fmt::Debug for SimConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimConfig")
            .field("user", &self.user)
            .field("request_duration", &self.request_duration)
            .field("heartbeat_timeout", &self.heartbeat_timeout)
            .field("heartbeat_interval", &self.heartbeat_interval)
            .field("faults", &self.faults)
            .finish_non_exhaustive()
    }
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            user: "admin".into(),
            password: "admin".into(),
            request_duration: Duration::from_secs(10),
            heartbeat_timeout: Duration::from_secs(30),
            heartbeat_interval: Duration::from_secs(5),
            faults: Faults::default(),
        }
    }
}

/// An error answer in Ambari's shape: `{"status": 404, "message": "..."}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimError {
    pub status: u16,
    pub message: String,
}

impl SimError {
    pub fn new(status: u16, message: impl Into<String>) -> Self {
        SimError {
            status,
            message: message.into(),
        }
    }
}

impl IntoResponse for SimError {
    fn into_response(self) -> Response {
        let code = axum::http::StatusCode::from_u16(self.status)
            .unwrap_or(axum::http::StatusCode::INTERNAL_SERVER_ERROR);
        (
            code,
            Json(json!({"status": self.status, "message": self.message})),
        )
            .into_response()
    }
}

struct FaultState {
    faults: Faults,
    rng: Rng,
}

struct Shared {
    config: SimConfig,
    /// One lock for the whole world: every operation is short and none
    /// awaits while holding it.
    world: Mutex<World>,
    faults: Mutex<FaultState>,
}

/// A handle on one emulator: cheap to clone, shared by its routers.
#[derive(Clone)]
pub struct Sim {
    shared: Arc<Shared>,
}

impl Sim {
    pub fn new(config: SimConfig) -> Self {
        let faults = FaultState {
            rng: Rng::new(config.faults.seed),
            faults: config.faults.clone(),
        };
        Sim {
            shared: Arc::new(Shared {
                config,
                world: Mutex::new(World::new()),
                faults: Mutex::new(faults),
            }),
        }
    }

    pub fn config(&self) -> &SimConfig {
        &self.shared.config
    }

    /// The REST API (`/api/v1/...`) and the fault endpoint (`/_sim/faults`).
    pub fn api_router(&self) -> Router {
        http::router(self.clone())
    }

    /// The agent port (`/agent/v1/...`).
    pub fn agent_router(&self) -> Router {
        agent::router(self.clone())
    }

    /// Replace the fault configuration (as `POST /_sim/faults` does).
    pub fn set_faults(&self, faults: Faults) -> Result<(), String> {
        faults.validate()?;
        let now = Instant::now();
        self.world().drop_agents(&faults.drop_agents, now);
        let mut f = lock(&self.shared.faults);
        f.rng = Rng::new(faults.seed);
        f.faults = faults;
        Ok(())
    }

    pub fn faults(&self) -> Faults {
        lock(&self.shared.faults).faults.clone()
    }

    /// Register a host as its agent would (for tests that need hosts but
    /// not agent processes). Host names are lower-cased, as Ambari does.
    pub fn register_host(&self, host: &str) -> Result<(), SimError> {
        let host = agent::host_name(host)?;
        if self.is_dropped(&host) {
            return Err(SimError::new(503, "agent dropped by fault injection"));
        }
        self.world().register(&host, Instant::now());
        Ok(())
    }

    /// A heartbeat as the agent would send it; `false` if unknown.
    pub fn heartbeat(&self, host: &str) -> bool {
        let host = host.to_ascii_lowercase();
        !self.is_dropped(&host) && self.world().heartbeat(&host, Instant::now())
    }

    /// A host's status, `None` if it never registered.
    pub fn host_status(&self, host: &str) -> Option<HostStatus> {
        let world = self.world();
        let rec = world.hosts.get(&host.to_ascii_lowercase())?;
        Some(world.host_status(rec, Instant::now(), self.shared.config.heartbeat_timeout))
    }

    /// Move requests forward to now.
    pub fn settle(&self) {
        self.world()
            .settle(Instant::now(), self.shared.config.heartbeat_timeout);
    }

    fn world(&self) -> MutexGuard<'_, World> {
        lock(&self.shared.world)
    }

    fn is_dropped(&self, host: &str) -> bool {
        lock(&self.shared.faults)
            .faults
            .drop_agents
            .iter()
            .any(|d| d.eq_ignore_ascii_case(host))
    }

    fn latency(&self) -> Duration {
        Duration::from_millis(lock(&self.shared.faults).faults.latency_ms)
    }

    /// Whether this call gets an injected `500`, and when.
    fn roll(&self, mutating: bool) -> Option<Injected> {
        let mut f = lock(&self.shared.faults);
        if f.faults.error_rate <= 0.0 {
            return None;
        }
        let hit = f.rng.next_f64() < f.faults.error_rate;
        if !hit {
            return None;
        }
        if mutating && f.rng.next_u64() % 2 == 1 {
            Some(Injected::After)
        } else {
            Some(Injected::Before)
        }
    }

    /// Consume one request failure if the faults ask for one of this kind.
    fn take_failure(&self, kind: RequestKind) -> Option<FailPlan> {
        let mut f = lock(&self.shared.faults);
        let wanted = f.faults.fail_kind;
        if f.faults.fail_requests == 0 || (wanted != RequestKind::Any && wanted != kind) {
            return None;
        }
        f.faults.fail_requests -= 1;
        Some(FailPlan {
            role: f.faults.fail_role.clone(),
        })
    }
}

/// A poisoned lock only means another handler panicked; the state is
/// still consistent enough for a test stand-in.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A running emulator: both ports bound, served until dropped or shut down.
pub struct RunningSim {
    pub sim: Sim,
    pub api_addr: SocketAddr,
    pub agent_addr: SocketAddr,
    shutdown: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl RunningSim {
    /// `http://127.0.0.1:PORT` of the REST API (what `AmbariConfig::new` takes).
    pub fn url(&self) -> String {
        format!("http://{}", self.api_addr)
    }

    /// Stop serving and wait for the servers to finish.
    pub async fn shutdown(mut self) {
        self.shutdown.cancel();
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
    }
}

impl Drop for RunningSim {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Bind the REST API on `api` and the agent port on `agent` (port 0 picks a
/// free one) and serve both until `shutdown` fires or the handle is dropped.
pub async fn serve(
    config: SimConfig,
    api: SocketAddr,
    agent: SocketAddr,
    shutdown: CancellationToken,
) -> std::io::Result<RunningSim> {
    config
        .faults
        .validate()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let sim = Sim::new(config);
    let api_listener = TcpListener::bind(api).await?;
    let agent_listener = TcpListener::bind(agent).await?;
    let api_addr = api_listener.local_addr()?;
    let agent_addr = agent_listener.local_addr()?;
    let mut tasks = Vec::new();
    for (listener, router) in [
        (api_listener, sim.api_router()),
        (agent_listener, sim.agent_router()),
    ] {
        let stop = shutdown.clone();
        tasks.push(tokio::spawn(async move {
            let served = axum::serve(listener, router)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "ambari emulator server stopped");
            }
        }));
    }
    // Decide tasks close to when they end (a host lost later must not fail
    // a task that ended while it was alive), even if nobody is polling.
    let ticker = sim.clone();
    let stop = shutdown.clone();
    tasks.push(tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = every.tick() => ticker.settle(),
            }
        }
    }));
    Ok(RunningSim {
        sim,
        api_addr,
        agent_addr,
        shutdown,
        tasks,
    })
}
