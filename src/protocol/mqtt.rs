//! The MQTT adapter (3.1, 3.1.1 and 5; DESIGN.md §3): `codec` (rmqtt-codec behind one
//! version-neutral packet type) → `connection` (socket, timers) → `session` (the protocol,
//! mapped onto the engine; never sees a socket); `topic` holds all MQTT ↔ AMQP naming and
//! `properties` the MQTT 5 ↔ AMQP property mapping.

pub mod codec;
mod connection;
pub mod properties;
pub mod session;
pub mod topic;
mod websocket;

/// `/mqtt`: MQTT over WebSocket on the HTTP port. What connections share (retained
/// messages, takeover) lives behind the engine, never here.
pub fn router(ctx: Context) -> axum::Router {
    websocket::router(ctx)
}

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::context::{Connection, Context};

/// Accepts MQTT over TCP until shutdown.
pub fn serve_tcp(listener: TcpListener, ctx: Context) -> JoinHandle<()> {
    static IDS: AtomicU64 = AtomicU64::new(1 << 40);
    tokio::spawn(async move {
        loop {
            let (stream, remote) = tokio::select! {
                _ = ctx.shutdown.wait() => return,
                accepted = listener.accept() => match accepted {
                    Ok(pair) => pair,
                    Err(e) => {
                        tracing::warn!(error = %e, "MQTT accept failed; backing off");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = stream.set_nodelay(true);
            let conn = Arc::new(Connection::new(
                IDS.fetch_add(1, Ordering::Relaxed),
                remote,
                ctx.flow.connection(),
            ));
            tokio::spawn(connection::run(stream, ctx.clone(), conn));
        }
    })
}
