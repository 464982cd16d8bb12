//! Errors of starting and running the gateway process (each protocol layer has its own).

use std::net::SocketAddr;

use crate::config::ConfigError;
use crate::engine::EngineError;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot listen on {addr} ({listener}): {source}")]
    Bind {
        listener: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("engine: {0}")]
    Engine(#[from] EngineError),
    #[error("{0}")]
    Unsupported(String),
}
