//! Orrery's durable workflow engine and (later) its integrations.
//!
//! # Layout
//!
//! - [`workflow`]: how a workflow is declared: typed steps with a queue,
//!   timeout, retry policy, compensation, waiting and fan-out.
//! - [`state`]: the run lifecycle as one enum.
//! - [`lifecycle`]: one file per transition; each is a pure function from a
//!   run and an outcome to the single write ([`store::RunUpdate`]) that commits it.
//! - [`store`]: every SQL statement of the engine (claim, heartbeat, submit,
//!   cancel, replay, queries) and the batching checkpoint [`writer`], which
//!   batches claims with checkpoints through [`batch`]; a lone claim is
//!   held open to share its commit with the run's first write ([`hold`]).
//! - [`executor`]: claims a dispatched run and drives its steps, inline while
//!   they stay on one queue, handing over through [`dispatch`] when they do not.
//! - [`consumer`]: one apalis worker per queue, feeding dispatches to the executor.
//! - [`reconciler`] and [`cron`]: what the scheduler process runs.
//! - [`builtin`]: the demonstration workflow and the workflows the tests and
//!   benchmarks drive through real worker processes.
//!
//! PostgreSQL is the only source of truth. Redis carries nothing but "run X is
//! due on queue Q"; losing it loses no work (the reconciler re-dispatches).

pub mod ambari;
pub mod batch;
pub mod builtin;
pub mod config;
pub mod consumer;
pub mod cron;
pub mod dispatch;
pub mod error;
pub mod executor;
pub mod hold;
pub mod infra;
pub mod lifecycle;
pub mod provisioning;
pub mod reconciler;
pub mod retry;
pub mod ssh;
pub mod state;
pub mod store;
pub mod telemetry;
pub mod workflow;
pub mod writer;

pub use config::EngineConfig;
pub use error::{EngineError, StepError};
pub use executor::Engine;
pub use state::RunState;
pub use workflow::{Progress, Registry, Services, Step, StepCtx, Workflow};

/// Every workflow this build ships: the demonstration, callback delivery and
/// the cluster workflows, plus the test workflows when asked. API and workers
/// build their registry with this one function so they always agree.
pub fn registry(test_workflows: bool) -> Registry {
    let mut registry = Registry::new();
    builtin::register(&mut registry, test_workflows);
    provisioning::register(&mut registry);
    registry
}

/// The schema, embedded from `migrations/`; the one migrator used by the
/// `orrery migrate` command and by every test database.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");
