//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::future::Future;
use std::time::Duration;

use amqp_gateway::engine::{Consumer, Delivery};

pub mod amqp;
pub mod amqp_raw;
pub mod child;
pub mod held_confirms;
pub mod load;
pub mod mqtt_bytes;
pub mod mqtt_wire;
pub mod proxy;
pub mod rabbit;
pub mod rabbit_node;
pub mod scratch;
pub mod sse;
pub mod tls;
pub mod under;
pub mod upstream_clients;
pub mod ws;

/// A key file under `tests/fixtures/keys`.
pub fn key_fixture(name: &str) -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/keys")
        .join(name)
}

/// Every wait in the tests is bounded by this.
pub const WAIT: Duration = Duration::from_secs(5);

/// A name no other test (or test run sharing an upstream vhost) uses.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("test-{prefix}-{}-{n}-{nanos:x}", std::process::id())
}

/// The next delivery, failing the test after [`WAIT`].
pub async fn next(consumer: &mut Consumer) -> Delivery {
    match tokio::time::timeout(WAIT, consumer.recv()).await {
        Ok(Some(d)) => d,
        Ok(None) => panic!(
            "consumer {} ended ({:?}) while a delivery was expected",
            consumer.tag(),
            consumer.cancel_reason()
        ),
        Err(_) => panic!("no delivery within {WAIT:?} on {}", consumer.queue()),
    }
}

/// Asserts that nothing arrives within `quiet` (absence can only be observed over a window).
pub async fn nothing_within(consumer: &mut Consumer, quiet: Duration) {
    if let Ok(got) = tokio::time::timeout(quiet, consumer.recv()).await {
        panic!(
            "expected no delivery, got {:?}",
            got.map(|d| String::from_utf8_lossy(d.body()).into_owned())
        );
    }
}

/// Polls `check` until it holds, failing after [`WAIT`]; for conditions with no event to await.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if check().await {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub fn text(d: &Delivery) -> String {
    String::from_utf8_lossy(d.body()).into_owned()
}

// ---------- a gateway on port 0 ----------

use amqp_gateway::{Config, Gateway};

pub const SECRET: &str = "integration-test-secret-0123456789";

/// A gateway started in-process on port 0, with an HTTP client.
pub struct TestGateway {
    pub gateway: Gateway,
    pub base: String,
    pub metrics: String,
    pub http: reqwest::Client,
}

pub fn test_config() -> Config {
    let mut c = Config::default();
    c.http.listen = "127.0.0.1:0".parse().unwrap();
    c.metrics.listen = "127.0.0.1:0".parse().unwrap();
    c.mqtt.listen = "127.0.0.1:0".parse().unwrap();
    c.amqp.listen = "127.0.0.1:0".parse().unwrap();
    c.mqtt.tls_listen = "127.0.0.1:0".parse().unwrap();
    c.amqp.tls_listen = "127.0.0.1:0".parse().unwrap();
    c.auth.hs256_secret = Some(SECRET.into());
    // A data directory of its own: the store's lock allows one gateway per directory.
    c.engine.data_dir = scratch::dir("data-");
    c.shutdown_timeout = Duration::from_secs(2);
    c
}

pub async fn start_gateway(tweak: impl FnOnce(&mut Config)) -> TestGateway {
    let mut config = test_config();
    tweak(&mut config);
    let gateway = amqp_gateway::start(config).await.expect("gateway starts");
    TestGateway::around(gateway)
}

/// A gateway on an engine the test built (to watch or hold what the adapters do with it).
pub async fn start_gateway_on(
    engine: std::sync::Arc<dyn amqp_gateway::engine::Engine>,
    tweak: impl FnOnce(&mut Config),
) -> TestGateway {
    let mut config = test_config();
    tweak(&mut config);
    let gateway = amqp_gateway::start_with(config, engine)
        .await
        .expect("gateway starts");
    TestGateway::around(gateway)
}

impl TestGateway {
    fn around(gateway: Gateway) -> TestGateway {
        let addrs = gateway.addrs();
        TestGateway {
            base: format!("http://{}", addrs.http),
            metrics: format!("http://{}", addrs.metrics),
            gateway,
            http: reqwest::Client::builder().timeout(WAIT).build().unwrap(),
        }
    }
}

/// A token for `sub` with `scope`, signed with [`SECRET`].
/// A memory high watermark of 64 KiB: one 100 KiB message held puts the engine above it.
pub fn low_watermark(c: &mut Config) {
    c.engine.memory_high_watermark =
        amqp_gateway::config::Watermark::Bytes(bytesize::ByteSize::kib(64));
}

pub fn token(sub: &str, scope: &str) -> String {
    amqp_gateway::auth::mint(
        SECRET,
        sub,
        scope,
        Duration::from_secs(3600),
        "gateway",
        None,
    )
    .unwrap()
}

