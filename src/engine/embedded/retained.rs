//! The embedded engine's retained messages (`engine::retained`): in memory, keyed by routing
//! key, bounded in bytes (the operator's `mqtt.retained_stream_bytes`), each the whole message
//! with its deadline — and written through to the store (group commit), so they survive a
//! restart with their expiry still counting.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use parking_lot::RwLock;

use super::now_ms;
use super::store::{Store, StoreWrite};
use crate::engine::retained::{RetainedMessage, RetainedStore, RetainedUndo};
use crate::engine::topic::pattern_matches;
use crate::engine::{EngineError, Message};

/// What a `set` replaced (inside [`RetainedUndo`]).
struct Replaced {
    previous: Option<Entry>,
    seq: u64,
}

struct Entry {
    message: Message,
    /// Wall clock, milliseconds since the epoch: what the store keeps to count expiry across
    /// restarts.
    published_at_ms: u64,
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
    store: Arc<dyn Store>,
}

/// The message's `expiration` in milliseconds, when it has one.
fn ttl_ms(message: &Message) -> Option<u64> {
    message
        .properties
        .expiration
        .as_deref()
        .and_then(|ms| ms.parse::<u64>().ok())
}

impl Retained {
    pub fn new(cap: usize, store: Arc<dyn Store>) -> Self {
        Retained {
            cap,
            inner: RwLock::new((HashMap::new(), 0)),
            next_seq: AtomicU64::new(1),
            store,
        }
    }

    /// Takes back what the store kept; expired ones are dropped (from the store too).
    pub fn restore(&self, stored: Vec<(String, Message, u64)>) {
        let now = now_ms();
        let mut guard = self.inner.write();
        let (map, bytes) = &mut *guard;
        for (key, message, published_at_ms) in stored {
            let deadline = ttl_ms(&message).map(|ttl| published_at_ms.saturating_add(ttl));
            if deadline.is_some_and(|d| d <= now) {
                drop(self.store.write_retained(&key, None));
                continue;
            }
            let entry = Entry {
                expires_at: deadline.map(|d| Instant::now() + Duration::from_millis(d - now)),
                message,
                published_at_ms,
                seq: self.next_seq.fetch_add(1, Ordering::Relaxed),
            };
            *bytes += entry.size(&key);
            map.insert(key, entry);
        }
    }

    /// The change in memory, and its store write submitted under the same lock (so writes
    /// reach the store in the order the changes were made).
    fn set_now(
        &self,
        key: &str,
        message: Message,
    ) -> Result<(RetainedUndo, StoreWrite), EngineError> {
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
            let durable = self.store.write_retained(key, None);
            return Ok((undo(previous), durable));
        }
        let published_at_ms = now_ms();
        let expires_at = ttl_ms(&message).map(|ms| Instant::now() + Duration::from_millis(ms));
        let entry = Entry {
            message,
            published_at_ms,
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
        let durable = self
            .store
            .write_retained(key, Some((&entry.message, published_at_ms)));
        Ok((undo(map.insert(key.to_owned(), entry)), durable))
    }

    /// Puts back what a `set` replaced; `None` when a later `set` came since.
    fn undo_now(&self, key: &str, undo: RetainedUndo) -> Option<StoreWrite> {
        let undo = undo.into_inner::<Replaced>()?;
        let mut guard = self.inner.write();
        let (map, bytes) = &mut *guard;
        // Ours, or gone (a delete, or expired since): nothing newer is lost by restoring.
        if map.get(key).is_some_and(|m| m.seq != undo.seq) {
            return None;
        }
        if let Some(m) = map.remove(key) {
            *bytes -= m.size(key);
        }
        let durable = match &undo.previous {
            Some(e) => self
                .store
                .write_retained(key, Some((&e.message, e.published_at_ms))),
            None => self.store.write_retained(key, None),
        };
        if let Some(entry) = undo.previous {
            *bytes += entry.size(key);
            map.insert(key.to_owned(), entry);
        }
        Some(durable)
    }
}

#[async_trait]
impl RetainedStore for Retained {
    async fn set(&self, routing_key: &str, message: Message) -> Result<RetainedUndo, EngineError> {
        let (undo, durable) = self.set_now(routing_key, message)?;
        if let Err(e) = durable.await {
            // Not kept: as if the store were full, and memory goes back to what the store has.
            if let Some(back) = self.undo_now(routing_key, undo) {
                let _ = back.await;
            }
            return Err(EngineError::Rejected(format!(
                "the retained message cannot be stored: {e}"
            )));
        }
        Ok(undo)
    }

    async fn undo(&self, routing_key: &str, undo: RetainedUndo) {
        if let Some(durable) = self.undo_now(routing_key, undo)
            && let Err(e) = durable.await
        {
            tracing::error!(routing_key, error = %e, "a refused retained message is still stored");
        }
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
    use super::super::store::MemoryStore;
    use super::*;

    fn set(r: &Retained, key: &str, m: Message) -> Result<RetainedUndo, EngineError> {
        r.set_now(key, m).map(|(undo, _)| undo)
    }

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
        let r = Retained::new(1 << 20, Arc::new(MemoryStore));
        set(&r, "a.b", msg("1")).unwrap();
        set(&r, "a.c", msg("2")).unwrap();
        set(&r, "a.b", msg("3")).unwrap();
        assert_eq!(bodies(&r, "#"), ["3", "2"], "key order");
        assert_eq!(bodies(&r, "a.b"), ["3"]);
        set(&r, "a.b", msg("")).unwrap();
        assert_eq!(bodies(&r, "a.*"), ["2"]);
    }

    #[test]
    fn bounded_in_bytes() {
        let r = Retained::new(10, Arc::new(MemoryStore));
        set(&r, "t", msg("12345")).unwrap();
        assert!(set(&r, "u", msg("123456789")).is_err());
        set(&r, "t", msg("123")).unwrap();
    }

    #[test]
    fn properties_are_kept_and_expiry_honoured() {
        let r = Retained::new(1 << 20, Arc::new(MemoryStore));
        let mut m = msg("x");
        m.properties_mut().content_type = Some("text/plain".into());
        m.properties_mut().expiration = Some("60000".into());
        set(&r, "a", m.clone()).unwrap();
        let got = r.matching("a").remove(0);
        assert_eq!(got.message, m);
        let left = got.expires_in.unwrap();
        assert!(left <= Duration::from_secs(60) && left > Duration::from_secs(50));
        let mut gone = msg("y");
        gone.properties_mut().expiration = Some("0".into());
        set(&r, "b", gone).unwrap();
        assert!(r.matching("b").is_empty(), "expired at once");
        assert_eq!(r.inner.read().0.len(), 1, "and dropped");
    }

    #[test]
    fn undo_restores_only_what_it_replaced() {
        let r = Retained::new(1 << 20, Arc::new(MemoryStore));
        set(&r, "t", msg("old")).unwrap();
        let undo = set(&r, "t", msg("refused")).unwrap();
        drop(r.undo_now("t", undo));
        assert_eq!(bodies(&r, "t"), ["old"]);
        let undo = set(&r, "t", msg("refused")).unwrap();
        set(&r, "t", msg("newer")).unwrap();
        drop(r.undo_now("t", undo));
        assert_eq!(bodies(&r, "t"), ["newer"], "a later set stays");
        let undo = set(&r, "t", msg("")).unwrap();
        drop(r.undo_now("t", undo));
        assert_eq!(bodies(&r, "t"), ["newer"], "an undone delete");
        assert_eq!(r.inner.read().1, "t".len() + "newer".len(), "bytes counted");
    }
}
