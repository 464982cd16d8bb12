//! Interop with MQTT clients nobody here wrote: `mosquitto_sub` / `mosquitto_pub` (Debian
//! `mosquitto-clients`) and Python `paho-mqtt` 2.x, both protocol versions. `.ci/run` installs
//! them; a missing one fails the test with a message saying so.

mod common;

use std::process::{Command, Stdio};

use amqp_gateway::protocol::mqtt::topic::session_queue;
use common::{TestGateway, WAIT, admin, start_gateway, token, unique};

fn tool(name: &str) -> String {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {name}"))
        .output()
        .unwrap();
    assert!(
        found.status.success(),
        "{name} is not installed (bash .ci/run installs it)"
    );
    name.to_owned()
}

/// Waits until the session of (subject, client id) consumes its QoS 1 queue: subscribed.
async fn subscribed(gw: &TestGateway, subject: &str, client: &str) {
    let queue = session_queue(subject, client, "qos1");
    common::eventually(&format!("{client} subscribed"), || async {
        let r = gw
            .get(&format!("/v1/queues/{queue}"), &admin())
            .send()
            .await
            .unwrap();
        if r.status() != 200 {
            return false;
        }
        let v: serde_json::Value = r.json().await.unwrap();
        let bindings: serde_json::Value = gw
            .get(&format!("/v1/queues/{queue}/bindings"), &admin())
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v["consumers"] == 1 && bindings["items"].as_array().is_some_and(|b| b.len() > 1)
    })
    .await;
}

