//! Bad MQTT input as raw bytes over TCP: each closes that one connection — with the return or
//! reason code where the spec has one — and harms no other client and no accepted message.

mod common;

use std::time::Duration;

use common::mqtt_bytes::{
    connack, connect, connect_ka, connect_persistent, connect_v5_enhanced, packet, parse_publish,
    publish_qos, read_packet, reauth, remaining_length, string, subscribe_packet, until_closed,
};
use common::{TestGateway, WAIT, start_gateway, token, unique};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn publish(topic: &[u8], payload: &[u8], v5: bool) -> Vec<u8> {
    let mut body = string(topic);
    if v5 {
        body.push(0);
    }
    body.extend_from_slice(payload);
    packet(0x30, body)
}

async fn open(gw: &TestGateway) -> TcpStream {
    TcpStream::connect(gw.gateway.addrs().mqtt).await.unwrap()
}

async fn connected(gw: &TestGateway, level: u8) -> TcpStream {
    let mut s = open(gw).await;
    let t = token("raw", "gateway.write:amq.topic/# gateway.read:amq.topic/#");
    s.write_all(&connect(b"MQTT", level, 0, &unique("raw"), Some(&t)))
        .await
        .unwrap();
    let mut head = [0u8; 2];
    s.read_exact(&mut head).await.unwrap();
    assert_eq!(head[0], 0x20, "CONNACK");
    let mut rest = vec![0u8; head[1] as usize];
    s.read_exact(&mut rest).await.unwrap();
    let code = rest[1]; // the return code (3.1.1) or reason code (5), after the flags byte
    assert_eq!(code, 0, "accepted");
    s
}

#[tokio::test]
async fn bad_input_closes_only_that_connection() {
    let gw = start_gateway(|c| {
        c.limits.max_message_bytes = bytesize::ByteSize::kib(1);
        c.mqtt.connect_timeout = Duration::from_millis(300);
    })
    .await;
    let q = gw.queue("raw-accepted").await;
    gw.bind(&q, "amq.topic", "accepted").await;
    let good = token("raw", "gateway.write:amq.topic/# gateway.read:amq.topic/#");

    // A bystander with an accepted message, before any abuse.
    let mut bystander = connected(&gw, 4).await;
    bystander
        .write_all(&publish(b"accepted", b"kept", false))
        .await
        .unwrap();
    common::eventually("the accepted message arrives", || async {
        gw.depth(&q).await == 1
    })
    .await;

    // A packet before CONNECT.
    let mut s = open(&gw).await;
    s.write_all(&[0xC0, 0x00]).await.unwrap();
    assert_eq!(until_closed(&mut s).await, b"");

    // Wrong protocol name: closed without CONNACK ([MQTT-3.1.2-1]).
    let mut s = open(&gw).await;
    s.write_all(&connect(b"MQTX", 4, 0, "x", None))
        .await
        .unwrap();
    assert_eq!(until_closed(&mut s).await, b"");

    // Unknown protocol level: CONNACK 0x01 (unacceptable protocol version), then closed.
    let mut s = open(&gw).await;
    s.write_all(&connect(b"MQTT", 9, 0, "x", None))
        .await
        .unwrap();
    assert_eq!(until_closed(&mut s).await, [0x20, 0x02, 0x00, 0x01]);

    // The reserved CONNECT flag set ([MQTT-3.1.2-3]).
    let mut s = open(&gw).await;
    s.write_all(&connect(b"MQTT", 4, 0x01, "x", Some(&good)))
        .await
        .unwrap();
    assert_eq!(until_closed(&mut s).await, b"");

    // No CONNECT within mqtt.connect_timeout.
    let mut s = open(&gw).await;
    assert_eq!(until_closed(&mut s).await, b"");

    // A second CONNECT: 3.1.1 closes; 5 sends DISCONNECT 0x82 (protocol error) first.
    let mut s = connected(&gw, 4).await;
    s.write_all(&connect(b"MQTT", 4, 0, "again", Some(&good)))
        .await
        .unwrap();
    assert_eq!(until_closed(&mut s).await, b"");
    let mut s = connected(&gw, 5).await;
    s.write_all(&connect(b"MQTT", 5, 0, "again", Some(&good)))
        .await
        .unwrap();
    let got = until_closed(&mut s).await;
    assert_eq!(&got[..1], [0xE0], "DISCONNECT");
    assert_eq!(got[2], 0x82);

    // Invalid UTF-8 in a topic name.
    let mut s = connected(&gw, 4).await;
    s.write_all(&publish(&[b'a', 0xff, 0xfe], b"x", false))
        .await
        .unwrap();
    assert_eq!(until_closed(&mut s).await, b"");

    // A wildcard in a PUBLISH topic: 5 gets DISCONNECT 0x90.
    let mut s = connected(&gw, 5).await;
    s.write_all(&publish(b"a/+/b", b"x", true)).await.unwrap();
    let got = until_closed(&mut s).await;
    assert_eq!((got[0], got[2]), (0xE0, 0x90));

    // A packet over the maximum packet size (1 KiB + 64 KiB here): 5 gets DISCONNECT 0x95.
    let mut s = connected(&gw, 5).await;
    let mut big = vec![0x30];
    big.extend(remaining_length(200 * 1024));
    s.write_all(&big).await.unwrap();
    let got = until_closed(&mut s).await;
    assert_eq!((got[0], got[2]), (0xE0, 0x95));
    let mut s = connected(&gw, 4).await;
    s.write_all(&big).await.unwrap();
    assert_eq!(until_closed(&mut s).await, b"");

    // Nobody else was harmed: the bystander still works and the accepted message is there.
    bystander.write_all(&[0xC0, 0x00]).await.unwrap();
    let mut pong = [0u8; 2];
    tokio::time::timeout(WAIT, bystander.read_exact(&mut pong))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(pong, [0xD0, 0x00], "PINGRESP");
    assert_eq!(gw.depth(&q).await, 1);
}

