//! The reason for the upstream engine: an AMQP application already on RabbitMQ (here Python
//! `pika`, RabbitMQ's own tutorial client) and the gateway's web, MQTT and REST clients on the
//! same exchanges and queues. Each test runs a gateway with `engine.kind = "upstream"` on a
//! vhost of its own on the machine's RabbitMQ (127.0.0.1:5672; failing, never skipping, when
//! it is not there). `.ci/run` installs pika.

mod common;

use std::process::Stdio;
use std::time::Duration;

use amqp_gateway::config::EngineKindConfig;
use common::rabbit::Vhost;
use common::{TestGateway, WAIT, admin, start_gateway, token, unique};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::process::Command;
use tokio_tungstenite::tungstenite::Message as WsMessage;

async fn upstream_gateway(vhost: &Vhost) -> TestGateway {
    start_gateway(|c| {
        c.engine.kind = EngineKindConfig::Upstream;
        c.engine.upstream.url = Some(vhost.amqp_url());
        c.engine.upstream.management_url = Some(vhost.management_url());
    })
    .await
}

fn pika(vhost: &Vhost, args: &[&str]) -> Command {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/interop/pika_peer.py");
    let mut cmd = Command::new("python3");
    cmd.arg(script)
        .arg(vhost.amqp_url())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

async fn run_pika(vhost: &Vhost, args: &[&str]) -> String {
    let out = tokio::time::timeout(Duration::from_secs(30), pika(vhost, args).output())
        .await
        .expect("pika within 30 s")
        .expect("python3 runs (bash .ci/run installs pika)");
    assert!(
        out.status.success(),
        "pika {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A WebSocket client subscribed to `binding_key` on `amq.topic`.
async fn ws_subscriber(
    gw: &TestGateway,
    binding_key: &str,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    let t = token("browser", &format!("gateway.read:amq.topic/{binding_key}"));
    let (mut ws, _) = tokio_tungstenite::connect_async(common::ws::request(gw, Some(&t), true, ""))
        .await
        .expect("upgrade");
    let req =
        json!({"op": "subscribe", "id": "s", "exchange": "amq.topic", "binding_key": binding_key});
    ws.send(WsMessage::text(req.to_string())).await.unwrap();
    let reply = ws_frame(&mut ws).await;
    assert_eq!(reply["op"], "subscribed", "{reply}");
    ws
}

async fn ws_frame(
    ws: &mut tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
) -> Value {
    loop {
        match tokio::time::timeout(WAIT, ws.next()).await {
            Err(_) => panic!("no WebSocket frame within {WAIT:?}"),
            Ok(Some(Ok(WsMessage::Text(t)))) => return serde_json::from_str(&t).unwrap(),
            Ok(Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_)))) => continue,
            Ok(other) => panic!("expected a text frame, got {other:?}"),
        }
    }
}

