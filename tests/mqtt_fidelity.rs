//! MQTT 5 fidelity (DESIGN.md §3), seen on the wire: what one client sent reaches another
//! exactly — user properties unaltered and in order, content type, payload format indicator,
//! response topic, correlation data, message expiry counted down — live, retained and as a will;
//! the DISCONNECT's Session Expiry Interval and reason 0x04; Server Keep Alive; outbound topic
//! aliases; a server DISCONNECT that reaches a client still sending. Each case runs over TCP and
//! over WebSocket (`/mqtt`).
//!
//! The client side is rumqttc's MQTT 5 packet codec on a raw socket (not its event loop, which
//! would resolve topic aliases and hide what went over the wire).

mod common;

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use common::mqtt_bytes::{connect_ka, remaining_length};
use common::mqtt_wire::{End, Io, Transport};
use common::{TestGateway, WAIT, admin, start_gateway, token, unique};
use futures_util::SinkExt;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{
    ConnAck, Connect, ConnectProperties, Disconnect, DisconnectProperties, DisconnectReasonCode,
    Filter, LastWill, LastWillProperties, Login, Packet, PubAck, Publish, PublishProperties,
    Subscribe,
};
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::Message as WsMessage;

/// One MQTT connection on a raw socket, TCP or WebSocket.
struct Wire {
    io: Io,
    buf: BytesMut,
}

async fn open(gw: &TestGateway, t: Transport) -> Wire {
    Wire {
        io: Io::open(gw, t).await,
        buf: BytesMut::new(),
    }
}

impl Wire {
    async fn send_raw(&mut self, bytes: &[u8]) {
        self.io.send_raw(bytes).await;
    }

    async fn send(&mut self, p: Packet) {
        let mut out = BytesMut::new();
        p.write(&mut out, None).expect("encode");
        self.send_raw(&out).await;
    }

    /// More bytes from the gateway; `Err` when the connection ended.
    async fn fill(&mut self) -> Result<(), End> {
        self.io.fill(&mut self.buf).await
    }

    /// The next packet and its encoded size, or how the connection ended.
    async fn recv_sized(&mut self) -> Result<(Packet, usize), End> {
        let read = async {
            loop {
                // A DISCONNECT without reason code (0 = normal) has no body; rumqttc wants one.
                if self.buf.starts_with(&[0xE0, 0x00]) {
                    let _ = self.buf.split_to(2);
                    return Ok((
                        Packet::Disconnect(Disconnect::new(
                            DisconnectReasonCode::NormalDisconnection,
                        )),
                        2,
                    ));
                }
                let before = self.buf.len();
                match Packet::read(&mut self.buf, None) {
                    Ok(p) => return Ok((p, before - self.buf.len())),
                    Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => self.fill().await?,
                    Err(e) => panic!("undecodable packet from the gateway: {e}"),
                }
            }
        };
        tokio::time::timeout(WAIT, read)
            .await
            .expect("a packet or the end of the connection in time")
    }

    async fn recv(&mut self) -> Option<Packet> {
        match self.recv_sized().await {
            Ok((p, _)) => Some(p),
            Err(End::Clean) => None,
            Err(End::Error(e)) => panic!("connection failed: {e}"),
        }
    }

    /// The next PUBLISH with its encoded size (PINGRESP and acks in between are skipped).
    async fn publish_sized(&mut self) -> (Publish, usize) {
        loop {
            match self.recv_sized().await {
                Ok((Packet::Publish(p), size)) => return (p, size),
                Ok(_) => continue,
                Err(end) => panic!("connection ended ({end:?}) while a PUBLISH was expected"),
            }
        }
    }

    async fn publish(&mut self) -> Publish {
        self.publish_sized().await.0
    }

    /// Acknowledges a QoS 1 delivery.
    async fn ack(&mut self, p: &Publish) {
        if p.qos == QoS::AtLeastOnce {
            self.send(Packet::PubAck(PubAck::new(p.pkid, None))).await;
        }
    }

