//! Which client connection owns which exclusive queue, and how many channels each owner has
//! open (DESIGN.md §1). Upstream the queues are not exclusive (the gateway's connections are
//! not its clients'), so the engine refuses other owners itself, with RabbitMQ's 405, and
//! deletes an owner's queues when its last channel closes.

use std::collections::HashMap;

use parking_lot::Mutex;

use crate::engine::EngineError;

#[derive(Default)]
pub(super) struct Owners {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    queues: HashMap<String, u64>,
    channels: HashMap<u64, usize>,
}

impl Owners {
    pub(super) fn opened(&self, owner: u64) {
        *self.inner.lock().channels.entry(owner).or_default() += 1;
    }

    /// One of `owner`'s channels closed; when it was the last, its queues (to delete).
    pub(super) fn closed(&self, owner: u64) -> Vec<String> {
        let mut inner = self.inner.lock();
        let last = match inner.channels.get_mut(&owner) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            Some(_) => true,
            None => false,
        };
        if !last {
            return Vec::new();
        }
        inner.channels.remove(&owner);
        let mine: Vec<String> = inner
            .queues
            .iter()
            .filter(|(_, o)| **o == owner)
            .map(|(q, _)| q.clone())
            .collect();
        for q in &mine {
            inner.queues.remove(q);
        }
        mine
    }

    /// `ResourceLocked` when another owner holds `queue`.
    pub(super) fn check(&self, queue: &str, owner: u64) -> Result<(), EngineError> {
        match self.inner.lock().queues.get(queue) {
            Some(o) if *o != owner => Err(EngineError::ResourceLocked(queue.to_owned())),
            _ => Ok(()),
        }
    }

    pub(super) fn owns(&self, queue: &str, owner: u64) -> bool {
        self.inner.lock().queues.get(queue) == Some(&owner)
    }

    pub(super) fn is_owned(&self, queue: &str) -> bool {
        self.inner.lock().queues.contains_key(queue)
    }

    pub(super) fn claim(&self, queue: &str, owner: u64) {
        self.inner.lock().queues.insert(queue.to_owned(), owner);
    }

    pub(super) fn forget(&self, queue: &str) {
        self.inner.lock().queues.remove(queue);
    }
}
