//! Publishes that one socket read brings are handed to the engine as one run
//! (`Channel::publish_run`): whatever the run, the subscriber hears every message once and in
//! order, the publisher's acknowledgements come in the order its publishes did, a refusal in
//! the middle is answered in its place, a SUBSCRIBE written after publishes does not hear
//! them, and publishes read before a malformed packet are kept. Raw bytes written at once,
//! over TCP and over WebSocket, MQTT 3.1.1 and 5, on the embedded engine.

mod common;

use common::mqtt_bytes::{packet, string, subscribe_packet};
use common::mqtt_wire::{RawWire, Transport, over_both_transports};
use common::{TestGateway, start_gateway, token, unique};

const SCOPE: &str = "gateway.write:amq.topic/allowed.# gateway.read:amq.topic/allowed.#";

/// A PUBLISH of `payload` at `qos` (`packet_id` used for QoS 1).
fn publish(topic: &str, qos: u8, packet_id: u16, payload: &[u8], v5: bool) -> Vec<u8> {
    let mut body = string(topic.as_bytes());
    if qos > 0 {
        body.extend_from_slice(&packet_id.to_be_bytes());
    }
    if v5 {
        body.push(0);
    }
    body.extend_from_slice(payload);
    packet(0x30 | (qos << 1), body)
}

async fn connected(gw: &TestGateway, t: Transport, level: u8) -> RawWire {
    RawWire::connected(gw, t, level, &unique("runs"), &token("runs", SCOPE)).await
}

/// Subscribes `wire` to `filter` at QoS 1 and waits for the SUBACK.
async fn subscribed(gw: &TestGateway, t: Transport, level: u8, filter: &str) -> RawWire {
    let mut wire = connected(gw, t, level).await;
    wire.send_raw(&subscribe_packet(1, filter, 1, level == 5, None))
        .await;
    let (kind, body) = wire.packet().await.expect("SUBACK");
    assert_eq!(kind, 0x90, "SUBACK");
    assert!(*body.last().expect("a reason code") < 0x80, "granted");
    wire
}

/// The payload of the next PUBLISH `wire` gets (a QoS 1 one acknowledged).
async fn next_payload(wire: &mut RawWire, v5: bool) -> Vec<u8> {
    loop {
        let (first, body) = wire.packet().await.expect("a PUBLISH");
        if first & 0xF0 != 0x30 {
            continue;
        }
        let topic_len = usize::from(u16::from_be_bytes([body[0], body[1]]));
        let mut at = 2 + topic_len;
        let qos = (first >> 1) & 3;
        if qos > 0 {
            let id = [body[at], body[at + 1]];
            wire.send_raw(&packet(0x40, id.to_vec())).await;
            at += 2;
        }
        if v5 {
            // The properties' length is one byte for what the gateway sends here.
            let (len, used) = varint(&body[at..]);
            at += used + len;
        }
        return body[at..].to_vec();
    }
}

fn varint(b: &[u8]) -> (usize, usize) {
    let mut n = 0usize;
    for (i, byte) in b.iter().enumerate().take(4) {
        n |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return (n, i + 1);
        }
    }
    panic!("a malformed variable byte integer");
}

/// A PUBACK as (packet id, reason code).
async fn puback(wire: &mut RawWire) -> (u16, u8) {
    let (kind, body) = wire.packet().await.expect("a PUBACK");
    assert_eq!(kind, 0x40, "PUBACK");
    (
        u16::from_be_bytes([body[0], body[1]]),
        body.get(2).copied().unwrap_or(0),
    )
}

/// 300 publishes in one write, QoS 0 and 1 mixed, with a change of topic part-way: all
/// arrive once, in order, and the PUBACKs come in order.
async fn a_burst_arrives_whole_and_in_order(t: Transport, level: u8) {
    let v5 = level == 5;
    let gw = start_gateway(|_| {}).await;
    let topic = format!("allowed/{}", unique("runs"));
    let mut sub = subscribed(&gw, t, level, &format!("{topic}/#")).await;
    let mut publisher = connected(&gw, t, level).await;
    let mut burst = Vec::new();
    let mut qos1 = Vec::new();
    for i in 0..300u16 {
        let qos = u8::from(i % 3 == 0);
        let id = i + 1;
        if qos == 1 {
            qos1.push(id);
        }
        let leaf = if i < 150 { "a" } else { "b" };
        burst.extend(publish(
            &format!("{topic}/{leaf}"),
            qos,
            id,
            format!("m{i}").as_bytes(),
            v5,
        ));
    }
    publisher.send_raw(&burst).await;
    for id in qos1 {
        assert_eq!(
            puback(&mut publisher).await,
            (id, 0),
            "PUBACK {id} in order"
        );
    }
    for i in 0..300 {
        assert_eq!(
            next_payload(&mut sub, v5).await,
            format!("m{i}").into_bytes(),
            "message {i} in order"
        );
    }
    assert!(
        sub.quiet_for(std::time::Duration::from_millis(100)).await,
        "nothing twice"
    );
}

