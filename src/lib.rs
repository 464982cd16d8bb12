//! amqp-gateway: one AMQP 0-9-1 messaging world for browsers (WebSocket), IoT devices (MQTT),
//! backend services (REST) and legacy AMQP applications.
//!
//! # Layout
//! - [`config`] the one validated [`Config`] (file < `GATEWAY_…` env < flags); [`cli`] the
//!   flags and subcommands over it.
//! - [`engine`]: THE seam — the [`engine::Engine`] trait, its message types, the session
//!   registry and retained store every instance shares; the embedded engine lives below it.
//!   Protocol adapters depend on it, never on an engine's internals.
//! - [`protocol`]: the adapters — `rest`, `ws` (JSON over WebSocket), `mqtt` (3.1.1 and 5 over
//!   TCP and WebSocket). Each depends on what follows here, never on another adapter.
//! - [`context`]: what every adapter is given, and the publish gate they all go through.
//! - [`auth`]: tokens → principals and permissions. [`flow`]: rate buckets and connection
//!   admission. [`json`]: the JSON form of messages REST and WebSocket share. [`codes`]: the
//!   error codes they share.
//! - [`server`]: listeners (one accept loop), health and readiness; [`web`]: the browser client
//!   and console; [`metrics`]: Prometheus names and labels; [`shutdown`]: shutdown as a value
//!   passed to every task; [`error`]: errors of starting the process.
//!
//! [`start`] runs the whole gateway in-process — on port 0 in tests and benches — and returns
//! its bound addresses.

pub mod auth;
pub mod cli;
pub mod codes;
pub mod config;
pub mod context;
pub mod engine;
pub mod error;
pub mod flow;
pub mod json;
pub mod metrics;
pub mod protocol;
pub mod server;
pub mod shutdown;
pub mod tls;
pub mod web;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::task::JoinHandle;
use tokio_util::task::TaskTracker;

pub use crate::config::Config;
use crate::config::EngineKindConfig;
use crate::engine::Engine;
use crate::engine::embedded::store::disk::DiskStore;
use crate::engine::embedded::{EmbeddedEngine, EmbeddedOptions};
use crate::engine::upstream::{UpstreamEngine, UpstreamOptions};
pub use crate::error::StartError;
use crate::shutdown::Shutdown;

/// Where the running gateway listens (the real ports when the config asked for port 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BoundAddrs {
    pub http: SocketAddr,
    pub mqtt: SocketAddr,
    pub metrics: SocketAddr,
    /// `None` in upstream mode: AMQP applications talk to the broker itself.
    pub amqp: Option<SocketAddr>,
    /// MQTT over TLS, when `tls.cert`/`tls.key` are set.
    pub mqtt_tls: Option<SocketAddr>,
    /// AMQP over TLS, when TLS is set and the AMQP listener runs.
    pub amqp_tls: Option<SocketAddr>,
    /// Whether the HTTP listener speaks TLS (HTTPS, WSS).
    pub https: bool,
}

/// A running gateway.
pub struct Gateway {
    addrs: BoundAddrs,
    engine: Arc<dyn Engine>,
    shutdown: Shutdown,
    tasks: Vec<JoinHandle<()>>,
    /// Client connections' tasks, waited for before the engine stops.
    connections: TaskTracker,
    shutdown_timeout: std::time::Duration,
    tls: Option<Arc<tls::Tls>>,
}

impl Gateway {
    pub fn addrs(&self) -> BoundAddrs {
        self.addrs
    }

    /// The engine behind the adapters (tests and benches use it directly).
    pub fn engine(&self) -> Arc<dyn Engine> {
        self.engine.clone()
    }

    /// Reads `tls.cert` and `tls.key` again (the binary does on SIGHUP): handshakes from now on
    /// present the new certificate; open connections keep theirs. `Ok(false)` without TLS; on
    /// an error the current certificate stays.
    pub fn reload_tls(&self) -> Result<bool, tls::TlsError> {
        match &self.tls {
            Some(tls) => tls.reload().map(|()| true),
            None => Ok(false),
        }
    }

    /// A handle that stops the gateway when triggered.
    pub fn shutdown_handle(&self) -> Shutdown {
        self.shutdown.clone()
    }

