//! The emulated REST API: routes, the auth/CSRF/fault layers, and the
//! translation between JSON and the [`World`](super::state::World).

use std::collections::HashMap;

use axum::{
    body::Bytes,
    extract::{Path, Query, Request, State},
    http::{header, HeaderMap, Method, StatusCode},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{delete, get},
    Json, Router,
};
use base64::Engine as _;
use serde_json::{json, Value};
use tokio::time::Instant;

use super::{
    faults::Injected,
    state::{not_found, ServicesChange, Timing},
    Faults, RequestKind, Sim, SimError,
};
use crate::ambari::blueprint::ClusterTemplate;

type Answer = Result<Response, SimError>;

pub(super) fn router(sim: Sim) -> Router {
    let api = Router::new()
        .route("/hosts", get(list_hosts))
        .route("/hosts/{host}", get(get_host).delete(delete_host))
        .route("/blueprints", get(list_blueprints))
        .route(
            "/blueprints/{bp}",
            get(get_blueprint)
                .post(post_blueprint)
                .delete(delete_blueprint),
        )
        .route("/clusters", get(list_clusters))
        .route(
            "/clusters/{c}",
            get(get_cluster).post(post_cluster).delete(delete_cluster),
        )
        .route("/clusters/{c}/requests", get(list_requests))
        .route(
            "/clusters/{c}/requests/{id}",
            get(get_request).put(put_request),
        )
        .route(
            "/clusters/{c}/services",
            get(list_services).put(put_services),
        )
        .route(
            "/clusters/{c}/privileges",
            get(list_privileges).post(post_privileges),
        )
        .route("/clusters/{c}/privileges/{id}", delete(delete_privilege))
        .route("/users", get(list_users).post(post_users))
        .route("/users/{u}", get(get_user).delete(delete_user))
        .fallback(|req: Request| async move {
            not_found(format!("{} {}", req.method(), req.uri().path()))
        })
        .layer(middleware::from_fn(csrf))
        .layer(middleware::from_fn_with_state(sim.clone(), basic_auth))
        .layer(middleware::from_fn_with_state(sim.clone(), chaos));
    Router::new()
        .nest("/api/v1", api)
        .route("/_sim/faults", get(get_faults).post(post_faults))
        .route("/_sim/health", get(|| async { "ok" }))
        .with_state(sim)
}

// ----------------------------------------------------------------- layers

/// Latency and injected `500`s (outermost, like a flaky server or proxy).
async fn chaos(State(sim): State<Sim>, req: Request, next: Next) -> Response {
    let latency = sim.latency();
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let mutating = req.method() != Method::GET && req.method() != Method::HEAD;
    let injected = sim.roll(mutating);
    if injected == Some(Injected::Before) {
        return injected_500();
    }
    let resp = next.run(req).await;
    if injected == Some(Injected::After) {
        return injected_500();
    }
    resp
}

fn injected_500() -> Response {
    SimError::new(500, "Server Error (injected by the Ambari emulator)").into_response()
}

async fn basic_auth(State(sim): State<Sim>, req: Request, next: Next) -> Response {
    let cfg = sim.config();
    let ok = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| {
            base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .ok()
        })
        .and_then(|raw| String::from_utf8(raw).ok())
        .is_some_and(|pair| pair == format!("{}:{}", cfg.user, cfg.password));
    if !ok {
        let mut resp = SimError::new(401, "Authentication required").into_response();
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Basic realm=\"AuthFilter\""),
        );
        return resp;
    }
    next.run(req).await
}

/// Ambari's CSRF filter: state-changing calls need `X-Requested-By`.
async fn csrf(req: Request, next: Next) -> Response {
    let mutating = matches!(*req.method(), Method::POST | Method::PUT | Method::DELETE);
    if mutating && !req.headers().contains_key("x-requested-by") {
        return SimError::new(
            400,
            "CSRF protection is turned on. X-Requested-By HTTP header is required.",
        )
        .into_response();
    }
    next.run(req).await
}

// ---------------------------------------------------------------- helpers

/// `http://<Host header>/api/v1`, for `href`s.
fn base(headers: &HeaderMap) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("localhost:8080");
    format!("http://{host}/api/v1")
}

fn body_json(bytes: &Bytes) -> Result<Value, SimError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Null);
    }
    serde_json::from_slice(bytes).map_err(|e| {
        SimError::new(
            400,
            format!(
                "Invalid Request: Malformed Request Body. An exception occurred parsing the \
                 request body: {e}"
            ),
        )
    })
}

fn ok(body: Value) -> Answer {
    Ok((StatusCode::OK, Json(body)).into_response())
}

fn empty(status: StatusCode) -> Answer {
    Ok(status.into_response())
}

