//! Configuration: precedence defaults < file < environment < flags, and bad values refused with
//! the key named.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use amqp_gateway::config::{self, Config, ConfigError, EngineKindConfig, Overrides, Watermark};
use bytesize::ByteSize;

fn file(contents: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    std::fs::File::create(&path)
        .unwrap()
        .write_all(contents.as_bytes())
        .unwrap();
    (dir, path)
}

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn err(result: Result<config::Loaded, ConfigError>) -> String {
    match result {
        Ok(loaded) => panic!("expected an error, got {:?}", loaded.config),
        Err(e) => e.to_string(),
    }
}

#[test]
fn defaults_match_the_design() {
    let c = config::load(None, env(&[]), Overrides::default())
        .unwrap()
        .config;
    // The test runs from the crate root, where config/gateway.toml documents the defaults: the
    // file must not change any of them.
    assert_eq!(c, Config::default());
    assert_eq!(c.http.listen.to_string(), "0.0.0.0:8080");
    assert_eq!(c.mqtt.listen.to_string(), "0.0.0.0:1884");
    assert_eq!(c.amqp.listen.to_string(), "0.0.0.0:5673");
    assert_eq!(c.metrics.listen.to_string(), "127.0.0.1:9090");
    assert_eq!(c.engine.kind, EngineKindConfig::Embedded);
    assert_eq!(c.limits.max_message_bytes, ByteSize::mib(1));
    assert_eq!(c.limits.publish_rate, 1000);
    assert_eq!(c.mqtt.max_session_expiry, Duration::from_secs(86_400));
    assert_eq!(c.engine.memory_high_watermark, Watermark::Fraction(0.4));
}

#[test]
fn the_documented_file_names_every_key() {
    let text = std::fs::read_to_string("config/gateway.toml").unwrap();
    let parsed: toml::Table = text.parse().unwrap();
    let mut missing = Vec::new();
    for key in config::known_keys() {
        let mut node = Some(&parsed);
        let parts: Vec<&str> = key.split('.').collect();
        for part in &parts[..parts.len() - 1] {
            node = node.and_then(|t| t.get(*part)).and_then(|v| v.as_table());
        }
        let leaf = parts[parts.len() - 1];
        let documented =
            node.is_some_and(|t| t.contains_key(leaf)) || text.contains(&format!("# {leaf} ="));
        if !documented {
            missing.push(key);
        }
    }
    assert!(
        missing.is_empty(),
        "config/gateway.toml does not document: {missing:?}"
    );
}

#[test]
fn file_then_env_then_flags() {
    let (_dir, path) = file(
        r#"
        [http]
        listen = "127.0.0.1:1111"
        [mqtt]
        listen = "127.0.0.1:2222"
        [limits]
        publish_rate = 5
        max_message_bytes = "2MiB"
        "#,
    );
    let vars = env(&[
        ("GATEWAY_MQTT__LISTEN", "127.0.0.1:3333"),
        ("GATEWAY_LIMITS__PUBLISH_RATE", "7"),
        ("GATEWAY_SHUTDOWN_TIMEOUT", "3s"),
        (
            "GATEWAY_ENGINE__UPSTREAM__URL",
            "amqp://guest:guest@127.0.0.1:5672/%2f",
        ),
        ("OTHER_VAR", "ignored"),
    ]);
    let mut flags = Overrides::default();
    flags.set("mqtt.listen", "127.0.0.1:4444");
    let c = config::load(Some(&path), vars, flags).unwrap().config;
    assert_eq!(c.http.listen.to_string(), "127.0.0.1:1111", "file");
    assert_eq!(
        c.mqtt.listen.to_string(),
        "127.0.0.1:4444",
        "flag beats env and file"
    );
    assert_eq!(c.limits.publish_rate, 7, "env beats file");
    assert_eq!(
        c.limits.max_message_bytes,
        ByteSize::mib(2),
        "file size string"
    );
    assert_eq!(
        c.shutdown_timeout,
        Duration::from_secs(3),
        "humantime from env"
    );
    assert_eq!(
        c.engine.upstream.url.as_deref(),
        Some("amqp://guest:guest@127.0.0.1:5672/%2f"),
        "nested env key"
    );
}

