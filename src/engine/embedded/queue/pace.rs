//! Which buffers a publish to this queue landed in above their high-water mark, for its
//! publisher to wait on (DESIGN.md §7): a bounded drop-head queue's own, else the queue's
//! backlog, and its no-ack consumers' buffers.
//!
//! The backlog is the ready messages the consumers have no credit for. A QoS 1 subscriber
//! (or a manual-ack consumer) takes a window's worth at a time, so a publisher faster than it
//! grows the queue without end: a gigabyte in ten seconds in the QoS 1 bench, the memory and
//! page faults of which slowed the deliveries themselves (docs/flow.md). Above 3/4 of the
//! consumers' buffer bound it paces the publisher as a full buffer would, for at most
//! `limits.pace_max_wait` an episode; a consumer that does not drain it meanwhile is slow
//! and paces nobody until it has. Both are one gauge of the ready messages (`State::pressure`,
//! counted where they enter and leave the queue); only its bound and when it is made differ.

use super::{BufferKind, Effects, Pressure, Queue, State};

impl Queue {
    /// The buffers a message just enqueued went to (or waits for) that are above their
    /// high-water mark: this queue's own (its bound's when it drops at the head, else its
    /// backlog's) and its no-ack consumers' buffers.
    pub(super) fn pacing(&self, st: &mut State, fx: &mut Effects) {
        if st.consumers.is_empty() {
            return;
        }
        // A drop-head queue's gauge is there from the start; any other's is made here.
        if st.pressure.is_none()
            && let Some(bound) = self.gauges.backlog
            && (st.ready.len() as u64 >= bound.messages / 2 || st.ready_bytes >= bound.bytes / 2)
        {
            let (messages, bytes) = (st.ready.len() as u64, st.ready_bytes);
            st.pressure = Some(Pressure::holding(bound, BufferKind::Queue, messages, bytes));
        }
        if let Some(p) = &st.pressure
            && p.paces()
        {
            fx.paced.push(p);
        }
        for slot in &st.consumers {
            if let Some(p) = &slot.pressure
                && p.paces()
            {
                fx.paced.push(p);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_queue_stays_in_its_size_class() {
        // Every MQTT session and `/ws` subscription has one: 304 bytes and the `Arc`'s counts
        // fill mimalloc's 320-byte class (docs/bench.md).
        let size = std::mem::size_of::<super::Queue>();
        assert!(size <= 304, "{size}");
    }
}
