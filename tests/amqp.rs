//! The AMQP 0-9-1 listener with lapin, a client nobody here wrote: queues and exchanges,
//! publishes with confirms and returns, consumers with prefetch and acks, the scopes, exclusive
//! queues, token expiry and refresh, and messages meeting MQTT, WebSocket and REST clients.

mod common;

use std::time::Duration;

use common::amqp::{channel, code, connect, consume_no_ack, no_args, publish_confirmed, text, url};
use common::ws::Ws;
use common::{TestGateway, WAIT, admin, start_gateway, token, unique};
use futures_util::StreamExt;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, ExchangeKind};
use serde_json::json;

async fn gateway() -> TestGateway {
    start_gateway(|_| {}).await
}

async fn next(consumer: &mut lapin::Consumer) -> lapin::message::Delivery {
    tokio::time::timeout(WAIT, consumer.next())
        .await
        .expect("a delivery in time")
        .expect("the consumer is open")
        .expect("a delivery")
}

#[tokio::test]
async fn hello_world_with_properties_and_the_subject_stamp() {
    let gw = gateway().await;
    let conn = connect(&gw, &admin()).await;
    let ch = channel(&conn).await;
    let q = unique("hello");
    let declared = ch
        .queue_declare(q.as_str().into(), QueueDeclareOptions::default(), no_args())
        .await
        .unwrap();
    assert_eq!(declared.message_count(), 0);
    let mut headers = FieldTable::default();
    headers.insert(
        "x-gateway-sub".into(),
        AMQPValue::LongString("forged".into()),
    );
    headers.insert("n".into(), AMQPValue::LongInt(7));
    let props = BasicProperties::default()
        .with_content_type("text/plain".into())
        .with_correlation_id("c-1".into())
        .with_delivery_mode(2)
        .with_headers(headers);
    ch.basic_publish(
        "".into(),
        q.as_str().into(),
        BasicPublishOptions::default(),
        b"Hello World!",
        props,
    )
    .await
    .unwrap();
    let mut consumer = consume_no_ack(&ch, &q, "c").await;
    let d = next(&mut consumer).await;
    assert_eq!(d.data, b"Hello World!");
    assert_eq!(d.delivery_tag, 1);
    assert_eq!(d.routing_key.as_str(), q);
    assert_eq!(
        d.properties.content_type().as_ref().unwrap().as_str(),
        "text/plain"
    );
    assert_eq!(
        d.properties.correlation_id().as_ref().unwrap().as_str(),
        "c-1"
    );
    assert_eq!(*d.properties.delivery_mode(), Some(2));
    let headers = d.properties.headers().as_ref().unwrap().inner();
    assert_eq!(headers.get("n"), Some(&AMQPValue::LongInt(7)));
    // The gateway's stamp replaces what the client sent under that name.
    assert_eq!(
        headers.get("x-gateway-sub"),
        Some(&AMQPValue::LongString("root".into()))
    );
    // The queue's count as the REST API sees it.
    assert_eq!(gw.depth(&q).await, 0);
    conn.close(200, "bye".into()).await.unwrap();
}

#[tokio::test]
async fn confirms_returns_and_get() {
    let gw = gateway().await;
    let conn = connect(&gw, &admin()).await;
    let ch = channel(&conn).await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let q = unique("get");
    common::amqp::declare(&ch, &q).await;
    for i in 0..3 {
        publish_confirmed(&ch, "", &q, format!("m{i}").as_bytes()).await;
    }
    // Mandatory and routed nowhere: returned, then acked (as RabbitMQ).
    let confirm = ch
        .basic_publish(
            "amq.direct".into(),
            "nowhere".into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            b"lost",
            BasicProperties::default(),
        )
        .await
        .unwrap();
    let confirmation = tokio::time::timeout(WAIT, confirm).await.unwrap().unwrap();
    assert!(confirmation.is_ack());
    let returned = confirmation.take_message().expect("the message came back");
    assert_eq!(returned.data, b"lost");
    assert_eq!(returned.reply_code, 312);

    let first = common::amqp::get(&ch, &q, false).await.expect("a message");
    assert_eq!(first.delivery.data, b"m0");
    assert_eq!(first.message_count, 2);
    first
        .delivery
        .ack(BasicAckOptions::default())
        .await
        .unwrap();
    let second = common::amqp::get(&ch, &q, true).await.unwrap();
    assert_eq!(second.delivery.data, b"m1");
    let third = common::amqp::get(&ch, &q, false).await.unwrap();
    // Rejected with requeue: it is the next one again, redelivered.
    third
        .delivery
        .reject(BasicRejectOptions { requeue: true })
        .await
        .unwrap();
    let again = common::amqp::get(&ch, &q, false).await.unwrap();
    assert_eq!(again.delivery.data, b"m2");
    assert!(again.delivery.redelivered);
    again
        .delivery
        .ack(BasicAckOptions::default())
        .await
        .unwrap();
    assert!(common::amqp::get(&ch, &q, false).await.is_none());
}

