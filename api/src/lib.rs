//! The REST API: how users and operators reach Orrery. It authenticates,
//! authorises, checks quotas and availability, records intent (a cluster row,
//! a run, a task, in one transaction) and enqueues; it never does long work
//! itself. Every long operation answers `202 Accepted` with a task.
//!
//! # Layout
//!
//! - [`app`]: [`app::App`] (pool, engine, configuration) behind [`AppState`].
//! - [`error`]: the one error type, rendered as `application/problem+json`.
//! - [`extract`]: JSON body, query and path extractors whose rejections name the field.
//! - [`auth`]: API keys (hashed, revocable) and the [`auth::Caller`] extractor.
//! - [`accounts`], [`sshkeys`]: users, groups, keys, SSH keys.
//! - [`services`], [`quotas`]: the service catalogue and admission (pure, unit-tested).
//! - [`admission`]: group commit of cluster requests (one transaction, one lock, many requests).
//! - [`submit`]: run + task (+ callback delivery) recording, idempotency, dispatch after commit.
//! - [`clusters`], [`tasks`], [`events`], [`callbacks`]: the user-facing resources.
//! - [`operators`]: runs, stuck runs, cancel and replay (alone or in bulk), audit.
//! - [`cosmos`]: the original platform's `/cosmos/v1`, on the same code paths.
//! - [`metrics`], [`openapi`]: `/metrics` and `/v1/openapi.json`.
//! - [`availability`]: 503 at once while PostgreSQL is unreachable.

use std::sync::Arc;

use axum::{
    extract::State,
    http::StatusCode,
    middleware,
    response::IntoResponse,
    routing::{delete, get, patch, post},
    Json, Router,
};
use serde_json::json;
use sqlx::PgPool;

pub mod accounts;
pub mod admission;
pub mod app;
pub mod auth;
pub mod availability;
pub mod callbacks;
pub mod clusters;
pub mod cosmos;
pub mod error;
pub mod events;
pub mod extract;
pub mod metrics;
pub mod openapi;
pub mod operators;
pub mod quotas;
pub mod services;
pub mod sshkeys;
pub mod submit;
pub mod tasks;

pub use app::{ApiConfig, AppState};
pub use error::ApiError;

/// The connections a host process (`orrery dev`) already has; [`serve`]
/// builds the full [`app::App`] from them and the environment.
pub struct App {
    pub pool: PgPool,
    pub redis: redis::aio::ConnectionManager,
}

/// Every route: `/v1`, `/cosmos/v1`, health and metrics.
pub fn router(app: Arc<app::App>) -> Router {
    let state = AppState(app);
    let v1 = Router::new()
        .route("/v1/openapi.json", get(openapi::handler))
        .route("/v1/services", get(list_services))
        .route("/v1/account", get(accounts::profile_handler))
        .route(
            "/v1/account/keys",
            get(accounts::list_keys_handler).post(accounts::create_key_handler),
        )
        .route(
            "/v1/account/keys/{id}",
            delete(accounts::revoke_key_handler),
        )
        .route(
            "/v1/account/ssh-keys",
            get(accounts::list_ssh_keys_handler).post(accounts::add_ssh_key_handler),
        )
        .route(
            "/v1/account/ssh-keys/{id}",
            delete(accounts::delete_ssh_key_handler),
        )
        .route(
            "/v1/account/webhook-secret",
            post(accounts::rotate_webhook_secret_handler),
        )
        .route(
            "/v1/clusters",
            get(clusters::list_handler).post(clusters::create_handler),
        )
        .route(
            "/v1/clusters/{id}",
            get(clusters::show_handler).delete(clusters::terminate_handler),
        )
        .route("/v1/clusters/{id}/users", post(clusters::add_user_handler))
        .route(
            "/v1/clusters/{id}/users/{username}",
            delete(clusters::remove_user_handler),
        )
        .route("/v1/tasks/{id}", get(tasks::show_handler))
        .route("/v1/tasks/{id}/events", get(events::handler))
        .route("/v1/admin/runs", get(operators::list_handler))
        .route(
            "/v1/admin/runs/cancel",
            post(operators::bulk_cancel_handler),
        )
        .route(
            "/v1/admin/runs/replay",
            post(operators::bulk_replay_handler),
        )
        .route("/v1/admin/runs/{id}", get(operators::show_handler))
        .route(
            "/v1/admin/runs/{id}/cancel",
            post(operators::cancel_handler),
        )
        .route(
            "/v1/admin/runs/{id}/replay",
            post(operators::replay_handler),
        )
        .route("/v1/admin/audit", get(operators::audit_handler))
        .route(
            "/v1/admin/users",
            get(accounts::admin_list_users_handler).post(accounts::admin_create_user_handler),
        )
        .route(
            "/v1/admin/users/{name}",
            patch(accounts::admin_update_user_handler),
        )
        .route(
            "/v1/admin/groups",
            get(accounts::admin_list_groups_handler).post(accounts::admin_create_group_handler),
        )
        .fallback(not_found);
    let cosmos = Router::new()
        .route("/cosmos/v1/cluster", get(cosmos::list).post(cosmos::create))
        .route("/cosmos/v1/cluster/{id}", get(cosmos::show))
        .route("/cosmos/v1/cluster/{id}/terminate", post(cosmos::terminate))
        .route("/cosmos/v1/cluster/{id}/add_user", post(cosmos::add_user))
        .route(
            "/cosmos/v1/cluster/{id}/remove_user",
            post(cosmos::remove_user),
        )
        .route("/cosmos/v1/services", get(cosmos::list_services))
        .route(
            "/cosmos/v1/profile",
            get(cosmos::get_profile).put(cosmos::put_profile),
        )
        .route("/cosmos/v1/info", get(cosmos::info));
    let gated = Router::new()
        .merge(cosmos)
        .merge(v1)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            availability::gate,
        ));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics::handler))
        .merge(gated)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            metrics::track,
        ))
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such route; see /v1/openapi.json")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
        "this route does not take that method; see /v1/openapi.json",
    )
}

