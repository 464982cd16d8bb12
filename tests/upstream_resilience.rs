//! The upstream engine through faults (DESIGN.md §5 failure table), with a TCP proxy the test
//! owns between the gateway and RabbitMQ (`common::proxy`): the proxy is cut under load from
//! REST, MQTT 5 QoS 1 and WebSocket publishers while MQTT and WebSocket clients subscribe.
//! Every publish a client saw confirmed must reach both subscribers; every publish the outage
//! caught must have had an error answer; the clients stay connected and resume.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use common::mqtt_bytes::{connect, publish_qos1};
use common::mqtt_wire::RawWire;
use common::proxy::{self, Proxy};
use common::rabbit::Vhost;
use common::upstream_clients::{mqtt5, ready};
use common::ws::request;
use common::{TestGateway, WAIT, admin, eventually, start_gateway, under::on_vhost};
use futures_util::{SinkExt, StreamExt};
use parking_lot::Mutex;
use rumqttc::v5::mqttbytes::QoS as QoS5;
use rumqttc::v5::mqttbytes::v5::PubAckReason;
use serde_json::{Value, json};
use tokio::sync::watch;
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
    v3.send_raw(&publish_qos1(b"load/v3", b"v3-0", false)).await;
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
    let value = |name| common::metric_in(&metrics, name);
    assert_eq!(
        value("gateway_upstream_reconnects_total"),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(value("gateway_upstream_connected"), Some(1.0));
    // The round trip was measured (each generation does at once), and channels are in use.
    assert!(value("gateway_upstream_round_trip_seconds_count").is_some_and(|n| n >= 1.0));
    let channels = value("gateway_upstream_channels").expect("gateway_upstream_channels");
    assert!(
        channels >= 4.0,
        "control, retained, probe and clients' channels: {channels}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_upstream_loses_no_confirmed_publish_and_every_client_resumes() {
    // The gateway's own account (reconnect, restore, consumers resumed) beside a failure.
    let _ = tracing_subscriber::fmt()
        .with_env_filter("amqp_gateway=debug")
        .with_test_writer()
        .try_init();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_with_a_private_ca_works_and_an_untrusted_certificate_is_refused() {
    let vhost = Vhost::create().await;
    let (acceptor, ca) = common::tls::self_signed_localhost();
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
    let (_, other) = common::tls::self_signed_localhost();
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