#[tokio::test]
async fn prefetch_bounds_unacked_deliveries_and_nothing_is_lost() {
    let gw = gateway().await;
    let q = unique("prefetch");
    let publisher = connect(&gw, &admin()).await;
    let pch = channel(&publisher).await;
    common::amqp::declare(&pch, &q).await;
    pch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let consumer_conn = connect(&gw, &admin()).await;
    let cch = channel(&consumer_conn).await;
    cch.basic_qos(10, BasicQosOptions::default()).await.unwrap();
    let mut consumer = cch
        .basic_consume(
            q.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            no_args(),
        )
        .await
        .unwrap();
    const N: u32 = 500;
    let publishing = tokio::spawn(async move {
        for i in 0..N {
            publish_confirmed(&pch, "", &q, &i.to_be_bytes()).await;
        }
        pch
    });
    // Take deliveries in batches without acking: the gateway stops at 10 until acks come.
    let mut seen = Vec::new();
    while seen.len() < N as usize {
        let mut batch = vec![next(&mut consumer).await];
        while let Ok(Some(d)) =
            tokio::time::timeout(Duration::from_millis(50), consumer.next()).await
        {
            batch.push(d.unwrap());
        }
        assert!(
            batch.len() <= 10,
            "{} unacked deliveries with prefetch 10",
            batch.len()
        );
        for d in &batch {
            seen.push(u32::from_be_bytes(d.data[..4].try_into().unwrap()));
        }
        let last = batch.last().unwrap();
        last.ack(BasicAckOptions { multiple: true }).await.unwrap();
    }
    publishing.await.unwrap();
    assert_eq!(
        seen,
        (0..N).collect::<Vec<_>>(),
        "every message once, in order"
    );
}

#[tokio::test]
async fn delivery_tags_rise_across_consumers_and_multiple_acks_only_what_was_seen() {
    let gw = gateway().await;
    let conn = connect(&gw, &admin()).await;
    let ch = channel(&conn).await;
    let (a, b) = (unique("tags-a"), unique("tags-b"));
    for q in [&a, &b] {
        common::amqp::declare(&ch, q).await;
    }
    let mut ca = ch
        .basic_consume(
            a.as_str().into(),
            "ca".into(),
            BasicConsumeOptions::default(),
            no_args(),
        )
        .await
        .unwrap();
    let mut cb = ch
        .basic_consume(
            b.as_str().into(),
            "cb".into(),
            BasicConsumeOptions::default(),
            no_args(),
        )
        .await
        .unwrap();
    let pubc = connect(&gw, &admin()).await;
    let pch = channel(&pubc).await;
    pch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let mut tags = Vec::new();
    for i in 0..6 {
        let q = if i % 2 == 0 { &a } else { &b };
        publish_confirmed(&pch, "", q, b"x").await;
        let d = if i % 2 == 0 {
            next(&mut ca).await
        } else {
            next(&mut cb).await
        };
        tags.push(d.delivery_tag);
    }
    assert_eq!(
        tags,
        [1, 2, 3, 4, 5, 6],
        "one sequence per channel across consumers"
    );
    // Ack up to 4: the first four settle, 5 and 6 stay unacked.
    ch.basic_ack(4, BasicAckOptions { multiple: true })
        .await
        .unwrap();
    common::eventually("four acked", || async {
        let qa = common::json_of(gw.get(&format!("/v1/queues/{a}"), &admin())).await;
        let qb = common::json_of(gw.get(&format!("/v1/queues/{b}"), &admin())).await;
        qa["messages_unacknowledged"] == 1 && qb["messages_unacknowledged"] == 1
    })
    .await;
    // A tag never handed out closes the channel with 406.
    let mut errors = common::amqp::events(&conn);
    ch.basic_ack(99, BasicAckOptions::default()).await.unwrap();
    let err = common::amqp::next_error(&mut errors).await;
    assert_eq!(code(&err), Some(406), "{}", text(&err));
    // Its unacked deliveries went back to their queues.
    common::eventually("requeued", || async {
        gw.depth(&a).await == 1 && gw.depth(&b).await == 1
    })
    .await;
}

