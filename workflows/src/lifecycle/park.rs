//! `running → waiting`: a waiting step is not done yet; park the run.

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::{checkpoint, Cursor, Next, Timing};
use crate::{
    state::RunState,
    workflow::Workflow,
    writer::{CheckpointKind, DispatchMark, RunUpdate},
};

/// Release the lease and become claimable again after `wake_in`. Only the
/// first park of a step writes a history row; later ones bump a counter, so
/// history stays bounded by the number of steps however long a run polls.
pub fn step_waiting(
    c: &Cursor,
    wf: &Workflow,
    wake_in: Duration,
    started_at: DateTime<Utc>,
    timing: Timing,
) -> (RunUpdate, Next) {
    let mut u = c.update();
    u.state = RunState::Waiting;
    u.wake_in = Some(wake_in);
    u.release = true;
    u.dispatch = DispatchMark::AtWake;
    u.stuck_in = Some(timing.parked(wake_in));
    u.checkpoint = checkpoint(c.cursor, wf, CheckpointKind::Polled, started_at);
    if c.polls == 0 {
        u.event = Some(("step_waiting".into(), None));
    }
    (u, Next::Park { wake_in })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lifecycle::fixture::*;

    #[test]
    fn only_the_first_poll_of_a_step_writes_history() {
        let mut c = cursor(RunState::Running, 0, "q1");
        let wake = Duration::from_secs(2);
        let (first, next) = step_waiting(&c, &workflow(), wake, Utc::now(), timing());
        assert_eq!(next, Next::Park { wake_in: wake });
        assert!(first.event.is_some());
        assert_eq!(first.dispatch, DispatchMark::AtWake);
        c.apply(&first);
        let (second, _) = step_waiting(&c, &workflow(), wake, Utc::now(), timing());
        assert!(second.event.is_none(), "polls must not grow history");
        assert_eq!(second.checkpoint.unwrap().kind, CheckpointKind::Polled);
    }
}
