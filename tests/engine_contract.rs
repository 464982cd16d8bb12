//! The engine contract: every behaviour of DESIGN.md §2 exercised through the `Engine` /
//! `Channel` traits only. Each case is a plain async fn taking an engine; the `contract!` macro
//! runs the list once per engine (embedded now; upstream joins by adding a module), so both
//! engines are held to the same bodies. Names are unique per run so engines sharing a broker
//! never collide.

mod common;

use std::sync::Arc;
use std::time::Duration;

use amqp_gateway::engine::embedded::{EmbeddedEngine, EmbeddedOptions};
use amqp_gateway::engine::upstream::{UpstreamEngine, UpstreamOptions};
use amqp_gateway::engine::{
    CancelReason, Channel, ConsumeOptions, Declared, DeleteQueueOptions, Engine, EngineError,
    EngineKind, ExchangeKind, ExchangeSpec, FieldTable, FieldValue, Headers, Message, OnCancel,
    Properties, PublishOptions, QueueSpec,
};
use bytes::Bytes;
use common::{eventually, next, nothing_within, text, unique};

#[path = "engine_contract/batch_acks.rs"]
mod batch_acks;
#[path = "engine_contract/publish_runs.rs"]
mod publish_runs;
#[path = "engine_contract/semantics.rs"]
mod semantics;
use batch_acks::*;
use publish_runs::*;
use semantics::*;

const QUIET: Duration = Duration::from_millis(150);

// ---------- helpers ----------

async fn channel(engine: &Arc<dyn Engine>) -> Arc<dyn Channel> {
    engine
        .open_channel(&amqp_gateway::engine::Owner::new(), "contract-test")
        .await
        .expect("open channel")
}

fn args(pairs: &[(&str, FieldValue)]) -> FieldTable {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect()
}

fn queue_spec(arguments: FieldTable) -> QueueSpec {
    QueueSpec {
        durable: false,
        exclusive: false,
        auto_delete: false,
        arguments,
    }
}

async fn declare_queue(ch: &Arc<dyn Channel>, prefix: &str) -> String {
    declare_queue_with(ch, prefix, FieldTable::new()).await
}

async fn declare_queue_with(ch: &Arc<dyn Channel>, prefix: &str, arguments: FieldTable) -> String {
    let name = unique(prefix);
    ch.declare_queue(&name, &queue_spec(arguments))
        .await
        .expect("declare queue");
    name
}

async fn declare_exchange(ch: &Arc<dyn Channel>, prefix: &str, kind: ExchangeKind) -> String {
    let name = unique(prefix);
    let mut spec = ExchangeSpec::new(kind);
    spec.durable = false;
    ch.declare_exchange(&name, &spec)
        .await
        .expect("declare exchange");
    name
}

async fn bind(ch: &Arc<dyn Channel>, queue: &str, exchange: &str, key: &str) {
    ch.bind_queue(queue, exchange, key, &FieldTable::new())
        .await
        .expect("bind");
}

async fn publish(ch: &Arc<dyn Channel>, exchange: &str, key: &str, body: &str) -> bool {
    ch.publish(
        exchange,
        key,
        Message::new(body.to_owned()),
        PublishOptions::default(),
    )
    .await
    .expect("publish")
    .routed
}

/// The bodies currently ready in `queue`, taken with no-ack gets.
async fn drain(ch: &Arc<dyn Channel>, queue: &str) -> Vec<String> {
    let mut out = Vec::new();
    while let Some(d) = ch.get(queue, true).await.expect("get") {
        out.push(text(&d));
    }
    out
}

async fn ready(ch: &Arc<dyn Channel>, queue: &str) -> u64 {
    ch.queue_info(queue).await.expect("queue info").messages
}

// ---------- exchanges and routing ----------

async fn direct_routes_by_exact_key(engine: Arc<dyn Engine>) {
    let ch = channel(&engine).await;
    let ex = declare_exchange(&ch, "direct", ExchangeKind::Direct).await;
    let a = declare_queue(&ch, "a").await;
    let b = declare_queue(&ch, "b").await;
    bind(&ch, &a, &ex, "red").await;
    bind(&ch, &b, &ex, "green").await;
    bind(&ch, &b, &ex, "red").await;
    assert!(publish(&ch, &ex, "red", "r").await);
    assert!(publish(&ch, &ex, "green", "g").await);
    assert!(
        !publish(&ch, &ex, "blue", "x").await,
        "no binding: not routed"
    );
    assert!(!publish(&ch, &ex, "re", "x").await, "keys match exactly");
    assert_eq!(drain(&ch, &a).await, ["r"]);
    assert_eq!(drain(&ch, &b).await, ["r", "g"]);
}

async fn fanout_reaches_every_bound_queue_once(engine: Arc<dyn Engine>) {
    let ch = channel(&engine).await;
    let ex = declare_exchange(&ch, "fanout", ExchangeKind::Fanout).await;
    let queues = [
        declare_queue(&ch, "f1").await,
        declare_queue(&ch, "f2").await,
        declare_queue(&ch, "f3").await,
    ];
    for q in &queues {
        bind(&ch, q, &ex, "ignored").await;
    }
    // A second binding of the same queue must not duplicate the message.
    bind(&ch, &queues[0], &ex, "other").await;
    assert!(publish(&ch, &ex, "any.key", "hello").await);
    for q in &queues {
        assert_eq!(drain(&ch, q).await, ["hello"], "queue {q}");
    }
}

async fn topic_wildcards(engine: Arc<dyn Engine>) {
    let ch = channel(&engine).await;
    let ex = declare_exchange(&ch, "topic", ExchangeKind::Topic).await;
    let star = declare_queue(&ch, "star").await;
    let hash = declare_queue(&ch, "hash").await;
    let mid = declare_queue(&ch, "mid").await;
    let all = declare_queue(&ch, "all").await;
    bind(&ch, &star, &ex, "sensors.*.temp").await;
    bind(&ch, &hash, &ex, "sensors.#").await;
    bind(&ch, &mid, &ex, "sensors.#.alarm").await;
    bind(&ch, &all, &ex, "#").await;
    for key in [
        "sensors.k1.temp",
        "sensors.k1.k2.temp",
        "sensors",
        "sensors.alarm",
        "sensors.a.b.alarm",
        "other.k1.temp",
        "sensors..temp",
    ] {
        publish(&ch, &ex, key, key).await;
    }
    assert_eq!(
        drain(&ch, &star).await,
        ["sensors.k1.temp", "sensors..temp"]
    );
    assert_eq!(
        drain(&ch, &hash).await,
        [
            "sensors.k1.temp",
            "sensors.k1.k2.temp",
            "sensors",
            "sensors.alarm",
            "sensors.a.b.alarm",
            "sensors..temp"
        ]
    );
    assert_eq!(
        drain(&ch, &mid).await,
        ["sensors.alarm", "sensors.a.b.alarm"]
    );
    assert_eq!(drain(&ch, &all).await.len(), 7);
    // A queue bound with two overlapping patterns gets one copy.
    bind(&ch, &star, &ex, "sensors.#").await;
    publish(&ch, &ex, "sensors.k9.temp", "once").await;
    assert_eq!(drain(&ch, &star).await, ["once"]);
}

