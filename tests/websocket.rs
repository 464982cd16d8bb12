//! The WebSocket gateway over real sockets with tokio-tungstenite: every op, error and close
//! code of DESIGN.md §4, flow control (a stalled reader among fast ones), durable subscriptions
//! with takeover, token expiry and refresh, and REST ↔ WebSocket in both directions.

mod common;

use std::time::Duration;

use amqp_gateway::engine::{Message, PublishOptions};
use common::under::{self, gateway};
use common::ws::{Ws, request};
use common::{SECRET, TestGateway, WAIT, admin, json_of, token, unique};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::{self, Message as WsMessage};

const QUIET: Duration = Duration::from_millis(200);

async fn connect(gw: &TestGateway, bearer: Option<&str>) -> Ws {
    Ws::connect(gw, bearer).await
}

async fn connect_as(gw: &TestGateway, token: &str) -> Ws {
    connect(gw, Some(token)).await
}

/// What only these cases ask of the shared client.
impl Ws {
    async fn nothing_within(&mut self, quiet: Duration) {
        if let Ok(Some(frame)) = tokio::time::timeout(quiet, self.0.next()).await {
            panic!("expected nothing, got {frame:?}");
        }
    }

    /// `ack` of `tag` on `sub` (`multiple` as given), answered `ok`.
    async fn ack_ok(&mut self, sub: &str, tag: u64, multiple: bool) {
        let req = json!({"op": "ack", "id": "ack", "sub": sub, "delivery_tag": tag, "multiple": multiple});
        let reply = self.call(req).await;
        assert_eq!(reply["op"], "ok", "{reply}");
    }

    async fn subscribe(&mut self, spec: Value) -> (String, String) {
        let mut req = json!({"op": "subscribe", "id": "sub"});
        for (k, v) in spec.as_object().unwrap() {
            req[k] = v.clone();
        }
        let reply = self.call(req).await;
        assert_eq!(reply["op"], "subscribed", "{reply}");
        assert_eq!(reply["id"], "sub");
        (
            reply["sub"].as_str().unwrap().to_owned(),
            reply["queue"].as_str().unwrap().to_owned(),
        )
    }
}

