//! The operator's connections API (`/v1/connections`) over real sockets: every protocol's
//! connections listed with what they are, filtered and paged; who may read and who may close;
//! and a close each kind of client hears — MQTT 5 DISCONNECT 0x98, MQTT 3.1.1 the socket
//! closing, WebSocket 4010, an SSE `close` event 4010.

mod common;

use common::mqtt_bytes::{connect, subscribe_packet};
use common::mqtt_wire::{End, RawWire, Transport};
use common::sse::Sse;
use common::ws::Ws;
use common::{TestGateway, admin, json_of, refused, start_gateway, status, token, unique};
use serde_json::{Value, json};

/// An MQTT client over `transport` at `level` (4 = 3.1.1, 5) with one QoS 1 subscription.
async fn mqtt_client(gw: &TestGateway, transport: Transport, level: u8, client: &str) -> RawWire {
    let mut wire = RawWire::open(gw, transport).await;
    let t = token("mia", "gateway.read:amq.topic/#");
    wire.send_raw(&connect(b"MQTT", level, 0, client, Some(&t)))
        .await;
    let (first, body) = wire.packet().await.expect("CONNACK");
    assert_eq!((first, body[1]), (0x20, 0), "connected");
    wire.send_raw(&subscribe_packet(1, "sensors/+/temp", 1, level == 5, None))
        .await;
    let (first, _) = wire.packet().await.expect("SUBACK");
    assert_eq!(first, 0x90);
    wire
}

async fn connections(gw: &TestGateway, query: &str) -> Value {
    json_of(gw.get(&format!("/v1/connections{query}"), &admin())).await
}

