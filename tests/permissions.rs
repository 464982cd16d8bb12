//! The permission table (DESIGN.md §6; issue "Security"): every operation on every protocol —
//! publish, subscribe / consume, declare, bind, unbind, delete, purge, get, and the operator
//! endpoints — tried once with a scope that allows it and once with a near miss that does not
//! (another name, another key, a narrower pattern, another kind of permission). Allowed means the
//! operation took effect as the protocol acknowledges it; refused means that protocol's answer.
//! The table is in `docs/auth.md`.

mod common;

use std::time::Duration;

use common::mqtt_bytes::{packet, string, subscribe_packet};
use common::mqtt_wire::{RawWire, Transport};
use common::{TestGateway, WAIT, admin, start_gateway, token};
use futures_util::{SinkExt, StreamExt};
use lapin::options::{
    BasicConsumeOptions, BasicGetOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
    QueuePurgeOptions,
};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

/// What each case gets: its own queue `q` bound to its own topic exchange `x` with `k.#`, and
/// to `amq.topic` with `t{n}.#` (MQTT's exchange).
struct Names {
    n: usize,
    q: String,
    x: String,
}

impl Names {
    fn scope(&self, template: &str) -> String {
        template
            .replace("{q}", &self.q)
            .replace("{x}", &self.x)
            .replace("{n}", &self.n.to_string())
    }
}

#[derive(Debug, Clone, Copy)]
enum Op {
    RestPublish,
    RestDeclareQueue,
    RestDeclareExchange,
    RestBind,
    RestUnbind,
    RestPurge,
    RestGet,
    RestDeleteQueue,
    RestDeleteExchange,
    RestOverview,
    RestConnections,
    RestCloseConnection,
    Metrics,
    Feed,
    WsPublish,
    WsSubscribe,
    WsConsume,
    SseSubscribe,
    SseConsume,
    MqttPublish(u8),
    MqttSubscribe(u8),
    AmqpPublish,
    AmqpConsume,
    AmqpGet,
    AmqpDeclareQueue,
    AmqpDeclareExchange,
    AmqpBind,
    AmqpUnbind,
    AmqpPurge,
    AmqpDeleteQueue,
    AmqpDeleteExchange,
}

/// (operation, allowing scope, refusing scope, the refusal as that protocol says it).
#[rustfmt::skip]
const TABLE: &[(Op, &str, &str, &str)] = &[
    (Op::RestPublish, "gateway.write:{x}/k.*", "gateway.write:{x}/other.*", "403 forbidden"),
    (Op::RestDeclareQueue, "gateway.configure:{q}-*", "gateway.configure:other-*", "403 forbidden"),
    (Op::RestDeclareExchange, "gateway.configure:{x}-*", "gateway.consume:{x}-*", "403 forbidden"),
    (Op::RestBind, "gateway.configure:{q} gateway.read:{x}/k.#", "gateway.configure:{q} gateway.read:{x}/other.#", "403 forbidden"),
    (Op::RestUnbind, "gateway.configure:{q} gateway.read:{x}/k.#", "gateway.configure:other gateway.read:{x}/k.#", "403 forbidden"),
    (Op::RestPurge, "gateway.configure:{q}", "gateway.consume:{q}", "403 forbidden"),
    (Op::RestGet, "gateway.consume:{q}", "gateway.consume:other", "403 forbidden"),
    (Op::RestDeleteQueue, "gateway.configure:{q}", "gateway.consume:{q}", "403 forbidden"),
    (Op::RestDeleteExchange, "gateway.configure:{x}", "gateway.write:{x}/#", "403 forbidden"),
    (Op::RestOverview, "gateway.tag:monitoring", "gateway.configure:*", "403 forbidden"),
    (Op::RestConnections, "gateway.tag:monitoring", "gateway.configure:*", "403 forbidden"),
    (Op::RestCloseConnection, "gateway.tag:administrator", "gateway.tag:monitoring", "403 forbidden"),
    (Op::Metrics, "gateway.tag:monitoring", "gateway.configure:*", "403 forbidden"),
    (Op::Feed, "gateway.tag:monitoring", "gateway.configure:*", "close 1008"),
    (Op::WsPublish, "gateway.write:{x}/k.*", "gateway.write:{x}/other.*", "forbidden"),
    (Op::WsSubscribe, "gateway.read:{x}/k.#", "gateway.read:{x}/k.*", "forbidden"),
    (Op::WsConsume, "gateway.consume:{q}", "gateway.consume:other-*", "forbidden"),
    (Op::SseSubscribe, "gateway.read:{x}/k.#", "gateway.read:{x}/k.*", "403 forbidden"),
    (Op::SseConsume, "gateway.consume:{q}", "gateway.configure:{q}", "403 forbidden"),
    // 3.1.1 cannot refuse a publish: it is acknowledged and dropped (nothing reaches the queue).
    (Op::MqttPublish(4), "gateway.write:amq.topic/t{n}.*", "gateway.write:amq.topic/u{n}.*", "dropped"),
    (Op::MqttPublish(5), "gateway.write:amq.topic/t{n}.*", "gateway.write:amq.topic/u{n}.*", "PUBACK 0x87"),
    (Op::MqttSubscribe(4), "gateway.read:amq.topic/t{n}.#", "gateway.read:amq.topic/t{n}.a", "SUBACK 0x80"),
    (Op::MqttSubscribe(5), "gateway.read:amq.topic/t{n}.#", "gateway.read:amq.topic/t{n}.a", "SUBACK 0x87"),
    (Op::AmqpPublish, "gateway.write:{x}/k.*", "gateway.write:{x}/other.*", "channel 403"),
    (Op::AmqpConsume, "gateway.consume:{q}", "gateway.consume:other", "channel 403"),
    (Op::AmqpGet, "gateway.consume:{q}", "gateway.configure:{q}", "channel 403"),
    (Op::AmqpDeclareQueue, "gateway.configure:{q}-*", "gateway.configure:other-*", "channel 403"),
    (Op::AmqpDeclareExchange, "gateway.configure:{x}-*", "gateway.consume:{x}-*", "channel 403"),
    (Op::AmqpBind, "gateway.configure:{q} gateway.read:{x}/k.#", "gateway.configure:{q} gateway.read:{x}/other.#", "channel 403"),
    (Op::AmqpUnbind, "gateway.configure:{q} gateway.read:{x}/k.#", "gateway.configure:other gateway.read:{x}/k.#", "channel 403"),
    (Op::AmqpPurge, "gateway.configure:{q}", "gateway.consume:{q}", "channel 403"),
    (Op::AmqpDeleteQueue, "gateway.configure:{q}", "gateway.consume:{q}", "channel 403"),
    (Op::AmqpDeleteExchange, "gateway.configure:{x}", "gateway.write:{x}/#", "channel 403"),
];

