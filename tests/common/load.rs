//! Confirmed publish load on a child gateway, for the fault tests (`kill -9`, SIGTERM): REST,
//! MQTT 3.1.1 QoS 1 and `/ws` publishers sending persistent, numbered messages into one durable
//! queue until the gateway stops answering, with a ledger of what was sent and what was answered
//! as accepted — and the check that, after a restart, every answered message is there exactly
//! once and nothing was invented.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio::task::JoinHandle;

use super::child::ChildGateway;
use super::mqtt_bytes::{connect, packet, string};
use super::mqtt_wire::RawWire;
use super::{WAIT, admin, take_at, token, unique};

/// What the publishers sent and what the gateway answered as accepted.
#[derive(Default)]
pub struct Ledger {
    pub sent: Mutex<HashSet<String>>,
    pub answered: Mutex<HashSet<String>>,
    pub count: AtomicUsize,
}

impl Ledger {
    fn sending(&self, body: &str) {
        self.sent.lock().insert(body.to_owned());
    }
    fn answered(&self, body: String) {
        self.answered.lock().insert(body);
        self.count.fetch_add(1, Ordering::Relaxed);
    }
}

async fn rest_publisher(
    base: String,
    queue: String,
    n: usize,
    ledger: Arc<Ledger>,
    stopping: Arc<AtomicBool>,
) {
    let http = reqwest::Client::builder().timeout(WAIT).build().unwrap();
    let admin = admin();
    for i in 0.. {
        let body = format!("rest-{n}-{i}");
        ledger.sending(&body);
        let sent = http
            .post(format!("{base}/v1/exchanges/amq.default/publish"))
            .bearer_auth(&admin)
            .json(&json!({"routing_key": queue, "body": body, "properties": {"delivery_mode": 2}}))
            .send()
            .await;
        match sent {
            Ok(r) if r.status() == 200 => ledger.answered(body),
            // Refused while shutting down: the client still owns it.
            Ok(r) if r.status() == 503 && stopping.load(Ordering::Acquire) => return,
            Ok(r) => panic!("publish {body} answered {}", r.status()),
            Err(e) => {
                assert!(
                    stopping.load(Ordering::Acquire),
                    "request failed before the kill: {e}"
                );
                return;
            }
        }
    }
}

async fn mqtt_publisher(
    addr: std::net::SocketAddr,
    n: usize,
    ledger: Arc<Ledger>,
    stopping: Arc<AtomicBool>,
) {
    let mut wire = RawWire::tcp(addr).await;
    let t = token("crasher", "gateway.write:amq.topic/crash.#");
    wire.send_raw(&connect(b"MQTT", 4, 0, &unique("crasher"), Some(&t)))
        .await;
    assert_eq!(wire.packet().await.expect("CONNACK"), (0x20, vec![0, 0]));
    for i in 0u32.. {
        let body = format!("mqtt-{n}-{i}");
        let id = (i % 65_535 + 1) as u16;
        let mut p = string(format!("crash/{n}").as_bytes());
        p.extend_from_slice(&id.to_be_bytes());
        p.extend_from_slice(body.as_bytes());
        ledger.sending(&body);
        wire.send_raw(&packet(0x32, p)).await;
        match wire.packet().await {
            Ok((0x40, ack)) if ack == id.to_be_bytes() => ledger.answered(body),
            Ok(other) => panic!("expected PUBACK {id}, got {other:?}"),
            Err(e) => {
                assert!(
                    stopping.load(Ordering::Acquire),
                    "connection lost before the kill: {e:?}"
                );
                return;
            }
        }
    }
}

async fn ws_publisher(
    addr: std::net::SocketAddr,
    n: usize,
    ledger: Arc<Ledger>,
    stopping: Arc<AtomicBool>,
) {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let url = format!("ws://{addr}/ws");
    let req = super::ws::upgrade(&url, Some(&admin()), Some(super::ws::SUBPROTOCOL));
    let (mut ws, _) = tokio_tungstenite::connect_async(req)
        .await
        .expect("upgrade");
    for i in 0u64.. {
        let body = format!("ws-{n}-{i}");
        ledger.sending(&body);
        let frame = json!({"op": "publish", "id": i, "exchange": "amq.topic", "routing_key": "crash.ws",
                           "body": body, "properties": {"delivery_mode": 2}});
        if ws.send(Message::text(frame.to_string())).await.is_err() {
            assert!(
                stopping.load(Ordering::Acquire),
                "send failed before the kill"
            );
            return;
        }
        let answer = loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => {
                    break Some(serde_json::from_str::<Value>(&t).unwrap());
                }
                Some(Ok(Message::Close(frame))) => {
                    // Shutdown says so with 1001; a kill has no close frame.
                    let code = frame.map(|f| u16::from(f.code));
                    assert!(
                        stopping.load(Ordering::Acquire),
                        "closed {code:?} before the kill"
                    );
                    break None;
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => break None,
            }
        };
        match answer {
            Some(a) if a["op"] == "published" && a["id"] == i => ledger.answered(body),
            Some(a) if stopping.load(Ordering::Acquire) && a["op"] == "error" => return,
            Some(a) => panic!("publish {body} answered {a}"),
            None => {
                assert!(
                    stopping.load(Ordering::Acquire),
                    "connection lost before the kill"
                );
                return;
            }
        }
    }
}

