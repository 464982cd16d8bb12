//! What survives a restart of the embedded engine (issue 13, in progress): durable exchanges,
//! durable queues and the bindings between them come back from `engine.data_dir` with their
//! arguments and route again; non-durable ones do not; retained messages come back (a deleted
//! one stays deleted). One gateway per data directory. (Queued messages are not stored yet: a
//! durable queue comes back empty.)

mod common;

use std::path::Path;

use amqp_gateway::StartError;
use common::mqtt_bytes::{connect, packet, string};
use common::mqtt_wire::{RawWire, Transport};
use common::{TestGateway, admin, json_of, start_gateway, status, token, unique};
use serde_json::{Value, json};

async fn on(dir: &Path) -> TestGateway {
    let dir = dir.to_path_buf();
    start_gateway(move |c| c.engine.data_dir = dir).await
}

async fn bindings(gw: &TestGateway, queue: &str) -> Vec<Value> {
    let list = json_of(gw.get(&format!("/v1/queues/{queue}/bindings"), &admin())).await;
    let mut items = list["items"].as_array().unwrap().clone();
    items.retain(|b| b["exchange"] != "amq.default");
    // A set: the order bindings are listed in is not part of the contract.
    items.sort_by_key(Value::to_string);
    items
}

#[tokio::test]
async fn durable_topology_survives_a_restart() {
    let dir = common::scratch::dir("data-");
    let (ex, q, transient_q, transient_ex) =
        (unique("dx"), unique("dq"), unique("tq"), unique("tx"));
    let ex_spec = json!({"type": "topic", "durable": true, "arguments": {"alternate-exchange": "amq.fanout"}});
    let q_spec = json!({"durable": true, "arguments": {"x-max-length": 5, "x-message-ttl": 60000}});
    let bind_to = |exchange: &str, key: &str, arguments: Value| json!({"exchange": exchange, "routing_key": key, "arguments": arguments});
    let (ex_view, q_view, q_bindings) = {
        let gw = on(&dir).await;
        let put = |path: String, body: Value| gw.put(&path, &admin()).json(&body);
        assert_eq!(
            status(put(format!("/v1/exchanges/{ex}"), ex_spec.clone())).await,
            201
        );
        assert_eq!(status(put(format!("/v1/queues/{q}"), q_spec)).await, 201);
        let transient = json!({"type": "direct", "durable": false});
        assert_eq!(
            status(put(format!("/v1/exchanges/{transient_ex}"), transient)).await,
            201
        );
        let transient = json!({"durable": false});
        assert_eq!(
            status(put(format!("/v1/queues/{transient_q}"), transient)).await,
            201
        );
        let bind = |b: Value| {
            gw.post(&format!("/v1/queues/{q}/bindings"), &admin())
                .json(&b)
        };
        assert_eq!(
            status(bind(bind_to(&ex, "a.#", json!({"k": [1, "two"]})))).await,
            201
        );
        assert_eq!(
            status(bind(bind_to("amq.topic", "b.*", json!({})))).await,
            201
        );
        // Not stored: the exchange is not durable.
        assert_eq!(
            status(bind(bind_to(&transient_ex, "c", json!({})))).await,
            201
        );
        let views = (
            json_of(gw.get(&format!("/v1/exchanges/{ex}"), &admin())).await,
            json_of(gw.get(&format!("/v1/queues/{q}"), &admin())).await,
            bindings(&gw, &q).await,
        );
        assert_eq!(views.2.len(), 3);
        // One gateway per data directory.
        let mut second = common::test_config();
        second.engine.data_dir = dir.clone();
        match amqp_gateway::start(second).await {
            Err(e @ StartError::Store(_)) => assert!(e.to_string().contains("in use"), "{e}"),
            Err(other) => panic!("expected the store's lock error, got {other}"),
            Ok(_) => panic!("a second gateway started on the same data directory"),
        }
        gw.gateway.shutdown().await;
        views
    };

    let gw = on(&dir).await;
    assert_eq!(
        json_of(gw.get(&format!("/v1/exchanges/{ex}"), &admin())).await,
        ex_view
    );
    let mut q_now = json_of(gw.get(&format!("/v1/queues/{q}"), &admin())).await;
    let mut q_then = q_view;
    for v in [&mut q_now, &mut q_then] {
        v.as_object_mut().unwrap().remove("consumers");
    }
    assert_eq!(q_now, q_then, "the queue, its arguments included");
    let now = bindings(&gw, &q).await;
    let expected: Vec<Value> = q_bindings
        .into_iter()
        .filter(|b| b["exchange"] != transient_ex.as_str())
        .collect();
    assert_eq!(
        now, expected,
        "bindings between durable objects, arguments included"
    );
    for gone in [
        format!("/v1/exchanges/{transient_ex}"),
        format!("/v1/queues/{transient_q}"),
    ] {
        assert_eq!(status(gw.get(&gone, &admin())).await, 404, "{gone}");
    }
    // Routing is back: through the restored exchange and binding into the restored queue.
    let published = gw
        .post(&format!("/v1/exchanges/{ex}/publish"), &admin())
        .json(&json!({"routing_key": "a.x", "body": "after restart", "mandatory": true}));
    assert_eq!(status(published).await, 200);
    assert_eq!(gw.depth(&q).await, 1);
}