async fn headers_exchange_all_and_any(engine: Arc<dyn Engine>) {
    let ch = channel(&engine).await;
    let ex = declare_exchange(&ch, "headers", ExchangeKind::Headers).await;
    let all = declare_queue(&ch, "all").await;
    let any = declare_queue(&ch, "any").await;
    let present = declare_queue(&ch, "present").await;
    let binding = |mode: &str| {
        args(&[
            ("x-match", FieldValue::Str(mode.into())),
            ("format", FieldValue::Str("pdf".into())),
            ("type", FieldValue::Str("report".into())),
        ])
    };
    ch.bind_queue(&all, &ex, "", &binding("all")).await.unwrap();
    ch.bind_queue(&any, &ex, "", &binding("any")).await.unwrap();
    ch.bind_queue(&present, &ex, "", &args(&[("flag", FieldValue::Void)]))
        .await
        .unwrap();
    let send = |headers: FieldTable, body: &'static str| {
        let ch = ch.clone();
        let ex = ex.clone();
        async move {
            let mut m = Message::new(body);
            m.properties_mut().headers = headers.into_iter().collect();
            ch.publish(&ex, "", m, PublishOptions::default())
                .await
                .unwrap()
                .routed
        }
    };
    let both = args(&[
        ("format", FieldValue::Str("pdf".into())),
        ("type", FieldValue::Str("report".into())),
    ]);
    assert!(send(both, "both").await);
    assert!(send(args(&[("format", FieldValue::Str("pdf".into()))]), "one").await);
    assert!(!send(args(&[("format", FieldValue::Str("zip".into()))]), "none").await);
    assert!(send(args(&[("flag", FieldValue::I64(0))]), "flag").await);
    assert_eq!(drain(&ch, &all).await, ["both"]);
    assert_eq!(drain(&ch, &any).await, ["both", "one"]);
    assert_eq!(drain(&ch, &present).await, ["flag"]);
    let bad = ch
        .bind_queue(
            &all,
            &ex,
            "",
            &args(&[("x-match", FieldValue::Str("most".into()))]),
        )
        .await;
    assert!(
        matches!(bad, Err(EngineError::InvalidArgument(_))),
        "{bad:?}"
    );
}

async fn default_exchange_routes_by_queue_name(engine: Arc<dyn Engine>) {
    let ch = channel(&engine).await;
    let q = declare_queue(&ch, "default").await;
    assert!(publish(&ch, "", &q, "via empty name").await);
    assert!(publish(&ch, "amq.default", &q, "via alias").await);
    assert!(!publish(&ch, "", &unique("missing"), "lost").await);
    assert_eq!(drain(&ch, &q).await, ["via empty name", "via alias"]);
    let err = ch.bind_queue(&q, "", &q, &FieldTable::new()).await;
    assert!(matches!(err, Err(EngineError::AccessRefused(_))), "{err:?}");
    let bindings = ch.list_bindings(&q).await.unwrap();
    assert!(
        bindings
            .iter()
            .any(|b| b.exchange.is_empty() && b.routing_key == q)
    );
}

async fn predeclared_exchanges_exist(engine: Arc<dyn Engine>) {
    let ch = channel(&engine).await;
    for (name, kind) in [
        ("amq.direct", ExchangeKind::Direct),
        ("amq.fanout", ExchangeKind::Fanout),
        ("amq.topic", ExchangeKind::Topic),
        ("amq.headers", ExchangeKind::Headers),
        ("amq.match", ExchangeKind::Headers),
    ] {
        let info = ch.exchange_info(name).await.expect(name);
        assert_eq!(info.spec.kind, kind, "{name}");
        assert!(info.spec.durable, "{name}");
    }
    let q = declare_queue(&ch, "amqtopic").await;
    bind(&ch, &q, "amq.topic", "a.*").await;
    assert!(publish(&ch, "amq.topic", "a.b", "x").await);
    assert_eq!(drain(&ch, &q).await, ["x"]);
}

async fn reserved_names_are_refused(engine: Arc<dyn Engine>) {
    let ch = channel(&engine).await;
    let new_amq = ch
        .declare_exchange(
            &format!("amq.{}", unique("x")),
            &ExchangeSpec::new(ExchangeKind::Direct),
        )
        .await;
    assert!(
        matches!(new_amq, Err(EngineError::AccessRefused(_))),
        "{new_amq:?}"
    );
    assert_eq!(new_amq.unwrap_err().reply_code(), 403);
    // Redeclaring an existing amq.* exchange with its own flags is fine (as RabbitMQ).
    assert_eq!(
        ch.declare_exchange("amq.topic", &ExchangeSpec::new(ExchangeKind::Topic))
            .await,
        Ok(Declared::Existed)
    );
    for name in ["amq.direct", "", "amq.default"] {
        let del = ch.delete_exchange(name, false).await;
        assert!(
            matches!(del, Err(EngineError::AccessRefused(_))),
            "{name}: {del:?}"
        );
    }
    let q = ch
        .declare_queue(&format!("amq.{}", unique("q")), &QueueSpec::default())
        .await;
    assert!(matches!(q, Err(EngineError::AccessRefused(_))), "{q:?}");
}

async fn names_are_validated(engine: Arc<dyn Engine>) {
    let ch = channel(&engine).await;
    for bad in ["a/b".to_owned(), "x".repeat(256)] {
        let e = ch
            .declare_exchange(&bad, &ExchangeSpec::new(ExchangeKind::Direct))
            .await;
        assert!(matches!(e, Err(EngineError::InvalidArgument(_))), "{e:?}");
        let q = ch.declare_queue(&bad, &QueueSpec::default()).await;
        assert!(matches!(q, Err(EngineError::InvalidArgument(_))), "{q:?}");
    }
    let long_key = "k".repeat(256);
    let p = ch
        .publish(
            "amq.topic",
            &long_key,
            Message::new("x"),
            PublishOptions::default(),
        )
        .await;
    assert!(matches!(p, Err(EngineError::InvalidArgument(_))), "{p:?}");
}

