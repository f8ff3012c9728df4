//! The cluster rows provisioning reads and updates: `clusters`,
//! `cluster_users` and the cluster's machines in the inventory. Database
//! errors are retryable; a cluster that does not exist is fatal.

use sqlx::{PgPool, Row};
use uuid::Uuid;

use super::accounts::{valid_username, Account};
use crate::{error::StepError, infra::Machine};

fn db(err: sqlx::Error) -> StepError {
    StepError::retryable(format!("database: {err}"))
}

#[derive(Debug, Clone)]
pub struct ClusterRow {
    pub id: Uuid,
    pub name: String,
    pub size: i32,
    pub services: Vec<String>,
    pub state: String,
}

pub async fn load(pool: &PgPool, id: Uuid) -> Result<ClusterRow, StepError> {
    let row = sqlx::query("SELECT id, name, size, services, state FROM clusters WHERE id = $1")
        .bind(id)
        .fetch_optional(pool)
        .await
        .map_err(db)?
        .ok_or_else(|| StepError::fatal(format!("cluster {id} does not exist")))?;
    Ok(ClusterRow {
        id: row.try_get("id").map_err(db)?,
        name: row.try_get("name").map_err(db)?,
        size: row.try_get("size").map_err(db)?,
        services: row.try_get("services").map_err(db)?,
        state: row.try_get("state").map_err(db)?,
    })
}

/// Set the cluster's state and reason (a terminal one also stamps `terminated_at`).
pub async fn set_state(
    pool: &PgPool,
    id: Uuid,
    state: &str,
    reason: Option<&str>,
) -> Result<(), StepError> {
    sqlx::query(
        "UPDATE clusters SET state = $2, state_reason = $3, updated_at = now(),
             terminated_at = CASE WHEN $2 = 'terminated' THEN now() ELSE terminated_at END
         WHERE id = $1",
    )
    .bind(id)
    .bind(state)
    .bind(reason)
    .execute(pool)
    .await
    .map_err(db)?;
    Ok(())
}

/// The error the run is unwinding with: the reason a failed cluster shows.
pub async fn run_error(pool: &PgPool, run_id: Uuid) -> Result<String, StepError> {
    let error: Option<String> = sqlx::query_scalar("SELECT error FROM runs WHERE id = $1")
        .bind(run_id)
        .fetch_optional(pool)
        .await
        .map_err(db)?
        .flatten();
    Ok(error.unwrap_or_else(|| "provisioning failed".into()))
}

/// Machines the inventory says the cluster holds, by hostname.
pub async fn machines(pool: &PgPool, cluster_id: Uuid) -> Result<Vec<Machine>, StepError> {
    let rows = sqlx::query(
        "SELECT id, hostname, address, ssh_port, host_key FROM machines WHERE cluster_id = $1 ORDER BY hostname",
    )
    .bind(cluster_id)
    .fetch_all(pool)
    .await
    .map_err(db)?;
    rows.into_iter()
        .map(|r| {
            Ok(Machine {
                id: r.try_get("id").map_err(db)?,
                hostname: r.try_get("hostname").map_err(db)?,
                address: r.try_get("address").map_err(db)?,
                ssh_port: r.try_get::<i32, _>("ssh_port").map_err(db)? as u16,
                host_key: r.try_get("host_key").map_err(db)?,
            })
        })
        .collect()
}

/// Accounts to create: every cluster user not being removed (or only `only`).
pub async fn accounts(
    pool: &PgPool,
    cluster_id: Uuid,
    only: Option<&str>,
) -> Result<Vec<Account>, StepError> {
    let rows = sqlx::query(
        "SELECT username, COALESCE(public_key, '') AS public_key, is_sudoer, ssh_enabled
         FROM cluster_users
         WHERE cluster_id = $1 AND state IN ('pending', 'active') AND ($2::text IS NULL OR username = $2)
         ORDER BY username",
    )
    .bind(cluster_id)
    .bind(only)
    .fetch_all(pool)
    .await
    .map_err(db)?;
    rows.into_iter()
        .map(|r| {
            let username: String = r.try_get("username").map_err(db)?;
            if !valid_username(&username) {
                return Err(StepError::fatal(format!(
                    "cluster user `{username}` is not a valid UNIX user name (lower-case letters, digits, `_`, `-`)"
                )));
            }
            Ok(Account {
                username,
                public_keys: r.try_get("public_key").map_err(db)?,
                sudoer: r.try_get("is_sudoer").map_err(db)?,
                ssh_enabled: r.try_get("ssh_enabled").map_err(db)?,
            })
        })
        .collect()
}

/// Move cluster users from one state to another (all, or only `only`).
pub async fn set_users_state(
    pool: &PgPool,
    cluster_id: Uuid,
    only: Option<&str>,
    from: &[&str],
    to: &str,
) -> Result<(), StepError> {
    sqlx::query(
        "UPDATE cluster_users SET state = $4, updated_at = now()
         WHERE cluster_id = $1 AND ($2::text IS NULL OR username = $2) AND state = ANY($3)",
    )
    .bind(cluster_id)
    .bind(only)
    .bind(from.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    .bind(to)
    .execute(pool)
    .await
    .map_err(db)?;
    Ok(())
}

/// The name of the cluster in Ambari: stable per cluster, safe in URLs.
pub fn ambari_name(cluster_id: Uuid) -> String {
    format!("orrery-{}", cluster_id.simple())
}
