//! Protocol adapters. Each depends on the engine seam, `auth`, `flow` and `json`, never on
//! another adapter; what the browser-facing ones share (WebSocket and SSE: the outbound buffer,
//! subscription targets), what every connection loop keeps (`clock`: one timer, the token's
//! expiry) and the message fingerprints that outlive the process (`fingerprint`) live beside
//! them here.

pub mod amqp;
pub mod clock;
pub mod fingerprint;
pub mod mqtt;
pub mod outbound;
pub mod rest;
pub mod subscription;
pub mod ws;

use axum::extract::ws::WebSocketUpgrade;

use crate::context::Context;

/// How much tungstenite reads at a time. It allocates and zero-fills its whole read buffer for
/// every connection up front and keeps it — 128 KiB by default, nearly all of an idle
/// WebSocket's memory (`bench/run.sh --scenarios wsidle`). 256 bytes take a frame header and a
/// small request; a larger frame grows the buffer while it arrives. The HTTP listener reads a
/// plain socket ahead in 4 KiB pieces held only while unread (`server::read_ahead`), so a burst
/// of frames still costs one `read(2)` per 4 KiB, not one per 256 bytes.
const WS_READ_BUFFER: usize = 256;

/// The WebSocket settings every endpoint that upgrades shares (`/ws`, `/mqtt`, `/v1/feed`).
pub fn websocket(upgrade: WebSocketUpgrade) -> WebSocketUpgrade {
    upgrade.read_buffer_size(WS_READ_BUFFER)
}

/// Serves an upgraded WebSocket's connection in a task of its own, tracked for shutdown, and
/// lets axum's upgrade task end. Run inside that task, the connection's future sat beside the
/// upgrade's own state for the connection's whole life: 896 bytes for MQTT over WebSocket,
/// where a task of its own is 640 (docs/bench.md).
pub fn serve_upgraded<F>(ctx: &Context, connection: F) -> std::future::Ready<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    ctx.connections.spawn(connection);
    std::future::ready(())
}
