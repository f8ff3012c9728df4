//! `running → running | queued | succeeded`: a step finished.

use chrono::{DateTime, Utc};
use serde_json::Value;

use super::{checkpoint, next_on, Cursor, Next, Timing};
use crate::{
    state::RunState,
    workflow::Workflow,
    writer::{CheckpointKind, DispatchMark, RunUpdate},
};

/// Checkpoint the step's output and move the cursor. The last step's output
/// becomes the run's result.
pub fn step_done(
    c: &Cursor,
    wf: &Workflow,
    output: Value,
    started_at: DateTime<Utc>,
    timing: Timing,
) -> (RunUpdate, Next) {
    let next_index = c.cursor + 1;
    let mut u = c.update();
    u.checkpoint = checkpoint(
        c.cursor,
        wf,
        CheckpointKind::Done(output.clone()),
        started_at,
    );
    u.event = Some(("step_succeeded".into(), None));
    u.cursor = next_index;
    u.attempt = 0;
    let Some(next_step) = wf.steps.get(next_index as usize) else {
        u.state = RunState::Succeeded;
        u.release = true;
        u.output = Some(output);
        u.error = Some(None);
        return (u, Next::Finished);
    };
    u.queue = next_step.queue.clone();
    let next = next_on(c, &next_step.queue);
    if next == Next::Continue {
        u.state = RunState::Running;
        u.stuck_in = Some(timing.running(next_step.timeout));
    } else {
        u.state = RunState::Queued;
        u.release = true;
        u.dispatch = DispatchMark::Now;
        u.stuck_in = Some(timing.stuck_queued);
    }
    (u, next)
}

/// The worker is shutting down between two inline steps: give the run back
/// to its queue so another worker carries on at once.
pub fn yield_run(c: &Cursor, timing: Timing) -> (RunUpdate, Next) {
    let mut u = c.update();
    if u.state == RunState::Running {
        u.state = RunState::Queued;
    }
    u.release = true;
    u.dispatch = DispatchMark::Now;
    u.stuck_in = Some(timing.stuck_queued);
    (
        u,
        Next::Handoff {
            queue: c.queue.clone(),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lifecycle::fixture::*;

    #[test]
    fn a_step_followed_by_one_on_another_queue_hands_the_run_over() {
        let c = cursor(RunState::Running, 0, "q1");
        let (u, next) = step_done(&c, &workflow(), serde_json::json!(1), Utc::now(), timing());
        assert_eq!(next, Next::Handoff { queue: "q2".into() });
        assert_eq!(
            (u.state, u.cursor, u.queue.as_str()),
            (RunState::Queued, 1, "q2")
        );
        assert!(u.release);
        assert_eq!(u.dispatch, DispatchMark::Now);
        assert_eq!(
            u.checkpoint.unwrap().kind,
            CheckpointKind::Done(serde_json::json!(1))
        );
    }

    #[test]
    fn a_step_followed_by_one_on_the_same_queue_continues_inline() {
        let c = cursor(RunState::Running, 1, "q2");
        let (u, next) = step_done(
            &c,
            &workflow(),
            serde_json::json!(null),
            Utc::now(),
            timing(),
        );
        assert_eq!(next, Next::Continue);
        assert_eq!((u.state, u.cursor), (RunState::Running, 2));
        assert!(!u.release);
        assert_eq!(u.dispatch, DispatchMark::Keep);
    }

    #[test]
    fn the_last_step_succeeds_the_run_with_its_output() {
        let c = cursor(RunState::Running, 2, "q2");
        let (u, next) = step_done(
            &c,
            &workflow(),
            serde_json::json!({"ok": true}),
            Utc::now(),
            timing(),
        );
        assert_eq!(next, Next::Finished);
        assert_eq!(u.state, RunState::Succeeded);
        assert_eq!(u.output, Some(serde_json::json!({"ok": true})));
        assert!(u.release);
        assert_eq!(u.stuck_in, None);
    }
}
