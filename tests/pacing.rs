//! Pacing (DESIGN.md §7): publishers that outrun a consumer's buffer are slowed, not dropped.
//! Numbered QoS 0 floods over MQTT (TCP and WebSocket × 3.1.1 and 5) and `/ws` reach a
//! subscriber that keeps up, every message in order; a stalled consumer among fast ones costs
//! the fast ones nothing, and only its own messages are dropped, counted and signalled. The
//! bounded wait itself is checked under a paused clock in `src/flow/pressure.rs`.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use amqp_gateway::config::Config;
use bytes::Bytes;
use common::ws::Ws;
use common::{TestGateway, start_gateway, token, unique};
use serde_json::json;
use tokio::sync::mpsc;

/// Generous for a flood on a loaded 2-core machine; only ever waited in full on failure.
const FLOOD_WAIT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy)]
enum Transport {
    Tcp,
    Ws,
}

#[derive(Debug, Clone, Copy)]
enum Version {
    V4,
    V5,
}

/// Small buffers, so a flood of a few thousand messages is paced many times over; the publish
/// rate limits out of the way. A consumer is marked slow after `pace_max_wait` above its
/// high-water mark: 2 s, so one that keeps up is never taken for slow when parallel tests
/// starve it of CPU for a while (the stalled-consumer test keeps the default 100 ms).
fn small_buffers(c: &mut Config) {
    small_buffers_waiting(Duration::from_secs(2))(c)
}

/// [`small_buffers`] with another `pace_max_wait`.
fn small_buffers_waiting(wait: Duration) -> impl FnOnce(&mut Config) {
    move |c| {
        c.limits.pace_max_wait = wait;
        c.limits.outbound_buffer_messages = 64;
        c.limits.publish_rate = 10_000_000;
        c.limits.publish_burst = 10_000_000;
        c.limits.subject_publish_rate = 10_000_000;
        c.limits.publish_bytes_rate = bytesize::ByteSize::gib(1);
    }
}

fn mqtt_token() -> String {
    token(
        "flood",
        "gateway.write:amq.topic/# gateway.read:amq.topic/#",
    )
}

/// (host, port, over WebSocket) of the gateway's MQTT listener on `t`.
fn endpoint(gw: &TestGateway, t: Transport) -> (String, u16, bool) {
    match t {
        Transport::Tcp => ("127.0.0.1".into(), gw.gateway.addrs().mqtt.port(), false),
        Transport::Ws => {
            let http = gw.gateway.addrs().http;
            (format!("ws://{http}/mqtt"), http.port(), true)
        }
    }
}

