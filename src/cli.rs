//! Command-line flags and subcommands. Each flag overrides one config key (the highest
//! precedence); the mapping is in [`Cli::overrides`].

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::Overrides;

#[derive(Debug, Parser)]
#[command(
    name = "amqp-gateway",
    version,
    about = "REST, WebSocket and MQTT clients on one AMQP 0-9-1 engine"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Configuration file (default: config/gateway.toml when it exists).
    #[arg(long, value_name = "FILE", global = true)]
    pub config: Option<PathBuf>,
    /// http.listen: REST, /ws and /mqtt.
    #[arg(long, value_name = "ADDR")]
    pub http_listen: Option<String>,
    /// mqtt.listen: MQTT over TCP.
    #[arg(long, value_name = "ADDR")]
    pub mqtt_listen: Option<String>,
    /// amqp.listen: AMQP 0-9-1 (embedded engine).
    #[arg(long, value_name = "ADDR")]
    pub amqp_listen: Option<String>,
    /// metrics.listen: Prometheus metrics.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<String>,
    /// engine.kind: embedded or upstream.
    #[arg(long, value_name = "KIND")]
    pub engine: Option<String>,
    /// engine.upstream.url, e.g. amqp://guest:guest@127.0.0.1:5672/%2f
    #[arg(long, value_name = "URL")]
    pub upstream_url: Option<String>,
    /// engine.data_dir
    #[arg(long, value_name = "DIR", global = true)]
    pub data_dir: Option<PathBuf>,
    /// log.level: a tracing filter such as info or amqp_gateway=debug.
    #[arg(long, value_name = "FILTER")]
    pub log_level: Option<String>,
    /// log.format: text or json.
    #[arg(long, value_name = "FORMAT")]
    pub log_format: Option<String>,
    /// Development mode (embedded engine, no key configured): keep a random secret in
    /// {data_dir}/dev-secret and print one administrator token to stdout.
    #[arg(long)]
    pub dev: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Mint an HS256 token with the configured secret (or the --dev secret) and print it.
    Token(TokenArgs),
    /// Print the OpenAPI document (the content of openapi/openapi.json).
    Openapi,
}

#[derive(Debug, Args)]
pub struct TokenArgs {
    /// The token's subject (`sub`).
    #[arg(long)]
    pub sub: String,
    /// Space-separated scopes, e.g. "gateway.write:amq.topic/# gateway.read:amq.topic/#".
    #[arg(long, default_value = "")]
    pub scope: String,
    /// Lifetime, e.g. 15m, 1h, 7d.
    #[arg(long, default_value = "1h")]
    pub ttl: humantime::Duration,
}

impl Cli {
    pub fn overrides(&self) -> Overrides {
        let mut o = Overrides::default();
        let strings = [
            ("http.listen", &self.http_listen),
            ("mqtt.listen", &self.mqtt_listen),
            ("amqp.listen", &self.amqp_listen),
            ("metrics.listen", &self.metrics_listen),
            ("engine.kind", &self.engine),
            ("engine.upstream.url", &self.upstream_url),
            ("log.level", &self.log_level),
            ("log.format", &self.log_format),
        ];
        for (key, value) in strings {
            if let Some(v) = value {
                o.set(key, v.clone());
            }
        }
        if let Some(dir) = &self.data_dir {
            o.set("engine.data_dir", dir.to_string_lossy().into_owned());
        }
        o
    }
}
