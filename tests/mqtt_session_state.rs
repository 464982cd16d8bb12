//! A persistent session's state across its connections, as raw bytes over TCP: QoS 2
//! packet ids in both directions ([MQTT-4.4.0-1]) and MQTT 5 subscription options.

mod common;

use std::time::Duration;

use common::mqtt_bytes::{
    connack, connect_persistent, parse_publish, publish_qos, read_packet, subscribe_packet,
    until_closed,
};
use common::{TestGateway, start_gateway, token, unique};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

async fn open(gw: &TestGateway) -> TcpStream {
    TcpStream::connect(gw.gateway.addrs().mqtt).await.unwrap()
}

const SCOPES: &str = "gateway.write:amq.topic/# gateway.read:amq.topic/#";

/// `client` connected without clean session (expiry 600 s for MQTT 5): the socket and
/// Session Present.
async fn persistent(gw: &TestGateway, level: u8, client: &str) -> (TcpStream, bool) {
    let mut s = open(gw).await;
    let t = token("raw", SCOPES);
    s.write_all(&connect_persistent(level, client, &t, 600))
        .await
        .unwrap();
    let present = connack(&mut s).await.0;
    (s, present)
}

/// A new persistent session of `client` subscribed to `filter` at QoS 2.
async fn subscribed_qos2(gw: &TestGateway, level: u8, client: &str, filter: &str) -> TcpStream {
    let (mut s, present) = persistent(gw, level, client).await;
    assert!(!present, "no session yet");
    s.write_all(&subscribe_packet(1, filter, 2, level == 5, None))
        .await
        .unwrap();
    let (first, body) = read_packet(&mut s).await;
    assert_eq!(
        (first, body.last()),
        (0x90, Some(&2)),
        "SUBACK granting QoS 2"
    );
    s
}

/// `client`'s persistent session taken up again.
async fn resumed(gw: &TestGateway, level: u8, client: &str) -> TcpStream {
    let (s, present) = persistent(gw, level, client).await;
    assert!(present, "session present");
    s
}

/// PUBREC for outbound packet `id`, answered by PUBREL for it.
async fn pubrec(s: &mut TcpStream, id: u16) {
    let [hi, lo] = id.to_be_bytes();
    s.write_all(&[0x50, 2, hi, lo]).await.unwrap();
    let (first, body) = read_packet(s).await;
    assert_eq!((first, &body[..2]), (0x62, &[hi, lo][..]), "PUBREL");
}

async fn rest_publish(gw: &TestGateway, key: &str, qos: u8) {
    rest_publish_body(gw, key, qos, key).await
}

