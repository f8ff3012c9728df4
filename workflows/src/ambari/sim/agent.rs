//! The agent port (the real agent's default is 8440): where
//! `scripts/agent/ambari-agent` registers its host and heartbeats. Plain
//! HTTP and JSON, not the real agent's protocol; what matters is that hosts
//! appear only when an agent says so and go lost when it stops.
//!
//! - `POST /agent/v1/register/{host}` → `200 {"status":"OK","responseId":0,"heartbeat_interval_s":N}`
//! - `POST /agent/v1/heartbeat/{host}` → `200 {"status":"OK"}`, or `404` if the
//!   host is unknown (the agent registers again: the emulator restarted or
//!   the host was deleted)
//! - both answer `503` while the agent is dropped by fault injection.

use axum::{
    extract::{Path, State},
    routing::post,
    Json, Router,
};
use serde_json::{json, Value};

use super::{Sim, SimError};

pub(super) fn router(sim: Sim) -> Router {
    Router::new()
        .route("/agent/v1/register/{host}", post(register))
        .route("/agent/v1/heartbeat/{host}", post(heartbeat))
        .with_state(sim)
}

/// Ambari keeps host names lower-case; anything odd is refused.
pub(super) fn host_name(raw: &str) -> Result<String, SimError> {
    let name = raw.trim().to_ascii_lowercase();
    let valid = !name.is_empty()
        && name.len() <= 253
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_');
    if valid {
        Ok(name)
    } else {
        Err(SimError::new(400, format!("invalid host name {raw:?}")))
    }
}

async fn register(
    State(sim): State<Sim>,
    Path(host): Path<String>,
) -> Result<Json<Value>, SimError> {
    let name = host_name(&host)?;
    sim.register_host(&name)?;
    tracing::info!(host = %name, "agent registered");
    Ok(Json(json!({
        "status": "OK",
        "responseId": 0,
        "heartbeat_interval_s": sim.config().heartbeat_interval.as_secs().max(1),
    })))
}

async fn heartbeat(
    State(sim): State<Sim>,
    Path(host): Path<String>,
) -> Result<Json<Value>, SimError> {
    let name = host_name(&host)?;
    if sim.is_dropped(&name) {
        return Err(SimError::new(503, "agent dropped by fault injection"));
    }
    if sim.heartbeat(&name) {
        Ok(Json(json!({"status": "OK"})))
    } else {
        Err(SimError::new(
            404,
            format!("host {name} is not registered; register first"),
        ))
    }
}
