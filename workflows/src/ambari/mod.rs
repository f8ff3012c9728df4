//! Ambari: the REST client on the real API v1 ([`AmbariClient`]), the pure
//! blueprint builder ([`blueprint`]), the emulator used for development and
//! tests ([`sim`], served by `orrery-ambari-sim`), and our stand-in for
//! `ambari-agent` ([`agent`]: the script the bootstrap step installs).
//!
//! What this module does not do: wait. Every call is one short exchange; a
//! workflow step polls ([`AmbariClient::hosts_report`],
//! [`AmbariClient::request_status`]) and parks the run with
//! `Progress::WaitFor` between polls. Errors are [`AmbariError`]s, already
//! classified: `?` turns them into a retryable or fatal `StepError`.
//!
//! `AMBARI.md` (shared notes) is the reference for the API; where it and the
//! real server disagree, the real server wins.

pub mod agent;
pub mod blueprint;
pub mod client;
pub mod error;
pub mod model;
pub mod sim;

pub use client::{AmbariClient, AmbariConfig};
pub use error::AmbariError;
pub use model::{
    Created, HostInfo, HostStatus, HostsReport, NewUser, RequestId, RequestState, RequestStatus,
    ServiceState,
};