    async fn subscribe(&mut self, filter: &str, qos: QoS) {
        let mut f = Filter::new(filter, qos);
        f.nolocal = false;
        let mut s = Subscribe::new(f, None);
        s.pkid = 1;
        self.send(Packet::Subscribe(s)).await;
        loop {
            match self.recv().await {
                Some(Packet::SubAck(s)) => {
                    assert!(
                        format!("{:?}", s.return_codes).contains("Success"),
                        "SUBACK {s:?}"
                    );
                    return;
                }
                Some(_) => continue,
                None => panic!("closed before SUBACK"),
            }
        }
    }

    /// Publishes at QoS 1 and waits for a successful PUBACK.
    async fn publish_qos1(&mut self, mut p: Publish, pkid: u16) {
        p.qos = QoS::AtLeastOnce;
        p.pkid = pkid;
        self.send(Packet::Publish(p)).await;
        loop {
            match self.recv().await {
                Some(Packet::PubAck(a)) if a.pkid == pkid => {
                    assert_eq!(format!("{:?}", a.reason), "Success", "PUBACK reason {a:?}");
                    return;
                }
                Some(_) => continue,
                None => panic!("closed before PUBACK"),
            }
        }
    }

    /// A CONNACK read as raw bytes (either version), which must accept.
    async fn raw_connack(&mut self) {
        while self.buf.len() < 4 || self.buf.len() < 2 + self.buf[1] as usize {
            self.fill().await.expect("CONNACK");
        }
        assert_eq!((self.buf[0], self.buf[3]), (0x20, 0), "CONNACK accepted");
        let _ = self.buf.split_to(2 + self.buf[1] as usize);
    }

    /// How the connection ends from here on, skipping packets; the first DISCONNECT's reason.
    async fn end(&mut self) -> (Option<DisconnectReasonCode>, End) {
        let mut reason = None;
        loop {
            match self.recv_sized().await {
                Ok((Packet::Disconnect(d), _)) => {
                    reason.get_or_insert(d.reason_code);
                }
                Ok(_) => {}
                Err(end) => return (reason, end),
            }
        }
    }
}

/// What a CONNECT asks for beyond the defaults.
#[derive(Default)]
struct Opts {
    keep_alive: u16,
    clean: bool,
    props: ConnectProperties,
    will: Option<LastWill>,
}

/// Default options with a QoS 0 will of `payload` on `topic`, without properties.
fn with_will(topic: &str, payload: &'static str) -> Opts {
    let mut o = opts();
    o.will = Some(LastWill::new(topic, payload, QoS::AtMostOnce, false, None));
    o
}

fn opts() -> Opts {
    Opts {
        keep_alive: 30,
        clean: true,
        props: ConnectProperties::new(),
        will: None,
    }
}