async fn a_burst_arrives_whole_and_in_order_v311(t: Transport) {
    a_burst_arrives_whole_and_in_order(t, 4).await;
}

async fn a_burst_arrives_whole_and_in_order_v5(t: Transport) {
    a_burst_arrives_whole_and_in_order(t, 5).await;
}

/// A forbidden publish between allowed ones is refused in its place (0x87), and the ones
/// after it still go through.
async fn a_refusal_in_a_burst_is_answered_in_its_place(t: Transport) {
    let gw = start_gateway(|_| {}).await;
    let topic = format!("allowed/{}", unique("refusal"));
    let mut sub = subscribed(&gw, t, 5, &topic).await;
    let mut publisher = connected(&gw, t, 5).await;
    let mut burst = Vec::new();
    for id in 1..=21u16 {
        let to = if id == 11 { "forbidden/x" } else { &topic };
        burst.extend(publish(to, 1, id, format!("m{id}").as_bytes(), true));
    }
    publisher.send_raw(&burst).await;
    for id in 1..=21u16 {
        let code = if id == 11 { 0x87 } else { 0 };
        assert_eq!(puback(&mut publisher).await, (id, code), "PUBACK {id}");
    }
    for id in (1..=21u16).filter(|&id| id != 11) {
        assert_eq!(
            next_payload(&mut sub, true).await,
            format!("m{id}").into_bytes()
        );
    }
}

/// PUBLISH ×5, SUBSCRIBE, PUBLISH ×5 in one write: the subscription hears only the last five,
/// as it would if each packet came alone.
async fn a_subscribe_after_publishes_does_not_hear_them(t: Transport, level: u8) {
    let v5 = level == 5;
    let gw = start_gateway(|_| {}).await;
    let topic = format!("allowed/{}", unique("order"));
    let mut wire = connected(&gw, t, level).await;
    let mut bytes = Vec::new();
    for i in 0..5 {
        bytes.extend(publish(&topic, 0, 0, format!("before{i}").as_bytes(), v5));
    }
    bytes.extend(subscribe_packet(1, &topic, 0, v5, None));
    for i in 0..5 {
        bytes.extend(publish(&topic, 0, 0, format!("after{i}").as_bytes(), v5));
    }
    wire.send_raw(&bytes).await;
    let (kind, _) = wire.packet().await.expect("SUBACK");
    assert_eq!(kind, 0x90, "SUBACK first: nothing was delivered before it");
    for i in 0..5 {
        assert_eq!(
            next_payload(&mut wire, v5).await,
            format!("after{i}").into_bytes()
        );
    }
    assert!(
        wire.quiet_for(std::time::Duration::from_millis(100)).await,
        "the publishes before the SUBSCRIBE are not heard"
    );
}

async fn a_subscribe_after_publishes_does_not_hear_them_v311(t: Transport) {
    a_subscribe_after_publishes_does_not_hear_them(t, 4).await;
}

async fn a_subscribe_after_publishes_does_not_hear_them_v5(t: Transport) {
    a_subscribe_after_publishes_does_not_hear_them(t, 5).await;
}

/// Publishes read in the same write as a malformed packet are published before the
/// connection closes.
async fn publishes_before_a_malformed_packet_are_kept(t: Transport) {
    let gw = start_gateway(|_| {}).await;
    let topic = format!("allowed/{}", unique("kept"));
    let mut sub = subscribed(&gw, t, 4, &topic).await;
    let mut publisher = connected(&gw, t, 4).await;
    let mut bytes = Vec::new();
    for i in 0..20 {
        bytes.extend(publish(&topic, 0, 0, format!("m{i}").as_bytes(), false));
    }
    // A PUBLISH of QoS 3: malformed [MQTT-3.3.1-4].
    bytes.extend(packet(0x36, string(topic.as_bytes())));
    publisher.send_raw(&bytes).await;
    for i in 0..20 {
        assert_eq!(
            next_payload(&mut sub, false).await,
            format!("m{i}").into_bytes()
        );
    }
    assert!(
        publisher.packet().await.is_err(),
        "the connection is closed"
    );
}

over_both_transports!(
    a_burst_arrives_whole_and_in_order_v311,
    a_burst_arrives_whole_and_in_order_v5,
    a_refusal_in_a_burst_is_answered_in_its_place,
    a_subscribe_after_publishes_does_not_hear_them_v311,
    a_subscribe_after_publishes_does_not_hear_them_v5,
    publishes_before_a_malformed_packet_are_kept,
);
