//! Dispatch: telling a queue's workers that a run is due, through apalis'
//! Redis backend.
//!
//! A dispatch carries only the run id; the run's state is in PostgreSQL.
//! Pushing is always done after the run's intent is committed, so a failed
//! push (Redis down) only delays the run until the reconciler re-dispatches
//! it, and a duplicate push is harmless because claiming is conditional.
//!
//! apalis-redis 1.0 files every pushed task in the queue's *scheduled* set
//! (it stamps each with "now" as its due time) and its fetch script moves
//! every due entry to the active list with one Lua `unpack`, which fails
//! past about 8,000 values ("too many results to unpack"). A backlog that
//! size (workers down while the API takes submissions, a reconciler sweep
//! after an outage) then failed every fetch of that queue for good. So each
//! push is followed by [`promote`], which moves the scheduled set to the
//! active list in bounded chunks, and a consumer promotes once before it
//! starts fetching, which heals a queue wedged by an earlier backlog.

use std::{
    collections::HashMap,
    sync::{LazyLock, Mutex},
    time::Duration,
};

use apalis::prelude::TaskSink;
use apalis_redis::{Config, ConnectionManager, RedisStorage};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
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

    /// When the oldest dispatch of `queue` not fetched by a worker yet was
    /// pushed; `None` when nothing waits.
    async fn oldest_waiting(&self, queue: &str) -> Result<Option<DateTime<Utc>>, EngineError>;
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
        // Off: PostgreSQL's fenced lease is the run's only lock. apalis'
        // Redis lease costs a script per dispatch whose `LREM` scans the
        // whole waiting list (O(backlog) per dispatch: 29 µs per call with
        // 2,000 waiting, 27 % of Redis' time in `orrery-bench`) for a task
        // its fetch has already removed, and guards nothing we rely on: a
        // dead worker's dispatches are re-queued from its in-flight set
        // (apalis) and its runs re-dispatched by the reconciler.
        .lock_tasks(false)
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

    /// [`RedisDispatcher::connect`] to the configured Redis and namespace;
    /// a failure says which variable and address, and what to do
    /// ([`crate::config::cannot_connect`]).
    pub async fn connect_or_explain(cfg: &crate::EngineConfig) -> anyhow::Result<Self> {
        use anyhow::Context;
        Self::connect(&cfg.redis_url, &cfg.namespace)
            .await
            .with_context(|| {
                crate::config::cannot_connect("Redis", "ORRERY_REDIS_URL", &cfg.redis_url)
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
        let mut storage = self.storage(queue);
        let config = queue_config(&self.namespace, queue);
        // Chunks keep the scheduled set below the fetch script's unpack
        // limit between a push and its promotion (see the module doc).
        for chunk in run_ids.chunks(PROMOTE_CHUNK) {
            let jobs = chunk.iter().map(|&run_id| Dispatch { run_id }).collect();
            // One call of apalis' batch push script for the whole chunk.
            storage
                .push_bulk(jobs)
                .await
                .map_err(|e| EngineError::Dispatch(format!("push to queue `{queue}`: {e}")))?;
            let mut conn = self.conn.clone();
            promote(&mut conn, &config)
                .await
                .map_err(|e| EngineError::Dispatch(format!("wake queue `{queue}`: {e}")))?;
        }
        Ok(())
    }

    async fn oldest_waiting(&self, queue: &str) -> Result<Option<DateTime<Utc>>, EngineError> {
        let config = queue_config(&self.namespace, queue);
        let mut conn = self.conn.clone();
        // The head of the list, and the first of a backlog not promoted yet.
        let (head, scheduled): (Option<String>, Vec<String>) = redis::pipe()
            .cmd("LINDEX")
            .arg(config.active_jobs_list())
            .arg(0)
            .cmd("ZRANGE")
            .arg(config.scheduled_jobs_set())
            .arg(0)
            .arg(0)
            .query_async(&mut conn)
            .await
            .map_err(|e| EngineError::Dispatch(format!("backlog of queue `{queue}`: {e}")))?;
        // apalis names a task with a ULID made when it is pushed. An id that
        // is not one (a job pushed by something else) says "waiting since
        // now", which keeps the plain `redispatch_after` rule.
        let pushed_at = |id: &String| {
            ulid::Ulid::from_string(id)
                .ok()
                .and_then(|u| DateTime::<Utc>::from_timestamp_millis(u.timestamp_ms() as i64))
                .unwrap_or_else(Utc::now)
        };
        Ok(head.iter().chain(&scheduled).map(pushed_at).min())
    }
}

/// Most task ids one `RPUSH`/`ZREM` of [`promote`] carries, and most
/// dispatches pushed at once: far below the ~8,000 values Redis' Lua
/// `unpack` accepts.
const PROMOTE_CHUNK: usize = 1000;

/// Moves a queue's scheduled set to its active list, `ARGV[1]` ids at a time,
/// signals the move the way apalis' fetch does, and publishes the wake-up.
///
/// Every entry is due: dispatches are always meant for now (a parked run's
/// delay is a timer in the worker, never an apalis schedule), so the whole
/// set moves whatever the clocks of the hosts that stamped it.
///
/// The wake-up is ours because apalis-redis 1.0 passes its `emit_events`
/// flag to its push script as "true", which the script compares with "1",
/// so it never publishes the message its own pub/sub consumers wait for.
/// One message wakes an idle consumer, which then drains the list.
static PROMOTE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
local chunk = tonumber(ARGV[1])
local moved = 0
while true do
    local ids = redis.call('ZRANGE', KEYS[1], 0, chunk - 1)
    if #ids == 0 then break end
    redis.call('RPUSH', KEYS[2], unpack(ids))
    redis.call('ZREM', KEYS[1], unpack(ids))
    moved = moved + #ids
end
if moved > 0 then
    redis.call('DEL', KEYS[3])
    redis.call('LPUSH', KEYS[3], 1)
end
redis.call('PUBLISH', ARGV[2], 'promoted')
return moved
"#,
    )
});