fn accepted(base: &str, cluster: &str, id: u64) -> Answer {
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({
            "href": format!("{base}/clusters/{cluster}/requests/{id}"),
            "Requests": {"id": id, "status": "Accepted"},
        })),
    )
        .into_response())
}

fn collection(href: String, items: Vec<Value>) -> Answer {
    ok(json!({"href": href, "items": items}))
}

// ------------------------------------------------------------------ hosts

async fn list_hosts(State(sim): State<Sim>, headers: HeaderMap) -> Answer {
    let base = base(&headers);
    let now = Instant::now();
    let timeout = sim.config().heartbeat_timeout;
    let w = sim.world();
    let items = w
        .hosts
        .values()
        .map(|h| w.host_json(h, now, timeout, &base))
        .collect();
    collection(format!("{base}/hosts"), items)
}

async fn get_host(State(sim): State<Sim>, headers: HeaderMap, Path(host): Path<String>) -> Answer {
    let now = Instant::now();
    let w = sim.world();
    let h = w
        .hosts
        .get(&host.to_ascii_lowercase())
        .ok_or_else(|| not_found(format!("Host {host}")))?;
    ok(w.host_json(h, now, sim.config().heartbeat_timeout, &base(&headers)))
}

async fn delete_host(State(sim): State<Sim>, Path(host): Path<String>) -> Answer {
    sim.world().delete_host(&host.to_ascii_lowercase())?;
    empty(StatusCode::OK)
}

// ------------------------------------------------------------- blueprints

async fn list_blueprints(State(sim): State<Sim>, headers: HeaderMap) -> Answer {
    let base = base(&headers);
    let items = sim
        .world()
        .blueprints
        .keys()
        .map(|n| {
            json!({"href": format!("{base}/blueprints/{n}"), "Blueprints": {"blueprint_name": n}})
        })
        .collect();
    collection(format!("{base}/blueprints"), items)
}

async fn get_blueprint(
    State(sim): State<Sim>,
    headers: HeaderMap,
    Path(bp): Path<String>,
) -> Answer {
    let w = sim.world();
    let found = w
        .blueprints
        .get(&bp)
        .ok_or_else(|| not_found(format!("Blueprint {bp}")))?;
    let mut body = serde_json::to_value(found).unwrap_or(Value::Null);
    body["href"] = json!(format!("{}/blueprints/{bp}", base(&headers)));
    ok(body)
}

async fn post_blueprint(State(sim): State<Sim>, Path(bp): Path<String>, body: Bytes) -> Answer {
    let body = body_json(&body)?;
    sim.world().add_blueprint(&bp, body)?;
    empty(StatusCode::CREATED)
}

async fn delete_blueprint(State(sim): State<Sim>, Path(bp): Path<String>) -> Answer {
    let mut w = sim.world();
    if w.clusters.values().any(|c| c.blueprint == bp) {
        return Err(SimError::new(
            400,
            format!("Blueprint {bp} is in use by a cluster"),
        ));
    }
    w.blueprints
        .remove(&bp)
        .ok_or_else(|| not_found(format!("Blueprint {bp}")))?;
    empty(StatusCode::OK)
}

// --------------------------------------------------------------- clusters

async fn list_clusters(State(sim): State<Sim>, headers: HeaderMap) -> Answer {
    let base = base(&headers);
    let w = sim.world();
    let items = w
        .clusters
        .iter()
        .map(|(n, c)| {
            json!({"href": format!("{base}/clusters/{n}"),
                   "Clusters": {"cluster_name": n, "version": c.stack}})
        })
        .collect();
    collection(format!("{base}/clusters"), items)
}

async fn get_cluster(State(sim): State<Sim>, headers: HeaderMap, Path(c): Path<String>) -> Answer {
    let w = sim.world();
    let rec = w.cluster(&c)?;
    ok(json!({
        "href": format!("{}/clusters/{c}", base(&headers)),
        "Clusters": {
            "cluster_name": c,
            "version": rec.stack,
            "total_hosts": rec.hosts.len(),
        },
        "hosts": rec.hosts.keys().map(|h| json!({"Hosts": {"cluster_name": c, "host_name": h}})).collect::<Vec<_>>(),
    }))
}

