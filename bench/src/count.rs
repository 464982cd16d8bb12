//! Numbered payloads, so a throughput figure says what it cost (issue 18): every payload starts
//! with its publisher's index and sequence number; every subscriber records what it received,
//! and after the run (publishers stopped, deliveries drained) loss, duplicates and reordering
//! are counted against what the publishers sent.

use std::sync::atomic::{AtomicU64, Ordering};

use std::sync::Mutex;

/// Bytes of the number at the head of each payload: publisher (4) and sequence (8).
pub const HEADER: usize = 12;

/// The payload of publisher `publisher`'s message `seq`, padded to `size` (at least the header).
pub fn payload(publisher: u32, seq: u64, size: usize) -> Vec<u8> {
    let mut p = Vec::with_capacity(size.max(HEADER));
    p.extend_from_slice(&publisher.to_be_bytes());
    p.extend_from_slice(&seq.to_be_bytes());
    p.resize(size.max(HEADER), b'x');
    p
}

fn number(payload: &[u8]) -> Option<(usize, u64)> {
    let publisher = u32::from_be_bytes(payload.get(..4)?.try_into().ok()?);
    let seq = u64::from_be_bytes(payload.get(4..HEADER)?.try_into().ok()?);
    Some((publisher as usize, seq))
}

/// What one publisher sent.
#[derive(Default)]
pub struct Sent(AtomicU64);

impl Sent {
    /// The next sequence number; counted as sent once the client took it.
    pub fn next(&self) -> u64 {
        self.0.fetch_add(1, Ordering::Relaxed)
    }

    pub fn count(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Default)]
struct FromOne {
    seen: Vec<u64>,
    last: Option<u64>,
}

/// What one subscriber received, per publisher.
#[derive(Default)]
pub struct Received {
    from: Mutex<Vec<FromOne>>,
    duplicates: AtomicU64,
    reordered: AtomicU64,
    distinct: AtomicU64,
}

impl Received {
    pub fn record(&self, payload: &[u8]) {
        let Some((publisher, seq)) = number(payload) else {
            return;
        };
        let mut from = self.from.lock().unwrap_or_else(|e| e.into_inner());
        if from.len() <= publisher {
            from.resize_with(publisher + 1, FromOne::default);
        }
        let one = &mut from[publisher];
        let (word, bit) = ((seq / 64) as usize, seq % 64);
        if one.seen.len() <= word {
            one.seen.resize(word + 1, 0);
        }
        if one.seen[word] & (1 << bit) != 0 {
            self.duplicates.fetch_add(1, Ordering::Relaxed);
            return;
        }
        one.seen[word] |= 1 << bit;
        self.distinct.fetch_add(1, Ordering::Relaxed);
        if one.last.is_some_and(|last| seq < last) {
            self.reordered.fetch_add(1, Ordering::Relaxed);
        }
        one.last = Some(seq);
    }

    pub fn distinct(&self) -> u64 {
        self.distinct.load(Ordering::Relaxed)
    }
}

/// Loss over a whole run, every subscriber counted.
#[derive(Debug, Default, Clone, Copy)]
pub struct Loss {
    /// Messages sent times subscribers: what full delivery would have been.
    pub expected: u64,
    pub lost: u64,
    pub duplicates: u64,
    pub reordered: u64,
}

impl Loss {
    pub fn of(sent: &[std::sync::Arc<Sent>], received: &[std::sync::Arc<Received>]) -> Loss {
        let sent: u64 = sent.iter().map(|s| s.count()).sum();
        let expected = sent * received.len() as u64;
        let distinct: u64 = received.iter().map(|r| r.distinct()).sum();
        Loss {
            expected,
            lost: expected.saturating_sub(distinct),
            duplicates: received
                .iter()
                .map(|r| r.duplicates.load(Ordering::Relaxed))
                .sum(),
            reordered: received
                .iter()
                .map(|r| r.reordered.load(Ordering::Relaxed))
                .sum(),
        }
    }

    pub fn add(&mut self, other: Loss) {
        self.expected += other.expected;
        self.lost += other.lost;
        self.duplicates += other.duplicates;
        self.reordered += other.reordered;
    }

    pub fn percent(&self) -> f64 {
        if self.expected == 0 {
            0.0
        } else {
            100.0 * self.lost as f64 / self.expected as f64
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn loss_duplicates_and_reordering_are_counted() {
        let sent = Arc::new(Sent::default());
        let received = Arc::new(Received::default());
        for _ in 0..5 {
            sent.next();
        }
        for seq in [0, 2, 1, 2] {
            received.record(&payload(0, seq, 64));
        }
        let loss = Loss::of(&[sent], &[received]);
        assert_eq!((loss.expected, loss.lost), (5, 2));
        assert_eq!((loss.duplicates, loss.reordered), (1, 1));
        assert_eq!(loss.percent(), 40.0);
    }
}
