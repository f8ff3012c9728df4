//! Scheduled upkeep of clusters and machines (run by the scheduler's cron):
//! terminating clusters whose time-to-live has passed, and reconciling the
//! machine inventory with what the provider really has ("real state wins").

use std::collections::HashSet;

use serde_json::json;
use sqlx::{PgPool, Row};
use uuid::Uuid;

use super::Provisioning;
use crate::{error::EngineError, executor::Engine, store};

/// Start `terminate_cluster` for every running or failed cluster past its
/// `expires_at`, recorded as a task of its owner. Returns how many.
pub async fn expire_clusters(engine: &Engine) -> Result<usize, EngineError> {
    let mut tx = engine.pool.begin().await?;
    let rows = sqlx::query(
        "UPDATE clusters SET state = 'terminating', state_reason = 'expired', updated_at = now()
         WHERE id IN (SELECT id FROM clusters WHERE state IN ('running', 'failed') AND expires_at < now()
                      FOR UPDATE SKIP LOCKED)
         RETURNING id, owner_id",
    )
    .fetch_all(&mut *tx)
    .await?;
    let mut runs = Vec::new();
    for row in rows {
        let (cluster, owner): (Uuid, Uuid) = (row.try_get("id")?, row.try_get("owner_id")?);
        let run = engine.new_run(
            "terminate_cluster",
            json!({ "cluster_id": cluster }),
            Some("scheduler"),
        )?;
        store::insert_run(&mut tx, &run).await?;
        sqlx::query("UPDATE clusters SET run_id = $2 WHERE id = $1")
            .bind(cluster)
            .bind(run.id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("INSERT INTO tasks (run_id, user_id, cluster_id, kind) VALUES ($1, $2, $3, 'terminate_cluster')")
            .bind(run.id)
            .bind(owner)
            .bind(cluster)
            .execute(&mut *tx)
            .await?;
        runs.push(run);
    }
    tx.commit().await?;
    for run in &runs {
        engine.dispatch_or_log(&run.queue, run.id).await;
    }
    Ok(runs.len())
}

/// What a reconciliation pass did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reconciled {
    /// Machines that existed with no inventory row and no cluster being built: reclaimed.
    pub reclaimed: Vec<String>,
    /// Inventory rows whose machine no longer exists: marked `broken`.
    pub broken: Vec<String>,
}

/// Reconcile the inventory of this process's provider with what it reports.
pub async fn reconcile_inventory(
    p: &Provisioning,
    pool: &PgPool,
) -> Result<Reconciled, EngineError> {
    let observed = p
        .provider
        .list()
        .await
        .map_err(|e| EngineError::Dispatch(e.to_string()))?;
    let known: Vec<(String, String)> =
        sqlx::query_as("SELECT hostname, state FROM machines WHERE provider = $1")
            .bind(p.provider.name())
            .fetch_all(pool)
            .await?;
    let known_names: HashSet<&str> = known.iter().map(|(h, _)| h.as_str()).collect();
    let building: HashSet<Uuid> =
        sqlx::query_scalar("SELECT id FROM clusters WHERE state = 'provisioning'")
            .fetch_all(pool)
            .await?
            .into_iter()
            .collect();
    let mut out = Reconciled::default();
    for m in &observed {
        let in_flight = m.cluster_id.is_some_and(|c| building.contains(&c));
        if !known_names.contains(m.hostname.as_str()) && !in_flight {
            p.provider
                .reclaim(&m.hostname)
                .await
                .map_err(|e| EngineError::Dispatch(e.to_string()))?;
            out.reclaimed.push(m.hostname.clone());
        }
    }
    // Only the local provider creates what it lists; a pool machine that does
    // not answer is reported by `list` as not running, not missing.
    if p.provider.name() == "local" {
        let seen: HashSet<&str> = observed.iter().map(|m| m.hostname.as_str()).collect();
        for (hostname, state) in &known {
            if state == "allocated" && !seen.contains(hostname.as_str()) {
                sqlx::query("UPDATE machines SET state = 'broken', updated_at = now() WHERE hostname = $1 AND state = 'allocated'")
                    .bind(hostname)
                    .execute(pool)
                    .await?;
                out.broken.push(hostname.clone());
            }
        }
    }
    Ok(out)
}
