//! MQTT 5 features over TCP with rumqttc's v5 client: publish properties ↔ AMQP properties in
//! both directions (user properties ↔ headers, content type, response topic ↔ reply_to,
//! correlation data ↔ correlation_id, message expiry ↔ expiration with the remaining time), and
//! inbound topic aliases.

mod common;

use bytes::Bytes;
use common::{WAIT, admin, start_gateway, token, unique};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, Publish, PublishProperties};
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use serde_json::json;
use tokio::sync::mpsc;

async fn client(port: u16, password: &str) -> (AsyncClient, mpsc::UnboundedReceiver<Packet>) {
    let mut o = MqttOptions::new(unique("v5"), "127.0.0.1", port);
    o.set_credentials("u", password);
    let (client, mut eventloop) = AsyncClient::new(o, 50);
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(ev) = eventloop.poll().await {
            if let Event::Incoming(p) = ev
                && tx.send(p).is_err()
            {
                return;
            }
        }
    });
    (client, rx)
}

async fn next_publish(rx: &mut mpsc::UnboundedReceiver<Packet>) -> Publish {
    loop {
        match tokio::time::timeout(WAIT, rx.recv())
            .await
            .expect("a PUBLISH in time")
        {
            Some(Packet::Publish(p)) => return p,
            Some(_) => continue,
            None => panic!("client ended"),
        }
    }
}

