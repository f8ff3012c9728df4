//! Typed configuration read once from environment variables at start-up.
//!
//! Every variable has a loopback default so a laptop needs none of them; a
//! value that does not parse fails start-up with the variable's name.

use std::{str::FromStr, time::Duration};

#[derive(Debug, thiserror::Error)]
#[error("environment variable {name}={value:?} is invalid: {reason}")]
pub struct ConfigError {
    pub name: &'static str,
    pub value: String,
    pub reason: String,
}

/// Read `name`, falling back to `default`; a present but unparsable value is an error.
pub fn var<T>(name: &'static str, default: T) -> Result<T, ConfigError>
where
    T: FromStr,
    T::Err: std::fmt::Display,
{
    match std::env::var(name) {
        Ok(value) if !value.trim().is_empty() => {
            value.trim().parse().map_err(|e: T::Err| ConfigError {
                name,
                value,
                reason: e.to_string(),
            })
        }
        _ => Ok(default),
    }
}

/// A boolean variable: 1/0, true/false, yes/no, on/off.
pub fn flag(name: &'static str, default: bool) -> Result<bool, ConfigError> {
    match std::env::var(name) {
        Ok(value) if !value.trim().is_empty() => match value.trim().to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => Ok(true),
            "0" | "false" | "no" | "off" => Ok(false),
            _ => Err(ConfigError {
                name,
                value,
                reason: "expected 1/0, true/false, yes/no or on/off".into(),
            }),
        },
        _ => Ok(default),
    }
}

fn millis(name: &'static str, default_ms: u64) -> Result<Duration, ConfigError> {
    let ms: u64 = var(name, default_ms)?;
    if ms == 0 {
        return Err(ConfigError {
            name,
            value: "0".into(),
            reason: "must be a positive number of milliseconds".into(),
        });
    }
    Ok(Duration::from_millis(ms))
}

#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// `ORRERY_DATABASE_URL`: the PostgreSQL holding all state.
    pub database_url: String,
    /// `ORRERY_REDIS_URL`: the Redis carrying dispatches.
    pub redis_url: String,
    /// `ORRERY_NAMESPACE`: prefix of every Redis queue, so several
    /// installations (or tests) can share one Redis.
    pub namespace: String,
    /// `ORRERY_LEASE_MS`: how long a claim lasts without a heartbeat.
    pub lease: Duration,
    /// `ORRERY_REDISPATCH_AFTER_MS`: a runnable, unleased run whose last
    /// dispatch is older than this is dispatched again by the reconciler.
    pub redispatch_after: Duration,
    /// `ORRERY_RECONCILE_EVERY_MS`: the reconciler's period.
    pub reconcile_every: Duration,
    /// `ORRERY_WORKER_CONCURRENCY`: runs one worker process drives at once, per queue.
    pub concurrency: usize,
    /// `ORRERY_DB_POOL`: connections per process.
    pub db_pool: u32,
    /// `ORRERY_STUCK_QUEUED_MS`: a queued run not started within this is stuck.
    pub stuck_queued: Duration,
    /// `ORRERY_RETENTION_DAYS`: finished runs older than this are purged by cron.
    pub retention_days: u32,
    /// `ORRERY_CLAIM_HOLD_MS`: how long a process with nothing else in
    /// flight keeps a claim's transaction open for the run's first write, so
    /// both share one commit (see [`crate::hold`]); 0 turns this off.
    pub claim_hold: Duration,
    /// `ORRERY_TEST_WORKFLOWS=1`: also register the workflows the test suite
    /// and the benchmark drive through real worker processes.
    pub test_workflows: bool,
}

impl EngineConfig {
    pub fn from_env() -> Result<Self, ConfigError> {
        let concurrency: usize = var("ORRERY_WORKER_CONCURRENCY", 16)?;
        if concurrency == 0 {
            return Err(ConfigError {
                name: "ORRERY_WORKER_CONCURRENCY",
                value: "0".into(),
                reason: "must be at least 1".into(),
            });
        }
        let namespace: String = var("ORRERY_NAMESPACE", "orrery".to_string())?;
        if namespace.contains(':') || namespace.contains(char::is_whitespace) {
            return Err(ConfigError {
                name: "ORRERY_NAMESPACE",
                value: namespace,
                reason: "must not contain ':' or spaces (it is part of Redis key names)".into(),
            });
        }
        Ok(EngineConfig {
            database_url: var(
                "ORRERY_DATABASE_URL",
                "postgres://postgres@127.0.0.1:5432/orrery".to_string(),
            )?,
            redis_url: var("ORRERY_REDIS_URL", "redis://127.0.0.1:6379".to_string())?,
            namespace,
            lease: millis("ORRERY_LEASE_MS", 30_000)?,
            redispatch_after: millis("ORRERY_REDISPATCH_AFTER_MS", 5_000)?,
            reconcile_every: millis("ORRERY_RECONCILE_EVERY_MS", 1_000)?,
            concurrency,
            db_pool: var("ORRERY_DB_POOL", 10)?,
            stuck_queued: millis("ORRERY_STUCK_QUEUED_MS", 300_000)?,
            retention_days: var("ORRERY_RETENTION_DAYS", 30)?,
            claim_hold: Duration::from_millis(var("ORRERY_CLAIM_HOLD_MS", 20)?),
            test_workflows: flag("ORRERY_TEST_WORKFLOWS", false)?,
        })
    }
}

