//! Consumers: one apalis worker per queue, each feeding dispatches to the
//! [`Engine`].
//!
//! An idle consumer is woken through Redis pub/sub as soon as a dispatch is
//! pushed (no polling interval on the hot path; [`Wakeup`]). If Redis goes
//! away or is flushed, the apalis worker stops; we rebuild it with backoff,
//! and the reconciler re-dispatches whatever was lost.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::Duration,
};

use apalis::prelude::*;
use apalis_redis::RedisStorage;
use futures::task::AtomicWaker;
use redis::aio::MultiplexedConnection;
use tokio_util::sync::CancellationToken;

use crate::{
    dispatch::{promote, queue_config, wakeup_channel, Job},
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

/// When an idle consumer fetches again: on every wake-up message published
/// on its queue's channel (by the pushers' promote script, and by apalis
/// when it re-queues a dead worker's tasks).
///
/// Replaces apalis-redis 1.0's own (`factory::Pubsub`), which registered the
/// consumer's waker only when no wake-up was pending. apalis polls the
/// strategy and then fetches whatever it answered, so a wake-up that
/// arrived during a fetch was taken by the next poll without registering,
/// and if that fetch found nothing the consumer slept until its next Redis
/// heartbeat (5 s) through any number of pushes: four worker processes
/// given a burst ran it on one to three of them. This one registers on
/// every poll.
#[derive(Clone, Default)]
pub struct Wakeup(Arc<WakeupState>);

#[derive(Default)]
struct WakeupState {
    waker: AtomicWaker,
    pending: AtomicBool,
}

impl Wakeup {
    fn signal(&self) {
        self.0.pending.store(true, Ordering::Release);
        self.0.waker.wake();
    }
}

impl PollStrategy for Wakeup {
    fn poll_drive(&mut self, cx: &mut Context<'_>, _: &PollSnapshot) -> Poll<Option<()>> {
        // Before looking at `pending`, so a message after the look still wakes.
        self.0.waker.register(cx.waker());
        if self.0.pending.swap(false, Ordering::AcqRel) {
            Poll::Ready(Some(()))
        } else {
            Poll::Pending
        }
    }
}

/// A connection subscribed to `channel` whose messages fire `wakeup`; the
/// consumer's fetches and acknowledgements share it, as with apalis' own.
async fn subscribed(
    client: &redis::Client,
    channel: &str,
    wakeup: &Wakeup,
) -> redis::RedisResult<MultiplexedConnection> {
    let wakeup = wakeup.clone();
    let config = redis::AsyncConnectionConfig::new().set_push_sender(
        move |push: redis::PushInfo| -> Result<(), redis::aio::SendError> {
            if push.kind == redis::PushKind::Message {
                wakeup.signal();
            }
            Ok(())
        },
    );
    let mut conn = client
        .get_multiplexed_async_connection_with_config(&config)
        .await?;
    conn.subscribe(channel).await?;
    Ok(conn)
}

/// The wake-up subscription ([`subscribed`]) needs RESP3 push messages on
/// the connection it shares with the consumer's commands.
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
    let wakeup = Wakeup::default();
    let mut conn = subscribed(&client, &wakeup_channel(&config), &wakeup).await?;
    // A backlog left in the scheduled set (by a pusher that died between its
    // push and its promotion, or by an older version) would fail every fetch
    // past the unpack limit; move it before the first one.
    let moved = promote(&mut conn, &config).await?;
    if moved > 0 {
        tracing::info!(
            queue,
            moved,
            "moved waiting dispatches to the queue before consuming"
        );
    }
    let backend = PollWith::new(
        RedisStorage::<Job, MultiplexedConnection>::new(conn).with_config(config),
        wakeup,
    );
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
