//! Publishing over REST: one JSON message, a batch in order, or a raw body (DESIGN.md §5). Each
//! answers only once the engine confirmed; a publish is checked (size, permission, rate) before
//! it reaches the engine, so a refused one changes nothing.

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use super::RestState;
use super::extract::{ApiPath, ApiQuery, Caller, Conn, RawBody, check_name, parse_json};
use super::idempotency::{Begin, MAX_KEY_LEN};
use super::problem::{ApiError, Problem};
use crate::auth::Principal;
use crate::context::{Connection, Publishing};
use crate::engine::table::table_from_json;
use crate::engine::{Message, PublishOptions};
use crate::json::{self, Encoding, PropertiesJson};
use crate::metrics;

const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// One message to publish.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PublishRequest {
    /// Routing key (default empty).
    #[serde(default)]
    pub routing_key: String,
    /// The body: a string, or any JSON value (see `encoding`).
    #[schema(value_type = Object)]
    pub body: Value,
    /// How to read `body`: `utf8` (a string), `base64` (bytes), `json` (any value). Default:
    /// `utf8` for strings, `json` for anything else.
    #[serde(default)]
    pub encoding: Option<Encoding>,
    #[serde(default)]
    pub properties: Option<PropertiesJson>,
    /// Answer 422 `unroutable` when no queue received the message.
    #[serde(default)]
    pub mandatory: bool,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PublishResult {
    /// At least one queue received the message.
    pub routed: bool,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest {
    /// Published in this order (at most `http.max_batch`).
    #[schema(value_type = Vec<PublishRequest>)]
    pub messages: Vec<Value>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ItemError {
    pub code: String,
    pub message: String,
}

/// One result per message, in order: `{"routed": bool}` or `{"error": {"code", "message"}}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct BatchResult {
    #[schema(value_type = Vec<Object>)]
    pub results: Vec<Value>,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct RawParams {
    /// Routing key (default empty).
    pub routing_key: Option<String>,
}

/// A message checked and ready for the engine.
struct Prepared {
    routing_key: String,
    message: Message,
    mandatory: bool,
}

fn prepare(req: PublishRequest, max: usize) -> Result<Prepared, ApiError> {
    let (body, is_json) = json::body_in(&req.body, req.encoding)?;
    if body.len() > max {
        return Err(ApiError::too_large(format!(
            "the message body is {} bytes, the limit is {max}",
            body.len()
        )));
    }
    crate::engine::names::validate_key(&req.routing_key)
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let properties = json::properties_in(req.properties, is_json)?;
    Ok(Prepared {
        routing_key: req.routing_key,
        message: Message::with(properties, body),
        mandatory: req.mandatory,
    })
}

/// A publish request from JSON, refusing a missing `body` (serde would take it as null).
fn request_from(value: Value) -> Result<PublishRequest, ApiError> {
    if !value.as_object().is_some_and(|o| o.contains_key("body")) {
        return Err(ApiError::bad_request("a message needs a \"body\""));
    }
    serde_json::from_value(value)
        .map_err(|e| ApiError::bad_request(format!("invalid message: {e}")))
}

impl RestState {
    /// The publish gate, then the engine, then the pacing wait if the message landed in a
    /// full buffer. The returned confirm is already ordered on the connection's channel.
    async fn submit(
        &self,
        conn: &Connection,
        principal: &Principal,
        exchange: &str,
        p: Prepared,
    ) -> Result<(Publishing, bool), ApiError> {
        let cleared = self.ctx.clear_publish(
            "rest",
            conn,
            principal,
            exchange,
            &p.routing_key,
            p.message.body.len(),
        )?;
        let channel = conn.channel(&self.ctx.engine).await?;
        let options = PublishOptions {
            mandatory: p.mandatory,
        };
        let mut publishing = cleared.publish(&*channel, p.message, options);
        // Landed in a buffer above its high-water mark: the answer (and a batch's next
        // message) waits as a paced MQTT or WebSocket publisher would (DESIGN.md §7).
        let pace = publishing.take_pace();
        if !pace.is_empty() {
            let waited = pace.wait(self.ctx.config.limits.pace_max_wait).await;
            metrics::paced("rest", waited);
        }
        Ok((publishing, p.mandatory))
    }
}

async fn settle((confirm, mandatory): (Publishing, bool)) -> Result<PublishResult, ApiError> {
    let outcome = confirm.await?;
    if mandatory && !outcome.routed {
        return Err(ApiError::unroutable(
            "no queue is bound to receive this message",
        ));
    }
    Ok(PublishResult {
        routed: outcome.routed,
    })
}

/// Runs `publish` under the request's `Idempotency-Key`, if any.
async fn idempotent<F>(
    st: &RestState,
    principal: &Principal,
    headers: &HeaderMap,
    endpoint: &'static str,
    exchange: &str,
    fingerprint: &[&[u8]],
    publish: F,
) -> Response
where
    F: std::future::Future<Output = Result<Response, ApiError>>,
{
    let Some(key) = headers.get(IDEMPOTENCY_KEY) else {
        return publish.await.unwrap_or_else(IntoResponse::into_response);
    };
    let key = match key.to_str() {
        Ok(k) if !k.is_empty() && k.len() <= MAX_KEY_LEN => k,
        _ => {
            return ApiError::bad_request(format!(
                "Idempotency-Key must be 1–{MAX_KEY_LEN} visible ASCII characters"
            ))
            .into_response();
        }
    };
    match st.idempotency.begin(
        principal.subject.clone(),
        endpoint,
        exchange,
        key,
        fingerprint,
    ) {
        Begin::Replay(status, body) => {
            let mut resp = (status, body).into_response();
            let h = resp.headers_mut();
            h.insert("idempotent-replayed", HeaderValue::from_static("true"));
            let ct = if status.is_success() {
                "application/json"
            } else {
                "application/problem+json"
            };
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
            resp
        }
        Begin::Conflict(why) => ApiError::conflict(why).into_response(),
        Begin::Fresh(guard) => {
            let resp = publish.await.unwrap_or_else(IntoResponse::into_response);
            let (parts, body) = resp.into_parts();
            let bytes = axum::body::to_bytes(body, usize::MAX)
                .await
                .unwrap_or_default();
            guard.complete(parts.status, bytes.clone());
            Response::from_parts(parts, axum::body::Body::from(bytes))
        }
    }
}

fn ok_json<T: Serialize>(value: &T) -> Response {
    axum::Json(value).into_response()
}

/// Publish one message.
#[utoipa::path(
    post,
    path = "/v1/exchanges/{exchange}/publish",
    tag = "publish",
    params(
        ("exchange" = String, Path, description = "Exchange name; `amq.default` is the default exchange"),
        ("Idempotency-Key" = Option<String>, Header, description = "Repeat-safe key, kept http.idempotency_window"),
    ),
    request_body = PublishRequest,
    responses(
        (status = 200, description = "The engine took the message", body = PublishResult),
        (status = 400, description = "Invalid request", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No or bad token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "No write permission", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such exchange", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Idempotency-Key conflict", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body over limits.max_message_bytes", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "mandatory and unroutable", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Over the publish rate", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Overloaded or unavailable; retry", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn publish(
    State(st): State<RestState>,
    Conn(conn): Conn,
    Caller(principal): Caller,
    ApiPath(exchange): ApiPath<String>,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> Response {
    if let Err(e) = check_name("exchange", &exchange) {
        return e.into_response();
    }
    let work = async {
        let value: Value = parse_json(&headers, &body)?;
        let prepared = prepare(request_from(value)?, st.max_message_bytes())?;
        let submitted = st.submit(&conn, &principal, &exchange, prepared).await?;
        Ok(ok_json(&settle(submitted).await?))
    };
    idempotent(
        &st,
        &principal,
        &headers,
        "publish",
        &exchange,
        &[&body],
        work,
    )
    .await
}

/// Publish many messages, in order; one result each.
#[utoipa::path(
    post,
    path = "/v1/exchanges/{exchange}/publish-batch",
    tag = "publish",
    params(
        ("exchange" = String, Path, description = "Exchange name; `amq.default` is the default exchange"),
        ("Idempotency-Key" = Option<String>, Header, description = "Repeat-safe key for the whole batch"),
    ),
    request_body = BatchRequest,
    responses(
        (status = 200, description = "Per-message results, in order", body = BatchResult),
        (status = 400, description = "Invalid request or too many messages", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No or bad token", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Request too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn publish_batch(
    State(st): State<RestState>,
    Conn(conn): Conn,
    Caller(principal): Caller,
    ApiPath(exchange): ApiPath<String>,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> Response {
    if let Err(e) = check_name("exchange", &exchange) {
        return e.into_response();
    }
    let work = async {
        let batch: BatchRequest = parse_json(&headers, &body)?;
        let max_batch = st.ctx.config.http.max_batch;
        if batch.messages.len() > max_batch {
            return Err(ApiError::bad_request(format!(
                "{} messages in one batch, the limit (http.max_batch) is {max_batch}",
                batch.messages.len()
            )));
        }
        // Submit all in order first (each confirm keeps its place), then collect the confirms.
        let mut pending = Vec::with_capacity(batch.messages.len());
        for item in batch.messages {
            let submitted =
                match request_from(item).and_then(|r| prepare(r, st.max_message_bytes())) {
                    Ok(p) => st.submit(&conn, &principal, &exchange, p).await,
                    Err(e) => Err(e),
                };
            pending.push(submitted);
        }
        let mut results = Vec::with_capacity(pending.len());
        for submitted in pending {
            let result = match submitted {
                Ok(s) => settle(s).await,
                Err(e) => Err(e),
            };
            results.push(match result {
                Ok(r) => serde_json::json!({"routed": r.routed}),
                Err(e) => {
                    metrics::refusal("rest", e.code);
                    e.item()
                }
            });
        }
        Ok(ok_json(&BatchResult { results }))
    };
    idempotent(
        &st,
        &principal,
        &headers,
        "publish-batch",
        &exchange,
        &[&body],
        work,
    )
    .await
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, ApiError> {
    headers
        .get(name)
        .map(|v| {
            v.to_str()
                .map_err(|_| ApiError::bad_request(format!("header {name} is not visible ASCII")))
        })
        .transpose()
}

/// Publish the request body as it is.
#[utoipa::path(
    post,
    path = "/v1/exchanges/{exchange}/messages",
    tag = "publish",
    params(
        ("exchange" = String, Path, description = "Exchange name; `amq.default` is the default exchange"),
        RawParams,
        ("Content-Type" = Option<String>, Header, description = "Becomes the content_type (default application/octet-stream)"),
        ("AMQP-Headers" = Option<String>, Header, description = "A JSON object: the message's AMQP headers"),
        ("AMQP-Delivery-Mode" = Option<u8>, Header, description = "1 transient, 2 persistent"),
        ("AMQP-Expiration" = Option<String>, Header, description = "Per-message TTL in milliseconds"),
        ("AMQP-Mandatory" = Option<bool>, Header, description = "Answer 422 when unroutable"),
        ("Idempotency-Key" = Option<String>, Header, description = "Repeat-safe key"),
    ),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "The body, any bytes"),
    responses(
        (status = 200, description = "The engine took the message", body = PublishResult),
        (status = 400, description = "Invalid headers", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No or bad token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "No write permission", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such exchange", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body over limits.max_message_bytes", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "mandatory and unroutable", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Over the publish rate", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Overloaded or unavailable; retry", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn publish_raw(
    State(st): State<RestState>,
    Conn(conn): Conn,
    Caller(principal): Caller,
    ApiPath(exchange): ApiPath<String>,
    ApiQuery(params): ApiQuery<RawParams>,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> Response {
    if let Err(e) = check_name("exchange", &exchange) {
        return e.into_response();
    }
    let routing_key = params.routing_key.unwrap_or_default();
    let work = async {
        let prepared = raw_message(&headers, &routing_key, body.clone(), st.max_message_bytes())?;
        let submitted = st.submit(&conn, &principal, &exchange, prepared).await?;
        Ok(ok_json(&settle(submitted).await?))
    };
    let meta: Vec<&[u8]> = [routing_key.as_bytes(), body.as_ref()]
        .into_iter()
        .chain(
            [
                "content-type",
                "amqp-headers",
                "amqp-delivery-mode",
                "amqp-expiration",
                "amqp-mandatory",
            ]
            .iter()
            .map(|h| headers.get(*h).map_or(&b""[..], |v| v.as_bytes())),
        )
        .collect();
    idempotent(
        &st, &principal, &headers, "messages", &exchange, &meta, work,
    )
    .await
}

fn raw_message(
    headers: &HeaderMap,
    routing_key: &str,
    body: Bytes,
    max: usize,
) -> Result<Prepared, ApiError> {
    if body.len() > max {
        return Err(ApiError::too_large(format!(
            "the message body is {} bytes, the limit is {max}",
            body.len()
        )));
    }
    crate::engine::names::validate_key(routing_key)
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let mut props = PropertiesJson {
        content_type: Some(
            header_str(headers, "content-type")?
                .unwrap_or("application/octet-stream")
                .to_owned(),
        ),
        ..PropertiesJson::default()
    };
    if let Some(h) = header_str(headers, "amqp-headers")? {
        let value: Value = serde_json::from_str(h)
            .map_err(|e| ApiError::bad_request(format!("AMQP-Headers is not JSON: {e}")))?;
        table_from_json::<0>(&value)
            .map_err(|e| ApiError::bad_request(format!("AMQP-Headers: {e}")))?;
        if let Value::Object(map) = value {
            props.headers = Some(map);
        }
    }
    if let Some(mode) = header_str(headers, "amqp-delivery-mode")? {
        props.delivery_mode = Some(
            mode.trim()
                .parse()
                .map_err(|_| ApiError::bad_request("AMQP-Delivery-Mode must be 1 or 2"))?,
        );
    }
    if let Some(exp) = header_str(headers, "amqp-expiration")? {
        props.expiration = Some(Value::String(exp.trim().to_owned()));
    }
    let mandatory = match header_str(headers, "amqp-mandatory")?.map(str::trim) {
        None => false,
        Some(v) if v.eq_ignore_ascii_case("true") => true,
        Some(v) if v.eq_ignore_ascii_case("false") => false,
        Some(_) => {
            return Err(ApiError::bad_request(
                "AMQP-Mandatory must be true or false",
            ));
        }
    };
    let properties = json::properties_in(Some(props), false)?;
    Ok(Prepared {
        routing_key: routing_key.to_owned(),
        message: Message::with(properties, body),
        mandatory,
    })
}
