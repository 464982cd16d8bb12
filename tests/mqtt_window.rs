//! The client's window (Receive Maximum, or the gateway's `mqtt.max_inflight`, the lower) holds
//! for every QoS 1/2 delivery ([MQTT-4.9.0-2]):
//! - retained messages sent for a new subscription wait for it like any other delivery, and one
//!   not yet acknowledged stays with a persistent session;
//! - retained QoS 0 messages past the QoS 0 buffer wait for it to drain, not dropped;
//! - a QoS 2 delivery counts until PUBCOMP, not only until PUBREC.
//!
//! Raw bytes, over TCP and over WebSocket, MQTT 3.1.1 and 5; the retained cases on both
//! engines (upstream: RabbitMQ on 127.0.0.1:5672), QoS 2 on the embedded one (upstream grants
//! QoS 1 at most).

mod common;

use amqp_gateway::config::EngineKindConfig;
use common::mqtt_bytes::{packet, remaining_length, string, subscribe_packet};
use common::mqtt_wire::{RawWire, Transport, over_both_transports};
use common::rabbit::Vhost;
use common::{TestGateway, admin, start_gateway, unique};

/// The gateway's cap on unacknowledged deliveries in these tests.
const MAX_INFLIGHT: u16 = 5;

/// The engine under the gateway; upstream in a vhost of its own, deleted at the test's end.
#[derive(Clone, Copy)]
enum On {
    Embedded,
    Upstream,
}

async fn gateway_on(on: On) -> (TestGateway, Option<Vhost>) {
    gateway_with(on, |_| {}).await
}

/// [`gateway_on`], with `tweak` applied to the configuration too.
async fn gateway_with(
    on: On,
    tweak: impl FnOnce(&mut amqp_gateway::config::Config),
) -> (TestGateway, Option<Vhost>) {
    let vhost = match on {
        On::Embedded => None,
        On::Upstream => Some(Vhost::create().await),
    };
    let gw = start_gateway(|c| {
        tweak(c);
        c.mqtt.max_inflight = MAX_INFLIGHT;
        if let Some(vhost) = &vhost {
            c.engine.kind = EngineKindConfig::Upstream;
            c.engine.upstream.url = Some(vhost.amqp_url());
            c.engine.upstream.management_url = Some(vhost.management_url());
        }
    })
    .await;
    (gw, vhost)
}

async fn gateway() -> TestGateway {
    gateway_on(On::Embedded).await.0
}

/// Retains `count` QoS 1 messages under `{prefix}.rNN` (payload `NN`), straight into the store.
async fn retain(gw: &TestGateway, prefix: &str, count: usize) {
    let store = gw.gateway.engine().retained();
    for i in 0..count {
        // Persistent and no publish-QoS header: published at QoS 1.
        let m = amqp_gateway::engine::Message::new(format!("{i:02}")).persistent();
        store.set(&format!("{prefix}.r{i:02}"), m).await.unwrap();
    }
}

/// A CONNECT of MQTT `level` with the admin token as password; `clean` as asked, and for MQTT
/// 5 a Receive Maximum when given (and a Session Expiry Interval for a session that is kept).
fn connect_packet(level: u8, client: &str, clean: bool, receive_max: Option<u16>) -> Vec<u8> {
    let mut body = string(b"MQTT");
    body.push(level);
    body.push(0xC0 | if clean { 0x02 } else { 0 });
    body.extend_from_slice(&60u16.to_be_bytes());
    if level == 5 {
        let mut props = Vec::new();
        if let Some(max) = receive_max {
            props.push(0x21);
            props.extend_from_slice(&max.to_be_bytes());
        }
        if !clean {
            props.push(0x11);
            props.extend_from_slice(&3600u32.to_be_bytes());
        }
        body.extend(remaining_length(props.len()));
        body.extend(props);
    }
    body.extend(string(client.as_bytes()));
    body.extend(string(b"u"));
    body.extend(string(admin().as_bytes()));
    packet(0x10, body)
}

