//! Dispatch: telling a queue's workers that a run is due, through apalis'
//! Redis backend.
//!
//! A dispatch carries only the run id; the run's state is in PostgreSQL.
//! Pushing is always done after the run's intent is committed, so a failed
//! push (Redis down) only delays the run until the reconciler re-dispatches
//! it, and a duplicate push is harmless because claiming is conditional.

use std::{collections::HashMap, sync::Mutex, time::Duration};

use apalis::prelude::TaskSink;
use apalis_redis::{Config, ConnectionManager, RedisStorage};
use async_trait::async_trait;
use redis::aio::ConnectionManagerConfig;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::EngineError;

/// The job apalis carries: "run `run_id` is due".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dispatch {
    pub run_id: Uuid,
}

/// What a consumer reads from a queue: a dispatch, or anything else that
/// landed there. Decoding never fails for JSON, so one malformed job (a
/// "poison pill") is logged and dropped instead of stopping the consumer.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum Job {
    Dispatch(Dispatch),
    Invalid(serde_json::Value),
}

/// Anything that can tell a queue's workers a run is due. One real
/// implementation ([`RedisDispatcher`]); held as `Arc<dyn Dispatcher>`.
#[async_trait]
pub trait Dispatcher: Send + Sync + 'static {
    async fn dispatch(&self, queue: &str, run_id: Uuid) -> Result<(), EngineError>;

    /// Dispatch several runs of one queue; a backend that can pushes them in
    /// one round-trip (the API's batched submissions use this).
    async fn dispatch_many(&self, queue: &str, run_ids: &[Uuid]) -> Result<(), EngineError> {
        for run_id in run_ids {
            self.dispatch(queue, *run_id).await?;
        }
        Ok(())
    }
}

/// Redis key prefix of a logical queue. apalis' pub/sub wake-up splits
/// channel names on ':', so the name must not contain one.
pub fn redis_queue(namespace: &str, queue: &str) -> String {
    format!("{namespace}.{queue}")
}

/// apalis configuration shared by pushers and consumers of one queue.
pub fn queue_config(namespace: &str, queue: &str) -> Config {
    Config::default()
        .queue(redis_queue(namespace, queue))
        // Must stay on: in apalis-core 1.0 this flag also gates acknowledging a
        // finished task, without which every dispatch stays "in flight" in
        // Redis forever and is re-queued when its worker stops. The results
        // themselves are dropped by the `redis_vacuum` cron job.
        .persist_results(true)
        .heartbeat_interval(Duration::from_secs(5))
        .missed_heartbeats(3)
}

/// How the dispatcher's connection reconnects. A request made while Redis
/// is unreachable waits for the reconnection under way; with the redis
/// crate's default (6 retries, exponential from 100 ms) that is seconds per
/// request, and a worker handing a run over or a submitter would block that
/// long for a dispatch the reconciler re-sends anyway. Two quick retries
/// bound a failed dispatch to about a third of a second; the next request
/// starts a new reconnection, so a Redis that comes back is found again.
fn connection_config() -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_millis(200))
}

pub struct RedisDispatcher {
    conn: ConnectionManager,
    namespace: String,
    storages: Mutex<HashMap<String, RedisStorage<Dispatch>>>,
}

impl RedisDispatcher {
    /// Connects lazily-reconnecting: a Redis restart heals by itself.
    pub async fn connect(redis_url: &str, namespace: &str) -> Result<Self, EngineError> {
        let failed = |e: redis::RedisError| {
            EngineError::Dispatch(format!(
                "cannot connect to Redis at {}: {e}",
                crate::config::redact(redis_url)
            ))
        };
        // One plain connection first: a Redis that is not there is reported
        // at once, not after the connection manager's retries (seconds).
        let client = redis::Client::open(redis_url).map_err(failed)?;
        client
            .get_multiplexed_async_connection()
            .await
            .map_err(failed)?;
        let conn = client
            .get_connection_manager_with_config(connection_config())
            .await
            .map_err(failed)?;
        Ok(RedisDispatcher {
            conn,
            namespace: namespace.to_owned(),
            storages: Mutex::new(HashMap::new()),
        })
    }

    fn storage(&self, queue: &str) -> RedisStorage<Dispatch> {
        let mut storages = self.storages.lock().expect("dispatcher lock poisoned");
        storages
            .entry(queue.to_owned())
            .or_insert_with(|| {
                RedisStorage::new(self.conn.clone())
                    .with_config(queue_config(&self.namespace, queue))
            })
            .clone()
    }

    pub fn connection(&self) -> ConnectionManager {
        self.conn.clone()
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }
}

#[async_trait]
impl Dispatcher for RedisDispatcher {
    async fn dispatch(&self, queue: &str, run_id: Uuid) -> Result<(), EngineError> {
        self.dispatch_many(queue, &[run_id]).await
    }

    async fn dispatch_many(&self, queue: &str, run_ids: &[Uuid]) -> Result<(), EngineError> {
        let Some(last) = run_ids.last() else {
            return Ok(());
        };
        let mut storage = self.storage(queue);
        let jobs = run_ids.iter().map(|&run_id| Dispatch { run_id }).collect();
        // One call of apalis' batch push script for the whole slice.
        storage
            .push_bulk(jobs)
            .await
            .map_err(|e| EngineError::Dispatch(format!("push to queue `{queue}`: {e}")))?;
        // apalis-redis 1.0 passes its `emit_events` flag to its push script as
        // "true", which the script compares with "1", so it never publishes the
        // wake-up its own pub/sub consumers wait for. Publish it here, on the
        // channel those consumers subscribe to, so a push wakes them at once
        // (one message wakes an idle consumer, which then drains the list).
        let channel = format!(
            "tasks:{}:available",
            queue_config(&self.namespace, queue).active_jobs_list()
        );
        let mut conn = self.conn.clone();
        redis::cmd("PUBLISH")
            .arg(channel)
            .arg(last.to_string())
            .query_async::<i64>(&mut conn)
            .await
            .map_err(|e| EngineError::Dispatch(format!("wake queue `{queue}`: {e}")))?;
        Ok(())
    }
}

impl RedisDispatcher {
    /// Drop finished apalis tasks of `queue` from Redis (their data, metadata
    /// and the "done" set), so Redis memory stays bounded by in-flight work.
    pub async fn vacuum(&self, queue: &str) -> Result<usize, EngineError> {
        use apalis_core::backend::Vacuum;
        let mut storage = self.storage(queue);
        let removed = storage
            .vacuum()
            .await
            .map_err(|e| EngineError::Dispatch(format!("vacuum `{queue}`: {e}")))?;
        let done_set = queue_config(&self.namespace, queue).done_jobs_set();
        let mut conn = self.conn.clone();
        let _: () = redis::cmd("DEL")
            .arg(done_set)
            .query_async(&mut conn)
            .await
            .map_err(|e| EngineError::Dispatch(format!("vacuum `{queue}`: {e}")))?;
        Ok(removed)
    }
}
