//! [`AmbariClient`]: the calls a provisioning workflow makes to Ambari's REST
//! API v1, each one short (a per-request timeout) and non-blocking: waiting
//! for hosts or requests is the workflow's job (poll, then `WaitFor`).
//!
//! Every create is safe to repeat: it looks before it posts where that is
//! cheap, and treats `409 Conflict` as "already there" where that is safe, so
//! a step retried after a lost answer converges instead of failing.

use std::{collections::BTreeSet, fmt, time::Duration};

use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

use super::{
    blueprint::{Blueprint, ClusterTemplate},
    error::AmbariError,
    model::{
        Created, HostInfo, HostStatus, HostsReport, NewUser, RequestId, RequestState,
        RequestStatus, ServiceState,
    },
};
use crate::config::{var, ConfigError};

/// The request context Ambari gives the request of a blueprint-based
/// cluster creation; how an existing creation request is recognised.
pub const PROVISION_CONTEXT_PREFIX: &str = "Logical Request: Provision Cluster";

/// Where Ambari is and how to talk to it.
#[derive(Clone)]
pub struct AmbariConfig {
    /// `ORRERY_AMBARI_URL`: the server, e.g. `http://ambari:8080` (the
    /// client appends `/api/v1`; a URL already ending in it is accepted).
    pub url: String,
    /// `ORRERY_AMBARI_USER` (default `admin`).
    pub user: String,
    /// `ORRERY_AMBARI_PASSWORD` (default `admin`).
    pub password: String,
    /// `ORRERY_AMBARI_TIMEOUT_MS` (default 30 000): per HTTP request.
    pub timeout: Duration,
    /// The `X-Requested-By` value sent on every POST/PUT/DELETE.
    pub requested_by: String,
}

impl fmt::Debug for AmbariConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmbariConfig")
            .field("url", &self.url)
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .field("timeout", &self.timeout)
            .field("requested_by", &self.requested_by)
            .finish()
    }
}

impl AmbariConfig {
    pub fn new(url: impl Into<String>) -> Self {
        AmbariConfig {
            url: url.into(),
            user: "admin".into(),
            password: "admin".into(),
            timeout: Duration::from_secs(30),
            requested_by: "orrery".into(),
        }
    }

    pub fn credentials(mut self, user: impl Into<String>, password: impl Into<String>) -> Self {
        self.user = user.into();
        self.password = password.into();
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Read the `ORRERY_AMBARI_*` variables (loopback defaults).
    pub fn from_env() -> Result<Self, ConfigError> {
        let timeout_ms: u64 = var("ORRERY_AMBARI_TIMEOUT_MS", 30_000)?;
        Ok(AmbariConfig::new(var::<String>(
            "ORRERY_AMBARI_URL",
            "http://127.0.0.1:8081".into(),
        )?)
        .credentials(
            var::<String>("ORRERY_AMBARI_USER", "admin".into())?,
            var::<String>("ORRERY_AMBARI_PASSWORD", "admin".into())?,
        )
        .timeout(Duration::from_millis(timeout_ms.max(1))))
    }
}

/// A client of one Ambari server. Cheap to clone (shares the connection pool).
#[derive(Clone, Debug)]
pub struct AmbariClient {
    http: reqwest::Client,
    /// `http://server:8080/api/v1`, no trailing slash.
    api: String,
    config: AmbariConfig,
}

/// An answer with its status and (possibly empty) body.
struct Answer {
    status: StatusCode,
    body: Value,
}

impl AmbariClient {
    pub fn new(config: AmbariConfig) -> Result<Self, AmbariError> {
        let http = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.timeout.min(Duration::from_secs(10)))
            .build()
            .map_err(|e| AmbariError::Invalid(format!("cannot build the HTTP client: {e}")))?;
        let base = config.url.trim_end_matches('/');
        let api = if base.ends_with("/api/v1") {
            base.to_owned()
        } else {
            format!("{base}/api/v1")
        };
        Ok(AmbariClient { http, api, config })
    }