/// A connected MQTT 3.1.1 client on raw bytes.
async fn mqtt(gw: &TestGateway) -> RawWire {
    let mut wire = RawWire::open(gw, Transport::Tcp).await;
    let t = token(
        "keeper",
        "gateway.write:amq.topic/kept.# gateway.read:amq.topic/kept.#",
    );
    wire.send_raw(&connect(b"MQTT", 4, 0, &unique("keeper"), Some(&t)))
        .await;
    assert_eq!(wire.packet().await.expect("CONNACK"), (0x20, vec![0, 0]));
    wire
}

/// A retained QoS 1 PUBLISH (an empty payload deletes), acknowledged.
async fn retain(wire: &mut RawWire, topic: &str, payload: &[u8], id: u16) {
    let mut body = string(topic.as_bytes());
    body.extend_from_slice(&id.to_be_bytes());
    body.extend_from_slice(payload);
    wire.send_raw(&packet(0x33, body)).await;
    let id = id.to_be_bytes().to_vec();
    assert_eq!(wire.packet().await.expect("PUBACK"), (0x40, id));
}

/// Subscribes to `filter` at QoS 1 and returns the retained PUBLISH that follows, if any.
async fn retained_for(wire: &mut RawWire, filter: &str) -> Option<(u8, Vec<u8>)> {
    let mut body = 1u16.to_be_bytes().to_vec();
    body.extend(string(filter.as_bytes()));
    body.push(1);
    wire.send_raw(&packet(0x82, body)).await;
    assert_eq!(wire.packet().await.expect("SUBACK"), (0x90, vec![0, 1, 1]));
    if wire.quiet_for(std::time::Duration::from_millis(200)).await {
        return None;
    }
    Some(wire.packet().await.expect("a retained PUBLISH"))
}