#[test]
fn unknown_env_vars_warn_and_are_ignored() {
    let loaded = config::load(
        None,
        env(&[
            ("GATEWAY_HTTP__LISTN", "x"),
            ("GATEWAY_LIMITS__PUBLISH_RATE", "9"),
        ]),
        Overrides::default(),
    )
    .unwrap();
    assert_eq!(loaded.config.limits.publish_rate, 9);
    assert_eq!(loaded.warnings.len(), 1);
    assert!(
        loaded.warnings[0].contains("GATEWAY_HTTP__LISTN"),
        "{:?}",
        loaded.warnings
    );
}

#[test]
fn bad_values_name_the_key_and_source() {
    let e = err(config::load(
        None,
        env(&[("GATEWAY_LIMITS__MAX_MESSAGE_BYTES", "lots")]),
        Overrides::default(),
    ));
    assert!(
        e.contains("limits.max_message_bytes") && e.contains("GATEWAY_LIMITS__MAX_MESSAGE_BYTES"),
        "{e}"
    );

    let mut flags = Overrides::default();
    flags.set("http.listen", "not-an-address");
    let e = err(config::load(None, env(&[]), flags));
    assert!(
        e.contains("http.listen") && e.contains("command-line flag"),
        "{e}"
    );

    let (_dir, path) = file("[ws]\nauth_timeout = \"five seconds\"\n");
    let e = err(config::load(Some(&path), env(&[]), Overrides::default()));
    // figment names the file relative to the working directory; its name is always there.
    assert!(
        e.contains("ws.auth_timeout") && e.contains("TOML file") && e.contains("gateway.toml"),
        "{e}"
    );
    let _ = &path;

    let (_dir, path) = file("[limits]\npublish_rat = 5\n");
    let e = err(config::load(Some(&path), env(&[]), Overrides::default()));
    assert!(
        e.contains("publish_rat"),
        "unknown file keys are refused: {e}"
    );

    let (_dir, path) = file("[engine]\nkind = \"cloud\"\n");
    let e = err(config::load(Some(&path), env(&[]), Overrides::default()));
    assert!(e.contains("engine.kind"), "{e}");
}

#[test]
fn cross_field_rules_name_the_key() {
    for (vars, key) in [
        (
            vec![("GATEWAY_LIMITS__PUBLISH_RATE", "0")],
            "limits.publish_rate",
        ),
        (
            vec![("GATEWAY_LIMITS__MAX_MESSAGE_BYTES", "0")],
            "limits.max_message_bytes",
        ),
        (
            vec![("GATEWAY_MQTT__RECEIVE_MAXIMUM", "0")],
            "mqtt.receive_maximum",
        ),
        (
            vec![("GATEWAY_MQTT__RECEIVE_MAXIMUM", "70000")],
            "mqtt.receive_maximum",
        ),
        (
            vec![("GATEWAY_ENGINE__KIND", "upstream")],
            "engine.upstream.url",
        ),
        (
            vec![("GATEWAY_ENGINE__MEMORY_HIGH_WATERMARK", "140%")],
            "engine.memory_high_watermark",
        ),
        (vec![("GATEWAY_LOG__LEVEL", "[[[")], "log.level"),
        (vec![("GATEWAY_WS__AUTH_TIMEOUT", "0s")], "ws.auth_timeout"),
        (
            vec![("GATEWAY_MQTT__MAX_KEEP_ALIVE", "70000s")],
            "mqtt.max_keep_alive",
        ),
        (
            vec![("GATEWAY_MQTT__MAX_KEEP_ALIVE", "1500ms")],
            "mqtt.max_keep_alive",
        ),
        (
            vec![("GATEWAY_MQTT__SENDER_PROPERTY", "")],
            "mqtt.sender_property",
        ),
    ] {
        let e = err(config::load(None, env(&vars), Overrides::default()));
        assert!(e.contains(key), "{vars:?}: {e}");
    }
}

#[test]
fn watermark_takes_a_share_or_a_size() {
    let c = config::load(
        None,
        env(&[("GATEWAY_ENGINE__MEMORY_HIGH_WATERMARK", "2GiB")]),
        Overrides::default(),
    )
    .unwrap()
    .config;
    assert_eq!(
        c.engine.memory_high_watermark,
        Watermark::Bytes(ByteSize::gib(2))
    );
}

#[test]
fn a_missing_config_file_is_an_error() {
    let e = err(config::load(
        Some(std::path::Path::new("/nonexistent/gw.toml")),
        env(&[]),
        Overrides::default(),
    ));
    assert!(e.contains("/nonexistent/gw.toml"), "{e}");
}
