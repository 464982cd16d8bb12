//! The JWT attack matrix (DESIGN.md §6; issue "Security"): every bad token, tried at every door
//! a client can knock on — REST, Server-Sent Events, the WebSocket upgrade header and its first
//! `auth` frame, MQTT 3.1.1 and 5 over TCP and WebSocket (password, and MQTT 5 enhanced
//! authentication), AMQP 0-9-1 — refused with that door's own answer. A valid token opens every
//! door (so the matrix can fail), a token in the query string is refused where query tokens are
//! not allowed, and a token for another subject cannot take over a session.

mod common;

use common::key_fixture as fixture;

use amqp_gateway::auth::now_secs;
use amqp_gateway::config::PublicKey;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use common::mqtt_bytes::{connect, connect_v5_enhanced};
use common::mqtt_wire::{RawWire, Transport};
use common::ws::Ws;
use common::{TestGateway, WAIT, start_gateway};
use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

const ISSUER: &str = "https://issuer.example";

/// A gateway trusting one RS256 key (`kid` r1) from one issuer, and nothing else.
async fn gateway() -> TestGateway {
    start_gateway(|c| {
        c.auth.hs256_secret = None;
        c.auth.issuer = Some(ISSUER.into());
        c.auth.public_keys = vec![PublicKey {
            path: fixture("rsa.pub"),
            algorithm: "RS256".into(),
            kid: Some("r1".into()),
        }];
    })
    .await
}

fn claims(sub: &str, extra: Value) -> Value {
    let mut c = json!({"sub": sub, "aud": "gateway", "iss": ISSUER, "exp": now_secs() + 600,
                       "scope": "gateway.tag:administrator"});
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    c
}

fn signed(claims: &Value, alg: Algorithm, kid: &str, key: &EncodingKey) -> String {
    let mut header = Header::new(alg);
    header.kid = Some(kid.to_owned());
    jsonwebtoken::encode(&header, claims, key).unwrap()
}

fn rsa(name: &str) -> EncodingKey {
    EncodingKey::from_rsa_pem(&std::fs::read(fixture(name)).unwrap()).unwrap()
}

/// A token the gateway accepts, for `sub`.
fn valid(sub: &str) -> String {
    signed(
        &claims(sub, json!({})),
        Algorithm::RS256,
        "r1",
        &rsa("rsa.key"),
    )
}

/// Every way a token can be wrong, each with a name.
fn bad_tokens() -> Vec<(&'static str, String)> {
    let by_us = |extra: Value| {
        signed(
            &claims("kim", extra),
            Algorithm::RS256,
            "r1",
            &rsa("rsa.key"),
        )
    };
    let good = valid("kim");
    let mut parts: Vec<&str> = good.split('.').collect();
    let escalated = B64URL.encode(claims("root", json!({})).to_string());
    parts[1] = &escalated;
    let tampered = parts.join(".");
    let public_as_secret = EncodingKey::from_secret(&std::fs::read(fixture("rsa.pub")).unwrap());
    vec![
        ("expired", by_us(json!({"exp": now_secs() - 120}))),
        ("not yet valid", by_us(json!({"nbf": now_secs() + 600}))),
        (
            "wrong issuer",
            by_us(json!({"iss": "https://evil.example"})),
        ),
        ("wrong audience", by_us(json!({"aud": "another-service"}))),
        (
            "alg none",
            format!(
                "{}.{}.",
                B64URL.encode(br#"{"alg":"none","typ":"JWT","kid":"r1"}"#),
                B64URL.encode(claims("kim", json!({})).to_string())
            ),
        ),
        (
            "HS256 signed with the RSA public key",
            signed(
                &claims("kim", json!({})),
                Algorithm::HS256,
                "r1",
                &public_as_secret,
            ),
        ),
        ("tampered payload", tampered),
        (
            "unknown kid",
            signed(
                &claims("kim", json!({})),
                Algorithm::RS256,
                "r9",
                &rsa("rsa.key"),
            ),
        ),
        (
            "another key under the right kid",
            signed(
                &claims("kim", json!({})),
                Algorithm::RS256,
                "r1",
                &rsa("other-rsa.key"),
            ),
        ),
        ("not a JWT", "not-a-token".to_owned()),
    ]
}

/// Where a client presents its token.
#[derive(Debug, Clone, Copy)]
enum Door {
    Rest,
    Sse,
    /// `Authorization: Bearer` on the `/ws` upgrade.
    WsHeader,
    /// The first `/ws` frame, `{"op":"auth"}`.
    WsFrame,
    /// CONNECT password.
    Mqtt(Transport, u8),
    /// MQTT 5 enhanced authentication (`amqp-gateway.jwt`).
    MqttEnhanced(Transport),
    /// SASL PLAIN password.
    Amqp,
}

const DOORS: [Door; 11] = [
    Door::Rest,
    Door::Sse,
    Door::WsHeader,
    Door::WsFrame,
    Door::Mqtt(Transport::Tcp, 4),
    Door::Mqtt(Transport::Tcp, 5),
    Door::Mqtt(Transport::Ws, 4),
    Door::Mqtt(Transport::Ws, 5),
    Door::MqttEnhanced(Transport::Tcp),
    Door::MqttEnhanced(Transport::Ws),
    Door::Amqp,
];

/// What a door answered.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    Accepted,
    Http(u16),
    /// A WebSocket close code.
    WsClose(u16),
    /// A CONNACK return code (3.1.1) or reason code (5).
    ConnAck(u8),
    /// `connection.close` reply code during the AMQP handshake.
    AmqpClose(u16),
}

