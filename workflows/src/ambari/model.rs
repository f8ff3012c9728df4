//! The typed views of Ambari resources that the client returns and the
//! emulator produces: request and host status vocabularies exactly as the
//! real server spells them, and the small result structs of the client.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Ambari's id of an asynchronous request (`Requests/id`); ids are unique
/// per server, not per cluster.
pub type RequestId = u64;

/// `Requests/request_status` (and `Tasks/status`, which shares the vocabulary).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RequestStatus {
    #[serde(rename = "PENDING")]
    Pending,
    #[serde(rename = "QUEUED")]
    Queued,
    #[serde(rename = "IN_PROGRESS")]
    InProgress,
    #[serde(rename = "HOLDING")]
    Holding,
    #[serde(rename = "COMPLETED")]
    Completed,
    #[serde(rename = "FAILED")]
    Failed,
    #[serde(rename = "HOLDING_FAILED")]
    HoldingFailed,
    #[serde(rename = "TIMEDOUT")]
    TimedOut,
    #[serde(rename = "HOLDING_TIMEDOUT")]
    HoldingTimedOut,
    #[serde(rename = "ABORTED")]
    Aborted,
    #[serde(rename = "SKIPPED_FAILED")]
    SkippedFailed,
}

impl RequestStatus {
    pub const ALL: [RequestStatus; 11] = [
        RequestStatus::Pending,
        RequestStatus::Queued,
        RequestStatus::InProgress,
        RequestStatus::Holding,
        RequestStatus::Completed,
        RequestStatus::Failed,
        RequestStatus::HoldingFailed,
        RequestStatus::TimedOut,
        RequestStatus::HoldingTimedOut,
        RequestStatus::Aborted,
        RequestStatus::SkippedFailed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RequestStatus::Pending => "PENDING",
            RequestStatus::Queued => "QUEUED",
            RequestStatus::InProgress => "IN_PROGRESS",
            RequestStatus::Holding => "HOLDING",
            RequestStatus::Completed => "COMPLETED",
            RequestStatus::Failed => "FAILED",
            RequestStatus::HoldingFailed => "HOLDING_FAILED",
            RequestStatus::TimedOut => "TIMEDOUT",
            RequestStatus::HoldingTimedOut => "HOLDING_TIMEDOUT",
            RequestStatus::Aborted => "ABORTED",
            RequestStatus::SkippedFailed => "SKIPPED_FAILED",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }

    /// No further change will happen by itself. The `HOLDING*` states wait
    /// for an operator in Ambari's UI, so they are not finished, but a
    /// workflow should treat `HOLDING_FAILED`/`HOLDING_TIMEDOUT` as failures
    /// (see [`RequestStatus::is_failure`]).
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            RequestStatus::Completed
                | RequestStatus::Failed
                | RequestStatus::TimedOut
                | RequestStatus::Aborted
                | RequestStatus::SkippedFailed
        )
    }

    /// The request did not (and will not by itself) succeed.
    pub fn is_failure(self) -> bool {
        matches!(
            self,
            RequestStatus::Failed
                | RequestStatus::HoldingFailed
                | RequestStatus::TimedOut
                | RequestStatus::HoldingTimedOut
                | RequestStatus::Aborted
                | RequestStatus::SkippedFailed
        )
    }
}

impl fmt::Display for RequestStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What [`AmbariClient::request_status`](super::AmbariClient::request_status) reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestState {
    pub id: RequestId,
    pub status: RequestStatus,
    /// 0–100; Ambari reports a float.
    pub progress_percent: f64,
    pub failed_task_count: u32,
    /// On a failure: a short reason built from the failed tasks
    /// (`DATANODE INSTALL on h2: FAILED (exit 1): <last stderr line>`).
    pub failure: Option<String>,
}

/// `Hosts/host_status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum HostStatus {
    Healthy,
    Unhealthy,
    Alert,
    Unknown,
}

impl HostStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            HostStatus::Healthy => "HEALTHY",
            HostStatus::Unhealthy => "UNHEALTHY",
            HostStatus::Alert => "ALERT",
            HostStatus::Unknown => "UNKNOWN",
        }
    }
}

impl fmt::Display for HostStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One registered host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostInfo {
    pub host_name: String,
    /// `None` when the server did not report it (treat as not healthy).
    pub host_status: Option<HostStatus>,
    /// Milliseconds since the epoch, as Ambari reports it.
    pub last_heartbeat_time: Option<i64>,
}

/// Which of the expected hosts are ready: the answer of one
/// [`AmbariClient::hosts_report`](super::AmbariClient::hosts_report) call.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostsReport {
    /// Registered and `HEALTHY`.
    pub healthy: Vec<String>,
    /// Registered but not `HEALTHY` (lost heartbeat, alerts), with the status.
    pub unhealthy: Vec<(String, String)>,
    /// Not registered at all.
    pub missing: Vec<String>,
}

impl HostsReport {
    pub fn all_healthy(&self) -> bool {
        self.unhealthy.is_empty() && self.missing.is_empty()
    }
}

/// The two service states a provisioning system asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ServiceState {
    /// Installed and stopped.
    Installed,
    Started,
}

impl ServiceState {
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceState::Installed => "INSTALLED",
            ServiceState::Started => "STARTED",
        }
    }
}

impl fmt::Display for ServiceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether a create call made something or found it already there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Created {
    New,
    AlreadyExisted,
}

/// An Ambari login to create (not a UNIX or HDFS account).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewUser {
    pub user_name: String,
    pub password: String,
    pub admin: bool,
}

impl fmt::Debug for NewUser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NewUser")
            .field("user_name", &self.user_name)
            .field("password", &"<redacted>")
            .field("admin", &self.admin)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_statuses_round_trip_with_ambari_spelling() {
        for s in RequestStatus::ALL {
            let json = serde_json::to_value(s).unwrap();
            assert_eq!(json, serde_json::Value::String(s.as_str().into()));
            assert_eq!(RequestStatus::parse(s.as_str()), Some(s));
        }
        assert_eq!(RequestStatus::TimedOut.as_str(), "TIMEDOUT");
    }

    #[test]
    fn holding_failures_are_failures_but_not_finished() {
        assert!(RequestStatus::HoldingFailed.is_failure());
        assert!(!RequestStatus::HoldingFailed.is_finished());
        assert!(RequestStatus::Completed.is_finished());
        assert!(!RequestStatus::Completed.is_failure());
    }
}
