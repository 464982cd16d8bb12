//! The upstream engine through faults (DESIGN.md §5 failure table), with a TCP proxy the test
//! owns between the gateway and RabbitMQ (`common::proxy`): the proxy is cut under load from
//! REST, MQTT 5 QoS 1 and WebSocket publishers while MQTT and WebSocket clients subscribe.
//! Every publish a client saw confirmed must reach both subscribers; every publish the outage
//! caught must have had an error answer; the clients stay connected and resume.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use common::mqtt_bytes::{connect, packet, string};
use common::mqtt_wire::RawWire;
use common::proxy::{self, Proxy};
use common::rabbit::Vhost;
use common::ws::request;
use common::{TestGateway, WAIT, admin, eventually, start_gateway, under::on_vhost};
use futures_util::{SinkExt, StreamExt};
use parking_lot::Mutex;
use rumqttc::v5::mqttbytes::QoS as QoS5;
use rumqttc::v5::mqttbytes::v5::PubAckReason;
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message as WsMessage;

/// How long the gateway gets to notice, and to come back after, the cut.
const OUTAGE: Duration = Duration::from_secs(20);

/// What one publisher saw: payloads confirmed, and the error answers it got.
#[derive(Default)]
struct Tally {
    confirmed: Mutex<Vec<String>>,
    refused: Mutex<Vec<String>>,
}

impl Tally {
    fn confirmed(&self) -> usize {
        self.confirmed.lock().len()
    }

    fn refused(&self) -> usize {
        self.refused.lock().len()
    }
}

type Upgrade = tokio_tungstenite::tungstenite::handshake::client::Request;

/// Collected payloads of one subscriber.
type Seen = Arc<Mutex<HashSet<String>>>;

/// A gateway on a fresh vhost, reaching RabbitMQ only through `proxy`.
async fn gateway_through(proxy: &Proxy, vhost: &Vhost) -> TestGateway {
    let port = proxy.addr.port();
    start_gateway(|c| {
        on_vhost(c, vhost);
        c.engine.upstream.url = Some(proxy::url_through("amqp", "127.0.0.1", port, &vhost.name));
        c.limits.publish_rate = 100_000;
        c.limits.subject_publish_rate = 100_000;
    })
    .await
}

async fn rest_publisher(gw: String, stop: watch::Receiver<bool>, tally: Arc<Tally>) {
    let http = reqwest::Client::builder().timeout(WAIT).build().unwrap();
    let token = admin();
    let url = format!("{gw}/v1/exchanges/amq.topic/publish");
    for n in 0.. {
        if *stop.borrow() {
            return;
        }
        let body = format!("rest-{n}");
        let resp = http
            .post(&url)
            .bearer_auth(&token)
            .json(&json!({"routing_key": "load.rest", "body": body}))
            .send()
            .await
            .expect("the gateway answers during the outage");
        match resp.status().as_u16() {
            200 => tally.confirmed.lock().push(body),
            503 => {
                assert!(resp.headers().contains_key("retry-after"));
                let problem: Value = resp.json().await.unwrap();
                tally
                    .refused
                    .lock()
                    .push(problem["code"].as_str().unwrap().into());
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => panic!("REST publish answered {other}"),
        }
    }
}

async fn ws_publisher(upgrade: Upgrade, stop: watch::Receiver<bool>, tally: Arc<Tally>) {
    let (mut ws, _) = tokio_tungstenite::connect_async(upgrade)
        .await
        .expect("upgrade");
    for n in 0u64.. {
        if *stop.borrow() {
            return;
        }
        let body = format!("ws-{n}");
        let publish = json!({"op": "publish", "id": n, "exchange": "amq.topic",
            "routing_key": "load.ws", "body": body});
        ws.send(WsMessage::text(publish.to_string())).await.unwrap();
        let reply = loop {
            match tokio::time::timeout(OUTAGE, ws.next()).await {
                Ok(Some(Ok(WsMessage::Text(t)))) => {
                    break serde_json::from_str::<Value>(&t).unwrap();
                }
                Ok(Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_)))) => continue,
                other => panic!("the WebSocket publisher lost its connection: {other:?}"),
            }
        };
        assert_eq!(reply["id"], n, "{reply}");
        match reply["op"].as_str() {
            Some("published") => tally.confirmed.lock().push(body),
            Some("error") => {
                tally
                    .refused
                    .lock()
                    .push(reply["code"].as_str().unwrap().into());
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            _ => panic!("unexpected reply {reply}"),
        }
    }
}

