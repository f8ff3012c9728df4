//! The REST API in-process on 127.0.0.1:0, against real PostgreSQL and Redis,
//! with real `orrery-worker` processes running the stand-in cluster
//! workflows (`fake.*`) and webhook deliveries. Each test has its own
//! database and Redis namespace (see `support`).

mod support;

use std::{sync::Arc, time::Duration};

use orrery_api::{
    accounts::{self, NewGroup, NewUser},
    app::{App, ClusterWorkflows, Provider},
    ApiConfig,
};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use support::TestEnv;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const T: Duration = Duration::from_secs(30);

struct Api {
    env: TestEnv,
    base: String,
    http: reqwest::Client,
    app: Arc<App>,
    stop: CancellationToken,
}

struct Res {
    status: StatusCode,
    headers: reqwest::header::HeaderMap,
    body: Value,
}

impl Res {
    fn content_type(&self) -> &str {
        self.headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    }

    /// A problem+json answer with this status naming this field.
    fn assert_problem(&self, status: u16, field: Option<&str>) {
        assert_eq!(self.status.as_u16(), status, "{}", self.body);
        assert_eq!(
            self.content_type(),
            "application/problem+json",
            "{}",
            self.body
        );
        assert_eq!(self.body["status"], status);
        assert!(self.body["detail"].as_str().is_some_and(|d| !d.is_empty()));
        if let Some(field) = field {
            assert_eq!(self.body["field"], field, "{}", self.body);
        }
    }
}

impl Api {
    async fn start(name: &str) -> Self {
        Self::with_config(name, |_| {}).await
    }

    async fn with_config(name: &str, tweak: impl FnOnce(&mut ApiConfig)) -> Self {
        Self::serve(TestEnv::new(name).await, tweak).await
    }

