//! The WebSocket adapter (`GET /ws`, subprotocol `amqp-gateway.v1.json`, DESIGN.md §4) for
//! browsers: `frames` (the JSON protocol), `session` (the ops, no socket), `connection`
//! (reader, writer, timers); the bounded buffer is `protocol::outbound`, shared with SSE.

pub mod close;
mod connection;
pub mod frames;
mod session;
mod writer;

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Router};
use serde_json::json;

use crate::auth::AuthError;
use crate::context::{Connection, Context};

pub fn router(ctx: Context) -> Router {
    Router::new().route("/ws", get(upgrade)).with_state(ctx)
}

/// A problem+json answer for a refused upgrade (the adapter cannot borrow REST's).
fn send_error(status: StatusCode, code: &'static str, detail: &str) -> Response {
    let mut resp = (
        status,
        axum::Json(json!({"type": format!("/problems/{code}"), "title": code, "status": status.as_u16(), "detail": detail, "code": code})),
    )
        .into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/problem+json"),
    );
    if status == StatusCode::UNAUTHORIZED {
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
    }
    crate::metrics::refusal("ws", code);
    resp
}

fn offers_subprotocol(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim() == frames::SUBPROTOCOL)
}

/// WebSocket frame limit: a maximal message base64-encoded, plus room for the JSON around it.
fn frame_limit(ctx: &Context) -> usize {
    let max = ctx.config.limits.max_message_bytes.as_u64() as usize;
    max.div_ceil(3) * 4 + 64 * 1024
}

async fn upgrade(
    State(ctx): State<Context>,
    Extension(conn): Extension<Arc<Connection>>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    if !offers_subprotocol(&headers) {
        return send_error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "offer the WebSocket subprotocol amqp-gateway.v1.json",
        );
    }
    let token = match headers.get(header::AUTHORIZATION).map(|v| v.to_str()) {
        Some(Ok(v)) => match v.split_once(' ') {
            Some((scheme, t)) if scheme.eq_ignore_ascii_case("bearer") => Some(t.trim().to_owned()),
            _ => {
                return send_error(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "the Authorization header must be \"Bearer <token>\"",
                );
            }
        },
        Some(Err(_)) => {
            return send_error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "unreadable Authorization header",
            );
        }
        // The query string ends up in proxy logs: only when allowed, and never logged here.
        None if ctx.config.ws.allow_query_token => query.get("access_token").cloned(),
        None => None,
    };
    let principal = match token {
        Some(t) => match ctx.auth.authenticate(&t).await {
            Ok(p) => Some(p),
            Err(e @ (AuthError::Missing | AuthError::Expired | AuthError::Invalid(_))) => {
                return send_error(StatusCode::UNAUTHORIZED, "unauthorized", &e.to_string());
            }
        },
        None => None,
    };
    let limit = frame_limit(&ctx);
    super::websocket(ws)
        .protocols([frames::SUBPROTOCOL])
        .max_message_size(limit)
        .max_frame_size(limit)
        .on_upgrade(move |socket| {
            let serve = connection::run(socket, ctx.clone(), conn, principal);
            super::serve_upgraded(&ctx, serve)
        })
}
