//! Tasks: a run as the user who asked for it sees it. `GET /v1/tasks/{id}`
//! shows the state, the current step, progress (done/total, percent), each
//! step's attempts, duration and last error, the result, and the webhook
//! deliveries with their attempts. One query reads it all.
//!
//! Visibility: the task's requester, anyone who can see its cluster (owner,
//! group members for a shared cluster) and operators; otherwise 404.

use axum::{
    extract::{Path, State},
    Json,
};
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::Row;
use uuid::Uuid;

use crate::{
    app::{App, AppState},
    auth::Caller,
    error::{ApiError, ApiResult},
    extract::parse_id,
    submit::task_href,
};

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TaskView {
    pub id: Uuid,
    pub href: String,
    pub kind: Option<String>,
    pub workflow: String,
    pub state: String,
    pub cluster_id: Option<Uuid>,
    pub current_step: Option<String>,
    pub progress: ProgressView,
    pub steps: Vec<StepView>,
    pub result: Option<Value>,
    pub error: Option<String>,
    pub callbacks: Vec<CallbackView>,
    pub created_by: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ProgressView {
    pub done: usize,
    pub total: usize,
    pub percent: u32,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StepView {
    pub name: String,
    /// `pending`, `running`, `waiting`, `retrying`, `done`, `failed`, `compensated`.
    pub state: String,
    pub attempts: i32,
    pub polls: i32,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub duration_ms: Option<i64>,
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq, serde::Deserialize)]
pub struct CallbackView {
    pub url: String,
    pub state: String,
    pub attempts: i32,
    pub last_status: Option<i32>,
    pub last_error: Option<String>,
    pub last_attempt_at: Option<DateTime<Utc>>,
    pub delivered_at: Option<DateTime<Utc>>,
}

#[derive(serde::Deserialize)]
struct StepRow {
    i: i32,
    step: String,
    done: bool,
    attempts: i32,
    polls: i32,
    last_error: Option<String>,
    started_at: Option<DateTime<Utc>>,
    finished_at: Option<DateTime<Utc>>,
    compensated: bool,
}

/// The task, if it exists and the caller may see it.
pub async fn load(app: &App, caller: &Caller, id: Uuid) -> ApiResult<TaskView> {
    let row = sqlx::query(
        "SELECT r.id, r.workflow, r.workflow_version, r.state, r.cursor, r.output, r.error,
                r.created_by, r.created_at, r.updated_at, r.finished_at,
                t.kind, t.cluster_id,
                ($4 OR t.user_id = $2 OR c.owner_id = $2
                    OR (c.shared AND c.group_id IS NOT NULL AND c.group_id = $3)) AS visible,
                (SELECT json_agg(json_build_object(
                        'i', s.step_index, 'step', s.step, 'done', s.output IS NOT NULL,
                        'attempts', s.attempts, 'polls', s.polls, 'last_error', s.last_error,
                        'started_at', s.started_at, 'finished_at', s.finished_at,
                        'compensated', s.compensated_at IS NOT NULL) ORDER BY s.step_index)
                 FROM step_checkpoints s WHERE s.run_id = r.id) AS steps,
                (SELECT json_agg(json_build_object(
                        'url', b.url, 'state', b.state, 'attempts', b.attempts,
                        'last_status', b.last_status, 'last_error', b.last_error,
                        'last_attempt_at', b.last_attempt_at, 'delivered_at', b.delivered_at)
                        ORDER BY b.created_at)
                 FROM callbacks b WHERE b.task_run_id = r.id) AS callbacks
         FROM runs r LEFT JOIN tasks t ON t.run_id = r.id
         LEFT JOIN clusters c ON c.id = t.cluster_id
         WHERE r.id = $1",
    )
    .bind(id)
    .bind(caller.user_id)
    .bind(caller.group_id)
    .bind(caller.is_operator)
    .fetch_optional(&app.pool)
    .await?;
    let not_found = || ApiError::not_found(format!("no task {id}"));
    let row = row.ok_or_else(not_found)?;
    if !row.try_get::<Option<bool>, _>("visible")?.unwrap_or(false) {
        return Err(not_found());
    }
    let workflow: String = row.try_get("workflow")?;
    let version: i32 = row.try_get("workflow_version")?;
    let state: String = row.try_get("state")?;
    let cursor: i32 = row.try_get("cursor")?;
    let rows: Vec<StepRow> = row
        .try_get::<Option<Value>, _>("steps")?
        .map(serde_json::from_value)
        .transpose()
        .map_err(|e| ApiError::internal(anyhow::anyhow!("step rows: {e}")))?
        .unwrap_or_default();
    let callbacks: Vec<CallbackView> = row
        .try_get::<Option<Value>, _>("callbacks")?
        .map(serde_json::from_value)
        .transpose()
        .map_err(|e| ApiError::internal(anyhow::anyhow!("callback rows: {e}")))?
        .unwrap_or_default();
    let names: Vec<String> = match app.engine.registry.get(&workflow, version) {
        Some(wf) => wf.steps.iter().map(|s| s.name.clone()).collect(),
        None => rows.iter().map(|r| r.step.clone()).collect(),
    };
    let finished = matches!(state.as_str(), "succeeded" | "failed" | "cancelled");
    let steps: Vec<StepView> = names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let r = rows.iter().find(|r| r.i == i as i32);
            let at_cursor = i as i32 == cursor && !finished;
            let step_state = match r {
                Some(r) if r.compensated => "compensated",
                Some(r) if r.done => "done",
                _ if at_cursor => match state.as_str() {
                    "queued" => "pending",
                    "waiting" => "waiting",
                    "retrying" => "retrying",
                    _ => "running",
                },
                Some(r) if r.last_error.is_some() && state == "failed" => "failed",
                _ => "pending",
            };
            StepView {
                name: name.clone(),
                state: step_state.into(),
                attempts: r.map(|r| r.attempts).unwrap_or(0),
                polls: r.map(|r| r.polls).unwrap_or(0),
                started_at: r.and_then(|r| r.started_at),
                finished_at: r.and_then(|r| r.finished_at),
                duration_ms: r
                    .and_then(|r| Some((r.finished_at? - r.started_at?).num_milliseconds())),
                last_error: r.and_then(|r| r.last_error.clone()),
            }
        })
        .collect();
    let done = steps.iter().filter(|s| s.state == "done").count();
    let total = steps.len();
    let current_step = (!finished)
        .then(|| names.get(cursor as usize).cloned())
        .flatten();
    Ok(TaskView {
        id,
        href: task_href(id),
        kind: row.try_get("kind")?,
        workflow,
        state,
        cluster_id: row.try_get("cluster_id")?,
        current_step,
        progress: ProgressView {
            done,
            total,
            percent: (done * 100).checked_div(total).unwrap_or(0) as u32,
        },
        steps,
        result: row.try_get("output")?,
        error: row.try_get("error")?,
        callbacks,
        created_by: row.try_get("created_by")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        finished_at: row.try_get("finished_at")?,
    })
}

pub async fn show_handler(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<TaskView>> {
    let id = parse_id(&id, "task")?;
    Ok(Json(load(&state.0, &caller, id).await?))
}