async fn redeclare_must_be_equivalent(engine: Arc<dyn Engine>) {
    let ch = channel(&engine).await;
    let ex = unique("redeclare-ex");
    let mut spec = ExchangeSpec::new(ExchangeKind::Topic);
    spec.durable = false;
    assert_eq!(ch.declare_exchange(&ex, &spec).await, Ok(Declared::Created));
    assert_eq!(ch.declare_exchange(&ex, &spec).await, Ok(Declared::Existed));
    let mut other = spec.clone();
    other.kind = ExchangeKind::Fanout;
    let e = ch.declare_exchange(&ex, &other).await.unwrap_err();
    assert!(matches!(e, EngineError::PreconditionFailed(_)), "{e:?}");
    assert_eq!(e.reply_code(), 406);

    let q = unique("redeclare-q");
    let spec = queue_spec(args(&[("x-max-length", FieldValue::I64(5))]));
    let first = ch.declare_queue(&q, &spec).await.unwrap();
    assert_eq!(first.declared, Declared::Created);
    assert_eq!(first.name, q);
    assert_eq!(
        ch.declare_queue(&q, &spec).await.unwrap().declared,
        Declared::Existed
    );
    let mut durable = spec.clone();
    durable.durable = true;
    assert!(matches!(
        ch.declare_queue(&q, &durable).await,
        Err(EngineError::PreconditionFailed(_))
    ));
    let other_args = queue_spec(args(&[("x-max-length", FieldValue::I64(6))]));
    assert!(matches!(
        ch.declare_queue(&q, &other_args).await,
        Err(EngineError::PreconditionFailed(_))
    ));
}

async fn internal_exchange_refuses_publishes(engine: Arc<dyn Engine>) {
    let ch = channel(&engine).await;
    let name = unique("internal");
    let mut spec = ExchangeSpec::new(ExchangeKind::Fanout);
    spec.durable = false;
    spec.internal = true;
    ch.declare_exchange(&name, &spec).await.unwrap();
    let p = ch
        .publish(&name, "", Message::new("x"), PublishOptions::default())
        .await;
    assert!(matches!(p, Err(EngineError::AccessRefused(_))), "{p:?}");
}

async fn exchange_delete_and_auto_delete(engine: Arc<dyn Engine>) {
    let ch = channel(&engine).await;
    let ex = declare_exchange(&ch, "del", ExchangeKind::Direct).await;
    let q = declare_queue(&ch, "del").await;
    bind(&ch, &q, &ex, "k").await;
    let in_use = ch.delete_exchange(&ex, true).await;
    assert!(
        matches!(in_use, Err(EngineError::PreconditionFailed(_))),
        "{in_use:?}"
    );
    ch.delete_exchange(&ex, false).await.unwrap();
    assert!(matches!(
        ch.exchange_info(&ex).await,
        Err(EngineError::NotFound { .. })
    ));
    let p = ch
        .publish(&ex, "k", Message::new("x"), PublishOptions::default())
        .await;
    assert!(matches!(p, Err(EngineError::NotFound { .. })), "{p:?}");
    assert_eq!(p.unwrap_err().reply_code(), 404);
    // The queue lost that binding with the exchange.
    assert!(
        ch.list_bindings(&q)
            .await
            .unwrap()
            .iter()
            .all(|b| b.exchange != ex)
    );

    let auto = unique("autodel-ex");
    let mut spec = ExchangeSpec::new(ExchangeKind::Direct);
    spec.durable = false;
    spec.auto_delete = true;
    ch.declare_exchange(&auto, &spec).await.unwrap();
    bind(&ch, &q, &auto, "a").await;
    bind(&ch, &q, &auto, "b").await;
    ch.unbind_queue(&q, &auto, "a", &FieldTable::new())
        .await
        .unwrap();
    assert!(ch.exchange_info(&auto).await.is_ok(), "one binding left");
    ch.unbind_queue(&q, &auto, "b", &FieldTable::new())
        .await
        .unwrap();
    assert!(matches!(
        ch.exchange_info(&auto).await,
        Err(EngineError::NotFound { .. })
    ));
}

async fn unbind_stops_routing(engine: Arc<dyn Engine>) {
    let ch = channel(&engine).await;
    let q = declare_queue(&ch, "unbind").await;
    bind(&ch, &q, "amq.direct", &q).await;
    bind(&ch, &q, "amq.direct", &q).await; // idempotent
    assert!(publish(&ch, "amq.direct", &q, "1").await);
    ch.unbind_queue(&q, "amq.direct", &q, &FieldTable::new())
        .await
        .unwrap();
    assert!(!publish(&ch, "amq.direct", &q, "2").await);
    // Unbinding what is not bound succeeds.
    ch.unbind_queue(&q, "amq.direct", "nope", &FieldTable::new())
        .await
        .unwrap();
    assert_eq!(drain(&ch, &q).await, ["1"]);
}

async fn publish_to_missing_exchange_is_not_found(engine: Arc<dyn Engine>) {
    let ch = channel(&engine).await;
    let p = ch
        .publish(
            &unique("nope"),
            "k",
            Message::new("x"),
            PublishOptions { mandatory: true },
        )
        .await;
    assert!(matches!(p, Err(EngineError::NotFound { .. })), "{p:?}");
    let q = declare_queue(&ch, "mandatory").await;
    let unrouted = ch
        .publish(
            "amq.direct",
            &unique("k"),
            Message::new("x"),
            PublishOptions { mandatory: true },
        )
        .await
        .unwrap();
    assert!(!unrouted.routed);
    bind(&ch, &q, "amq.direct", &q).await;
    let routed = ch
        .publish(
            "amq.direct",
            &q,
            Message::new("x"),
            PublishOptions { mandatory: true },
        )
        .await
        .unwrap();
    assert!(routed.routed);
}

// ---------- queues ----------

async fn server_named_queues(engine: Arc<dyn Engine>) {
    let ch = channel(&engine).await;
    let spec = QueueSpec {
        exclusive: true,
        ..QueueSpec::default()
    };
    let a = ch.declare_queue("", &spec).await.unwrap();
    let b = ch.declare_queue("", &spec).await.unwrap();
    assert!(a.name.starts_with("amq.gen-"), "{}", a.name);
    assert_ne!(a.name, b.name);
    assert!(publish(&ch, "", &a.name, "x").await);
    assert_eq!(drain(&ch, &a.name).await, ["x"]);
}