    /// `http://server:8080/api/v1`.
    pub fn api_url(&self) -> &str {
        &self.api
    }

    // ---------------------------------------------------------------- hosts

    /// Every host whose agent registered, with its status.
    pub async fn list_hosts(&self) -> Result<Vec<HostInfo>, AmbariError> {
        let a = self
            .send(
                Method::GET,
                "/hosts?fields=Hosts/host_name,Hosts/host_status,Hosts/last_heartbeat_time",
                None,
            )
            .await?;
        let a = self.expect_ok("list hosts", a)?;
        Ok(items(&a.body)
            .iter()
            .filter_map(|item| host_info(&item["Hosts"]))
            .collect())
    }

    /// One host, `None` if no agent registered under that name.
    pub async fn host(&self, host: &str) -> Result<Option<HostInfo>, AmbariError> {
        let path = format!(
            "/hosts/{}?fields=Hosts/host_name,Hosts/host_status,Hosts/last_heartbeat_time",
            seg(host)
        );
        let a = self.send(Method::GET, &path, None).await?;
        if a.status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let a = self.expect_ok("get host", a)?;
        Ok(host_info(&a.body["Hosts"]))
    }

    /// Which of `expected` are registered and `HEALTHY`, in one call. The
    /// workflow polls this until [`HostsReport::all_healthy`].
    pub async fn hosts_report<S: AsRef<str>>(
        &self,
        expected: &[S],
    ) -> Result<HostsReport, AmbariError> {
        let hosts = self.list_hosts().await?;
        let mut report = HostsReport::default();
        for name in expected {
            let name = name.as_ref();
            match hosts
                .iter()
                .find(|h| h.host_name.eq_ignore_ascii_case(name))
            {
                None => report.missing.push(name.to_owned()),
                Some(h) if h.host_status == Some(HostStatus::Healthy) => {
                    report.healthy.push(name.to_owned())
                }
                Some(h) => report.unhealthy.push((
                    name.to_owned(),
                    h.host_status
                        .map_or_else(|| "UNKNOWN".to_owned(), |s| s.to_string()),
                )),
            }
        }
        Ok(report)
    }

    /// Remove a host from Ambari (after its cluster was deleted); gone already is fine.
    pub async fn delete_host(&self, host: &str) -> Result<(), AmbariError> {
        let a = self
            .send(Method::DELETE, &format!("/hosts/{}", seg(host)), None)
            .await?;
        if a.status == StatusCode::NOT_FOUND {
            return Ok(());
        }
        self.expect_ok("delete host", a).map(drop)
    }

    // ----------------------------------------------------------- blueprints

    /// Register a blueprint. If one of that name exists with the same host
    /// groups and components it is reused; with different ones it is an
    /// error (silently provisioning the other layout would be worse).
    pub async fn register_blueprint(
        &self,
        name: &str,
        blueprint: &Blueprint,
    ) -> Result<Created, AmbariError> {
        let path = format!("/blueprints/{}", seg(name));
        if let Some(existing) = self.get_blueprint(name).await? {
            return self.same_blueprint(name, &existing, blueprint);
        }
        let body = serde_json::to_value(blueprint)
            .map_err(|e| AmbariError::Invalid(format!("blueprint does not serialize: {e}")))?;
        let a = self.send(Method::POST, &path, Some(&body)).await?;
        if a.status == StatusCode::CONFLICT {
            // Created concurrently (or by our own earlier attempt whose
            // answer was lost): check it is ours.
            return match self.get_blueprint(name).await? {
                Some(existing) => self.same_blueprint(name, &existing, blueprint),
                None => Err(self.http_error("register blueprint", a)),
            };
        }
        self.expect_ok("register blueprint", a)?;
        Ok(Created::New)
    }

    /// A registered blueprint, `None` if there is none of that name.
    pub async fn get_blueprint(&self, name: &str) -> Result<Option<Blueprint>, AmbariError> {
        let a = self
            .send(Method::GET, &format!("/blueprints/{}", seg(name)), None)
            .await?;
        if a.status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let a = self.expect_ok("get blueprint", a)?;
        decode("get blueprint", a.body).map(Some)
    }

