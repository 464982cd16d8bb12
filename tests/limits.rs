//! The documented size caps (README "Security", `docs/auth.md`), each tried exactly at the cap
//! and one byte (or one item) over it, on every protocol it applies to: the HTTP request head
//! and header count, the message size (REST, WebSocket, MQTT 3.1.1 and 5, AMQP), routing keys
//! and MQTT topics, exchange and queue names, durable subscription names, header-table keys,
//! the WebSocket frame, the MQTT packet, subscriptions per connection. At the cap: accepted.
//! Over: that protocol's refusal, and the connection (where it survives) still works.

mod common;

use bytesize::ByteSize;
use common::amqp_raw::Raw;
use common::mqtt_bytes::{publish_qos1, remaining_length, string, subscribe_packet};
use common::mqtt_wire::{RawWire, Transport};
use common::ws::Ws;
use common::{TestGateway, WAIT, admin, start_gateway};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MAX_MESSAGE: usize = 4096;
const MAX_HEAD: usize = 64 * 1024;

async fn gateway() -> TestGateway {
    start_gateway(|c| {
        c.limits.max_message_bytes = ByteSize::b(MAX_MESSAGE as u64);
        c.limits.max_subscriptions = 3;
        c.http.max_header_bytes = ByteSize::b(MAX_HEAD as u64);
    })
    .await
}

