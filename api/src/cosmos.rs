//! `/cosmos/v1`: the original platform's API, for its users' existing tools.
//!
//! Authentication is `Authorization: Basic base64(apiKey:apiSecret)`, where
//! `apiKey` is an Orrery key's public id and `apiSecret` its secret (both
//! shown when the key is created). Bodies and status codes are the original
//! ones (`201` + `Location` for a new cluster, `200` for terminate and user
//! changes, errors as `{"message": ...}`); every call goes through the same
//! functions as `/v1` ([`crate::clusters`], [`crate::accounts`]), so quotas,
//! visibility and durable runs are identical.

use axum::{
    extract::{FromRequestParts, Path, State},
    http::{header, request::Parts, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use serde::Deserialize;
use serde_json::{json, Value};
use sqlx::Row;

use crate::{
    accounts,
    admission::Requester,
    app::AppState,
    auth::{authenticate, parse_basic, Caller},
    clusters::{self, ClusterView, CreateCluster},
    error::ApiError,
    extract::{parse_id, parse_json},
    quotas, services,
};

/// An error in the original shape: `{"message": "..."}`.
pub struct CosmosError(pub ApiError);

impl From<ApiError> for CosmosError {
    fn from(e: ApiError) -> Self {
        CosmosError(e)
    }
}

impl From<sqlx::Error> for CosmosError {
    fn from(e: sqlx::Error) -> Self {
        CosmosError(e.into())
    }
}

impl IntoResponse for CosmosError {
    fn into_response(self) -> Response {
        let e = self.0;
        if let Some(err) = &e.internal {
            tracing::error!(error = format!("{err:#}"), "cosmos request failed");
        }
        let mut res = (e.status, Json(json!({ "message": e.detail }))).into_response();
        e.decorate(&mut res);
        if e.status == StatusCode::UNAUTHORIZED {
            res.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"cosmos\""),
            );
        }
        res
    }
}

type CResult<T> = Result<T, CosmosError>;

/// A caller authenticated with Basic `apiKey:apiSecret`.
pub struct CosmosCaller(pub Caller);

impl FromRequestParts<AppState> for CosmosCaller {
    type Rejection = CosmosError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> CResult<Self> {
        let value = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| {
                ApiError::unauthorized("Missing Authorization header: use Basic apiKey:apiSecret")
            })?;
        let (key, secret) = parse_basic(value).ok_or_else(|| {
            ApiError::unauthorized("Malformed Authorization header: use Basic apiKey:apiSecret")
        })?;
        Ok(CosmosCaller(authenticate(state, &key, &secret).await?))
    }
}

fn href(id: uuid::Uuid) -> String {
    format!("/cosmos/v1/cluster/{id}")
}

fn describe(c: &ClusterView) -> String {
    match c.state.as_str() {
        "provisioning" => "Cluster is acquiring and configuring resources".into(),
        "running" => "Cluster is ready".into(),
        "terminating" => "Releasing cluster resources".into(),
        "terminated" => "No more resources used by this cluster".into(),
        _ => format!(
            "Cluster is in an error state: {}",
            c.state_reason.as_deref().unwrap_or("unknown reason")
        ),
    }
}

fn summary(c: &ClusterView) -> Value {
    json!({
        "id": c.id,
        "href": href(c.id),
        "name": c.name,
        "state": c.state,
        "stateDescription": describe(c),
        "creationDate": c.created_at,
    })
}

