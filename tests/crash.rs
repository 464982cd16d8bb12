//! The durable embedded engine under `kill -9` and damage (issue 13): a child gateway process
//! killed under confirmed publish load keeps every publish it answered, exactly once, and
//! invents none; a store whose last bytes were torn still starts with what was confirmed.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use common::child::ChildGateway;
use common::mqtt_bytes::{connect, packet, string};
use common::mqtt_wire::RawWire;
use common::{WAIT, admin, take_at, token, unique};
use parking_lot::Mutex;
use serde_json::{Value, json};

/// What the publishers sent and what the gateway answered as accepted.
#[derive(Default)]
struct Ledger {
    sent: Mutex<HashSet<String>>,
    answered: Mutex<HashSet<String>>,
    count: AtomicUsize,
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
    killing: Arc<AtomicBool>,
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
            Ok(r) => panic!("publish {body} answered {}", r.status()),
            Err(e) => {
                assert!(
                    killing.load(Ordering::Acquire),
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
    killing: Arc<AtomicBool>,
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
                    killing.load(Ordering::Acquire),
                    "connection lost before the kill: {e:?}"
                );
                return;
            }
        }
    }
}

/// Every message left in `queue`, taken.
async fn drain(gw: &ChildGateway, queue: &str) -> Vec<Value> {
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

async fn declare(gw: &ChildGateway, queue: &str) {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answered_publishes_survive_kill_9_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let queue = unique("crash");
    let mut gw = ChildGateway::start(dir.path()).await;
    declare(&gw, &queue).await;
    let ledger = Arc::new(Ledger::default());
    // Set just before the kill: from then on a failed request is expected.
    let killing = Arc::new(AtomicBool::new(false));
    let mut publishers = Vec::new();
    for n in 0..4 {
        let (l, k) = (ledger.clone(), killing.clone());
        publishers.push(tokio::spawn(rest_publisher(
            gw.url(""),
            queue.clone(),
            n,
            l,
            k,
        )));
        let (l, k) = (ledger.clone(), killing.clone());
        publishers.push(tokio::spawn(mqtt_publisher(gw.mqtt, n, l, k)));
    }
    // Killed in the middle of the load, once enough was answered to matter.
    tokio::time::timeout(WAIT * 4, async {
        while ledger.count.load(Ordering::Relaxed) < 2_000 {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("2,000 publishes answered");
    let answered_by = |prefix: &str| {
        let a = ledger.answered.lock();
        a.iter().filter(|b| b.starts_with(prefix)).count()
    };
    assert!(
        answered_by("rest-") > 0 && answered_by("mqtt-") > 0,
        "both protocols under load"
    );
    killing.store(true, Ordering::Release);
    let status = gw.signal("KILL").await;
    assert!(!status.success(), "killed, not exited: {status:?}");
    for p in publishers {
        p.await.expect("publisher task");
    }
    drop(gw);

    let gw = ChildGateway::start(dir.path()).await;
    assert!(
        gw.startup
            .iter()
            .any(|l| l.contains("durable state restored")),
        "recovery reported:\n{}",
        gw.startup.join("\n")
    );
    let found = drain(&gw, &queue).await;
    let bodies: Vec<String> = found
        .iter()
        .map(|m| m["body"].as_str().expect("a text body").to_owned())
        .collect();
    let unique_bodies: HashSet<&String> = bodies.iter().collect();
    assert_eq!(unique_bodies.len(), bodies.len(), "no message twice");
    let answered = ledger.answered.lock();
    let sent = ledger.sent.lock();
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
    assert!(
        found.iter().all(|m| m["redelivered"] == false),
        "nothing was delivered before the kill"
    );
    eprintln!(
        "kill -9: {} sent, {} answered, {} recovered",
        sent.len(),
        answered.len(),
        bodies.len()
    );
}

/// The newest journal of the store in `dir` and where its written data ends.
fn newest_journal(dir: &std::path::Path) -> (std::path::PathBuf, u64) {
    let journal = std::fs::read_dir(dir.join("store"))
        .expect("the store directory")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "jnl"))
        .max_by_key(|p| {
            let stem = p.file_stem().and_then(|s| s.to_str()).unwrap_or("0");
            stem.parse::<u64>().unwrap_or(0)
        })
        .expect("a journal");
    let bytes = std::fs::read(&journal).unwrap();
    let end = bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    (journal, end as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_journal_tail_is_cut_and_reported_and_earlier_messages_stay() {
    let dir = tempfile::tempdir().unwrap();
    let queue = unique("torn");
    let mut gw = ChildGateway::start(dir.path()).await;
    declare(&gw, &queue).await;
    let http = reqwest::Client::builder().timeout(WAIT).build().unwrap();
    const N: usize = 200;
    // One at a time: each publish is its own group commit, in order.
    for i in 0..N {
        let r = http
            .post(gw.url("/v1/exchanges/amq.default/publish"))
            .bearer_auth(admin())
            .json(&json!({"routing_key": queue, "body": format!("m{i}"), "properties": {"delivery_mode": 2}}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    gw.signal("KILL").await;
    drop(gw);
    // Tear the last write: its final bytes are garbage.
    let (journal, end) = newest_journal(dir.path());
    assert!(end > 16, "the journal holds the writes");
    let mut bytes = std::fs::read(&journal).unwrap();
    for b in &mut bytes[end as usize - 8..end as usize] {
        *b ^= 0x5a;
    }
    std::fs::write(&journal, &bytes).unwrap();

    let mut gw = ChildGateway::start(dir.path()).await;
    let cut = gw
        .startup
        .iter()
        .find(|l| l.contains("torn or corrupt write"))
        .cloned();
    let cut = match cut {
        Some(line) => line,
        None => gw.logged("torn or corrupt write").await,
    };
    assert!(cut.contains("WARN"), "reported as a warning: {cut}");
    let found = drain(&gw, &queue).await;
    let bodies: Vec<&str> = found.iter().map(|m| m["body"].as_str().unwrap()).collect();
    let expected: Vec<String> = (0..bodies.len()).map(|i| format!("m{i}")).collect();
    assert_eq!(
        bodies, expected,
        "every earlier message, in order, nothing invented"
    );
    assert!(
        bodies.len() >= N - 2 && bodies.len() < N,
        "only the torn write is lost: {} of {N} kept",
        bodies.len()
    );
}

/// Printable bytes no compressor shrinks much (a xorshift stream over 64 letters).
fn incompressible(len: usize, seed: u64) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ALPHABET[(x % 64) as usize] as char
        })
        .collect()
}

/// The disk alarm on a 160 MiB tmpfs with `engine.disk_free_limit = 64MiB`: persistent 64 KiB
/// publishes are accepted until free space falls below the limit, then refused with 503
/// `overloaded` (nothing accepted is lost), and accepted again once a drain gave space back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_disk_alarm_refuses_publishes_before_the_disk_fills() {
    let dir = tempfile::tempdir().unwrap();
    let limit = [("GATEWAY_ENGINE__DISK_FREE_LIMIT", "64MiB")];
    let mut gw = ChildGateway::start_on_tmpfs(dir.path(), "160m", &limit).await;
    let queue = unique("full");
    declare(&gw, &queue).await;
    let http = reqwest::Client::builder().timeout(WAIT).build().unwrap();
    let url = gw.url("/v1/exchanges/amq.default/publish");
    let publish = |i: u64| {
        http.post(&url)
            .bearer_auth(admin())
            .json(&json!({"routing_key": queue, "body": incompressible(64 * 1024, i + 1), "properties": {"delivery_mode": 2}}))
            .send()
    };
    let mut accepted = 0u64;
    let refusal = loop {
        assert!(
            accepted < 3_000,
            "never refused: {accepted} × 64 KiB accepted on 160 MiB"
        );
        let r = publish(accepted).await.unwrap();
        match r.status().as_u16() {
            200 => accepted += 1,
            503 => break r.json::<Value>().await.unwrap(),
            other => panic!("publish answered {other}"),
        }
    };
    assert_eq!(refusal["code"], "overloaded", "{refusal}");
    assert!(
        refusal["detail"].as_str().unwrap_or("").contains("disk"),
        "{refusal}"
    );
    assert!(accepted >= 100, "only {accepted} accepted before the alarm");
    gw.logged("disk alarm: free space below").await;
    // Every accepted message is there, once.
    let found = drain(&gw, &queue).await;
    assert_eq!(found.len() as u64, accepted, "accepted messages kept");
    // The drain gives space back; publishes are accepted again.
    let again = tokio::time::timeout(WAIT * 6, async {
        loop {
            if publish(u64::MAX - 1).await.unwrap().status() == 200 {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    })
    .await;
    assert!(
        again.is_ok(),
        "publishes still refused 30 s after the drain"
    );
    gw.logged("disk alarm cleared").await;
    eprintln!("disk alarm: {accepted} × 64 KiB accepted before it, cleared after the drain");
}

/// The files under `dir` taking more than 1 MiB, for a failure message.
fn large_files(dir: &std::path::Path) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(large_files(&path));
        } else {
            let used = disk_usage_of(&entry);
            if used > 1024 * 1024 {
                out.push((path.display().to_string(), used / 1024 / 1024));
            }
        }
    }
    out
}

fn disk_usage_of(entry: &std::fs::DirEntry) -> u64 {
    use std::os::unix::fs::MetadataExt;
    entry.metadata().map_or(0, |m| m.blocks() * 512)
}

/// Bytes the files under `dir` take on disk (journals are preallocated sparse files).
fn disk_usage(dir: &std::path::Path) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        total += if path.is_dir() {
            disk_usage(&path)
        } else {
            disk_usage_of(&entry)
        };
    }
    total
}

