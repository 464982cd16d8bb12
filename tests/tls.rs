//! TLS listeners (DESIGN.md §8): with `tls.cert`/`tls.key` set, HTTPS and WSS on the HTTP port,
//! MQTT on `mqtt.tls_listen`, AMQP on `amqp.tls_listen`, TLS 1.2+ only, and a SIGHUP reload
//! that new connections see while open ones carry on. Real clients: reqwest, curl, openssl,
//! mosquitto_pub/sub, tokio-tungstenite, lapin.

mod common;

use std::process::Stdio;

use common::tls::Pki;
use common::ws::Ws;
use common::{TestGateway, WAIT, admin, start_gateway};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::net::TcpStream;
use tokio::process::Command;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::Message;

/// A gateway serving TLS with `pki`'s certificate; its REST client trusts the CA and uses
/// `https://localhost:…`.
async fn start_tls(pki: &Pki) -> TestGateway {
    let (cert, key) = (pki.cert.clone(), pki.key.clone());
    let mut gw = start_gateway(|c| {
        c.tls.cert = Some(cert);
        c.tls.key = Some(key);
    })
    .await;
    let addrs = gw.gateway.addrs();
    assert!(addrs.https);
    gw.base = format!("https://localhost:{}", addrs.http.port());
    gw.http = https_client(&pki.ca_pem);
    gw
}

fn https_client(ca_pem: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap()])
        .resolve("localhost", "127.0.0.1:0".parse().unwrap())
        .timeout(WAIT)
        .build()
        .unwrap()
}

async fn output(cmd: &mut Command) -> std::process::Output {
    tokio::time::timeout(WAIT, cmd.stdin(Stdio::null()).output())
        .await
        .expect("the command ends in time")
        .expect("the command runs")
}

/// A `/ws` session over TLS to `port`, trusting `ca_pem`, authenticated with `token`.
async fn wss(port: u16, ca_pem: &str, token: &str) -> Ws<TlsStream<TcpStream>> {
    let tls = common::tls::connect(([127, 0, 0, 1], port).into(), ca_pem)
        .await
        .expect("TLS handshake");
    let url = format!("wss://localhost:{port}/ws");
    let req = common::ws::upgrade(&url, Some(token), Some(common::ws::SUBPROTOCOL));
    let (ws, _) = tokio_tungstenite::client_async(req, tls)
        .await
        .expect("WebSocket upgrade over TLS");
    Ws(ws)
}

#[tokio::test]
async fn https_and_wss_serve_rest_and_websocket_with_the_certificate() {
    let pki = Pki::new();
    let gw = start_tls(&pki).await;
    let port = gw.gateway.addrs().http.port();

    let health = gw.http.get(gw.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);

    // A WebSocket over TLS receives what REST over TLS publishes.
    let mut ws = wss(port, &pki.ca_pem, &admin()).await;
    let subscribed = ws
        .call(
            json!({"op": "subscribe", "id": "s", "exchange": "amq.topic", "binding_key": "tls.#"}),
        )
        .await;
    assert_eq!(subscribed["op"], "subscribed", "{subscribed}");
    gw.publish("amq.topic", "tls.rest", json!("over https"))
        .await;
    let message = ws.recv().await;
    assert_eq!(message["op"], "message", "{message}");
    assert_eq!(message["body"], "over https");

    // MQTT over WSS (`/mqtt`): a CONNECT in a binary frame is answered by CONNACK 0.
    let tls = common::tls::connect(([127, 0, 0, 1], port).into(), &pki.ca_pem)
        .await
        .expect("TLS handshake");
    let url = format!("wss://localhost:{port}/mqtt");
    let req = common::ws::upgrade(&url, None, Some("mqtt"));
    let (mut mqtt, _) = tokio_tungstenite::client_async(req, tls)
        .await
        .expect("MQTT WebSocket upgrade over TLS");
    let connect = common::mqtt_bytes::connect(b"MQTT", 5, 0, "wss-device", Some(&admin()));
    mqtt.send(Message::binary(connect)).await.unwrap();
    match tokio::time::timeout(WAIT, mqtt.next()).await {
        Ok(Some(Ok(Message::Binary(b)))) => assert_eq!((b[0], b[3]), (0x20, 0), "CONNACK {b:x?}"),
        other => panic!("no CONNACK: {other:?}"),
    }

    // Plain HTTP on the TLS port gets no HTTP answer.
    let plain = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}/healthz"))
        .timeout(WAIT)
        .send()
        .await;
    assert!(plain.is_err(), "plain HTTP answered: {plain:?}");
    // A client that does not trust the CA refuses the certificate.
    let stranger = https_client(&Pki::new().ca_pem)
        .get(gw.url("/healthz"))
        .send()
        .await;
    assert!(stranger.is_err(), "an untrusted certificate was accepted");
}

