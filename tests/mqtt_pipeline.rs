//! Inbound QoS 1/2 publishes are pipelined: the connection reads on while the engine's
//! confirms are outstanding, and the acknowledgements go out in the order the publishes came
//! — answers known at once (a refusal) wait their turn behind earlier confirms. Raw bytes over
//! TCP, on an engine that holds every confirm until the test lets it go.

mod common;

use std::time::Duration;

use common::held_confirms::HeldConfirms;
use common::mqtt_bytes::{connect, packet, string};
use common::{TestGateway, WAIT, start_gateway_on, token, unique};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

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

async fn connected(gw: &TestGateway, level: u8) -> TcpStream {
    let mut s = TcpStream::connect(gw.gateway.addrs().mqtt).await.unwrap();
    let t = token("pipe", "gateway.write:amq.topic/allowed.#");
    s.write_all(&connect(b"MQTT", level, 0, &unique("pipe"), Some(&t)))
        .await
        .unwrap();
    let (kind, body) = read_packet(&mut s).await;
    assert_eq!(kind, 0x20, "CONNACK");
    assert_eq!(body[1], 0, "accepted");
    s
}

async fn read_packet(s: &mut TcpStream) -> (u8, Vec<u8>) {
    let read = async {
        let first = s.read_u8().await?;
        let (mut len, mut shift) = (0usize, 0);
        loop {
            let b = s.read_u8().await?;
            len |= usize::from(b & 0x7f) << shift;
            shift += 7;
            if b & 0x80 == 0 {
                break;
            }
        }
        let mut body = vec![0u8; len];
        s.read_exact(&mut body).await?;
        Ok::<_, std::io::Error>((first, body))
    };
    match tokio::time::timeout(WAIT, read).await {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => panic!("connection failed while a packet was expected: {e}"),
        Err(_) => panic!("no packet within {WAIT:?}"),
    }
}

/// A PUBACK/PUBREC as (type, packet id, reason code).
async fn read_ack(s: &mut TcpStream) -> (u8, u16, u8) {
    let (kind, body) = read_packet(s).await;
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

async fn nothing_for(s: &mut TcpStream, quiet: Duration) {
    let mut b = [0u8; 1];
    if let Ok(got) = tokio::time::timeout(quiet, s.read(&mut b)).await {
        panic!("expected nothing yet, got {got:?} ({:#x})", b[0]);
    }
}

async fn pipelined(level: u8) {
    let engine = HeldConfirms::new();
    let gw = start_gateway_on(engine.clone(), |_| {}).await;
    let mut s = connected(&gw, level).await;
    let burst: Vec<u8> = (1..=32u16)
        .flat_map(|id| publish("allowed/a", 1, id, level == 5))
        .collect();
    s.write_all(&burst).await.unwrap();
    // All 32 reached the engine while not one confirm was given: the connection read on.
    published_reaches(&engine, 32).await;
    nothing_for(&mut s, Duration::from_millis(100)).await;
    engine.release(32);
    for id in 1..=32u16 {
        assert_eq!(
            read_ack(&mut s).await,
            (0x40, id, 0),
            "PUBACK {id} in order"
        );
    }
}

#[tokio::test]
async fn qos1_publishes_are_pipelined_v311() {
    pipelined(4).await;
}

#[tokio::test]
async fn qos1_publishes_are_pipelined_v5() {
    pipelined(5).await;
}

/// A refusal known at once does not overtake the confirms before it.
#[tokio::test]
async fn refusals_wait_their_turn() {
    let engine = HeldConfirms::new();
    let gw = start_gateway_on(engine.clone(), |_| {}).await;
    let mut s = connected(&gw, 5).await;
    let mut burst = publish("allowed/a", 1, 1, true);
    burst.extend(publish("allowed/b", 2, 2, true));
    burst.extend(publish("forbidden/c", 1, 3, true));
    burst.extend(publish("allowed/d", 1, 4, true));
    s.write_all(&burst).await.unwrap();
    published_reaches(&engine, 3).await;
    nothing_for(&mut s, Duration::from_millis(100)).await;
    engine.release(1);
    assert_eq!(read_ack(&mut s).await, (0x40, 1, 0));
    nothing_for(&mut s, Duration::from_millis(50)).await;
    engine.release(2);
    assert_eq!(read_ack(&mut s).await, (0x50, 2, 0), "PUBREC");
    assert_eq!(read_ack(&mut s).await, (0x40, 3, 0x87), "not authorized");
    assert_eq!(read_ack(&mut s).await, (0x40, 4, 0));
}

/// Publishes awaiting their confirm count against the Receive Maximum the CONNACK gave.
#[tokio::test]
async fn receive_maximum_counts_publishes_awaiting_confirms() {
    let engine = HeldConfirms::new();
    let gw = start_gateway_on(engine.clone(), |c| c.mqtt.receive_maximum = 8).await;
    let mut s = connected(&gw, 5).await;
    let burst: Vec<u8> = (1..=9u16)
        .flat_map(|id| publish("allowed/a", 1, id, true))
        .collect();
    s.write_all(&burst).await.unwrap();
    let (kind, body) = read_packet(&mut s).await;
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
