//! The API's state: [`App`], shared by every handler as [`AppState`], and its
//! typed configuration [`ApiConfig`], read once from the environment.

use std::sync::Arc;

use orrery_workflows::{
    config::{var, ConfigError},
    dispatch::RedisDispatcher,
    Engine, EngineConfig, Services,
};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::{admission::Admissions, availability::DatabaseGate, metrics::Metrics};

/// What every handler can reach.
pub struct App {
    /// The source of truth; the engine's own pool.
    pub pool: PgPool,
    /// Reconnecting Redis connection, used to report readiness and queue depth.
    pub redis: redis::aio::ConnectionManager,
    /// Builds runs (validating their input), dispatches, cancels and replays.
    /// The API never drives a run itself: it has no queue consumers.
    pub engine: Arc<Engine>,
    pub config: ApiConfig,
    /// Request counters and latencies for `/metrics`.
    pub metrics: Metrics,
    /// Group commit of cluster requests (quota admission under one lock).
    pub admissions: Admissions,
    /// Closed while PostgreSQL is unreachable: requests fail fast.
    pub database: Arc<DatabaseGate>,
}

#[derive(Clone)]
pub struct AppState(pub Arc<App>);

impl App {
    pub fn new(
        engine: Arc<Engine>,
        redis: redis::aio::ConnectionManager,
        config: ApiConfig,
    ) -> Arc<Self> {
        Arc::new_cyclic(|app| App {
            pool: engine.pool.clone(),
            redis,
            config,
            metrics: Metrics::default(),
            admissions: Admissions::start(app.clone()),
            database: DatabaseGate::new((*engine.pool.connect_options()).clone()),
            engine,
        })
    }

    /// Connect to PostgreSQL and Redis and build the engine pieces the API
    /// needs (registry, dispatcher), with the workflows this build knows.
    pub async fn connect(
        engine_cfg: EngineConfig,
        config: ApiConfig,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Arc<Self>> {
        let pool = orrery_workflows::config::connect_db_or_explain(&engine_cfg).await?;
        // The dispatcher's connection serves the API's own Redis reads too.
        let dispatcher = Arc::new(RedisDispatcher::connect_or_explain(&engine_cfg).await?);
        let redis = dispatcher.connection();
        Ok(Self::assemble(
            pool, redis, dispatcher, engine_cfg, config, shutdown,
        ))
    }

    /// Like [`App::connect`], reusing a pool and a Redis connection the
    /// process already has.
    pub async fn from_parts(
        pool: PgPool,
        redis: redis::aio::ConnectionManager,
        engine_cfg: EngineConfig,
        config: ApiConfig,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Arc<Self>> {
        let dispatcher = Arc::new(RedisDispatcher::connect_or_explain(&engine_cfg).await?);
        Ok(Self::assemble(
            pool, redis, dispatcher, engine_cfg, config, shutdown,
        ))
    }

    fn assemble(
        pool: PgPool,
        redis: redis::aio::ConnectionManager,
        dispatcher: Arc<RedisDispatcher>,
        engine_cfg: EngineConfig,
        config: ApiConfig,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let registry = orrery_workflows::registry(engine_cfg.test_workflows);
        let engine = Engine::new(
            pool,
            Arc::new(registry),
            Services::new(),
            dispatcher,
            engine_cfg,
            shutdown,
        );
        config.check(&engine);
        App::new(engine, redis, config)
    }
}

/// Where cluster requests get machines from (`ORRERY_PROVIDER`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Provider {
    /// Pre-registered machines in the `machines` table.
    Pool,
    /// Containers on this host, up to `ORRERY_LOCAL_CAPACITY`.
    Local,
}

impl Provider {
    /// Its name, as `ORRERY_PROVIDER` and the quota functions of the
    /// database take it.
    pub fn name(self) -> &'static str {
        match self {
            Provider::Pool => "pool",
            Provider::Local => "local",
        }
    }
}