#[tokio::test]
async fn keep_alive_times_out_at_one_and_a_half() {
    let gw = start_gateway(|_| {}).await;
    let mut s = open(&gw).await;
    let t = token("ka", "gateway.read:amq.topic/#");
    // keep-alive 1 s: silence for 1.5 s ends the connection.
    s.write_all(&connect_ka(b"MQTT", 4, 0, &unique("ka"), Some(&t), 1))
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let got = until_closed(&mut s).await;
    assert_eq!(&got[..2], [0x20, 0x02], "CONNACK first");
    let waited = started.elapsed();
    assert_eq!(
        got,
        [0x20, 0x02, 0x00, 0x00],
        "only the CONNACK, then silence"
    );
    assert!(
        waited >= Duration::from_millis(1400),
        "closed too early: {waited:?}"
    );
}

/// Inbound QoS 2 is exactly once: a resend (DUP) before PUBREL is acknowledged, not published
/// again; after PUBREL the packet id is free for a new message.
#[tokio::test]
async fn qos2_inbound_is_exactly_once() {
    let gw = start_gateway(|_| {}).await;
    let q = gw.queue("q2-once").await;
    gw.bind(&q, "amq.topic", "once").await;
    let mut s = connected(&gw, 4).await;
    let publish_q2 = |dup: bool| {
        let mut body = string(b"once");
        body.extend_from_slice(&7u16.to_be_bytes());
        body.extend_from_slice(b"payload");
        packet(if dup { 0x3C } else { 0x34 }, body)
    };
    let mut ack = [0u8; 4];
    s.write_all(&publish_q2(false)).await.unwrap();
    s.read_exact(&mut ack).await.unwrap();
    assert_eq!(ack, [0x50, 0x02, 0x00, 0x07], "PUBREC");
    s.write_all(&publish_q2(true)).await.unwrap();
    s.read_exact(&mut ack).await.unwrap();
    assert_eq!(ack, [0x50, 0x02, 0x00, 0x07], "PUBREC again for the resend");
    s.write_all(&[0x62, 0x02, 0x00, 0x07]).await.unwrap();
    s.read_exact(&mut ack).await.unwrap();
    assert_eq!(ack, [0x70, 0x02, 0x00, 0x07], "PUBCOMP");
    assert_eq!(gw.depth(&q).await, 1, "published once");
    s.write_all(&publish_q2(false)).await.unwrap();
    s.read_exact(&mut ack).await.unwrap();
    assert_eq!(ack[0], 0x50);
    common::eventually("a new message under the freed id", || async {
        gw.depth(&q).await == 2
    })
    .await;
}

