//! The loop of the engine's batching task, the checkpoint
//! [`writer`](crate::writer), which also makes the process' claims.
//!
//! Callers send one request each and wait for its answer; a task takes
//! whatever requests are waiting (up to a bound), runs them as one statement
//! on a connection of its own and answers each. Requests that arrive while a
//! statement is in flight gather for the next one, so concurrent callers
//! share one round-trip and one commit: on a small machine where PostgreSQL
//! shares the cores, the fixed cost of a statement, not its rows, bounds
//! throughput.

use std::{future::Future, sync::Arc};

use sqlx::{PgConnection, PgPool};
use tokio::sync::{mpsc, oneshot, Mutex};

use crate::error::EngineError;

/// One kind of batched statement.
pub trait BatchStatement: Send + Sync + 'static {
    type Request: Send + 'static;
    type Answer: Send + 'static;
    /// Name used in logs and errors.
    const NAME: &'static str;
    /// Run the statement for `requests`; one answer per request, in order.
    fn execute<'c>(
        &'c self,
        conn: &'c mut PgConnection,
        requests: &'c [Self::Request],
    ) -> impl Future<Output = Result<Vec<Self::Answer>, sqlx::Error>> + Send + 'c;
}

/// A request whose statement failed, handed back (when it still exists) so
/// its caller may send it again.
#[derive(Debug)]
pub struct Failed<T> {
    /// [`EngineError::Unavailable`] when the database could not be reached.
    pub error: EngineError,
    pub request: Option<T>,
}

type Reply<A, T> = oneshot::Sender<Result<A, Failed<T>>>;
/// A request with where its answer goes.
type Envelope<S> = (
    <S as BatchStatement>::Request,
    Reply<<S as BatchStatement>::Answer, <S as BatchStatement>::Request>,
);
/// The requests waiting for a statement, shared by a statement's tasks.
type Inbox<S> = Arc<Mutex<mpsc::Receiver<Envelope<S>>>>;

/// Handle to the tasks that run one [`BatchStatement`].
pub struct Batcher<S: BatchStatement> {
    tx: mpsc::Sender<Envelope<S>>,
}

impl<S: BatchStatement> Clone for Batcher<S> {
    fn clone(&self) -> Self {
        Batcher {
            tx: self.tx.clone(),
        }
    }
}

impl<S: BatchStatement> Batcher<S> {
    /// `tasks` statements may be in flight at once (one connection each);
    /// each carries at most `max_batch` requests.
    pub fn spawn(pool: PgPool, statement: S, tasks: usize, max_batch: usize) -> Self {
        let (tx, rx) = mpsc::channel(1024);
        // While a statement is in flight the next batch gathers in the
        // channel; with several tasks they take turns on it.
        let rx = Arc::new(Mutex::new(rx));
        let statement = Arc::new(statement);
        for _ in 0..tasks.max(1) {
            tokio::spawn(run(pool.clone(), statement.clone(), rx.clone(), max_batch));
        }
        Batcher { tx }
    }

    /// Send `request` with the next batch and wait for its answer.
    pub async fn call(&self, request: S::Request) -> Result<S::Answer, Failed<S::Request>> {
        let stopped = |request| Failed {
            error: EngineError::Dispatch(format!("{} stopped", S::NAME)),
            request,
        };
        let (reply, answer) = oneshot::channel();
        if let Err(mpsc::error::SendError((request, _))) = self.tx.send((request, reply)).await {
            return Err(stopped(Some(request)));
        }
        answer.await.map_err(|_| stopped(None))?
    }
}

/// Runs on a connection of its own rather than the pool's: no pool
/// bookkeeping round-trips (sqlx pings a connection it takes back), and a
/// generic plan for the statement (see [`crate::config::connect_keyed`]).
/// A broken connection is replaced at the next batch; while none can be
/// made, a pooled one is used.
async fn run<S: BatchStatement>(pool: PgPool, statement: Arc<S>, rx: Inbox<S>, max_batch: usize) {
    let mut requests = Vec::with_capacity(max_batch);
    let mut replies = Vec::with_capacity(max_batch);
    let mut conn: Option<PgConnection> = None;
    loop {
        {
            let mut rx = rx.lock().await;
            let Some((first, reply)) = rx.recv().await else {
                return;
            };
            requests.push(first);
            replies.push(reply);
            while requests.len() < max_batch {
                match rx.try_recv() {
                    Ok((next, reply)) => {
                        requests.push(next);
                        replies.push(reply);
                    }
                    Err(_) => break,
                }
            }
        }
        if conn.is_none() {
            conn = crate::config::connect_keyed(&pool).await.ok();
        }
        let result = match conn.as_mut() {
            Some(c) => statement.execute(c, &requests).await,
            None => match pool.acquire().await {
                Ok(mut pooled) => statement.execute(&mut pooled, &requests).await,
                Err(err) => Err(err),
            },
        };
        let result = result.and_then(|answers| {
            if answers.len() == requests.len() {
                Ok(answers)
            } else {
                Err(sqlx::Error::Protocol(format!(
                    "{}: {} answers for {} requests",
                    S::NAME,
                    answers.len(),
                    requests.len()
                )))
            }
        });
        match result {
            Ok(answers) => {
                requests.clear();
                for (reply, answer) in replies.drain(..).zip(answers) {
                    let _ = reply.send(Ok(answer));
                }
                // The callers just answered may be about to send their next
                // request (a run's next step); let them, so it joins the
                // next statement instead of waiting a whole commit for the
                // one after (costs nothing when no task is ready).
                tokio::task::yield_now().await;
            }
            Err(err) => {
                conn = None;
                tracing::warn!(error = %err, size = replies.len(), "{} batch failed", S::NAME);
                let unreachable = crate::error::database_unreachable(&err);
                let msg = err.to_string();
                for (reply, request) in replies.drain(..).zip(requests.drain(..)) {
                    let error = if unreachable {
                        EngineError::Unavailable(msg.clone())
                    } else {
                        EngineError::Database(sqlx::Error::Protocol(msg.clone()))
                    };
                    let _ = reply.send(Err(Failed {
                        error,
                        request: Some(request),
                    }));
                }
            }
        }
    }
}