    fn same_blueprint(
        &self,
        name: &str,
        existing: &Blueprint,
        wanted: &Blueprint,
    ) -> Result<Created, AmbariError> {
        if existing.layout() == wanted.layout() {
            Ok(Created::AlreadyExisted)
        } else {
            Err(AmbariError::Invalid(format!(
                "blueprint `{name}` already exists with other host groups or components"
            )))
        }
    }

    // ------------------------------------------------------------- clusters

    /// Whether a cluster of that name exists.
    pub async fn cluster_exists(&self, cluster: &str) -> Result<bool, AmbariError> {
        let a = self
            .send(Method::GET, &format!("/clusters/{}", seg(cluster)), None)
            .await?;
        if a.status == StatusCode::NOT_FOUND {
            return Ok(false);
        }
        self.expect_ok("get cluster", a).map(|_| true)
    }

    /// Create the cluster from a registered blueprint; the answer is the id
    /// of the request that installs and starts everything. If the cluster
    /// exists already (an earlier attempt whose answer was lost), the id of
    /// its creation request is returned instead, so a retried step follows
    /// the same request.
    pub async fn create_cluster(
        &self,
        cluster: &str,
        template: &ClusterTemplate,
    ) -> Result<RequestId, AmbariError> {
        if self.cluster_exists(cluster).await? {
            return self.creation_request(cluster).await;
        }
        let body = serde_json::to_value(template).map_err(|e| {
            AmbariError::Invalid(format!("cluster template does not serialize: {e}"))
        })?;
        let a = self
            .send(
                Method::POST,
                &format!("/clusters/{}", seg(cluster)),
                Some(&body),
            )
            .await?;
        if a.status == StatusCode::CONFLICT {
            return self.creation_request(cluster).await;
        }
        let a = self.expect_ok("create cluster", a)?;
        accepted_request_id("create cluster", &a.body)?.ok_or_else(|| AmbariError::Protocol {
            op: "create cluster".into(),
            message: "no request in the answer".into(),
        })
    }

    /// The request that created an existing cluster: the oldest request
    /// whose context is Ambari's provisioning one, else the oldest request.
    pub async fn creation_request(&self, cluster: &str) -> Result<RequestId, AmbariError> {
        let requests = self.list_requests(cluster).await?;
        requests
            .iter()
            .filter(|(_, ctx, _)| ctx.starts_with(PROVISION_CONTEXT_PREFIX))
            .map(|(id, _, _)| *id)
            .min()
            .or_else(|| requests.iter().map(|(id, _, _)| *id).min())
            .ok_or_else(|| {
                AmbariError::Invalid(format!(
                    "cluster `{cluster}` exists but has no creation request; it was not created \
                     from a blueprint by us"
                ))
            })
    }

    /// `(id, context, status)` of every request of a cluster.
    pub async fn list_requests(
        &self,
        cluster: &str,
    ) -> Result<Vec<(RequestId, String, Option<RequestStatus>)>, AmbariError> {
        let path = format!(
            "/clusters/{}/requests?fields=Requests/id,Requests/request_context,Requests/request_status",
            seg(cluster)
        );
        let a = self.send(Method::GET, &path, None).await?;
        let a = self.expect_ok("list requests", a)?;
        Ok(items(&a.body)
            .iter()
            .filter_map(|item| {
                let r = &item["Requests"];
                Some((
                    r["id"].as_u64()?,
                    r["request_context"].as_str().unwrap_or_default().to_owned(),
                    r["request_status"].as_str().and_then(RequestStatus::parse),
                ))
            })
            .collect())
    }

    /// Delete a cluster (stop its services first); gone already is fine.
    pub async fn delete_cluster(&self, cluster: &str) -> Result<(), AmbariError> {
        let a = self
            .send(Method::DELETE, &format!("/clusters/{}", seg(cluster)), None)
            .await?;
        if a.status == StatusCode::NOT_FOUND {
            return Ok(());
        }
        self.expect_ok("delete cluster", a).map(drop)
    }

