//! [`AmbariError`]: every way a call to Ambari can fail, classified where it
//! is born. Connection errors, timeouts and 5xx are worth retrying (the
//! server restarts, a proxy hiccups); 4xx and answers we cannot understand
//! are not (retrying the same call cannot fix them).

use crate::error::StepError;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AmbariError {
    /// No answer: connection refused or reset, DNS, or the per-request timeout.
    #[error("Ambari {op}: {message}")]
    Transport {
        op: String,
        message: String,
        timed_out: bool,
    },
    /// The server answered with an error status; `message` is the `message`
    /// field of Ambari's `{"status":..,"message":..}` body (or the start of
    /// the body when it is not JSON).
    #[error("Ambari {op}: HTTP {status}: {message}")]
    Http {
        op: String,
        status: u16,
        message: String,
    },
    /// A success status with a body we cannot make sense of.
    #[error("Ambari {op}: unexpected answer: {message}")]
    Protocol { op: String, message: String },
    /// Something we refuse to send or a state we refuse to paper over
    /// (e.g. a blueprint of that name exists with other components).
    #[error("{0}")]
    Invalid(String),
}

impl AmbariError {
    /// Retrying the same call may succeed: transport failures, 5xx, 408, 429.
    pub fn is_retryable(&self) -> bool {
        match self {
            AmbariError::Transport { .. } => true,
            AmbariError::Http { status, .. } => *status >= 500 || *status == 408 || *status == 429,
            AmbariError::Protocol { .. } | AmbariError::Invalid(_) => false,
        }
    }

    /// The HTTP status, when the server answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            AmbariError::Http { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The server's own message (for 4xx/5xx), else the whole description.
    pub fn server_message(&self) -> String {
        match self {
            AmbariError::Http { message, .. } => message.clone(),
            other => other.to_string(),
        }
    }
}

impl From<AmbariError> for StepError {
    fn from(e: AmbariError) -> Self {
        if e.is_retryable() {
            StepError::Retryable(e.to_string())
        } else {
            StepError::Fatal(e.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn http(status: u16) -> AmbariError {
        AmbariError::Http {
            op: "GET /hosts".into(),
            status,
            message: "x".into(),
        }
    }

    #[test]
    fn server_errors_and_transport_failures_are_retryable_client_errors_are_not() {
        assert!(http(500).is_retryable());
        assert!(http(503).is_retryable());
        assert!(http(429).is_retryable());
        assert!(!http(400).is_retryable());
        assert!(!http(404).is_retryable());
        assert!(!http(409).is_retryable());
        let t = AmbariError::Transport {
            op: "GET /hosts".into(),
            message: "timed out".into(),
            timed_out: true,
        };
        assert!(t.is_retryable());
        assert!(StepError::from(t).is_retryable());
        assert!(!StepError::from(http(403)).is_retryable());
    }
}
