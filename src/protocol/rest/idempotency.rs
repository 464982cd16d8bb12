//! `Idempotency-Key` on publish endpoints (DESIGN.md §5): per (subject, endpoint, exchange, key),
//! kept `http.idempotency_window` in memory on this instance. A repeat with the same request
//! replays the first answer and publishes nothing; a repeat with another request, or while the
//! first is still in flight, is a conflict. Only answers that settled the publish are kept (2xx
//! and 422 unroutable): after a 4xx/5xx the client still owns the message and may retry.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use bytes::Bytes;
use parking_lot::Mutex;

/// Bounds memory whatever the window: the oldest keys go first.
const MAX_KEYS: usize = 100_000;
pub const MAX_KEY_LEN: usize = 255;

type Key = (Arc<str>, &'static str, String, String);

enum Slot {
    InFlight,
    Done {
        fingerprint: u64,
        status: StatusCode,
        body: Bytes,
    },
}

struct Inner {
    slots: HashMap<Key, Slot>,
    order: VecDeque<(Instant, Key)>,
}

pub struct IdempotencyCache {
    window: Duration,
    hasher: RandomState,
    inner: Arc<Mutex<Inner>>,
}

pub enum Begin {
    /// First time: publish, then `complete` the guard.
    Fresh(Guard),
    /// Seen and settled: answer this, publish nothing.
    Replay(StatusCode, Bytes),
    /// Another request under the same key, or the first is still in flight.
    Conflict(&'static str),
}

/// Holds a key in flight; dropped without `complete`, it frees the key again.
pub struct Guard {
    key: Option<Key>,
    inner: Arc<Mutex<Inner>>,
    fingerprint: u64,
}

impl Guard {
    pub fn complete(mut self, status: StatusCode, body: Bytes) {
        let Some(key) = self.key.take() else { return };
        let mut inner = self.inner.lock();
        if status.is_success() || status == StatusCode::UNPROCESSABLE_ENTITY {
            // Expiry is counted again from here, for requests that outlived the window.
            inner.order.push_back((Instant::now(), key.clone()));
            inner.slots.insert(
                key,
                Slot::Done {
                    fingerprint: self.fingerprint,
                    status,
                    body,
                },
            );
        } else {
            inner.slots.remove(&key);
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            self.inner.lock().slots.remove(&key);
        }
    }
}

impl IdempotencyCache {
    pub fn new(window: Duration) -> Self {
        IdempotencyCache {
            window,
            hasher: RandomState::new(),
            inner: Arc::new(Mutex::new(Inner {
                slots: HashMap::new(),
                order: VecDeque::new(),
            })),
        }
    }

    pub fn begin(
        &self,
        subject: Arc<str>,
        endpoint: &'static str,
        exchange: &str,
        key: &str,
        request: &[&[u8]],
    ) -> Begin {
        let fingerprint = self.hasher.hash_one(request);
        let key: Key = (subject, endpoint, exchange.to_owned(), key.to_owned());
        let now = Instant::now();
        let mut inner = self.inner.lock();
        while let Some((at, _)) = inner.order.front() {
            if now.duration_since(*at) < self.window && inner.order.len() < MAX_KEYS {
                break;
            }
            if let Some((_, old)) = inner.order.pop_front()
                && matches!(inner.slots.get(&old), Some(Slot::Done { .. }))
            {
                inner.slots.remove(&old);
            }
        }
        match inner.slots.get(&key) {
            Some(Slot::InFlight) => {
                Begin::Conflict("a request with this Idempotency-Key is still in progress")
            }
            Some(Slot::Done { fingerprint: f, .. }) if *f != fingerprint => {
                Begin::Conflict("this Idempotency-Key was used for a different request")
            }
            Some(Slot::Done { status, body, .. }) => Begin::Replay(*status, body.clone()),
            None => {
                inner.slots.insert(key.clone(), Slot::InFlight);
                inner.order.push_back((now, key.clone()));
                Begin::Fresh(Guard {
                    key: Some(key),
                    inner: self.inner.clone(),
                    fingerprint,
                })
            }
        }
    }
}
