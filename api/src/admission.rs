//! Admission of cluster requests by group commit.
//!
//! Quota and availability must be read and spent atomically across every API
//! process, so admission is serialised by one transaction-scoped advisory
//! lock (taken by `admission_fits` or `admission_ledger`,
//! migrations/0010 and 0014) held until the commit. Admitting one request
//! per transaction would cap the whole installation at one commit (an fsync
//! and several round trips) per cluster request. Instead each API process
//! hands its cluster requests to [`PIPELINES`] admission task; it takes
//! whatever queued up while its previous batch committed and admits it as a
//! whole, on a connection of its own (generic plans: see
//! [`orrery_workflows::config::connect_dedicated`]):
//!
//! the batch's API keys checked (one query, none for keys verified lately:
//! `/v1` cluster requests arrive with their key unchecked, see
//! [`Requester`] and [`auth::VerifiedKeys`]) → idempotency lookups (only
//! for requests with a key) → one statement ([`admit_all`]) that re-checks
//! the remembered keys, takes the lock, checks that every request fits
//! within every bound and writes the clusters, accounts, runs and tasks,
//! committed as it ends → answers. The runs are pushed to Redis by one more
//! task ([`push`]), so the pipeline goes on to its next batch without
//! waiting for Redis.
//!
//! A batch that does not fit whole (near a limit) is decided request by
//! request in a transaction: one statement ([`write_all`]) writes its rows,
//! then takes the lock and reads the [`quotas::Ledger`] (usage counters,
//! not sums over clusters) → each request decided in order, in memory
//! ([`quotas::admit`]) → the rows of refused requests deleted → commit.
//! Writing before locking keeps the lock there to the ledger read, the
//! decision and the commit.
//!
//! Each request still gets its own answer (202, 403, 422, 503). A batch that
//! fails as a whole (a database error, a concurrent request with the same
//! `Idempotency-Key` committing first) is retried one request at a time, so
//! one request's failure is never another's; a single request that lost
//! such a race is looked up again and answered with the winner's task. Two
//! requests with the same `Idempotency-Key` in one batch are split: the
//! later one waits for the next batch and finds the first one's task.

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
    app::{ApiConfig, App},
    auth::{self, Caller, Credentials, Recheck},
    clusters::ClusterSpec,
    error::{ApiError, ApiResult},
    quotas::{self, Ledger},
    submit::{self, Idempotency, Prepared, Submitted, TaskSpec},
};

/// The most requests one transaction admits: a burst from many clients
/// shares a commit, and the lock is still held for milliseconds only.
const MAX_BATCH: usize = 128;

/// Admission tasks one API process runs at once. With a batch at one round
/// trip ([`admit_all`]) one pipeline gathers larger batches and admits more
/// per second than two taking turns on the lock (`orrery-bench-api`,
/// docs/BENCHMARKS.md, session 13).
const PIPELINES: usize = 1;

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

/// The handle to this process' admission tasks.
pub struct Admissions {
    queue: mpsc::UnboundedSender<Request>,
    /// Keys the batches verified lately (see [`auth::VerifiedKeys`]).
    keys: auth::VerifiedKeys,
}

/// Runs of committed batches, on their way to Redis: (queue, run).
type Dispatches = mpsc::UnboundedSender<Vec<(String, Uuid)>>;