    // ------------------------------------------------------------- requests

    /// Where an asynchronous request stands; on a failure, with a short
    /// reason taken from its failed tasks (a second call).
    pub async fn request_status(
        &self,
        cluster: &str,
        id: RequestId,
    ) -> Result<RequestState, AmbariError> {
        let path = format!(
            "/clusters/{}/requests/{id}?fields=Requests/id,Requests/request_status,\
             Requests/progress_percent,Requests/failed_task_count",
            seg(cluster)
        );
        let a = self.send(Method::GET, &path, None).await?;
        let a = self.expect_ok("get request", a)?;
        let r = &a.body["Requests"];
        let status_text = r["request_status"].as_str().unwrap_or_default();
        let status = RequestStatus::parse(status_text).ok_or_else(|| AmbariError::Protocol {
            op: "get request".into(),
            message: format!("unknown request_status {status_text:?}"),
        })?;
        let mut state = RequestState {
            id,
            status,
            progress_percent: r["progress_percent"].as_f64().unwrap_or(0.0),
            failed_task_count: r["failed_task_count"].as_u64().unwrap_or(0) as u32,
            failure: None,
        };
        if status.is_failure() {
            state.failure = Some(
                self.failure_reason(cluster, id)
                    .await
                    .unwrap_or_else(|e| format!("request {id} {status} (tasks unavailable: {e})")),
            );
        }
        Ok(state)
    }

    async fn failure_reason(&self, cluster: &str, id: RequestId) -> Result<String, AmbariError> {
        let path = format!(
            "/clusters/{}/requests/{id}?fields=Requests/request_status,Requests/abort_reason,\
             tasks/Tasks/status,tasks/Tasks/host_name,tasks/Tasks/role,tasks/Tasks/command,\
             tasks/Tasks/exit_code,tasks/Tasks/stderr",
            seg(cluster)
        );
        let a = self.send(Method::GET, &path, None).await?;
        let a = self.expect_ok("get request tasks", a)?;
        let status = a.body["Requests"]["request_status"]
            .as_str()
            .unwrap_or("FAILED");
        let tasks = a.body["tasks"].as_array().cloned().unwrap_or_default();
        let failed: Vec<String> = tasks
            .iter()
            .map(|t| &t["Tasks"])
            .filter(|t| matches!(t["status"].as_str(), Some("FAILED" | "TIMEDOUT")))
            .map(|t| {
                let line = t["stderr"]
                    .as_str()
                    .unwrap_or_default()
                    .lines()
                    .rev()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or_default()
                    .trim();
                let mut s = format!(
                    "{} {} on {}: {}",
                    t["role"].as_str().unwrap_or("?"),
                    t["command"].as_str().unwrap_or("?"),
                    t["host_name"].as_str().unwrap_or("?"),
                    t["status"].as_str().unwrap_or("?"),
                );
                if let Some(code) = t["exit_code"].as_i64() {
                    s.push_str(&format!(" (exit {code})"));
                }
                if !line.is_empty() {
                    s.push_str(": ");
                    s.push_str(&truncate(line, 200));
                }
                s
            })
            .collect();
        let mut reason = format!("request {id} {status}");
        if let Some(abort) = a.body["Requests"]["abort_reason"].as_str() {
            if !abort.is_empty() {
                reason.push_str(&format!(" ({abort})"));
            }
        }
        if !failed.is_empty() {
            reason.push_str(": ");
            reason.push_str(
                &failed
                    .iter()
                    .take(3)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("; "),
            );
            if failed.len() > 3 {
                reason.push_str(&format!("; and {} more", failed.len() - 3));
            }
        }
        Ok(reason)
    }