/// A fresh queue and exchange for case `n`, bound, each holding nothing.
async fn setup(gw: &TestGateway, n: usize) -> Names {
    let names = Names {
        n,
        q: format!("perm-q{n}"),
        x: format!("perm-x{n}"),
    };
    let admin = admin();
    let created = [
        gw.put(&format!("/v1/queues/{}", names.q), &admin)
            .json(&json!({"durable": false})),
        gw.put(&format!("/v1/exchanges/{}", names.x), &admin)
            .json(&json!({"type": "topic", "durable": false})),
    ];
    for req in created {
        assert_eq!(common::status(req).await, 201);
    }
    gw.bind(&names.q, &names.x, "k.#").await;
    gw.bind(&names.q, "amq.topic", &format!("t{n}.#")).await;
    names
}

/// A REST call: `Ok` on 2xx, else "status code".
async fn rest(req: reqwest::RequestBuilder) -> Result<(), String> {
    let resp = req.send().await.unwrap();
    let status = resp.status();
    if status.is_success() {
        return Ok(());
    }
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    Err(format!(
        "{} {}",
        status.as_u16(),
        body["code"].as_str().unwrap_or("")
    ))
}

/// One `/ws` request: `Ok` on its success reply, else the error frame's code.
async fn ws(gw: &TestGateway, token: &str, frame: Value) -> Result<(), String> {
    let req = common::ws::request(gw, Some(token), true, "");
    let (mut ws, _) = tokio_tungstenite::connect_async(req)
        .await
        .expect("upgrade");
    ws.send(Message::text(frame.to_string())).await.unwrap();
    loop {
        match tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a reply in time")
        {
            Some(Ok(Message::Text(t))) => {
                let v: Value = serde_json::from_str(&t).unwrap();
                match v["op"].as_str() {
                    Some("published" | "subscribed") => return Ok(()),
                    Some("error") => return Err(v["code"].as_str().unwrap().to_owned()),
                    _ => {}
                }
            }
            Some(Ok(_)) => {}
            other => panic!("no reply: {other:?}"),
        }
    }
}

async fn feed(gw: &TestGateway, token: &str) -> Result<(), String> {
    let req = common::ws::upgrade(&common::ws::url(gw, "/v1/feed"), Some(token), None);
    let (mut ws, _) = tokio_tungstenite::connect_async(req)
        .await
        .expect("upgrade");
    match tokio::time::timeout(WAIT, ws.next())
        .await
        .expect("a frame in time")
    {
        Some(Ok(Message::Text(_))) => Ok(()),
        Some(Ok(Message::Close(Some(c)))) => Err(format!("close {}", u16::from(c.code))),
        other => panic!("no frame: {other:?}"),
    }
}

