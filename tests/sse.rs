//! Server-Sent Events (`GET /v1/sse`, docs/sse.md) over real sockets with reqwest on both
//! engines: events carry the WebSocket `message` JSON, refusals are problem+json, a durable
//! stream resumes from `Last-Event-ID` with exactly what was missed, a slow stream lags or is
//! cut off, and streams end at the token's expiry and at shutdown.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use amqp_gateway::engine::{Message, PublishOptions};
use common::sse::{Sse, request};
use common::under::{self, gateway};
use common::{TestGateway, WAIT, admin, refused, token, unique};
use serde_json::{Value, json};

async fn rest_publish(gw: &TestGateway, key: &str, body: Value) {
    let r = gw
        .post("/v1/exchanges/amq.topic/publish", &admin())
        .json(&json!({"routing_key": key, "body": body}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// `n` numbered JSON messages `{"n": i}` for `from..from+n` to `key`.
async fn publish_numbered(gw: &TestGateway, key: &str, from: u64, n: u64) {
    for i in from..from + n {
        rest_publish(gw, key, json!({ "n": i })).await;
    }
}

async fn numbers(sse: &mut Sse, count: usize) -> Vec<u64> {
    let mut got = Vec::new();
    for _ in 0..count {
        let (_, m) = sse.message().await;
        got.push(m["body"]["n"].as_u64().expect("a numbered body"));
    }
    got
}

async fn a_stream_receives_rest_publishes_as_websocket_message_json() {
    let gw = gateway(|_| {}).await;
    let key = unique("sse");
    let t = token("ann", &format!("gateway.read:amq.topic/{key}.#"));
    let query = format!("exchange=amq.topic&binding_key={key}.%23");
    let (mut sse, subscribed) = Sse::open(&gw, &query, Some(&t), None).await;
    assert_eq!(subscribed["sub"], "s1");
    assert!(subscribed["queue"].as_str().unwrap().starts_with("amq.gen"));
    rest_publish(&gw, &format!("{key}.a"), json!({"t": 21.5})).await;
    rest_publish(&gw, &format!("{key}.b"), json!("plain")).await;
    let (id, m) = sse.message().await;
    assert_eq!(id, "1");
    assert_eq!(m["op"], "message");
    assert_eq!(m["sub"], "s1");
    assert_eq!(m["delivery_tag"], 1);
    assert_eq!(m["exchange"], "amq.topic");
    assert_eq!(m["routing_key"], format!("{key}.a"));
    assert_eq!(m["redelivered"], false);
    assert_eq!(
        (m["body"].clone(), m["encoding"].clone()),
        (json!({"t": 21.5}), json!("json"))
    );
    assert_eq!(m["properties"]["content_type"], "application/json");
    let (id, m) = sse.message().await;
    assert_eq!(
        (id.as_str(), m["body"].clone(), m["encoding"].clone()),
        ("2", json!("plain"), json!("utf8"))
    );
}

async fn refusals_are_problems() {
    let gw = gateway(|_| {}).await;
    let ok_query = "exchange=amq.topic&binding_key=a.%23";
    refused(request(&gw, ok_query, None, None), 401, "unauthorized").await;
    let reader = token("bob", "gateway.read:amq.topic/a.#");
    refused(
        request(
            &gw,
            "exchange=amq.topic&binding_key=b.%23",
            Some(&reader),
            None,
        ),
        403,
        "forbidden",
    )
    .await;
    refused(
        request(&gw, "queue=orders", Some(&reader), None),
        403,
        "forbidden",
    )
    .await;
    refused(
        request(
            &gw,
            &format!("{ok_query}&access_token={reader}"),
            None,
            None,
        ),
        401,
        "unauthorized",
    )
    .await;
    refused(
        request(&gw, "exchange=amq.topic&queue=q", Some(&reader), None),
        400,
        "bad_request",
    )
    .await;
    refused(
        request(&gw, "colour=red", Some(&reader), None),
        400,
        "bad_request",
    )
    .await;
    refused(
        request(
            &gw,
            &format!("queue={}", unique("missing")),
            Some(&admin()),
            None,
        ),
        404,
        "not_found",
    )
    .await;
    let wrong_accept = gw
        .get(&format!("/v1/sse?{ok_query}"), &reader)
        .header("accept", "application/json");
    refused(wrong_accept, 406, "bad_request").await;
    // The stream the same token may open.
    Sse::open(&gw, ok_query, Some(&reader), None).await;
}

async fn a_query_token_works_only_when_allowed() {
    let gw = gateway(|c| c.ws.allow_query_token = true).await;
    let t = token("cat", "gateway.read:amq.topic/q.#");
    let (mut sse, _) = Sse::open(
        &gw,
        &format!("exchange=amq.topic&binding_key=q.%23&access_token={t}"),
        None,
        None,
    )
    .await;
    rest_publish(&gw, "q.1", json!(1)).await;
    assert_eq!(sse.message().await.1["body"], 1);
    refused(
        request(
            &gw,
            "exchange=amq.topic&binding_key=q.%23&access_token=not-a-jwt",
            None,
            None,
        ),
        401,
        "unauthorized",
    )
    .await;
}

async fn a_named_queue_is_acked_once_written() {
    let gw = gateway(|_| {}).await;
    let queue = gw.queue("sse-named").await;
    gw.bind(&queue, "amq.topic", "named.#").await;
    publish_numbered(&gw, "named.x", 1, 5).await;
    let t = token("dan", &format!("gateway.consume:{queue}"));
    let (mut sse, subscribed) = Sse::open(&gw, &format!("queue={queue}"), Some(&t), None).await;
    assert_eq!(subscribed["queue"], queue.as_str());
    assert_eq!(numbers(&mut sse, 5).await, [1, 2, 3, 4, 5]);
    common::eventually("the queue drained by acks", || async {
        gw.depth(&queue).await == 0
    })
    .await;
}

/// The browser's view of a durable stream: reads `take` messages, then the connection drops.
async fn durable_read(
    gw: &TestGateway,
    query: &str,
    t: &str,
    last: Option<&str>,
    take: usize,
) -> (Vec<u64>, Option<String>) {
    let (mut sse, _) = Sse::open(gw, query, Some(t), last).await;
    let got = numbers(&mut sse, take).await;
    (got, sse.last_id.clone())
}

async fn durable_streams_resume_with_exactly_what_was_missed() {
    let gw = gateway(|_| {}).await;
    let key = unique("room");
    let t = token("eve", &format!("gateway.read:amq.topic/{key}"));
    let query = format!("exchange=amq.topic&binding_key={key}&durable=room1");
    // Subscribe (creates the durable queue), drop, then everything published is kept.
    drop(Sse::open(&gw, &query, Some(&t), None).await);
    publish_numbered(&gw, &key, 1, 10).await;
    let (got, last) = durable_read(&gw, &query, &t, None, 4).await;
    assert_eq!(got, [1, 2, 3, 4]);
    let first_last = last.clone().expect("an id");
    publish_numbered(&gw, &key, 11, 10).await;
    // The reconnect names what it received: it gets 5..=20, once each, in order.
    let (got, last) = durable_read(&gw, &query, &t, Some(&first_last), 16).await;
    assert_eq!(got, (5..=20).collect::<Vec<_>>());
    // A stale id (the browser lost the stream before the next id reached it) acknowledges
    // nothing more: what it has not confirmed comes again rather than being lost.
    let (got, _) = durable_read(&gw, &query, &t, Some(&first_last), 16).await;
    assert_eq!(got, (5..=20).collect::<Vec<_>>());
    // Confirmed through 20: nothing left but what comes next.
    let (mut sse, _) = Sse::open(&gw, &query, Some(&t), last.as_deref()).await;
    rest_publish(&gw, &key, json!({"n": 21})).await;
    assert_eq!(numbers(&mut sse, 1).await, [21]);
}

async fn a_durable_window_ends_the_stream_and_the_reconnect_acknowledges_it() {
    let gw = gateway(|c| c.sse.durable_window = 5).await;
    let key = unique("win");
    let t = token("fay", &format!("gateway.read:amq.topic/{key}"));
    let query = format!("exchange=amq.topic&binding_key={key}&durable=w");
    drop(Sse::open(&gw, &query, Some(&t), None).await);
    publish_numbered(&gw, &key, 1, 12).await;
    let mut seen = Vec::new();
    let mut last: Option<String> = None;
    let mut streams = 0;
    while seen.len() < 12 {
        streams += 1;
        assert!(streams <= 3, "12 messages in windows of 5: three streams");
        let (mut sse, _) = Sse::open(&gw, &query, Some(&t), last.as_deref()).await;
        loop {
            match sse.next().await {
                Some(e) if e.event == "message" => {
                    seen.push(e.json()["body"]["n"].as_u64().unwrap())
                }
                Some(e) => panic!("unexpected {e:?}"),
                None => break, // the window is full: the stream ended
            }
            if seen.len() == 12 {
                break;
            }
        }
        last = sse.last_id.clone();
    }
    assert_eq!(seen, (1..=12).collect::<Vec<_>>());
}

async fn a_slow_stream_lags_or_is_cut_off() {
    const N: usize = 400;
    let gw = gateway(|c| {
        c.limits.outbound_buffer_messages = 20;
        c.limits.outbound_buffer_bytes = bytesize::ByteSize::kib(512);
        c.limits.pace_max_wait = Duration::from_millis(5);
    })
    .await;
    let t = token("gus", "gateway.read:amq.topic/slow.#");
    let (mut lagging, _) = Sse::open(
        &gw,
        "exchange=amq.topic&binding_key=slow.%23",
        Some(&t),
        None,
    )
    .await;
    let (mut strict, _) = Sse::open(
        &gw,
        "exchange=amq.topic&binding_key=slow.%23&overflow=disconnect",
        Some(&t),
        None,
    )
    .await;
    let engine = gw.gateway.engine();
    let ch = engine
        .open_channel(&amqp_gateway::engine::Owner::new(), "flood")
        .await
        .unwrap();
    let body = "z".repeat(64 * 1024);
    for i in 0..N {
        let mut m = Message::new(body.clone());
        m.properties_mut().message_id = Some(i.to_string());
        ch.publish("amq.topic", "slow.x", m, PublishOptions::default())
            .await
            .unwrap();
    }
    // Nobody reads yet: 25 MiB cannot all wait in the buffers, so the streams drop (once the
    // gateway got round to them: on a loaded machine that can take a while).
    let deadline = tokio::time::Instant::now() + WAIT * 4;
    // The strict stream counts the one it refused, then closes; the lagging one, what it drops.
    while sse_closed("slow_consumer") == 0
        || sse_counter("gateway_deliveries_dropped_total", "slow_consumer") < 2
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "nothing dropped while nobody read"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Every message is received or counted as dropped, and the newest survived.
    let (mut received, mut dropped, mut last) = (0usize, 0usize, String::new());
    while received + dropped < N {
        let e = lagging.next().await.expect("the lagging stream goes on");
        match e.event.as_str() {
            "message" => {
                received += 1;
                last = e.json()["properties"]["message_id"]
                    .as_str()
                    .unwrap()
                    .to_owned();
            }
            "lagged" => dropped += e.json()["dropped"].as_u64().unwrap() as usize,
            other => panic!("unexpected {other}"),
        }
    }
    assert!(dropped > 0, "the buffer must have overflowed");
    assert_eq!(last, (N - 1).to_string(), "drop_oldest keeps the newest");
    // The strict stream: what it got, then how many it lost, then close 4008 and the end.
    let mut events = Vec::new();
    while let Some(e) = strict.next().await {
        events.push(e);
    }
    let close = events.last().expect("a close event").json();
    assert_eq!(close["code"], 4008, "{close}");
    let lagged = &events[events.len() - 2];
    assert_eq!(lagged.event, "lagged", "{lagged:?}");
    let got = events.iter().filter(|e| e.event == "message").count();
    assert!(got + lagged.json()["dropped"].as_u64().unwrap() as usize <= N);
}

async fn a_stream_ends_at_the_token_expiry_and_at_shutdown() {
    let gw = gateway(|c| c.auth.leeway = Duration::ZERO).await;
    let short = amqp_gateway::auth::mint(
        common::SECRET,
        "hal",
        "gateway.read:amq.topic/#",
        Duration::from_secs(2),
        "gateway",
        None,
    )
    .unwrap();
    let (mut sse, _) = Sse::open(&gw, "exchange=amq.topic&binding_key=x", Some(&short), None).await;
    let e = sse.next_within(WAIT * 2).await.expect("a close event");
    assert_eq!(
        (e.event.as_str(), e.json()["code"].as_u64()),
        ("close", Some(4001))
    );
    assert!(sse.next().await.is_none(), "then the stream ends");

    let (mut sse, _) = Sse::open(
        &gw,
        "exchange=amq.topic&binding_key=x",
        Some(&admin()),
        None,
    )
    .await;
    gw.gateway.shutdown_handle().trigger();
    let e = sse.next().await.expect("a close event");
    assert_eq!(
        (e.event.as_str(), e.json()["code"].as_u64()),
        ("close", Some(1001))
    );
    assert!(sse.next().await.is_none(), "then the stream ends");
}

/// The SSE sample of counter `name` with `reason` in this process (0 before its first).
fn sse_counter(name: &str, reason: &str) -> u64 {
    let text = amqp_gateway::metrics::handle().render();
    let labels = format!("protocol=\"sse\",reason=\"{reason}\"");
    text.lines()
        .find(|l| l.starts_with(&format!("{name}{{")) && l.contains(&labels))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}

fn sse_closed(reason: &str) -> u64 {
    sse_counter("gateway_connections_closed_total", reason)
}

async fn a_stream_whose_client_takes_nothing_ends_after_the_write_timeout() {
    let gw = gateway(|c| c.limits.write_timeout = Duration::from_secs(1)).await;
    let queue = gw.queue("sse-stuck").await;
    let ch = gw
        .gateway
        .engine()
        .open_channel(&amqp_gateway::engine::Owner::new(), "fill")
        .await
        .unwrap();
    // More than the socket buffers hold: the writes stop once they are full.
    let body = "z".repeat(256 * 1024);
    for _ in 0..150 {
        ch.publish(
            "",
            &queue,
            Message::new(body.clone()),
            PublishOptions::default(),
        )
        .await
        .unwrap();
    }
    let (stuck, _) = Sse::open(&gw, &format!("queue={queue}"), Some(&admin()), None).await;
    // Filling the socket buffers takes a while (on the upstream engine too, through RabbitMQ),
    // then a second of `write_timeout`: more than `eventually`'s bound.
    let deadline = tokio::time::Instant::now() + WAIT * 4;
    while sse_closed("write_stalled") != 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stalled stream was not closed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // What it had not handed over went back to the queue.
    assert!(gw.depth(&queue).await > 0);
    drop(stuck);
}

async fn a_durable_subscription_moves_between_websocket_and_sse() {
    let gw = gateway(|_| {}).await;
    let key = unique("move");
    let t = token("ida", &format!("gateway.read:amq.topic/{key}"));
    let mut ws = common::ws::Ws::connect(&gw, Some(&t)).await;
    let reply = ws
        .call(json!({"op": "subscribe", "id": 1, "exchange": "amq.topic", "binding_key": key, "durable": "both", "ack": "manual"}))
        .await;
    assert_eq!(reply["op"], "subscribed", "{reply}");
    let query = format!("exchange=amq.topic&binding_key={key}&durable=both");
    // The SSE stream takes it over: the WebSocket subscription is cancelled.
    let (mut sse, subscribed) = Sse::open(&gw, &query, Some(&t), None).await;
    assert_eq!(subscribed["queue"], reply["queue"]);
    let cancelled = ws.recv().await;
    assert_eq!(
        (cancelled["op"].as_str(), cancelled["reason"].as_str()),
        (Some("cancelled"), Some("taken_over"))
    );
    publish_numbered(&gw, &key, 1, 3).await;
    assert_eq!(numbers(&mut sse, 3).await, [1, 2, 3]);
    // Back to the WebSocket: the SSE stream is told and ends; what it held (never confirmed by
    // a Last-Event-ID) comes again, redelivered.
    let reply = ws
        .call(json!({"op": "subscribe", "id": 2, "exchange": "amq.topic", "binding_key": key, "durable": "both", "ack": "manual"}))
        .await;
    assert_eq!(reply["op"], "subscribed", "{reply}");
    let e = sse.next().await.expect("a cancelled event");
    assert_eq!(
        (e.event.as_str(), e.json()["reason"].as_str()),
        ("cancelled", Some("taken_over"))
    );
    let mut again = BTreeSet::new();
    for _ in 0..3 {
        let m = ws.recv().await;
        assert_eq!(m["redelivered"], true, "{m}");
        again.insert(m["body"]["n"].as_u64().unwrap());
    }
    assert_eq!(again, BTreeSet::from([1, 2, 3]));
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
    a_stream_receives_rest_publishes_as_websocket_message_json,
    refusals_are_problems,
    a_query_token_works_only_when_allowed,
    a_named_queue_is_acked_once_written,
    durable_streams_resume_with_exactly_what_was_missed,
    a_durable_window_ends_the_stream_and_the_reconnect_acknowledges_it,
    a_slow_stream_lags_or_is_cut_off,
    a_stream_ends_at_the_token_expiry_and_at_shutdown,
    a_durable_subscription_moves_between_websocket_and_sse,
    a_stream_whose_client_takes_nothing_ends_after_the_write_timeout,
);

on_engine!(upstream, Upstream:
    a_stream_receives_rest_publishes_as_websocket_message_json,
    refusals_are_problems,
    a_query_token_works_only_when_allowed,
    a_named_queue_is_acked_once_written,
    durable_streams_resume_with_exactly_what_was_missed,
    a_durable_window_ends_the_stream_and_the_reconnect_acknowledges_it,
    a_slow_stream_lags_or_is_cut_off,
    a_stream_ends_at_the_token_expiry_and_at_shutdown,
    a_durable_subscription_moves_between_websocket_and_sse,
    a_stream_whose_client_takes_nothing_ends_after_the_write_timeout,
);
