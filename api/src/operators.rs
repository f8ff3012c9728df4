//! Operator routes (`/v1/admin/...`, operators only): runs listed by state,
//! workflow, cluster and `stuck`; one run with steps and history; cancel and
//! replay (from a step, with optional edited input), alone or in bulk by
//! filter; and the audit log. Every action needs a `reason` and is audited
//! with who did it (the engine writes the per-run rows; bulk actions add a
//! summary row).
//!
//! "Stuck" is the engine's: an unfinished run whose `stuck_after` has passed
//! (no progress within its step's timeout, waiting past its deadline, or
//! queued too long).

use axum::{
    extract::{Path, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    Json,
};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sqlx::Row;
use uuid::Uuid;

use crate::{
    accounts::audit,
    app::{App, AppState},
    auth::Operator,
    error::{ApiError, ApiResult},
    extract::{parse_id, Body, Query},
};
use orrery_workflows::{store, store::ReplayRequest, RunState};

/// Which runs: every field optional (`GET` query, or `filter` in bulk bodies).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RunQuery {
    pub state: Option<String>,
    pub workflow: Option<String>,
    /// Runs acting on this cluster (their input's `cluster_id`).
    pub cluster: Option<Uuid>,
    pub stuck: Option<bool>,
    /// At most this many (1 to 1000, default 100).
    pub limit: Option<i64>,
}

impl RunQuery {
    fn state(&self, field: &str) -> ApiResult<Option<RunState>> {
        self.state
            .as_deref()
            .map(|s| {
                s.parse::<RunState>().map_err(|_| {
                    let names: Vec<&str> = RunState::ALL.iter().map(|s| s.as_str()).collect();
                    ApiError::invalid(
                        field,
                        format!("`{field}` must be one of {}", names.join(", ")),
                    )
                })
            })
            .transpose()
    }

    fn is_empty(&self) -> bool {
        self.state.is_none()
            && self.workflow.is_none()
            && self.cluster.is_none()
            && self.stuck.is_none()
    }
}

