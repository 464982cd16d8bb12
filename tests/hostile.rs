//! Hostile clients (DESIGN.md §7; issue "Reliability"): connections that never authenticate,
//! slowloris on every handshake, ten thousand subscriptions from one client, a thousand-level
//! topic. Each is bounded in count and time, on loopback; the assertions are on counts, codes and
//! on everyone else still being served — never on speed.

mod common;

use std::time::Duration;

use common::mqtt_bytes::{connect, packet, string, subscribe_packet};
use common::mqtt_wire::{RawWire, Transport};
use common::ws::Ws;
use common::{TestGateway, WAIT, admin, start_gateway};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Every handshake must complete within this here.
const HANDSHAKE: Duration = Duration::from_secs(2);

async fn gateway() -> TestGateway {
    start_gateway(|c| {
        c.mqtt.connect_timeout = HANDSHAKE;
        c.amqp.handshake_timeout = HANDSHAKE;
        c.ws.auth_timeout = HANDSHAKE;
        c.http.header_read_timeout = HANDSHAKE;
    })
    .await
}

/// Waits for the gateway to end `s` (EOF or reset), bounded by `WAIT`; returns what it sent.
async fn closed_by_gateway(s: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    let ended = tokio::time::timeout(WAIT, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(
        ended.is_ok(),
        "the gateway did not close a silent connection"
    );
    got
}

#[tokio::test]
async fn a_thousand_silent_connections_are_closed_and_others_still_get_in() {
    let gw = gateway().await;
    let addrs = gw.gateway.addrs();
    let amqp = addrs.amqp.expect("the AMQP listener");
    // 999 connections that never authenticate, below limits.max_unauthenticated (1000):
    // 333 each on MQTT and AMQP (nothing sent) and on /ws (upgraded, no auth frame).
    let mut silent = Vec::new();
    for _ in 0..333 {
        silent.push(TcpStream::connect(addrs.mqtt).await.unwrap());
        silent.push(TcpStream::connect(amqp).await.unwrap());
    }
    let mut upgraded = Vec::new();
    for _ in 0..333 {
        let req = common::ws::request(&gw, None, true, "");
        upgraded.push(Ws(tokio_tungstenite::connect_async(req).await.unwrap().0));
    }
    // An authenticated client gets in on every protocol meanwhile.
    let mut device = RawWire::connected(&gw, Transport::Tcp, 5, "device", &admin()).await;
    let browser = Ws::connect(&gw, Some(&admin())).await;
    drop(browser);
    let app = common::amqp::connect(&gw, &admin()).await;
    assert!(app.status().connected());
    assert_eq!(common::status(gw.get("/v1/queues", &admin())).await, 200);

    // Every silent one is closed after the handshake timeout.
    for s in &mut silent {
        closed_by_gateway(s).await;
    }
    for ws in &mut upgraded {
        assert_eq!(ws.closed_with().await, 4001);
    }
    // The authenticated ones were not.
    device.send_raw(&[0xC0, 0]).await;
    assert_eq!(device.packet().await.expect("PINGRESP").0, 0xD0);
    assert!(app.status().connected());
}

/// Sends `bytes` one at a time, one every 300 ms, until the gateway closes (or they run out).
async fn trickle(s: &mut TcpStream, bytes: &[u8]) -> Duration {
    let started = tokio::time::Instant::now();
    for b in bytes {
        if s.write_all(&[*b]).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        if started.elapsed() > WAIT {
            break;
        }
    }
    closed_by_gateway(s).await;
    started.elapsed()
}

#[tokio::test]
async fn slowloris_is_cut_off_at_every_handshake() {
    let gw = gateway().await;
    let addrs = gw.gateway.addrs();
    // Long enough to outlast the handshake timeout at one byte per 300 ms.
    let http = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n",
        "p".repeat(40)
    );
    let upgrade = format!(
        "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Protocol: amqp-gateway.v1.json\r\nX-Pad: {}\r\n\r\n",
        "p".repeat(40)
    );
    let mqtt = connect(b"MQTT", 5, 0, &"c".repeat(40), Some(&admin()));
    let amqp_header = b"AMQP\x00\x00\x09\x01".repeat(8);
    let doors: [(&str, std::net::SocketAddr, &[u8]); 4] = [
        ("HTTP headers", addrs.http, http.as_bytes()),
        ("WebSocket upgrade", addrs.http, upgrade.as_bytes()),
        ("MQTT CONNECT", addrs.mqtt, &mqtt),
        ("AMQP handshake", addrs.amqp.unwrap(), &amqp_header),
    ];
    let mut tasks = Vec::new();
    for (door, addr, bytes) in doors {
        let bytes = bytes.to_vec();
        tasks.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            (door, trickle(&mut s, &bytes).await)
        }));
    }
    for task in tasks {
        let (door, took) = task.await.unwrap();
        // Cut off at the deadline though a byte kept arriving (not an idle timeout).
        assert!(
            took < HANDSHAKE + Duration::from_secs(2),
            "{door}: still open after {took:?}"
        );
    }
    // The gateway serves normally throughout.
    assert_eq!(common::status(gw.get("/v1/queues", &admin())).await, 200);
}

