//! Properties of the embedded engine that the contract cannot ask of every engine: fan-out
//! shares one body, and publishers on many exchanges at once lose nothing.

mod common;

use std::sync::Arc;

use amqp_gateway::engine::embedded::{EmbeddedEngine, EmbeddedOptions};
use amqp_gateway::engine::{
    ConsumeOptions, Engine, ExchangeKind, ExchangeSpec, FieldTable, Message, PublishOptions,
    QueueSpec,
};
use bytes::Bytes;
use common::{next, unique};

fn engine() -> Arc<EmbeddedEngine> {
    Arc::new(EmbeddedEngine::new(EmbeddedOptions::default()))
}

#[tokio::test]
async fn fan_out_shares_one_body() {
    let engine = engine();
    let ch = engine
        .open_channel(&amqp_gateway::engine::Owner::new(), "t")
        .await
        .unwrap();
    let ex = unique("share");
    ch.declare_exchange(&ex, &ExchangeSpec::new(ExchangeKind::Fanout))
        .await
        .unwrap();
    let mut consumers = Vec::new();
    for i in 0..3 {
        let q = unique(&format!("share{i}"));
        ch.declare_queue(&q, &QueueSpec::default()).await.unwrap();
        ch.bind_queue(&q, &ex, "", &FieldTable::new())
            .await
            .unwrap();
        consumers.push(ch.consume(&q, ConsumeOptions::auto()).await.unwrap());
    }
    let body = Bytes::from(vec![7u8; 64 * 1024]);
    let ptr = body.as_ptr();
    ch.publish(&ex, "", Message::new(body), PublishOptions::default())
        .await
        .unwrap();
    for c in &mut consumers {
        let d = next(c).await;
        assert_eq!(d.body().as_ptr(), ptr, "every queue holds the same bytes");
    }
    assert_eq!(engine.stats().queued_messages, 0);
}