pub async fn list(
    State(state): State<AppState>,
    CosmosCaller(caller): CosmosCaller,
) -> CResult<Json<Value>> {
    // The original API answered every cluster in one list; so do we, a
    // page of /v1's at a time.
    let mut q = clusters::ListQuery {
        limit: Some(200),
        ..Default::default()
    };
    let mut items = Vec::new();
    loop {
        let (page, next) = clusters::list(&state.0, &caller, &q).await?;
        q.after = page.last().map(|c| c.id);
        items.extend(page);
        if next.is_none() {
            break;
        }
    }
    Ok(Json(
        json!({ "clusters": items.iter().map(summary).collect::<Vec<_>>() }),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct CosmosCreate {
    name: String,
    size: i64,
    #[serde(default)]
    optional_services: Vec<String>,
    #[serde(default)]
    shared: bool,
}

pub async fn create(
    State(state): State<AppState>,
    CosmosCaller(caller): CosmosCaller,
    body: axum::body::Bytes,
) -> CResult<Response> {
    let req: CosmosCreate = parse_json(&body)?;
    let req = CreateCluster {
        name: req.name,
        size: req.size,
        services: req.optional_services,
        shared: req.shared,
        ttl_seconds: None,
        callback_url: None,
    };
    let spec = clusters::validate(&req, state.0.config.max_cluster_size).map_err(|mut e| {
        if let Some(f) = &e.field {
            if let Some(rest) = f.strip_prefix("services") {
                e.field = Some(format!("optionalServices{rest}"));
                e.detail = e.detail.replace("services", "optionalServices");
            }
        }
        e
    })?;
    let s = clusters::create(&state.0, Requester::Known(caller.clone()), spec, None).await?;
    let id = s.cluster_id.expect("create has a cluster");
    let view = clusters::show(&state.0, &caller, id).await?;
    let mut res = (
        StatusCode::CREATED,
        Json(json!({
            "id": id,
            "href": href(id),
            "name": view.name,
            "state": view.state,
            "stateDescription": describe(&view),
        })),
    )
        .into_response();
    if let Ok(v) = HeaderValue::from_str(&href(id)) {
        res.headers_mut().insert(header::LOCATION, v);
    }
    Ok(res)
}

pub async fn show(
    State(state): State<AppState>,
    CosmosCaller(caller): CosmosCaller,
    Path(id): Path<String>,
) -> CResult<Json<Value>> {
    let id = parse_id(&id, "cluster")?;
    let c = clusters::show(&state.0, &caller, id).await?;
    let nodes = c.nodes.clone().unwrap_or_default();
    let node = |n: &clusters::Node| json!({ "hostname": n.hostname, "ipAddress": n.address });
    let mut body = summary(&c);
    body["size"] = json!(c.size);
    body["shared"] = json!(c.shared);
    body["services"] = json!(c.services);
    body["master"] = nodes.first().map(node).unwrap_or(Value::Null);
    body["slaves"] = json!(nodes.iter().skip(1).map(node).collect::<Vec<_>>());
    body["users"] = json!(c
        .users
        .unwrap_or_default()
        .iter()
        .map(|u| json!({ "username": u.username, "sshPublicKey": u.public_key, "isSudoer": u.is_sudoer }))
        .collect::<Vec<_>>());
    Ok(Json(body))
}

pub async fn terminate(
    State(state): State<AppState>,
    CosmosCaller(caller): CosmosCaller,
    Path(id): Path<String>,
) -> CResult<Json<Value>> {
    let id = parse_id(&id, "cluster")?;
    clusters::terminate(&state.0, &caller, id, None, None).await?;
    Ok(Json(
        json!({ "message": format!("Terminating cluster {id}") }),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UserBody {
    user: String,
}

pub async fn add_user(
    State(state): State<AppState>,
    CosmosCaller(caller): CosmosCaller,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> CResult<Json<Value>> {
    let id = parse_id(&id, "cluster")?;
    let req: UserBody = parse_json(&body)?;
    clusters::add_user(&state.0, &caller, id, &req.user, None, None)
        .await
        .map_err(|mut e| {
            if e.field.as_deref() == Some("username") {
                e.field = Some("user".into());
            }
            e
        })?;
    Ok(Json(
        json!({ "message": format!("Adding user {} to cluster {id}", req.user) }),
    ))
}

pub async fn remove_user(
    State(state): State<AppState>,
    CosmosCaller(caller): CosmosCaller,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> CResult<Json<Value>> {
    let id = parse_id(&id, "cluster")?;
    let req: UserBody = parse_json(&body)?;
    clusters::remove_user(&state.0, &caller, id, &req.user, None, None).await?;
    Ok(Json(
        json!({ "message": format!("Removing user {} from cluster {id}", req.user) }),
    ))
}

pub async fn list_services(CosmosCaller(_): CosmosCaller) -> Json<Value> {
    Json(json!(services::selectable()
        .map(|s| s.name)
        .collect::<Vec<_>>()))
}

async fn profile_body(state: &AppState, caller: &Caller) -> CResult<Value> {
    let email: Option<String> = sqlx::query_scalar("SELECT email FROM users WHERE id = $1")
        .bind(caller.user_id)
        .fetch_one(&state.0.pool)
        .await?;
    let keys = accounts::ssh_keys(&state.0.pool, caller.user_id).await?;
    Ok(json!({
        "id": caller.user_id,
        "handle": caller.name,
        "email": email,
        "keys": keys.iter().map(|k| json!({ "name": k["name"], "signature": k["public_key"] })).collect::<Vec<_>>(),
    }))
}

pub async fn get_profile(
    State(state): State<AppState>,
    CosmosCaller(caller): CosmosCaller,
) -> CResult<Json<Value>> {
    Ok(Json(profile_body(&state, &caller).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProfileKey {
    #[serde(default)]
    name: String,
    signature: String,
}

#[derive(Deserialize)]
struct ProfileUpdate {
    #[serde(default)]
    keys: Vec<ProfileKey>,
}

/// Replace the caller's SSH keys with the ones given (the original's only
/// editable part of a profile). All keys are validated before any is written.
pub async fn put_profile(
    State(state): State<AppState>,
    CosmosCaller(caller): CosmosCaller,
    body: axum::body::Bytes,
) -> CResult<Json<Value>> {
    let req: ProfileUpdate = parse_json(&body)?;
    for (i, k) in req.keys.iter().enumerate() {
        crate::sshkeys::parse(&k.signature).map_err(|m| {
            ApiError::invalid(
                format!("keys[{i}].signature"),
                format!("keys[{i}].signature: {m}"),
            )
        })?;
    }
    let mut tx = state.0.pool.begin().await?;
    sqlx::query("DELETE FROM ssh_keys WHERE user_id = $1")
        .bind(caller.user_id)
        .execute(&mut *tx)
        .await?;
    for k in &req.keys {
        let parsed =
            crate::sshkeys::parse(&k.signature).map_err(|m| ApiError::invalid("keys", m))?;
        sqlx::query(
            "INSERT INTO ssh_keys (id, user_id, name, public_key, fingerprint) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (user_id, fingerprint) DO NOTHING",
        )
        .bind(uuid::Uuid::now_v7())
        .bind(caller.user_id)
        .bind(&k.name)
        .bind(&parsed.line)
        .bind(&parsed.fingerprint)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(Json(profile_body(&state, &caller).await?))
}

pub async fn info(
    State(state): State<AppState>,
    CosmosCaller(caller): CosmosCaller,
) -> CResult<Json<Value>> {
    let app = &state.0;
    let mut conn = app.pool.acquire().await?;
    let s = quotas::load(&mut conn, &app.config, caller.user_id).await?;
    let (can_request, _) = s.headroom();
    let rows = sqlx::query(
        "SELECT id, owner_id = $1 AS owned FROM clusters c
         WHERE c.state IN ('provisioning', 'running', 'terminating')
           AND (c.owner_id = $1 OR (c.shared AND c.group_id = $2))
         ORDER BY c.id",
    )
    .bind(caller.user_id)
    .bind(caller.group_id)
    .fetch_all(&mut *conn)
    .await?;
    let (mut owned, mut accessible) = (Vec::new(), Vec::new());
    for r in &rows {
        let id: uuid::Uuid = r.try_get("id")?;
        if r.try_get::<bool, _>("owned")? {
            owned.push(id);
        }
        accessible.push(id);
    }
    Ok(Json(json!({
        "profileId": caller.user_id,
        "handle": caller.name,
        "individualQuota": s.user_limit,
        "group": { "name": s.group.as_ref().map(|g| g.name.clone()), "guaranteedQuota": s.group.as_ref().and_then(|g| g.limit) },
        "clusters": { "owned": owned, "accessible": accessible },
        "resources": {
            "groupConsumption": s.group.as_ref().map(|g| g.usage).unwrap_or(0),
            "individualConsumption": s.user_usage,
            "available": (s.available - s.reserved_for_others).max(0),
            "availableForUser": can_request,
        },
    })))
}