/// A durable queue larger than memory: with a 64 MiB watermark, 128 MiB of 64 KiB persistent
/// bodies are all accepted (their bodies page out to disk), the gateway's peak resident memory
/// grows by at most 128 MiB, every message comes back in order, and the data directory shrinks
/// after the drain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_queue_larger_than_the_watermark_pages_to_disk() {
    const MIB: u64 = 1024 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let env = [
        ("GATEWAY_ENGINE__MEMORY_HIGH_WATERMARK", "64MiB"),
        ("GATEWAY_LIMITS__PUBLISH_BYTES_RATE", "4GiB"),
    ];
    let mut gw = ChildGateway::start_with(dir.path(), &env).await;
    let queue = unique("big");
    declare(&gw, &queue).await;
    let rss_before = gw.memory("VmRSS");
    let http = reqwest::Client::builder().timeout(WAIT).build().unwrap();
    let url = gw.url("/v1/exchanges/amq.default/publish");
    const N: u64 = 2048;
    for i in 0..N {
        let mut body = format!("m{i}:");
        body.push_str(&incompressible(64 * 1024 - body.len(), i + 7));
        let r = http
            .post(&url)
            .bearer_auth(admin())
            .json(&json!({"routing_key": queue, "body": body, "properties": {"delivery_mode": 2}}))
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            200,
            "publish {i} of {N}: {}",
            r.text().await.unwrap_or_default()
        );
    }
    let grown = gw.memory("VmHWM").saturating_sub(rss_before);
    let full = disk_usage(dir.path());
    eprintln!(
        "paging: 128 MiB queued through a 64 MiB watermark; peak RSS grew {} MiB; data dir {} MiB",
        grown / MIB,
        full / MIB
    );
    assert!(grown <= 128 * MIB, "peak RSS grew {} MiB", grown / MIB);
    // A restart reads back only what fits under the paging threshold; the rest stays on disk.
    let status = gw.signal("TERM").await;
    assert!(status.success(), "{status:?}");
    drop(gw);
    let gw = ChildGateway::start_with(dir.path(), &env).await;
    let peak = gw.memory("VmHWM");
    eprintln!(
        "paging: restarted with 128 MiB queued, peak RSS {} MiB",
        peak / MIB
    );
    assert!(
        peak <= rss_before + 128 * MIB,
        "restart peak RSS {} MiB",
        peak / MIB
    );
    let mut seen = 0u64;
    let draining = std::time::Instant::now();
    loop {
        let batch = take_at(&http, &gw.url(""), &queue, 64).await;
        if batch.is_empty() {
            break;
        }
        for m in batch {
            let body = m["body"].as_str().unwrap();
            assert!(
                body.starts_with(&format!("m{seen}:")),
                "message {seen} in order"
            );
            seen += 1;
        }
    }
    assert_eq!(seen, N, "every message came back");
    eprintln!("paging: drained in {:?}", draining.elapsed());
    let shrunk = tokio::time::timeout(WAIT * 4, async {
        loop {
            let now = disk_usage(dir.path());
            if now < full / 2 {
                return now;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    })
    .await;
    match shrunk {
        Ok(now) => eprintln!("paging: data dir {} MiB after the drain", now / MIB),
        Err(_) => panic!(
            "the data directory did not shrink after the drain: {} MiB then, {} MiB now: {:?}",
            full / MIB,
            disk_usage(dir.path()) / MIB,
            large_files(dir.path())
        ),
    }
}
