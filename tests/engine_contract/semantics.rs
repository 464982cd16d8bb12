//! Queue semantics RabbitMQ users rely on (DESIGN.md §2): per-message TTL at the head,
//! redeclare equivalence by value, dead-letter cycles, races between a client's operations and
//! a channel close or a queue delete, which deliveries are marked redelivered, and shutdown.
//! Races are run many times over: each round is cheap, and a round that loses a message or a
//! count fails the case.

use super::*;

/// A message with an `expiration` behind one without reaches the head when that one is taken,
/// and is dead-lettered then — without waiting for another publish to wake the queue.
pub async fn a_message_ttl_expires_once_at_the_head(engine: Arc<dyn Engine>) {
    let ch = channel(&engine).await;
    let dlq = declare_queue(&ch, "head-dlq").await;
    let q = declare_queue_with(
        &ch,
        "head",
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
    // A first message with a far deadline starts the queue's expiry task; taken, it leaves the
    // task waiting for its next wake-up.
    let mut m = Message::new("zeroth");
    m.properties_mut().expiration = Some("60000".into());
    ch.publish("", &q, m, PublishOptions::default())
        .await
        .unwrap();
    // The task is spawned: let it run its first round (time for it, not an event to await).
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(ch.get(&q, true).await.unwrap().is_some());
    publish(&ch, "", &q, "first").await;
    let mut m = Message::new("second");
    m.properties_mut().expiration = Some("100".into());
    ch.publish("", &q, m, PublishOptions::default())
        .await
        .unwrap();
    let first = ch.get(&q, true).await.unwrap().expect("first");
    assert_eq!(text(&first), "first");
    assert_eq!(text(&next(&mut dead).await), "second");
    assert_eq!(ready(&ch, &q).await, 0);
}

/// Redeclare equivalence compares the arguments a broker knows by value and type class: an
/// integer at another width is the same argument, a string of the same digits is not; an
/// argument the broker does not know is not compared.
pub async fn redeclare_equivalence_compares_values(engine: Arc<dyn Engine>) {
    let ch = channel(&engine).await;
    let q = unique("equiv");
    let with = |v: FieldValue| {
        queue_spec(args(&[
            ("x-max-length", v),
            ("x-message-ttl", FieldValue::I64(60_000)),
        ]))
    };
    assert_eq!(
        ch.declare_queue(&q, &with(FieldValue::I64(5)))
            .await
            .unwrap()
            .declared,
        Declared::Created
    );
    for same in [FieldValue::I32(5), FieldValue::I16(5), FieldValue::U8(5)] {
        let again = ch.declare_queue(&q, &with(same.clone())).await;
        assert_eq!(again.map(|d| d.declared), Ok(Declared::Existed), "{same:?}");
    }
    for other in [FieldValue::I32(6), FieldValue::Str("5".into())] {
        let e = ch
            .declare_queue(&q, &with(other.clone()))
            .await
            .unwrap_err();
        assert_eq!(e.reply_code(), 406, "{other:?}: {e:?}");
    }
    let mut unknown = with(FieldValue::I32(5));
    unknown
        .arguments
        .insert("x-app-label", FieldValue::Str("anything".into()));
    assert_eq!(
        ch.declare_queue(&q, &unknown).await.map(|d| d.declared),
        Ok(Declared::Existed),
        "arguments the broker does not know are not compared"
    );

    let ex = unique("equiv-ex");
    let mut spec = ExchangeSpec::new(ExchangeKind::Topic);
    spec.durable = false;
    spec.arguments = args(&[("alternate-exchange", FieldValue::Str("ae-1".into()))]);
    ch.declare_exchange(&ex, &spec).await.unwrap();
    let mut other = spec.clone();
    other.arguments = args(&[("alternate-exchange", FieldValue::Str("ae-2".into()))]);
    let e = ch.declare_exchange(&ex, &other).await.unwrap_err();
    assert_eq!(e.reply_code(), 406, "{e:?}");
}

/// After a rejection, a message that loops between two queues on expiry alone is dropped
/// once the expiry cycle closes: only deaths since the target queue last appeared count.
pub async fn an_expiry_cycle_after_a_rejection_is_cut(engine: Arc<dyn Engine>) {
    let ch = channel(&engine).await;
    let a = unique("cycle-a");
    let b = unique("cycle-b");
    let dead_letter_to = |queue: &str, ttl: i64| {
        queue_spec(args(&[
            ("x-message-ttl", FieldValue::I64(ttl)),
            ("x-dead-letter-exchange", FieldValue::Str("".into())),
            ("x-dead-letter-routing-key", FieldValue::Str(queue.into())),
        ]))
    };
    ch.declare_queue(&a, &dead_letter_to(&b, 20)).await.unwrap();
    ch.declare_queue(&b, &dead_letter_to(&a, 200))
        .await
        .unwrap();
    let mut c = ch.consume(&a, ConsumeOptions::manual(1)).await.unwrap();
    publish(&ch, "", &a, "looping").await;
    let d = next(&mut c).await;
    // Rejected in a → b; b's TTL (200 ms) → a; a's TTL (20 ms) → b would close a cycle of
    // expiries alone, so it is dropped there, about 220 ms from now.
    ch.nack(d.delivery_tag, false, false).await.unwrap();
    ch.cancel(c.tag(), OnCancel::Requeue).await.unwrap();
    drop(c);
    // TTLs are time: waited for, well past the cut, then it must stay gone.
    tokio::time::sleep(Duration::from_millis(600)).await;
    for _ in 0..5 {
        let both = ready(&ch, &a).await + ready(&ch, &b).await;
        assert_eq!(both, 0, "the message keeps looping between the two queues");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `get` (and consume, and an exclusive declare) racing a channel close: whatever the order,
/// nothing stays taken by the closed channel — the message is back, unacknowledged by nobody;
/// no consumer stays; the exclusive queue is gone.
pub async fn operations_racing_a_close_leave_nothing_behind(engine: Arc<dyn Engine>) {
    let admin = channel(&engine).await;
    let q = declare_queue(&admin, "race-get").await;
    publish(&admin, "", &q, "m").await;
    for round in 0..300 {
        let ch = channel(&engine).await;
        let (get_ch, close_ch) = (ch.clone(), ch.clone());
        let q2 = q.clone();
        let get = tokio::spawn(async move { get_ch.get(&q2, false).await });
        let close = tokio::spawn(async move { close_ch.close().await });
        let _ = get.await.unwrap();
        close.await.unwrap();
        drop(ch);
        // Upstream, RabbitMQ hands a closed channel's unacknowledged messages back after its
        // close-ok, from the queue's process: awaited, as the exclusive queue's delete below.
        eventually(
            &format!("round {round}: the message is back and nobody holds it"),
            || async {
                let info = admin.queue_info(&q).await.unwrap();
                (info.messages, info.messages_unacknowledged) == (1, Some(0))
            },
        )
        .await;
    }
    for round in 0..300 {
        let ch = channel(&engine).await;
        let (use_ch, close_ch) = (ch.clone(), ch.clone());
        let q2 = q.clone();
        let consume = tokio::spawn(async move {
            use_ch
                .consume(&q2, ConsumeOptions::manual(1))
                .await
                .map(drop)
        });
        let close = tokio::spawn(async move { close_ch.close().await });
        let _ = consume.await.unwrap();
        close.await.unwrap();
        drop(ch);
        eventually(&format!("round {round}: no consumer stays"), || async {
            let info = admin.queue_info(&q).await.unwrap();
            (info.consumers, info.messages) == (0, 1)
        })
        .await;
    }
    for round in 0..300 {
        let ch = channel(&engine).await;
        let (use_ch, close_ch) = (ch.clone(), ch.clone());
        let name = unique("race-excl");
        let n2 = name.clone();
        let declare = tokio::spawn(async move {
            let mut spec = queue_spec(FieldTable::new());
            spec.exclusive = true;
            use_ch.declare_queue(&n2, &spec).await.map(drop)
        });
        let close = tokio::spawn(async move { close_ch.close().await });
        let _ = declare.await.unwrap();
        close.await.unwrap();
        drop(ch);
        eventually(
            &format!("round {round}: the exclusive queue is gone"),
            || async {
                matches!(
                    admin.queue_info(&name).await,
                    Err(EngineError::NotFound { .. })
                )
            },
        )
        .await;
    }
}

/// A publish racing the delete of its only queue: a publish answered `routed` reached the
/// queue (the delete counts it among the messages it dropped); none is lost in between.
pub async fn a_publish_racing_a_delete_is_routed_only_if_it_arrived(engine: Arc<dyn Engine>) {
    let ch = channel(&engine).await;
    let ex = declare_exchange(&ch, "race-del", ExchangeKind::Fanout).await;
    for round in 0..100 {
        let q = declare_queue(&ch, "race-del").await;
        bind(&ch, &q, &ex, "").await;
        let mut publishers = Vec::new();
        for _ in 0..2 {
            let publisher = channel(&engine).await;
            let ex = ex.clone();
            publishers.push(tokio::spawn(async move {
                let mut routed = 0u64;
                for _ in 0..200 {
                    if publish(&publisher, &ex, "", "m").await {
                        routed += 1;
                    }
                }
                routed
            }));
        }
        // Somewhere in the middle of the publishes.
        while ready(&ch, &q).await < 50 {
            tokio::task::yield_now().await;
        }
        let dropped = ch
            .delete_queue(&q, DeleteQueueOptions::default())
            .await
            .unwrap();
        let mut routed = 0;
        for p in publishers {
            routed += p.await.unwrap();
        }
        assert_eq!(
            routed, dropped,
            "round {round}: every publish answered routed was in the queue when it went"
        );
    }
}

/// Deliveries still in a consumer's buffer never reached the client: when the consumer goes
/// they come back unmarked; only what the client took is marked redelivered.
pub async fn only_deliveries_a_client_took_come_back_redelivered(engine: Arc<dyn Engine>) {
    let ch = channel(&engine).await;
    let q = declare_queue(&ch, "seen").await;
    for i in 1..=5 {
        publish(&ch, "", &q, &format!("m{i}")).await;
    }
    let mut c = ch.consume(&q, ConsumeOptions::manual(5)).await.unwrap();
    assert_eq!(text(&next(&mut c).await), "m1");
    eventually("all five are out for delivery", || async {
        ch.queue_info(&q).await.unwrap().messages_unacknowledged == Some(5)
    })
    .await;
    drop(c);
    eventually("all five are back", || async { ready(&ch, &q).await == 5 }).await;
    let mut back = Vec::new();
    while let Some(d) = ch.get(&q, true).await.unwrap() {
        back.push((text(&d), d.redelivered));
    }
    assert_eq!(
        back,
        [
            ("m1".to_owned(), true),
            ("m2".to_owned(), false),
            ("m3".to_owned(), false),
            ("m4".to_owned(), false),
            ("m5".to_owned(), false),
        ]
    );
}

/// Shutdown closes open channels: their consumers end, their operations fail, their unacked
/// deliveries return; no new channel opens.
pub async fn shutdown_closes_channels(engine: Arc<dyn Engine>) {
    let ch = channel(&engine).await;
    let q = declare_queue(&ch, "shut").await;
    let mut c = ch.consume(&q, ConsumeOptions::manual(1)).await.unwrap();
    publish(&ch, "", &q, "in flight").await;
    let _ = next(&mut c).await;
    engine.shutdown().await;
    let ended =
        tokio::time::timeout(common::WAIT, async { while c.recv().await.is_some() {} }).await;
    assert!(ended.is_ok(), "the consumer ended");
    assert_eq!(
        ch.queue_info(&q).await.err(),
        Some(EngineError::ChannelClosed)
    );
    assert!(matches!(
        engine
            .open_channel(&amqp_gateway::engine::Owner::new(), "late")
            .await
            .err(),
        Some(EngineError::Unavailable(_))
    ));
}

/// Capabilities are what adapters branch on; each one an engine claims holds.
pub async fn capabilities_hold(engine: Arc<dyn Engine>) {
    let caps = engine.capabilities();
    assert!((1..=2).contains(&caps.max_mqtt_qos), "{caps:?}");
    let ch = channel(&engine).await;
    let q = declare_queue_with(
        &ch,
        "caps",
        args(&[("x-expires", FieldValue::I64(600_000))]),
    )
    .await;
    let listed = ch.list_queues(None, 1000).await;
    assert_eq!(listed.is_ok(), caps.listing, "listing: {listed:?}");
    let mut m = Message::new("x");
    m.properties_mut().expiration = Some("60000".into());
    ch.publish("", &q, m, PublishOptions::default())
        .await
        .unwrap();
    let d = ch.get(&q, true).await.unwrap().expect("the message");
    assert_eq!(
        d.expires_in.is_some(),
        caps.expiry_countdown,
        "{:?}",
        d.expires_in
    );
    let updated = ch
        .set_queue_expiry(&q, Some(Duration::from_secs(1200)))
        .await;
    assert_eq!(updated.is_ok(), caps.queue_expiry_update, "{updated:?}");
    if caps.queue_expiry_update {
        let spec = ch.queue_info(&q).await.unwrap().spec.expect("flags");
        assert!(
            spec.arguments
                .get("x-expires")
                .and_then(FieldValue::as_i128)
                == Some(1_200_000),
            "{:?}",
            spec.arguments
        );
    }
}

/// The retained store every instance shares: set, replace, clear, match by topic pattern, each
/// message whole (properties intact, expiry counted down), undo of a refused publish's set.
pub async fn retained_messages_are_kept_whole(engine: Arc<dyn Engine>) {
    let store = engine.retained();
    let root = unique("ret").replace('-', "_");
    let key = |s: &str| format!("{root}.{s}");
    let mut m = Message::new("21.5");
    m.properties_mut().content_type = Some("text/plain".into());
    m.properties_mut().expiration = Some("60000".into());
    m.properties_mut()
        .headers
        .insert("unit", FieldValue::Str("C".into()));
    store.set(&key("k1.temp"), m.clone()).await.unwrap();
    store
        .set(&key("k2.temp"), Message::new("19"))
        .await
        .unwrap();
    store.set(&key("k2.hum"), Message::new("40")).await.unwrap();
    let found = store.matching(&key("*.temp"));
    let keys: Vec<&str> = found.iter().map(|r| r.routing_key.as_str()).collect();
    assert_eq!(keys, [key("k1.temp"), key("k2.temp")], "key order");
    assert_eq!(found[0].message, m, "every property kept");
    let left = found[0].expires_in.expect("counting down");
    assert!(left <= Duration::from_secs(60) && left > Duration::from_secs(50));
    assert_eq!(store.matching(&key("#")).len(), 3);

    // Replace, clear, and undo a set whose publish was refused.
    store
        .set(&key("k2.temp"), Message::new("20"))
        .await
        .unwrap();
    let undo = store
        .set(&key("k2.temp"), Message::new("refused"))
        .await
        .unwrap();
    store.undo(&key("k2.temp"), undo).await;
    let now: Vec<Bytes> = store
        .matching(&key("k2.temp"))
        .into_iter()
        .map(|r| r.message.body)
        .collect();
    assert_eq!(now, [Bytes::from("20")]);
    store.set(&key("k2.hum"), Message::new("")).await.unwrap();
    assert_eq!(
        store.matching(&key("k2.#")).len(),
        1,
        "an empty body clears"
    );
}

/// Control state every instance shares: a holder is told when another connection takes over
/// what it holds, and lets go; a delayed will is cancelled when its session returns.
pub async fn control_takeover_and_wills(engine: Arc<dyn Engine>) {
    let sessions = engine.sessions();
    let key = unique("session");
    assert!(!sessions.take_over(&key).await, "nobody holds it yet");
    let (tx, mut rx) = amqp_gateway::engine::sessions::takeover_channel();
    sessions.hold(key.as_str().into(), 1, tx);
    assert!(sessions.is_held(&key));
    assert!(sessions.take_over(&key).await, "the holder is asked");
    let told = tokio::time::timeout(common::WAIT, futures_util::StreamExt::next(&mut rx)).await;
    assert_eq!(told.ok().flatten().map(|t| t.key), Some(key.clone()));
    sessions.release(&key, 2);
    assert!(sessions.is_held(&key), "only the holder releases its hold");
    assert!(
        !sessions
            .wait_released(&key, Duration::from_millis(50))
            .await,
        "still held"
    );
    let releaser = sessions.clone();
    let k = key.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(30)).await;
        releaser.release(&k, 1);
    });
    assert!(
        sessions.wait_released(&key, common::WAIT).await,
        "woken by the release"
    );
    assert!(!sessions.is_held(&key));

    let will = sessions.delay_will(&key);
    assert!(!will.is_cancelled());
    sessions.cancel_will(&key).await;
    assert!(will.is_cancelled(), "the session came back first");
    let fired = sessions.delay_will(&key);
    sessions.will_done(&key);
    sessions.cancel_will(&key).await;
    assert!(
        !fired.is_cancelled(),
        "a will that fired is not cancelled afterwards"
    );
}