/// An MQTT connection of protocol `level` authenticated with `token`.
async fn mqtt(gw: &TestGateway, level: u8, token: &str) -> RawWire {
    let client = common::unique("perm");
    RawWire::connected(gw, Transport::Tcp, level, &client, token).await
}

async fn mqtt_publish(
    gw: &TestGateway,
    names: &Names,
    level: u8,
    token: &str,
) -> Result<(), String> {
    let mut wire = mqtt(gw, level, token).await;
    let mut body = string(format!("t{}/a", names.n).as_bytes());
    body.extend(7u16.to_be_bytes());
    if level == 5 {
        body.push(0);
    }
    body.extend_from_slice(b"payload");
    wire.send_raw(&packet(0x32, body)).await; // QoS 1
    let (first, ack) = wire.packet().await.expect("PUBACK");
    assert_eq!(first, 0x40);
    if level == 5 && ack.len() > 2 && ack[2] != 0 {
        return Err(format!("PUBACK {:#04x}", ack[2]));
    }
    // 3.1.1 says yes either way: whether it was routed shows in the queue.
    match gw.depth(&names.q).await {
        1 => Ok(()),
        _ => Err("dropped".into()),
    }
}

async fn mqtt_subscribe(
    gw: &TestGateway,
    names: &Names,
    level: u8,
    token: &str,
) -> Result<(), String> {
    let mut wire = mqtt(gw, level, token).await;
    let filter = format!("t{}/#", names.n);
    wire.send_raw(&subscribe_packet(1, &filter, 1, level == 5, None))
        .await;
    let (first, ack) = wire.packet().await.expect("SUBACK");
    assert_eq!(first, 0x90);
    match *ack.last().unwrap() {
        code @ (0 | 1) => {
            assert_eq!(code, 1, "granted QoS 1");
            Ok(())
        }
        code => Err(format!("SUBACK {code:#04x}")),
    }
}

/// One AMQP method on a fresh channel: `Ok` when it succeeded, else "channel <reply code>".
async fn amqp(gw: &TestGateway, names: &Names, op: Op, token: &str) -> Result<(), String> {
    let conn = common::amqp::connect(gw, token).await;
    let ch = common::amqp::channel(&conn).await;
    let args = common::amqp::no_args;
    let (q, x) = (names.q.as_str(), names.x.as_str());
    let result = match op {
        Op::AmqpPublish => {
            ch.confirm_select(ConfirmSelectOptions::default())
                .await
                .unwrap();
            let mut events = common::amqp::events(&conn);
            let props = lapin::BasicProperties::default();
            let confirm = ch
                .basic_publish(x.into(), "k.1".into(), Default::default(), b"m", props)
                .await
                .unwrap();
            tokio::select! {
                c = confirm => c.map(|_| ()),
                e = common::amqp::next_error(&mut events) => Err(e),
            }
        }
        Op::AmqpConsume => ch
            .basic_consume(
                q.into(),
                "perm".into(),
                BasicConsumeOptions::default(),
                args(),
            )
            .await
            .map(|_| ()),
        Op::AmqpGet => ch
            .basic_get(q.into(), BasicGetOptions::default())
            .await
            .map(|_| ()),
        Op::AmqpDeclareQueue => ch
            .queue_declare(
                format!("{q}-new").as_str().into(),
                QueueDeclareOptions::default(),
                args(),
            )
            .await
            .map(|_| ()),
        Op::AmqpDeclareExchange => {
            ch.exchange_declare(
                format!("{x}-new").as_str().into(),
                lapin::ExchangeKind::Topic,
                ExchangeDeclareOptions::default(),
                args(),
            )
            .await
        }
        Op::AmqpBind => {
            ch.queue_bind(
                q.into(),
                x.into(),
                "k.b".into(),
                QueueBindOptions::default(),
                args(),
            )
            .await
        }
        Op::AmqpUnbind => {
            ch.queue_unbind(q.into(), x.into(), "k.#".into(), args())
                .await
        }
        Op::AmqpPurge => ch
            .queue_purge(q.into(), QueuePurgeOptions::default())
            .await
            .map(|_| ()),
        Op::AmqpDeleteQueue => ch
            .queue_delete(q.into(), QueueDeleteOptions::default())
            .await
            .map(|_| ()),
        Op::AmqpDeleteExchange => {
            ch.exchange_delete(x.into(), ExchangeDeleteOptions::default())
                .await
        }
        other => unreachable!("{other:?} is not AMQP"),
    };
    let _ = conn.close(200, "done".into()).await;
    result.map_err(|e| match common::amqp::code(&e) {
        Some(code) => format!("channel {code}"),
        None => format!("{e}"),
    })
}