/// An MQTT 5 client and its PUBACK reasons in order (`None`: the connection ended).
async fn mqtt5(
    port: u16,
) -> (
    rumqttc::v5::AsyncClient,
    mpsc::UnboundedReceiver<Option<PubAckReason>>,
) {
    use rumqttc::v5::mqttbytes::v5::Packet;
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};
    let mut o = MqttOptions::new(common::unique("pub5"), "127.0.0.1", port);
    o.set_credentials("u", admin());
    let (client, mut eventloop) = AsyncClient::new(o, 10);
    let (acks, acked) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(ack))) => {
                    if acks.send(Some(ack.reason)).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    eprintln!("the MQTT 5 client lost its connection: {e}");
                    let _ = acks.send(None);
                    return;
                }
            }
        }
    });
    (client, acked)
}

async fn mqtt5_publisher(port: u16, stop: watch::Receiver<bool>, tally: Arc<Tally>) {
    let (client, mut acked) = mqtt5(port).await;
    for n in 0.. {
        if *stop.borrow() {
            return;
        }
        let body = format!("mqtt-{n}");
        client
            .publish("load/mqtt", QoS5::AtLeastOnce, false, body.clone())
            .await
            .unwrap();
        let reason = tokio::time::timeout(OUTAGE, acked.recv())
            .await
            .expect("a PUBACK in time")
            .flatten()
            .expect("the MQTT 5 publisher is connected");
        match reason {
            PubAckReason::Success | PubAckReason::NoMatchingSubscribers => {
                tally.confirmed.lock().push(body)
            }
            other => {
                tally.refused.lock().push(format!("{other:?}"));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// An MQTT 3.1.1 QoS 1 subscriber of `load/#`; it must stay connected throughout.
/// Its task ends only if the connection does.
async fn mqtt_subscriber(port: u16, seen: Seen) -> (rumqttc::AsyncClient, JoinHandle<()>) {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let mut o = MqttOptions::new(common::unique("sub"), "127.0.0.1", port);
    o.set_credentials("u", admin());
    let (client, mut eventloop) = AsyncClient::new(o, 100);
    let (subscribed, ready) = tokio::sync::oneshot::channel();
    let mut subscribed = Some(subscribed);
    let task = tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    seen.lock()
                        .insert(String::from_utf8_lossy(&p.payload).into_owned());
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(s) = subscribed.take() {
                        let _ = s.send(());
                    }
                }
                Ok(_) => {}
                Err(e) => return eprintln!("the MQTT subscriber lost its connection: {e}"),
            }
        }
    });
    client.subscribe("load/#", QoS::AtLeastOnce).await.unwrap();
    tokio::time::timeout(WAIT, ready).await.unwrap().unwrap();
    (client, task)
}