#[tokio::test]
async fn retained_messages_survive_a_restart() {
    let dir = common::scratch::dir("data-");
    let (kept, deleted) = (
        format!("kept/{}", unique("a")),
        format!("kept/{}", unique("b")),
    );
    {
        let gw = on(&dir).await;
        let mut wire = mqtt(&gw).await;
        retain(&mut wire, &kept, b"still here", 1).await;
        retain(&mut wire, &deleted, b"soon gone", 2).await;
        retain(&mut wire, &deleted, b"", 3).await;
        // Each retained write went through the store's group commit before its PUBACK.
        let metrics = gw.metrics_text().await;
        let commits: u64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix("gateway_store_commits_total "))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0);
        assert!((1..=3).contains(&commits), "{commits} commits for 3 writes");
        // Shutdown waits for the connection (it closes with DISCONNECT 0x8B and lingers):
        // the data directory is free when it returns.
        gw.gateway.shutdown().await;
        drop(wire);
    }
    let gw = on(&dir).await;
    let mut wire = mqtt(&gw).await;
    let (first, body) = retained_for(&mut wire, &kept)
        .await
        .expect("the retained message came back");
    assert_eq!(first, 0x33, "PUBLISH, QoS 1, RETAIN");
    let mut expected = string(kept.as_bytes());
    expected.extend_from_slice(&body[2 + kept.len()..2 + kept.len() + 2]);
    expected.extend_from_slice(b"still here");
    assert_eq!(body, expected);
    assert_eq!(
        retained_for(&mut wire, &deleted).await,
        None,
        "a deleted one stays deleted"
    );
}

/// Publishes `body` to `queue` through the default exchange; `persistent` sets delivery mode 2.
async fn put_message(gw: &TestGateway, queue: &str, body: &str, properties: Value) {
    let published = gw.post("/v1/exchanges/amq.default/publish", &admin()).json(
        &json!({"routing_key": queue, "body": body, "properties": properties, "mandatory": true}),
    );
    assert_eq!(status(published).await, 200, "publish {body} to {queue}");
}

fn bodies(messages: &[Value]) -> Vec<&str> {
    messages
        .iter()
        .map(|m| m["body"].as_str().unwrap())
        .collect()
}

#[tokio::test]
async fn persistent_messages_survive_a_restart() {
    let dir = common::scratch::dir("data-");
    let (q, ttl_q, transient_q) = (unique("pq"), unique("ttlq"), unique("tq"));
    let persistent = json!({"delivery_mode": 2});
    let full = json!({
        "delivery_mode": 2, "content_type": "text/plain", "correlation_id": "c-1",
        "message_id": "m-1", "priority": 3, "timestamp": 1_700_000_000u64,
        "headers": {"n": 7, "s": "x", "list": [1, "two"], "nested": {"k": true}},
    });
    let before = {
        let gw = on(&dir).await;
        let declare =
            |name: &str, spec: Value| gw.put(&format!("/v1/queues/{name}"), &admin()).json(&spec);
        assert_eq!(status(declare(&q, json!({"durable": true}))).await, 201);
        let ttl = json!({"durable": true, "arguments": {"x-message-ttl": 60000}});
        assert_eq!(status(declare(&ttl_q, ttl)).await, 201);
        assert_eq!(
            status(declare(&transient_q, json!({"durable": false}))).await,
            201
        );
        put_message(&gw, &q, "acked before the stop", persistent.clone()).await;
        put_message(&gw, &q, "one", full.clone()).await;
        put_message(&gw, &q, "transient", json!({"delivery_mode": 1})).await;
        put_message(&gw, &q, "two", persistent.clone()).await;
        put_message(&gw, &q, "three", persistent.clone()).await;
        put_message(
            &gw,
            &transient_q,
            "in a transient queue",
            persistent.clone(),
        )
        .await;
        put_message(&gw, &ttl_q, "lives a minute", persistent.clone()).await;
        let expiring = json!({"delivery_mode": 2, "expiration": "300"});
        put_message(&gw, &ttl_q, "dies in 300 ms", expiring).await;
        assert_eq!(bodies(&gw.take(&q, 1).await), ["acked before the stop"]);
        // Looked at and put back: it comes back marked redelivered.
        let looked = gw
            .post(&format!("/v1/queues/{q}/get"), &admin())
            .json(&json!({"count": 1, "ack_mode": "requeue"}));
        let looked = json_of(looked).await;
        assert_eq!(looked["messages"][0]["body"], "one");
        let before = json_of(gw.get(&format!("/v1/queues/{q}"), &admin())).await;
        assert_eq!(before["messages"], 4);
        gw.gateway.shutdown().await;
        before
    };
    // The expiring message's TTL is a wall-clock deadline: it keeps counting while stopped.
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;

    let gw = on(&dir).await;
    assert_eq!(
        gw.depth(&q).await,
        3,
        "the transient message is gone: {before}"
    );
    let got = gw.take(&q, 10).await;
    assert_eq!(bodies(&got), ["one", "two", "three"], "in queue order");
    assert_eq!(got[0]["redelivered"], true, "it had been seen");
    assert_eq!(got[1]["redelivered"], false, "never seen");
    let mut props = got[0]["properties"].clone();
    let stamped = props["headers"]
        .as_object_mut()
        .unwrap()
        .remove("x-gateway-sub");
    assert_eq!(
        stamped,
        Some(json!("root")),
        "the publisher's subject, stamped"
    );
    let keys = [
        "delivery_mode",
        "content_type",
        "correlation_id",
        "message_id",
        "priority",
        "timestamp",
        "headers",
    ];
    for key in keys {
        assert_eq!(props[key], full[key], "{key} kept");
    }
    assert_eq!(
        status(gw.get(&format!("/v1/queues/{transient_q}"), &admin())).await,
        404
    );
    assert_eq!(bodies(&gw.take(&ttl_q, 10).await), ["lives a minute"]);
    gw.gateway.shutdown().await;

    // Taken (acked) messages stay taken.
    let gw = on(&dir).await;
    assert_eq!(gw.depth(&q).await, 0, "acks removed them from disk");
    assert_eq!(gw.depth(&ttl_q).await, 0);
}