async fn until(
    rx: &mut mpsc::UnboundedReceiver<Packet>,
    what: &str,
    pick: impl Fn(&Packet) -> bool,
) {
    loop {
        match tokio::time::timeout(WAIT, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("no {what}"))
        {
            Some(p) if pick(&p) => return,
            Some(_) => continue,
            None => panic!("client ended before {what}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn properties_map_both_ways_and_aliases_resolve() {
    let gw = start_gateway(|_| {}).await;
    let port = gw.gateway.addrs().mqtt.port();
    let t = token(
        "v5dev",
        "gateway.read:amq.topic/rpc.# gateway.write:amq.topic/rpc.#",
    );
    let (c, mut rx) = client(port, &t).await;
    until(&mut rx, "CONNACK", |p| matches!(p, Packet::ConnAck(_))).await;

    // MQTT 5 → AMQP (seen through REST).
    let q = gw.queue("v5-in").await;
    gw.bind(&q, "amq.topic", "rpc.#").await;
    let props = PublishProperties {
        message_expiry_interval: Some(60),
        response_topic: Some("rpc/replies/v5dev".into()),
        correlation_data: Some(Bytes::from_static(b"req-7")),
        user_properties: vec![("trace".into(), "abc".into())],
        content_type: Some("application/json".into()),
        ..Default::default()
    };
    c.publish_with_properties("rpc/calc", QoS::AtLeastOnce, false, r#"{"x":1}"#, props)
        .await
        .unwrap();
    until(&mut rx, "PUBACK", |p| matches!(p, Packet::PubAck(_))).await;
    let got = gw.take(&q, 1).await;
    let p = &got[0]["properties"];
    assert_eq!(got[0]["body"], json!({"x": 1}), "content type carried over");
    assert_eq!(p["content_type"], "application/json");
    assert_eq!(p["reply_to"], "rpc.replies.v5dev");
    assert_eq!(p["correlation_id"], "req-7");
    assert_eq!(p["expiration"], "60000");
    assert_eq!(p["headers"]["trace"], "abc");

    // Topic alias: set with the first publish, used alone by the second.
    let aliased = PublishProperties {
        topic_alias: Some(3),
        ..Default::default()
    };
    c.publish_with_properties(
        "rpc/alias",
        QoS::AtLeastOnce,
        false,
        "first",
        aliased.clone(),
    )
    .await
    .unwrap();
    c.publish_with_properties("", QoS::AtLeastOnce, false, "second", aliased)
        .await
        .unwrap();
    common::eventually("both aliased publishes arrive", || async {
        gw.depth(&q).await == 2
    })
    .await;
    let got = gw.take(&q, 2).await;
    assert_eq!(
        (got[0]["routing_key"].clone(), got[1]["routing_key"].clone()),
        (json!("rpc.alias"), json!("rpc.alias"))
    );

    // AMQP (REST) → MQTT 5.
    c.subscribe("rpc/replies/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    until(&mut rx, "SUBACK", |p| matches!(p, Packet::SubAck(_))).await;
    let r = gw
        .post("/v1/exchanges/amq.topic/publish", &admin())
        .json(
            &json!({"routing_key": "rpc.replies.v5dev", "body": {"result": 2},
                       "properties": {"correlation_id": "req-7", "reply_to": "rpc.back",
                                      "expiration": "30000", "headers": {"trace": "abc", "n": 5}}}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let m = next_publish(&mut rx).await;
    assert_eq!(m.topic, Bytes::from_static(b"rpc/replies/v5dev"));
    let props = m.properties.expect("v5 properties");
    assert_eq!(props.content_type.as_deref(), Some("application/json"));
    assert_eq!(props.correlation_data.as_deref(), Some(&b"req-7"[..]));
    assert_eq!(props.response_topic.as_deref(), Some("rpc/back"));
    let left = props.message_expiry_interval.expect("remaining expiry");
    assert!((1..=30).contains(&left), "{left}");
    // AMQP headers in table order; numbers as text; the gateway's own headers never.
    assert_eq!(
        props.user_properties,
        vec![("n".into(), "5".into()), ("trace".into(), "abc".into())],
        "no x-gateway-sub, no x-mqtt-*"
    );
}

/// Subscription options: no-local, retain-as-published, retain handling and subscription
/// identifiers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_options() {
    use rumqttc::v5::mqttbytes::v5::{Filter, RetainForwardRule, SubscribeProperties};
    let gw = start_gateway(|_| {}).await;
    let port = gw.gateway.addrs().mqtt.port();
    let t = token(
        "opts",
        "gateway.read:amq.topic/o.# gateway.write:amq.topic/o.#",
    );
    let (c, mut rx) = client(port, &t).await;
    until(&mut rx, "CONNACK", |p| matches!(p, Packet::ConnAck(_))).await;

    // A retained message exists before the subscriptions.
    c.publish("o/r", QoS::AtLeastOnce, true, "kept")
        .await
        .unwrap();
    until(&mut rx, "PUBACK", |p| matches!(p, Packet::PubAck(_))).await;

    let filter = |path: &str, nolocal: bool, rap: bool, rule: RetainForwardRule| Filter {
        path: path.into(),
        qos: QoS::AtLeastOnce,
        nolocal,
        preserve_retain: rap,
        retain_forward_rule: rule,
    };
    // No-local, retained never sent, identifier 7.
    c.subscribe_many_with_properties(
        [filter("o/local/#", true, false, RetainForwardRule::Never)],
        SubscribeProperties {
            id: Some(7),
            user_properties: vec![],
        },
    )
    .await
    .unwrap();
    until(&mut rx, "SUBACK", |p| matches!(p, Packet::SubAck(_))).await;
    c.publish("o/local/x", QoS::AtLeastOnce, false, "mine")
        .await
        .unwrap();
    // Retain-as-published, retained sent, identifier 9.
    c.subscribe_many_with_properties(
        [filter(
            "o/r",
            false,
            true,
            RetainForwardRule::OnEverySubscribe,
        )],
        SubscribeProperties {
            id: Some(9),
            user_properties: vec![],
        },
    )
    .await
    .unwrap();
    let retained = next_publish(&mut rx).await;
    assert_eq!(
        (retained.topic.as_ref(), retained.retain),
        (&b"o/r"[..], true),
        "retained on subscribe"
    );
    // Another client publishes to o/local and, with RETAIN, to o/r.
    let (other, mut other_rx) = client(port, &t).await;
    until(&mut other_rx, "CONNACK", |p| {
        matches!(p, Packet::ConnAck(_))
    })
    .await;
    other
        .publish("o/local/x", QoS::AtLeastOnce, false, "theirs")
        .await
        .unwrap();
    other
        .publish("o/r", QoS::AtLeastOnce, true, "again")
        .await
        .unwrap();
    let m = next_publish(&mut rx).await;
    assert_eq!(
        m.payload.as_ref(),
        b"theirs",
        "our own o/local publish was suppressed (no-local)"
    );
    assert_eq!(
        m.properties.as_ref().unwrap().subscription_identifiers,
        vec![7]
    );
    let r = next_publish(&mut rx).await;
    assert_eq!(
        (r.payload.as_ref(), r.retain),
        (&b"again"[..], true),
        "retain-as-published keeps RETAIN"
    );
    assert_eq!(
        r.properties.as_ref().unwrap().subscription_identifiers,
        vec![9]
    );
    // A repeated subscription with OnNewSubscribe gets no retained copy.
    c.subscribe_many([filter(
        "o/r",
        false,
        true,
        RetainForwardRule::OnNewSubscribe,
    )])
    .await
    .unwrap();
    until(&mut rx, "SUBACK", |p| matches!(p, Packet::SubAck(_))).await;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert!(
        !matches!(rx.try_recv(), Ok(Packet::Publish(_))),
        "no retained copy for an existing subscription"
    );
}

/// Deliveries over the client's Maximum Packet Size are dropped and counted; an empty client
/// id gets an Assigned Client Identifier.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maximum_packet_size_and_assigned_client_id() {
    let gw = start_gateway(|_| {}).await;
    let port = gw.gateway.addrs().mqtt.port();
    let t = token("small", "gateway.read:amq.topic/sz.#");
    let mut o = MqttOptions::new("", "127.0.0.1", port);
    o.set_credentials("u", t);
    o.set_max_packet_size(Some(1024));
    let (c, mut eventloop) = AsyncClient::new(o, 10);
    let (tx, mut rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(ev) = eventloop.poll().await {
            if let Event::Incoming(p) = ev
                && tx.send(p).is_err()
            {
                return;
            }
        }
    });
    let assigned = loop {
        match tokio::time::timeout(WAIT, rx.recv()).await.unwrap() {
            Some(Packet::ConnAck(ack)) => {
                break ack.properties.and_then(|p| p.assigned_client_identifier);
            }
            Some(_) => continue,
            None => panic!("client ended"),
        }
    };
    assert!(
        assigned.is_some_and(|id| !id.is_empty()),
        "an assigned client identifier"
    );
    c.subscribe("sz/#", QoS::AtMostOnce).await.unwrap();
    until(&mut rx, "SUBACK", |p| matches!(p, Packet::SubAck(_))).await;
    for (key, body) in [("sz.big", "x".repeat(4096)), ("sz.small", "ok".to_owned())] {
        let r = gw
            .post("/v1/exchanges/amq.topic/publish", &admin())
            .json(&json!({"routing_key": key, "body": body}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let m = next_publish(&mut rx).await;
    assert_eq!(
        m.topic.as_ref(),
        b"sz/small",
        "the oversized one was dropped"
    );
    let metrics = gw.metrics_text().await;
    assert!(
        metrics.contains("reason=\"packet_too_large\"} 1"),
        "{metrics}"
    );
}