#[tokio::test]
async fn cancel_keeps_unacked_deliveries_and_closing_requeues_them() {
    let gw = gateway().await;
    let q = unique("cancel");
    let conn = connect(&gw, &admin()).await;
    let ch = channel(&conn).await;
    common::amqp::declare(&ch, &q).await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    for i in 0..2 {
        publish_confirmed(&ch, "", &q, format!("m{i}").as_bytes()).await;
    }
    let c2 = channel(&conn).await;
    let mut consumer = c2
        .basic_consume(
            q.as_str().into(),
            "k".into(),
            BasicConsumeOptions::default(),
            no_args(),
        )
        .await
        .unwrap();
    let first = next(&mut consumer).await;
    let second = next(&mut consumer).await;
    c2.basic_cancel("k".into(), BasicCancelOptions::default())
        .await
        .unwrap();
    // After basic.cancel the deliveries are still the channel's to ack.
    first.ack(BasicAckOptions::default()).await.unwrap();
    common::eventually("one left unacked", || async {
        let v = common::json_of(gw.get(&format!("/v1/queues/{q}"), &admin())).await;
        v["messages_unacknowledged"] == 1 && v["messages"] == 0
    })
    .await;
    drop(second);
    // Closing the channel returns the other one, redelivered.
    c2.close(200, "done".into()).await.unwrap();
    let again = common::amqp::get(&ch, &q, false).await.expect("requeued");
    assert_eq!(again.delivery.data, b"m1");
    assert!(again.delivery.redelivered);
}

#[tokio::test]
async fn global_prefetch_is_shared_by_the_channel() {
    let gw = gateway().await;
    let conn = connect(&gw, &admin()).await;
    let ch = channel(&conn).await;
    let (a, b) = (unique("global-a"), unique("global-b"));
    let pch = channel(&conn).await;
    pch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    for q in [&a, &b] {
        common::amqp::declare(&ch, q).await;
        for _ in 0..5 {
            publish_confirmed(&pch, "", q, b"x").await;
        }
    }
    ch.basic_qos(3, BasicQosOptions { global: true })
        .await
        .unwrap();
    let mut ca = ch
        .basic_consume(
            a.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            no_args(),
        )
        .await
        .unwrap();
    let mut cb = ch
        .basic_consume(
            b.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            no_args(),
        )
        .await
        .unwrap();
    // Deliveries within half a second, whichever consumer they come to: their wire tags.
    let window = |ca: &mut lapin::Consumer, cb: &mut lapin::Consumer| {
        let (ca, cb) = (ca.clone(), cb.clone());
        async move {
            let (mut ca, mut cb) = (ca, cb);
            let mut tags = Vec::new();
            let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
            loop {
                tokio::select! {
                    Some(Ok(d)) = ca.next() => tags.push(d.delivery_tag),
                    Some(Ok(d)) = cb.next() => tags.push(d.delivery_tag),
                    _ = tokio::time::sleep_until(deadline) => break,
                }
            }
            tags.sort_unstable();
            tags
        }
    };
    assert_eq!(
        window(&mut ca, &mut cb).await,
        [1, 2, 3],
        "three unacked for the whole channel"
    );
    ch.basic_ack(3, BasicAckOptions { multiple: true })
        .await
        .unwrap();
    assert_eq!(
        window(&mut ca, &mut cb).await,
        [4, 5, 6],
        "acks make room for as many again"
    );
}

