//! Clusters: create (quota and availability checked, intent recorded, 202),
//! list, show, terminate, and cluster users (add, remove). Each change is a
//! durable run started through [`crate::submit`]; the workflows update the
//! rows themselves as they progress.
//!
//! The functions taking a [`Caller`] are the single code path shared by `/v1`
//! (handlers here) and `/cosmos/v1` ([`crate::cosmos`]).
//!
//! Visibility: a user sees and acts on their own clusters and the shared
//! clusters of their group; operators on all. A cluster the caller may not
//! see answers 404, exactly like one that does not exist.

use axum::{
    extract::{Path, State},
    http::HeaderMap,
    response::Response,
    Json,
};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{json, Value};
use sqlx::{PgConnection, Row};
use uuid::Uuid;

use crate::{
    admission::Requester,
    app::{App, AppState},
    auth::{Caller, Credentials},
    error::{ApiError, ApiResult},
    extract::{idempotency_key, parse_id, Body, Query},
    services,
    submit::{self, Idempotency, Submitted, TaskSpec},
};

pub const STATES: [&str; 5] = [
    "provisioning",
    "running",
    "terminating",
    "terminated",
    "failed",
];
pub const NAME_MAX: usize = 64;
pub const TTL_MAX_SECONDS: i64 = 90 * 24 * 3600;

/// `POST /v1/clusters` body.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct CreateCluster {
    /// 1 to 64 letters, digits, `-`, `_` or `.`, starting with a letter or digit.
    pub name: String,
    /// Number of machines, at least 1.
    pub size: i64,
    /// Optional services (HIVE, OOZIE, PIG, SQOOP); dependencies are added.
    #[serde(default)]
    pub services: Vec<String>,
    /// Grant every member of the owner's group an account.
    #[serde(default)]
    pub shared: bool,
    /// Terminate automatically after this many seconds (60 to 90 days).
    pub ttl_seconds: Option<i64>,
    /// Webhook called (signed, with retries) when the task finishes.
    pub callback_url: Option<String>,
}

/// A validated request.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    pub name: String,
    pub size: i32,
    pub services: Vec<&'static str>,
    pub shared: bool,
    pub ttl_seconds: Option<i64>,
    pub callback_url: Option<String>,
}

pub fn validate_name(name: &str) -> Result<(), ApiError> {
    let len = name.chars().count();
    if len == 0 {
        return Err(ApiError::invalid(
            "name",
            "`name` is empty; give the cluster a name",
        ));
    }
    if len > NAME_MAX {
        return Err(ApiError::invalid(
            "name",
            format!("`name` is {len} characters long; at most {NAME_MAX} are allowed"),
        ));
    }
    let ok_first = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric());
    if !ok_first
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(ApiError::invalid(
            "name",
            "`name` may contain only letters, digits, `-`, `_` and `.`, and must start with a letter or digit",
        ));
    }
    Ok(())
}

/// A task's optional `callback_url`, checked: an http or https URL of at
/// most 2048 characters (every task-creating route takes one).
pub fn validate_callback(url: Option<&str>) -> ApiResult<Option<&str>> {
    let Some(url) = url else { return Ok(None) };
    let parsed = reqwest::Url::parse(url).map_err(|e| {
        ApiError::invalid("callback_url", format!("`callback_url` is not a URL: {e}"))
    })?;
    if !matches!(parsed.scheme(), "http" | "https") || url.len() > 2048 {
        return Err(ApiError::invalid(
            "callback_url",
            "`callback_url` must be an http or https URL of at most 2048 characters",
        ));
    }
    Ok(Some(url))
}

