//! The listeners: binds each one, logs its bound address once it accepts connections, and
//! serves until shutdown. Today: HTTP (health and readiness; REST, `/ws` and `/mqtt` join the
//! same router as their adapters land).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::engine::{Engine, Health};
use crate::error::StartError;
use crate::shutdown::Shutdown;

/// What every HTTP handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub engine: Arc<dyn Engine>,
    pub shutdown: Shutdown,
}

pub async fn bind(listener: &'static str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind {
            listener,
            addr,
            source,
        })
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
}

/// Liveness: the process serves HTTP.
async fn healthz() -> impl IntoResponse {
    Json(json!({"status": "ok"}))
}

/// Readiness: the engine can take work and we are not draining.
async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    if state.shutdown.is_triggered() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "not_ready", "reason": "shutting down"})),
        );
    }
    match state.engine.health() {
        Health::Ready => (StatusCode::OK, Json(json!({"status": "ready"}))),
        Health::NotReady(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "not_ready", "reason": reason})),
        ),
    }
}

/// Serves HTTP on `listener` until shutdown, then lets open requests finish for `drain`.
pub fn serve_http(
    listener: TcpListener,
    app: Router,
    shutdown: Shutdown,
    drain: Duration,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let addr = listener.local_addr().ok();
        let server = axum::serve(listener, app).with_graceful_shutdown(shutdown.wait_owned());
        let mut serving = tokio::spawn(async move { server.await });
        shutdown.wait().await;
        match tokio::time::timeout(drain, &mut serving).await {
            Ok(Ok(Ok(()))) => tracing::debug!(?addr, "http listener stopped"),
            Ok(Ok(Err(e))) => tracing::error!(error = %e, "http server failed"),
            Ok(Err(e)) => tracing::error!(error = %e, "http server task failed"),
            Err(_) => {
                serving.abort();
                tracing::warn!(
                    ?addr,
                    "http connections still open after the shutdown timeout; closed"
                );
            }
        }
    })
}
