//! Pulling messages over REST (`basic.get`): take them (`ack`) or look at them and leave them
//! in the queue (`requeue`, marked redelivered).

use axum::extract::State;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use super::RestState;
use super::extract::{ApiJson, ApiPath, Caller, Conn, check_name, exchange_label};
use super::problem::{ApiError, Problem};
use crate::engine::Delivery;
use crate::json::{self, Encoding, PropertiesJson};
use crate::metrics;

pub const MAX_GET: u32 = 1000;

#[derive(Debug, Clone, Copy, Default, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum AckMode {
    /// Take the messages out of the queue.
    #[default]
    Ack,
    /// Return them to the queue (marked redelivered).
    Requeue,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GetRequest {
    /// At most this many messages, 1–1000 (default 1).
    #[serde(default = "one")]
    pub count: u32,
    #[serde(default)]
    pub ack_mode: AckMode,
}

fn one() -> u32 {
    1
}

/// A message as clients see it (REST `get`; the WebSocket `message` frame has the same fields).
#[derive(Debug, Serialize, ToSchema)]
pub struct MessageView {
    pub exchange: String,
    pub routing_key: String,
    pub redelivered: bool,
    #[schema(value_type = Object)]
    pub body: Value,
    pub encoding: Encoding,
    pub properties: PropertiesJson,
    /// Ready messages left in the queue after this one.
    pub message_count: Option<u64>,
}

impl From<&Delivery> for MessageView {
    fn from(d: &Delivery) -> Self {
        let (body, encoding) = json::body_out(d.message());
        MessageView {
            exchange: exchange_label(d.exchange()),
            routing_key: d.routing_key().to_owned(),
            redelivered: d.redelivered,
            body,
            encoding,
            properties: json::properties_out(d.properties()),
            message_count: d.message_count,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct GetResult {
    pub messages: Vec<MessageView>,
}

/// Pull up to `count` messages.
#[utoipa::path(post, path = "/v1/queues/{queue}/get", tag = "pull",
    params(("queue" = String, Path, description = "Queue name")),
    request_body = GetRequest,
    responses((status = 200, body = GetResult),
        (status = 400, description = "Invalid request", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "No consume permission", body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 415, body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn get(
    State(st): State<RestState>,
    Conn(conn): Conn,
    Caller(principal): Caller,
    ApiPath(queue): ApiPath<String>,
    ApiJson(req): ApiJson<GetRequest>,
) -> Result<axum::Json<GetResult>, ApiError> {
    check_name("queue", &queue)?;
    if !(1..=MAX_GET).contains(&req.count) {
        return Err(ApiError::bad_request(format!(
            "count must be between 1 and {MAX_GET}"
        )));
    }
    if !principal.permissions.can_consume(&queue) {
        return Err(ApiError::forbidden(format!(
            "no consume permission on queue '{queue}'"
        )));
    }
    let channel = conn.channel(&st.ctx.engine).await?;
    let requeue = matches!(req.ack_mode, AckMode::Requeue);
    let mut got = Vec::new();
    for _ in 0..req.count {
        match channel.get(&queue, !requeue).await? {
            Some(d) => got.push(d),
            None => break,
        }
    }
    let messages = got.iter().map(MessageView::from).collect();
    if requeue {
        // All taken first, then all returned: a requeued message is not fetched twice.
        for d in &got {
            channel.nack(d.delivery_tag, false, true).await?;
        }
    } else {
        metrics::messages_out("rest", got.len() as u64);
    }
    Ok(axum::Json(GetResult { messages }))
}
