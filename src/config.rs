//! The gateway's one typed configuration (DESIGN.md §8): defaults here, documented in
//! `config/gateway.toml`; then the file; then `GATEWAY_…` environment variables (`__` nests);
//! then command-line flags. Everything is checked before anything starts, and a bad value stops
//! start-up with a message naming the key and where the value came from.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytesize::ByteSize;
use figment::providers::{Format, Toml};
use figment::value::{Dict, Map};
use figment::{Figment, Metadata, Profile, Provider};
use serde::{Deserialize, Serialize};

mod validate;

pub use self::validate::validate;

/// The file read when `--config` is not given (when it exists).
pub const DEFAULT_CONFIG_FILE: &str = "config/gateway.toml";
pub const ENV_PREFIX: &str = "GATEWAY_";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub http: HttpConfig,
    pub mqtt: MqttConfig,
    pub amqp: AmqpConfig,
    pub metrics: MetricsConfig,
    pub engine: EngineConfig,
    pub auth: AuthConfig,
    pub ws: WsConfig,
    pub sse: SseConfig,
    pub limits: LimitsConfig,
    pub tls: TlsConfig,
    pub log: LogConfig,
    /// How long shutdown waits for connections to finish before closing them.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            http: HttpConfig::default(),
            mqtt: MqttConfig::default(),
            amqp: AmqpConfig::default(),
            metrics: MetricsConfig::default(),
            engine: EngineConfig::default(),
            auth: AuthConfig::default(),
            ws: WsConfig::default(),
            sse: SseConfig::default(),
            limits: LimitsConfig::default(),
            tls: TlsConfig::default(),
            log: LogConfig::default(),
            shutdown_timeout: Duration::from_secs(10),
        }
    }
}

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("default addresses are valid")
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    pub listen: SocketAddr,
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// The largest request head (request line and headers) accepted; more is answered 431.
    pub max_header_bytes: ByteSize,
    pub max_batch: usize,
    #[serde(with = "humantime_serde")]
    pub idempotency_window: Duration,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: addr("0.0.0.0:8080"),
            header_read_timeout: Duration::from_secs(10),
            max_header_bytes: ByteSize::kib(64),
            max_batch: 1000,
            idempotency_window: Duration::from_secs(300),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TopicMapping {
    /// `/` and `.` swapped: lossless (DESIGN.md §3).
    Swap,
    /// RabbitMQ's plugin: `/` → `.` only.
    Rabbitmq,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    pub listen: SocketAddr,
    pub tls_listen: SocketAddr,
    pub exchange: String,
    pub topic_mapping: TopicMapping,
    pub receive_maximum: u16,
    pub max_inflight: u16,
    #[serde(with = "humantime_serde")]
    pub max_session_expiry: Duration,
    #[serde(with = "humantime_serde")]
    pub takeover_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    pub retained_stream_bytes: ByteSize,
    /// Server Keep Alive cap for MQTT 5 clients; `0s` = none.
    #[serde(with = "humantime_serde")]
    pub max_keep_alive: Duration,
    /// The MQTT 5 user property that carries the publisher's subject (`x-gateway-sub`) to
    /// MQTT subscribers; unset = none (deliveries carry only what the publisher sent).
    pub sender_property: Option<String>,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            listen: addr("0.0.0.0:1884"),
            tls_listen: addr("0.0.0.0:8883"),
            exchange: "amq.topic".into(),
            topic_mapping: TopicMapping::Swap,
            receive_maximum: 64,
            max_inflight: 32,
            max_session_expiry: Duration::from_secs(86_400),
            takeover_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(10),
            retained_stream_bytes: ByteSize::gib(1),
            max_keep_alive: Duration::ZERO,
            sender_property: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AmqpConfig {
    pub listen: SocketAddr,
    /// AMQPS; used only when `tls.cert` and `tls.key` are set.
    pub tls_listen: SocketAddr,
    /// The heartbeat the gateway proposes in `connection.tune` (the client may lower it; zero
    /// turns heartbeats off). No frame for two intervals closes the connection.
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,
    /// From the TCP accept to `connection.open`.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
}

impl Default for AmqpConfig {
    fn default() -> Self {
        AmqpConfig {
            listen: addr("0.0.0.0:5673"),
            tls_listen: addr("0.0.0.0:5671"),
            heartbeat: Duration::from_secs(60),
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    pub listen: SocketAddr,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: addr("127.0.0.1:9090"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineKindConfig {
    Embedded,
    Upstream,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fsync {
    /// Group commit: one fsync per batch, at most `fsync_max_delay` after the first write.
    Batch,
    /// An fsync per write.
    Always,
    /// Leave it to the OS.
    Never,
}

/// `engine.memory_high_watermark`: a share of the machine's memory (`"40%"`) or a size.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Watermark {
    Fraction(f64),
    Bytes(ByteSize),
}

impl Watermark {
    /// In bytes, given the memory available to the process (a share of nothing is no limit).
    pub fn resolve(self, available: Option<u64>) -> Option<u64> {
        match self {
            Watermark::Bytes(b) => Some(b.as_u64()),
            Watermark::Fraction(f) => available.map(|a| (a as f64 * f) as u64),
        }
    }
}

impl Serialize for Watermark {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Watermark::Fraction(f) => s.serialize_str(&format!("{}%", f * 100.0)),
            Watermark::Bytes(b) => s.serialize_str(&b.to_string()),
        }
    }
}

impl<'de> Deserialize<'de> for Watermark {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let s = String::deserialize(d)?;
        if let Some(pct) = s.trim().strip_suffix('%') {
            let pct: f64 = pct
                .trim()
                .parse()
                .map_err(|_| D::Error::custom(format!("'{s}' is not a percentage")))?;
            if !(pct > 0.0 && pct <= 100.0) {
                return Err(D::Error::custom(
                    "a percentage must be above 0 and at most 100",
                ));
            }
            return Ok(Watermark::Fraction(pct / 100.0));
        }
        s.parse::<ByteSize>()
            .map(Watermark::Bytes)
            .map_err(|_| D::Error::custom(format!("'{s}' is neither a percentage nor a size")))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// `amqp://user:pass@host:5672/vhost`
    pub url: Option<String>,
    /// RabbitMQ HTTP API, for listings in upstream mode.
    pub management_url: Option<String>,
    /// AMQP heartbeat asked of the broker (a `heartbeat` in the URL wins).
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,
    /// PEM file of CA certificates trusted for an `amqps://` url besides the system's.
    pub tls_ca: Option<PathBuf>,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            url: None,
            management_url: None,
            heartbeat: Duration::from_secs(30),
            tls_ca: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    pub kind: EngineKindConfig,
    pub data_dir: PathBuf,
    pub memory_high_watermark: Watermark,
    pub fsync: Fsync,
    #[serde(with = "humantime_serde")]
    pub fsync_max_delay: Duration,
    /// Below this much free space on `data_dir`'s file system, publishes are refused (the disk
    /// alarm, as RabbitMQ's `disk_free_limit`).
    pub disk_free_limit: ByteSize,
    pub upstream: UpstreamConfig,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            kind: EngineKindConfig::Embedded,
            data_dir: PathBuf::from("./data"),
            memory_high_watermark: Watermark::Fraction(0.4),
            fsync: Fsync::Batch,
            fsync_max_delay: Duration::from_millis(2),
            disk_free_limit: ByteSize::mb(50),
            upstream: UpstreamConfig::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublicKey {
    pub path: PathBuf,
    /// `RS256`, `ES256` or `EdDSA`.
    pub algorithm: String,
    pub kid: Option<String>,
}

#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    pub hs256_secret: Option<String>,
    pub public_keys: Vec<PublicKey>,
    pub jwks_url: Option<String>,
    pub jwks_file: Option<PathBuf>,
    pub jwks_ca: Option<PathBuf>,
    #[serde(with = "humantime_serde")]
    pub jwks_refresh: Duration,
    pub issuer: Option<String>,
    pub resource_server_id: String,
    pub verify_aud: bool,
    pub scope_claim: String,
    #[serde(with = "humantime_serde")]
    pub leeway: Duration,
    pub anonymous_scope: Option<String>,
}

/// Never prints the secret.
impl std::fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthConfig")
            .field(
                "hs256_secret",
                &self.hs256_secret.as_ref().map(|_| "<redacted>"),
            )
            .field("public_keys", &self.public_keys)
            .field("jwks_url", &self.jwks_url)
            .field("jwks_file", &self.jwks_file)
            .field("issuer", &self.issuer)
            .field("resource_server_id", &self.resource_server_id)
            .field("anonymous_scope", &self.anonymous_scope)
            .finish_non_exhaustive()
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            hs256_secret: None,
            public_keys: Vec::new(),
            jwks_url: None,
            jwks_file: None,
            jwks_ca: None,
            jwks_refresh: Duration::from_secs(600),
            issuer: None,
            resource_server_id: "gateway".into(),
            verify_aud: true,
            scope_claim: "scope".into(),
            leeway: Duration::from_secs(30),
            anonymous_scope: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WsConfig {
    pub allow_query_token: bool,
    #[serde(with = "humantime_serde")]
    pub auth_timeout: Duration,
    pub max_prefetch: u16,
    pub auto_ack_window: u16,
    #[serde(with = "humantime_serde")]
    pub ack_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub durable_expiry: Duration,
}

impl Default for WsConfig {
    fn default() -> Self {
        WsConfig {
            allow_query_token: false,
            auth_timeout: Duration::from_secs(5),
            max_prefetch: 1000,
            auto_ack_window: 100,
            ack_timeout: Duration::from_secs(30 * 60),
            durable_expiry: Duration::from_secs(86_400),
        }
    }
}

/// Server-Sent Events (`GET /v1/sse`, docs/sse.md); auth and durable expiry are `[ws]`'s.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SseConfig {
    /// A comment line this often keeps proxies from closing an idle stream.
    #[serde(with = "humantime_serde")]
    pub keepalive: Duration,
    /// The reconnection delay the stream asks `EventSource` for (its `retry` field).
    #[serde(with = "humantime_serde")]
    pub retry: Duration,
    /// Deliveries a durable stream holds unacknowledged before it ends so the browser
    /// reconnects with `Last-Event-ID`, which acknowledges them.
    pub durable_window: u16,
}

impl Default for SseConfig {
    fn default() -> Self {
        SseConfig {
            keepalive: Duration::from_secs(15),
            retry: Duration::from_millis(500),
            durable_window: 1000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Messages per second per connection.
    pub publish_rate: u32,
    pub publish_burst: u32,
    /// Messages per second per subject, across its connections.
    pub subject_publish_rate: u32,
    /// Body bytes per second per connection.
    pub publish_bytes_rate: ByteSize,
    #[serde(with = "humantime_serde")]
    pub overrun_grace: Duration,
    pub max_message_bytes: ByteSize,
    pub max_pending_in: ByteSize,
    pub outbound_buffer_messages: usize,
    pub outbound_buffer_bytes: ByteSize,
    /// The longest a publisher waits, per stall, for a buffer its messages landed in to drain
    /// below its low-water mark (DESIGN.md §7).
    #[serde(with = "humantime_serde")]
    pub pace_max_wait: Duration,
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
    pub max_connections: usize,
    pub max_connections_per_subject: usize,
    pub max_subscriptions: usize,
    pub max_unauthenticated: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            publish_rate: 1000,
            publish_burst: 2000,
            subject_publish_rate: 10_000,
            publish_bytes_rate: ByteSize::mib(16),
            overrun_grace: Duration::from_secs(10),
            max_message_bytes: ByteSize::mib(1),
            max_pending_in: ByteSize::mib(1),
            outbound_buffer_messages: 1000,
            outbound_buffer_bytes: ByteSize::mib(8),
            pace_max_wait: Duration::from_millis(100),
            write_timeout: Duration::from_secs(30),
            max_connections: 100_000,
            max_connections_per_subject: 1000,
            max_subscriptions: 1000,
            max_unauthenticated: 1000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A `tracing` filter: `info`, `amqp_gateway=debug,info`, …; `RUST_LOG` overrides it.
    pub level: String,
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

/// Why a configuration was refused. The message names the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {0}: not found")]
    MissingFile(PathBuf),
    #[error("{0}")]
    Invalid(String),
}

/// Overrides from command-line flags, as dotted key → value.
#[derive(Debug, Default, Clone)]
pub struct Overrides(Vec<(&'static str, figment::value::Value)>);

impl Overrides {
    pub fn set(&mut self, key: &'static str, value: impl Into<figment::value::Value>) {
        self.0.push((key, value.into()));
    }
}

impl Provider for Overrides {
    fn metadata(&self) -> Metadata {
        Metadata::named("command-line flag")
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let mut root = Dict::new();
        for (key, value) in &self.0 {
            let mut parts: Vec<&str> = key.split('.').collect();
            let leaf = parts.pop().unwrap_or(key);
            let mut dict = &mut root;
            for part in parts {
                let entry = dict
                    .entry(part.to_owned())
                    .or_insert_with(|| figment::value::Value::from(Dict::new()));
                dict = match entry {
                    figment::value::Value::Dict(_, d) => d,
                    _ => return Err(figment::Error::from(format!("flag key {key} clashes"))),
                };
            }
            dict.insert(leaf.to_owned(), value.clone());
        }
        Ok(Profile::Default.collect(root))
    }
}

/// The dotted names of every key the gateway knows (leaves of the default config).
pub fn known_keys() -> BTreeSet<String> {
    fn walk(prefix: &str, value: &serde_json::Value, out: &mut BTreeSet<String>) {
        match value {
            serde_json::Value::Object(map) => {
                for (k, v) in map {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&key, v, out);
                }
            }
            _ => {
                out.insert(prefix.to_owned());
            }
        }
    }
    let mut out = BTreeSet::new();
    if let Ok(value) = serde_json::to_value(Config::default()) {
        walk("", &value, &mut out);
    }
    out
}

/// A loaded configuration and the warnings to log once logging is up.
#[derive(Debug)]
pub struct Loaded {
    pub config: Config,
    pub warnings: Vec<String>,
}

/// Loads the configuration: defaults < file < environment (`env` holds the variables, so tests
/// need not touch the process's) < flags.
pub fn load(
    file: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
    overrides: Overrides,
) -> Result<Loaded, ConfigError> {
    let mut figment = Figment::new();
    match file {
        Some(path) if !path.exists() => return Err(ConfigError::MissingFile(path.to_owned())),
        Some(path) => figment = figment.merge(Toml::file_exact(path)),
        None if Path::new(DEFAULT_CONFIG_FILE).exists() => {
            figment = figment.merge(Toml::file_exact(DEFAULT_CONFIG_FILE));
        }
        None => {}
    }

    let known = known_keys();
    let mut warnings = Vec::new();
    let mut vars: Vec<(String, String)> = Vec::new();
    for (name, value) in env {
        let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        let key = rest.to_ascii_lowercase().replace("__", ".");
        if known.contains(&key) {
            vars.push((name, value));
        } else {
            warnings.push(format!(
                "ignoring environment variable {name}: the gateway has no config key `{key}`"
            ));
        }
    }
    figment = figment.merge(EnvVars(vars));
    figment = figment.merge(overrides);

    let config: Config = figment.extract().map_err(describe)?;
    validate(&config)?;
    Ok(Loaded { config, warnings })
}

/// `GATEWAY_…` variables, parsed as figment's `Env` parses them (`Value::from_str`), from a
/// given list rather than the process environment so tests can run in parallel.
struct EnvVars(Vec<(String, String)>);

impl Provider for EnvVars {
    fn metadata(&self) -> Metadata {
        Metadata::named("environment variable")
            .interpolater(|_, keys| format!("{ENV_PREFIX}{}", keys.join("__").to_ascii_uppercase()))
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let mut root = Dict::new();
        for (name, value) in &self.0 {
            let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            let key = rest.to_ascii_lowercase().replace("__", ".");
            let parsed: figment::value::Value = value
                .parse()
                .unwrap_or_else(|_| figment::value::Value::from(value.clone()));
            let nested = key.rsplit('.').fold(parsed, |acc, part| {
                let mut d = Dict::new();
                d.insert(part.to_owned(), acc);
                figment::value::Value::from(d)
            });
            if let figment::value::Value::Dict(_, d) = nested {
                merge_dict(&mut root, d);
            }
        }
        Ok(Profile::Default.collect(root))
    }
}

fn merge_dict(into: &mut Dict, from: Dict) {
    for (k, v) in from {
        match (into.get_mut(&k), v) {
            (Some(figment::value::Value::Dict(_, existing)), figment::value::Value::Dict(_, d)) => {
                merge_dict(existing, d)
            }
            (_, v) => {
                into.insert(k, v);
            }
        }
    }
}

/// Renders figment's error as "config key `a.b` (from …): what is wrong".
fn describe(errors: figment::Error) -> ConfigError {
    let lines: Vec<String> = errors
        .into_iter()
        .map(|e| {
            let key = e.path.join(".");
            let source = e.metadata.as_ref().map(|md| {
                let name = md.interpolate(&Profile::Default, &e.path);
                match &md.source {
                    Some(src) => format!("{} {src}", md.name),
                    None if md.name == "environment variable" => format!("{} {name}", md.name),
                    None => md.name.to_string(),
                }
            });
            match (key.is_empty(), source) {
                (false, Some(src)) => format!("config key `{key}` (from {src}): {}", e.kind),
                (false, None) => format!("config key `{key}`: {}", e.kind),
                (true, Some(src)) => format!("config (from {src}): {}", e.kind),
                (true, None) => format!("config: {}", e.kind),
            }
        })
        .collect();
    ConfigError::Invalid(lines.join("\n"))
}
