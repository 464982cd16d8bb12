//! amqp-gateway: one AMQP 0-9-1 messaging world for browsers (WebSocket), IoT devices (MQTT),
//! backend services (REST) and legacy AMQP applications.
//!
//! # Layout
//! - [`config`]: the one validated [`Config`] (file < `GATEWAY_…` env < flags).
//! - [`engine`]: THE seam — the [`engine::Engine`] trait and its message types; the embedded
//!   engine lives below it. Protocol adapters depend on it, never on an engine's internals.
//! - [`server`]: listeners, health and readiness.
//! - [`shutdown`]: shutdown as a value passed to every task.
//!
//! [`start`] runs the whole gateway in-process — on port 0 in tests and benches — and returns
//! its bound addresses.

pub mod cli;
pub mod config;
pub mod engine;
pub mod error;
pub mod server;
pub mod shutdown;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::task::JoinHandle;

pub use crate::config::Config;
use crate::config::EngineKindConfig;
use crate::engine::Engine;
use crate::engine::embedded::{EmbeddedEngine, EmbeddedOptions};
pub use crate::error::StartError;
use crate::shutdown::Shutdown;

/// Where the running gateway listens (the real ports when the config asked for port 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BoundAddrs {
    pub http: SocketAddr,
}

/// A running gateway.
pub struct Gateway {
    addrs: BoundAddrs,
    engine: Arc<dyn Engine>,
    shutdown: Shutdown,
    tasks: Vec<JoinHandle<()>>,
}

impl Gateway {
    pub fn addrs(&self) -> BoundAddrs {
        self.addrs
    }

    /// The engine behind the adapters (tests and benches use it directly).
    pub fn engine(&self) -> Arc<dyn Engine> {
        self.engine.clone()
    }

    /// A handle that stops the gateway when triggered.
    pub fn shutdown_handle(&self) -> Shutdown {
        self.shutdown.clone()
    }

    /// Stops accepting, lets connections drain for at most `shutdown_timeout`, stops the
    /// engine. Returns once every listener task has ended.
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
        self.engine.shutdown().await;
        tracing::info!("gateway stopped");
    }
}

/// Builds the engine the configuration asks for.
async fn build_engine(config: &Config) -> Result<Arc<dyn Engine>, StartError> {
    match config.engine.kind {
        EngineKindConfig::Embedded => Ok(Arc::new(EmbeddedEngine::new(EmbeddedOptions {
            max_message_bytes: config.limits.max_message_bytes.as_u64() as usize,
            ..EmbeddedOptions::default()
        }))),
        EngineKindConfig::Upstream => Err(StartError::Unsupported(
            "engine.kind = \"upstream\" is not available in this version; use \"embedded\"".into(),
        )),
    }
}

/// Starts the gateway: engine, then every listener. Returns once all listeners accept
/// connections.
pub async fn start(config: Config) -> Result<Gateway, StartError> {
    config::validate(&config)?;
    let engine = build_engine(&config).await?;
    let shutdown = Shutdown::new();

    let http = server::bind("http", config.http.listen).await?;
    let http_addr = http.local_addr().map_err(|source| StartError::Bind {
        listener: "http",
        addr: config.http.listen,
        source,
    })?;
    let state = server::AppState {
        engine: engine.clone(),
        shutdown: shutdown.clone(),
    };
    let tasks = vec![server::serve_http(
        http,
        server::router(state),
        shutdown.clone(),
        config.shutdown_timeout,
    )];
    tracing::info!(listener = "http", addr = %http_addr, "listening (REST, health)");
    tracing::info!(engine = ?engine.kind(), "gateway started");

    Ok(Gateway {
        addrs: BoundAddrs { http: http_addr },
        engine,
        shutdown,
        tasks,
    })
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
