//! Admission of cluster requests by group commit.
//!
//! Quota and availability must be read and spent atomically across every API
//! process, so admission is serialised by one transaction-scoped lock
//! ([`quotas::lock`]) held until the commit. Admitting one request per
//! transaction would cap the whole installation at one commit (an fsync and a
//! dozen round-trips) per cluster request. Instead each API process hands its
//! cluster requests to [`PIPELINES`] admission tasks; each takes whatever
//! queued up while its previous batch committed and admits it in one
//! transaction, on a connection of its own (generic plans: see
//! [`orrery_workflows::config::connect_dedicated`]):
//!
//! the batch's API keys checked (one query: `/v1` cluster requests arrive
//! with their key unchecked, see [`Requester`]) → idempotency lookups →
//! clusters, accounts, runs, history and tasks written by one multi-row
//! statement ([`write_all`]) → lock → one [`quotas::Ledger`] read (usage counters, not sums
//! over clusters) → each request decided in order, in memory → the rows of
//! refused requests deleted → commit → answers → one Redis push per queue.
//!
//! Writing before locking keeps the lock to two statements and the commit,
//! so one pipeline writes while the other holds it; a refusal costs a delete,
//! which is rare next to admissions.
//!
//! Each request still gets its own answer (202, 403, 422, 503). A batch that
//! fails as a whole (a database error, a concurrent request with the same
//! `Idempotency-Key` committing first) is retried one request per
//! transaction, so one request's failure is never another's; a single
//! request that lost such a race is looked up again and answered with the
//! winner's task. Two requests
//! with the same `Idempotency-Key` in one batch are split: the later one waits
//! for the next batch and finds the first one's task.

use std::{
    collections::HashSet,
    panic::AssertUnwindSafe,
    sync::{Arc, Weak},
};

use axum::http::StatusCode;
use futures::FutureExt;
use orrery_workflows::store;
use serde_json::json;
use sqlx::{Connection, PgConnection};
use tokio::sync::{mpsc, oneshot, Mutex};
use uuid::Uuid;

use crate::{
    app::App,
    auth::{self, Caller, Credentials},
    clusters::ClusterSpec,
    error::{ApiError, ApiResult},
    quotas::{self, Ledger},
    submit::{self, Idempotency, Prepared, Submitted, TaskSpec},
};

/// The most requests one transaction admits: a burst from many clients
/// shares a commit, and the lock is still held for milliseconds only.
const MAX_BATCH: usize = 128;

/// Admission transactions one API process runs at once: while one holds the
/// lock, the other writes its batch (see [`decide_and_write`]).
const PIPELINES: usize = 2;

/// Who asks: a caller already authenticated, or a key the batch checks
/// with the others' keys (one query for the batch instead of one per
/// request, and no other round trip on the request's path).
#[derive(Clone, Debug)]
pub enum Requester {
    Known(Caller),
    Presented(Credentials),
}

/// A cluster request waiting for admission.
struct Request {
    requester: Requester,
    spec: ClusterSpec,
    idem: Option<Idempotency>,
    reply: oneshot::Sender<ApiResult<Submitted>>,
}

/// The handle to this process' admission task.
pub struct Admissions {
    queue: mpsc::UnboundedSender<Request>,
}

impl Admissions {
    /// Start the admission tasks of `app`. They end when the [`App`] is
    /// dropped.
    pub fn start(app: Weak<App>) -> Self {
        let (queue, rx) = mpsc::unbounded_channel();
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..PIPELINES {
            tokio::spawn(run(app.clone(), rx.clone()));
        }
        Admissions { queue }
    }

