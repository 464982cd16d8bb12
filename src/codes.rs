//! The error codes every protocol shares (DESIGN.md §4): the REST problem `code` and the
//! WebSocket error `code` are the same words for the same causes. Each adapter maps a [`Code`]
//! to its own status; the mapping from lower-layer errors lives here, once.

use crate::auth::AuthError;
use crate::engine::EngineError;
use crate::flow::{ThrottleReason, Throttled};
use crate::json::JsonError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    BadRequest,
    Unauthorized,
    Forbidden,
    NotFound,
    PreconditionFailed,
    Unroutable,
    RateLimited,
    TooLarge,
    Overloaded,
    Unavailable,
    NotSupported,
    Internal,
}

impl Code {
    pub fn as_str(self) -> &'static str {
        match self {
            Code::BadRequest => "bad_request",
            Code::Unauthorized => "unauthorized",
            Code::Forbidden => "forbidden",
            Code::NotFound => "not_found",
            Code::PreconditionFailed => "precondition_failed",
            Code::Unroutable => "unroutable",
            Code::RateLimited => "rate_limited",
            Code::TooLarge => "too_large",
            Code::Overloaded => "overloaded",
            Code::Unavailable => "unavailable",
            Code::NotSupported => "not_supported",
            Code::Internal => "internal",
        }
    }
}

/// Over a rate is the client's doing; above the memory watermark is not.
impl From<&Throttled> for Code {
    fn from(t: &Throttled) -> Self {
        match t.reason {
            ThrottleReason::MemoryWatermark
            | ThrottleReason::DiskAlarm
            | ThrottleReason::UpstreamBlocked => Code::Overloaded,
            _ => Code::RateLimited,
        }
    }
}

impl From<&EngineError> for Code {
    fn from(e: &EngineError) -> Self {
        match e {
            EngineError::NotFound { .. } => Code::NotFound,
            EngineError::ResourceLocked(_)
            | EngineError::InUse(_)
            | EngineError::PreconditionFailed(_) => Code::PreconditionFailed,
            EngineError::InvalidArgument(_) => Code::BadRequest,
            EngineError::AccessRefused(_) => Code::Forbidden,
            EngineError::ContentTooLarge { .. } => Code::TooLarge,
            EngineError::Rejected(_) | EngineError::StoreFailed(_) => Code::Overloaded,
            EngineError::Unavailable(_) | EngineError::ChannelClosed => Code::Unavailable,
            EngineError::NotSupported(_) => Code::NotSupported,
            EngineError::Internal(_) => Code::Internal,
        }
    }
}

impl From<&JsonError> for Code {
    fn from(e: &JsonError) -> Self {
        match e {
            JsonError::BadRequest(_) => Code::BadRequest,
            JsonError::TooLarge(_) => Code::TooLarge,
        }
    }
}

impl From<&AuthError> for Code {
    fn from(_: &AuthError) -> Self {
        Code::Unauthorized
    }
}
