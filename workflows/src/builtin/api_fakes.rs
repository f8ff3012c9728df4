//! Stand-in cluster workflows for API tests and benchmarks: they record the
//! cluster's state transitions in PostgreSQL without touching machines, so
//! the API can be tested end to end (submit → worker → running) on its own.
//! Registered only with `ORRERY_TEST_WORKFLOWS=1`.

use crate::workflow::Workflow;

pub fn workflows() -> Vec<Workflow> {
    Vec::new()
}
