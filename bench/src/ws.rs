//! The WebSocket scenarios: fan-out from one publisher to many WebSocket subscribers
//! (`wsfanout`), memory per idle WebSocket subscriber (`wsidle`), and one WebSocket publisher
//! to one subscriber (`wspublish`). WebSocket clients speak the gateway's `/ws` JSON protocol,
//! or MQTT 3.1.1 over WebSocket (subprotocol `mqtt`: the gateway's `/mqtt`, Mosquitto's
//! WebSocket listener, RabbitMQ Web-MQTT); the other end is an MQTT client over TCP to the same
//! broker, QoS 0, flat out, so the offered rate saturates. Each subscriber counts what it
//! receives; what the publisher sent times the subscribers, minus what arrived by the end of
//! the drain, is lost.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rumqttc::QoS;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::{Args, Target};

/// How a WebSocket subscriber talks.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The gateway's `/ws` JSON frames.
    Json,
    /// MQTT 3.1.1 packets in binary frames.
    Mqtt,
}

/// `NAME=KIND,URL,PUBLISHER`: WebSocket subscribers of KIND (`json` or `mqtt`) at URL, fed by
/// the MQTT `--target` named PUBLISHER (whose password, if any, they use too).
#[derive(Clone)]
pub struct WsTarget {
    pub name: String,
    pub kind: Kind,
    pub url: String,
    pub publisher: Target,
}