/// Dead-lettering and length limits keep working on recovered messages, and what they move or
/// drop is moved or dropped on disk too.
#[tokio::test]
async fn dead_lettering_and_length_limits_work_across_restarts() {
    let dir = common::scratch::dir("data-");
    let (ttl_q, dead_q, capped_q) = (unique("ttl"), unique("dead"), unique("capped"));
    let persistent = json!({"delivery_mode": 2});
    {
        let gw = on(&dir).await;
        let declare =
            |name: &str, spec: Value| gw.put(&format!("/v1/queues/{name}"), &admin()).json(&spec);
        assert_eq!(
            status(declare(&dead_q, json!({"durable": true}))).await,
            201
        );
        // Expires 1 s after publish, into `dead_q` through the default exchange.
        let ttl = json!({"durable": true, "arguments": {
            "x-message-ttl": 1000, "x-dead-letter-exchange": "", "x-dead-letter-routing-key": dead_q,
        }});
        assert_eq!(status(declare(&ttl_q, ttl)).await, 201);
        let capped = json!({"durable": true, "arguments": {"x-max-length": 2}});
        assert_eq!(status(declare(&capped_q, capped)).await, 201);
        put_message(&gw, &ttl_q, "expires while stopped", persistent.clone()).await;
        for body in ["c1", "c2", "c3"] {
            put_message(&gw, &capped_q, body, persistent.clone()).await;
        }
        gw.gateway.shutdown().await;
    }
    // Stopped longer than the TTL: the message expires at recovery and is dead-lettered.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    {
        let gw = on(&dir).await;
        common::eventually(
            "the expired message reaches the dead-letter queue",
            || async { gw.depth(&dead_q).await == 1 },
        )
        .await;
        assert_eq!(gw.depth(&ttl_q).await, 0);
        assert_eq!(
            gw.depth(&capped_q).await,
            2,
            "drop-head kept the newest two"
        );
        gw.gateway.shutdown().await;
    }
    // Both outcomes were written: the dead letter is on disk in its new queue, the expired and
    // the dropped ones are gone from theirs.
    let gw = on(&dir).await;
    let dead = gw.take(&dead_q, 10).await;
    assert_eq!(bodies(&dead), ["expires while stopped"]);
    let death = &dead[0]["properties"]["headers"]["x-death"][0];
    assert_eq!(
        (&death["reason"], &death["queue"]),
        (&json!("expired"), &json!(ttl_q))
    );
    assert_eq!(gw.depth(&ttl_q).await, 0);
    assert_eq!(bodies(&gw.take(&capped_q, 10).await), ["c2", "c3"]);
}