pub async fn find_runs(app: &App, q: &RunQuery, field: &str) -> ApiResult<Vec<Value>> {
    let state = q.state(&format!("{field}state"))?;
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::invalid(
            format!("{field}limit"),
            "`limit` must be between 1 and 1000",
        ));
    }
    let rows = sqlx::query(
        "SELECT r.id, r.workflow, r.workflow_version, r.state, r.cursor, r.attempt, r.queue, r.error,
                r.input, r.replays, r.created_by, r.created_at, r.updated_at, r.finished_at,
                r.cancel_requested_by,
                (r.state NOT IN ('succeeded', 'failed', 'cancelled') AND r.stuck_after < now()) AS stuck
         FROM runs r
         WHERE ($1::text IS NULL OR r.state = $1)
           AND ($2::text IS NULL OR r.workflow = $2)
           AND ($3::text IS NULL OR r.input->>'cluster_id' = $3)
           AND ($4::bool IS NULL OR
                (r.state NOT IN ('succeeded', 'failed', 'cancelled') AND r.stuck_after < now()) = $4)
         ORDER BY r.created_at DESC LIMIT $5",
    )
    .bind(state.map(RunState::as_str))
    .bind(&q.workflow)
    .bind(q.cluster.map(|c| c.to_string()))
    .bind(q.stuck)
    .bind(limit)
    .fetch_all(&app.pool)
    .await?;
    rows.iter()
        .map(|r| {
            let id: Uuid = r.try_get("id")?;
            let workflow: String = r.try_get("workflow")?;
            let version: i32 = r.try_get("workflow_version")?;
            let cursor: i32 = r.try_get("cursor")?;
            let step = app
                .engine
                .registry
                .get(&workflow, version)
                .and_then(|wf| wf.steps.get(cursor as usize).map(|s| s.name.clone()));
            Ok(json!({
                "id": id,
                "href": format!("/v1/admin/runs/{id}"),
                "workflow": workflow,
                "workflow_version": version,
                "state": r.try_get::<String, _>("state")?,
                "stuck": r.try_get::<Option<bool>, _>("stuck")?.unwrap_or(false),
                "step": step,
                "cursor": cursor,
                "attempt": r.try_get::<i32, _>("attempt")?,
                "queue": r.try_get::<String, _>("queue")?,
                "error": r.try_get::<Option<String>, _>("error")?,
                "input": r.try_get::<Value, _>("input")?,
                "replays": r.try_get::<i32, _>("replays")?,
                "created_by": r.try_get::<Option<String>, _>("created_by")?,
                "cancel_requested_by": r.try_get::<Option<String>, _>("cancel_requested_by")?,
                "created_at": r.try_get::<chrono::DateTime<chrono::Utc>, _>("created_at")?,
                "updated_at": r.try_get::<chrono::DateTime<chrono::Utc>, _>("updated_at")?,
                "finished_at": r.try_get::<Option<chrono::DateTime<chrono::Utc>>, _>("finished_at")?,
            }))
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(Into::into)
}

pub async fn list_handler(
    State(state): State<AppState>,
    Operator(_): Operator,
    Query(q): Query<RunQuery>,
) -> ApiResult<Json<Value>> {
    Ok(Json(json!({ "items": find_runs(&state.0, &q, "").await? })))
}

pub async fn show_handler(
    State(state): State<AppState>,
    Operator(_): Operator,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let id = parse_id(&id, "run")?;
    let pool = &state.0.pool;
    let run = store::get_run(pool, id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no run {id}")))?;
    let steps = store::steps(pool, id).await?;
    let history = store::history(pool, id).await?;
    Ok(Json(
        json!({ "run": run, "steps": steps, "history": history }),
    ))
}

fn require_reason(reason: &Option<String>) -> ApiResult<String> {
    match reason.as_deref().map(str::trim) {
        Some(r) if !r.is_empty() && r.len() <= 1000 => Ok(r.to_owned()),
        _ => Err(ApiError::invalid(
            "reason",
            "`reason` is required (1 to 1000 characters): the audit log records why",
        )),
    }
}

/// `POST /v1/admin/runs/{id}/cancel` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CancelRequest {
    pub reason: Option<String>,
}

pub async fn cancel_handler(
    State(state): State<AppState>,
    Operator(op): Operator,
    Path(id): Path<String>,
    Body(req): Body<CancelRequest>,
) -> ApiResult<Response> {
    let id = parse_id(&id, "run")?;
    let reason = require_reason(&req.reason)?;
    state.0.engine.cancel(id, &op.name, Some(&reason)).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "id": id, "cancel_requested": true })),
    )
        .into_response())
}

/// `POST /v1/admin/runs/{id}/replay` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplayBody {
    /// Step to start from (default: the step the run failed or stopped at).
    pub from_step: Option<String>,
    /// Replacement input, validated against the workflow.
    pub input: Option<Value>,
    /// Replay an unfinished (stuck) run.
    #[serde(default)]
    pub force: bool,
    pub reason: Option<String>,
}

pub async fn replay_handler(
    State(state): State<AppState>,
    Operator(op): Operator,
    Path(id): Path<String>,
    Body(req): Body<ReplayBody>,
) -> ApiResult<Response> {
    let id = parse_id(&id, "run")?;
    let reason = require_reason(&req.reason)?;
    let r = ReplayRequest {
        from_step: req.from_step,
        input: req.input,
        force: req.force,
        reason: Some(reason),
    };
    let outcome = state.0.engine.replay(id, &r, &op.name).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "id": id, "from_step": outcome.from_step, "state": "queued" })),
    )
        .into_response())
}

/// `POST /v1/admin/runs/cancel` and `/replay` body: the same action for every
/// run the filter matches (at least one criterion).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BulkRequest {
    pub filter: RunQuery,
    pub reason: Option<String>,
    /// Replay only.
    pub from_step: Option<String>,
    /// Replay only: allow unfinished (stuck) runs.
    #[serde(default)]
    pub force: bool,
}

