//! Workflows of the REST API that need no infrastructure:
//!
//! - stand-in cluster workflows (`fake.create_cluster`, `fake.terminate_cluster`,
//!   `fake.grant_user`, `fake.revoke_user`) that move the cluster's rows the
//!   way the real ones will (provisioning → running, cluster users pending →
//!   active...) without touching machines, so the API can be tested end to
//!   end (submit → worker → running) on its own. A cluster whose name starts
//!   with `fail-` fails its `start` step, so failure paths can be tested too.
//! - [`deliver_callback`]: the durable webhook delivery every task with a
//!   callback URL gets: it waits (parked, holding no worker) for the task to
//!   finish, then posts the event signed with the owner's webhook secret,
//!   retrying with backoff; each attempt is recorded in `callbacks`.
//!
//! All of them are registered with `ORRERY_TEST_WORKFLOWS=1`; the delivery
//! workflow is also needed in production (see [`DELIVER_CALLBACK`]).

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use sqlx::{PgPool, Row};
use uuid::Uuid;

use crate::{
    error::StepError,
    retry::RetryPolicy,
    workflow::{Progress, Step, StepCtx, Workflow},
};

/// Name of the webhook delivery workflow.
pub const DELIVER_CALLBACK: &str = "deliver_callback";
/// Queue of the fakes and of deliveries (consumed by every provisioning worker).
pub const QUEUE: &str = "provision";

