//! JWT and scopes over real HTTP: refused tokens, audience and issuer, anonymous access, the
//! permission matrix, PEM public keys, and JWKS from a file and from an https URL served by the
//! test (trusted through `auth.jwks_ca`).

mod common;

use common::key_fixture as fixture;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use amqp_gateway::auth::now_secs;
use amqp_gateway::config::PublicKey;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use common::{
    SECRET, admin, forbidden, json_of, problem, refused, start_gateway, status, token, unique,
};
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn key(name: &str, alg: Algorithm) -> EncodingKey {
    let pem = std::fs::read(fixture(name)).unwrap();
    match alg {
        Algorithm::ES256 => EncodingKey::from_ec_pem(&pem),
        Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem),
        _ => EncodingKey::from_rsa_pem(&pem),
    }
    .unwrap()
}

fn sign(claims: &Value, alg: Algorithm, kid: Option<&str>, key: &EncodingKey) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, key).unwrap()
}

fn claims(extra: Value) -> Value {
    let mut c = json!({"sub": "kim", "aud": "gateway", "exp": now_secs() + 600,
                       "scope": "gateway.tag:administrator"});
    for (k, v) in extra.as_object().unwrap() {
        if v.is_null() {
            c.as_object_mut().unwrap().remove(k);
        } else {
            c[k] = v.clone();
        }
    }
    c
}

