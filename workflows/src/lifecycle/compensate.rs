//! `compensating → compensating | failed | cancelled`: undoing completed
//! steps in reverse order, each compensation a durable step of its own.

use chrono::{DateTime, Utc};

use super::{checkpoint, next_on, Cursor, Next, Timing};
use crate::{
    error::StepError,
    state::RunState,
    workflow::Workflow,
    writer::{CheckpointKind, DispatchMark, RunUpdate},
};

/// Highest step index `<= from` that has a compensation.
fn next_compensation(wf: &Workflow, from: i32) -> Option<i32> {
    (0..=from).rev().find(|&i| {
        wf.steps
            .get(i as usize)
            .is_some_and(|s| s.compensation.is_some())
    })
}

/// The terminal state once nothing is left to undo.
fn terminal(c: &Cursor) -> RunState {
    if c.cancel.is_some() {
        RunState::Cancelled
    } else {
        RunState::Failed
    }
}

/// Point the run at its first compensation, from the current step down (the
/// failed or interrupted step may have done part of its work), or end it.
pub fn begin_compensation(
    c: &Cursor,
    wf: &Workflow,
    reason: String,
    timing: Timing,
) -> (RunUpdate, Next) {
    let mut u = c.update();
    u.error = Some(Some(reason.clone()));
    let target = next_compensation(wf, c.cursor.min(wf.steps.len() as i32 - 1));
    u.event = Some((
        "unwinding".into(),
        Some(serde_json::json!({ "reason": reason })),
    ));
    move_to(c, wf, u, target, timing)
}

/// The compensation of step `compensate_cursor` succeeded.
pub fn compensation_done(
    c: &Cursor,
    wf: &Workflow,
    started_at: DateTime<Utc>,
    timing: Timing,
) -> (RunUpdate, Next) {
    let index = c
        .compensate_cursor
        .expect("compensating run has a compensate cursor");
    let mut u = c.update();
    u.checkpoint = checkpoint(index, wf, CheckpointKind::Compensated, started_at);
    u.event = Some(("compensated".into(), None));
    u.attempt = 0;
    move_to(c, wf, u, next_compensation(wf, index - 1), timing)
}

/// The compensation failed: retried with the step's policy; once exhausted
/// the run ends `failed`, saying a manual clean-up is needed.
pub fn compensation_failed(
    c: &Cursor,
    wf: &Workflow,
    error: &StepError,
    started_at: DateTime<Utc>,
    timing: Timing,
) -> (RunUpdate, Next) {
    let index = c
        .compensate_cursor
        .expect("compensating run has a compensate cursor");
    let step = &wf.steps[index as usize];
    let failed_attempts = c.attempt as u32 + 1;
    let mut u = c.update();
    let delay = error
        .is_retryable()
        .then(|| step.retry.delay_after(failed_attempts))
        .flatten();
    if let Some(delay) = delay {
        u.attempt = failed_attempts as i32;
        u.wake_in = Some(delay);
        u.release = true;
        u.dispatch = DispatchMark::AtWake;
        u.stuck_in = Some(timing.parked(delay));
        u.event = Some((
            "compensation_retrying".into(),
            Some(serde_json::json!({ "step": step.name, "error": error.message() })),
        ));
        return (u, Next::Park { wake_in: delay });
    }
    u.checkpoint = checkpoint(
        index,
        wf,
        CheckpointKind::CompensationFailed(error.message().to_owned()),
        started_at,
    );
    u.state = RunState::Failed;
    u.release = true;
    u.error = Some(Some(format!(
        "{}; compensation of `{}` failed: {} (manual clean-up needed)",
        c.error.as_deref().unwrap_or("run failed"),
        step.name,
        error.message()
    )));
    u.event = Some((
        "compensation_failed".into(),
        Some(serde_json::json!({ "error": error.message() })),
    ));
    (u, Next::Finished)
}

fn move_to(
    c: &Cursor,
    wf: &Workflow,
    mut u: RunUpdate,
    target: Option<i32>,
    timing: Timing,
) -> (RunUpdate, Next) {
    match target {
        None => {
            u.state = terminal(c);
            u.compensate_cursor = None;
            u.release = true;
            u.stuck_in = None;
            (u, Next::Finished)
        }
        Some(index) => {
            let step = &wf.steps[index as usize];
            u.state = RunState::Compensating;
            u.compensate_cursor = Some(index);
            u.queue = step.queue.clone();
            let next = next_on(c, &step.queue);
            if next == Next::Continue {
                u.stuck_in = Some(timing.running(step.timeout));
            } else {
                u.release = true;
                u.dispatch = DispatchMark::Now;
                u.stuck_in = Some(timing.stuck_queued);
            }
            (u, next)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lifecycle::fixture::*;

    #[test]
    fn compensations_run_in_reverse_and_hand_over_between_queues() {
        let wf = workflow();
        // Failed at `c` (index 2, no compensation): first undo `b` on q2, inline.
        let c = cursor(RunState::Running, 2, "q2");
        let (u, next) = begin_compensation(&c, &wf, "boom".into(), timing());
        assert_eq!(
            (u.compensate_cursor, next.clone()),
            (Some(1), Next::Continue)
        );
        let mut c2 = c.clone();
        c2.apply(&u);
        // `b` undone: next is `a`, on q1, so the run is handed over.
        let (u, next) = compensation_done(&c2, &wf, Utc::now(), timing());
        assert_eq!(u.compensate_cursor, Some(0));
        assert_eq!(next, Next::Handoff { queue: "q1".into() });
        let mut c3 = c2.clone();
        c3.apply(&u);
        c3.queue = "q1".into();
        let (u, next) = compensation_done(&c3, &wf, Utc::now(), timing());
        assert_eq!(next, Next::Finished);
        assert_eq!(u.state, RunState::Failed);
        assert_eq!(u.error, None, "the original error is kept, not overwritten");
    }

    #[test]
    fn an_exhausted_compensation_fails_the_run_asking_for_manual_clean_up() {
        let wf = workflow();
        let mut c = cursor(RunState::Compensating, 2, "q2");
        c.compensate_cursor = Some(1); // `b` never retries
        c.error = Some("step `c` failed: x".into());
        let (u, next) = compensation_failed(
            &c,
            &wf,
            &StepError::retryable("ssh down"),
            Utc::now(),
            timing(),
        );
        assert_eq!(next, Next::Finished);
        assert_eq!(u.state, RunState::Failed);
        assert!(u.error.unwrap().unwrap().contains("manual clean-up"));
    }
}
