//! Server-Sent Events (`GET /v1/sse`, docs/sse.md): one subscription per stream, for clients
//! that only listen or cannot use WebSockets. The subscription is the WebSocket protocol's
//! (`protocol::subscription`: private, named or durable `ws-{sub}.{name}`), each delivery one
//! `message` event with the WebSocket `message` JSON, and the bounded, paced outbound buffer is
//! the WebSocket one (`protocol::outbound`). A durable stream acknowledges nothing while it
//! runs: the browser's reconnect says with `Last-Event-ID` what it received.

mod stream;

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use utoipa::IntoParams;

use super::RestState;
use super::extract::{ApiQuery, Conn, authenticate};
use super::problem::{ApiError, Problem};
use crate::context::{About, SubscriptionView};
use crate::engine::Owner;
use crate::flow::BufferKind;
use crate::protocol::outbound::{Frame, Limits, Overflow, SendQueue};
use crate::protocol::subscription::{Spec, Subscriber};

const PROTOCOL: &str = "sse";
/// What its send queue's gauge is counted as.
const BUFFER: BufferKind = BufferKind::Sse;
/// The one subscription of a stream, as its `message` JSON names it.
const SUB: &str = "s1";

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct SseQuery {
    /// Subscribe to this exchange, through a private queue (or the durable one `durable`
    /// names), bound with `binding_key`.
    exchange: Option<String>,
    binding_key: Option<String>,
    /// Consume this queue instead (messages are acknowledged once written).
    queue: Option<String>,
    /// The durable subscription `ws-{sub}.{durable}` — the WebSocket protocol's, so a browser
    /// can switch between the two. Resumed with `Last-Event-ID`: nothing lost across a
    /// reconnect.
    durable: Option<String>,
    /// A private subscription's answer to a full buffer: drop the oldest (`lagged` events
    /// count them, the default) or end the stream.
    overflow: Option<Overflow>,
    /// Where a durable stream resumes when there is no `Last-Event-ID` header: a page that
    /// opens a new `EventSource` (with a fresh token) passes the last id it saw here.
    last_event_id: Option<String>,
    /// The token, for `EventSource`, which cannot send headers; only when
    /// `ws.allow_query_token` is on (tokens in URLs end up in logs and history).
    access_token: Option<String>,
}