/// AMQP `basic.cancel` keeps what the client took on the channel to be acked; dropping a
/// consumer requeues it. Either way the cancelled consumer yields nothing more — never a
/// delivery requeued to someone else.
pub async fn cancel_keeps_or_requeues_and_yields_nothing_more(engine: Arc<dyn Engine>) {
    let ch = channel(&engine).await;
    let q = declare_queue(&ch, "cancel-keep").await;
    for i in 1..=3 {
        publish(&ch, "", &q, &format!("m{i}")).await;
    }
    let mut c = ch.consume(&q, ConsumeOptions::manual(3)).await.unwrap();
    let taken = next(&mut c).await;
    assert_eq!(text(&taken), "m1");
    eventually("all three are out", || async {
        ch.queue_info(&q).await.unwrap().messages_unacknowledged == Some(3)
    })
    .await;
    ch.cancel(c.tag(), OnCancel::KeepUnacked).await.unwrap();
    let after = tokio::time::timeout(QUIET, c.recv()).await;
    assert!(
        matches!(after, Ok(None)),
        "a cancelled consumer yields nothing more: {after:?}"
    );
    // m2 and m3 never reached the client: back, unmarked. m1 stays unacked on the channel.
    eventually("the untaken two are back", || async {
        ready(&ch, &q).await == 2
    })
    .await;
    assert_eq!(
        ch.queue_info(&q).await.unwrap().messages_unacknowledged,
        Some(1)
    );
    ch.ack(taken.delivery_tag, false).await.unwrap();
    let mut back = Vec::new();
    while let Some(d) = ch.get(&q, true).await.unwrap() {
        back.push((text(&d), d.redelivered));
    }
    assert_eq!(back, [("m2".to_owned(), false), ("m3".to_owned(), false)]);
    assert_eq!(
        ch.queue_info(&q).await.unwrap().messages_unacknowledged,
        Some(0)
    );

    // Requeue: what the client took comes back marked; the stream ends too.
    publish(&ch, "", &q, "m4").await;
    let mut c = ch.consume(&q, ConsumeOptions::manual(1)).await.unwrap();
    let d = next(&mut c).await;
    ch.cancel(c.tag(), OnCancel::Requeue).await.unwrap();
    assert!(matches!(
        tokio::time::timeout(QUIET, c.recv()).await,
        Ok(None)
    ));
    assert!(
        ch.ack(d.delivery_tag, false).await.is_err(),
        "no longer ours"
    );
    let again = ch.get(&q, true).await.unwrap().expect("requeued");
    assert_eq!((text(&again), again.redelivered), ("m4".to_owned(), true));
}

