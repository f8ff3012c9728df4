//! Failing fast while PostgreSQL is unreachable.
//!
//! sqlx's pool retries a refused connection until its acquire timeout
//! (10 s), so during an outage every request that needs a new connection
//! would wait that long for its 503. Instead the first request that finds
//! the database unreachable (its answer carries [`DatabaseUnreachable`])
//! closes the [`DatabaseGate`]: requests are then answered 503 at once,
//! without touching the pool, until a probe (a direct connection, not the
//! pool's) gets through. One probe task runs at a time, trying at once and
//! then every [`PROBE_EVERY`].
//!
//! Health, readiness and metrics routes are not gated: they report on the
//! outage rather than fail because of it.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use axum::{
    extract::{Request, State},
    middleware::Next,
    response::{IntoResponse, Response},
};
use sqlx::{postgres::PgConnectOptions, Connection, PgConnection};

use crate::{cosmos::CosmosError, error::ApiError, AppState};

/// How often a closed gate tries the database again.
pub const PROBE_EVERY: Duration = Duration::from_millis(250);

/// How long one probe may take to connect (a host that drops packets rather
/// than refusing).
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Marks a response whose request found the database unreachable.
#[derive(Clone, Copy, Debug)]
pub struct DatabaseUnreachable;

/// Whether the API believes PostgreSQL is reachable.
pub struct DatabaseGate {
    down: AtomicBool,
    probing: AtomicBool,
    options: PgConnectOptions,
}

impl DatabaseGate {
    pub fn new(options: PgConnectOptions) -> Arc<Self> {
        Arc::new(DatabaseGate {
            down: AtomicBool::new(false),
            probing: AtomicBool::new(false),
            options,
        })
    }

    pub fn is_down(&self) -> bool {
        self.down.load(Ordering::Acquire)
    }

    /// Close the gate and start a probe unless one is running.
    pub fn mark_down(self: &Arc<Self>) {
        self.down.store(true, Ordering::Release);
        if !self.probing.swap(true, Ordering::AcqRel) {
            tracing::warn!("PostgreSQL unreachable: answering 503 at once until it is back");
            tokio::spawn(self.clone().probe());
        }
    }

    async fn probe(self: Arc<Self>) {
        loop {
            let attempt =
                tokio::time::timeout(PROBE_TIMEOUT, PgConnection::connect_with(&self.options));
            if let Ok(Ok(conn)) = attempt.await {
                let _ = conn.close().await;
                // `probing` first: a request that fails in between then
                // starts a probe of its own, and the gate is never left
                // closed with no probe to open it.
                self.probing.store(false, Ordering::Release);
                self.down.store(false, Ordering::Release);
                tracing::info!("PostgreSQL reachable again");
                return;
            }
            tokio::time::sleep(PROBE_EVERY).await;
        }
    }
}

/// Middleware: 503 at once while the gate is closed; closes it when an
/// answer says the database was unreachable.
pub async fn gate(State(AppState(app)): State<AppState>, req: Request, next: Next) -> Response {
    if app.database.is_down() {
        let refused = ApiError::unavailable_now();
        return if req.uri().path().starts_with("/cosmos/") {
            CosmosError(refused).into_response()
        } else {
            refused.into_response()
        };
    }
    let res = next.run(req).await;
    if res.extensions().get::<DatabaseUnreachable>().is_some() {
        app.database.mark_down();
    }
    res
}