async fn connected(
    gw: &TestGateway,
    t: Transport,
    level: u8,
    client: &str,
    clean: bool,
    receive_max: Option<u16>,
) -> RawWire {
    let mut wire = RawWire::open(gw, t).await;
    wire.send_raw(&connect_packet(level, client, clean, receive_max))
        .await;
    let (first, body) = wire.packet().await.expect("CONNACK");
    assert_eq!((first, body[1]), (0x20, 0), "connected");
    wire
}

/// A retained QoS 1 PUBLISH as it arrived: DUP, topic, packet id, payload, and for MQTT 5 its
/// properties.
struct Retained {
    dup: bool,
    topic: String,
    packet_id: u16,
    payload: Vec<u8>,
    props: Vec<u8>,
}

/// The next packet, which must be a QoS 1 PUBLISH with RETAIN (DUP either way).
async fn next_retained(wire: &mut RawWire, v5: bool) -> Retained {
    let (first, body) = wire.packet().await.expect("a retained PUBLISH");
    assert_eq!(
        first & !0x08,
        0x33,
        "a QoS 1 PUBLISH with RETAIN: {first:#x}"
    );
    let topic_len = usize::from(u16::from_be_bytes([body[0], body[1]]));
    let topic = String::from_utf8(body[2..2 + topic_len].to_vec()).unwrap();
    let at = 2 + topic_len;
    let packet_id = u16::from_be_bytes([body[at], body[at + 1]]);
    let mut at = at + 2;
    let mut props = Vec::new();
    if v5 {
        // Short in these tests: a one-byte length.
        let len = usize::from(body[at]);
        assert!(len < 0x80);
        props = body[at + 1..at + 1 + len].to_vec();
        at += 1 + len;
    }
    Retained {
        dup: first & 0x08 != 0,
        topic,
        packet_id,
        payload: body[at..].to_vec(),
        props,
    }
}

fn puback(packet_id: u16) -> Vec<u8> {
    packet(0x40, packet_id.to_be_bytes().to_vec())
}

/// PINGREQ, and the next packet must be its PINGRESP: nothing else was sent before it.
async fn nothing_more(wire: &mut RawWire, why: &str) {
    wire.send_raw(&[0xC0, 0]).await;
    let (first, _) = wire.packet().await.expect("PINGRESP");
    assert_eq!(first, 0xD0, "{why}");
}

async fn subscribed(wire: &mut RawWire, filter: &str, v5: bool) {
    wire.send_raw(&subscribe_packet(1, filter, 1, v5, v5.then_some(7)))
        .await;
    let (first, body) = wire.packet().await.expect("SUBACK");
    assert_eq!((first, *body.last().unwrap()), (0x90, 1), "granted QoS 1");
}

/// 20 retained messages, a window of `window`: that many arrive, then nothing until one is
/// acknowledged, then one for each acknowledgement, all 20 in key order, each once.
async fn retained_messages_wait_for_the_window(t: Transport, level: u8, on: On) {
    const COUNT: usize = 20;
    let (gw, _vhost) = gateway_on(on).await;
    let prefix = unique("win");
    retain(&gw, &prefix, COUNT).await;
    let v5 = level == 5;
    // MQTT 5 asks for fewer than the gateway's cap; 3.1.1 has the cap.
    let (receive_max, window) = if v5 { (Some(3), 3) } else { (None, 5) };
    let mut wire = connected(&gw, t, level, &unique("hoarder"), true, receive_max).await;
    subscribed(&mut wire, &format!("{prefix}/#"), v5).await;
    let mut unacked = std::collections::VecDeque::new();
    for _ in 0..window {
        unacked.push_back(next_retained(&mut wire, v5).await);
    }
    nothing_more(&mut wire, "no retained PUBLISH past the window").await;
    let mut received = Vec::new();
    while let Some(oldest) = unacked.pop_front() {
        wire.send_raw(&puback(oldest.packet_id)).await;
        received.push(oldest);
        if received.len() + unacked.len() < COUNT {
            unacked.push_back(next_retained(&mut wire, v5).await);
            nothing_more(&mut wire, "one PUBLISH for each PUBACK").await;
        }
    }
    nothing_more(&mut wire, "nothing past the 20").await;
    let topics: Vec<String> = received.iter().map(|r| r.topic.clone()).collect();
    let expected: Vec<String> = (0..COUNT).map(|i| format!("{prefix}/r{i:02}")).collect();
    assert_eq!(
        topics, expected,
        "every retained message once, in key order"
    );
    for (i, r) in received.iter().enumerate() {
        assert_eq!(r.payload, format!("{i:02}").into_bytes());
        if v5 {
            // Subscription Identifier 7: the subscription's, on every copy.
            assert!(r.props.windows(2).any(|p| p == [0x0B, 7]), "{:?}", r.props);
        }
    }
    let metrics = gw.metrics_text().await;
    assert!(!metrics.contains("reason=\"no_packet_id\""), "{metrics}");
    assert!(
        !metrics.contains("reason=\"retained_not_queued\""),
        "{metrics}"
    );
}