/// Runs a rumqttc event loop (either version's) in a task that keeps its client alive, says
/// when the SUBACK came and forwards every PUBLISH's payload.
macro_rules! forward {
    ($client:ident, $eventloop:ident, $event:ident, $packet:ident, $tx:ident, $subacked:ident) => {
        tokio::spawn(async move {
            let _client = $client;
            let mut subacked = Some($subacked);
            loop {
                match $eventloop.poll().await {
                    Ok($event::Incoming($packet::SubAck(_))) => {
                        subacked.take().map(|s| s.send(()));
                    }
                    Ok($event::Incoming($packet::Publish(p))) => {
                        if $tx.send(p.payload).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
        })
    };
}

/// A subscriber to `filter` at QoS 0 that reads as fast as it can: its payloads in arrival
/// order. Returns once the SUBACK came.
async fn subscriber(
    gw: &TestGateway,
    t: Transport,
    v: Version,
    filter: &str,
) -> mpsc::UnboundedReceiver<Bytes> {
    let (host, port, ws) = endpoint(gw, t);
    let (tx, rx) = mpsc::unbounded_channel();
    let (subacked, suback) = tokio::sync::oneshot::channel();
    let id = unique("sub");
    match v {
        Version::V4 => {
            use rumqttc::{AsyncClient, Event, MqttOptions, Packet};
            let mut o = MqttOptions::new(id, host, port);
            o.set_credentials("u", mqtt_token());
            o.set_max_packet_size(1 << 20, 1 << 20);
            if ws {
                o.set_transport(rumqttc::Transport::Ws);
            }
            let (client, mut eventloop) = AsyncClient::new(o, 10);
            client
                .subscribe(filter, rumqttc::QoS::AtMostOnce)
                .await
                .unwrap();
            forward!(client, eventloop, Event, Packet, tx, subacked);
        }
        Version::V5 => {
            use rumqttc::v5::mqttbytes::v5::Packet;
            use rumqttc::v5::{AsyncClient, Event, MqttOptions};
            let mut o = MqttOptions::new(id, host, port);
            o.set_credentials("u", mqtt_token());
            if ws {
                o.set_transport(rumqttc::Transport::Ws);
            }
            let (client, mut eventloop) = AsyncClient::new(o, 10);
            client
                .subscribe(filter, rumqttc::v5::mqttbytes::QoS::AtMostOnce)
                .await
                .unwrap();
            forward!(client, eventloop, Event, Packet, tx, subacked);
        }
    }
    tokio::time::timeout(common::WAIT, suback)
        .await
        .expect("a SUBACK")
        .expect("the subscriber is connected");
    rx
}

/// Publishes `n` QoS 0 messages "`who`:`i`" to `topic` as fast as the client takes them, then
/// disconnects; returns once the client's connection ended (everything was written).
async fn flood(gw: &TestGateway, t: Transport, v: Version, topic: &str, who: usize, n: u64) {
    let (host, port, ws) = endpoint(gw, t);
    let id = unique("pub");
    let body = |i: u64| format!("{who}:{i}").into_bytes();
    // Either version's client: the same steps, different types.
    macro_rules! publish_all {
        ($client:ty, $options:ty, $qos:expr) => {{
            let mut o = <$options>::new(id, host, port);
            o.set_credentials("u", mqtt_token());
            if ws {
                o.set_transport(rumqttc::Transport::Ws);
            }
            let (client, mut eventloop) = <$client>::new(o, 100);
            let looped = tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
            for i in 0..n {
                client.publish(topic, $qos, false, body(i)).await.unwrap();
            }
            client.disconnect().await.unwrap();
            looped
        }};
    }
    let done = match v {
        Version::V4 => publish_all!(
            rumqttc::AsyncClient,
            rumqttc::MqttOptions,
            rumqttc::QoS::AtMostOnce
        ),
        Version::V5 => publish_all!(
            rumqttc::v5::AsyncClient,
            rumqttc::v5::MqttOptions,
            rumqttc::v5::mqttbytes::QoS::AtMostOnce
        ),
    };
    tokio::time::timeout(FLOOD_WAIT, done)
        .await
        .expect("the publisher finished")
        .unwrap();
}

/// Receives `publishers` × `n` numbered messages and checks each publisher's arrived complete
/// and in order; on failure says what the gateway counted.
async fn expect_all(
    gw: &TestGateway,
    rx: &mut mpsc::UnboundedReceiver<Bytes>,
    publishers: usize,
    n: u64,
) {
    let mut next: HashMap<usize, u64> = HashMap::new();
    let total = publishers as u64 * n;
    for got in 0..total {
        let payload = tokio::time::timeout(FLOOD_WAIT, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("only {got} of {total} messages arrived"))
            .expect("the subscriber is connected");
        let text = String::from_utf8_lossy(&payload).into_owned();
        let mut parts = text.split(':');
        let (who, i) = (
            parts.next().unwrap(),
            parts.next().expect("a numbered payload"),
        );
        let (who, i): (usize, u64) = (who.parse().unwrap(), i.parse().unwrap());
        let expected = next.entry(who).or_default();
        if i != *expected {
            panic!(
                "publisher {who}: {i} came where {expected} was due\n{}",
                flow_metrics(gw).await
            );
        }
        *expected += 1;
    }
}

/// The gateway's pacing and drop counters.
async fn flow_metrics(gw: &TestGateway) -> String {
    let m = gw.metrics_text().await;
    let flow = ["paced", "dropped", "slow_consumers"];
    m.lines()
        .filter(|l| !l.starts_with('#') && flow.iter().any(|f| l.contains(f)))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Nothing dropped anywhere, and — when `must_pace` — the publishers were in fact paced. A
/// single publisher outruns its subscriber only when the machine lets it (a loaded CI run may
/// not): there, what proves pacing is that nothing was lost or dropped.
async fn paced_and_nothing_dropped(gw: &TestGateway, protocol: &str, must_pace: bool) {
    let m = gw.metrics_text().await;
    let paced = common::metric_in(
        &m,
        &format!("gateway_publish_paced_seconds_total{{protocol=\"{protocol}\"}}"),
    );
    assert!(
        !must_pace || paced.unwrap_or(0.0) > 0.0,
        "the publishers were paced:\n{m}"
    );
    for dropped in [
        "gateway_engine_dropped_total{reason=\"maxlen\"}",
        "gateway_deliveries_dropped_total{protocol=\"mqtt\",reason=\"slow_consumer\"}",
        "gateway_deliveries_dropped_total{protocol=\"ws\",reason=\"slow_consumer\"}",
    ] {
        // Present from the start at zero (a dashboard's rate shows "none", not "no data").
        assert_eq!(
            common::metric_in(&m, dropped).unwrap_or(0.0),
            0.0,
            "{dropped}:\n{m}"
        );
    }
}

async fn one_to_one(t: Transport, v: Version) {
    let gw = start_gateway(small_buffers).await;
    let topic = unique("flood");
    let mut rx = subscriber(&gw, t, v, &topic).await;
    let n = 20_000;
    let (_, ()) = tokio::join!(
        expect_all(&gw, &mut rx, 1, n),
        flood(&gw, t, v, &topic, 0, n)
    );
    paced_and_nothing_dropped(&gw, "mqtt", false).await;
}

async fn fifty_to_one(t: Transport, v: Version) {
    // Each publisher gets one message past the high-water mark before it is parked: the
    // quarter of the buffer above it must hold one from each of the 50 (docs/flow.md).
    let gw = start_gateway(|c| {
        small_buffers(c);
        c.limits.outbound_buffer_messages = 400;
    })
    .await;
    let topic = unique("flood");
    let mut rx = subscriber(&gw, t, v, &topic).await;
    let n = 400;
    let publishers = (0..50).map(|who| flood(&gw, t, v, &topic, who, n));
    let (_, _) = tokio::join!(
        expect_all(&gw, &mut rx, 50, n),
        futures_util::future::join_all(publishers)
    );
    paced_and_nothing_dropped(&gw, "mqtt", true).await;
}

macro_rules! matrix {
    ($($name:ident: $case:ident($t:ident, $v:ident);)*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                $case(Transport::$t, Version::$v).await
            }
        )*
    };
}

matrix! {
    one_to_one_v3_1_1_tcp: one_to_one(Tcp, V4);
    one_to_one_v5_tcp: one_to_one(Tcp, V5);
    one_to_one_v3_1_1_ws: one_to_one(Ws, V4);
    one_to_one_v5_ws: one_to_one(Ws, V5);
    fifty_to_one_v3_1_1_tcp: fifty_to_one(Tcp, V4);
    fifty_to_one_v5_tcp: fifty_to_one(Tcp, V5);
    fifty_to_one_v3_1_1_ws: fifty_to_one(Ws, V4);
    fifty_to_one_v5_ws: fifty_to_one(Ws, V5);
}

/// `/ws`: an auto-ack subscription takes a flood of `/ws` publishes, every message in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_auto_ack_takes_a_whole_flood() {
    let gw = start_gateway(small_buffers).await;
    let t = mqtt_token();
    let key = unique("wsflood");
    let mut sub = Ws::connect(&gw, Some(&t)).await;
    let subscribed = sub
        .call(json!({"op": "subscribe", "id": 1, "exchange": "amq.topic", "binding_key": key}))
        .await;
    assert_eq!(subscribed["op"], "subscribed", "{subscribed}");
    let n = 20_000u64;
    let mut publisher = Ws::connect(&gw, Some(&t)).await;
    let flood = async {
        for i in 0..n {
            publisher
                .send(json!({"op": "publish", "exchange": "amq.topic", "routing_key": key, "body": i.to_string()}))
                .await;
        }
        // A request after the flood: answered once every publish before it was handled
        // (behind up to `max_pending_in` of parked publishes: as slow as the subscriber).
        publisher.send(json!({"op": "ping", "id": "end"})).await;
        let pong = publisher.recv_within(FLOOD_WAIT).await;
        assert_eq!(pong["op"], "pong", "{pong}");
    };
    let receive = async {
        for i in 0..n {
            let frame = sub.recv_within(FLOOD_WAIT).await;
            assert_eq!(frame["op"], "message", "{frame}");
            assert_eq!(frame["body"], i.to_string(), "lost or out of order");
        }
    };
    tokio::join!(flood, receive);
    paced_and_nothing_dropped(&gw, "ws", false).await;
}

/// A queue bounded at 8 (drop-head) whose one consumer, manual-ack with prefetch 1, never
/// acks: the second publish onward waits in the queue, and the 7th reaches its high-water mark
/// (6), so whoever publishes it is paced for `pace_max_wait` — a stall a test can count on.
async fn stalled_queue(gw: &TestGateway, key: &str) -> Ws {
    let q = unique("stalled");
    let spec = json!({"durable": false, "arguments": {"x-max-length": 8}});
    let r = gw
        .put(&format!("/v1/queues/{q}"), &common::admin())
        .json(&spec)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    gw.bind(&q, "amq.topic", key).await;
    let holder = token("holder", &format!("gateway.consume:{q}"));
    let mut ws = Ws::connect(gw, Some(&holder)).await;
    let sub = ws
        .call(json!({"op": "subscribe", "id": 1, "queue": q, "ack": "manual", "prefetch": 1}))
        .await;
    assert_eq!(sub["op"], "subscribed", "{sub}");
    ws
}

/// While an MQTT 5 publisher is paced its PINGREQ and its AUTH refresh are answered at once;
/// its QoS 1 publish waits, and is acknowledged when the stall ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_pings_and_auth_are_answered_while_paced() {
    use common::mqtt_bytes::{connect_v5_enhanced, packet, read_packet, reauth, string};
    use tokio::io::AsyncWriteExt;
    let gw = start_gateway(small_buffers_waiting(Duration::from_secs(3))).await;
    let key = unique("paced");
    let _holder = stalled_queue(&gw, &key).await;
    let mut s = tokio::net::TcpStream::connect(gw.gateway.addrs().mqtt)
        .await
        .unwrap();
    s.write_all(&connect_v5_enhanced(&unique("paced"), &mqtt_token()))
        .await
        .unwrap();
    assert_eq!(read_packet(&mut s).await.0, 0x20, "CONNACK");
    let publish = |qos: u8, payload: &str| {
        let mut body = string(key.as_bytes());
        if qos > 0 {
            body.extend_from_slice(&1u16.to_be_bytes());
        }
        body.push(0); // no properties
        body.extend_from_slice(payload.as_bytes());
        packet(0x30 | (qos << 1), body)
    };
    for i in 0..7 {
        s.write_all(&publish(0, &i.to_string())).await.unwrap();
    }
    s.write_all(&publish(1, "late")).await.unwrap();
    s.write_all(&[0xC0, 0x00]).await.unwrap();
    assert_eq!(read_packet(&mut s).await, (0xD0, vec![]), "PINGRESP first");
    s.write_all(&reauth(&mqtt_token())).await.unwrap();
    let (kind, auth) = read_packet(&mut s).await;
    assert_eq!((kind, auth[0]), (0xF0, 0x00), "AUTH success while paced");
    let (kind, puback) = read_packet(&mut s).await;
    assert_eq!(
        (kind, &puback[..2]),
        (0x40, &[0u8, 1][..]),
        "then the PUBACK"
    );
    let paced = gw.metric("gateway_publish_paced_seconds_total{protocol=\"mqtt\"}");
    assert!(paced.await.unwrap_or(0.0) > 0.0);
}