/// Every message left in `queue`, taken.
pub async fn drain(gw: &ChildGateway, queue: &str) -> Vec<Value> {
    let http = reqwest::Client::builder().timeout(WAIT).build().unwrap();
    let mut all = Vec::new();
    loop {
        // Small batches: a response of 64 KiB bodies stays well within the wait.
        let batch = take_at(&http, &gw.url(""), queue, 100).await;
        if batch.is_empty() {
            return all;
        }
        all.extend(batch);
    }
}

pub async fn declare(gw: &ChildGateway, queue: &str) {
    let http = reqwest::Client::new();
    let put = http
        .put(gw.url(&format!("/v1/queues/{queue}")))
        .bearer_auth(admin())
        .json(&json!({"durable": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 201);
    let bind = http
        .post(gw.url(&format!("/v1/queues/{queue}/bindings")))
        .bearer_auth(admin())
        .json(&json!({"exchange": "amq.topic", "routing_key": "crash.#"}))
        .send()
        .await
        .unwrap();
    assert_eq!(bind.status(), 201);
}

/// Publishers of every protocol, `per` of each, into `queue` (declared durable, bound to
/// `amq.topic` with `crash.#`).
pub struct Load {
    pub ledger: Arc<Ledger>,
    /// Set before the gateway is stopped: from then on a failed or refused publish is expected.
    pub stopping: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Load {
    pub async fn start(gw: &ChildGateway, queue: &str, per: usize) -> Load {
        declare(gw, queue).await;
        let ledger = Arc::new(Ledger::default());
        let stopping = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for n in 0..per {
            let (l, k) = (ledger.clone(), stopping.clone());
            tasks.push(tokio::spawn(rest_publisher(
                gw.url(""),
                queue.to_owned(),
                n,
                l,
                k,
            )));
            let (l, k) = (ledger.clone(), stopping.clone());
            tasks.push(tokio::spawn(mqtt_publisher(gw.mqtt, n, l, k)));
            let (l, k) = (ledger.clone(), stopping.clone());
            tasks.push(tokio::spawn(ws_publisher(gw.http, n, l, k)));
        }
        Load {
            ledger,
            stopping,
            tasks,
        }
    }

    /// Waits until `n` publishes were answered, every protocol among them.
    pub async fn until_answered(&self, n: usize) {
        tokio::time::timeout(WAIT * 4, async {
            while self.ledger.count.load(Ordering::Relaxed) < n {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{n} publishes answered"));
        let answered = self.ledger.answered.lock();
        for prefix in ["rest-", "mqtt-", "ws-"] {
            assert!(
                answered.iter().any(|b| b.starts_with(prefix)),
                "{prefix} publishers under load"
            );
        }
    }

    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
    }

    /// Waits for every publisher to have seen the gateway go.
    pub async fn finished(&mut self) {
        for task in self.tasks.drain(..) {
            task.await.expect("publisher task");
        }
    }

    /// Drains `queue` of the restarted gateway: every answered publish is there exactly once,
    /// none was invented. Returns (sent, answered, recovered).
    pub async fn check_recovered(
        &self,
        gw: &ChildGateway,
        queue: &str,
    ) -> (usize, usize, Vec<Value>) {
        let found = drain(gw, queue).await;
        let bodies: Vec<String> = found
            .iter()
            .map(|m| m["body"].as_str().expect("a text body").to_owned())
            .collect();
        let unique_bodies: HashSet<&String> = bodies.iter().collect();
        assert_eq!(unique_bodies.len(), bodies.len(), "no message twice");
        let answered = self.ledger.answered.lock();
        let sent = self.ledger.sent.lock();
        let lost: Vec<&String> = answered
            .iter()
            .filter(|b| !unique_bodies.contains(b))
            .collect();
        assert!(
            lost.is_empty(),
            "{} answered publishes lost, e.g. {:?}",
            lost.len(),
            &lost[..lost.len().min(5)]
        );
        let invented: Vec<&&String> = unique_bodies
            .iter()
            .filter(|b| !sent.contains(**b))
            .collect();
        assert!(invented.is_empty(), "invented: {invented:?}");
        (sent.len(), answered.len(), found)
    }
}