    /// Abort a request; one that has finished already is left alone.
    pub async fn abort_request(
        &self,
        cluster: &str,
        id: RequestId,
        reason: &str,
    ) -> Result<(), AmbariError> {
        let path = format!("/clusters/{}/requests/{id}", seg(cluster));
        let status = match self.request_status(cluster, id).await {
            Ok(state) => state.status,
            // Deleted with its cluster: nothing is left to stop (a repeated
            // unwinding gets here after its first pass deleted the cluster).
            Err(AmbariError::Http { status: 404, .. }) => return Ok(()),
            Err(e) => return Err(e),
        };
        if status.is_finished() {
            return Ok(());
        }
        let body = json!({"Requests": {"request_status": "ABORTED", "abort_reason": reason}});
        let a = self.send(Method::PUT, &path, Some(&body)).await?;
        if a.status == StatusCode::BAD_REQUEST {
            // It finished between our look and our PUT.
            if self.request_status(cluster, id).await?.status.is_finished() {
                return Ok(());
            }
        }
        self.expect_ok("abort request", a).map(drop)
    }

    // ------------------------------------------------------------- services

    /// Ask every service of the cluster to reach `state`; `context` names
    /// the request (shown in Ambari's UI). `Some(id)` is the request to
    /// follow; `None` means nothing had to be done. A retry after a lost
    /// answer finds the request it started by its context, so use a context
    /// unique to the step (e.g. "Orrery: start services of c-42").
    pub async fn set_services_state(
        &self,
        cluster: &str,
        state: ServiceState,
        context: &str,
    ) -> Result<Option<RequestId>, AmbariError> {
        self.change_services(cluster, None, state, context).await
    }

    /// [`set_services_state`](Self::set_services_state) for the services
    /// now in `from` only (Ambari's `ServiceInfo/state=` predicate): stopping
    /// what runs must not reinstall what failed to install, which asking
    /// every service for `INSTALLED` would.
    pub async fn set_services_state_from(
        &self,
        cluster: &str,
        from: ServiceState,
        state: ServiceState,
        context: &str,
    ) -> Result<Option<RequestId>, AmbariError> {
        self.change_services(cluster, Some(from), state, context)
            .await
    }

    async fn change_services(
        &self,
        cluster: &str,
        from: Option<ServiceState>,
        state: ServiceState,
        context: &str,
    ) -> Result<Option<RequestId>, AmbariError> {
        let body = json!({
            "RequestInfo": {"context": context},
            "Body": {"ServiceInfo": {"state": state.as_str()}},
        });
        let predicate = from.map_or_else(String::new, |f| {
            format!("?ServiceInfo/state={}", f.as_str())
        });
        let a = self
            .send(
                Method::PUT,
                &format!("/clusters/{}/services{predicate}", seg(cluster)),
                Some(&body),
            )
            .await?;
        let a = self.expect_ok("set services state", a)?;
        if let Some(id) = accepted_request_id("set services state", &a.body)? {
            return Ok(Some(id));
        }
        // Nothing to do, or our own earlier attempt is still at work.
        Ok(self
            .list_requests(cluster)
            .await?
            .into_iter()
            .filter(|(_, ctx, status)| ctx == context && !status.is_some_and(|s| s.is_finished()))
            .map(|(id, _, _)| id)
            .max())
    }

    /// `(service, state)` of every service of the cluster.
    pub async fn services_state(
        &self,
        cluster: &str,
    ) -> Result<Vec<(String, String)>, AmbariError> {
        let path = format!(
            "/clusters/{}/services?fields=ServiceInfo/service_name,ServiceInfo/state",
            seg(cluster)
        );
        let a = self.send(Method::GET, &path, None).await?;
        let a = self.expect_ok("list services", a)?;
        Ok(items(&a.body)
            .iter()
            .filter_map(|i| {
                let s = &i["ServiceInfo"];
                Some((
                    s["service_name"].as_str()?.to_owned(),
                    s["state"].as_str().unwrap_or("UNKNOWN").to_owned(),
                ))
            })
            .collect())
    }

    // ---------------------------------------------------------------- users

