//! An engine channel's delivery tags, mapped to the AMQP channel and tag each delivery came on
//! (DESIGN.md §2): one engine channel spans many AMQP channels (one per consumer, one for
//! gets), and across reconnects many connections, whose channel numbers repeat.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

use crate::engine::EngineError;

/// An AMQP channel with the connection generation it belongs to: channel numbers are reused
/// by every new connection.
#[derive(Clone)]
pub(super) struct Amqp {
    pub generation: u64,
    pub channel: lapin::Channel,
}

impl Amqp {
    fn key(&self) -> (u64, u16) {
        (self.generation, self.channel.id())
    }
}

#[derive(Default)]
pub(super) struct Tags {
    next: AtomicU64,
    unacked: Mutex<BTreeMap<u64, (Amqp, u64)>>,
}

impl Tags {
    pub(super) fn next(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed) + 1
    }

    pub(super) fn track(&self, amqp: &Amqp, amqp_tag: u64) -> u64 {
        let tag = self.next();
        self.unacked.lock().insert(tag, (amqp.clone(), amqp_tag));
        tag
    }

    /// Forgets every tag of one AMQP channel (it closed: the broker requeued them).
    pub(super) fn forget_channel(&self, amqp: &Amqp) {
        let key = amqp.key();
        self.unacked.lock().retain(|_, (a, _)| a.key() != key);
    }

    pub(super) fn holds_on(&self, amqp: &Amqp) -> bool {
        let key = amqp.key();
        self.unacked.lock().values().any(|(a, _)| a.key() == key)
    }

    pub(super) fn clear(&self) {
        self.unacked.lock().clear();
    }

    /// Takes the tags an ack or nack settles, as one (channel, highest AMQP tag, multiple)
    /// per AMQP channel; an unknown tag is refused and changes nothing.
    pub(super) fn take(&self, tag: u64, multiple: bool) -> Result<(Batches, usize), EngineError> {
        let mut unacked = self.unacked.lock();
        if !multiple {
            let (a, amqp) = unacked.remove(&tag).ok_or_else(|| unknown(tag))?;
            return Ok((vec![(a.channel, amqp, false)], 1));
        }
        // AMQP: multiple with tag 0 means every outstanding delivery.
        let upto = if tag == 0 { u64::MAX } else { tag };
        let settled: Vec<u64> = unacked.range(..=upto).map(|(t, _)| *t).collect();
        if settled.is_empty() {
            return Err(unknown(tag));
        }
        let count = settled.len();
        let mut per_channel: BTreeMap<(u64, u16), (lapin::Channel, u64)> = BTreeMap::new();
        for t in settled {
            if let Some((a, amqp)) = unacked.remove(&t) {
                let entry = per_channel.entry(a.key()).or_insert((a.channel, amqp));
                entry.1 = entry.1.max(amqp);
            }
        }
        let batches = per_channel
            .into_values()
            .map(|(ch, amqp)| (ch, amqp, true))
            .collect();
        Ok((batches, count))
    }
}

/// Acks or nacks to send, one per broker channel: (channel, AMQP tag, multiple).
pub(super) type Batches = Vec<(lapin::Channel, u64, bool)>;

fn unknown(tag: u64) -> EngineError {
    EngineError::PreconditionFailed(format!("unknown delivery tag {tag}"))
}