/// A WebSocket subscriber of `load.#` on amq.topic (a private auto-ack subscription); its task
/// ends only if the connection does.
async fn ws_subscriber(gw: &TestGateway, seen: Seen) -> JoinHandle<()> {
    let (mut ws, _) = tokio_tungstenite::connect_async(request(gw, Some(&admin()), true, ""))
        .await
        .expect("upgrade");
    let subscribe = json!({"op": "subscribe", "id": 1, "exchange": "amq.topic",
        "binding_key": "load.#", "ack": "auto"});
    ws.send(WsMessage::text(subscribe.to_string()))
        .await
        .unwrap();
    let Some(Ok(WsMessage::Text(t))) = tokio::time::timeout(WAIT, ws.next()).await.unwrap() else {
        panic!("no answer to subscribe");
    };
    let reply: Value = serde_json::from_str(&t).unwrap();
    assert_eq!(reply["op"], "subscribed", "{reply}");
    tokio::spawn(async move {
        while let Some(frame) = ws.next().await {
            match frame {
                Ok(WsMessage::Text(t)) => {
                    let m: Value = serde_json::from_str(&t).unwrap();
                    assert_eq!(m["op"], "message", "the WebSocket subscriber got {m}");
                    seen.lock().insert(m["body"].as_str().unwrap().to_owned());
                }
                Ok(WsMessage::Ping(_) | WsMessage::Pong(_)) => {}
                other => {
                    return eprintln!("the WebSocket subscriber lost its connection: {other:?}");
                }
            }
        }
    })
}

async fn ready(gw: &TestGateway) -> u16 {
    gw.http
        .get(gw.url("/readyz"))
        .send()
        .await
        .map_or(0, |r| r.status().as_u16())
}

async fn until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let waited = async {
        while !done() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    if tokio::time::timeout(limit, waited).await.is_err() {
        panic!("{what}: not within {limit:?}");
    }
}

/// A raw MQTT client's QoS 1 PUBLISH of `payload` to `topic`, packet id 1.
fn publish_qos1(topic: &str, payload: &[u8]) -> Vec<u8> {
    let mut body = string(topic.as_bytes());
    body.extend_from_slice(&1u16.to_be_bytes());
    body.extend_from_slice(payload);
    packet(0x32, body)
}

/// While the upstream is down new connections are refused (REST 503, WebSocket 1011, CONNACK
/// 0x88 / code 3) and a 3.1.1 client's QoS 1 publish closes its connection without a PUBACK.
async fn refused_while_down(gw: &TestGateway, v3: &mut RawWire) {
    let mqtt = gw.gateway.addrs().mqtt;
    let listing = gw
        .get("/v1/queues/anything", &admin())
        .send()
        .await
        .unwrap();
    common::problem(listing, 503, "unavailable").await;
    let (mut ws, _) = tokio_tungstenite::connect_async(request(gw, Some(&admin()), true, ""))
        .await
        .expect("upgrade");
    match tokio::time::timeout(WAIT, ws.next()).await {
        Ok(Some(Ok(WsMessage::Close(Some(frame))))) => assert_eq!(u16::from(frame.code), 1011),
        other => panic!("a new WebSocket is closed 1011 while the upstream is down: {other:?}"),
    }
    let mut late = RawWire::tcp(mqtt).await;
    late.send_raw(&connect(
        b"MQTT",
        4,
        0,
        &common::unique("late"),
        Some(&admin()),
    ))
    .await;
    assert_eq!(late.packet().await.unwrap(), (0x20, vec![0, 3]));
    let mut late5 = RawWire::tcp(mqtt).await;
    late5
        .send_raw(&connect(
            b"MQTT",
            5,
            0,
            &common::unique("late5"),
            Some(&admin()),
        ))
        .await;
    let (kind, connack) = late5.packet().await.unwrap();
    assert_eq!((kind, connack[1]), (0x20, 0x88));
    v3.send_raw(&publish_qos1("load/v3", b"v3-0")).await;
    assert!(
        v3.packet().await.is_err(),
        "3.1.1 closed over an unconfirmed publish"
    );
}

const NAMES: [&str; 3] = ["REST", "WebSocket", "MQTT 5"];

/// Every refusal carried the failure table's answer for an unavailable upstream.
fn answered_as_the_table_says(tallies: &[Arc<Tally>; 3]) {
    for (name, tally) in NAMES.iter().zip(tallies) {
        let refused = tally.refused.lock().clone();
        let expected = match *name {
            "MQTT 5" => "UnspecifiedError",
            _ => "unavailable",
        };
        assert!(
            refused.iter().all(|code| code == expected),
            "{name} publishers are refused with {expected}: {refused:?}"
        );
    }
    for (name, tally) in NAMES.iter().zip(tallies) {
        eprintln!(
            "{name}: {} confirmed, {} refused",
            tally.confirmed(),
            tally.refused()
        );
    }
}