/// An MQTT 3.1.1 client subscribed (QoS 1) to `filter`; its publishes come out of the receiver.
async fn mqtt_subscriber(
    gw: &TestGateway,
    filter: &str,
) -> (
    rumqttc::AsyncClient,
    tokio::sync::mpsc::UnboundedReceiver<(String, Vec<u8>)>,
) {
    let port = gw.gateway.addrs().mqtt.port();
    let mut o = rumqttc::MqttOptions::new(unique("device"), "127.0.0.1", port);
    o.set_credentials("device", token("device", "gateway.read:amq.topic/legacy.#"));
    let (client, mut eventloop) = rumqttc::AsyncClient::new(o, 100);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let (subacked_tx, subacked) = tokio::sync::oneshot::channel();
    let mut subacked_tx = Some(subacked_tx);
    tokio::spawn(async move {
        while let Ok(ev) = eventloop.poll().await {
            match ev {
                rumqttc::Event::Incoming(rumqttc::Packet::SubAck(s)) => {
                    if let Some(tx) = subacked_tx.take() {
                        let _ = tx.send(s.return_codes);
                    }
                }
                rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) => {
                    let _ = tx.send((p.topic.clone(), p.payload.to_vec()));
                }
                _ => {}
            }
        }
    });
    client
        .subscribe(filter, rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    let codes = tokio::time::timeout(WAIT, subacked)
        .await
        .expect("SUBACK")
        .unwrap();
    assert_eq!(
        codes,
        [rumqttc::SubscribeReasonCode::Success(
            rumqttc::QoS::AtLeastOnce
        )]
    );
    (client, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pika_publisher_reaches_websocket_and_mqtt_subscribers() {
    let vhost = Vhost::create().await;
    let gw = upstream_gateway(&vhost).await;
    let mut ws = ws_subscriber(&gw, "legacy.orders.#").await;
    let (_device, mut mqtt) = mqtt_subscriber(&gw, "legacy/orders/#").await;

    run_pika(
        &vhost,
        &["publish", "amq.topic", "legacy.orders.created", "5"],
    )
    .await;

    for i in 0..5 {
        let m = ws_frame(&mut ws).await;
        assert_eq!(m["op"], "message", "{m}");
        assert_eq!(m["routing_key"], "legacy.orders.created");
        assert_eq!(m["body"], format!("m{i}"), "{m}");
        assert_eq!(m["properties"]["correlation_id"], format!("corr-{i}"));
        assert_eq!(m["properties"]["headers"]["origin"], "pika");
        let (topic, payload) = tokio::time::timeout(WAIT, mqtt.recv())
            .await
            .expect("an MQTT PUBLISH")
            .unwrap();
        assert_eq!(topic, "legacy/orders/created");
        assert_eq!(payload, format!("m{i}").as_bytes());
    }
    gw.gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_mqtt_and_websocket_publishes_reach_a_pika_consumer_intact() {
    let vhost = Vhost::create().await;
    let gw = upstream_gateway(&vhost).await;
    let queue = gw.queue("legacy-inbox").await;
    gw.bind(&queue, "amq.topic", "legacy.inbox.#").await;

    // REST, with every property the issue names.
    let r = gw
        .post("/v1/exchanges/amq.topic/publish", &admin())
        .json(&json!({
            "routing_key": "legacy.inbox.rest",
            "body": "from rest",
            "properties": {
                "content_type": "text/plain",
                "headers": {"tenant": "acme"},
                "correlation_id": "c-rest",
                "reply_to": "rest-replies",
                "delivery_mode": 2,
                "expiration": "600000"
            }
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());

    // MQTT QoS 1, acked only after RabbitMQ confirmed.
    let port = gw.gateway.addrs().mqtt.port();
    let mut o = rumqttc::MqttOptions::new(unique("pub"), "127.0.0.1", port);
    o.set_credentials(
        "device",
        token("device", "gateway.write:amq.topic/legacy.#"),
    );
    let (device, mut eventloop) = rumqttc::AsyncClient::new(o, 10);
    device
        .publish(
            "legacy/inbox/mqtt",
            rumqttc::QoS::AtLeastOnce,
            false,
            "from mqtt",
        )
        .await
        .unwrap();
    tokio::time::timeout(WAIT, async {
        loop {
            if let Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) = eventloop.poll().await
            {
                break;
            }
        }
    })
    .await
    .expect("PUBACK");

    // WebSocket.
    let t = token("browser", "gateway.write:amq.topic/legacy.#");
    let (mut ws, _) =
        tokio_tungstenite::connect_async(common::ws::request(&gw, Some(&t), true, ""))
            .await
            .unwrap();
    let req = json!({"op": "publish", "id": "p", "exchange": "amq.topic", "routing_key": "legacy.inbox.ws", "body": "from ws", "properties": {"message_id": "ws-1"}});
    ws.send(WsMessage::text(req.to_string())).await.unwrap();
    let reply = ws_frame(&mut ws).await;
    assert_eq!(
        (&reply["op"], &reply["routed"]),
        (&json!("published"), &json!(true)),
        "{reply}"
    );

    let out = run_pika(&vhost, &["consume", &queue, "3"]).await;
    let got: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(got.len(), 3, "{out}");
    let rest = &got[0];
    assert_eq!(rest["body"], "from rest");
    assert_eq!(rest["content_type"], "text/plain");
    assert_eq!(rest["headers"]["tenant"], "acme");
    assert_eq!(rest["headers"]["x-gateway-sub"], "root");
    assert_eq!(rest["correlation_id"], "c-rest");
    assert_eq!(rest["reply_to"], "rest-replies");
    assert_eq!(rest["delivery_mode"], 2);
    assert_eq!(rest["expiration"], "600000");
    assert_eq!(got[1]["body"], "from mqtt");
    assert_eq!(got[1]["delivery_mode"], 2, "QoS 1 is persistent");
    assert_eq!(got[1]["headers"]["x-gateway-sub"], "device");
    assert_eq!(got[2]["body"], "from ws");
    assert_eq!(got[2]["message_id"], "ws-1");
    gw.gateway.shutdown().await;
}

/// An MQTT 5 client's events, as the two-instance test needs them.
#[derive(Debug, PartialEq)]
enum V5Ev {
    ConnAck {
        present: bool,
    },
    SubAck,
    Publish {
        topic: String,
        payload: String,
        retain: bool,
    },
    Disconnect(String),
    Closed(String),
}

async fn v5_client(
    gw: &TestGateway,
    id: &str,
    clean: bool,
) -> (
    rumqttc::v5::AsyncClient,
    tokio::sync::mpsc::UnboundedReceiver<V5Ev>,
) {
    use rumqttc::v5::mqttbytes::v5::Packet;
    let port = gw.gateway.addrs().mqtt.port();
    let mut o = rumqttc::v5::MqttOptions::new(id, "127.0.0.1", port);
    o.set_credentials(
        "fleet",
        token(
            "fleet",
            "gateway.read:amq.topic/fleet.# gateway.write:amq.topic/fleet.#",
        ),
    );
    o.set_clean_start(clean);
    if !clean {
        o.set_session_expiry_interval(Some(600));
    }
    let (client, mut eventloop) = rumqttc::v5::AsyncClient::new(o, 100);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let ev = match eventloop.poll().await {
                Ok(rumqttc::v5::Event::Incoming(Packet::ConnAck(c))) => V5Ev::ConnAck {
                    present: c.session_present,
                },
                Ok(rumqttc::v5::Event::Incoming(Packet::SubAck(_))) => V5Ev::SubAck,
                Ok(rumqttc::v5::Event::Incoming(Packet::Publish(p))) => V5Ev::Publish {
                    topic: String::from_utf8_lossy(&p.topic).into_owned(),
                    payload: String::from_utf8_lossy(&p.payload).into_owned(),
                    retain: p.retain,
                },
                Ok(rumqttc::v5::Event::Incoming(Packet::Disconnect(d))) => {
                    V5Ev::Disconnect(format!("{:?}", d.reason_code))
                }
                Ok(_) => continue,
                Err(e) => {
                    let _ = tx.send(V5Ev::Closed(e.to_string()));
                    break;
                }
            };
            if tx.send(ev).is_err() {
                break;
            }
        }
    });
    (client, rx)
}

async fn v5_next(rx: &mut tokio::sync::mpsc::UnboundedReceiver<V5Ev>) -> V5Ev {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("an MQTT event")
        .expect("the client is running")
}

/// Two gateway instances on one vhost (the scale-out story, DESIGN.md §1): a device moving
/// from one to the other takes its session over (the old connection is told 0x8E, the new one
/// finds its session and its queued message), and a retained message set through one greets
/// subscribers of the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_sessions_and_retained_messages() {
    let vhost = Vhost::create().await;
    let a = upstream_gateway(&vhost).await;
    let b = upstream_gateway(&vhost).await;
    let id = unique("car");

    let (car_a, mut on_a) = v5_client(&a, &id, false).await;
    assert_eq!(v5_next(&mut on_a).await, V5Ev::ConnAck { present: false });
    car_a
        .subscribe("fleet/#", rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
        .await
        .unwrap();
    assert_eq!(v5_next(&mut on_a).await, V5Ev::SubAck);

    let (car_b, mut on_b) = v5_client(&b, &id, false).await;
    // rumqttc reports the server's DISCONNECT as the end of its event loop.
    let told = v5_next(&mut on_a).await;
    assert!(
        matches!(&told, V5Ev::Closed(why) if why.contains("SessionTakenOver")),
        "the instance holding the session lets go with 0x8E: {told:?}"
    );
    assert_eq!(v5_next(&mut on_b).await, V5Ev::ConnAck { present: true });

    let (pub_a, mut pub_events) = v5_client(&a, &unique("depot"), true).await;
    assert_eq!(
        v5_next(&mut pub_events).await,
        V5Ev::ConnAck { present: false }
    );
    let qos1 = rumqttc::v5::mqttbytes::QoS::AtLeastOnce;
    pub_a
        .publish("fleet/status", qos1, true, "all parked")
        .await
        .unwrap();
    assert_eq!(
        v5_next(&mut on_b).await,
        V5Ev::Publish {
            topic: "fleet/status".into(),
            payload: "all parked".into(),
            retain: false
        },
        "the session, now on the other instance, receives"
    );

    let (late_b, mut late) = v5_client(&b, &unique("late"), true).await;
    assert_eq!(v5_next(&mut late).await, V5Ev::ConnAck { present: false });
    late_b.subscribe("fleet/#", qos1).await.unwrap();
    let mut seen = Vec::new();
    for _ in 0..2 {
        seen.push(v5_next(&mut late).await);
    }
    assert!(seen.contains(&V5Ev::SubAck), "{seen:?}");
    assert!(
        seen.contains(&V5Ev::Publish {
            topic: "fleet/status".into(),
            payload: "all parked".into(),
            retain: true
        }),
        "retained through the other instance: {seen:?}"
    );
    drop((car_b, late_b));
    a.gateway.shutdown().await;
    b.gateway.shutdown().await;
}

/// A kombu consumer (Celery's messaging library) reads a queue the REST API declared, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kombu_consumer_reads_a_queue_rest_declared() {
    let vhost = Vhost::create().await;
    let gw = upstream_gateway(&vhost).await;
    let queue = gw.queue("kombu-jobs").await;
    for n in 0..3 {
        let r = gw
            .post(
                &format!("/v1/exchanges/amq.default/messages?routing_key={queue}"),
                &admin(),
            )
            .header("content-type", "text/plain")
            .body(format!("job-{n}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/interop/kombu_consumer.py"
    );
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        Command::new("python3")
            .args([script, &vhost.amqp_url(), &queue, "3"])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("kombu within 30 s")
    .expect("python3 runs (bash .ci/run installs kombu)");
    assert!(
        out.status.success(),
        "kombu failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "job-0\njob-1\njob-2\n"
    );
    assert_eq!(gw.depth(&queue).await, 0, "acked, gone");
    gw.gateway.shutdown().await;
}

/// Without `engine.upstream.management_url` (DESIGN.md §5): listings answer 501, a queue's GET
/// gives only what a passive declare knows (messages and consumers), and everything else works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_management_api_listings_are_501_and_a_queue_shows_its_counts() {
    let vhost = Vhost::create().await;
    let gw = start_gateway(|c| {
        c.engine.kind = EngineKindConfig::Upstream;
        c.engine.upstream.url = Some(vhost.amqp_url());
    })
    .await;
    let list = gw.get("/v1/queues", &admin()).send().await.unwrap();
    common::problem(list, 501, "not_supported").await;
    let queue = gw.queue("bare").await;
    let r = gw
        .post(
            &format!("/v1/exchanges/amq.default/messages?routing_key={queue}"),
            &admin(),
        )
        .body("counted")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let view = common::json_of(gw.get(&format!("/v1/queues/{queue}"), &admin())).await;
    assert_eq!(
        view,
        json!({"name": queue, "messages": 1, "consumers": 0}),
        "flags and unacked counts would be guesses: absent"
    );
    assert_eq!(gw.take(&queue, 1).await[0]["body"], "counted");
    gw.gateway.shutdown().await;
}
