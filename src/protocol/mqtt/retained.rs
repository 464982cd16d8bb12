//! Retained messages (DESIGN.md §3): the last retained PUBLISH per topic name, an empty payload
//! deleting it; a new subscription gets the matching ones (exact and wildcard filters) with
//! RETAIN=1. Each is kept whole — the AMQP message with every property the publisher (or the
//! will) gave it — so a retained copy carries what the live copy carried, its Message Expiry
//! Interval counted down and honoured. In-process for the embedded engine, bounded in bytes by
//! `mqtt.retained_stream_bytes`; the upstream engine replaces it with the replicated stream of
//! DESIGN.md §3.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use parking_lot::RwLock;

use super::topic::filter_matches;
use crate::engine::Message;

#[derive(Debug, Clone, PartialEq)]
pub struct RetainedMessage {
    /// The message as it was published, properties and all.
    pub message: Message,
    pub qos: u8,
    /// From the message's `expiration`: after it the message is gone.
    pub expires_at: Option<Instant>,
    /// Which `set` stored it, so [`Retained::undo`] restores only what it replaced.
    seq: u64,
}

impl RetainedMessage {
    /// The time it has left, `None` when it never expires.
    pub fn expires_in(&self, now: Instant) -> Option<Duration> {
        self.expires_at.map(|at| at.saturating_duration_since(now))
    }

    /// What the entry counts against the cap: topic, body and headers (non-string values at a
    /// flat 16 bytes; an estimate, the body dominates).
    fn size(&self, topic: &str) -> usize {
        let p = &self.message.properties;
        let headers: usize = p
            .headers
            .iter()
            .map(|(k, v)| k.len() + v.as_str().map_or(16, str::len))
            .sum();
        topic.len() + self.message.body.len() + headers
    }
}

/// The store is full; the retain is refused (MQTT 5: 0x97 quota exceeded).
#[derive(Debug)]
pub struct Full;

/// What a `set` replaced, to put back if the publish it belongs to is not accepted.
#[derive(Debug)]
pub struct Undo {
    previous: Option<RetainedMessage>,
    seq: u64,
}

pub struct Retained {
    cap: usize,
    inner: RwLock<(HashMap<String, RetainedMessage>, usize)>,
    next_seq: std::sync::atomic::AtomicU64,
}

impl Retained {
    pub fn new(cap: usize) -> Self {
        Retained {
            cap,
            inner: RwLock::new((HashMap::new(), 0)),
            next_seq: std::sync::atomic::AtomicU64::new(1),
        }
    }

    /// Stores (or, with an empty body, deletes) the retained message of `topic`. Called before
    /// the message is published, so whoever sees the live copy and then subscribes finds the
    /// retained one; [`Retained::undo`] takes it back if the publish is not accepted.
    pub fn set(&self, topic: &str, message: Message, qos: u8) -> Result<Undo, Full> {
        let seq = self
            .next_seq
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut guard = self.inner.write();
        let (map, bytes) = &mut *guard;
        let old = map.get(topic).map_or(0, |m| m.size(topic));
        if message.body.is_empty() {
            let previous = map.remove(topic);
            if previous.is_some() {
                *bytes -= old;
            }
            return Ok(Undo { previous, seq });
        }
        let expires_at = message
            .properties
            .expiration
            .as_deref()
            .and_then(|ms| ms.parse::<u64>().ok())
            .map(|ms| Instant::now() + Duration::from_millis(ms));
        let entry = RetainedMessage {
            message,
            qos,
            expires_at,
            seq,
        };
        let new = entry.size(topic);
        if *bytes - old + new > self.cap {
            return Err(Full);
        }
        *bytes = *bytes - old + new;
        let previous = map.insert(topic.to_owned(), entry);
        Ok(Undo { previous, seq })
    }

    /// Puts back what a `set` replaced, unless another `set` of the topic came since.
    pub fn undo(&self, topic: &str, undo: Undo) {
        let mut guard = self.inner.write();
        let (map, bytes) = &mut *guard;
        let current = map.get(topic);
        let ours = match current {
            Some(m) => m.seq == undo.seq,
            // Ours was a delete, or expired since: nothing newer is lost by restoring.
            None => true,
        };
        if !ours {
            return;
        }
        if let Some(m) = map.remove(topic) {
            *bytes -= m.size(topic);
        }
        if let Some(previous) = undo.previous {
            *bytes += previous.size(topic);
            map.insert(topic.to_owned(), previous);
        }
    }