/// A v5 client that keeps more QoS 1 publishes unacknowledged than the Receive Maximum we
/// advertised (publishes parked by the rate limit count) is disconnected with 0x93.
#[tokio::test]
async fn over_receive_maximum_is_0x93() {
    let gw = start_gateway(|c| {
        c.limits.publish_rate = 1;
        c.limits.publish_burst = 1;
        c.mqtt.receive_maximum = 4;
    })
    .await;
    let mut s = connected(&gw, 5).await;
    let publish_q1 = |id: u16| {
        let mut body = string(b"flood");
        body.extend_from_slice(&id.to_be_bytes());
        body.push(0); // no properties
        body.extend_from_slice(b"x");
        packet(0x32, body)
    };
    for id in 1..=6u16 {
        s.write_all(&publish_q1(id)).await.unwrap();
    }
    let got = until_closed(&mut s).await;
    // The first is acknowledged (PUBACK of v5 may carry a reason: 0x40, len, id…), then 0x93.
    assert_eq!(got[0], 0x40, "PUBACK for the first: {got:?}");
    let disconnect = got.iter().position(|b| *b == 0xE0).expect("DISCONNECT");
    assert_eq!(got[disconnect + 2], 0x93, "{got:?}");
}

/// QoS 0 deliveries to a client that reads nothing go through a bounded buffer: drops are
/// counted, memory does not grow, and other clients are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos0_to_a_stalled_client_is_dropped_and_counted() {
    use amqp_gateway::engine::{Message, PublishOptions};
    let gw = start_gateway(|c| c.limits.outbound_buffer_messages = 10).await;
    let mut s = connected(&gw, 4).await;
    // SUBSCRIBE packet id 1 to flood/# at QoS 0, then read the SUBACK and never read again.
    let mut body = 1u16.to_be_bytes().to_vec();
    body.extend(string(b"flood/#"));
    body.push(0);
    s.write_all(&packet(0x82, body)).await.unwrap();
    let mut suback = [0u8; 5];
    s.read_exact(&mut suback).await.unwrap();
    assert_eq!(suback[0], 0x90);
    let channel = gw
        .gateway
        .engine()
        .open_channel(&amqp_gateway::engine::Owner::new(), "flood")
        .await
        .unwrap();
    let payload = vec![b'z'; 16 * 1024];
    for _ in 0..2000 {
        channel
            .publish(
                "amq.topic",
                "flood.x",
                Message::new(payload.clone()),
                PublishOptions::default(),
            )
            .await
            .unwrap();
    }
    // The session stops taking deliveries while its buffer is above the high-water mark, so
    // they wait in its QoS 0 queue, bounded like the buffer: the queue drops its oldest.
    let metrics = gw.metrics_text().await;
    let dropped = [
        "gateway_engine_dropped_total{reason=\"maxlen\"}",
        "gateway_deliveries_dropped_total{protocol=\"mqtt\",reason=\"slow_consumer\"}",
    ]
    .iter()
    .filter_map(|m| common::metric_in(&metrics, m))
    .sum::<f64>();
    assert!(dropped > 0.0, "drops are counted:\n{metrics}");
    let other = connected(&gw, 4).await;
    drop(other);
    drop(s);
}

