//! Request extraction with our own rejections: the caller's principal from the bearer token,
//! JSON bodies, paths and queries — every failure a problem+json (400, 401, 413, 415), never
//! axum's default text or 422.

use std::sync::Arc;

use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use bytes::Bytes;
use serde::de::DeserializeOwned;

use super::RestState;
use super::problem::ApiError;
use crate::auth::Principal;
use crate::context::Connection;
use crate::engine::names::{self, DEFAULT_EXCHANGE_ALIAS};
use crate::json::is_json_content_type;

/// The authenticated caller. No `Authorization` header: anonymous when allowed, else 401.
pub struct Caller(pub Principal);

impl FromRequestParts<RestState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, st: &RestState) -> Result<Self, ApiError> {
        authenticate(st, &parts.headers, None).await.map(Caller)
    }
}

/// The caller's principal from `Authorization: Bearer`, else from `query_token` (a token from
/// the query string, for clients that cannot send headers), else anonymous when allowed.
pub async fn authenticate(
    st: &RestState,
    headers: &HeaderMap,
    query_token: Option<&str>,
) -> Result<Principal, ApiError> {
    let Some(value) = headers.get(AUTHORIZATION) else {
        return Ok(match query_token {
            Some(token) => st.ctx.auth.authenticate(token).await?,
            None => st.ctx.auth.anonymous()?,
        });
    };
    let value = value.to_str().map_err(|_| {
        ApiError::from(crate::auth::AuthError::Invalid(
            "unreadable Authorization header".into(),
        ))
    })?;
    let token = match value.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => token.trim(),
        _ => {
            return Err(crate::auth::AuthError::Invalid(
                "the Authorization header must be \"Bearer <token>\"".into(),
            )
            .into());
        }
    };
    Ok(st.ctx.auth.authenticate(token).await?)
}

/// The client connection the request arrived on (set by the server's accept loop).
pub struct Conn(pub Arc<Connection>);

impl<S: Send + Sync> FromRequestParts<S> for Conn {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        parts
            .extensions
            .get::<Arc<Connection>>()
            .cloned()
            .map(Conn)
            .ok_or_else(|| ApiError::internal("request without a connection context"))
    }
}

/// Path parameters; a malformed one is 400.
pub struct ApiPath<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiPath<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Path::<T>::from_request_parts(parts, state)
            .await
            .map(|Path(v)| ApiPath(v))
            .map_err(|e: PathRejection| ApiError::bad_request(e.body_text()))
    }
}

/// Query parameters; a malformed one is 400.
pub struct ApiQuery<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiQuery<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(v)| ApiQuery(v))
            .map_err(|e: QueryRejection| ApiError::bad_request(e.body_text()))
    }
}

/// The raw body; over the route's size limit it is 413.
pub struct RawBody(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for RawBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        Bytes::from_request(req, state)
            .await
            .map(RawBody)
            .map_err(|e: BytesRejection| {
                if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::too_large("the request body is larger than this endpoint accepts")
                } else {
                    ApiError::bad_request(e.body_text())
                }
            })
    }
}

/// A JSON body: 415 without a JSON content type, 400 when it does not parse or fit, 413 when
/// too large.
pub struct ApiJson<T>(pub T);

impl<T, S> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let headers = req.headers().clone();
        let RawBody(bytes) = RawBody::from_request(req, state).await?;
        parse_json(&headers, &bytes).map(ApiJson)
    }
}

pub fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    let ok = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(is_json_content_type);
    if ok {
        Ok(())
    } else {
        Err(ApiError::unsupported_media(
            "this endpoint takes a JSON body (Content-Type: application/json)",
        ))
    }
}

pub fn parse_json<T: DeserializeOwned>(headers: &HeaderMap, bytes: &[u8]) -> Result<T, ApiError> {
    require_json(headers)?;
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
}

/// An exchange or queue name from a path: 1–255 bytes, no `/`.
pub fn check_name(what: &str, name: &str) -> Result<(), ApiError> {
    names::validate_name(what, name).map_err(|e| ApiError::bad_request(e.to_string()))
}

/// How the default exchange appears in REST (`amq.default`).
pub fn exchange_label(name: &str) -> String {
    if name.is_empty() {
        DEFAULT_EXCHANGE_ALIAS.to_owned()
    } else {
        name.to_owned()
    }
}