/// A refused operation (404, 403, 405, 406) leaves the client's engine channel usable: its
/// consumers keep receiving, its unacked deliveries can still be acked, and it goes on working.
/// (RabbitMQ closes an AMQP channel on each of these; an upstream engine keeps this promise
/// with several AMQP channels per engine channel, DESIGN.md §1.)
pub async fn refusals_leave_the_channel_usable(engine: Arc<dyn Engine>) {
    let ch = channel(&engine).await;
    let other = channel(&engine).await;
    let q = declare_queue_with(
        &ch,
        "usable",
        args(&[("x-max-length", FieldValue::I64(10))]),
    )
    .await;
    let mut c = ch.consume(&q, ConsumeOptions::manual(10)).await.unwrap();
    publish(&ch, "", &q, "before").await;
    let held = next(&mut c).await;

    let mut exclusive = queue_spec(FieldTable::new());
    exclusive.exclusive = true;
    let private = unique("usable-excl");
    other.declare_queue(&private, &exclusive).await.unwrap();
    let missing = unique("missing");
    let refusals = [
        ch.declare_queue(
            &q,
            &queue_spec(args(&[("x-max-length", FieldValue::I64(11))])),
        )
        .await
        .map(drop)
        .unwrap_err(),
        ch.consume(&missing, ConsumeOptions::manual(1))
            .await
            .map(drop)
            .unwrap_err(),
        ch.publish(&missing, "k", Message::new("x"), PublishOptions::default())
            .await
            .map(drop)
            .unwrap_err(),
        ch.get(&private, true).await.map(drop).unwrap_err(),
        ch.declare_exchange("amq.forbidden", &ExchangeSpec::new(ExchangeKind::Direct))
            .await
            .map(drop)
            .unwrap_err(),
    ];
    let codes: Vec<u16> = refusals.iter().map(EngineError::reply_code).collect();
    assert_eq!(codes, [406, 404, 404, 405, 403], "{refusals:?}");

    // Still usable: the consumer receives, the held delivery acks, new work goes through.
    publish(&ch, "", &q, "after").await;
    assert_eq!(text(&next(&mut c).await), "after");
    ch.ack(held.delivery_tag, false).await.unwrap();
    assert_eq!(ready(&ch, &q).await, 0);
    let fresh = declare_queue(&ch, "usable-after").await;
    publish(&ch, "", &fresh, "works").await;
    assert_eq!(drain(&ch, &fresh).await, ["works"]);
}