pub fn parse(s: &str, targets: &[Target]) -> Result<WsTarget, String> {
    let (name, rest) = s
        .split_once('=')
        .ok_or("expected NAME=KIND,URL,PUBLISHER")?;
    let mut parts = rest.splitn(3, ',');
    let (kind, url, publisher) = match (parts.next(), parts.next(), parts.next()) {
        (Some(k), Some(u), Some(p)) => (k, u, p),
        _ => return Err(format!("expected NAME=KIND,URL,PUBLISHER in {s}")),
    };
    let kind = match kind {
        "json" => Kind::Json,
        "mqtt" => Kind::Mqtt,
        other => return Err(format!("unknown WebSocket kind {other}")),
    };
    let publisher = targets
        .iter()
        .find(|t| t.name == publisher)
        .ok_or_else(|| format!("no --target named {publisher}"))?
        .clone();
    Ok(WsTarget {
        name: name.to_owned(),
        kind,
        url: url.to_owned(),
        publisher,
    })
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A WebSocket to `t`, its subprotocol agreed (and `/ws` authenticated by header); an MQTT one
/// has had its CONNECT sent.
async fn open(t: &WsTarget) -> Result<Socket, String> {
    let mut req = t
        .url
        .as_str()
        .into_client_request()
        .map_err(|e| e.to_string())?;
    let protocol = match t.kind {
        Kind::Json => "amqp-gateway.v1.json",
        Kind::Mqtt => "mqtt",
    };
    req.headers_mut().insert(
        "sec-websocket-protocol",
        protocol.parse().map_err(|_| "header")?,
    );
    if t.kind == Kind::Json
        && let Some(token) = &t.publisher.password
    {
        let value = format!("Bearer {token}");
        req.headers_mut()
            .insert("authorization", value.parse().map_err(|_| "header")?);
    }
    let (mut ws, _) = tokio_tungstenite::connect_async(req)
        .await
        .map_err(|e| format!("{}: {e}", t.url))?;
    if t.kind == Kind::Mqtt {
        ws.send(Message::binary(connect(t.publisher.password.as_deref())))
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(ws)
}

/// How long a subscriber's connection and subscription may take. A broker that stops
/// answering (rumqttd 0.20's router died mid-report on 2026-12-07, its sockets left open) then
/// gives its row an error, where the report used to wait for it forever.
const HANDSHAKE: Duration = Duration::from_secs(30);

/// One subscriber: connected, subscribed to `topic` (MQTT form; `/ws` binds its AMQP form on
/// `amq.topic`), counting deliveries into `seen` until `stop`.
async fn subscriber(
    t: &WsTarget,
    topic: &str,
    seen: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> Result<tokio::task::JoinHandle<()>, String> {
    let mut ws = subscribed(t, topic, HANDSHAKE).await?;
    let kind = t.kind;
    Ok(tokio::spawn(async move {
        let mut packets = Packets::default();
        while !stop.load(Ordering::Relaxed) {
            // Woken now and then to see whether the run is over.
            let frame = match tokio::time::timeout(Duration::from_millis(200), ws.next()).await {
                Err(_) => continue,
                Ok(Some(Ok(frame))) => frame,
                Ok(_) => break,
            };
            match (kind, frame) {
                (Kind::Json, Message::Text(t)) if t.starts_with(r#"{"op":"message""#) => {
                    seen.fetch_add(1, Ordering::Relaxed);
                }
                (Kind::Mqtt, Message::Binary(b)) => {
                    let before = packets.publishes;
                    packets.feed(&b);
                    seen.fetch_add(packets.publishes - before, Ordering::Relaxed);
                }
                (_, Message::Close(_)) => break,
                _ => {}
            }
        }
        let _ = ws.close(None).await;
    }))
}

/// A subscriber's socket once `topic` is subscribed, within `limit`.
async fn subscribed(t: &WsTarget, topic: &str, limit: Duration) -> Result<Socket, String> {
    let handshake = async {
        let mut ws = open(t).await?;
        match t.kind {
            Kind::Json => {
                let key = topic.replace('/', ".");
                let sub = serde_json::json!({"op": "subscribe", "id": 1, "exchange": "amq.topic", "binding_key": key});
                ws.send(Message::text(sub.to_string()))
                    .await
                    .map_err(|e| e.to_string())?;
                loop {
                    match ws.next().await {
                        Some(Ok(Message::Text(t))) if t.contains(r#""op":"subscribed""#) => break,
                        Some(Ok(Message::Text(t))) if t.contains(r#""op":"error""#) => {
                            return Err(t.to_string());
                        }
                        Some(Ok(_)) => {}
                        other => return Err(format!("closed while subscribing: {other:?}")),
                    }
                }
            }
            Kind::Mqtt => {
                ws.send(Message::binary(subscribe(topic)))
                    .await
                    .map_err(|e| e.to_string())?;
                // Until the SUBACK: what comes before it is CONNACK.
                let mut packets = Packets::default();
                while packets.subacks == 0 {
                    match ws.next().await {
                        Some(Ok(Message::Binary(b))) => packets.feed(&b),
                        Some(Ok(_)) => {}
                        other => return Err(format!("closed while subscribing: {other:?}")),
                    }
                }
            }
        }
        Ok(ws)
    };
    tokio::time::timeout(limit, handshake)
        .await
        .map_err(|_| format!("{}: not subscribed within {limit:?}", t.url))?
}

/// Counts the MQTT packets in a byte stream split anywhere (rumqttc's framing).
#[derive(Default)]
struct Packets {
    buf: Vec<u8>,
    publishes: u64,
    subacks: u64,
}

impl Packets {
    fn feed(&mut self, bytes: &[u8]) {
        use rumqttc::mqttbytes::{PacketType, check};
        self.buf.extend_from_slice(bytes);
        let mut at = 0;
        while let Ok(header) = check(self.buf[at..].iter(), usize::MAX) {
            match header.packet_type() {
                Ok(PacketType::Publish) => self.publishes += 1,
                Ok(PacketType::SubAck) => self.subacks += 1,
                _ => {}
            }
            at += header.frame_length();
        }
        self.buf.drain(..at);
    }
}

/// An MQTT 3.1.1 CONNECT, clean session, keep-alive 60 s, with `password` (user `bench`).
fn connect(password: Option<&str>) -> Vec<u8> {
    let id = format!("bench-ws-{}-{}", std::process::id(), crate::next_id());
    let mut connect = rumqttc::Connect::new(id);
    connect.keep_alive = 60;
    if let Some(p) = password {
        connect.set_login("bench", p);
    }
    encoded(|buf| connect.write(buf))
}

/// SUBSCRIBE to `topic` at QoS 0.
fn subscribe(topic: &str) -> Vec<u8> {
    let mut subscribe = rumqttc::Subscribe::new(topic, QoS::AtMostOnce);
    subscribe.pkid = 1;
    encoded(|buf| subscribe.write(buf))
}

fn encoded(
    write: impl FnOnce(&mut bytes::BytesMut) -> Result<usize, rumqttc::mqttbytes::Error>,
) -> Vec<u8> {
    let mut buf = bytes::BytesMut::new();
    write(&mut buf).expect("a small packet encodes");
    buf.to_vec()
}

/// `subs` subscribers connected and subscribed, 50 at a time.
async fn subscribers(
    t: &WsTarget,
    subs: usize,
    topic: &str,
    seen: &Arc<AtomicU64>,
    stop: &Arc<AtomicBool>,
) -> Result<Vec<tokio::task::JoinHandle<()>>, String> {
    let mut all = Vec::with_capacity(subs);
    while all.len() < subs {
        let batch = (subs - all.len()).min(50);
        let joined = futures_util::future::join_all(
            (0..batch).map(|_| subscriber(t, topic, seen.clone(), stop.clone())),
        )
        .await;
        for s in joined {
            all.push(s?);
        }
    }
    Ok(all)
}

/// What a fan-out run saw.
pub struct Fanout {
    /// Deliveries per second during the window, over all subscribers.
    pub rate: f64,
    /// Of everything sent × subscribers, the share never delivered by the end of the drain.
    pub lost_percent: f64,
}

/// One publisher flat out at QoS 0 to `subs` WebSocket subscribers of one topic.
pub async fn fanout(
    t: &WsTarget,
    subs: usize,
    payload: usize,
    duration: Duration,
) -> Result<Fanout, String> {
    let topic = format!("bench/ws/{}/{}", std::process::id(), crate::next_id());
    let seen = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let readers = subscribers(t, subs, &topic, &seen, &stop).await?;
    let client = crate::publisher(&t.publisher, false).await?;
    let sent = Arc::new(AtomicU64::new(0));
    let publishing = Arc::new(AtomicBool::new(true));
    let task = {
        let (client, topic, sent, publishing) = (
            client.clone(),
            topic.clone(),
            sent.clone(),
            publishing.clone(),
        );
        let body = vec![b'x'; payload];
        tokio::spawn(async move {
            while publishing.load(Ordering::Relaxed) {
                if client
                    .publish(&topic, QoS::AtMostOnce, false, body.clone())
                    .await
                    .is_err()
                {
                    break;
                }
                sent.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let rate = crate::rate_over(&seen, duration).await;
    publishing.store(false, Ordering::Relaxed);
    let _ = task.await;
    crate::drain(&seen).await;
    let offered = sent.load(Ordering::Relaxed) * subs as u64;
    let delivered = seen.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    let _ = client.disconnect().await;
    for r in readers {
        let _ = r.await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(Fanout {
        rate,
        lost_percent: lost(offered, delivered),
    })
}

/// Frames a WebSocket publisher writes before one flush: a busy client's frames share TCP
/// segments, so the target reads several with one `read(2)`.
const PUBLISH_BATCH: u64 = 64;

/// One WebSocket publisher flat out at QoS 0 (`/ws`: `publish` requests, each answered) to
/// one MQTT subscriber over TCP on the same broker: what the target's WebSocket read side
/// carries.
pub async fn inbound(t: &WsTarget, payload: usize, duration: Duration) -> Result<Fanout, String> {
    let topic = format!("bench/wspub/{}/{}", std::process::id(), crate::next_id());
    let seen = Arc::new(crate::Seen::default());
    let subscriber = crate::subscriber(
        &t.publisher,
        &topic,
        QoS::AtMostOnce,
        seen.clone(),
        false,
        None,
    )
    .await?;
    let mut ws = open(t).await?;
    let frame = match t.kind {
        Kind::Json => {
            let body = "x".repeat(payload);
            let publish = serde_json::json!({"op": "publish", "id": 1, "exchange": "amq.topic",
                "routing_key": topic.replace('/', "."), "body": body, "encoding": "utf8"});
            Message::text(publish.to_string())
        }
        Kind::Mqtt => {
            // Until the CONNACK.
            match ws.next().await {
                Some(Ok(Message::Binary(_))) => {}
                other => return Err(format!("no CONNACK: {other:?}")),
            }
            let publish = rumqttc::Publish::new(&topic, QoS::AtMostOnce, vec![b'x'; payload]);
            Message::binary(encoded(|buf| publish.write(buf)))
        }
    };
    let (mut sink, mut replies) = ws.split();
    // `/ws` answers every publish; the answers are read and dropped.
    let reader = tokio::spawn(async move { while let Some(Ok(_)) = replies.next().await {} });
    let sent = Arc::new(AtomicU64::new(0));
    let publishing = Arc::new(AtomicBool::new(true));
    let task = {
        let (sent, publishing) = (sent.clone(), publishing.clone());
        tokio::spawn(async move {
            while publishing.load(Ordering::Relaxed) {
                for _ in 0..PUBLISH_BATCH {
                    if sink.feed(frame.clone()).await.is_err() {
                        return;
                    }
                }
                if sink.flush().await.is_err() {
                    return;
                }
                sent.fetch_add(PUBLISH_BATCH, Ordering::Relaxed);
            }
            let _ = sink.close().await;
        })
    };
    let rate = crate::rate_over(&seen.count, duration).await;
    publishing.store(false, Ordering::Relaxed);
    let _ = task.await;
    crate::drain(&seen.count).await;
    let offered = sent.load(Ordering::Relaxed);
    let delivered = seen.count.load(Ordering::Relaxed);
    let _ = subscriber.disconnect().await;
    reader.abort();
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(Fanout {
        rate,
        lost_percent: lost(offered, delivered),
    })
}

fn lost(offered: u64, delivered: u64) -> f64 {
    if offered == 0 {
        0.0
    } else {
        offered.saturating_sub(delivered) as f64 * 100.0 / offered as f64
    }
}

/// `n` idle WebSocket subscribers (one subscription each): the broker's anonymous resident
/// memory grown per connection, in KiB (`crate::anon_kib`).
pub async fn idle(t: &WsTarget, n: usize) -> Result<f64, String> {
    let pid = t
        .publisher
        .pid
        .ok_or("needs --pid for its publisher target")?;
    let before = crate::anon_kib(pid)?;
    let seen = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let topic = format!("bench/wsidle/{}/{}", std::process::id(), crate::next_id());
    let readers = subscribers(t, n, &topic, &seen, &stop).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = crate::anon_kib(pid)?;
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        let _ = r.await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    Ok(after.saturating_sub(before) as f64 / n as f64)
}

/// The WebSocket scenarios, one row each, every WebSocket target side by side.
pub async fn report(args: &Args, targets: &[Target]) -> Result<(), String> {
    let ws: Vec<WsTarget> = args
        .ws_targets
        .iter()
        .map(|s| parse(s, targets))
        .collect::<Result<_, _>>()?;
    if ws.is_empty() {
        return Err("needs --ws-target".into());
    }
    println!(
        "\nWebSocket: QoS 0 flat out (fan-out: an MQTT publisher over TCP; publisher: over WebSocket, to an MQTT subscriber over TCP), {} B payloads; median of {} runs of {:?}; ratios: above 1, the first did better\n",
        args.payload, args.runs, args.duration
    );
    crate::scenario_header(ws.iter().map(|t| t.name.as_str()));
    // Memory first: after a fan-out the allocator keeps what 1,000 busy connections freed, and
    // idle connections grow into it unseen.
    let wanted = |name: &str| args.scenarios.iter().any(|s| s == name);
    for scenario in ["wsidle", "wsfanout", "wspublish"]
        .into_iter()
        .filter(|s| wanted(s))
    {
        let mut cells = Vec::new();
        let mut values = Vec::new();
        for t in &ws {
            let outcome = if scenario == "wsidle" {
                idle(t, args.idle_connections).await.map(|kib| {
                    let label = format!("idle WebSocket × {}", args.idle_connections);
                    crate::report::record(&label, &t.name, kib, "KiB");
                    (format!("{kib:.1} KiB"), 1.0 / kib.max(0.001))
                })
            } else {
                let mut rates = Vec::new();
                let mut lost = Vec::new();
                let mut error = None;
                for _ in 0..args.runs {
                    let run = if scenario == "wsfanout" {
                        fanout(t, args.ws_subscribers, args.payload, args.duration).await
                    } else {
                        inbound(t, args.payload, args.duration).await
                    };
                    match run {
                        Ok(f) => {
                            rates.push(f.rate);
                            lost.push(f.lost_percent);
                        }
                        Err(e) => error = Some(e),
                    }
                }
                match error {
                    Some(e) if rates.is_empty() => Err(e),
                    _ => {
                        let rate = crate::median(rates);
                        let lost = crate::median(lost);
                        let label = if scenario == "wsfanout" {
                            format!("WS 1→{} fan-out", args.ws_subscribers)
                        } else {
                            "WS publisher 1→1".to_owned()
                        };
                        crate::report::record(&label, &t.name, rate, "msg/s");
                        Ok((format!("{:.1}k/s, {lost:.2} % lost", rate / 1000.0), rate))
                    }
                }
            };
            match outcome {
                Ok((cell, value)) => {
                    cells.push(cell);
                    values.push(Some(value));
                }
                Err(e) => {
                    cells.push(format!("error: {e}"));
                    values.push(None);
                }
            }
        }
        let label = if scenario == "wsfanout" {
            format!("1→{} fan-out, deliveries/s", args.ws_subscribers)
        } else if scenario == "wspublish" {
            "WebSocket publisher 1→1 (MQTT subscriber over TCP), deliveries/s".to_owned()
        } else {
            format!(
                "anonymous memory per idle WebSocket subscriber ({})",
                args.idle_connections
            )
        };
        let mut row = format!("| {label} | {} |", cells.join(" | "));
        for other in &values[1..] {
            row.push_str(&match (values[0], other) {
                (Some(a), Some(b)) if *b > 0.0 => format!(" {:.2} |", a / b),
                _ => " – |".to_owned(),
            });
        }
        println!("{row}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A broker that takes the WebSocket and then says nothing (as rumqttd did once its router
    /// died) gives the subscriber an error within the limit, not a wait without end.
    #[tokio::test]
    // The handshake callback's error type is tungstenite's, large or not.
    #[allow(clippy::result_large_err)]
    async fn a_broker_that_never_answers_is_an_error_in_time() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let callback = |_: &tokio_tungstenite::tungstenite::handshake::server::Request,
                            mut res: tokio_tungstenite::tungstenite::handshake::server::Response| {
                res.headers_mut()
                    .insert("sec-websocket-protocol", "mqtt".parse().unwrap());
                Ok(res)
            };
            let mut ws = tokio_tungstenite::accept_hdr_async(tcp, callback)
                .await
                .unwrap();
            // Reads the CONNECT and SUBSCRIBE, answers neither.
            while let Some(Ok(_)) = ws.next().await {}
        });
        let publisher = crate::parse_target(&format!("silent=127.0.0.1:{port}")).unwrap();
        let t = WsTarget {
            name: "silent".into(),
            kind: Kind::Mqtt,
            url: format!("ws://127.0.0.1:{port}/mqtt"),
            publisher,
        };
        let limit = Duration::from_millis(300);
        let outcome = tokio::time::timeout(Duration::from_secs(10), subscribed(&t, "t", limit))
            .await
            .expect("bounded by its limit");
        let Err(error) = outcome else {
            panic!("subscribed without a SUBACK");
        };
        assert!(error.contains("not subscribed within"), "{error}");
    }

    #[test]
    fn packets_are_counted_however_the_stream_is_split() {
        let publish = |len| {
            let p = rumqttc::Publish::new("t", QoS::AtMostOnce, vec![b'x'; len]);
            encoded(|buf| p.write(buf))
        };
        let suback = encoded(|buf| {
            rumqttc::SubAck::new(
                1,
                vec![rumqttc::SubscribeReasonCode::Success(QoS::AtMostOnce)],
            )
            .write(buf)
        });
        // 300 bytes: a two-byte remaining length.
        let stream: Vec<u8> = [suback, publish(1), publish(300), publish(1)].concat();
        for split in 1..stream.len() {
            let mut p = Packets::default();
            for chunk in stream.chunks(split) {
                p.feed(chunk);
            }
            assert_eq!((p.subacks, p.publishes), (1, 3), "chunks of {split}");
            assert!(p.buf.is_empty());
        }
    }
}
