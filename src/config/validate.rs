//! The configuration rules serde cannot express: ranges, non-zero durations, names.

use bytesize::ByteSize;

use super::{AmqpConfig, Config, ConfigError, EngineKindConfig, LimitsConfig, MqttConfig};

fn invalid(key: &str, why: impl std::fmt::Display) -> ConfigError {
    ConfigError::Invalid(format!("config key `{key}`: {why}"))
}

/// Checks the rules serde cannot express.
pub fn validate(c: &Config) -> Result<(), ConfigError> {
    validate_limits(&c.limits)?;
    validate_mqtt(&c.mqtt)?;
    validate_amqp(&c.amqp)?;
    if c.ws.max_prefetch == 0 {
        return Err(invalid("ws.max_prefetch", "must be between 1 and 65535"));
    }
    if c.ws.auto_ack_window == 0 {
        return Err(invalid("ws.auto_ack_window", "must be between 1 and 65535"));
    }
    if c.sse.durable_window == 0 {
        return Err(invalid("sse.durable_window", "must be between 1 and 65535"));
    }
    if c.http.max_header_bytes.as_u64() < 8192 || c.http.max_header_bytes.as_u64() > 16 << 20 {
        return Err(invalid(
            "http.max_header_bytes",
            "must be between 8KiB and 16MiB",
        ));
    }
    if c.http.max_batch == 0 {
        return Err(invalid("http.max_batch", "must be at least 1"));
    }
    for (key, d) in [
        ("http.header_read_timeout", c.http.header_read_timeout),
        ("mqtt.connect_timeout", c.mqtt.connect_timeout),
        ("mqtt.takeover_timeout", c.mqtt.takeover_timeout),
        ("ws.auth_timeout", c.ws.auth_timeout),
        ("limits.write_timeout", c.limits.write_timeout),
        ("sse.keepalive", c.sse.keepalive),
    ] {
        if d.is_zero() {
            return Err(invalid(key, "must be above 0"));
        }
    }
    if c.engine.kind == EngineKindConfig::Upstream {
        match &c.engine.upstream.url {
            None => {
                return Err(invalid(
                    "engine.upstream.url",
                    "is required when engine.kind = \"upstream\"",
                ));
            }
            Some(url) if !(url.starts_with("amqp://") || url.starts_with("amqps://")) => {
                return Err(invalid(
                    "engine.upstream.url",
                    "must start with amqp:// or amqps://",
                ));
            }
            Some(_) => {}
        }
    }
    if c.tls.cert.is_some() != c.tls.key.is_some() {
        return Err(invalid(
            "tls.cert",
            "tls.cert and tls.key must be set together",
        ));
    }
    if c.auth.resource_server_id.is_empty() {
        return Err(invalid("auth.resource_server_id", "must not be empty"));
    }
    if c.log
        .level
        .parse::<tracing_subscriber::EnvFilter>()
        .is_err()
    {
        return Err(invalid(
            "log.level",
            format!("'{}' is not a log filter", c.log.level),
        ));
    }
    Ok(())
}

fn validate_limits(l: &LimitsConfig) -> Result<(), ConfigError> {
    if l.max_message_bytes.as_u64() == 0 {
        return Err(invalid("limits.max_message_bytes", "must be above 0"));
    }
    if l.max_message_bytes > ByteSize::mib(512) {
        return Err(invalid(
            "limits.max_message_bytes",
            "must be at most 512MiB",
        ));
    }
    if l.publish_rate == 0 {
        return Err(invalid(
            "limits.publish_rate",
            "must be at least 1 message/s",
        ));
    }
    if l.publish_burst < 1 {
        return Err(invalid("limits.publish_burst", "must be at least 1"));
    }
    if l.subject_publish_rate == 0 {
        return Err(invalid(
            "limits.subject_publish_rate",
            "must be at least 1 message/s",
        ));
    }
    if l.publish_bytes_rate < l.max_message_bytes {
        return Err(invalid(
            "limits.publish_bytes_rate",
            "must be at least limits.max_message_bytes, or no maximal message could ever pass",
        ));
    }
    if l.outbound_buffer_messages == 0 {
        return Err(invalid(
            "limits.outbound_buffer_messages",
            "must be at least 1",
        ));
    }
    Ok(())
}

fn validate_amqp(a: &AmqpConfig) -> Result<(), ConfigError> {
    if a.heartbeat.as_secs() > u64::from(u16::MAX) || a.heartbeat.subsec_nanos() != 0 {
        return Err(invalid(
            "amqp.heartbeat",
            "must be 0s (off) or whole seconds up to 65535s (AMQP's heartbeat field)",
        ));
    }
    if a.handshake_timeout.is_zero() {
        return Err(invalid("amqp.handshake_timeout", "must be more than 0s"));
    }
    Ok(())
}

fn validate_mqtt(m: &MqttConfig) -> Result<(), ConfigError> {
    if m.receive_maximum == 0 {
        return Err(invalid(
            "mqtt.receive_maximum",
            "must be between 1 and 65535",
        ));
    }
    if m.max_inflight == 0 {
        return Err(invalid("mqtt.max_inflight", "must be between 1 and 65535"));
    }
    if m.max_keep_alive.as_secs() > u64::from(u16::MAX) || m.max_keep_alive.subsec_nanos() != 0 {
        return Err(invalid(
            "mqtt.max_keep_alive",
            "must be 0s (no cap) or whole seconds up to 65535s (MQTT's Server Keep Alive)",
        ));
    }
    if m.sender_property
        .as_deref()
        .is_some_and(|p| p.is_empty() || p.len() > 65535)
    {
        return Err(invalid(
            "mqtt.sender_property",
            "must be a user property name (1–65535 bytes) or unset",
        ));
    }
    if m.exchange.is_empty() || m.exchange.contains('/') || m.exchange.len() > 255 {
        return Err(invalid(
            "mqtt.exchange",
            "must be an exchange name (1–255 bytes, no '/')",
        ));
    }
    Ok(())
}
