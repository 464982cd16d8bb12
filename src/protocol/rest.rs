//! The REST adapter (`/v1`, DESIGN.md §5): publish, topology, pull and Server-Sent Events, the
//! OpenAPI document generated from the handlers (utoipa, committed as `openapi/openapi.json`) and
//! Swagger UI at `/docs`, served from the binary. Every error is problem+json.

pub mod connections;
mod extract;
mod feed;
mod idempotency;
pub mod overview;
pub mod problem;
pub mod publish;
pub mod pull;
pub mod sse;
pub mod topology;

use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use utoipa::openapi::OpenApi as OpenApiDoc;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use utoipa_swagger_ui::SwaggerUi;

use self::extract::Caller;
use self::idempotency::IdempotencyCache;
use self::problem::{ApiError, Problem};
use crate::context::Context;

/// Requests larger than this are refused before they are read whole (a batch of
/// `http.max_batch` maximal messages would otherwise allow gigabytes).
const MAX_REQUEST_BYTES: usize = 64 * 1024 * 1024;

#[derive(Clone)]
pub struct RestState {
    pub ctx: Context,
    idempotency: Arc<IdempotencyCache>,
    sampler: Arc<overview::Sampler>,
}

impl RestState {
    fn max_message_bytes(&self) -> usize {
        self.ctx.config.limits.max_message_bytes.as_u64() as usize
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "amqp-gateway",
        description = "REST access to the gateway's AMQP 0-9-1 engine: publish, manage exchanges, \
                       queues and bindings, and pull messages. Authenticate with a JWT bearer \
                       token; errors are application/problem+json with a `code`.",
        license(name = "Apache-2.0")
    ),
    modifiers(&BearerAuth),
    components(schemas(Problem)),
    tags(
        (name = "publish", description = "Publish messages"),
        (name = "exchanges", description = "Declare, inspect and delete exchanges"),
        (name = "queues", description = "Declare, inspect, purge and delete queues"),
        (name = "bindings", description = "Bind queues to exchanges"),
        (name = "pull", description = "Fetch messages from a queue"),
        (name = "subscribe", description = "Receive messages as Server-Sent Events"),
        (name = "operations", description = "The gateway and its connections, for operators"),
    )
)]
struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut OpenApiDoc) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
    }
}

fn api() -> OpenApiRouter<RestState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(publish::publish))
        .routes(routes!(publish::publish_batch))
        .routes(routes!(publish::publish_raw))
        .routes(routes!(topology::list_exchanges))
        .routes(routes!(
            topology::put_exchange,
            topology::get_exchange,
            topology::delete_exchange
        ))
        .routes(routes!(topology::list_queues))
        .routes(routes!(
            topology::put_queue,
            topology::get_queue,
            topology::delete_queue
        ))
        .routes(routes!(topology::purge_queue))
        .routes(routes!(
            topology::list_bindings,
            topology::create_binding,
            topology::delete_binding
        ))
        .routes(routes!(pull::get))
        .routes(routes!(sse::subscribe))
        .routes(routes!(overview::overview))
        .routes(routes!(connections::list_connections))
        .routes(routes!(
            connections::get_connection,
            connections::close_connection
        ))
}

/// The OpenAPI document the code describes (what `openapi/openapi.json` must equal).
pub fn openapi() -> OpenApiDoc {
    let mut doc = api().split_for_parts().1;
    doc.info.version = env!("CARGO_PKG_VERSION").to_owned();
    doc
}

/// `/v1`, `/openapi.json`, `/docs` and `/metrics` (for monitoring tokens).
pub fn router(ctx: Context) -> Router {
    let state = RestState {
        idempotency: Arc::new(IdempotencyCache::new(ctx.config.http.idempotency_window)),
        sampler: overview::Sampler::spawn(&ctx),
        ctx,
    };
    let (api, _) = api().split_for_parts();
    Router::new()
        .merge(api.layer(DefaultBodyLimit::max(MAX_REQUEST_BYTES)))
        .route("/metrics", get(metrics_route))
        .route("/v1/feed", get(feed::feed))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
        .merge(SwaggerUi::new("/docs").url("/openapi.json", openapi()))
}

async fn metrics_route(State(st): State<RestState>, Caller(principal): Caller) -> Response {
    if !principal.permissions.can_monitor() {
        return ApiError::forbidden("/metrics needs gateway.tag:monitoring or administrator")
            .into_response();
    }
    let mut resp = crate::metrics::render(st.ctx.engine.as_ref()).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    resp
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such resource")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        axum::http::StatusCode::METHOD_NOT_ALLOWED,
        "bad_request",
        "method not allowed on this resource",
    )
}