/// Enhanced authentication: the token in Authentication Data; AUTH 0x19 with a fresh token
/// moves the connection's end past the first token's expiry; another subject is refused.
#[tokio::test]
async fn enhanced_auth_refreshes_the_token() {
    let gw = start_gateway(|c| c.auth.leeway = Duration::ZERO).await;
    let short = amqp_gateway::auth::mint(
        common::SECRET,
        "ea",
        "gateway.read:amq.topic/#",
        Duration::from_secs(2),
        "gateway",
        None,
    )
    .unwrap();
    let mut s = open(&gw).await;
    s.write_all(&connect_v5_enhanced(&unique("ea"), &short))
        .await
        .unwrap();
    let (kind, connack) = read_packet(&mut s).await;
    assert_eq!((kind, connack[1]), (0x20, 0x00), "CONNACK success");
    assert!(
        connack.windows(16).any(|w| w == b"amqp-gateway.jwt"),
        "the method is echoed"
    );
    // Refresh with a longer token of the same subject: AUTH success.
    s.write_all(&reauth(&token("ea", "gateway.read:amq.topic/#")))
        .await
        .unwrap();
    let (kind, auth) = read_packet(&mut s).await;
    assert_eq!((kind, auth[0]), (0xF0, 0x00), "AUTH success");
    // Past the first token's expiry the connection is still served.
    tokio::time::sleep(Duration::from_secs(3)).await;
    s.write_all(&[0xC0, 0x00]).await.unwrap();
    assert_eq!(
        read_packet(&mut s).await,
        (0xD0, vec![]),
        "PINGRESP after the old exp"
    );
    // Another subject is not a refresh: DISCONNECT 0x87.
    s.write_all(&reauth(&token("someone-else", "gateway.read:amq.topic/#")))
        .await
        .unwrap();
    let got = until_closed(&mut s).await;
    assert_eq!((got[0], got[2]), (0xE0, 0x87));

    // Without a refresh the connection ends at exp with DISCONNECT 0xA0.
    let short = amqp_gateway::auth::mint(
        common::SECRET,
        "ea",
        "gateway.read:amq.topic/#",
        Duration::from_secs(2),
        "gateway",
        None,
    )
    .unwrap();
    let mut s = open(&gw).await;
    s.write_all(&connect_v5_enhanced(&unique("ea2"), &short))
        .await
        .unwrap();
    let (kind, _) = read_packet(&mut s).await;
    assert_eq!(kind, 0x20);
    let got = until_closed(&mut s).await;
    assert_eq!((got[0], got[2]), (0xE0, 0xA0), "token expired");

    // An unknown method is refused at CONNECT with 0x8C.
    let mut s = open(&gw).await;
    let mut c = connect_v5_enhanced(&unique("ea3"), &short);
    let at = c
        .windows(16)
        .position(|w| w == b"amqp-gateway.jwt")
        .unwrap();
    c[at] = b'X';
    s.write_all(&c).await.unwrap();
    let got = until_closed(&mut s).await;
    assert_eq!((got[0], got[3]), (0x20, 0x8C));
}

/// [MQTT-3.1.3-8]: 3.1.1 accepts an empty client id only with a clean session; otherwise
/// CONNACK 0x02 (identifier rejected).
#[tokio::test]
async fn empty_client_ids_follow_3_1_1_rules() {
    let gw = start_gateway(|_| {}).await;
    let t = token("empty", "gateway.read:amq.topic/#");
    let mut clean = open(&gw).await;
    clean
        .write_all(&connect(b"MQTT", 4, 0, "", Some(&t)))
        .await
        .unwrap();
    let (kind, body) = read_packet(&mut clean).await;
    assert_eq!(
        (kind, body),
        (0x20, vec![0x00, 0x00]),
        "accepted with a clean session"
    );
    let mut persistent = open(&gw).await;
    let mut c = connect(b"MQTT", 4, 0, "", Some(&t));
    let flags_at = c.windows(4).position(|w| w == b"MQTT").unwrap() + 5;
    c[flags_at] &= !0x02; // no clean session
    persistent.write_all(&c).await.unwrap();
    assert_eq!(
        until_closed(&mut persistent).await,
        [0x20, 0x02, 0x00, 0x02]
    );
}