/// `GET /v1/services`: what users may choose and what each pulls in.
async fn list_services(_caller: auth::Caller) -> Json<serde_json::Value> {
    let items: Vec<_> = services::selectable()
        .map(|s| {
            let with = services::resolve(&[s.name]).unwrap_or_default();
            json!({ "name": s.name, "description": s.description, "resolves_to": with })
        })
        .collect();
    let compulsory: Vec<_> = services::CATALOGUE
        .iter()
        .filter(|s| s.compulsory)
        .map(|s| s.name)
        .collect();
    Json(json!({ "compulsory": compulsory, "optional": items }))
}

/// Liveness: the process answers.
async fn healthz() -> impl IntoResponse {
    Json(json!({ "status": "ok" }))
}

/// How long readiness waits for each server: a probe must get its answer
/// before its own timeout (orchestrators default to a second or a few), not
/// after the pool's connection timeout.
const READY_WITHIN: std::time::Duration = std::time::Duration::from_millis(800);

/// Readiness: PostgreSQL and Redis both answer, each within
/// [`READY_WITHIN`] (checked at once); 503 names the one that does not.
async fn readyz(State(AppState(app)): State<AppState>) -> impl IntoResponse {
    let db = async {
        let ping = sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(&app.pool);
        matches!(tokio::time::timeout(READY_WITHIN, ping).await, Ok(Ok(_)))
    };
    let redis = async {
        let mut conn = app.redis.clone();
        let cmd = redis::cmd("PING");
        let ping = cmd.query_async::<String>(&mut conn);
        matches!(tokio::time::timeout(READY_WITHIN, ping).await, Ok(Ok(_)))
    };
    let (db, redis_ok) = tokio::join!(db, redis);
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

/// Serve the full API until `shutdown` fires.
pub async fn serve_app(
    app: Arc<app::App>,
    listener: tokio::net::TcpListener,
    shutdown: tokio_util::sync::CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(app))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

/// Build the full API from a host process's connections and the environment
/// (`ORRERY_*`), then serve until `shutdown` fires.
pub async fn serve(
    conns: Arc<App>,
    listener: tokio::net::TcpListener,
    shutdown: tokio_util::sync::CancellationToken,
) -> std::io::Result<()> {
    let built = async {
        let engine_cfg = orrery_workflows::EngineConfig::from_env()?;
        let api_cfg = ApiConfig::from_env()?;
        app::App::from_parts(
            conns.pool.clone(),
            conns.redis.clone(),
            engine_cfg,
            api_cfg,
            shutdown.clone(),
        )
        .await
    }
    .await
    .map_err(|e: anyhow::Error| std::io::Error::other(format!("{e:#}")))?;
    serve_app(built, listener, shutdown).await
}