    /// Stops accepting, lets connections drain for at most `shutdown_timeout`, stops the
    /// engine. Returns once every listener and connection task has ended (or the timeout).
    pub async fn shutdown(self) {
        self.shutdown.trigger();
        self.wait().await;
    }

    /// Waits until the gateway has been shut down (by a [`Shutdown`] handle) and has stopped.
    pub async fn wait(self) {
        self.shutdown.wait().await;
        for task in self.tasks {
            if let Err(e) = task.await {
                tracing::error!(error = %e, "listener task failed");
            }
        }
        // Connections close themselves on the shutdown signal (MQTT 5 DISCONNECT 0x8B,
        // WebSocket 1001) and store their sessions; the engine stops after them.
        self.connections.close();
        if tokio::time::timeout(self.shutdown_timeout, self.connections.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                open = self.connections.len(),
                "connections still open after the shutdown timeout; stopping the engine anyway"
            );
        }
        self.engine.shutdown().await;
        tracing::info!("gateway stopped");
    }
}

/// Builds the engine the configuration asks for.
async fn build_engine(config: &Config) -> Result<Arc<dyn Engine>, StartError> {
    match config.engine.kind {
        EngineKindConfig::Embedded => {
            let available = crate::engine::embedded::memory::available();
            let watermark = config.engine.memory_high_watermark.resolve(available);
            match watermark {
                Some(bytes) => tracing::info!(
                    bytes,
                    "memory high watermark: publishes are throttled above {}",
                    bytesize::ByteSize::b(bytes)
                ),
                None => tracing::warn!(
                    "memory available to the process unknown: engine.memory_high_watermark \
                     as a percentage is not enforced (give a size instead)"
                ),
            }
            let dir = &config.engine.data_dir;
            let store = DiskStore::open(dir, config.engine.fsync, config.engine.fsync_max_delay)
                .map_err(|e| StartError::Store(e.to_string()))?;
            tracing::info!(data_dir = %dir.display(), "durable topology kept on disk");
            Ok(Arc::new(EmbeddedEngine::open(EmbeddedOptions {
                store: Arc::new(store),
                max_message_bytes: config.limits.max_message_bytes.as_u64() as usize,
                memory_high_watermark: watermark,
                retained_bytes: config
                    .mqtt
                    .retained_stream_bytes
                    .as_u64()
                    .min(usize::MAX as u64) as usize,
                disk_alarm: Some((dir.clone(), config.engine.disk_free_limit.as_u64())),
                backlog: Some(crate::flow::Bound {
                    messages: config.limits.outbound_buffer_messages as u64,
                    bytes: config.limits.outbound_buffer_bytes.as_u64(),
                }),
            })?))
        }
        EngineKindConfig::Upstream => {
            let upstream = &config.engine.upstream;
            let url = upstream
                .url
                .clone()
                .ok_or_else(|| StartError::Unsupported("engine.upstream.url is required".into()))?;
            let mut options = UpstreamOptions::new(url);
            options.management_url = upstream.management_url.clone();
            options.heartbeat = upstream.heartbeat;
            if let Some(path) = &upstream.tls_ca {
                let pem = std::fs::read_to_string(path).map_err(|e| {
                    StartError::Unsupported(format!(
                        "engine.upstream.tls_ca: cannot read {}: {e}",
                        path.display()
                    ))
                })?;
                options.tls_ca = Some(pem);
            }
            options.max_message_bytes = config.limits.max_message_bytes.as_u64() as usize;
            options.retained_bytes = config.mqtt.retained_stream_bytes.as_u64();
            Ok(Arc::new(UpstreamEngine::connect(options).await?))
        }
    }
}

/// Every key the gateway could verify a token with.
fn has_token_key(config: &Config) -> bool {
    let a = &config.auth;
    a.hs256_secret.is_some()
        || !a.public_keys.is_empty()
        || a.jwks_url.is_some()
        || a.jwks_file.is_some()
}

/// How often forgotten rate-limit buckets are dropped.
const HOUSEKEEPING_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// Starts the gateway: engine, then every listener. Returns once all listeners accept
/// connections.
pub async fn start(config: Config) -> Result<Gateway, StartError> {
    config::validate(&config)?;
    let engine = build_engine(&config).await?;
    start_with(config, engine).await
}