async fn exclusive_queues_belong_to_their_channel(engine: Arc<dyn Engine>) {
    let owner = channel(&engine).await;
    let other = channel(&engine).await;
    let q = unique("exclusive");
    let spec = QueueSpec {
        exclusive: true,
        ..QueueSpec::default()
    };
    owner.declare_queue(&q, &spec).await.unwrap();
    let locked = other.declare_queue(&q, &spec).await.unwrap_err();
    assert_eq!(locked, EngineError::ResourceLocked(q.clone()));
    assert_eq!(locked.reply_code(), 405);
    assert!(matches!(
        other.consume(&q, ConsumeOptions::manual(1)).await,
        Err(EngineError::ResourceLocked(_))
    ));
    assert!(matches!(
        other.get(&q, true).await,
        Err(EngineError::ResourceLocked(_))
    ));
    assert!(matches!(
        other.delete_queue(&q, DeleteQueueOptions::default()).await,
        Err(EngineError::ResourceLocked(_))
    ));
    // Anyone may publish to it.
    assert!(publish(&other, "", &q, "from other").await);
    assert_eq!(drain(&owner, &q).await, ["from other"]);
    owner.close().await;
    eventually("exclusive queue deleted with its channel", || {
        let other = other.clone();
        let q = q.clone();
        async move {
            matches!(
                other.queue_info(&q).await,
                Err(EngineError::NotFound { .. })
            )
        }
    })
    .await;
    let after = owner
        .declare_queue(&unique("x"), &QueueSpec::default())
        .await;
    assert_eq!(after, Err(EngineError::ChannelClosed));
}

async fn auto_delete_queue_goes_with_last_consumer(engine: Arc<dyn Engine>) {
    let ch = channel(&engine).await;
    let q = unique("autodelete");
    let spec = QueueSpec {
        auto_delete: true,
        ..QueueSpec::default()
    };
    ch.declare_queue(&q, &spec).await.unwrap();
    let c1 = ch.consume(&q, ConsumeOptions::manual(1)).await.unwrap();
    let c2 = ch.consume(&q, ConsumeOptions::manual(1)).await.unwrap();
    ch.cancel(c1.tag(), OnCancel::Requeue).await.unwrap();
    assert!(ch.queue_info(&q).await.is_ok(), "one consumer left");
    drop(c2);
    eventually("auto-delete queue removed", || {
        let ch = ch.clone();
        let q = q.clone();
        async move { matches!(ch.queue_info(&q).await, Err(EngineError::NotFound { .. })) }
    })
    .await;
}

async fn delete_and_purge(engine: Arc<dyn Engine>) {
    let ch = channel(&engine).await;
    let q = declare_queue(&ch, "purge").await;
    for i in 0..3 {
        publish(&ch, "", &q, &i.to_string()).await;
    }
    assert_eq!(ready(&ch, &q).await, 3);
    assert_eq!(ch.purge_queue(&q).await.unwrap(), 3);
    assert_eq!(ready(&ch, &q).await, 0);
    publish(&ch, "", &q, "again").await;
    let not_empty = ch
        .delete_queue(
            &q,
            DeleteQueueOptions {
                if_unused: false,
                if_empty: true,
            },
        )
        .await;
    assert!(
        matches!(not_empty, Err(EngineError::PreconditionFailed(_))),
        "{not_empty:?}"
    );
    let mut consumer = ch.consume(&q, ConsumeOptions::manual(5)).await.unwrap();
    let _ = next(&mut consumer).await;
    let in_use = ch
        .delete_queue(
            &q,
            DeleteQueueOptions {
                if_unused: true,
                if_empty: false,
            },
        )
        .await;
    assert!(
        matches!(in_use, Err(EngineError::PreconditionFailed(_))),
        "{in_use:?}"
    );
    publish(&ch, "", &q, "ready one").await;
    ch.delete_queue(&q, DeleteQueueOptions::default())
        .await
        .unwrap();
    // Its consumer ends, saying why.
    let end = tokio::time::timeout(common::WAIT, async {
        while consumer.recv().await.is_some() {}
    })
    .await;
    assert!(end.is_ok(), "consumer of a deleted queue must end");
    assert_eq!(consumer.cancel_reason(), Some(CancelReason::QueueDeleted));
    assert!(matches!(
        ch.queue_info(&q).await,
        Err(EngineError::NotFound { .. })
    ));
    assert!(!publish(&ch, "", &q, "gone").await);
}

async fn invalid_queue_arguments_are_refused(engine: Arc<dyn Engine>) {
    let ch = channel(&engine).await;
    for bad in [
        args(&[("x-overflow", FieldValue::Str("explode".into()))]),
        args(&[("x-message-ttl", FieldValue::I64(-1))]),
        args(&[("x-message-ttl", FieldValue::Str("soon".into()))]),
        args(&[("x-expires", FieldValue::I64(0))]),
        args(&[("x-max-length", FieldValue::Str("ten".into()))]),
    ] {
        let r = ch
            .declare_queue(&unique("badargs"), &queue_spec(bad.clone()))
            .await;
        assert!(
            matches!(r, Err(EngineError::InvalidArgument(_))),
            "{bad:?}: {r:?}"
        );
    }
    let q = declare_queue(&ch, "badexpiration").await;
    let mut m = Message::new("x");
    m.properties_mut().expiration = Some("never".into());
    let p = ch.publish("", &q, m, PublishOptions::default()).await;
    assert!(matches!(p, Err(EngineError::InvalidArgument(_))), "{p:?}");
}

async fn queue_info_and_listing(engine: Arc<dyn Engine>) {
    let ch = channel(&engine).await;
    let prefix = unique("list");
    let mut names = Vec::new();
    for i in 0..5 {
        let n = format!("{prefix}-{i}");
        ch.declare_queue(&n, &QueueSpec::default()).await.unwrap();
        names.push(n);
    }
    publish(&ch, "", &names[0], "m").await;
    let _c = ch
        .consume(&names[1], ConsumeOptions::manual(1))
        .await
        .unwrap();
    let info0 = ch.queue_info(&names[0]).await.unwrap();
    assert_eq!((info0.messages, info0.consumers), (1, 0));
    let info1 = ch.queue_info(&names[1]).await.unwrap();
    assert_eq!(info1.consumers, 1);

    // Page through in twos: sorted by name, no duplicates, nothing missed.
    let mut seen = Vec::new();
    let mut after: Option<String> = Some(format!("{prefix}-"));
    loop {
        let page = ch.list_queues(after.as_deref(), 2).await.unwrap();
        let ours: Vec<String> = page
            .iter()
            .map(|q| q.name.clone())
            .filter(|n| n.starts_with(&prefix))
            .collect();
        if ours.is_empty() {
            break;
        }
        seen.extend(ours);
        after = page.last().map(|q| q.name.clone());
    }
    assert_eq!(seen, names);
    let exchanges = ch.list_exchanges(None, 1000).await.unwrap();
    assert!(exchanges.iter().any(|e| e.name == "amq.topic"));
    let sorted: Vec<&str> = exchanges.iter().map(|e| e.name.as_str()).collect();
    let mut expected = sorted.clone();
    expected.sort();
    assert_eq!(sorted, expected);
}

