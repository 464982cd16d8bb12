//! PUBACKs a client writes together are settled together (the connection takes the run of
//! them one read brought, and the engine settles it under one lock): each one still frees
//! its own place in the window, whatever stands between them — a PINGREQ, a PUBACK for an
//! id not in flight, the MQTT 5 form with its reason code. Raw bytes, over {TCP, WebSocket}
//! × {MQTT 3.1.1, 5}.

mod common;

use common::mqtt_bytes::{packet, publish_qos1, subscribe_packet};
use common::mqtt_wire::{RawWire, Transport};
use common::{TestGateway, start_gateway, token, unique};

/// Outbound QoS 1 messages in flight per client: the window each round fills.
const WINDOW: usize = 4;
const QUIET: std::time::Duration = std::time::Duration::from_millis(200);

fn puback(id: u16) -> Vec<u8> {
    packet(0x40, id.to_be_bytes().to_vec())
}

/// MQTT 5's PUBACK with its reason code (0, success) written out.
fn puback_with_reason(id: u16) -> Vec<u8> {
    let mut body = id.to_be_bytes().to_vec();
    body.push(0);
    packet(0x40, body)
}

const PINGREQ: [u8; 2] = [0xC0, 0x00];

async fn connected(gw: &TestGateway, t: Transport, level: u8) -> RawWire {
    let token = token(
        "runs",
        "gateway.write:amq.topic/runs.# gateway.read:amq.topic/runs.#",
    );
    RawWire::connected(gw, t, level, &unique("runs"), &token).await
}

/// The next `WINDOW` deliveries as (packet id, payload); a PINGRESP among them is counted.
async fn window(wire: &mut RawWire, v5: bool, pongs: &mut usize) -> Vec<(u16, Vec<u8>)> {
    let mut got = Vec::new();
    while got.len() < WINDOW {
        let (first, body) = wire.packet().await.expect("a delivery");
        if first == 0xD0 {
            *pongs += 1;
            continue;
        }
        assert_eq!(first & 0xF0, 0x30, "PUBLISH, got {first:#x}");
        let topic_len = usize::from(u16::from_be_bytes([body[0], body[1]]));
        let at = 2 + topic_len;
        let id = u16::from_be_bytes([body[at], body[at + 1]]);
        // MQTT 5: a property length (one byte here: these deliveries carry few) and them.
        let props = if v5 { 1 + usize::from(body[at + 2]) } else { 0 };
        got.push((id, body[at + 2 + props..].to_vec()));
    }
    got
}

/// Nothing but PINGRESPs (counted) arrives within [`QUIET`].
async fn only_pongs_for_a_while(wire: &mut RawWire, pongs: &mut usize) -> bool {
    loop {
        if wire.quiet_for(QUIET).await {
            return true;
        }
        match wire.packet().await {
            Ok((0xD0, _)) => *pongs += 1,
            _ => return false,
        }
    }
}

/// The plain PUBACKs of `deliveries`, one after another.
fn pubacks(deliveries: &[(u16, Vec<u8>)]) -> Vec<u8> {
    deliveries.iter().flat_map(|(id, _)| puback(*id)).collect()
}

/// The PUBACKs a round writes in one go, given the window it acknowledges and whether the
/// connection speaks MQTT 5.
type Acks = fn(&[(u16, Vec<u8>)], bool) -> Vec<u8>;

async fn runs(t: Transport, level: u8) {
    let gw = start_gateway(|c| c.mqtt.max_inflight = WINDOW as u16).await;
    let v5 = level == 5;
    let topic = format!("runs/{}", unique("t"));
    let mut sub = connected(&gw, t, level).await;
    sub.send_raw(&subscribe_packet(1, &topic, 1, v5, None))
        .await;
    let (first, _) = sub.packet().await.expect("SUBACK");
    assert_eq!(first, 0x90, "SUBACK");
    let mut publisher = connected(&gw, t, level).await;
    for i in 0..4 * WINDOW {
        publisher
            .send_raw(&publish_qos1(
                topic.as_bytes(),
                format!("m{i}").as_bytes(),
                v5,
            ))
            .await;
        assert_eq!(publisher.puback().await, Ok(0), "publish {i} accepted");
    }

    let mut pongs = 0;
    let mut payloads = Vec::new();
    let rounds: [Acks; 4] = [
        // The whole window's PUBACKs, then a PINGREQ, in one write.
        |w, _| {
            let mut run = pubacks(w);
            run.extend(PINGREQ);
            run
        },
        // A PUBACK for an id not in flight first.
        |w, _| {
            let stray = w.iter().map(|(id, _)| *id).max().unwrap_or(0) + 1000;
            let mut run = puback(stray);
            run.extend(pubacks(w));
            run
        },
        // A PINGREQ in the middle of the run.
        |w, _| {
            let mut run = pubacks(&w[..2]);
            run.extend(PINGREQ);
            run.extend(pubacks(&w[2..]));
            run
        },
        // MQTT 5's form with the reason code written (3.1.1: the plain form again).
        |w, v5| match v5 {
            true => w
                .iter()
                .flat_map(|(id, _)| puback_with_reason(*id))
                .collect(),
            false => pubacks(w),
        },
    ];
    for (round, acks) in rounds.iter().enumerate() {
        let w = window(&mut sub, v5, &mut pongs).await;
        assert!(
            only_pongs_for_a_while(&mut sub, &mut pongs).await,
            "round {round}: nothing past the window while it is unacknowledged"
        );
        sub.send_raw(&acks(&w, v5)).await;
        payloads.extend(w.into_iter().map(|(_, p)| p));
    }
    // The PINGREQ of the third round is answered whatever came after it.
    while pongs < 2 {
        let (first, _) = sub.packet().await.expect("PINGRESP");
        assert_eq!(first, 0xD0, "only the PINGRESPs are left");
        pongs += 1;
    }
    let expected: Vec<Vec<u8>> = (0..4 * WINDOW)
        .map(|i| format!("m{i}").into_bytes())
        .collect();
    assert_eq!(payloads, expected, "every message once, in order");
    assert!(
        only_pongs_for_a_while(&mut sub, &mut pongs).await,
        "nothing redelivered"
    );
}

#[tokio::test]
async fn puback_runs_tcp_v311() {
    runs(Transport::Tcp, 4).await;
}

#[tokio::test]
async fn puback_runs_tcp_v5() {
    runs(Transport::Tcp, 5).await;
}

#[tokio::test]
async fn puback_runs_ws_v311() {
    runs(Transport::Ws, 4).await;
}

#[tokio::test]
async fn puback_runs_ws_v5() {
    runs(Transport::Ws, 5).await;
}
