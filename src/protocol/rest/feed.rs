//! `GET /v1/feed`: the operator's live view as a WebSocket — every second the overview, the
//! queues by depth (with how fast each grows) and the connections, so the console refreshes
//! without polling. Authenticated as `/ws` is (`Authorization` on the upgrade, or a first
//! frame `{"op":"auth","token":…}` within `ws.auth_timeout`); needs monitoring or
//! administrator. Read-only: purges, deletes and closes go through the REST endpoints.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::http::HeaderMap;
use axum::response::Response;
use serde::Serialize;
use serde_json::Value;

use super::RestState;
use super::extract::authenticate;
use crate::auth::Principal;
use crate::context::registry::ConnectionView;
use crate::engine::{Channel, Owner, QueueTotals};

const EVERY: Duration = Duration::from_secs(1);
/// Queues listed per snapshot, deepest first; connections likewise, newest last.
const TOP: usize = 100;
/// Queues read per snapshot (pages of `PAGE`): a bound on one snapshot's cost.
const SCAN: usize = 10_000;
const PAGE: usize = 1_000;

const UNAUTHENTICATED: u16 = 4001;
const POLICY: u16 = 1008;
const GOING_AWAY: u16 = 1001;

#[derive(Debug, Serialize)]
struct Snapshot<'a> {
    op: &'static str,
    overview: super::overview::Overview,
    /// Queues that exist (up to the scan bound).
    queue_count: usize,
    queues: Vec<QueueRow>,
    connections: Vec<ConnectionRow<'a>>,
}

#[derive(Debug, Serialize)]
struct ConnectionRow<'a> {
    #[serde(flatten)]
    view: &'a ConnectionView,
    /// Publishes per second since the previous snapshot.
    publish_rate: f64,
}

/// What the previous snapshot saw: the rates are the change since.
#[derive(Default)]
struct Previous {
    queues: HashMap<String, Seen>,
    published: HashMap<u64, (Instant, u64)>,
}

#[derive(Debug, Serialize)]
struct QueueRow {
    name: String,
    messages: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    messages_unacknowledged: Option<u64>,
    consumers: u32,
    /// Change of the ready count per second since the previous snapshot: a queue that grows
    /// is one whose consumers do not keep up.
    growth: f64,
    /// Messages per second in and out since the previous snapshot (absent when the engine
    /// cannot tell).
    #[serde(skip_serializing_if = "Option::is_none")]
    in_rate: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    out_rate: Option<f64>,
}

/// A queue as the previous snapshot saw it.
struct Seen {
    at: Instant,
    messages: u64,
    totals: Option<QueueTotals>,
}

pub async fn feed(
    State(st): State<RestState>,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    // Authenticated after the upgrade: browsers cannot send headers on a WebSocket.
    let bearer = headers.contains_key(axum::http::header::AUTHORIZATION);
    let principal = if bearer {
        Some(authenticate(&st, &headers, None).await)
    } else {
        None
    };
    crate::protocol::websocket(upgrade).on_upgrade(move |socket| async move {
        let principal = principal.map(|r| r.map_err(|e| e.detail));
        run(st, socket, principal).await;
    })
}

/// `principal`: what the upgrade's `Authorization` header gave, if it had one.
async fn run(st: RestState, mut socket: WebSocket, principal: Option<Result<Principal, String>>) {
    let principal = match principal {
        Some(given) => given,
        None => first_frame(&st, &mut socket).await,
    };
    let principal = match principal {
        Ok(p) => p,
        Err(e) => return close(&mut socket, UNAUTHENTICATED, &e).await,
    };
    if !principal.permissions.can_monitor() {
        return close(
            &mut socket,
            POLICY,
            "the feed needs gateway.tag:monitoring or administrator",
        )
        .await;
    }
    let channel = match st
        .ctx
        .engine
        .open_channel(&Owner::new(), "operator-feed")
        .await
    {
        Ok(c) => c,
        Err(e) => return close(&mut socket, 1011, &e.to_string()).await,
    };
    let leeway = st.ctx.config.auth.leeway;
    let expiry = crate::auth::expiry_sleep(principal.expires_at(), leeway);
    tokio::pin!(expiry);
    let mut previous = Previous::default();
    let mut tick = tokio::time::interval(EVERY);
    loop {
        tokio::select! {
            _ = st.ctx.shutdown.wait() => break close(&mut socket, GOING_AWAY, "shutting down").await,
            _ = &mut expiry => break close(&mut socket, UNAUTHENTICATED, "the token has expired").await,
            _ = tick.tick() => {
                let text = snapshot(&st, channel.as_ref(), &mut previous).await;
                let sent = tokio::time::timeout(
                    st.ctx.config.limits.write_timeout,
                    socket.send(Message::Text(text.into())),
                )
                .await;
                if !matches!(sent, Ok(Ok(()))) {
                    break;
                }
            }
            incoming = socket.recv() => match incoming {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                // Anything else (pings, stray frames) changes nothing.
                Some(Ok(_)) => {}
            },
        }
    }
    channel.close().await;
}