    /// Create an Ambari login; one that exists already is fine (its
    /// password is left as it is).
    pub async fn create_user(&self, user: &NewUser) -> Result<Created, AmbariError> {
        let body = json!({
            "Users/user_name": user.user_name,
            "Users/password": user.password,
            "Users/active": true,
            "Users/admin": user.admin,
        });
        let a = self.send(Method::POST, "/users", Some(&body)).await?;
        if a.status == StatusCode::CONFLICT {
            return Ok(Created::AlreadyExisted);
        }
        self.expect_ok("create user", a)?;
        Ok(Created::New)
    }

    /// Give a user `CLUSTER.USER` on a cluster; already granted is fine.
    pub async fn grant_cluster_user(
        &self,
        cluster: &str,
        user: &str,
    ) -> Result<Created, AmbariError> {
        let body = json!([{"PrivilegeInfo": {
            "permission_name": "CLUSTER.USER",
            "principal_name": user,
            "principal_type": "USER",
        }}]);
        let a = self
            .send(
                Method::POST,
                &format!("/clusters/{}/privileges", seg(cluster)),
                Some(&body),
            )
            .await?;
        if a.status == StatusCode::CONFLICT {
            return Ok(Created::AlreadyExisted);
        }
        self.expect_ok("grant cluster privilege", a)?;
        Ok(Created::New)
    }

    /// Remove every privilege a user holds on a cluster; none is fine.
    /// Returns how many were removed.
    pub async fn revoke_cluster_privileges(
        &self,
        cluster: &str,
        user: &str,
    ) -> Result<usize, AmbariError> {
        let path = format!(
            "/clusters/{}/privileges?fields=PrivilegeInfo/*",
            seg(cluster)
        );
        let a = self.send(Method::GET, &path, None).await?;
        if a.status == StatusCode::NOT_FOUND {
            return Ok(0);
        }
        let a = self.expect_ok("list privileges", a)?;
        let ids: Vec<u64> = items(&a.body)
            .iter()
            .map(|i| &i["PrivilegeInfo"])
            .filter(|p| p["principal_type"] == "USER" && p["principal_name"] == user)
            .filter_map(|p| p["privilege_id"].as_u64())
            .collect();
        let mut removed = 0;
        for id in ids {
            let a = self
                .send(
                    Method::DELETE,
                    &format!("/clusters/{}/privileges/{id}", seg(cluster)),
                    None,
                )
                .await?;
            if a.status == StatusCode::NOT_FOUND {
                continue;
            }
            self.expect_ok("revoke privilege", a)?;
            removed += 1;
        }
        Ok(removed)
    }

    /// Delete an Ambari login (and with it its privileges); gone already is fine.
    pub async fn delete_user(&self, user: &str) -> Result<(), AmbariError> {
        let a = self
            .send(Method::DELETE, &format!("/users/{}", seg(user)), None)
            .await?;
        if a.status == StatusCode::NOT_FOUND {
            return Ok(());
        }
        self.expect_ok("delete user", a).map(drop)
    }

    // ------------------------------------------------------------ transport

