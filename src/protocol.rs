//! Protocol adapters. Each depends on the engine seam, `auth`, `flow` and `json`, never on
//! another adapter; what the browser-facing ones share (WebSocket and SSE: the outbound buffer,
//! subscription targets) lives beside them here.

pub mod amqp;
pub mod mqtt;
pub mod outbound;
pub mod rest;
pub mod subscription;
pub mod ws;

use axum::extract::ws::WebSocketUpgrade;

/// How much tungstenite reads at a time. It allocates and zero-fills its whole read buffer for
/// every connection up front — 128 KiB by default, nearly all of an idle WebSocket's memory
/// (`bench/run.sh --scenarios wsidle`); 4 KiB takes a frame header and a small message in one
/// read, and a larger frame grows the buffer while it arrives.
const WS_READ_BUFFER: usize = 4 * 1024;

/// The WebSocket settings every endpoint that upgrades shares (`/ws`, `/mqtt`, `/v1/feed`).
pub fn websocket(upgrade: WebSocketUpgrade) -> WebSocketUpgrade {
    upgrade.read_buffer_size(WS_READ_BUFFER)
}
