//! MQTT over WebSocket (`GET /mqtt`, subprotocol `mqtt`): binary frames carry the byte stream
//! (a packet may span frames, a frame may hold several packets); a text frame closes with 1003.
//! Below the byte stream only: the same connection and session code serve TCP and WebSocket.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{self, Poll, ready};

use axum::extract::State;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Router};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::connection;
use crate::context::{Connection, Context};

const SUBPROTOCOL: &str = "mqtt";
/// The most one WebSocket frame to the client carries.
const FRAME: usize = 64 * 1024;

pub fn router(ctx: Context) -> Router {
    Router::new().route("/mqtt", get(upgrade)).with_state(ctx)
}

async fn upgrade(
    State(ctx): State<Context>,
    Extension(conn): Extension<Arc<Connection>>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let offered = headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim() == SUBPROTOCOL);
    if !offered {
        return (
            StatusCode::BAD_REQUEST,
            "offer the WebSocket subprotocol mqtt",
        )
            .into_response();
    }
    let max = (ctx.config.limits.max_message_bytes.as_u64() + 64 * 1024) as usize;
    crate::protocol::websocket(ws)
        .protocols([SUBPROTOCOL])
        .max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| {
            let serve = connection::run(
                Frames::new(socket),
                ctx.clone(),
                conn,
                crate::context::Transport::WebSocket,
            );
            crate::protocol::serve_upgraded(&ctx, serve)
        })
}

/// A WebSocket's binary frames as the byte stream the MQTT connection reads and writes: the
/// connection runs on the WebSocket itself, in its one task.
///
/// A duplex pipe and a task shuttling frames through it did the same with a second task, the
/// pipe's buffers and the WebSocket's split lock: 1.9 KiB of every idle connection's 8.7 KiB
/// at 15,000 (docs/bench.md). However the WebSocket ends, the MQTT connection sees the end of
/// its input and ends as it would on TCP (the session ends, the will goes out, persistent
/// state is stored); its shutdown is the WebSocket's Close, and its linger the wait for the
/// peer's.
struct Frames {
    socket: WebSocket,
    /// What the MQTT side has not yet read of the last binary frame.
    unread: Bytes,
    /// The input has ended: a Close, a text frame, an error or the end of the socket.
    ended: bool,
    /// The input ended with a text frame: the Close says why (1003).
    text: bool,
    /// The input ended with the peer's Close: tungstenite has queued the answer, and a Close
    /// of ours would be refused.
    peer_closed: bool,
    /// Our Close is queued: what is left of shutting down is flushing it.
    closing: bool,
}

impl Frames {
    fn new(socket: WebSocket) -> Frames {
        Frames {
            socket,
            unread: Bytes::new(),
            ended: false,
            text: false,
            peer_closed: false,
            closing: false,
        }
    }
}

impl AsyncRead for Frames {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        while this.unread.is_empty() {
            if this.ended {
                return Poll::Ready(Ok(()));
            }
            match ready!(this.socket.poll_next_unpin(cx)) {
                Some(Ok(Message::Binary(bytes))) => this.unread = bytes,
                Some(Ok(Message::Text(_))) => (this.ended, this.text) = (true, true),
                // tungstenite answers pings itself, and queues the answer to a Close.
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(Message::Close(_))) => (this.ended, this.peer_closed) = (true, true),
                Some(Err(_)) | None => this.ended = true,
            }
        }
        let n = this.unread.len().min(buf.remaining());
        buf.put_slice(&this.unread.split_to(n));
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Frames {
    /// One binary frame, of at most [`FRAME`] bytes: the writer hands over a batch at a time.
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut task::Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.socket.poll_ready_unpin(cx)).map_err(io::Error::other)?;
        let n = data.len().min(FRAME);
        let frame = Message::Binary(Bytes::copy_from_slice(&data[..n]));
        this.socket
            .start_send_unpin(frame)
            .map_err(io::Error::other)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut task::Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut()
            .socket
            .poll_flush_unpin(cx)
            .map_err(io::Error::other)
    }

    /// Sends the Close; after the peer's, flushes the answer tungstenite queued for it.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut task::Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.closing && !this.peer_closed {
            ready!(this.socket.poll_ready_unpin(cx)).map_err(io::Error::other)?;
            let frame = this.text.then(|| CloseFrame {
                code: 1003,
                reason: "MQTT over WebSocket uses binary frames".into(),
            });
            this.closing = true;
            this.socket
                .start_send_unpin(Message::Close(frame))
                .map_err(io::Error::other)?;
        }
        this.socket.poll_flush_unpin(cx).map_err(io::Error::other)
    }
}