/// The status line of one raw HTTP/1.1 request on a fresh connection.
async fn raw_http(gw: &TestGateway, request: &[u8]) -> String {
    let mut s = tokio::net::TcpStream::connect(gw.gateway.addrs().http)
        .await
        .unwrap();
    s.write_all(request).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(WAIT, async {
        while !got.windows(2).any(|w| w == b"\r\n") {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .expect("an answer in time");
    let text = String::from_utf8_lossy(&got);
    text.lines().next().unwrap_or("").to_owned()
}

/// A GET /healthz whose head (request line, headers, the blank line) is exactly `len` bytes.
fn head_of(len: usize) -> Vec<u8> {
    let start = "GET /healthz HTTP/1.1\r\nHost: gw\r\nConnection: close\r\nX-Pad: ";
    let end = "\r\n\r\n";
    let pad = len - start.len() - end.len();
    format!("{start}{}{end}", "p".repeat(pad)).into_bytes()
}

fn headers(count: usize) -> Vec<u8> {
    // Host and Connection count too.
    let mut req = "GET /healthz HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n".to_owned();
    for i in 0..count - 2 {
        req.push_str(&format!("X-H{i}: v\r\n"));
    }
    req.push_str("\r\n");
    req.into_bytes()
}

#[tokio::test]
async fn http_request_heads_up_to_the_cap() {
    let gw = gateway().await;
    assert_eq!(raw_http(&gw, &head_of(MAX_HEAD)).await, "HTTP/1.1 200 OK");
    assert_eq!(
        raw_http(&gw, &head_of(MAX_HEAD + 1)).await,
        "HTTP/1.1 431 Request Header Fields Too Large"
    );
    assert_eq!(raw_http(&gw, &headers(100)).await, "HTTP/1.1 200 OK");
    assert_eq!(
        raw_http(&gw, &headers(101)).await,
        "HTTP/1.1 431 Request Header Fields Too Large"
    );
}

/// REST: a raw-body publish; WebSocket: a publish frame.
#[tokio::test]
async fn messages_up_to_the_size_limit_on_rest_and_websocket() {
    let gw = gateway().await;
    let queue = gw.queue("limits").await;
    gw.bind(&queue, "amq.topic", "limits.#").await;
    let raw = |len: usize| {
        gw.post(
            "/v1/exchanges/amq.topic/messages?routing_key=limits.rest",
            &admin(),
        )
        .header("content-type", "application/octet-stream")
        .body(vec![b'r'; len])
    };
    assert_eq!(common::status(raw(MAX_MESSAGE)).await, 200);
    common::refused(raw(MAX_MESSAGE + 1), 413, "too_large").await;

    let mut ws = Ws::connect(&gw, Some(&admin())).await;
    let publish = |len: usize| json!({"op": "publish", "id": len, "exchange": "amq.topic", "routing_key": "limits.ws", "body": "w".repeat(len)});
    assert_eq!(ws.call(publish(MAX_MESSAGE)).await["op"], "published");
    let over = ws.call(publish(MAX_MESSAGE + 1)).await;
    assert_eq!(
        (over["op"].as_str(), over["code"].as_str()),
        (Some("error"), Some("too_large")),
        "{over}"
    );
    assert_eq!(ws.call(json!({"op": "ping", "id": 0})).await["op"], "pong");
    let got = gw.take(&queue, 10).await;
    let sizes: Vec<usize> = got
        .iter()
        .map(|m| m["body"].as_str().map_or(0, str::len))
        .collect();
    assert_eq!(sizes, [MAX_MESSAGE, MAX_MESSAGE], "{got:?}");
}

async fn mqtt(gw: &TestGateway, level: u8) -> RawWire {
    let client = common::unique("limits");
    RawWire::connected(gw, Transport::Tcp, level, &client, &admin()).await
}

#[tokio::test]
async fn mqtt_messages_and_topics_up_to_their_caps() {
    let gw = gateway().await;
    let queue = gw.queue("limits-mqtt").await;
    gw.bind(&queue, "amq.topic", "#").await;
    for level in [4, 5] {
        let v5 = level == 5;
        let mut wire = mqtt(&gw, level).await;
        wire.send_raw(&publish_qos1(b"limits/mqtt", &[b'm'; MAX_MESSAGE], v5))
            .await;
        assert_eq!(
            wire.puback().await,
            Ok(0),
            "{level}: a message at the limit"
        );
        // A topic of 255 bytes maps to a routing key of 255 bytes: the cap.
        let topic = vec![b't'; 255];
        wire.send_raw(&publish_qos1(&topic, b"x", v5)).await;
        assert_eq!(wire.puback().await, Ok(0), "{level}: a 255-byte topic");

        let mut wire = mqtt(&gw, level).await;
        wire.send_raw(&publish_qos1(b"limits/mqtt", &[b'm'; MAX_MESSAGE + 1], v5))
            .await;
        // Not published either way; MQTT 5 hears 0x97 (as from Mosquitto's message size limit),
        // 3.1.1 cannot be told no; the connection stays, so no resend loop.
        let over = wire.puback().await;
        assert_eq!(
            over,
            Ok(if v5 { 0x97 } else { 0 }),
            "{level}: one byte over"
        );
        wire.send_raw(&publish_qos1(&[b't'; 256], b"x", v5)).await;
        let long_topic = wire.puback().await;
        if v5 {
            assert_eq!(long_topic, Ok(0x90), "5: PUBACK topic name invalid");
        } else {
            assert_eq!(long_topic, Err(None), "3.1.1: closed");
        }
    }
    assert_eq!(gw.depth(&queue).await, 4, "exactly the four at the caps");
}

#[tokio::test]
async fn the_mqtt_packet_cap_is_the_message_limit_plus_64_kib() {
    let gw = gateway().await;
    // Maximum Packet Size: the whole packet, fixed header included.
    let max_packet = MAX_MESSAGE + 64 * 1024;
    for (len, allowed) in [(max_packet, true), (max_packet + 1, false)] {
        let mut wire = mqtt(&gw, 5).await;
        let remaining = len - 1 - remaining_length(len).len();
        let mut big = vec![0x30];
        let rl = remaining_length(remaining);
        assert_eq!(1 + rl.len() + remaining, len);
        big.extend(rl);
        big.extend(string(b"limits/packet"));
        big.push(0); // no properties
        big.resize(len, b'p');
        wire.send_raw(&big).await;
        // A QoS 0 PUBLISH has no answer: a PINGREQ after it shows the connection lives.
        wire.send_raw(&[0xC0, 0]).await;
        let answer = wire.packet().await;
        if allowed {
            // Within the packet cap but over the message limit: dropped as a message (QoS 0
            // has no answer), the connection lives.
            assert!(matches!(answer, Ok((0xD0, _))), "{len}: {answer:?}");
        } else {
            assert!(
                matches!(answer, Ok((0xE0, ref b)) if b[0] == 0x95),
                "{len}: {answer:?}"
            );
        }
    }
}

#[tokio::test]
async fn amqp_messages_up_to_the_size_limit() {
    let gw = gateway().await;
    let queue = gw.queue("limits-amqp").await;
    let mut raw = Raw::open(&gw, &admin(), 131_072, 0).await;
    raw.open_channel(1).await;
    raw.confirm_select(1).await;
    raw.publish_body(1, "", &queue, &vec![b'a'; MAX_MESSAGE])
        .await;
    let ack = raw.method().await;
    assert!(format!("{ack:?}").contains("Ack"), "{ack:?}");
    raw.publish_body(1, "", &queue, &vec![b'a'; MAX_MESSAGE + 1])
        .await;
    assert_eq!(raw.channel_closed(1).await, 311, "content too large");
    raw.open_channel(2).await;
    assert_eq!(gw.depth(&queue).await, 1);
}

#[tokio::test]
async fn keys_and_names_up_to_255_bytes() {
    let gw = gateway().await;
    let key = |len: usize| "k".repeat(len);
    let rest_publish = |rk: String| {
        gw.post("/v1/exchanges/amq.topic/publish", &admin())
            .json(&json!({"routing_key": rk, "body": "x"}))
    };
    assert_eq!(common::status(rest_publish(key(255))).await, 200);
    common::refused(rest_publish(key(256)), 400, "bad_request").await;
    let mut ws = Ws::connect(&gw, Some(&admin())).await;
    let ws_publish = |rk: String| json!({"op": "publish", "id": 1, "exchange": "amq.topic", "routing_key": rk, "body": "x"});
    assert_eq!(ws.call(ws_publish(key(255))).await["op"], "published");
    let over = ws.call(ws_publish(key(256))).await;
    assert_eq!(over["code"], "bad_request", "{over}");

    for (kind, body) in [
        ("queues", json!({"durable": false})),
        ("exchanges", json!({"type": "topic", "durable": false})),
    ] {
        let declare = |len: usize| {
            gw.put(&format!("/v1/{kind}/{}", "n".repeat(len)), &admin())
                .json(&body)
        };
        assert_eq!(common::status(declare(255)).await, 201, "{kind}");
        common::refused(declare(256), 400, "bad_request").await;
    }
    // Durable WebSocket subscription names: [A-Za-z0-9_-]{1,64}.
    let durable = |name: String| json!({"op": "subscribe", "id": 2, "exchange": "amq.topic", "binding_key": "d", "durable": name});
    assert_eq!(ws.call(durable("d".repeat(64))).await["op"], "subscribed");
    let over = ws.call(durable("d".repeat(65))).await;
    assert_eq!(over["code"], "bad_request", "{over}");
    // Header-table keys are AMQP short strings.
    let with_header = |len: usize| {
        gw.post("/v1/exchanges/amq.topic/publish", &admin())
            .json(&json!({
                "routing_key": "h", "body": "x", "properties": {"headers": {"h".repeat(len): 1}}
            }))
    };
    assert_eq!(common::status(with_header(255)).await, 200);
    common::refused(with_header(256), 400, "bad_request").await;
}

#[tokio::test]
async fn the_websocket_frame_cap() {
    let gw = gateway().await;
    // ceil(max × 4/3) + 64 KiB: a maximal message base64-encoded, with room for the JSON.
    let cap = MAX_MESSAGE.div_ceil(3) * 4 + 64 * 1024;
    let frame = |len: usize| {
        let start = r#"{"op":"publish","id":1,"exchange":"amq.topic","routing_key":"f","body":""#;
        let end = r#""}"#;
        format!("{start}{}{end}", "f".repeat(len - start.len() - end.len()))
    };
    let mut ws = Ws::connect(&gw, Some(&admin())).await;
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    ws.0.send(Message::text(frame(cap))).await.unwrap();
    let answer: Value = ws.recv().await;
    assert_eq!(
        answer["code"], "too_large",
        "a frame at the cap is read: {answer}"
    );
    ws.0.send(Message::text(frame(cap + 1))).await.unwrap();
    assert_eq!(ws.closed_with().await, 1009);
}

#[tokio::test]
async fn subscriptions_per_connection_up_to_the_cap() {
    let gw = gateway().await;
    for level in [4, 5] {
        let mut wire = mqtt(&gw, level).await;
        let mut codes = Vec::new();
        for i in 0..4u16 {
            wire.send_raw(&subscribe_packet(
                i + 1,
                &format!("s/{i}"),
                1,
                level == 5,
                None,
            ))
            .await;
            let (first, body) = wire.packet().await.expect("SUBACK");
            assert_eq!(first, 0x90);
            codes.push(*body.last().unwrap());
        }
        let refused = if level == 5 { 0x97 } else { 0x80 };
        assert_eq!(codes, [1, 1, 1, refused], "MQTT {level}");
    }
    let mut ws = Ws::connect(&gw, Some(&admin())).await;
    for i in 0..3 {
        let sub = json!({"op": "subscribe", "id": i, "exchange": "amq.topic", "binding_key": format!("s.{i}")});
        assert_eq!(ws.call(sub).await["op"], "subscribed");
    }
    let over = ws
        .call(json!({"op": "subscribe", "id": 9, "exchange": "amq.topic", "binding_key": "s.9"}))
        .await;
    assert_eq!(over["code"], "precondition_failed", "{over}");
}