pub fn validate(req: &CreateCluster, max_size: i64) -> ApiResult<ClusterSpec> {
    validate_name(&req.name)?;
    if req.size < 1 {
        return Err(ApiError::invalid(
            "size",
            format!("`size` is {}; a cluster needs at least 1 machine", req.size),
        ));
    }
    if req.size > max_size {
        return Err(ApiError::invalid(
            "size",
            format!(
                "`size` is {}; at most {max_size} machines per cluster",
                req.size
            ),
        ));
    }
    let services = services::resolve(&req.services)
        .map_err(|e| ApiError::invalid(format!("services[{}]", e.index), e.to_string()))?;
    if let Some(ttl) = req.ttl_seconds {
        if !(60..=TTL_MAX_SECONDS).contains(&ttl) {
            return Err(ApiError::invalid(
                "ttl_seconds",
                format!("`ttl_seconds` is {ttl}; give between 60 and {TTL_MAX_SECONDS} (90 days)"),
            ));
        }
    }
    validate_callback(req.callback_url.as_deref())?;
    Ok(ClusterSpec {
        name: req.name.clone(),
        size: req.size as i32,
        services,
        shared: req.shared,
        ttl_seconds: req.ttl_seconds,
        callback_url: req.callback_url.clone(),
    })
}

/// Create a cluster: admitted (quota and availability) and recorded (cluster,
/// the owner's and, if shared, the group's accounts, run, task) in one
/// transaction shared with other waiting requests; see [`crate::admission`].
pub async fn create(
    app: &App,
    requester: Requester,
    spec: ClusterSpec,
    idem: Option<&Idempotency>,
) -> ApiResult<Submitted> {
    app.admissions.submit(requester, spec, idem).await
}

/// SQL condition: the caller bound at $u (user), $g (group) and $o
/// (operator) may act on cluster `c`: operators, the owner, and the owner's
/// group for a shared cluster.
fn actable(u: u8, g: u8, o: u8) -> String {
    format!("(${o} OR c.owner_id = ${u} OR (c.shared AND c.group_id IS NOT NULL AND c.group_id = ${g}))")
}

/// SQL condition: the caller may see cluster `c`: whoever may act on it, and
/// users who were given an account on it (they need its hostnames).
fn visible(u: u8, g: u8, o: u8) -> String {
    format!(
        "({} OR EXISTS (SELECT 1 FROM cluster_users cu WHERE cu.cluster_id = c.id
                        AND cu.user_id = ${u} AND cu.state IN ('pending', 'active')))",
        actable(u, g, o)
    )
}

/// The cluster's state, locked, if the caller may act on it; 403 if they
/// may only see it, 404 if not even that.
async fn lock_visible(
    conn: &mut PgConnection,
    caller: &Caller,
    id: Uuid,
) -> ApiResult<(String, Uuid)> {
    let row = sqlx::query(&format!(
        "SELECT c.state, c.owner_id, {} AS may_act FROM clusters c WHERE c.id = $1 AND {} FOR UPDATE",
        actable(2, 3, 4),
        visible(2, 3, 4)
    ))
    .bind(id)
    .bind(caller.user_id)
    .bind(caller.group_id)
    .bind(caller.is_operator)
    .fetch_optional(conn)
    .await?;
    let row = row.ok_or_else(|| ApiError::not_found(format!("no cluster {id}")))?;
    if !row.try_get::<bool, _>("may_act")? {
        return Err(ApiError::forbidden(format!(
            "you have an account on cluster {id} but only its owner, its group (if shared) or an operator can change it"
        )));
    }
    Ok((row.try_get("state")?, row.try_get("owner_id")?))
}

pub async fn terminate(
    app: &App,
    caller: &Caller,
    id: Uuid,
    callback_url: Option<&str>,
    idem: Option<&Idempotency>,
) -> ApiResult<Submitted> {
    let mut tx = app.pool.begin().await?;
    if let Some(s) = submit::existing(&mut tx, caller, idem).await? {
        return Ok(s);
    }
    let (state, _) = lock_visible(&mut tx, caller, id).await?;
    if state != "running" && state != "failed" {
        return Err(ApiError::conflict(format!(
            "cluster {id} is {state}; only running or failed clusters can be terminated"
        )));
    }
    let task = TaskSpec {
        kind: "terminate_cluster",
        workflow: &app.config.workflows.terminate,
        input: json!({ "cluster_id": id }),
        cluster_id: Some(id),
        callback_url,
    };
    let submitted = match submit::record_or_existing(&mut tx, app, caller, task, idem).await? {
        Ok(s) => s,
        Err(winner) => return Ok(winner),
    };
    sqlx::query("UPDATE clusters SET state = 'terminating', state_reason = NULL, run_id = $2, updated_at = now() WHERE id = $1")
        .bind(id)
        .bind(submitted.task_id)
        .execute(&mut *tx)
        .await?;
    submit::finish(app, tx, submitted, caller, idem).await
}

