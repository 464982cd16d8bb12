//! MQTT over WebSocket below the packets (`/mqtt`): how binary frames carry the byte stream, and
//! how each way a WebSocket can end ends the MQTT session. The MQTT cases themselves run over
//! both transports in the other suites.

mod common;

use std::time::Duration;

use common::mqtt_bytes::{connect, packet, publish_qos1, string, subscribe_packet};
use common::mqtt_wire::{Io, RawWire, Transport, fixed_header};
use common::{TestGateway, WAIT, admin, start_gateway, unique};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn ws(gw: &TestGateway) -> Box<Ws> {
    match Io::open(gw, Transport::Ws).await {
        Io::Ws(ws) => ws,
        Io::Tcp(_) => unreachable!("opened over WebSocket"),
    }
}

/// The next frame from the gateway, or `None` once the stream ended; within [`WAIT`].
async fn frame(ws: &mut Ws) -> Option<Message> {
    match tokio::time::timeout(WAIT, ws.next()).await {
        Ok(Some(Ok(m))) => Some(m),
        Ok(Some(Err(e))) => panic!("the WebSocket failed instead of closing: {e}"),
        Ok(None) => None,
        Err(_) => panic!("nothing from the gateway within {WAIT:?}"),
    }
}

/// The next MQTT packet's first byte and body, from binary frames (a packet may span them).
async fn packet_from(ws: &mut Ws, buf: &mut Vec<u8>) -> (u8, Vec<u8>) {
    loop {
        if let Some((header, len)) = fixed_header(buf)
            && buf.len() >= header + len
        {
            let p: Vec<u8> = buf.drain(..header + len).collect();
            return (p[0], p[header..].to_vec());
        }
        match frame(ws).await {
            Some(Message::Binary(b)) => buf.extend_from_slice(&b),
            Some(Message::Pong(_)) => {}
            other => panic!("a binary frame, not {other:?}"),
        }
    }
}

/// A 3.1.1 CONNECT with the admin token and a will `payload` to `topic`, QoS 0.
fn connect_with_will(client: &str, topic: &str, payload: &[u8]) -> Vec<u8> {
    let mut body = string(b"MQTT");
    body.push(4);
    body.push(0xC0 | 0x04 | 0x02); // user name, password, will, clean session
    body.extend_from_slice(&60u16.to_be_bytes());
    body.extend(string(client.as_bytes()));
    body.extend(string(topic.as_bytes()));
    body.extend(string(payload));
    body.extend(string(b"u"));
    body.extend(string(admin().as_bytes()));
    packet(0x10, body)
}

/// A client over TCP subscribed to `filter`.
async fn observer(gw: &TestGateway, filter: &str) -> RawWire {
    let mut o = RawWire::connected(gw, Transport::Tcp, 4, &unique("obs"), &admin()).await;
    o.send_raw(&subscribe_packet(1, filter, 0, false, None))
        .await;
    let (first, _) = o.packet().await.expect("SUBACK");
    assert_eq!(first, 0x90, "SUBACK");
    o
}

/// The PUBLISH the observer gets next: its topic and payload.
async fn published(o: &mut RawWire) -> (String, Vec<u8>) {
    let (first, body) = o.packet().await.expect("a PUBLISH");
    assert_eq!(first & 0xF0, 0x30, "a PUBLISH, not {first:#x}");
    let len = usize::from(u16::from_be_bytes([body[0], body[1]]));
    let topic = String::from_utf8(body[2..2 + len].to_vec()).unwrap();
    (topic, body[2 + len..].to_vec())
}

/// A connection whose will is `payload` on `status/<id>`, and what observes `status/#`.
async fn with_will(gw: &TestGateway, payload: &[u8]) -> (Box<Ws>, RawWire, String) {
    let o = observer(gw, "status/#").await;
    let id = unique("dev");
    let topic = format!("status/{id}");
    let mut ws = ws(gw).await;
    ws.send(Message::Binary(
        connect_with_will(&id, &topic, payload).into(),
    ))
    .await
    .unwrap();
    let (first, body) = packet_from(&mut ws, &mut Vec::new()).await;
    assert_eq!((first, body), (0x20, vec![0, 0]), "CONNACK accepted");
    (ws, o, topic)
}

