//! Accounts: users, groups, API keys, SSH keys, the webhook secret.
//!
//! Users hold keys they create themselves (shown once, stored hashed,
//! revocable, several per user) and SSH public keys (validated, fingerprint
//! shown). Operators create users and groups and set quotas; the very first
//! operator comes from `orrery admin create-user --operator`, which calls
//! [`create_user`] directly. Every operator change is audited.

use axum::{
    extract::{Path, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    Json,
};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sqlx::{PgConnection, PgPool, Row};
use uuid::Uuid;

use crate::{
    app::AppState,
    auth::{random_secret, Caller, NewKey, Operator},
    error::{ApiError, ApiResult},
    extract::{parse_id, Body},
    quotas, sshkeys,
};

/// UNIX account names: they become accounts on every cluster node.
pub fn validate_username(field: &str, name: &str) -> ApiResult<()> {
    let ok = !name.is_empty()
        && name.len() <= 32
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid(
            field,
            format!("`{field}` must be 1 to 32 lowercase letters, digits, `_` or `-`, starting with a letter or `_` (it becomes a UNIX account)"),
        ))
    }
}

fn validate_limit(field: &str, v: Option<i32>) -> ApiResult<()> {
    match v {
        Some(n) if n < 0 => Err(ApiError::invalid(
            field,
            format!("`{field}` is {n}; it cannot be negative"),
        )),
        _ => Ok(()),
    }
}

/// A unique violation becomes a 409 saying `what` already exists; any other
/// database error stays internal.
fn conflict_if_exists(e: sqlx::Error, what: impl FnOnce() -> String) -> ApiError {
    match &e {
        sqlx::Error::Database(d) if d.is_unique_violation() => ApiError::conflict(what()),
        _ => e.into(),
    }
}

/// `POST /v1/admin/groups` body.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NewGroup {
    pub name: String,
    /// Most machines the whole group may hold (none: no group limit).
    pub quota_machines: Option<i32>,
    /// Machines kept available for this group only.
    #[serde(default)]
    pub reserved_machines: i32,
}

pub async fn create_group(pool: &PgPool, g: &NewGroup, actor: &str) -> ApiResult<Uuid> {
    validate_username("name", &g.name)?;
    validate_limit("quota_machines", g.quota_machines)?;
    validate_limit("reserved_machines", Some(g.reserved_machines))?;
    let id = Uuid::now_v7();
    let mut tx = pool.begin().await?;
    sqlx::query(
        "INSERT INTO groups (id, name, quota_machines, reserved_machines) VALUES ($1, $2, $3, $4)",
    )
    .bind(id)
    .bind(&g.name)
    .bind(g.quota_machines)
    .bind(g.reserved_machines)
    .execute(&mut *tx)
    .await
    .map_err(|e| conflict_if_exists(e, || format!("a group named {} already exists", g.name)))?;
    audit(&mut tx, actor, "create_group", json!(g)).await?;
    tx.commit().await?;
    Ok(id)
}

/// `POST /v1/admin/users` body.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NewUser {
    pub name: String,
    pub email: Option<String>,
    /// Name of an existing group.
    pub group: Option<String>,
    #[serde(default)]
    pub operator: bool,
    pub quota_machines: Option<i32>,
}

/// Create a user and their first API key (returned once).
pub async fn create_user(pool: &PgPool, u: &NewUser, actor: &str) -> ApiResult<(Uuid, NewKey)> {
    validate_username("name", &u.name)?;
    validate_limit("quota_machines", u.quota_machines)?;
    if let Some(email) = &u.email {
        if !email.contains('@') || email.len() > 254 {
            return Err(ApiError::invalid(
                "email",
                "`email` is not an e-mail address",
            ));
        }
    }
    let mut tx = pool.begin().await?;
    let group_id: Option<Uuid> = match &u.group {
        None => None,
        Some(name) => Some(
            sqlx::query_scalar("SELECT id FROM groups WHERE name = $1")
                .bind(name)
                .fetch_optional(&mut *tx)
                .await?
                .ok_or_else(|| {
                    ApiError::invalid("group", format!("`group`: there is no group named {name}"))
                })?,
        ),
    };
    let id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO users (id, name, email, group_id, is_operator, quota_machines, webhook_secret)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(id)
    .bind(&u.name)
    .bind(&u.email)
    .bind(group_id)
    .bind(u.operator)
    .bind(u.quota_machines)
    .bind(random_secret(32))
    .execute(&mut *tx)
    .await
    .map_err(|e| conflict_if_exists(e, || format!("a user named {} already exists", u.name)))?;
    let key = insert_key(&mut tx, id, "initial").await?;
    audit(&mut tx, actor, "create_user", json!(u)).await?;
    tx.commit().await?;
    Ok((id, key))
}