impl Admissions {
    /// Start the admission tasks of `app`. They end when the [`App`] is
    /// dropped.
    pub fn start(app: Weak<App>) -> Self {
        let (queue, rx) = mpsc::unbounded_channel();
        let rx = Arc::new(Mutex::new(rx));
        let (dispatches, committed) = mpsc::unbounded_channel();
        for _ in 0..PIPELINES {
            tokio::spawn(run(app.clone(), rx.clone(), dispatches.clone()));
        }
        tokio::spawn(push(app, committed));
        Admissions {
            queue,
            keys: auth::VerifiedKeys::default(),
        }
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

/// Push the runs of committed batches to Redis, whatever has accumulated
/// since the last push at once. The pipelines answer and go on without
/// waiting for it (a push is two Redis scripts, about a fifth of a batch's
/// time). A push that fails, or that is lost with the process, leaves
/// committed runs undispatched, which the reconciler dispatches as it does
/// after any failed dispatch.
async fn push(app: Weak<App>, mut committed: mpsc::UnboundedReceiver<Vec<(String, Uuid)>>) {
    while let Some(mut runs) = committed.recv().await {
        while let Ok(more) = committed.try_recv() {
            runs.extend(more);
        }
        let Some(app) = app.upgrade() else { return };
        submit::dispatch_all(&app, &runs).await;
    }
}

/// One admission pipeline: takes whatever is queued (waiting for the
/// first request when nothing is) and admits it as one batch.
async fn run(
    app: Weak<App>,
    rx: Arc<Mutex<mpsc::UnboundedReceiver<Request>>>,
    dispatches: Dispatches,
) {
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
        let admitted =
            AssertUnwindSafe(admit_batch(&app, &mut conn, now, &dispatches)).catch_unwind();
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
async fn admit_batch(
    app: &App,
    conn: &mut Option<PgConnection>,
    batch: Vec<Request>,
    dispatches: &Dispatches,
) {
    let mut decided = decide(app, conn, &batch).await;
    if decided.as_ref().is_err_and(stale_key) {
        // A key this process remembered no longer holds (revoked, its user
        // disabled or moved): forget the batch's keys and check them anew.
        *conn = None;
        app.admissions
            .keys
            .forget(batch.iter().filter_map(|r| match &r.requester {
                Requester::Presented(key) => Some(key.lookup.as_str()),
                Requester::Known(_) => None,
            }));
        decided = decide(app, conn, &batch).await;
    }
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
                    Box::pin(admit_batch(app, conn, vec![r], dispatches)).await;
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
    if !dispatch.is_empty() && dispatches.send(dispatch).is_err() {
        tracing::warn!(
            "the admission push task has stopped; the reconciler will dispatch these runs"
        );
    }
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

/// The error `admission_recheck` raises when a remembered key no longer
/// holds (migrations/0010_admission_ledger.sql).
fn stale_key(err: &ApiError) -> bool {
    database_error(err).is_some_and(|e| sqlstate(e, "OR001"))
}

/// The database error behind `err`, if that is what it is.
fn database_error(err: &ApiError) -> Option<&sqlx::Error> {
    err.internal
        .as_ref()
        .and_then(|e| e.downcast_ref::<sqlx::Error>())
}

/// Whether `err` is the database error with SQLSTATE `code`.
fn sqlstate(err: &sqlx::Error, code: &str) -> bool {
    err.as_database_error()
        .is_some_and(|e| e.code().as_deref() == Some(code))
}

fn lost_idempotency_race(err: &ApiError) -> bool {
    database_error(err).is_some_and(submit::is_idempotency_race)
}

/// The whole batch: an answer per request.
///
/// Keys and `Idempotency-Key` repeats are read first (reads, outside any
/// transaction). Then the batch is admitted whole by one statement when it
/// fits within every bound ([`admit_all`], one round trip that commits by
/// itself); otherwise, near a limit, it is decided request by request in a
/// transaction: everything a request writes is written before the
/// admission lock is taken, so the lock is held only to read the ledger,
/// decide, withdraw the rows of refused requests and commit. The batch's
/// clusters are added to the usage counters when its statement ends, after
/// the ledger read (a statement trigger, migrations/0011), so the ledger
/// counts only committed clusters and the batch is spent in memory.
async fn decide_and_write(
    app: &App,
    conn: &mut PgConnection,
    batch: &[Request],
) -> ApiResult<Vec<ApiResult<Submitted>>> {
    let Identified {
        callers,
        mut answers,
        rechecks,
    } = identify(app, &mut *conn, batch).await?;
    repeats(&mut *conn, batch, &callers, &mut answers).await?;
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
        // Nothing to write, so no statement re-checks the remembered keys
        // of the batch's repeats and refusals: check them on their own.
        if !rechecks.is_empty() {
            bind_rechecks(
                sqlx::query("SELECT admission_recheck($1, $2, $3, $4)"),
                &rechecks,
            )
            .execute(&mut *conn)
            .await?;
        }
        return Ok(answered(answers));
    }
    match admit_all(&mut *conn, &app.config, &written, &rechecks).await {
        Ok(()) => {
            for a in &written {
                answers[a.index] = Some(Ok(a.task.submitted()));
            }
            return Ok(answered(answers));
        }
        Err(e) if sqlstate(&e, "OR002") => {}
        Err(e) => return Err(e.into()),
    }
    let mut tx = conn.begin().await?;
    let users: Vec<Uuid> = written.iter().map(|a| a.caller.user_id).collect();
    let mut ledger = write_all(&mut tx, &app.config, &written, &users, &rechecks).await?;
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

/// Delete what refused requests wrote: their runs (which have no history
/// yet: `submitted` is read from the run) and, by cascade, their task and
/// callback rows; then their accounts and clusters (no foreign key between
/// those, migrations/0013_admission_keys.sql).
async fn withdraw(conn: &mut PgConnection, refused: &[&Admitted<'_>]) -> Result<(), sqlx::Error> {
    let runs: Vec<Uuid> = refused.iter().flat_map(|a| a.task.run_ids()).collect();
    let clusters: Vec<Uuid> = refused.iter().map(|a| a.cluster_id).collect();
    sqlx::query("DELETE FROM runs WHERE id = ANY($1)")
        .bind(&runs)
        .execute(&mut *conn)
        .await?;
    sqlx::query(
        "WITH accounts AS (DELETE FROM cluster_users WHERE cluster_id = ANY($1))
         DELETE FROM clusters WHERE id = ANY($1)",
    )
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
/// (one query for the batch, none for keys this process verified lately,
/// which the batch's statement re-checks: the [`Recheck`]s); a refused key
/// is the request's answer.
async fn identify(app: &App, conn: &mut PgConnection, batch: &[Request]) -> ApiResult<Identified> {
    let keys = &app.admissions.keys;
    let mut remembered: Vec<Option<Caller>> = Vec::with_capacity(batch.len());
    let mut rechecks = Vec::new();
    let mut presented: Vec<&Credentials> = Vec::new();
    for r in batch {
        let known = match &r.requester {
            Requester::Presented(key) => match keys.get(key) {
                Some((caller, recheck)) => {
                    rechecks.push(recheck);
                    Some(caller)
                }
                None => {
                    presented.push(key);
                    None
                }
            },
            Requester::Known(caller) => Some(caller.clone()),
        };
        remembered.push(known);
    }
    let mut verdicts = if presented.is_empty() {
        Vec::new()
    } else {
        auth::verify_all(conn, &app.pool, &presented).await?
    }
    .into_iter();
    let mut callers = Vec::with_capacity(batch.len());
    let mut answers = Vec::with_capacity(batch.len());
    for (r, known) in batch.iter().zip(remembered) {
        let verdict = match (known, &r.requester) {
            (Some(caller), _) => Ok(caller),
            (None, Requester::Presented(key)) => {
                let verdict = verdicts.next().expect("a verdict per presented key");
                if let Ok(caller) = &verdict {
                    keys.remember(key, caller);
                }
                verdict
            }
            (None, Requester::Known(_)) => unreachable!("a known caller is always remembered"),
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
    Ok(Identified {
        callers,
        answers,
        rechecks,
    })
}

/// What [`identify`] found.
struct Identified {
    callers: Vec<Option<Caller>>,
    answers: Vec<Option<ApiResult<Submitted>>>,
    /// Remembered keys, for the batch's statement to check again.
    rechecks: Vec<Recheck>,
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
/// owner's group). Of their foreign keys only the tasks' runs are checked, at its end
/// (migrations/0013_admission_keys.sql).
///
/// Once every row is inserted the same statement takes the admission lock
/// and reads the quota ledger of `users` under it (`admission_ledger`,
/// migrations/0010_admission_ledger.sql): the lock is taken after the
/// writes, so it is held only for the read, the decision and the commit,
/// and neither costs a round trip of its own.
async fn write_all(
    conn: &mut PgConnection,
    cfg: &ApiConfig,
    written: &[Admitted<'_>],
    users: &[Uuid],
    rechecks: &[Recheck],
) -> Result<Ledger, sqlx::Error> {
    let p = store::placeholders(INSERTS_PARAMS + 1, 7);
    // Every CTE is counted so that all of them have run when the ledger is
    // called with the count (an unread CTE would run after the main query,
    // with the lock held). The remembered keys are re-checked before it
    // (`admission_recheck` fails the statement when one no longer holds).
    let sql = format!(
        "WITH {}
         SELECT l.* FROM (SELECT (SELECT count(*) FROM new_runs)
                                + (SELECT count(*) FROM new_tasks) + (SELECT count(*) FROM new_callbacks)
                                + (SELECT count(*) FROM new_clusters) + (SELECT count(*) FROM new_accounts)
                                + admission_recheck({}, {}, {}, {})
                                AS n) w,
                         LATERAL admission_ledger(w.n, {}, {}, {}) l",
        inserts(),
        p[0], p[1], p[2], p[3], p[4], p[5], p[6],
    );
    let query = bind_rechecks(bind_inserts(sqlx::query(&sql), written), rechecks);
    let rows = Ledger::bind(query, cfg, users).fetch_all(conn).await?;
    Ledger::from_rows(cfg, &rows)
}

/// Admit the whole batch at once, outside any transaction: one statement
/// that re-checks the remembered keys, takes the admission lock, checks that
/// every request fits (`admission_fits`, migrations/0014_admission_fits.sql)
/// and writes what [`write_all`] writes, committed as it ends. The main
/// query runs before the unread insert CTEs, so when a key no longer holds
/// (OR001) or the batch does not fit (OR002) the statement fails before
/// writing anything.
async fn admit_all(
    conn: &mut PgConnection,
    cfg: &ApiConfig,
    written: &[Admitted<'_>],
    rechecks: &[Recheck],
) -> Result<(), sqlx::Error> {
    let p = store::placeholders(INSERTS_PARAMS + 1, 9);
    let sql = format!(
        "WITH {}
         SELECT admission_recheck({}, {}, {}, {}), admission_fits({}, {}, {}, {}, {})",
        inserts(),
        p[0],
        p[1],
        p[2],
        p[3],
        p[4],
        p[5],
        p[6],
        p[7],
        p[8],
    );
    let query = bind_rechecks(bind_inserts(sqlx::query(&sql), written), rechecks);
    query
        .bind(written.iter().map(|a| a.caller.user_id).collect::<Vec<_>>())
        .bind(
            written
                .iter()
                .map(|a| i64::from(a.request.spec.size))
                .collect::<Vec<_>>(),
        )
        .bind(cfg.provider.name())
        .bind(cfg.local_capacity)
        .bind(cfg.default_quota)
        .execute(conn)
        .await?;
    Ok(())
}

/// Parameters of [`inserts`].
const INSERTS_PARAMS: usize =
    store::RUNS_CTE_PARAMS + submit::TASKS_CTE_PARAMS + CLUSTERS_CTE_PARAMS;

/// The insert CTEs of a batch's rows: runs and task rows ([`submit`]'s
/// CTEs), clusters and accounts ([`clusters_cte`]), from `$1`.
fn inserts() -> String {
    format!(
        "{}, {}, {}",
        store::runs_cte(1),
        submit::tasks_cte(1 + store::RUNS_CTE_PARAMS),
        clusters_cte(1 + store::RUNS_CTE_PARAMS + submit::TASKS_CTE_PARAMS)
    )
}

/// Bind the parameters of [`inserts`] for `written`.
fn bind_inserts<'q>(
    query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    written: &'q [Admitted<'_>],
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    let tasks: Vec<&Prepared> = written.iter().map(|a| &a.task).collect();
    let runs = submit::runs_of(&tasks);
    let query = store::bind_runs(query, &runs);
    let query = submit::bind_tasks(query, &tasks);
    bind_clusters(query, written)
}

/// Bind the four arrays `admission_recheck` takes.
fn bind_rechecks<'q>(
    query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    rechecks: &'q [Recheck],
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    query
        .bind(
            rechecks
                .iter()
                .map(|r| r.lookup.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            rechecks
                .iter()
                .map(|r| r.secret_sha256.as_slice())
                .collect::<Vec<_>>(),
        )
        .bind(rechecks.iter().map(|r| r.user_id).collect::<Vec<_>>())
        .bind(rechecks.iter().map(|r| r.group_id).collect::<Vec<_>>())
}

/// Parameters of [`clusters_cte`].
const CLUSTERS_CTE_PARAMS: usize = 10;

/// The CTEs inserting clusters and their accounts, parameters from `$first`
/// ([`CLUSTERS_CTE_PARAMS`] of them, bound by [`bind_clusters`]). The
/// owner's account takes the owner's name from the batch, so only the
/// members of a shared cluster's group are looked up in `users` (by the
/// group's index): a plan fixed on the admission connection never scans
/// every user.
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
            SELECT o.cluster_id, o.user_id, o.name, true AS sudoer
            FROM unnest({}::uuid[], {}::uuid[], {}::text[]) AS o(cluster_id, user_id, name)
            UNION ALL
            SELECT c.id, u.id, u.name, false
            FROM new_clusters c JOIN users u ON c.shared AND u.group_id = c.group_id
                                   AND u.id <> c.owner_id AND u.disabled_at IS NULL
         ),
         new_accounts AS (
            INSERT INTO cluster_users (cluster_id, username, user_id, public_key, is_sudoer)
            SELECT m.cluster_id, m.name, m.user_id,
                   (SELECT string_agg(k.public_key, E'\\n' ORDER BY k.created_at)
                    FROM ssh_keys k WHERE k.user_id = m.user_id),
                   m.sudoer
            FROM members m
            RETURNING 1
         )",
        p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8], p[0], p[2], p[9]
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
        .bind(
            admitted
                .iter()
                .map(|a| a.caller.name.as_str())
                .collect::<Vec<_>>(),
        )
}
