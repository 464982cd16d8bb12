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
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::connection;
use super::retained::Retained;
use crate::context::{Connection, Context};

const SUBPROTOCOL: &str = "mqtt";
/// Bytes buffered between the WebSocket and the MQTT connection, each way.
const PIPE: usize = 64 * 1024;

pub fn router(ctx: Context, retained: Arc<Retained>) -> Router {
    Router::new()
        .route("/mqtt", get(upgrade))
        .with_state((ctx, retained))
}

async fn upgrade(
    State((ctx, retained)): State<(Context, Arc<Retained>)>,
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
    ws.protocols([SUBPROTOCOL])
        .max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| bridge(socket, ctx, conn, retained))
}

/// Runs the MQTT connection on one end of a duplex pipe and shuttles WebSocket frames to and
/// from the other end.
async fn bridge(socket: WebSocket, ctx: Context, conn: Arc<Connection>, retained: Arc<Retained>) {
    let (mqtt_side, pipe) = tokio::io::duplex(PIPE);
    let mqtt = tokio::spawn(connection::run(mqtt_side, ctx, conn, retained));
    let (mut pipe_read, mut pipe_write) = tokio::io::split(pipe);
    let (mut ws_tx, mut ws_rx) = socket.split();
    // In a block so both halves' borrows end before the close frame is sent.
    let close = {
        let inbound = async {
            while let Some(Ok(msg)) = ws_rx.next().await {
                match msg {
                    Message::Binary(bytes) if pipe_write.write_all(&bytes).await.is_err() => {
                        return None;
                    }
                    Message::Text(_) => return Some(1003u16),
                    Message::Close(_) => return None,
                    _ => {}
                }
            }
            None
        };
        let outbound = async {
            let mut buf = vec![0u8; PIPE];
            loop {
                match pipe_read.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if ws_tx
                            .send(Message::Binary(buf[..n].to_vec().into()))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                }
            }
        };
        tokio::pin!(inbound, outbound);
        tokio::select! {
            code = &mut inbound => code,
            () = &mut outbound => None,
        }
    };
    let frame = close.map(|code| CloseFrame {
        code,
        reason: "MQTT over WebSocket uses binary frames".into(),
    });
    if ws_tx.send(Message::Close(frame)).await.is_ok() {
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
    mqtt.abort();
}