/// Subscribe and receive messages as Server-Sent Events.
///
/// Events: `subscribed` (`{"op":"subscribed","sub":"s1","queue":…}`, before any message),
/// `message` (the WebSocket `message` JSON; its `id` is the stream's sequence, or for a
/// durable subscription its position with a fingerprint, which `Last-Event-ID` resumes),
/// `lagged` (`{"dropped":n}`: deliveries dropped for a slow stream), `cancelled`
/// (`taken_over` or `deleted`; the stream ends) and `close` (`{"code","reason"}` with the
/// WebSocket close code: 4001 token expired, 4008 slow consumer, 1001 shutdown). A comment
/// line every `sse.keepalive`.
#[utoipa::path(get, path = "/v1/sse", tag = "subscribe",
    params(SseQuery,
        ("Last-Event-ID" = Option<String>, Header,
            description = "Sent by EventSource on reconnect: a durable stream acknowledges what it names and delivers the rest")),
    responses(
        (status = 200, description = "The event stream", content_type = "text/event-stream", body = String),
        (status = 400, description = "Invalid request", body = Problem, content_type = "application/problem+json"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "No read or consume permission", body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 406, description = "The client does not accept text/event-stream", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "A durable subscription with another definition", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Connection limit reached, or engine unavailable", body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn subscribe(
    State(st): State<RestState>,
    Conn(conn): Conn,
    headers: HeaderMap,
    ApiQuery(q): ApiQuery<SseQuery>,
) -> Result<Response, ApiError> {
    let ctx = &st.ctx;
    let principal = caller(&st, &headers, &q).await?;
    let admitted = ctx
        .flow
        .admission
        .admit(principal.shared_subject())
        .map_err(|full| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                format!("connection limit reached ({})", full.as_str()),
            )
        })?;
    // A channel of its own: an HTTP/1 connection may carry other requests before this one,
    // and the stream's exclusive queue and unacknowledged deliveries must end with it.
    // An id of its own (the holder of its durable subscription, its registry entry): HTTP/2
    // carries several streams on one connection.
    let id = crate::context::next_id();
    let owner = Owner::new();
    let channel = ctx
        .engine
        .open_channel(&owner, &format!("sse-{}@{}", conn.id, conn.remote))
        .await?;
    let spec = Spec {
        exchange: q.exchange.as_deref(),
        binding_key: q.binding_key.as_deref(),
        queue: q.queue.as_deref(),
        durable: q.durable.as_deref(),
        arguments: None,
    };
    let subscriber = Subscriber {
        ctx,
        channel: channel.as_ref(),
        principal: &principal,
        conn: id,
    };
    let target = subscriber.target(&spec).await?;
    let out = Arc::new(SendQueue::new(Limits::of(&ctx.config.limits), BUFFER));
    let mode = stream::Mode::of(&target, q.overflow);
    let options = mode.consume_options(ctx, &target, &out);
    let (takeover_tx, takeovers) = crate::engine::sessions::takeover_channel();
    let consumer = subscriber.consume(&target, options, &takeover_tx).await?;
    let last_event_id = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or(q.last_event_id);
    out.push(Frame::control(stream::preamble(
        ctx.config.sse.retry,
        target.queue(),
    )));
    let registered = ctx.registry.register(
        id,
        About {
            protocol: crate::context::Protocol::Sse,
            transport: crate::context::Transport::Http,
            remote: conn.remote,
            subject: principal.subject.clone(),
            client_id: None,
            buffer: matches!(mode, stream::Mode::NoAck(_)).then(|| out.pressure().clone()),
            // A stream of its own (HTTP/2 carries several on one connection); it publishes
            // nothing.
            stats: Default::default(),
        },
        principal.expires_at(),
    );
    registered.set_subscriptions(vec![SubscriptionView {
        queue: consumer.queue_name(),
        exchange: q.exchange.as_deref().map(Box::from),
        pattern: q.binding_key.as_deref().map(Box::from),
        ack: "auto",
        prefetch: None,
    }]);
    let gone = CancellationToken::new();
    let writing = Arc::new(stream::Writing::default());
    let body = Body::from_stream(stream::body(
        out.clone(),
        channel.clone(),
        gone.clone(),
        writing.clone(),
    ));
    let driver = stream::Stream {
        ctx: ctx.clone(),
        conn: id,
        channel,
        _owner: owner,
        principal,
        target,
        mode,
        consumer,
        out,
        takeovers,
        _takeover_tx: takeover_tx,
        _admitted: admitted,
        gone,
        writing,
        registered,
        next_id: 1,
        held: 0,
    };
    ctx.connections
        .spawn(async move { driver.run(last_event_id).await });
    Ok(event_stream(body))
}

/// The caller, when it accepts an event stream: by `Authorization`, else by a query-string
/// token when those are allowed, else anonymous when allowed.
async fn caller(
    st: &RestState,
    headers: &HeaderMap,
    q: &SseQuery,
) -> Result<crate::auth::Principal, ApiError> {
    if !accepts_event_stream(headers) {
        return Err(ApiError::new(
            StatusCode::NOT_ACCEPTABLE,
            "bad_request",
            "this endpoint answers text/event-stream",
        ));
    }
    let query_token = match (&q.access_token, st.ctx.config.ws.allow_query_token) {
        (Some(t), true) => Some(t.as_str()),
        (Some(_), false) => {
            return Err(ApiError::from(crate::auth::AuthError::Invalid(
                "tokens in the query string are not accepted here (ws.allow_query_token)".into(),
            )));
        }
        (None, _) => None,
    };
    authenticate(st, headers, query_token).await
}

fn event_stream(body: Body) -> Response {
    let mut resp = body.into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // nginx buffers responses unless told not to.
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    resp
}

/// No `Accept`, or one that takes `text/event-stream` (or anything).
fn accepts_event_stream(headers: &HeaderMap) -> bool {
    let mut accepts = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| {
            t.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .peekable();
    accepts.peek().is_none()
        || accepts.any(|t| t == "text/event-stream" || t == "text/*" || t == "*/*")
}
