//! Every connection's end is counted once in `gateway_connections_closed_total{protocol,reason}`:
//! one case per class of reason (the client's doing, before the session, a broken rule,
//! policy, the gateway's side) for MQTT and for WebSocket. Each protocol's cases run in one test
//! so the per-process counters change only by what that test does.

mod common;

use std::time::Duration;

use common::mqtt_bytes::{connect, connect_ka, packet, string};
use common::{TestGateway, WAIT, admin, start_gateway, token, unique};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;

/// The counter for `protocol` and `reason` in this process, 0 before its first increment.
fn closed(protocol: &str, reason: &str) -> u64 {
    let text = amqp_gateway::metrics::handle().render();
    let labels = format!("protocol=\"{protocol}\",reason=\"{reason}\"");
    text.lines()
        .find(|l| l.starts_with("gateway_connections_closed_total{") && l.contains(&labels))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Runs `case` and waits until the counter for `reason` went up by exactly one.
async fn counts_one<F: std::future::Future<Output = ()>>(protocol: &str, reason: &str, case: F) {
    let before = closed(protocol, reason);
    case.await;
    common::eventually(&format!("{protocol} close counted as {reason}"), || async {
        closed(protocol, reason) > before
    })
    .await;
    assert_eq!(closed(protocol, reason), before + 1, "{protocol}/{reason}");
}

// ---------- MQTT ----------

async fn mqtt_open(gw: &TestGateway) -> TcpStream {
    TcpStream::connect(gw.gateway.addrs().mqtt).await.unwrap()
}

/// Connected (CONNACK accepted) as `client`.
async fn mqtt_connected(gw: &TestGateway, level: u8, client: &str, flags: u8) -> TcpStream {
    let mut s = mqtt_open(gw).await;
    let t = token(
        "closer",
        "gateway.write:amq.topic/# gateway.read:amq.topic/#",
    );
    s.write_all(&connect(b"MQTT", level, flags, client, Some(&t)))
        .await
        .unwrap();
    let mut head = [0u8; 2];
    s.read_exact(&mut head).await.unwrap();
    let mut rest = vec![0u8; usize::from(head[1])];
    s.read_exact(&mut rest).await.unwrap();
    assert_eq!((head[0], rest[1]), (0x20, 0), "CONNACK accepted");
    s
}

/// Everything the gateway sends until it closes.
async fn until_closed(s: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    match tokio::time::timeout(WAIT, s.read_to_end(&mut got)).await {
        Ok(_) => got,
        Err(_) => panic!("connection not closed within {WAIT:?}"),
    }
}

/// The reason code of the MQTT 5 DISCONNECT that `got` ends with (the last packet).
fn disconnect(got: &[u8]) -> u8 {
    let at = got
        .iter()
        .rposition(|b| *b == 0xE0)
        .unwrap_or_else(|| panic!("no DISCONNECT in {got:?}"));
    assert!(
        got.len() >= at + 3,
        "a DISCONNECT with a reason code: {got:?}"
    );
    got[at + 2]
}

#[tokio::test]
async fn mqtt_closes_are_counted_by_reason() {
    let gw = start_gateway(|c| {
        c.limits.max_message_bytes = bytesize::ByteSize::kib(1);
        c.mqtt.connect_timeout = Duration::from_millis(300);
    })
    .await;
    // The client's doing.
    counts_one("mqtt", "client_disconnect", async {
        let mut s = mqtt_connected(&gw, 5, &unique("c"), 0).await;
        s.write_all(&[0xE0, 0x00]).await.unwrap();
        until_closed(&mut s).await;
    })
    .await;
    counts_one("mqtt", "peer_closed", async {
        drop(mqtt_connected(&gw, 4, &unique("c"), 0).await);
    })
    .await;
    // A reset mid-packet is the client going away too, not a malformed packet.
    let malformed = closed("mqtt", "malformed_packet");
    counts_one("mqtt", "peer_closed", async {
        let mut s = mqtt_connected(&gw, 5, &unique("c"), 0).await;
        s.write_all(&[0x30, 0x10, 0x00]).await.unwrap();
        s.set_zero_linger().unwrap();
        drop(s);
    })
    .await;
    assert_eq!(closed("mqtt", "malformed_packet"), malformed);
    // Before the session.
    counts_one("mqtt", "connect_refused", async {
        let mut s = mqtt_open(&gw).await;
        s.write_all(&connect(b"MQTT", 4, 0, "x", Some("not-a-token")))
            .await
            .unwrap();
        assert_eq!(until_closed(&mut s).await, [0x20, 0x02, 0x00, 0x04]);
    })
    .await;
    counts_one("mqtt", "bad_connect", async {
        let mut s = mqtt_open(&gw).await;
        s.write_all(&[0xC0, 0x00]).await.unwrap();
        until_closed(&mut s).await;
    })
    .await;
    counts_one("mqtt", "connect_timeout", async {
        until_closed(&mut mqtt_open(&gw).await).await;
    })
    .await;
    // A broken rule, with the v5 reason code.
    counts_one("mqtt", "protocol_error", async {
        let mut s = mqtt_connected(&gw, 5, &unique("c"), 0).await;
        s.write_all(&connect(b"MQTT", 5, 0, "again", None))
            .await
            .unwrap();
        assert_eq!(disconnect(&until_closed(&mut s).await), 0x82);
    })
    .await;
    counts_one("mqtt", "packet_too_large", async {
        let mut s = mqtt_connected(&gw, 5, &unique("c"), 0).await;
        let mut body = string(b"big");
        body.push(0);
        body.extend(vec![b'x'; 200 * 1024]);
        let _ = s.write_all(&packet(0x30, body)).await;
        assert_eq!(disconnect(&until_closed(&mut s).await), 0x95);
    })
    .await;
    counts_one("mqtt", "keep_alive_timeout", async {
        let mut s = mqtt_open(&gw).await;
        let t = token("closer", "gateway.read:amq.topic/#");
        s.write_all(&connect_ka(b"MQTT", 5, 0, &unique("c"), Some(&t), 1))
            .await
            .unwrap();
        assert_eq!(disconnect(&until_closed(&mut s).await), 0x8D);
    })
    .await;
    // Policy: another connection takes the session over.
    counts_one("mqtt", "session_taken_over", async {
        let id = unique("c");
        let mut first = mqtt_connected(&gw, 5, &id, 0).await;
        let _second = mqtt_connected(&gw, 5, &id, 0).await;
        assert_eq!(disconnect(&until_closed(&mut first).await), 0x8E);
    })
    .await;
    // The gateway's side.
    let mut open = mqtt_connected(&gw, 5, &unique("c"), 0).await;
    counts_one("mqtt", "server_shutting_down", async {
        gw.gateway.shutdown().await;
        assert_eq!(disconnect(&until_closed(&mut open).await), 0x8B);
    })
    .await;
}

// ---------- WebSocket ----------

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

async fn ws(gw: &TestGateway, bearer: Option<&str>) -> Ws {
    let req = common::ws::request(gw, bearer, true, "");
    tokio_tungstenite::connect_async(req)
        .await
        .expect("upgrade")
        .0
}

/// The close frame's code, skipping other frames.
async fn ws_closed_with(ws: &mut Ws) -> u16 {
    loop {
        match tokio::time::timeout(WAIT, ws.next()).await {
            Err(_) => panic!("not closed within {WAIT:?}"),
            Ok(Some(Ok(WsMessage::Close(Some(frame))))) => return u16::from(frame.code),
            Ok(Some(Ok(_))) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
}

async fn ws_pong(ws: &mut Ws) {
    ws.send(WsMessage::text(r#"{"op":"ping","id":1}"#))
        .await
        .unwrap();
    loop {
        match tokio::time::timeout(WAIT, ws.next()).await {
            Ok(Some(Ok(WsMessage::Text(t)))) if t.contains("pong") => return,
            Ok(Some(Ok(_))) => continue,
            other => panic!("expected pong, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn websocket_closes_are_counted_by_reason() {
    let gw = start_gateway(|c| {
        c.limits.max_message_bytes = bytesize::ByteSize::kib(1);
        c.limits.max_connections_per_subject = 1;
    })
    .await;
    // The client's doing.
    counts_one("ws", "client_closed", async {
        let mut c = ws(&gw, Some(&admin())).await;
        ws_pong(&mut c).await;
        c.close(None).await.unwrap();
        // The gateway's answering close frame completes the handshake: the stream ends.
        let end = tokio::time::timeout(WAIT, async { while c.next().await.is_some() {} }).await;
        assert!(
            end.is_ok(),
            "closing handshake not answered within {WAIT:?}"
        );
    })
    .await;
    // Before the session.
    counts_one("ws", "auth_failed", async {
        let mut c = ws(&gw, None).await;
        c.send(WsMessage::text(r#"{"op":"auth","token":"nope"}"#))
            .await
            .unwrap();
        assert_eq!(ws_closed_with(&mut c).await, 4001);
    })
    .await;
    counts_one("ws", "auth_expected", async {
        let mut c = ws(&gw, None).await;
        c.send(WsMessage::text(r#"{"op":"ping"}"#)).await.unwrap();
        assert_eq!(ws_closed_with(&mut c).await, 4001);
    })
    .await;
    // Policy: a connection limit.
    let t = token("only-one", "gateway.read:amq.topic/#");
    let mut first = ws(&gw, Some(&t)).await;
    ws_pong(&mut first).await;
    counts_one("ws", "max_connections_per_subject", async {
        assert_eq!(ws_closed_with(&mut ws(&gw, Some(&t)).await).await, 1013);
    })
    .await;
    // A broken rule.
    counts_one("ws", "too_big", async {
        let mut c = ws(&gw, Some(&admin())).await;
        let _ = c.send(WsMessage::text("x".repeat(80 * 1024))).await;
        assert_eq!(ws_closed_with(&mut c).await, 1009);
    })
    .await;
    // The gateway's side.
    counts_one("ws", "server_shutting_down", async {
        gw.gateway.shutdown().await;
        assert_eq!(ws_closed_with(&mut first).await, 1001);
    })
    .await;
}
