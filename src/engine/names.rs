//! Naming rules shared by both engines: what a valid exchange or queue name is (DESIGN.md §2:
//! 1–255 bytes of UTF-8, no `/`), the `amq.default` alias of the default exchange, reserved
//! prefixes, and server-generated names.

use rand::RngExt;

use super::EngineError;

/// The default exchange's name in AMQP.
pub const DEFAULT_EXCHANGE: &str = "";
/// How URLs and scopes write the default exchange (RabbitMQ accepts it too).
pub const DEFAULT_EXCHANGE_ALIAS: &str = "amq.default";
/// Prefix of server-generated queue names.
pub const SERVER_NAMED_PREFIX: &str = "amq.gen-";
/// Prefix of server-generated consumer tags.
pub const CONSUMER_TAG_PREFIX: &str = "amq.ctag-";
pub const MAX_NAME_BYTES: usize = 255;

/// Maps `amq.default` to the default exchange's real name.
pub fn canonical_exchange(name: &str) -> &str {
    if name == DEFAULT_EXCHANGE_ALIAS {
        DEFAULT_EXCHANGE
    } else {
        name
    }
}

/// Checks a name a client wants to create something under.
pub fn validate_name(what: &str, name: &str) -> Result<(), EngineError> {
    if name.is_empty() {
        return Err(EngineError::InvalidArgument(format!(
            "{what} name must not be empty"
        )));
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(EngineError::InvalidArgument(format!(
            "{what} name is {} bytes, the limit is {MAX_NAME_BYTES}",
            name.len()
        )));
    }
    if name.contains('/') {
        return Err(EngineError::InvalidArgument(format!(
            "{what} name must not contain '/'"
        )));
    }
    Ok(())
}

/// Routing and binding keys are AMQP short strings.
pub fn validate_key(key: &str) -> Result<(), EngineError> {
    if key.len() > MAX_NAME_BYTES {
        return Err(EngineError::InvalidArgument(format!(
            "routing key is {} bytes, the limit is {MAX_NAME_BYTES}",
            key.len()
        )));
    }
    Ok(())
}

/// Names under `amq.` belong to the broker (AMQP 0-9-1 §"exchange.declare": 403).
pub fn is_reserved(name: &str) -> bool {
    name.starts_with("amq.")
}

/// `prefix` followed by 22 URL-safe random characters (~131 bits), like RabbitMQ's
/// `amq.gen-…` names.
pub fn generate(prefix: &str) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut rng = rand::rng();
    let mut name = String::with_capacity(prefix.len() + 22);
    name.push_str(prefix);
    for _ in 0..22 {
        name.push(ALPHABET[rng.random_range(0..ALPHABET.len())] as char);
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(validate_name("queue", "orders").is_ok());
        assert!(validate_name("queue", "").is_err());
        assert!(validate_name("queue", "a/b").is_err());
        assert!(validate_name("queue", &"x".repeat(256)).is_err());
        assert!(validate_name("queue", &"x".repeat(255)).is_ok());
    }

    #[test]
    fn generated_names_are_unique_and_prefixed() {
        let a = generate(SERVER_NAMED_PREFIX);
        let b = generate(SERVER_NAMED_PREFIX);
        assert!(a.starts_with("amq.gen-") && a.len() == 30);
        assert_ne!(a, b);
    }
}
