//! Command-line flags. Each flag overrides one config key (the highest precedence); the
//! mapping is in [`Cli::overrides`].

use std::path::PathBuf;

use clap::Parser;

use crate::config::Overrides;

#[derive(Debug, Parser)]
#[command(
    name = "amqp-gateway",
    version,
    about = "REST, WebSocket and MQTT clients on one AMQP 0-9-1 engine"
)]
pub struct Cli {
    /// Configuration file (default: config/gateway.toml when it exists).
    #[arg(long, value_name = "FILE")]
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
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// log.level: a tracing filter such as info or amqp_gateway=debug.
    #[arg(long, value_name = "FILTER")]
    pub log_level: Option<String>,
    /// log.format: text or json.
    #[arg(long, value_name = "FORMAT")]
    pub log_format: Option<String>,
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