    /// The live retained messages a new subscription to `filter` receives, in topic order.
    /// Expired ones are dropped on the way.
    pub fn matching(&self, filter: &str) -> Vec<(String, RetainedMessage)> {
        let now = Instant::now();
        let mut expired = Vec::new();
        let mut out: Vec<(String, RetainedMessage)> = {
            let guard = self.inner.read();
            guard
                .0
                .iter()
                .filter(|(topic, _)| filter_matches(filter, topic))
                .filter(|(topic, m)| {
                    let live = m.expires_at.is_none_or(|at| at > now);
                    if !live {
                        expired.push((*topic).clone());
                    }
                    live
                })
                .map(|(t, m)| (t.clone(), m.clone()))
                .collect()
        };
        if !expired.is_empty() {
            let mut guard = self.inner.write();
            let (map, bytes) = &mut *guard;
            for topic in expired {
                if let Some(m) = map.get(&topic)
                    && m.expires_at.is_some_and(|at| at <= now)
                {
                    *bytes -= m.size(&topic);
                    map.remove(&topic);
                }
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(body: &str) -> Message {
        Message::new(body.to_owned())
    }

    #[test]
    fn set_replace_clear_and_match() {
        let r = Retained::new(1 << 20);
        r.set("a/b", msg("1"), 1).unwrap();
        r.set("a/c", msg("2"), 0).unwrap();
        r.set("a/b", msg("3"), 0).unwrap();
        r.set("$SYS/x", msg("s"), 0).unwrap();
        let all: Vec<String> = r.matching("#").into_iter().map(|(t, _)| t).collect();
        assert_eq!(all, ["a/b", "a/c"], "$ topics do not match #");
        assert_eq!(r.matching("a/b")[0].1.message.body, "3");
        r.set("a/b", msg(""), 0).unwrap();
        assert_eq!(r.matching("a/+").len(), 1);
    }

    #[test]
    fn undo_restores_only_what_it_replaced() {
        let r = Retained::new(1 << 20);
        r.set("t", msg("old"), 0).unwrap();
        let undo = r.set("t", msg("refused"), 0).unwrap();
        r.undo("t", undo);
        assert_eq!(r.matching("t")[0].1.message.body, "old");
        let undo = r.set("t", msg("refused"), 0).unwrap();
        r.set("t", msg("newer"), 0).unwrap();
        r.undo("t", undo);
        assert_eq!(
            r.matching("t")[0].1.message.body,
            "newer",
            "a later set stays"
        );
        let undo = r.set("t", msg(""), 0).unwrap();
        r.undo("t", undo);
        assert_eq!(
            r.matching("t")[0].1.message.body,
            "newer",
            "an undone delete"
        );
        assert_eq!(r.inner.read().1, "t".len() + "newer".len(), "bytes counted");
    }

    #[test]
    fn bounded_in_bytes() {
        let r = Retained::new(10);
        r.set("t", msg("12345"), 0).unwrap();
        assert!(r.set("u", msg("123456789"), 0).is_err());
        r.set("t", msg("123"), 0).unwrap();
    }

    #[test]
    fn properties_are_kept_and_expiry_honoured() {
        let r = Retained::new(1 << 20);
        let mut m = msg("x");
        m.properties.content_type = Some("text/plain".into());
        m.properties.expiration = Some("60000".into());
        r.set("a", m.clone(), 1).unwrap();
        let (_, got) = r.matching("a").remove(0);
        assert_eq!(got.message, m);
        let left = got.expires_in(Instant::now()).unwrap();
        assert!(left <= Duration::from_secs(60) && left > Duration::from_secs(50));
        let mut gone = msg("y");
        gone.properties.expiration = Some("0".into());
        r.set("b", gone, 0).unwrap();
        assert!(r.matching("b").is_empty(), "expired at once");
        assert_eq!(r.inner.read().0.len(), 1, "and dropped");
    }
}
