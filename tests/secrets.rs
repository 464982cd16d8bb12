//! Secrets never reach the logs (DESIGN.md §6): the gateway binary runs at `debug` through a
//! session of every protocol — REST, `/ws` (header, first frame, refresh, query string), SSE,
//! MQTT 3.1.1 and 5 over TCP and WebSocket (password and enhanced authentication with
//! re-authentication), AMQP (PLAIN, update-secret) — with good and bad tokens, and its whole log
//! is searched for every token, every token's signature, the HMAC secret and the upstream
//! broker's password.

mod common;

use common::child::ChildGateway;
use common::mqtt_bytes::{connect, connect_v5_enhanced, reauth};
use common::mqtt_wire::RawWire;
use common::{SECRET, WAIT, token};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

const SCOPE: &str = "gateway.tag:administrator";

/// Tokens used in the session: each must be absent from the log, whole and by signature.
struct Tokens(Vec<String>);

impl Tokens {
    fn mint(&mut self, sub: &str) -> String {
        let t = token(sub, SCOPE);
        self.0.push(t.clone());
        t
    }

    /// A token whose signature does not verify (its last character changed).
    fn forged(&mut self, sub: &str) -> String {
        let mut t = token(sub, SCOPE);
        let last = if t.ends_with('A') { 'B' } else { 'A' };
        t.pop();
        t.push(last);
        self.0.push(t.clone());
        t
    }
}

async fn ws(
    child: &ChildGateway,
    path: &str,
    bearer: Option<&str>,
    protocol: &str,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    let url = format!("ws://{}{path}", child.http);
    let req = common::ws::upgrade(&url, bearer, Some(protocol));
    tokio_tungstenite::connect_async(req)
        .await
        .expect("upgrade")
        .0
}

/// Sends `frame` and waits for the next text frame (or the close).
async fn exchange<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>, frame: serde_json::Value)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let _ = ws.send(Message::text(frame.to_string())).await;
    loop {
        match tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("an answer")
        {
            Some(Ok(Message::Text(_) | Message::Close(_))) | None | Some(Err(_)) => return,
            Some(Ok(_)) => {}
        }
    }
}

async fn mqtt(addr: std::net::SocketAddr, connect: &[u8], then: Option<Vec<u8>>) {
    let mut wire = RawWire::tcp(addr).await;
    wire.send_raw(connect).await;
    let connack = wire.packet().await;
    if let (Ok((0x20, body)), Some(more)) = (connack, then)
        && body[1] == 0
    {
        wire.send_raw(&more).await;
        let _ = wire.packet().await;
    }
}

async fn web_sessions(child: &ChildGateway, tokens: &mut Tokens) {
    let http = reqwest::Client::builder().timeout(WAIT).build().unwrap();
    let base = format!("http://{}", child.http);
    for t in [tokens.mint("rest"), tokens.forged("rest")] {
        let _ = http
            .post(format!("{base}/v1/exchanges/amq.topic/publish"))
            .bearer_auth(&t)
            .json(&json!({"routing_key": "secrets.rest", "body": "x"}))
            .send()
            .await
            .unwrap();
    }
    // SSE and /ws with the token in the query string (allowed here, and never logged).
    for t in [tokens.mint("sse"), tokens.forged("sse")] {
        let url =
            format!("{base}/v1/sse?exchange=amq.topic&binding_key=secrets.%23&access_token={t}");
        drop(http.get(url).send().await.unwrap());
    }
    let proto = "amqp-gateway.v1.json";
    let query = format!("/ws?access_token={}", tokens.mint("ws-query"));
    let mut by_query = ws(child, &query, None, proto).await;
    exchange(&mut by_query, json!({"op": "ping", "id": 1})).await;
    let mut by_header = ws(child, "/ws", Some(&tokens.mint("ws")), proto).await;
    let refresh = json!({"op": "auth", "id": 1, "token": tokens.mint("ws")});
    exchange(&mut by_header, refresh).await;
    let wrong = json!({"op": "auth", "id": 2, "token": tokens.forged("ws")});
    exchange(&mut by_header, wrong).await;
    for t in [tokens.mint("ws-frame"), tokens.forged("ws-frame")] {
        let mut by_frame = ws(child, "/ws", None, proto).await;
        exchange(&mut by_frame, json!({"op": "auth", "id": 1, "token": t})).await;
    }
    // MQTT over WebSocket: the CONNECT password in a binary frame.
    let mut over_ws = ws(child, "/mqtt", None, "mqtt").await;
    let packet = connect(b"MQTT", 4, 0, "secrets-ws", Some(&tokens.mint("mqtt-ws")));
    over_ws.send(Message::binary(packet)).await.unwrap();
    let _ = tokio::time::timeout(WAIT, over_ws.next()).await;
}