async fn retained_messages_wait_for_the_window_v311(t: Transport) {
    retained_messages_wait_for_the_window(t, 4, On::Embedded).await;
}

async fn upstream_retained_messages_wait_for_the_window_v311(t: Transport) {
    retained_messages_wait_for_the_window(t, 4, On::Upstream).await;
}

async fn retained_messages_wait_for_the_window_v5(t: Transport) {
    retained_messages_wait_for_the_window(t, 5, On::Embedded).await;
}

async fn upstream_retained_messages_wait_for_the_window_v5(t: Transport) {
    retained_messages_wait_for_the_window(t, 5, On::Upstream).await;
}

/// A persistent session that went with retained messages still to receive gets all of them
/// when it comes back: those sent and not acknowledged again, with DUP=1 ([MQTT-3.3.1-1]),
/// then the rest.
async fn retained_messages_stay_with_a_persistent_session(t: Transport, level: u8, on: On) {
    const COUNT: usize = 12;
    let (gw, _vhost) = gateway_on(on).await;
    let prefix = unique("kept");
    retain(&gw, &prefix, COUNT).await;
    let v5 = level == 5;
    let client = unique("away");
    let mut wire = connected(&gw, t, level, &client, false, None).await;
    subscribed(&mut wire, &format!("{prefix}/#"), v5).await;
    let mut first = Vec::new();
    for _ in 0..MAX_INFLIGHT {
        let r = next_retained(&mut wire, v5).await;
        assert!(!r.dup, "{} sent for the first time", r.topic);
        first.push(r.topic);
    }
    nothing_more(&mut wire, "no retained PUBLISH past the window").await;
    drop(wire);
    let mut wire = connected(&gw, t, level, &client, false, None).await;
    let mut topics = std::collections::BTreeSet::new();
    for _ in 0..COUNT {
        let r = next_retained(&mut wire, v5).await;
        wire.send_raw(&puback(r.packet_id)).await;
        assert_eq!(r.dup, first.contains(&r.topic), "DUP of {}", r.topic);
        assert!(topics.insert(r.topic.clone()), "{} twice", r.topic);
    }
    nothing_more(&mut wire, "nothing past the 12").await;
    let expected: std::collections::BTreeSet<String> =
        (0..COUNT).map(|i| format!("{prefix}/r{i:02}")).collect();
    assert_eq!(topics, expected);
}

async fn retained_messages_stay_with_a_persistent_session_v311(t: Transport) {
    retained_messages_stay_with_a_persistent_session(t, 4, On::Embedded).await;
}

async fn upstream_retained_messages_stay_with_a_persistent_session_v311(t: Transport) {
    retained_messages_stay_with_a_persistent_session(t, 4, On::Upstream).await;
}

async fn retained_messages_stay_with_a_persistent_session_v5(t: Transport) {
    retained_messages_stay_with_a_persistent_session(t, 5, On::Embedded).await;
}

async fn upstream_retained_messages_stay_with_a_persistent_session_v5(t: Transport) {
    retained_messages_stay_with_a_persistent_session(t, 5, On::Upstream).await;
}

