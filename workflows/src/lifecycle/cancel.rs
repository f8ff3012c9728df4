//! `running | cancelling → compensating | cancelled`: a cancel request
//! reached the run (the running step has returned or its grace expired).

use super::{begin_compensation, Cursor, Next, Timing};
use crate::{workflow::Workflow, writer::RunUpdate};

pub fn cancel_observed(c: &Cursor, wf: &Workflow, timing: Timing) -> (RunUpdate, Next) {
    let (by, reason) = c.cancel.clone().unwrap_or_default();
    let mut message = format!("cancelled by {by}");
    if let Some(reason) = reason {
        message.push_str(&format!(": {reason}"));
    }
    let (mut u, next) = begin_compensation(c, wf, message, timing);
    u.attempt = 0;
    (u, next)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{lifecycle::fixture::*, state::RunState};

    #[test]
    fn a_cancel_compensates_then_ends_cancelled_naming_who_asked() {
        let mut c = cursor(RunState::Cancelling, 1, "q2");
        c.cancel = Some(("alice".into(), Some("wrong size".into())));
        let (u, next) = cancel_observed(&c, &workflow(), timing());
        assert_eq!(next, Next::Continue);
        assert_eq!(u.state, RunState::Compensating);
        assert_eq!(u.compensate_cursor, Some(1));
        assert_eq!(u.error, Some(Some("cancelled by alice: wrong size".into())));
    }

    #[test]
    fn a_cancel_before_anything_that_compensates_ends_at_once() {
        let wf = workflow();
        let mut c = cursor(RunState::Cancelling, 0, "q1");
        c.cancel = Some(("bob".into(), None));
        // Step `a` compensates, so even at cursor 0 there is something to undo.
        let (u, _) = cancel_observed(&c, &wf, timing());
        assert_eq!(u.compensate_cursor, Some(0));
    }
}
