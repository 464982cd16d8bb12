//! Outbound QoS 1/2 deliveries in flight, by packet id, and what of them a persistent session
//! keeps across a reconnect: a QoS 2 PUBLISH the client may hold (sent, its PUBREC not
//! received when the connection ended) goes again under its original packet id
//! ([MQTT-4.4.0-1]), so the client's own exactly-once state recognises it as the same one.
//!
//! The engine forgets packet ids: a message the connection left unacknowledged comes back as
//! a redelivery that says nothing of the id it went with. So each QoS 2 PUBLISH in flight is
//! remembered with a fingerprint of its message ([`fingerprint`]), stored with the session
//! when the connection ends ([`super::stored::Stored::sent`]), and the next connection keeps
//! those ids back ([`Inflight::Reserved`]) until a redelivery with the same fingerprint takes
//! one. A session queue gives its requeued messages back first, in the order they were sent,
//! so a delivery that is not a redelivery means the reserved ids left will not be asked for
//! (their messages expired, or went with an unsubscribe): they are freed then.

use std::collections::VecDeque;
use std::collections::hash_map::{Entry, HashMap};

use super::Sparse;
use crate::engine::Delivery;
use crate::protocol::fingerprint::Fingerprint;

type ById<V> = HashMap<u16, V, foldhash::fast::RandomState>;

/// Outbound QoS 1/2 deliveries by packet id, made at the first: a subscriber that was never
/// sent one (an idle device) holds a pointer, where the empty map inline was 40 bytes of
/// every session. foldhash, not SipHash: it is written, read and cleared once per QoS 1
/// message, and the gateway picks the ids.
#[derive(Default)]
pub(super) struct InflightMap(Sparse<Inflights>);

#[derive(Default)]
struct Inflights {
    ids: ById<Inflight>,
    /// How many are [`Inflight::Released`]: QoS 2 deliveries the engine's credit no longer
    /// counts (settled at PUBREC) and the client's Receive Maximum still does, until PUBCOMP.
    released: u16,
    /// QoS 2 only, made at its first use: a QoS 1 subscriber pays a pointer for it.
    resend: Sparse<Resend>,
}

#[derive(Default)]
struct Resend {
    /// The fingerprint of each [`Inflight::Sent`] delivery's message.
    sent: ById<u64>,
    /// The ids an earlier connection left [`Inflight::Sent`], in the order they were sent,
    /// with their messages' fingerprints: each [`Inflight::Reserved`] until taken or freed.
    reserved: VecDeque<(u16, u64)>,
}

/// An outbound delivery awaiting its acknowledgement. The engine tag is `None` for a copy no
/// queue holds.
#[derive(Debug, Clone, Copy)]
pub(super) enum Inflight {
    /// QoS 1: settled by PUBACK.
    AtLeastOnce(Option<u64>),
    /// QoS 2 sent: PUBREC settles it with the engine, then PUBREL goes out.
    Sent(Option<u64>),
    /// QoS 2 released: the packet id is free again at PUBCOMP.
    Released,
    /// QoS 2 sent by an earlier connection of the session and not PUBREC'd: the id waits for
    /// its message to be redelivered.
    Reserved,
}

/// What identifies a delivery's message across its redeliveries: its exchange, routing key
/// and body ([`Fingerprint::of_message`], the same in every build, so a session stored by the
/// gateway before an upgrade still matches). Two messages alike in all three are told apart
/// by their order.
pub(super) fn fingerprint(d: &Delivery) -> u64 {
    Fingerprint::of_message(d).get()
}

impl InflightMap {
    pub(super) fn get(&self, id: &u16) -> Option<&Inflight> {
        self.0.as_ref()?.ids.get(id)
    }

    pub(super) fn contains_key(&self, id: &u16) -> bool {
        self.get(id).is_some()
    }

    pub(super) fn insert(&mut self, id: u16, state: Inflight) {
        let m = self.0.get_or_insert_default();
        let was = m.ids.insert(id, state);
        if matches!(state, Inflight::Released) {
            m.released += 1;
        }
        m.ended(was, id);
    }

    pub(super) fn remove(&mut self, id: &u16) -> Option<Inflight> {
        let m = self.0.as_mut()?;
        let was = m.ids.remove(id);
        m.ended(was, *id);
        was
    }

    /// A PUBACK's delivery: removed and its tag returned if `id` is a QoS 1 one. A PUBACK for
    /// a QoS 2 id changes nothing: it freed the id before, and the engine's delivery stayed
    /// unsettled until the connection ended.
    pub(super) fn take_acked(&mut self, id: u16) -> Option<Option<u64>> {
        match self.0.as_mut()?.ids.entry(id) {
            Entry::Occupied(o) => match *o.get() {
                Inflight::AtLeastOnce(tag) => {
                    o.remove();
                    Some(tag)
                }
                _ => None,
            },
            Entry::Vacant(_) => None,
        }
    }

    /// A QoS 2 delivery sent under `id`, its message's fingerprint remembered.
    pub(super) fn sent(&mut self, id: u16, tag: Option<u64>, print: u64) {
        self.insert(id, Inflight::Sent(tag));
        if let Some(m) = &mut self.0 {
            m.resend.get_or_insert_default().sent.insert(id, print);
        }
    }