#[tokio::test]
async fn ten_thousand_subscriptions_from_one_client() {
    let gw = gateway().await;
    // MQTT 5: one SUBSCRIBE per filter, pipelined; granted up to limits.max_subscriptions
    // (1000), then 0x97 (quota exceeded), the connection kept.
    let mut wire = RawWire::connected(&gw, Transport::Tcp, 5, "greedy", &admin()).await;
    let mut batch = Vec::new();
    for i in 0..10_000u16 {
        batch.extend(subscribe_packet(
            i + 1,
            &format!("greedy/{i}"),
            0,
            true,
            None,
        ));
    }
    wire.send_raw(&batch).await;
    let (mut granted, mut quota) = (0, 0);
    for _ in 0..10_000 {
        let (first, body) = wire.packet().await.expect("SUBACK");
        assert_eq!(first, 0x90);
        match *body.last().unwrap() {
            0 => granted += 1,
            0x97 => quota += 1,
            other => panic!("SUBACK {other:#x}"),
        }
    }
    assert_eq!((granted, quota), (1000, 9000));
    wire.send_raw(&[0xC0, 0]).await;
    assert_eq!(wire.packet().await.expect("PINGRESP").0, 0xD0);

    // /ws: the same cap, `precondition_failed` past it, the connection kept.
    let mut ws = Ws::connect(&gw, Some(&admin())).await;
    let (mut ok, mut refused) = (0, 0);
    for i in 0..10_000 {
        let reply = ws
            .call(json!({"op": "subscribe", "id": i, "exchange": "amq.topic", "binding_key": format!("g.{i}")}))
            .await;
        match reply["op"].as_str() {
            Some("subscribed") => ok += 1,
            _ if reply["code"] == "precondition_failed" => refused += 1,
            _ => panic!("{reply}"),
        }
    }
    assert_eq!((ok, refused), (1000, 9000));
    assert_eq!(ws.call(json!({"op": "ping", "id": 0})).await["op"], "pong");
}

