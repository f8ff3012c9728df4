//! The run lifecycle as one enum.
//!
//! `queued → running → (waiting | retrying) → succeeded | failed | cancelled`,
//! plus `cancelling` (a cancel request reached a running step, which is winding
//! down within its grace period) and `compensating` (undoing completed steps in
//! reverse after a fatal failure, exhausted retries or a cancel).

use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    Queued,
    Running,
    Waiting,
    Retrying,
    Succeeded,
    Failed,
    Cancelled,
    Cancelling,
    Compensating,
}

impl RunState {
    pub const ALL: [RunState; 9] = [
        RunState::Queued,
        RunState::Running,
        RunState::Waiting,
        RunState::Retrying,
        RunState::Succeeded,
        RunState::Failed,
        RunState::Cancelled,
        RunState::Cancelling,
        RunState::Compensating,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Queued => "queued",
            RunState::Running => "running",
            RunState::Waiting => "waiting",
            RunState::Retrying => "retrying",
            RunState::Succeeded => "succeeded",
            RunState::Failed => "failed",
            RunState::Cancelled => "cancelled",
            RunState::Cancelling => "cancelling",
            RunState::Compensating => "compensating",
        }
    }

    /// Terminal runs are never claimed again (an operator replay starts a new
    /// life for the same run id).
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            RunState::Succeeded | RunState::Failed | RunState::Cancelled
        )
    }

    /// Only finished-but-unsuccessful runs may be replayed without force;
    /// stuck runs may be replayed by an operator explicitly.
    pub fn is_replayable(self) -> bool {
        matches!(self, RunState::Failed | RunState::Cancelled)
    }
}

impl fmt::Display for RunState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("unknown run state `{0}`")]
pub struct UnknownState(pub String);

impl FromStr for RunState {
    type Err = UnknownState;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        RunState::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| UnknownState(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_state_round_trips_through_its_name() {
        for state in RunState::ALL {
            assert_eq!(state.as_str().parse::<RunState>().unwrap(), state);
        }
        assert!("paused".parse::<RunState>().is_err());
    }

    #[test]
    fn only_succeeded_failed_and_cancelled_are_terminal() {
        let terminal: Vec<_> = RunState::ALL
            .into_iter()
            .filter(|s| s.is_terminal())
            .collect();
        assert_eq!(
            terminal,
            [RunState::Succeeded, RunState::Failed, RunState::Cancelled]
        );
    }
}
