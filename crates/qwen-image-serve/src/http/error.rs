//! [`ApiError`]: every refusal and failure of the HTTP layer, sent as OpenAI's JSON error object
//! (`{"error": {"message", "type", "param", "code"}}`) with a 4xx or 5xx status.

use std::time::Duration;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::job::JobError;
use crate::service::SubmitError;

/// An HTTP error response.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiError {
    /// The status.
    pub status: StatusCode,
    /// A short machine-readable code (`invalid_request`, `queue_full`, …).
    pub code: &'static str,
    /// What went wrong, for people.
    pub message: String,
    /// The request field at fault, if one is.
    pub param: Option<String>,
    /// `Retry-After` (429, 503).
    pub retry_after: Option<Duration>,
}

impl ApiError {
    /// An error with `status`, `code` and `message`.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, code, message: message.into(), param: None, retry_after: None }
    }

    /// 400 `invalid_request`.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    /// 400 `invalid_request` about the field `param`.
    pub fn field(param: &str, message: impl Into<String>) -> Self {
        ApiError { param: Some(param.to_owned()), ..Self::invalid(message) }
    }

    /// The OpenAI error `type` of the status.
    fn kind(&self) -> &'static str {
        match self.status.as_u16() {
            429 => "rate_limit_error",
            400..=499 => "invalid_request_error",
            _ => "server_error",
        }
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        json!({"error": {"message": self.message, "type": self.kind(), "param": self.param, "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body())).into_response();
        if let Some(after) = self.retry_after {
            let secs = after.as_secs().max(1).to_string();
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_str(&secs).expect("digits"));
        }
        response
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        let message = e.to_string();
        match e {
            SubmitError::QueueFull { retry_after, .. } => ApiError {
                retry_after: Some(retry_after),
                ..Self::new(StatusCode::TOO_MANY_REQUESTS, "queue_full", message)
            },
            SubmitError::NotReady(_) => ApiError {
                retry_after: Some(Duration::from_secs(1)),
                ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", message)
            },
            SubmitError::ShuttingDown => Self::new(StatusCode::SERVICE_UNAVAILABLE, "shutting_down", message),
            SubmitError::Invalid(_) => Self::invalid(message),
        }
    }
}

impl From<JobError> for ApiError {
    fn from(e: JobError) -> Self {
        let message = e.to_string();
        match e {
            JobError::Cancelled { shutdown: true } => {
                Self::new(StatusCode::SERVICE_UNAVAILABLE, "shutting_down", message)
            }
            JobError::Cancelled { shutdown: false } => {
                Self::new(StatusCode::SERVICE_UNAVAILABLE, "cancelled", message)
            }
            JobError::Invalid(_) => Self::invalid(message),
            JobError::Failed(_) => Self::new(StatusCode::INTERNAL_SERVER_ERROR, "edit_failed", message),
        }
    }
}

/// 504: the edit did not end within the request timeout (it was cancelled).
pub fn timeout(limit: Duration) -> ApiError {
    ApiError::new(
        StatusCode::GATEWAY_TIMEOUT,
        "timeout",
        format!(
            "the edit did not finish within the request timeout of {} s and was cancelled",
            limit.as_secs_f64()
        ),
    )
}