/// QoS 0 publishes over the rate limit are dropped and counted; an MQTT 5 client that keeps
/// overrunning for `limits.overrun_grace` gets DISCONNECT 0x96, a 3.1.1 one stays connected.
#[tokio::test]
async fn qos0_overrun_past_the_grace_is_0x96_for_v5() {
    let gw = start_gateway(|c| {
        c.limits.publish_rate = 1;
        c.limits.publish_burst = 1;
        c.limits.overrun_grace = Duration::from_millis(500);
    })
    .await;
    for level in [5u8, 4] {
        let mut s = connected(&gw, level).await;
        let started = std::time::Instant::now();
        let mut got = Vec::new();
        while started.elapsed() < Duration::from_millis(1500) {
            if s.write_all(&publish(b"overrun", b"x", level == 5))
                .await
                .is_err()
            {
                break;
            }
            let mut buf = [0u8; 16];
            if let Ok(Ok(n)) =
                tokio::time::timeout(Duration::from_millis(50), s.read(&mut buf)).await
            {
                got.extend_from_slice(&buf[..n]);
                if n == 0 || got.first() == Some(&0xE0) {
                    break;
                }
            }
        }
        if level == 5 {
            assert_eq!(
                (got.first(), got.get(2)),
                (Some(&0xE0), Some(&0x96)),
                "DISCONNECT 0x96: {got:?}"
            );
            assert!(
                started.elapsed() >= Duration::from_millis(500),
                "not before the grace"
            );
        } else {
            assert!(
                got.is_empty(),
                "3.1.1 has no way to say it: publishes are dropped only"
            );
            s.write_all(&[0xC0, 0x00]).await.unwrap();
            assert_eq!(read_packet(&mut s).await, (0xD0, vec![]), "still connected");
        }
    }
    let metrics = gw.metrics_text().await;
    assert!(
        metrics.contains("gateway_refusals_total{protocol=\"mqtt\",reason=\"connection_rate\"}"),
        "drops counted"
    );
}