/// The memory watermark counts what the engine holds: a message in three queues once, an
/// unacknowledged delivery until it is acked; above the watermark publishes are flagged.
#[tokio::test]
async fn held_bytes_count_each_message_once_until_settled() {
    let engine = Arc::new(EmbeddedEngine::new(EmbeddedOptions {
        memory_high_watermark: Some(100_000),
        ..EmbeddedOptions::default()
    }));
    let ch = engine
        .open_channel(&amqp_gateway::engine::Owner::new(), "t")
        .await
        .unwrap();
    let ex = unique("held");
    ch.declare_exchange(&ex, &ExchangeSpec::new(ExchangeKind::Fanout))
        .await
        .unwrap();
    let mut queues = Vec::new();
    for i in 0..3 {
        let q = unique(&format!("held{i}"));
        ch.declare_queue(&q, &QueueSpec::default()).await.unwrap();
        ch.bind_queue(&q, &ex, "", &FieldTable::new())
            .await
            .unwrap();
        queues.push(q);
    }
    let publish = |n: usize| {
        ch.publish(
            &ex,
            "",
            Message::new(vec![1u8; n]),
            PublishOptions::default(),
        )
    };
    // A body and what holding the message costs besides (no headers here).
    let held = |n: usize| {
        amqp_gateway::engine::embedded::held_size(&amqp_gateway::engine::Envelope {
            exchange: ex.as_str().into(),
            routing_key: "".into(),
            message: Message::new(vec![1u8; n]),
        })
    };
    let (first_size, second_size) = (held(60_000), held(39_800));
    assert!(first_size > 60_000, "more than the body is charged");
    publish(60_000).await.unwrap();
    assert_eq!(
        engine.stats().held_bytes,
        first_size,
        "three queues, one charge"
    );
    assert!(!engine.publish_blocked());
    publish(39_800).await.unwrap();
    assert_eq!(engine.stats().held_bytes, first_size + second_size);
    assert!(
        engine.publish_blocked(),
        "99 800 bytes of bodies, above 100 000 with what holding them costs"
    );
    // Two queues drained, the third consumed without ack yet: still held.
    for q in &queues[..2] {
        ch.purge_queue(q).await.unwrap();
    }
    assert_eq!(engine.stats().held_bytes, first_size + second_size);
    let mut consumer = ch
        .consume(&queues[2], ConsumeOptions::manual(10))
        .await
        .unwrap();
    let first = next(&mut consumer).await;
    let second = next(&mut consumer).await;
    assert!(
        engine.publish_blocked(),
        "unacked deliveries are still held"
    );
    ch.ack(first.delivery_tag, false).await.unwrap();
    drop(first);
    assert_eq!(engine.stats().held_bytes, second_size);
    assert!(!engine.publish_blocked(), "below the watermark again");
    ch.ack(second.delivery_tag, false).await.unwrap();
    drop(second);
    assert_eq!(engine.stats().held_bytes, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishers_on_many_exchanges_lose_nothing() {
    const PUBLISHERS: usize = 8;
    const EACH: usize = 2_000;
    let engine = engine();
    let setup = engine
        .open_channel(&amqp_gateway::engine::Owner::new(), "setup")
        .await
        .unwrap();
    let sink = unique("sink");
    setup
        .declare_queue(&sink, &QueueSpec::default())
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for p in 0..PUBLISHERS {
        let ex = unique(&format!("conc{p}"));
        setup
            .declare_exchange(&ex, &ExchangeSpec::new(ExchangeKind::Topic))
            .await
            .unwrap();
        setup
            .bind_queue(&sink, &ex, "#", &FieldTable::new())
            .await
            .unwrap();
        let ch = engine
            .open_channel(&amqp_gateway::engine::Owner::new(), "publisher")
            .await
            .unwrap();
        tasks.push(tokio::spawn(async move {
            for i in 0..EACH {
                let routed = ch
                    .publish(
                        &ex,
                        &format!("p{p}.m{i}"),
                        Message::new(format!("{p}:{i}")),
                        PublishOptions::default(),
                    )
                    .await
                    .unwrap()
                    .routed;
                assert!(routed);
            }
        }));
    }
    let mut consumer = setup
        .consume(&sink, ConsumeOptions::manual(500))
        .await
        .unwrap();
    let mut last = [None::<usize>; PUBLISHERS];
    for _ in 0..PUBLISHERS * EACH {
        let d = next(&mut consumer).await;
        let text = String::from_utf8_lossy(d.body()).into_owned();
        let (p, i) = text.split_once(':').unwrap();
        let (p, i): (usize, usize) = (p.parse().unwrap(), i.parse().unwrap());
        assert!(
            last[p].is_none_or(|prev| prev + 1 == i),
            "publisher {p} out of order at {i}"
        );
        last[p] = Some(i);
        setup.ack(d.delivery_tag, false).await.unwrap();
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert!(last.iter().all(|l| *l == Some(EACH - 1)));
    assert_eq!(engine.stats().queued_messages, 0);
}

/// Shutdown stops the engine's own tasks (queue expiry, message expiry), not only its
/// channels: afterwards the runtime holds none of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stops_the_expiry_tasks() {
    use amqp_gateway::engine::FieldValue;
    let alive = || {
        tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks()
    };
    let before = alive();
    let engine = engine();
    let ch = engine
        .open_channel(&amqp_gateway::engine::Owner::new(), "t")
        .await
        .unwrap();
    let mut arguments = FieldTable::new();
    arguments.insert("x-expires", FieldValue::I64(3_600_000));
    arguments.insert("x-message-ttl", FieldValue::I64(3_600_000));
    let q = unique("tasks");
    ch.declare_queue(
        &q,
        &QueueSpec {
            arguments,
            ..QueueSpec::default()
        },
    )
    .await
    .unwrap();
    ch.publish("", &q, Message::new("x"), PublishOptions::default())
        .await
        .unwrap();
    common::eventually("both expiry tasks run", || async { alive() >= before + 2 }).await;
    engine.shutdown().await;
    common::eventually("the expiry tasks ended", || async { alive() <= before }).await;
}

/// The memory watermark is observable as it changes: crossing it flips the watch both ways,
/// with no polling (an AMQP `connection.blocked` / `unblocked` follows it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watermark_is_a_watch() {
    let engine: Arc<dyn Engine> = Arc::new(EmbeddedEngine::new(EmbeddedOptions {
        memory_high_watermark: Some(64 * 1024),
        ..EmbeddedOptions::default()
    }));
    let mut blocked = engine.watch_publish_blocked();
    assert!(!*blocked.borrow_and_update());
    let ch = engine
        .open_channel(&amqp_gateway::engine::Owner::new(), "t")
        .await
        .unwrap();
    let q = unique("watermark");
    ch.declare_queue(&q, &QueueSpec::default()).await.unwrap();
    ch.publish(
        "",
        &q,
        Message::new(vec![0u8; 100 * 1024]),
        PublishOptions::default(),
    )
    .await
    .unwrap();
    tokio::time::timeout(common::WAIT, blocked.changed())
        .await
        .expect("told in time")
        .unwrap();
    assert!(*blocked.borrow_and_update() && engine.publish_blocked());
    let d = ch.get(&q, false).await.unwrap().expect("the message");
    assert!(
        engine.publish_blocked(),
        "an unacked delivery still holds it"
    );
    ch.ack(d.delivery_tag, false).await.unwrap();
    drop(d);
    tokio::time::timeout(common::WAIT, blocked.changed())
        .await
        .expect("told in time")
        .unwrap();
    assert!(!*blocked.borrow() && !engine.publish_blocked());
}
