//! Recording intent: every long operation (create, terminate, grant, revoke)
//! becomes a run plus a `tasks` row written in the caller's transaction, with
//! an optional webhook delivery run, and is dispatched only after commit.
//! `Idempotency-Key` is honoured here for all of them.

use axum::{
    http::{header, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use orrery_workflows::store::{self, NewRun};
use serde_json::{json, Value};
use sqlx::{PgConnection, Row};
use uuid::Uuid;

use crate::{
    app::App,
    auth::{sha256, Caller},
    error::{ApiError, ApiResult},
};

/// What an accepted request created (or, on an idempotent repeat, had created).
#[derive(Debug, Clone)]
pub struct Submitted {
    pub task_id: Uuid,
    pub kind: String,
    pub cluster_id: Option<Uuid>,
    pub state: String,
    /// An `Idempotency-Key` repeat: nothing new was created.
    pub repeated: bool,
    /// Runs to dispatch once the transaction is committed.
    pub(crate) dispatch: Vec<(String, Uuid)>,
}

/// An `Idempotency-Key` with the fingerprint of the request it came with.
#[derive(Debug, Clone)]
pub struct Idempotency {
    pub key: String,
    pub request_sha256: Vec<u8>,
}

impl Idempotency {
    pub fn new(key: Option<String>, route: &str, body: &Value) -> Option<Self> {
        key.map(|key| Idempotency {
            key,
            request_sha256: sha256(&format!("{route}\n{body}")),
        })
    }
}

/// The task an `Idempotency-Key` already names, if any; a key reused for a
/// different request is refused (422) rather than silently answered.
pub async fn existing(
    conn: &mut PgConnection,
    caller: &Caller,
    idem: Option<&Idempotency>,
) -> ApiResult<Option<Submitted>> {
    let Some(idem) = idem else { return Ok(None) };
    let row = sqlx::query(
        "SELECT t.run_id, t.kind, t.cluster_id, t.request_sha256, r.state
         FROM tasks t JOIN runs r ON r.id = t.run_id
         WHERE t.user_id = $1 AND t.idempotency_key = $2",
    )
    .bind(caller.user_id)
    .bind(&idem.key)
    .fetch_optional(conn)
    .await?;
    let Some(row) = row else { return Ok(None) };
    let stored: Option<Vec<u8>> = row.try_get("request_sha256")?;
    if stored.as_deref() != Some(idem.request_sha256.as_slice()) {
        let mut e = ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "idempotency-key-reused",
            "this Idempotency-Key was already used for a different request; use a new key for a new request",
        );
        e.field = Some("Idempotency-Key".into());
        return Err(e);
    }
    Ok(Some(Submitted {
        task_id: row.try_get("run_id")?,
        kind: row.try_get("kind")?,
        cluster_id: row.try_get("cluster_id")?,
        state: row.try_get("state")?,
        repeated: true,
        dispatch: Vec::new(),
    }))
}

/// What one task needs recorded.
pub struct TaskSpec<'a> {
    pub kind: &'a str,
    pub workflow: &'a str,
    pub input: Value,
    pub cluster_id: Option<Uuid>,
    pub callback_url: Option<&'a str>,
}

/// A task ready to be written by [`write`]: its run, its `tasks` row and,
/// when asked, a webhook delivery run. Building it checks the workflow and
/// its input, so a batch only writes what is known to be valid.
pub struct Prepared {
    run: NewRun,
    user_id: Uuid,
    kind: String,
    cluster_id: Option<Uuid>,
    idem: Option<Idempotency>,
    callback: Option<Callback>,
}

struct Callback {
    id: Uuid,
    url: String,
    delivery: NewRun,
}

/// Build (without writing) what [`write`] records for `spec`.
pub fn prepare(
    app: &App,
    caller: &Caller,
    spec: TaskSpec<'_>,
    idem: Option<&Idempotency>,
) -> ApiResult<Prepared> {
    let run = app
        .engine
        .new_run(spec.workflow, spec.input, Some(&caller.name))
        .map_err(|e| match e {
            orrery_workflows::EngineError::UnknownWorkflow(w) => {
                let mut err = ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not-available",
                    "this installation cannot perform that operation right now; try again later",
                );
                err.internal = Some(anyhow::anyhow!("workflow `{w}` is not registered"));
                err
            }
            other => other.into(),
        })?;
    let callback = match spec.callback_url {
        None => None,
        Some(url) => {
            let id = Uuid::now_v7();
            let delivery = app
                .engine
                .new_run(
                    &app.config.workflows.callback,
                    json!({ "callback_id": id }),
                    Some(&caller.name),
                )
                .map_err(|e| {
                    let mut err = ApiError::invalid(
                        "callback_url",
                        "callbacks are not available on this installation; poll the task or use its events instead",
                    );
                    err.internal = Some(e.into());
                    err
                })?;
            Some(Callback {
                id,
                url: url.to_owned(),
                delivery,
            })
        }
    };
    Ok(Prepared {
        run,
        user_id: caller.user_id,
        kind: spec.kind.to_owned(),
        cluster_id: spec.cluster_id,
        idem: idem.cloned(),
        callback,
    })
}