pub async fn add_user(
    app: &App,
    caller: &Caller,
    id: Uuid,
    username: &str,
    callback_url: Option<&str>,
    idem: Option<&Idempotency>,
) -> ApiResult<Submitted> {
    let mut tx = app.pool.begin().await?;
    if let Some(s) = submit::existing(&mut tx, caller, idem).await? {
        return Ok(s);
    }
    let (state, _) = lock_visible(&mut tx, caller, id).await?;
    if state != "running" {
        return Err(ApiError::conflict(format!(
            "cluster {id} is {state}; users can be added to running clusters only"
        )));
    }
    let user_id: Option<Uuid> =
        sqlx::query_scalar("SELECT id FROM users WHERE name = $1 AND disabled_at IS NULL")
            .bind(username)
            .fetch_optional(&mut *tx)
            .await?;
    let user_id = user_id.ok_or_else(|| {
        ApiError::invalid(
            "username",
            format!("`username`: there is no user named {username}"),
        )
    })?;
    let inserted = sqlx::query(
        "INSERT INTO cluster_users (cluster_id, username, user_id, public_key, state)
         VALUES ($1, $2, $3,
                 (SELECT string_agg(k.public_key, E'\\n' ORDER BY k.created_at) FROM ssh_keys k WHERE k.user_id = $3),
                 'pending')
         ON CONFLICT (cluster_id, username) DO UPDATE
             SET state = 'pending', public_key = EXCLUDED.public_key, updated_at = now()
             WHERE cluster_users.state IN ('removed', 'failed')",
    )
    .bind(id)
    .bind(username)
    .bind(user_id)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if inserted == 0 {
        return Err(ApiError::conflict(format!(
            "{username} already has an account on cluster {id} (or one is being added or removed)"
        )));
    }
    user_task(
        app,
        tx,
        caller,
        (id, username),
        "grant_user",
        callback_url,
        idem,
    )
    .await
}

pub async fn remove_user(
    app: &App,
    caller: &Caller,
    id: Uuid,
    username: &str,
    callback_url: Option<&str>,
    idem: Option<&Idempotency>,
) -> ApiResult<Submitted> {
    let mut tx = app.pool.begin().await?;
    if let Some(s) = submit::existing(&mut tx, caller, idem).await? {
        return Ok(s);
    }
    let (state, owner) = lock_visible(&mut tx, caller, id).await?;
    if state != "running" {
        return Err(ApiError::conflict(format!(
            "cluster {id} is {state}; users can be removed from running clusters only"
        )));
    }
    let row = sqlx::query(
        "SELECT state, user_id FROM cluster_users
         WHERE cluster_id = $1 AND username = $2 AND state <> 'removed'",
    )
    .bind(id)
    .bind(username)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(row) = row else {
        return Err(ApiError::not_found(format!(
            "{username} has no account on cluster {id}"
        )));
    };
    let (ustate, uid): (String, Option<Uuid>) = (row.try_get("state")?, row.try_get("user_id")?);
    if uid == Some(owner) {
        return Err(ApiError::conflict(
            "the owner's account cannot be removed; terminate the cluster instead",
        ));
    }
    if ustate != "active" {
        return Err(ApiError::conflict(format!(
            "{username}'s account on cluster {id} is {ustate}; only active accounts can be removed"
        )));
    }
    sqlx::query("UPDATE cluster_users SET state = 'removing', updated_at = now() WHERE cluster_id = $1 AND username = $2")
        .bind(id)
        .bind(username)
        .execute(&mut *tx)
        .await?;
    user_task(
        app,
        tx,
        caller,
        (id, username),
        "revoke_user",
        callback_url,
        idem,
    )
    .await
}