    /// Admit (or refuse) one cluster request, sharing a transaction with
    /// whatever other requests are waiting.
    pub async fn submit(
        &self,
        requester: Requester,
        spec: ClusterSpec,
        idem: Option<&Idempotency>,
    ) -> ApiResult<Submitted> {
        let (reply, answer) = oneshot::channel();
        let stopped = || {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "not-admitted",
                "this API process could not take the request (shutting down or failing); retry it",
            )
        };
        self.queue
            .send(Request {
                requester,
                spec,
                idem: idem.cloned(),
                reply,
            })
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

/// One admission pipeline: takes whatever is queued (waiting for the
/// first request when nothing is) and admits it as one batch.
async fn run(app: Weak<App>, rx: Arc<Mutex<mpsc::UnboundedReceiver<Request>>>) {
    let mut carried: Vec<Request> = Vec::new();
    let mut conn: Option<PgConnection> = None;
    loop {
        let mut batch = std::mem::take(&mut carried);
        // A pipeline with requests carried over must not wait for the queue:
        // the other pipeline may hold it while waiting for a request.
        let queue = if batch.is_empty() {
            let mut rx = rx.lock().await;
            match rx.recv().await {
                Some(r) => batch.push(r),
                None => return,
            }
            Some(rx)
        } else {
            rx.try_lock().ok()
        };
        if let Some(mut rx) = queue {
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(r) => batch.push(r),
                    Err(_) => break,
                }
            }
        }
        let Some(app) = app.upgrade() else { return };
        let (now, later) = split_repeated_keys(batch);
        carried = later;
        // A bug in one batch must not stop admission for the process'
        // lifetime: its requests are answered 503 (their replies dropped),
        // the connection is replaced, and the next batch goes on.
        let admitted = AssertUnwindSafe(admit_batch(&app, &mut conn, now)).catch_unwind();
        if admitted.await.is_err() {
            tracing::error!("admission batch panicked; its requests were answered 503");
            conn = None;
        }
    }
}

/// Requests repeating an `Idempotency-Key` already in the batch go to the
/// next one, where they find the first request's task. (Before the keys are
/// checked the requester is known by user or by API key; two keys of one
/// user repeating a key in one batch collide at insert, and the batch is
/// then retried one request at a time.)
fn split_repeated_keys(batch: Vec<Request>) -> (Vec<Request>, Vec<Request>) {
    let mut seen = HashSet::new();
    batch.into_iter().partition(|r| match &r.idem {
        None => true,
        Some(i) => {
            let who = match &r.requester {
                Requester::Known(c) => c.user_id.to_string(),
                Requester::Presented(k) => k.lookup.clone(),
            };
            seen.insert((who, i.key.clone()))
        }
    })
}

/// Admit `batch` on `conn`, the admission task's own connection,
/// (re)connecting when there is none; a connection that saw an error is
/// dropped, in case the error was the connection's.
async fn admit_batch(app: &App, conn: &mut Option<PgConnection>, batch: Vec<Request>) {
    let mut decided = decide(app, conn, &batch).await;
    if batch.len() == 1 && decided.as_ref().is_err_and(lost_idempotency_race) {
        // Another transaction committed this request's `Idempotency-Key`
        // while this one wrote (the insert waited for it); the request is
        // now a repeat, which the lookup finds.
        *conn = None;
        decided = decide(app, conn, &batch).await;
    }
    let answers = match decided {
        Ok(answers) => answers,
        Err(err) => {
            *conn = None;
            if batch.len() == 1 {
                vec![Err(err)]
            } else {
                let reason = err
                    .internal
                    .as_ref()
                    .map_or_else(|| err.detail.clone(), |e| format!("{e:#}"));
                tracing::warn!(requests = batch.len(), error = %reason, "admission batch failed; admitting its requests one by one");
                for r in batch {
                    Box::pin(admit_batch(app, conn, vec![r])).await;
                }
                return;
            }
        }
    };
    // Only newly recorded tasks carry runs to dispatch (a repeat has none).
    let dispatch: Vec<(String, Uuid)> = answers
        .iter()
        .flatten()
        .flat_map(|s| s.dispatch.iter().cloned())
        .collect();
    // Answered before the dispatch: the runs are committed, and one whose
    // dispatch is lost (a crash right here, Redis down) is dispatched by the
    // reconciler, as when a dispatch fails.
    for (r, answer) in batch.into_iter().zip(answers) {
        // The client may have gone; its cluster is committed all the same
        // and its Idempotency-Key finds it.
        let _ = r.reply.send(answer);
    }
    submit::dispatch_all(app, &dispatch).await;
}