async fn mosquitto_roundtrip(version: &str) {
    let gw = start_gateway(|_| {}).await;
    let port = gw.gateway.addrs().mqtt.port().to_string();
    let t = token(
        "mosq",
        "gateway.read:amq.topic/interop.# gateway.write:amq.topic/interop.#",
    );
    let client = unique("mosq-sub");
    let sub = mosquitto("mosquitto_sub", version, &port, &t)
        .args(["-i", &client])
        .args(["-t", "interop/#", "-q", "1", "-C", "2", "-W", "10", "-v"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    subscribed(&gw, "mosq", &client).await;
    for (topic, msg) in [("interop/a", "hello"), ("interop/b.c/d", "dotted")] {
        let status = mosquitto("mosquitto_pub", version, &port, &t)
            .args(["-t", topic, "-m", msg, "-q", "1"])
            .status()
            .unwrap();
        assert!(status.success(), "mosquitto_pub {version}");
    }
    let out = tokio::task::spawn_blocking(move || sub.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(
        out.status.success(),
        "mosquitto_sub: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "interop/a hello\ninterop/b.c/d dotted\n"
    );

    // A bad token: mosquitto_pub fails to connect.
    let refused = mosquitto("mosquitto_pub", version, &port, "bad")
        .args(["-t", "interop/x", "-m", "x", "-q", "1"])
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(!refused.status.success());
}

async fn paho_roundtrip(version: &str) {
    let gw = start_gateway(|_| {}).await;
    let port = gw.gateway.addrs().mqtt.port().to_string();
    let t = token(
        "paho",
        "gateway.read:amq.topic/paho.# gateway.write:amq.topic/paho.#",
    );
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/interop/paho_roundtrip.py"
    );
    let child = Command::new(tool("python3"))
        .args([script, "127.0.0.1", &port, &t, version])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = tokio::time::timeout(
        WAIT * 4,
        tokio::task::spawn_blocking(move || child.wait_with_output()),
    )
    .await
    .expect("paho script finished")
    .unwrap()
    .unwrap();
    assert!(
        out.status.success(),
        "paho {version}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What a `mosquitto_sub` printed, once it exited successfully.
async fn succeeded(child: std::process::Child) -> String {
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(
        out.status.success(),
        "mosquitto_sub: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `mosquitto_sub` or `mosquitto_pub` with the connection arguments every call here uses.
fn mosquitto(name: &str, version: &str, port: &str, token: &str) -> Command {
    let mut c = Command::new(tool(name));
    c.args([
        "-V",
        version,
        "-h",
        "127.0.0.1",
        "-p",
        port,
        "-u",
        "u",
        "-P",
        token,
    ]);
    c
}

/// A persistent session with `mosquitto_sub -c` at QoS 2: a message published while the
/// subscriber is away is delivered when it comes back with the same client id.
async fn mosquitto_persistent_session(version: &str) {
    let gw = start_gateway(|_| {}).await;
    let port = gw.gateway.addrs().mqtt.port().to_string();
    let t = token(
        "mosq",
        "gateway.read:amq.topic/persist.# gateway.write:amq.topic/persist.#",
    );
    let client = unique("mosq-persist");
    let subscriber = || {
        let mut c = mosquitto("mosquitto_sub", version, &port, &t);
        c.args([
            "-c",
            "-i",
            &client,
            "-t",
            "persist/#",
            "-q",
            "2",
            "-C",
            "1",
            "-W",
            "10",
            "-v",
        ]);
        if version == "mqttv5" {
            c.args(["-x", "600"]);
        }
        c.stdout(Stdio::piped()).stderr(Stdio::piped());
        c
    };
    let publish = |msg: &str| {
        let status = mosquitto("mosquitto_pub", version, &port, &t)
            .args(["-t", "persist/x", "-m", msg, "-q", "2"])
            .status()
            .unwrap();
        assert!(status.success(), "mosquitto_pub {version}");
    };
    let first = subscriber().spawn().unwrap();
    subscribed(&gw, "mosq", &client).await;
    publish("first");
    assert_eq!(succeeded(first).await, "persist/x first\n");
    publish("while away");
    let again = subscriber().spawn().unwrap();
    assert_eq!(succeeded(again).await, "persist/x while away\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_persistent_session_mqtt_3_1_1() {
    mosquitto_persistent_session("mqttv311").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_persistent_session_mqtt_5() {
    mosquitto_persistent_session("mqttv5").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_clients_mqtt_3_1_1() {
    mosquitto_roundtrip("mqttv311").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_clients_mqtt_5() {
    mosquitto_roundtrip("mqttv5").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paho_mqtt_3_1_1() {
    paho_roundtrip("3.1.1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paho_mqtt_5() {
    paho_roundtrip("5").await;
}

/// The size of the PUBLISH that delivers "live" (MQTT 5 §3.3): fixed header 1 + remaining
/// length 1; topic 2 + 13; packet id 2; properties length 1 + properties; payload. Properties:
/// each user property 1 + 2 + name + 2 + value, content type 1 + 2 + 10, payload format
/// indicator 2, response topic 1 + 2 + 14, correlation data 1 + 2 + 2, message expiry 5.
fn live_packet_size() -> usize {
    let user: usize = [
        ("z", "1"),
        ("a", "2"),
        ("z", "3"),
        ("x-gateway-sub", "mallory"),
    ]
    .iter()
    .map(|(k, v)| 5 + k.len() + v.len())
    .sum();
    let props_len = user + 13 + 2 + 17 + 5 + 5;
    1 + 1 + 2 + "fidelity/live".len() + 2 + 1 + props_len + "live".len()
}

/// A mosquitto_sub connection as `device` with a will that carries properties.
fn will_client(port: &str, token: &str, device: &str) -> std::process::Child {
    mosquitto("mosquitto_sub", "mqttv5", port, token)
        .args(["-i", device, "-t", "fidelity/ignored", "-q", "1"])
        .args(["--will-topic", "fidelity/will", "--will-payload", "bye"])
        .args(["--will-qos", "1"])
        .args(["-D", "will", "user-property", "k", "v"])
        .args(["-D", "will", "user-property", "k", "w"])
        .args(["-D", "will", "content-type", "text/plain"])
        .args(["-D", "will", "payload-format-indicator", "1"])
        .args(["-D", "will", "response-topic", "fidelity/reply"])
        .args(["-D", "will", "correlation-data", "c9"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// MQTT 5 fidelity with clients nobody here wrote: `mosquitto_sub -F` shows exactly the user
/// properties (repeated names, their order, a name the gateway uses itself), content type,
/// payload format indicator, response topic and correlation data another client published —
/// retained, live and as a will — and a subscriber whose Maximum Packet Size is the delivered
/// packet's size to the byte receives it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_v5_sees_exactly_what_was_published() {
    let gw = start_gateway(|_| {}).await;
    let port = gw.gateway.addrs().mqtt.port().to_string();
    let t = token(
        "mosq",
        "gateway.read:amq.topic/fidelity.# gateway.write:amq.topic/fidelity.#",
    );
    let v5 = "mqttv5";
    let format = ["-F", "%t|%P|%C|%F|%R|%D|%p|%r"];
    let props = [
        ["publish", "user-property", "z", "1"],
        ["publish", "user-property", "a", "2"],
        ["publish", "user-property", "z", "3"],
        ["publish", "user-property", "x-gateway-sub", "mallory"],
    ];
    let publish = |topic: &str, msg: &str, retain: bool| {
        let mut c = mosquitto("mosquitto_pub", v5, &port, &t);
        c.args(["-t", topic, "-m", msg, "-q", "1"]);
        for p in &props {
            c.arg("-D").args(p);
        }
        c.args(["-D", "publish", "content-type", "text/plain"]);
        c.args(["-D", "publish", "payload-format-indicator", "1"]);
        c.args(["-D", "publish", "response-topic", "fidelity/reply"]);
        c.args(["-D", "publish", "correlation-data", "c1"]);
        c.args(["-D", "publish", "message-expiry-interval", "60"]);
        if retain {
            c.arg("-r");
        }
        assert!(c.status().unwrap().success(), "mosquitto_pub {topic}");
    };
    publish("fidelity/kept", "kept", true);

    let client = unique("mosq-fid");
    let sub = mosquitto("mosquitto_sub", v5, &port, &t)
        .args([
            "-i",
            &client,
            "-t",
            "fidelity/#",
            "-q",
            "1",
            "-C",
            "3",
            "-W",
            "10",
        ])
        .args(format)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    subscribed(&gw, "mosq", &client).await;

    let size = live_packet_size();
    let fits_client = unique("mosq-fits");
    let fits = mosquitto("mosquitto_sub", v5, &port, &t)
        .args([
            "-i",
            &fits_client,
            "-t",
            "fidelity/live",
            "-q",
            "1",
            "-C",
            "1",
            "-W",
            "10",
        ])
        .args(["-D", "connect", "maximum-packet-size", &size.to_string()])
        .args(format)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    subscribed(&gw, "mosq", &fits_client).await;
    publish("fidelity/live", "live", false);

    // A will with properties: its client is killed, so the gateway publishes the will.
    let device = unique("mosq-will");
    let mut will = will_client(&port, &t, &device);
    subscribed(&gw, "mosq", &device).await;
    will.kill().unwrap();
    let _ = will.wait();

    let user = "z:1 a:2 z:3 x-gateway-sub:mallory";
    assert_eq!(
        succeeded(sub).await,
        format!(
            "fidelity/kept|{user}|text/plain|1|fidelity/reply|c1|kept|1\n\
             fidelity/live|{user}|text/plain|1|fidelity/reply|c1|live|0\n\
             fidelity/will|k:v k:w|text/plain|1|fidelity/reply|c9|bye|0\n"
        )
    );
    assert_eq!(
        succeeded(fits).await,
        format!("fidelity/live|{user}|text/plain|1|fidelity/reply|c1|live|0\n"),
        "a Maximum Packet Size of exactly {size} bytes receives the {size}-byte packet"
    );
}