async fn user_task(
    app: &App,
    mut tx: sqlx::Transaction<'static, sqlx::Postgres>,
    caller: &Caller,
    (id, username): (Uuid, &str),
    kind: &str,
    callback_url: Option<&str>,
    idem: Option<&Idempotency>,
) -> ApiResult<Submitted> {
    let workflow = if kind == "grant_user" {
        &app.config.workflows.grant
    } else {
        &app.config.workflows.revoke
    };
    let task = TaskSpec {
        kind,
        workflow,
        input: json!({ "cluster_id": id, "username": username }),
        cluster_id: Some(id),
        callback_url,
    };
    let submitted = match submit::record_or_existing(&mut tx, app, caller, task, idem).await? {
        Ok(s) => s,
        Err(winner) => return Ok(winner),
    };
    sqlx::query("UPDATE cluster_users SET run_id = $3 WHERE cluster_id = $1 AND username = $2")
        .bind(id)
        .bind(username)
        .bind(submitted.task_id)
        .execute(&mut *tx)
        .await?;
    submit::finish(app, tx, submitted, caller, idem).await
}

/// A cluster as shown to users.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ClusterView {
    pub id: Uuid,
    pub href: String,
    pub name: String,
    pub state: String,
    pub state_reason: Option<String>,
    pub size: i32,
    pub services: Vec<String>,
    pub shared: bool,
    pub owner: String,
    pub group: Option<String>,
    pub task_id: Option<Uuid>,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub terminated_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nodes: Option<Vec<Node>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub users: Option<Vec<ClusterUser>>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Node {
    pub hostname: String,
    pub address: String,
    /// `master` for the first node (by hostname), `slave` for the others.
    pub role: &'static str,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ClusterUser {
    pub username: String,
    pub state: String,
    pub is_sudoer: bool,
    pub ssh_enabled: bool,
    pub hdfs_enabled: bool,
    pub public_key: Option<String>,
}

const VIEW_COLUMNS: &str = "c.id, c.name, c.state, c.state_reason, c.size, c.services, c.shared,
    u.name AS owner, g.name AS group_name, c.run_id, c.created_at, c.expires_at, c.terminated_at";

fn view(row: &sqlx::postgres::PgRow) -> Result<ClusterView, sqlx::Error> {
    let id: Uuid = row.try_get("id")?;
    Ok(ClusterView {
        id,
        href: format!("/v1/clusters/{id}"),
        name: row.try_get("name")?,
        state: row.try_get("state")?,
        state_reason: row.try_get("state_reason")?,
        size: row.try_get("size")?,
        services: row.try_get("services")?,
        shared: row.try_get("shared")?,
        owner: row.try_get("owner")?,
        group: row.try_get("group_name")?,
        task_id: row.try_get("run_id")?,
        created_at: row.try_get("created_at")?,
        expires_at: row.try_get("expires_at")?,
        terminated_at: row.try_get("terminated_at")?,
        nodes: None,
        users: None,
    })
}

