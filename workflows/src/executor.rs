//! The executor: what a worker does with one dispatch.
//!
//! It claims the run (lease + fencing token), then drives it: runs the step
//! at the cursor under its timeout and the run's cancellation token, commits
//! the outcome through the [`CheckpointWriter`] as one transition, and goes
//! on inline while the next step is on the same queue. A step on another
//! queue is handed over with a dispatch; a waiting step parks the run and
//! frees the worker. A heartbeat extends the lease while a step runs; if the
//! lease is lost (the worker was paused past it and someone else claimed the
//! run) every later write is refused by the fence and the worker walks away.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use chrono::Utc;
use futures::StreamExt;
use serde_json::Value;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use crate::{
    batch::Failed,
    config::EngineConfig,
    dispatch::Dispatcher,
    error::{EngineError, StepError},
    hold::{ClaimHolder, Held, HeldClaim},
    lifecycle::{self, replay::ReplayOutcome, Cursor, Next, Timing},
    state::RunState,
    store::{self, Beat, ClaimedRun, NewRun, ReplayRequest},
    workflow::{Progress, Registry, Services, StepBody, StepCtx, Workflow},
    writer::{CheckpointWriter, RunUpdate},
};

/// Signals shared between a driven run, its heartbeat and the cancel listener.
#[derive(Default)]
struct RunSignals {
    token: CancellationToken,
    cancel_requested: AtomicBool,
    lease_lost: AtomicBool,
}

/// One per process: the engine's state and its external systems.
pub struct Engine {
    pub pool: PgPool,
    pub registry: Arc<Registry>,
    /// External systems steps reach through `ctx.service::<T>()`.
    pub services: Arc<Services>,
    /// Where dispatches go (Redis through apalis in every real process).
    pub dispatcher: Arc<dyn Dispatcher>,
    pub config: EngineConfig,
    /// Unique per process: hostname, pid and a random suffix.
    pub worker_id: Arc<str>,
    /// Commits the process' transitions and makes its batched claims.
    writer: CheckpointWriter,
    /// Claims made while nothing else is in flight, held for the first write.
    holder: ClaimHolder,
    timing: Timing,
    /// Runs this process is driving, so a cancel NOTIFY reaches their step.
    inflight: Mutex<HashMap<Uuid, Arc<RunSignals>>>,
    /// Process shutdown: stop between steps and hand runs back.
    shutdown: CancellationToken,
    /// Dispatches being handled right now, so shutdown can wait for them.
    active: std::sync::atomic::AtomicUsize,
}

/// Counts a dispatch as active for as long as it is handled.
struct ActiveGuard<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Removes a run from the in-flight map however its drive ends.
struct InflightGuard<'a> {
    engine: &'a Engine,
    run_id: Uuid,
}

impl Drop for InflightGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut map) = self.engine.inflight.lock() {
            map.remove(&self.run_id);
        }
    }
}

pub fn new_worker_id() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "host".into());
    let suffix = Uuid::new_v4().simple().to_string();
    format!("{host}-{}-{}", std::process::id(), &suffix[..8])
}

/// Commit a held claim alone, if there is one still open.
async fn settle(held: Option<&HeldClaim>) -> Result<(), EngineError> {
    match held {
        Some(h) => h.settle().await,
        None => Ok(()),
    }
}

enum Guarded<T> {
    Finished(Result<T, StepError>),
    /// Cancelled (or lease lost) and the grace period ran out: the step was dropped.
    Abandoned,
}

/// Run a step future under its timeout; once `token` fires it gets `grace` to return.
async fn guarded<T, F: std::future::Future<Output = Result<T, StepError>>>(
    fut: F,
    timeout: Duration,
    token: &CancellationToken,
    grace: Duration,
) -> Guarded<T> {
    let timed = tokio::time::timeout(timeout, fut);
    tokio::pin!(timed);
    let flatten = move |r: Result<Result<T, StepError>, tokio::time::error::Elapsed>| {
        r.unwrap_or_else(|_| Err(StepError::Retryable(format!("timed out after {timeout:?}"))))
    };
    tokio::select! {
        r = &mut timed => Guarded::Finished(flatten(r)),
        _ = token.cancelled() => match tokio::time::timeout(grace, &mut timed).await {
            Ok(r) => Guarded::Finished(flatten(r)),
            Err(_) => Guarded::Abandoned,
        },
    }
}