/// Connects (MQTT 5) and returns the connection with its CONNACK, which must accept.
async fn connect(
    gw: &TestGateway,
    t: Transport,
    client: &str,
    tok: &str,
    o: Opts,
) -> (Wire, ConnAck) {
    let mut w = open(gw, t).await;
    let connect = Connect {
        keep_alive: o.keep_alive,
        client_id: client.to_owned(),
        clean_start: o.clean,
        properties: Some(o.props),
    };
    w.send(Packet::Connect(
        connect,
        o.will,
        Some(Login::new("device", tok)),
    ))
    .await;
    match w.recv().await {
        Some(Packet::ConnAck(c)) => {
            assert_eq!(format!("{:?}", c.code), "Success", "CONNACK {c:?}");
            (w, c)
        }
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

const SCOPE: &str = "gateway.read:amq.topic/fid.# gateway.write:amq.topic/fid.#";

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Every property a publisher can give a message, with user properties an AMQP table alone
/// could not carry (a repeated name, out of order, a name the gateway uses itself).
fn full_props() -> PublishProperties {
    PublishProperties {
        payload_format_indicator: Some(1),
        message_expiry_interval: Some(120),
        topic_alias: None,
        response_topic: Some("fid/replies/r1".into()),
        correlation_data: Some(Bytes::from_static(&[0x00, 0xFF, b'c', b'1'])),
        user_properties: pairs(&[
            ("zeta", "1"),
            ("alpha", "2"),
            ("zeta", "3"),
            ("x-gateway-sub", "someone else"),
        ]),
        subscription_identifiers: Vec::new(),
        content_type: Some("text/plain; charset=utf-8".into()),
    }
}

/// The properties a receiver must see for a message sent with `sent` (expiry counted down).
fn assert_same_properties(got: &Publish, sent: &PublishProperties) {
    let props = got.properties.clone().expect("MQTT 5 properties");
    assert_eq!(
        props.user_properties, sent.user_properties,
        "user properties, exactly"
    );
    assert_eq!(props.content_type, sent.content_type);
    assert_eq!(
        props.payload_format_indicator,
        sent.payload_format_indicator
    );
    assert_eq!(props.response_topic, sent.response_topic);
    assert_eq!(props.correlation_data, sent.correlation_data);
    let left = props.message_expiry_interval.expect("message expiry");
    let sent_expiry = sent.message_expiry_interval.unwrap_or(0);
    assert!(
        left >= 1 && left <= sent_expiry,
        "expiry counted down: {left} of {sent_expiry}"
    );
}

fn publish(topic: &str, payload: &'static str, props: Option<PublishProperties>) -> Publish {
    Publish::new(topic, QoS::AtMostOnce, payload, props)
}

// ---------- the cases ----------

/// Live delivery: every property arrives exactly as sent, nothing added; AMQP consumers see
/// the AMQP form with the gateway's stamp; a receiver whose Maximum Packet Size fits the packet
/// to the byte receives it, one byte less does not.
async fn live_properties_arrive_exactly(t: Transport) {
    let gw = start_gateway(|_| {}).await;
    let tok = token("fidelity", SCOPE);
    let prefix = unique("live").replace('-', "_");
    let topic = format!("fid/{prefix}/t");
    let q = gw.queue("fid-amqp").await;
    gw.bind(&q, "amq.topic", &format!("fid.{prefix}.#")).await;

    let (mut sub, _) = connect(&gw, t, &unique("sub"), &tok, opts()).await;
    sub.subscribe(&format!("fid/{prefix}/#"), QoS::AtLeastOnce)
        .await;
    let (mut publisher, _) = connect(&gw, t, &unique("pub"), &tok, opts()).await;
    let sent = full_props();
    publisher
        .publish_qos1(publish(&topic, "héllo", Some(sent.clone())), 1)
        .await;
    let (got, size) = sub.publish_sized().await;
    assert_eq!(got.topic, topic.as_bytes());
    assert_eq!(got.payload, "héllo".as_bytes());
    assert_same_properties(&got, &sent);
    sub.ack(&got).await;

    // The AMQP side: the headers it can hold, the exact list, the indicator, the stamp.
    let m = gw.take(&q, 1).await.remove(0);
    let h = &m["properties"]["headers"];
    assert_eq!(
        h["x-gateway-sub"], "fidelity",
        "the stamp, not the client's value"
    );
    assert_eq!(h["alpha"], "2");
    assert_eq!(h["x-mqtt-payload-format"], 1);
    assert_eq!(
        h["x-mqtt-user-properties"],
        json!([
            ["zeta", "1"],
            ["alpha", "2"],
            ["zeta", "3"],
            ["x-gateway-sub", "someone else"]
        ])
    );
    assert_eq!(m["properties"]["content_type"], "text/plain; charset=utf-8");
    assert_eq!(m["properties"]["reply_to"], "fid.replies.r1");

    // Maximum Packet Size: exactly the packet's size is enough, one byte less is not.
    let sized = |max: u32| {
        let mut o = opts();
        o.props.max_packet_size = Some(max);
        o
    };
    let size = u32::try_from(size).unwrap();
    let (mut fits, _) = connect(&gw, t, &unique("fits"), &tok, sized(size)).await;
    fits.subscribe(&format!("fid/{prefix}/#"), QoS::AtLeastOnce)
        .await;
    let (mut short, _) = connect(&gw, t, &unique("short"), &tok, sized(size - 1)).await;
    short
        .subscribe(&format!("fid/{prefix}/#"), QoS::AtLeastOnce)
        .await;
    publisher
        .publish_qos1(publish(&topic, "héllo", Some(sent.clone())), 2)
        .await;
    publisher
        .publish_qos1(publish(&topic, "small", None), 3)
        .await;
    let (got, got_size) = fits.publish_sized().await;
    assert_eq!(
        (got.payload.as_ref(), got_size),
        ("héllo".as_bytes(), size as usize)
    );
    assert_same_properties(&got, &sent);
    assert_eq!(
        short.publish().await.payload,
        "small".as_bytes(),
        "the packet one byte over the limit was dropped, the next one delivered"
    );
}

/// `mqtt.sender_property` names a user property for the publisher's subject; it comes after
/// what the publisher sent.
async fn sender_property_is_opt_in(t: Transport) {
    let gw = start_gateway(|c| c.mqtt.sender_property = Some("sender".into())).await;
    let tok = token("named", SCOPE);
    let prefix = unique("sender").replace('-', "_");
    let (mut sub, _) = connect(&gw, t, &unique("sub"), &tok, opts()).await;
    sub.subscribe(&format!("fid/{prefix}"), QoS::AtMostOnce)
        .await;
    let (mut publisher, _) = connect(&gw, t, &unique("pub"), &tok, opts()).await;
    let props = PublishProperties {
        user_properties: pairs(&[("k", "v")]),
        ..Default::default()
    };
    publisher
        .publish_qos1(publish(&format!("fid/{prefix}"), "x", Some(props)), 1)
        .await;
    let got = sub.publish().await;
    assert_eq!(
        got.properties.expect("properties").user_properties,
        pairs(&[("k", "v"), ("sender", "named")])
    );
}

/// A retained message reaches a later subscriber with every property of the live copy, its
/// expiry counted down; an expired one reaches nobody.
async fn retained_messages_keep_their_properties(t: Transport) {
    let gw = start_gateway(|_| {}).await;
    let tok = token("fidelity", SCOPE);
    let prefix = unique("ret").replace('-', "_");
    let (mut publisher, _) = connect(&gw, t, &unique("pub"), &tok, opts()).await;
    let sent = full_props();
    let mut p = publish(
        &format!("fid/{prefix}/kept"),
        "retained",
        Some(sent.clone()),
    );
    p.retain = true;
    publisher.publish_qos1(p, 1).await;
    let short = PublishProperties {
        message_expiry_interval: Some(1),
        ..Default::default()
    };
    let mut p = publish(&format!("fid/{prefix}/gone"), "short-lived", Some(short));
    p.retain = true;
    publisher.publish_qos1(p, 2).await;
    // Expiry is a time: waited for, not raced.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let (mut sub, _) = connect(&gw, t, &unique("sub"), &tok, opts()).await;
    sub.subscribe(&format!("fid/{prefix}/#"), QoS::AtLeastOnce)
        .await;
    let got = sub.publish().await;
    assert!(got.retain, "RETAIN=1");
    assert_eq!(got.topic, format!("fid/{prefix}/kept").as_bytes());
    assert_same_properties(&got, &sent);
    sub.ack(&got).await;
    // The expired one is not sent: the next thing this client gets is a live publish.
    publisher
        .publish_qos1(publish(&format!("fid/{prefix}/live"), "live", None), 3)
        .await;
    let next = sub.publish().await;
    assert_eq!(
        next.payload,
        "live".as_bytes(),
        "the expired retained message was not sent"
    );
}

/// A retained publish the engine refuses (a bound queue with `x-overflow: reject-publish` is
/// full: v5 PUBACK 0x97) leaves the retained message it would have replaced in place.
async fn a_refused_retained_publish_keeps_the_old_one(t: Transport) {
    let gw = start_gateway(|_| {}).await;
    let tok = token("fidelity", SCOPE);
    let prefix = unique("refused").replace('-', "_");
    let topic = format!("fid/{prefix}/state");
    let (mut publisher, _) = connect(&gw, t, &unique("pub"), &tok, opts()).await;
    let mut p = publish(&topic, "old", None);
    p.retain = true;
    publisher.publish_qos1(p, 1).await;

    let full = unique("full");
    let r = gw
        .put(&format!("/v1/queues/{full}"), &admin())
        .json(&json!({"arguments": {"x-max-length": 0, "x-overflow": "reject-publish"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    gw.bind(&full, "amq.topic", &format!("fid.{prefix}.state"))
        .await;
    let mut p = publish(&topic, "refused", None);
    p.retain = true;
    p.qos = QoS::AtLeastOnce;
    p.pkid = 2;
    publisher.send(Packet::Publish(p)).await;
    match publisher.recv().await {
        Some(Packet::PubAck(a)) => assert_eq!(format!("{:?}", a.reason), "QuotaExceeded"),
        other => panic!("expected PUBACK 0x97, got {other:?}"),
    }

    let (mut sub, _) = connect(&gw, t, &unique("sub"), &tok, opts()).await;
    sub.subscribe(&topic, QoS::AtMostOnce).await;
    assert_eq!(sub.publish().await.payload, "old".as_bytes());
}

/// A will keeps its properties; DISCONNECT with reason 0x04 publishes it, and a retained will
/// keeps them for later subscribers too.
async fn will_keeps_its_properties_and_0x04_sends_it(t: Transport) {
    let gw = start_gateway(|_| {}).await;
    let tok = token("fidelity", SCOPE);
    let prefix = unique("will").replace('-', "_");
    let will_topic = format!("fid/{prefix}/status");
    let (mut sub, _) = connect(&gw, t, &unique("sub"), &tok, opts()).await;
    sub.subscribe(&format!("fid/{prefix}/#"), QoS::AtLeastOnce)
        .await;

    let sent = full_props();
    let will_props = LastWillProperties {
        delay_interval: None,
        payload_format_indicator: sent.payload_format_indicator,
        message_expiry_interval: sent.message_expiry_interval,
        content_type: sent.content_type.clone(),
        response_topic: sent.response_topic.clone(),
        correlation_data: sent.correlation_data.clone(),
        user_properties: sent.user_properties.clone(),
    };
    let mut o = opts();
    o.will = Some(LastWill::new(
        &will_topic,
        "offline",
        QoS::AtLeastOnce,
        true,
        Some(will_props),
    ));
    let (mut device, _) = connect(&gw, t, &unique("device"), &tok, o).await;
    device
        .send(Packet::Disconnect(Disconnect::new(
            DisconnectReasonCode::DisconnectWithWillMessage,
        )))
        .await;
    let got = sub.publish().await;
    assert_eq!(got.topic, will_topic.as_bytes());
    assert_eq!(got.payload, "offline".as_bytes());
    assert_same_properties(&got, &sent);
    sub.ack(&got).await;

    let (mut later, _) = connect(&gw, t, &unique("later"), &tok, opts()).await;
    later.subscribe(&will_topic, QoS::AtLeastOnce).await;
    let got = later.publish().await;
    assert!(got.retain, "the retained will");
    assert_same_properties(&got, &sent);
}

/// A client that goes away without DISCONNECT — a dropped TCP connection, a WebSocket closed
/// by the browser — gets its will published, as on any broker.
async fn a_client_that_goes_away_sends_its_will(t: Transport) {
    let gw = start_gateway(|_| {}).await;
    let tok = token("fidelity", SCOPE);
    let prefix = unique("gone").replace('-', "_");
    let (mut sub, _) = connect(&gw, t, &unique("sub"), &tok, opts()).await;
    sub.subscribe(&format!("fid/{prefix}/#"), QoS::AtMostOnce)
        .await;
    let o = with_will(&format!("fid/{prefix}/will"), "gone");
    let (device, _) = connect(&gw, t, &unique("device"), &tok, o).await;
    match device.io {
        Io::Tcp(s) => drop(s),
        // The browser's way: a Close frame, no MQTT DISCONNECT.
        Io::Ws(mut ws) => ws.send(WsMessage::Close(None)).await.expect("close"),
    }
    assert_eq!(sub.publish().await.payload, "gone".as_bytes());
}

/// The Payload Format Indicator from the AMQP side (header `x-mqtt-payload-format`).
async fn payload_format_indicator_from_amqp(t: Transport) {
    let gw = start_gateway(|_| {}).await;
    let tok = token("fidelity", SCOPE);
    let prefix = unique("pfi").replace('-', "_");
    let (mut sub, _) = connect(&gw, t, &unique("sub"), &tok, opts()).await;
    sub.subscribe(&format!("fid/{prefix}/#"), QoS::AtMostOnce)
        .await;
    for (key, headers) in [
        ("utf8", json!({"x-mqtt-payload-format": 1})),
        ("bytes", json!({})),
    ] {
        let r = gw
            .post("/v1/exchanges/amq.topic/publish", &admin())
            .json(
                &json!({"routing_key": format!("fid.{prefix}.{key}"), "body": "text",
                          "encoding": "utf8", "properties": {"headers": headers}}),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let utf8 = sub.publish().await;
    let bytes = sub.publish().await;
    assert_eq!(
        utf8.properties.and_then(|p| p.payload_format_indicator),
        Some(1)
    );
    assert_eq!(
        bytes.properties.and_then(|p| p.payload_format_indicator),
        None
    );
}

fn disconnect_with_expiry(secs: u32) -> Packet {
    let mut d = Disconnect::new(DisconnectReasonCode::NormalDisconnection);
    d.properties = Some(DisconnectProperties {
        session_expiry_interval: Some(secs),
        reason_string: None,
        user_properties: Vec::new(),
        server_reference: None,
    });
    Packet::Disconnect(d)
}

fn persistent(expiry: u32) -> Opts {
    let mut o = opts();
    o.clean = false;
    o.props.session_expiry_interval = Some(expiry);
    o
}

/// The Session Expiry Interval of DISCONNECT: longer keeps the session past the CONNECT's
/// interval, 0 ends it at once, and after a CONNECT that asked for 0 it is a protocol error.
async fn disconnect_changes_the_session_expiry(t: Transport) {
    let gw = start_gateway(|_| {}).await;
    let tok = token("fidelity", SCOPE);

    // Longer: CONNECT 1 s, DISCONNECT 60 s; the session is still there after 2 s.
    let longer = unique("longer");
    let (mut c, _) = connect(&gw, t, &longer, &tok, persistent(1)).await;
    c.subscribe("fid/longer/#", QoS::AtLeastOnce).await;
    c.send(disconnect_with_expiry(60)).await;
    assert_eq!(c.end().await, (None, End::Clean));
    // Session expiry is a time: waited for past the CONNECT's interval.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let (_c, ack) = connect(&gw, t, &longer, &tok, persistent(60)).await;
    assert!(ack.session_present, "kept past the CONNECT's 1 s");

    // Zero: the session ends with the connection.
    let zero = unique("zero");
    let (mut c, _) = connect(&gw, t, &zero, &tok, persistent(3600)).await;
    c.subscribe("fid/zero/#", QoS::AtLeastOnce).await;
    c.send(disconnect_with_expiry(0)).await;
    assert_eq!(c.end().await, (None, End::Clean));
    let (_c, ack) = connect(&gw, t, &zero, &tok, persistent(3600)).await;
    assert!(!ack.session_present, "DISCONNECT with 0 ended the session");

    // CONNECT 0, DISCONNECT non-zero: protocol error, and the will goes out.
    let prefix = unique("bad").replace('-', "_");
    let (mut watcher, _) = connect(&gw, t, &unique("watch"), &tok, opts()).await;
    watcher
        .subscribe(&format!("fid/{prefix}/will"), QoS::AtMostOnce)
        .await;
    let o = with_will(&format!("fid/{prefix}/will"), "gone");
    let (mut c, _) = connect(&gw, t, &unique("bad"), &tok, o).await;
    c.send(disconnect_with_expiry(30)).await;
    assert_eq!(
        c.end().await,
        (Some(DisconnectReasonCode::ProtocolError), End::Clean)
    );
    assert_eq!(watcher.publish().await.payload, "gone".as_bytes());
}

/// Server Keep Alive: a v5 client asking for more than `mqtt.max_keep_alive`, or for none, is
/// told the cap in CONNACK and held to it (× 1.5).
async fn server_keep_alive_caps_v5_clients(t: Transport) {
    let gw = start_gateway(|c| c.mqtt.max_keep_alive = Duration::from_secs(1)).await;
    let tok = token("fidelity", SCOPE);
    for asked in [0u16, 30] {
        let mut o = opts();
        o.keep_alive = asked;
        let (mut c, ack) = connect(&gw, t, &unique("ka"), &tok, o).await;
        let told = ack.properties.and_then(|p| p.server_keep_alive);
        assert_eq!(told, Some(1), "asked {asked}");
        let started = tokio::time::Instant::now();
        assert_eq!(
            c.end().await,
            (Some(DisconnectReasonCode::KeepAliveTimeout), End::Clean)
        );
        let silent = started.elapsed();
        assert!(
            silent >= Duration::from_millis(1400),
            "held to 1 s × 1.5, closed after {silent:?}"
        );
    }
    // Within the cap: the client's own value, nothing said.
    let mut o = opts();
    o.keep_alive = 1;
    let (_c, ack) = connect(&gw, t, &unique("ka"), &tok, o).await;
    assert_eq!(ack.properties.and_then(|p| p.server_keep_alive), None);
    // 3.1.1 cannot be told another value: it keeps its own (30 s), so 2 s of silence is fine.
    let mut v3 = open(&gw, t).await;
    v3.send_raw(&connect_ka(b"MQTT", 4, 0, &unique("ka3"), Some(&tok), 30))
        .await;
    v3.raw_connack().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    v3.send_raw(&[0xC0, 0x00]).await;
    while v3.buf.len() < 2 {
        v3.fill().await.expect("PINGRESP: still connected");
    }
    assert_eq!(&v3.buf[..2], &[0xD0, 0x00], "PINGRESP");
}

/// Outbound topic aliases within the client's Topic Alias Maximum: the first delivery of a
/// topic sets one up, later ones carry the alias and an empty topic; once the maximum is in
/// use, new topics go in full; a new connection starts afresh.
async fn outbound_topic_aliases(t: Transport) {
    let gw = start_gateway(|_| {}).await;
    let tok = token("fidelity", SCOPE);
    let prefix = unique("alias").replace('-', "_");
    let client = unique("aliased");
    let mut o = opts();
    o.props.topic_alias_max = Some(2);
    let (mut sub, _) = connect(&gw, t, &client, &tok, o).await;
    sub.subscribe(&format!("fid/{prefix}/#"), QoS::AtMostOnce)
        .await;
    let (mut publisher, _) = connect(&gw, t, &unique("pub"), &tok, opts()).await;
    let topic = |s: &str| format!("fid/{prefix}/{s}");
    for (i, s) in ["a", "a", "b", "c", "c", "b"].into_iter().enumerate() {
        publisher
            .publish_qos1(publish(&topic(s), "x", None), i as u16 + 1)
            .await;
    }
    let mut seen = Vec::new();
    for _ in 0..6 {
        let p = sub.publish().await;
        let alias = p.properties.and_then(|p| p.topic_alias);
        seen.push((String::from_utf8(p.topic.to_vec()).unwrap(), alias));
    }
    assert_eq!(
        seen,
        vec![
            (topic("a"), Some(1)),
            (String::new(), Some(1)),
            (topic("b"), Some(2)),
            (topic("c"), None),
            (topic("c"), None),
            (String::new(), Some(2)),
        ]
    );
    // A client that accepts none gets none.
    let (mut plain, _) = connect(&gw, t, &unique("plain"), &tok, opts()).await;
    plain
        .subscribe(&format!("fid/{prefix}/#"), QoS::AtMostOnce)
        .await;
    publisher
        .publish_qos1(publish(&topic("a"), "y", None), 7)
        .await;
    let p = plain.publish().await;
    assert_eq!(
        (p.topic.as_ref(), p.properties.and_then(|p| p.topic_alias)),
        (topic("a").as_bytes(), None)
    );
    assert_eq!(sub.publish().await.topic, Bytes::new(), "still aliased");
}

// ---------- a server DISCONNECT reaches a client that is still sending ----------

/// A client streams a PUBLISH far over the Maximum Packet Size and keeps sending while the
/// gateway refuses it: it must read DISCONNECT 0x95 (MQTT 5) and then a clean end — not a reset
/// that loses the DISCONNECT.
async fn a_server_disconnect_reaches_a_client_still_sending(t: Transport, level: u8) {
    let gw = start_gateway(|c| c.limits.max_message_bytes = bytesize::ByteSize::kib(1)).await;
    let tok = token("fidelity", SCOPE);
    let mut w = open(&gw, t).await;
    w.send_raw(&connect_ka(
        b"MQTT",
        level,
        0,
        &unique("big"),
        Some(&tok),
        30,
    ))
    .await;
    w.raw_connack().await;

    // 512 KiB announced (the limit is 1 KiB + 64 KiB), sent in 16 KiB pieces for ~400 ms: the
    // gateway refuses it at the header and closes while more keeps coming.
    let total = 512 * 1024;
    let mut header = vec![0x30];
    header.extend(remaining_length(total));
    let chunk = vec![b'x'; 16 * 1024];
    // Like a client that sends before it reads (one task per connection, as most have): the
    // whole burst first, then read what came back. A client library whose write fails reports
    // the reset and never reads the DISCONNECT waiting behind it, so no write may fail.
    let mut write_error = None;
    match &mut w.io {
        Io::Tcp(s) => {
            if let Err(e) = s.write_all(&header).await {
                write_error = Some(e.to_string());
            }
            for _ in 0..(total / chunk.len()) {
                if write_error.is_some() {
                    break;
                }
                if let Err(e) = s.write_all(&chunk).await {
                    write_error = Some(e.to_string());
                }
                tokio::time::sleep(Duration::from_millis(12)).await;
            }
        }
        Io::Ws(ws) => {
            if let Err(e) = ws.send(WsMessage::Binary(header.into())).await {
                write_error = Some(e.to_string());
            }
            for _ in 0..(total / chunk.len()) {
                if write_error.is_some() {
                    break;
                }
                if let Err(e) = ws.send(WsMessage::Binary(chunk.clone().into())).await {
                    write_error = Some(e.to_string());
                }
                tokio::time::sleep(Duration::from_millis(12)).await;
            }
        }
    }
    assert_eq!(
        write_error, None,
        "the gateway keeps reading while it closes (linger): the client's writes see no reset"
    );
    let mut reason = Vec::new();
    let end = loop {
        match w.fill().await {
            Ok(()) => reason.extend_from_slice(&w.buf.split()),
            Err(end) => break end,
        }
    };
    assert_eq!(end, End::Clean, "a clean end, not a reset");
    if level == 5 {
        assert!(
            reason.first() == Some(&0xE0) && reason.get(2) == Some(&0x95),
            "DISCONNECT 0x95 (packet too large) read before the end: {reason:x?}"
        );
    } else {
        assert!(
            reason.is_empty(),
            "3.1.1 has no server DISCONNECT: {reason:x?}"
        );
    }
}

async fn server_disconnect_v3(t: Transport) {
    a_server_disconnect_reaches_a_client_still_sending(t, 4).await
}

async fn server_disconnect_v5(t: Transport) {
    a_server_disconnect_reaches_a_client_still_sending(t, 5).await
}

macro_rules! over_both_transports {
    ($($case:ident),* $(,)?) => {
        mod tcp {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $case() {
                super::$case(super::Transport::Tcp).await
            } )*
        }
        mod ws {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $case() {
                super::$case(super::Transport::Ws).await
            } )*
        }
    };
}

over_both_transports!(
    live_properties_arrive_exactly,
    sender_property_is_opt_in,
    retained_messages_keep_their_properties,
    a_refused_retained_publish_keeps_the_old_one,
    will_keeps_its_properties_and_0x04_sends_it,
    a_client_that_goes_away_sends_its_will,
    payload_format_indicator_from_amqp,
    disconnect_changes_the_session_expiry,
    server_keep_alive_caps_v5_clients,
    outbound_topic_aliases,
    server_disconnect_v3,
    server_disconnect_v5,
);
