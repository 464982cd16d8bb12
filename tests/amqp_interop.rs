//! The AMQP listener with Python clients nobody here wrote: pika 1.3 (RabbitMQ's tutorial one
//! verbatim but for the connection parameters; a prefetch-10 consumer under load) and kombu 5
//! (its introduction's direct request/reply, fanout broadcast and topic publish/subscribe;
//! persistent vs transient delivery across a gateway restart). `.ci/run` installs both; a
//! missing one fails the test with a message saying so.

mod common;

use std::process::Stdio;

use common::child::ChildGateway;
use common::{TestGateway, WAIT, admin, start_gateway, token, unique};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

const INTEROP: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/interop");

fn python() -> Command {
    let found = std::process::Command::new("python3")
        .args(["-c", "import pika, kombu"])
        .status()
        .expect("python3 runs");
    assert!(
        found.success(),
        "pika and kombu are not installed (bash .ci/run installs them)"
    );
    let mut cmd = Command::new("python3");
    cmd.arg("-u").current_dir(INTEROP).kill_on_drop(true);
    cmd
}

fn env_for(cmd: &mut Command, port: u16, token: &str) {
    cmd.env("AMQP_PORT", port.to_string())
        .env("AMQP_TOKEN", token);
}

fn port(gw: &TestGateway) -> u16 {
    gw.gateway.addrs().amqp.expect("the AMQP listener").port()
}

/// Runs a script to its end (within 40 s) and returns its last stdout line as JSON.
async fn run_json(mut cmd: Command) -> Value {
    let out = tokio::time::timeout(std::time::Duration::from_secs(40), cmd.output())
        .await
        .expect("the script ends in time")
        .expect("the script runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "script failed: {}\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let last = stdout.lines().last().expect("a result line");
    serde_json::from_str(last).expect("a JSON result line")
}

#[tokio::test]
async fn pika_tutorial_one_runs_unchanged() {
    let gw = start_gateway(|_| {}).await;
    let t = token(
        "tutorial",
        "gateway.configure:hello gateway.write:amq.default/hello gateway.consume:hello",
    );
    let mut receive = python();
    receive.arg("pika_receive.py").stdout(Stdio::piped());
    env_for(&mut receive, port(&gw), &t);
    let mut receiver = receive.spawn().expect("receive.py starts");
    let mut lines = BufReader::new(receiver.stdout.take().unwrap()).lines();
    async fn line(lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>) -> String {
        tokio::time::timeout(WAIT, lines.next_line())
            .await
            .expect("a line in time")
            .expect("stdout")
            .expect("receive.py still runs")
    }
    assert_eq!(
        line(&mut lines).await,
        " [*] Waiting for messages. To exit press CTRL+C"
    );
    let mut send = python();
    send.arg("pika_send.py");
    env_for(&mut send, port(&gw), &t);
    let sent = send.output().await.unwrap();
    assert!(
        sent.status.success(),
        "{}",
        String::from_utf8_lossy(&sent.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&sent.stdout),
        " [x] Sent 'Hello World!'\n"
    );
    assert_eq!(line(&mut lines).await, " [x] Received b'Hello World!'");
    receiver.kill().await.unwrap();
}

#[tokio::test]
async fn pika_prefetch_10_under_load_holds_at_most_10_and_loses_nothing() {
    let gw = start_gateway(|c| c.limits.publish_rate = 100_000).await;
    let q = unique("pika-prefetch");
    // Declared by REST; pika redeclares it with the same arguments.
    let r = gw
        .put(&format!("/v1/queues/{q}"), &admin())
        .json(&json!({"durable": true, "arguments": {"x-max-length": 100000}}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    let mut cmd = python();
    cmd.args(["pika_prefetch.py", &q, "2000"]);
    env_for(&mut cmd, port(&gw), &admin());
    let result = run_json(cmd).await;
    assert_eq!(result["received"], 2000, "{result}");
    assert_eq!(result["in_order"], true, "{result}");
    // A full queue faced the consumer: it held exactly its prefetch, never more.
    assert_eq!(result["max_unacked"], 10, "{result}");
}

async fn kombu(gw: &TestGateway, scenario: &str) -> Value {
    let mut cmd = python();
    let url = format!("amqp://any:{}@127.0.0.1:{}//", admin(), port(gw));
    cmd.args(["kombu_intro.py", &url, scenario]);
    run_json(cmd).await
}

#[tokio::test]
async fn kombu_request_reply_over_a_direct_exchange() {
    let gw = start_gateway(|_| {}).await;
    let v = kombu(&gw, "direct").await;
    assert_eq!(v["answers"], json!([[{"result": 42}, "req-1"]]));
}

#[tokio::test]
async fn kombu_broadcast_over_fanout() {
    let gw = start_gateway(|_| {}).await;
    let v = kombu(&gw, "fanout").await;
    assert_eq!(v["got"], json!(["to all", "to all"]));
}

#[tokio::test]
async fn kombu_publish_subscribe_over_topic() {
    let gw = start_gateway(|_| {}).await;
    let v = kombu(&gw, "topic").await;
    assert_eq!(v["got"], json!(["usa", "usa weather"]));
}

#[tokio::test]
async fn kombu_persistent_messages_survive_a_restart_and_transient_ones_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let q = unique("kombu-durable");
    let mut gw = ChildGateway::start(dir.path()).await;
    let url = |gw: &ChildGateway| {
        format!(
            "amqp://any:{}@{}//",
            admin(),
            gw.amqp.expect("the AMQP listener")
        )
    };
    let mut cmd = python();
    cmd.args(["kombu_intro.py", &url(&gw), "persist-publish", &q]);
    assert_eq!(run_json(cmd).await["published"], 2);
    gw.signal("TERM").await;
    drop(gw);
    let gw = ChildGateway::start(dir.path()).await;
    let mut cmd = python();
    cmd.args(["kombu_intro.py", &url(&gw), "persist-consume", &q]);
    assert_eq!(run_json(cmd).await["got"], json!(["persistent"]));
}