#[tokio::test]
async fn scopes_apply_and_a_refusal_closes_only_the_channel() {
    let gw = gateway().await;
    let t = token(
        "app",
        "gateway.configure:test-app-* gateway.write:amq.topic/app.# gateway.read:amq.topic/app.# gateway.consume:test-app-*",
    );
    let conn = connect(&gw, &t).await;
    let ch = channel(&conn).await;
    let q = unique("app-q");
    common::amqp::declare(&ch, &q).await;
    ch.queue_bind(
        q.as_str().into(),
        "amq.topic".into(),
        "app.#".into(),
        QueueBindOptions::default(),
        no_args(),
    )
    .await
    .unwrap();
    let err = ch
        .queue_bind(
            q.as_str().into(),
            "amq.topic".into(),
            "#".into(),
            QueueBindOptions::default(),
            no_args(),
        )
        .await
        .unwrap_err();
    assert_eq!(code(&err), Some(403), "{}", text(&err));
    // The connection lives on: another channel works.
    let ch2 = channel(&conn).await;
    let err = ch2
        .queue_declare("other".into(), QueueDeclareOptions::default(), no_args())
        .await
        .unwrap_err();
    assert_eq!(code(&err), Some(403));
    let ch3 = channel(&conn).await;
    ch3.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    publish_confirmed(&ch3, "amq.topic", "app.x", b"ok").await;
    let mut errors = common::amqp::events(&conn);
    ch3.basic_publish(
        "amq.topic".into(),
        "other.x".into(),
        BasicPublishOptions::default(),
        b"no",
        BasicProperties::default(),
    )
    .await
    .unwrap();
    let err = common::amqp::next_error(&mut errors).await;
    assert_eq!(
        code(&err),
        Some(403),
        "publishing outside the scope: {}",
        text(&err)
    );
    // A server-named queue is the connection's own: no configure scope needed to use it.
    let ch4 = channel(&conn).await;
    let own = ch4
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            no_args(),
        )
        .await
        .unwrap();
    assert!(own.name().as_str().starts_with("amq.gen-"));
    ch4.queue_bind(
        own.name().clone(),
        "amq.topic".into(),
        "app.y".into(),
        QueueBindOptions::default(),
        no_args(),
    )
    .await
    .unwrap();
    assert_eq!(gw.depth(&q).await, 1, "the allowed publish was routed");
}

#[tokio::test]
async fn a_bad_token_is_refused_at_login() {
    let gw = gateway().await;
    let err = lapin::Connection::connect(
        &url(&gw, "not-a-jwt"),
        lapin::ConnectionProperties::default(),
    )
    .await
    .unwrap_err();
    assert_eq!(code(&err), Some(403), "{err}");
    assert!(text(&err).contains("ACCESS_REFUSED"), "{}", text(&err));
}

#[tokio::test]
async fn exclusive_queues_belong_to_their_connection() {
    let gw = gateway().await;
    let owner = connect(&gw, &admin()).await;
    let ch = channel(&owner).await;
    let q = unique("excl");
    ch.queue_declare(
        q.as_str().into(),
        QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        },
        no_args(),
    )
    .await
    .unwrap();
    // Its other channels share it.
    let ch2 = channel(&owner).await;
    ch2.basic_consume(
        q.as_str().into(),
        "".into(),
        BasicConsumeOptions::default(),
        no_args(),
    )
    .await
    .unwrap();
    let other = connect(&gw, &admin()).await;
    let och = channel(&other).await;
    let err = och
        .basic_consume(
            q.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            no_args(),
        )
        .await
        .unwrap_err();
    assert_eq!(code(&err), Some(405), "{}", text(&err));
    owner.close(200, "bye".into()).await.unwrap();
    common::eventually("deleted with its connection", || async {
        common::status(gw.get(&format!("/v1/queues/{q}"), &admin())).await == 404
    })
    .await;
}