async fn post_cluster(
    State(sim): State<Sim>,
    headers: HeaderMap,
    Path(c): Path<String>,
    body: Bytes,
) -> Answer {
    let body = body_json(&body)?;
    if body.get("blueprint").is_none() {
        return Err(SimError::new(
            400,
            "Invalid Request: the emulator only supports blueprint-based cluster creation \
             ({\"blueprint\": ..., \"host_groups\": [...]})",
        ));
    }
    let template: ClusterTemplate = serde_json::from_value(body).map_err(|e| {
        SimError::new(
            400,
            format!("Invalid Request: Malformed cluster template: {e}"),
        )
    })?;
    let budget = sim.config().request_duration;
    let now = Instant::now();
    let mut w = sim.world();
    let at = Timing { now, budget };
    // Only a creation that passes validation consumes an injected failure.
    let id = w.create_cluster(&c, template, at, || {
        sim.take_failure(RequestKind::ClusterCreate)
    })?;
    accepted(&base(&headers), &c, id)
}

async fn delete_cluster(State(sim): State<Sim>, Path(c): Path<String>) -> Answer {
    let mut w = sim.world();
    w.settle(Instant::now(), sim.config().heartbeat_timeout);
    w.delete_cluster(&c)?;
    empty(StatusCode::OK)
}

// --------------------------------------------------------------- requests

async fn list_requests(
    State(sim): State<Sim>,
    headers: HeaderMap,
    Path(c): Path<String>,
) -> Answer {
    let base = base(&headers);
    let mut w = sim.world();
    w.settle(Instant::now(), sim.config().heartbeat_timeout);
    w.cluster(&c)?;
    let items = w
        .requests
        .values()
        .filter(|r| r.cluster == c)
        .map(|r| {
            json!({
                "href": format!("{base}/clusters/{c}/requests/{}", r.id),
                "Requests": {
                    "cluster_name": c,
                    "id": r.id,
                    "request_context": r.context,
                    "request_status": r.status.as_str(),
                },
            })
        })
        .collect();
    collection(format!("{base}/clusters/{c}/requests"), items)
}

