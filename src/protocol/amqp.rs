//! The AMQP 0-9-1 listener (`amqp.listen`, embedded engine only): existing AMQP applications
//! (pika, kombu, lapin, the Java and .NET clients) connect to the gateway itself and share its
//! exchanges and queues with browsers, devices and REST callers. `frame` (wire format, on
//! amq-protocol) → `handshake` (SASL with a JWT, tune, open) → `connection` (socket, timers)
//! → `session` (channels; `topology`, `publish` and `consume` hold the method families),
//! mapped onto the engine seam one engine channel per AMQP channel, all owned by the
//! connection.

mod connection;
mod consume;
pub mod error;
pub mod frame;
mod handshake;
mod publish;
mod session;
mod topology;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use crate::context::{Context, Transport};

/// The `protocol` label of metrics and the connection registry.
pub const PROTOCOL: &str = "amqp";

/// Accepts AMQP over TCP until shutdown.
pub fn serve_tcp(listener: TcpListener, ctx: Context) -> JoinHandle<()> {
    tokio::spawn(async move {
        crate::server::accept_until_shutdown(&listener, &ctx, |stream, conn| {
            let (reader, writer) = stream.into_split();
            ctx.connections.spawn(connection::run(
                reader,
                writer,
                ctx.clone(),
                conn,
                Transport::Tcp,
            ));
        })
        .await;
    })
}

/// Accepts AMQP over TLS (`amqp.tls_listen`, AMQPS) until shutdown; the TLS handshake counts
/// against `amqp.handshake_timeout` like the AMQP one after it.
pub fn serve_tls(listener: TcpListener, ctx: Context, tls: TlsAcceptor) -> JoinHandle<()> {
    tokio::spawn(async move {
        let within = ctx.config.amqp.handshake_timeout;
        let serve = {
            let ctx = ctx.clone();
            move |stream, conn| {
                let (reader, writer) = tokio::io::split(stream);
                connection::run(reader, writer, ctx.clone(), conn, Transport::Tls)
            }
        };
        crate::server::accept_tls_until_shutdown(&listener, &ctx, &tls, within, PROTOCOL, serve)
            .await;
    })
}
