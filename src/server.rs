//! The listeners: binds each one, accepts with backoff, enforces the header read timeout, gives
//! every request its [`Connection`], drains on shutdown, and logs each listener's bound address
//! once it accepts connections. Also the health and readiness routes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{Request, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_util::either::Either;
use tower::ServiceExt;

use crate::context::{Connection, Context};
use crate::engine::Health;
use crate::error::StartError;

mod read_ahead;
use read_ahead::ReadAhead;

/// Binds `listener` at `addr`; returns it with the address it got (port 0 picks one).
pub async fn bind(
    listener: &'static str,
    addr: SocketAddr,
) -> Result<(TcpListener, SocketAddr), StartError> {
    let failed = |source| StartError::Bind {
        listener,
        addr,
        source,
    };
    let bound = TcpListener::bind(addr).await.map_err(failed)?;
    let local = bound.local_addr().map_err(failed)?;
    Ok((bound, local))
}

/// `/healthz` and `/readyz`.
pub fn health_routes(ctx: Context) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(ctx)
}

/// The metrics listener: `/metrics` without authentication (bind it where only Prometheus
/// reaches; the default is 127.0.0.1).
pub fn metrics_routes(ctx: Context) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(|State(ctx): State<Context>| async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4",
                    )],
                    crate::metrics::render(ctx.engine.as_ref()),
                )
            }),
        )
        .with_state(ctx)
}

/// Liveness: the process serves HTTP.
async fn healthz() -> impl IntoResponse {
    Json(json!({"status": "ok"}))
}

/// Readiness: the engine can take work and we are not draining.
async fn readyz(State(ctx): State<Context>) -> impl IntoResponse {
    if ctx.shutdown.is_triggered() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "not_ready", "reason": "shutting down"})),
        );
    }
    match ctx.engine.health() {
        Health::Ready => (StatusCode::OK, Json(json!({"status": "ready"}))),
        Health::NotReady(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "not_ready", "reason": reason})),
        ),
    }
}

/// How long accept waits after an error (such as running out of file descriptors) before
/// trying again, so a full table does not spin the CPU.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Accepts on `listener` until shutdown, backing off after an error, and hands each stream
/// (`TCP_NODELAY` set) to `serve` with its [`Connection`]. Every listener accepts this way.
pub async fn accept_until_shutdown<F>(listener: &TcpListener, ctx: &Context, mut serve: F)
where
    F: FnMut(TcpStream, Arc<Connection>),
{
    loop {
        let (stream, remote) = tokio::select! {
            _ = ctx.shutdown.wait() => return,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    let local = listener.local_addr().ok();
                    tracing::warn!(error = %e, ?local, "accept failed; backing off");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        serve(
            stream,
            Arc::new(Connection::accepted(remote, ctx.flow.connection())),
        );
    }
}

/// [`accept_until_shutdown`] for a TLS listener: each connection's task first completes the TLS
/// handshake within `within` (so a client that stalls it holds its place no longer than one
/// that stalls its protocol's handshake), then runs `serve` on the TLS stream.
pub async fn accept_tls_until_shutdown<F, Fut>(
    listener: &TcpListener,
    ctx: &Context,
    tls: &TlsAcceptor,
    within: Duration,
    protocol: &'static str,
    serve: F,
) where
    F: Fn(tokio_rustls::server::TlsStream<TcpStream>, Arc<Connection>) -> Fut
        + Clone
        + Send
        + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    accept_until_shutdown(listener, ctx, |stream, conn| {
        let (tls, serve) = (tls.clone(), serve.clone());
        ctx.connections.spawn(async move {
            match tls_handshake(&tls, stream, within).await {
                Ok(stream) => serve(stream, conn).await,
                Err(refused) => {
                    tracing::debug!(remote = %conn.remote, protocol, "{}", refused.detail);
                    crate::metrics::refusal(protocol, refused.reason);
                }
            }
        });
    })
    .await;
}

/// Why a TLS handshake did not complete.
struct HandshakeRefused {
    /// The refusal metric's `reason`.
    reason: &'static str,
    detail: String,
}