async fn rest_publish_body(gw: &TestGateway, key: &str, qos: u8, body: &str) {
    let r = gw
        .post("/v1/exchanges/amq.topic/publish", &common::admin())
        .json(&serde_json::json!({"routing_key": key, "body": body,
            "properties": {"delivery_mode": 2, "headers": {"x-mqtt-publish-qos": qos}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// QoS 2 packet-id state belongs to the session ([MQTT-4.4.0-1]): after a reconnect an inbound
/// message whose PUBREL was not yet received is not published a second time when resent, and
/// PUBREL goes out again, with its original packet id, for an outbound one not completed.
#[tokio::test]
async fn qos2_state_survives_a_reconnect() {
    let gw = start_gateway(|_| {}).await;
    for level in [4u8, 5] {
        let v5 = level == 5;
        let client = unique("q2r");
        let inbound = unique("in");
        let outbound = unique("out");
        let q = gw.queue("q2-resume").await;
        gw.bind(&q, "amq.topic", &inbound).await;

        let mut s = subscribed_qos2(&gw, level, &client, &outbound).await;
        // Inbound: PUBREC, then the connection drops before PUBREL.
        s.write_all(&publish_qos(&inbound, 2, 9, false, b"once", v5))
            .await
            .unwrap();
        let (first, body) = read_packet(&mut s).await;
        assert_eq!((first, &body[..2]), (0x50, &[0u8, 9][..]), "PUBREC");
        // Outbound: PUBREC from us, PUBREL from the gateway, then the drop before PUBCOMP.
        rest_publish(&gw, &outbound, 2).await;
        let (first, body) = read_packet(&mut s).await;
        let (qos, topic, out_id, _) = parse_publish(first, &body, v5);
        assert_eq!((qos, topic.as_str()), (2, outbound.as_str()));
        pubrec(&mut s, out_id).await;
        drop(s);

        let mut s = resumed(&gw, level, &client).await;
        let [hi, lo] = out_id.to_be_bytes();
        let (first, body) = read_packet(&mut s).await;
        assert_eq!(
            (first, &body[..2]),
            (0x62, &[hi, lo][..]),
            "PUBREL again with the original packet id"
        );
        s.write_all(&[0x70, 2, hi, lo]).await.unwrap();
        s.write_all(&publish_qos(&inbound, 2, 9, true, b"once", v5))
            .await
            .unwrap();
        let (first, body) = read_packet(&mut s).await;
        assert_eq!(
            (first, &body[..2]),
            (0x50, &[0u8, 9][..]),
            "PUBREC for the resend"
        );
        s.write_all(&[0x62, 2, 0, 9]).await.unwrap();
        let (first, body) = read_packet(&mut s).await;
        assert_eq!((first, &body[..2]), (0x70, &[0u8, 9][..]), "PUBCOMP");
        assert_eq!(gw.depth(&q).await, 1, "published once across the reconnect");
        // The outbound message was settled at PUBREC: it does not come again.
        s.write_all(&[0xC0, 0]).await.unwrap();
        assert_eq!(
            read_packet(&mut s).await.0,
            0xD0,
            "PINGRESP, no redelivery before it"
        );
    }
}

/// MQTT 5 subscription options are part of the session: after a reconnect the QoS 2 grant,
/// no-local and the subscription identifier still apply, the granted expiry is reported in
/// CONNACK and a resumed session keeps it.
#[tokio::test]
async fn v5_subscription_options_survive_a_reconnect() {
    let gw = start_gateway(|c| c.mqtt.max_session_expiry = Duration::from_secs(3600)).await;
    let t = token("raw", SCOPES);
    let client = unique("opts");
    let prefix = unique("opts");
    let granted = [0x11u8, 0, 0, 0x0E, 0x10]; // Session Expiry Interval 3600
    let mut s = open(&gw).await;
    s.write_all(&connect_persistent(5, &client, &t, u32::MAX))
        .await
        .unwrap();
    let (present, props) = connack(&mut s).await;
    assert!(!present);
    assert!(
        props.windows(5).any(|w| w == granted),
        "granted expiry in CONNACK: {props:x?}"
    );
    // QoS 2, no-local, subscription identifier 7.
    s.write_all(&subscribe_packet(
        1,
        &format!("{prefix}/#"),
        0x02 | 0x04,
        true,
        Some(7),
    ))
    .await
    .unwrap();
    let (first, body) = read_packet(&mut s).await;
    assert_eq!((first, body.last()), (0x90, Some(&2)));
    s.write_all(&[0xE0, 0]).await.unwrap();
    until_closed(&mut s).await;

    let mut s = open(&gw).await;
    s.write_all(&connect_persistent(5, &client, &t, 10))
        .await
        .unwrap();
    let (present, props) = connack(&mut s).await;
    assert!(present, "session present");
    assert!(
        props.windows(5).any(|w| w == granted),
        "a resumed session keeps its interval: {props:x?}"
    );
    // No-local: our own publish is not delivered back (it would come before the REST one).
    s.write_all(&publish_qos(
        &format!("{prefix}/own"),
        1,
        1,
        false,
        b"own",
        true,
    ))
    .await
    .unwrap();
    assert_eq!(read_packet(&mut s).await.0, 0x40, "PUBACK");
    rest_publish(&gw, &format!("{prefix}.rest"), 2).await;
    let (first, body) = read_packet(&mut s).await;
    let (qos, topic, _, props) = parse_publish(first, &body, true);
    assert_eq!(topic, format!("{prefix}/rest"), "own publish suppressed");
    assert_eq!(qos, 2, "the QoS 2 grant survived");
    assert!(
        props.windows(2).any(|w| w == [0x0B, 7]),
        "subscription identifier 7: {props:x?}"
    );
}

/// A QoS 2 PUBLISH whose PUBREC the gateway never got goes again after a reconnect with DUP=1
/// and its original packet id ([MQTT-4.4.0-1]): the client may hold it under that id, and
/// under a new one its exactly-once state would take it for a second message. A QoS 1
/// delivery first puts the ids past 1, where a new connection's own ids start.
#[tokio::test]
async fn unreceived_qos2_publishes_go_again_under_their_ids() {
    let gw = start_gateway(|_| {}).await;
    for level in [4u8, 5] {
        let v5 = level == 5;
        let client = unique("q2id");
        let topic = unique("q2id");
        let mut s = subscribed_qos2(&gw, level, &client, &topic).await;
        rest_publish(&gw, &topic, 1).await;
        let (first, body) = read_packet(&mut s).await;
        let (qos, _, id, _) = parse_publish(first, &body, v5);
        assert_eq!(qos, 1);
        let [hi, lo] = id.to_be_bytes();
        s.write_all(&[0x40, 2, hi, lo]).await.unwrap();
        rest_publish_body(&gw, &topic, 2, "first").await;
        rest_publish_body(&gw, &topic, 2, "second").await;
        let mut sent = Vec::new();
        for payload in ["first", "second"] {
            let (first, body) = read_packet(&mut s).await;
            assert_eq!(first, 0x34, "QoS 2, DUP=0");
            let (_, _, id, _) = parse_publish(first, &body, v5);
            assert!(body.ends_with(payload.as_bytes()), "{payload}: {body:?}");
            sent.push(id);
        }
        assert!(
            !sent.contains(&1),
            "ids past a new connection's first: {sent:?}"
        );
        // Gone without a PUBREC: the client may have had them or not.
        drop(s);

        let mut s = resumed(&gw, level, &client).await;
        for (payload, id) in ["first", "second"].into_iter().zip(&sent) {
            let (first, body) = read_packet(&mut s).await;
            assert_eq!(first, 0x3C, "{payload} again: QoS 2, DUP=1");
            let (_, _, again, _) = parse_publish(first, &body, v5);
            assert!(body.ends_with(payload.as_bytes()), "{payload}: {body:?}");
            assert_eq!(again, *id, "{payload} under its original packet id");
        }
        for id in &sent {
            pubrec(&mut s, *id).await;
            let [hi, lo] = id.to_be_bytes();
            s.write_all(&[0x70, 2, hi, lo]).await.unwrap();
        }
        // Settled at PUBREC: nothing comes again, and a new message is not a resend.
        rest_publish_body(&gw, &topic, 2, "third").await;
        let (first, body) = read_packet(&mut s).await;
        assert_eq!(first, 0x34, "a new message: QoS 2, DUP=0");
        assert!(body.ends_with(b"third"), "{body:?}");
    }
}

/// A PUBACK for a QoS 2 delivery's packet id is not its acknowledgement: the PUBREC after it
/// still gets PUBREL (it used to free the id, and the PUBREC then got nothing).
#[tokio::test]
async fn a_puback_for_a_qos2_id_changes_nothing() {
    let gw = start_gateway(|_| {}).await;
    let topic = unique("q2ack");
    let mut s = subscribed_qos2(&gw, 4, &unique("q2ack"), &topic).await;
    rest_publish(&gw, &topic, 2).await;
    let (first, body) = read_packet(&mut s).await;
    let (qos, _, id, _) = parse_publish(first, &body, false);
    assert_eq!(qos, 2);
    let [hi, lo] = id.to_be_bytes();
    s.write_all(&[0x40, 2, hi, lo]).await.unwrap();
    pubrec(&mut s, id).await;
}
