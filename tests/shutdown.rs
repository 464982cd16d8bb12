//! Graceful shutdown (DESIGN.md §5, §7; issue "Reliability"): SIGTERM to a gateway under
//! confirmed publish load on every protocol. It stops accepting, finishes or refuses every
//! publish in flight with a clear answer (REST 200 or 503, MQTT PUBACK or the close, `/ws`
//! `published` or the close), tells each client it is going — MQTT 5 DISCONNECT 0x8B, `/ws` close
//! 1001, AMQP `connection.close` 320, SSE end of stream — flushes the store and exits 0 within
//! `shutdown_timeout`; after a restart every publish it answered is there, exactly once.

mod common;

use std::time::{Duration, Instant};

use common::child::ChildGateway;
use common::load::Load;
use common::mqtt_bytes::connect;
use common::mqtt_wire::RawWire;
use common::ws::Ws;
use common::{WAIT, admin, unique};

const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(3);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_answers_every_publish_tells_every_client_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let queue = unique("shutdown");
    let env = [("GATEWAY_SHUTDOWN_TIMEOUT", "3s")];
    let mut gw = ChildGateway::start_with(dir.path(), &env).await;

    // Idle clients of every protocol, to hear how the gateway says goodbye.
    let mut device = RawWire::tcp(gw.mqtt).await;
    device
        .send_raw(&connect(b"MQTT", 5, 0, "listener", Some(&admin())))
        .await;
    assert_eq!(device.packet().await.expect("CONNACK").0, 0x20);
    let url = format!("ws://{}/ws", gw.http);
    let req = common::ws::upgrade(&url, Some(&admin()), Some(common::ws::SUBPROTOCOL));
    let mut browser = Ws(tokio_tungstenite::connect_async(req).await.unwrap().0);
    let amqp_url = format!("amqp://any:{}@{}/%2f", admin(), gw.amqp.unwrap());
    let app = lapin::Connection::connect(&amqp_url, lapin::ConnectionProperties::default())
        .await
        .expect("AMQP connection");
    let mut app_events = common::amqp::events(&app);
    let sse = reqwest::Client::new()
        .get(gw.url("/v1/sse?exchange=amq.topic&binding_key=nothing"))
        .bearer_auth(admin())
        .send()
        .await
        .unwrap();
    assert_eq!(sse.status(), 200);
    let mut sse = sse;

    let mut load = Load::start(&gw, &queue, 2).await;
    load.until_answered(1_000).await;
    load.stop();
    let asked = Instant::now();
    let status = gw.signal("TERM").await;
    let took = asked.elapsed();
    assert!(status.success(), "exit 0 after SIGTERM: {status:?}");
    assert!(
        took < SHUTDOWN_TIMEOUT + Duration::from_secs(1),
        "stopped within shutdown_timeout: {took:?}"
    );
    load.finished().await;

    let (first, reason) = device.packet().await.expect("DISCONNECT");
    assert_eq!(
        (first, reason[0]),
        (0xE0, 0x8B),
        "MQTT 5: server shutting down"
    );
    assert_eq!(browser.closed_with().await, 1001, "/ws: going away");
    let error = common::amqp::next_error(&mut app_events).await;
    assert_eq!(common::amqp::code(&error), Some(320), "AMQP: {error}");
    let ended =
        tokio::time::timeout(WAIT, async { while let Ok(Some(_)) = sse.chunk().await {} }).await;
    assert!(ended.is_ok(), "the SSE stream ends");
    drop(gw);

    // Nothing answered as accepted is lost; the shutdown needed no recovery of a torn journal.
    let gw = ChildGateway::start(dir.path()).await;
    assert!(
        !gw.startup.iter().any(|l| l.contains("torn")),
        "a clean store:\n{}",
        gw.startup.join("\n")
    );
    let (sent, answered, found) = load.check_recovered(&gw, &queue).await;
    eprintln!(
        "SIGTERM: {sent} sent, {answered} answered, {} recovered, stopped in {took:?}",
        found.len()
    );
}