async fn decide(
    app: &App,
    conn: &mut Option<PgConnection>,
    batch: &[Request],
) -> ApiResult<Vec<ApiResult<Submitted>>> {
    let db = match conn {
        Some(db) => db,
        None => conn.insert(orrery_workflows::config::connect_dedicated(&app.pool).await?),
    };
    decide_and_write(app, db, batch).await
}

fn lost_idempotency_race(err: &ApiError) -> bool {
    err.internal
        .as_ref()
        .and_then(|e| e.downcast_ref::<sqlx::Error>())
        .is_some_and(submit::is_idempotency_race)
}

/// One transaction for the whole batch: an answer per request.
///
/// Everything a request writes is written before the admission lock is
/// taken, so the lock is held only to read the ledger, decide, withdraw the
/// rows of refused requests (rare) and commit, while another pipeline writes
/// its batch. The usage counters follow at commit (a deferred trigger), so
/// the ledger read under the lock counts only committed clusters.
async fn decide_and_write(
    app: &App,
    conn: &mut PgConnection,
    batch: &[Request],
) -> ApiResult<Vec<ApiResult<Submitted>>> {
    let mut tx = conn.begin().await?;
    let (callers, mut answers) = identify(app, &mut tx, batch).await?;
    repeats(&mut tx, batch, &callers, &mut answers).await?;
    let mut written: Vec<Admitted<'_>> = Vec::new();
    for (index, ((r, caller), answer)) in batch
        .iter()
        .zip(&callers)
        .zip(answers.iter_mut())
        .enumerate()
    {
        let (None, Some(caller)) = (&answer, caller) else {
            continue;
        };
        let cluster_id = Uuid::now_v7();
        let task = TaskSpec {
            kind: "create_cluster",
            workflow: &app.config.workflows.create,
            input: json!({ "cluster_id": cluster_id }),
            cluster_id: Some(cluster_id),
            callback_url: r.spec.callback_url.as_deref(),
        };
        match submit::prepare(app, caller, task, r.idem.as_ref()) {
            Ok(task) => written.push(Admitted {
                index,
                request: r,
                caller,
                cluster_id,
                task,
            }),
            Err(e) => *answer = Some(Err(e)),
        }
    }
    if written.is_empty() {
        tx.commit().await?;
        return Ok(answered(answers));
    }
    write_all(&mut tx, &written).await?;

    quotas::lock(&mut tx).await?;
    let users: Vec<Uuid> = written.iter().map(|a| a.caller.user_id).collect();
    let mut ledger = Ledger::load(&mut tx, &app.config, &users).await?;
    let mut refused: Vec<&Admitted<'_>> = Vec::new();
    for a in &written {
        let size = i64::from(a.request.spec.size);
        let verdict = match ledger.standing(a.caller.user_id) {
            None => Err(ApiError::unauthorized("this account no longer exists")),
            Some(standing) => quotas::admit(&standing, size).map_err(|refusal| {
                ApiError::new(StatusCode::FORBIDDEN, "quota-exceeded", refusal.message)
                    .with("can_request", refusal.can_request)
                    .with("reason", refusal.reason)
            }),
        };
        match verdict {
            Ok(()) => {
                ledger.spend(a.caller.user_id, size);
                answers[a.index] = Some(Ok(a.task.submitted()));
            }
            Err(e) => {
                answers[a.index] = Some(Err(e));
                refused.push(a);
            }
        }
    }
    if !refused.is_empty() {
        withdraw(&mut tx, &refused).await?;
    }
    tx.commit().await?;
    Ok(answered(answers))
}