    /// One HTTP exchange. Transport failures become retryable errors here;
    /// statuses are left to the caller, which knows which ones are fine.
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Answer, AmbariError> {
        let op = format!("{method} {}", path.split('?').next().unwrap_or(path));
        let mut req = self
            .http
            .request(method.clone(), format!("{}{path}", self.api))
            .basic_auth(&self.config.user, Some(&self.config.password));
        if method != Method::GET {
            req = req.header("X-Requested-By", &self.config.requested_by);
        }
        if let Some(body) = body {
            // Ambari's own UI posts JSON as text/plain; the server reads the
            // body as JSON whatever the content type.
            req = req
                .header(reqwest::header::CONTENT_TYPE, "text/plain")
                .body(body.to_string());
        }
        let transport = |e: reqwest::Error| AmbariError::Transport {
            op: op.clone(),
            message: if e.is_timeout() {
                format!("no answer within {:?}", self.config.timeout)
            } else {
                error_chain(&e)
            },
            timed_out: e.is_timeout(),
        };
        let resp = req.send().await.map_err(transport)?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(transport)?;
        let body = if bytes.iter().all(u8::is_ascii_whitespace) {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(truncate(&String::from_utf8_lossy(&bytes), 300)))
        };
        tracing::debug!(%op, status = status.as_u16(), "ambari");
        Ok(Answer { status, body })
    }

    fn expect_ok(&self, op: &str, a: Answer) -> Result<Answer, AmbariError> {
        if a.status.is_success() {
            Ok(a)
        } else {
            Err(self.http_error(op, a))
        }
    }

    fn http_error(&self, op: &str, a: Answer) -> AmbariError {
        let message = match &a.body {
            Value::Object(o) => o
                .get("message")
                .and_then(Value::as_str)
                .map(str::to_owned)
                .unwrap_or_else(|| truncate(&a.body.to_string(), 300)),
            Value::String(s) => s.clone(),
            Value::Null => a
                .status
                .canonical_reason()
                .unwrap_or("no message")
                .to_owned(),
            other => truncate(&other.to_string(), 300),
        };
        AmbariError::Http {
            op: op.to_owned(),
            status: a.status.as_u16(),
            message,
        }
    }
}

/// `items` of a collection answer.
fn items(body: &Value) -> &[Value] {
    body["items"].as_array().map_or(&[], Vec::as_slice)
}

fn host_info(h: &Value) -> Option<HostInfo> {
    Some(HostInfo {
        host_name: h["host_name"].as_str()?.to_owned(),
        host_status: h["host_status"]
            .as_str()
            .and_then(|s| serde_json::from_value(Value::String(s.to_owned())).ok()),
        last_heartbeat_time: h["last_heartbeat_time"].as_i64(),
    })
}

/// The request id of a `202` answer; `None` for a `200` with an empty body.
fn accepted_request_id(op: &str, body: &Value) -> Result<Option<RequestId>, AmbariError> {
    if body.is_null() {
        return Ok(None);
    }
    body["Requests"]["id"]
        .as_u64()
        .map(Some)
        .ok_or_else(|| AmbariError::Protocol {
            op: op.to_owned(),
            message: format!("no Requests/id in {}", truncate(&body.to_string(), 200)),
        })
}

fn decode<T: DeserializeOwned>(op: &str, body: Value) -> Result<T, AmbariError> {
    serde_json::from_value(body).map_err(|e| AmbariError::Protocol {
        op: op.to_owned(),
        message: e.to_string(),
    })
}

/// Percent-encode one path segment (names come from users).
fn seg(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_owned()
    } else {
        let mut t: String = s.chars().take(max).collect();
        t.push('…');
        t
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut parts = vec![e.to_string()];
    let mut src = e.source();
    while let Some(s) = src {
        let text = s.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        src = s.source();
    }
    parts.join(": ")
}

/// The distinct host names of a template, for a registration wait.
pub fn template_hosts(template: &ClusterTemplate) -> Vec<String> {
    let mut seen = BTreeSet::new();
    template
        .hosts()
        .filter(|(_, h)| seen.insert(h.to_string()))
        .map(|(_, h)| h.to_owned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_segments_are_escaped() {
        assert_eq!(seg("c-1.b_x"), "c-1.b_x");
        assert_eq!(seg("a b/c"), "a%20b%2Fc");
    }

    #[test]
    fn the_api_prefix_is_added_once() {
        let a = AmbariClient::new(AmbariConfig::new("http://h:8080/").credentials("u", "s3cret"))
            .unwrap();
        assert_eq!(a.api_url(), "http://h:8080/api/v1");
        let b = AmbariClient::new(AmbariConfig::new("http://h:8080/api/v1")).unwrap();
        assert_eq!(b.api_url(), "http://h:8080/api/v1");
        assert!(
            !format!("{a:?}").contains("s3cret"),
            "password must not leak"
        );
    }
}
