//! The upstream engine under its broker's resource alarms (DESIGN.md §5, §7), on a RabbitMQ
//! node each test starts itself (`common::rabbit_node`): never the machine's broker. RabbitMQ's
//! `connection.blocked` must throttle publishers on every protocol while deliveries flow, and
//! keep them throttled across a reconnect until the alarm is over.

mod common;

use std::time::Duration;

use common::proxy::{self, Proxy};
use common::rabbit_node::RabbitNode;
use common::upstream_clients::{Acks, mqtt5, ready};
use common::ws::Ws;
use common::{TestGateway, WAIT, admin, eventually, start_gateway};
use futures_util::SinkExt;
use rumqttc::v5::mqttbytes::QoS as QoS5;
use rumqttc::v5::mqttbytes::v5::PubAckReason;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message as WsMessage;

/// How long a withheld PUBACK may take once the alarm clears.
const CLEARS: Duration = Duration::from_secs(20);

async fn next_ack(acks: &mut Acks) -> PubAckReason {
    common::upstream_clients::next_ack(acks, CLEARS).await
}

async fn rest_publish(gw: &TestGateway, body: &str) -> reqwest::Response {
    gw.post("/v1/exchanges/amq.topic/publish", &admin())
        .json(&json!({"routing_key": "alarm.rest", "body": body}))
        .send()
        .await
        .unwrap()
}

/// An MQTT 5 publisher confirmed once, then the node's memory alarm raised and one more publish
/// sent, until the gateway hears `connection.blocked` (RabbitMQ blocks a connection when it
/// publishes; that publish's PUBACK waits for the alarm to clear, or for the connection's end).
async fn alarm_raised(node: &RabbitNode, gw: &TestGateway) -> (rumqttc::v5::AsyncClient, Acks) {
    let (mqtt, mut acks) = mqtt5(gw.gateway.addrs().mqtt.port()).await;
    mqtt.publish("alarm/mqtt", QoS5::AtLeastOnce, false, "before")
        .await
        .unwrap();
    assert_eq!(next_ack(&mut acks).await, PubAckReason::Success);
    node.ctl(&["set_vm_memory_high_watermark", "0.00001"]).await;
    mqtt.publish("alarm/mqtt", QoS5::AtLeastOnce, false, "during")
        .await
        .unwrap();
    eventually("the gateway heard connection.blocked", || async {
        gw.metric("gateway_publish_blocked").await == Some(1.0)
    })
    .await;
    (mqtt, acks)
}