fn answered(answers: Vec<Option<ApiResult<Submitted>>>) -> Vec<ApiResult<Submitted>> {
    answers
        .into_iter()
        .map(|a| a.expect("every request of a committed batch is answered"))
        .collect()
}

/// Delete what refused requests wrote: their runs with their history (no
/// foreign key there, migrations/0005_hot_path_keys.sql) and, by cascade,
/// their task and callback rows; then their clusters (with their accounts).
async fn withdraw(conn: &mut PgConnection, refused: &[&Admitted<'_>]) -> Result<(), sqlx::Error> {
    let runs: Vec<Uuid> = refused.iter().flat_map(|a| a.task.run_ids()).collect();
    let clusters: Vec<Uuid> = refused.iter().map(|a| a.cluster_id).collect();
    sqlx::query(
        "WITH history AS (DELETE FROM run_history WHERE run_id = ANY($1))
         DELETE FROM runs WHERE id = ANY($1)",
    )
    .bind(&runs)
    .execute(&mut *conn)
    .await?;
    sqlx::query("DELETE FROM clusters WHERE id = ANY($1)")
        .bind(&clusters)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// A request whose rows are written, admitted unless the ledger refuses it.
struct Admitted<'a> {
    /// Its place in the batch.
    index: usize,
    request: &'a Request,
    caller: &'a Caller,
    cluster_id: Uuid,
    task: Prepared,
}

/// Each request's caller, its API key checked now if it came unchecked
/// (one query for the batch); a refused key is the request's answer.
async fn identify(
    app: &App,
    conn: &mut PgConnection,
    batch: &[Request],
) -> ApiResult<(Vec<Option<Caller>>, Vec<Option<ApiResult<Submitted>>>)> {
    let presented: Vec<&Credentials> = batch
        .iter()
        .filter_map(|r| match &r.requester {
            Requester::Presented(key) => Some(key),
            Requester::Known(_) => None,
        })
        .collect();
    let mut verdicts = if presented.is_empty() {
        Vec::new()
    } else {
        auth::verify_all(conn, &app.pool, &presented).await?
    }
    .into_iter();
    let mut callers = Vec::with_capacity(batch.len());
    let mut answers = Vec::with_capacity(batch.len());
    for r in batch {
        let verdict = match &r.requester {
            Requester::Known(caller) => Ok(caller.clone()),
            Requester::Presented(_) => verdicts.next().expect("a verdict per presented key"),
        };
        match verdict {
            Ok(caller) => {
                callers.push(Some(caller));
                answers.push(None);
            }
            Err(refused) => {
                callers.push(None);
                answers.push(Some(Err(refused)));
            }
        }
    }
    Ok((callers, answers))
}

/// The answers known before admission: requests whose `Idempotency-Key`
/// names an existing task (the same task, or 422 when the key came with a
/// different request).
async fn repeats(
    conn: &mut PgConnection,
    batch: &[Request],
    callers: &[Option<Caller>],
    answers: &mut [Option<ApiResult<Submitted>>],
) -> ApiResult<()> {
    // `existing` asks the database only for requests with a key.
    for ((r, caller), answer) in batch.iter().zip(callers).zip(answers.iter_mut()) {
        let (None, Some(caller)) = (&answer, caller) else {
            continue;
        };
        match submit::existing(&mut *conn, caller, r.idem.as_ref()).await {
            Ok(Some(s)) => *answer = Some(Ok(s)),
            Ok(None) => {}
            Err(e) if e.status == StatusCode::UNPROCESSABLE_ENTITY => *answer = Some(Err(e)),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Everything the written requests record, in one statement: their runs
/// and task rows ([`submit`]'s CTEs) and their clusters with an account on
/// each for the owner (and, when shared, for every active member of the
/// owner's group). Foreign keys between them are checked at its end.
async fn write_all(conn: &mut PgConnection, written: &[Admitted<'_>]) -> Result<(), sqlx::Error> {
    let tasks: Vec<&Prepared> = written.iter().map(|a| &a.task).collect();
    let runs = submit::runs_of(&tasks);
    let clusters_first = 1 + store::RUNS_CTE_PARAMS + submit::TASKS_CTE_PARAMS;
    let sql = format!(
        "WITH {}, {}, {} SELECT 1",
        store::runs_cte(1),
        submit::tasks_cte(1 + store::RUNS_CTE_PARAMS),
        clusters_cte(clusters_first)
    );
    let query = store::bind_runs(sqlx::query(&sql), &runs);
    let query = submit::bind_tasks(query, &tasks);
    bind_clusters(query, written).execute(conn).await?;
    Ok(())
}

/// Parameters of [`clusters_cte`].
const CLUSTERS_CTE_PARAMS: usize = 9;

/// The CTEs inserting clusters and their accounts, parameters from `$first`
/// ([`CLUSTERS_CTE_PARAMS`] of them, bound by [`bind_clusters`]).
fn clusters_cte(first: usize) -> String {
    let p = store::placeholders(first, CLUSTERS_CTE_PARAMS);
    format!(
        "new_clusters AS (
            INSERT INTO clusters (id, name, owner_id, group_id, size, services, shared,
                                  expires_at, state, run_id)
            SELECT id, name, owner, grp, size, ARRAY(SELECT jsonb_array_elements_text(svc)),
                   shared, now() + make_interval(secs => ttl), 'provisioning', run_id
            FROM unnest({}::uuid[], {}::text[], {}::uuid[], {}::uuid[], {}::int[], {}::jsonb[],
                        {}::bool[], {}::float8[], {}::uuid[])
                 AS t(id, name, owner, grp, size, svc, shared, ttl, run_id)
            RETURNING id, owner_id, group_id, shared
         ),
         members AS (
            SELECT c.id AS cluster_id, c.owner_id AS user_id, true AS sudoer FROM new_clusters c
            UNION ALL
            SELECT c.id, u.id, false
            FROM new_clusters c JOIN users u ON c.shared AND u.group_id = c.group_id
                                   AND u.id <> c.owner_id AND u.disabled_at IS NULL
         ),
         new_accounts AS (
            INSERT INTO cluster_users (cluster_id, username, user_id, public_key, is_sudoer)
            SELECT m.cluster_id, u.name, u.id,
                   (SELECT string_agg(k.public_key, E'\\n' ORDER BY k.created_at)
                    FROM ssh_keys k WHERE k.user_id = u.id),
                   m.sudoer
            FROM members m JOIN users u ON u.id = m.user_id
         )",
        p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8]
    )
}

/// Bind the parameters of [`clusters_cte`] for `admitted`, in order.
fn bind_clusters<'q>(
    query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    admitted: &'q [Admitted<'_>],
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    query
        .bind(admitted.iter().map(|a| a.cluster_id).collect::<Vec<_>>())
        .bind(
            admitted
                .iter()
                .map(|a| a.request.spec.name.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            admitted
                .iter()
                .map(|a| a.caller.user_id)
                .collect::<Vec<_>>(),
        )
        .bind(
            admitted
                .iter()
                .map(|a| a.caller.group_id)
                .collect::<Vec<_>>(),
        )
        .bind(
            admitted
                .iter()
                .map(|a| a.request.spec.size)
                .collect::<Vec<_>>(),
        )
        .bind(
            admitted
                .iter()
                .map(|a| json!(a.request.spec.services))
                .collect::<Vec<_>>(),
        )
        .bind(
            admitted
                .iter()
                .map(|a| a.request.spec.shared)
                .collect::<Vec<_>>(),
        )
        .bind(
            admitted
                .iter()
                .map(|a| a.request.spec.ttl_seconds.map(|s| s as f64))
                .collect::<Vec<_>>(),
        )
        .bind(admitted.iter().map(|a| a.task.run_id()).collect::<Vec<_>>())
}
