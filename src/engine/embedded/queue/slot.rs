//! A queue's consumers as the queue sees them: their credit, and the sink it hands their
//! deliveries to.

use super::{Entry, Now, Queue};
use crate::engine::CancelReason;
use crate::flow::Pressure;
use std::sync::Arc;

/// Where a queue hands a consumer's deliveries: defined with the queue, implemented by the
/// consumer's channel, so the queue never depends on channels (it calls out through this under
/// its lock).
pub(in crate::engine::embedded) trait Sink: Send + Sync {
    /// Called with the queue's lock held. `Err` gives the entry back when the consumer is gone.
    /// `room`: how many deliveries this dispatch may still hand this consumer, this one
    /// included, so the buffer they land in grows once for a batch.
    fn deliver(
        &self,
        queue: &Arc<Queue>,
        consumer: u64,
        entry: Entry,
        now: &Now,
        room: usize,
    ) -> Result<(), Entry>;

    /// The consumer ends for `reason` (the queue went, the channel closed, a cancel).
    fn end(&self, reason: CancelReason);

    /// The queue let go of this consumer: once its stream took what it was given, it ends.
    fn detach(&self);
}

pub(in crate::engine::embedded) struct Slot {
    pub id: u64,
    pub credit: u32,
    pub no_ack: bool,
    /// Shared with the consumer's stream (the sink is its hand-off).
    pub sink: Arc<dyn Sink>,
    /// The gauge of the buffer a no-ack consumer's deliveries go to (DESIGN.md §7).
    pub pressure: Option<Pressure>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.sink.detach();
    }
}