/// The pub/sub channel on which a queue's idle consumers wait for work (the
/// one apalis publishes on when it re-queues a dead worker's tasks).
pub fn wakeup_channel(config: &Config) -> String {
    format!("tasks:{}:available", config.active_jobs_list())
}

/// Make every dispatch waiting in `config`'s queue fetchable and wake its
/// consumers; answers how many were moved (see [`PROMOTE`]).
pub async fn promote<C: redis::aio::ConnectionLike>(
    conn: &mut C,
    config: &Config,
) -> redis::RedisResult<usize> {
    PROMOTE
        .key(config.scheduled_jobs_set())
        .key(config.active_jobs_list())
        .key(config.signal_list())
        .arg(PROMOTE_CHUNK)
        .arg(wakeup_channel(config))
        .invoke_async(conn)
        .await
}

impl RedisDispatcher {
    /// Drop finished apalis tasks of `queue` from Redis (their data and
    /// metadata), so Redis memory stays bounded by in-flight work; answers
    /// how many. Works through the queue's done and dead sets
    /// [`VACUUM_CHUNK`] ids per script call: apalis' own vacuum reads the
    /// whole task hash, waiting tasks included, in one script (0.42 s of a
    /// blocked Redis for a backlog of 100,000 here, every minute), while this
    /// costs what finished and never holds Redis for long.
    pub async fn vacuum(&self, queue: &str) -> Result<usize, EngineError> {
        let config = queue_config(&self.namespace, queue);
        let mut conn = self.conn.clone();
        let mut total = 0;
        for finished in [config.done_jobs_set(), config.dead_jobs_set()] {
            loop {
                let forgotten: usize = FORGET
                    .key(&finished)
                    .key(config.job_data_hash())
                    .key(config.job_meta_hash())
                    .arg(VACUUM_CHUNK)
                    .invoke_async(&mut conn)
                    .await
                    .map_err(|e| EngineError::Dispatch(format!("vacuum `{queue}`: {e}")))?;
                total += forgotten;
                if forgotten < VACUUM_CHUNK {
                    break;
                }
            }
        }
        Ok(total)
    }
}

/// Finished tasks forgotten per call of [`FORGET`].
const VACUUM_CHUNK: usize = 500;

/// Pops up to `ARGV[1]` ids from a set of finished tasks (`KEYS[1]`) and
/// deletes their data (`KEYS[2]`), their metadata and their result (under
/// the metadata prefix `KEYS[3]`, as apalis' own vacuum does).
static FORGET: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
local ids = redis.call('SPOP', KEYS[1], tonumber(ARGV[1]))
for _, id in ipairs(ids) do
    redis.call('HDEL', KEYS[2], id)
    redis.call('HDEL', KEYS[3] .. ':result', id)
    redis.call('DEL', KEYS[3] .. ':' .. id)
end
return #ids
"#,
    )
});