#[tokio::test]
async fn packets_may_span_frames_and_a_frame_may_hold_several() {
    let gw = start_gateway(|_| {}).await;
    let mut ws = ws(&gw).await;
    // CONNECT one byte a frame, with an empty frame and a ping among them.
    let connect = connect(b"MQTT", 4, 0, &unique("frames"), Some(&admin()));
    for (i, b) in connect.iter().enumerate() {
        if i == 3 {
            ws.send(Message::Binary(Vec::new().into())).await.unwrap();
            ws.send(Message::Ping(b"are you there".to_vec().into()))
                .await
                .unwrap();
        }
        ws.send(Message::Binary(vec![*b].into())).await.unwrap();
    }
    let mut buf = Vec::new();
    // The gateway answers the ping while it waits for the rest of the CONNECT.
    match frame(&mut ws).await {
        Some(Message::Pong(p)) => assert_eq!(&p[..], b"are you there"),
        other => panic!("a pong first, not {other:?}"),
    }
    assert_eq!(packet_from(&mut ws, &mut buf).await, (0x20, vec![0, 0]));

    // SUBSCRIBE and a PUBLISH to itself in one frame, then a second PUBLISH cut in two.
    let mut both = subscribe_packet(7, "frames/+", 1, false, None);
    both.extend(publish_qos1(b"frames/one", b"first", false));
    ws.send(Message::Binary(both.into())).await.unwrap();
    let second = publish_qos1(b"frames/two", b"second", false);
    let (head, tail) = second.split_at(5);
    ws.send(Message::Binary(head.to_vec().into()))
        .await
        .unwrap();
    ws.send(Message::Binary(tail.to_vec().into()))
        .await
        .unwrap();

    let mut got = Vec::new();
    for _ in 0..5 {
        got.push(packet_from(&mut ws, &mut buf).await);
    }
    let firsts: Vec<u8> = got.iter().map(|(f, _)| *f & 0xF0).collect();
    assert_eq!(firsts.iter().filter(|f| **f == 0x90).count(), 1, "{got:x?}");
    assert_eq!(firsts.iter().filter(|f| **f == 0x40).count(), 2, "{got:x?}");
    let payloads: Vec<Vec<u8>> = got
        .iter()
        .filter(|(f, _)| f & 0xF0 == 0x30)
        .map(|(_, body)| {
            // Topic, then the packet id of a QoS 1 delivery, then the payload.
            let topic = usize::from(u16::from_be_bytes([body[0], body[1]]));
            body[2 + topic + 2..].to_vec()
        })
        .collect();
    assert_eq!(payloads, [&b"first"[..], b"second"], "both, in order");
}

#[tokio::test]
async fn a_text_frame_closes_with_1003_and_the_will_goes_out() {
    let gw = start_gateway(|_| {}).await;
    let (mut ws, mut o, topic) = with_will(&gw, b"gone").await;
    ws.send(Message::Text("CONNECT".into())).await.unwrap();
    match frame(&mut ws).await {
        Some(Message::Close(Some(f))) => {
            assert_eq!(f.code, CloseCode::Unsupported, "1003");
            assert!(f.reason.contains("binary"), "says why: {}", f.reason);
        }
        other => panic!("a Close with 1003, not {other:?}"),
    }
    assert_eq!(published(&mut o).await, (topic, b"gone".to_vec()));
}

#[tokio::test]
async fn a_close_from_the_client_is_answered_and_the_will_goes_out() {
    let gw = start_gateway(|_| {}).await;
    let (mut ws, mut o, topic) = with_will(&gw, b"vanished").await;
    ws.send(Message::Close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "bye".into(),
    })))
    .await
    .unwrap();
    // The gateway's answer completes the closing handshake, and the stream ends after it.
    assert!(
        matches!(frame(&mut ws).await, Some(Message::Close(_))),
        "the gateway answers the Close"
    );
    assert!(frame(&mut ws).await.is_none(), "nothing after the Close");
    // A Close is not an MQTT DISCONNECT: the will goes out.
    assert_eq!(published(&mut o).await, (topic, b"vanished".to_vec()));
}

#[tokio::test]
async fn a_disconnect_then_close_sends_no_will() {
    let gw = start_gateway(|_| {}).await;
    let (mut ws, mut o, _) = with_will(&gw, b"unwanted").await;
    ws.send(Message::Binary(vec![0xE0, 0].into()))
        .await
        .unwrap();
    // The gateway ends the WebSocket once the session ended: its Close comes first.
    assert!(
        matches!(frame(&mut ws).await, Some(Message::Close(None))),
        "the gateway closes after a DISCONNECT"
    );
    assert!(frame(&mut ws).await.is_none(), "nothing after the Close");
    assert!(
        o.quiet_for(Duration::from_millis(300)).await,
        "no will after a DISCONNECT"
    );
}

#[tokio::test]
async fn a_protocol_error_is_answered_with_disconnect_then_close() {
    let gw = start_gateway(|_| {}).await;
    let mut ws = ws(&gw).await;
    let connect = connect(b"MQTT", 5, 0, &unique("bad"), Some(&admin()));
    ws.send(Message::Binary(connect.into())).await.unwrap();
    let mut buf = Vec::new();
    assert_eq!(packet_from(&mut ws, &mut buf).await.0, 0x20, "CONNACK");
    // A PUBLISH with QoS 3 is malformed (MQTT 5 §3.3.1.2).
    let mut bad = publish_qos1(b"a/b", b"x", true);
    bad[0] = 0x36;
    ws.send(Message::Binary(bad.into())).await.unwrap();
    let (first, body) = packet_from(&mut ws, &mut buf).await;
    assert_eq!(first, 0xE0, "a DISCONNECT");
    assert_eq!(body.first(), Some(&0x81), "malformed packet");
    assert!(
        matches!(frame(&mut ws).await, Some(Message::Close(None))),
        "then the Close, after the DISCONNECT"
    );
}