impl Prepared {
    pub fn run_id(&self) -> Uuid {
        self.run.id
    }

    /// Every run [`write`] records for this task (the task's, the webhook
    /// delivery's).
    pub fn run_ids(&self) -> impl Iterator<Item = Uuid> + '_ {
        std::iter::once(self.run.id).chain(self.callback.as_ref().map(|c| c.delivery.id))
    }

    /// The task as answered once [`write`] is committed.
    pub fn submitted(&self) -> Submitted {
        let mut dispatch = vec![(self.run.queue.clone(), self.run.id)];
        if let Some(c) = &self.callback {
            dispatch.push((c.delivery.queue.clone(), c.delivery.id));
        }
        Submitted {
            task_id: self.run.id,
            kind: self.kind.clone(),
            cluster_id: self.cluster_id,
            state: "queued".into(),
            repeated: false,
            dispatch,
        }
    }
}

/// Write the runs, task rows and webhook deliveries of `items`: one
/// statement however many there are. Nothing is dispatched; see [`finish`]
/// and [`dispatch_all`].
pub async fn write(conn: &mut PgConnection, items: &[&Prepared]) -> Result<(), sqlx::Error> {
    let runs = runs_of(items);
    let sql = format!(
        "WITH {}, {} SELECT 1",
        store::runs_cte(1),
        tasks_cte(1 + store::RUNS_CTE_PARAMS)
    );
    let query = store::bind_runs(sqlx::query(&sql), &runs);
    bind_tasks(query, items).execute(&mut *conn).await?;
    Ok(())
}

/// Every run `items` record: each task's and each webhook delivery's.
pub(crate) fn runs_of<'a>(items: &[&'a Prepared]) -> Vec<&'a NewRun> {
    items
        .iter()
        .flat_map(|p| std::iter::once(&p.run).chain(p.callback.as_ref().map(|c| &c.delivery)))
        .collect()
}

/// Parameters of [`tasks_cte`].
pub(crate) const TASKS_CTE_PARAMS: usize = 11;

/// The CTEs inserting the `tasks` and `callbacks` rows of a batch, their
/// parameters numbered from `$first` (bound by [`bind_tasks`]); the runs
/// they name are inserted by the same statement
/// ([`store::runs_cte`]), whose foreign keys are checked at its end.
pub(crate) fn tasks_cte(first: usize) -> String {
    let p = store::placeholders(first, TASKS_CTE_PARAMS);
    format!(
        "new_tasks AS (
            INSERT INTO tasks (run_id, user_id, cluster_id, kind, idempotency_key, request_sha256)
            SELECT * FROM unnest({}::uuid[], {}::uuid[], {}::uuid[], {}::text[], {}::text[], {}::bytea[])
            RETURNING 1
         ),
         new_callbacks AS (
            INSERT INTO callbacks (id, task_run_id, user_id, url, delivery_run_id)
            SELECT * FROM unnest({}::uuid[], {}::uuid[], {}::uuid[], {}::text[], {}::uuid[])
            RETURNING 1
         )",
        p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8], p[9], p[10]
    )
}