async fn attempt(gw: &TestGateway, names: &Names, op: Op, token: &str) -> Result<(), String> {
    let (q, x) = (&names.q, &names.x);
    match op {
        Op::RestPublish => {
            rest(
                gw.post(&format!("/v1/exchanges/{x}/publish"), token)
                    .json(&json!({"routing_key": "k.1", "body": "m"})),
            )
            .await
        }
        Op::RestDeclareQueue => {
            rest(
                gw.put(&format!("/v1/queues/{q}-new"), token)
                    .json(&json!({"durable": false})),
            )
            .await
        }
        Op::RestDeclareExchange => {
            rest(
                gw.put(&format!("/v1/exchanges/{x}-new"), token)
                    .json(&json!({"type": "topic"})),
            )
            .await
        }
        Op::RestBind => {
            rest(
                gw.post(&format!("/v1/queues/{q}/bindings"), token)
                    .json(&json!({"exchange": x, "routing_key": "k.b"})),
            )
            .await
        }
        Op::RestUnbind => {
            rest(gw.delete(
                &format!("/v1/queues/{q}/bindings?exchange={x}&routing_key=k.%23"),
                token,
            ))
            .await
        }
        Op::RestPurge => rest(gw.delete(&format!("/v1/queues/{q}/contents"), token)).await,
        Op::RestGet => {
            rest(
                gw.post(&format!("/v1/queues/{q}/get"), token)
                    .json(&json!({"count": 1})),
            )
            .await
        }
        Op::RestDeleteQueue => rest(gw.delete(&format!("/v1/queues/{q}"), token)).await,
        Op::RestDeleteExchange => rest(gw.delete(&format!("/v1/exchanges/{x}"), token)).await,
        Op::RestOverview => rest(gw.get("/v1/overview", token)).await,
        Op::RestConnections => rest(gw.get("/v1/connections", token)).await,
        Op::RestCloseConnection => {
            // A live connection to close: an MQTT client of the administrator.
            let _wire = mqtt(gw, 4, &admin()).await;
            let list = common::json_of(gw.get("/v1/connections?protocol=mqtt", &admin())).await;
            let id = list["items"][0]["id"]
                .as_u64()
                .expect("the MQTT connection");
            rest(gw.delete(&format!("/v1/connections/{id}"), token)).await
        }
        Op::Metrics => rest(gw.get("/metrics", token)).await,
        Op::Feed => feed(gw, token).await,
        Op::WsPublish => {
            ws(
                gw,
                token,
                json!({"op": "publish", "id": 1, "exchange": x, "routing_key": "k.1", "body": "m"}),
            )
            .await
        }
        Op::WsSubscribe => {
            ws(
                gw,
                token,
                json!({"op": "subscribe", "id": 1, "exchange": x, "binding_key": "k.#"}),
            )
            .await
        }
        Op::WsConsume => ws(gw, token, json!({"op": "subscribe", "id": 1, "queue": q})).await,
        Op::SseSubscribe => {
            rest(gw.get(&format!("/v1/sse?exchange={x}&binding_key=k.%23"), token)).await
        }
        Op::SseConsume => rest(gw.get(&format!("/v1/sse?queue={q}"), token)).await,
        Op::MqttPublish(level) => mqtt_publish(gw, names, level, token).await,
        Op::MqttSubscribe(level) => mqtt_subscribe(gw, names, level, token).await,
        amqp_op => amqp(gw, names, amqp_op, token).await,
    }
}

#[tokio::test]
async fn every_operation_with_an_allowing_and_a_refusing_scope() {
    let gw = start_gateway(|c| c.shutdown_timeout = Duration::from_secs(1)).await;
    let mut wrong = Vec::new();
    for (n, &(op, allow, refuse, refusal)) in TABLE.iter().enumerate() {
        // Refused first: an allowed delete or purge would leave nothing to refuse.
        let names = setup(&gw, n).await;
        let refused = attempt(&gw, &names, op, &token("perm", &names.scope(refuse))).await;
        if refused != Err(refusal.to_owned()) {
            wrong.push(format!(
                "{op:?} with `{refuse}`: {refused:?}, expected {refusal}"
            ));
        }
        let allowed = attempt(&gw, &names, op, &token("perm", &names.scope(allow))).await;
        if let Err(e) = allowed {
            wrong.push(format!("{op:?} with `{allow}`: refused ({e})"));
        }
    }
    assert!(wrong.is_empty(), "\n{}", wrong.join("\n"));
}
