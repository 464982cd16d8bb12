//! A channel's unacknowledged deliveries by delivery tag: the records in tag order in one ring,
//! an acked record left as a gap until the gaps around it can go.
//!
//! Every QoS 1 delivery is written here when it is handed to the consumer and taken out at its
//! ack. Tags rise (a channel's counter), records come in almost always at the back, and acks
//! come almost always in order, so most of the work is at the two ends. A `BTreeMap` did both
//! through its nodes: a removal at the front shifted the leaf's other records (72 bytes each)
//! and an insertion walked from the root, about 640 instructions of a QoS 1 message under
//! callgrind. Here both ends are `VecDeque` pushes and pops, and anything else is a binary
//! search: a record inserted behind a later tag (two queues delivering to one channel at once)
//! is placed in order, and an ack out of order leaves a gap. Gaps at either end go at once; when
//! gaps outnumber the records (a client holding one old delivery while acking thousands after
//! it), they are swept in one pass, so the ring holds at most about twice what is unacked.
//! Hand-written because it is this one map's access pattern; no map crate keeps it at the ends.

use std::collections::VecDeque;

pub(super) struct ByTag<V> {
    /// Ascending by tag; `None` is an acked record's gap.
    slots: VecDeque<(u64, Option<V>)>,
    /// Records (not gaps) in `slots`.
    live: usize,
}

impl<V> Default for ByTag<V> {
    fn default() -> Self {
        ByTag {
            slots: VecDeque::new(),
            live: 0,
        }
    }
}

impl<V> ByTag<V> {
    fn find(&self, tag: u64) -> Result<usize, usize> {
        // While the tags in the ring run without holes (one consumer's deliveries), a tag's
        // place is its distance from the first: no search.
        if let Some((first, _)) = self.slots.front()
            && let Some(guess) = tag.checked_sub(*first)
            && let Ok(guess) = usize::try_from(guess)
            && self.slots.get(guess).is_some_and(|(t, _)| *t == tag)
        {
            return Ok(guess);
        }
        self.slots.binary_search_by_key(&tag, |(t, _)| *t)
    }

    /// Records `tag`, replacing a record under it.
    pub fn insert(&mut self, tag: u64, value: V) {
        if self.slots.back().is_none_or(|(last, _)| *last < tag) {
            self.slots.push_back((tag, Some(value)));
            self.live += 1;
            return;
        }
        match self.find(tag) {
            Ok(i) => {
                if self.slots[i].1.replace(value).is_none() {
                    self.live += 1;
                }
            }
            Err(i) => {
                self.slots.insert(i, (tag, Some(value)));
                self.live += 1;
            }
        }
    }

    pub fn get_mut(&mut self, tag: u64) -> Option<&mut V> {
        let i = self.find(tag).ok()?;
        self.slots[i].1.as_mut()
    }

    pub fn remove(&mut self, tag: u64) -> Option<V> {
        let value = self.remove_keeping_room(tag)?;
        self.give_room_back();
        Some(value)
    }

    /// [`remove`](Self::remove), keeping the ring's room when it empties: for a run of acks
    /// whose settling delivers again at once (the credit they free), which would otherwise
    /// grow the ring from nothing after every run. [`give_room_back`](Self::give_room_back)
    /// once the run is settled.
    pub fn remove_keeping_room(&mut self, tag: u64) -> Option<V> {
        let i = self.find(tag).ok()?;
        let value = self.slots[i].1.take()?;
        self.live -= 1;
        self.drop_gaps();
        Some(value)
    }

    /// Gives the ring's buffer back when it holds nothing: an idle connection keeps none.
    pub fn give_room_back(&mut self) {
        if self.slots.is_empty() && self.slots.capacity() > 0 {
            self.slots = VecDeque::new();
        }
    }

    /// Takes the records up to and including `upto` (every record for `u64::MAX`) that `pick`
    /// chooses, in tag order; the others stay.
    pub fn take_upto<C>(&mut self, upto: u64, mut pick: impl FnMut(&V) -> bool) -> C
    where
        C: Default + Extend<V>,
    {
        let mut taken = C::default();
        for (tag, slot) in self.slots.iter_mut() {
            if *tag > upto {
                break;
            }
            if slot.as_ref().is_some_and(&mut pick)
                && let Some(value) = slot.take()
            {
                self.live -= 1;
                taken.extend(std::iter::once(value));
            }
        }
        self.tidy();
        taken
    }

    /// Takes every record that `pick` chooses, in tag order.
    pub fn take_where<C>(&mut self, pick: impl FnMut(&V) -> bool) -> C
    where
        C: Default + Extend<V>,
    {
        self.take_upto(u64::MAX, pick)
    }

    /// Takes every record, in tag order.
    pub fn take_all(&mut self) -> impl Iterator<Item = V> + use<V> {
        self.live = 0;
        std::mem::take(&mut self.slots)
            .into_iter()
            .filter_map(|(_, v)| v)
    }

    /// Drops the gaps, and gives the ring back once it is empty: an idle connection keeps no
    /// buffer, as the map it replaces kept no node.
    fn tidy(&mut self) {
        self.drop_gaps();
        self.give_room_back();
    }

