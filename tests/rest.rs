//! REST over real sockets with reqwest: every endpoint, every error code of DESIGN.md §5, bad
//! input that must change nothing, idempotency, and the REST limits.

mod common;

use std::time::Duration;

use common::{admin, json_of, problem, refused, start_gateway, status, token, unique};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

// ---------- publish ----------

#[tokio::test]
async fn publish_then_get_with_every_body_encoding() {
    let gw = start_gateway(|_| {}).await;
    let q = gw.queue("enc").await;
    gw.bind(&q, "amq.topic", "enc.#").await;
    let pubtoken = token("alice", "gateway.write:amq.topic/enc.#");
    for body in [
        json!({"routing_key": "enc.text", "body": "hello"}),
        json!({"routing_key": "enc.json", "body": {"t": 21.5, "ok": true}}),
        json!({"routing_key": "enc.bytes", "body": "AP8=", "encoding": "base64"}),
        json!({"routing_key": "enc.jsonstr", "body": "quoted", "encoding": "json"}),
        json!({"routing_key": "enc.props", "body": "p", "properties": {
            "content_type": "text/plain", "headers": {"n": 1, "raw": {"$bytes": "AQI="}},
            "delivery_mode": 2, "priority": 5, "correlation_id": "c-1", "reply_to": "r",
            "expiration": "60000", "message_id": "m-1", "timestamp": 1700000000, "type": "t",
            "app_id": "tests"}}),
    ] {
        let r = gw
            .post("/v1/exchanges/amq.topic/publish", &pubtoken)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.json::<Value>().await.unwrap(), json!({"routed": true}));
    }
    let got = gw.take(&q, 10).await;
    assert_eq!(got.len(), 5);
    assert_eq!(
        (got[0]["body"].clone(), got[0]["encoding"].clone()),
        (json!("hello"), json!("utf8"))
    );
    assert_eq!(got[0]["exchange"], "amq.topic");
    assert_eq!(got[0]["routing_key"], "enc.text");
    assert_eq!(got[0]["redelivered"], false);
    assert_eq!(got[0]["properties"]["headers"]["x-gateway-sub"], "alice");
    assert_eq!(
        (got[1]["body"].clone(), got[1]["encoding"].clone()),
        (json!({"t": 21.5, "ok": true}), json!("json"))
    );
    assert_eq!(got[1]["properties"]["content_type"], "application/json");
    assert_eq!(
        (got[2]["body"].clone(), got[2]["encoding"].clone()),
        (json!("AP8="), json!("base64"))
    );
    assert_eq!(got[3]["body"], json!("quoted"));
    assert_eq!(got[3]["encoding"], "json");
    let p = &got[4]["properties"];
    assert_eq!(p["content_type"], "text/plain");
    assert_eq!(p["headers"]["n"], 1);
    assert_eq!(p["headers"]["raw"], json!({"$bytes": "AQI="}));
    assert_eq!(
        (p["delivery_mode"].clone(), p["priority"].clone()),
        (json!(2), json!(5))
    );
    assert_eq!(
        (p["correlation_id"].clone(), p["reply_to"].clone()),
        (json!("c-1"), json!("r"))
    );
    assert_eq!(
        (p["message_id"].clone(), p["type"].clone()),
        (json!("m-1"), json!("t"))
    );
    assert_eq!(
        (p["timestamp"].clone(), p["app_id"].clone()),
        (json!(1700000000), json!("tests"))
    );
    assert_eq!(p["expiration"], "60000");
    assert_eq!(got[4]["message_count"], 0);
}

