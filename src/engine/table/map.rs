//! [`FieldTable`]'s storage: its entries sorted by key in one vector, keys the gateway names
//! itself borrowed from `'static` strings, and a message's [`Headers`] held in line.
//!
//! Every message carries a table (an MQTT publish gets three headers), and a queued message
//! keeps it for as long as it waits: as a `BTreeMap<String, _>` it was a 640-byte node and an
//! allocation per key — more than half of a queued 64-byte message's memory, and a fifth of
//! the allocations on the publish path. A table is small, written once and read by key a few
//! times, so a sorted vector does everything the map did (stable order on the wire and in
//! JSON, lookup by key) in a fraction of the space. Hand-written because it is this one type's
//! storage: a general map crate would bring back the per-key allocation or the ordering.

use std::borrow::{Borrow, Cow};
use std::fmt;

use smallvec::SmallVec;

use super::FieldValue;

/// Up to this many entries a key is looked for one entry after another.
const LINEAR: usize = 8;

/// A table's key: an AMQP short string.
pub type Key = Cow<'static, str>;

/// An AMQP 0-9-1 field table: keys unique and in order, the first `N` entries held in line.
///
/// Arguments (of queues, exchanges, bindings) hold none in line: most have no entry, and a
/// binding is kept per subscription. Nested tables hold none either, or the type would
/// contain itself.
#[derive(Clone, Default)]
pub struct FieldTable<const N: usize = 0>(SmallVec<[(Key, FieldValue); N]>);

/// A message's headers, in line in its properties' allocation. Every MQTT publish gets three
/// (its subject, its session and its QoS) and a retained one a fourth: held in a vector of
/// their own they were an allocation per message, freed by whichever worker delivered it,
/// often not the one that allocated — in a 50→1 fan-in the allocator's cross-thread free list
/// was 3.6 % of the gateway's time. (An MQTT connection's publishes now share their
/// properties, headers and all; a table of its own behind a second pointer was measured and
/// cost REST and AMQP messages, which have headers of their own, a second allocation.)
pub type Headers = FieldTable<4>;

impl<const N: usize> FieldTable<N> {
    pub fn new() -> FieldTable<N> {
        FieldTable(SmallVec::new())
    }

    fn find(&self, key: &str) -> Result<usize, usize> {
        if self.0.len() <= LINEAR {
            // Equality looks at the lengths first, so most entries are passed over without
            // a call to `memcmp`, which the search makes at every step: an MQTT delivery
            // looks its publish QoS up among the message's three headers. And the gateway's
            // own keys are one `'static` string each, so a key it looks up is most often the
            // very one it inserted: the same address, and no `memcmp` at all.
            return match self.0.iter().position(|(k, _)| {
                k.len() == key.len() && (k.as_ptr() == key.as_ptr() || **k == *key)
            }) {
                Some(i) => Ok(i),
                None => Err(self.0.partition_point(|(k, _)| **k < *key)),
            };
        }
        self.0.binary_search_by(|(k, _)| (**k).cmp(key))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn get(&self, key: &str) -> Option<&FieldValue> {
        self.find(key).ok().map(|i| &self.0[i].1)
    }

    pub fn get_mut(&mut self, key: &str) -> Option<&mut FieldValue> {
        self.find(key).ok().map(|i| &mut self.0[i].1)
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.find(key).is_ok()
    }

    /// Sets `key` to `value`; the value it replaces, if any. Keys the gateway names are
    /// `&'static str` and are not copied.
    pub fn insert(&mut self, key: impl Into<Key>, value: FieldValue) -> Option<FieldValue> {
        let key = key.into();
        // Tables are built a key at a time, mostly in order: a key past the last one is
        // pushed after one comparison, not searched for; one before the first (the subject
        // stamped last on every publish, `x-gateway-sub` before `x-mqtt-…`) goes first after
        // two. The search and the insert at the front were 200 instructions a message.
        let at = match (self.0.first(), self.0.last()) {
            (Some(_), Some((last, _))) if **last < *key => Err(self.0.len()),
            (Some((first, _)), _) if *key < **first => Err(0),
            (None, _) => Err(0),
            _ => self.find(&key),
        };
        match at {
            Ok(i) => Some(std::mem::replace(&mut self.0[i].1, value)),
            Err(i) => {
                if self.0.capacity() == 0 {
                    // Most tables hold a handful of entries: one allocation sized for them
                    // (a table with entries in line has room already).
                    self.0.reserve_exact(4);
                }
                self.0.insert(i, (key, value));
                None
            }
        }
    }

    pub fn remove(&mut self, key: &str) -> Option<FieldValue> {
        self.find(key).ok().map(|i| self.0.remove(i).1)
    }

    pub fn retain(&mut self, mut keep: impl FnMut(&str, &mut FieldValue) -> bool) {
        self.0.retain_mut(|(k, v)| keep(k, v));
    }

    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&str, &FieldValue)> + '_ {
        self.into_iter()
    }

    pub fn keys(&self) -> impl ExactSizeIterator<Item = &str> + '_ {
        self.0.iter().map(|(k, _)| &**k)
    }

    pub fn values(&self) -> impl ExactSizeIterator<Item = &FieldValue> + '_ {
        self.0.iter().map(|(_, v)| v)
    }
}