/// The supervisor's metrics after exactly one reconnect.
async fn upstream_metrics_after_one_reconnect(gw: &TestGateway) {
    let metrics = gw.metrics_text().await;
    assert!(
        metrics.contains("gateway_upstream_reconnects_total 1"),
        "one reconnect counted"
    );
    assert!(metrics.contains("gateway_upstream_connected 1"));
    // Both generations measured their round trip at once, and channels are in use.
    assert!(
        metrics.contains("gateway_upstream_round_trip_seconds_count"),
        "{metrics}"
    );
    let channels = metrics
        .lines()
        .find_map(|l| l.strip_prefix("gateway_upstream_channels "))
        .and_then(|v| v.parse::<f64>().ok())
        .expect("gateway_upstream_channels");
    assert!(
        channels >= 4.0,
        "control, retained, probe and clients' channels: {channels}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_upstream_loses_no_confirmed_publish_and_every_client_resumes() {
    let vhost = Vhost::create().await;
    let proxy = Proxy::start(proxy::rabbitmq()).await;
    let gw = gateway_through(&proxy, &vhost).await;
    let mqtt = gw.gateway.addrs().mqtt;
    assert_eq!(ready(&gw).await, 200);

    let (mqtt_seen, ws_seen): (Seen, Seen) = Default::default();
    let (_subscriber, mqtt_sub) = mqtt_subscriber(mqtt.port(), mqtt_seen.clone()).await;
    let ws_sub = ws_subscriber(&gw, ws_seen.clone()).await;
    // A 3.1.1 publisher connected before the cut: the table closes it over an unconfirmed
    // publish, so that it sends again once it reconnects.
    let mut v3 = RawWire::tcp(mqtt).await;
    v3.send_raw(&connect(
        b"MQTT",
        4,
        0,
        &common::unique("v3"),
        Some(&admin()),
    ))
    .await;
    assert_eq!(v3.packet().await.unwrap(), (0x20, vec![0, 0]));

    let (stop_tx, stop) = watch::channel(false);
    let tallies: [Arc<Tally>; 3] = Default::default();
    let [rest, ws, mqtt5] = tallies.clone();
    let publishers = [
        tokio::spawn(rest_publisher(gw.base.clone(), stop.clone(), rest)),
        tokio::spawn(ws_publisher(
            request(&gw, Some(&admin()), true, ""),
            stop.clone(),
            ws,
        )),
        tokio::spawn(mqtt5_publisher(mqtt.port(), stop.clone(), mqtt5)),
    ];
    until("every publisher confirmed 50", OUTAGE, || {
        tallies.iter().all(|t| t.confirmed() >= 50)
    })
    .await;

    proxy.cut();
    until("every publisher refused during the outage", OUTAGE, || {
        tallies.iter().all(|t| t.refused() >= 1)
    })
    .await;
    assert_eq!(ready(&gw).await, 503, "/readyz while the upstream is down");
    refused_while_down(&gw, &mut v3).await;

    let confirmed_at_cut: Vec<usize> = tallies.iter().map(|t| t.confirmed()).collect();
    proxy.restore();
    eventually("/readyz 200 after the upstream is back", || async {
        ready(&gw).await == 200
    })
    .await;
    until(
        "every publisher confirmed 50 more after the outage",
        OUTAGE,
        || {
            tallies
                .iter()
                .zip(&confirmed_at_cut)
                .all(|(t, at)| t.confirmed() >= at + 50)
        },
    )
    .await;
    stop_tx.send_replace(true);
    for p in publishers {
        tokio::time::timeout(OUTAGE, p).await.unwrap().unwrap();
    }

    answered_as_the_table_says(&tallies);
    let confirmed: Vec<String> = tallies
        .iter()
        .flat_map(|t| t.confirmed.lock().clone())
        .collect();
    for (name, seen) in [("MQTT", &mqtt_seen), ("WebSocket", &ws_seen)] {
        until(
            &format!("the {name} subscriber got every confirmed publish"),
            OUTAGE,
            || {
                let seen = seen.lock();
                confirmed.iter().all(|c| seen.contains(c))
            },
        )
        .await;
    }
    assert!(
        !mqtt_sub.is_finished(),
        "the MQTT subscriber stayed connected"
    );
    assert!(
        !ws_sub.is_finished(),
        "the WebSocket subscriber stayed connected"
    );
    upstream_metrics_after_one_reconnect(&gw).await;
    assert!(proxy.accepted() >= 4, "two connections, then two again");
}

/// A TLS acceptor with a fresh self-signed certificate for `localhost`, and that certificate
/// as a PEM file to trust.
fn self_signed() -> (tokio_rustls::TlsAcceptor, tempfile::NamedTempFile) {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let ca = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(ca.path(), certified.cert.pem()).unwrap();
    let cert = rustls::pki_types::CertificateDer::from(certified.cert.der().to_vec());
    let key =
        rustls::pki_types::PrivateKeyDer::try_from(certified.signing_key.serialize_der()).unwrap();
    let tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![cert], key)
    .unwrap();
    (tokio_rustls::TlsAcceptor::from(Arc::new(tls)), ca)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_with_a_private_ca_works_and_an_untrusted_certificate_is_refused() {
    let vhost = Vhost::create().await;
    let (acceptor, ca) = self_signed();
    let proxy = Proxy::start_with(proxy::rabbitmq(), Some(acceptor)).await;
    let url = proxy::url_through("amqps", "localhost", proxy.addr.port(), &vhost.name);
    let gw = start_gateway(|c| {
        on_vhost(c, &vhost);
        c.engine.upstream.url = Some(url.clone());
        c.engine.upstream.tls_ca = Some(ca.path().to_owned());
    })
    .await;
    assert_eq!(ready(&gw).await, 200);
    let queue = gw.queue("tls").await;
    gw.bind(&queue, "amq.topic", "tls.#").await;
    let published = gw
        .post("/v1/exchanges/amq.topic/publish", &admin())
        .json(&json!({"routing_key": "tls.one", "body": "over amqps"}))
        .send()
        .await
        .unwrap();
    assert_eq!(published.status(), 200);
    let got = gw.take(&queue, 1).await;
    assert_eq!(got[0]["body"], "over amqps");

    // Another CA, and none at all: the broker's certificate is not trusted.
    let (_, other) = self_signed();
    for tls_ca in [Some(other.path().to_owned()), None] {
        let mut config = common::test_config();
        on_vhost(&mut config, &vhost);
        config.engine.upstream.url = Some(url.clone());
        config.engine.upstream.tls_ca = tls_ca;
        let refused = amqp_gateway::start(config).await.err().expect("refused");
        let said = refused.to_string();
        eprintln!("{said}");
        assert!(
            said.contains("cannot connect to the upstream broker")
                && said.contains("certificate")
                && said.contains("engine.upstream.tls_ca"),
            "{said}"
        );
    }
}

/// A WebSocket client that sends one request at a time.
struct Ws(
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
);

impl Ws {
    async fn connect(gw: &TestGateway) -> Ws {
        let upgrade = request(gw, Some(&admin()), true, "");
        Ws(tokio_tungstenite::connect_async(upgrade)
            .await
            .expect("upgrade")
            .0)
    }

    async fn recv(&mut self) -> Value {
        loop {
            match tokio::time::timeout(WAIT, self.0.next()).await {
                Ok(Some(Ok(WsMessage::Text(t)))) => return serde_json::from_str(&t).unwrap(),
                Ok(Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_)))) => continue,
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    }

    async fn call(&mut self, request: Value) -> Value {
        self.0
            .send(WsMessage::text(request.to_string()))
            .await
            .unwrap();
        self.recv().await
    }
}

