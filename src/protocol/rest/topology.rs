//! Topology over REST (DESIGN.md §5): exchanges, queues, bindings and purge, with paginated
//! lists. `configure:{name}` governs declare/delete/bind/purge; lists show what the caller has
//! some permission on.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as CURSOR;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};

use super::RestState;
use super::extract::{ApiJson, ApiPath, ApiQuery, Caller, Conn, check_name, exchange_label};
use super::problem::{ApiError, Problem};
use crate::auth::Principal;
use crate::engine::table::{FieldTable, table_from_json, table_to_json};
use crate::engine::{
    BindingInfo, Channel, Declared, DeleteQueueOptions, ExchangeInfo, ExchangeKind, ExchangeSpec,
    QueueInfo, QueueSpec,
};

pub const DEFAULT_PAGE: usize = 100;
pub const MAX_PAGE: usize = 1000;

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageParams {
    /// Items per page, 1–1000 (default 100).
    pub page_size: Option<usize>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

impl PageParams {
    pub(super) fn size(&self) -> Result<usize, ApiError> {
        match self.page_size {
            None => Ok(DEFAULT_PAGE),
            Some(n) if (1..=MAX_PAGE).contains(&n) => Ok(n),
            Some(n) => Err(ApiError::bad_request(format!(
                "page_size must be between 1 and {MAX_PAGE}, not {n}"
            ))),
        }
    }

    pub(super) fn after(&self) -> Result<Option<String>, ApiError> {
        self.cursor
            .as_deref()
            .map(|c| {
                CURSOR
                    .decode(c)
                    .ok()
                    .and_then(|b| String::from_utf8(b).ok())
                    .ok_or_else(|| ApiError::bad_request("cursor is not one this API returned"))
            })
            .transpose()
    }
}

pub(super) fn cursor_of(name: &str) -> String {
    CURSOR.encode(name)
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Page<T> {
    pub items: Vec<T>,
    /// Pass as `cursor` for the next page; null on the last one.
    pub next_cursor: Option<String>,
}

fn arguments_in(value: &Option<serde_json::Map<String, Value>>) -> Result<FieldTable, ApiError> {
    match value {
        None => Ok(FieldTable::new()),
        Some(map) => table_from_json(&Value::Object(map.clone()))
            .map_err(|e| ApiError::bad_request(format!("arguments: {e}"))),
    }
}

fn arguments_out(table: &FieldTable) -> serde_json::Map<String, Value> {
    match table_to_json(table) {
        Value::Object(map) => map,
        _ => serde_json::Map::new(),
    }
}

fn default_true() -> bool {
    true
}

// ---------- exchanges ----------

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExchangeDeclare {
    /// direct, fanout, topic or headers
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default = "default_true")]
    pub durable: bool,
    #[serde(default)]
    pub auto_delete: bool,
    #[serde(default)]
    pub internal: bool,
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub arguments: Option<serde_json::Map<String, Value>>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ExchangeView {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub durable: bool,
    pub auto_delete: bool,
    pub internal: bool,
    #[schema(value_type = Object)]
    pub arguments: serde_json::Map<String, Value>,
}

impl From<ExchangeInfo> for ExchangeView {
    fn from(e: ExchangeInfo) -> Self {
        ExchangeView {
            name: exchange_label(&e.name),
            kind: e.spec.kind.as_str().to_owned(),
            durable: e.spec.durable,
            auto_delete: e.spec.auto_delete,
            internal: e.spec.internal,
            arguments: arguments_out(&e.spec.arguments),
        }
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DeleteExchangeParams {
    /// Only if no queue is bound to it.
    #[serde(default)]
    pub if_unused: bool,
}

fn configure(principal: &Principal, name: &str) -> Result<(), ApiError> {
    if principal.permissions.can_configure(name) {
        Ok(())
    } else {
        Err(ApiError::forbidden(format!(
            "no configure permission on '{name}'"
        )))
    }
}

type Fetch<T> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Vec<T>, ApiError>> + Send>>;

/// Pages through `fetch` keeping what `visible` lets the caller see.
async fn visible_page<T>(
    page: &PageParams,
    fetch: impl Fn(Option<String>, usize) -> Fetch<T>,
    name: impl Fn(&T) -> &str,
    visible: impl Fn(&T) -> bool,
) -> Result<Page<T>, ApiError> {
    const CHUNK: usize = 1000;
    let size = page.size()?;
    let mut after = page.after()?;
    let mut items = Vec::new();
    loop {
        let chunk = fetch(after.clone(), CHUNK).await?;
        let done = chunk.len() < CHUNK;
        for item in chunk {
            after = Some(name(&item).to_owned());
            if visible(&item) {
                items.push(item);
                if items.len() > size {
                    break;
                }
            }
        }
        if done || items.len() > size {
            break;
        }
    }
    let next_cursor = if items.len() > size {
        items.truncate(size);
        items.last().map(|i| cursor_of(name(i)))
    } else {
        None
    };
    Ok(Page { items, next_cursor })
}

const E400: &str = "Invalid request";

/// List exchanges the caller has a permission on.
#[utoipa::path(get, path = "/v1/exchanges", tag = "exchanges", params(PageParams),
    responses((status = 200, body = Page<ExchangeView>),
        (status = 400, description = E400, body = Problem, content_type = "application/problem+json"),
        (status = 401, body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn list_exchanges(
    State(st): State<RestState>,
    Conn(conn): Conn,
    Caller(principal): Caller,
    ApiQuery(page): ApiQuery<PageParams>,
) -> Result<axum::Json<Page<ExchangeView>>, ApiError> {
    let channel = conn.channel(&st.ctx.engine).await?;
    let perms = principal.permissions.clone();
    let page = visible_page(
        &page,
        move |after: Option<String>, n| {
            let channel = channel.clone();
            Box::pin(async move { Ok(channel.list_exchanges(after.as_deref(), n).await?) })
        },
        |e: &ExchangeInfo| e.name.as_str(),
        |e| perms.can_see_exchange(&e.name),
    )
    .await?;
    Ok(axum::Json(Page {
        items: page.items.into_iter().map(ExchangeView::from).collect(),
        next_cursor: page.next_cursor,
    }))
}

/// Declare an exchange (idempotent: same flags → 204).
#[utoipa::path(put, path = "/v1/exchanges/{name}", tag = "exchanges",
    params(("name" = String, Path, description = "Exchange name")),
    request_body = ExchangeDeclare,
    responses((status = 201, description = "Created"), (status = 204, description = "Existed with the same flags"),
        (status = 400, description = E400, body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "No configure permission, or a reserved name", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Exists with other flags", body = Problem, content_type = "application/problem+json"),
        (status = 415, body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn put_exchange(
    State(st): State<RestState>,
    Conn(conn): Conn,
    Caller(principal): Caller,
    ApiPath(name): ApiPath<String>,
    ApiJson(body): ApiJson<ExchangeDeclare>,
) -> Result<StatusCode, ApiError> {
    check_name("exchange", &name)?;
    let kind: ExchangeKind = body
        .kind
        .parse()
        .map_err(|e: crate::engine::EngineError| ApiError::bad_request(e.to_string()))?;
    let spec = ExchangeSpec {
        kind,
        durable: body.durable,
        auto_delete: body.auto_delete,
        internal: body.internal,
        arguments: arguments_in(&body.arguments)?,
    };
    configure(&principal, &name)?;
    let channel = conn.channel(&st.ctx.engine).await?;
    Ok(match channel.declare_exchange(&name, &spec).await? {
        Declared::Created => StatusCode::CREATED,
        Declared::Existed => StatusCode::NO_CONTENT,
    })
}

/// One exchange.
#[utoipa::path(get, path = "/v1/exchanges/{name}", tag = "exchanges",
    params(("name" = String, Path, description = "Exchange name; `amq.default` is the default exchange")),
    responses((status = 200, body = ExchangeView),
        (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn get_exchange(
    State(st): State<RestState>,
    Conn(conn): Conn,
    Caller(principal): Caller,
    ApiPath(name): ApiPath<String>,
) -> Result<axum::Json<ExchangeView>, ApiError> {
    check_name("exchange", &name)?;
    if !principal.permissions.can_see_exchange(&name) {
        return Err(ApiError::forbidden(format!(
            "no permission on exchange '{name}'"
        )));
    }
    let channel = conn.channel(&st.ctx.engine).await?;
    Ok(axum::Json(channel.exchange_info(&name).await?.into()))
}

/// Delete an exchange and its bindings.
#[utoipa::path(delete, path = "/v1/exchanges/{name}", tag = "exchanges",
    params(("name" = String, Path, description = "Exchange name"), DeleteExchangeParams),
    responses((status = 204, description = "Deleted"),
        (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "if_unused and in use", body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn delete_exchange(
    State(st): State<RestState>,
    Conn(conn): Conn,
    Caller(principal): Caller,
    ApiPath(name): ApiPath<String>,
    ApiQuery(params): ApiQuery<DeleteExchangeParams>,
) -> Result<StatusCode, ApiError> {
    check_name("exchange", &name)?;
    configure(&principal, &name)?;
    let channel = conn.channel(&st.ctx.engine).await?;
    channel.delete_exchange(&name, params.if_unused).await?;
    Ok(StatusCode::NO_CONTENT)
}

// ---------- queues ----------

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct QueueDeclare {
    #[serde(default = "default_true")]
    pub durable: bool,
    /// Must be false: a REST request owns no connection an exclusive queue could belong to.
    #[serde(default)]
    pub exclusive: bool,
    #[serde(default)]
    pub auto_delete: bool,
    /// `x-message-ttl`, `x-expires`, `x-max-length`, `x-max-length-bytes`, `x-overflow`,
    /// `x-dead-letter-exchange`, `x-dead-letter-routing-key`, …
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub arguments: Option<serde_json::Map<String, Value>>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct QueueView {
    pub name: String,
    /// Flags and arguments are absent when the engine cannot tell (upstream without
    /// `engine.upstream.management_url`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub durable: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exclusive: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auto_delete: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub arguments: Option<serde_json::Map<String, Value>>,
    /// Ready messages.
    pub messages: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub messages_unacknowledged: Option<u64>,
    pub consumers: u32,
    /// Messages the queue took, since the gateway (embedded) or the queue (RabbitMQ with the
    /// management API) started; its in rate is this over time.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub published_total: Option<u64>,
    /// Messages it handed to consumers or `get`: its out rate over time.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delivered_total: Option<u64>,
}

impl From<QueueInfo> for QueueView {
    fn from(q: QueueInfo) -> Self {
        QueueView {
            name: q.name,
            durable: q.spec.as_ref().map(|s| s.durable),
            exclusive: q.spec.as_ref().map(|s| s.exclusive),
            auto_delete: q.spec.as_ref().map(|s| s.auto_delete),
            arguments: q.spec.as_ref().map(|s| arguments_out(&s.arguments)),
            messages: q.messages,
            messages_unacknowledged: q.messages_unacknowledged,
            consumers: q.consumers,
            published_total: q.totals.map(|t| t.published),
            delivered_total: q.totals.map(|t| t.delivered),
        }
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DeleteQueueParams {
    /// Only if it has no consumers.
    #[serde(default)]
    pub if_unused: bool,
    /// Only if it holds no ready messages.
    #[serde(default)]
    pub if_empty: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Purged {
    /// Ready messages dropped.
    pub purged: u64,
}

fn queue_visible(principal: &Principal, name: &str) -> bool {
    let p = &principal.permissions;
    // Monitoring sees every queue, as RabbitMQ's monitoring tag does.
    p.can_monitor() || p.can_configure(name) || p.can_consume(name)
}

/// List queues the caller may configure or consume (every queue for monitoring).
#[utoipa::path(get, path = "/v1/queues", tag = "queues", params(PageParams),
    responses((status = 200, body = Page<QueueView>),
        (status = 400, description = E400, body = Problem, content_type = "application/problem+json"),
        (status = 401, body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn list_queues(
    State(st): State<RestState>,
    Conn(conn): Conn,
    Caller(principal): Caller,
    ApiQuery(page): ApiQuery<PageParams>,
) -> Result<axum::Json<Page<QueueView>>, ApiError> {
    let channel = conn.channel(&st.ctx.engine).await?;
    let page = visible_page(
        &page,
        move |after: Option<String>, n| {
            let channel = channel.clone();
            Box::pin(async move { Ok(channel.list_queues(after.as_deref(), n).await?) })
        },
        |q: &QueueInfo| q.name.as_str(),
        |q| queue_visible(&principal, &q.name),
    )
    .await?;
    Ok(axum::Json(Page {
        items: page.items.into_iter().map(QueueView::from).collect(),
        next_cursor: page.next_cursor,
    }))
}

/// Declare a queue (idempotent: same flags → 204).
#[utoipa::path(put, path = "/v1/queues/{name}", tag = "queues",
    params(("name" = String, Path, description = "Queue name")),
    request_body = QueueDeclare,
    responses((status = 201, description = "Created"), (status = 204, description = "Existed with the same flags"),
        (status = 400, description = E400, body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "No configure permission, or a reserved name", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Exists with other flags", body = Problem, content_type = "application/problem+json"),
        (status = 415, body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn put_queue(
    State(st): State<RestState>,
    Conn(conn): Conn,
    Caller(principal): Caller,
    ApiPath(name): ApiPath<String>,
    ApiJson(body): ApiJson<QueueDeclare>,
) -> Result<StatusCode, ApiError> {
    check_name("queue", &name)?;
    if body.exclusive {
        return Err(ApiError::bad_request(
            "exclusive queues belong to a connection; REST cannot declare them",
        ));
    }
    let spec = QueueSpec {
        durable: body.durable,
        exclusive: false,
        auto_delete: body.auto_delete,
        arguments: arguments_in(&body.arguments)?,
    };
    configure(&principal, &name)?;
    let channel = conn.channel(&st.ctx.engine).await?;
    Ok(match channel.declare_queue(&name, &spec).await?.declared {
        Declared::Created => StatusCode::CREATED,
        Declared::Existed => StatusCode::NO_CONTENT,
    })
}

/// One queue with its message and consumer counts.
#[utoipa::path(get, path = "/v1/queues/{name}", tag = "queues",
    params(("name" = String, Path, description = "Queue name")),
    responses((status = 200, body = QueueView),
        (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn get_queue(
    State(st): State<RestState>,
    Conn(conn): Conn,
    Caller(principal): Caller,
    ApiPath(name): ApiPath<String>,
) -> Result<axum::Json<QueueView>, ApiError> {
    check_name("queue", &name)?;
    if !queue_visible(&principal, &name) {
        return Err(ApiError::forbidden(format!(
            "no permission on queue '{name}'"
        )));
    }
    let channel = conn.channel(&st.ctx.engine).await?;
    Ok(axum::Json(channel.queue_info(&name).await?.into()))
}

/// Delete a queue and its messages.
#[utoipa::path(delete, path = "/v1/queues/{name}", tag = "queues",
    params(("name" = String, Path, description = "Queue name"), DeleteQueueParams),
    responses((status = 204, description = "Deleted"),
        (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "if_unused / if_empty not met", body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn delete_queue(
    State(st): State<RestState>,
    Conn(conn): Conn,
    Caller(principal): Caller,
    ApiPath(name): ApiPath<String>,
    ApiQuery(params): ApiQuery<DeleteQueueParams>,
) -> Result<StatusCode, ApiError> {
    check_name("queue", &name)?;
    configure(&principal, &name)?;
    let channel = conn.channel(&st.ctx.engine).await?;
    channel
        .delete_queue(
            &name,
            DeleteQueueOptions {
                if_unused: params.if_unused,
                if_empty: params.if_empty,
            },
        )
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Drop a queue's ready messages.
#[utoipa::path(delete, path = "/v1/queues/{name}/contents", tag = "queues",
    params(("name" = String, Path, description = "Queue name")),
    responses((status = 200, body = Purged),
        (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn purge_queue(
    State(st): State<RestState>,
    Conn(conn): Conn,
    Caller(principal): Caller,
    ApiPath(name): ApiPath<String>,
) -> Result<axum::Json<Purged>, ApiError> {
    check_name("queue", &name)?;
    configure(&principal, &name)?;
    let channel = conn.channel(&st.ctx.engine).await?;
    Ok(axum::Json(Purged {
        purged: channel.purge_queue(&name).await?,
    }))
}

// ---------- bindings ----------

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BindingRequest {
    /// The exchange to bind to (not the default exchange).
    pub exchange: String,
    #[serde(default)]
    pub routing_key: String,
    /// For headers exchanges: `x-match` and the header values.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub arguments: Option<serde_json::Map<String, Value>>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct BindingView {
    pub exchange: String,
    pub queue: String,
    pub routing_key: String,
    #[schema(value_type = Object)]
    pub arguments: serde_json::Map<String, Value>,
}

impl From<BindingInfo> for BindingView {
    fn from(b: BindingInfo) -> Self {
        BindingView {
            exchange: exchange_label(&b.exchange),
            queue: b.queue,
            routing_key: b.routing_key,
            arguments: arguments_out(&b.arguments),
        }
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct UnbindParams {
    pub exchange: String,
    #[serde(default)]
    pub routing_key: String,
    /// The binding's arguments as a JSON object (headers exchanges).
    pub arguments: Option<String>,
}

/// Binding a queue lets it receive an exchange's messages: the caller must be able to
/// configure the queue and to read the exchange with that key.
fn may_bind(principal: &Principal, queue: &str, exchange: &str, key: &str) -> Result<(), ApiError> {
    configure(principal, queue)?;
    if !principal.permissions.can_read(exchange, key) {
        return Err(ApiError::forbidden(format!(
            "no read permission on '{exchange}' with binding key '{key}'"
        )));
    }
    Ok(())
}

/// A queue's bindings, the default exchange's included.
#[utoipa::path(get, path = "/v1/queues/{queue}/bindings", tag = "bindings",
    params(("queue" = String, Path, description = "Queue name"), PageParams),
    responses((status = 200, body = Page<BindingView>),
        (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn list_bindings(
    State(st): State<RestState>,
    Conn(conn): Conn,
    Caller(principal): Caller,
    ApiPath(queue): ApiPath<String>,
    ApiQuery(page): ApiQuery<PageParams>,
) -> Result<axum::Json<Page<BindingView>>, ApiError> {
    check_name("queue", &queue)?;
    if !queue_visible(&principal, &queue) {
        return Err(ApiError::forbidden(format!(
            "no permission on queue '{queue}'"
        )));
    }
    let size = page.size()?;
    let start: usize = match page.after()? {
        None => 0,
        Some(s) => s
            .parse()
            .map_err(|_| ApiError::bad_request("cursor is not one this API returned"))?,
    };
    let channel = conn.channel(&st.ctx.engine).await?;
    let all = channel.list_bindings(&queue).await?;
    let end = (start + size).min(all.len());
    let next_cursor = (end < all.len()).then(|| cursor_of(&end.to_string()));
    let items = all
        .into_iter()
        .skip(start)
        .take(size)
        .map(BindingView::from)
        .collect();
    Ok(axum::Json(Page { items, next_cursor }))
}

/// Bind a queue to an exchange.
#[utoipa::path(post, path = "/v1/queues/{queue}/bindings", tag = "bindings",
    params(("queue" = String, Path, description = "Queue name")),
    request_body = BindingRequest,
    responses((status = 201, body = BindingView),
        (status = 400, description = E400, body = Problem, content_type = "application/problem+json"),
        (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 415, body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn create_binding(
    State(st): State<RestState>,
    Conn(conn): Conn,
    Caller(principal): Caller,
    ApiPath(queue): ApiPath<String>,
    ApiJson(body): ApiJson<BindingRequest>,
) -> Result<Response, ApiError> {
    check_name("queue", &queue)?;
    check_name("exchange", &body.exchange)?;
    crate::engine::names::validate_key(&body.routing_key)
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let arguments = arguments_in(&body.arguments)?;
    may_bind(&principal, &queue, &body.exchange, &body.routing_key)?;
    let channel = conn.channel(&st.ctx.engine).await?;
    channel
        .bind_queue(&queue, &body.exchange, &body.routing_key, &arguments)
        .await?;
    let view = BindingView {
        exchange: exchange_label(crate::engine::names::canonical_exchange(&body.exchange)),
        queue,
        routing_key: body.routing_key,
        arguments: arguments_out(&arguments),
    };
    Ok((StatusCode::CREATED, axum::Json(view)).into_response())
}

/// Remove one binding.
#[utoipa::path(delete, path = "/v1/queues/{queue}/bindings", tag = "bindings",
    params(("queue" = String, Path, description = "Queue name"), UnbindParams),
    responses((status = 204, description = "Removed"),
        (status = 400, description = E400, body = Problem, content_type = "application/problem+json"),
        (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such queue, exchange or binding", body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn delete_binding(
    State(st): State<RestState>,
    Conn(conn): Conn,
    Caller(principal): Caller,
    ApiPath(queue): ApiPath<String>,
    ApiQuery(params): ApiQuery<UnbindParams>,
) -> Result<StatusCode, ApiError> {
    check_name("queue", &queue)?;
    check_name("exchange", &params.exchange)?;
    let arguments = match &params.arguments {
        None => FieldTable::new(),
        Some(text) => {
            let value: Value = serde_json::from_str(text)
                .map_err(|e| ApiError::bad_request(format!("arguments is not JSON: {e}")))?;
            table_from_json(&value).map_err(|e| ApiError::bad_request(format!("arguments: {e}")))?
        }
    };
    configure(&principal, &queue)?;
    let channel: std::sync::Arc<dyn Channel> = conn.channel(&st.ctx.engine).await?;
    let exchange = crate::engine::names::canonical_exchange(&params.exchange);
    let exists = channel.list_bindings(&queue).await?.into_iter().any(|b| {
        b.exchange == exchange && b.routing_key == params.routing_key && b.arguments == arguments
    });
    if !exists {
        return Err(ApiError::not_found("no such binding"));
    }
    channel
        .unbind_queue(&queue, &params.exchange, &params.routing_key, &arguments)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
