//! Errors of the engine, in two families.
//!
//! [`StepError`] is what a step returns; whether it is retried is decided where
//! it is born (a timeout is `Retryable`, bad input is `Fatal`). [`EngineError`]
//! is what the engine's own machinery (database, Redis) can fail with.

use std::fmt;

/// A step's failure, classified by whoever produced it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StepError {
    /// Transient: retried with the step's backoff until its attempts run out.
    #[error("{0}")]
    Retryable(String),
    /// Permanent: no retry; compensations run at once.
    #[error("{0}")]
    Fatal(String),
}

impl StepError {
    pub fn retryable(msg: impl fmt::Display) -> Self {
        StepError::Retryable(msg.to_string())
    }

    pub fn fatal(msg: impl fmt::Display) -> Self {
        StepError::Fatal(msg.to_string())
    }

    pub fn is_retryable(&self) -> bool {
        matches!(self, StepError::Retryable(_))
    }

    pub fn message(&self) -> &str {
        match self {
            StepError::Retryable(m) | StepError::Fatal(m) => m,
        }
    }
}

/// Failures of the engine itself, not of a step.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// The database could not be reached (see [`database_unreachable`]): the
    /// same work may be tried again once it is back.
    #[error("database unreachable: {0}")]
    Unavailable(String),
    #[error("dispatch: {0}")]
    Dispatch(String),
    #[error("unknown workflow `{0}`")]
    UnknownWorkflow(String),
    #[error("run {0} not found")]
    UnknownRun(uuid::Uuid),
    #[error("invalid input for workflow `{workflow}`: {message}")]
    InvalidInput { workflow: String, message: String },
    /// An operator action that the run's state does not allow.
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    BadRequest(String),
}

/// Errors that say the database cannot be reached now, not that a statement
/// is wrong: I/O on the connection, no pooled connection in time, SQLSTATE
/// class 08 (connection exception) and 57P (the server shutting down,
/// crashed or starting up).
pub fn database_unreachable(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed => true,
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|c| c.starts_with("08") || c.starts_with("57P")),
        _ => false,
    }
}
