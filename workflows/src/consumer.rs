//! Consumers: one apalis worker per queue, each feeding dispatches to the
//! [`Engine`].
//!
//! apalis' Redis backend wakes the worker through pub/sub as soon as a
//! dispatch is pushed (no polling interval on the hot path). If Redis goes
//! away or is flushed, the apalis worker stops; we rebuild it with backoff,
//! and the reconciler re-dispatches whatever was lost.

use std::{sync::Arc, time::Duration};

use apalis::prelude::*;
use apalis_redis::factory::RedisStorageFactory;
use tokio_util::sync::CancellationToken;

use crate::{
    dispatch::{promote, queue_config, Job},
    executor::Engine,
};

/// What a queue's apalis handler needs.
#[derive(Clone)]
struct QueueHandler {
    engine: Arc<Engine>,
    queue: Arc<str>,
}

async fn handle(job: Job, handler: Data<QueueHandler>) -> Result<(), BoxDynError> {
    let job = match job {
        Job::Dispatch(dispatch) => dispatch,
        Job::Invalid(value) => {
            tracing::warn!(queue = %handler.queue, job = %value, "malformed job on the queue; dropped");
            return Ok(());
        }
    };
    // Spawned so runs of one queue spread over all cores; apalis' concurrency
    // limit still bounds how many run at once.
    let (engine, queue) = (handler.engine.clone(), handler.queue.clone());
    tokio::spawn(async move { engine.handle(&queue, job.run_id).await }).await?;
    Ok(())
}

/// Consume `queue` until `shutdown` fires, with `concurrency` runs at once.
pub async fn run_queue(
    engine: Arc<Engine>,
    queue: String,
    concurrency: usize,
    shutdown: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    let mut generation = 0u32;
    while !shutdown.is_cancelled() {
        generation += 1;
        match consume_once(&engine, &queue, concurrency, &shutdown, generation).await {
            Ok(()) if shutdown.is_cancelled() => break,
            Ok(()) => tracing::warn!(queue, "apalis worker stopped; restarting"),
            Err(err) => tracing::warn!(queue, error = %err, "apalis worker failed; restarting"),
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.cancelled() => break,
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
    tracing::info!(queue, "consumer stopped");
}

/// apalis' pub/sub wake-up needs RESP3 push messages on the connection.
fn resp3(url: &str) -> String {
    if url.contains("protocol=") {
        url.to_owned()
    } else if url.contains('?') {
        format!("{url}&protocol=resp3")
    } else {
        format!("{url}?protocol=resp3")
    }
}

async fn consume_once(
    engine: &Arc<Engine>,
    queue: &str,
    concurrency: usize,
    shutdown: &CancellationToken,
    generation: u32,
) -> Result<(), BoxDynError> {
    let client = redis::Client::open(resp3(&engine.config.redis_url).as_str())?;
    let config = queue_config(&engine.config.namespace, queue);
    // A backlog left in the scheduled set (by a pusher that died between its
    // push and its promotion, or by an older version) would fail every fetch
    // past the unpack limit; move it before the first one.
    let moved = promote(
        &mut client.get_multiplexed_async_connection().await?,
        &config,
    )
    .await?;
    if moved > 0 {
        tracing::info!(
            queue,
            moved,
            "moved waiting dispatches to the queue before consuming"
        );
    }
    let mut factory = RedisStorageFactory::new(client).await?;
    let backend = BackendFactory::<Job>::create_with_config(&mut factory, config)?;
    let handler = QueueHandler {
        engine: engine.clone(),
        queue: queue.into(),
    };
    let worker = WorkerBuilder::new(format!("{}-{queue}-{generation}", engine.worker_id))
        .backend(backend)
        .data(handler)
        .concurrency(concurrency)
        .build(handle);
    tracing::info!(queue, concurrency, "consuming");
    let stop = shutdown.clone();
    worker
        .run_until(async move {
            stop.cancelled().await;
            Ok::<(), std::io::Error>(())
        })
        .await?;
    Ok(())
}