pub fn workflows() -> Vec<Workflow> {
    vec![
        create_cluster(),
        terminate_cluster(),
        grant_user(),
        revoke_user(),
    ]
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ClusterInput {
    pub cluster_id: Uuid,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ClusterUserInput {
    pub cluster_id: Uuid,
    pub username: String,
}

fn db(e: sqlx::Error) -> StepError {
    StepError::retryable(format!("database: {e}"))
}

fn quick() -> RetryPolicy {
    RetryPolicy::default().delays(Duration::from_millis(50), Duration::from_millis(500))
}

pub fn create_cluster() -> Workflow {
    Workflow::new("fake.create_cluster", 1)
        .input::<ClusterInput>()
        .step(
            Step::new("allocate", QUEUE, |ctx: StepCtx, input: ClusterInput| async move {
                let pool = ctx.service::<PgPool>()?;
                let name: Option<String> =
                    sqlx::query_scalar("SELECT name FROM clusters WHERE id = $1")
                        .bind(input.cluster_id)
                        .fetch_optional(&*pool)
                        .await
                        .map_err(db)?;
                let name = name.ok_or_else(|| {
                    StepError::fatal(format!("cluster {} does not exist", input.cluster_id))
                })?;
                Ok::<_, StepError>(json!({ "cluster": name }))
            })
            .retry(quick())
            .compensate(|ctx: StepCtx, input: ClusterInput| async move {
                let pool = ctx.service::<PgPool>()?;
                sqlx::query(
                    "UPDATE clusters SET state = 'failed', updated_at = now(),
                         state_reason = COALESCE(state_reason, 'provisioning did not complete')
                     WHERE id = $1 AND state = 'provisioning'",
                )
                .bind(input.cluster_id)
                .execute(&*pool)
                .await
                .map_err(db)?;
                Ok(())
            }),
        )
        .step(
            Step::new("start", QUEUE, |ctx: StepCtx, input: ClusterInput| async move {
                let pool = ctx.service::<PgPool>()?;
                let name: String = ctx.output::<Value>("allocate")?["cluster"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                if name.starts_with("fail-") {
                    sqlx::query(
                        "UPDATE clusters SET state_reason = 'services failed to start (fake failure)'
                         WHERE id = $1",
                    )
                    .bind(input.cluster_id)
                    .execute(&*pool)
                    .await
                    .map_err(db)?;
                    return Err(StepError::fatal("services failed to start (fake failure)"));
                }
                let mut tx = pool.begin().await.map_err(db)?;
                sqlx::query(
                    "UPDATE clusters SET state = 'running', state_reason = NULL, updated_at = now()
                     WHERE id = $1 AND state = 'provisioning'",
                )
                .bind(input.cluster_id)
                .execute(&mut *tx)
                .await
                .map_err(db)?;
                sqlx::query(
                    "UPDATE cluster_users SET state = 'active', updated_at = now()
                     WHERE cluster_id = $1 AND state = 'pending'",
                )
                .bind(input.cluster_id)
                .execute(&mut *tx)
                .await
                .map_err(db)?;
                tx.commit().await.map_err(db)?;
                Ok::<_, StepError>(json!({ "state": "running" }))
            })
            .retry(quick()),
        )
}

pub fn terminate_cluster() -> Workflow {
    Workflow::new("fake.terminate_cluster", 1)
        .input::<ClusterInput>()
        .step(
            Step::new("release", QUEUE, |ctx: StepCtx, input: ClusterInput| async move {
                let pool = ctx.service::<PgPool>()?;
                let mut tx = pool.begin().await.map_err(db)?;
                let released = sqlx::query(
                    "UPDATE machines SET state = 'free', cluster_id = NULL, updated_at = now()
                     WHERE cluster_id = $1",
                )
                .bind(input.cluster_id)
                .execute(&mut *tx)
                .await
                .map_err(db)?
                .rows_affected();
                sqlx::query(
                    "UPDATE clusters SET state = 'terminated', terminated_at = now(), updated_at = now()
                     WHERE id = $1",
                )
                .bind(input.cluster_id)
                .execute(&mut *tx)
                .await
                .map_err(db)?;
                sqlx::query(
                    "UPDATE cluster_users SET state = 'removed', updated_at = now() WHERE cluster_id = $1",
                )
                .bind(input.cluster_id)
                .execute(&mut *tx)
                .await
                .map_err(db)?;
                tx.commit().await.map_err(db)?;
                Ok::<_, StepError>(json!({ "released": released }))
            })
            .retry(quick()),
        )
}

fn set_user_state(name: &'static str, to: &'static str) -> Workflow {
    Workflow::new(name, 1).input::<ClusterUserInput>().step(
        Step::new(
            "apply",
            QUEUE,
            move |ctx: StepCtx, input: ClusterUserInput| async move {
                let pool = ctx.service::<PgPool>()?;
                sqlx::query(
                    "UPDATE cluster_users SET state = $3, updated_at = now()
                 WHERE cluster_id = $1 AND username = $2",
                )
                .bind(input.cluster_id)
                .bind(&input.username)
                .bind(to)
                .execute(&*pool)
                .await
                .map_err(db)?;
                Ok::<_, StepError>(json!({ "username": input.username, "state": to }))
            },
        )
        .retry(quick()),
    )
}

pub fn grant_user() -> Workflow {
    set_user_state("fake.grant_user", "active")
}

pub fn revoke_user() -> Workflow {
    set_user_state("fake.revoke_user", "removed")
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct CallbackInput {
    pub callback_id: Uuid,
}

/// HMAC-SHA256 (RFC 2104) of `message` under `key`, lowercase hex.
pub fn hmac_sha256_hex(key: &[u8], message: &[u8]) -> String {
    const BLOCK: usize = 64;
    let mut k = [0u8; BLOCK];
    if key.len() > BLOCK {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let pad = |b: u8| k.iter().map(|x| x ^ b).collect::<Vec<u8>>();
    let inner = Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(message)
        .finalize();
    let outer = Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize();
    hex::encode(outer)
}

/// `X-Orrery-Signature` value: `t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`.
pub fn signature(secret: &str, timestamp: i64, body: &[u8]) -> String {
    let mut msg = format!("{timestamp}.").into_bytes();
    msg.extend_from_slice(body);
    format!(
        "t={timestamp},v1={}",
        hmac_sha256_hex(secret.as_bytes(), &msg)
    )
}

/// Wait for the task, then post its final state to the callback URL.
pub fn deliver_callback() -> Workflow {
    Workflow::new(DELIVER_CALLBACK, 1)
        .input::<CallbackInput>()
        .step(
            Step::waiting("await_task", QUEUE, |ctx: StepCtx, input: CallbackInput| async move {
                let pool = ctx.service::<PgPool>()?;
                let row = sqlx::query(
                    "SELECT r.id, r.state, r.output, r.error, r.workflow, t.kind, t.cluster_id
                     FROM callbacks c JOIN runs r ON r.id = c.task_run_id
                     LEFT JOIN tasks t ON t.run_id = r.id
                     WHERE c.id = $1",
                )
                .bind(input.callback_id)
                .fetch_optional(&*pool)
                .await
                .map_err(db)?
                .ok_or_else(|| StepError::fatal(format!("callback {} is gone", input.callback_id)))?;
                let state: String = row.try_get("state").map_err(db)?;
                if !matches!(state.as_str(), "succeeded" | "failed" | "cancelled") {
                    return Ok(Progress::WaitFor(Duration::from_millis(300)));
                }
                let task_id: Uuid = row.try_get("id").map_err(db)?;
                Ok::<_, StepError>(Progress::Done(json!({
                    "type": "task.finished",
                    "delivery": input.callback_id,
                    "task": {
                        "id": task_id,
                        "href": format!("/v1/tasks/{task_id}"),
                        "kind": row.try_get::<Option<String>, _>("kind").map_err(db)?,
                        "cluster_id": row.try_get::<Option<Uuid>, _>("cluster_id").map_err(db)?,
                        "state": state,
                        "result": row.try_get::<Option<Value>, _>("output").map_err(db)?,
                        "error": row.try_get::<Option<String>, _>("error").map_err(db)?,
                    },
                })))
            })
            .wait_deadline(Duration::from_secs(7 * 24 * 3600)),
        )
        .step(
            Step::new("post", QUEUE, |ctx: StepCtx, input: CallbackInput| async move {
                let pool = ctx.service::<PgPool>()?;
                let event: Value = ctx.output("await_task")?;
                let row = sqlx::query(
                    "SELECT c.url, c.state, u.webhook_secret FROM callbacks c
                     JOIN users u ON u.id = c.user_id WHERE c.id = $1",
                )
                .bind(input.callback_id)
                .fetch_one(&*pool)
                .await
                .map_err(db)?;
                let url: String = row.try_get("url").map_err(db)?;
                if row.try_get::<String, _>("state").map_err(db)? == "delivered" {
                    return Ok(json!({ "delivered": true, "repeat": true }));
                }
                let secret: String = row
                    .try_get::<Option<String>, _>("webhook_secret")
                    .map_err(db)?
                    .unwrap_or_default();
                let body = serde_json::to_vec(&event).map_err(StepError::fatal)?;
                let ts = chrono::Utc::now().timestamp();
                let client = reqwest::Client::builder()
                    .timeout(Duration::from_secs(10))
                    .build()
                    .map_err(StepError::fatal)?;
                let sent = client
                    .post(&url)
                    .header("content-type", "application/json")
                    .header("x-orrery-delivery", input.callback_id.to_string())
                    .header("x-orrery-attempt", ctx.attempt.to_string())
                    .header("x-orrery-signature", signature(&secret, ts, &body))
                    .body(body)
                    .send()
                    .await;
                let (status, error) = match &sent {
                    Ok(res) if res.status().is_success() => (Some(res.status().as_u16()), None),
                    Ok(res) => (Some(res.status().as_u16()), Some(format!("endpoint answered {}", res.status()))),
                    Err(e) => (None, Some(format!("could not reach the endpoint: {e}"))),
                };
                sqlx::query(
                    "UPDATE callbacks SET attempts = attempts + 1, last_status = $2, last_error = $3,
                         last_attempt_at = now(),
                         state = CASE WHEN $3::text IS NULL THEN 'delivered' ELSE state END,
                         delivered_at = CASE WHEN $3::text IS NULL THEN now() ELSE delivered_at END
                     WHERE id = $1",
                )
                .bind(input.callback_id)
                .bind(status.map(i32::from))
                .bind(&error)
                .execute(&*pool)
                .await
                .map_err(db)?;
                match (status, error) {
                    (_, None) => Ok(json!({ "delivered": true, "status": status })),
                    // A client error other than timeout/rate limiting will not heal by retrying.
                    (Some(s), Some(e)) if (400..500).contains(&s) && s != 408 && s != 429 => {
                        Err(StepError::fatal(e))
                    }
                    (_, Some(e)) => Err(StepError::retryable(e)),
                }
            })
            .retry(
                RetryPolicy::default()
                    .attempts(10)
                    .delays(Duration::from_millis(200), Duration::from_secs(120)),
            )
            .compensate(|ctx: StepCtx, input: CallbackInput| async move {
                let pool = ctx.service::<PgPool>()?;
                sqlx::query("UPDATE callbacks SET state = 'failed' WHERE id = $1 AND state = 'pending'")
                    .bind(input.callback_id)
                    .execute(&*pool)
                    .await
                    .map_err(db)?;
                Ok(())
            }),
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_the_rfc_4231_test_vector() {
        // RFC 4231, test case 2.
        assert_eq!(
            hmac_sha256_hex(b"Jefe", b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn the_signature_covers_timestamp_and_body() {
        let a = signature("s", 1, b"{}");
        assert!(a.starts_with("t=1,v1="));
        assert_ne!(a, signature("s", 2, b"{}"));
        assert_ne!(a, signature("s", 1, b"{ }"));
    }
}