/// [`start`] on an engine built by the caller (an application embedding the gateway, or a
/// test wrapping an engine to watch what the adapters do with it); `engine.*` of `config` is
/// not used.
pub async fn start_with(config: Config, engine: Arc<dyn Engine>) -> Result<Gateway, StartError> {
    config::validate(&config)?;
    if !has_token_key(&config) {
        if config.auth.anonymous_scope.is_none() {
            return Err(StartError::NoTokenKey);
        }
        tracing::warn!(
            "no token key configured: only anonymous clients (auth.anonymous_scope) can connect"
        );
    }
    let auth = Arc::new(auth::Authenticator::new(&config.auth).await?);
    let tls = match (&config.tls.cert, &config.tls.key) {
        (Some(cert), Some(key)) => Some(Arc::new(tls::Tls::load(cert, key)?)),
        _ => None,
    };
    let shutdown = Shutdown::new();
    let config = Arc::new(config);
    let ctx = context::Context::new(context::Shared {
        engine: engine.clone(),
        auth: auth.clone(),
        flow: Arc::new(flow::Flow::new(&config.limits)),
        config: config.clone(),
        shutdown: shutdown.clone(),
        connections: TaskTracker::new(),
        registry: Arc::default(),
        started: std::time::Instant::now(),
    });
    metrics::handle();

    let (http, http_addr) = server::bind("http", config.http.listen).await?;
    let (mqtt, mqtt_addr) = server::bind("mqtt", config.mqtt.listen).await?;
    let (metrics_listener, metrics_addr) = server::bind("metrics", config.metrics.listen).await?;
    let amqp = bind_amqp(&config, engine.as_ref()).await?;
    let amqp_addr = amqp.as_ref().map(|(_, addr)| *addr);
    let secure = match &tls {
        Some(_) => Some(bind_tls(&config, engine.as_ref()).await?),
        None => None,
    };

    let app = server::health_routes(ctx.clone())
        .merge(protocol::rest::router(ctx.clone()))
        .merge(protocol::ws::router(ctx.clone()))
        .merge(protocol::mqtt::router(ctx.clone()))
        .merge(web::router());
    let mut tasks = vec![
        server::serve_http(
            http,
            app,
            ctx.clone(),
            http_options(&config, tls.as_ref().map(|t| t.http.clone())),
        ),
        // Plain HTTP always: Prometheus scrapes it where only it reaches (127.0.0.1 by default).
        server::serve_http(
            metrics_listener,
            server::metrics_routes(ctx.clone()),
            ctx.clone(),
            http_options(&config, None),
        ),
    ];
    tasks.push(protocol::mqtt::serve_tcp(mqtt, ctx.clone()));
    if let Some((listener, _)) = amqp {
        tasks.push(protocol::amqp::serve_tcp(listener, ctx.clone()));
    }
    let (mqtt_tls, amqp_tls) = match (secure, &tls) {
        (Some(listeners), Some(tls)) => serve_tls(listeners, tls, &ctx, &mut tasks),
        _ => (None, None),
    };
    tasks.extend(auth::jwt::spawn_refresh(
        auth.verifier(),
        config.auth.jwks_refresh,
        shutdown.clone(),
    ));
    tasks.push(spawn_housekeeping(ctx.flow.clone(), shutdown.clone()));
    // Connections learn of the shutdown through their registry entries (one waker each,
    // where a wait on the shutdown token was a lock every connection shared).
    tasks.push(tokio::spawn({
        let (stop, registry) = (shutdown.clone(), ctx.registry.clone());
        async move {
            stop.wait().await;
            registry.stop_all();
        }
    }));
    let addrs = BoundAddrs {
        http: http_addr,
        mqtt: mqtt_addr,
        metrics: metrics_addr,
        amqp: amqp_addr,
        mqtt_tls,
        amqp_tls,
        https: tls.is_some(),
    };
    log_listeners(&addrs);
    tracing::info!(engine = ?engine.kind(), "gateway started");

    Ok(Gateway {
        addrs,
        engine,
        shutdown,
        tasks,
        connections: ctx.connections.clone(),
        shutdown_timeout: config.shutdown_timeout,
        tls,
    })
}

