//! Any query string, header value and body a backend can send to the REST API, on each route
//! (the first byte picks the route; 0xFF bytes separate query, header value and body), into a
//! running gateway, authenticated as an administrator so the input reaches the handlers. Every
//! answer must be an HTTP answer — a 5xx other than 501/503 is a crash — never a panic.
//!
//!     cargo fuzz run rest_request --sanitizer none -- -max_total_time=60
#![no_main]

use amqp_gateway_fuzz::harness;
use libfuzzer_sys::fuzz_target;
use reqwest::Method;

/// (method, path, the header the input's header value goes to).
const ROUTES: &[(&str, &str, &str)] = &[
    ("POST", "/v1/exchanges/amq.topic/publish", "idempotency-key"),
    (
        "POST",
        "/v1/exchanges/amq.topic/publish-batch",
        "content-type",
    ),
    ("POST", "/v1/exchanges/amq.topic/messages", "amqp-headers"),
    (
        "POST",
        "/v1/exchanges/amq.topic/messages",
        "amqp-expiration",
    ),
    (
        "POST",
        "/v1/exchanges/amq.topic/messages",
        "amqp-delivery-mode",
    ),
    ("PUT", "/v1/queues/fuzz-q", "content-type"),
    ("PUT", "/v1/exchanges/fuzz-x", "content-type"),
    ("POST", "/v1/queues/fuzz-q/bindings", "content-type"),
    ("DELETE", "/v1/queues/fuzz-q/bindings", "content-type"),
    ("POST", "/v1/queues/fuzz-q/get", "content-type"),
    ("GET", "/v1/queues", "content-type"),
    ("GET", "/v1/exchanges", "content-type"),
    ("GET", "/v1/connections", "content-type"),
    ("GET", "/v1/overview", "content-type"),
    ("DELETE", "/v1/queues/fuzz-q/contents", "content-type"),
];

fuzz_target!(|data: &[u8]| {
    let Some((&pick, input)) = data.split_first() else {
        return;
    };
    let (method, path, header) = ROUTES[usize::from(pick) % ROUTES.len()];
    let mut parts = input.splitn(3, |&b| b == 0xFF);
    let query = String::from_utf8_lossy(parts.next().unwrap_or_default());
    let value = parts.next().unwrap_or_default();
    let body = parts.next().unwrap_or_default().to_vec();
    let h = harness();
    // A query string as the client wrote it: reqwest keeps what the URL parser accepts.
    let Ok(url) = reqwest::Url::parse(&format!("http://{}{path}?{query}", h.http)) else {
        return;
    };
    let mut req = h
        .client
        .request(Method::from_bytes(method.as_bytes()).unwrap(), url)
        .bearer_auth(&h.token)
        .body(body);
    if let Ok(v) = reqwest::header::HeaderValue::from_bytes(value) {
        req = req.header(header, v);
    }
    let status =
        h.rt.block_on(async { req.send().await.map(|r| r.status().as_u16()) });
    if let Ok(status) = status {
        assert!(
            status < 500 || status == 501 || status == 503,
            "{method} {path}: {status}"
        );
    }
});