pub async fn show(app: &App, caller: &Caller, id: Uuid) -> ApiResult<ClusterView> {
    let row = sqlx::query(&format!(
        "SELECT {VIEW_COLUMNS} FROM clusters c JOIN users u ON u.id = c.owner_id
         LEFT JOIN groups g ON g.id = c.group_id WHERE c.id = $1 AND {}",
        visible(2, 3, 4)
    ))
    .bind(id)
    .bind(caller.user_id)
    .bind(caller.group_id)
    .bind(caller.is_operator)
    .fetch_optional(&app.pool)
    .await?
    .ok_or_else(|| ApiError::not_found(format!("no cluster {id}")))?;
    let mut v = view(&row)?;
    let nodes = sqlx::query(
        "SELECT hostname, address FROM machines WHERE cluster_id = $1 ORDER BY hostname",
    )
    .bind(id)
    .fetch_all(&app.pool)
    .await?;
    v.nodes = Some(
        nodes
            .iter()
            .enumerate()
            .map(|(i, r)| {
                Ok(Node {
                    hostname: r.try_get("hostname")?,
                    address: r.try_get("address")?,
                    role: if i == 0 { "master" } else { "slave" },
                })
            })
            .collect::<Result<_, sqlx::Error>>()?,
    );
    let users = sqlx::query(
        "SELECT username, state, is_sudoer, ssh_enabled, hdfs_enabled, public_key
         FROM cluster_users WHERE cluster_id = $1 AND state <> 'removed' ORDER BY created_at, username",
    )
    .bind(id)
    .fetch_all(&app.pool)
    .await?;
    v.users = Some(
        users
            .iter()
            .map(|r| {
                Ok(ClusterUser {
                    username: r.try_get("username")?,
                    state: r.try_get("state")?,
                    is_sudoer: r.try_get("is_sudoer")?,
                    ssh_enabled: r.try_get("ssh_enabled")?,
                    hdfs_enabled: r.try_get("hdfs_enabled")?,
                    public_key: r.try_get("public_key")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()?,
    );
    Ok(v)
}

/// `GET /v1/clusters` query.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    pub state: Option<String>,
    /// Page size, 1 to 200 (default 50).
    pub limit: Option<i64>,
    /// Continue after this cluster id (the `next` link carries it).
    pub after: Option<Uuid>,
}

/// Newest first; `next` is the link to the following page, if any.
pub async fn list(
    app: &App,
    caller: &Caller,
    q: &ListQuery,
) -> ApiResult<(Vec<ClusterView>, Option<String>)> {
    if let Some(s) = &q.state {
        if !STATES.contains(&s.as_str()) {
            let mut e =
                ApiError::bad_request(format!("`state` must be one of {}", STATES.join(", ")));
            e.field = Some("state".into());
            return Err(e);
        }
    }
    let limit = q.limit.unwrap_or(50);
    if !(1..=200).contains(&limit) {
        let mut e = ApiError::bad_request("`limit` must be between 1 and 200");
        e.field = Some("limit".into());
        return Err(e);
    }
    let rows = sqlx::query(&format!(
        "SELECT {VIEW_COLUMNS} FROM clusters c JOIN users u ON u.id = c.owner_id
         LEFT JOIN groups g ON g.id = c.group_id
         WHERE {} AND ($4::text IS NULL OR c.state = $4) AND ($5::uuid IS NULL OR c.id < $5)
         ORDER BY c.id DESC LIMIT $6",
        visible(1, 2, 3)
    ))
    .bind(caller.user_id)
    .bind(caller.group_id)
    .bind(caller.is_operator)
    .bind(&q.state)
    .bind(q.after)
    .bind(limit)
    .fetch_all(&app.pool)
    .await?;
    let items: Vec<ClusterView> = rows.iter().map(view).collect::<Result<_, _>>()?;
    let next = (items.len() as i64 == limit).then(|| {
        let last = items.last().map(|c| c.id).unwrap_or_default();
        match &q.state {
            Some(s) => format!("/v1/clusters?state={s}&limit={limit}&after={last}"),
            None => format!("/v1/clusters?limit={limit}&after={last}"),
        }
    });
    Ok((items, next))
}

// ---- /v1 handlers ----

/// The key is checked by admission with the rest of its batch; a request
/// refused before that (bad body, bad header) checks it first, so a wrong
/// key is still answered 401 whatever else is wrong.
pub async fn create_handler(
    State(state): State<AppState>,
    key: Credentials,
    headers: HeaderMap,
    body: Result<Body<CreateCluster>, ApiError>,
) -> ApiResult<Response> {
    let checked = body.and_then(|Body(req)| {
        let idem_key = idempotency_key(&headers)?;
        let spec = validate(&req, state.0.config.max_cluster_size)?;
        Ok((req, idem_key, spec))
    });
    let (req, idem_key, spec) = match checked {
        Ok(checked) => checked,
        Err(refused) => {
            key.verify(&state).await?;
            return Err(refused);
        }
    };
    let idem = Idempotency::new(
        idem_key,
        "POST /v1/clusters",
        &serde_json::to_value(&req).unwrap_or_default(),
    );
    let s = create(&state.0, Requester::Presented(key), spec, idem.as_ref()).await?;
    Ok(submit::accepted(&s))
}

pub async fn list_handler(
    State(state): State<AppState>,
    caller: Caller,
    Query(q): Query<ListQuery>,
) -> ApiResult<Json<Value>> {
    let (items, next) = list(&state.0, &caller, &q).await?;
    Ok(Json(json!({ "items": items, "next": next })))
}

pub async fn show_handler(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<ClusterView>> {
    let id = parse_id(&id, "cluster")?;
    Ok(Json(show(&state.0, &caller, id).await?))
}

/// The query of the task-creating routes without a body (`DELETE`s): where
/// to call back when the task ends, as `callback_url` does in bodies.
#[derive(Debug, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct CallbackQuery {
    #[serde(default)]
    pub callback_url: Option<String>,
}

pub async fn terminate_handler(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<CallbackQuery>,
) -> ApiResult<Response> {
    let id = parse_id(&id, "cluster")?;
    let callback = validate_callback(q.callback_url.as_deref())?;
    let idem = Idempotency::new(
        idempotency_key(&headers)?,
        &format!("DELETE /v1/clusters/{id}"),
        &serde_json::to_value(&q).unwrap_or_default(),
    );
    let s = terminate(&state.0, &caller, id, callback, idem.as_ref()).await?;
    Ok(submit::accepted(&s))
}

/// `POST /v1/clusters/{id}/users` body.
#[derive(Debug, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct AddUser {
    pub username: String,
    /// Called (signed, retried) when the task ends.
    #[serde(default)]
    pub callback_url: Option<String>,
}

pub async fn add_user_handler(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    Path(id): Path<String>,
    Body(req): Body<AddUser>,
) -> ApiResult<Response> {
    let id = parse_id(&id, "cluster")?;
    let idem = Idempotency::new(
        idempotency_key(&headers)?,
        &format!("POST /v1/clusters/{id}/users"),
        &serde_json::to_value(&req).unwrap_or_default(),
    );
    let callback = validate_callback(req.callback_url.as_deref())?;
    let s = add_user(
        &state.0,
        &caller,
        id,
        &req.username,
        callback,
        idem.as_ref(),
    )
    .await?;
    Ok(submit::accepted(&s))
}

pub async fn remove_user_handler(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    Path((id, username)): Path<(String, String)>,
    Query(q): Query<CallbackQuery>,
) -> ApiResult<Response> {
    let id = parse_id(&id, "cluster")?;
    let callback = validate_callback(q.callback_url.as_deref())?;
    let idem = Idempotency::new(
        idempotency_key(&headers)?,
        &format!("DELETE /v1/clusters/{id}/users/{username}"),
        &serde_json::to_value(&q).unwrap_or_default(),
    );
    let s = remove_user(&state.0, &caller, id, &username, callback, idem.as_ref()).await?;
    Ok(submit::accepted(&s))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req() -> CreateCluster {
        CreateCluster {
            name: "etl-1".into(),
            size: 3,
            services: vec!["hive".into()],
            shared: false,
            ttl_seconds: None,
            callback_url: None,
        }
    }

    #[test]
    fn a_good_request_resolves_its_services() {
        let spec = validate(&req(), 100).unwrap();
        assert!(spec.services.contains(&"HCATALOG"));
    }

    #[test]
    fn each_bad_field_is_named() {
        type Mutate = Box<dyn Fn(&mut CreateCluster)>;
        let cases: Vec<(Mutate, &str)> = vec![
            (Box::new(|r| r.size = 0), "size"),
            (Box::new(|r| r.size = -2), "size"),
            (Box::new(|r| r.size = 101), "size"),
            (Box::new(|r| r.name = "x".repeat(65)), "name"),
            (Box::new(|r| r.name = String::new()), "name"),
            (Box::new(|r| r.name = "-bad name".into()), "name"),
            (
                Box::new(|r| r.services = vec!["PIG".into(), "SPARK".into()]),
                "services[1]",
            ),
            (Box::new(|r| r.ttl_seconds = Some(5)), "ttl_seconds"),
            (
                Box::new(|r| r.callback_url = Some("ftp://x".into())),
                "callback_url",
            ),
            (
                Box::new(|r| r.callback_url = Some("not a url".into())),
                "callback_url",
            ),
        ];
        for (mutate, field) in cases {
            let mut r = req();
            mutate(&mut r);
            let e = validate(&r, 100).unwrap_err();
            assert_eq!(e.field.as_deref(), Some(field), "{}", e.detail);
            assert_eq!(e.status.as_u16(), 422);
        }
    }
}