/// Equal when they hold the same entries, wherever they hold them.
impl<const N: usize, const M: usize> PartialEq<FieldTable<M>> for FieldTable<N> {
    fn eq(&self, other: &FieldTable<M>) -> bool {
        self.0[..] == other.0[..]
    }
}

impl<const N: usize> fmt::Debug for FieldTable<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl<Q: Borrow<str> + ?Sized, const N: usize> std::ops::Index<&Q> for FieldTable<N> {
    type Output = FieldValue;

    /// The value under `key`; panics when there is none, as a map's index does.
    fn index(&self, key: &Q) -> &FieldValue {
        let key = key.borrow();
        self.get(key)
            .unwrap_or_else(|| panic!("no key {key:?} in the table"))
    }
}

impl<K: Into<Key>, const N: usize> Extend<(K, FieldValue)> for FieldTable<N> {
    fn extend<I: IntoIterator<Item = (K, FieldValue)>>(&mut self, entries: I) {
        for (k, v) in entries {
            self.insert(k, v);
        }
    }
}

impl<K: Into<Key>, const N: usize> FromIterator<(K, FieldValue)> for FieldTable<N> {
    fn from_iter<I: IntoIterator<Item = (K, FieldValue)>>(entries: I) -> FieldTable<N> {
        let mut table = FieldTable::new();
        table.extend(entries);
        table
    }
}

impl<K: Into<Key>, const L: usize, const N: usize> From<[(K, FieldValue); L]> for FieldTable<N> {
    fn from(entries: [(K, FieldValue); L]) -> FieldTable<N> {
        entries.into_iter().collect()
    }
}