impl std::str::FromStr for Provider {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "pool" => Ok(Provider::Pool),
            "local" => Ok(Provider::Local),
            _ => Err("expected `local` or `pool`".into()),
        }
    }
}

/// The workflows the API starts for cluster operations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterWorkflows {
    pub create: String,
    pub terminate: String,
    pub grant: String,
    pub revoke: String,
    /// Delivers a webhook once a task finishes (a durable run with retries).
    pub callback: String,
}

impl ClusterWorkflows {
    /// The real provisioning workflows.
    pub fn real() -> Self {
        Self::prefixed("")
    }

    /// Stand-ins that only move rows (`workflows::builtin::api_fakes`).
    pub fn fake() -> Self {
        Self::prefixed("fake.")
    }

    fn prefixed(p: &str) -> Self {
        ClusterWorkflows {
            create: format!("{p}create_cluster"),
            terminate: format!("{p}terminate_cluster"),
            grant: format!("{p}grant_user"),
            revoke: format!("{p}revoke_user"),
            callback: orrery_workflows::builtin::api_fakes::DELIVER_CALLBACK.to_owned(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct ApiConfig {
    /// `ORRERY_CLUSTER_WORKFLOWS=real|fake` (default real).
    pub workflows: ClusterWorkflows,
    /// `ORRERY_PROVIDER=local|pool` (default local).
    pub provider: Provider,
    /// `ORRERY_LOCAL_CAPACITY` (default 8): machines the local provider can run.
    pub local_capacity: i64,
    /// `ORRERY_DEFAULT_QUOTA` (default 8): a user's limit when neither they nor their group has one.
    pub default_quota: i64,
    /// `ORRERY_MAX_CLUSTER_SIZE` (default 100): the largest size one request may ask for.
    pub max_cluster_size: i64,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            workflows: ClusterWorkflows::real(),
            provider: Provider::Local,
            local_capacity: 8,
            default_quota: 8,
            max_cluster_size: 100,
        }
    }
}

impl ApiConfig {
    pub fn from_env() -> Result<Self, ConfigError> {
        let d = ApiConfig::default();
        let kind: String = var("ORRERY_CLUSTER_WORKFLOWS", "real".to_string())?;
        let workflows = match kind.as_str() {
            "real" => ClusterWorkflows::real(),
            "fake" => ClusterWorkflows::fake(),
            _ => {
                return Err(ConfigError {
                    name: "ORRERY_CLUSTER_WORKFLOWS",
                    value: kind,
                    reason: "expected `real` or `fake`".into(),
                })
            }
        };
        let positive = |name: &'static str, v: i64| {
            if v < 0 {
                Err(ConfigError {
                    name,
                    value: v.to_string(),
                    reason: "must not be negative".into(),
                })
            } else {
                Ok(v)
            }
        };
        Ok(ApiConfig {
            workflows,
            provider: var("ORRERY_PROVIDER", d.provider)?,
            local_capacity: positive(
                "ORRERY_LOCAL_CAPACITY",
                var("ORRERY_LOCAL_CAPACITY", d.local_capacity)?,
            )?,
            default_quota: positive(
                "ORRERY_DEFAULT_QUOTA",
                var("ORRERY_DEFAULT_QUOTA", d.default_quota)?,
            )?,
            max_cluster_size: positive(
                "ORRERY_MAX_CLUSTER_SIZE",
                var("ORRERY_MAX_CLUSTER_SIZE", d.max_cluster_size)?,
            )?,
        })
    }

    /// Warn about cluster workflows this process does not know: requests
    /// needing them are refused with 503 until a build that has them runs.
    pub fn check(&self, engine: &Engine) {
        let w = &self.workflows;
        for name in [&w.create, &w.terminate, &w.grant, &w.revoke, &w.callback] {
            if engine.registry.latest(name).is_none() {
                tracing::warn!(workflow = %name, "workflow not registered in this build; requests that need it answer 503");
            }
        }
    }
}