fn hs(claims: &Value) -> String {
    sign(
        claims,
        Algorithm::HS256,
        None,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
}

/// The status of listing queues with `token`.
async fn list_status(gw: &common::TestGateway, token: &str) -> u16 {
    status(gw.get("/v1/queues", token)).await
}

#[tokio::test]
async fn tokens_are_required_and_bad_ones_refused() {
    let gw = start_gateway(|_| {}).await;
    let none = gw.http.get(gw.url("/v1/queues")).send().await.unwrap();
    assert_eq!(none.headers()["www-authenticate"], "Bearer");
    problem(none, 401, "unauthorized").await;
    let basic = gw
        .http
        .get(gw.url("/v1/queues"))
        .header("authorization", "Basic dTpw")
        .send()
        .await
        .unwrap();
    assert_eq!(
        basic.headers()["www-authenticate"],
        "Bearer error=\"invalid_token\""
    );
    problem(basic, 401, "unauthorized").await;

    let unsigned = format!(
        "{}.{}.",
        B64URL.encode(br#"{"alg":"none","typ":"JWT"}"#),
        B64URL.encode(claims(json!({})).to_string())
    );
    let forged = sign(
        &claims(json!({})),
        Algorithm::HS256,
        None,
        &EncodingKey::from_secret(b"not-the-secret-at-all"),
    );
    let cases = [
        (
            "expired beyond leeway",
            hs(&claims(json!({"exp": now_secs() - 120}))),
        ),
        ("forged", forged),
        ("alg none", unsigned),
        ("wrong aud", hs(&claims(json!({"aud": "elsewhere"})))),
        ("no aud", hs(&claims(json!({"aud": null})))),
        (
            "not yet valid",
            hs(&claims(json!({"nbf": now_secs() + 600}))),
        ),
        ("no exp", hs(&claims(json!({"exp": null})))),
        ("no sub", hs(&claims(json!({"sub": null})))),
        ("garbage", "not.a.token".to_owned()),
        (
            "rs256 token, no rsa key",
            sign(
                &claims(json!({})),
                Algorithm::RS256,
                None,
                &key("rsa.key", Algorithm::RS256),
            ),
        ),
    ];
    for (what, t) in cases {
        let r = gw.get("/v1/queues", &t).send().await.unwrap();
        assert_eq!(r.status(), 401, "{what}");
        assert_eq!(
            r.headers()["www-authenticate"],
            "Bearer error=\"invalid_token\"",
            "{what}"
        );
        let body = problem(r, 401, "unauthorized").await;
        assert!(
            !body["detail"].as_str().unwrap().contains(&t),
            "the token is not echoed"
        );
    }
    assert_eq!(
        list_status(&gw, &hs(&claims(json!({"exp": now_secs() - 10})))).await,
        200,
        "within the 30 s leeway"
    );
    assert_eq!(
        list_status(
            &gw,
            &hs(&claims(json!({"scope": ["gateway.tag:administrator"]})))
        )
        .await,
        200,
        "scope array"
    );
}

#[tokio::test]
async fn audience_can_be_relaxed_and_issuer_required() {
    let gw = start_gateway(|c| c.auth.verify_aud = false).await;
    assert_eq!(
        list_status(&gw, &hs(&claims(json!({"aud": null})))).await,
        200
    );
    let gw = start_gateway(|c| c.auth.issuer = Some("https://idp.test/".into())).await;
    assert_eq!(
        list_status(&gw, &hs(&claims(json!({})))).await,
        401,
        "iss required"
    );
    assert_eq!(
        list_status(&gw, &hs(&claims(json!({"iss": "https://evil.test/"})))).await,
        401
    );
    assert_eq!(
        list_status(&gw, &hs(&claims(json!({"iss": "https://idp.test/"})))).await,
        200
    );
    let gw = start_gateway(|c| c.auth.resource_server_id = "api".into()).await;
    let t = hs(&claims(
        json!({"aud": "api", "scope": "api.tag:administrator gateway.tag:administrator"}),
    ));
    assert_eq!(
        list_status(&gw, &t).await,
        200,
        "scopes under the configured resource server id"
    );
    let t = hs(&claims(
        json!({"aud": "api", "scope": "gateway.configure:*"}),
    ));
    refused(
        gw.put(&format!("/v1/queues/{}", unique("rs")), &t)
            .json(&json!({})),
        403,
        "forbidden",
    )
    .await;
}

#[tokio::test]
async fn anonymous_clients_get_the_anonymous_scope_only() {
    let gw =
        start_gateway(|c| c.auth.anonymous_scope = Some("gateway.write:amq.topic/public.#".into()))
            .await;
    let q = gw.queue("anon").await;
    gw.bind(&q, "amq.topic", "public.#").await;
    let r = gw
        .http
        .post(gw.url("/v1/exchanges/amq.topic/publish"))
        .json(&json!({"routing_key": "public.news", "body": "hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = gw
        .http
        .post(gw.url("/v1/exchanges/amq.topic/publish"))
        .json(&json!({"routing_key": "private.news", "body": "hi"}))
        .send()
        .await
        .unwrap();
    problem(r, 403, "forbidden").await;
    let got = gw.take(&q, 1).await;
    let sub = got[0]["properties"]["headers"]["x-gateway-sub"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(sub.starts_with("anonymous:"), "{sub}");
    let bad = gw.get("/v1/queues", "bad-token").send().await.unwrap();
    problem(bad, 401, "unauthorized").await;
}

#[tokio::test]
async fn permission_matrix() {
    let gw = start_gateway(|_| {}).await;
    let mine = format!("mine-{}", unique("m"));
    let other = gw.queue("other").await;
    // Keys are topic patterns (DESIGN.md §6): a default-exchange grant names the queue.
    let t = token(
        "pat",
        &format!(
            "gateway.configure:mine-* gateway.consume:mine-* gateway.write:amq.topic/sensors.* \
             gateway.read:amq.topic/news.# gateway.write:amq.default/{mine}"
        ),
    );
    // configure: only matching names.
    assert_eq!(
        status(
            gw.put(&format!("/v1/queues/{mine}"), &t)
                .json(&json!({"durable": false}))
        )
        .await,
        201
    );
    forbidden(
        gw.put(&format!("/v1/queues/{}", unique("theirs")), &t)
            .json(&json!({})),
    )
    .await;
    forbidden(gw.delete(&format!("/v1/queues/{other}"), &t)).await;
    forbidden(gw.delete(&format!("/v1/queues/{other}/contents"), &t)).await;
    forbidden(gw.get(&format!("/v1/queues/{other}"), &t)).await;
    // read: containment of the binding key.
    let bind = |key: &str| {
        gw.post(&format!("/v1/queues/{mine}/bindings"), &t)
            .json(&json!({"exchange": "amq.topic", "routing_key": key}))
    };
    assert_eq!(status(bind("news.*")).await, 201);
    assert_eq!(status(bind("news.#")).await, 201);
    forbidden(bind("#")).await;
    forbidden(bind("sports.*")).await;
    // write: exchange glob and key pattern.
    let publish = |ex: &str, key: &str| {
        gw.post(&format!("/v1/exchanges/{ex}/publish"), &t)
            .json(&json!({"routing_key": key, "body": "x"}))
    };
    assert_eq!(status(publish("amq.topic", "sensors.k1")).await, 200);
    forbidden(publish("amq.topic", "sensors.k1.x")).await;
    forbidden(publish("amq.direct", "sensors.k1")).await;
    assert_eq!(status(publish("amq.default", &mine)).await, 200);
    forbidden(publish("amq.default", &other)).await;
    // consume
    let get = |q: &str| {
        gw.post(&format!("/v1/queues/{q}/get"), &t)
            .json(&json!({"count": 5}))
    };
    let got: Value = get(&mine).send().await.unwrap().json().await.unwrap();
    assert_eq!(got["messages"].as_array().unwrap().len(), 1);
    forbidden(get(&other)).await;
    // Lists show only what the caller has a permission on.
    let list: Value = json_of(gw.get("/v1/queues?page_size=1000", &t)).await;
    let names: Vec<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, [mine.as_str()]);
    // A token with no scopes can do nothing.
    let nothing = token("nobody", "");
    forbidden(
        gw.put(&format!("/v1/queues/{mine}"), &nothing)
            .json(&json!({})),
    )
    .await;
    forbidden(gw.get("/metrics", &nothing)).await;
}

#[tokio::test]
async fn gateway_owned_names_need_an_administrator() {
    let gw = start_gateway(|_| {}).await;
    let t = token(
        "eve",
        "gateway.configure:* gateway.consume:* gateway.write:amq.default/# gateway.read:*/#",
    );
    for name in [
        "ws-alice.room",
        "mqtt-subscription-alice.c1qos0",
        "mqtt-session-alice.c1",
        "mqtt-shared-g.x",
        "amqp-gateway.control",
    ] {
        refused(
            gw.put(&format!("/v1/queues/{name}"), &t).json(&json!({})),
            403,
            "forbidden",
        )
        .await;
        assert_eq!(
            status(
                gw.put(&format!("/v1/queues/{name}"), &admin())
                    .json(&json!({"durable": false}))
            )
            .await,
            201,
            "{name}"
        );
        refused(
            gw.post(&format!("/v1/queues/{name}/get"), &t)
                .json(&json!({})),
            403,
            "forbidden",
        )
        .await;
        refused(
            gw.delete(&format!("/v1/queues/{name}/contents"), &t),
            403,
            "forbidden",
        )
        .await;
        refused(
            gw.post("/v1/exchanges/amq.default/publish", &t)
                .json(&json!({"routing_key": name, "body": "x"})),
            403,
            "forbidden",
        )
        .await;
        refused(
            gw.post(&format!("/v1/queues/{name}/bindings"), &t)
                .json(&json!({"exchange": "amq.topic", "routing_key": "x"})),
            403,
            "forbidden",
        )
        .await;
        assert_eq!(gw.depth(name).await, 0);
    }
}

#[tokio::test]
async fn subject_expansion_is_percent_encoded() {
    let gw = start_gateway(|_| {}).await;
    let t = token(
        "a.b*c",
        "gateway.configure:inbox-{sub} gateway.consume:inbox-{sub}",
    );
    assert_eq!(
        status(
            gw.put("/v1/queues/inbox-a%252Eb%252Ac", &t)
                .json(&json!({"durable": false}))
        )
        .await,
        201,
        "the encoded name is the subject's own"
    );
    let q: Value = json_of(gw.get("/v1/queues/inbox-a%252Eb%252Ac", &t)).await;
    assert_eq!(q["name"], "inbox-a%2Eb%2Ac");
    refused(
        gw.put("/v1/queues/inbox-a.bXc", &t).json(&json!({})),
        403,
        "forbidden",
    )
    .await;
}

#[tokio::test]
async fn pem_public_keys_one_algorithm_each() {
    let gw = start_gateway(|c| {
        c.auth.hs256_secret = None;
        c.auth.public_keys = vec![
            PublicKey {
                path: fixture("rsa.pub"),
                algorithm: "RS256".into(),
                kid: Some("r1".into()),
            },
            PublicKey {
                path: fixture("ec.pub"),
                algorithm: "ES256".into(),
                kid: Some("e1".into()),
            },
            PublicKey {
                path: fixture("ed.pub"),
                algorithm: "EdDSA".into(),
                kid: Some("d1".into()),
            },
        ];
    })
    .await;
    let c = claims(json!({}));
    let signed = |alg, kid, file| sign(&c, alg, kid, &key(file, alg));
    for (alg, kid, file) in [
        (Algorithm::RS256, "r1", "rsa.key"),
        (Algorithm::ES256, "e1", "ec.key"),
        (Algorithm::EdDSA, "d1", "ed.key"),
    ] {
        let t = signed(alg, Some(kid), file);
        assert_eq!(list_status(&gw, &t).await, 200, "{alg:?}");
    }
    let public_as_secret = EncodingKey::from_secret(&std::fs::read(fixture("rsa.pub")).unwrap());
    let refused = [
        (
            "another RSA key under r1",
            signed(Algorithm::RS256, Some("r1"), "other-rsa.key"),
        ),
        (
            "right key, other alg (PS256)",
            signed(Algorithm::PS256, Some("r1"), "rsa.key"),
        ),
        (
            "kid of the EC key with RS256",
            signed(Algorithm::RS256, Some("e1"), "rsa.key"),
        ),
        (
            "no kid among several keys",
            signed(Algorithm::RS256, None, "rsa.key"),
        ),
        (
            "unknown kid",
            signed(Algorithm::RS256, Some("zz"), "rsa.key"),
        ),
        (
            "HS256 signed with the public key",
            sign(&c, Algorithm::HS256, Some("r1"), &public_as_secret),
        ),
    ];
    for (what, t) in refused {
        assert_eq!(list_status(&gw, &t).await, 401, "{what}");
    }
}

#[tokio::test]
async fn a_single_key_accepts_tokens_without_kid() {
    let gw = start_gateway(|c| {
        c.auth.hs256_secret = None;
        c.auth.public_keys = vec![PublicKey {
            path: fixture("ec.pub"),
            algorithm: "ES256".into(),
            kid: None,
        }];
    })
    .await;
    let t = sign(
        &claims(json!({})),
        Algorithm::ES256,
        None,
        &key("ec.key", Algorithm::ES256),
    );
    assert_eq!(list_status(&gw, &t).await, 200);
}

#[tokio::test]
async fn bad_key_configuration_stops_start_up() {
    let mut both = common::test_config();
    both.auth.public_keys = vec![PublicKey {
        path: fixture("rsa.pub"),
        algorithm: "RS256".into(),
        kid: None,
    }];
    let e = amqp_gateway::start(both)
        .await
        .err()
        .expect("HS256 beside RSA is refused")
        .to_string();
    assert!(e.contains("hs256_secret"), "{e}");
    let mut wrong = common::test_config();
    wrong.auth.hs256_secret = None;
    wrong.auth.public_keys = vec![PublicKey {
        path: fixture("ec.pub"),
        algorithm: "RS256".into(),
        kid: None,
    }];
    let e = amqp_gateway::start(wrong)
        .await
        .err()
        .expect("an EC key is not RS256")
        .to_string();
    assert!(e.contains("ec.pub"), "{e}");
    let mut http = common::test_config();
    http.auth.hs256_secret = None;
    http.auth.jwks_url = Some("http://127.0.0.1:1/jwks".into());
    let e = amqp_gateway::start(http)
        .await
        .err()
        .expect("plain http JWKS refused")
        .to_string();
    assert!(e.contains("https"), "{e}");
}

fn jwk(name: &str, alg: Algorithm, kid: &str) -> Jwk {
    let mut jwk = Jwk::from_encoding_key(&key(name, alg), alg).unwrap();
    jwk.common.key_id = Some(kid.into());
    jwk
}

#[tokio::test]
async fn jwks_from_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwks.json");
    let mut no_alg = jwk("other-rsa.key", Algorithm::RS256, "noalg");
    no_alg.common.key_algorithm = None;
    let set = JwkSet {
        keys: vec![
            jwk("rsa.key", Algorithm::RS256, "r1"),
            jwk("ec.key", Algorithm::ES256, "e1"),
            no_alg,
        ],
    };
    std::fs::write(&path, serde_json::to_string(&set).unwrap()).unwrap();
    let gw = start_gateway(|c| {
        c.auth.hs256_secret = None;
        c.auth.jwks_file = Some(path.clone());
    })
    .await;
    let c = claims(json!({}));
    assert_eq!(
        list_status(
            &gw,
            &sign(
                &c,
                Algorithm::RS256,
                Some("r1"),
                &key("rsa.key", Algorithm::RS256)
            )
        )
        .await,
        200
    );
    assert_eq!(
        list_status(
            &gw,
            &sign(
                &c,
                Algorithm::ES256,
                Some("e1"),
                &key("ec.key", Algorithm::ES256)
            )
        )
        .await,
        200
    );
    assert_eq!(
        list_status(
            &gw,
            &sign(
                &c,
                Algorithm::RS256,
                Some("noalg"),
                &key("other-rsa.key", Algorithm::RS256)
            )
        )
        .await,
        401,
        "a JWK without alg is not used"
    );
    assert_eq!(
        list_status(
            &gw,
            &sign(
                &c,
                Algorithm::RS256,
                Some("r9"),
                &key("rsa.key", Algorithm::RS256)
            )
        )
        .await,
        401
    );
}

/// A one-route https server that serves the current JWKS and counts fetches.
struct JwksServer {
    url: String,
    ca: tempfile::NamedTempFile,
    set: Arc<Mutex<JwkSet>>,
    fetches: Arc<AtomicUsize>,
}

async fn jwks_server(initial: JwkSet) -> JwksServer {
    let (acceptor, ca) = common::tls::self_signed_localhost();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let set = Arc::new(Mutex::new(initial));
    let fetches = Arc::new(AtomicUsize::new(0));
    let (s, f) = (set.clone(), fetches.clone());
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, s, f) = (acceptor.clone(), s.clone(), f.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                f.fetch_add(1, Ordering::SeqCst);
                let body = serde_json::to_string(&*s.lock()).unwrap();
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tls.write_all(resp.as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    JwksServer {
        url: format!("https://localhost:{port}/jwks.json"),
        ca,
        set,
        fetches,
    }
}

#[tokio::test]
async fn jwks_from_an_https_url_with_rotation_on_unknown_kid() {
    let server = jwks_server(JwkSet {
        keys: vec![jwk("rsa.key", Algorithm::RS256, "r1")],
    })
    .await;
    let gw = start_gateway(|c| {
        c.auth.hs256_secret = None;
        c.auth.jwks_url = Some(server.url.clone());
        c.auth.jwks_ca = Some(server.ca.path().to_owned());
    })
    .await;
    assert_eq!(
        server.fetches.load(Ordering::SeqCst),
        1,
        "fetched once at start"
    );
    let c = claims(json!({}));
    assert_eq!(
        list_status(
            &gw,
            &sign(
                &c,
                Algorithm::RS256,
                Some("r1"),
                &key("rsa.key", Algorithm::RS256)
            )
        )
        .await,
        200
    );
    // The issuer rotates: a token with the new kid makes the gateway fetch again.
    server
        .set
        .lock()
        .keys
        .push(jwk("ec.key", Algorithm::ES256, "e2"));
    assert_eq!(
        list_status(
            &gw,
            &sign(
                &c,
                Algorithm::ES256,
                Some("e2"),
                &key("ec.key", Algorithm::ES256)
            )
        )
        .await,
        200
    );
    assert_eq!(server.fetches.load(Ordering::SeqCst), 2);
    // Another unknown kid right after does not hammer the issuer (at most one fetch per 30 s).
    assert_eq!(
        list_status(
            &gw,
            &sign(
                &c,
                Algorithm::RS256,
                Some("r9"),
                &key("rsa.key", Algorithm::RS256)
            )
        )
        .await,
        401
    );
    assert_eq!(server.fetches.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn an_untrusted_jwks_server_stops_start_up() {
    let server = jwks_server(JwkSet {
        keys: vec![jwk("rsa.key", Algorithm::RS256, "r1")],
    })
    .await;
    let mut c = common::test_config();
    c.auth.hs256_secret = None;
    c.auth.jwks_url = Some(server.url.clone());
    let e = amqp_gateway::start(c)
        .await
        .err()
        .expect("self-signed without jwks_ca")
        .to_string();
    assert!(e.contains("JWKS"), "{e}");
}