/// Bind the parameters of [`tasks_cte`] for `items`, in order.
pub(crate) fn bind_tasks<'q>(
    query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    items: &[&'q Prepared],
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    let callbacks: Vec<(&Prepared, &Callback)> = items
        .iter()
        .filter_map(|p| p.callback.as_ref().map(|c| (*p, c)))
        .collect();
    query
        .bind(items.iter().map(|p| p.run.id).collect::<Vec<_>>())
        .bind(items.iter().map(|p| p.user_id).collect::<Vec<_>>())
        .bind(items.iter().map(|p| p.cluster_id).collect::<Vec<_>>())
        .bind(items.iter().map(|p| p.kind.as_str()).collect::<Vec<_>>())
        .bind(
            items
                .iter()
                .map(|p| p.idem.as_ref().map(|i| i.key.as_str()))
                .collect::<Vec<_>>(),
        )
        .bind(
            items
                .iter()
                .map(|p| p.idem.as_ref().map(|i| i.request_sha256.clone()))
                .collect::<Vec<_>>(),
        )
        .bind(callbacks.iter().map(|(_, c)| c.id).collect::<Vec<_>>())
        .bind(callbacks.iter().map(|(p, _)| p.run.id).collect::<Vec<_>>())
        .bind(callbacks.iter().map(|(p, _)| p.user_id).collect::<Vec<_>>())
        .bind(
            callbacks
                .iter()
                .map(|(_, c)| c.url.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            callbacks
                .iter()
                .map(|(_, c)| c.delivery.id)
                .collect::<Vec<_>>(),
        )
}

/// Insert the run, its task row and, when asked, a webhook delivery run.
/// Returns the task; nothing is dispatched until [`finish`].
pub async fn record(
    conn: &mut PgConnection,
    app: &App,
    caller: &Caller,
    spec: TaskSpec<'_>,
    idem: Option<&Idempotency>,
) -> ApiResult<Submitted> {
    let prepared = prepare(app, caller, spec, idem)?;
    write(conn, &[&prepared]).await?;
    Ok(prepared.submitted())
}

/// Tell the workers about committed runs: one push per queue. A failure is
/// only logged: the runs are committed and the reconciler dispatches them.
pub async fn dispatch_all<'a>(app: &App, runs: impl IntoIterator<Item = &'a (String, Uuid)>) {
    let mut by_queue: Vec<(&str, Vec<Uuid>)> = Vec::new();
    for (queue, run_id) in runs {
        match by_queue.iter_mut().find(|(q, _)| q == queue) {
            Some((_, ids)) => ids.push(*run_id),
            None => by_queue.push((queue, vec![*run_id])),
        }
    }
    for (queue, ids) in by_queue {
        if let Err(err) = app.engine.dispatcher.dispatch_many(queue, &ids).await {
            tracing::warn!(queue, runs = ids.len(), error = %err, "dispatch failed; the reconciler will retry it");
        }
    }
}

/// Commit, then dispatch. A concurrent request with the same
/// `Idempotency-Key` that committed first wins: its task is returned.
pub async fn finish(
    app: &App,
    tx: sqlx::Transaction<'static, sqlx::Postgres>,
    submitted: Submitted,
    caller: &Caller,
    idem: Option<&Idempotency>,
) -> ApiResult<Submitted> {
    match tx.commit().await {
        Ok(()) => {}
        Err(e) if is_idempotency_race(&e) => {
            let mut conn = app.pool.acquire().await?;
            if let Some(s) = existing(&mut conn, caller, idem).await? {
                return Ok(s);
            }
            return Err(e.into());
        }
        Err(e) => return Err(e.into()),
    }
    dispatch_all(app, &submitted.dispatch).await;
    Ok(submitted)
}

/// A unique violation on the idempotency index (raised at insert or commit).
pub fn is_idempotency_race(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.constraint() == Some("tasks_idempotency"))
}

/// Run `record` and map an idempotency race at insert time to the winner.
pub async fn record_or_existing(
    conn: &mut PgConnection,
    app: &App,
    caller: &Caller,
    spec: TaskSpec<'_>,
    idem: Option<&Idempotency>,
) -> ApiResult<Result<Submitted, Submitted>> {
    match record(conn, app, caller, spec, idem).await {
        Ok(s) => Ok(Ok(s)),
        Err(e)
            if e.internal
                .as_ref()
                .and_then(|i| i.downcast_ref::<sqlx::Error>())
                .is_some_and(is_idempotency_race) =>
        {
            let mut fresh = app.pool.acquire().await?;
            match existing(&mut fresh, caller, idem).await? {
                Some(s) => Ok(Err(s)),
                None => Err(e),
            }
        }
        Err(e) => Err(e),
    }
}

pub fn task_href(id: Uuid) -> String {
    format!("/v1/tasks/{id}")
}

/// The body of a `202 Accepted`.
pub fn task_ref(s: &Submitted) -> Value {
    json!({
        "id": s.task_id,
        "href": task_href(s.task_id),
        "kind": s.kind,
        "state": s.state,
        "cluster_id": s.cluster_id,
        "cluster_href": s.cluster_id.map(|c| format!("/v1/clusters/{c}")),
        "events_href": format!("{}/events", task_href(s.task_id)),
    })
}

/// `202 Accepted`, `Location: /v1/tasks/{id}`, the task as body.
pub fn accepted(s: &Submitted) -> Response {
    let mut res = (StatusCode::ACCEPTED, Json(task_ref(s))).into_response();
    if let Ok(v) = HeaderValue::from_str(&task_href(s.task_id)) {
        res.headers_mut().insert(header::LOCATION, v);
    }
    if s.repeated {
        res.headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    res
}