/// More retained QoS 0 messages than the QoS 0 buffer holds (10 here), for a subscription of
/// `sub_qos`: every one arrives once, with RETAIN, and none is counted dropped. (Those past the
/// buffer were dropped as for a slow consumer; a QoS 0 subscription now gets a queue for them.)
async fn retained_qos0_past_the_buffer(t: Transport, level: u8, on: On, sub_qos: u8) {
    const COUNT: usize = 60;
    let (gw, _vhost) = gateway_with(on, |c| c.limits.outbound_buffer_messages = 10).await;
    let prefix = unique("many");
    let store = gw.gateway.engine().retained();
    for i in 0..COUNT {
        // Not persistent, no publish-QoS header: published at QoS 0.
        let m = amqp_gateway::engine::Message::new(format!("{i:02}"));
        store.set(&format!("{prefix}.r{i:02}"), m).await.unwrap();
    }
    let v5 = level == 5;
    let mut wire = connected(&gw, t, level, &unique("board"), true, None).await;
    let filter = format!("{prefix}/#");
    wire.send_raw(&subscribe_packet(1, &filter, sub_qos, v5, None))
        .await;
    let (first, body) = wire.packet().await.expect("SUBACK");
    assert_eq!((first, *body.last().unwrap()), (0x90, sub_qos), "granted");
    let mut topics = std::collections::BTreeSet::new();
    for _ in 0..COUNT {
        let (first, body) = wire.packet().await.expect("a retained PUBLISH");
        assert_eq!(first, 0x31, "a QoS 0 PUBLISH with RETAIN: {first:#x}");
        let topic_len = usize::from(u16::from_be_bytes([body[0], body[1]]));
        let topic = String::from_utf8(body[2..2 + topic_len].to_vec()).unwrap();
        assert!(topics.insert(topic.clone()), "{topic} twice");
    }
    nothing_more(&mut wire, "nothing past the 60").await;
    let expected: std::collections::BTreeSet<String> =
        (0..COUNT).map(|i| format!("{prefix}/r{i:02}")).collect();
    assert_eq!(topics, expected);
    let metrics = gw.metrics_text().await;
    let dropped = r#"gateway_deliveries_dropped_total{protocol="mqtt",reason="slow_consumer"} 0"#;
    assert!(metrics.contains(dropped), "{metrics}");
}

async fn retained_qos0_past_the_buffer_v311(t: Transport) {
    retained_qos0_past_the_buffer(t, 4, On::Embedded, 0).await;
}

async fn retained_qos0_past_the_buffer_v5(t: Transport) {
    retained_qos0_past_the_buffer(t, 5, On::Embedded, 0).await;
}

async fn retained_qos0_past_the_buffer_for_qos1_v311(t: Transport) {
    retained_qos0_past_the_buffer(t, 4, On::Embedded, 1).await;
}

async fn upstream_retained_qos0_past_the_buffer_v5(t: Transport) {
    retained_qos0_past_the_buffer(t, 5, On::Upstream, 0).await;
}

/// Publishes `count` QoS 2 messages to `topic` on a connection of its own, each through
/// PUBREC, PUBREL and PUBCOMP; payloads `m0`, `m1`, ….
async fn publish_qos2(gw: &TestGateway, t: Transport, level: u8, topic: &str, count: u16) {
    let v5 = level == 5;
    let mut publisher = connected(gw, t, level, &unique("pub2"), true, None).await;
    for id in 1..=count {
        let mut body = string(topic.as_bytes());
        body.extend_from_slice(&id.to_be_bytes());
        if v5 {
            body.push(0);
        }
        body.extend_from_slice(format!("m{}", id - 1).as_bytes());
        publisher.send_raw(&packet(0x34, body)).await;
        let (first, _) = publisher.packet().await.expect("PUBREC");
        assert_eq!(first, 0x50, "PUBREC");
        publisher
            .send_raw(&packet(0x62, id.to_be_bytes().to_vec()))
            .await;
        let (first, _) = publisher.packet().await.expect("PUBCOMP");
        assert_eq!(first, 0x70, "PUBCOMP");
    }
}

/// The next packet, which must be a QoS 2 PUBLISH: (packet id, payload).
async fn next_qos2(wire: &mut RawWire, v5: bool) -> (u16, Vec<u8>) {
    let (first, body) = wire.packet().await.expect("a QoS 2 PUBLISH");
    assert_eq!(first & !0x08, 0x34, "a QoS 2 PUBLISH: {first:#x}");
    let topic_len = usize::from(u16::from_be_bytes([body[0], body[1]]));
    let at = 2 + topic_len;
    let id = u16::from_be_bytes([body[at], body[at + 1]]);
    let at = at + 2 + usize::from(v5) * (1 + usize::from(*body.get(at + 2).unwrap_or(&0)));
    (id, body[at..].to_vec())
}