async fn get_request(
    State(sim): State<Sim>,
    headers: HeaderMap,
    Path((c, id)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Answer {
    let id = parse_id(&id, "Request")?;
    let now = Instant::now();
    let mut w = sim.world();
    w.settle(now, sim.config().heartbeat_timeout);
    let req = w.request(&c, id)?;
    let tasks_full = q.get("fields").is_some_and(|f| f.contains("tasks/"));
    ok(w.request_json(req, now, &base(&headers), tasks_full))
}

async fn put_request(
    State(sim): State<Sim>,
    Path((c, id)): Path<(String, String)>,
    body: Bytes,
) -> Answer {
    let id = parse_id(&id, "Request")?;
    let body = body_json(&body)?;
    let r = &body["Requests"];
    if r["request_status"] != "ABORTED" {
        return Err(SimError::new(
            400,
            "Invalid Request: only {\"Requests\":{\"request_status\":\"ABORTED\"}} is supported",
        ));
    }
    let reason = r["abort_reason"].as_str().unwrap_or("").to_owned();
    let now = Instant::now();
    let mut w = sim.world();
    w.settle(now, sim.config().heartbeat_timeout);
    w.abort(&c, id, reason, now)?;
    empty(StatusCode::OK)
}

fn parse_id(id: &str, what: &str) -> Result<u64, SimError> {
    id.parse().map_err(|_| not_found(format!("{what} {id}")))
}

// --------------------------------------------------------------- services

async fn list_services(
    State(sim): State<Sim>,
    headers: HeaderMap,
    Path(c): Path<String>,
) -> Answer {
    let base = base(&headers);
    let mut w = sim.world();
    w.settle(Instant::now(), sim.config().heartbeat_timeout);
    let rec = w.cluster(&c)?;
    let items = rec
        .services
        .iter()
        .map(|(n, s)| {
            json!({"href": format!("{base}/clusters/{c}/services/{n}"),
                   "ServiceInfo": {"cluster_name": c, "service_name": n, "state": s.state}})
        })
        .collect();
    collection(format!("{base}/clusters/{c}/services"), items)
}

async fn put_services(
    State(sim): State<Sim>,
    headers: HeaderMap,
    Path(c): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    body: Bytes,
) -> Answer {
    let body = body_json(&body)?;
    let info = if body.get("Body").is_some() {
        &body["Body"]["ServiceInfo"]
    } else {
        &body["ServiceInfo"]
    };
    let target = info["state"]
        .as_str()
        .ok_or_else(|| SimError::new(400, "Invalid Request: ServiceInfo/state is required"))?;
    let context = body["RequestInfo"]["context"]
        .as_str()
        .unwrap_or("Update services")
        .to_owned();
    let only = q.get("ServiceInfo/state").map(String::as_str);
    let now = Instant::now();
    let mut w = sim.world();
    w.settle(now, sim.config().heartbeat_timeout);
    let budget = sim.config().request_duration;
    let change = ServicesChange {
        target,
        context: &context,
        only_in_state: only,
    };
    let at = Timing { now, budget };
    match w.set_services_state(&c, &change, at, || {
        sim.take_failure(RequestKind::ServiceState)
    })? {
        Some(id) => accepted(&base(&headers), &c, id),
        None => empty(StatusCode::OK),
    }
}

// ---------------------------------------------------- privileges and users

async fn list_privileges(
    State(sim): State<Sim>,
    headers: HeaderMap,
    Path(c): Path<String>,
) -> Answer {
    let base = base(&headers);
    let w = sim.world();
    let rec = w.cluster(&c)?;
    let items = rec
        .privileges
        .iter()
        .map(|p| {
            json!({"href": format!("{base}/clusters/{c}/privileges/{}", p.id),
            "PrivilegeInfo": {
                "privilege_id": p.id,
                "cluster_name": c,
                "permission_name": p.permission,
                "principal_name": p.principal_name,
                "principal_type": p.principal_type,
            }})
        })
        .collect();
    collection(format!("{base}/clusters/{c}/privileges"), items)
}

async fn post_privileges(State(sim): State<Sim>, Path(c): Path<String>, body: Bytes) -> Answer {
    let body = body_json(&body)?;
    let list = match body {
        Value::Array(a) => a,
        other => vec![other],
    };
    let mut w = sim.world();
    for p in &list {
        let p = &p["PrivilegeInfo"];
        let field = |name: &str| {
            p[name].as_str().ok_or_else(|| {
                SimError::new(
                    400,
                    format!("Invalid Request: PrivilegeInfo/{name} is required"),
                )
            })
        };
        w.grant(
            &c,
            field("permission_name")?,
            field("principal_name")?,
            field("principal_type")?,
        )?;
    }
    empty(StatusCode::CREATED)
}

async fn delete_privilege(State(sim): State<Sim>, Path((c, id)): Path<(String, String)>) -> Answer {
    let id = parse_id(&id, "Privilege")?;
    sim.world().revoke(&c, id)?;
    empty(StatusCode::OK)
}

async fn list_users(State(sim): State<Sim>, headers: HeaderMap) -> Answer {
    let base = base(&headers);
    let items = sim
        .world()
        .users
        .keys()
        .map(|u| json!({"href": format!("{base}/users/{u}"), "Users": {"user_name": u}}))
        .collect();
    collection(format!("{base}/users"), items)
}

async fn get_user(State(sim): State<Sim>, headers: HeaderMap, Path(u): Path<String>) -> Answer {
    let w = sim.world();
    let rec = w
        .users
        .get(&u)
        .ok_or_else(|| not_found(format!("User {u}")))?;
    ok(json!({
        "href": format!("{}/users/{u}", base(&headers)),
        "Users": {"user_name": u, "admin": rec.admin, "active": rec.active},
    }))
}

/// Accepts Ambari's flat form (`{"Users/user_name": ...}`), the nested one
/// (`{"Users": {"user_name": ...}}`) and arrays of either.
async fn post_users(State(sim): State<Sim>, body: Bytes) -> Answer {
    let body = body_json(&body)?;
    let list = match body {
        Value::Array(a) => a,
        other => vec![other],
    };
    let mut w = sim.world();
    for u in &list {
        let get = |k: &str| {
            let flat = &u[format!("Users/{k}").as_str()];
            if flat.is_null() {
                u["Users"][k].clone()
            } else {
                flat.clone()
            }
        };
        let name = get("user_name");
        let name = name.as_str().unwrap_or_default();
        if get("password").as_str().unwrap_or_default().is_empty() {
            return Err(SimError::new(
                400,
                "Invalid Request: Users/password is required",
            ));
        }
        let admin = get("admin").as_bool().unwrap_or(false);
        let active = get("active").as_bool().unwrap_or(true);
        w.create_user(name, admin, active)?;
    }
    empty(StatusCode::CREATED)
}

async fn delete_user(State(sim): State<Sim>, Path(u): Path<String>) -> Answer {
    sim.world().delete_user(&u)?;
    empty(StatusCode::OK)
}

// ------------------------------------------------------------- fault admin

async fn get_faults(State(sim): State<Sim>) -> Json<Faults> {
    Json(sim.faults())
}

async fn post_faults(State(sim): State<Sim>, body: Bytes) -> Answer {
    let faults: Faults = if body.iter().all(u8::is_ascii_whitespace) {
        Faults::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| SimError::new(400, format!("invalid faults: {e}")))?
    };
    sim.set_faults(faults)
        .map_err(|e| SimError::new(400, format!("invalid faults: {e}")))?;
    ok(serde_json::to_value(sim.faults()).unwrap_or(Value::Null))
}
