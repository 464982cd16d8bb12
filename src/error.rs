//! Errors of starting and running the gateway process (each protocol layer has its own).

use std::net::SocketAddr;

use crate::auth::jwt::KeyError;
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
    /// The embedded engine's data directory cannot be used (in use, another format, unreadable).
    #[error("{0}")]
    Store(String),
    #[error("{0}")]
    Unsupported(String),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("token keys: {0}")]
    Keys(#[from] KeyError),
    #[error(
        "no token key is configured, so no client could authenticate. Set auth.hs256_secret \
         (GATEWAY_AUTH__HS256_SECRET), auth.public_keys, or auth.jwks_url / auth.jwks_file — or \
         run with --dev for a local secret and an administrator token"
    )]
    NoTokenKey,
}