/// Hide a password in a URL before showing or logging it.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// What a process says when a server it needs is not there: which one, the
/// variable and address it used (password hidden), and what to do.
pub fn cannot_connect(what: &str, var: &str, url: &str) -> String {
    format!(
        "cannot connect to {what} ({var}={}); is it running there? scripts/setup.sh starts a local one",
        redact(url)
    )
}

/// Connect a pool to PostgreSQL with the configured size.
pub async fn connect_db(cfg: &EngineConfig) -> Result<sqlx::PgPool, sqlx::Error> {
    use sqlx::Connection;
    // One connection of its own first: a server that refuses (down, wrong
    // port, unknown database or user) is reported at once with its real
    // cause, instead of as the pool's timeout ten seconds later.
    let options: sqlx::postgres::PgConnectOptions = cfg.database_url.parse()?;
    sqlx::PgConnection::connect_with(&options)
        .await?
        .close()
        .await?;
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(cfg.db_pool)
        .acquire_timeout(Duration::from_secs(10))
        // No ping before each use: it doubled the round-trips of every
        // statement. A dead connection fails its statement, which the engine
        // treats like any database error (the run is retried or reclaimed).
        .test_before_acquire(false)
        .connect_with(options)
        .await
}

/// [`connect_db`] for a process that cannot start without it: a failure
/// says which server, variable and address, and what to do
/// ([`cannot_connect`]).
pub async fn connect_db_or_explain(cfg: &EngineConfig) -> anyhow::Result<sqlx::PgPool> {
    use anyhow::Context;
    connect_db(cfg)
        .await
        .with_context(|| cannot_connect("PostgreSQL", "ORRERY_DATABASE_URL", &cfg.database_url))
}

/// The session settings of [`connect_dedicated`]'s connections.
pub const DEDICATED_SESSION: &str = "SET plan_cache_mode = force_generic_plan";

/// The session settings of [`connect_keyed`]'s connections.
pub const KEYED_SESSION: &str =
    "SET plan_cache_mode = force_generic_plan; SET enable_seqscan = off";

/// A connection of its own (outside the pool) for a task that runs the same
/// few statements over and over in a loop (the API's admission batches):
/// with a generic plan PostgreSQL plans each prepared statement once instead
/// of at every execution, which for their multi-CTE, array-parameter
/// statements costs more than executing them.
pub async fn connect_dedicated(pool: &sqlx::PgPool) -> Result<sqlx::PgConnection, sqlx::Error> {
    connect_with_session(pool, DEDICATED_SESSION).await
}

/// A dedicated connection ([`connect_dedicated`]) for statements that only
/// address rows by key: the checkpoint writer's and the claims.
///
/// A generic plan is made once, from the statistics of that moment, and kept
/// for the connection's life. On a new installation (tables never analysed,
/// or analysed while nearly empty) the cheapest plan for "these runs by id"
/// was a sequential scan of `runs` hashed against the batch, and every
/// checkpoint then read the whole table, more of it at each run submitted,
/// until autovacuum's next ANALYZE (found by `orrery-bench`: every write of
/// a run seq-scanned `runs`). Here sequential scans are priced out, so a
/// plan uses the index whenever there is one, whatever the statistics say.
/// (Not for the admission batches: their ledger reads whole small tables,
/// and priced out of sequential scans they fell from about 4,000 to 34
/// submissions/s.)
pub async fn connect_keyed(pool: &sqlx::PgPool) -> Result<sqlx::PgConnection, sqlx::Error> {
    connect_with_session(pool, KEYED_SESSION).await
}

async fn connect_with_session(
    pool: &sqlx::PgPool,
    session: &str,
) -> Result<sqlx::PgConnection, sqlx::Error> {
    use sqlx::{Connection, Executor};
    let mut conn = sqlx::PgConnection::connect_with(&pool.connect_options()).await?;
    // Without arguments: one simple-protocol round-trip for every setting.
    conn.execute(session).await?;
    Ok(conn)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted_from_urls() {
        assert_eq!(redact("postgres://u:secret@h/db"), "postgres://u:***@h/db");
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert!(!cannot_connect("Redis", "ORRERY_REDIS_URL", "redis://:pw@h:1").contains("pw"));
    }

    #[test]
    fn an_unparsable_value_names_the_variable() {
        // A variable name no other test touches, so the process-wide env is safe to set.
        unsafe_free_set("ORRERY_TEST_ONLY_PARSE", "twelve");
        let err = var::<u32>("ORRERY_TEST_ONLY_PARSE", 3).unwrap_err();
        assert!(err.to_string().contains("ORRERY_TEST_ONLY_PARSE"), "{err}");
        assert_eq!(var::<u32>("ORRERY_TEST_ONLY_MISSING", 3).unwrap(), 3);
    }

    fn unsafe_free_set(name: &str, value: &str) {
        // Edition 2021: set_var is safe; tests in this module use distinct names.
        std::env::set_var(name, value);
    }
}
