//! MQTT over WebSocket (`GET /mqtt`, subprotocol `mqtt`): binary frames carry the byte stream
//! (a packet may span frames, a frame may hold several packets); a text frame closes with 1003.
//! Below the byte stream only: the same connection and session code serve TCP and WebSocket.

use std::sync::Arc;

use axum::extract::State;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Router};
use bytes::BytesMut;
use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::connection;
use crate::context::{Connection, Context};

const SUBPROTOCOL: &str = "mqtt";
/// Bytes buffered between the WebSocket and the MQTT connection, each way.
const PIPE: usize = 64 * 1024;
/// What one read from the pipe offers: the most a WebSocket frame to the client carries.
const READ: usize = 4 * 1024;
/// How long the MQTT side may take to end its session (will, stored state) once the WebSocket
/// is gone, before it is stopped.
const SESSION_END: std::time::Duration = std::time::Duration::from_secs(5);

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
            let connections = ctx.connections.clone();
            connections.track_future(bridge(socket, ctx, conn))
        })
}

/// Runs the MQTT connection on one end of a duplex pipe and shuttles WebSocket frames to and
/// from the other end. However the WebSocket ends, the MQTT connection ends the way it would on
/// TCP: a client that goes away is seen as the end of its input (the session ends, the will goes
/// out, persistent state is stored), never cut off mid-packet.
async fn bridge(socket: WebSocket, ctx: Context, conn: Arc<Connection>) {
    let (mqtt_side, pipe) = tokio::io::duplex(PIPE);
    let mqtt = ctx
        .connections
        .clone()
        .spawn(connection::run(mqtt_side, ctx, conn, "websocket"));
    let (mut pipe_read, mut pipe_write) = tokio::io::split(pipe);
    let (mut ws_tx, mut ws_rx) = socket.split();
    // In a block so both halves' borrows end before the close frame is sent.
    let (close, peer_closed) = {
        // Client → MQTT. Ends with the input's end, shut down so the MQTT side reads it.
        let inbound = async {
            let mut end = (None, false);
            while let Some(Ok(msg)) = ws_rx.next().await {
                match msg {
                    Message::Binary(bytes) if pipe_write.write_all(&bytes).await.is_err() => break,
                    Message::Text(_) => {
                        end = (Some(1003u16), false);
                        break;
                    }
                    Message::Close(_) => {
                        end = (None, true);
                        break;
                    }
                    _ => {}
                }
            }
            let _ = pipe_write.shutdown().await;
            end
        };
        // MQTT → client, until the MQTT side has closed its output. The wait for output is a
        // one-byte read: a read buffer waited on is held for as long as the connection is
        // idle (4 KiB, a third of an idle MQTT-over-WebSocket connection; a 64 KiB one was
        // most of it once the allocator zero-filled it, docs/bench.md). What else is already
        // there is then read into a buffer whose filled part becomes the frame without a copy.
        let outbound = async {
            let mut first = [0u8; 1];
            loop {
                match pipe_read.read(&mut first).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                let mut buf = BytesMut::with_capacity(READ);
                buf.extend_from_slice(&first);
                // Only what is there now: a packet written in parts goes out as it comes.
                if let Some(Err(_)) = pipe_read.read_buf(&mut buf).now_or_never() {
                    return;
                }
                if ws_tx.send(Message::Binary(buf.freeze())).await.is_err() {
                    return;
                }
            }
        };
        tokio::pin!(inbound, outbound);
        tokio::select! {
            end = &mut inbound => {
                // The MQTT side now ends its session; what it still writes (a DISCONNECT) is
                // forwarded while the socket takes it.
                let _ = tokio::time::timeout(SESSION_END, &mut outbound).await;
                end
            }
            () = &mut outbound => (None, false),
        }
    };
    let frame = close.map(|code| CloseFrame {
        code,
        reason: "MQTT over WebSocket uses binary frames".into(),
    });
    if ws_tx.send(Message::Close(frame)).await.is_ok() && !peer_closed {
        // The closing handshake: the peer reads everything sent before our Close (the MQTT
        // DISCONNECT included) and answers with its own; what it still sends is discarded.
        let _ = tokio::time::timeout(connection::LINGER, async {
            while let Some(Ok(msg)) = ws_rx.next().await {
                if let Message::Close(_) = msg {
                    return;
                }
            }
        })
        .await;
    }
    // The MQTT side has seen the end of its input by now; it is given the same bound to finish.
    let abort = mqtt.abort_handle();
    if tokio::time::timeout(SESSION_END, mqtt).await.is_err() {
        abort.abort();
    }
}
