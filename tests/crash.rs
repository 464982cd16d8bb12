//! The durable embedded engine under `kill -9` and damage (issue 13): a child gateway process
//! killed under confirmed publish load (REST, MQTT QoS 1, `/ws`) keeps every publish it
//! answered, exactly once, and invents none; a store whose last bytes were torn still starts
//! with what was confirmed.

mod common;

use common::child::{ChildGateway, Tmpfs};
use common::load::{Load, declare, drain};
use common::mqtt_wire::RawWire;
use common::{WAIT, admin, take_at, unique};
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answered_publishes_survive_kill_9_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let queue = unique("crash");
    let mut gw = ChildGateway::start(dir.path()).await;
    // Killed in the middle of the load, once enough was answered to matter.
    let mut load = Load::start(&gw, &queue, 4).await;
    load.until_answered(2_000).await;
    load.stop();
    let status = gw.signal("KILL").await;
    assert!(!status.success(), "killed, not exited: {status:?}");
    load.finished().await;
    drop(gw);

    let gw = ChildGateway::start(dir.path()).await;
    assert!(
        gw.startup
            .iter()
            .any(|l| l.contains("durable state restored")),
        "recovery reported:\n{}",
        gw.startup.join("\n")
    );
    let (sent, answered, found) = load.check_recovered(&gw, &queue).await;
    assert!(
        found.iter().all(|m| m["redelivered"] == false),
        "nothing was delivered before the kill"
    );
    eprintln!(
        "kill -9: {sent} sent, {answered} answered, {} recovered",
        found.len()
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
    let disk = Tmpfs::mount(dir.path(), "160m");
    let mut gw = ChildGateway::start_on(&disk, &limit).await;
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

/// A full disk with no alarm to refuse publishes first (`engine.disk_free_limit = 0`): the
/// store's write fails (ENOSPC) and the storage engine refuses every later one. Persistent
/// publishes are refused with 503 `overloaded`, never answered 200; acks taken meanwhile are
/// kept; once the tmpfs grows the store is reopened and publishes are accepted again. After a
/// clean restart every accepted message not taken is there exactly once, none invented, and
/// none taken during the failure comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_publishes_and_they_resume_once_it_has_room() {
    let dir = tempfile::tempdir().unwrap();
    let disk = Tmpfs::mount(dir.path(), "32m");
    let env = [("GATEWAY_ENGINE__DISK_FREE_LIMIT", "0")];
    let mut gw = ChildGateway::start_on(&disk, &env).await;
    let queue = unique("enospc");
    declare(&gw, &queue).await;
    let http = reqwest::Client::builder().timeout(WAIT).build().unwrap();
    let publish = |gw: &ChildGateway, i: u64| {
        let body = format!("{i:06}:{}", incompressible(64 * 1024, i + 1));
        http.post(gw.url("/v1/exchanges/amq.default/publish"))
            .bearer_auth(admin())
            .json(&json!({"routing_key": queue, "body": body, "properties": {"delivery_mode": 2}}))
            .send()
    };
    let mut accepted = std::collections::BTreeSet::new();
    let mut next = 0u64;
    let refusal = loop {
        assert!(next < 1_000, "never refused: {next} × 64 KiB on 32 MiB");
        let r = publish(&gw, next).await.unwrap();
        next += 1;
        match r.status().as_u16() {
            200 => accepted.insert(next - 1),
            503 => break r.json::<Value>().await.unwrap(),
            other => panic!("publish answered {other}"),
        };
    };
    assert_eq!(refusal["code"], "overloaded", "{refusal}");
    assert!(accepted.len() >= 100, "only {} accepted", accepted.len());
    gw.logged("store write failed").await;
    // Still refused while the disk is full (not one lucky write).
    for _ in 0..3 {
        assert_eq!(publish(&gw, next).await.unwrap().status(), 503);
        next += 1;
    }
    // MQTT QoS 1 (persistent) as the failure table says: 5 hears 0x97, 3.1.1 is closed so
    // that its client resends.
    assert_eq!(mqtt_publish(&gw, 5).await, Some(0x97), "MQTT 5");
    assert_eq!(mqtt_publish(&gw, 4).await, None, "MQTT 3.1.1");
    // Taken (acked) while the store cannot write: the removals are kept for later.
    let taken: Vec<u64> = take_at(&http, &gw.url(""), &queue, 10)
        .await
        .iter()
        .map(numbered)
        .collect();
    assert_eq!(taken.len(), 10);
    disk.resize("96m");
    gw.logged("store reopened").await;
    let resumed = tokio::time::timeout(WAIT * 6, async {
        loop {
            let r = publish(&gw, next).await.unwrap();
            next += 1;
            if r.status() == 200 {
                return next - 1;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("publishes accepted again within 30 s of the disk growing");
    accepted.insert(resumed);
    assert!(gw.signal("TERM").await.success());
    drop(gw);

    let gw = ChildGateway::start_on(&disk, &env).await;
    let found: Vec<u64> = drain(&gw, &queue).await.iter().map(numbered).collect();
    let mut expected = accepted.clone();
    for t in &taken {
        expected.remove(t);
    }
    let mut sorted = found.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), found.len(), "nothing twice");
    let found: std::collections::BTreeSet<u64> = sorted.into_iter().collect();
    assert!(
        taken.iter().all(|t| !found.contains(t)),
        "a message taken during the failure came back"
    );
    let lost: Vec<_> = expected.difference(&found).collect();
    assert!(lost.is_empty(), "accepted but lost: {lost:?}");
    let invented: Vec<_> = found.difference(&accepted).collect();
    assert!(
        invented.is_empty(),
        "never accepted, yet stored: {invented:?}"
    );
    eprintln!(
        "full disk: {} accepted before it, {} refused, {} taken during it, publishing resumed; {} recovered after a restart",
        accepted.len() - 1,
        next - accepted.len() as u64,
        taken.len(),
        found.len()
    );
}

/// One QoS 1 PUBLISH to `crash/full` over MQTT `level`: the PUBACK's reason (0 on 3.1.1), or
/// `None` when the connection was closed instead.
async fn mqtt_publish(gw: &ChildGateway, level: u8) -> Option<u8> {
    use common::mqtt_bytes::{connect, publish_qos1};
    let mut wire = RawWire::tcp(gw.mqtt).await;
    wire.send_raw(&connect(b"MQTT", level, 0, &unique("full"), Some(&admin())))
        .await;
    assert_eq!(wire.packet().await.expect("CONNACK").1[1], 0, "connected");
    wire.send_raw(&publish_qos1(b"crash/full", b"refused", level == 5))
        .await;
    match wire.puback().await {
        Ok(reason) => Some(reason),
        Err(Some((first, _))) => panic!("answered {first:#x}"),
        Err(None) => None,
    }
}

/// The number a test body starts with (`000042:…`).
fn numbered(m: &Value) -> u64 {
    let body = m["body"].as_str().expect("a text body");
    body[..6].parse().expect("a numbered body")
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