/// Exclusive queues belong to the client connection (the owner), across its channels: every
/// channel of the owner uses them; another owner gets 405 for a declare, a passive declare, a
/// consume or a get (an inspection still sees them); they go when the owner's last channel
/// closes, not before.
pub async fn exclusive_queues_belong_to_the_connection(engine: Arc<dyn Engine>) {
    let owner = amqp_gateway::engine::Owner::new();
    let a = engine.open_channel(&owner, "conn-a1").await.unwrap();
    let b = engine.open_channel(&owner, "conn-a2").await.unwrap();
    let stranger = channel(&engine).await;
    let q = unique("owned");
    let mut spec = queue_spec(FieldTable::new());
    spec.exclusive = true;
    a.declare_queue(&q, &spec).await.unwrap();

    assert_eq!(
        b.declare_queue(&q, &spec).await.map(|d| d.declared),
        Ok(Declared::Existed)
    );
    assert!(b.declare_queue_passive(&q).await.is_ok());
    publish(&b, "", &q, "for the owner").await;
    let mut c = b.consume(&q, ConsumeOptions::manual(1)).await.unwrap();
    assert_eq!(text(&next(&mut c).await), "for the owner");
    drop(c);

    let refusals = [
        stranger.declare_queue(&q, &spec).await.map(drop),
        stranger.declare_queue_passive(&q).await.map(drop),
        stranger
            .consume(&q, ConsumeOptions::manual(1))
            .await
            .map(drop),
        stranger.get(&q, true).await.map(drop),
    ];
    for r in &refusals {
        assert!(
            matches!(r, Err(e) if e.reply_code() == 405),
            "another connection: {refusals:?}"
        );
    }
    assert!(
        stranger.queue_info(&q).await.is_ok(),
        "an inspection sees it"
    );

    a.close().await;
    drop(a);
    assert!(
        b.declare_queue_passive(&q).await.is_ok(),
        "the owner still has a channel open"
    );
    b.close().await;
    drop(b);
    eventually("the owner's last channel took it along", || async {
        matches!(
            stranger.queue_info(&q).await,
            Err(EngineError::NotFound { .. })
        )
    })
    .await;
}