fn assert_error(frame: &Value, code: &str) {
    assert_eq!(frame["op"], "error", "{frame}");
    assert_eq!(frame["code"], code, "{frame}");
    assert!(
        frame["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{frame}"
    );
}

async fn rest_publish(gw: &TestGateway, exchange: &str, key: &str, body: Value) {
    let r = gw
        .post(&format!("/v1/exchanges/{exchange}/publish"), &admin())
        .json(&json!({"routing_key": key, "body": body}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

// ---------- upgrade and authentication ----------

async fn the_upgrade_needs_the_subprotocol_and_a_good_token() {
    let gw = gateway(|_| {}).await;
    match tokio_tungstenite::connect_async(request(&gw, Some(&admin()), false, "")).await {
        Err(tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 400),
        other => panic!("expected HTTP 400, got {other:?}"),
    }
    match tokio_tungstenite::connect_async(request(&gw, Some("bad.token.here"), true, "")).await {
        Err(tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 401);
            assert_eq!(resp.headers()["www-authenticate"], "Bearer");
        }
        other => panic!("expected HTTP 401, got {other:?}"),
    }
    // A query token only when allowed.
    let q = format!("?access_token={}", admin());
    let mut ws = Ws(
        tokio_tungstenite::connect_async(request(&gw, None, true, &q))
            .await
            .unwrap()
            .0,
    );
    ws.send(json!({"op": "ping", "id": 1})).await;
    assert_eq!(
        ws.closed_with().await,
        4001,
        "query tokens are off by default"
    );
    let gw = gateway(|c| c.ws.allow_query_token = true).await;
    let mut ws = Ws(
        tokio_tungstenite::connect_async(request(&gw, None, true, &q))
            .await
            .unwrap()
            .0,
    );
    assert_eq!(
        ws.call(json!({"op": "ping", "id": 1})).await,
        json!({"op": "pong", "id": 1})
    );
}

async fn auth_by_first_frame_or_4001() {
    let gw = gateway(|c| c.ws.auth_timeout = Duration::from_millis(300)).await;
    let mut ws = connect(&gw, None).await;
    let ok = ws
        .call(json!({"op": "auth", "id": 1, "token": token("ann", "gateway.read:amq.topic/#")}))
        .await;
    assert_eq!(ok["op"], "ok");
    assert_eq!(ok["subject"], "ann");
    assert!(ok["expires_at"].as_u64().unwrap() > amqp_gateway::auth::now_secs());
    assert_eq!(
        ws.call(json!({"op": "ping", "id": 2})).await,
        json!({"op": "pong", "id": 2})
    );

    let mut first_not_auth = connect(&gw, None).await;
    first_not_auth.send(json!({"op": "ping", "id": 1})).await;
    assert_eq!(first_not_auth.closed_with().await, 4001);

    let mut bad = connect(&gw, None).await;
    let err = bad
        .call(json!({"op": "auth", "id": 7, "token": "nope"}))
        .await;
    assert_error(&err, "unauthorized");
    assert_eq!(err["id"], 7);
    assert_eq!(bad.closed_with().await, 4001);

    let mut silent = connect(&gw, None).await;
    assert_eq!(
        silent.closed_with().await,
        4001,
        "no auth frame within ws.auth_timeout"
    );
}

async fn anonymous_clients_may_start_with_any_request() {
    let gw =
        gateway(|c| c.auth.anonymous_scope = Some("gateway.read:amq.topic/public.#".into())).await;
    let mut ws = connect(&gw, None).await;
    assert_eq!(
        ws.call(json!({"op": "ping", "id": "p"})).await,
        json!({"op": "pong", "id": "p"})
    );
    let (sub, _) = ws
        .subscribe(json!({"exchange": "amq.topic", "binding_key": "public.#"}))
        .await;
    rest_publish(&gw, "amq.topic", "public.x", json!("hello")).await;
    let m = ws.recv().await;
    assert_eq!(
        (m["sub"].as_str().unwrap(), m["body"].clone()),
        (sub.as_str(), json!("hello"))
    );
    let forbidden = ws
        .call(json!({"op": "subscribe", "id": 2, "exchange": "amq.topic", "binding_key": "#"}))
        .await;
    assert_error(&forbidden, "forbidden");
    let durable = ws
        .call(json!({"op": "subscribe", "id": 3, "exchange": "amq.topic", "binding_key": "public.#", "durable": "d1"}))
        .await;
    assert_error(&durable, "forbidden");
}

// ---------- subscribe, messages, publish ----------

async fn rest_publishes_reach_subscribers_with_the_right_encoding() {
    let gw = gateway(|_| {}).await;
    let mut ws = connect_as(&gw, &token("bea", "gateway.read:amq.topic/sensors.#")).await;
    let (sub, queue) = ws
        .subscribe(json!({"exchange": "amq.topic", "binding_key": "sensors.#"}))
        .await;
    assert!(queue.starts_with("amq.gen-"), "{queue}");
    rest_publish(&gw, "amq.topic", "sensors.k1.temp", json!({"t": 21.5})).await;
    rest_publish(&gw, "amq.topic", "sensors.k1.note", json!("plain text")).await;
    let r = gw
        .post(
            "/v1/exchanges/amq.topic/messages?routing_key=sensors.k1.raw",
            &admin(),
        )
        .body(vec![0u8, 159, 146, 150])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    rest_publish(&gw, "amq.topic", "other.x", json!("not for us")).await;
    let m1 = ws.recv().await;
    assert_eq!(m1["op"], "message");
    assert_eq!(m1["sub"], sub);
    assert_eq!(m1["delivery_tag"], 1);
    assert_eq!(m1["exchange"], "amq.topic");
    assert_eq!(m1["routing_key"], "sensors.k1.temp");
    assert_eq!(m1["redelivered"], false);
    assert_eq!(
        (m1["body"].clone(), m1["encoding"].clone()),
        (json!({"t": 21.5}), json!("json"))
    );
    assert_eq!(m1["properties"]["headers"]["x-gateway-sub"], "root");
    let m2 = ws.recv().await;
    assert_eq!(
        (
            m2["body"].clone(),
            m2["encoding"].clone(),
            m2["delivery_tag"].clone()
        ),
        (json!("plain text"), json!("utf8"), json!(2))
    );
    let m3 = ws.recv().await;
    assert_eq!(
        (m3["body"].clone(), m3["encoding"].clone()),
        (json!("AJ+Slg=="), json!("base64"))
    );
    ws.nothing_within(QUIET).await;
}

async fn websocket_publishes_reach_rest_get() {
    let gw = gateway(|_| {}).await;
    let q = gw.queue("wspub").await;
    gw.bind(&q, "amq.topic", "chat.#").await;
    let mut ws = connect_as(&gw, &token("cy", "gateway.write:amq.topic/chat.#")).await;
    let r = ws
        .call(
            json!({"op": "publish", "id": 6, "exchange": "amq.topic", "routing_key": "chat.room1",
                     "body": {"text": "hi"}, "properties": {"correlation_id": "c1"}}),
        )
        .await;
    assert_eq!(r, json!({"op": "published", "id": 6, "routed": true}));
    // Without id: no success reply, but still published (and in order).
    ws.send(json!({"op": "publish", "exchange": "amq.topic", "routing_key": "chat.room1", "body": "/wA=", "encoding": "base64"})).await;
    assert_eq!(ws.call(json!({"op": "ping", "id": 7})).await["op"], "pong");
    let unrouted = ws
        .call(json!({"op": "publish", "id": 8, "exchange": "amq.topic", "routing_key": "chat.void", "body": "x", "mandatory": false}))
        .await;
    assert_eq!(unrouted["routed"], true, "chat.# is bound");
    let got = gw.take(&q, 10).await;
    assert_eq!(got.len(), 3);
    assert_eq!(got[0]["body"], json!({"text": "hi"}));
    assert_eq!(got[0]["properties"]["headers"]["x-gateway-sub"], "cy");
    assert_eq!(got[0]["properties"]["correlation_id"], "c1");
    assert_eq!(got[1]["body"], json!("/wA="));
    assert_eq!(got[1]["encoding"], "base64");
    let mandatory = ws
        .call(json!({"op": "publish", "id": 9, "exchange": "amq.topic", "routing_key": "chat.nobody.listens.here", "body": "x", "mandatory": true}))
        .await;
    assert_eq!(mandatory["routed"], true, "still matched by chat.#");
    let mut ws2 = connect_as(&gw, &token("cy", "gateway.write:amq.direct/#")).await;
    let unroutable = ws2
        .call(json!({"op": "publish", "id": 10, "exchange": "amq.direct", "routing_key": unique("k"), "body": "x", "mandatory": true}))
        .await;
    assert_error(&unroutable, "unroutable");
    let forbidden = ws2.call(json!({"op": "publish", "id": 11, "exchange": "amq.topic", "routing_key": "chat.x", "body": "x"})).await;
    assert_error(&forbidden, "forbidden");
    assert_eq!(forbidden["id"], 11);
    assert_eq!(forbidden["op_of"], "publish");
}

async fn manual_ack_is_bounded_by_prefetch_and_tags_are_per_sub() {
    let gw = gateway(|_| {}).await;
    let q = gw.queue("manual").await;
    let t = token(
        "dee",
        &format!("gateway.consume:{q} gateway.read:amq.topic/m.#"),
    );
    let mut ws = connect_as(&gw, &t).await;
    let (s1, _) = ws
        .subscribe(json!({"queue": q, "ack": "manual", "prefetch": 2}))
        .await;
    for i in 0..5 {
        rest_publish(&gw, "amq.default", &q, json!(i.to_string())).await;
    }
    let a = ws.recv().await;
    let b = ws.recv().await;
    assert_eq!(
        (a["delivery_tag"].clone(), b["delivery_tag"].clone()),
        (json!(1), json!(2))
    );
    ws.nothing_within(QUIET).await;
    assert_eq!(
        ws.call(json!({"op": "ack", "id": 1, "sub": s1, "delivery_tag": 1}))
            .await,
        json!({"op": "ok", "id": 1})
    );
    let c = ws.recv().await;
    assert_eq!(
        (c["body"].clone(), c["delivery_tag"].clone()),
        (json!("2"), json!(3))
    );
    // nack with requeue, multiple: 2 and 3 come back redelivered.
    ws.send(json!({"op": "nack", "sub": s1, "delivery_tag": 3, "multiple": true, "requeue": true}))
        .await;
    let r1 = ws.recv().await;
    let r2 = ws.recv().await;
    assert_eq!(
        (r1["body"].clone(), r2["body"].clone()),
        (json!("1"), json!("2"))
    );
    assert!(r1["redelivered"].as_bool().unwrap() && r2["redelivered"].as_bool().unwrap());
    assert_eq!(
        (r1["delivery_tag"].clone(), r2["delivery_tag"].clone()),
        (json!(4), json!(5))
    );

    // Settle everything on s1: it then gets "3" and "4".
    ws.ack_ok(&s1, 5, true).await;
    let (m6, m7) = (ws.recv().await, ws.recv().await);
    assert_eq!(
        (m6["body"].clone(), m7["body"].clone()),
        (json!("3"), json!("4"))
    );
    ws.ack_ok(&s1, 7, true).await;

    // A second manual sub: `multiple` on s1 must not touch s2's deliveries.
    let (s2, q2) = ws
        .subscribe(
            json!({"exchange": "amq.topic", "binding_key": "m.#", "ack": "manual", "prefetch": 5}),
        )
        .await;
    assert!(q2.starts_with("amq.gen-"));
    rest_publish(&gw, "amq.topic", "m.x", json!("on s2")).await;
    rest_publish(&gw, "amq.default", &q, json!("on s1")).await;
    let (x, y) = (ws.recv().await, ws.recv().await);
    let mut subs = [
        x["sub"].as_str().unwrap().to_owned(),
        y["sub"].as_str().unwrap().to_owned(),
    ];
    subs.sort();
    assert_eq!(subs, [s1.clone(), s2.clone()]);
    ws.ack_ok(&s1, 100, true).await;
    let still = ws
        .call(json!({"op": "ack", "id": 5, "sub": s2, "delivery_tag": 1}))
        .await;
    assert_eq!(
        still["op"], "ok",
        "s2's delivery was still unacked: {still}"
    );

    // Unknown tag, unknown sub, auto-ack sub: precondition_failed, nothing reaches the engine.
    assert_error(
        &ws.call(json!({"op": "ack", "id": 6, "sub": s1, "delivery_tag": 99}))
            .await,
        "precondition_failed",
    );
    assert_error(
        &ws.call(json!({"op": "ack", "id": 7, "sub": "s99", "delivery_tag": 1}))
            .await,
        "precondition_failed",
    );
    let (auto, _) = ws
        .subscribe(json!({"exchange": "amq.topic", "binding_key": "m.#"}))
        .await;
    assert_error(
        &ws.call(json!({"op": "nack", "id": 8, "sub": auto, "delivery_tag": 1}))
            .await,
        "precondition_failed",
    );
}

async fn unsubscribe_and_disconnect_requeue_unacked() {
    let gw = gateway(|_| {}).await;
    let q = gw.queue("requeue").await;
    let t = token("eli", &format!("gateway.consume:{q}"));
    let mut ws = connect_as(&gw, &t).await;
    let (s1, _) = ws
        .subscribe(json!({"queue": q, "ack": "manual", "prefetch": 10}))
        .await;
    rest_publish(&gw, "amq.default", &q, json!("held")).await;
    rest_publish(&gw, "amq.default", &q, json!("also held")).await;
    ws.recv().await;
    ws.recv().await;
    assert_eq!(gw.depth(&q).await, 0);
    assert_eq!(
        ws.call(json!({"op": "unsubscribe", "id": 1, "sub": s1}))
            .await,
        json!({"op": "ok", "id": 1})
    );
    assert_eq!(gw.depth(&q).await, 2, "unsubscribe requeues");
    assert_error(
        &ws.call(json!({"op": "unsubscribe", "id": 2, "sub": s1}))
            .await,
        "precondition_failed",
    );
    ws.subscribe(json!({"queue": q, "ack": "manual"})).await;
    let again = ws.recv().await;
    assert_eq!(again["redelivered"], true);
    drop(ws);
    common::eventually("messages back after the socket went", || async {
        gw.depth(&q).await == 2
    })
    .await;
}

async fn auto_ack_on_a_named_queue_acks_after_writing() {
    let gw = gateway(|c| c.ws.auto_ack_window = 3).await;
    let q = gw.queue("window").await;
    let mut ws = connect_as(&gw, &token("fay", &format!("gateway.consume:{q}"))).await;
    ws.subscribe(json!({"queue": q, "ack": "auto"})).await;
    for i in 0..10 {
        rest_publish(&gw, "amq.default", &q, json!(i.to_string())).await;
    }
    for i in 0..10 {
        assert_eq!(ws.recv().await["body"], json!(i.to_string()));
    }
    common::eventually("all acked", || async {
        let v: Value = json_of(gw.get(&format!("/v1/queues/{q}"), &admin())).await;
        v["messages"] == 0 && v["messages_unacknowledged"] == 0
    })
    .await;
}

// ---------- durable subscriptions ----------

/// Issue 13: a durable subscription's queue and its persistent messages are on disk; after a
/// restart the browser resumes it, and what it had seen unacked comes back redelivered.
async fn durable_subscriptions_survive_a_restart() {
    // Embedded: a data directory; upstream: a vhost, where the subscription's queue lives.
    let place = under::Place::new().await;
    let persistent = |gw: &TestGateway, body: &str| {
        let body =
            json!({"routing_key": "ledger.a", "body": body, "properties": {"delivery_mode": 2}});
        gw.post("/v1/exchanges/amq.topic/publish", &admin())
            .json(&body)
    };
    let t = token("gil", "gateway.read:amq.topic/ledger.#");
    let spec = json!({"exchange": "amq.topic", "binding_key": "ledger.#", "durable": "books", "ack": "manual"});
    let gw = place.start().await;
    let mut ws = connect_as(&gw, &t).await;
    ws.subscribe(spec.clone()).await;
    assert_eq!(persistent(&gw, "one").send().await.unwrap().status(), 200);
    assert_eq!(ws.recv().await["body"], "one", "seen, never acked");
    drop(ws);
    // Published once the subscription's consumer is gone, so "two" was never sent to anybody.
    // The connection leaves the registry after its consumers are cancelled (RabbitMQ's
    // management API may still show the consumer count from before it attached).
    common::eventually("the connection and its consumer gone", || async {
        json_of(gw.get("/v1/connections?subject=gil", &admin())).await["items"] == json!([])
    })
    .await;
    assert_eq!(persistent(&gw, "two").send().await.unwrap().status(), 200);
    gw.gateway.shutdown().await;

    let gw = place.start().await;
    let mut ws = connect_as(&gw, &t).await;
    let (sub, queue) = ws.subscribe(spec).await;
    assert_eq!(queue, "ws-gil.books");
    let (m1, m2) = (ws.recv().await, ws.recv().await);
    assert_eq!(
        (
            &m1["body"],
            &m1["redelivered"],
            &m2["body"],
            &m2["redelivered"]
        ),
        (&json!("one"), &json!(true), &json!("two"), &json!(false))
    );
    ws.ack_ok(&sub, m2["delivery_tag"].as_u64().unwrap(), true)
        .await;
}

async fn durable_subscriptions_resume_and_are_taken_over() {
    let gw = gateway(|_| {}).await;
    let t = token("gus", "gateway.read:amq.topic/chat.#");
    let spec = json!({"exchange": "amq.topic", "binding_key": "chat.room1", "durable": "room1", "ack": "manual"});
    let mut first = connect_as(&gw, &t).await;
    let (_, queue) = first.subscribe(spec.clone()).await;
    assert_eq!(queue, "ws-gus.room1");
    rest_publish(&gw, "amq.topic", "chat.room1", json!("one")).await;
    assert_eq!(first.recv().await["body"], "one");
    drop(first); // never acked
    // Published once the old subscription is gone, so "two" was never sent to anybody.
    common::eventually("the first connection's consumer gone", || async {
        json_of(gw.get(&format!("/v1/queues/{queue}"), &admin())).await["consumers"] == 0
    })
    .await;
    rest_publish(&gw, "amq.topic", "chat.room1", json!("two")).await;

    let mut back = connect_as(&gw, &t).await;
    back.subscribe(spec.clone()).await;
    let m1 = back.recv().await;
    let m2 = back.recv().await;
    assert_eq!(
        (m1["body"].clone(), m1["redelivered"].clone()),
        (json!("one"), json!(true))
    );
    assert_eq!(
        (m2["body"].clone(), m2["redelivered"].clone()),
        (json!("two"), json!(false))
    );

    // Another tab of the same user takes it over.
    let mut other_tab = connect_as(&gw, &t).await;
    let (other_sub, q2) = other_tab.subscribe(spec.clone()).await;
    assert_eq!(q2, queue);
    let cancelled = back.recv().await;
    assert_eq!(cancelled["op"], "cancelled");
    assert_eq!(cancelled["reason"], "taken_over");
    for expected in ["one", "two"] {
        let resent = other_tab.recv().await;
        assert_eq!(
            (resent["body"].clone(), resent["redelivered"].clone()),
            (json!(expected), json!(true)),
            "unacked deliveries moved to the new holder"
        );
    }

    // A resume with other values is refused.
    let mut wrong = connect_as(&gw, &t).await;
    let refused = wrong
        .call(json!({"op": "subscribe", "id": 1, "exchange": "amq.topic", "binding_key": "chat.#", "durable": "room1"}))
        .await;
    assert_error(&refused, "precondition_failed");
    for bad in ["", "has space", &"x".repeat(65)] {
        let r = wrong
            .call(json!({"op": "subscribe", "id": 2, "exchange": "amq.topic", "binding_key": "chat.x", "durable": bad}))
            .await;
        assert_error(&r, "bad_request");
    }
    // Another user's durable name is its own queue.
    let mut stranger = connect_as(&gw, &token("hal", "gateway.read:amq.topic/chat.#")).await;
    let (_, hq) = stranger.subscribe(spec.clone()).await;
    assert_eq!(hq, "ws-hal.room1");

    // unsubscribe with delete removes it.
    let ok = other_tab
        .call(json!({"op": "unsubscribe", "id": 9, "sub": other_sub, "delete": true}))
        .await;
    assert_eq!(ok["op"], "ok");
    let r = gw
        .get("/v1/queues/ws-gus.room1", &admin())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

// ---------- bad input ----------

async fn bad_frames_get_errors_and_the_connection_stays() {
    let gw = gateway(|c| c.limits.max_message_bytes = bytesize::ByteSize::kib(1)).await;
    let mut ws = connect_as(&gw, &admin()).await;
    ws.0.send(WsMessage::text("not json")).await.unwrap();
    let e = ws.recv().await;
    assert_error(&e, "bad_request");
    assert_eq!(
        (e["id"].clone(), e["op_of"].clone()),
        (Value::Null, Value::Null)
    );
    let e = ws.call(json!({"op": "dance", "id": 1})).await;
    assert_error(&e, "bad_request");
    assert_eq!(
        (e["id"].clone(), e["op_of"].clone()),
        (json!(1), json!("dance"))
    );
    for (frame, op) in [
        (json!({"op": "subscribe", "id": 2}), "subscribe"),
        (json!({"op": "subscribe", "id": 3, "queue": 5}), "subscribe"),
        (
            json!({"op": "subscribe", "id": 4, "queue": "q", "prefetch": 0}),
            "subscribe",
        ),
        (
            json!({"op": "subscribe", "id": 5, "queue": "q", "prefetch": 1001}),
            "subscribe",
        ),
        (
            json!({"op": "subscribe", "id": 6, "queue": "q", "ack": "sometimes"}),
            "subscribe",
        ),
        (
            json!({"op": "subscribe", "id": 7, "exchange": "amq.topic", "queue": "q"}),
            "subscribe",
        ),
        (
            json!({"op": "publish", "id": 8, "exchange": "amq.topic"}),
            "publish",
        ),
        (
            json!({"op": "publish", "id": 9, "exchange": "amq.topic", "body": "!", "encoding": "base64"}),
            "publish",
        ),
        (
            json!({"op": "publish", "id": 10, "exchange": "a/b", "body": "x"}),
            "publish",
        ),
        (json!({"op": "ack", "id": 11, "sub": "s1"}), "ack"),
        (
            json!({"op": "ack", "id": 12, "sub": "s1", "delivery_tag": -1}),
            "ack",
        ),
        (json!({"op": "ping", "id": 13, "extra": true}), "ping"),
    ] {
        let e = ws.call(frame.clone()).await;
        assert_error(&e, "bad_request");
        assert_eq!(e["op_of"], op, "{frame}");
        assert_eq!(e["id"], frame["id"], "{frame}");
    }
    // Errors without an id still come, with id null and the op.
    let e = ws.call(json!({"op": "unsubscribe", "sub": "nope"})).await;
    assert_error(&e, "precondition_failed");
    assert_eq!(
        (e["id"].clone(), e["op_of"].clone()),
        (Value::Null, json!("unsubscribe"))
    );
    ws.0.send(WsMessage::binary(vec![1u8, 2, 3])).await.unwrap();
    assert_error(&ws.recv().await, "bad_request");
    let e = ws
        .call(json!({"op": "subscribe", "id": 14, "exchange": unique("nope"), "binding_key": "k"}))
        .await;
    assert_error(&e, "not_found");
    let big = "x".repeat(2048);
    let e = ws.call(json!({"op": "publish", "id": 15, "exchange": "amq.topic", "routing_key": "k", "body": big})).await;
    assert_error(&e, "too_large");
    assert_eq!(
        ws.call(json!({"op": "ping", "id": 16})).await["op"],
        "pong",
        "still usable"
    );
    // A frame over the frame limit (ceil(1 KiB × 4/3) + 64 KiB) closes with 1009.
    ws.0.send(WsMessage::text("x".repeat(80 * 1024)))
        .await
        .unwrap();
    assert_eq!(ws.closed_with().await, 1009);
}

async fn rate_limited_publishes_while_pings_flow() {
    let gw = gateway(|c| {
        c.limits.publish_rate = 1;
        c.limits.publish_burst = 2;
    })
    .await;
    let mut ws = connect_as(&gw, &admin()).await;
    let publish = |id: u64| json!({"op": "publish", "id": id, "exchange": "amq.topic", "routing_key": "r", "body": "x"});
    assert_eq!(ws.call(publish(1)).await["op"], "published");
    assert_eq!(ws.call(publish(2)).await["op"], "published");
    let limited = ws.call(publish(3)).await;
    assert_error(&limited, "rate_limited");
    let ms = limited["retry_after_ms"].as_u64().unwrap();
    assert!(ms > 0 && ms <= 1000, "{ms}");
    assert_eq!(ws.call(json!({"op": "ping", "id": 4})).await["op"], "pong");
}

/// Above the engine's memory high watermark a publish gets `overloaded` with retry_after_ms,
/// the connection stays, and publishes are accepted again once consumers drain it.
async fn overloaded_above_the_memory_watermark_until_drained() {
    let gw = gateway(common::low_watermark).await;
    let q = gw.queue("ws-full").await;
    let mut ws = connect_as(&gw, &admin()).await;
    let publish = |id: u64, body: String| json!({"op": "publish", "id": id, "exchange": "", "routing_key": q, "body": body});
    assert_eq!(
        ws.call(publish(1, "x".repeat(100 * 1024))).await["op"],
        "published"
    );
    let refused = ws.call(publish(2, "small".into())).await;
    assert_error(&refused, "overloaded");
    assert!(refused["retry_after_ms"].as_u64().is_some_and(|ms| ms > 0));
    assert_eq!(ws.call(json!({"op": "ping", "id": 3})).await["op"], "pong");
    assert_eq!(
        gw.depth(&q).await,
        1,
        "the refused publish was not accepted"
    );
    assert_eq!(gw.take(&q, 1).await.len(), 1);
    assert_eq!(ws.call(publish(4, "small".into())).await["op"], "published");
}

// ---------- flow control ----------

/// Connection limits (DESIGN.md §7): a subject's extra connection and connections past the
/// number allowed to wait for their `auth` frame are closed with 1013 (try again later); a
/// place comes back when a connection ends.
async fn connection_limits_close_with_1013() {
    let gw = gateway(|c| {
        c.limits.max_connections_per_subject = 1;
        c.limits.max_unauthenticated = 1;
    })
    .await;
    let t = token("one-at-a-time", "gateway.read:amq.topic/#");
    let mut first = connect_as(&gw, &t).await;
    assert_eq!(
        first.call(json!({"op": "ping", "id": 1})).await["op"],
        "pong"
    );
    assert_eq!(connect_as(&gw, &t).await.closed_with().await, 1013);
    // Another subject is not affected.
    let mut other = connect_as(&gw, &admin()).await;
    assert_eq!(
        other.call(json!({"op": "ping", "id": 2})).await["op"],
        "pong"
    );
    first.0.close(None).await.unwrap();
    common::eventually("the subject's place back", || async {
        // A refused attempt gets a close frame instead of the pong.
        let mut again = connect_as(&gw, &t).await;
        let ping = WsMessage::text(json!({"op": "ping", "id": 3}).to_string());
        let _ = again.0.send(ping).await;
        let reply = tokio::time::timeout(Duration::from_millis(500), again.0.next()).await;
        matches!(reply, Ok(Some(Ok(WsMessage::Text(_)))))
    })
    .await;
    // One connection may wait for its auth frame; another is closed at once. Under load the
    // server may admit the later of two connections first, so every connection that got in is
    // kept open (holding the place) until one is refused.
    let waiting = std::sync::Mutex::new(vec![connect(&gw, None).await]);
    common::eventually("an unauthenticated connection beyond the limit refused", || async {
        let mut next = connect(&gw, None).await;
        let reply = tokio::time::timeout(Duration::from_millis(500), next.0.next()).await;
        let refused =
            matches!(reply, Ok(Some(Ok(WsMessage::Close(Some(f))))) if u16::from(f.code) == 1013);
        if !refused {
            waiting.lock().unwrap().push(next);
        }
        refused
    })
    .await;
}

async fn a_stalled_reader_lags_while_fast_readers_get_everything() {
    const N: usize = 600;
    let gw = gateway(|c| {
        c.limits.outbound_buffer_messages = 20;
        c.limits.outbound_buffer_bytes = bytesize::ByteSize::kib(512);
    })
    .await;
    // The fast reader consumes a named queue with auto-ack: the engine holds its backlog and
    // nothing is dropped. The others consume private queues through the droppable buffer.
    let fast_queue = gw.queue("fast").await;
    gw.bind(&fast_queue, "amq.topic", "flood.#").await;
    let t = token(
        "ivy",
        &format!("gateway.read:amq.topic/flood.# gateway.consume:{fast_queue}"),
    );
    let mut fast = connect_as(&gw, &t).await;
    fast.subscribe(json!({"queue": fast_queue})).await;
    let mut stalled = connect_as(&gw, &t).await;
    stalled
        .subscribe(json!({"exchange": "amq.topic", "binding_key": "flood.#"}))
        .await;
    let mut strict = connect_as(&gw, &t).await;
    strict
        .subscribe(
            json!({"exchange": "amq.topic", "binding_key": "flood.#", "overflow": "disconnect"}),
        )
        .await;

    let fast_reader = tokio::spawn(async move {
        let mut seen = 0;
        while seen < N {
            let m = fast.recv().await;
            if m["op"] == "message" {
                assert_eq!(
                    m["properties"]["message_id"],
                    seen.to_string(),
                    "fast reader in order"
                );
                seen += 1;
            }
        }
        seen
    });
    let engine = gw.gateway.engine();
    let ch = engine
        .open_channel(&amqp_gateway::engine::Owner::new(), "flood")
        .await
        .unwrap();
    let body = "z".repeat(64 * 1024);
    for i in 0..N {
        let mut m = Message::new(body.clone());
        m.properties_mut().message_id = Some(i.to_string());
        ch.publish("amq.topic", "flood.x", m, PublishOptions::default())
            .await
            .unwrap();
    }
    assert_eq!(
        tokio::time::timeout(WAIT * 4, fast_reader)
            .await
            .expect("fast reader not slowed")
            .unwrap(),
        N
    );

    // The stalled reader now reads: every message is either received or counted as dropped,
    // and the newest survived.
    let (mut received, mut dropped, mut last) = (0usize, 0usize, String::new());
    while received + dropped < N {
        let f = stalled.recv().await;
        match f["op"].as_str().unwrap() {
            "message" => {
                received += 1;
                last = f["properties"]["message_id"].as_str().unwrap().to_owned();
            }
            "lagged" => dropped += f["dropped"].as_u64().unwrap() as usize,
            other => panic!("unexpected {other}"),
        }
    }
    assert!(dropped > 0, "the buffer must have overflowed");
    assert_eq!(received + dropped, N);
    assert_eq!(last, (N - 1).to_string(), "drop_oldest keeps the newest");
    assert_eq!(
        strict.closed_with().await,
        4008,
        "overflow: disconnect closes with 4008"
    );
}

async fn unacked_too_long_cancels_the_sub() {
    let gw = gateway(|c| c.ws.ack_timeout = Duration::from_millis(500)).await;
    let q = gw.queue("slowack").await;
    let mut ws = connect_as(&gw, &token("jo", &format!("gateway.consume:{q}"))).await;
    let (sub, _) = ws.subscribe(json!({"queue": q, "ack": "manual"})).await;
    rest_publish(&gw, "amq.default", &q, json!("ack me")).await;
    assert_eq!(ws.recv().await["op"], "message");
    let c = ws.recv().await;
    assert_eq!(
        c,
        json!({"op": "cancelled", "sub": sub, "reason": "ack_timeout"})
    );
    assert_eq!(gw.depth(&q).await, 1, "requeued");
}

async fn a_deleted_queue_cancels_its_subs() {
    let gw = gateway(|_| {}).await;
    let q = gw.queue("gone").await;
    let mut ws = connect_as(&gw, &token("kai", &format!("gateway.consume:{q}"))).await;
    let (sub, _) = ws.subscribe(json!({"queue": q})).await;
    assert_eq!(
        gw.delete(&format!("/v1/queues/{q}"), &admin())
            .send()
            .await
            .unwrap()
            .status(),
        204
    );
    assert_eq!(
        ws.recv().await,
        json!({"op": "cancelled", "sub": sub, "reason": "deleted"})
    );
}

// ---------- token lifetime ----------

async fn expiry_closes_4001_unless_refreshed() {
    let gw = gateway(|c| c.auth.leeway = Duration::ZERO).await;
    let short = |scope: &str| {
        amqp_gateway::auth::mint(
            SECRET,
            "lee",
            scope,
            Duration::from_secs(2),
            "gateway",
            None,
        )
        .unwrap()
    };
    let mut plain = connect_as(&gw, &short("gateway.read:amq.topic/#")).await;
    assert_eq!(plain.closed_with().await, 4001);

    let mut refreshed = connect_as(&gw, &short("gateway.read:amq.topic/#")).await;
    let (s1, _) = refreshed
        .subscribe(json!({"exchange": "amq.topic", "binding_key": "a.#"}))
        .await;
    let (s2, _) = refreshed
        .subscribe(json!({"exchange": "amq.topic", "binding_key": "b.#"}))
        .await;
    let longer = token("lee", "gateway.read:amq.topic/a.#");
    let ok = refreshed
        .call(json!({"op": "auth", "id": 1, "token": longer}))
        .await;
    assert_eq!(ok["op"], "ok");
    assert_eq!(
        refreshed.recv().await,
        json!({"op": "cancelled", "sub": s2, "reason": "forbidden"})
    );
    let other = token("someone-else", "gateway.read:amq.topic/#");
    assert_error(
        &refreshed
            .call(json!({"op": "auth", "id": 2, "token": other}))
            .await,
        "unauthorized",
    );
    tokio::time::sleep(Duration::from_secs(3)).await; // past the first token's exp: still open
    assert_eq!(
        refreshed.call(json!({"op": "ping", "id": 3})).await["op"],
        "pong"
    );
    rest_publish(&gw, "amq.topic", "a.x", json!("still subscribed")).await;
    let m = refreshed.recv().await;
    assert_eq!(
        (m["sub"].as_str().unwrap(), m["body"].clone()),
        (s1.as_str(), json!("still subscribed"))
    );
}

async fn shutdown_closes_with_1001() {
    let gw = gateway(|_| {}).await;
    let mut ws = connect_as(&gw, &admin()).await;
    assert_eq!(ws.call(json!({"op": "ping", "id": 1})).await["op"], "pong");
    let handle = gw.gateway.shutdown_handle();
    handle.trigger();
    assert_eq!(ws.closed_with().await, 1001);
}

macro_rules! on_engine {
    ($m:ident, $e:ident: $($case:ident),* $(,)?) => {
        mod $m {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $case() {
                let _ = super::under::ENGINE.set(super::under::Engine::$e);
                super::$case().await
            } )*
        }
    };
}

on_engine!(embedded, Embedded:
    the_upgrade_needs_the_subprotocol_and_a_good_token,
    auth_by_first_frame_or_4001,
    anonymous_clients_may_start_with_any_request,
    rest_publishes_reach_subscribers_with_the_right_encoding,
    websocket_publishes_reach_rest_get,
    manual_ack_is_bounded_by_prefetch_and_tags_are_per_sub,
    unsubscribe_and_disconnect_requeue_unacked,
    auto_ack_on_a_named_queue_acks_after_writing,
    durable_subscriptions_survive_a_restart,
    durable_subscriptions_resume_and_are_taken_over,
    bad_frames_get_errors_and_the_connection_stays,
    rate_limited_publishes_while_pings_flow,
    overloaded_above_the_memory_watermark_until_drained,
    connection_limits_close_with_1013,
    a_stalled_reader_lags_while_fast_readers_get_everything,
    unacked_too_long_cancels_the_sub,
    a_deleted_queue_cancels_its_subs,
    expiry_closes_4001_unless_refreshed,
    shutdown_closes_with_1001,
);

// Embedded only: overloaded_above_the_memory_watermark_until_drained (the memory watermark is
// the embedded engine's; upstream it is RabbitMQ's connection.blocked, issue 16).
on_engine!(upstream, Upstream:
    the_upgrade_needs_the_subprotocol_and_a_good_token,
    auth_by_first_frame_or_4001,
    anonymous_clients_may_start_with_any_request,
    rest_publishes_reach_subscribers_with_the_right_encoding,
    websocket_publishes_reach_rest_get,
    manual_ack_is_bounded_by_prefetch_and_tags_are_per_sub,
    unsubscribe_and_disconnect_requeue_unacked,
    auto_ack_on_a_named_queue_acks_after_writing,
    durable_subscriptions_survive_a_restart,
    durable_subscriptions_resume_and_are_taken_over,
    bad_frames_get_errors_and_the_connection_stays,
    rate_limited_publishes_while_pings_flow,
    connection_limits_close_with_1013,
    unacked_too_long_cancels_the_sub,
    a_deleted_queue_cancels_its_subs,
    expiry_closes_4001_unless_refreshed,
    shutdown_closes_with_1001,
    a_stalled_reader_lags_while_fast_readers_get_everything,
);