#[tokio::test]
async fn curl_and_openssl_see_tls_1_2_and_1_3_only() {
    let pki = Pki::new();
    let gw = start_tls(&pki).await;
    let port = gw.gateway.addrs().http.port();
    let url = format!("https://localhost:{port}/healthz");
    let resolve = format!("localhost:{port}:127.0.0.1");

    // HTTP/2 when the client offers it by ALPN, HTTP/1.1 otherwise.
    for (flag, version) in [("--http2", "2"), ("--http1.1", "1.1")] {
        let ok = output(
            Command::new("curl")
                .args([
                    "-sS",
                    flag,
                    "-w",
                    "\n%{http_version}",
                    "--resolve",
                    &resolve,
                    "--cacert",
                ])
                .arg(&pki.ca)
                .arg(&url),
        )
        .await;
        let text = String::from_utf8_lossy(&ok.stdout);
        assert!(
            ok.status.success(),
            "curl: {}",
            String::from_utf8_lossy(&ok.stderr)
        );
        assert!(text.contains("\"ok\""), "{text}");
        assert_eq!(text.lines().last(), Some(version), "{flag}: {text}");
    }
    // Without the CA, curl refuses the certificate (exit 60).
    let untrusted = output(Command::new("curl").args(["-sS", "--resolve", &resolve, &url])).await;
    assert_eq!(untrusted.status.code(), Some(60), "{untrusted:?}");

    let s_client = |version: &'static str| {
        let mut cmd = Command::new("openssl");
        cmd.args([
            "s_client",
            "-connect",
            &format!("127.0.0.1:{port}"),
            "-servername",
            "localhost",
            version,
        ])
        // Level 0 lets this client offer old versions: the refusal must be the server's.
        .args(["-cipher", "DEFAULT:@SECLEVEL=0", "-CAfile"])
        .arg(&pki.ca);
        cmd
    };
    for (version, name) in [("-tls1_2", "TLSv1.2"), ("-tls1_3", "TLSv1.3")] {
        let out = output(&mut s_client(version)).await;
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains(&format!("Protocol  : {name}")) || text.contains(&format!("New, {name}")),
            "{version}: {text}"
        );
        assert!(
            text.contains("Verify return code: 0 (ok)"),
            "{version}: {text}"
        );
    }
    for version in ["-tls1", "-tls1_1"] {
        let out = output(&mut s_client(version)).await;
        let (text, errors) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        // The server's refusal (rustls answers a hello without 1.2 or 1.3 with alert 40,
        // handshake_failure), and no certificate shown.
        assert!(
            errors.contains("alert handshake failure") || errors.contains("alert protocol version"),
            "{version}: {errors}"
        );
        assert!(
            text.contains("no peer certificate available"),
            "{version}: {text}"
        );
    }
}

#[tokio::test]
async fn mosquitto_clients_speak_mqtt_over_tls() {
    let pki = Pki::new();
    let gw = start_tls(&pki).await;
    let port = gw
        .gateway
        .addrs()
        .mqtt_tls
        .expect("the MQTT TLS listener")
        .port()
        .to_string();
    let token = admin();
    let mut sub = Command::new("mosquitto_sub");
    sub.args([
        "-h",
        "localhost",
        "-p",
        &port,
        "-t",
        "tls/topic",
        "-C",
        "1",
        "-q",
        "1",
        "-i",
        "tls-sub",
    ])
    .args(["-u", "any", "-P", &token, "-V", "mqttv5", "--cafile"])
    .arg(&pki.ca)
    .stdout(Stdio::piped());
    let sub = sub.spawn().unwrap();
    // The subscription is in place once the gateway lists the connection with its transport.
    common::eventually("the TLS subscriber is connected", || async {
        let list = common::json_of(gw.get("/v1/connections", &admin())).await;
        list["items"].as_array().unwrap().iter().any(|c| {
            c["client_id"] == "tls-sub"
                && c["transport"] == "tls"
                && c["subscriptions"].as_array().is_some_and(|s| !s.is_empty())
        })
    })
    .await;
    let publish = output(
        Command::new("mosquitto_pub")
            .args([
                "-h",
                "localhost",
                "-p",
                &port,
                "-t",
                "tls/topic",
                "-m",
                "over mqtts",
                "-q",
                "1",
            ])
            .args(["-u", "any", "-P", &token, "--cafile"])
            .arg(&pki.ca),
    )
    .await;
    assert!(publish.status.success(), "{publish:?}");
    let got = tokio::time::timeout(WAIT, sub.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&got.stdout).trim(), "over mqtts");

    // Another CA: mosquitto_pub refuses the gateway's certificate.
    let other = pki.file("other-ca.pem", &Pki::new().ca_pem);
    let refused = output(
        Command::new("mosquitto_pub")
            .args(["-h", "localhost", "-p", &port, "-t", "tls/topic", "-m", "x"])
            .args(["-u", "any", "-P", &token, "--cafile"])
            .arg(&other),
    )
    .await;
    assert!(
        !refused.status.success(),
        "an untrusted certificate was accepted"
    );
}