    /// The API in front of `env`'s database and Redis.
    async fn serve(env: TestEnv, tweak: impl FnOnce(&mut ApiConfig)) -> Self {
        let mut config = ApiConfig {
            workflows: ClusterWorkflows::fake(),
            ..ApiConfig::default()
        };
        tweak(&mut config);
        let redis = redis::Client::open(env.redis_url.as_str())
            .unwrap()
            .get_connection_manager()
            .await
            .unwrap();
        let app = App::new(env.rt.engine.clone(), redis, config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let stop = CancellationToken::new();
        tokio::spawn(orrery_api::serve_app(app.clone(), listener, stop.clone()));
        Api {
            env,
            base,
            http: reqwest::Client::new(),
            app,
            stop,
        }
    }

    async fn group(&self, name: &str, quota: Option<i32>, reserved: i32) {
        let g = NewGroup {
            name: name.into(),
            quota_machines: quota,
            reserved_machines: reserved,
        };
        accounts::create_group(&self.env.pool, &g, "test")
            .await
            .unwrap();
    }

    /// A user and their bearer token.
    async fn user(&self, name: &str, group: Option<&str>, operator: bool) -> String {
        let u = NewUser {
            name: name.into(),
            email: None,
            group: group.map(str::to_owned),
            operator,
            quota_machines: None,
        };
        accounts::create_user(&self.env.pool, &u, "test")
            .await
            .unwrap()
            .1
            .token()
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> Res {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let res = req.send().await.unwrap();
        let status = res.status();
        let headers = res.headers().clone();
        let text = res.text().await.unwrap();
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Res {
            status,
            headers,
            body,
        }
    }

    async fn get(&self, path: &str, token: &str) -> Res {
        self.call(Method::GET, path, Some(token), None, &[]).await
    }

    async fn post(&self, path: &str, token: &str, body: Value) -> Res {
        self.call(Method::POST, path, Some(token), Some(body), &[])
            .await
    }

    async fn delete(&self, path: &str, token: &str) -> Res {
        self.call(Method::DELETE, path, Some(token), None, &[])
            .await
    }

    async fn raw_post(&self, path: &str, token: &str, body: &str) -> Res {
        let res = self
            .http
            .post(format!("{}{path}", self.base))
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
            .await
            .unwrap();
        let status = res.status();
        let headers = res.headers().clone();
        let body = res.json().await.unwrap_or(Value::Null);
        Res {
            status,
            headers,
            body,
        }
    }

    /// Create a cluster; (task id, cluster id).
    async fn create(&self, token: &str, body: Value) -> (Uuid, Uuid) {
        let r = self.post("/v1/clusters", token, body).await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
        (uuid(&r.body["id"]), uuid(&r.body["cluster_id"]))
    }

    async fn wait_task(&self, token: &str, id: Uuid, state: &str) -> Value {
        let deadline = tokio::time::Instant::now() + T;
        loop {
            let r = self.get(&format!("/v1/tasks/{id}"), token).await;
            if r.body["state"] == state {
                return r.body;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "task {id} never {state}: {}",
                r.body
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn count(&self, table: &str) -> i64 {
        sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
            .fetch_one(&self.env.pool)
            .await
            .unwrap()
    }

    /// The usage counters admission reads (`machine_usage`, kept by a
    /// trigger) equal the sums over the clusters they stand for.
    async fn assert_usage_counters_match(&self) {
        let mismatches: Vec<(Uuid, i64, i64)> = sqlx::query_as(
            "WITH truth AS (
                 SELECT scope, sum(size)::bigint AS machines FROM (
                     SELECT owner_id AS scope, size FROM clusters
                     WHERE state IN ('provisioning', 'running', 'terminating')
                     UNION ALL
                     SELECT group_id, size FROM clusters
                     WHERE group_id IS NOT NULL AND state IN ('provisioning', 'running', 'terminating')
                     UNION ALL
                     SELECT '00000000-0000-0000-0000-000000000000', size FROM clusters
                     WHERE state = 'provisioning') s
                 GROUP BY scope)
             SELECT COALESCE(t.scope, u.scope), COALESCE(t.machines, 0), COALESCE(u.machines, 0)
             FROM truth t FULL JOIN machine_usage u ON u.scope = t.scope
             WHERE COALESCE(t.machines, 0) <> COALESCE(u.machines, 0)",
        )
        .fetch_all(&self.env.pool)
        .await
        .unwrap();
        assert!(
            mismatches.is_empty(),
            "(scope, clusters say, counter says): {mismatches:?}"
        );
    }

    fn provision_worker(&mut self) {
        self.env.spawn_worker(&["--queues", "provision"]);
    }
}

impl Drop for Api {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn uuid(v: &Value) -> Uuid {
    v.as_str()
        .unwrap_or_else(|| panic!("not a uuid: {v}"))
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_request_stays_queued_without_workers_and_completes_when_they_start() {
    let mut api = Api::start("api_submit").await;
    let alice = api.user("alice", None, false).await;
    let r = api
        .post(
            "/v1/clusters",
            &alice,
            json!({ "name": "etl", "size": 3, "services": ["hive"] }),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    let task = uuid(&r.body["id"]);
    assert_eq!(r.headers["location"], format!("/v1/tasks/{task}").as_str());
    let cluster = uuid(&r.body["cluster_id"]);
    for _ in 0..3 {
        let t = api.get(&format!("/v1/tasks/{task}"), &alice).await;
        assert_eq!(t.body["state"], "queued", "{}", t.body);
        assert_eq!(
            t.body["progress"],
            json!({ "done": 0, "total": 2, "percent": 0 })
        );
        assert_eq!(t.body["current_step"], "allocate");
    }
    let c = api.get(&format!("/v1/clusters/{cluster}"), &alice).await;
    assert_eq!(c.body["state"], "provisioning");
    assert_eq!(
        c.body["services"],
        json!([
            "ZOOKEEPER",
            "HDFS",
            "YARN",
            "MAPREDUCE2",
            "HIVE",
            "HCATALOG",
            "WEBHCAT"
        ])
    );
    api.provision_worker();
    let t = api.wait_task(&alice, task, "succeeded").await;
    assert_eq!(
        t["progress"],
        json!({ "done": 2, "total": 2, "percent": 100 })
    );
    assert_eq!(t["steps"][0]["attempts"], 1);
    assert_eq!(t["steps"][1]["state"], "done");
    assert!(t["steps"][1]["duration_ms"].as_i64().is_some());
    assert_eq!(t["current_step"], Value::Null);
    let c = api.get(&format!("/v1/clusters/{cluster}"), &alice).await;
    assert_eq!(c.body["state"], "running", "{}", c.body);
    assert_eq!(c.body["users"][0]["username"], "alice");
    assert_eq!(c.body["users"][0]["state"], "active");
    assert_eq!(c.body["users"][0]["is_sudoer"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotent_resubmission_returns_the_same_task_and_creates_nothing() {
    let api = Api::start("api_idem").await;
    let alice = api.user("alice", None, false).await;
    let body = json!({ "name": "once", "size": 1 });
    let key = [("idempotency-key", "3f1c-once")];
    let first = api
        .call(
            Method::POST,
            "/v1/clusters",
            Some(&alice),
            Some(body.clone()),
            &key,
        )
        .await;
    let second = api
        .call(
            Method::POST,
            "/v1/clusters",
            Some(&alice),
            Some(body.clone()),
            &key,
        )
        .await;
    assert_eq!(first.status, StatusCode::ACCEPTED);
    assert_eq!(second.status, StatusCode::ACCEPTED);
    assert_eq!(first.body["id"], second.body["id"]);
    assert_eq!(second.headers["idempotent-replayed"], "true");
    assert_eq!(
        (
            api.count("clusters").await,
            api.count("runs").await,
            api.count("tasks").await
        ),
        (1, 1, 1)
    );
    let other = api
        .call(
            Method::POST,
            "/v1/clusters",
            Some(&alice),
            Some(json!({ "name": "twice", "size": 1 })),
            &key,
        )
        .await;
    other.assert_problem(422, Some("Idempotency-Key"));
    assert_eq!(api.count("clusters").await, 1);
    // The same key from another user is another request.
    let bob = api.user("bob", None, false).await;
    let b = api
        .call(Method::POST, "/v1/clusters", Some(&bob), Some(body), &key)
        .await;
    assert_eq!(b.status, StatusCode::ACCEPTED);
    assert_ne!(b.body["id"], first.body["id"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_requests_name_the_field_and_write_nothing() {
    let api = Api::start("api_refused").await;
    let alice = api.user("alice", None, false).await;
    api.raw_post("/v1/clusters", &alice, r#"{"name": "x", "size": "#)
        .await
        .assert_problem(400, None);
    api.raw_post("/v1/clusters", &alice, "")
        .await
        .assert_problem(400, None);
    let cases = [
        (json!({ "name": "x", "size": 1, "colour": "red" }), "colour"),
        (json!({ "name": "x", "size": "three" }), "size"),
        (json!({ "name": "x", "size": 1.5 }), "size"),
        (json!({ "name": "x", "size": 0 }), "size"),
        (json!({ "name": "x", "size": -4 }), "size"),
        (json!({ "size": 2 }), "name"),
        (json!({ "name": "x".repeat(65), "size": 1 }), "name"),
        (json!({ "name": "bad name!", "size": 1 }), "name"),
        (
            json!({ "name": "x", "size": 1, "services": ["PIG", "SPARK"] }),
            "services[1]",
        ),
        (
            json!({ "name": "x", "size": 1, "services": "PIG" }),
            "services",
        ),
        (json!({ "name": "x", "size": 1, "shared": "yes" }), "shared"),
        (
            json!({ "name": "x", "size": 1, "ttl_seconds": 1 }),
            "ttl_seconds",
        ),
        (
            json!({ "name": "x", "size": 1, "callback_url": "gopher://x" }),
            "callback_url",
        ),
    ];
    for (body, field) in cases {
        let r = api.post("/v1/clusters", &alice, body.clone()).await;
        assert!(r.status.is_client_error(), "{body}: {}", r.body);
        r.assert_problem(422, Some(field));
    }
    let r = api
        .call(
            Method::POST,
            "/v1/clusters",
            Some(&alice),
            Some(json!({"name": "x", "size": 1})),
            &[("idempotency-key", "")],
        )
        .await;
    r.assert_problem(400, Some("Idempotency-Key"));
    // Other routes validate the same way.
    api.post(
        "/v1/account/ssh-keys",
        &alice,
        json!({ "public_key": "ssh-rsa AAAA" }),
    )
    .await
    .assert_problem(422, Some("public_key"));
    api.post("/v1/account/keys", &alice, json!({ "nmae": "typo" }))
        .await
        .assert_problem(422, Some("nmae"));
    api.get("/v1/clusters?state=exploded", &alice)
        .await
        .assert_problem(400, Some("state"));
    api.get("/v1/clusters?limit=0", &alice)
        .await
        .assert_problem(400, Some("limit"));
    api.get("/v1/tasks/not-a-uuid", &alice)
        .await
        .assert_problem(404, None);
    api.get("/v1/nowhere", &alice)
        .await
        .assert_problem(404, None);
    assert_eq!(
        (
            api.count("clusters").await,
            api.count("runs").await,
            api.count("tasks").await,
            api.count("cluster_users").await
        ),
        (0, 0, 0, 0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_see_and_act_only_on_their_own_and_their_groups_shared_clusters() {
    let api = Api::start("api_authz").await;
    api.group("data", None, 0).await;
    api.group("web", None, 0).await;
    let alice = api.user("alice", Some("data"), false).await;
    let bob = api.user("bob", Some("data"), false).await;
    let carol = api.user("carol", Some("web"), false).await;
    let (private_task, private) = api
        .create(&alice, json!({ "name": "mine", "size": 1 }))
        .await;
    let (shared_task, shared) = api
        .create(&alice, json!({ "name": "ours", "size": 1, "shared": true }))
        .await;

    // Bob (same group) sees the shared cluster and its task, not the private one.
    assert_eq!(
        api.get(&format!("/v1/clusters/{shared}"), &bob)
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        api.get(&format!("/v1/tasks/{shared_task}"), &bob)
            .await
            .status,
        StatusCode::OK
    );
    api.get(&format!("/v1/clusters/{private}"), &bob)
        .await
        .assert_problem(404, None);
    api.get(&format!("/v1/tasks/{private_task}"), &bob)
        .await
        .assert_problem(404, None);
    api.delete(&format!("/v1/clusters/{private}"), &bob)
        .await
        .assert_problem(404, None);
    api.post(
        &format!("/v1/clusters/{private}/users"),
        &bob,
        json!({ "username": "bob" }),
    )
    .await
    .assert_problem(404, None);
    let listed = api.get("/v1/clusters", &bob).await;
    let ids: Vec<Uuid> = listed.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| uuid(&c["id"]))
        .collect();
    assert_eq!(ids, [shared]);
    // The shared cluster gave every group member an account.
    let users: Vec<String> = api.get(&format!("/v1/clusters/{shared}"), &bob).await.body["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["username"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(users, ["alice", "bob"]);

    // Carol (another group) sees neither.
    for id in [shared, private] {
        api.get(&format!("/v1/clusters/{id}"), &carol)
            .await
            .assert_problem(404, None);
    }
    api.get(&format!("/v1/tasks/{shared_task}"), &carol)
        .await
        .assert_problem(404, None);
    assert_eq!(
        api.get("/v1/clusters", &carol).await.body["items"],
        json!([])
    );

    // A provisioning cluster cannot be terminated, even by its owner.
    api.delete(&format!("/v1/clusters/{private}"), &alice)
        .await
        .assert_problem(409, None);

    // Once running, the shared cluster can be changed by its group: Bob adds
    // and removes an account and terminates it; Carol can do none of it.
    sqlx::query("UPDATE clusters SET state = 'running' WHERE id = $1")
        .bind(shared)
        .execute(&api.env.pool)
        .await
        .unwrap();
    let users_path = format!("/v1/clusters/{shared}/users");
    api.post(&users_path, &carol, json!({ "username": "carol" }))
        .await
        .assert_problem(404, None);
    api.delete(&format!("{users_path}/bob"), &carol)
        .await
        .assert_problem(404, None);
    api.delete(&format!("/v1/clusters/{shared}"), &carol)
        .await
        .assert_problem(404, None);
    sqlx::query("UPDATE cluster_users SET state = 'active' WHERE cluster_id = $1")
        .bind(shared)
        .execute(&api.env.pool)
        .await
        .unwrap();
    let removed = api.delete(&format!("{users_path}/bob"), &bob).await;
    assert_eq!(removed.status, StatusCode::ACCEPTED, "{}", removed.body);
    let terminated = api.delete(&format!("/v1/clusters/{shared}"), &bob).await;
    assert_eq!(
        terminated.status,
        StatusCode::ACCEPTED,
        "{}",
        terminated.body
    );
    assert_eq!(
        api.get(&format!("/v1/clusters/{shared}"), &alice)
            .await
            .body["state"],
        "terminating"
    );

    // Operator routes are for operators, every one of them, whatever the
    // body; operators see everything.
    let any_id = Uuid::new_v4();
    let mut admin_routes = 0;
    for (method, path, ..) in orrery_api::openapi::OPERATIONS {
        if !path.starts_with("/v1/admin") {
            continue;
        }
        admin_routes += 1;
        let path = path
            .replace("{id}", &any_id.to_string())
            .replace("{name}", "bob");
        let method = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
        let body = (method != Method::GET && method != Method::DELETE)
            .then(|| json!({ "filter": { "state": "queued" }, "reason": "x", "name": "x" }));
        let r = api
            .call(method.clone(), &path, Some(&alice), body, &[])
            .await;
        assert_eq!(
            r.status,
            StatusCode::FORBIDDEN,
            "{method} {path} by a non-operator: {}",
            r.body
        );
        r.assert_problem(403, None);
    }
    assert!(admin_routes >= 10, "{admin_routes} operator routes");
    let root = api.user("root", None, true).await;
    assert_eq!(
        api.get(&format!("/v1/clusters/{private}"), &root)
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        api.get("/v1/clusters", &root).await.body["items"]
            .as_array()
            .unwrap()
            .len(),
        2
    );

    // No key, a malformed key, a wrong secret: 401.
    api.call(Method::GET, "/v1/clusters", None, None, &[])
        .await
        .assert_problem(401, None);
    api.get("/v1/clusters", "orr_nonsense")
        .await
        .assert_problem(401, None);
    let forged = format!("{}x", &alice[..alice.len() - 1]);
    api.get("/v1/clusters", &forged)
        .await
        .assert_problem(401, None);

    // A revoked key is refused at once; the other key keeps working.
    let created = api
        .post("/v1/account/keys", &alice, json!({ "name": "laptop" }))
        .await;
    assert_eq!(created.status, StatusCode::CREATED);
    let second = created.body["token"].as_str().unwrap().to_owned();
    assert_eq!(
        api.get("/v1/clusters", &second).await.status,
        StatusCode::OK
    );
    let keys = api.get("/v1/account/keys", &alice).await;
    assert!(!keys
        .body
        .to_string()
        .contains(created.body["api_secret"].as_str().unwrap()));
    let r = api
        .delete(
            &format!("/v1/account/keys/{}", created.body["id"].as_str().unwrap()),
            &alice,
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    api.get("/v1/clusters", &second)
        .await
        .assert_problem(401, None);
    assert_eq!(api.get("/v1/clusters", &alice).await.status, StatusCode::OK);
    // Bob cannot revoke Alice's key.
    let alice_key = api.get("/v1/account/keys", &alice).await.body["items"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    api.delete(&format!("/v1/account/keys/{alice_key}"), &bob)
        .await
        .assert_problem(404, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_over_quota_or_beyond_the_pool_are_refused_with_what_is_left() {
    let api = Api::with_config("api_quota", |c| {
        c.provider = Provider::Pool;
        c.default_quota = 5;
    })
    .await;
    for i in 0..6 {
        sqlx::query("INSERT INTO machines (id, provider, hostname, address, host_key) VALUES ($1, 'pool', $2, $3, 'ssh-ed25519 AAAA')")
            .bind(Uuid::new_v4())
            .bind(format!("node{i}"))
            .bind(format!("10.0.0.{i}"))
            .execute(&api.env.pool)
            .await
            .unwrap();
    }
    api.group("small", Some(2), 0).await;
    api.group("vip", None, 2).await;
    let alice = api.user("alice", None, false).await;
    let sam = api.user("sam", Some("small"), false).await;

    // User quota (the default, 5).
    let r = api
        .post("/v1/clusters", &alice, json!({ "name": "big", "size": 6 }))
        .await;
    r.assert_problem(403, None);
    assert_eq!(
        r.body["detail"], "You can request up to 4 machines at this point.",
        "vip reserves 2 of 6"
    );
    api.create(&alice, json!({ "name": "a", "size": 3 })).await;
    let r = api
        .post("/v1/clusters", &alice, json!({ "name": "b", "size": 2 }))
        .await;
    assert_eq!(
        r.body["detail"],
        "You can request up to 1 machines at this point."
    );
    assert_eq!(r.body["reason"], "availability");

    // Group quota (small: 2; its member's own limit is the group's).
    let before = api.count("clusters").await;
    let r = api
        .post("/v1/clusters", &sam, json!({ "name": "s", "size": 2 }))
        .await;
    r.assert_problem(403, None);
    assert_eq!(
        r.body["detail"],
        "You can request up to 1 machines at this point."
    );
    api.create(&sam, json!({ "name": "s", "size": 1 })).await;
    sqlx::query("UPDATE groups SET quota_machines = 1 WHERE name = 'small'")
        .execute(&api.env.pool)
        .await
        .unwrap();
    let r = api
        .post("/v1/clusters", &sam, json!({ "name": "t", "size": 1 }))
        .await;
    r.assert_problem(403, None);
    assert_eq!(r.body["detail"], "Quota exceeded for group [small].");
    assert_eq!(api.count("clusters").await, before + 1);

    // The vip group may use its reservation; nobody else may.
    let vera = api.user("vera", Some("vip"), false).await;
    api.create(&vera, json!({ "name": "v", "size": 2 })).await;
    let r = api
        .post("/v1/clusters", &vera, json!({ "name": "w", "size": 1 }))
        .await;
    assert_eq!(
        r.body["detail"],
        "You can request up to 0 machines at this point."
    );
    let profile = api.get("/v1/account", &alice).await;
    assert_eq!(profile.body["quota"]["used"], 3);
    assert_eq!(profile.body["quota"]["can_request"], 0);
    assert_eq!(api.count("runs").await, 3);

    // Admission writes a request's rows before deciding: a refusal, even
    // with a callback and an Idempotency-Key, leaves none of them behind,
    // and the key stays free.
    const TABLES: [&str; 6] = [
        "clusters",
        "cluster_users",
        "runs",
        "run_history",
        "tasks",
        "callbacks",
    ];
    let mut counts = Vec::new();
    for t in TABLES {
        counts.push(api.count(t).await);
    }
    let hooked = json!({ "name": "w", "size": 1, "callback_url": "http://127.0.0.1:9/hook" });
    for _ in 0..2 {
        let r = api
            .call(
                Method::POST,
                "/v1/clusters",
                Some(&vera),
                Some(hooked.clone()),
                &[("idempotency-key", "refused-once")],
            )
            .await;
        r.assert_problem(403, None);
    }
    for (t, before) in TABLES.iter().zip(&counts) {
        assert_eq!(api.count(t).await, *before, "{t} after a refusal");
    }
    api.assert_usage_counters_match().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_users_and_termination_run_as_durable_tasks() {
    let mut api = Api::start("api_lifecycle").await;
    let alice = api.user("alice", None, false).await;
    let bob = api.user("bob", None, false).await;
    let key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPvF1n1iWOYTKyGnH8TUoBAvnVfv7+6tFH+7mWgeNXL8 bob@laptop";
    let k = api
        .post(
            "/v1/account/ssh-keys",
            &bob,
            json!({ "public_key": key, "name": "laptop" }),
        )
        .await;
    assert_eq!(k.status, StatusCode::CREATED, "{}", k.body);
    assert_eq!(
        k.body["fingerprint"],
        "SHA256:mPBrjJSrUwAIB/z25QtpG143Bm4h5ufYHWqjhi7OQ1k"
    );
    api.post("/v1/account/ssh-keys", &bob, json!({ "public_key": key }))
        .await
        .assert_problem(409, None);
    api.provision_worker();
    let (task, cluster) = api.create(&alice, json!({ "name": "c1", "size": 2 })).await;
    api.wait_task(&alice, task, "succeeded").await;
    for (i, host) in ["c1-node-a", "c1-node-b"].iter().enumerate() {
        sqlx::query("INSERT INTO machines (id, provider, hostname, address, host_key, state, cluster_id) VALUES ($1, 'local', $2, $3, 'k', 'allocated', $4)")
            .bind(Uuid::new_v4())
            .bind(host)
            .bind(format!("10.1.0.{i}"))
            .bind(cluster)
            .execute(&api.env.pool)
            .await
            .unwrap();
    }
    let c = api.get(&format!("/v1/clusters/{cluster}"), &alice).await;
    assert_eq!(
        c.body["nodes"],
        json!([
            { "hostname": "c1-node-a", "address": "10.1.0.0", "role": "master" },
            { "hostname": "c1-node-b", "address": "10.1.0.1", "role": "slave" },
        ])
    );

    let r = api
        .post(
            &format!("/v1/clusters/{cluster}/users"),
            &alice,
            json!({ "username": "bob" }),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    api.wait_task(&alice, uuid(&r.body["id"]), "succeeded")
        .await;
    let c = api.get(&format!("/v1/clusters/{cluster}"), &bob).await;
    assert_eq!(
        c.status,
        StatusCode::OK,
        "a user with an account sees the cluster: {}",
        c.body
    );
    assert_eq!(c.body["users"][1]["public_key"], key);
    api.delete(&format!("/v1/clusters/{cluster}"), &bob)
        .await
        .assert_problem(403, None);
    api.post(
        &format!("/v1/clusters/{cluster}/users"),
        &alice,
        json!({ "username": "bob" }),
    )
    .await
    .assert_problem(409, None);
    api.post(
        &format!("/v1/clusters/{cluster}/users"),
        &alice,
        json!({ "username": "nobody" }),
    )
    .await
    .assert_problem(422, Some("username"));
    api.delete(&format!("/v1/clusters/{cluster}/users/alice"), &alice)
        .await
        .assert_problem(409, None);
    let r = api
        .delete(&format!("/v1/clusters/{cluster}/users/bob"), &alice)
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    api.wait_task(&alice, uuid(&r.body["id"]), "succeeded")
        .await;
    api.delete(&format!("/v1/clusters/{cluster}/users/bob"), &alice)
        .await
        .assert_problem(404, None);

    // The worker paused: the fake termination would otherwise finish
    // before the next request can see the state the API recorded.
    api.env.workers[0].signal("STOP");
    let r = api.delete(&format!("/v1/clusters/{cluster}"), &alice).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    assert_eq!(
        api.get(&format!("/v1/clusters/{cluster}"), &alice)
            .await
            .body["state"],
        "terminating"
    );
    api.env.workers[0].signal("CONT");
    api.wait_task(&alice, uuid(&r.body["id"]), "succeeded")
        .await;
    let c = api.get(&format!("/v1/clusters/{cluster}"), &alice).await;
    assert_eq!(c.body["state"], "terminated");
    assert!(c.body["terminated_at"].is_string());
    assert_eq!(c.body["nodes"], json!([]), "machines released");
    api.delete(&format!("/v1/clusters/{cluster}"), &alice)
        .await
        .assert_problem(409, None);
    api.post(
        &format!("/v1/clusters/{cluster}/users"),
        &alice,
        json!({ "username": "bob" }),
    )
    .await
    .assert_problem(409, None);
    let listed = api.get("/v1/clusters?state=terminated", &alice).await;
    assert_eq!(listed.body["items"].as_array().unwrap().len(), 1);
    let profile = api.get("/v1/account", &alice).await;
    assert_eq!(
        profile.body["quota"]["used"], 0,
        "a terminated cluster no longer counts: {}",
        profile.body
    );
    api.assert_usage_counters_match().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_list_pages_through_every_cluster_once_newest_first() {
    let api = Api::start("api_pages").await;
    let alice = api.user("alice", None, false).await;
    let mut made = Vec::new();
    for i in 0..5 {
        made.push(
            api.create(&alice, json!({ "name": format!("p{i}"), "size": 1 }))
                .await
                .1,
        );
    }
    made.reverse();
    let mut seen = Vec::new();
    let mut path = "/v1/clusters?limit=2".to_owned();
    for page in 0.. {
        assert!(page < 5, "the pages do not end: {seen:?}");
        let r = api.get(&path, &alice).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        let items = r.body["items"].as_array().unwrap();
        assert!(items.len() <= 2);
        seen.extend(items.iter().map(|c| uuid(&c["id"])));
        match r.body["next"].as_str() {
            Some(next) => path = next.to_owned(),
            None => break,
        }
    }
    assert_eq!(seen, made, "every cluster once, newest first");
    let filtered = api.get("/v1/clusters?state=running&limit=2", &alice).await;
    assert_eq!(filtered.body["items"], json!([]));
    assert!(filtered.body["next"].is_null());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_list_cancel_and_replay_runs_alone_and_in_bulk_and_every_action_is_audited() {
    let mut api = Api::start("api_ops").await;
    let alice = api.user("alice", None, false).await;
    let root = api.user("root", None, true).await;
    let (t1, _) = api.create(&alice, json!({ "name": "q1", "size": 1 })).await;
    let (_t2, c2) = api.create(&alice, json!({ "name": "q2", "size": 1 })).await;
    let (t3, _) = api
        .create(&alice, json!({ "name": "fail-me", "size": 1 }))
        .await;

    let all = api
        .get(
            "/v1/admin/runs?workflow=fake.create_cluster&state=queued",
            &root,
        )
        .await;
    assert_eq!(
        all.body["items"].as_array().unwrap().len(),
        3,
        "{}",
        all.body
    );
    let by_cluster = api
        .get(&format!("/v1/admin/runs?cluster={c2}"), &root)
        .await;
    assert_eq!(by_cluster.body["items"].as_array().unwrap().len(), 1);
    assert_eq!(
        api.get("/v1/admin/runs?stuck=true", &root).await.body["items"],
        json!([])
    );
    // A run past its `stuck_after` (no progress in time) is listed as stuck,
    // and only it.
    let t2 = uuid(&by_cluster.body["items"][0]["id"]);
    let set_stuck_after = |at: &'static str| {
        let pool = api.env.pool.clone();
        async move {
            sqlx::query(&format!("UPDATE runs SET stuck_after = {at} WHERE id = $1"))
                .bind(t2)
                .execute(&pool)
                .await
                .unwrap();
        }
    };
    set_stuck_after("now() - interval '1 second'").await;
    let stuck = api.get("/v1/admin/runs?stuck=true", &root).await;
    let items = stuck.body["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{}", stuck.body);
    assert_eq!(uuid(&items[0]["id"]), t2);
    assert_eq!(items[0]["stuck"], true);
    let not_stuck = api.get("/v1/admin/runs?stuck=false", &root).await;
    assert_eq!(not_stuck.body["items"].as_array().unwrap().len(), 2);
    set_stuck_after("now() + interval '1 hour'").await;
    api.get("/v1/admin/runs?state=sleeping", &root)
        .await
        .assert_problem(422, Some("state"));

    // Cancel one, with a reason (required).
    api.post(&format!("/v1/admin/runs/{t1}/cancel"), &root, json!({}))
        .await
        .assert_problem(422, Some("reason"));
    let r = api
        .post(
            &format!("/v1/admin/runs/{t1}/cancel"),
            &root,
            json!({ "reason": "user asked" }),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);

    api.provision_worker();
    api.wait_task(&alice, t1, "cancelled").await;
    let failed = api.wait_task(&alice, t3, "failed").await;
    assert!(
        failed["error"].as_str().unwrap().contains("fake failure"),
        "{failed}"
    );
    assert_eq!(failed["steps"][1]["state"], "failed");
    assert!(failed["steps"][1]["last_error"]
        .as_str()
        .unwrap()
        .contains("fake failure"));
    api.post(
        &format!("/v1/admin/runs/{t1}/cancel"),
        &root,
        json!({ "reason": "again" }),
    )
    .await
    .assert_problem(409, None);

    // Replay the failed one; its first step was undone, so it must start there.
    api.post(
        &format!("/v1/admin/runs/{t3}/replay"),
        &root,
        json!({ "from_step": "nope", "reason": "retry" }),
    )
    .await
    .assert_problem(422, None);
    api.post(
        &format!("/v1/admin/runs/{t3}/replay"),
        &root,
        json!({ "from_step": "start", "reason": "x" }),
    )
    .await
    .assert_problem(409, None);
    let r = api
        .post(
            &format!("/v1/admin/runs/{t3}/replay"),
            &root,
            json!({ "from_step": "allocate", "reason": "ambari fixed" }),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    api.env
        .wait_until("the replay to fail again", T, || async {
            let run = api.env.run(t3).await;
            run.replays == 1 && run.state == orrery_workflows::RunState::Failed
        })
        .await;

    // Bulk: refuse an empty filter; then replay every failed create.
    api.post(
        "/v1/admin/runs/replay",
        &root,
        json!({ "filter": {}, "reason": "x" }),
    )
    .await
    .assert_problem(422, Some("filter"));
    let r = api
        .post("/v1/admin/runs/replay", &root, json!({ "filter": { "state": "failed", "workflow": "fake.create_cluster" }, "from_step": "allocate", "reason": "bulk retry" }))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["matched"], 1);
    assert_eq!(r.body["done"], json!([t3]));
    let bulk_cancel = api
        .post(
            "/v1/admin/runs/cancel",
            &root,
            json!({ "filter": { "state": "succeeded" }, "reason": "nothing to cancel" }),
        )
        .await;
    assert_eq!(
        bulk_cancel.body["failed"][0]["status"], 409,
        "{}",
        bulk_cancel.body
    );

    let audit = api.get("/v1/admin/audit", &root).await;
    let actions: Vec<(String, String, Option<String>)> = audit.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["actor"].as_str().unwrap().into(),
                a["action"].as_str().unwrap().into(),
                a["reason"].as_str().map(Into::into),
            )
        })
        .collect();
    assert!(
        actions.contains(&("root".into(), "cancel".into(), Some("user asked".into()))),
        "{actions:?}"
    );
    assert!(
        actions.iter().any(|a| a.0 == "root" && a.1 == "replay"),
        "{actions:?}"
    );
    assert!(
        actions
            .iter()
            .any(|a| a.0 == "root" && a.1 == "bulk_replay"),
        "{actions:?}"
    );
    assert!(
        actions
            .iter()
            .any(|a| a.0 == "root" && a.1 == "bulk_cancel"),
        "{actions:?}"
    );
    let run = api.get(&format!("/v1/admin/runs/{t3}"), &root).await;
    let history = run.body["history"].as_array().unwrap();
    assert!(history.len() > 3, "{history:?}");
    // `submitted` is read from the run itself, first, naming the submitter.
    assert_eq!(
        (&history[0]["event"], &history[0]["detail"]["by"]),
        (&json!("submitted"), &json!("alice")),
        "{history:?}"
    );
    assert_eq!(
        history.iter().filter(|e| e["event"] == "submitted").count(),
        1
    );
    let times: Vec<&str> = history.iter().map(|e| e["at"].as_str().unwrap()).collect();
    let mut sorted = times.clone();
    sorted.sort_by_key(|t| chrono::DateTime::parse_from_rfc3339(t).unwrap());
    assert_eq!(times, sorted, "history is oldest first");
    // A failed cluster can be terminated.
    let c3 = uuid(&api.get(&format!("/v1/tasks/{t3}"), &alice).await.body["cluster_id"]);
    api.env
        .wait_until("the replayed cluster to fail", T, || async {
            api.get(&format!("/v1/clusters/{c3}"), &alice).await.body["state"] == "failed"
        })
        .await;
    let c = api.get(&format!("/v1/clusters/{c3}"), &alice).await;
    assert!(c.body["state_reason"]
        .as_str()
        .unwrap()
        .contains("fake failure"));
    assert_eq!(
        api.delete(&format!("/v1/clusters/{c3}"), &alice)
            .await
            .status,
        StatusCode::ACCEPTED
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cosmos_api_serves_the_original_shapes_with_basic_keys() {
    let api = Api::start("api_cosmos").await;
    let token = api.user("jsmith", None, false).await;
    let (_, rest) = token.strip_prefix("orr_").unwrap().split_once('_').unwrap();
    let lookup = &token[4..20];
    let basic = orrery_api::auth::basic_header(lookup, rest);
    let call = |m: Method, path: &str, body: Option<Value>, auth: Option<String>| {
        let mut req = api.http.request(m, format!("{}/cosmos/v1{path}", api.base));
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        async move {
            let res = req.send().await.unwrap();
            let status = res.status();
            let location = res
                .headers()
                .get("location")
                .map(|v| v.to_str().unwrap().to_owned());
            (
                status,
                location,
                res.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
    };
    let (s, _, body) = call(Method::GET, "/cluster", None, None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(body["message"].is_string());
    let (s, _, _) = call(
        Method::GET,
        "/cluster",
        None,
        Some(orrery_api::auth::basic_header(lookup, "wrong")),
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);

    let (s, loc, body) = call(
        Method::POST,
        "/cluster",
        Some(json!({ "name": "legacy", "size": 2, "optionalServices": ["PIG"], "shared": false })),
        Some(basic.clone()),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    let id = body["id"].as_str().unwrap().to_owned();
    assert_eq!(
        loc.as_deref(),
        Some(format!("/cosmos/v1/cluster/{id}").as_str())
    );
    assert_eq!(body["state"], "provisioning");
    assert!(body["stateDescription"].is_string());
    let (_, _, list) = call(Method::GET, "/cluster", None, Some(basic.clone())).await;
    assert_eq!(list["clusters"][0]["id"], id.as_str());
    assert!(list["clusters"][0]["creationDate"].is_string());
    let (_, _, one) = call(
        Method::GET,
        &format!("/cluster/{id}"),
        None,
        Some(basic.clone()),
    )
    .await;
    assert_eq!(one["size"], 2);
    assert_eq!(
        one["services"],
        json!(["ZOOKEEPER", "HDFS", "YARN", "MAPREDUCE2", "PIG"])
    );
    assert_eq!(one["users"][0]["username"], "jsmith");
    assert_eq!(one["master"], Value::Null);
    // Same code path as /v1: the task exists and terminate is refused while provisioning.
    let (s, _, body) = call(
        Method::POST,
        &format!("/cluster/{id}/terminate"),
        None,
        Some(basic.clone()),
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert!(
        body["message"].as_str().unwrap().contains("provisioning"),
        "{body}"
    );
    let (s, _, body) = call(
        Method::POST,
        "/cluster",
        Some(json!({ "name": "x", "size": 0 })),
        Some(basic.clone()),
    )
    .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(body["message"].as_str().unwrap().contains("size"));
    let (s, _, body) = call(
        Method::POST,
        "/cluster",
        Some(json!({ "name": "x", "size": 1, "optionalServices": ["NOPE"] })),
        Some(basic.clone()),
    )
    .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(body["message"].as_str().unwrap().contains("NOPE"), "{body}");
    let (s, _, body) = call(
        Method::POST,
        "/cluster",
        Some(json!({ "name": "y", "size": 9 })),
        Some(basic.clone()),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert_eq!(
        body["message"],
        "You can request up to 6 machines at this point."
    );
    let (_, _, services) = call(Method::GET, "/services", None, Some(basic.clone())).await;
    assert_eq!(services, json!(["HIVE", "OOZIE", "PIG", "SQOOP"]));
    let key =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPvF1n1iWOYTKyGnH8TUoBAvnVfv7+6tFH+7mWgeNXL8 j@x";
    let (s, _, profile) = call(
        Method::PUT,
        "/profile",
        Some(json!({ "keys": [{ "name": "default", "signature": key }] })),
        Some(basic.clone()),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{profile}");
    assert_eq!(profile["handle"], "jsmith");
    assert_eq!(profile["keys"][0]["signature"], key);
    let (s, _, _) = call(
        Method::PUT,
        "/profile",
        Some(json!({ "keys": [{ "signature": "junk" }] })),
        Some(basic.clone()),
    )
    .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    let (_, _, info) = call(Method::GET, "/info", None, Some(basic.clone())).await;
    assert_eq!(info["individualQuota"], 8);
    assert_eq!(info["resources"]["individualConsumption"], 2);
    assert_eq!(info["clusters"]["owned"], json!([id]));
    let (_, _, v1) = (0, 0, api.get(&format!("/v1/clusters/{id}"), &token).await);
    assert_eq!(v1.body["name"], "legacy");

    // Once running: the nodes in the original shape, then users added and
    // removed and the cluster terminated, each answered 200.
    api.user("bob", None, false).await;
    let cluster: Uuid = id.parse().unwrap();
    sqlx::query("UPDATE clusters SET state = 'running' WHERE id = $1")
        .bind(cluster)
        .execute(&api.env.pool)
        .await
        .unwrap();
    for (i, host) in ["legacy-1", "legacy-2"].iter().enumerate() {
        sqlx::query("INSERT INTO machines (id, provider, hostname, address, host_key, state, cluster_id) VALUES ($1, 'local', $2, $3, 'k', 'allocated', $4)")
            .bind(Uuid::new_v4())
            .bind(host)
            .bind(format!("10.1.0.{}", i + 1))
            .bind(cluster)
            .execute(&api.env.pool)
            .await
            .unwrap();
    }
    let (_, _, one) = call(
        Method::GET,
        &format!("/cluster/{id}"),
        None,
        Some(basic.clone()),
    )
    .await;
    assert_eq!(
        one["master"],
        json!({ "hostname": "legacy-1", "ipAddress": "10.1.0.1" }),
        "{one}"
    );
    assert_eq!(
        one["slaves"],
        json!([{ "hostname": "legacy-2", "ipAddress": "10.1.0.2" }]),
        "{one}"
    );
    // The cluster was requested before jsmith had a key.
    assert!(
        one["users"][0].as_object().unwrap()["sshPublicKey"].is_null(),
        "{one}"
    );
    assert_eq!(one["users"][0]["isSudoer"], true, "{one}");
    let (s, _, body) = call(
        Method::POST,
        &format!("/cluster/{id}/add_user"),
        Some(json!({ "user": "bob" })),
        Some(basic.clone()),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let (s, _, body) = call(
        Method::POST,
        &format!("/cluster/{id}/add_user"),
        Some(json!({ "user": "nobody" })),
        Some(basic.clone()),
    )
    .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("nobody"),
        "{body}"
    );
    sqlx::query("UPDATE cluster_users SET state = 'active' WHERE cluster_id = $1")
        .bind(cluster)
        .execute(&api.env.pool)
        .await
        .unwrap();
    let (s, _, body) = call(
        Method::POST,
        &format!("/cluster/{id}/remove_user"),
        Some(json!({ "user": "bob" })),
        Some(basic.clone()),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let (s, _, body) = call(
        Method::POST,
        &format!("/cluster/{id}/terminate"),
        None,
        Some(basic.clone()),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let (_, _, one) = call(
        Method::GET,
        &format!("/cluster/{id}"),
        None,
        Some(basic.clone()),
    )
    .await;
    assert_eq!(one["state"], "terminating", "{one}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_events_stream_each_change_until_the_task_finishes() {
    let mut api = Api::start("api_sse").await;
    let alice = api.user("alice", None, false).await;
    let (task, _) = api
        .create(&alice, json!({ "name": "sse", "size": 1 }))
        .await;
    let mut res = api
        .http
        .get(format!("{}/v1/tasks/{task}/events", api.base))
        .header("authorization", format!("Bearer {alice}"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert!(res.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let mut text = String::new();
    let first = tokio::time::timeout(T, res.chunk())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    text.push_str(&String::from_utf8_lossy(&first));
    assert!(
        text.contains("event: task") && text.contains("\"state\":\"queued\""),
        "{text}"
    );
    api.provision_worker();
    let read_all = async {
        while let Some(chunk) = res.chunk().await.unwrap() {
            text.push_str(&String::from_utf8_lossy(&chunk));
        }
        text
    };
    let text = tokio::time::timeout(T, read_all)
        .await
        .expect("the stream ends when the task finishes");
    let states: Vec<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| {
            serde_json::from_str::<Value>(d).unwrap()["state"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(states.first().map(String::as_str), Some("queued"));
    assert_eq!(
        states.last().map(String::as_str),
        Some("succeeded"),
        "{states:?}"
    );
    let bob = api.user("bob", None, false).await;
    let r = api.get(&format!("/v1/tasks/{task}/events"), &bob).await;
    r.assert_problem(404, None);
}

/// A one-route HTTP server that answers 500 `fail` times, then 200; it keeps every request.
async fn flaky_endpoint(
    fail: usize,
) -> (String, Arc<std::sync::Mutex<Vec<(u16, String, String)>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let seen: Arc<std::sync::Mutex<Vec<(u16, String, String)>>> = Arc::default();
    let log = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            // Read headers, then the body by Content-Length.
            let (head, body) = loop {
                let n = sock.read(&mut chunk).await.unwrap_or(0);
                if n == 0 {
                    break (String::new(), String::new());
                }
                buf.extend_from_slice(&chunk[..n]);
                let text = String::from_utf8_lossy(&buf).to_string();
                if let Some(i) = text.find("\r\n\r\n") {
                    let head = text[..i].to_owned();
                    let len: usize = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse().unwrap())
                        })
                        .unwrap_or(0);
                    if buf.len() >= i + 4 + len {
                        break (
                            head,
                            String::from_utf8_lossy(&buf[i + 4..i + 4 + len]).to_string(),
                        );
                    }
                }
            };
            let status = if log.lock().unwrap().len() < fail {
                500
            } else {
                200
            };
            log.lock().unwrap().push((status, head, body));
            let reply =
                format!("HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
            let _ = sock.write_all(reply.as_bytes()).await;
        }
    });
    (url, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callback_that_fails_twice_is_delivered_once_it_succeeds_signed_and_its_attempts_are_visible(
) {
    let mut api = Api::start("api_callback").await;
    let alice = api.user("alice", None, false).await;
    let secret = api.get("/v1/account", &alice).await.body["webhook_secret"]
        .as_str()
        .unwrap()
        .to_owned();
    let (url, seen) = flaky_endpoint(2).await;
    let (task, _) = api
        .create(
            &alice,
            json!({ "name": "hooked", "size": 1, "callback_url": url }),
        )
        .await;
    let t = api.get(&format!("/v1/tasks/{task}"), &alice).await;
    assert_eq!(t.body["callbacks"][0]["state"], "pending");
    assert_eq!(t.body["callbacks"][0]["attempts"], 0);
    api.provision_worker();
    api.wait_task(&alice, task, "succeeded").await;
    api.env
        .wait_until("the callback to be delivered", T, || async {
            api.get(&format!("/v1/tasks/{task}"), &alice).await.body["callbacks"][0]["state"]
                == "delivered"
        })
        .await;
    let t = api.get(&format!("/v1/tasks/{task}"), &alice).await;
    let cb = &t.body["callbacks"][0];
    assert_eq!(cb["attempts"], 3, "{cb}");
    assert_eq!(cb["last_status"], 200);
    assert!(cb["delivered_at"].is_string());
    let requests = seen.lock().unwrap().clone();
    let statuses: Vec<u16> = requests.iter().map(|r| r.0).collect();
    assert_eq!(statuses, [500, 500, 200], "exactly one successful delivery");
    let (_, head, body) = &requests[2];
    let event: Value = serde_json::from_str(body).unwrap();
    assert_eq!(event["type"], "task.finished");
    assert_eq!(event["task"]["id"], task.to_string());
    assert_eq!(event["task"]["state"], "succeeded");
    let header = |name: &str| {
        head.lines()
            .find_map(|l| {
                l.split_once(':')
                    .filter(|(k, _)| k.eq_ignore_ascii_case(name))
                    .map(|(_, v)| v.trim().to_owned())
            })
            .unwrap()
    };
    assert_eq!(header("x-orrery-attempt"), "3");
    let delivery = header("x-orrery-delivery");
    assert!(
        requests.iter().all(|r| r.1.contains(&delivery)),
        "one delivery id across retries"
    );
    let now = chrono::Utc::now().timestamp();
    assert!(orrery_api::callbacks::verify_signature(
        &secret,
        &header("x-orrery-signature"),
        body.as_bytes(),
        now,
        300
    ));
    assert!(!orrery_api::callbacks::verify_signature(
        "wrong",
        &header("x-orrery-signature"),
        body.as_bytes(),
        now,
        300
    ));

    // Routes without a body take their callback in the query; a bad one is
    // refused naming it, and nothing is started.
    let cluster: Uuid = t.body["cluster_id"].as_str().unwrap().parse().unwrap();
    api.delete(
        &format!("/v1/clusters/{cluster}?callback_url=gopher://x"),
        &alice,
    )
    .await
    .assert_problem(422, Some("callback_url"));
    api.delete(&format!("/v1/clusters/{cluster}?callbak=x"), &alice)
        .await
        .assert_problem(400, None);
    let (url, seen) = flaky_endpoint(0).await;
    let r = api
        .delete(
            &format!("/v1/clusters/{cluster}?callback_url={url}"),
            &alice,
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    let terminate: Uuid = r.body["id"].as_str().unwrap().parse().unwrap();
    api.wait_task(&alice, terminate, "succeeded").await;
    api.env
        .wait_until("the termination's callback", T, || async {
            api.get(&format!("/v1/tasks/{terminate}"), &alice)
                .await
                .body["callbacks"][0]["state"]
                == "delivered"
        })
        .await;
    let requests = seen.lock().unwrap().clone();
    assert_eq!(requests.len(), 1);
    let event: Value = serde_json::from_str(&requests[0].2).unwrap();
    assert_eq!(event["task"]["id"], terminate.to_string());
    assert_eq!(event["task"]["kind"], "terminate_cluster");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_metrics_and_an_openapi_document_covering_every_v1_route() {
    let mut api = Api::start("api_meta").await;
    let alice = api.user("alice", None, false).await;
    let (task, _) = api.create(&alice, json!({ "name": "m", "size": 1 })).await;
    assert_eq!(
        api.call(Method::GET, "/healthz", None, None, &[])
            .await
            .status,
        StatusCode::OK
    );
    let ready = api.call(Method::GET, "/readyz", None, None, &[]).await;
    assert_eq!(
        ready.body["checks"],
        json!({ "postgres": "ok", "redis": "ok" })
    );
    let doc = api
        .call(Method::GET, "/v1/openapi.json", None, None, &[])
        .await;
    assert_eq!(doc.body["openapi"], "3.1.0");
    let sample = Uuid::nil().to_string();
    for (method, path, ..) in orrery_api::openapi::OPERATIONS {
        assert!(
            doc.body["paths"][path][method].is_object(),
            "{method} {path} undocumented"
        );
        if *path == "/v1/openapi.json" {
            continue;
        }
        let concrete = path
            .replace("{id}", &sample)
            .replace("{username}", "bob")
            .replace("{name}", "bob");
        let m = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
        let r = api.call(m, &concrete, None, Some(json!({})), &[]).await;
        assert_eq!(
            r.status,
            StatusCode::UNAUTHORIZED,
            "{method} {path}: the route exists and needs a key"
        );
    }
    let metrics = api
        .http
        .get(format!("{}/metrics", api.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(
            "orrery_http_requests_total{method=\"POST\",route=\"/v1/clusters\",status=\"202\"} 1"
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains("orrery_runs{state=\"queued\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("orrery_queue_depth{queue=\"provision\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("orrery_clusters{state=\"provisioning\"} 1"),
        "{metrics}"
    );
    // Once the run has worked: its steps' durations, and the states move.
    api.provision_worker();
    api.wait_task(&alice, task, "succeeded").await;
    let metrics = api
        .http
        .get(format!("{}/metrics", api.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let counted: Vec<(&str, f64)> = metrics
        .lines()
        .filter(|l| {
            l.starts_with("orrery_step_duration_seconds_count{workflow=\"fake.create_cluster\"")
        })
        .filter_map(|l| l.rsplit_once(' ').map(|(k, v)| (k, v.parse().unwrap())))
        .collect();
    assert!(
        !counted.is_empty() && counted.iter().all(|(_, n)| *n >= 1.0),
        "{metrics}"
    );
    assert!(
        metrics.contains("orrery_runs{state=\"succeeded\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("orrery_queue_depth{queue=\"provision\"} 0")
            || !metrics.contains("orrery_queue_depth{queue=\"provision\"}"),
        "{metrics}"
    );
    let _ = &api.app;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_never_spend_the_same_quota_twice() {
    let api = Api::start("api_race").await;
    let alice = api.user("alice", None, false).await;
    let attempts = (0..8).map(|i| {
        let (api, alice) = (&api, &alice);
        async move {
            api.post(
                "/v1/clusters",
                alice,
                json!({ "name": format!("r{i}"), "size": 2 }),
            )
            .await
            .status
        }
    });
    let statuses = futures::future::join_all(attempts).await;
    let accepted = statuses
        .iter()
        .filter(|s| **s == StatusCode::ACCEPTED)
        .count();
    let refused = statuses
        .iter()
        .filter(|s| **s == StatusCode::FORBIDDEN)
        .count();
    assert_eq!(
        (accepted, refused),
        (4, 4),
        "quota 8 holds four clusters of 2: {statuses:?}"
    );
    assert_eq!(
        (api.count("clusters").await, api.count("runs").await),
        (4, 4)
    );
    api.assert_usage_counters_match().await;
}

/// A key the API process has just verified is remembered by admission, but
/// every batch re-checks it in its own statement: a key revoked, or an
/// account disabled, behind the API's back (no request through this
/// process) is refused at its next cluster request, even when that request
/// only repeats an `Idempotency-Key`, and nothing is written for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remembered_key_revoked_behind_the_apis_back_is_refused_at_once() {
    let api = Api::start("api_remembered_keys").await;
    let alice = api.user("alice", None, false).await;
    let bob = api.user("bob", None, false).await;
    let carol = api.user("carol", None, false).await;
    let dave = api.user("dave", None, false).await;
    let idem = [("idempotency-key", "carol-once")];
    for (token, name) in [(&alice, "a"), (&bob, "b"), (&dave, "d")] {
        let r = api
            .post("/v1/clusters", token, json!({ "name": name, "size": 1 }))
            .await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    }
    let carols_request = || {
        api.call(
            Method::POST,
            "/v1/clusters",
            Some(&carol),
            Some(json!({ "name": "c", "size": 1 })),
            &idem,
        )
    };
    let first = carols_request().await;
    assert_eq!(first.status, StatusCode::ACCEPTED, "{}", first.body);
    for sql in [
        "UPDATE api_keys SET revoked_at = now() WHERE user_id IN (SELECT id FROM users WHERE name IN ('alice', 'carol'))",
        "UPDATE users SET disabled_at = now() WHERE name = 'bob'",
    ] {
        sqlx::query(sql).execute(&api.env.pool).await.unwrap();
    }
    // Sent together, so that they can share a batch with Dave's good key.
    let (a, b, d) = tokio::join!(
        api.post("/v1/clusters", &alice, json!({ "name": "a2", "size": 1 })),
        api.post("/v1/clusters", &bob, json!({ "name": "b2", "size": 1 })),
        api.post("/v1/clusters", &dave, json!({ "name": "d2", "size": 1 })),
    );
    a.assert_problem(401, None);
    b.assert_problem(403, None);
    assert_eq!(d.status, StatusCode::ACCEPTED, "{}", d.body);
    carols_request().await.assert_problem(401, None);
    assert_eq!(
        (
            api.count("clusters").await,
            api.count("runs").await,
            api.count("tasks").await
        ),
        (5, 5, 5),
        "four first requests and Dave's second"
    );
    api.assert_usage_counters_match().await;
}

/// Cluster requests have their API keys checked by admission, a batch at a
/// time: each request still gets the answer its own key earns, and only
/// requests with a good key write anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_requests_sent_together_each_get_the_answer_their_key_earns() {
    let api = Api::start("api_batch_keys").await;
    let alice = api.user("alice", None, false).await;
    let bob = api.user("bob", None, false).await;
    let carol = api.user("carol", None, false).await;
    let forged = format!("{}x", &alice[..alice.len() - 1]);
    let unknown = "orr_aaaaaaaaaaaaaaaa_secret".to_owned();
    // Bob's key is revoked and Carol's account disabled behind the API's back.
    sqlx::query("UPDATE api_keys SET revoked_at = now() WHERE user_id = (SELECT id FROM users WHERE name = 'bob')")
        .execute(&api.env.pool)
        .await
        .unwrap();
    sqlx::query("UPDATE users SET disabled_at = now() WHERE name = 'carol'")
        .execute(&api.env.pool)
        .await
        .unwrap();
    let cases = [
        (&alice, 202),
        (&forged, 401),
        (&bob, 401),
        (&carol, 403),
        (&unknown, 401),
        (&alice, 202),
    ];
    for _round in 0..3 {
        let sent = cases.iter().enumerate().map(|(i, (token, _))| {
            let api = &api;
            async move {
                api.post(
                    "/v1/clusters",
                    token,
                    json!({ "name": format!("k{i}"), "size": 1 }),
                )
                .await
            }
        });
        let answers = futures::future::join_all(sent).await;
        for ((_, expected), answer) in cases.iter().zip(&answers) {
            if *expected == 202 {
                assert_eq!(answer.status, StatusCode::ACCEPTED, "{}", answer.body);
            } else {
                answer.assert_problem(*expected, None);
            }
        }
    }
    assert_eq!(
        (
            api.count("clusters").await,
            api.count("runs").await,
            api.count("tasks").await
        ),
        (6, 6, 6),
        "two good requests in each of three rounds"
    );
    // A wrong key is answered 401 before anything about the body.
    api.raw_post("/v1/clusters", &forged, "{ not json")
        .await
        .assert_problem(401, None);
    api.post("/v1/clusters", &bob, json!({ "name": "x", "size": 0 }))
        .await
        .assert_problem(401, None);
    api.post("/v1/clusters", &alice, json!({ "name": "x", "size": 0 }))
        .await
        .assert_problem(422, Some("size"));
    api.assert_usage_counters_match().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_idempotency_key_raced_through_two_api_processes_makes_one_cluster() {
    let roomy = |c: &mut ApiConfig| {
        c.default_quota = 20;
        c.local_capacity = 20;
    };
    let api = Api::with_config("api_idem_race", roomy).await;
    let alice = api.user("alice", None, false).await;
    // A second API process on the same database: its own admission task
    // and connection, so the two race on the idempotency index.
    let redis = redis::Client::open(api.env.redis_url.as_str())
        .unwrap()
        .get_connection_manager()
        .await
        .unwrap();
    let mut config = ApiConfig {
        workflows: ClusterWorkflows::fake(),
        ..ApiConfig::default()
    };
    roomy(&mut config);
    let second = App::new(api.env.rt.engine.clone(), redis, config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let second_base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(orrery_api::serve_app(second, listener, api.stop.clone()));
    let post = |base: String, key: Option<&'static str>, body: Value| {
        let http = api.http.clone();
        let alice = alice.clone();
        async move {
            let mut req = http
                .post(format!("{base}/v1/clusters"))
                .bearer_auth(alice)
                .json(&body);
            if let Some(key) = key {
                req = req.header("idempotency-key", key);
            }
            let res = req.send().await.unwrap();
            let status = res.status();
            (status, res.json::<Value>().await.unwrap())
        }
    };
    let mut calls = Vec::new();
    for i in 0..8 {
        let base = if i % 2 == 0 { &api.base } else { &second_base };
        calls.push(post(
            base.clone(),
            Some("race-1"),
            json!({ "name": "raced", "size": 1 }),
        ));
        // Requests without a key share the batches and must not suffer.
        calls.push(post(
            base.clone(),
            None,
            json!({ "name": format!("other{i}"), "size": 1 }),
        ));
    }
    let answers = futures::future::join_all(calls).await;
    for (status, body) in &answers {
        assert_eq!(*status, StatusCode::ACCEPTED, "{body}");
    }
    let raced: std::collections::HashSet<&str> = answers
        .iter()
        .step_by(2)
        .map(|(_, b)| b["id"].as_str().unwrap())
        .collect();
    assert_eq!(raced.len(), 1, "every keyed request got the same task");
    assert_eq!(
        (api.count("clusters").await, api.count("tasks").await),
        (9, 9),
        "one cluster for the key, one for each request without"
    );
    api.assert_usage_counters_match().await;
}

/// PostgreSQL crashes under the API and comes back. While it is away every
/// request is answered 503 with `Retry-After` and a problem+json body that
/// says to retry (never a 500, never a hang) and /readyz says which server
/// is unreachable; once it is back, the request retried with its
/// Idempotency-Key is accepted, its task completes, and nothing was written
/// twice. A private server, so nothing else is disturbed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_is_answered_503_to_retry_and_the_api_recovers_by_itself() {
    let Some((pg, env)) = support::PrivatePostgres::with_env(
        "a_database_outage_is_answered_503_to_retry_and_the_api_recovers_by_itself",
        "outage",
    )
    .await
    else {
        return;
    };
    let mut api = Api::serve(env, |_| {}).await;
    let token = api.user("ann", None, false).await;
    let (before, _) = api
        .create(&token, json!({ "name": "before", "size": 1 }))
        .await;
    // The request the outage interrupts, sent again as a client would.
    let post_again = || {
        api.call(
            Method::POST,
            "/v1/clusters",
            Some(&token),
            Some(json!({ "name": "during", "size": 1 })),
            &[("idempotency-key", "outage-1")],
        )
    };

    pg.crash();
    let started = std::time::Instant::now();
    let refused = post_again().await;
    refused.assert_problem(503, None);
    assert_eq!(refused.headers["retry-after"], "2");
    assert!(
        refused.body["detail"]
            .as_str()
            .unwrap()
            .contains("Idempotency-Key"),
        "{}",
        refused.body
    );
    assert!(
        !refused.body.to_string().contains("5432"),
        "nothing internal shown: {}",
        refused.body
    );
    let poll = api.get(&format!("/v1/tasks/{before}"), &token).await;
    poll.assert_problem(503, None);
    // Those answers closed the API's database gate: from now on requests are
    // refused at once, not after the pool's 10 s connection timeout (each
    // took 10 s without the gate).
    for _ in 0..5 {
        let asked = std::time::Instant::now();
        let r = api.get(&format!("/v1/tasks/{before}"), &token).await;
        r.assert_problem(503, None);
        assert!(
            asked.elapsed() < Duration::from_secs(2),
            "a request during the outage waited {:?}",
            asked.elapsed()
        );
    }
    // The original platform's API is refused in its own shape.
    let (_, secret) = token.strip_prefix("orr_").unwrap().split_once('_').unwrap();
    let basic = orrery_api::auth::basic_header(&token[4..20], secret);
    let cosmos = api
        .call(
            Method::GET,
            "/cosmos/v1/cluster",
            None,
            None,
            &[("authorization", &basic)],
        )
        .await;
    assert_eq!(
        cosmos.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        cosmos.body
    );
    assert_eq!(cosmos.headers["retry-after"], "2");
    assert!(cosmos.body["message"].is_string(), "{}", cosmos.body);
    let probed = std::time::Instant::now();
    let ready = api.call(Method::GET, "/readyz", None, None, &[]).await;
    assert!(
        probed.elapsed() < Duration::from_secs(2),
        "a readiness probe waited {:?}",
        probed.elapsed()
    );
    assert_eq!(
        ready.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        ready.body
    );
    assert_eq!(
        ready.body["checks"]["postgres"], "unreachable",
        "{}",
        ready.body
    );
    assert_eq!(ready.body["checks"]["redis"], "ok", "{}", ready.body);
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "answers came in {:?}",
        started.elapsed()
    );

    pg.restart().await;
    // A pooled connection cut by the crash fails the one request that gets
    // it (also 503); the client retries, as the answer says.
    let deadline = tokio::time::Instant::now() + T;
    let task = loop {
        let r = post_again().await;
        if r.status == StatusCode::ACCEPTED {
            break uuid(&r.body["id"]);
        }
        r.assert_problem(503, None);
        assert!(
            tokio::time::Instant::now() < deadline,
            "never accepted after the restart: {}",
            r.body
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let again = post_again().await;
    assert_eq!(uuid(&again.body["id"]), task, "{}", again.body);
    api.provision_worker();
    api.wait_task(&token, before, "succeeded").await;
    api.wait_task(&token, task, "succeeded").await;
    assert_eq!(api.count("clusters").await, 2);
    assert_eq!(api.count("tasks").await, 2);
    let ready = api.call(Method::GET, "/readyz", None, None, &[]).await;
    assert_eq!(ready.status, StatusCode::OK, "{}", ready.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creating_a_user_or_group_that_exists_is_a_conflict_naming_it() {
    let api = Api::start("api_dupes").await;
    let op = api.user("olga", None, true).await;
    let group = json!({ "name": "physics" });
    let first = api.post("/v1/admin/groups", &op, group.clone()).await;
    assert!(first.status.is_success(), "{}", first.body);
    let again = api.post("/v1/admin/groups", &op, group).await;
    again.assert_problem(409, None);
    assert!(
        again.body["detail"]
            .as_str()
            .unwrap()
            .contains("a group named physics already exists"),
        "{}",
        again.body
    );
    let user = json!({ "name": "erin", "group": "physics" });
    let first = api.post("/v1/admin/users", &op, user.clone()).await;
    assert!(first.status.is_success(), "{}", first.body);
    let again = api.post("/v1/admin/users", &op, user).await;
    again.assert_problem(409, None);
    assert!(
        again.body["detail"]
            .as_str()
            .unwrap()
            .contains("a user named erin already exists"),
        "{}",
        again.body
    );
    let users: i64 = sqlx::query_scalar("SELECT count(*) FROM users WHERE name = 'erin'")
        .fetch_one(&api.env.pool)
        .await
        .unwrap();
    assert_eq!(users, 1, "the refused request wrote nothing");
}

/// A batch of cluster requests is admitted whole, in one statement, only
/// when `admission_fits` says every request fits (migrations/0014); it must
/// never say so when the request-by-request decision (`quotas::admit` in
/// arrival order, what admission falls back to) would refuse one of them.
/// Checked over 400 generated ledgers and batches (user, group and pool
/// limits, reservations of the caller's and of other groups), each in a
/// transaction rolled back; the fast path must also be taken often enough
/// to matter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_admitted_whole_only_when_each_request_would_be_admitted_in_turn() {
    use orrery_api::quotas::{admit, Ledger};
    let env = TestEnv::new("api_fits").await;
    let (g1, g2, g3) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    for (id, name) in [(g1, "one"), (g2, "two"), (g3, "three")] {
        sqlx::query("INSERT INTO groups (id, name) VALUES ($1, $2)")
            .bind(id)
            .bind(name)
            .execute(&env.pool)
            .await
            .unwrap();
    }
    let users: Vec<(Uuid, Option<Uuid>)> = vec![
        (Uuid::now_v7(), Some(g1)),
        (Uuid::now_v7(), Some(g1)),
        (Uuid::now_v7(), Some(g2)),
        (Uuid::now_v7(), None),
    ];
    for (i, (id, group)) in users.iter().enumerate() {
        sqlx::query("INSERT INTO users (id, name, group_id) VALUES ($1, $2, $3)")
            .bind(id)
            .bind(format!("u{i}"))
            .bind(group)
            .execute(&env.pool)
            .await
            .unwrap();
    }
    // A small deterministic generator: the same cases at every run.
    let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let (mut whole, mut refused_somewhere) = (0, 0);
    for case in 0..400 {
        let config = ApiConfig {
            provider: Provider::Local,
            local_capacity: 4 + next(24) as i64,
            default_quota: 2 + next(10) as i64,
            ..ApiConfig::default()
        };
        let mut conn = env.pool.acquire().await.unwrap();
        sqlx::query("BEGIN").execute(&mut *conn).await.unwrap();
        for (id, quota, reserved) in [
            (
                g1,
                next(3).checked_sub(1).map(|_| 3 + next(10) as i32),
                next(4) as i32,
            ),
            (
                g2,
                next(2).checked_sub(1).map(|_| 2 + next(8) as i32),
                next(5) as i32,
            ),
            (g3, None, next(6) as i32),
        ] {
            sqlx::query(
                "UPDATE groups SET quota_machines = $2, reserved_machines = $3 WHERE id = $1",
            )
            .bind(id)
            .bind(quota)
            .bind(reserved)
            .execute(&mut *conn)
            .await
            .unwrap();
        }
        for (id, group) in &users {
            let quota = (next(3) == 0).then(|| 1 + next(8) as i32);
            sqlx::query("UPDATE users SET quota_machines = $2 WHERE id = $1")
                .bind(id)
                .bind(quota)
                .execute(&mut *conn)
                .await
                .unwrap();
            let used = next(4) as i64;
            for scope in [Some(*id), *group, Some(Uuid::nil())].into_iter().flatten() {
                sqlx::query(
                    "INSERT INTO machine_usage (scope, machines) VALUES ($1, $2)
                     ON CONFLICT (scope) DO UPDATE SET machines = machine_usage.machines + $2",
                )
                .bind(scope)
                .bind(used)
                .execute(&mut *conn)
                .await
                .unwrap();
            }
        }
        let batch: Vec<(Uuid, i64)> = (0..1 + next(6))
            .map(|_| {
                (
                    users[next(users.len() as u64) as usize].0,
                    1 + next(4) as i64,
                )
            })
            .collect();
        let owners: Vec<Uuid> = batch.iter().map(|b| b.0).collect();
        let mut ledger = Ledger::load(&mut conn, &config, &owners).await.unwrap();
        let mut all_admitted = true;
        for (user, size) in &batch {
            match admit(&ledger.standing(*user).unwrap(), *size) {
                Ok(()) => ledger.spend(*user, *size),
                Err(_) => all_admitted = false,
            }
        }
        let fits = sqlx::query_scalar::<_, bool>("SELECT admission_fits($1, $2, 'local', $3, $4)")
            .bind(&owners)
            .bind(batch.iter().map(|b| b.1).collect::<Vec<_>>())
            .bind(config.local_capacity)
            .bind(config.default_quota)
            .fetch_one(&mut *conn)
            .await;
        let fits = match fits {
            Ok(fits) => fits,
            Err(e) => {
                let code = e
                    .as_database_error()
                    .and_then(|d| d.code())
                    .map(|c| c.into_owned());
                assert_eq!(code.as_deref(), Some("OR002"), "case {case}: {e}");
                false
            }
        };
        assert!(
            !fits || all_admitted,
            "case {case}: admitted whole although the request-by-request decision refuses one: {batch:?} under {ledger:?}"
        );
        whole += usize::from(fits);
        refused_somewhere += usize::from(!all_admitted);
        sqlx::query("ROLLBACK").execute(&mut *conn).await.unwrap();
    }
    assert!(
        whole >= 40 && refused_somewhere >= 40,
        "the cases must exercise both sides: {whole} admitted whole, {refused_somewhere} with a refusal"
    );
}