pub fn admin() -> String {
    token("root", "gateway.tag:administrator")
}

impl TestGateway {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn get(&self, path: &str, token: &str) -> reqwest::RequestBuilder {
        self.http.get(self.url(path)).bearer_auth(token)
    }

    pub fn put(&self, path: &str, token: &str) -> reqwest::RequestBuilder {
        self.http.put(self.url(path)).bearer_auth(token)
    }

    pub fn post(&self, path: &str, token: &str) -> reqwest::RequestBuilder {
        self.http.post(self.url(path)).bearer_auth(token)
    }

    pub fn delete(&self, path: &str, token: &str) -> reqwest::RequestBuilder {
        self.http.delete(self.url(path)).bearer_auth(token)
    }

    /// Declares a queue as administrator and returns its name.
    pub async fn queue(&self, prefix: &str) -> String {
        let name = unique(prefix);
        let r = self
            .put(&format!("/v1/queues/{name}"), &admin())
            .json(&serde_json::json!({"durable": false}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "declare {name}");
        name
    }

    pub async fn bind(&self, queue: &str, exchange: &str, key: &str) {
        let r = self
            .post(&format!("/v1/queues/{queue}/bindings"), &admin())
            .json(&serde_json::json!({"exchange": exchange, "routing_key": key}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "bind {queue} to {exchange}/{key}");
    }

    /// The Prometheus text from the metrics listener.
    pub async fn metrics_text(&self) -> String {
        self.http
            .get(format!("{}/metrics", self.metrics))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// The value of the unlabelled metric `name` (a sample line, never its `# HELP`, whose
    /// text may start with a number too); `None` when it is not rendered.
    pub async fn metric(&self, name: &str) -> Option<f64> {
        metric_in(&self.metrics_text().await, name)
    }

    /// Ready messages in `queue`.
    pub async fn depth(&self, queue: &str) -> u64 {
        let v: serde_json::Value = self
            .get(&format!("/v1/queues/{queue}"), &admin())
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v["messages"].as_u64().expect("messages count")
    }

    /// Publishes `body` (JSON) to `exchange` with `key` as administrator over REST; 200 expected.
    pub async fn publish(&self, exchange: &str, key: &str, body: serde_json::Value) {
        let r = self
            .post(&format!("/v1/exchanges/{exchange}/publish"), &admin())
            .json(&serde_json::json!({"routing_key": key, "body": body}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "publish to {exchange} with {key}");
    }

    /// Takes up to `count` messages from `queue` as administrator.
    pub async fn take(&self, queue: &str, count: u32) -> Vec<serde_json::Value> {
        take_at(&self.http, &self.base, queue, count).await
    }
}

/// Takes up to `count` messages from `queue` of the gateway at `base` as administrator.
pub async fn take_at(
    http: &reqwest::Client,
    base: &str,
    queue: &str,
    count: u32,
) -> Vec<serde_json::Value> {
    let v: serde_json::Value = http
        .post(format!("{base}/v1/queues/{queue}/get"))
        .bearer_auth(admin())
        .json(&serde_json::json!({"count": count}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["messages"].as_array().cloned().unwrap_or_default()
}

/// Asserts a problem+json answer with `status` and `code`; returns its body.
pub async fn problem(resp: reqwest::Response, status: u16, code: &str) -> serde_json::Value {
    let got = resp.status().as_u16();
    let ct = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let text = resp.text().await.unwrap();
    assert_eq!(got, status, "status for body {text}");
    assert_eq!(
        ct, "application/problem+json",
        "content type for body {text}"
    );
    let body: serde_json::Value = serde_json::from_str(&text).expect("problem is JSON");
    assert_eq!(body["code"], code, "{body}");
    assert_eq!(body["type"], format!("/problems/{code}"));
    assert_eq!(body["status"], status);
    assert!(
        body["detail"].as_str().is_some_and(|d| !d.is_empty()),
        "{body}"
    );
    assert!(body["title"].is_string());
    body
}

/// Sends `req` and asserts the problem+json answer with `status` and `code`.
pub async fn refused(req: reqwest::RequestBuilder, status: u16, code: &str) -> serde_json::Value {
    problem(req.send().await.unwrap(), status, code).await
}

/// Sends `req` and returns its status.
pub async fn status(req: reqwest::RequestBuilder) -> u16 {
    req.send().await.unwrap().status().as_u16()
}

/// Sends `req` and asserts 403 `forbidden`.
pub async fn forbidden(req: reqwest::RequestBuilder) {
    refused(req, 403, "forbidden").await;
}

/// Sends `req` and returns its JSON body.
pub async fn json_of(req: reqwest::RequestBuilder) -> serde_json::Value {
    req.send().await.unwrap().json().await.unwrap()
}

/// The value of the unlabelled metric `name` in a Prometheus text.
pub fn metric_in(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}