/// A consumer draining a durable queue whose bodies were paged out (24 MiB through an 8 MiB
/// watermark) gets every message once, in order: bodies are read back ahead of its credit and
/// when its turn comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_drains_a_paged_out_queue_in_order() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message as WsMessage;
    const N: usize = 384;
    let gw = start_gateway(|c| {
        c.engine.memory_high_watermark =
            amqp_gateway::config::Watermark::Bytes(bytesize::ByteSize::mib(8));
        c.limits.publish_bytes_rate = bytesize::ByteSize::gib(4);
    })
    .await;
    let q = unique("paged");
    let declare = gw
        .put(&format!("/v1/queues/{q}"), &admin())
        .json(&json!({"durable": true}));
    assert_eq!(status(declare).await, 201);
    let filler = "x".repeat(64 * 1024 - 8);
    for i in 0..N {
        put_message(
            &gw,
            &q,
            &format!("{i:06}:{filler}"),
            json!({"delivery_mode": 2}),
        )
        .await;
    }
    let held = gw.metrics_text().await;
    let held: f64 = held
        .lines()
        .find_map(|l| l.strip_prefix("gateway_engine_held_bytes "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(f64::MAX);
    assert!(
        held < 8.0 * 1024.0 * 1024.0,
        "{held} bytes held: the queue paged out"
    );
    let (mut ws, _) =
        tokio_tungstenite::connect_async(common::ws::request(&gw, Some(&admin()), true, ""))
            .await
            .expect("upgrade");
    let subscribe = json!({"op": "subscribe", "id": 1, "queue": q, "ack": "auto"});
    ws.send(WsMessage::text(subscribe.to_string()))
        .await
        .unwrap();
    let mut next = 0usize;
    while next < N {
        let frame = tokio::time::timeout(common::WAIT, ws.next())
            .await
            .expect("a frame in time")
            .expect("open")
            .expect("a frame");
        let WsMessage::Text(text) = frame else {
            continue;
        };
        let v: Value = serde_json::from_str(&text).unwrap();
        if v["op"] != "message" {
            assert_ne!(v["op"], "error", "{v}");
            continue;
        }
        let body = v["body"].as_str().unwrap();
        assert_eq!(&body[..7], format!("{next:06}:"), "message {next} in order");
        next += 1;
    }
    common::eventually("the queue is empty", || async { gw.depth(&q).await == 0 }).await;
}

/// Once `shutdown` returns, the data directory is free even while something still holds the
/// stopped engine (an embedder's handle here; a task not yet run since the shutdown in a busy
/// process): a gateway started at once on the same directory opens it and finds what was stored.
#[tokio::test]
async fn the_data_directory_is_free_once_shutdown_returns() {
    let dir = common::scratch::dir("data-");
    let q = unique("held");
    let gw = on(&dir).await;
    let declare = gw
        .put(&format!("/v1/queues/{q}"), &admin())
        .json(&json!({"durable": true}));
    assert_eq!(status(declare).await, 201);
    put_message(&gw, &q, "kept", json!({"delivery_mode": 2})).await;
    let held = gw.gateway.engine();
    gw.gateway.shutdown().await;

    let gw = on(&dir).await;
    assert_eq!(bodies(&gw.take(&q, 10).await), ["kept"]);
    let owner = amqp_gateway::engine::Owner::new();
    assert!(
        held.open_channel(&owner, "late").await.is_err(),
        "the stopped engine opens no channel"
    );
    drop(held);
    gw.gateway.shutdown().await;
}
