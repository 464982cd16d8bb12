//! MQTT over real sockets with rumqttc: one list of cases, run for {TCP, WebSocket} ×
//! {MQTT 3.1.1, MQTT 5}, including cross-protocol cases with REST.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::under::{self, gateway};
use common::{TestGateway, WAIT, admin, token, unique};
use serde_json::json;
use tokio::sync::mpsc;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Version {
    V4,
    V5,
}

/// TCP, or WebSocket at `/mqtt` on the HTTP port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Tcp,
    Ws,
}

/// Which transport the cases of the current test use (set by the matrix).
static TRANSPORT: std::sync::OnceLock<Transport> = std::sync::OnceLock::new();

fn transport() -> Transport {
    *TRANSPORT.get().unwrap_or(&Transport::Tcp)
}

/// What a client saw, the same for both protocol versions.
#[derive(Debug, Clone, PartialEq)]
enum Ev {
    ConnAck {
        present: bool,
    },
    Refused(&'static str),
    SubAck(Vec<Result<u8, String>>),
    Publish {
        topic: String,
        qos: u8,
        payload: Bytes,
        retain: bool,
    },
    PubAck(String),
    Disconnect(String),
    Closed,
}

enum Handle {
    V4(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

struct Client {
    handle: Handle,
    events: mpsc::UnboundedReceiver<Ev>,
}

fn refused_v4(code: rumqttc::ConnectReturnCode) -> &'static str {
    match code {
        rumqttc::ConnectReturnCode::BadUserNamePassword => "bad_credentials",
        rumqttc::ConnectReturnCode::NotAuthorized => "not_authorized",
        rumqttc::ConnectReturnCode::BadClientId => "bad_client_id",
        _ => "other",
    }
}

fn refused_v5(code: rumqttc::v5::mqttbytes::v5::ConnectReturnCode) -> &'static str {
    use rumqttc::v5::mqttbytes::v5::ConnectReturnCode as C;
    match code {
        C::BadUserNamePassword => "bad_credentials",
        C::NotAuthorized => "not_authorized",
        C::ClientIdentifierNotValid => "bad_client_id",
        _ => "other",
    }
}

async fn connect(
    gw: &TestGateway,
    v: Version,
    client_id: &str,
    password: Option<&str>,
    clean: bool,
) -> Client {
    let (host, port, ws) = match transport() {
        Transport::Tcp => (
            "127.0.0.1".to_owned(),
            gw.gateway.addrs().mqtt.port(),
            false,
        ),
        Transport::Ws => {
            let http = gw.gateway.addrs().http;
            (format!("ws://{http}/mqtt"), http.port(), true)
        }
    };
    let (tx, events) = mpsc::unbounded_channel();
    let target = Target {
        client_id,
        host,
        port,
        ws,
        password,
        clean,
    };
    let handle = match v {
        Version::V4 => start_v4(&target, tx),
        Version::V5 => start_v5(&target, tx),
    };
    Client { handle, events }
}

/// Where and how a test client connects.
struct Target<'a> {
    client_id: &'a str,
    host: String,
    port: u16,
    ws: bool,
    password: Option<&'a str>,
    clean: bool,
}

/// A 3.1.1 client whose event loop forwards what the tests look at to `tx`.
fn start_v4(t: &Target<'_>, tx: mpsc::UnboundedSender<Ev>) -> Handle {
    let (client_id, host, port, ws, password, clean) = (
        t.client_id,
        t.host.clone(),
        t.port,
        t.ws,
        t.password,
        t.clean,
    );
    let mut o = rumqttc::MqttOptions::new(client_id, host, port);
    o.set_keep_alive(Duration::from_secs(30))
        .set_clean_session(clean);
    if ws {
        o.set_transport(rumqttc::Transport::Ws);
    }
    if let Some(p) = password {
        o.set_credentials("ignored", p);
    }
    let (client, mut eventloop) = rumqttc::AsyncClient::new(o, 100);
    tokio::spawn(async move {
        loop {
            let ev = match eventloop.poll().await {
                Ok(rumqttc::Event::Incoming(p)) => match p {
                    rumqttc::Packet::ConnAck(c) => Ev::ConnAck {
                        present: c.session_present,
                    },
                    rumqttc::Packet::SubAck(s) => Ev::SubAck(
                        s.return_codes
                            .into_iter()
                            .map(|c| match c {
                                rumqttc::SubscribeReasonCode::Success(q) => Ok(q as u8),
                                other => Err(format!("{other:?}")),
                            })
                            .collect(),
                    ),
                    rumqttc::Packet::Publish(p) => Ev::Publish {
                        topic: p.topic,
                        qos: p.qos as u8,
                        payload: p.payload,
                        retain: p.retain,
                    },
                    rumqttc::Packet::PubAck(_) => Ev::PubAck("Success".into()),
                    _ => continue,
                },
                Ok(_) => continue,
                Err(rumqttc::ConnectionError::ConnectionRefused(code)) => {
                    let _ = tx.send(Ev::Refused(refused_v4(code)));
                    return;
                }
                Err(e) => {
                    eprintln!("mqtt client ended: {e:?}");
                    let _ = tx.send(Ev::Closed);
                    return;
                }
            };
            if tx.send(ev).is_err() {
                return;
            }
        }
    });
    Handle::V4(client)
}

