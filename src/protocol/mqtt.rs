//! The MQTT adapter (3.1, 3.1.1 and 5; DESIGN.md §3): `codec` (rmqtt-codec behind one
//! version-neutral packet type) → `connection` (socket, timers) → `session` (the protocol,
//! mapped onto the engine; never sees a socket); `topic` holds all MQTT ↔ AMQP naming and
//! `properties` the MQTT 5 ↔ AMQP property mapping.

pub mod close;
pub mod codec;
mod connection;
pub mod properties;
pub mod session;
pub mod topic;
mod websocket;
mod writer;

/// `/mqtt`: MQTT over WebSocket on the HTTP port. What connections share (retained
/// messages, takeover) lives behind the engine, never here.
pub fn router(ctx: Context) -> axum::Router {
    websocket::router(ctx)
}

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use crate::context::{Context, Transport};

/// Accepts MQTT over TCP until shutdown.
pub fn serve_tcp(listener: TcpListener, ctx: Context) -> JoinHandle<()> {
    tokio::spawn(async move {
        crate::server::accept_until_shutdown(&listener, &ctx, |stream, conn| {
            ctx.connections
                .spawn(connection::run(stream, ctx.clone(), conn, Transport::Tcp));
        })
        .await;
    })
}

/// Accepts MQTT over TLS (`mqtt.tls_listen`, MQTTS) until shutdown; the TLS handshake counts
/// against `mqtt.connect_timeout` like the CONNECT after it.
pub fn serve_tls(listener: TcpListener, ctx: Context, tls: TlsAcceptor) -> JoinHandle<()> {
    tokio::spawn(async move {
        let within = ctx.config.mqtt.connect_timeout;
        let serve = {
            let ctx = ctx.clone();
            move |stream, conn| connection::run(stream, ctx.clone(), conn, Transport::Tls)
        };
        crate::server::accept_tls_until_shutdown(&listener, &ctx, &tls, within, "mqtt", serve)
            .await;
    })
}