    /// Drops the gaps at both ends, and sweeps the rest when they outnumber the records.
    fn drop_gaps(&mut self) {
        while matches!(self.slots.front(), Some((_, None))) {
            self.slots.pop_front();
        }
        while matches!(self.slots.back(), Some((_, None))) {
            self.slots.pop_back();
        }
        if self.slots.len() > 2 * self.live + 16 {
            self.slots.retain(|(_, v)| v.is_some());
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.live
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    /// A small deterministic generator (xorshift), so a failure repeats.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }

    /// Random inserts (mostly in order, some behind), removals (mostly the oldest), takes up
    /// to a tag and takes by value, each answered as the `BTreeMap` it replaces answers.
    #[test]
    fn answers_as_an_ordered_map_does() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        for _ in 0..200 {
            let mut ours: ByTag<u64> = ByTag::default();
            let mut map: BTreeMap<u64, u64> = BTreeMap::new();
            let mut next = 1u64;
            for step in 0..2_000u64 {
                match rng.below(20) {
                    0..=8 => {
                        let tag = if rng.below(8) == 0 && next > 4 {
                            next - 1 - rng.below(4)
                        } else {
                            next += 1;
                            next
                        };
                        ours.insert(tag, step);
                        map.insert(tag, step);
                    }
                    9..=15 => {
                        let tag = match (rng.below(4), map.keys().next()) {
                            (0, _) | (_, None) => 1 + rng.below(next),
                            (_, Some(first)) => *first,
                        };
                        let removed = if rng.below(2) == 0 {
                            ours.remove(tag)
                        } else {
                            ours.remove_keeping_room(tag)
                        };
                        assert_eq!(removed, map.remove(&tag), "remove {tag}");
                    }
                    16 => {
                        if let Some(v) = ours.get_mut(next) {
                            *v += 1;
                        }
                        if let Some(v) = map.get_mut(&next) {
                            *v += 1;
                        }
                    }
                    17 | 18 => {
                        let upto = rng.below(next + 2);
                        let odd = rng.below(2) == 0;
                        let pick = |v: &u64| !odd || v % 2 == 1;
                        let got: Vec<u64> = ours.take_upto(upto, pick);
                        let want: Vec<u64> =
                            map.range(..=upto).map(|(_, v)| *v).filter(pick).collect();
                        map.retain(|t, v| *t > upto || !pick(v));
                        assert_eq!(got, want, "take up to {upto}");
                    }
                    _ => {
                        let got: Vec<u64> = ours.take_where(|v| v % 3 == 0);
                        let want: Vec<u64> = map.values().copied().filter(|v| v % 3 == 0).collect();
                        map.retain(|_, v| *v % 3 != 0);
                        assert_eq!(got, want, "take where");
                    }
                }
                assert_eq!(ours.len(), map.len());
                assert!(ours.slots.len() <= 2 * ours.live + 16, "gaps swept");
            }
            let all: Vec<u64> = ours.take_all().collect();
            assert_eq!(all, map.into_values().collect::<Vec<_>>());
            assert_eq!(ours.len(), 0);
        }
    }

    /// One old record held while thousands after it are acked: the ring stays near what is
    /// unacked, and an emptied one holds no buffer.
    #[test]
    fn gaps_behind_a_held_record_are_swept_and_an_empty_ring_is_freed() {
        let mut ours = ByTag::default();
        ours.insert(1, ());
        let mut most = 0;
        for window in 0..100u64 {
            let tags = 2 + window * 100..2 + (window + 1) * 100;
            for tag in tags.clone() {
                ours.insert(tag, ());
            }
            for tag in tags {
                assert_eq!(ours.remove(tag), Some(()));
                most = most.max(ours.slots.len());
            }
        }
        // A window of 100 in flight behind the held record: never more than twice that.
        assert!(most <= 2 * 101 + 16, "{most} slots");
        assert_eq!(ours.slots.len(), 1);
        assert_eq!(ours.remove(1), Some(()));
        assert_eq!(ours.slots.capacity(), 0);
    }

    /// A run of acks keeps the ring's room for what their settling delivers, and the room goes
    /// once the run is settled with nothing left in flight.
    #[test]
    fn a_run_of_acks_keeps_the_room_until_it_is_given_back() {
        let mut ours = ByTag::default();
        for tag in 1..=100 {
            ours.insert(tag, ());
        }
        let room = ours.slots.capacity();
        for tag in 1..=100 {
            assert_eq!(ours.remove_keeping_room(tag), Some(()));
        }
        assert_eq!((ours.len(), ours.slots.capacity()), (0, room));
        // Delivered again on the freed credit: no growth.
        for tag in 101..=200 {
            ours.insert(tag, ());
        }
        assert_eq!(ours.slots.capacity(), room);
        ours.give_room_back();
        assert_eq!(ours.slots.capacity(), room, "records are held");
        for tag in 101..=200 {
            assert_eq!(ours.remove_keeping_room(tag), Some(()));
        }
        ours.give_room_back();
        assert_eq!(ours.slots.capacity(), 0);
    }
}