/// A 5 client whose event loop forwards what the tests look at to `tx`.
fn start_v5(t: &Target<'_>, tx: mpsc::UnboundedSender<Ev>) -> Handle {
    let (client_id, host, port, ws, password, clean) = (
        t.client_id,
        t.host.clone(),
        t.port,
        t.ws,
        t.password,
        t.clean,
    );
    use rumqttc::v5::mqttbytes::v5::Packet;
    let mut o = rumqttc::v5::MqttOptions::new(client_id, host, port);
    o.set_keep_alive(Duration::from_secs(30))
        .set_clean_start(clean);
    if ws {
        o.set_transport(rumqttc::Transport::Ws);
    }
    if !clean {
        o.set_session_expiry_interval(Some(3600));
    }
    if let Some(p) = password {
        o.set_credentials("ignored", p);
    }
    let (client, mut eventloop) = rumqttc::v5::AsyncClient::new(o, 100);
    tokio::spawn(async move {
        loop {
            let ev = match eventloop.poll().await {
                Ok(rumqttc::v5::Event::Incoming(p)) => match p {
                    Packet::ConnAck(c) => Ev::ConnAck {
                        present: c.session_present,
                    },
                    Packet::SubAck(s) => Ev::SubAck(
                        s.return_codes
                            .into_iter()
                            .map(|c| match c {
                                rumqttc::v5::mqttbytes::v5::SubscribeReasonCode::Success(q) => {
                                    Ok(q as u8)
                                }
                                other => Err(format!("{other:?}")),
                            })
                            .collect(),
                    ),
                    Packet::Publish(p) => Ev::Publish {
                        topic: String::from_utf8_lossy(&p.topic).into_owned(),
                        qos: p.qos as u8,
                        payload: p.payload,
                        retain: p.retain,
                    },
                    Packet::PubAck(a) => Ev::PubAck(format!("{:?}", a.reason)),
                    Packet::Disconnect(d) => Ev::Disconnect(format!("{:?}", d.reason_code)),
                    _ => continue,
                },
                Ok(_) => continue,
                Err(rumqttc::v5::ConnectionError::ConnectionRefused(code)) => {
                    let _ = tx.send(Ev::Refused(refused_v5(code)));
                    return;
                }
                // rumqttc reports a server DISCONNECT as a state error carrying its reason.
                Err(rumqttc::v5::ConnectionError::MqttState(
                    rumqttc::v5::StateError::ServerDisconnect { reason_code, .. },
                )) => {
                    let _ = tx.send(Ev::Disconnect(format!("{reason_code:?}")));
                    return;
                }
                Err(e) => {
                    eprintln!("mqtt client ended: {e:?}");
                    let _ = tx.send(Ev::Closed);
                    return;
                }
            };
            if tx.send(ev).is_err() {
                return;
            }
        }
    });
    Handle::V5(client)
}

fn qos4(q: u8) -> rumqttc::QoS {
    match q {
        0 => rumqttc::QoS::AtMostOnce,
        1 => rumqttc::QoS::AtLeastOnce,
        _ => rumqttc::QoS::ExactlyOnce,
    }
}