// ---------- TTL, expiry, length limits, dead-lettering ----------

async fn message_ttl_dead_letters_expired(engine: Arc<dyn Engine>) {
    let ch = channel(&engine).await;
    let dlx = declare_exchange(&ch, "dlx", ExchangeKind::Fanout).await;
    let dlq = declare_queue(&ch, "dlq").await;
    bind(&ch, &dlq, &dlx, "").await;
    let q = declare_queue_with(
        &ch,
        "ttl",
        args(&[
            ("x-message-ttl", FieldValue::I64(50)),
            (
                "x-dead-letter-exchange",
                FieldValue::Str(dlx.as_str().into()),
            ),
        ]),
    )
    .await;
    let mut dead = ch.consume(&dlq, ConsumeOptions::manual(10)).await.unwrap();
    publish(&ch, "", &q, "short-lived").await;
    let d = next(&mut dead).await;
    assert_eq!(text(&d), "short-lived");
    assert_eq!(d.routing_key(), q, "dead-lettered with its original key");
    let death = match d.properties().headers.get("x-death") {
        Some(FieldValue::Array(items)) => items[0].clone(),
        other => panic!("x-death missing: {other:?}"),
    };
    let FieldValue::Table(death) = death else {
        panic!("x-death entry is not a table")
    };
    assert_eq!(
        death.get("reason").and_then(FieldValue::as_str),
        Some("expired")
    );
    assert_eq!(
        death.get("queue").and_then(FieldValue::as_str),
        Some(q.as_str())
    );
    assert_eq!(ready(&ch, &q).await, 0);
}

async fn per_message_expiration(engine: Arc<dyn Engine>) {
    let ch = channel(&engine).await;
    let dlq = declare_queue(&ch, "exp-dlq").await;
    let q = declare_queue_with(
        &ch,
        "exp",
        args(&[
            ("x-dead-letter-exchange", FieldValue::Str("".into())),
            (
                "x-dead-letter-routing-key",
                FieldValue::Str(dlq.as_str().into()),
            ),
        ]),
    )
    .await;
    let mut dead = ch.consume(&dlq, ConsumeOptions::manual(10)).await.unwrap();
    let mut m = Message::new("expiring");
    m.properties_mut().expiration = Some("30".into());
    ch.publish("", &q, m, PublishOptions::default())
        .await
        .unwrap();
    publish(&ch, "", &q, "lasting").await;
    let d = next(&mut dead).await;
    assert_eq!(text(&d), "expiring");
    assert_eq!(
        d.routing_key(),
        dlq,
        "x-dead-letter-routing-key replaces the key"
    );
    assert_eq!(
        d.properties().expiration,
        None,
        "expiration is cleared on dead-lettering"
    );
    assert_eq!(drain(&ch, &q).await, ["lasting"]);
}

async fn zero_ttl_delivers_only_to_waiting_consumers(engine: Arc<dyn Engine>) {
    let ch = channel(&engine).await;
    let q = declare_queue_with(&ch, "ttl0", args(&[("x-message-ttl", FieldValue::I64(0))])).await;
    publish(&ch, "", &q, "nobody home").await;
    assert_eq!(drain(&ch, &q).await, Vec::<String>::new());
    let mut c = ch.consume(&q, ConsumeOptions::manual(1)).await.unwrap();
    publish(&ch, "", &q, "taken at once").await;
    assert_eq!(text(&next(&mut c).await), "taken at once");
}

async fn queue_expires_when_unused(engine: Arc<dyn Engine>) {
    let ch = channel(&engine).await;
    let q = declare_queue_with(&ch, "expires", args(&[("x-expires", FieldValue::I64(100))])).await;
    let used = declare_queue_with(
        &ch,
        "expires-used",
        args(&[("x-expires", FieldValue::I64(100))]),
    )
    .await;
    let _consumer = ch.consume(&used, ConsumeOptions::manual(1)).await.unwrap();
    eventually("unused queue expired", || {
        let ch = ch.clone();
        let q = q.clone();
        async move { matches!(ch.queue_info(&q).await, Err(EngineError::NotFound { .. })) }
    })
    .await;
    assert!(
        ch.queue_info(&used).await.is_ok(),
        "a queue with a consumer is in use"
    );
}

async fn max_length_drops_head(engine: Arc<dyn Engine>) {
    let ch = channel(&engine).await;
    let dlq = declare_queue(&ch, "maxlen-dlq").await;
    let q = declare_queue_with(
        &ch,
        "maxlen",
        args(&[
            ("x-max-length", FieldValue::I64(2)),
            ("x-dead-letter-exchange", FieldValue::Str("".into())),
            (
                "x-dead-letter-routing-key",
                FieldValue::Str(dlq.as_str().into()),
            ),
        ]),
    )
    .await;
    for i in 1..=4 {
        publish(&ch, "", &q, &i.to_string()).await;
    }
    assert_eq!(drain(&ch, &q).await, ["3", "4"]);
    let dead = drain(&ch, &dlq).await;
    assert_eq!(
        dead,
        ["1", "2"],
        "dropped heads are dead-lettered as maxlen"
    );

    let bytes = declare_queue_with(
        &ch,
        "maxbytes",
        args(&[("x-max-length-bytes", FieldValue::I64(10))]),
    )
    .await;
    for body in ["aaaa", "bbbb", "cccc"] {
        publish(&ch, "", &bytes, body).await;
    }
    assert_eq!(drain(&ch, &bytes).await, ["bbbb", "cccc"]);
}

async fn reject_publish_overflow(engine: Arc<dyn Engine>) {
    let ch = channel(&engine).await;
    let q = declare_queue_with(
        &ch,
        "reject",
        args(&[
            ("x-max-length", FieldValue::I64(1)),
            ("x-overflow", FieldValue::Str("reject-publish".into())),
        ]),
    )
    .await;
    assert!(publish(&ch, "", &q, "fits").await);
    let refused = ch
        .publish("", &q, Message::new("no room"), PublishOptions::default())
        .await;
    match &refused {
        // A publisher nack names no queue: only the embedded engine can say which refused.
        Err(EngineError::Rejected(name)) if engine.kind() == EngineKind::Upstream => {
            assert!(!name.is_empty())
        }
        _ => assert_eq!(refused, Err(EngineError::Rejected(q.clone()))),
    }
    assert_eq!(drain(&ch, &q).await, ["fits"]);
    assert!(publish(&ch, "", &q, "room again").await);
}