/// `{"op":"auth","token":…}` as the first frame, within `ws.auth_timeout`.
async fn first_frame(st: &RestState, socket: &mut WebSocket) -> Result<Principal, String> {
    let frame = tokio::time::timeout(st.ctx.config.ws.auth_timeout, socket.recv()).await;
    let Ok(Some(Ok(Message::Text(text)))) = frame else {
        return Err("expected {\"op\":\"auth\",\"token\":…} first".into());
    };
    let v: Value = serde_json::from_str(&text).map_err(|_| "the first frame is not JSON")?;
    let (Some("auth"), Some(token)) = (v["op"].as_str(), v["token"].as_str()) else {
        return Err("expected {\"op\":\"auth\",\"token\":…} first".into());
    };
    st.ctx
        .auth
        .authenticate(token)
        .await
        .map_err(|e| e.to_string())
}

async fn close(socket: &mut WebSocket, code: u16, reason: &str) {
    let mut reason = reason.to_owned();
    // A close frame's reason is at most 123 bytes.
    while reason.len() > 123 {
        reason.pop();
    }
    let _ = socket
        .send(Message::Close(Some(CloseFrame {
            code,
            reason: reason.into(),
        })))
        .await;
}

async fn snapshot(st: &RestState, channel: &dyn Channel, previous: &mut Previous) -> String {
    let seen = &mut previous.queues;
    let mut queues = Vec::new();
    let mut after: Option<String> = None;
    while queues.len() < SCAN {
        let Ok(page) = channel.list_queues(after.as_deref(), PAGE).await else {
            break;
        };
        let done = page.len() < PAGE;
        after = page.last().map(|q| q.name.clone());
        queues.extend(page);
        if done {
            break;
        }
    }
    let now = Instant::now();
    let mut next = HashMap::with_capacity(queues.len());
    let mut rows: Vec<QueueRow> = queues
        .into_iter()
        .map(|q| {
            let before = seen.get(&q.name);
            let per_second = |now_n: u64, then_n: u64, at: Instant| {
                (now_n as f64 - then_n as f64) / now.duration_since(at).as_secs_f64().max(1e-3)
            };
            let growth = before.map_or(0.0, |b| per_second(q.messages, b.messages, b.at));
            let rates = match (q.totals, before.and_then(|b| b.totals.map(|t| (b.at, t)))) {
                (Some(t), Some((at, was))) => Some((
                    per_second(t.published, was.published, at),
                    per_second(t.delivered, was.delivered, at),
                )),
                (Some(_), None) => Some((0.0, 0.0)),
                _ => None,
            };
            next.insert(
                q.name.clone(),
                Seen {
                    at: now,
                    messages: q.messages,
                    totals: q.totals,
                },
            );
            QueueRow {
                name: q.name,
                messages: q.messages,
                messages_unacknowledged: q.messages_unacknowledged,
                consumers: q.consumers,
                growth,
                in_rate: rates.map(|r| r.0),
                out_rate: rates.map(|r| r.1),
            }
        })
        .collect();
    *seen = next;
    let queue_count = rows.len();
    rows.sort_by(|a, b| {
        b.messages
            .cmp(&a.messages)
            .then_with(|| a.name.cmp(&b.name))
    });
    rows.truncate(TOP);
    let all = st.ctx.registry.list(None, usize::MAX, |_| true);
    let newest = &all[all.len().saturating_sub(TOP)..];
    let connections = newest
        .iter()
        .map(|view| {
            let publish_rate = previous.published.get(&view.id).map_or(0.0, |(at, was)| {
                (view.published.saturating_sub(*was)) as f64
                    / now.duration_since(*at).as_secs_f64().max(1e-3)
            });
            ConnectionRow { view, publish_rate }
        })
        .collect();
    previous.published = newest.iter().map(|v| (v.id, (now, v.published))).collect();
    let snapshot = Snapshot {
        op: "snapshot",
        overview: super::overview::snapshot(st),
        queue_count,
        queues: rows,
        connections,
    };
    serde_json::to_string(&snapshot).unwrap_or_default()
}