#[tokio::test]
async fn queue_deleted_under_a_consumer_cancels_it() {
    let gw = gateway().await;
    let conn = connect(&gw, &admin()).await;
    let ch = channel(&conn).await;
    let q = unique("gone");
    common::amqp::declare(&ch, &q).await;
    let mut consumer = ch
        .basic_consume(
            q.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            no_args(),
        )
        .await
        .unwrap();
    assert_eq!(
        common::status(gw.delete(&format!("/v1/queues/{q}"), &admin())).await,
        204
    );
    let end = tokio::time::timeout(WAIT, consumer.next())
        .await
        .expect("the consumer ends in time");
    assert!(
        end.is_none(),
        "basic.cancel from the server ends lapin's consumer: {end:?}"
    );
    // The channel is still open.
    ch.queue_declare(
        unique("after").as_str().into(),
        QueueDeclareOptions::default(),
        no_args(),
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn redeclaring_a_rest_queue_follows_rabbitmq_equivalence() {
    let gw = gateway().await;
    let q = unique("rest-q");
    let r = gw
        .put(&format!("/v1/queues/{q}"), &admin())
        .json(&json!({"durable": true, "arguments": {"x-max-length": 10}}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    let conn = connect(&gw, &admin()).await;
    let ch = channel(&conn).await;
    let mut args = FieldTable::default();
    // Another integer width of the same value is equivalent (as RabbitMQ).
    args.insert("x-max-length".into(), AMQPValue::ShortInt(10));
    ch.queue_declare(
        q.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .unwrap();
    let err = ch
        .queue_declare(q.as_str().into(), QueueDeclareOptions::default(), no_args())
        .await
        .unwrap_err();
    assert_eq!(code(&err), Some(406), "{}", text(&err));
}

#[tokio::test]
async fn transactions_are_refused_with_540() {
    let gw = gateway().await;
    let conn = connect(&gw, &admin()).await;
    let ch = channel(&conn).await;
    let err = ch.tx_select().await.unwrap_err();
    assert_eq!(code(&err), Some(540), "{}", text(&err));
    // A connection error: the connection is gone.
    assert!(conn.create_channel().await.is_err());
}

#[tokio::test]
async fn an_expired_token_closes_the_connection_unless_refreshed() {
    let gw = start_gateway(|c| c.auth.leeway = Duration::ZERO).await;
    let short = |sub: &str| {
        amqp_gateway::auth::mint(
            common::SECRET,
            sub,
            "gateway.tag:administrator",
            Duration::from_secs(2),
            "gateway",
            None,
        )
        .unwrap()
    };
    let expiring = connect(&gw, &short("alice")).await;
    let refreshed = connect(&gw, &short("bob")).await;
    refreshed
        .update_secret(
            token("bob", "gateway.tag:administrator").as_str().into(),
            "refresh".into(),
        )
        .await
        .expect("update-secret accepted");
    // Another subject's token is refused: the connection closes.
    let hijack = connect(&gw, &short("carol")).await;
    let err = hijack
        .update_secret(admin().as_str().into(), "takeover".into())
        .await
        .unwrap_err();
    assert!(matches!(code(&err), Some(403) | None), "{err}");
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(expiring.create_channel().await.is_err(), "closed at exp");
    let ch = channel(&refreshed).await;
    ch.queue_declare(
        unique("alive").as_str().into(),
        QueueDeclareOptions::default(),
        no_args(),
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn amqp_meets_mqtt_websocket_and_rest() {
    let gw = gateway().await;
    // An MQTT subscriber of sensors/+ and a WebSocket subscriber of sensors.#.
    let mut o = rumqttc::MqttOptions::new(unique("m"), "127.0.0.1", gw.gateway.addrs().mqtt.port());
    o.set_credentials("u", admin());
    let (mqtt, mut events) = rumqttc::AsyncClient::new(o, 10);
    mqtt.subscribe("sensors/+", rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    let (tx, mut mqtt_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(ev) = events.poll().await {
            if let rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_)) = ev {
                let _ = tx.send(None);
            }
            if let rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) = ev {
                let _ = tx.send(Some((p.topic, p.payload.to_vec())));
            }
        }
    });
    assert_eq!(
        tokio::time::timeout(WAIT, mqtt_rx.recv()).await.unwrap(),
        Some(None)
    );
    let mut ws = Ws::connect(&gw, Some(&admin())).await;
    let reply = ws
        .call(json!({"op": "subscribe", "id": 1, "exchange": "amq.topic", "binding_key": "sensors.#"}))
        .await;
    assert_eq!(reply["op"], "subscribed", "{reply}");

    let conn = connect(&gw, &admin()).await;
    let ch = channel(&conn).await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    publish_confirmed(&ch, "amq.topic", "sensors.t1", b"21.5").await;
    let (topic, payload) = tokio::time::timeout(WAIT, mqtt_rx.recv())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        (topic.as_str(), payload.as_slice()),
        ("sensors/t1", &b"21.5"[..])
    );
    let m = ws.recv().await;
    assert_eq!(m["op"], "message", "{m}");
    assert_eq!(m["routing_key"], "sensors.t1");

    // And back: REST and MQTT publishes reach an AMQP consumer.
    let q = ch
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            no_args(),
        )
        .await
        .unwrap();
    ch.queue_bind(
        q.name().clone(),
        "amq.topic".into(),
        "orders.#".into(),
        QueueBindOptions::default(),
        no_args(),
    )
    .await
    .unwrap();
    let mut consumer = consume_no_ack(&ch, q.name().as_str(), "").await;
    gw.publish("amq.topic", "orders.eu", json!({"id": 1})).await;
    let d = next(&mut consumer).await;
    assert_eq!(d.routing_key.as_str(), "orders.eu");
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&d.data).unwrap(),
        json!({"id": 1})
    );
    mqtt.publish("orders/us", rumqttc::QoS::AtLeastOnce, false, "from mqtt")
        .await
        .unwrap();
    let d = next(&mut consumer).await;
    assert_eq!(
        (d.routing_key.as_str(), d.data.as_slice()),
        ("orders.us", &b"from mqtt"[..])
    );
}

