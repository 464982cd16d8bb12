//! Inbound QoS 1/2 publishes are pipelined: the connection reads on while the engine's
//! confirms are outstanding, and the acknowledgements go out in the order the publishes came
//! — answers known at once (a refusal) wait their turn behind earlier confirms. Raw bytes over
//! TCP and over WebSocket, MQTT 3.1.1 and 5, on an engine that holds every confirm until the
//! test lets it go.

mod common;

use std::time::Duration;

use common::held_confirms::HeldConfirms;
use common::mqtt_bytes::{connect, packet, string};
use common::mqtt_wire::{RawWire, Transport, over_both_transports};
use common::{TestGateway, WAIT, start_gateway_on, token, unique};

/// A QoS 1 or 2 PUBLISH with `packet_id`.
fn publish(topic: &str, qos: u8, packet_id: u16, v5: bool) -> Vec<u8> {
    let mut body = string(topic.as_bytes());
    body.extend_from_slice(&packet_id.to_be_bytes());
    if v5 {
        body.push(0);
    }
    body.extend_from_slice(b"payload");
    packet(0x30 | (qos << 1), body)
}

async fn connected(gw: &TestGateway, t: Transport, level: u8) -> RawWire {
    let mut wire = RawWire::open(gw, t).await;
    let token = token("pipe", "gateway.write:amq.topic/allowed.#");
    wire.send_raw(&connect(b"MQTT", level, 0, &unique("pipe"), Some(&token)))
        .await;
    let (kind, body) = wire.packet().await.expect("CONNACK");
    assert_eq!(kind, 0x20, "CONNACK");
    assert_eq!(body[1], 0, "accepted");
    wire
}

/// A PUBACK/PUBREC as (type, packet id, reason code).
async fn read_ack(wire: &mut RawWire) -> (u8, u16, u8) {
    let (kind, body) = wire.packet().await.expect("an ack");
    let id = u16::from_be_bytes([body[0], body[1]]);
    (kind & 0xF0, id, body.get(2).copied().unwrap_or(0))
}

async fn published_reaches(engine: &HeldConfirms, n: usize) {
    let mut seen = engine.published();
    tokio::time::timeout(WAIT, seen.wait_for(|p| *p >= n))
        .await
        .unwrap_or_else(|_| panic!("the engine did not get {n} publishes with confirms held"))
        .unwrap();
}

async fn nothing_for(wire: &mut RawWire, quiet: Duration) {
    assert!(wire.quiet_for(quiet).await, "nothing may arrive yet");
}

async fn pipelined(t: Transport, level: u8) {
    let engine = HeldConfirms::new();
    let gw = start_gateway_on(engine.clone(), |_| {}).await;
    let mut wire = connected(&gw, t, level).await;
    let burst: Vec<u8> = (1..=32u16)
        .flat_map(|id| publish("allowed/a", 1, id, level == 5))
        .collect();
    wire.send_raw(&burst).await;
    // All 32 reached the engine while not one confirm was given: the connection read on.
    published_reaches(&engine, 32).await;
    nothing_for(&mut wire, Duration::from_millis(100)).await;
    engine.release(32);
    for id in 1..=32u16 {
        assert_eq!(
            read_ack(&mut wire).await,
            (0x40, id, 0),
            "PUBACK {id} in order"
        );
    }
}

/// A refusal known at once does not overtake the confirms before it.
async fn refusals_wait_their_turn(t: Transport) {
    let engine = HeldConfirms::new();
    let gw = start_gateway_on(engine.clone(), |_| {}).await;
    let mut wire = connected(&gw, t, 5).await;
    let mut burst = publish("allowed/a", 1, 1, true);
    burst.extend(publish("allowed/b", 2, 2, true));
    burst.extend(publish("forbidden/c", 1, 3, true));
    burst.extend(publish("allowed/d", 1, 4, true));
    wire.send_raw(&burst).await;
    published_reaches(&engine, 3).await;
    nothing_for(&mut wire, Duration::from_millis(100)).await;
    engine.release(1);
    assert_eq!(read_ack(&mut wire).await, (0x40, 1, 0));
    nothing_for(&mut wire, Duration::from_millis(50)).await;
    engine.release(2);
    assert_eq!(read_ack(&mut wire).await, (0x50, 2, 0), "PUBREC");
    assert_eq!(read_ack(&mut wire).await, (0x40, 3, 0x87), "not authorized");
    assert_eq!(read_ack(&mut wire).await, (0x40, 4, 0));
}

/// Publishes awaiting their confirm count against the Receive Maximum the CONNACK gave.
async fn receive_maximum_counts_publishes_awaiting_confirms(t: Transport) {
    let engine = HeldConfirms::new();
    let gw = start_gateway_on(engine.clone(), |c| c.mqtt.receive_maximum = 8).await;
    let mut wire = connected(&gw, t, 5).await;
    let burst: Vec<u8> = (1..=9u16)
        .flat_map(|id| publish("allowed/a", 1, id, true))
        .collect();
    wire.send_raw(&burst).await;
    let (kind, body) = wire.packet().await.expect("DISCONNECT");
    assert_eq!(
        (kind, body[0]),
        (0xE0, 0x93),
        "DISCONNECT receive maximum exceeded"
    );
    assert_eq!(
        *engine.published().borrow(),
        8,
        "the ninth was not published"
    );
}

/// A 3.1.1 client was never told a Receive Maximum (its window is its own: rumqttc's is 100),
/// so beyond it the gateway stops reading instead of disconnecting; the rest are read, published
/// and acknowledged, in order, as confirms come.
async fn a_v311_client_beyond_the_receive_maximum_is_slowed_not_closed(t: Transport) {
    let engine = HeldConfirms::new();
    let gw = start_gateway_on(engine.clone(), |c| c.mqtt.receive_maximum = 8).await;
    let mut wire = connected(&gw, t, 4).await;
    let burst: Vec<u8> = (1..=12u16)
        .flat_map(|id| publish("allowed/a", 1, id, false))
        .collect();
    wire.send_raw(&burst).await;
    published_reaches(&engine, 8).await;
    nothing_for(&mut wire, Duration::from_millis(200)).await;
    assert_eq!(
        *engine.published().borrow(),
        8,
        "reading stopped at the maximum"
    );
    engine.release(12);
    for id in 1..=12u16 {
        assert_eq!(
            read_ack(&mut wire).await,
            (0x40, id, 0),
            "PUBACK {id} in order"
        );
    }
}

async fn qos1_publishes_are_pipelined_v311(t: Transport) {
    pipelined(t, 4).await;
}

async fn qos1_publishes_are_pipelined_v5(t: Transport) {
    pipelined(t, 5).await;
}

over_both_transports!(
    qos1_publishes_are_pipelined_v311,
    qos1_publishes_are_pipelined_v5,
    refusals_wait_their_turn,
    receive_maximum_counts_publishes_awaiting_confirms,
    a_v311_client_beyond_the_receive_maximum_is_slowed_not_closed,
);
