//! The REST API: for now the health endpoints every process supervisor and
//! load balancer needs. The API records intent and enqueues; it never does
//! long work itself (accounts, clusters and tasks come with the API issue).

use std::sync::Arc;

use axum::{extract::State, http::StatusCode, response::IntoResponse, routing::get, Json, Router};
use serde_json::json;
use sqlx::PgPool;

/// What every handler can reach.
pub struct App {
    /// The source of truth.
    pub pool: PgPool,
    /// Reconnecting Redis connection, only used to report readiness here.
    pub redis: redis::aio::ConnectionManager,
}

#[derive(Clone)]
pub struct AppState(pub Arc<App>);

pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(AppState(app))
}

/// Liveness: the process answers.
async fn healthz() -> impl IntoResponse {
    Json(json!({ "status": "ok" }))
}

/// Readiness: PostgreSQL and Redis both answer; 503 names the one that does not.
async fn readyz(State(AppState(app)): State<AppState>) -> impl IntoResponse {
    let db = sqlx::query_scalar::<_, i32>("SELECT 1")
        .fetch_one(&app.pool)
        .await
        .is_ok();
    let mut conn = app.redis.clone();
    let redis_ok = redis::cmd("PING")
        .query_async::<String>(&mut conn)
        .await
        .is_ok();
    let body = json!({
        "status": if db && redis_ok { "ready" } else { "unavailable" },
        "checks": { "postgres": if db { "ok" } else { "unreachable" }, "redis": if redis_ok { "ok" } else { "unreachable" } },
    });
    let code = if db && redis_ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body))
}

/// Serve until `shutdown` fires.
pub async fn serve(
    app: Arc<App>,
    listener: tokio::net::TcpListener,
    shutdown: tokio_util::sync::CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(app))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}
