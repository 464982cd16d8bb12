//! The embedded engine's retained messages (`engine::retained`): in-process, keyed by routing
//! key, bounded in bytes (the operator's `mqtt.retained_stream_bytes`), each the whole message
//! with its deadline.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use parking_lot::RwLock;

use super::topic::pattern_matches;
use crate::engine::retained::{RetainedMessage, RetainedStore, RetainedUndo};
use crate::engine::{EngineError, Message};

/// What a `set` replaced (inside [`RetainedUndo`]).
struct Replaced {
    previous: Option<Entry>,
    seq: u64,
}

struct Entry {
    message: Message,
    /// From the message's `expiration`: after it the message is gone.
    expires_at: Option<Instant>,
    /// Which `set` stored it, so an undo restores only what it replaced.
    seq: u64,
}

impl Entry {
    /// What the entry counts against the cap: key, body and headers (non-string values at a
    /// flat 16 bytes; an estimate, the body dominates).
    fn size(&self, key: &str) -> usize {
        let headers: usize = self
            .message
            .properties
            .headers
            .iter()
            .map(|(k, v)| k.len() + v.as_str().map_or(16, str::len))
            .sum();
        key.len() + self.message.body.len() + headers
    }
}

pub struct Retained {
    cap: usize,
    inner: RwLock<(HashMap<String, Entry>, usize)>,
    next_seq: AtomicU64,
}

impl Retained {
    pub fn new(cap: usize) -> Self {
        Retained {
            cap,
            inner: RwLock::new((HashMap::new(), 0)),
            next_seq: AtomicU64::new(1),
        }
    }

    fn set_now(&self, key: &str, message: Message) -> Result<RetainedUndo, EngineError> {
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        let mut guard = self.inner.write();
        let (map, bytes) = &mut *guard;
        let old = map.get(key).map_or(0, |m| m.size(key));
        let undo = |previous: Option<Entry>| RetainedUndo::new(Replaced { previous, seq });
        if message.body.is_empty() {
            let previous = map.remove(key);
            if previous.is_some() {
                *bytes -= old;
            }
            return Ok(undo(previous));
        }
        let expires_at = message
            .properties
            .expiration
            .as_deref()
            .and_then(|ms| ms.parse::<u64>().ok())
            .map(|ms| Instant::now() + Duration::from_millis(ms));
        let entry = Entry {
            message,
            expires_at,
            seq,
        };
        let new = entry.size(key);
        if *bytes - old + new > self.cap {
            return Err(EngineError::Rejected(format!(
                "the retained store is full ({} bytes)",
                self.cap
            )));
        }
        *bytes = *bytes - old + new;
        Ok(undo(map.insert(key.to_owned(), entry)))
    }

    fn undo_now(&self, key: &str, undo: RetainedUndo) {
        let Some(undo) = undo.into_inner::<Replaced>() else {
            return;
        };
        let mut guard = self.inner.write();
        let (map, bytes) = &mut *guard;
        // Ours, or gone (a delete, or expired since): nothing newer is lost by restoring.
        if map.get(key).is_some_and(|m| m.seq != undo.seq) {
            return;
        }
        if let Some(m) = map.remove(key) {
            *bytes -= m.size(key);
        }
        if let Some(entry) = undo.previous {
            *bytes += entry.size(key);
            map.insert(key.to_owned(), entry);
        }
    }
}

#[async_trait]
impl RetainedStore for Retained {
    async fn set(&self, routing_key: &str, message: Message) -> Result<RetainedUndo, EngineError> {
        self.set_now(routing_key, message)
    }

    async fn undo(&self, routing_key: &str, undo: RetainedUndo) {
        self.undo_now(routing_key, undo)
    }

    fn matching(&self, pattern: &str) -> Vec<RetainedMessage> {
        let now = Instant::now();
        let mut expired = Vec::new();
        let mut out: Vec<RetainedMessage> = {
            let guard = self.inner.read();
            guard
                .0
                .iter()
                .filter(|(key, _)| pattern_matches(pattern, key))
                .filter(|(key, m)| {
                    let live = m.expires_at.is_none_or(|at| at > now);
                    if !live {
                        expired.push((*key).clone());
                    }
                    live
                })
                .map(|(key, m)| RetainedMessage {
                    routing_key: key.clone(),
                    message: m.message.clone(),
                    expires_in: m.expires_at.map(|at| at.saturating_duration_since(now)),
                })
                .collect()
        };
        if !expired.is_empty() {
            let mut guard = self.inner.write();
            let (map, bytes) = &mut *guard;
            for key in expired {
                if let Some(m) = map.get(&key)
                    && m.expires_at.is_some_and(|at| at <= now)
                {
                    *bytes -= m.size(&key);
                    map.remove(&key);
                }
            }
        }
        out.sort_by(|a, b| a.routing_key.cmp(&b.routing_key));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(body: &str) -> Message {
        Message::new(body.to_owned())
    }

    fn bodies(r: &Retained, pattern: &str) -> Vec<String> {
        r.matching(pattern)
            .into_iter()
            .map(|m| String::from_utf8_lossy(&m.message.body).into_owned())
            .collect()
    }

    #[test]
    fn set_replace_clear_and_match() {
        let r = Retained::new(1 << 20);
        r.set_now("a.b", msg("1")).unwrap();
        r.set_now("a.c", msg("2")).unwrap();
        r.set_now("a.b", msg("3")).unwrap();
        assert_eq!(bodies(&r, "#"), ["3", "2"], "key order");
        assert_eq!(bodies(&r, "a.b"), ["3"]);
        r.set_now("a.b", msg("")).unwrap();
        assert_eq!(bodies(&r, "a.*"), ["2"]);
    }

    #[test]
    fn bounded_in_bytes() {
        let r = Retained::new(10);
        r.set_now("t", msg("12345")).unwrap();
        assert!(r.set_now("u", msg("123456789")).is_err());
        r.set_now("t", msg("123")).unwrap();
    }

    #[test]
    fn properties_are_kept_and_expiry_honoured() {
        let r = Retained::new(1 << 20);
        let mut m = msg("x");
        m.properties.content_type = Some("text/plain".into());
        m.properties.expiration = Some("60000".into());
        r.set_now("a", m.clone()).unwrap();
        let got = r.matching("a").remove(0);
        assert_eq!(got.message, m);
        let left = got.expires_in.unwrap();
        assert!(left <= Duration::from_secs(60) && left > Duration::from_secs(50));
        let mut gone = msg("y");
        gone.properties.expiration = Some("0".into());
        r.set_now("b", gone).unwrap();
        assert!(r.matching("b").is_empty(), "expired at once");
        assert_eq!(r.inner.read().0.len(), 1, "and dropped");
    }

    #[test]
    fn undo_restores_only_what_it_replaced() {
        let r = Retained::new(1 << 20);
        r.set_now("t", msg("old")).unwrap();
        let undo = r.set_now("t", msg("refused")).unwrap();
        r.undo_now("t", undo);
        assert_eq!(bodies(&r, "t"), ["old"]);
        let undo = r.set_now("t", msg("refused")).unwrap();
        r.set_now("t", msg("newer")).unwrap();
        r.undo_now("t", undo);
        assert_eq!(bodies(&r, "t"), ["newer"], "a later set stays");
        let undo = r.set_now("t", msg("")).unwrap();
        r.undo_now("t", undo);
        assert_eq!(bodies(&r, "t"), ["newer"], "an undone delete");
        assert_eq!(r.inner.read().1, "t".len() + "newer".len(), "bytes counted");
    }
}