async fn rejected_messages_are_dead_lettered(engine: Arc<dyn Engine>) {
    let ch = channel(&engine).await;
    let dlx = declare_exchange(&ch, "rej-dlx", ExchangeKind::Direct).await;
    let dlq = declare_queue(&ch, "rej-dlq").await;
    bind(&ch, &dlq, &dlx, "dead").await;
    let q = declare_queue_with(
        &ch,
        "rej",
        args(&[
            (
                "x-dead-letter-exchange",
                FieldValue::Str(dlx.as_str().into()),
            ),
            ("x-dead-letter-routing-key", FieldValue::Str("dead".into())),
        ]),
    )
    .await;
    let mut c = ch.consume(&q, ConsumeOptions::manual(10)).await.unwrap();
    publish(&ch, "", &q, "bad").await;
    let d = next(&mut c).await;
    ch.nack(d.delivery_tag, false, false).await.unwrap();
    // A broker dead-letters after the nack (AMQP has no nack-ok): waited for, bounded.
    let dead = std::sync::Mutex::new(None);
    eventually("dead-lettered", || async {
        let got = ch.get(&dlq, true).await.unwrap();
        let found = got.is_some();
        *dead.lock().unwrap() = got;
        found
    })
    .await;
    let dead = dead.into_inner().unwrap().expect("dead-lettered");
    assert_eq!(text(&dead), "bad");
    assert_eq!(
        dead.properties()
            .headers
            .get("x-first-death-reason")
            .and_then(FieldValue::as_str),
        Some("rejected")
    );
    assert_eq!(ready(&ch, &q).await, 0);
}

// ---------- consumers, credit, acks ----------

async fn prefetch_bounds_unacked_deliveries(engine: Arc<dyn Engine>) {
    let ch = channel(&engine).await;
    let q = declare_queue(&ch, "prefetch").await;
    for i in 0..5 {
        publish(&ch, "", &q, &i.to_string()).await;
    }
    let mut c = ch.consume(&q, ConsumeOptions::manual(2)).await.unwrap();
    let d0 = next(&mut c).await;
    let d1 = next(&mut c).await;
    assert_eq!((text(&d0).as_str(), text(&d1).as_str()), ("0", "1"));
    nothing_within(&mut c, QUIET).await;
    assert_eq!(ch.queue_info(&q).await.unwrap().messages, 3);
    ch.ack(d0.delivery_tag, false).await.unwrap();
    assert_eq!(text(&next(&mut c).await), "2");
    nothing_within(&mut c, QUIET).await;
    let bad_prefetch = ch.consume(&q, ConsumeOptions::manual(0)).await;
    assert!(matches!(bad_prefetch, Err(EngineError::InvalidArgument(_))));
}

async fn consumers_share_round_robin(engine: Arc<dyn Engine>) {
    let ch = channel(&engine).await;
    let q = declare_queue(&ch, "rr").await;
    let mut a = ch.consume(&q, ConsumeOptions::auto()).await.unwrap();
    let mut b = ch.consume(&q, ConsumeOptions::auto()).await.unwrap();
    for i in 0..10 {
        publish(&ch, "", &q, &i.to_string()).await;
    }
    let mut got_a = Vec::new();
    let mut got_b = Vec::new();
    for _ in 0..5 {
        got_a.push(text(&next(&mut a).await));
        got_b.push(text(&next(&mut b).await));
    }
    assert_eq!(got_a, ["0", "2", "4", "6", "8"]);
    assert_eq!(got_b, ["1", "3", "5", "7", "9"]);
}

async fn ack_multiple_and_nack_requeue(engine: Arc<dyn Engine>) {
    let ch = channel(&engine).await;
    let q = declare_queue(&ch, "acks").await;
    for i in 0..4 {
        publish(&ch, "", &q, &i.to_string()).await;
    }
    let mut c = ch.consume(&q, ConsumeOptions::manual(10)).await.unwrap();
    let ds: Vec<_> = [
        next(&mut c).await,
        next(&mut c).await,
        next(&mut c).await,
        next(&mut c).await,
    ]
    .into();
    assert!(ds.iter().all(|d| !d.redelivered));
    // Ack 0 and 1 at once; nack 2 and 3 at once with requeue.
    ch.ack(ds[1].delivery_tag, true).await.unwrap();
    ch.nack(ds[3].delivery_tag, true, true).await.unwrap();
    let r2 = next(&mut c).await;
    let r3 = next(&mut c).await;
    assert_eq!(
        (text(&r2).as_str(), text(&r3).as_str()),
        ("2", "3"),
        "requeued in queue order"
    );
    assert!(r2.redelivered && r3.redelivered);
    assert!(
        r2.delivery_tag > ds[3].delivery_tag,
        "redeliveries get new tags"
    );
    // Settled tags are unknown now.
    let again = ch.ack(ds[0].delivery_tag, false).await;
    assert!(
        matches!(again, Err(EngineError::PreconditionFailed(_))),
        "{again:?}"
    );
    assert_eq!(again.unwrap_err().reply_code(), 406);
    let never = ch.ack(1_000_000, false).await;
    assert!(matches!(never, Err(EngineError::PreconditionFailed(_))));
    ch.ack(0, true).await.unwrap();
    assert_eq!(
        ch.queue_info(&q).await.unwrap().messages_unacknowledged,
        Some(0)
    );
}

async fn cancel_requeues_unacked(engine: Arc<dyn Engine>) {
    let ch = channel(&engine).await;
    let q = declare_queue(&ch, "cancel").await;
    publish(&ch, "", &q, "held").await;
    let mut c = ch.consume(&q, ConsumeOptions::manual(1)).await.unwrap();
    let d = next(&mut c).await;
    assert!(!d.redelivered);
    ch.cancel(c.tag(), OnCancel::Requeue).await.unwrap();
    let again = ch.get(&q, true).await.unwrap().expect("requeued on cancel");
    assert_eq!(text(&again), "held");
    assert!(again.redelivered);
    let unknown = ch.cancel("no-such-consumer", OnCancel::Requeue).await;
    assert!(matches!(unknown, Err(EngineError::PreconditionFailed(_))));
}

