//! WebSocket upgrade requests for tokio-tungstenite, and a `/ws` client over any stream
//! (plain or TLS).

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::{TestGateway, WAIT};

/// The subprotocol of `/ws`.
pub const SUBPROTOCOL: &str = "amqp-gateway.v1.json";

/// An upgrade request to `url` (`ws://…` or `wss://…`), offering `subprotocol` and carrying the
/// bearer token, each when given.
pub fn upgrade(
    url: &str,
    bearer: Option<&str>,
    subprotocol: Option<&str>,
) -> tungstenite::handshake::client::Request {
    let mut req = url.into_client_request().unwrap();
    if let Some(p) = subprotocol {
        req.headers_mut()
            .insert("sec-websocket-protocol", p.parse().unwrap());
    }
    if let Some(t) = bearer {
        req.headers_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    req
}

/// An upgrade request to `/ws{query}`, with the subprotocol when asked and the bearer token
/// when given.
pub fn request(
    gw: &TestGateway,
    bearer: Option<&str>,
    subprotocol: bool,
    query: &str,
) -> tungstenite::handshake::client::Request {
    upgrade(
        &url(gw, &format!("/ws{query}")),
        bearer,
        subprotocol.then_some(SUBPROTOCOL),
    )
}

/// The `ws://` URL of `path` on the gateway's HTTP listener.
pub fn url(gw: &TestGateway, path: &str) -> String {
    format!("{}{path}", gw.base.replace("http://", "ws://"))
}

/// A `/ws` client speaking JSON frames, one request at a time, over a plain socket or any
/// other stream (TLS).
pub struct Ws<S = MaybeTlsStream<TcpStream>>(pub WebSocketStream<S>);

impl Ws {
    /// Upgrades with the subprotocol (and the bearer token when given) and checks the gateway
    /// chose it.
    pub async fn connect(gw: &TestGateway, bearer: Option<&str>) -> Ws {
        let (stream, resp) = tokio_tungstenite::connect_async(request(gw, bearer, true, ""))
            .await
            .expect("upgrade");
        assert_eq!(
            resp.headers()["sec-websocket-protocol"],
            "amqp-gateway.v1.json"
        );
        Ws(stream)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Ws<S> {
    pub async fn send(&mut self, v: Value) {
        self.0.send(WsMessage::text(v.to_string())).await.unwrap();
    }

    /// The next text frame, as JSON.
    pub async fn recv(&mut self) -> Value {
        self.recv_within(WAIT).await
    }

    /// The next text frame, waiting at most `wait` for it.
    pub async fn recv_within(&mut self, wait: std::time::Duration) -> Value {
        loop {
            match tokio::time::timeout(wait, self.0.next()).await {
                Err(_) => panic!("no frame within {wait:?}"),
                Ok(Some(Ok(WsMessage::Text(t)))) => return serde_json::from_str(&t).unwrap(),
                Ok(Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_)))) => continue,
                Ok(other) => panic!("expected a text frame, got {other:?}"),
            }
        }
    }

    /// Waits for the gateway's close frame and returns its code.
    pub async fn closed_with(&mut self) -> u16 {
        loop {
            match tokio::time::timeout(WAIT, self.0.next()).await {
                Err(_) => panic!("not closed within {WAIT:?}"),
                Ok(Some(Ok(WsMessage::Close(Some(frame))))) => return u16::from(frame.code),
                Ok(Some(Ok(WsMessage::Close(None)))) => return 1005,
                Ok(Some(Ok(_))) => continue,
                Ok(Some(Err(e))) => panic!("connection failed before a close frame: {e}"),
                Ok(None) => panic!("stream ended without a close frame"),
            }
        }
    }

    /// Sends a request and returns the next frame.
    pub async fn call(&mut self, v: Value) -> Value {
        self.send(v).await;
        self.recv().await
    }
}
