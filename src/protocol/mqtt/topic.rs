//! All MQTT ↔ AMQP naming (DESIGN.md §3), in one place: topic ↔ routing key, filter → binding
//! key, session queue names. Pure functions.
//!
//! Default mapping swaps `/` and `.` (a bijection, so no topic is lost); `rabbitmq` maps `/` to
//! `.` only, as RabbitMQ's MQTT plugin does, for existing deployments.

use std::sync::Arc;

use crate::auth::scopes::encode_subject;
use crate::config::TopicMapping;
use crate::engine::topic::split_ascii;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    /// A level equal to `*` would become an AMQP wildcard (v5 0x90 / 0x8F).
    #[error("a topic level may not be '*' (it would be an AMQP wildcard)")]
    StarLevel,
    #[error("the topic is {0} bytes after mapping, the limit is 255")]
    TooLong(usize),
    #[error("a topic name may not contain + or #")]
    Wildcard,
    #[error("empty topic")]
    Empty,
}

const MAX_KEY: usize = 255;

/// `s` with each byte through `table`, in one pass (this runs twice per delivered message;
/// copying the runs between separators cost a `memcpy` call each): the tables change only `/`
/// and `.`, which are ASCII, and a byte of a multi-byte character is never either, so the bytes
/// stay UTF-8.
fn map_bytes(s: &str, table: &[u8; 256]) -> String {
    let bytes: Vec<u8> = s.bytes().map(|b| table[usize::from(b)]).collect();
    String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// A PUBLISH topic name → routing key.
pub fn topic_to_key(topic: &str, mapping: TopicMapping) -> Result<String, TopicError> {
    if topic.is_empty() {
        return Err(TopicError::Empty);
    }
    if topic.bytes().any(|b| b == b'+' || b == b'#') {
        return Err(TopicError::Wildcard);
    }
    if split_ascii(topic, b'/').any(|level| level == "*") {
        return Err(TopicError::StarLevel);
    }
    let key = map_bytes(topic, key_bytes(mapping));
    if key.len() > MAX_KEY {
        return Err(TopicError::TooLong(key.len()));
    }
    Ok(key)
}

/// A SUBSCRIBE filter → binding key: swap, then `+` → `*`; `#` stays.
pub fn filter_to_binding(filter: &str, mapping: TopicMapping) -> Result<String, TopicError> {
    if filter.is_empty() {
        return Err(TopicError::Empty);
    }
    let mut levels = Vec::new();
    for level in filter.split('/') {
        match level {
            "*" => return Err(TopicError::StarLevel),
            "+" => levels.push("*".to_owned()),
            "#" => levels.push("#".to_owned()),
            level => levels.push(match mapping {
                TopicMapping::Swap => level.replace('.', "/"),
                TopicMapping::Rabbitmq => level.to_owned(),
            }),
        }
    }
    let key = levels.join(".");
    if key.len() > MAX_KEY {
        return Err(TopicError::TooLong(key.len()));
    }
    Ok(key)
}

/// A binding key made by [`filter_to_binding`] → the filter it came from (a resumed session
/// reads its subscriptions back from its queues' bindings).
pub fn binding_to_filter(key: &str, mapping: TopicMapping) -> String {
    key.split('.')
        .map(|word| match word {
            "*" => "+".to_owned(),
            "#" => "#".to_owned(),
            w => match mapping {
                TopicMapping::Swap => w.replace('/', "."),
                TopicMapping::Rabbitmq => w.to_owned(),
            },
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// A routing key → MQTT topic name, or `None` when it maps to no valid topic name (such
/// deliveries are acked, not delivered, and counted).
pub fn key_to_topic(key: &str, mapping: TopicMapping) -> Option<String> {
    key_is_mappable(key).then(|| map_key(key, mapping))
}

/// Whether a routing key maps to a valid topic name ([`key_to_topic`]).
pub fn key_is_mappable(key: &str) -> bool {
    !key.is_empty() && !key.bytes().any(|b| matches!(b, b'+' | b'#' | 0))
}

/// The topic name of a routing key [`key_is_mappable`] said yes to.
pub fn map_key(key: &str, mapping: TopicMapping) -> String {
    map_bytes(key, topic_bytes(mapping))
}

/// The topic name of an outbound PUBLISH: one made for it, or the routing key of a delivery,
/// mapped only as it is written. The mapping is byte for byte, so the name is as long as the
/// key: a delivery (one per message for every subscriber) makes and drops no `String` of its
/// own (an allocation, a pass and a UTF-8 check, 4 % of a QoS 0 message's instructions).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopicName {
    Made(String),
    /// A routing key [`key_is_mappable`] said yes to, and the table it maps through.
    Key(Arc<str>, &'static [u8; 256]),
}

impl TopicName {
    /// The name `key` maps to under `mapping` (a key [`key_is_mappable`] said yes to).
    pub fn of_key(key: Arc<str>, mapping: TopicMapping) -> TopicName {
        TopicName::Key(key, topic_bytes(mapping))
    }

    /// Its length in bytes, made or not.
    pub fn len(&self) -> usize {
        match self {
            TopicName::Made(name) => name.len(),
            TopicName::Key(key, _) => key.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends its bytes to `buf`: a key's mapped in place, once copied.
    pub fn write_to(&self, buf: &mut bytes::BytesMut) {
        match self {
            TopicName::Made(name) => buf.extend_from_slice(name.as_bytes()),
            TopicName::Key(key, table) => {
                let at = buf.len();
                buf.extend_from_slice(key.as_bytes());
                for b in &mut buf[at..] {
                    *b = table[usize::from(*b)];
                }
            }
        }
    }

    /// The name made (for what needs it whole: topic aliases, the codec's general encoder).
    pub fn into_string(self) -> String {
        match self {
            TopicName::Made(name) => name,
            TopicName::Key(key, table) => map_bytes(&key, table),
        }
    }
}

impl From<String> for TopicName {
    fn from(name: String) -> Self {
        TopicName::Made(name)
    }
}

impl From<&str> for TopicName {
    fn from(name: &str) -> Self {
        TopicName::Made(name.to_owned())
    }
}

/// Byte → byte tables, the mappings written once for making names ([`map_bytes`]) and for
/// matching them unmade ([`matches_mapped`]): a lookup per byte where a `match` cost two
/// compares.
const fn byte_table(dot: u8, slash: u8) -> [u8; 256] {
    let mut t = [0u8; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = i as u8;
        i += 1;
    }
    t[b'.' as usize] = dot;
    t[b'/' as usize] = slash;
    t
}

/// A topic name's bytes as they are.
const AS_IS: [u8; 256] = byte_table(b'.', b'/');

/// `/` and `.` swapped: the default mapping, its own inverse.
const SWAPPED: [u8; 256] = byte_table(b'/', b'.');

/// The byte of the topic name that each byte of a routing key becomes ([`map_key`]).
fn topic_bytes(mapping: TopicMapping) -> &'static [u8; 256] {
    const RABBITMQ: [u8; 256] = byte_table(b'/', b'/');
    match mapping {
        TopicMapping::Swap => &SWAPPED,
        TopicMapping::Rabbitmq => &RABBITMQ,
    }
}

/// The byte of the routing key that each byte of a topic name becomes ([`topic_to_key`]).
fn key_bytes(mapping: TopicMapping) -> &'static [u8; 256] {
    const RABBITMQ: [u8; 256] = byte_table(b'.', b'.');
    match mapping {
        TopicMapping::Swap => &SWAPPED,
        TopicMapping::Rabbitmq => &RABBITMQ,
    }
}

/// `$`-topics are not matched by filters that start with a wildcard ([MQTT-4.7.2-1]).
pub fn wildcard_first(filter: &str) -> bool {
    filter.starts_with('+') || filter.starts_with('#')
}

/// Whether a topic name matches an MQTT filter (used for `$`-topic and retained checks).
pub fn filter_matches(filter: &str, topic: &str) -> bool {
    matches_mapped(filter, topic.as_bytes(), &AS_IS)
}

/// Whether the topic name of a mappable routing key ([`key_is_mappable`]) matches an MQTT
/// filter, without making the name: a delivery asks which of its session's filters it
/// matched, and a fanned-out message's name is made only by the copy that encodes it.
pub fn key_matches(filter: &str, key: &str, mapping: TopicMapping) -> bool {
    matches_mapped(filter, key.as_bytes(), topic_bytes(mapping))
}

/// [`filter_matches`] on the name that `name` becomes byte by byte through `map`, in one
/// pass over both: no level iterators, and each level compared as it is walked.
fn matches_mapped(filter: &str, name: &[u8], map: &[u8; 256]) -> bool {
    let at = |n: usize| name.get(n).map(|&b| map[usize::from(b)]);
    if at(0) == Some(b'$') && wildcard_first(filter) {
        return false;
    }
    let filter = filter.as_bytes();
    // A wildcard is a whole level: `+` or `#` followed by the separator or the end.
    let wildcard = |f: usize| filter.get(f + 1).is_none_or(|&c| c == b'/');
    let (mut f, mut n) = (0, 0);
    loop {
        // Both at the start of a level.
        match filter.get(f) {
            Some(b'#') if wildcard(f) => return true,
            Some(b'+') if wildcard(f) => {
                f += 1;
                while at(n).is_some_and(|b| b != b'/') {
                    n += 1;
                }
            }
            _ => {
                while let Some(&c) = filter.get(f)
                    && c != b'/'
                {
                    if at(n) != Some(c) {
                        return false;
                    }
                    f += 1;
                    n += 1;
                }
            }
        }
        // Both at the end of a level: a separator, or the end.
        match (filter.get(f), at(n)) {
            (None, None) => return true,
            (Some(_), Some(b'/')) => (f, n) = (f + 1, n + 1),
            // `a/#` matches `a`, its parent level.
            (Some(_), None) => return &filter[f..] == b"/#",
            _ => return false,
        }
    }
}

/// `{prefix}{a}.{b}{suffix}` with both parts percent-encoded (so `.` separates them
/// unambiguously); when that would pass 255 bytes, the pair is replaced by its SHA-256 in hex.
fn pair_queue(prefix: &str, a: &str, b: &str, suffix: &str) -> String {
    let pair = format!("{}.{}", encode_subject(a), encode_subject(b));
    if prefix.len() + pair.len() + suffix.len() <= MAX_KEY {
        // Exactly its length: names are kept for a connection's life (its takeover key, what
        // operators see of its subscriptions), and `format!` grows by doubling.
        return [prefix, &pair, suffix].concat();
    }
    use sha2::Digest;
    let digest = sha2::Sha256::digest(pair.as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("{prefix}{hex}{suffix}")
}

/// How every session queue's name starts.
pub const SESSION_QUEUE_PREFIX: &str = "mqtt-subscription-";

/// The session's queue for `kind` (`qos0` or `qos1`): `mqtt-subscription-{sub}.{client}{kind}`.
pub fn session_queue(subject: &str, client_id: &str, kind: &str) -> String {
    pair_queue(SESSION_QUEUE_PREFIX, subject, client_id, kind)
}

/// A shared subscription's queue: `mqtt-shared-{group}.{filter}`.
/// The queue whose single message is a persistent session's stored state.
pub fn state_queue(subject: &str, client_id: &str) -> String {
    pair_queue("mqtt-session-", subject, client_id, "")
}

pub fn shared_queue(group: &str, filter: &str) -> String {
    pair_queue("mqtt-shared-", group, filter, "")
}

#[cfg(test)]
mod tests {
    use super::*;
    const SWAP: TopicMapping = TopicMapping::Swap;
    const RMQ: TopicMapping = TopicMapping::Rabbitmq;

    /// MQTT's matching as the specification words it, level by level: what the one-pass
    /// matcher is checked against.
    fn by_levels(filter: &str, topic: &str) -> bool {
        if topic.starts_with('$') && wildcard_first(filter) {
            return false;
        }
        let (mut f, mut t) = (filter.split('/'), topic.split('/'));
        loop {
            match (f.next(), t.next()) {
                (Some("#"), _) => return true,
                (Some("+"), Some(_)) => {}
                (Some(a), Some(b)) if a == b => {}
                (None, None) => return true,
                _ => return false,
            }
        }
    }

    /// Every string of up to `len` bytes from `alphabet`.
    fn strings(alphabet: &[u8], len: usize) -> Vec<String> {
        let mut all = vec![String::new()];
        let mut last = vec![String::new()];
        for _ in 0..len {
            last = last
                .iter()
                .flat_map(|s| alphabet.iter().map(move |&c| format!("{s}{}", c as char)))
                .collect();
            all.extend(last.iter().cloned());
        }
        all
    }

    #[test]
    fn one_pass_matching_agrees_with_levels_for_every_short_filter_and_key() {
        let filters: Vec<String> = strings(b"a/+#.$", 4)
            .into_iter()
            .filter(|f| {
                // As SUBSCRIBE takes them: wildcards are whole levels, `#` the last.
                let levels: Vec<&str> = f.split('/').collect();
                !f.is_empty()
                    && levels.iter().enumerate().all(|(i, l)| match *l {
                        "+" => true,
                        "#" => i == levels.len() - 1,
                        l => !l.contains(['+', '#']),
                    })
            })
            .collect();
        let keys: Vec<String> = strings(b"a./$", 4)
            .into_iter()
            .filter(|k| key_is_mappable(k))
            .collect();
        assert!(filters.len() > 100 && keys.len() > 300);
        for f in &filters {
            for k in &keys {
                for mapping in [SWAP, RMQ] {
                    let topic = key_to_topic(k, mapping).expect("mappable");
                    let want = by_levels(f, &topic);
                    assert_eq!(filter_matches(f, &topic), want, "{f:?} {topic:?}");
                    assert_eq!(key_matches(f, k, mapping), want, "{f:?} {k:?} {mapping:?}");
                }
            }
        }
    }

    #[test]
    fn a_key_written_as_a_topic_name_is_the_name_made_from_it() {
        for key in ["v1/2.x", "a.b", "温度/a.🌡", ".a..b.", "$SYS/x.y", "x"] {
            for mapping in [SWAP, RMQ] {
                let made = map_key(key, mapping);
                let name = TopicName::of_key(key.into(), mapping);
                assert_eq!(name.len(), made.len(), "{key}");
                let mut buf = bytes::BytesMut::from(&b"before"[..]);
                name.write_to(&mut buf);
                assert_eq!(&buf[..], format!("before{made}").as_bytes(), "{key}");
                assert_eq!(name.into_string(), made, "{key}");
            }
        }
    }

    #[test]
    fn topics_swap_both_ways() {
        assert_eq!(
            topic_to_key("sensors/k1/temp", SWAP).unwrap(),
            "sensors.k1.temp"
        );
        assert_eq!(topic_to_key("v1.2/x", SWAP).unwrap(), "v1/2.x");
        assert_eq!(key_to_topic("v1/2.x", SWAP).unwrap(), "v1.2/x");
        assert_eq!(topic_to_key("v1.2/x", RMQ).unwrap(), "v1.2.x");
        assert_eq!(key_to_topic("a.b", RMQ).unwrap(), "a/b");
        assert_eq!(
            topic_to_key("héllo.wörld/温度/🌡", SWAP).unwrap(),
            "héllo/wörld.温度.🌡",
            "multi-byte characters pass whole"
        );
        assert_eq!(key_to_topic("温度/a.🌡", SWAP).unwrap(), "温度.a/🌡");
        assert_eq!(
            topic_to_key("/a//b/", SWAP).unwrap(),
            ".a..b.",
            "empty levels are empty words"
        );
        assert_eq!(topic_to_key("a/*/b", SWAP), Err(TopicError::StarLevel));
        assert_eq!(topic_to_key("a/+", SWAP), Err(TopicError::Wildcard));
        assert!(matches!(
            topic_to_key(&"x".repeat(256), SWAP),
            Err(TopicError::TooLong(256))
        ));
        assert_eq!(key_to_topic("", SWAP), None);
        assert_eq!(key_to_topic("a.#", SWAP), None);
    }

    #[test]
    fn filters_become_binding_keys() {
        assert_eq!(
            filter_to_binding("sensors/+/temp", SWAP).unwrap(),
            "sensors.*.temp"
        );
        assert_eq!(filter_to_binding("sensors/#", SWAP).unwrap(), "sensors.#");
        assert_eq!(filter_to_binding("v1.2/+", SWAP).unwrap(), "v1/2.*");
        assert_eq!(filter_to_binding("a/*", SWAP), Err(TopicError::StarLevel));
        assert_eq!(filter_to_binding("#", SWAP).unwrap(), "#");
    }

    #[test]
    fn bindings_map_back_to_filters() {
        for filter in ["sensors/+/temp", "a/#", "v1.2/+", "#", "x"] {
            let key = filter_to_binding(filter, SWAP).unwrap();
            assert_eq!(binding_to_filter(&key, SWAP), filter);
        }
    }

    #[test]
    fn dollar_topics_and_matching() {
        assert!(filter_matches("a/+/c", "a/b/c"));
        assert!(filter_matches("a/#", "a"));
        assert!(!filter_matches("a/+", "a/b/c"));
        assert!(!filter_matches("#", "$SYS/x"));
        assert!(!filter_matches("+/x", "$SYS/x"));
        assert!(filter_matches("$SYS/#", "$SYS/x"));
    }

    #[test]
    fn shared_queue_names_are_encoded_and_bounded() {
        assert_eq!(shared_queue("g1", "jobs/#"), "mqtt-shared-g1.jobs%2F%23");
        let long = shared_queue(&"g".repeat(200), &"f".repeat(100));
        assert!(
            long.len() <= 255 && long.starts_with("mqtt-shared-"),
            "{long}"
        );
    }

    #[test]
    fn queue_names_are_encoded_and_bounded() {
        assert_eq!(
            session_queue("alice", "dev.1", "qos0"),
            "mqtt-subscription-alice.dev%2E1qos0"
        );
        let long = session_queue(&"s".repeat(200), &"c".repeat(100), "qos1");
        assert!(long.len() <= 255 && long.ends_with("qos1"), "{long}");
    }
}