/// A memory alarm on the broker (a node of the test's own) blocks the gateway's publishing
/// connection: publishers on every protocol are throttled with the memory watermark's answers
/// while a subscriber keeps receiving on the other connection; cleared, publishing resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_alarm_throttles_publishers_while_deliveries_flow() {
    let node = RabbitNode::start().await;
    let gw = start_gateway(|c| {
        c.engine.kind = amqp_gateway::config::EngineKindConfig::Upstream;
        c.engine.upstream.url = Some(node.amqp_url());
    })
    .await;
    let backlog = gw.queue("backlog").await;
    for n in 0..100 {
        let r = gw
            .post("/v1/exchanges/amq.default/publish", &admin())
            .json(&json!({"routing_key": backlog, "body": format!("b-{n}")}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let mut ws = Ws::connect(&gw, Some(&admin())).await;
    let publish = |id: u64| json!({"op": "publish", "id": id, "exchange": "amq.topic", "routing_key": "alarm.ws", "body": "x"});
    assert_eq!(ws.call(publish(1)).await["op"], "published");
    let (_mqtt, mut acks) = alarm_raised(&node, &gw).await;
    let refused = match tokio::time::timeout(WAIT / 2, rest_publish(&gw, "refused")).await {
        Ok(r) => r,
        Err(_) => panic!(
            "a REST publish while blocked went unanswered; the gateway's metrics:\n{}",
            gw.metrics_text().await
        ),
    };
    assert!(refused.headers().contains_key("retry-after"));
    let problem = common::problem(refused, 503, "overloaded").await;
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("upstream broker blocked"),
        "{problem}"
    );
    let refused = ws.call(publish(2)).await;
    assert_eq!(
        (&refused["op"], &refused["code"]),
        (&json!("error"), &json!("overloaded")),
        "{refused}"
    );
    assert!(refused["retry_after_ms"].as_u64().is_some_and(|ms| ms > 0));
    assert!(
        tokio::time::timeout(Duration::from_millis(300), acks.recv())
            .await
            .is_err(),
        "the MQTT PUBACK is withheld"
    );

    // Deliveries and acks flow on the consuming connection meanwhile.
    let mut reader = Ws::connect(&gw, Some(&admin())).await;
    let subscribed = reader
        .call(
            json!({"op": "subscribe", "id": 1, "queue": backlog, "ack": "manual", "prefetch": 10}),
        )
        .await;
    assert_eq!(subscribed["op"], "subscribed", "{subscribed}");
    for n in 0..100 {
        let m = reader.recv().await;
        assert_eq!(m["body"], format!("b-{n}"), "{m}");
        let ack = json!({"op": "ack", "sub": m["sub"], "delivery_tag": m["delivery_tag"]});
        reader
            .0
            .send(WsMessage::text(ack.to_string()))
            .await
            .unwrap();
    }
    eventually("the backlog drained", || async {
        gw.depth(&backlog).await == 0
    })
    .await;

    node.ctl(&["set_vm_memory_high_watermark", "0.4"]).await;
    assert_eq!(
        next_ack(&mut acks).await,
        PubAckReason::Success,
        "the withheld PUBACK"
    );
    eventually("REST publishes are accepted again", || async {
        rest_publish(&gw, "after").await.status() == 200
    })
    .await;
    assert_eq!(ws.call(publish(3)).await["op"], "published");
    assert_eq!(gw.metric("gateway_publish_blocked").await, Some(0.0));
}

/// RabbitMQ tells a connection it is blocked only once it publishes: a gateway that reconnects
/// while the broker's alarm is still raised keeps its publishers throttled (answered, not left
/// hanging in a blocked socket) until a probe finds the alarm over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_during_a_broker_alarm_stays_throttled_until_it_clears() {
    let node = RabbitNode::start().await;
    let proxy = Proxy::start(([127, 0, 0, 1], node.port).into()).await;
    let gw = start_gateway(|c| {
        c.engine.kind = amqp_gateway::config::EngineKindConfig::Upstream;
        c.engine.upstream.url = Some(proxy::url_through(
            "amqp",
            "127.0.0.1",
            proxy.addr.port(),
            "%2f",
        ));
    })
    .await;
    let (mqtt, mut acks) = alarm_raised(&node, &gw).await;
    proxy.cut();
    // The blocked publish's confirm went with the connection.
    assert_eq!(next_ack(&mut acks).await, PubAckReason::UnspecifiedError);
    eventually("/readyz 503", || async { ready(&gw).await == 503 }).await;
    proxy.restore();
    eventually("/readyz 200", || async { ready(&gw).await == 200 }).await;

    let refused = match tokio::time::timeout(WAIT / 2, rest_publish(&gw, "refused")).await {
        Ok(r) => r,
        Err(_) => panic!("a REST publish after the reconnect hung in the blocked socket"),
    };
    common::problem(refused, 503, "overloaded").await;

    node.ctl(&["set_vm_memory_high_watermark", "0.4"]).await;
    eventually("REST publishes are accepted again", || async {
        tokio::time::timeout(WAIT / 2, rest_publish(&gw, "after"))
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    mqtt.publish("alarm/mqtt", QoS5::AtLeastOnce, false, "after")
        .await
        .unwrap();
    assert_eq!(next_ack(&mut acks).await, PubAckReason::Success);
}