/// The server side of a TLS handshake on an accepted stream, within `within`.
async fn tls_handshake(
    tls: &TlsAcceptor,
    stream: TcpStream,
    within: Duration,
) -> Result<tokio_rustls::server::TlsStream<TcpStream>, HandshakeRefused> {
    match tokio::time::timeout(within, tls.accept(stream)).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(e)) => Err(HandshakeRefused {
            reason: "tls_handshake",
            detail: format!("TLS handshake failed: {e}"),
        }),
        Err(_) => Err(HandshakeRefused {
            reason: "tls_handshake_timeout",
            detail: "TLS handshake timed out".into(),
        }),
    }
}

/// How an HTTP listener serves its connections.
pub struct HttpOptions {
    /// The request head must arrive within this (and, with TLS, the handshake before it).
    pub header_read_timeout: Duration,
    /// The largest request head (HTTP/1.1) or header list (HTTP/2): more is answered 431.
    pub max_header_bytes: usize,
    /// How long open connections may finish after shutdown.
    pub drain: Duration,
    /// HTTPS (and WSS) when set.
    pub tls: Option<TlsAcceptor>,
}

/// Serves `app` on `listener` until shutdown, then lets open connections finish for `drain`.
/// Each request carries its connection's [`Connection`] as an extension. With `tls`, every
/// connection first completes a TLS handshake within `header_read_timeout` (HTTPS and WSS).
pub fn serve_http(
    listener: TcpListener,
    app: Router,
    ctx: Context,
    options: HttpOptions,
) -> JoinHandle<()> {
    let HttpOptions {
        header_read_timeout,
        max_header_bytes,
        drain,
        tls,
    } = options;
    tokio::spawn(async move {
        let mut builder = Builder::new(TokioExecutor::new());
        // hyper reads a request head into a buffer of at most this and answers 431 when the
        // head does not fit; bodies stream through it in chunks of at most this.
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(header_read_timeout)
            .max_buf_size(max_header_bytes);
        builder
            .http2()
            .max_header_list_size(u32::try_from(max_header_bytes).unwrap_or(u32::MAX));
        let builder = Arc::new(builder);
        let graceful = GracefulShutdown::new();
        accept_until_shutdown(&listener, &ctx, |stream, conn| {
            let remote = conn.remote;
            let service = TowerToHyperService::new(app.clone().map_request(
                move |mut req: Request<Incoming>| {
                    req.extensions_mut().insert(conn.clone());
                    req
                },
            ));
            let (builder, watcher, tls) = (builder.clone(), graceful.watcher(), tls.clone());
            crate::metrics::connection_opened("http");
            tokio::spawn(async move {
                // A plain socket is read ahead for tungstenite's small reads (`read_ahead`);
                // a TLS session (rustls buffers its own reads) is boxed, so that every plain
                // connection's stream — inline in this task, and in hyper's box after a
                // WebSocket upgrade, for the socket's whole life — is not a TLS session's size
                // (1.1 KiB).
                let stream = match tls {
                    None => Ok(Either::Left(ReadAhead::new(stream))),
                    Some(tls) => tls_handshake(&tls, stream, header_read_timeout)
                        .await
                        .map(|tls| Either::Right(Box::new(tls))),
                };
                let served = match stream {
                    Ok(stream) => {
                        let io = TokioIo::new(stream);
                        let serving = builder.serve_connection_with_upgrades(io, service);
                        watcher.watch(serving.into_owned()).await
                    }
                    Err(refused) => Err(refused.detail.into()),
                };
                let reason = match served {
                    Ok(()) => "closed",
                    Err(e) => {
                        tracing::debug!(%remote, error = %e, "http connection ended with an error");
                        "error"
                    }
                };
                crate::metrics::connection_closed("http", reason);
            });
        })
        .await;
        drop(listener);
        if tokio::time::timeout(drain, graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!("http connections still open after the shutdown timeout; closing them");
        }
    })
}
