//! Retained messages (DESIGN.md §3): the last retained PUBLISH per topic name, an empty payload
//! deleting it; a new subscription gets the matching ones (exact and wildcard filters) with
//! RETAIN=1. In-process for the embedded engine, bounded in bytes by
//! `mqtt.retained_stream_bytes`; the upstream engine replaces it with the replicated stream of
//! DESIGN.md §3.

use std::collections::HashMap;

use bytes::Bytes;
use parking_lot::RwLock;

use super::topic::filter_matches;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetainedMessage {
    pub payload: Bytes,
    pub qos: u8,
}

/// The store is full; the retain is refused (MQTT 5: 0x97 quota exceeded).
#[derive(Debug)]
pub struct Full;

pub struct Retained {
    cap: usize,
    inner: RwLock<(HashMap<String, RetainedMessage>, usize)>,
}

impl Retained {
    pub fn new(cap: usize) -> Self {
        Retained {
            cap,
            inner: RwLock::new((HashMap::new(), 0)),
        }
    }

    /// Stores (or, with an empty payload, deletes) the retained message of `topic`.
    pub fn set(&self, topic: &str, payload: Bytes, qos: u8) -> Result<(), Full> {
        let mut guard = self.inner.write();
        let (map, bytes) = &mut *guard;
        let old = map.get(topic).map_or(0, |m| m.payload.len() + topic.len());
        if payload.is_empty() {
            if map.remove(topic).is_some() {
                *bytes -= old;
            }
            return Ok(());
        }
        let new = payload.len() + topic.len();
        if *bytes - old + new > self.cap {
            return Err(Full);
        }
        *bytes = *bytes - old + new;
        map.insert(topic.to_owned(), RetainedMessage { payload, qos });
        Ok(())
    }

    /// The retained messages a new subscription to `filter` receives, in topic order.
    pub fn matching(&self, filter: &str) -> Vec<(String, RetainedMessage)> {
        let guard = self.inner.read();
        let mut out: Vec<(String, RetainedMessage)> = guard
            .0
            .iter()
            .filter(|(topic, _)| filter_matches(filter, topic))
            .map(|(t, m)| (t.clone(), m.clone()))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_replace_clear_and_match() {
        let r = Retained::new(1 << 20);
        r.set("a/b", Bytes::from("1"), 1).unwrap();
        r.set("a/c", Bytes::from("2"), 0).unwrap();
        r.set("a/b", Bytes::from("3"), 0).unwrap();
        r.set("$SYS/x", Bytes::from("s"), 0).unwrap();
        let all: Vec<String> = r.matching("#").into_iter().map(|(t, _)| t).collect();
        assert_eq!(all, ["a/b", "a/c"], "$ topics do not match #");
        assert_eq!(r.matching("a/b")[0].1.payload, Bytes::from("3"));
        r.set("a/b", Bytes::new(), 0).unwrap();
        assert_eq!(r.matching("a/+").len(), 1);
    }

    #[test]
    fn bounded_in_bytes() {
        let r = Retained::new(10);
        r.set("t", Bytes::from("12345"), 0).unwrap();
        assert!(r.set("u", Bytes::from("123456789"), 0).is_err());
        r.set("t", Bytes::from("123"), 0).unwrap();
    }
}
