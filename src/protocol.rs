//! Protocol adapters. Each depends on the engine seam, `auth`, `flow` and `json`, never on
//! another adapter; what the browser-facing ones share (WebSocket and SSE: the outbound buffer,
//! subscription targets) lives beside them here.

pub mod amqp;
pub mod mqtt;
pub mod outbound;
pub mod rest;
pub mod subscription;
pub mod ws;