pub async fn insert_key(conn: &mut PgConnection, user_id: Uuid, name: &str) -> ApiResult<NewKey> {
    let key = NewKey::generate();
    sqlx::query("INSERT INTO api_keys (id, user_id, lookup, secret_sha256, name) VALUES ($1, $2, $3, $4, $5)")
        .bind(key.id)
        .bind(user_id)
        .bind(&key.lookup)
        .bind(key.secret_sha256())
        .bind(name)
        .execute(conn)
        .await?;
    Ok(key)
}

/// Operator audit row for actions that are not about one run.
pub async fn audit(
    conn: &mut PgConnection,
    actor: &str,
    action: &str,
    detail: Value,
) -> ApiResult<()> {
    orrery_workflows::store::audit(conn, actor, action, None, None, Some(detail)).await?;
    Ok(())
}

/// The one time a key's secret is shown.
pub fn key_created(key: &NewKey, name: &str) -> Value {
    json!({
        "id": key.id,
        "name": name,
        "token": key.token(),
        "api_key": key.lookup,
        "api_secret": key.secret,
        "note": "store the token now: it is not shown again. /v1 takes `Authorization: Bearer <token>`; /cosmos/v1 takes Basic <api_key>:<api_secret>",
    })
}

// ---- the caller's own account ----

pub async fn profile(state: &AppState, caller: &Caller) -> ApiResult<Value> {
    let app = &state.0;
    let row = sqlx::query(
        "SELECT u.email, u.webhook_secret, u.created_at, g.name AS group_name
         FROM users u LEFT JOIN groups g ON g.id = u.group_id WHERE u.id = $1",
    )
    .bind(caller.user_id)
    .fetch_one(&app.pool)
    .await?;
    let mut conn = app.pool.acquire().await?;
    let standing = quotas::load(&mut conn, &app.config, caller.user_id).await?;
    let (can_request, bound) = standing.headroom();
    Ok(json!({
        "id": caller.user_id,
        "name": caller.name,
        "email": row.try_get::<Option<String>, _>("email")?,
        "group": row.try_get::<Option<String>, _>("group_name")?,
        "is_operator": caller.is_operator,
        "created_at": row.try_get::<DateTime<Utc>, _>("created_at")?,
        "quota": {
            "limit": standing.user_limit,
            "used": standing.user_usage,
            "group_limit": standing.group.as_ref().and_then(|g| g.limit),
            "group_used": standing.group.as_ref().map(|g| g.usage),
            "available_machines": (standing.available - standing.reserved_for_others).max(0),
            "can_request": can_request,
            "bound_by": bound,
        },
        "webhook_secret": row.try_get::<Option<String>, _>("webhook_secret")?,
    }))
}

pub async fn profile_handler(
    State(state): State<AppState>,
    caller: Caller,
) -> ApiResult<Json<Value>> {
    Ok(Json(profile(&state, &caller).await?))
}

/// `POST /v1/account/keys` body.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyRequest {
    #[serde(default)]
    pub name: String,
}

pub async fn create_key_handler(
    State(state): State<AppState>,
    caller: Caller,
    Body(req): Body<KeyRequest>,
) -> ApiResult<Response> {
    if req.name.chars().count() > 100 {
        return Err(ApiError::invalid(
            "name",
            "`name` is longer than 100 characters",
        ));
    }
    let mut conn = state.0.pool.acquire().await?;
    let key = insert_key(&mut conn, caller.user_id, &req.name).await?;
    Ok((StatusCode::CREATED, Json(key_created(&key, &req.name))).into_response())
}

pub async fn list_keys_handler(
    State(state): State<AppState>,
    caller: Caller,
) -> ApiResult<Json<Value>> {
    let rows = sqlx::query(
        "SELECT id, name, lookup, created_at, last_used_at, revoked_at FROM api_keys
         WHERE user_id = $1 ORDER BY created_at",
    )
    .bind(caller.user_id)
    .fetch_all(&state.0.pool)
    .await?;
    let items: Vec<Value> = rows
        .iter()
        .map(|r| {
            Ok(json!({
                "id": r.try_get::<Uuid, _>("id")?,
                "name": r.try_get::<String, _>("name")?,
                "api_key": r.try_get::<String, _>("lookup")?,
                "created_at": r.try_get::<DateTime<Utc>, _>("created_at")?,
                "last_used_at": r.try_get::<Option<DateTime<Utc>>, _>("last_used_at")?,
                "revoked_at": r.try_get::<Option<DateTime<Utc>>, _>("revoked_at")?,
                "in_use": r.try_get::<Uuid, _>("id")? == caller.key_id,
            }))
        })
        .collect::<Result<_, sqlx::Error>>()?;
    Ok(Json(json!({ "items": items })))
}