impl Engine {
    /// `services` gets the pool added; steps find it with `ctx.service::<PgPool>()`.
    pub fn new(
        pool: PgPool,
        registry: Arc<Registry>,
        mut services: Services,
        dispatcher: Arc<dyn Dispatcher>,
        config: EngineConfig,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        services.insert(pool.clone());
        let timing = Timing {
            lease: config.lease,
            stuck_queued: config.stuck_queued,
        };
        let longest = registry
            .names()
            .filter_map(|n| registry.latest(n))
            .flat_map(|wf| wf.steps.iter().map(|s| s.timeout).collect::<Vec<_>>())
            .max()
            .unwrap_or(Duration::from_secs(300));
        let worker_id: String = new_worker_id();
        // Stuck bound set at claim time, before the step is known: the longest
        // step timeout of any registered workflow, plus leases.
        let claim_stuck_in = timing.running(longest);
        Arc::new(Engine {
            writer: CheckpointWriter::spawn(pool.clone(), &worker_id, config.lease, claim_stuck_in),
            holder: ClaimHolder::new(
                pool.clone(),
                config.claim_hold,
                &worker_id,
                config.lease,
                claim_stuck_in,
            ),
            pool,
            registry,
            services: Arc::new(services),
            dispatcher,
            worker_id: worker_id.into(),
            timing,
            config,
            inflight: Mutex::new(HashMap::new()),
            shutdown,
            active: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    pub fn shutdown_token(&self) -> &CancellationToken {
        &self.shutdown
    }

    /// After shutdown was requested: wait until every dispatch being handled
    /// has committed its current step and handed its run back, or `timeout`
    /// passes (a step still running then is reclaimed once its lease expires).
    /// Returns how many were still active.
    pub async fn drain(&self, timeout: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let active = self.active.load(Ordering::SeqCst);
            if active == 0 || tokio::time::Instant::now() >= deadline {
                return active;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Build (but do not write) a run of the newest version of `workflow`,
    /// validating its input; for callers that insert it in their own transaction.
    pub fn new_run(
        &self,
        workflow: &str,
        input: Value,
        created_by: Option<&str>,
    ) -> Result<NewRun, EngineError> {
        let wf = self
            .registry
            .latest(workflow)
            .ok_or_else(|| EngineError::UnknownWorkflow(workflow.to_owned()))?;
        wf.check_input(&input)
            .map_err(|message| EngineError::InvalidInput {
                workflow: workflow.to_owned(),
                message,
            })?;
        Ok(NewRun {
            id: Uuid::now_v7(),
            workflow: wf.name.clone(),
            workflow_version: wf.version,
            input,
            queue: wf.steps[0].queue.clone(),
            created_by: created_by.map(str::to_owned),
            stuck_in: self.timing.stuck_queued,
        })
    }

    /// Record a run, then dispatch it. The dispatch may fail (Redis down):
    /// the run is committed and the reconciler will dispatch it.
    pub async fn submit(
        &self,
        workflow: &str,
        input: Value,
        created_by: Option<&str>,
    ) -> Result<Uuid, EngineError> {
        let run = self.new_run(workflow, input, created_by)?;
        let mut conn = self.pool.acquire().await?;
        store::insert_run(&mut conn, &run).await?;
        drop(conn);
        self.dispatch_or_log(&run.queue, run.id).await;
        Ok(run.id)
    }

    pub async fn cancel(
        &self,
        run_id: Uuid,
        by: &str,
        reason: Option<&str>,
    ) -> Result<(), EngineError> {
        let outcome = store::request_cancel(&self.pool, run_id, by, reason).await?;
        // Signal in this process too, in case the run is driven here.
        self.signal_cancel(run_id);
        if !outcome.running {
            self.dispatch_or_log(&outcome.queue, run_id).await;
        }
        Ok(())
    }

    pub async fn replay(
        &self,
        run_id: Uuid,
        req: &ReplayRequest,
        by: &str,
    ) -> Result<ReplayOutcome, EngineError> {
        let outcome = lifecycle::replay::replay(
            &self.pool,
            &self.registry,
            run_id,
            req,
            by,
            self.timing.stuck_queued,
        )
        .await?;
        self.dispatch_or_log(&outcome.queue, run_id).await;
        Ok(outcome)
    }

    pub async fn dispatch_or_log(&self, queue: &str, run_id: Uuid) {
        if let Err(err) = self.dispatcher.dispatch(queue, run_id).await {
            tracing::warn!(%run_id, queue, error = %err, "dispatch failed; the reconciler will retry it");
        }
    }

    fn signal_cancel(&self, run_id: Uuid) {
        let signals = self
            .inflight
            .lock()
            .ok()
            .and_then(|m| m.get(&run_id).cloned());
        if let Some(signals) = signals {
            signals.cancel_requested.store(true, Ordering::SeqCst);
            signals.token.cancel();
        }
    }

    /// Listen for cancel requests made by any process (API, CLI, another
    /// worker) and fire the token of the matching run driven here. Missed
    /// notifications are caught by the next heartbeat.
    pub fn spawn_cancel_listener(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let engine = self.clone();
        tokio::spawn(async move {
            loop {
                let mut listener = match sqlx::postgres::PgListener::connect_with(&engine.pool)
                    .await
                {
                    Ok(l) => l,
                    Err(err) => {
                        tracing::warn!(error = %err, "cancel listener cannot connect; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                };
                if let Err(err) = listener.listen("orrery_cancel").await {
                    tracing::warn!(error = %err, "cannot LISTEN orrery_cancel; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
                loop {
                    tokio::select! {
                        _ = engine.shutdown.cancelled() => return,
                        msg = listener.recv() => match msg {
                            Ok(n) => {
                                if let Ok(run_id) = n.payload().parse::<Uuid>() {
                                    engine.signal_cancel(run_id);
                                }
                            }
                            Err(err) => {
                                tracing::warn!(error = %err, "cancel listener lost its connection");
                                break;
                            }
                        },
                    }
                }
            }
        })
    }

    /// Handle one dispatch from `queue`. Never fails: whatever goes wrong is
    /// logged, and PostgreSQL still says what is left to do.
    pub async fn handle(self: &Arc<Self>, queue: &str, run_id: Uuid) {
        self.active.fetch_add(1, Ordering::SeqCst);
        let _active = ActiveGuard(&self.active);
        let span = tracing::info_span!("run", %run_id, queue, workflow = tracing::field::Empty, step = tracing::field::Empty);
        async {
            if let Err(err) = self.claim_and_drive(queue, run_id).await {
                tracing::error!(error = %err, "run interrupted by an engine error; it will be reclaimed");
            }
        }
        .instrument(span)
        .await
    }

    async fn claim_and_drive(&self, queue: &str, run_id: Uuid) -> Result<(), EngineError> {
        let (claimed, held) = self.claim(run_id).await?;
        let Some(claimed) = claimed else {
            let state: Option<String> = sqlx::query_scalar("SELECT state FROM runs WHERE id = $1")
                .bind(run_id)
                .fetch_optional(&self.pool)
                .await?;
            match state {
                None => tracing::warn!("dispatch names an unknown run; dropped"),
                Some(state) => tracing::debug!(
                    state,
                    "run not claimable now (finished, leased or not due); dropped"
                ),
            }
            return Ok(());
        };
        tracing::Span::current().record("workflow", claimed.workflow.as_str());
        let Some(wf) = self
            .registry
            .get(&claimed.workflow, claimed.workflow_version)
        else {
            tracing::error!(
                workflow = claimed.workflow,
                version = claimed.workflow_version,
                "this worker does not know the run's workflow; lease released for a worker that does"
            );
            settle(held.as_ref()).await?;
            store::release(&self.pool, run_id, claimed.fence, &self.worker_id).await?;
            return Ok(());
        };
        if claimed.queue != queue {
            tracing::warn!(
                expected = claimed.queue,
                "dispatch arrived on the wrong queue; forwarding"
            );
            settle(held.as_ref()).await?;
            store::release(&self.pool, run_id, claimed.fence, &self.worker_id).await?;
            self.dispatch_or_log(&claimed.queue, run_id).await;
            return Ok(());
        }
        let signals = Arc::new(RunSignals::default());
        if claimed.cancel_requested {
            signals.cancel_requested.store(true, Ordering::SeqCst);
        }
        self.inflight
            .lock()
            .map_err(|_| EngineError::Dispatch("in-flight map poisoned".into()))?
            .insert(run_id, signals.clone());
        let _guard = InflightGuard {
            engine: self,
            run_id,
        };
        let heartbeat = self.spawn_heartbeat(&claimed, signals.clone());
        let result = self.drive(&wf, claimed, &signals, held.as_ref()).await;
        heartbeat.abort();
        // A drive that ended before its first write leaves the claim as a
        // committed one would be: leased until it expires.
        settle(held.as_ref()).await?;
        result
    }

    fn spawn_heartbeat(
        &self,
        run: &ClaimedRun,
        signals: Arc<RunSignals>,
    ) -> tokio::task::JoinHandle<()> {
        let (pool, owner, lease) = (self.pool.clone(), self.worker_id.clone(), self.config.lease);
        let (run_id, fence) = (run.id, run.fence);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(lease / 3);
            tick.tick().await;
            loop {
                tick.tick().await;
                match store::heartbeat(&pool, run_id, fence, &owner, lease).await {
                    Ok(Beat::Held { cancel_requested }) => {
                        if cancel_requested
                            && !signals.cancel_requested.swap(true, Ordering::SeqCst)
                        {
                            signals.token.cancel();
                        }
                    }
                    Ok(Beat::Lost) => {
                        tracing::warn!(%run_id, "lease lost: another worker owns the run now");
                        signals.lease_lost.store(true, Ordering::SeqCst);
                        signals.token.cancel();
                        return;
                    }
                    Err(err) => tracing::warn!(%run_id, error = %err, "heartbeat failed; retrying"),
                }
            }
        })
    }

    async fn drive(
        &self,
        wf: &Workflow,
        claimed: ClaimedRun,
        signals: &RunSignals,
        mut held: Option<&HeldClaim>,
    ) -> Result<(), EngineError> {
        let mut c = Cursor::from_claim(&claimed, &self.worker_id);
        let mut outputs = claimed.outputs.clone();
        let input = Arc::new(claimed.input.clone());
        // A run found `running` had a worker die (or stall) in the middle of its step.
        let mut interrupted =
            claimed.prev_state == RunState::Running && claimed.state == RunState::Running;
        let mut step_started_at = claimed.step_started_at;
        loop {
            if signals.lease_lost.load(Ordering::SeqCst) {
                return Ok(());
            }
            if signals.cancel_requested.load(Ordering::SeqCst) && c.cancel.is_none() {
                c.cancel = Some(self.cancel_info(c.run_id).await?);
            }
            if held.is_some()
                && c.state != RunState::Compensating
                && matches!(
                    wf.steps.get(c.cursor as usize).map(|s| &s.body),
                    Some(StepBody::FanOut { .. })
                )
            {
                // Item checkpoints are fenced by the committed claim.
                settle(held.take()).await?;
            }
            let started_at = Utc::now();
            let (update, next, done_output) = if c.state == RunState::Compensating {
                let (u, n) = self
                    .compensate(wf, &c, &input, &outputs, signals, started_at)
                    .await;
                (u, n, None)
            } else if c.cancel.is_some() {
                let (u, n) = lifecycle::cancel_observed(&c, wf, self.timing);
                (u, n, None)
            } else {
                self.forward(
                    wf,
                    &c,
                    &input,
                    &outputs,
                    signals,
                    interrupted,
                    step_started_at,
                    started_at,
                )
                .await
            };
            if signals.lease_lost.load(Ordering::SeqCst) {
                return Ok(());
            }
            // The view after the write, computed before the update moves
            // into the writer (no per-step copy of the step's output).
            let mut next_c = c.clone();
            next_c.apply(&update);
            let done_step = update.checkpoint.as_ref().map(|ck| ck.step.clone());
            // The first write goes into a held claim's transaction, unless
            // the window already committed the claim alone.
            let in_held = match held.take() {
                Some(h) => h.commit_with(&update).await,
                None => None,
            };
            let applied = match in_held {
                Some(applied) => applied,
                None => self.commit(update).await?,
            };
            if !applied {
                tracing::warn!("fence moved: lease lost, nothing committed");
                return Ok(());
            }
            if let (Some(out), Some(step)) = (done_output, done_step) {
                outputs.insert(step, out);
            }
            if next_c.cursor != c.cursor {
                step_started_at = None;
            }
            interrupted = false;
            c = next_c;
            match next {
                Next::Continue if self.shutdown.is_cancelled() => {
                    let (u, next) = lifecycle::yield_run(&c, self.timing);
                    if self.commit(u).await? {
                        if let Next::Handoff { queue } = next {
                            self.dispatch_or_log(&queue, c.run_id).await;
                        }
                    }
                    return Ok(());
                }
                Next::Continue => continue,
                Next::Handoff { queue } => {
                    self.dispatch_or_log(&queue, c.run_id).await;
                    return Ok(());
                }
                Next::Park { wake_in } => {
                    self.dispatch_later(c.queue.clone(), c.run_id, wake_in);
                    return Ok(());
                }
                Next::Finished => {
                    tracing::info!(state = %c.state, error = c.error.as_deref(), "run finished");
                    return Ok(());
                }
            }
        }
    }

    /// Commit a transition through the writer. While the database cannot be
    /// reached (a restart, a failover), the same write is sent again (see
    /// [`Outage`]): the worker still holds the run, and a step that finished
    /// is not run again because its checkpoint could not be written at that
    /// moment. A write whose first send committed but whose answer was lost
    /// is recognised by its id and not applied twice. Past the lease, or on
    /// any other error, the run is left to be reclaimed.
    async fn commit(&self, update: RunUpdate) -> Result<bool, EngineError> {
        let mut outage = Outage::new(self.config.lease);
        let mut update = update;
        loop {
            match self.writer.write(update).await {
                Ok(applied) => return Ok(applied),
                Err(Failed {
                    error: EngineError::Unavailable(why),
                    request: Some(again),
                }) if outage.wait(&why, &self.shutdown).await => {
                    update = RunUpdate {
                        resent: true,
                        ..again
                    };
                }
                Err(failed) => return Err(failed.error),
            }
        }
    }

    /// Claim the run. A process with nothing else in flight holds the
    /// claim open for the run's first write ([`crate::hold`]); otherwise
    /// (or when that cannot be done now) the claim goes through the
    /// checkpoint writer's batches, asking again while the database cannot be reached (see
    /// [`Outage`]), so a dispatch that arrives during an outage runs once it
    /// ends instead of waiting for the reconciler. Every send carries the
    /// same claim id, so a claim whose commit happened but whose answer was
    /// lost gets its run on the next send.
    async fn claim(&self, run_id: Uuid) -> Result<Held, EngineError> {
        // One id for every send of this claim (see `CheckpointWriter::claim`).
        let claim_id = Uuid::now_v7();
        // This dispatch is the only one being handled.
        if self.active.load(Ordering::SeqCst) == 1 {
            if let Some(held) = self.holder.claim(run_id, claim_id).await {
                return Ok(held);
            }
        }
        let mut outage = Outage::new(self.config.lease);
        loop {
            match self.writer.claim(run_id, claim_id).await {
                Err(EngineError::Unavailable(why)) if outage.wait(&why, &self.shutdown).await => {}
                other => return other.map(|run| (run, None)),
            }
        }
    }

    async fn cancel_info(&self, run_id: Uuid) -> Result<(String, Option<String>), EngineError> {
        let row: (Option<String>, Option<String>) =
            sqlx::query_as("SELECT cancel_requested_by, cancel_reason FROM runs WHERE id = $1")
                .bind(run_id)
                .fetch_one(&self.pool)
                .await?;
        Ok((row.0.unwrap_or_else(|| "unknown".into()), row.1))
    }

    /// A local timer for a parked run; if this process dies first, the
    /// reconciler dispatches it instead.
    fn dispatch_later(&self, queue: String, run_id: Uuid, after: Duration) {
        let dispatcher = self.dispatcher.clone();
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(after) => {
                    if let Err(err) = dispatcher.dispatch(&queue, run_id).await {
                        tracing::warn!(%run_id, error = %err, "delayed dispatch failed; the reconciler will retry it");
                    }
                }
                _ = shutdown.cancelled() => {}
            }
        });
    }

    fn ctx(
        &self,
        c: &Cursor,
        step: &str,
        input: &Arc<Value>,
        outputs: &HashMap<String, Value>,
        token: CancellationToken,
    ) -> StepCtx {
        StepCtx {
            run_id: c.run_id,
            step: step.to_owned(),
            attempt: c.attempt as u32 + 1,
            polls: c.polls.max(0) as u32,
            worker_id: self.worker_id.clone(),
            cancel: token,
            input: input.clone(),
            outputs: Arc::new(outputs.clone()),
            services: self.services.clone(),
        }
    }

    /// Run the step at the cursor and turn its outcome into a transition.
    #[allow(clippy::too_many_arguments)]
    async fn forward(
        &self,
        wf: &Workflow,
        c: &Cursor,
        input: &Arc<Value>,
        outputs: &HashMap<String, Value>,
        signals: &RunSignals,
        interrupted: bool,
        step_started_at: Option<chrono::DateTime<Utc>>,
        started_at: chrono::DateTime<Utc>,
    ) -> (RunUpdate, Next, Option<Value>) {
        let step = &wf.steps[c.cursor as usize];
        tracing::Span::current().record("step", step.name.as_str());
        let fail = |e: StepError| {
            let (u, n) = lifecycle::step_failed(c, wf, &e, started_at, self.timing);
            (u, n, None)
        };
        if interrupted && !step.repeatable {
            return fail(StepError::fatal(format!(
                "step `{}` was interrupted by a worker failure and is not safe to repeat",
                step.name
            )));
        }
        if let (Some(deadline), Some(first)) = (step.wait_deadline, step_started_at) {
            let waited = (Utc::now() - first).to_std().unwrap_or_default();
            if waited > deadline {
                return fail(StepError::fatal(format!(
                    "step `{}` still not done after waiting {:?} (deadline {deadline:?})",
                    step.name, waited
                )));
            }
        }
        let ctx = self.ctx(c, &step.name, input, outputs, signals.token.clone());
        let body: std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<Progress<Value>, StepError>> + Send + '_>,
        > = match &step.body {
            StepBody::Single(f) => f(ctx),
            StepBody::FanOut {
                items,
                each,
                concurrency,
            } => Box::pin(self.fan_out(c, ctx, items.clone(), each.clone(), *concurrency)),
        };
        let outcome = guarded(body, step.timeout, &signals.token, step.cancel_grace).await;
        if signals.cancel_requested.load(Ordering::SeqCst) {
            // Cancelled: keep a finished step's output so its compensation can read it.
            let mut cancelled = c.clone();
            cancelled.cancel = Some(
                self.cancel_info(c.run_id)
                    .await
                    .unwrap_or_else(|_| ("unknown".into(), None)),
            );
            let (mut u, n) = lifecycle::cancel_observed(&cancelled, wf, self.timing);
            let mut done = None;
            if let Guarded::Finished(Ok(Progress::Done(out))) = outcome {
                u.checkpoint = lifecycle::checkpoint_done(c.cursor, wf, out.clone(), started_at);
                done = Some(out);
            }
            return (u, n, done);
        }
        match outcome {
            Guarded::Finished(Ok(Progress::Done(out))) => {
                let (u, n) = lifecycle::step_done(c, wf, out.clone(), started_at, self.timing);
                (u, n, Some(out))
            }
            Guarded::Finished(Ok(Progress::WaitFor(d))) => {
                let (u, n) = lifecycle::step_waiting(c, wf, d, started_at, self.timing);
                (u, n, None)
            }
            Guarded::Finished(Err(e)) => fail(e),
            // Only the lease can fire the token without a cancel request; the write will be refused.
            Guarded::Abandoned => fail(StepError::retryable("abandoned: lease lost")),
        }
    }

    /// Run every item not yet checkpointed, `concurrency` at a time, each
    /// checkpointed as it finishes; fail with the list of failed items.
    async fn fan_out(
        &self,
        c: &Cursor,
        ctx: StepCtx,
        items: crate::workflow::ItemsFn,
        each: crate::workflow::ItemFn,
        concurrency: usize,
    ) -> Result<Progress<Value>, StepError> {
        let step_index = c.cursor;
        let (run_id, fence) = (c.run_id, c.fence);
        let mut done = store::item_outputs(&self.pool, run_id, step_index)
            .await
            .map_err(|e| StepError::retryable(format!("loading item checkpoints: {e}")))?;
        let all = items(&ctx)?;
        let pending: Vec<(String, Value)> = all
            .iter()
            .filter(|(k, _)| !done.contains_key(k))
            .cloned()
            .collect();
        let total = all.len();
        let results: Vec<Result<(String, Value), (String, StepError)>> =
            futures::stream::iter(pending)
                .map(|(key, item)| {
                    let ctx = ctx.clone();
                    let each = each.clone();
                    async move {
                        let out = each(ctx, key.clone(), item)
                            .await
                            .map_err(|e| (key.clone(), e))?;
                        // An upsert: asked again while the database is
                        // unreachable (see `Outage`), so a finished item is
                        // not run again for want of its checkpoint.
                        let mut outage = Outage::new(self.config.lease);
                        let written = loop {
                            let written = store::write_item(
                                &self.pool,
                                run_id,
                                fence,
                                &self.worker_id,
                                step_index,
                                &key,
                                &out,
                            )
                            .await;
                            match written {
                                Err(e)
                                    if crate::error::database_unreachable(&e)
                                        && outage.wait(&e.to_string(), &self.shutdown).await => {}
                                other => break other,
                            }
                        };
                        match written {
                            Ok(true) => Ok((key, out)),
                            Ok(false) => Err((key, StepError::fatal("lease lost"))),
                            Err(e) => Err((key, StepError::retryable(format!("checkpoint: {e}")))),
                        }
                    }
                })
                .buffer_unordered(concurrency)
                .collect()
                .await;
        let mut failures = Vec::new();
        for r in results {
            match r {
                Ok((key, out)) => {
                    done.insert(key, out);
                }
                Err(f) => failures.push(f),
            }
        }
        if failures.is_empty() {
            let ordered: BTreeMap<String, Value> = done.into_iter().collect();
            return Ok(Progress::Done(
                serde_json::to_value(ordered).unwrap_or_default(),
            ));
        }
        failures.sort_by(|a, b| a.0.cmp(&b.0));
        let fatal = failures.iter().any(|(_, e)| !e.is_retryable());
        let list: Vec<String> = failures
            .iter()
            .map(|(k, e)| format!("{k}: {}", e.message()))
            .collect();
        let msg = format!(
            "{} of {total} items failed: {}",
            failures.len(),
            list.join("; ")
        );
        Err(if fatal {
            StepError::Fatal(msg)
        } else {
            StepError::Retryable(msg)
        })
    }

    /// Run the compensation at `compensate_cursor`. Compensations are not
    /// stopped by the cancel that caused them, only by losing the lease.
    async fn compensate(
        &self,
        wf: &Workflow,
        c: &Cursor,
        input: &Arc<Value>,
        outputs: &HashMap<String, Value>,
        signals: &RunSignals,
        started_at: chrono::DateTime<Utc>,
    ) -> (RunUpdate, Next) {
        let index = c.compensate_cursor.unwrap_or(0);
        let step = &wf.steps[index as usize];
        tracing::Span::current().record("step", step.name.as_str());
        let Some(comp) = step.compensation.clone() else {
            return lifecycle::compensation_done(c, wf, started_at, self.timing);
        };
        let token = CancellationToken::new();
        let ctx = self.ctx(c, &step.name, input, outputs, token.clone());
        let lease_lost = signals.lease_lost.load(Ordering::SeqCst);
        if lease_lost {
            token.cancel();
        }
        match guarded(comp(ctx), step.timeout, &token, step.cancel_grace).await {
            Guarded::Finished(Ok(())) => {
                lifecycle::compensation_done(c, wf, started_at, self.timing)
            }
            Guarded::Finished(Err(e)) => {
                lifecycle::compensation_failed(c, wf, &e, started_at, self.timing)
            }
            Guarded::Abandoned => lifecycle::compensation_failed(
                c,
                wf,
                &StepError::retryable("abandoned"),
                started_at,
                self.timing,
            ),
        }
    }
}

/// Backoff while the database cannot be reached: 50 ms doubling to 1 s, for
/// up to one lease from the first failure (past it, another worker may own
/// the run) and not once the process is shutting down.
struct Outage {
    give_up: tokio::time::Instant,
    delay: Duration,
}

impl Outage {
    fn new(lease: Duration) -> Self {
        Outage {
            give_up: tokio::time::Instant::now() + lease,
            delay: Duration::from_millis(50),
        }
    }

    /// Wait before the next try; `false`: give up now.
    async fn wait(&mut self, why: &str, shutdown: &CancellationToken) -> bool {
        if tokio::time::Instant::now() + self.delay >= self.give_up || shutdown.is_cancelled() {
            return false;
        }
        tracing::warn!(error = why, retry_in = ?self.delay, "database unreachable; trying again");
        tokio::time::sleep(self.delay).await;
        self.delay = (self.delay * 2).min(Duration::from_secs(1));
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workflow::BoxFuture;

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_step_that_ignores_its_token_is_dropped_after_the_grace_period() {
        let token = CancellationToken::new();
        let slow: BoxFuture<Result<(), StepError>> = Box::pin(async {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok(())
        });
        let t2 = token.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            t2.cancel();
        });
        let start = tokio::time::Instant::now();
        let out = guarded(
            slow,
            Duration::from_secs(7200),
            &token,
            Duration::from_secs(2),
        )
        .await;
        assert!(matches!(out, Guarded::Abandoned));
        assert_eq!(start.elapsed().as_secs(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_step_over_its_timeout_fails_as_retryable() {
        let token = CancellationToken::new();
        let slow: BoxFuture<Result<(), StepError>> = Box::pin(async {
            tokio::time::sleep(Duration::from_secs(60)).await;
            Ok(())
        });
        match guarded(slow, Duration::from_secs(5), &token, Duration::from_secs(1)).await {
            Guarded::Finished(Err(StepError::Retryable(m))) => {
                assert!(m.contains("timed out"), "{m}")
            }
            _ => panic!("expected a retryable timeout"),
        }
    }
}