async fn next_ack(acks: &mut mpsc::UnboundedReceiver<Option<PubAckReason>>) -> PubAckReason {
    tokio::time::timeout(OUTAGE, acks.recv())
        .await
        .expect("a PUBACK in time")
        .flatten()
        .expect("the MQTT 5 client is connected")
}

async fn rest_publish(gw: &TestGateway, body: &str) -> reqwest::Response {
    gw.post("/v1/exchanges/amq.topic/publish", &admin())
        .json(&json!({"routing_key": "alarm.rest", "body": body}))
        .send()
        .await
        .unwrap()
}

type Acks = mpsc::UnboundedReceiver<Option<PubAckReason>>;

/// An MQTT 5 publisher confirmed once, then the node's memory alarm raised and one more publish
/// sent, until the gateway hears `connection.blocked` (RabbitMQ blocks a connection when it
/// publishes; that publish's PUBACK waits for the alarm to clear, or for the connection's end).
async fn alarm_raised(
    node: &common::rabbit_node::RabbitNode,
    gw: &TestGateway,
) -> (rumqttc::v5::AsyncClient, Acks) {
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
        gw.metrics_text()
            .await
            .contains("gateway_publish_blocked 1")
    })
    .await;
    (mqtt, acks)
}

/// A memory alarm on the broker (a node of the test's own) blocks the gateway's publishing
/// connection: publishers on every protocol are throttled with the memory watermark's answers
/// while a subscriber keeps receiving on the other connection; cleared, publishing resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_alarm_throttles_publishers_while_deliveries_flow() {
    let node = common::rabbit_node::RabbitNode::start().await;
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
    let mut ws = Ws::connect(&gw).await;
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
    let mut reader = Ws::connect(&gw).await;
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
    assert!(
        gw.metrics_text()
            .await
            .contains("gateway_publish_blocked 0")
    );
}