    pub(super) fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |m| m.ids.len())
    }

    pub(super) fn released(&self) -> u16 {
        self.0.as_ref().map_or(0, |m| m.released)
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = (&u16, &Inflight)> {
        self.0.iter().flat_map(|m| m.ids.iter())
    }

    /// Keeps `id` back for a redelivery of the message `print` (from the stored session).
    pub(super) fn reserve(&mut self, id: u16, print: u64) {
        self.insert(id, Inflight::Reserved);
        if let Some(m) = &mut self.0 {
            m.resend
                .get_or_insert_default()
                .reserved
                .push_back((id, print));
        }
    }

    /// Whether any id is still kept back.
    pub(super) fn reserving(&self) -> bool {
        self.0
            .as_ref()
            .and_then(|m| m.resend.as_ref())
            .is_some_and(|r| !r.reserved.is_empty())
    }

    /// The id kept back for the message `print`, now free for its redelivery. The ones kept
    /// before it are freed too: their messages would have come first.
    pub(super) fn take_reserved(&mut self, print: u64) -> Option<u16> {
        let m = self.0.as_mut()?;
        let at = m
            .resend
            .as_ref()?
            .reserved
            .iter()
            .position(|(_, p)| *p == print)?;
        m.unreserve(at + 1)
    }

    /// Frees every id still kept back: a delivery that is not a redelivery came, so no message
    /// they wait for will.
    pub(super) fn free_reserved(&mut self) {
        if let Some(m) = self.0.as_mut() {
            m.unreserve(usize::MAX);
        }
    }

    /// The QoS 2 ids the client may hold PUBLISHes under, with their messages' fingerprints,
    /// in the order they were sent: those still kept back, then those sent and not PUBREC'd,
    /// by delivery tag (the channel numbers its deliveries in order).
    pub(super) fn unreceived(&self) -> Vec<(u16, u64)> {
        let Some(resend) = self.0.as_ref().and_then(|m| m.resend.as_ref()) else {
            return Vec::new();
        };
        let mut sent: Vec<(u64, u16, u64)> = self
            .iter()
            .filter_map(|(id, s)| match s {
                Inflight::Sent(tag) => Some((tag.unwrap_or(0), *id, *resend.sent.get(id)?)),
                _ => None,
            })
            .collect();
        sent.sort_unstable();
        resend
            .reserved
            .iter()
            .copied()
            .chain(sent.into_iter().map(|(_, id, print)| (id, print)))
            .collect()
    }
}

impl Inflights {
    /// Frees the first `n` ids kept back (all, past their count); returns the last one freed.
    fn unreserve(&mut self, n: usize) -> Option<u16> {
        let reserved = &mut self.resend.as_mut()?.reserved;
        let mut last = None;
        for (id, _) in reserved.drain(..n.min(reserved.len())) {
            if let Entry::Occupied(o) = self.ids.entry(id)
                && matches!(o.get(), Inflight::Reserved)
            {
                o.remove();
            }
            last = Some(id);
        }
        last
    }

    /// Bookkeeping for `id` leaving the state it `was` in.
    fn ended(&mut self, was: Option<Inflight>, id: u16) {
        match was {
            Some(Inflight::Released) => self.released -= 1,
            Some(Inflight::Sent(_)) => {
                if let Some(r) = &mut self.resend {
                    r.sent.remove(&id);
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reserved_id_is_taken_by_its_message_and_frees_those_before_it() {
        let mut m = InflightMap::default();
        for (id, print) in [(7, 70), (3, 30), (9, 90)] {
            m.reserve(id, print);
        }
        assert!(m.reserving());
        assert!(m.contains_key(&7) && m.contains_key(&3));
        assert_eq!(m.take_reserved(30), Some(3), "the second message's id");
        assert!(
            !m.contains_key(&7),
            "the first one's message did not come first: freed"
        );
        assert!(
            !m.contains_key(&3),
            "free for the redelivery to be tracked under"
        );
        assert_eq!(m.take_reserved(70), None);
        assert_eq!(m.take_reserved(12), None, "not a message sent before");
        assert!(m.contains_key(&9));
        m.free_reserved();
        assert!(!m.reserving() && m.len() == 0);
    }

    #[test]
    fn what_is_stored_is_in_the_order_sent_and_ends_at_pubrec() {
        let mut m = InflightMap::default();
        m.reserve(40, 400);
        m.sent(2, Some(11), 20);
        m.sent(1, Some(10), 10);
        m.insert(5, Inflight::AtLeastOnce(Some(12)));
        m.sent(3, Some(13), 30);
        assert_eq!(m.unreceived(), [(40, 400), (1, 10), (2, 20), (3, 30)]);
        m.insert(2, Inflight::Released);
        assert_eq!(m.remove(&3).map(|_| ()), Some(()));
        assert_eq!(m.unreceived(), [(40, 400), (1, 10)]);
        assert_eq!(m.released(), 1);
        assert_eq!(m.take_acked(2), None, "a PUBACK for a QoS 2 id");
        assert_eq!(m.take_acked(5), Some(Some(12)));
        assert_eq!(m.len(), 3);
    }
}