impl<const N: usize> IntoIterator for FieldTable<N> {
    type Item = (Key, FieldValue);
    type IntoIter = smallvec::IntoIter<[(Key, FieldValue); N]>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl<'a, const N: usize> IntoIterator for &'a FieldTable<N> {
    type Item = (&'a str, &'a FieldValue);
    type IntoIter = std::iter::Map<
        std::slice::Iter<'a, (Key, FieldValue)>,
        fn(&'a (Key, FieldValue)) -> (&'a str, &'a FieldValue),
    >;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(|(k, v)| (&**k, v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_stay_unique_and_in_order() {
        let mut t: FieldTable = FieldTable::new();
        assert!(t.insert("b", FieldValue::I64(1)).is_none());
        assert!(t.insert(String::from("a"), FieldValue::I64(2)).is_none());
        assert_eq!(t.insert("b", FieldValue::I64(3)), Some(FieldValue::I64(1)));
        assert!(t.insert("c", FieldValue::Void).is_none());
        assert_eq!(t.keys().collect::<Vec<_>>(), ["a", "b", "c"]);
        assert_eq!(t["b"], FieldValue::I64(3));
        assert_eq!(t.remove("a"), Some(FieldValue::I64(2)));
        assert!(!t.contains_key("a") && t.len() == 2);
        assert_eq!(format!("{t:?}"), r#"{"b": I64(3), "c": Void}"#);
    }

    #[test]
    fn every_insert_place_keeps_the_order() {
        // After the last, before the first, between, and over the first, middle and last.
        let mut t: FieldTable = FieldTable::new();
        for (k, v) in [
            ("m", 1),
            ("x", 2),
            ("c", 3),
            ("p", 4),
            ("a", 5),
            ("z", 6),
            ("n", 7),
        ] {
            assert!(t.insert(k, FieldValue::I64(v)).is_none(), "{k} is new");
        }
        assert_eq!(
            t.keys().collect::<Vec<_>>(),
            ["a", "c", "m", "n", "p", "x", "z"]
        );
        for (k, old) in [("a", 5), ("n", 7), ("z", 6)] {
            assert_eq!(t.insert(k, FieldValue::Void), Some(FieldValue::I64(old)));
        }
        assert_eq!(t.len(), 7);
        assert_eq!(
            t.keys().collect::<Vec<_>>(),
            ["a", "c", "m", "n", "p", "x", "z"]
        );
    }

    #[test]
    fn small_and_large_tables_find_insert_and_remove_alike() {
        find_insert_and_remove::<0>();
        // In line up to four entries, then spilled to the heap.
        find_insert_and_remove::<4>();
    }

    fn find_insert_and_remove<const N: usize>() {
        // Past LINEAR entries the search takes over: the same answers on either side.
        let keys = [
            "m", "c", "x", "a", "q", "bb", "b", "zz", "k", "ab", "y", "d",
        ];
        let mut t = FieldTable::<N>::new();
        for (n, key) in keys.iter().enumerate() {
            assert!(t.get(key).is_none(), "{key} before its insert");
            assert!(t.insert(*key, FieldValue::I64(n as i64)).is_none());
            let names: Vec<&str> = t.keys().collect();
            let mut sorted = names.clone();
            sorted.sort_unstable();
            assert_eq!(names, sorted, "after {key}");
            for (m, k) in keys[..=n].iter().enumerate() {
                assert_eq!(t.get(k), Some(&FieldValue::I64(m as i64)), "{k} at {n}");
            }
        }
        assert_eq!(
            t.insert("k", FieldValue::Bool(true)),
            Some(FieldValue::I64(8))
        );
        for key in ["zz", "a", "k", "m", "x"] {
            assert!(t.remove(key).is_some(), "{key}");
            assert!(!t.contains_key(key));
        }
        assert_eq!(t.len(), keys.len() - 5);
        assert_eq!(t.get("bb"), Some(&FieldValue::I64(5)));
        let copy: FieldTable = t.iter().map(|(k, v)| (k.to_owned(), v.clone())).collect();
        assert_eq!(t, copy, "equal wherever the entries are held");
    }

    #[test]
    fn arguments_are_no_wider_than_a_vector() {
        // A binding is kept per subscription, with its (mostly empty) arguments.
        assert_eq!(
            std::mem::size_of::<FieldTable>(),
            std::mem::size_of::<Vec<(Key, FieldValue)>>()
        );
        assert_eq!(
            std::mem::size_of::<FieldValue>(),
            32,
            "a nested table is boxed"
        );
        let mut headers = Headers::new();
        for key in ["x-a", "x-b", "x-c", "x-d"] {
            headers.insert(key, FieldValue::Void);
        }
        assert!(!headers.0.spilled(), "four headers are held in line");
    }

    #[test]
    fn static_keys_are_borrowed() {
        let mut t: FieldTable = FieldTable::new();
        t.insert("x-static", FieldValue::Bool(true));
        let (key, _) = t.into_iter().next().unwrap();
        assert!(matches!(key, Cow::Borrowed("x-static")));
    }
}
