//! Every REST error as `application/problem+json` (RFC 9457) with the shared error `code`
//! (DESIGN.md §4/§5). Errors from lower layers are mapped here, once.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::auth::AuthError;
use crate::codes::Code;
use crate::context::PublishRefused;
use crate::engine::EngineError;
use crate::flow::Throttled;
use crate::json::JsonError;
use crate::protocol::subscription::Refusal;

/// The body of every error response.
#[derive(Debug, Serialize, ToSchema)]
pub struct Problem {
    /// `/problems/{code}`
    #[serde(rename = "type")]
    pub kind: String,
    pub title: &'static str,
    pub status: u16,
    pub detail: String,
    /// One of: bad_request, unauthorized, forbidden, not_found, precondition_failed,
    /// unroutable, rate_limited, too_large, overloaded, unavailable, not_supported, internal.
    pub code: &'static str,
}

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub detail: String,
    pub retry_after: Option<u64>,
    pub invalid_token: bool,
}

fn title(code: &str) -> &'static str {
    match code {
        "bad_request" => "Bad request",
        "unauthorized" => "Unauthorized",
        "forbidden" => "Forbidden",
        "not_found" => "Not found",
        "precondition_failed" => "Precondition failed",
        "unroutable" => "Unroutable",
        "rate_limited" => "Rate limited",
        "too_large" => "Too large",
        "overloaded" => "Overloaded",
        "unavailable" => "Unavailable",
        "not_supported" => "Not supported",
        _ => "Internal error",
    }
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            detail: detail.into(),
            retry_after: None,
            invalid_token: false,
        }
    }

    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", detail)
    }

    pub fn unsupported_media(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, "bad_request", detail)
    }

    pub fn forbidden(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", detail)
    }

    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", detail)
    }

    pub fn conflict(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "precondition_failed", detail)
    }

    pub fn too_large(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", detail)
    }

    pub fn unroutable(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "unroutable", detail)
    }

    pub fn internal(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", detail)
    }

    fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs.max(1));
        self
    }

    /// The `code` and message for a per-item error (batch results).
    pub fn item(&self) -> serde_json::Value {
        serde_json::json!({"error": {"code": self.code, "message": self.detail}})
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        ApiError::from_code(Code::from(&e), e.to_string())
    }
}

impl From<Refusal> for ApiError {
    fn from(r: Refusal) -> Self {
        ApiError::from_code(r.code, r.message)
    }
}

impl ApiError {
    /// A shared code's answer: its status, and Retry-After on 503.
    fn from_code(code: Code, detail: String) -> Self {
        let status = match code {
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::PreconditionFailed => StatusCode::CONFLICT,
            Code::BadRequest => StatusCode::BAD_REQUEST,
            Code::Forbidden => StatusCode::FORBIDDEN,
            Code::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Code::Overloaded | Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Code::NotSupported => StatusCode::NOT_IMPLEMENTED,
            Code::Unauthorized => StatusCode::UNAUTHORIZED,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let err = ApiError::new(status, code.as_str(), detail);
        if status == StatusCode::SERVICE_UNAVAILABLE {
            err.retry_after(1)
        } else {
            err
        }
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        let mut err = ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", e.to_string());
        err.invalid_token = !matches!(e, AuthError::Missing);
        err
    }
}

impl From<JsonError> for ApiError {
    fn from(e: JsonError) -> Self {
        match e {
            JsonError::BadRequest(d) => ApiError::bad_request(d),
            JsonError::TooLarge(d) => ApiError::too_large(d),
        }
    }
}

impl From<Throttled> for ApiError {
    fn from(t: Throttled) -> Self {
        let code = Code::from(&t);
        let status = if code == Code::Overloaded {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::TOO_MANY_REQUESTS
        };
        ApiError::new(status, code.as_str(), t.to_string()).retry_after(t.retry_after_secs())
    }
}

impl From<PublishRefused> for ApiError {
    fn from(r: PublishRefused) -> Self {
        match r {
            PublishRefused::Forbidden { .. } => ApiError::forbidden(r.to_string()),
            PublishRefused::Throttled(t) => ApiError::from(t),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        crate::metrics::refusal("rest", self.code);
        if self.status.is_server_error() {
            tracing::warn!(status = self.status.as_u16(), code = self.code, detail = %self.detail, "request failed");
        }
        let body = Problem {
            kind: format!("/problems/{}", self.code),
            title: title(self.code),
            status: self.status.as_u16(),
            detail: self.detail,
            code: self.code,
        };
        let mut resp = (self.status, axum::Json(body)).into_response();
        let headers = resp.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(secs) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(if self.invalid_token {
                    "Bearer error=\"invalid_token\""
                } else {
                    "Bearer"
                }),
            );
        }
        resp
    }
}