async fn device_sessions(child: &ChildGateway, tokens: &mut Tokens) {
    for level in [4, 5] {
        for t in [tokens.mint("mqtt"), tokens.forged("mqtt")] {
            mqtt(
                child.mqtt,
                &connect(b"MQTT", level, 0, "secrets", Some(&t)),
                None,
            )
            .await;
        }
    }
    let enhanced = connect_v5_enhanced("secrets-v5", &tokens.mint("mqtt5"));
    mqtt(child.mqtt, &enhanced, Some(reauth(&tokens.mint("mqtt5")))).await;
    let enhanced = connect_v5_enhanced("secrets-v5b", &tokens.mint("mqtt5b"));
    mqtt(
        child.mqtt,
        &enhanced,
        Some(reauth(&tokens.forged("mqtt5b"))),
    )
    .await;

    let amqp = child.amqp.expect("the AMQP listener");
    let url = |t: &str| format!("amqp://user:{t}@{amqp}/%2f");
    let props = lapin::ConnectionProperties::default;
    let conn = lapin::Connection::connect(&url(&tokens.mint("amqp")), props())
        .await
        .expect("AMQP login");
    conn.update_secret(tokens.mint("amqp").as_str().into(), "refresh".into())
        .await
        .expect("update-secret");
    let _ = conn.close(200, "bye".into()).await;
    let refused = lapin::Connection::connect(&url(&tokens.forged("amqp")), props()).await;
    assert!(refused.is_err(), "a forged token is refused");
}

/// Every log line the child wrote until it exited.
async fn all_lines(mut child: ChildGateway) -> Vec<String> {
    let status = child.signal("TERM").await;
    assert!(status.success(), "{status:?}");
    let mut lines = std::mem::take(&mut child.startup);
    while let Ok(Some(line)) = tokio::time::timeout(WAIT, child.lines.recv()).await {
        lines.push(line);
    }
    lines
}

fn leaks<'a>(lines: &'a [String], secrets: &[(String, String)]) -> Vec<(String, &'a str)> {
    let mut found = Vec::new();
    for line in lines {
        for (what, secret) in secrets {
            if line.contains(secret.as_str()) {
                found.push((what.clone(), line.as_str()));
            }
        }
    }
    found
}

fn token_secrets(tokens: &Tokens) -> Vec<(String, String)> {
    let mut secrets = vec![("the HMAC secret".to_owned(), SECRET.to_owned())];
    for t in &tokens.0 {
        let signature = t.rsplit('.').next().unwrap().to_owned();
        secrets.push(("a token".into(), t.clone()));
        secrets.push(("a token's signature".into(), signature));
    }
    secrets
}

#[tokio::test]
async fn no_secret_reaches_the_debug_log_of_an_embedded_gateway() {
    let data = tempfile::tempdir().unwrap();
    let child = ChildGateway::start_with(
        data.path(),
        &[
            ("GATEWAY_LOG__LEVEL", "debug"),
            ("GATEWAY_WS__ALLOW_QUERY_TOKEN", "true"),
        ],
    )
    .await;
    let mut tokens = Tokens(Vec::new());
    web_sessions(&child, &mut tokens).await;
    device_sessions(&child, &mut tokens).await;
    let lines = all_lines(child).await;

    // The log saw these sessions at debug level (so an empty log cannot pass).
    for seen in ["AMQP connection ended", "MQTT connection closed", "DEBUG"] {
        assert!(
            lines.iter().any(|l| l.contains(seen)),
            "no log line with {seen}"
        );
    }
    let leaked = leaks(&lines, &token_secrets(&tokens));
    assert!(leaked.is_empty(), "secrets in the log: {leaked:#?}");
}

#[tokio::test]
async fn the_upstream_password_stays_out_of_the_debug_log() {
    let vhost = common::rabbit::Vhost::create().await;
    let password = "guest";
    let url = vhost.amqp_url();
    assert!(url.contains(&format!(":{password}@")), "{url}");
    let data = tempfile::tempdir().unwrap();
    let child = ChildGateway::start_with(
        data.path(),
        &[
            ("GATEWAY_LOG__LEVEL", "debug"),
            ("GATEWAY_ENGINE__KIND", "upstream"),
            ("GATEWAY_ENGINE__UPSTREAM__URL", &url),
            (
                "GATEWAY_ENGINE__UPSTREAM__MANAGEMENT_URL",
                &vhost.management_url(),
            ),
        ],
    )
    .await;
    let mut tokens = Tokens(Vec::new());
    mqtt(
        child.mqtt,
        &connect(b"MQTT", 4, 0, "up", Some(&tokens.mint("up"))),
        None,
    )
    .await;
    let lines = all_lines(child).await;
    assert!(
        lines.iter().any(|l| l.contains("DEBUG")),
        "debug lines were written"
    );
    let mut secrets = token_secrets(&tokens);
    secrets.push((
        "the upstream URL's password".into(),
        format!(":{password}@"),
    ));
    let leaked = leaks(&lines, &secrets);
    assert!(leaked.is_empty(), "secrets in the log: {leaked:#?}");
}