async fn closing_a_channel_requeues_unacked(engine: Arc<dyn Engine>) {
    let consumer_ch = channel(&engine).await;
    let observer = channel(&engine).await;
    let q = declare_queue(&observer, "close").await;
    for i in 0..3 {
        publish(&observer, "", &q, &i.to_string()).await;
    }
    let mut c = consumer_ch
        .consume(&q, ConsumeOptions::manual(3))
        .await
        .unwrap();
    let first = next(&mut c).await;
    let _ = next(&mut c).await;
    let _ = next(&mut c).await;
    consumer_ch.ack(first.delivery_tag, false).await.unwrap();
    consumer_ch.close().await;
    let mut back = observer
        .consume(&q, ConsumeOptions::manual(10))
        .await
        .unwrap();
    let r1 = next(&mut back).await;
    let r2 = next(&mut back).await;
    assert_eq!((text(&r1).as_str(), text(&r2).as_str()), ("1", "2"));
    assert!(r1.redelivered && r2.redelivered);
}

async fn dropping_a_consumer_cancels_it(engine: Arc<dyn Engine>) {
    let ch = channel(&engine).await;
    let q = declare_queue(&ch, "dropc").await;
    publish(&ch, "", &q, "x").await;
    let mut c = ch.consume(&q, ConsumeOptions::manual(1)).await.unwrap();
    let _ = next(&mut c).await;
    drop(c);
    eventually("dropped consumer's delivery requeued", || {
        let ch = ch.clone();
        let q = q.clone();
        async move {
            let info = ch.queue_info(&q).await.unwrap();
            info.messages == 1 && info.consumers == 0
        }
    })
    .await;
}

async fn exclusive_consumer(engine: Arc<dyn Engine>) {
    let ch = channel(&engine).await;
    let other = channel(&engine).await;
    let q = declare_queue(&ch, "excl-consumer").await;
    let mut opts = ConsumeOptions::manual(1);
    opts.exclusive = true;
    let first = ch.consume(&q, opts.clone()).await.unwrap();
    let second = other.consume(&q, ConsumeOptions::manual(1)).await;
    assert_eq!(second.unwrap_err(), EngineError::InUse(q.clone()));
    drop(first);
    // Dropping cancels in the background: upstream, the cancel travels on
    // `ch` while the next consume travels on `other`, and the broker orders
    // two channels' methods to the queue in no particular way.
    eventually("dropped exclusive consumer cancelled", || {
        let ch = ch.clone();
        let q = q.clone();
        async move { ch.queue_info(&q).await.unwrap().consumers == 0 }
    })
    .await;
    let plain = other.consume(&q, ConsumeOptions::manual(1)).await.unwrap();
    let excl = ch.consume(&q, opts).await;
    assert!(
        matches!(excl, Err(EngineError::InUse(_))),
        "queue has a consumer"
    );
    drop(plain);
}

async fn basic_get_with_and_without_ack(engine: Arc<dyn Engine>) {
    let ch = channel(&engine).await;
    let q = declare_queue(&ch, "get").await;
    assert!(ch.get(&q, false).await.unwrap().is_none());
    for i in 0..3 {
        publish(&ch, "", &q, &i.to_string()).await;
    }
    let first = ch.get(&q, false).await.unwrap().unwrap();
    assert_eq!(text(&first), "0");
    assert_eq!(first.message_count, Some(2));
    assert_eq!(first.exchange(), "");
    assert_eq!(first.routing_key(), q);
    ch.nack(first.delivery_tag, false, true).await.unwrap();
    let again = ch.get(&q, false).await.unwrap().unwrap();
    assert_eq!(text(&again), "0");
    assert!(again.redelivered);
    ch.ack(again.delivery_tag, false).await.unwrap();
    let auto = ch.get(&q, true).await.unwrap().unwrap();
    assert_eq!(text(&auto), "1");
    assert!(matches!(
        ch.ack(auto.delivery_tag, false).await,
        Err(EngineError::PreconditionFailed(_))
    ));
    assert!(matches!(
        ch.get(&unique("missing"), true).await,
        Err(EngineError::NotFound { .. })
    ));
}

async fn no_ack_consumer_gets_everything_in_order(engine: Arc<dyn Engine>) {
    let ch = channel(&engine).await;
    let q = declare_queue(&ch, "noack").await;
    let mut c = ch.consume(&q, ConsumeOptions::auto()).await.unwrap();
    let n = 2000;
    for i in 0..n {
        ch.publish(
            "",
            &q,
            Message::new(i.to_string()),
            PublishOptions::default(),
        );
    }
    for i in 0..n {
        assert_eq!(text(&next(&mut c).await), i.to_string());
    }
}

async fn publishes_keep_channel_order(engine: Arc<dyn Engine>) {
    let ch = channel(&engine).await;
    let q = declare_queue(&ch, "order").await;
    let ex = declare_exchange(&ch, "order", ExchangeKind::Topic).await;
    bind(&ch, &q, &ex, "order.#").await;
    // Pipelined: every confirm is awaited only after all were issued.
    let confirms: Vec<_> = (0..500)
        .map(|i| {
            ch.publish(
                &ex,
                "order.x",
                Message::new(i.to_string()),
                PublishOptions::default(),
            )
        })
        .collect();
    for c in confirms {
        assert!(c.await.unwrap().routed);
    }
    let mut c = ch.consume(&q, ConsumeOptions::manual(100)).await.unwrap();
    for i in 0..500 {
        let d = next(&mut c).await;
        assert_eq!(text(&d), i.to_string());
        ch.ack(d.delivery_tag, false).await.unwrap();
    }
}

async fn properties_round_trip(engine: Arc<dyn Engine>) {
    let ch = channel(&engine).await;
    let q = declare_queue(&ch, "props").await;
    let mut headers = Headers::new();
    headers.insert("n", FieldValue::I64(-7));
    headers.insert("s", FieldValue::Str("v".into()));
    headers.insert("b", FieldValue::Bool(true));
    headers.insert("raw", FieldValue::Bytes(vec![0, 255]));
    let properties = Properties {
        content_type: Some("application/json".into()),
        content_encoding: Some("identity".into()),
        headers,
        delivery_mode: Some(2),
        priority: Some(3),
        correlation_id: Some("corr".into()),
        reply_to: Some("replies".into()),
        expiration: Some("60000".into()),
        message_id: Some("id-1".into()),
        timestamp: Some(1_700_000_000),
        kind: Some("order.created".into()),
        user_id: None,
        app_id: Some("tests".into()),
    };
    let message = Message {
        properties: properties.clone().into(),
        body: Bytes::from_static(b"{\"a\":1}\x00\xff"),
    };
    ch.publish("", &q, message.clone(), PublishOptions::default())
        .await
        .unwrap();
    let d = ch.get(&q, true).await.unwrap().unwrap();
    assert_eq!(d.message(), &message);
    if engine.capabilities().expiry_countdown {
        assert!(d.expires_in.is_some_and(|e| e <= Duration::from_secs(60)));
    } else {
        assert_eq!(d.expires_in, None, "no countdown claimed, none given");
    }
}