#[tokio::test]
async fn lapin_speaks_amqps() {
    let pki = Pki::new();
    let gw = start_tls(&pki).await;
    let addr = gw.gateway.addrs().amqp_tls.expect("the AMQP TLS listener");
    let uri = format!("amqps://any:{}@localhost:{}/%2f", admin(), addr.port());
    let tls = lapin::tcp::OwnedTLSConfig {
        identity: None,
        cert_chain: Some(pki.ca_pem.clone()),
    };
    let runtime = lapin::runtime::default_runtime().unwrap();
    let conn = tokio::time::timeout(
        WAIT,
        lapin::Connection::connect_with_config(
            &uri,
            lapin::ConnectionProperties::default(),
            tls,
            runtime,
        ),
    )
    .await
    .unwrap()
    .expect("AMQPS connection");
    let ch = common::amqp::channel(&conn).await;
    let queue = common::unique("amqps");
    common::amqp::declare(&ch, &queue).await;
    ch.basic_publish(
        "".into(),
        queue.as_str().into(),
        lapin::options::BasicPublishOptions::default(),
        b"over amqps",
        lapin::BasicProperties::default(),
    )
    .await
    .unwrap();
    let got = common::amqp::get(&ch, &queue, true)
        .await
        .expect("the message");
    assert_eq!(got.delivery.data, b"over amqps");
    let list = common::json_of(gw.get("/v1/connections?protocol=amqp", &admin())).await;
    assert_eq!(list["items"][0]["transport"], "tls", "{list}");
}

#[tokio::test]
async fn a_mismatched_key_stops_start_up() {
    let pki = Pki::new();
    let other = Pki::new();
    let mut config = common::test_config();
    config.tls.cert = Some(pki.cert.clone());
    config.tls.key = Some(other.key.clone());
    let err = amqp_gateway::start(config)
        .await
        .err()
        .expect("start-up refused");
    let text = err.to_string();
    assert!(
        text.contains("tls.key") && text.contains("is not the key of tls.cert"),
        "{text}"
    );

    let mut config = common::test_config();
    config.tls.cert = Some(pki.dir.path().join("missing.pem"));
    config.tls.key = Some(pki.key.clone());
    let text = amqp_gateway::start(config)
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(
        text.contains("tls.cert") && text.contains("missing.pem"),
        "{text}"
    );
}

#[tokio::test]
async fn sighup_reloads_the_certificate_and_open_connections_carry_on() {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let (cert, key) = (pki.cert.to_str().unwrap(), pki.key.to_str().unwrap());
    let mut child = common::child::ChildGateway::start_with(
        data.path(),
        &[
            ("GATEWAY_TLS__CERT", cert),
            ("GATEWAY_TLS__KEY", key),
            ("GATEWAY_MQTT__TLS_LISTEN", "127.0.0.1:0"),
            ("GATEWAY_AMQP__TLS_LISTEN", "127.0.0.1:0"),
        ],
    )
    .await;
    let port = child.http.port();
    let token = admin();
    let first_ca = pki.ca_pem.clone();
    let mut before = wss(port, &first_ca, &token).await;
    let subscribed = before.call(json!({"op": "subscribe", "id": "s", "exchange": "amq.topic", "binding_key": "reload.#"}),
    )
    .await;
    assert_eq!(subscribed["op"], "subscribed", "{subscribed}");

    let second_ca = pki.issue();
    child.signal_only("HUP");
    child.logged("TLS certificate reloaded").await;
    // New handshakes present the new certificate...
    assert!(
        common::tls::connect(child.http, &first_ca).await.is_err(),
        "the old certificate is still served"
    );
    let mut after = wss(port, &second_ca, &token).await;
    // ...and the connection opened before carries on: it receives what the new one publishes.
    let published = after.call(json!({"op": "publish", "id": "p", "exchange": "amq.topic", "routing_key": "reload.x", "body": "after reload"}),
    )
    .await;
    assert_eq!(published["op"], "published", "{published}");
    let message = before.recv().await;
    assert_eq!(message["body"], "after reload", "{message}");
    for (name, addr) in [("mqtt", child.mqtt_tls), ("amqp", child.amqp_tls)] {
        let addr = addr.unwrap_or_else(|| panic!("the {name} TLS listener"));
        assert!(
            common::tls::connect(addr, &second_ca).await.is_ok(),
            "{name} presents the new certificate"
        );
    }

    // A broken pair is refused and the current certificate stays.
    std::fs::write(&pki.key, "not a key").unwrap();
    child.signal_only("HUP");
    child.logged("TLS certificate not reloaded").await;
    let mut again = wss(port, &second_ca, &token).await;
    let pong = again.call(json!({"op": "ping", "id": "p"})).await;
    assert_eq!(pong["op"], "pong", "{pong}");
}