impl Door {
    /// How this door refuses a bad token.
    fn refusal(self) -> Answer {
        match self {
            Door::Rest | Door::Sse | Door::WsHeader => Answer::Http(401),
            Door::WsFrame => Answer::WsClose(4001),
            // 3.1.1 return code 4, "bad user name or password"; MQTT 5 0x86.
            Door::Mqtt(_, 4) => Answer::ConnAck(4),
            Door::Mqtt(..) | Door::MqttEnhanced(_) => Answer::ConnAck(0x86),
            Door::Amqp => Answer::AmqpClose(403),
        }
    }

    async fn knock(self, gw: &TestGateway, token: &str) -> Answer {
        match self {
            Door::Rest => http(gw.get("/v1/queues", token)).await,
            Door::Sse => http(gw.get("/v1/sse?exchange=amq.topic&binding_key=matrix", token)).await,
            Door::WsHeader => ws_header(gw, token).await,
            Door::WsFrame => ws_frame(gw, token).await,
            Door::Mqtt(t, level) => {
                mqtt(gw, t, &connect(b"MQTT", level, 0, "matrix", Some(token))).await
            }
            Door::MqttEnhanced(t) => mqtt(gw, t, &connect_v5_enhanced("matrix", token)).await,
            Door::Amqp => amqp(gw, token).await,
        }
    }
}

async fn http(req: reqwest::RequestBuilder) -> Answer {
    let resp = req.send().await.unwrap();
    match resp.status().as_u16() {
        200 => Answer::Accepted,
        401 => {
            assert!(
                resp.headers()["www-authenticate"]
                    .to_str()
                    .unwrap()
                    .starts_with("Bearer"),
                "401 names the scheme"
            );
            Answer::Http(401)
        }
        other => Answer::Http(other),
    }
}

async fn ws_header(gw: &TestGateway, token: &str) -> Answer {
    let req = common::ws::request(gw, Some(token), true, "");
    match tokio_tungstenite::connect_async(req).await {
        Ok((ws, _)) => ws_accepted(ws, None).await,
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            Answer::Http(resp.status().as_u16())
        }
        Err(e) => panic!("upgrade: {e}"),
    }
}

async fn ws_frame(gw: &TestGateway, token: &str) -> Answer {
    let req = common::ws::request(gw, None, true, "");
    let (ws, _) = tokio_tungstenite::connect_async(req)
        .await
        .expect("upgrade");
    ws_accepted(ws, Some(token)).await
}

/// After the upgrade: sends the `auth` frame when given, then a ping; `Accepted` when the ping
/// is answered, else the close code.
async fn ws_accepted<S>(mut ws: tokio_tungstenite::WebSocketStream<S>, auth: Option<&str>) -> Answer
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    if let Some(token) = auth {
        let frame = json!({"op": "auth", "id": "a", "token": token});
        ws.send(Message::text(frame.to_string())).await.unwrap();
    }
    let ping = json!({"op": "ping", "id": "p"});
    // The gateway may close before it reads the ping.
    let _ = ws.send(Message::text(ping.to_string())).await;
    loop {
        match tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("an answer in time")
        {
            Some(Ok(Message::Text(t))) => {
                let v: Value = serde_json::from_str(&t).unwrap();
                if v["op"] == "pong" {
                    return Answer::Accepted;
                }
                if v["op"] == "error" {
                    assert_eq!(v["code"], "unauthorized", "{v}");
                    assert!(
                        auth.is_none_or(|t| !v["message"].as_str().unwrap().contains(t)),
                        "the token is not echoed"
                    );
                }
            }
            Some(Ok(Message::Close(Some(frame)))) => return Answer::WsClose(frame.code.into()),
            Some(Ok(_)) => {}
            other => panic!("the WebSocket ended without a close frame: {other:?}"),
        }
    }
}