/// The listed connection whose `key` is `value`.
async fn find(gw: &TestGateway, key: &str, value: &str) -> Value {
    let all = connections(gw, "").await;
    all["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c[key] == value)
        .unwrap_or_else(|| panic!("no connection with {key} = {value}: {all}"))
        .clone()
}

async fn connections_are_listed_filtered_and_paged() {
    let gw = start_gateway(|_| {}).await;
    let client = unique("dev");
    let _mqtt = mqtt_client(&gw, Transport::Tcp, 5, &client).await;
    let _mqtt_ws = mqtt_client(&gw, Transport::Ws, 4, &unique("dev-ws")).await;
    let mut ws = Ws::connect(&gw, Some(&token("noa", "gateway.read:amq.topic/a.#"))).await;
    let reply = ws
        .call(json!({"op": "subscribe", "id": 1, "exchange": "amq.topic", "binding_key": "a.#", "ack": "manual", "prefetch": 5}))
        .await;
    assert_eq!(reply["op"], "subscribed", "{reply}");
    let (_sse, _) = Sse::open(
        &gw,
        "exchange=amq.topic&binding_key=b.%23",
        Some(&token("oli", "gateway.read:amq.topic/b.#")),
        None,
    )
    .await;

    let mqtt = find(&gw, "client_id", &client).await;
    assert_eq!(
        (
            mqtt["protocol"].as_str(),
            mqtt["transport"].as_str(),
            mqtt["subject"].as_str()
        ),
        (Some("mqtt"), Some("tcp"), Some("mia"))
    );
    assert_eq!(mqtt["subscriptions"][0]["pattern"], "sensors/+/temp");
    assert_eq!(mqtt["subscriptions"][0]["ack"], "qos1");
    assert_eq!(mqtt["subscriptions"][0]["exchange"], "amq.topic");
    assert_eq!(mqtt["buffer"]["messages"], 0);
    assert!(mqtt["buffer"]["max_messages"].as_u64().unwrap() > 0);
    assert!(mqtt["expires_at"].as_u64().is_some());
    assert!(mqtt["peer"].as_str().unwrap().starts_with("127.0.0.1:"));
    let ws_view = find(&gw, "subject", "noa").await;
    assert_eq!(
        (ws_view["protocol"].as_str(), ws_view["transport"].as_str()),
        (Some("ws"), Some("websocket"))
    );
    assert_eq!(ws_view["subscriptions"][0]["queue"], reply["queue"]);
    assert_eq!(
        (
            ws_view["subscriptions"][0]["ack"].as_str(),
            ws_view["subscriptions"][0]["prefetch"].as_u64()
        ),
        (Some("manual"), Some(5))
    );
    let sse_view = find(&gw, "subject", "oli").await;
    assert_eq!(
        (
            sse_view["protocol"].as_str(),
            sse_view["transport"].as_str()
        ),
        (Some("sse"), Some("http"))
    );
    assert_eq!(sse_view["subscriptions"][0]["pattern"], "b.#");
    let one = json_of(gw.get(&format!("/v1/connections/{}", sse_view["id"]), &admin())).await;
    assert_eq!(one["subject"], "oli");

    filters_and_pages(&gw, &client).await;
}

/// Filters, and pages that add up to the whole list (four connections) without repeats.
async fn filters_and_pages(gw: &TestGateway, client: &str) {
    assert_eq!(
        connections(gw, "?protocol=mqtt").await["items"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert_eq!(
        connections(gw, "?protocol=ws").await["items"][0]["subject"],
        "noa"
    );
    assert_eq!(
        connections(gw, &format!("?client_id={client}")).await["items"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(connections(gw, "?subject=nobody").await["items"], json!([]));
    let mut ids = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let q = match &cursor {
            Some(c) => format!("?page_size=1&cursor={c}"),
            None => "?page_size=1".into(),
        };
        let page = connections(gw, &q).await;
        ids.extend(
            page["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["id"].as_u64().unwrap()),
        );
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(ids.len(), 4, "{ids:?}");
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "in id order, no repeats: {ids:?}"
    );
    refused(
        gw.get("/v1/connections?page_size=0", &admin()),
        400,
        "bad_request",
    )
    .await;
    refused(
        gw.get("/v1/connections?cursor=nonsense", &admin()),
        400,
        "bad_request",
    )
    .await;
}

async fn reading_needs_monitoring_and_closing_needs_administrator() {
    let gw = start_gateway(|_| {}).await;
    let mut ws = Ws::connect(&gw, Some(&token("pia", "gateway.read:amq.topic/#"))).await;
    // Answered: the session (and its registration) exists.
    assert_eq!(ws.call(json!({"op": "ping", "id": 1})).await["op"], "pong");
    let id = find(&gw, "subject", "pia").await["id"].as_u64().unwrap();
    let monitor = token("mon", "gateway.tag:monitoring");
    let user = token("usr", "gateway.read:amq.topic/#");
    let no_token = gw.http.get(gw.url("/v1/connections"));
    refused(no_token, 401, "unauthorized").await;
    refused(gw.get("/v1/connections", &user), 403, "forbidden").await;
    refused(
        gw.get(&format!("/v1/connections/{id}"), &user),
        403,
        "forbidden",
    )
    .await;
    assert_eq!(status(gw.get("/v1/connections", &monitor)).await, 200);
    assert_eq!(
        status(gw.get(&format!("/v1/connections/{id}"), &monitor)).await,
        200
    );
    refused(
        gw.delete(&format!("/v1/connections/{id}"), &monitor),
        403,
        "forbidden",
    )
    .await;
    refused(gw.get("/v1/connections/999999", &admin()), 404, "not_found").await;
    refused(
        gw.delete("/v1/connections/999999", &admin()),
        404,
        "not_found",
    )
    .await;
    refused(gw.get("/v1/connections/x", &admin()), 400, "bad_request").await;
    drop(ws);
}

async fn an_administrator_closes_each_kind_of_client_and_it_hears_why() {
    let gw = start_gateway(|_| {}).await;
    let close = |id: u64| {
        let gw = &gw;
        async move {
            assert_eq!(
                status(gw.delete(&format!("/v1/connections/{id}"), &admin())).await,
                204
            )
        }
    };
    for transport in [Transport::Tcp, Transport::Ws] {
        let v5 = unique("kick5");
        let mut wire = mqtt_client(&gw, transport, 5, &v5).await;
        close(find(&gw, "client_id", &v5).await["id"].as_u64().unwrap()).await;
        let (first, body) = wire.packet().await.expect("DISCONNECT");
        assert_eq!(
            (first, body[0]),
            (0xE0, 0x98),
            "{transport:?}: DISCONNECT administrative action"
        );

        let v3 = unique("kick3");
        let mut wire = mqtt_client(&gw, transport, 4, &v3).await;
        close(find(&gw, "client_id", &v3).await["id"].as_u64().unwrap()).await;
        assert!(
            matches!(wire.packet().await, Err(End::Clean | End::Error(_))),
            "{transport:?}: 3.1.1 closed"
        );
    }

    let mut ws = Ws::connect(&gw, Some(&token("quin", "gateway.read:amq.topic/#"))).await;
    assert_eq!(ws.call(json!({"op": "ping", "id": 1})).await["op"], "pong");
    close(find(&gw, "subject", "quin").await["id"].as_u64().unwrap()).await;
    assert_eq!(ws.closed_with().await, 4010);

    let (mut sse, _) = Sse::open(
        &gw,
        "exchange=amq.topic&binding_key=x",
        Some(&token("ray", "gateway.read:amq.topic/#")),
        None,
    )
    .await;
    close(find(&gw, "subject", "ray").await["id"].as_u64().unwrap()).await;
    let e = sse.next().await.expect("a close event");
    assert_eq!(
        (e.event.as_str(), e.json()["code"].as_u64()),
        ("close", Some(4010))
    );
    assert!(sse.next().await.is_none());

    common::eventually("every closed connection gone from the list", || async {
        connections(&gw, "").await["items"] == json!([])
    })
    .await;
}

async fn the_overview_counts_connections_messages_and_rates() {
    let gw = start_gateway(|_| {}).await;
    let mut ws = Ws::connect(&gw, Some(&token("sam", "gateway.read:amq.topic/#"))).await;
    assert_eq!(ws.call(json!({"op": "ping", "id": 1})).await["op"], "pong");
    let queue = gw.queue("overview").await;
    for i in 0..3 {
        gw.publish("amq.default", &queue, json!(i)).await;
    }
    assert_eq!(gw.take(&queue, 3).await.len(), 3);
    refused(
        gw.get("/v1/overview", &token("usr", "gateway.read:amq.topic/#")),
        403,
        "forbidden",
    )
    .await;
    let o = json_of(gw.get("/v1/overview", &token("mon", "gateway.tag:monitoring"))).await;
    assert_eq!(o["engine"], "embedded");
    assert_eq!(o["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(
        o["connections"],
        json!({"amqp": 0, "mqtt": 0, "sse": 0, "ws": 1})
    );
    assert!(o["listeners"]["amqp"].is_string(), "{o}");
    assert!(o["totals"]["published"].as_f64().unwrap() >= 3.0, "{o}");
    assert!(o["totals"]["delivered"].as_f64().unwrap() >= 3.0, "{o}");
    assert!(
        o["rates"]["published"].as_f64().unwrap() > 0.0,
        "published within the window: {o}"
    );
    assert!(o["memory"]["held_bytes"].as_u64().is_some(), "{o}");
    assert!(o["totals"]["acked"].as_f64().is_some(), "{o}");
    assert_eq!(o["memory"]["publish_blocked"], false);
    assert!(o["listeners"]["mqtt"].as_str().is_some());
}

/// The next JSON text frame of the feed, or the close code.
async fn feed_frame(
    ws: &mut tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
) -> Result<Value, u16> {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    loop {
        match tokio::time::timeout(common::WAIT, ws.next())
            .await
            .expect("a frame in time")
        {
            Some(Ok(Message::Text(t))) => return Ok(serde_json::from_str(&t).unwrap()),
            Some(Ok(Message::Close(frame))) => {
                return Err(frame.map_or(1005, |f| u16::from(f.code)));
            }
            Some(Ok(_)) => continue,
            other => panic!("{other:?}"),
        }
    }
}

async fn feed(
    gw: &TestGateway,
    bearer: Option<&str>,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    let req = common::ws::upgrade(&common::ws::url(gw, "/v1/feed"), bearer, None);
    tokio_tungstenite::connect_async(req)
        .await
        .expect("upgrade")
        .0
}

async fn the_feed_sends_snapshots_to_monitoring_tokens_only() {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    let gw = start_gateway(|_| {}).await;
    let queue = gw.queue("feed").await;
    for i in 0..4 {
        gw.publish("amq.default", &queue, json!(i)).await;
    }
    // A delivery acknowledged by a client counts in `acked`.
    let amqp = common::amqp::connect(&gw, &admin()).await;
    let ch = common::amqp::channel(&amqp).await;
    let got = common::amqp::get(&ch, &queue, false)
        .await
        .expect("a message");
    got.delivery
        .ack(lapin::options::BasicAckOptions::default())
        .await
        .unwrap();
    // One more taken and held unacked, two published: the connection's own counts.
    let held = common::amqp::get(&ch, &queue, false)
        .await
        .expect("a message");
    ch.confirm_select(lapin::options::ConfirmSelectOptions::default())
        .await
        .unwrap();
    for _ in 0..2 {
        common::amqp::publish_confirmed(&ch, "amq.topic", "feed.x", b"p").await;
    }
    // By header, then by a first `auth` frame, as /ws.
    let mut by_header = feed(&gw, Some(&token("mon", "gateway.tag:monitoring"))).await;
    let s = feed_frame(&mut by_header).await.expect("a snapshot");
    assert_eq!(s["op"], "snapshot");
    let row = s["queues"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["name"] == queue.as_str())
        .unwrap_or_else(|| panic!("{s}"))
        .clone();
    assert_eq!(row["messages"], 2, "{row}");
    assert!(
        row["in_rate"].is_number() && row["out_rate"].is_number(),
        "{row}"
    );
    // The queue's totals, which the rates come from, over REST too.
    let q = json_of(gw.get(&format!("/v1/queues/{queue}"), &admin())).await;
    assert_eq!(
        (&q["published_total"], &q["delivered_total"]),
        (&json!(4), &json!(2)),
        "{q}"
    );
    assert!(
        s["overview"]["totals"]["acked"].as_f64().unwrap() >= 1.0,
        "{s}"
    );
    let amqp_row = s["connections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["protocol"] == "amqp")
        .unwrap_or_else(|| panic!("{s}"));
    assert_eq!(
        (&amqp_row["published"], &amqp_row["in_flight"]),
        (&json!(2), &json!(1)),
        "{amqp_row}"
    );
    assert!(amqp_row["publish_rate"].is_number(), "{amqp_row}");
    drop(held);
    let mut by_frame = feed(&gw, None).await;
    by_frame
        .send(Message::text(
            json!({"op": "auth", "token": admin()}).to_string(),
        ))
        .await
        .unwrap();
    assert_eq!(
        feed_frame(&mut by_frame).await.expect("a snapshot")["op"],
        "snapshot"
    );
    // Not monitoring: 1008; no token at all: 4001.
    let mut user = feed(&gw, Some(&token("usr", "gateway.read:amq.topic/#"))).await;
    assert_eq!(feed_frame(&mut user).await, Err(1008));
    let mut nobody = feed(&gw, None).await;
    nobody.send(Message::text("{}")).await.unwrap();
    assert_eq!(feed_frame(&mut nobody).await, Err(4001));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feed_snapshots() {
    the_feed_sends_snapshots_to_monitoring_tokens_only().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overview() {
    the_overview_counts_connections_messages_and_rates().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_listed() {
    connections_are_listed_filtered_and_paged().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permissions() {
    reading_needs_monitoring_and_closing_needs_administrator().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn administrator_closes() {
    an_administrator_closes_each_kind_of_client_and_it_hears_why().await
}