async fn oversized_messages_are_refused(engine: Arc<dyn Engine>) {
    let ch = channel(&engine).await;
    let q = declare_queue(&ch, "big").await;
    let big = Message::new(vec![0u8; 1024 * 1024 + 1]);
    let r = ch.publish("", &q, big, PublishOptions::default()).await;
    assert!(
        matches!(r, Err(EngineError::ContentTooLarge { .. })),
        "{r:?}"
    );
    assert_eq!(r.unwrap_err().reply_code(), 311);
    assert_eq!(ready(&ch, &q).await, 0);
}

macro_rules! contract {
    ($engine:ident: $($case:ident),* $(,)?) => {
        mod $engine {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(super::$engine().await).await
                }
            )*
        }
    };
}

async fn embedded() -> Arc<dyn Engine> {
    Arc::new(EmbeddedEngine::new(EmbeddedOptions::default()))
}

/// The upstream engine on a vhost of its own, deleted when the case ends.
macro_rules! upstream_contract {
    ($($case:ident),* $(,)?) => {
        mod upstream {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let vhost = super::common::rabbit::Vhost::create().await;
                    let engine = super::upstream(&vhost).await;
                    super::$case(engine.clone()).await;
                    engine.shutdown().await;
                    drop(vhost);
                }
            )*
        }
    };
}

async fn upstream(vhost: &common::rabbit::Vhost) -> Arc<dyn Engine> {
    let mut options = UpstreamOptions::new(vhost.amqp_url());
    options.management_url = Some(vhost.management_url());
    Arc::new(
        UpstreamEngine::connect(options)
            .await
            .expect("the upstream engine connects to RabbitMQ on 127.0.0.1:5672"),
    )
}

contract!(embedded:
    direct_routes_by_exact_key,
    fanout_reaches_every_bound_queue_once,
    topic_wildcards,
    headers_exchange_all_and_any,
    default_exchange_routes_by_queue_name,
    predeclared_exchanges_exist,
    reserved_names_are_refused,
    names_are_validated,
    redeclare_must_be_equivalent,
    internal_exchange_refuses_publishes,
    exchange_delete_and_auto_delete,
    unbind_stops_routing,
    publish_to_missing_exchange_is_not_found,
    server_named_queues,
    exclusive_queues_belong_to_their_channel,
    auto_delete_queue_goes_with_last_consumer,
    delete_and_purge,
    invalid_queue_arguments_are_refused,
    queue_info_and_listing,
    message_ttl_dead_letters_expired,
    per_message_expiration,
    zero_ttl_delivers_only_to_waiting_consumers,
    queue_expires_when_unused,
    max_length_drops_head,
    reject_publish_overflow,
    rejected_messages_are_dead_lettered,
    prefetch_bounds_unacked_deliveries,
    consumers_share_round_robin,
    ack_multiple_and_nack_requeue,
    ack_each_settles_each_named_tag,
    cancel_requeues_unacked,
    closing_a_channel_requeues_unacked,
    dropping_a_consumer_cancels_it,
    exclusive_consumer,
    basic_get_with_and_without_ack,
    no_ack_consumer_gets_everything_in_order,
    publishes_keep_channel_order,
    properties_round_trip,
    oversized_messages_are_refused,
    a_message_ttl_expires_once_at_the_head,
    redeclare_equivalence_compares_values,
    an_expiry_cycle_after_a_rejection_is_cut,
    operations_racing_a_close_leave_nothing_behind,
    a_publish_racing_a_delete_is_routed_only_if_it_arrived,
    only_deliveries_a_client_took_come_back_redelivered,
    shutdown_closes_channels,
    capabilities_hold,
    retained_messages_are_kept_whole,
    control_takeover_and_wills,
    cancel_keeps_or_requeues_and_yields_nothing_more,
    refusals_leave_the_channel_usable,
    exclusive_queues_belong_to_the_connection,
    shared_key_publishes_follow_every_binding_change,
    publish_runs_answer_each_in_order,
    unroutable_publishes_among_routed_ones_are_told_apart,
);

// Embedded only (docs/engine.md, "Upstream differences"): RabbitMQ confirms a publish routed
// to a queue deleted before it enqueued it (a_publish_racing_a_delete_is_routed_only_if_it_arrived);
// RabbitMQ 3.10 lets a rejection-started expiry cycle loop (an_expiry_cycle_after_a_rejection_is_cut);
// RabbitMQ marks redelivered whatever it had sent to a consumer's channel, taken by the client
// or not, and samples unacked counts every 5 s (only_deliveries_a_client_took_come_back_redelivered,
// cancel_keeps_or_requeues_and_yields_nothing_more).
upstream_contract!(
    direct_routes_by_exact_key,
    fanout_reaches_every_bound_queue_once,
    topic_wildcards,
    headers_exchange_all_and_any,
    default_exchange_routes_by_queue_name,
    predeclared_exchanges_exist,
    reserved_names_are_refused,
    names_are_validated,
    redeclare_must_be_equivalent,
    internal_exchange_refuses_publishes,
    exchange_delete_and_auto_delete,
    unbind_stops_routing,
    publish_to_missing_exchange_is_not_found,
    server_named_queues,
    exclusive_queues_belong_to_their_channel,
    auto_delete_queue_goes_with_last_consumer,
    delete_and_purge,
    invalid_queue_arguments_are_refused,
    queue_info_and_listing,
    message_ttl_dead_letters_expired,
    per_message_expiration,
    zero_ttl_delivers_only_to_waiting_consumers,
    queue_expires_when_unused,
    max_length_drops_head,
    reject_publish_overflow,
    rejected_messages_are_dead_lettered,
    prefetch_bounds_unacked_deliveries,
    consumers_share_round_robin,
    ack_multiple_and_nack_requeue,
    ack_each_settles_each_named_tag,
    cancel_requeues_unacked,
    closing_a_channel_requeues_unacked,
    dropping_a_consumer_cancels_it,
    exclusive_consumer,
    basic_get_with_and_without_ack,
    no_ack_consumer_gets_everything_in_order,
    publishes_keep_channel_order,
    properties_round_trip,
    oversized_messages_are_refused,
    a_message_ttl_expires_once_at_the_head,
    redeclare_equivalence_compares_values,
    operations_racing_a_close_leave_nothing_behind,
    shutdown_closes_channels,
    capabilities_hold,
    retained_messages_are_kept_whole,
    control_takeover_and_wills,
    refusals_leave_the_channel_usable,
    exclusive_queues_belong_to_the_connection,
    shared_key_publishes_follow_every_binding_change,
    publish_runs_answer_each_in_order,
    unroutable_publishes_among_routed_ones_are_told_apart,
);