fn http_options(config: &Config, tls: Option<tokio_rustls::TlsAcceptor>) -> server::HttpOptions {
    server::HttpOptions {
        header_read_timeout: config.http.header_read_timeout,
        max_header_bytes: config.http.max_header_bytes.as_u64().min(usize::MAX as u64) as usize,
        drain: config.shutdown_timeout,
        tls,
    }
}

/// Forgets idle rate-limit buckets and folds held metric samples now and then.
fn spawn_housekeeping(flow: Arc<flow::Flow>, stop: Shutdown) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.wait() => return,
                _ = tokio::time::sleep(HOUSEKEEPING_EVERY) => {
                    flow.housekeeping();
                    metrics::upkeep();
                }
            }
        }
    })
}

/// Serves MQTT and AMQP over TLS on their bound listeners; returns their addresses.
fn serve_tls(
    listeners: TlsListeners,
    tls: &tls::Tls,
    ctx: &context::Context,
    tasks: &mut Vec<JoinHandle<()>>,
) -> (Option<SocketAddr>, Option<SocketAddr>) {
    let (mqtt, mqtt_addr) = listeners.mqtt;
    tasks.push(protocol::mqtt::serve_tls(
        mqtt,
        ctx.clone(),
        tls.stream.clone(),
    ));
    let amqp_addr = listeners.amqp.map(|(listener, addr)| {
        tasks.push(protocol::amqp::serve_tls(
            listener,
            ctx.clone(),
            tls.stream.clone(),
        ));
        addr
    });
    (Some(mqtt_addr), amqp_addr)
}

fn log_listeners(addrs: &BoundAddrs) {
    let (http_addr, mqtt_addr, metrics_addr) = (addrs.http, addrs.mqtt, addrs.metrics);
    if addrs.https {
        tracing::info!(listener = "http", addr = %http_addr, "listening (HTTPS and WSS only: REST /v1, /ws, /mqtt, /docs, health)");
    } else {
        tracing::info!(listener = "http", addr = %http_addr, "listening (REST /v1, /docs, health)");
    }
    tracing::info!(listener = "mqtt", addr = %mqtt_addr, "listening (MQTT 3.1.1 and 5 over TCP)");
    if let Some(addr) = addrs.mqtt_tls {
        tracing::info!(listener = "mqtt_tls", addr = %addr, "listening (MQTT over TLS)");
    }
    tracing::info!(listener = "metrics", addr = %metrics_addr, "listening (Prometheus /metrics)");
    match addrs.amqp {
        Some(addr) => tracing::info!(listener = "amqp", addr = %addr, "listening (AMQP 0-9-1)"),
        None => tracing::info!(
            "AMQP listener off: in upstream mode AMQP applications connect to the upstream broker"
        ),
    }
    if let Some(addr) = addrs.amqp_tls {
        tracing::info!(listener = "amqp_tls", addr = %addr, "listening (AMQP 0-9-1 over TLS)");
    }
}

/// The TLS listeners bound: MQTT always, AMQP where its plain listener runs.
struct TlsListeners {
    mqtt: (tokio::net::TcpListener, SocketAddr),
    amqp: Option<(tokio::net::TcpListener, SocketAddr)>,
}

async fn bind_tls(config: &Config, engine: &dyn Engine) -> Result<TlsListeners, StartError> {
    let mqtt = server::bind("mqtt_tls", config.mqtt.tls_listen).await?;
    let amqp = if engine.capabilities().amqp_listener {
        Some(server::bind("amqp_tls", config.amqp.tls_listen).await?)
    } else {
        None
    };
    Ok(TlsListeners { mqtt, amqp })
}

/// The AMQP listener, where the engine has AMQP clients connect to the gateway (embedded; on
/// upstream they use the broker).
async fn bind_amqp(
    config: &Config,
    engine: &dyn Engine,
) -> Result<Option<(tokio::net::TcpListener, SocketAddr)>, StartError> {
    if !engine.capabilities().amqp_listener {
        return Ok(None);
    }
    Ok(Some(server::bind("amqp", config.amqp.listen).await?))
}

/// Starts the gateway and runs it until `stop` completes, then shuts it down.
pub async fn run(
    config: Config,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), StartError> {
    let gateway = start(config).await?;
    stop.await;
    gateway.shutdown().await;
    Ok(())
}
