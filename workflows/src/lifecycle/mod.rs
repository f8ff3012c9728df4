//! Run transitions, one file each, as pure functions.
//!
//! Each takes the executor's view of a run ([`Cursor`]) and what just
//! happened, and returns the single [`RunUpdate`] that commits it plus what
//! the executor does next ([`Next`]). No I/O happens here, so every rule of the
//! lifecycle is tested without a database (see the tests in each file).
//! The operator transitions that start from outside a worker (replay) live
//! here too but talk to the database, since they are one statement each.

mod advance;
mod cancel;
mod compensate;
mod fail;
mod park;
pub mod replay;

use std::time::Duration;

use chrono::{DateTime, Utc};

pub use advance::{step_done, yield_run};
pub use cancel::cancel_observed;
pub use compensate::{begin_compensation, compensation_done, compensation_failed};
pub use fail::step_failed;
pub use park::step_waiting;

use crate::{
    state::RunState,
    store::ClaimedRun,
    workflow::Workflow,
    writer::{Checkpoint, CheckpointKind, DispatchMark, RunUpdate},
};

/// The executor's view of a run it holds the lease of.
#[derive(Debug, Clone, PartialEq)]
pub struct Cursor {
    pub run_id: uuid::Uuid,
    pub fence: i64,
    pub owner: String,
    pub state: RunState,
    pub cursor: i32,
    pub attempt: i32,
    pub queue: String,
    pub compensate_cursor: Option<i32>,
    /// Who asked to cancel, and why, if anyone did.
    pub cancel: Option<(String, Option<String>)>,
    pub error: Option<String>,
    pub polls: i32,
}

impl Cursor {
    pub fn from_claim(run: &ClaimedRun, owner: &str) -> Self {
        Cursor {
            run_id: run.id,
            fence: run.fence,
            owner: owner.to_owned(),
            state: run.state,
            cursor: run.cursor,
            attempt: run.attempt,
            queue: run.queue.clone(),
            compensate_cursor: run.compensate_cursor,
            cancel: run.cancel_requested.then(|| {
                (
                    run.cancel_requested_by.clone().unwrap_or_default(),
                    run.cancel_reason.clone(),
                )
            }),
            error: run.error.clone(),
            polls: run.polls,
        }
    }

    /// Apply a committed update to this view.
    pub fn apply(&mut self, update: &RunUpdate) {
        if update.cursor != self.cursor {
            self.polls = 0;
        }
        if matches!(
            update.checkpoint.as_ref().map(|c| &c.kind),
            Some(CheckpointKind::Polled)
        ) {
            self.polls += 1;
        }
        self.state = update.state;
        self.cursor = update.cursor;
        self.attempt = update.attempt;
        self.queue = update.queue.clone();
        self.compensate_cursor = update.compensate_cursor;
        if let Some(error) = &update.error {
            self.error = error.clone();
        }
    }

    /// A write that keeps everything as it is; transitions change what they need.
    pub(crate) fn update(&self) -> RunUpdate {
        RunUpdate {
            write_id: uuid::Uuid::now_v7(),
            resent: false,
            run_id: self.run_id,
            fence: self.fence,
            owner: self.owner.clone(),
            state: self.state,
            cursor: self.cursor,
            attempt: self.attempt,
            queue: self.queue.clone(),
            compensate_cursor: self.compensate_cursor,
            wake_in: None,
            release: false,
            dispatch: DispatchMark::Keep,
            error: None,
            output: None,
            stuck_in: None,
            checkpoint: None,
            event: None,
        }
    }
}

/// What the executor does after committing a transition.
#[derive(Debug, Clone, PartialEq)]
pub enum Next {
    /// Keep the lease and run the next step (or compensation) inline.
    Continue,
    /// The next piece runs on another queue: the lease is released; push a dispatch.
    Handoff { queue: String },
    /// Parked until `wake_in` has passed; the lease is released.
    Park { wake_in: Duration },
    /// Terminal.
    Finished,
}

/// Durations the transitions need to say when a run counts as stuck.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub lease: Duration,
    /// A handed-over run not started within this is stuck.
    pub stuck_queued: Duration,
}

impl Timing {
    /// A running step is stuck once it overruns its timeout by a lease.
    pub fn running(&self, step_timeout: Duration) -> Duration {
        step_timeout + self.lease * 2
    }

    /// A parked run is stuck once it is overdue by the queued bound.
    pub fn parked(&self, wake_in: Duration) -> Duration {
        wake_in + self.stuck_queued
    }
}

pub(crate) fn checkpoint(
    index: i32,
    wf: &Workflow,
    kind: CheckpointKind,
    started_at: DateTime<Utc>,
) -> Option<Checkpoint> {
    Some(Checkpoint {
        index,
        step: wf.steps[index as usize].name.clone(),
        kind,
        started_at,
    })
}

/// Where the piece at `index` runs, and whether this worker continues inline.
pub(crate) fn next_on(cursor: &Cursor, queue: &str) -> Next {
    if queue == cursor.queue {
        Next::Continue
    } else {
        Next::Handoff {
            queue: queue.to_owned(),
        }
    }
}

/// The checkpoint of a finished step, for transitions that record it on the way.
pub(crate) fn checkpoint_done(
    index: i32,
    wf: &Workflow,
    output: serde_json::Value,
    started_at: DateTime<Utc>,
) -> Option<Checkpoint> {
    checkpoint(index, wf, CheckpointKind::Done(output), started_at)
}

/// Shared fixture for the transition tests: a three-step workflow where the
/// middle step runs on another queue and only the first two compensate.
#[cfg(test)]
pub(crate) mod fixture {
    use super::*;
    use crate::{
        error::StepError,
        retry::RetryPolicy,
        workflow::{Step, StepCtx},
    };

    pub fn workflow() -> Workflow {
        let noop = |_: StepCtx, _: serde_json::Value| async { Ok::<_, StepError>(()) };
        let undo = |_: StepCtx, _: serde_json::Value| async { Ok::<_, StepError>(()) };
        Workflow::new("fixture", 1)
            .step(
                Step::new("a", "q1", noop)
                    .compensate(undo)
                    .retry(RetryPolicy::default().attempts(3)),
            )
            .step(
                Step::new("b", "q2", noop)
                    .compensate(undo)
                    .retry(RetryPolicy::never()),
            )
            .step(Step::new("c", "q2", noop))
    }

    pub fn cursor(state: RunState, at: i32, queue: &str) -> Cursor {
        Cursor {
            run_id: uuid::Uuid::nil(),
            fence: 7,
            owner: "w1".into(),
            state,
            cursor: at,
            attempt: 0,
            queue: queue.into(),
            compensate_cursor: None,
            cancel: None,
            error: None,
            polls: 0,
        }
    }

    pub fn timing() -> Timing {
        Timing {
            lease: Duration::from_secs(30),
            stuck_queued: Duration::from_secs(300),
        }
    }
}