pub async fn revoke_key_handler(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let id = parse_id(&id, "API key")?;
    let n = sqlx::query(
        "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, now()) WHERE id = $1 AND user_id = $2",
    )
    .bind(id)
    .bind(caller.user_id)
    .execute(&state.0.pool)
    .await?
    .rows_affected();
    if n == 0 {
        return Err(ApiError::not_found(format!("no API key {id}")));
    }
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /v1/account/ssh-keys` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SshKeyRequest {
    /// One OpenSSH public key line: `ssh-ed25519 AAAA... comment`.
    pub public_key: String,
    #[serde(default)]
    pub name: String,
}

pub async fn add_ssh_key(
    pool: &PgPool,
    user_id: Uuid,
    public_key: &str,
    name: &str,
) -> ApiResult<Value> {
    let key = sshkeys::parse(public_key)
        .map_err(|m| ApiError::invalid("public_key", format!("`public_key`: {m}")))?;
    if name.chars().count() > 100 {
        return Err(ApiError::invalid(
            "name",
            "`name` is longer than 100 characters",
        ));
    }
    let id = Uuid::now_v7();
    sqlx::query("INSERT INTO ssh_keys (id, user_id, name, public_key, fingerprint) VALUES ($1, $2, $3, $4, $5)")
        .bind(id)
        .bind(user_id)
        .bind(name)
        .bind(&key.line)
        .bind(&key.fingerprint)
        .execute(pool)
        .await
        .map_err(|e| conflict_if_exists(e, || format!("you already have the key {}", key.fingerprint)))?;
    Ok(
        json!({ "id": id, "name": name, "type": key.kind, "fingerprint": key.fingerprint, "public_key": key.line }),
    )
}

pub async fn add_ssh_key_handler(
    State(state): State<AppState>,
    caller: Caller,
    Body(req): Body<SshKeyRequest>,
) -> ApiResult<Response> {
    let body = add_ssh_key(&state.0.pool, caller.user_id, &req.public_key, &req.name).await?;
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

pub async fn ssh_keys(pool: &PgPool, user_id: Uuid) -> ApiResult<Vec<Value>> {
    let rows = sqlx::query("SELECT id, name, public_key, fingerprint, created_at FROM ssh_keys WHERE user_id = $1 ORDER BY created_at")
        .bind(user_id)
        .fetch_all(pool)
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            Ok(json!({
                "id": r.try_get::<Uuid, _>("id")?,
                "name": r.try_get::<String, _>("name")?,
                "public_key": r.try_get::<String, _>("public_key")?,
                "fingerprint": r.try_get::<String, _>("fingerprint")?,
                "created_at": r.try_get::<DateTime<Utc>, _>("created_at")?,
            }))
        })
        .collect::<Result<_, sqlx::Error>>()?)
}

pub async fn list_ssh_keys_handler(
    State(state): State<AppState>,
    caller: Caller,
) -> ApiResult<Json<Value>> {
    Ok(Json(
        json!({ "items": ssh_keys(&state.0.pool, caller.user_id).await? }),
    ))
}

pub async fn delete_ssh_key_handler(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let id = parse_id(&id, "SSH key")?;
    let n = sqlx::query("DELETE FROM ssh_keys WHERE id = $1 AND user_id = $2")
        .bind(id)
        .bind(caller.user_id)
        .execute(&state.0.pool)
        .await?
        .rows_affected();
    if n == 0 {
        return Err(ApiError::not_found(format!("no SSH key {id}")));
    }
    Ok(StatusCode::NO_CONTENT)
}

pub async fn rotate_webhook_secret_handler(
    State(state): State<AppState>,
    caller: Caller,
) -> ApiResult<Json<Value>> {
    let secret = random_secret(32);
    sqlx::query("UPDATE users SET webhook_secret = $2 WHERE id = $1")
        .bind(caller.user_id)
        .bind(&secret)
        .execute(&state.0.pool)
        .await?;
    Ok(Json(json!({ "webhook_secret": secret })))
}

// ---- operators: users and groups ----

pub async fn admin_create_user_handler(
    State(state): State<AppState>,
    Operator(op): Operator,
    Body(req): Body<NewUser>,
) -> ApiResult<Response> {
    let (id, key) = create_user(&state.0.pool, &req, &op.name).await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "id": id, "name": req.name, "group": req.group, "is_operator": req.operator, "api_key": key_created(&key, "initial") })),
    )
        .into_response())
}

pub async fn admin_list_users_handler(
    State(state): State<AppState>,
    Operator(_): Operator,
) -> ApiResult<Json<Value>> {
    let rows = sqlx::query(
        "SELECT u.id, u.name, u.email, g.name AS group_name, u.is_operator, u.quota_machines,
                u.disabled_at IS NOT NULL AS disabled, u.created_at
         FROM users u LEFT JOIN groups g ON g.id = u.group_id ORDER BY u.name",
    )
    .fetch_all(&state.0.pool)
    .await?;
    let items: Vec<Value> = rows
        .iter()
        .map(|r| {
            Ok(json!({
                "id": r.try_get::<Uuid, _>("id")?,
                "name": r.try_get::<String, _>("name")?,
                "email": r.try_get::<Option<String>, _>("email")?,
                "group": r.try_get::<Option<String>, _>("group_name")?,
                "is_operator": r.try_get::<bool, _>("is_operator")?,
                "quota_machines": r.try_get::<Option<i32>, _>("quota_machines")?,
                "disabled": r.try_get::<bool, _>("disabled")?,
                "created_at": r.try_get::<DateTime<Utc>, _>("created_at")?,
            }))
        })
        .collect::<Result<_, sqlx::Error>>()?;
    Ok(Json(json!({ "items": items })))
}

/// `PATCH /v1/admin/users/{name}` body: only the fields given change.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UserChange {
    /// `null` clears the user's own limit (the group's or the default applies).
    #[serde(default, with = "double_option")]
    pub quota_machines: Option<Option<i32>>,
    pub operator: Option<bool>,
    pub disabled: Option<bool>,
    pub reason: Option<String>,
}

mod double_option {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<i32>>, D::Error> {
        Ok(Some(Option::deserialize(d)?))
    }

    pub fn serialize<S: Serializer>(v: &Option<Option<i32>>, s: S) -> Result<S::Ok, S::Error> {
        v.serialize(s)
    }
}

pub async fn admin_update_user_handler(
    State(state): State<AppState>,
    Operator(op): Operator,
    Path(name): Path<String>,
    Body(req): Body<UserChange>,
) -> ApiResult<StatusCode> {
    if let Some(q) = req.quota_machines {
        validate_limit("quota_machines", q)?;
    }
    let mut tx = state.0.pool.begin().await?;
    let n = sqlx::query(
        "UPDATE users SET
             quota_machines = CASE WHEN $2 THEN $3 ELSE quota_machines END,
             is_operator = COALESCE($4, is_operator),
             disabled_at = CASE WHEN $5::bool IS NULL THEN disabled_at
                                WHEN $5 THEN COALESCE(disabled_at, now()) ELSE NULL END
         WHERE name = $1",
    )
    .bind(&name)
    .bind(req.quota_machines.is_some())
    .bind(req.quota_machines.flatten())
    .bind(req.operator)
    .bind(req.disabled)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if n == 0 {
        return Err(ApiError::not_found(format!("no user {name}")));
    }
    audit(
        &mut tx,
        &op.name,
        "update_user",
        json!({ "user": name, "change": req }),
    )
    .await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn admin_create_group_handler(
    State(state): State<AppState>,
    Operator(op): Operator,
    Body(req): Body<NewGroup>,
) -> ApiResult<Response> {
    let id = create_group(&state.0.pool, &req, &op.name).await?;
    Ok((StatusCode::CREATED, Json(json!({ "id": id, "name": req.name, "quota_machines": req.quota_machines, "reserved_machines": req.reserved_machines })))
        .into_response())
}

pub async fn admin_list_groups_handler(
    State(state): State<AppState>,
    Operator(_): Operator,
) -> ApiResult<Json<Value>> {
    let rows = sqlx::query(
        "SELECT g.id, g.name, g.quota_machines, g.reserved_machines,
                (SELECT COALESCE(sum(size), 0) FROM clusters c
                 WHERE c.group_id = g.id AND c.state IN ('provisioning', 'running', 'terminating'))::bigint AS used
         FROM groups g ORDER BY g.name",
    )
    .fetch_all(&state.0.pool)
    .await?;
    let items: Vec<Value> = rows
        .iter()
        .map(|r| {
            Ok(json!({
                "id": r.try_get::<Uuid, _>("id")?,
                "name": r.try_get::<String, _>("name")?,
                "quota_machines": r.try_get::<Option<i32>, _>("quota_machines")?,
                "reserved_machines": r.try_get::<i32, _>("reserved_machines")?,
                "used": r.try_get::<i64, _>("used")?,
            }))
        })
        .collect::<Result<_, sqlx::Error>>()?;
    Ok(Json(json!({ "items": items })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames_must_be_unix_account_names() {
        assert!(validate_username("name", "alice").is_ok());
        assert!(validate_username("name", "_svc-1").is_ok());
        for bad in ["", "Alice", "1abc", "a b", &"a".repeat(33)] {
            assert_eq!(
                validate_username("name", bad).unwrap_err().field.as_deref(),
                Some("name"),
                "{bad}"
            );
        }
    }
}