/// The same for `/ws`: `ack`, `ping` and `auth` answered while paced, the paced publish
/// answered after them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_pings_and_auth_are_answered_while_paced() {
    let gw = start_gateway(small_buffers_waiting(Duration::from_secs(3))).await;
    let key = unique("paced");
    let _holder = stalled_queue(&gw, &key).await;
    let t = mqtt_token();
    let mut ws = Ws::connect(&gw, Some(&t)).await;
    // A delivery of its own to acknowledge while paced.
    let own = unique("own");
    let sub = ws
        .call(json!({"op": "subscribe", "id": 1, "exchange": "amq.topic", "binding_key": own, "ack": "manual"}))
        .await;
    assert_eq!(sub["op"], "subscribed", "{sub}");
    let r = gw
        .post("/v1/exchanges/amq.topic/publish", &common::admin())
        .json(&json!({"routing_key": own, "body": "to ack"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let delivery = ws.recv().await;
    assert_eq!(delivery["op"], "message", "{delivery}");
    for i in 0..7 {
        ws.send(json!({"op": "publish", "exchange": "amq.topic", "routing_key": key, "body": i.to_string()}))
            .await;
    }
    ws.send(json!({"op": "publish", "id": "late", "exchange": "amq.topic", "routing_key": key, "body": "late"}))
        .await;
    assert_eq!(
        ws.call(json!({"op": "ping", "id": "ping"})).await,
        json!({"op": "pong", "id": "ping"}),
        "pong first"
    );
    let ack = json!({"op": "ack", "id": "ack", "sub": delivery["sub"], "delivery_tag": delivery["delivery_tag"]});
    assert_eq!(
        ws.call(ack).await,
        json!({"op": "ok", "id": "ack"}),
        "ack answered"
    );
    let ok = ws
        .call(json!({"op": "auth", "id": "auth", "token": t}))
        .await;
    assert_eq!(
        (&ok["op"], &ok["id"]),
        (&json!("ok"), &json!("auth")),
        "{ok}"
    );
    let late = ws.recv().await;
    assert_eq!(
        (&late["op"], &late["id"]),
        (&json!("published"), &json!("late")),
        "{late}"
    );
    let paced = gw.metric("gateway_publish_paced_seconds_total{protocol=\"ws\"}");
    assert!(paced.await.unwrap_or(0.0) > 0.0);
}

/// A stalled `/ws` reader among fast MQTT subscribers: the fast ones receive every message
/// in order; the stalled one is marked slow after one bounded wait (publishers then go on at
/// full speed), its drops are counted, and when it reads again it is told (`lagged`) how many
/// it lost — everything else it gets, the newest included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_consumer_costs_the_fast_ones_nothing() {
    // A second, not the default 100 ms: a consumer still above its high-water mark after the
    // wait is marked slow, and when the tests run side by side on two cores a fast subscriber
    // can go unscheduled for 100 ms (it was marked slow and lost messages, 2 runs in 30 with
    // six copies at once). The stalled reader costs one such wait in all.
    let gw = start_gateway(small_buffers_waiting(Duration::from_secs(1))).await;
    let key = unique("mixed");
    let t = mqtt_token();
    let mut stalled = Ws::connect(&gw, Some(&t)).await;
    let sub = stalled
        .call(json!({"op": "subscribe", "id": 1, "exchange": "amq.topic", "binding_key": key}))
        .await;
    assert_eq!(sub["op"], "subscribed", "{sub}");
    let mut fast = [
        subscriber(&gw, Transport::Tcp, Version::V5, &key).await,
        subscriber(&gw, Transport::Ws, Version::V4, &key).await,
    ];
    // Big enough to fill the stalled reader's socket buffers many times over.
    let n = 4_000;
    let receivers = fast.iter_mut().map(|rx| expect_all(&gw, rx, 1, n));
    let (_, ()) = tokio::join!(
        futures_util::future::join_all(receivers),
        flood_padded(&gw, &key, n, 8 * 1024)
    );
    let m = gw.metrics_text().await;
    let marked = common::metric_in(&m, "gateway_slow_consumers_marked_total{kind=\"ws\"}");
    assert!(marked.unwrap_or(0.0) >= 1.0, "marked slow:\n{m}");

    let (mut received, mut lagged, mut last) = (0u64, 0u64, String::new());
    while received + lagged < n {
        let f = stalled.recv().await;
        match f["op"].as_str() {
            Some("message") => {
                received += 1;
                last = f["body"].as_str().unwrap_or_default().to_owned();
            }
            Some("lagged") => lagged += f["dropped"].as_u64().unwrap(),
            _ => panic!("unexpected {f}"),
        }
    }
    let dropped = "gateway_deliveries_dropped_total{protocol=\"ws\",reason=\"slow_consumer\"}";
    let dropped = gw.metric(dropped).await.unwrap_or(0.0) as u64;
    assert!(dropped > 0, "its drops are counted");
    assert_eq!(lagged, dropped, "told exactly what was dropped");
    assert!(
        last.starts_with(&format!("0:{}:", n - 1)),
        "the newest survived"
    );
}

/// An MQTT 3.1.1 publisher of `n` messages "0:`i`:" padded to `pad` bytes.
async fn flood_padded(gw: &TestGateway, topic: &str, n: u64, pad: usize) {
    use rumqttc::{AsyncClient, MqttOptions, QoS};
    let mut o = MqttOptions::new(unique("pub"), "127.0.0.1", gw.gateway.addrs().mqtt.port());
    o.set_credentials("u", mqtt_token());
    let (client, mut eventloop) = AsyncClient::new(o, 100);
    let looped = tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
    for i in 0..n {
        let mut body = format!("0:{i}:").into_bytes();
        body.resize(pad, b'.');
        client
            .publish(topic, QoS::AtMostOnce, false, body)
            .await
            .unwrap();
    }
    client.disconnect().await.unwrap();
    tokio::time::timeout(FLOOD_WAIT, looped)
        .await
        .expect("the publisher finished")
        .unwrap();
}

/// A REST publish that lands in a buffer above its high-water mark is answered after the
/// bounded wait, and the wait is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_publishes_wait_over_a_paced_route() {
    let gw = start_gateway(small_buffers_waiting(Duration::from_millis(300))).await;
    let key = unique("paced");
    let _holder = stalled_queue(&gw, &key).await;
    for i in 0..7 {
        let r = gw
            .post("/v1/exchanges/amq.topic/publish", &common::admin())
            .json(&json!({"routing_key": key, "body": i.to_string()}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "answered, if late");
    }
    let paced = gw.metric("gateway_publish_paced_seconds_total{protocol=\"rest\"}");
    assert!(
        paced.await.unwrap_or(0.0) > 0.0,
        "the 7th publish waited\n{}",
        flow_metrics(&gw).await
    );
    let slow = gw.metric("gateway_slow_consumers_marked_total{kind=\"queue\"}");
    assert_eq!(
        slow.await,
        Some(1.0),
        "and then gave up on the stalled queue"
    );
}

/// A QoS 1 subscriber takes a window's worth at a time: a publisher faster than it fills its
/// queue's backlog, which paces the publisher as a full buffer would (its PUBACKs withheld)
/// until the subscriber is marked slow after `pace_max_wait`; then the publisher goes on.
/// Nothing is lost: once the subscriber acks again, every message comes, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qos1_backlog_paces_its_publisher_until_its_subscriber_is_marked_slow() {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let gw = start_gateway(|c| {
        small_buffers_waiting(Duration::from_millis(300))(c);
        c.mqtt.max_inflight = 8;
    })
    .await;
    let topic = unique("backlog");
    let port = gw.gateway.addrs().mqtt.port();
    let mut o = MqttOptions::new(unique("sub"), "127.0.0.1", port);
    o.set_credentials("u", mqtt_token());
    o.set_manual_acks(true);
    let (sub, mut sub_loop) = AsyncClient::new(o, 10);
    sub.subscribe(&topic, QoS::AtLeastOnce).await.unwrap();
    while !matches!(
        next(&mut sub_loop).await,
        Event::Incoming(Packet::SubAck(_))
    ) {}

    // 200 QoS 1 publishes against a window of 8 and a backlog bound of 64.
    let n = 200u64;
    let mut o = MqttOptions::new(unique("pub"), "127.0.0.1", port);
    o.set_credentials("u", mqtt_token());
    let (publisher, mut pub_loop) = AsyncClient::new(o, 100);
    let acked = tokio::spawn(async move {
        let mut acked = 0;
        while acked < n {
            if let Ok(Event::Incoming(Packet::PubAck(_))) = pub_loop.poll().await {
                acked += 1;
            }
        }
    });
    for i in 0..n {
        let topic = topic.clone();
        publisher
            .publish(topic, QoS::AtLeastOnce, false, i.to_string())
            .await
            .unwrap();
    }
    tokio::time::timeout(FLOOD_WAIT, acked)
        .await
        .expect("every publish acknowledged, once the subscriber was given up on")
        .unwrap();
    let paced = gw.metric("gateway_publish_paced_seconds_total{protocol=\"mqtt\"}");
    assert!(
        paced.await.unwrap_or(0.0) > 0.0,
        "the publisher waited for the backlog\n{}",
        flow_metrics(&gw).await
    );
    let slow = gw.metric("gateway_slow_consumers_marked_total{kind=\"queue\"}");
    assert!(
        slow.await.unwrap_or(0.0) >= 1.0,
        "and then gave up on the subscriber\n{}",
        flow_metrics(&gw).await
    );

    // The subscriber acks again: all of them, in order.
    let mut got = Vec::new();
    while (got.len() as u64) < n {
        if let Event::Incoming(Packet::Publish(p)) = next(&mut sub_loop).await {
            got.push(String::from_utf8_lossy(&p.payload).into_owned());
            sub.ack(&p).await.unwrap();
        }
    }
    let want: Vec<String> = (0..n).map(|i| i.to_string()).collect();
    assert_eq!(got, want);
    paced_and_nothing_dropped(&gw, "mqtt", true).await;
}

/// The next event of a rumqttc event loop, within [`FLOOD_WAIT`].
async fn next(ev: &mut rumqttc::EventLoop) -> rumqttc::Event {
    tokio::time::timeout(FLOOD_WAIT, ev.poll())
        .await
        .expect("an event")
        .expect("connected")
}