/// PUBREC for `id`; the gateway's PUBREL must follow.
async fn received(wire: &mut RawWire, id: u16) {
    wire.send_raw(&packet(0x50, id.to_be_bytes().to_vec()))
        .await;
    let (first, body) = wire.packet().await.expect("PUBREL");
    assert_eq!((first, &body[..2]), (0x62, &id.to_be_bytes()[..]), "PUBREL");
}

/// A subscriber with a window of `window` that answers PUBREC and holds its PUBCOMPs gets
/// `window` QoS 2 messages and no more, though the engine has them settled; each PUBCOMP lets
/// one more through. Every message arrives once, in order.
async fn qos2_counts_against_the_window_until_pubcomp(t: Transport, level: u8) {
    const COUNT: u16 = 8;
    let gw = gateway().await;
    let v5 = level == 5;
    let (receive_max, window) = if v5 { (Some(3), 3) } else { (None, 5) };
    let topic = unique("exactly");
    let mut sub = connected(&gw, t, level, &unique("keeper"), true, receive_max).await;
    sub.send_raw(&subscribe_packet(1, &topic, 2, v5, None))
        .await;
    let (first, body) = sub.packet().await.expect("SUBACK");
    assert_eq!((first, *body.last().unwrap()), (0x90, 2), "granted QoS 2");
    publish_qos2(&gw, t, level, &topic, COUNT).await;
    let mut held = std::collections::VecDeque::new();
    let mut payloads = Vec::new();
    for _ in 0..window {
        let (id, payload) = next_qos2(&mut sub, v5).await;
        held.push_back(id);
        payloads.push(payload);
    }
    // The engine's credit is free once these are settled; the window is not.
    for id in &held {
        received(&mut sub, *id).await;
    }
    nothing_more(
        &mut sub,
        "no QoS 2 PUBLISH while the window waits for PUBCOMPs",
    )
    .await;
    while let Some(id) = held.pop_front() {
        sub.send_raw(&packet(0x70, id.to_be_bytes().to_vec())).await;
        if payloads.len() < usize::from(COUNT) {
            let (id, payload) = next_qos2(&mut sub, v5).await;
            received(&mut sub, id).await;
            held.push_back(id);
            payloads.push(payload);
            nothing_more(&mut sub, "one PUBLISH for each PUBCOMP").await;
        }
    }
    nothing_more(&mut sub, "nothing past the last").await;
    let expected: Vec<Vec<u8>> = (0..COUNT).map(|i| format!("m{i}").into_bytes()).collect();
    assert_eq!(payloads, expected, "every message once, in order");
}

async fn qos2_counts_against_the_window_until_pubcomp_v311(t: Transport) {
    qos2_counts_against_the_window_until_pubcomp(t, 4).await;
}

async fn qos2_counts_against_the_window_until_pubcomp_v5(t: Transport) {
    qos2_counts_against_the_window_until_pubcomp(t, 5).await;
}

over_both_transports!(
    retained_qos0_past_the_buffer_v311,
    retained_qos0_past_the_buffer_v5,
    retained_qos0_past_the_buffer_for_qos1_v311,
    upstream_retained_qos0_past_the_buffer_v5,
    qos2_counts_against_the_window_until_pubcomp_v311,
    qos2_counts_against_the_window_until_pubcomp_v5,
    retained_messages_wait_for_the_window_v311,
    retained_messages_wait_for_the_window_v5,
    retained_messages_stay_with_a_persistent_session_v311,
    retained_messages_stay_with_a_persistent_session_v5,
    upstream_retained_messages_wait_for_the_window_v311,
    upstream_retained_messages_wait_for_the_window_v5,
    upstream_retained_messages_stay_with_a_persistent_session_v311,
    upstream_retained_messages_stay_with_a_persistent_session_v5,
);