fn qos5(q: u8) -> rumqttc::v5::mqttbytes::QoS {
    match q {
        0 => rumqttc::v5::mqttbytes::QoS::AtMostOnce,
        1 => rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        _ => rumqttc::v5::mqttbytes::QoS::ExactlyOnce,
    }
}

impl Client {
    async fn next(&mut self) -> Ev {
        match tokio::time::timeout(WAIT, self.events.recv()).await {
            Ok(Some(ev)) => ev,
            Ok(None) => Ev::Closed,
            Err(_) => panic!("no MQTT event within {WAIT:?}"),
        }
    }

    async fn connected(
        gw: &TestGateway,
        v: Version,
        id: &str,
        token: &str,
        clean: bool,
    ) -> (Client, bool) {
        let mut c = connect(gw, v, id, Some(token), clean).await;
        match c.next().await {
            Ev::ConnAck { present } => (c, present),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    async fn subscribe(&mut self, filter: &str, qos: u8) -> Result<u8, String> {
        match &self.handle {
            Handle::V4(c) => c.subscribe(filter, qos4(qos)).await.unwrap(),
            Handle::V5(c) => c.subscribe(filter, qos5(qos)).await.unwrap(),
        }
        match self.next().await {
            Ev::SubAck(codes) => codes.into_iter().next().unwrap(),
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }

    async fn publish(&self, topic: &str, qos: u8, payload: &str) {
        self.publish_retain(topic, qos, payload, false).await
    }

    async fn publish_retain(&self, topic: &str, qos: u8, payload: &str, retain: bool) {
        let body = payload.as_bytes().to_vec();
        match &self.handle {
            Handle::V4(c) => c.publish(topic, qos4(qos), retain, body).await.unwrap(),
            Handle::V5(c) => c.publish(topic, qos5(qos), retain, body).await.unwrap(),
        }
    }

    /// The next PUBLISH, skipping acks.
    async fn message(&mut self) -> (String, u8, String) {
        let (topic, qos, payload, _) = self.message_retain().await;
        (topic, qos, payload)
    }

    /// The next PUBLISH with its RETAIN flag.
    async fn message_retain(&mut self) -> (String, u8, String, bool) {
        loop {
            match self.next().await {
                Ev::Publish {
                    topic,
                    qos,
                    payload,
                    retain,
                } => {
                    return (
                        topic,
                        qos,
                        String::from_utf8_lossy(&payload).into_owned(),
                        retain,
                    );
                }
                Ev::PubAck(_) => continue,
                other => panic!("expected PUBLISH, got {other:?}"),
            }
        }
    }

    async fn disconnect(&self) {
        match &self.handle {
            Handle::V4(c) => c.disconnect().await.unwrap(),
            Handle::V5(c) => c.disconnect().await.unwrap(),
        }
    }
}

// ---------- cases (each run for 3.1.1 and 5) ----------

async fn publish_and_subscribe_qos0_and_qos1(v: Version) {
    let gw = gateway(|_| {}).await;
    let t = token(
        "dev1",
        "gateway.read:amq.topic/sensors.# gateway.write:amq.topic/sensors.#",
    );
    let (mut sub, present) = Client::connected(&gw, v, &unique("sub"), &t, true).await;
    assert!(!present);
    assert_eq!(sub.subscribe("sensors/+/temp", 1).await, Ok(1));
    assert_eq!(sub.subscribe("sensors/k1/#", 0).await, Ok(0));
    let (publisher, _) = Client::connected(&gw, v, &unique("pub"), &t, true).await;
    publisher.publish("sensors/k1/temp", 1, "21.5").await;
    publisher.publish("sensors/k9/temp", 0, "19.0").await;
    let mut got = vec![
        sub.message().await,
        sub.message().await,
        sub.message().await,
    ];
    got.sort();
    assert_eq!(
        got,
        [
            ("sensors/k1/temp".to_owned(), 0, "21.5".to_owned()), // via the QoS 0 subscription
            ("sensors/k1/temp".to_owned(), 1, "21.5".to_owned()),
            ("sensors/k9/temp".to_owned(), 0, "19.0".to_owned()), // publish QoS 0 caps it
        ]
    );
}

async fn a_bad_or_missing_token_is_refused(v: Version) {
    let gw = gateway(|_| {}).await;
    let mut bad = connect(&gw, v, &unique("bad"), Some("not-a-token"), true).await;
    assert_eq!(bad.next().await, Ev::Refused("bad_credentials"));
    let mut none = connect(&gw, v, &unique("none"), None, true).await;
    assert_eq!(none.next().await, Ev::Refused("bad_credentials"));
    let mut useless = connect(&gw, v, &unique("useless"), Some(&token("nobody", "")), true).await;
    assert_eq!(useless.next().await, Ev::Refused("not_authorized"));
}

async fn subscriptions_and_publishes_are_checked_against_scopes(v: Version) {
    let gw = gateway(|_| {}).await;
    let t = token(
        "dev2",
        "gateway.read:amq.topic/news.# gateway.write:amq.topic/news.#",
    );
    let (mut c, _) = Client::connected(&gw, v, &unique("c"), &t, true).await;
    let refused = c.subscribe("secret/#", 1).await;
    match v {
        Version::V4 => assert_eq!(refused, Err("Failure".into())),
        Version::V5 => assert_eq!(refused, Err("NotAuthorized".into())),
    }
    assert!(
        c.subscribe("#", 0).await.is_err(),
        "# is not contained in news.#"
    );
    assert!(
        c.subscribe("a/*/b", 0).await.is_err(),
        "a '*' level is refused"
    );
    assert_eq!(c.subscribe("news/#", 1).await, Ok(1));
    let q = gw.queue("mqtt-spy").await;
    gw.bind(&q, "amq.topic", "secret.#").await;
    c.publish("secret/plans", 1, "no").await;
    match v {
        // 3.1.1 cannot say no: acknowledged and dropped.
        Version::V4 => assert_eq!(c.next().await, Ev::PubAck("Success".into())),
        Version::V5 => assert_eq!(c.next().await, Ev::PubAck("NotAuthorized".into())),
    }
    assert_eq!(gw.depth(&q).await, 0, "a refused publish reaches nobody");
    c.publish("news/today", 1, "yes").await;
    assert_eq!(
        c.message().await,
        ("news/today".to_owned(), 1, "yes".to_owned())
    );
}

async fn mqtt_and_rest_meet_on_amq_topic(v: Version) {
    let gw = gateway(|_| {}).await;
    // MQTT → REST: topic a/b.c maps to routing key a.b/c.
    let q = gw.queue("from-mqtt").await;
    gw.bind(&q, "amq.topic", "plant.#").await;
    let t = token(
        "dev3",
        "gateway.write:amq.topic/plant.# gateway.read:amq.topic/plant.#",
    );
    let (mut c, _) = Client::connected(&gw, v, &unique("x"), &t, true).await;
    c.publish("plant/line.1/speed", 1, "42").await;
    assert!(matches!(c.next().await, Ev::PubAck(_)));
    let got = gw.take(&q, 1).await;
    assert_eq!(got[0]["routing_key"], "plant.line/1.speed");
    assert_eq!(got[0]["body"], "42");
    assert_eq!(
        got[0]["properties"]["delivery_mode"], 2,
        "QoS 1 is persistent"
    );
    assert_eq!(got[0]["properties"]["headers"]["x-gateway-sub"], "dev3");
    // REST → MQTT: routing key plant.line/2.temp reaches plant/+/temp as plant/line.2/temp.
    assert_eq!(c.subscribe("plant/+/temp", 1).await, Ok(1));
    let r = gw
        .post("/v1/exchanges/amq.topic/publish", &admin())
        .json(&json!({"routing_key": "plant.line/2.temp", "body": "from rest", "properties": {"delivery_mode": 2}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        c.message().await,
        ("plant/line.2/temp".to_owned(), 1, "from rest".to_owned())
    );
}

/// A publisher's messages are cloned from a template of its last one's shape (docs/mqtt.md):
/// each must still carry its own QoS, retain flag and delivery mode when the shape changes
/// from one publish to the next, and the publisher's subject and session every time.
async fn each_publish_carries_its_own_headers(v: Version) {
    let gw = gateway(|_| {}).await;
    let q = gw.queue("shapes").await;
    gw.bind(&q, "amq.topic", "line.#").await;
    let t = token("dev4", "gateway.write:amq.topic/line.#");
    let (mut c, _) = Client::connected(&gw, v, &unique("x"), &t, true).await;
    // The last one acknowledged, so all are in the queue once its PUBACK is in.
    let sent = [
        (0, false),
        (1, false),
        (0, false),
        (1, true),
        (0, true),
        (1, false),
    ];
    for (i, (qos, retain)) in sent.iter().enumerate() {
        c.publish_retain("line/speed", *qos, &i.to_string(), *retain)
            .await;
        if *qos == 1 {
            assert!(matches!(c.next().await, Ev::PubAck(_)));
        }
    }
    let got = gw.take(&q, sent.len() as u32).await;
    assert_eq!(got.len(), sent.len(), "{got:?}");
    let origin = &got[0]["properties"]["headers"]["x-mqtt-origin"];
    assert!(origin.is_string(), "{:?}", got[0]);
    for (i, (qos, retain)) in sent.iter().enumerate() {
        let m = &got[i];
        assert_eq!(m["body"], i.to_string(), "in order: {got:?}");
        let headers = &m["properties"]["headers"];
        assert_eq!(headers["x-mqtt-publish-qos"], *qos, "{m:?}");
        assert_eq!(headers["x-gateway-sub"], "dev4", "{m:?}");
        assert_eq!(&headers["x-mqtt-origin"], origin, "{m:?}");
        let expected_retain = if *retain { json!(true) } else { json!(null) };
        assert_eq!(headers["x-mqtt-retain"], expected_retain, "{m:?}");
        let mode = if *qos > 0 { 2 } else { 1 };
        assert_eq!(m["properties"]["delivery_mode"], mode, "{m:?}");
    }
}

async fn persistent_sessions_keep_messages_for_their_return(v: Version) {
    let gw = gateway(|_| {}).await;
    let t = token(
        "dev4",
        "gateway.read:amq.topic/inbox.# gateway.write:amq.topic/inbox.#",
    );
    let id = unique("persist");
    let (mut c, present) = Client::connected(&gw, v, &id, &t, false).await;
    assert!(!present);
    assert_eq!(c.subscribe("inbox/#", 1).await, Ok(1));
    c.disconnect().await;
    assert_eq!(c.next().await, Ev::Closed);
    let (sender, _) = Client::connected(&gw, v, &unique("sender"), &t, true).await;
    sender.publish("inbox/n1", 1, "while away").await;
    tokio::time::sleep(Duration::from_millis(200)).await; // the sender's own PUBACK round trip
    let (mut back, present) = Client::connected(&gw, v, &id, &t, false).await;
    assert!(present, "Session Present on return");
    assert_eq!(
        back.message().await,
        ("inbox/n1".to_owned(), 1, "while away".to_owned())
    );
    // A clean start throws the session away.
    back.disconnect().await;
    let (_fresh, present) = Client::connected(&gw, v, &id, &t, true).await;
    assert!(!present);
}

/// Issue 13: the session (its subscriptions, its stored state) and the QoS 1 messages queued for
/// it are on disk; a restarted gateway resumes it.
async fn persistent_sessions_survive_a_restart(v: Version) {
    // Embedded: a data directory; upstream: a vhost, where the session lives.
    let place = under::Place::new().await;
    let t = token(
        "dev9",
        "gateway.read:amq.topic/depot.# gateway.write:amq.topic/depot.#",
    );
    let id = unique("survivor");
    let gw = place.start().await;
    let (mut c, _) = Client::connected(&gw, v, &id, &t, false).await;
    assert_eq!(c.subscribe("depot/#", 1).await, Ok(1));
    c.disconnect().await;
    assert_eq!(c.next().await, Ev::Closed);
    let (mut sender, _) = Client::connected(&gw, v, &unique("sender"), &t, true).await;
    for n in ["one", "two"] {
        sender.publish(&format!("depot/{n}"), 1, n).await;
        assert!(matches!(sender.next().await, Ev::PubAck(_)), "confirmed");
    }
    sender.disconnect().await;
    gw.gateway.shutdown().await;

    let gw = place.start().await;
    let (mut back, present) = Client::connected(&gw, v, &id, &t, false).await;
    assert!(present, "the session came back");
    for n in ["one", "two"] {
        assert_eq!(
            back.message().await,
            (format!("depot/{n}"), 1, n.to_owned())
        );
    }
    // The subscription's binding came back too: new messages still reach the session.
    let (mut sender, _) = Client::connected(&gw, v, &unique("sender"), &t, true).await;
    sender.publish("depot/three", 1, "three").await;
    assert!(matches!(sender.next().await, Ev::PubAck(_)));
    assert_eq!(
        back.message().await,
        ("depot/three".to_owned(), 1, "three".to_owned())
    );
}

async fn a_second_connection_takes_the_client_id_over(v: Version) {
    let gw = gateway(|_| {}).await;
    let t = token("dev5", "gateway.read:amq.topic/t.#");
    let id = unique("twin");
    let (mut first, _) = Client::connected(&gw, v, &id, &t, true).await;
    let (mut second, _) = Client::connected(&gw, v, &id, &t, true).await;
    match v {
        Version::V4 => assert_eq!(first.next().await, Ev::Closed),
        Version::V5 => {
            assert_eq!(
                first.next().await,
                Ev::Disconnect("SessionTakenOver".into())
            );
        }
    }
    assert_eq!(second.subscribe("t/#", 0).await, Ok(0));
    // Another subject with the same client id is another session.
    let (mut stranger, _) = Client::connected(
        &gw,
        v,
        &id,
        &token("dev6", "gateway.read:amq.topic/t.#"),
        true,
    )
    .await;
    assert_eq!(stranger.subscribe("t/#", 0).await, Ok(0));
    second.subscribe("t/x", 0).await.unwrap();
}

/// Each case runs for {TCP, WebSocket} × {3.1.1, 5} (nextest gives every test its own
/// process, so the transport is set once per process).
async fn retained_messages_greet_new_subscribers(v: Version) {
    let gw = gateway(|_| {}).await;
    let t = token(
        "dev7",
        "gateway.read:amq.topic/home.# gateway.write:amq.topic/home.#",
    );
    let (mut p, _) = Client::connected(&gw, v, &unique("p"), &t, true).await;
    p.publish_retain("home/kitchen/temp", 1, "21", true).await;
    p.publish_retain("home/hall/temp", 1, "19", true).await;
    p.publish_retain("home/hall/light", 1, "on", true).await;
    // Wait for the three PUBACKs: the retained store has them.
    for _ in 0..3 {
        assert!(matches!(p.next().await, Ev::PubAck(_)));
    }
    let (mut s, _) = Client::connected(&gw, v, &unique("s"), &t, true).await;
    assert_eq!(s.subscribe("home/+/temp", 1).await, Ok(1));
    let mut got = vec![s.message_retain().await, s.message_retain().await];
    got.sort();
    assert_eq!(
        got,
        [
            ("home/hall/temp".to_owned(), 1, "19".to_owned(), true),
            ("home/kitchen/temp".to_owned(), 1, "21".to_owned(), true),
        ]
    );
    // Live messages to an existing subscription carry RETAIN=0.
    p.publish_retain("home/hall/temp", 1, "20", true).await;
    assert_eq!(
        s.message_retain().await,
        ("home/hall/temp".to_owned(), 1, "20".to_owned(), false)
    );
    // Its PUBACK first, or the next one awaited below could be this one.
    assert!(matches!(p.next().await, Ev::PubAck(_)));
    // An empty retained payload clears it; the exact filter finds only what is left.
    p.publish_retain("home/hall/light", 1, "", true).await;
    assert!(matches!(p.next().await, Ev::PubAck(_)));
    let (mut late, _) = Client::connected(&gw, v, &unique("late"), &t, true).await;
    assert_eq!(late.subscribe("home/hall/#", 0).await, Ok(0));
    assert_eq!(
        late.message_retain().await,
        ("home/hall/temp".to_owned(), 0, "20".to_owned(), true)
    );
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(
        late.events.try_recv().is_err(),
        "the cleared topic is not retained"
    );
    // A QoS 0 retained copy must not upset the QoS 0 buffer accounting: live QoS 0
    // deliveries keep flowing to the same connection.
    p.publish("home/hall/door", 0, "open").await;
    assert_eq!(
        late.message_retain().await,
        ("home/hall/door".to_owned(), 0, "open".to_owned(), false)
    );
}

/// Upstream serves QoS 1 (DESIGN.md §3): QoS 2 subscriptions are granted 1; a v5 QoS 2
/// PUBLISH, beyond the CONNACK's Maximum QoS 1, gets DISCONNECT 0x9B; a 3.1.1 one completes
/// its handshake and is delivered at least once.
async fn qos2_served_as_qos1_upstream(gw: &TestGateway, v: Version, mut sub: Client, t: &str) {
    assert_eq!(
        sub.subscribe("q2/#", 2).await,
        Ok(1),
        "upstream grants QoS 1"
    );
    let (mut publisher, _) = Client::connected(gw, v, &unique("p2"), t, true).await;
    publisher.publish("q2/a", 2, "at least once").await;
    match v {
        Version::V5 => {
            assert_eq!(
                publisher.next().await,
                Ev::Disconnect("QoSNotSupported".into())
            );
            let nothing = tokio::time::timeout(Duration::from_millis(300), sub.events.recv()).await;
            assert!(nothing.is_err(), "refused, not delivered: {nothing:?}");
        }
        Version::V4 => assert_eq!(
            sub.message().await,
            ("q2/a".to_owned(), 1, "at least once".to_owned())
        ),
    }
}

async fn qos2_end_to_end(v: Version) {
    let gw = gateway(|_| {}).await;
    let t = token(
        "dev8",
        "gateway.read:amq.topic/q2.# gateway.write:amq.topic/q2.#",
    );
    let sub_id = unique("s2");
    let (mut sub, _) = Client::connected(&gw, v, &sub_id, &t, true).await;
    if under::upstream() {
        return qos2_served_as_qos1_upstream(&gw, v, sub, &t).await;
    }
    assert_eq!(
        sub.subscribe("q2/#", 2).await,
        Ok(2),
        "the embedded engine grants QoS 2"
    );
    let (mut publisher, _) = Client::connected(&gw, v, &unique("p2"), &t, true).await;
    publisher.publish("q2/a", 2, "exactly once").await;
    publisher.publish("q2/b", 1, "at least once").await;
    assert_eq!(
        sub.message().await,
        ("q2/a".to_owned(), 2, "exactly once".to_owned())
    );
    assert_eq!(
        sub.message().await,
        ("q2/b".to_owned(), 1, "at least once".to_owned()),
        "capped by the publish QoS"
    );
    let _ = &mut publisher;
    // rumqttc completed PUBREC/PUBREL/PUBCOMP and PUBACK: the engine holds nothing unacked.
    let queue = amqp_gateway::protocol::mqtt::topic::session_queue("dev8", &sub_id, "qos1");
    common::eventually("deliveries settled with the engine", || async {
        let v: serde_json::Value = gw
            .get(&format!("/v1/queues/{queue}"), &admin())
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v["messages"] == 0 && v["messages_unacknowledged"] == 0
    })
    .await;
}

async fn shared_subscriptions_compete(v: Version) {
    let gw = gateway(|_| {}).await;
    let t = token(
        "dev9",
        "gateway.read:amq.topic/jobs.# gateway.write:amq.topic/jobs.#",
    );
    let group = unique("g");
    let filter = format!("$share/{group}/jobs/#");
    let (mut a, _) = Client::connected(&gw, v, &unique("a"), &t, true).await;
    let (mut b, _) = Client::connected(&gw, v, &unique("b"), &t, true).await;
    assert_eq!(a.subscribe(&filter, 1).await, Ok(1));
    assert_eq!(b.subscribe(&filter, 1).await, Ok(1));
    let (p, _) = Client::connected(&gw, v, &unique("p"), &t, true).await;
    for i in 0..10 {
        p.publish(&format!("jobs/{i}"), 1, &i.to_string()).await;
    }
    let mut got = Vec::new();
    let (mut from_a, mut from_b) = (0, 0);
    while got.len() < 10 {
        tokio::select! {
            m = a.message() => { from_a += 1; got.push(m.2); }
            m = b.message() => { from_b += 1; got.push(m.2); }
        }
    }
    got.sort_by_key(|s| s.parse::<u32>().unwrap());
    let expected: Vec<String> = (0..10).map(|i| i.to_string()).collect();
    assert_eq!(got, expected, "every job once, none twice");
    assert!(
        from_a > 0 && from_b > 0,
        "both members worked: {from_a} / {from_b}"
    );
    // A QoS 0 copy through a shared subscription, then a QoS 0 delivery on the session's own
    // queue: both reach the client (the QoS 0 buffer accounting covers both paths).
    let (mut c, _) = Client::connected(&gw, v, &unique("c"), &t, true).await;
    assert_eq!(
        c.subscribe(&format!("$share/{group}-q0/jobs/q0"), 0).await,
        Ok(0)
    );
    assert_eq!(c.subscribe("jobs/plain", 0).await, Ok(0));
    p.publish("jobs/q0", 0, "shared-q0").await;
    assert_eq!(
        c.message().await,
        ("jobs/q0".to_owned(), 0, "shared-q0".to_owned())
    );
    p.publish("jobs/plain", 0, "plain-q0").await;
    assert_eq!(
        c.message().await,
        ("jobs/plain".to_owned(), 0, "plain-q0".to_owned())
    );
    // The queue is the group's, named as DESIGN.md §3 says.
    let queue = amqp_gateway::protocol::mqtt::topic::shared_queue(&group, "jobs/#");
    assert!(queue.starts_with("mqtt-shared-"), "{queue}");
    // Its name holds %-escapes, which a URL path escapes again.
    let path = format!("/v1/queues/{}", queue.replace('%', "%25"));
    let r = gw.get(&path, &admin()).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

async fn resumed_subscriptions_are_rechecked(v: Version) {
    let gw = gateway(|_| {}).await;
    let id = unique("recheck");
    let wide = token(
        "dev10",
        "gateway.read:amq.topic/inbox.# gateway.read:amq.topic/admin.#",
    );
    let (mut c, _) = Client::connected(&gw, v, &id, &wide, false).await;
    assert_eq!(c.subscribe("inbox/#", 1).await, Ok(1));
    assert_eq!(c.subscribe("admin/#", 1).await, Ok(1));
    c.disconnect().await;
    assert_eq!(c.next().await, Ev::Closed);
    // The same session comes back with a token that no longer reads admin.#.
    let narrow = token("dev10", "gateway.read:amq.topic/inbox.#");
    let (mut back, present) = Client::connected(&gw, v, &id, &narrow, false).await;
    assert!(present);
    for key in ["admin.secret", "inbox.mail"] {
        let r = gw
            .post("/v1/exchanges/amq.topic/publish", &admin())
            .json(&json!({"routing_key": key, "body": key, "properties": {"delivery_mode": 2}}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    assert_eq!(
        back.message().await,
        ("inbox/mail".to_owned(), 1, "inbox.mail".to_owned())
    );
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(
        back.events.try_recv().is_err(),
        "admin/# was removed on resume"
    );
}

macro_rules! matrix {
    ($($case:ident),* $(,)?) => {
        matrix!(@mods v3_1_1_tcp, Tcp, V4, Embedded; $($case),*);
        matrix!(@mods v5_tcp, Tcp, V5, Embedded; $($case),*);
        matrix!(@mods v3_1_1_ws, Ws, V4, Embedded; $($case),*);
        matrix!(@mods v5_ws, Ws, V5, Embedded; $($case),*);
        matrix!(@mods upstream_v3_1_1_tcp, Tcp, V4, Upstream; $($case),*);
        matrix!(@mods upstream_v5_tcp, Tcp, V5, Upstream; $($case),*);
        matrix!(@mods upstream_v3_1_1_ws, Ws, V4, Upstream; $($case),*);
        matrix!(@mods upstream_v5_ws, Ws, V5, Upstream; $($case),*);
    };
    (@mods $m:ident, $t:ident, $v:ident, $e:ident; $($case:ident),*) => {
        mod $m {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $case() {
                let _ = super::TRANSPORT.set(super::Transport::$t);
                let _ = super::under::ENGINE.set(super::under::Engine::$e);
                super::$case(super::Version::$v).await
            } )*
        }
    };
}

matrix!(
    publish_and_subscribe_qos0_and_qos1,
    a_bad_or_missing_token_is_refused,
    subscriptions_and_publishes_are_checked_against_scopes,
    mqtt_and_rest_meet_on_amq_topic,
    each_publish_carries_its_own_headers,
    persistent_sessions_keep_messages_for_their_return,
    persistent_sessions_survive_a_restart,
    a_second_connection_takes_the_client_id_over,
    retained_messages_greet_new_subscribers,
    qos2_end_to_end,
    shared_subscriptions_compete,
    resumed_subscriptions_are_rechecked,
);
