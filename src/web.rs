//! Static files served from the binary: the browser client (`/client/amqp-gateway.js`), the
//! live console (`/console`: pub/sub) and its operator view (`/console/operator`, on the
//! `/v1/feed` WebSocket). Compiled in, so the gateway needs no files beside it.

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

const CLIENT_JS: &str = include_str!("../web/amqp-gateway.js");
const CONSOLE_HTML: &str = include_str!("../web/console.html");
const CONSOLE_JS: &str = include_str!("../web/console.js");
const CONSOLE_CSS: &str = include_str!("../web/console.css");
const OPERATOR_HTML: &str = include_str!("../web/operator.html");
const OPERATOR_JS: &str = include_str!("../web/operator.js");

fn asset(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
}

pub fn router() -> Router {
    Router::new()
        .route(
            "/client/amqp-gateway.js",
            get(|| async { asset("text/javascript; charset=utf-8", CLIENT_JS) }),
        )
        .route(
            "/console",
            get(|| async { asset("text/html; charset=utf-8", CONSOLE_HTML) }),
        )
        .route(
            "/console/console.js",
            get(|| async { asset("text/javascript; charset=utf-8", CONSOLE_JS) }),
        )
        .route(
            "/console/console.css",
            get(|| async { asset("text/css; charset=utf-8", CONSOLE_CSS) }),
        )
        .route(
            "/console/operator",
            get(|| async { asset("text/html; charset=utf-8", OPERATOR_HTML) }),
        )
        .route(
            "/console/operator.js",
            get(|| async { asset("text/javascript; charset=utf-8", OPERATOR_JS) }),
        )
}
