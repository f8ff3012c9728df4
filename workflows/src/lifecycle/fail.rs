//! `running → retrying | compensating | failed`: a step attempt failed.

use chrono::{DateTime, Utc};

use super::{begin_compensation, checkpoint, Cursor, Next, Timing};
use crate::{
    error::StepError,
    state::RunState,
    workflow::Workflow,
    writer::{CheckpointKind, DispatchMark, RunUpdate},
};

/// Retry a retryable failure after the step's backoff while attempts remain;
/// otherwise (fatal, or attempts used up) the run unwinds its compensations.
pub fn step_failed(
    c: &Cursor,
    wf: &Workflow,
    error: &StepError,
    started_at: DateTime<Utc>,
    timing: Timing,
) -> (RunUpdate, Next) {
    let step = &wf.steps[c.cursor as usize];
    let failed_attempts = c.attempt as u32 + 1;
    let delay = error
        .is_retryable()
        .then(|| step.retry.delay_after(failed_attempts))
        .flatten();
    let ck = checkpoint(
        c.cursor,
        wf,
        CheckpointKind::Failed(error.message().to_owned()),
        started_at,
    );
    if let Some(delay) = delay {
        let mut u = c.update();
        u.state = RunState::Retrying;
        u.attempt = failed_attempts as i32;
        u.wake_in = Some(delay);
        u.release = true;
        u.dispatch = DispatchMark::AtWake;
        u.stuck_in = Some(timing.parked(delay));
        u.checkpoint = ck;
        u.event = Some((
            "step_retrying".into(),
            Some(serde_json::json!({
                "attempt": failed_attempts,
                "error": error.message(),
                "retry_in_ms": delay.as_millis() as u64,
            })),
        ));
        return (u, Next::Park { wake_in: delay });
    }
    let reason = if error.is_retryable() {
        format!(
            "step `{}` failed after {failed_attempts} attempts: {}",
            step.name,
            error.message()
        )
    } else {
        format!("step `{}` failed: {}", step.name, error.message())
    };
    let (mut u, next) = begin_compensation(c, wf, reason, timing);
    u.attempt = 0;
    u.checkpoint = ck;
    (u, next)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lifecycle::fixture::*;

    #[test]
    fn a_retryable_failure_parks_the_run_for_the_backoff() {
        let c = cursor(RunState::Running, 0, "q1");
        let (u, next) = step_failed(
            &c,
            &workflow(),
            &StepError::retryable("timeout"),
            Utc::now(),
            timing(),
        );
        assert!(matches!(next, Next::Park { .. }));
        assert_eq!((u.state, u.attempt, u.cursor), (RunState::Retrying, 1, 0));
        assert!(u.release);
    }

    #[test]
    fn exhausted_retries_start_compensation_from_the_failed_step() {
        let mut c = cursor(RunState::Running, 0, "q1");
        c.attempt = 2; // third attempt of a step allowed three
        let (u, next) = step_failed(
            &c,
            &workflow(),
            &StepError::retryable("timeout"),
            Utc::now(),
            timing(),
        );
        assert_eq!(next, Next::Continue);
        assert_eq!(u.state, RunState::Compensating);
        assert_eq!(u.compensate_cursor, Some(0));
        assert!(u
            .error
            .clone()
            .flatten()
            .unwrap()
            .contains("after 3 attempts"));
    }

    #[test]
    fn a_fatal_failure_never_retries() {
        let c = cursor(RunState::Running, 1, "q2");
        let (u, _) = step_failed(
            &c,
            &workflow(),
            &StepError::fatal("bad input"),
            Utc::now(),
            timing(),
        );
        assert_eq!(u.state, RunState::Compensating);
        assert_eq!(u.compensate_cursor, Some(1));
        assert_eq!(u.error, Some(Some("step `b` failed: bad input".into())));
    }
}