async fn bulk(
    state: &AppState,
    op: &str,
    action: &str,
    req: BulkRequest,
) -> ApiResult<Json<Value>> {
    let reason = require_reason(&req.reason)?;
    if req.filter.is_empty() {
        return Err(ApiError::invalid(
            "filter",
            "`filter` needs at least one of state, workflow, cluster, stuck (an empty filter would act on every run)",
        ));
    }
    if action == "cancel" && req.from_step.is_some() {
        return Err(ApiError::invalid(
            "from_step",
            "`from_step` applies to replay only",
        ));
    }
    let runs = find_runs(&state.0, &req.filter, "filter.").await?;
    let (mut done, mut failed) = (Vec::new(), Vec::new());
    for run in &runs {
        let id: Uuid = serde_json::from_value(run["id"].clone()).unwrap_or_default();
        let result = if action == "cancel" {
            state
                .0
                .engine
                .cancel(id, op, Some(&reason))
                .await
                .map(|_| ())
        } else {
            let r = ReplayRequest {
                from_step: req.from_step.clone(),
                input: None,
                force: req.force,
                reason: Some(reason.clone()),
            };
            state.0.engine.replay(id, &r, op).await.map(|_| ())
        };
        match result {
            Ok(()) => done.push(id),
            Err(e) => {
                let e = ApiError::from(e);
                failed.push(json!({ "id": id, "status": e.status.as_u16(), "detail": e.detail }));
            }
        }
    }
    let mut conn = state.0.pool.acquire().await?;
    audit(
        &mut conn,
        op,
        &format!("bulk_{action}"),
        json!({ "filter": req.filter, "reason": reason, "matched": runs.len(), "done": done, "failed": failed }),
    )
    .await?;
    Ok(Json(
        json!({ "matched": runs.len(), "done": done, "failed": failed }),
    ))
}

pub async fn bulk_cancel_handler(
    State(state): State<AppState>,
    Operator(op): Operator,
    Body(req): Body<BulkRequest>,
) -> ApiResult<Json<Value>> {
    bulk(&state, &op.name, "cancel", req).await
}

pub async fn bulk_replay_handler(
    State(state): State<AppState>,
    Operator(op): Operator,
    Body(req): Body<BulkRequest>,
) -> ApiResult<Json<Value>> {
    bulk(&state, &op.name, "replay", req).await
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    pub limit: Option<i64>,
    pub actor: Option<String>,
    pub run: Option<Uuid>,
}

pub async fn audit_handler(
    State(state): State<AppState>,
    Operator(_): Operator,
    Query(q): Query<AuditQuery>,
) -> ApiResult<Json<Value>> {
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        let mut e = ApiError::bad_request("`limit` must be between 1 and 1000");
        e.field = Some("limit".into());
        return Err(e);
    }
    let rows = sqlx::query(
        "SELECT id, at, actor, action, run_id, reason, detail FROM operator_audit
         WHERE ($1::text IS NULL OR actor = $1) AND ($2::uuid IS NULL OR run_id = $2)
         ORDER BY id DESC LIMIT $3",
    )
    .bind(&q.actor)
    .bind(q.run)
    .bind(limit)
    .fetch_all(&state.0.pool)
    .await?;
    let items: Vec<Value> = rows
        .iter()
        .map(|r| {
            Ok(json!({
                "id": r.try_get::<i64, _>("id")?,
                "at": r.try_get::<chrono::DateTime<chrono::Utc>, _>("at")?,
                "actor": r.try_get::<String, _>("actor")?,
                "action": r.try_get::<String, _>("action")?,
                "run_id": r.try_get::<Option<Uuid>, _>("run_id")?,
                "reason": r.try_get::<Option<String>, _>("reason")?,
                "detail": r.try_get::<Option<Value>, _>("detail")?,
            }))
        })
        .collect::<Result<_, sqlx::Error>>()?;
    Ok(Json(json!({ "items": items })))
}
