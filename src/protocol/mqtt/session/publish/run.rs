//! Publishes staged to go to the engine as one run: those one socket read brought, handed
//! over together (`Channel::publish_run`) once the read is handled, before anything that
//! must come after them (docs/mqtt.md).

use super::*;

/// What a staged publish is owed once the engine answered.
pub(super) struct Staged {
    packet_id: Option<u16>,
    qos: u8,
}

/// The most publishes staged before they are handed over, whatever is still buffered. Room
/// for this many is made at a connection's first run and kept (a test bounds it): grown
/// from nothing on every run, the vectors' reallocations were 60 instructions a message
/// (callgrind; docs/bench.md, 2026-12-06 "day").
const RUN_MAX: usize = 64;

/// A publish [`Session::stage`] gave back.
pub(super) enum Unstaged {
    /// Refused by the gate (answered after the staged ones).
    Refused(PublishIn, PublishRefused),
    /// Not the common way: published after the staged ones.
    Other(PublishIn),
}

impl Inflow {
    /// How many publishes are staged.
    pub(super) fn staged(&mut self) -> usize {
        self.publisher.get_mut().as_ref().map_or(0, |p| p.run.len())
    }
}

impl Session {
    /// Stages a publish that goes the common way (see [`Self::publish_plain`]); gives back
    /// any other.
    pub(super) fn stage(&mut self, p: PublishIn) -> Option<Unstaged> {
        let alias = p
            .props
            .as_ref()
            .is_some_and(|props| props.topic_alias.is_some());
        let at_maximum = p.qos > 0
            && self.client.version == Version::V5
            && self.inflow.unanswered() >= usize::from(self.ctx.config.mqtt.receive_maximum);
        let key = match self.inflow.publisher().last_key.as_ref() {
            Some((topic, key)) if **topic == *p.topic => key.clone(),
            _ => return Some(Unstaged::Other(p)),
        };
        if p.qos > 1
            || alias
            || at_maximum
            || self.stall.is_some()
            || self.inflow.has_parked()
            || p.payload.len() as u64 > self.ctx.config.limits.max_message_bytes.as_u64()
        {
            return Some(Unstaged::Other(p));
        }
        // Made before the gate, which holds the session's principal while it is open.
        let message = self.message_of(&p);
        let cleared = match self.clear(&key, p.payload.len()) {
            Ok(cleared) => cleared,
            Err(refused) => return Some(Unstaged::Refused(p, refused)),
        };
        let message = cleared.stamp(message);
        let staged = Staged {
            packet_id: p.packet_id,
            qos: p.qos,
        };
        // Counted as owed from now: the Receive Maximum holds for staged publishes too.
        self.inflow.owed += u32::from(p.qos == 1);
        self.inflow.admitted();
        let run = &mut self.inflow.publisher().run;
        if run.capacity() == 0 {
            run.reserve(RUN_MAX);
        }
        run.push(key, message, staged);
        None
    }

    /// Whether the staged publishes are to be handed over now: the run is full, or the
    /// connection will not read another packet without waiting for the socket (or at all).
    /// `more_buffered` is asked only when publishes are staged: the loop asks this every turn
    /// of every connection.
    pub fn flushes(&mut self, more_buffered: impl FnOnce() -> bool) -> bool {
        let staged = self.inflow.staged();
        staged > 0 && (staged >= RUN_MAX || !more_buffered() || !self.takes_packets())
    }

    /// Hands the staged publishes to the engine as one run, and takes each one's confirm as
    /// [`Self::publish_now_plain`] takes a publish's. Not while the connection is paced: the
    /// ones after a publish that paced stay staged until it has waited.
    pub fn flush_staged(&mut self) -> Outcome {
        if self.stall.is_some() {
            return Outcome::Continue;
        }
        let Some(publisher) = self.inflow.publisher.get_mut() else {
            return Outcome::Continue;
        };
        if publisher.run.is_empty() {
            return Outcome::Continue;
        }
        let Some(channel) = self.conn.opened_channel().cloned() else {
            return Outcome::Continue;
        };
        let mut run = std::mem::take(&mut publisher.run);
        let mut outcome = Outcome::Continue;
        let exchange = &self.ctx.config.mqtt.exchange;
        for (staged, confirm) in run.publish(&*channel, exchange, PROTOCOL) {
            // Owed again only if it waits in `confirms` (`queue` counts it there).
            self.inflow.owed -= u32::from(staged.qos == 1);
            let answered =
                self.hand_over(staged.qos, staged.packet_id, confirm, reason::SUCCESS, None);
            if let Some((ack, result)) = answered
                && let close @ Outcome::Close(_) = self.settle(ack, result)
                && matches!(outcome, Outcome::Continue)
            {
                outcome = close;
            }
        }
        if let Some(publisher) = self.inflow.publisher.get_mut() {
            publisher.run = run;
        }
        outcome
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_run_holds_little() {
        // What a connection that publishes in runs keeps for them, per publish room: the
        // message and its key, its tag and its confirm.
        let per = std::mem::size_of::<(Arc<str>, Message)>()
            + std::mem::size_of::<Staged>()
            + std::mem::size_of::<crate::engine::PublishConfirm>();
        assert!(RUN_MAX * per <= 8 * 1024, "{per} bytes a publish");
    }
}
