//! `failed | cancelled | (stuck) → queued`: an operator reruns a run from a
//! chosen step, reusing the checkpoints before it.
//!
//! Checkpoints from the chosen step on are removed (their history stays); the
//! fencing token is bumped so a worker still holding a stuck run can no longer
//! commit. A step whose effects were already undone by its compensation cannot
//! be reused, so replay must then start at or before it.

use serde_json::Value;
use sqlx::{PgPool, Row};
use uuid::Uuid;

use crate::{
    error::EngineError,
    state::RunState,
    store::{audit, ReplayRequest},
    workflow::Registry,
};

#[derive(Debug, Clone)]
pub struct ReplayOutcome {
    pub queue: String,
    pub from_index: i32,
    pub from_step: String,
}

pub async fn replay(
    pool: &PgPool,
    registry: &Registry,
    run_id: Uuid,
    req: &ReplayRequest,
    by: &str,
    stuck_in: std::time::Duration,
) -> Result<ReplayOutcome, EngineError> {
    let mut tx = pool.begin().await?;
    let row = sqlx::query(
        "SELECT workflow, workflow_version, state, cursor FROM runs WHERE id = $1 FOR UPDATE",
    )
    .bind(run_id)
    .fetch_optional(&mut *tx)
    .await?
    .ok_or(EngineError::UnknownRun(run_id))?;
    let workflow: String = row.try_get("workflow")?;
    let version: i32 = row.try_get("workflow_version")?;
    let state: RunState = row
        .try_get::<String, _>("state")?
        .parse()
        .map_err(|e: crate::state::UnknownState| EngineError::Conflict(e.to_string()))?;
    let cursor: i32 = row.try_get("cursor")?;
    let allowed = state.is_replayable() || (req.force && !state.is_terminal());
    if !allowed {
        return Err(EngineError::Conflict(format!(
            "run {run_id} is {state}; only failed or cancelled runs can be replayed \
             (a stuck unfinished run needs force=true)"
        )));
    }
    let wf = registry
        .get(&workflow, version)
        .ok_or_else(|| EngineError::UnknownWorkflow(format!("{workflow} v{version}")))?;
    let from_index = match &req.from_step {
        Some(name) => wf.step_index(name).ok_or_else(|| {
            let names: Vec<_> = wf.steps.iter().map(|s| s.name.as_str()).collect();
            EngineError::BadRequest(format!(
                "workflow `{workflow}` has no step `{name}`; its steps are: {}",
                names.join(", ")
            ))
        })? as i32,
        None => cursor.clamp(0, wf.steps.len() as i32 - 1),
    };
    if let Some(input) = &req.input {
        wf.check_input(input)
            .map_err(|message| EngineError::InvalidInput {
                workflow: workflow.clone(),
                message,
            })?;
    }
    let compensated: Option<String> = sqlx::query_scalar(
        "SELECT step FROM step_checkpoints
         WHERE run_id = $1 AND step_index < $2 AND compensated_at IS NOT NULL
         ORDER BY step_index LIMIT 1",
    )
    .bind(run_id)
    .bind(from_index)
    .fetch_optional(&mut *tx)
    .await?;
    if let Some(step) = compensated {
        return Err(EngineError::Conflict(format!(
            "step `{step}` was already undone by its compensation; replay from `{step}` or an earlier step"
        )));
    }
    let step = &wf.steps[from_index as usize];
    sqlx::query("DELETE FROM step_checkpoints WHERE run_id = $1 AND step_index >= $2")
        .bind(run_id)
        .bind(from_index)
        .execute(&mut *tx)
        .await?;
    sqlx::query("DELETE FROM item_checkpoints WHERE run_id = $1 AND step_index >= $2")
        .bind(run_id)
        .bind(from_index)
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "UPDATE runs SET state = 'queued', cursor = $2, attempt = 0, queue = $3,
             compensate_cursor = NULL, lease_owner = NULL, lease_until = NULL, fence = fence + 1,
             wake_at = NULL, dispatched_at = now(), stuck_after = now() + make_interval(secs => $5),
             cancel_requested_at = NULL, cancel_requested_by = NULL, cancel_reason = NULL,
             error = NULL, output = NULL, finished_at = NULL, replays = replays + 1,
             input = COALESCE($4, input), updated_at = now()
         WHERE id = $1",
    )
    .bind(run_id)
    .bind(from_index)
    .bind(&step.queue)
    .bind(&req.input)
    .bind(stuck_in.as_secs_f64())
    .execute(&mut *tx)
    .await?;
    let detail = serde_json::json!({
        "by": by,
        "from_step": step.name,
        "input_edited": req.input.is_some(),
        "previous_state": state.as_str(),
    });
    sqlx::query(
        "INSERT INTO run_history (run_id, event, step, detail) VALUES ($1, 'replayed', $2, $3)",
    )
    .bind(run_id)
    .bind(&step.name)
    .bind(&detail)
    .execute(&mut *tx)
    .await?;
    let mut audit_detail = detail.clone();
    if let (Some(input), Value::Object(map)) = (&req.input, &mut audit_detail) {
        map.insert("input".into(), input.clone());
    }
    audit(
        &mut tx,
        by,
        "replay",
        Some(run_id),
        req.reason.as_deref(),
        Some(audit_detail),
    )
    .await?;
    tx.commit().await?;
    Ok(ReplayOutcome {
        queue: step.queue.clone(),
        from_index,
        from_step: step.name.clone(),
    })
}