/// Publishes with a shared key (MQTT's path, `Channel::publish_shared`) go where the bindings
/// say at the moment of each publish, however often the same key is published: a binding
/// added, removed, a queue deleted, the exchange deleted and declared again, a headers
/// exchange routing by each message's headers. The embedded engine remembers a channel's last
/// route; this holds it to the bindings.
pub async fn shared_key_publishes_follow_every_binding_change(engine: Arc<dyn Engine>) {
    let ch = channel(&engine).await;
    let ex = declare_exchange(&ch, "remember", ExchangeKind::Topic).await;
    let key: Arc<str> = Arc::from("dev.1.temp");
    let send = |exchange: String, headers: FieldTable, body: &'static str| {
        let ch = ch.clone();
        let key = key.clone();
        async move {
            let mut m = Message::new(body);
            m.properties_mut().headers = headers.into_iter().collect();
            ch.publish_shared(&exchange, key, m, PublishOptions::default())
                .await
        }
    };
    let routed = |exchange: &String, body: &'static str| {
        let send = &send;
        let exchange = exchange.clone();
        async move {
            send(exchange, FieldTable::new(), body)
                .await
                .expect("publish")
                .routed
        }
    };
    let a = declare_queue(&ch, "ra").await;
    let b = declare_queue(&ch, "rb").await;
    assert!(!routed(&ex, "nowhere").await, "no binding yet");
    bind(&ch, &a, &ex, "dev.*.temp").await;
    assert!(routed(&ex, "1").await);
    assert!(routed(&ex, "2").await);
    bind(&ch, &b, &ex, "dev.#").await;
    assert!(routed(&ex, "3").await, "a binding added is seen at once");
    ch.unbind_queue(&a, &ex, "dev.*.temp", &FieldTable::new())
        .await
        .unwrap();
    assert!(routed(&ex, "4").await);
    assert_eq!(drain(&ch, &a).await, ["1", "2", "3"]);
    assert_eq!(drain(&ch, &b).await, ["3", "4"]);
    ch.delete_queue(&b, DeleteQueueOptions::default())
        .await
        .unwrap();
    assert!(
        !routed(&ex, "5").await,
        "a deleted queue's binding went with it"
    );
    // Deleted and declared again: the new exchange has no bindings.
    bind(&ch, &a, &ex, "dev.#").await;
    assert!(routed(&ex, "6").await);
    ch.delete_exchange(&ex, false).await.unwrap();
    let gone = send(ex.clone(), FieldTable::new(), "7").await;
    assert!(
        matches!(gone, Err(EngineError::NotFound { .. })),
        "{gone:?}"
    );
    let mut spec = ExchangeSpec::new(ExchangeKind::Topic);
    spec.durable = false;
    ch.declare_exchange(&ex, &spec).await.unwrap();
    assert!(
        !routed(&ex, "8").await,
        "the exchange declared again starts unbound"
    );
    assert_eq!(drain(&ch, &a).await, ["6"]);
    // The same key to another exchange, then back.
    let direct = declare_exchange(&ch, "remember-direct", ExchangeKind::Direct).await;
    bind(&ch, &a, &direct, &key).await;
    assert!(routed(&direct, "9").await);
    assert!(!routed(&ex, "10").await);
    assert!(routed(&direct, "11").await);
    assert_eq!(drain(&ch, &a).await, ["9", "11"]);
    // A headers exchange routes each message by its own headers, the key the same.
    let headers = declare_exchange(&ch, "remember-headers", ExchangeKind::Headers).await;
    ch.bind_queue(
        &a,
        &headers,
        "",
        &args(&[("kind", FieldValue::Str("x".into()))]),
    )
    .await
    .unwrap();
    let kind = |v: &str| args(&[("kind", FieldValue::Str(v.into()))]);
    assert!(send(headers.clone(), kind("x"), "h1").await.unwrap().routed);
    assert!(!send(headers.clone(), kind("y"), "h2").await.unwrap().routed);
    assert!(send(headers.clone(), kind("x"), "h3").await.unwrap().routed);
    assert_eq!(drain(&ch, &a).await, ["h1", "h3"]);
}