#[tokio::test]
async fn a_thousand_level_topic_is_refused_and_nothing_breaks() {
    let gw = gateway().await;
    let topic = vec!["l"; 1000].join("/");
    let filter = vec!["+"; 1000].join("/");
    let mut wire = RawWire::connected(&gw, Transport::Tcp, 5, "deep", &admin()).await;
    // PUBLISH QoS 1: no routing-key form (1999 bytes) — PUBACK 0x90, the connection stays.
    let mut body = string(topic.as_bytes());
    body.extend(1u16.to_be_bytes());
    body.push(0);
    body.extend_from_slice(b"deep");
    wire.send_raw(&packet(0x32, body)).await;
    let (first, ack) = wire.packet().await.expect("PUBACK");
    assert_eq!((first, ack[2]), (0x40, 0x90));
    for f in [&topic, &filter] {
        wire.send_raw(&subscribe_packet(7, f, 1, true, None)).await;
        let (first, suback) = wire.packet().await.expect("SUBACK");
        assert_eq!(first, 0x90);
        assert!(*suback.last().unwrap() >= 0x80, "refused: {suback:x?}");
    }
    wire.send_raw(&[0xC0, 0]).await;
    assert_eq!(wire.packet().await.expect("PINGRESP").0, 0xD0);
    // The same depth over REST and /ws: refused as a bad request.
    let key = vec!["l"; 1000].join(".");
    common::refused(
        gw.post("/v1/exchanges/amq.topic/publish", &admin())
            .json(&json!({"routing_key": key, "body": "x"})),
        400,
        "bad_request",
    )
    .await;
    let mut ws = Ws::connect(&gw, Some(&admin())).await;
    let reply = ws
        .call(json!({"op": "subscribe", "id": 1, "exchange": "amq.topic", "binding_key": vec!["*"; 1000].join(".")}))
        .await;
    assert_eq!(reply["code"], "bad_request", "{reply}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_amqp_reader_among_fast_ones_is_cut_off_and_costs_them_nothing() {
    use amq_protocol::protocol::{AMQPClass, basic};
    use futures_util::StreamExt;

    let gw = start_gateway(|c| {
        c.limits.write_timeout = HANDSHAKE;
        // The publisher is not what is tested: its rate limits out of the way.
        c.limits.publish_rate = 1_000_000;
        c.limits.publish_burst = 1_000_000;
        c.limits.subject_publish_rate = 1_000_000;
    })
    .await;
    let (slow_q, fast_q) = (gw.queue("slow").await, gw.queue("fast").await);
    gw.bind(&slow_q, "amq.fanout", "").await;
    gw.bind(&fast_q, "amq.fanout", "").await;
    // The slow reader: consumes with no-ack, then never reads its socket again.
    let mut slow = common::amqp_raw::Raw::open(&gw, &admin(), 131_072, 0).await;
    slow.open_channel(1).await;
    let consume = basic::Consume {
        queue: slow_q.as_str().into(),
        consumer_tag: "slow".into(),
        no_local: false,
        no_ack: true,
        exclusive: false,
        nowait: false,
        arguments: Default::default(),
    };
    slow.send(&common::amqp_raw::method(
        1,
        AMQPClass::Basic(basic::AMQPMethod::Consume(consume)),
    ))
    .await;
    // A fast one on the same fanout.
    let conn = common::amqp::connect(&gw, &admin()).await;
    let ch = common::amqp::channel(&conn).await;
    let mut fast = common::amqp::consume_no_ack(&ch, &fast_q, "fast").await;
    // 30 MB: far more than the slow socket's kernel buffers and the gateway's 256 KiB.
    const N: usize = 30_000;
    let body = "b".repeat(1000);
    let publishing = async {
        for batch in 0..N / 1000 {
            let messages: Vec<_> = (0..1000)
                .map(|i| json!({"routing_key": "", "body": format!("{:06}{body}", batch * 1000 + i)}))
                .collect();
            let r = gw
                .post("/v1/exchanges/amq.fanout/publish-batch", &admin())
                .json(&json!({"messages": messages}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            let results: serde_json::Value = r.json().await.unwrap();
            let routed = results["results"].as_array().unwrap();
            assert!(routed.iter().all(|r| r["routed"] == true), "{results}");
        }
    };
    let receiving = async {
        let mut got = Vec::with_capacity(N);
        while got.len() < N {
            match tokio::time::timeout(WAIT, fast.next()).await {
                Ok(Some(Ok(d))) => got.push(String::from_utf8_lossy(&d.data[..6]).into_owned()),
                other => panic!("after {}: {other:?}", got.len()),
            }
        }
        got
    };
    let ((), got) = tokio::join!(publishing, receiving);
    let mut firsts = Vec::new();
    for (i, g) in got.iter().enumerate() {
        if g != &format!("{i:06}") && firsts.len() < 10 {
            firsts.push(format!("{i}: {g}"));
        }
    }
    let mut sorted = got.clone();
    sorted.sort();
    sorted.dedup();
    assert!(
        firsts.is_empty(),
        "unique {} of {N}; first out of place: {firsts:?}",
        sorted.len()
    );
    // The slow one is cut off once its socket took nothing for limits.write_timeout.
    common::eventually(
        "the slow AMQP reader is closed as a slow consumer",
        || async {
            gw.metric(
                "gateway_connections_closed_total{protocol=\"amqp\",reason=\"slow_consumer\"}",
            )
            .await
                == Some(1.0)
        },
    )
    .await;
    assert!(conn.status().connected(), "the fast one stays");
}

/// A client that acknowledges nothing while one SUBSCRIBE brings it 65,537 retained QoS 1
/// messages, more than there are packet ids: it gets its window (`mqtt.max_inflight`, 32) and
/// no more, and the connection still answers. (The gateway once sent them all at once: past
/// 65,535 it looked for a free packet id forever, holding its worker thread, and this test
/// hung until nextest's timeout ended it.)
#[tokio::test]
async fn retained_messages_past_every_packet_id_wait_for_the_window() {
    const RETAINED: usize = 65_537;
    let gw = gateway().await;
    let window = usize::from(amqp_gateway::config::Config::default().mqtt.max_inflight);
    let store = gw.gateway.engine().retained();
    for i in 0..RETAINED {
        let m = amqp_gateway::engine::Message::new(format!("{i}")).persistent();
        store.set(&format!("flood.r{i}"), m).await.unwrap();
    }
    let mut wire = RawWire::connected(&gw, Transport::Tcp, 4, "hoarder", &admin()).await;
    wire.send_raw(&subscribe_packet(1, "flood/#", 1, false, None))
        .await;
    let (first, _) = wire.packet().await.expect("SUBACK");
    assert_eq!(first, 0x90);
    let mut ids = std::collections::HashSet::new();
    for n in 0..window {
        let (first, body) = wire.packet().await.expect("a retained PUBLISH");
        assert_eq!(first, 0x33, "PUBLISH #{n}: QoS 1, RETAIN");
        let topic_len = usize::from(u16::from_be_bytes([body[0], body[1]]));
        let id = u16::from_be_bytes([body[2 + topic_len], body[3 + topic_len]]);
        assert!(id != 0 && ids.insert(id), "packet id {id} twice");
    }
    // The worker is free: the connection answers, and nothing more was sent before it.
    wire.send_raw(&[0xC0, 0]).await;
    assert_eq!(wire.packet().await.expect("PINGRESP").0, 0xD0);
    let metrics = gw.metrics_text().await;
    assert!(!metrics.contains("reason=\"no_packet_id\""), "{metrics}");
}
