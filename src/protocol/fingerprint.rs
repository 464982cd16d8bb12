//! Fingerprints of delivered messages that outlive the process: an MQTT session's QoS 2
//! PUBLISHes awaiting PUBREC (stored with the session, matched against the redeliveries after
//! a restart) and a durable SSE stream's event ids (held by the browser, sent back as
//! `Last-Event-ID`).
//!
//! Both are compared with figures another gateway process computed, and that process may be a
//! newer build: the usual reason for a restart is an upgrade. std's `DefaultHasher` (and the
//! `Hash` impls feeding it) may change between Rust releases, so a fingerprint from the build
//! before would match nothing, and every message in flight across the upgrade would go again as
//! a new one (a second copy under exactly-once, duplicates on resume). XXH3 is a specified
//! algorithm: the same bytes give the same figure in every build. Each part is hashed with
//! the figure so far as its seed, so where one part ends and the next begins counts too.

use xxhash_rust::xxh3::xxh3_64_with_seed;

use crate::engine::Delivery;

/// A fingerprint being built, one part at a time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Fingerprint(u64);

impl Fingerprint {
    /// Adds `bytes` as one part.
    #[must_use]
    pub fn with(self, bytes: &[u8]) -> Self {
        Self(xxh3_64_with_seed(bytes, self.0))
    }

    /// Adds an optional part: absent and empty differ.
    #[must_use]
    pub fn with_opt(self, bytes: Option<&[u8]>) -> Self {
        match bytes {
            None => self.with(&[0]),
            Some(b) => self.with(&[1]).with(b),
        }
    }

    /// The message as routed: exchange, routing key and body. Two messages alike in all three
    /// are told apart by their order, by whoever compares them.
    #[must_use]
    pub fn of_message(d: &Delivery) -> Self {
        Self::default()
            .with(d.exchange().as_bytes())
            .with(d.routing_key().as_bytes())
            .with(d.body())
    }

    pub fn get(self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The figures are part of what the gateway stores and hands out: if this changes, sessions
    /// and browsers holding fingerprints from the build before stop matching. The expected
    /// figure is the reference implementation's (Python's `xxhash`, on libxxhash:
    /// `xxh3_64_intdigest(part, seed=previous)` over the three parts).
    #[test]
    fn the_same_bytes_give_the_same_figure_in_every_build() {
        let f = Fingerprint::default()
            .with(b"amq.topic")
            .with(b"a.b")
            .with(b"payload");
        assert_eq!(f.get(), 0x6d81_8304_9fc1_972c);
    }

    #[test]
    fn where_a_part_ends_counts() {
        let ab_c = Fingerprint::default().with(b"ab").with(b"c");
        let a_bc = Fingerprint::default().with(b"a").with(b"bc");
        assert_ne!(ab_c, a_bc);
        let none = Fingerprint::default().with_opt(None);
        let empty = Fingerprint::default().with_opt(Some(b""));
        assert_ne!(none, empty);
    }
}