/// Above the engine's memory high watermark (DESIGN.md §7) a QoS 1 publish has its PUBACK
/// withheld while the socket keeps being read (PINGREQ answered), a QoS 0 one is dropped, and
/// once consumers drain the engine the withheld publish goes through and is acknowledged.
#[tokio::test]
async fn above_the_memory_watermark_acks_are_withheld_until_drained() {
    let gw = start_gateway(common::low_watermark).await;
    let fill = gw.queue("fill").await;
    let (t0, t1) = (unique("wm0"), unique("wm1"));
    let (q0, q1) = (gw.queue("wm0").await, gw.queue("wm1").await);
    gw.bind(&q0, "amq.topic", &t0).await;
    gw.bind(&q1, "amq.topic", &t1).await;
    let r = gw
        .post("/v1/exchanges/amq.default/publish", &common::admin())
        .json(&serde_json::json!({"routing_key": fill, "body": "x".repeat(100 * 1024)}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    let mut s = connected(&gw, 5).await;
    s.write_all(&publish(t0.as_bytes(), b"dropped", true))
        .await
        .unwrap();
    s.write_all(&publish_qos(&t1, 1, 5, false, b"withheld", true))
        .await
        .unwrap();
    s.write_all(&[0xC0, 0]).await.unwrap();
    assert_eq!(
        read_packet(&mut s).await.0,
        0xD0,
        "PINGRESP first: no PUBACK yet"
    );
    assert_eq!(
        gw.depth(&q1).await,
        0,
        "not published while above the watermark"
    );

    assert_eq!(gw.take(&fill, 1).await.len(), 1);
    let (first, body) = read_packet(&mut s).await;
    assert_eq!(
        (first, &body[..2]),
        (0x40, &[0u8, 5][..]),
        "PUBACK once drained"
    );
    assert_eq!(gw.depth(&q1).await, 1);
    assert_eq!(gw.depth(&q0).await, 0, "the QoS 0 publish was dropped");
}

/// The reason code (3.1.1: return code) of the CONNACK read next.
async fn connack_code(s: &mut TcpStream) -> u8 {
    let (first, body) = read_packet(s).await;
    assert_eq!(first, 0x20, "CONNACK");
    body[1]
}

/// Connection limits (DESIGN.md §7): per subject an extra CONNECT gets 0x97 (3.1.1: code 3)
/// and the place comes back when a connection ends; connections that have not sent CONNECT
/// are bounded; SUBSCRIBE past `limits.max_subscriptions` gets 0x97 for the extra filters.
#[tokio::test]
async fn connection_and_subscription_limits() {
    let gw = start_gateway(|c| {
        c.limits.max_connections_per_subject = 2;
        c.limits.max_subscriptions = 2;
        c.limits.max_unauthenticated = 2;
    })
    .await;
    let t = token(
        "limited",
        "gateway.read:amq.topic/# gateway.write:amq.topic/#",
    );
    let connect_as = |level: u8| connect(b"MQTT", level, 0, &unique("lim"), Some(&t));
    let mut first = open(&gw).await;
    first.write_all(&connect_as(5)).await.unwrap();
    assert_eq!(connack_code(&mut first).await, 0);
    let mut second = open(&gw).await;
    second.write_all(&connect_as(4)).await.unwrap();
    assert_eq!(connack_code(&mut second).await, 0);
    for (level, code) in [(5u8, 0x97u8), (4, 3)] {
        let mut third = open(&gw).await;
        third.write_all(&connect_as(level)).await.unwrap();
        assert_eq!(connack_code(&mut third).await, code, "level {level}");
    }

    // Two filters allowed; a third is refused, one already held may be subscribed again.
    let mut body = 1u16.to_be_bytes().to_vec();
    body.push(0);
    for f in ["a/1", "a/2", "a/3"] {
        body.extend(string(f.as_bytes()));
        body.push(1);
    }
    first.write_all(&packet(0x82, body)).await.unwrap();
    let (kind, body) = read_packet(&mut first).await;
    assert_eq!((kind, &body[3..]), (0x90, &[1u8, 1, 0x97][..]), "SUBACK");
    first
        .write_all(&subscribe_packet(2, "a/1", 0, true, None))
        .await
        .unwrap();
    let (kind, body) = read_packet(&mut first).await;
    assert_eq!(
        (kind, &body[3..]),
        (0x90, &[0u8][..]),
        "a held filter again"
    );

    // The place comes back when a connection ends.
    first.write_all(&[0xE0, 0]).await.unwrap();
    until_closed(&mut first).await;
    common::eventually("a place for the subject again", || async {
        let mut s = open(&gw).await;
        s.write_all(&connect_as(5)).await.unwrap();
        connack_code(&mut s).await == 0
    })
    .await;

    // Before CONNECT: two connections may wait; a third is closed at once.
    let _waiting = [open(&gw).await, open(&gw).await];
    let mut third = open(&gw).await;
    assert!(
        until_closed(&mut third).await.is_empty(),
        "closed without a word"
    );
}

/// QoS 0 may be dropped, so a session's QoS 0 queue is bounded like the outbound buffer
/// (`limits.outbound_buffer_messages`), oldest first: a subscriber that is away or behind never
/// grows the engine's memory, the drops are counted, and the newest messages are kept.
#[tokio::test]
async fn a_qos0_backlog_is_bounded_keeping_the_newest() {
    let gw = start_gateway(|c| c.limits.outbound_buffer_messages = 20).await;
    let t = token("raw", "gateway.write:amq.topic/# gateway.read:amq.topic/#");
    let client = unique("q0bound");
    let topic = unique("q0bound");
    let mut s = open(&gw).await;
    s.write_all(&connect_persistent(4, &client, &t, 0))
        .await
        .unwrap();
    connack(&mut s).await;
    s.write_all(&subscribe_packet(1, &topic, 0, false, None))
        .await
        .unwrap();
    assert_eq!(read_packet(&mut s).await.0, 0x90);
    s.write_all(&[0xE0, 0]).await.unwrap();
    until_closed(&mut s).await;

    let dropped = |m: &str| {
        m.lines()
            .find(|l| l.starts_with("gateway_engine_dropped_total{reason=\"maxlen\"}"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let before = dropped(&gw.metrics_text().await);
    for i in 0..50 {
        let r = gw
            .post("/v1/exchanges/amq.topic/publish", &common::admin())
            .json(&serde_json::json!({"routing_key": topic, "body": i.to_string()}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let queue = amqp_gateway::protocol::mqtt::topic::session_queue("raw", &client, "qos0");
    assert_eq!(
        gw.depth(&queue).await,
        20,
        "bounded at outbound_buffer_messages"
    );
    // Other tests in this binary may drop too: at least these 30.
    assert!(dropped(&gw.metrics_text().await) - before >= 30);

    let mut s = open(&gw).await;
    s.write_all(&connect_persistent(4, &client, &t, 0))
        .await
        .unwrap();
    assert!(connack(&mut s).await.0, "session present");
    for i in 30..50 {
        let (first, body) = read_packet(&mut s).await;
        let (qos, got, _, _) = parse_publish(first, &body, false);
        assert_eq!((qos, got.as_str()), (0, topic.as_str()));
        let payload = &body[2 + topic.len()..];
        assert_eq!(payload, i.to_string().as_bytes(), "the newest 20, in order");
    }
}
