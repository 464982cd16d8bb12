//! What a queue reports about itself: counts, sizes and totals (listings, gauges, operators).

use super::Queue;
use crate::engine::QueueTotals;

impl Queue {
    /// Body bytes of the ready messages (in memory or paged out).
    pub fn ready_bytes(&self) -> u64 {
        self.state.lock().ready_bytes
    }

    /// Ready, unacknowledged, consumers.
    pub fn counts(&self) -> (u64, u64, u32) {
        let st = self.state.lock();
        (st.ready.len() as u64, st.unacked, st.consumers.len() as u32)
    }

    /// Messages taken and handed out since start: an operator's in and out rates.
    pub fn totals(&self) -> QueueTotals {
        let st = self.state.lock();
        QueueTotals {
            published: st.enqueued,
            delivered: st.handed_out,
        }
    }

    pub fn is_deleted(&self) -> bool {
        self.state.lock().deleted
    }
}