/// A client's exclusive queue the broker lost while the gateway was cut off (as a broker
/// restart loses a transient queue) is declared again with its binding before its consumer
/// resumes: the subscriber keeps receiving on the same connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_exclusive_queue_is_declared_again_with_its_bindings() {
    let vhost = Vhost::create().await;
    let proxy = Proxy::start(proxy::rabbitmq()).await;
    let gw = gateway_through(&proxy, &vhost).await;
    let seen: Seen = Default::default();
    let (_subscriber, task) = mqtt_subscriber(gw.gateway.addrs().mqtt.port(), seen.clone()).await;
    let publish = |body: &'static str| {
        gw.post("/v1/exchanges/amq.topic/publish", &admin())
            .json(&json!({"routing_key": "load.restore", "body": body}))
            .send()
    };
    assert_eq!(publish("before").await.unwrap().status(), 200);
    until("the subscriber got 'before'", WAIT, || {
        seen.lock().contains("before")
    })
    .await;
    let queues: Vec<String> = vhost
        .queue_names()
        .await
        .into_iter()
        .filter(|q| q.starts_with("mqtt-subscription-"))
        .collect();
    assert_eq!(queues.len(), 1, "the subscriber's queue: {queues:?}");

    proxy.cut();
    eventually("/readyz 503", || async { ready(&gw).await == 503 }).await;
    vhost.delete_queue(&queues[0]).await;
    proxy.restore();
    eventually("/readyz 200", || async { ready(&gw).await == 200 }).await;

    assert!(
        vhost.queue_names().await.contains(&queues[0]),
        "declared again"
    );
    assert_eq!(publish("after").await.unwrap().status(), 200);
    until(
        "the subscriber got 'after' through the restored binding",
        OUTAGE,
        || seen.lock().contains("after"),
    )
    .await;
    assert!(!task.is_finished(), "the MQTT subscriber stayed connected");
}

/// RabbitMQ tells a connection it is blocked only once it publishes: a gateway that reconnects
/// while the broker's alarm is still raised keeps its publishers throttled (answered, not left
/// hanging in a blocked socket) until a probe finds the alarm over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_during_a_broker_alarm_stays_throttled_until_it_clears() {
    let node = common::rabbit_node::RabbitNode::start().await;
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