async fn mqtt(gw: &TestGateway, t: Transport, connect: &[u8]) -> Answer {
    let mut wire = RawWire::open(gw, t).await;
    wire.send_raw(connect).await;
    let (first, body) = wire.packet().await.expect("CONNACK");
    assert_eq!(first, 0x20, "CONNACK");
    match body[1] {
        0 => Answer::Accepted,
        code => {
            // A refused CONNECT is followed by the close.
            assert!(wire.packet().await.is_err(), "closed after the refusal");
            Answer::ConnAck(code)
        }
    }
}

async fn amqp(gw: &TestGateway, token: &str) -> Answer {
    let url = common::amqp::url(gw, token);
    let props = lapin::ConnectionProperties::default();
    match tokio::time::timeout(WAIT, lapin::Connection::connect(&url, props))
        .await
        .expect("an answer in time")
    {
        Ok(conn) => {
            let _ = conn.close(200, "matrix".into()).await;
            Answer::Accepted
        }
        Err(e) => Answer::AmqpClose(
            common::amqp::code(&e).unwrap_or_else(|| panic!("no reply code: {e}")),
        ),
    }
}

#[tokio::test]
async fn every_bad_token_is_refused_at_every_door() {
    let gw = gateway().await;
    let good = valid("kim");
    let mut wrong = Vec::new();
    for door in DOORS {
        let answer = door.knock(&gw, &good).await;
        if answer != Answer::Accepted {
            wrong.push(format!("valid token at {door:?}: {answer:?}"));
        }
        for (what, token) in bad_tokens() {
            let answer = door.knock(&gw, &token).await;
            if answer != door.refusal() {
                wrong.push(format!(
                    "{what} at {door:?}: {answer:?}, expected {:?}",
                    door.refusal()
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    // Nothing refused holds a connection once the accepted ones have gone.
    common::eventually("no connection is left", || async {
        let list = common::json_of(gw.get("/v1/connections", &good)).await;
        list["items"].as_array().unwrap().is_empty()
    })
    .await;
}

/// A 3.1.1 CONNECT keeping its session (clean session 0), with the token as password.
fn persistent_connect(client: &str, token: &str) -> Vec<u8> {
    use common::mqtt_bytes::{packet, string};
    let mut body = string(b"MQTT");
    body.extend([4, 0xC0, 0, 60]); // user name + password, no clean session, keep-alive 60
    body.extend(string(client.as_bytes()));
    body.extend(string(b"u"));
    body.extend(string(token.as_bytes()));
    packet(0x10, body)
}

/// CONNACK's (session present, code).
async fn connack(wire: &mut RawWire) -> (bool, u8) {
    let (first, body) = wire.packet().await.expect("CONNACK");
    assert_eq!(first, 0x20);
    (body[0] & 1 == 1, body[1])
}

#[tokio::test]
async fn a_token_for_another_subject_cannot_take_over_a_session() {
    use common::mqtt_bytes::{reauth, subscribe_packet};
    let gw = gateway().await;

    // MQTT: sessions are keyed by subject and client id. Alice's session lives on.
    let mut alice = RawWire::open(&gw, Transport::Tcp).await;
    alice
        .send_raw(&persistent_connect("device-1", &valid("alice")))
        .await;
    assert_eq!(connack(&mut alice).await, (false, 0));
    alice
        .send_raw(&subscribe_packet(1, "a/b", 1, false, None))
        .await;
    assert_eq!(alice.packet().await.expect("SUBACK").0, 0x90);
    let mut mallory = RawWire::open(&gw, Transport::Tcp).await;
    mallory
        .send_raw(&persistent_connect("device-1", &valid("mallory")))
        .await;
    assert_eq!(
        connack(&mut mallory).await,
        (false, 0),
        "a session of mallory's own"
    );
    alice.send_raw(&[0xC0, 0]).await; // PINGREQ
    assert_eq!(
        alice.packet().await.expect("PINGRESP").0,
        0xD0,
        "alice is still connected"
    );
    // The same subject does take its session over (so the check above can fail).
    let mut alice_again = RawWire::open(&gw, Transport::Tcp).await;
    alice_again
        .send_raw(&persistent_connect("device-1", &valid("alice")))
        .await;
    assert_eq!(
        connack(&mut alice_again).await,
        (true, 0),
        "alice's session, present"
    );
    assert!(
        alice.packet().await.is_err(),
        "the first connection was taken over"
    );

    // MQTT 5 re-authentication with another subject's token: DISCONNECT 0x87.
    let mut v5 = RawWire::open(&gw, Transport::Tcp).await;
    v5.send_raw(&connect_v5_enhanced("device-2", &valid("alice")))
        .await;
    assert_eq!(connack(&mut v5).await.1, 0);
    v5.send_raw(&reauth(&valid("mallory"))).await;
    let (first, body) = v5.packet().await.expect("DISCONNECT");
    assert_eq!((first, body[0]), (0xE0, 0x87));

    // WebSocket: a refreshed token for another subject is refused; the connection stays alice's.
    let mut ws = Ws::connect(&gw, Some(&valid("alice"))).await;
    let refresh = json!({"op": "auth", "id": "r", "token": valid("mallory")});
    let answer = ws.call(refresh).await;
    assert_eq!(
        (answer["op"].as_str(), answer["code"].as_str()),
        (Some("error"), Some("unauthorized")),
        "{answer}"
    );
    let refresh = json!({"op": "auth", "id": "r2", "token": valid("alice")});
    let answer = ws.call(refresh).await;
    assert_eq!(
        (answer["op"].as_str(), answer["subject"].as_str()),
        (Some("ok"), Some("alice")),
        "{answer}"
    );
    // A durable subscription's name is the subject's own: mallory's "inbox" is not alice's.
    let mut queues = Vec::new();
    for who in ["alice", "mallory"] {
        let mut ws = Ws::connect(&gw, Some(&valid(who))).await;
        let sub = json!({"op": "subscribe", "id": "s", "exchange": "amq.topic", "binding_key": "inbox", "durable": "inbox"});
        let answer = ws.call(sub).await;
        assert_eq!(answer["op"], "subscribed", "{answer}");
        queues.push(answer["queue"].as_str().unwrap().to_owned());
    }
    assert_eq!(queues, ["ws-alice.inbox", "ws-mallory.inbox"]);

    // AMQP: connection.update-secret with another subject's token closes with 403.
    let conn = lapin::Connection::connect(
        &common::amqp::url(&gw, &valid("alice")),
        lapin::ConnectionProperties::default(),
    )
    .await
    .expect("AMQP connection");
    let err = conn
        .update_secret(valid("mallory").as_str().into(), "takeover".into())
        .await
        .expect_err("refused");
    assert!(
        matches!(common::amqp::code(&err), Some(403) | None),
        "{err}"
    );
    assert!(!conn.status().connected(), "the connection is closed");
}

#[tokio::test]
async fn a_token_in_the_query_string_counts_only_where_allowed() {
    let gw = gateway().await;
    let token = valid("kim");
    let query = format!("?access_token={token}");
    // REST never reads the query string; SSE and /ws only with ws.allow_query_token.
    let rest = gw.http.get(gw.url(&format!("/v1/queues{query}")));
    assert_eq!(http(rest).await, Answer::Http(401));
    let sse = gw.http.get(gw.url(&format!(
        "/v1/sse?exchange=amq.topic&binding_key=q&access_token={token}"
    )));
    assert_eq!(http(sse).await, Answer::Http(401));
    let req = common::ws::request(&gw, None, true, &query);
    let (ws, _) = tokio_tungstenite::connect_async(req)
        .await
        .expect("upgrade");
    assert_eq!(ws_accepted(ws, None).await, Answer::WsClose(4001));

    let allowed = start_gateway(|c| c.ws.allow_query_token = true).await;
    let token = common::admin();
    let sse = allowed.http.get(allowed.url(&format!(
        "/v1/sse?exchange=amq.topic&binding_key=q&access_token={token}"
    )));
    assert_eq!(http(sse).await, Answer::Accepted);
    let req = common::ws::request(&allowed, None, true, &format!("?access_token={token}"));
    let (ws, _) = tokio_tungstenite::connect_async(req)
        .await
        .expect("upgrade");
    assert_eq!(ws_accepted(ws, None).await, Answer::Accepted);
    let rest = allowed
        .http
        .get(allowed.url(&format!("/v1/queues?access_token={token}")));
    assert_eq!(http(rest).await, Answer::Http(401), "REST: never");
}
