//! WebSocket (`/ws`) upgrade requests for tokio-tungstenite.

use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use super::TestGateway;

/// An upgrade request to `/ws{query}`, with the subprotocol when asked and the bearer token
/// when given.
pub fn request(
    gw: &TestGateway,
    bearer: Option<&str>,
    subprotocol: bool,
    query: &str,
) -> tungstenite::handshake::client::Request {
    let url = format!("{}/ws{query}", gw.base.replace("http://", "ws://"));
    let mut req = url.into_client_request().unwrap();
    if subprotocol {
        req.headers_mut().insert(
            "sec-websocket-protocol",
            "amqp-gateway.v1.json".parse().unwrap(),
        );
    }
    if let Some(t) = bearer {
        req.headers_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    req
}