#[tokio::test]
async fn exchanges_are_declared_checked_and_deleted() {
    let gw = gateway().await;
    let conn = connect(&gw, &admin()).await;
    let ch = channel(&conn).await;
    let x = unique("x");
    ch.exchange_declare(
        x.as_str().into(),
        ExchangeKind::Fanout,
        ExchangeDeclareOptions::default(),
        no_args(),
    )
    .await
    .unwrap();
    ch.exchange_declare(
        x.as_str().into(),
        ExchangeKind::Fanout,
        ExchangeDeclareOptions {
            passive: true,
            ..Default::default()
        },
        no_args(),
    )
    .await
    .unwrap();
    let q = ch
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            no_args(),
        )
        .await
        .unwrap();
    ch.queue_bind(
        q.name().clone(),
        x.as_str().into(),
        "".into(),
        QueueBindOptions::default(),
        no_args(),
    )
    .await
    .unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    publish_confirmed(&ch, &x, "any", b"fan").await;
    let got = common::amqp::get(&ch, q.name().as_str(), true)
        .await
        .unwrap();
    assert_eq!(got.delivery.data, b"fan");
    // Unbound, the queue gets nothing more from the exchange.
    ch.queue_unbind(q.name().clone(), x.as_str().into(), "".into(), no_args())
        .await
        .unwrap();
    publish_confirmed(&ch, &x, "any", b"unbound").await;
    assert!(
        common::amqp::get(&ch, q.name().as_str(), true)
            .await
            .is_none()
    );
    ch.exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
        .await
        .unwrap();
    let err = ch
        .exchange_declare(
            x.as_str().into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                passive: true,
                ..Default::default()
            },
            no_args(),
        )
        .await
        .unwrap_err();
    assert_eq!(code(&err), Some(404), "{}", text(&err));
}

#[tokio::test]
async fn operators_see_amqp_connections_and_close_them_with_320() {
    let gw = gateway().await;
    let props =
        lapin::ConnectionProperties::default().with_connection_name("billing-worker".into());
    let conn = tokio::time::timeout(
        WAIT,
        lapin::Connection::connect(&url(&gw, &token("kicked", "gateway.configure:*")), props),
    )
    .await
    .unwrap()
    .unwrap();
    let mut events = common::amqp::events(&conn);
    let list = common::json_of(gw.get("/v1/connections?protocol=amqp", &admin())).await;
    let items = list["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{list}");
    assert_eq!(items[0]["subject"], "kicked");
    assert_eq!(items[0]["client_id"], "billing-worker");
    assert_eq!(items[0]["transport"], "tcp");
    let id = items[0]["id"].as_u64().unwrap();
    assert_eq!(
        common::status(gw.delete(&format!("/v1/connections/{id}"), &admin())).await,
        204
    );
    let closed = common::amqp::next_error(&mut events).await;
    assert_eq!(code(&closed), Some(320), "{closed}");
    assert!(text(&closed).contains("administrator"), "{}", text(&closed));
}

#[tokio::test]
async fn shutdown_closes_amqp_connections_with_320() {
    let gw = gateway().await;
    let conn = connect(&gw, &admin()).await;
    let mut events = common::amqp::events(&conn);
    let ch = channel(&conn).await;
    let q = unique("shutdown");
    ch.queue_declare(
        q.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        no_args(),
    )
    .await
    .unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    publish_confirmed(&ch, "", &q, b"held").await;
    let mut consumer = ch
        .basic_consume(
            q.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            no_args(),
        )
        .await
        .unwrap();
    let d = next(&mut consumer).await;
    assert!(!d.redelivered);
    let stopping = tokio::spawn(gw.gateway.shutdown());
    let closed = common::amqp::next_error(&mut events).await;
    assert_eq!(code(&closed), Some(320), "{closed}");
    assert!(text(&closed).contains("shutdown"), "{}", text(&closed));
    tokio::time::timeout(WAIT, stopping).await.unwrap().unwrap();
}
