//! The one error type of the API, rendered as `application/problem+json`
//! (RFC 9457): a status, a short title, a `detail` that says what to fix and,
//! when a request field is at fault, the `field` naming it.
//!
//! Internal failures become a bare 500 whose detail names nothing internal;
//! the cause is logged so an operator can find it. A database that cannot be
//! reached (refused or cut connections, a pool that found none in time, a
//! server shutting down or starting up) is not a bug but an outage: 503 with
//! `Retry-After`, so clients and load balancers retry instead of giving up.

use axum::{
    http::{header, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
};
use orrery_workflows::EngineError;
use serde_json::{json, Map, Value};

pub type ApiResult<T> = Result<T, ApiError>;

/// Problem type of a request that could not reach the database.
const UNAVAILABLE: &str = "unavailable";

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    /// Stable slug of the problem type (`invalid-field`, `quota-exceeded`...).
    pub code: &'static str,
    pub detail: String,
    /// The request field at fault (`size`, `services[1]`), if any.
    pub field: Option<String>,
    /// Extra members of the problem object (`available` for quota refusals).
    pub extra: Map<String, Value>,
    /// Logged, never shown.
    pub internal: Option<anyhow::Error>,
    /// Seconds for a `Retry-After` header.
    pub retry_after: Option<u32>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            detail: detail.into(),
            field: None,
            extra: Map::new(),
            internal: None,
            retry_after: None,
        }
    }

    /// 400: the request cannot be read at all (not JSON, bad header).
    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad-request", detail)
    }

    /// 422: a readable request with a field whose value is wrong.
    pub fn invalid(field: impl Into<String>, detail: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid-field", detail);
        e.field = Some(field.into());
        e
    }

    pub fn unauthorized(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", detail)
    }

    pub fn forbidden(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", detail)
    }

    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not-found", detail)
    }

    pub fn conflict(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", detail)
    }

    pub fn internal(err: impl Into<anyhow::Error>) -> Self {
        let mut e = Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the server failed to handle this request; it has been logged, try again later",
        );
        e.internal = Some(err.into());
        e
    }

    /// 503: the database is unreachable for now; the request may be retried.
    pub fn unavailable(err: impl Into<anyhow::Error>) -> Self {
        let mut e = Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            UNAVAILABLE,
            "the service cannot reach its database right now; retry in a few seconds \
             (a request that creates something: with the same Idempotency-Key, so it is not created twice)",
        );
        e.internal = Some(err.into());
        e.retry_after = Some(2);
        e
    }

    /// 503 answered by the [`crate::availability`] gate, without trying the
    /// database (nothing to log: the request that closed the gate was).
    pub fn unavailable_now() -> Self {
        let mut e = Self::unavailable(anyhow::anyhow!("database gate closed"));
        e.internal = None;
        e
    }

    /// What every rendering of this error adds to its response: the
    /// `Retry-After` header and, for an unreachable database, the mark the
    /// availability gate reads.
    pub fn decorate(&self, res: &mut Response) {
        if let Some(secs) = self.retry_after {
            res.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.code == UNAVAILABLE {
            res.extensions_mut()
                .insert(crate::availability::DatabaseUnreachable);
        }
    }

    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.extra.insert(key.to_owned(), value.into());
        self
    }

    pub fn title(&self) -> &'static str {
        self.status.canonical_reason().unwrap_or("Error")
    }

    /// The problem object, as served under `/v1`.
    pub fn problem(&self) -> Value {
        let mut body = json!({
            "type": format!("https://orrery.dev/problems/{}", self.code),
            "title": self.title(),
            "status": self.status.as_u16(),
            "detail": self.detail,
        });
        if let Some(field) = &self.field {
            body["field"] = json!(field);
        }
        for (k, v) in &self.extra {
            body[k] = v.clone();
        }
        body
    }

    fn log(&self) {
        if let Some(err) = &self.internal {
            tracing::error!(error = format!("{err:#}"), status = %self.status, "request failed");
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.log();
        let mut res = (self.status, axum::Json(self.problem())).into_response();
        res.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        self.decorate(&mut res);
        if self.status == StatusCode::UNAUTHORIZED {
            res.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"orrery\""),
            );
        }
        res
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(err: sqlx::Error) -> Self {
        if orrery_workflows::error::database_unreachable(&err) {
            ApiError::unavailable(err)
        } else {
            ApiError::internal(err)
        }
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(err: anyhow::Error) -> Self {
        ApiError::internal(err)
    }
}

impl From<EngineError> for ApiError {
    fn from(err: EngineError) -> Self {
        match err {
            EngineError::UnknownRun(id) => ApiError::not_found(format!("no run {id}")),
            EngineError::Conflict(msg) => ApiError::conflict(msg),
            EngineError::BadRequest(msg) => {
                let mut e = ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid-request", msg);
                e.field = None;
                e
            }
            EngineError::InvalidInput { message, .. } => ApiError::invalid(
                "input",
                format!("the input does not fit the workflow: {message}"),
            ),
            EngineError::Database(err) => err.into(),
            EngineError::Unavailable(msg) => ApiError::unavailable(anyhow::anyhow!(msg)),
            other => ApiError::internal(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_errors_show_nothing_of_their_cause() {
        let e = ApiError::internal(anyhow::anyhow!("password authentication failed for user x"));
        let body = e.problem().to_string();
        assert!(!body.contains("password"), "{body}");
        assert_eq!(e.problem()["status"], 500);
    }

    #[test]
    fn an_unreachable_database_is_a_503_to_retry_and_shows_nothing_of_its_cause() {
        let refused = std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "10.1.2.3:5432 refused",
        );
        for err in [sqlx::Error::Io(refused), sqlx::Error::PoolTimedOut] {
            let e = ApiError::from(err);
            assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(e.retry_after, Some(2));
            let body = e.problem().to_string();
            assert!(
                !body.contains("10.1.2.3") && body.contains("retry"),
                "{body}"
            );
            let res = e.into_response();
            assert_eq!(res.headers()[header::RETRY_AFTER], "2");
            assert!(res
                .extensions()
                .get::<crate::availability::DatabaseUnreachable>()
                .is_some());
        }
        let bug = ApiError::from(sqlx::Error::RowNotFound);
        assert_eq!(bug.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(bug.retry_after, None);
        let res = bug.into_response();
        assert!(
            res.extensions()
                .get::<crate::availability::DatabaseUnreachable>()
                .is_none(),
            "only an unreachable database closes the gate"
        );
    }

    #[test]
    fn field_errors_name_the_field() {
        let e = ApiError::invalid("size", "must be at least 1");
        assert_eq!(e.problem()["field"], "size");
        assert_eq!(e.problem()["status"], 422);
    }
}