#[tokio::test]
async fn the_subject_header_cannot_be_forged() {
    let gw = start_gateway(|_| {}).await;
    let q = gw.queue("forge").await;
    let t = token("alice", "gateway.write:amq.default/#");
    let r = gw
        .post("/v1/exchanges/amq.default/publish", &t)
        .json(&json!({"routing_key": q, "body": "x", "properties": {"headers": {"x-gateway-sub": "root"}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        gw.take(&q, 1).await[0]["properties"]["headers"]["x-gateway-sub"],
        "alice"
    );
}

#[tokio::test]
async fn mandatory_unroutable_is_422_and_plain_unroutable_is_routed_false() {
    let gw = start_gateway(|_| {}).await;
    let key = unique("nowhere");
    let r = gw
        .post("/v1/exchanges/amq.direct/publish", &admin())
        .json(&json!({"routing_key": key, "body": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"routed": false}));
    let r = gw
        .post("/v1/exchanges/amq.direct/publish", &admin())
        .json(&json!({"routing_key": key, "body": "x", "mandatory": true}))
        .send()
        .await
        .unwrap();
    problem(r, 422, "unroutable").await;
    let r = gw
        .post(
            &format!("/v1/exchanges/{}/publish", unique("missing")),
            &admin(),
        )
        .json(&json!({"routing_key": "k", "body": "x"}))
        .send()
        .await
        .unwrap();
    problem(r, 404, "not_found").await;
}

#[tokio::test]
async fn batch_publishes_in_order_with_a_result_each() {
    let gw = start_gateway(|c| c.http.max_batch = 5).await;
    let q = gw.queue("batch").await;
    let t = token("b", &format!("gateway.write:amq.default/{q}"));
    let r = gw
        .post("/v1/exchanges/amq.default/publish-batch", &t)
        .json(&json!({"messages": [
            {"routing_key": q, "body": "1"},
            {"routing_key": "not-mine", "body": "forbidden"},
            {"routing_key": q, "body": "!!", "encoding": "base64"},
            {"routing_key": q, "body": {"n": 2}},
            {"routing_key": q},
        ]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let results = r.json::<Value>().await.unwrap()["results"].clone();
    assert_eq!(results[0], json!({"routed": true}));
    assert_eq!(results[1]["error"]["code"], "forbidden");
    assert_eq!(results[2]["error"]["code"], "bad_request");
    assert_eq!(results[3], json!({"routed": true}));
    assert_eq!(
        results[4]["error"]["code"], "bad_request",
        "a message without body"
    );
    let bodies: Vec<Value> = gw
        .take(&q, 10)
        .await
        .into_iter()
        .map(|m| m["body"].clone())
        .collect();
    assert_eq!(bodies, [json!("1"), json!({"n": 2})]);

    let six: Vec<Value> = (0..6)
        .map(|i| json!({"routing_key": q, "body": i.to_string()}))
        .collect();
    let r = gw
        .post("/v1/exchanges/amq.default/publish-batch", &t)
        .json(&json!({"messages": six}))
        .send()
        .await
        .unwrap();
    problem(r, 400, "bad_request").await;
    assert_eq!(
        gw.depth(&q).await,
        0,
        "an oversized batch publishes nothing"
    );
}

#[tokio::test]
async fn raw_body_publish_maps_headers_to_properties() {
    let gw = start_gateway(|_| {}).await;
    let q = gw.queue("raw").await;
    let r = gw
        .post(
            &format!("/v1/exchanges/amq.default/messages?routing_key={q}"),
            &admin(),
        )
        .header("content-type", "image/png")
        .header("amqp-headers", r#"{"camera": "front", "seq": 7}"#)
        .header("amqp-delivery-mode", "2")
        .header("amqp-expiration", "5000")
        .body(vec![0x89u8, b'P', b'N', b'G', 0, 0xff])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"routed": true}));
    let r = gw
        .post(
            &format!("/v1/exchanges/amq.default/messages?routing_key={q}"),
            &admin(),
        )
        .body("plain")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let got = gw.take(&q, 2).await;
    assert_eq!(got[0]["encoding"], "base64");
    assert_eq!(got[0]["body"], "iVBORwD/");
    let p = &got[0]["properties"];
    assert_eq!(p["content_type"], "image/png");
    assert_eq!(p["headers"]["camera"], "front");
    assert_eq!(p["headers"]["seq"], 7);
    assert_eq!(p["delivery_mode"], 2);
    assert_eq!(p["expiration"], "5000");
    assert_eq!(
        got[1]["properties"]["content_type"],
        "application/octet-stream"
    );
    assert_eq!(got[1]["body"], "plain");

    for (name, value) in [
        ("amqp-headers", "[1,2]"),
        ("amqp-headers", "{not json"),
        ("amqp-delivery-mode", "3"),
        ("amqp-expiration", "soon"),
        ("amqp-mandatory", "maybe"),
    ] {
        let r = gw
            .post(
                &format!("/v1/exchanges/amq.default/messages?routing_key={q}"),
                &admin(),
            )
            .header(name, value)
            .body("x")
            .send()
            .await
            .unwrap();
        problem(r, 400, "bad_request").await;
    }
    let r = gw
        .post(
            &format!(
                "/v1/exchanges/amq.direct/messages?routing_key={}",
                unique("k")
            ),
            &admin(),
        )
        .header("amqp-mandatory", "true")
        .body("x")
        .send()
        .await
        .unwrap();
    problem(r, 422, "unroutable").await;
    assert_eq!(gw.depth(&q).await, 0);
}

#[tokio::test]
async fn idempotency_key_replays_and_publishes_once() {
    let gw = start_gateway(|_| {}).await;
    let q = gw.queue("idem").await;
    let send = |key: &'static str, body: &'static str| {
        gw.post("/v1/exchanges/amq.default/publish", &admin())
            .header("idempotency-key", key)
            .json(&json!({"routing_key": q, "body": body}))
            .send()
    };
    let first = send("k1", "once").await.unwrap();
    assert_eq!(first.status(), 200);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let again = send("k1", "once").await.unwrap();
    assert_eq!(again.status(), 200);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(
        again.json::<Value>().await.unwrap(),
        json!({"routed": true})
    );
    problem(
        send("k1", "different").await.unwrap(),
        409,
        "precondition_failed",
    )
    .await;
    assert_eq!(gw.depth(&q).await, 1, "published exactly once");
    // Another subject's key space is its own.
    let other = gw
        .post(
            "/v1/exchanges/amq.default/publish",
            &token("other", "gateway.write:amq.default/#"),
        )
        .header("idempotency-key", "k1")
        .json(&json!({"routing_key": q, "body": "once"}))
        .send()
        .await
        .unwrap();
    assert!(other.headers().get("idempotent-replayed").is_none());
    assert_eq!(gw.depth(&q).await, 2);
    // A failed publish does not hold the key.
    let failed = gw
        .post(
            &format!("/v1/exchanges/{}/publish", unique("nope")),
            &admin(),
        )
        .header("idempotency-key", "k2")
        .json(&json!({"routing_key": "x", "body": "x"}))
        .send()
        .await
        .unwrap();
    problem(failed, 404, "not_found").await;
    let retry = gw
        .post(
            &format!("/v1/exchanges/{}/publish", unique("nope")),
            &admin(),
        )
        .header("idempotency-key", "k2")
        .json(&json!({"routing_key": "x", "body": "x"}))
        .send()
        .await
        .unwrap();
    assert!(retry.headers().get("idempotent-replayed").is_none());
}

// ---------- topology ----------

#[tokio::test]
async fn exchanges_declare_inspect_list_delete() {
    let gw = start_gateway(|_| {}).await;
    let name = unique("ex");
    let path = format!("/v1/exchanges/{name}");
    let spec = json!({"type": "topic", "durable": false, "arguments": {"alternate-exchange": "x"}});
    assert_eq!(status(gw.put(&path, &admin()).json(&spec)).await, 201);
    assert_eq!(status(gw.put(&path, &admin()).json(&spec)).await, 204);
    let other = json!({"type": "fanout", "durable": false});
    refused(
        gw.put(&path, &admin()).json(&other),
        409,
        "precondition_failed",
    )
    .await;
    let view: Value = json_of(gw.get(&path, &admin())).await;
    assert_eq!(
        view,
        json!({"name": name, "type": "topic", "durable": false, "auto_delete": false,
               "internal": false, "arguments": {"alternate-exchange": "x"}})
    );
    let default: Value = json_of(gw.get("/v1/exchanges/amq.default", &admin())).await;
    assert_eq!(default["type"], "direct");
    refused(
        gw.put(&path, &admin()).json(&json!({"type": "bogus"})),
        400,
        "bad_request",
    )
    .await;
    refused(
        gw.put(&format!("/v1/exchanges/amq.{}", unique("r")), &admin())
            .json(&json!({"type": "direct"})),
        403,
        "forbidden",
    )
    .await;

    // Pagination: a prefix's exchanges come back in name order across pages.
    let prefix = unique("page");
    for i in 0..5 {
        let r = gw
            .put(&format!("/v1/exchanges/{prefix}-{i}"), &admin())
            .json(&json!({"type": "direct", "durable": false}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
    }
    let scoped = token("pager", &format!("gateway.configure:{prefix}-*"));
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut url = "/v1/exchanges?page_size=2".to_owned();
        if let Some(c) = &cursor {
            url.push_str(&format!("&cursor={c}"));
        }
        let page: Value = json_of(gw.get(&url, &scoped)).await;
        let items = page["items"].as_array().unwrap();
        assert!(items.len() <= 2);
        seen.extend(items.iter().map(|e| e["name"].as_str().unwrap().to_owned()));
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    let expected: Vec<String> = (0..5).map(|i| format!("{prefix}-{i}")).collect();
    assert_eq!(
        seen, expected,
        "a scoped caller sees exactly its exchanges, in order"
    );

    let q = gw.queue("exq").await;
    gw.bind(&q, &name, "a.#").await;
    refused(
        gw.delete(&format!("{path}?if_unused=true"), &admin()),
        409,
        "precondition_failed",
    )
    .await;
    assert_eq!(status(gw.delete(&path, &admin())).await, 204);
    refused(gw.delete(&path, &admin()), 404, "not_found").await;
    refused(gw.get(&path, &admin()), 404, "not_found").await;
    refused(
        gw.delete("/v1/exchanges/amq.topic", &admin()),
        403,
        "forbidden",
    )
    .await;
}

#[tokio::test]
async fn queues_declare_inspect_purge_delete() {
    let gw = start_gateway(|_| {}).await;
    let name = unique("q");
    let path = format!("/v1/queues/{name}");
    let spec = json!({"durable": false, "arguments": {"x-max-length": 10, "x-message-ttl": 60000}});
    assert_eq!(status(gw.put(&path, &admin()).json(&spec)).await, 201);
    assert_eq!(status(gw.put(&path, &admin()).json(&spec)).await, 204);
    refused(
        gw.put(&path, &admin()).json(&json!({"durable": true})),
        409,
        "precondition_failed",
    )
    .await;
    refused(
        gw.put(&format!("/v1/queues/{}", unique("x")), &admin())
            .json(&json!({"exclusive": true})),
        400,
        "bad_request",
    )
    .await;
    refused(
        gw.put(&format!("/v1/queues/{}", unique("x")), &admin())
            .json(&json!({"arguments": {"x-overflow": "explode"}})),
        400,
        "bad_request",
    )
    .await;
    for i in 0..3 {
        gw.post("/v1/exchanges/amq.default/publish", &admin())
            .json(&json!({"routing_key": name, "body": i.to_string()}))
            .send()
            .await
            .unwrap();
    }
    let view: Value = json_of(gw.get(&path, &admin())).await;
    assert_eq!(view["messages"], 3);
    assert_eq!(view["consumers"], 0);
    assert_eq!(view["durable"], false);
    assert_eq!(view["arguments"]["x-max-length"], 10);
    refused(
        gw.delete(&format!("{path}?if_empty=true"), &admin()),
        409,
        "precondition_failed",
    )
    .await;
    let purged: Value = json_of(gw.delete(&format!("{path}/contents"), &admin())).await;
    assert_eq!(purged, json!({"purged": 3}));
    assert_eq!(gw.depth(&name).await, 0);
    let list: Value = json_of(gw.get("/v1/queues?page_size=1000", &admin())).await;
    assert!(
        list["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|q| q["name"] == name)
    );
    assert_eq!(status(gw.delete(&path, &admin())).await, 204);
    refused(gw.get(&path, &admin()), 404, "not_found").await;
    refused(
        gw.delete(&format!("{path}/contents"), &admin()),
        404,
        "not_found",
    )
    .await;
}

#[tokio::test]
async fn bindings_create_list_delete() {
    let gw = start_gateway(|_| {}).await;
    let q = gw.queue("bind").await;
    let path = format!("/v1/queues/{q}/bindings");
    let r = gw
        .post(&path, &admin())
        .json(&json!({"exchange": "amq.topic", "routing_key": "a.*"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"exchange": "amq.topic", "queue": q, "routing_key": "a.*", "arguments": {}})
    );
    let hdr = json!({"exchange": "amq.headers", "routing_key": "", "arguments": {"x-match": "any", "k": "v"}});
    assert_eq!(status(gw.post(&path, &admin()).json(&hdr)).await, 201);
    let list: Value = json_of(gw.get(&path, &admin())).await;
    let items = list["items"].as_array().unwrap();
    assert_eq!(items.len(), 3, "default exchange + 2: {list}");
    assert!(
        items
            .iter()
            .any(|b| b["exchange"] == "amq.default" && b["routing_key"] == q)
    );
    let paged: Value = json_of(gw.get(&format!("{path}?page_size=2"), &admin())).await;
    assert_eq!(paged["items"].as_array().unwrap().len(), 2);
    let next = paged["next_cursor"].as_str().unwrap().to_owned();
    let rest: Value = json_of(gw.get(&format!("{path}?page_size=2&cursor={next}"), &admin())).await;
    assert_eq!(rest["items"].as_array().unwrap().len(), 1);
    assert_eq!(rest["next_cursor"], Value::Null);

    // Routing follows the bindings.
    gw.post("/v1/exchanges/amq.topic/publish", &admin())
        .json(&json!({"routing_key": "a.b", "body": "via topic"}))
        .send()
        .await
        .unwrap();
    assert_eq!(gw.depth(&q).await, 1);
    let r = gw
        .delete(
            &format!("{path}?exchange=amq.topic&routing_key=a.*"),
            &admin(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    refused(
        gw.delete(
            &format!("{path}?exchange=amq.topic&routing_key=a.*"),
            &admin(),
        ),
        404,
        "not_found",
    )
    .await;
    let args = urlencode(r#"{"x-match":"any","k":"v"}"#);
    let r = gw
        .delete(
            &format!("{path}?exchange=amq.headers&routing_key=&arguments={args}"),
            &admin(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    refused(
        gw.delete(
            &format!("{path}?exchange=amq.headers&arguments=%7Bbad"),
            &admin(),
        ),
        400,
        "bad_request",
    )
    .await;
    refused(
        gw.post(&path, &admin())
            .json(&json!({"exchange": unique("none"), "routing_key": "k"})),
        404,
        "not_found",
    )
    .await;
    refused(
        gw.post(&path, &admin())
            .json(&json!({"exchange": "amq.default", "routing_key": "k"})),
        403,
        "forbidden",
    )
    .await;
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

// ---------- pull ----------

#[tokio::test]
async fn get_takes_or_requeues() {
    let gw = start_gateway(|_| {}).await;
    let q = gw.queue("pull").await;
    for i in 0..3 {
        gw.post("/v1/exchanges/amq.default/publish", &admin())
            .json(&json!({"routing_key": q, "body": i.to_string()}))
            .send()
            .await
            .unwrap();
    }
    let peek: Value = json_of(
        gw.post(&format!("/v1/queues/{q}/get"), &admin())
            .json(&json!({"count": 2, "ack_mode": "requeue"})),
    )
    .await;
    let peeked = peek["messages"].as_array().unwrap();
    assert_eq!(peeked.len(), 2);
    assert_eq!(
        (peeked[0]["body"].clone(), peeked[1]["body"].clone()),
        (json!("0"), json!("1"))
    );
    assert_eq!(gw.depth(&q).await, 3, "requeue leaves them in the queue");
    let taken = gw.take(&q, 10).await;
    assert_eq!(taken.len(), 3);
    assert_eq!(taken[0]["body"], "0");
    assert_eq!(taken[0]["redelivered"], true, "seen once before");
    assert_eq!(taken[2]["redelivered"], false);
    assert_eq!(gw.depth(&q).await, 0);
    for bad in [
        json!({"count": 0}),
        json!({"count": 1001}),
        json!({"ack_mode": "nope"}),
        json!({"count": "2"}),
    ] {
        refused(
            gw.post(&format!("/v1/queues/{q}/get"), &admin()).json(&bad),
            400,
            "bad_request",
        )
        .await;
    }
    refused(
        gw.post(&format!("/v1/queues/{}/get", unique("none")), &admin())
            .json(&json!({})),
        404,
        "not_found",
    )
    .await;
}

// ---------- bad input: a clear problem, nothing changed ----------

#[tokio::test]
async fn bad_input_gets_a_problem_and_changes_nothing() {
    let gw = start_gateway(|_| {}).await;
    let q = gw.queue("bad").await;
    let publish = "/v1/exchanges/amq.default/publish".to_owned();
    let cases: Vec<(&str, reqwest::RequestBuilder, u16, &str)> = vec![
        ("malformed JSON", gw.post(&publish, &admin()).header("content-type", "application/json").body("{\"routing_key\":"), 400, "bad_request"),
        ("wrong type", gw.post(&publish, &admin()).json(&json!({"routing_key": 5, "body": "x"})), 400, "bad_request"),
        ("unknown field", gw.post(&publish, &admin()).json(&json!({"routing_key": q, "body": "x", "colour": "red"})), 400, "bad_request"),
        ("missing body", gw.post(&publish, &admin()).json(&json!({"routing_key": q})), 400, "bad_request"),
        ("invalid base64", gw.post(&publish, &admin()).json(&json!({"routing_key": q, "body": "***", "encoding": "base64"})), 400, "bad_request"),
        ("unknown encoding", gw.post(&publish, &admin()).json(&json!({"routing_key": q, "body": "x", "encoding": "rot13"})), 400, "bad_request"),
        ("user_id", gw.post(&publish, &admin()).json(&json!({"routing_key": q, "body": "x", "properties": {"user_id": "root"}})), 400, "bad_request"),
        ("bad delivery_mode", gw.post(&publish, &admin()).json(&json!({"routing_key": q, "body": "x", "properties": {"delivery_mode": 7}})), 400, "bad_request"),
        ("not JSON content type", gw.post(&publish, &admin()).header("content-type", "text/plain").body("{}"), 415, "bad_request"),
        ("no content type", gw.post(&publish, &admin()).body("{}"), 415, "bad_request"),
        ("routing key over 255", gw.post(&publish, &admin()).json(&json!({"routing_key": "k".repeat(256), "body": "x"})), 400, "bad_request"),
        ("exchange name with /", gw.post("/v1/exchanges/a%2Fb/publish", &admin()).json(&json!({"body": "x"})), 400, "bad_request"),
        ("exchange name over 255", gw.post(&format!("/v1/exchanges/{}/publish", "e".repeat(256)), &admin()).json(&json!({"body": "x"})), 400, "bad_request"),
        ("queue name with /", gw.put("/v1/queues/a%2Fb", &admin()).json(&json!({})), 400, "bad_request"),
        ("queue name over 255", gw.put(&format!("/v1/queues/{}", "q".repeat(256)), &admin()).json(&json!({})), 400, "bad_request"),
        ("empty queue name", gw.put("/v1/queues/", &admin()).json(&json!({})), 404, "not_found"),
        ("page_size 0", gw.get("/v1/queues?page_size=0", &admin()), 400, "bad_request"),
        ("page_size too big", gw.get("/v1/queues?page_size=5000", &admin()), 400, "bad_request"),
        ("page_size not a number", gw.get("/v1/queues?page_size=lots", &admin()), 400, "bad_request"),
        ("bad cursor", gw.get("/v1/queues?cursor=%%%", &admin()), 400, "bad_request"),
        ("unknown route", gw.get("/v1/nothing", &admin()), 404, "not_found"),
        ("method not allowed", gw.http.patch(gw.url(&format!("/v1/queues/{q}"))).bearer_auth(admin()), 405, "bad_request"),
        ("headers not an object", gw.post(&publish, &admin()).json(&json!({"routing_key": q, "body": "x", "properties": {"headers": [1]}})), 400, "bad_request"),
        ("bad table bytes", gw.post(&publish, &admin()).json(&json!({"routing_key": q, "body": "x", "properties": {"headers": {"b": {"$bytes": "@@"}}}})), 400, "bad_request"),
        ("bad expiration", gw.post(&publish, &admin()).json(&json!({"routing_key": q, "body": "x", "properties": {"expiration": "-1"}})), 400, "bad_request"),
        ("bad queue args type", gw.put(&format!("/v1/queues/{}", unique("a")), &admin()).json(&json!({"arguments": {"x-max-length": "ten"}})), 400, "bad_request"),
    ];
    for (what, req, status, code) in cases {
        let resp = req.send().await.unwrap();
        let got = resp.status().as_u16();
        assert_eq!(got, status, "{what}");
        problem(resp, status, code).await;
    }
    assert_eq!(gw.depth(&q).await, 0, "no bad request published anything");
}

#[tokio::test]
async fn oversized_bodies_are_413_and_change_nothing() {
    let gw = start_gateway(|c| c.limits.max_message_bytes = bytesize::ByteSize::kib(4)).await;
    let q = gw.queue("big").await;
    let big = "x".repeat(4 * 1024 + 1);
    let r = gw
        .post("/v1/exchanges/amq.default/publish", &admin())
        .json(&json!({"routing_key": q, "body": big}))
        .send()
        .await
        .unwrap();
    problem(r, 413, "too_large").await;
    let r = gw
        .post(
            &format!("/v1/exchanges/amq.default/messages?routing_key={q}"),
            &admin(),
        )
        .body(big.clone())
        .send()
        .await
        .unwrap();
    problem(r, 413, "too_large").await;
    let r = gw
        .post("/v1/exchanges/amq.default/publish-batch", &admin())
        .json(&json!({"messages": [{"routing_key": q, "body": big}, {"routing_key": q, "body": "small"}]}))
        .send()
        .await
        .unwrap();
    let results = r.json::<Value>().await.unwrap()["results"].clone();
    assert_eq!(results[0]["error"]["code"], "too_large");
    assert_eq!(results[1], json!({"routed": true}));
    let exactly = "y".repeat(4 * 1024);
    let r = gw
        .post("/v1/exchanges/amq.default/publish", &admin())
        .json(&json!({"routing_key": q, "body": exactly}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "the limit itself is allowed");
    assert_eq!(gw.depth(&q).await, 2);
}

// ---------- limits ----------

#[tokio::test]
async fn publishes_over_the_rate_get_429_with_retry_after() {
    let gw = start_gateway(|c| {
        c.limits.publish_rate = 1;
        c.limits.publish_burst = 3;
    })
    .await;
    let q = gw.queue("rate").await;
    // One client, one keep-alive connection: one connection bucket.
    let mut statuses = Vec::new();
    let mut retry_after = None;
    for i in 0..5 {
        let r = gw
            .post("/v1/exchanges/amq.default/publish", &admin())
            .json(&json!({"routing_key": q, "body": i.to_string()}))
            .send()
            .await
            .unwrap();
        statuses.push(r.status().as_u16());
        if r.status() == 429 {
            retry_after = r
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_owned());
            problem(r, 429, "rate_limited").await;
        }
    }
    assert_eq!(statuses, [200, 200, 200, 429, 429]);
    assert_eq!(retry_after.as_deref(), Some("1"));
    assert_eq!(
        gw.depth(&q).await,
        3,
        "throttled publishes were not accepted"
    );
}

/// Above the engine's memory high watermark publishes get 503 `overloaded` with Retry-After
/// (not 429: it is not this client's rate), and are accepted again once consumers drain it.
#[tokio::test]
async fn publishes_above_the_memory_watermark_get_503_until_drained() {
    let gw = start_gateway(common::low_watermark).await;
    let q = gw.queue("full").await;
    let publish = |body: String| {
        gw.post("/v1/exchanges/amq.default/publish", &admin())
            .json(&json!({"routing_key": q, "body": body}))
            .send()
    };
    let r = publish("x".repeat(100 * 1024)).await.unwrap();
    assert_eq!(r.status(), 200, "below the watermark when it was sent");
    let r = publish("small".into()).await.unwrap();
    assert_eq!(
        r.headers().get("retry-after").and_then(|v| v.to_str().ok()),
        Some("1")
    );
    problem(r, 503, "overloaded").await;
    assert_eq!(
        gw.depth(&q).await,
        1,
        "the refused publish was not accepted"
    );
    assert_eq!(gw.metric("gateway_publish_blocked").await, Some(1.0));
    assert_eq!(gw.take(&q, 1).await.len(), 1);
    let r = publish("small".into()).await.unwrap();
    assert_eq!(r.status(), 200, "drained: accepted again");
}

#[tokio::test]
async fn the_subject_bucket_spans_connections() {
    let gw = start_gateway(|c| c.limits.subject_publish_rate = 2).await;
    let q = gw.queue("subj").await;
    let t = token("busy", "gateway.write:amq.default/#");
    let mut statuses = Vec::new();
    for i in 0..3 {
        // A fresh client per request: a new connection each time.
        let client = reqwest::Client::new();
        let r = client
            .post(gw.url("/v1/exchanges/amq.default/publish"))
            .bearer_auth(&t)
            .json(&json!({"routing_key": q, "body": i.to_string()}))
            .send()
            .await
            .unwrap();
        statuses.push(r.status().as_u16());
    }
    assert_eq!(statuses, [200, 200, 429]);
}

#[tokio::test]
async fn slow_headers_are_cut_off() {
    let gw = start_gateway(|c| c.http.header_read_timeout = Duration::from_millis(300)).await;
    let addr = gw.gateway.addrs().http;
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    // Never finish the headers: the gateway must close the connection on its own.
    let mut buf = Vec::new();
    let read = tokio::time::timeout(common::WAIT, slow.read_to_end(&mut buf)).await;
    assert!(
        read.is_ok(),
        "connection still open after the header read timeout"
    );
    let text = String::from_utf8_lossy(&buf);
    assert!(buf.is_empty() || text.starts_with("HTTP/1.1 408"), "{text}");
    // Other clients are unaffected.
    let ok = gw.http.get(gw.url("/healthz")).send().await.unwrap();
    assert_eq!(ok.status(), 200);
}

// ---------- metrics ----------

#[tokio::test]
async fn metrics_for_monitoring_tokens_and_on_the_metrics_listener() {
    let gw = start_gateway(|_| {}).await;
    let q = gw.queue("metrics").await;
    gw.post("/v1/exchanges/amq.default/publish", &admin())
        .json(&json!({"routing_key": q, "body": "m"}))
        .send()
        .await
        .unwrap();
    gw.post("/v1/exchanges/amq.default/publish", &token("nobody", ""))
        .json(&json!({"routing_key": q, "body": "m"}))
        .send()
        .await
        .unwrap();
    let text = gw
        .get("/metrics", &token("prom", "gateway.tag:monitoring"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for needle in [
        "gateway_messages_in_total{protocol=\"rest\"} 1",
        "gateway_publish_latency_seconds_bucket{protocol=\"rest\"",
        "gateway_refusals_total{protocol=\"rest\",reason=\"forbidden\"} 1",
        "gateway_queued_messages 1",
        "gateway_connections_total{protocol=\"http\"}",
    ] {
        assert!(text.contains(needle), "missing {needle} in\n{text}");
    }
    refused(gw.http.get(gw.url("/metrics")), 401, "unauthorized").await;
    refused(
        gw.get("/metrics", &token("x", "gateway.read:amq.topic/#")),
        403,
        "forbidden",
    )
    .await;
    let open = gw
        .http
        .get(format!("{}/metrics", gw.metrics))
        .send()
        .await
        .unwrap();
    assert_eq!(open.status(), 200);
    assert!(
        open.text()
            .await
            .unwrap()
            .contains("gateway_messages_in_total")
    );
}

#[tokio::test]
async fn docs_and_openapi_are_served_offline() {
    let gw = start_gateway(|_| {}).await;
    let spec: Value = gw
        .http
        .get(gw.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(spec["paths"]["/v1/exchanges/{exchange}/publish"].is_object());
    let docs = gw.http.get(gw.url("/docs/")).send().await.unwrap();
    assert_eq!(docs.status(), 200);
    let html = docs.text().await.unwrap();
    assert!(html.contains("swagger-ui"), "{html}");
    let bundle = gw
        .http
        .get(gw.url("/docs/swagger-ui-bundle.js"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        bundle.status(),
        200,
        "Swagger UI assets come from the binary"
    );
}
