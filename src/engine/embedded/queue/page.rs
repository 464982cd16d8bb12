//! Queues larger than memory: a ready entry of a persistent message whose write is durable may
//! give its body back ([`Ready::Out`]), keeping what the queue needs without it (order, size,
//! deadline, the redelivered flag, the stored id). The broker pages the tail of durable queues
//! out when the bytes held pass the paging threshold; the pager reads a consumer's next entries
//! back ahead of its credit ([`Queue::read_ahead`]), and an entry still out when it is handed
//! to a consumer, returned by `get` or dead-lettered is read back then ([`Queue::page_in`]).

use std::sync::Arc;
use std::time::Instant;

use super::{Effects, Entry, Queue, State};
use crate::engine::embedded::held::{Held, OnDisk, Stored};
use crate::engine::embedded::store::{Store, StoreError};

/// A ready entry whose body is only on disk.
pub(in crate::engine::embedded) struct Paged {
    pub seq: u64,
    pub disk: Arc<OnDisk>,
    pub size: u64,
    pub expires_at: Option<Instant>,
    pub redelivered: bool,
}

impl Paged {
    /// The entry again, with its body read back.
    fn entry(&self, envelope: Arc<Stored>) -> Entry {
        Entry {
            seq: self.seq,
            envelope,
            expires_at: self.expires_at,
            redelivered: self.redelivered,
            on_disk: true,
        }
    }
}

/// A ready entry, in memory or paged out.
pub(in crate::engine::embedded) enum Ready {
    In(Entry),
    Out(Paged),
}

impl Ready {
    pub fn seq(&self) -> u64 {
        match self {
            Ready::In(e) => e.seq,
            Ready::Out(p) => p.seq,
        }
    }

    pub fn size(&self) -> u64 {
        match self {
            Ready::In(e) => e.size(),
            Ready::Out(p) => p.size,
        }
    }

    pub fn expires_at(&self) -> Option<Instant> {
        match self {
            Ready::In(e) => e.expires_at,
            Ready::Out(p) => p.expires_at,
        }
    }

    pub fn disk(&self) -> Option<&Arc<OnDisk>> {
        match self {
            Ready::In(e) => e.disk(),
            Ready::Out(p) => Some(&p.disk),
        }
    }
}

/// Where a queue reads paged-out bodies back from, and the account they are charged to again.
pub(in crate::engine::embedded) struct Pages {
    pub store: Arc<dyn Store>,
    pub held: Arc<Held>,
}

impl Pages {
    /// The stored message `disk`, in memory again and charged to the bytes held.
    fn read(&self, disk: &Arc<OnDisk>) -> Result<Option<Arc<Stored>>, StoreError> {
        let envelope = self.store.read_message(disk.id)?;
        Ok(envelope.map(|e| Arc::new(Stored::new(e, &self.held, Some(disk.clone())))))
    }
}

impl Queue {
    /// The entry of `slot` with its body in memory; `None` (logged, and the entry forgotten)
    /// when the store cannot give it back.
    pub(super) fn page_in(&self, slot: Ready, fx: &mut Effects) -> Option<Entry> {
        let p = match slot {
            Ready::In(entry) => return Some(entry),
            Ready::Out(p) => p,
        };
        let read = match &self.pages {
            Some(pages) => pages.read(&p.disk),
            None => Ok(None),
        };
        match read {
            Ok(Some(stored)) => Some(p.entry(stored)),
            Ok(None) | Err(_) => {
                tracing::error!(queue = %self.name, id = p.disk.id, error = ?read.err(), "a paged-out message cannot be read back; dropped");
                metrics::counter!(crate::metrics::DROPPED, "reason" => "unreadable").increment(1);
                fx.more().dequeued.push((self.name.clone(), p.disk));
                None
            }
        }
    }

    /// Pages out entries from the tail (the last to be delivered) until `want` bytes went or
    /// none is left that would free memory: persistent, written, and held by this entry alone.
    /// Returns the bytes freed.
    pub fn page_out(&self, want: u64) -> u64 {
        if self.pages.is_none() {
            return 0;
        }
        let mut st = self.state.lock();
        page_out_tail(&mut st, want)
    }
}

fn page_out_tail(st: &mut State, want: u64) -> u64 {
    let mut freed = 0;
    for slot in st.ready.iter_mut().rev() {
        if freed >= want {
            break;
        }
        let Ready::In(e) = slot else { continue };
        let Some(disk) = e.disk() else { continue };
        if !disk.is_written() || Arc::strong_count(&e.envelope) != 1 {
            continue;
        }
        let paged = Paged {
            seq: e.seq,
            disk: disk.clone(),
            size: e.size(),
            expires_at: e.expires_at,
            redelivered: e.redelivered,
        };
        freed += crate::engine::embedded::held_size(&e.envelope);
        // Dropping the entry's `Stored` gives its body and its charge back.
        *slot = Ready::Out(paged);
    }
    freed
}

/// How far past its consumers' credit a queue's head is read back ahead of time: entries, and
/// at most a quarter of the paging threshold in bytes (so reading ahead never makes the pager
/// page out what it just read).
const AHEAD: usize = 64;

impl Queue {
    /// Asks for the head to be read back (once until the pager has done it); true when this
    /// call asked.
    pub fn want_read_ahead(&self) -> bool {
        !self
            .read_ahead_wanted
            .swap(true, std::sync::atomic::Ordering::AcqRel)
    }

    /// Reads back the paged-out entries among the next (consumer credit + 64) ready ones,
    /// outside the queue's lock, so consumers find their bodies in memory. Blocking (store
    /// reads): called off the runtime's workers.
    pub fn read_ahead(&self) {
        self.read_ahead_wanted
            .store(false, std::sync::atomic::Ordering::Release);
        let Some(pages) = &self.pages else { return };
        let head: Vec<(u64, Arc<OnDisk>)> = {
            let st = self.state.lock();
            let credit: usize = st.consumers.iter().map(|c| c.credit as usize).sum();
            let mut budget = pages.held.paging_threshold() / 4;
            st.ready
                .iter()
                .take(credit + AHEAD)
                .take_while(|s| {
                    let fits = budget > 0;
                    budget = budget.saturating_sub(s.size());
                    fits
                })
                .filter_map(|s| match s {
                    Ready::Out(p) => Some((p.seq, p.disk.clone())),
                    Ready::In(_) => None,
                })
                .collect()
        };
        for (seq, disk) in head {
            // A failed read is left to the delivery, which reads again and reports it.
            if let Ok(Some(stored)) = pages.read(&disk) {
                self.fill(seq, stored);
            }
        }
    }

    /// Puts a body read back into its entry, if that entry still waits paged out.
    fn fill(&self, seq: u64, stored: Arc<Stored>) {
        let mut st = self.state.lock();
        let at = st.ready.partition_point(|s| s.seq() < seq);
        if let Some(slot) = st.ready.get_mut(at)
            && let Ready::Out(p) = slot
            && p.seq == seq
        {
            *slot = Ready::In(p.entry(stored));
        }
    }
}
