//! The running service: starts on port 0, answers health and readiness, shuts down cleanly —
//! in-process through `lib.rs` and as the real binary under SIGTERM.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use amqp_gateway::{Config, StartError};
use common::WAIT;
use common::child::ChildGateway;

fn test_config() -> Config {
    let mut c = Config::default();
    c.http.listen = "127.0.0.1:0".parse().unwrap();
    c.metrics.listen = "127.0.0.1:0".parse().unwrap();
    c.mqtt.listen = "127.0.0.1:0".parse().unwrap();
    c.amqp.listen = "127.0.0.1:0".parse().unwrap();
    c.auth.hs256_secret = Some("service-test-secret-0123456789".into());
    c.shutdown_timeout = Duration::from_secs(2);
    // One gateway per data directory (the store's lock).
    c.engine.data_dir = common::scratch::dir("data-");
    c
}

#[tokio::test]
async fn starts_on_port_zero_serves_health_and_stops() {
    let gateway = amqp_gateway::start(test_config()).await.expect("start");
    let addr = gateway.addrs().http;
    assert_ne!(addr.port(), 0, "the real port is reported");
    let client = reqwest::Client::new();
    let health = client
        .get(format!("http://{addr}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    assert_eq!(
        health.json::<serde_json::Value>().await.unwrap()["status"],
        "ok"
    );
    let ready = client
        .get(format!("http://{addr}/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    assert_eq!(
        ready.json::<serde_json::Value>().await.unwrap()["status"],
        "ready"
    );

    tokio::time::timeout(WAIT, gateway.shutdown())
        .await
        .expect("shutdown completes");
    let after = reqwest::Client::new()
        .get(format!("http://{addr}/healthz"))
        .timeout(Duration::from_secs(1))
        .send()
        .await;
    assert!(after.is_err(), "nothing listens after shutdown");
}

#[tokio::test]
async fn a_shutdown_handle_stops_the_gateway() {
    let gateway = amqp_gateway::start(test_config()).await.unwrap();
    let handle = gateway.shutdown_handle();
    let waiting = tokio::spawn(gateway.wait());
    assert!(!waiting.is_finished());
    handle.trigger();
    tokio::time::timeout(WAIT, waiting)
        .await
        .expect("wait returns after the trigger")
        .unwrap();
}

#[tokio::test]
async fn an_address_in_use_is_a_clear_start_error() {
    let taken = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut c = test_config();
    c.http.listen = taken.local_addr().unwrap();
    match amqp_gateway::start(c).await {
        Err(e @ StartError::Bind { .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains(&taken.local_addr().unwrap().to_string()),
                "{msg}"
            );
        }
        Err(other) => panic!("expected a bind error, got {other}"),
        Ok(_) => panic!("started on a port that is in use"),
    }
}

#[tokio::test]
async fn an_unreachable_upstream_stops_start_up_saying_where() {
    let mut c = test_config();
    c.engine.kind = amqp_gateway::config::EngineKindConfig::Upstream;
    // Nothing listens on port 1.
    c.engine.upstream.url = Some("amqp://guest:guest@127.0.0.1:1/%2f".into());
    let err = amqp_gateway::start(c).await.err().expect("refused");
    assert!(
        matches!(
            err,
            StartError::Engine(amqp_gateway::engine::EngineError::Unavailable(_))
        ),
        "{err}"
    );
    assert!(err.to_string().contains("127.0.0.1:1"), "{err}");
}

/// Upstream on the machine's RabbitMQ: ready, and its two connections carry the instance's
/// name in RabbitMQ's management UI.
#[tokio::test]
async fn an_upstream_gateway_is_ready_and_named_in_rabbitmq() {
    let vhost = common::rabbit::Vhost::create().await;
    let gw = common::start_gateway(|c| common::under::on_vhost(c, &vhost)).await;
    let ready = gw.get("/readyz", "").send().await.unwrap();
    assert_eq!(ready.status(), 200);
    let names = || async {
        let conns: serde_json::Value = reqwest::Client::new()
            .get(format!(
                "{}/api/vhosts/{}/connections",
                common::rabbit::management_base(),
                vhost.name
            ))
            .basic_auth("guest", Some("guest"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let mut names: Vec<String> = conns
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|c| c["client_properties"]["connection_name"].as_str())
            .map(str::to_owned)
            .collect();
        names.sort();
        names
    };
    // The management API lists connections a moment after they open.
    common::eventually("both connections listed", || async {
        names().await.len() == 2
    })
    .await;
    let names = names().await;
    let pid = std::process::id().to_string();
    assert!(
        names[0].starts_with("amqp-gateway ") && names[0].ends_with(&format!(":{pid} consume")),
        "{names:?}"
    );
    assert!(names[1].ends_with(&format!(":{pid} publish")), "{names:?}");
    gw.gateway.shutdown().await;
}

/// The binary logs one line per listener with its bound address, serves, and exits 0 on
/// SIGTERM after logging that it stopped.
#[tokio::test]
async fn the_binary_runs_and_exits_cleanly_on_sigterm() {
    let data = tempfile::tempdir().unwrap();
    let mut gw = ChildGateway::start(data.path()).await;
    let health = reqwest::get(gw.url("/healthz")).await.unwrap();
    assert_eq!(health.status(), 200);
    let status = gw.signal("TERM").await;
    assert!(status.success(), "exit status {status:?}");
    gw.logged("gateway stopped").await;
}

/// mimalloc asks for transparent huge pages on its arenas, which made every idle connection
/// cost more resident memory (docs/bench.md): the binary turns them off for itself, unless the
/// operator set mimalloc's own `MIMALLOC_ALLOW_THP`.
#[cfg(all(target_os = "linux", not(feature = "system-allocator")))]
#[tokio::test]
async fn the_binary_keeps_off_transparent_huge_pages_unless_told() {
    let data = tempfile::tempdir().unwrap();
    let mut gw = ChildGateway::start(data.path()).await;
    assert_eq!(
        gw.status("THP_enabled"),
        "0",
        "THP disabled for the gateway"
    );
    assert!(gw.signal("TERM").await.success());

    let data = tempfile::tempdir().unwrap();
    let mut gw = ChildGateway::start_with(data.path(), &[("MIMALLOC_ALLOW_THP", "1")]).await;
    let inherited = common::child::proc_status("self", "THP_enabled");
    assert_eq!(
        gw.status("THP_enabled"),
        inherited,
        "MIMALLOC_ALLOW_THP=1 leaves the flag as the gateway was started with"
    );
    assert!(gw.signal("TERM").await.success());
}

#[tokio::test]
async fn without_a_token_key_the_gateway_refuses_to_start() {
    let mut c = test_config();
    c.auth.hs256_secret = None;
    let err = amqp_gateway::start(c).await.err().expect("refused");
    assert!(matches!(err, StartError::NoTokenKey));
    assert!(
        err.to_string().contains("--dev"),
        "says how to fix it: {err}"
    );
    // An anonymous-only gateway (closed networks, test rigs) may start.
    let mut anon = test_config();
    anon.auth.hs256_secret = None;
    anon.auth.anonymous_scope = Some("gateway.read:amq.topic/#".into());
    amqp_gateway::start(anon)
        .await
        .expect("starts")
        .shutdown()
        .await;
}

/// `--dev` keeps a 0600 secret in the data dir and prints one administrator token to stdout
/// (not to the log); `token` signs with the same secret.
#[tokio::test]
async fn dev_mode_prints_an_admin_token_that_works() {
    let data = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_amqp-gateway"))
        .args([
            "--dev",
            "--http-listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
        ])
        .args(["--log-format", "json", "--data-dir"])
        .arg(data.path())
        .env_remove("GATEWAY_AUTH__HS256_SECRET")
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let (addr, token) = tokio::time::timeout(WAIT, async {
        let mut addr = None;
        while let Some(line) = rx.recv().await {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                assert!(!line.contains("eyJ"), "a token reached the log: {line}");
                if v["fields"]["listener"] == "http" {
                    addr = v["fields"]["addr"].as_str().map(str::to_owned);
                }
            } else if line.starts_with("eyJ") {
                return (addr.expect("listener logged before the token"), line);
            }
        }
        panic!("no token printed");
    })
    .await
    .expect("token within the wait");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(data.path().join("dev-secret"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let client = reqwest::Client::new();
    let queues = client
        .get(format!("http://{addr}/v1/queues"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(queues.status(), 200);
    let minted = Command::new(env!("CARGO_BIN_EXE_amqp-gateway"))
        .args([
            "token",
            "--sub",
            "tour",
            "--scope",
            "gateway.configure:tour-*",
            "--ttl",
            "5m",
            "--data-dir",
        ])
        .arg(data.path())
        .env_remove("GATEWAY_AUTH__HS256_SECRET")
        .output()
        .unwrap();
    assert!(
        minted.status.success(),
        "{}",
        String::from_utf8_lossy(&minted.stderr)
    );
    let minted = String::from_utf8(minted.stdout).unwrap().trim().to_owned();
    let put = client
        .put(format!("http://{addr}/v1/queues/tour-q"))
        .bearer_auth(&minted)
        .json(&serde_json::json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 201);
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
}

#[test]
fn the_binary_refuses_bad_config_naming_the_key() {
    let out = Command::new(env!("CARGO_BIN_EXE_amqp-gateway"))
        .args(["--http-listen", "127.0.0.1:0"])
        .env("GATEWAY_LIMITS__PUBLISH_RATE", "fast")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("limits.publish_rate"), "{stderr}");
}
