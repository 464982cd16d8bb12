//! A message's [`Headers`]: one [`FieldTable`] shared by every message that carries the same
//! entries, copied only when one of them is written to.
//!
//! Every MQTT publish carries three or four headers that differ between publishers but not
//! between one publisher's messages: its subject, its session, its QoS and whether it is
//! retained. Written into each message, stamped and dropped again, they were about 700 of a
//! QoS 0 message's 6,300 instructions (docs/bench.md, 2026-12-06); shared, they are made once
//! per connection (with the rest of the message's properties, which are shared too). A
//! message with headers of its own (REST, WebSocket, AMQP, MQTT 5 user properties) keeps them
//! in one allocation, and a copy of a message (a dead letter, a retained copy) shares them
//! until one of the two is written to.

use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

use super::{FieldTable, FieldValue, Key};

/// The table behind [`Headers`]: an MQTT publish has four entries at most, held in line in
/// the shared allocation.
pub type HeaderTable = FieldTable<4>;

/// What a message without headers reads.
static EMPTY: HeaderTable = HeaderTable::new();

/// A message's headers: read through [`Deref`] as a [`FieldTable`]; written through the
/// methods here, which copy a table another message shares before writing to it.
#[derive(Clone, Default)]
pub struct Headers(Option<Arc<HeaderTable>>);

impl Headers {
    pub const fn new() -> Headers {
        Headers(None)
    }

    /// This message's own table to write to: made at the first write, and copied first if
    /// another message shares it.
    pub fn make_mut(&mut self) -> &mut HeaderTable {
        Arc::make_mut(self.0.get_or_insert_default())
    }

    /// Sets `key` to `value`; the value it replaces, if any.
    pub fn insert(&mut self, key: impl Into<Key>, value: FieldValue) -> Option<FieldValue> {
        self.make_mut().insert(key, value)
    }

    pub fn remove(&mut self, key: &str) -> Option<FieldValue> {
        // Looked for first: removing nothing must not copy a shared table.
        if self.contains_key(key) {
            self.make_mut().remove(key)
        } else {
            None
        }
    }

    pub fn retain(&mut self, keep: impl FnMut(&str, &mut FieldValue) -> bool) {
        if !self.is_empty() {
            self.make_mut().retain(keep);
        }
    }

    /// Whether `self` and `other` are one table, not two equal ones.
    pub fn shares(&self, other: &Headers) -> bool {
        match (&self.0, &other.0) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

impl Deref for Headers {
    type Target = HeaderTable;

    fn deref(&self) -> &HeaderTable {
        self.0.as_deref().unwrap_or(&EMPTY)
    }
}

impl From<HeaderTable> for Headers {
    fn from(table: HeaderTable) -> Headers {
        Headers((!table.is_empty()).then(|| Arc::new(table)))
    }
}

impl<K: Into<Key>> FromIterator<(K, FieldValue)> for Headers {
    fn from_iter<I: IntoIterator<Item = (K, FieldValue)>>(entries: I) -> Headers {
        HeaderTable::from_iter(entries).into()
    }
}

impl<K: Into<Key>, const L: usize> From<[(K, FieldValue); L]> for Headers {
    fn from(entries: [(K, FieldValue); L]) -> Headers {
        entries.into_iter().collect()
    }
}

impl<K: Into<Key>> Extend<(K, FieldValue)> for Headers {
    fn extend<I: IntoIterator<Item = (K, FieldValue)>>(&mut self, entries: I) {
        let mut entries = entries.into_iter().peekable();
        if entries.peek().is_some() {
            self.make_mut().extend(entries);
        }
    }
}

/// Equal when they hold the same entries, shared or not.
impl PartialEq for Headers {
    fn eq(&self, other: &Headers) -> bool {
        **self == **other
    }
}

impl<const N: usize> PartialEq<FieldTable<N>> for Headers {
    fn eq(&self, other: &FieldTable<N>) -> bool {
        **self == *other
    }
}

impl fmt::Debug for Headers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        (**self).fmt(f)
    }
}

impl<'a> IntoIterator for &'a Headers {
    type Item = (&'a str, &'a FieldValue);
    type IntoIter = <&'a HeaderTable as IntoIterator>::IntoIter;

    fn into_iter(self) -> Self::IntoIter {
        let table: &'a HeaderTable = self;
        table.into_iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shared_table_is_copied_at_a_write_and_never_before() {
        let template: Headers = [("x-a", FieldValue::U8(1))].into();
        let mut message = template.clone();
        assert!(message.shares(&template));

        // Reads, and writes that change nothing, leave the table shared.
        assert_eq!(message.get("x-a"), Some(&FieldValue::U8(1)));
        assert_eq!(message.remove("x-none"), None);
        message.extend(std::iter::empty::<(&str, FieldValue)>());
        assert!(message.shares(&template));

        message.insert("x-b", FieldValue::Void);
        assert!(!message.shares(&template));
        assert_eq!(template.len(), 1, "the template is not written through");
        assert_eq!(message.keys().collect::<Vec<_>>(), ["x-a", "x-b"]);
        assert_ne!(message, template);

        let copy = message.clone();
        message.retain(|k, _| k == "x-a");
        assert_eq!(message, template, "equal by content, shared or not");
        assert_eq!(copy.len(), 2);
    }

    #[test]
    fn no_headers_take_no_allocation() {
        let none = Headers::new();
        assert!(none.is_empty() && none.0.is_none());
        assert!(Headers::from(HeaderTable::new()).0.is_none());
        assert_eq!(none, Headers::default());
        assert!(
            !none.shares(&Headers::new()),
            "nothing is not a shared table"
        );
        assert_eq!(std::mem::size_of::<Headers>(), std::mem::size_of::<usize>());
    }
}
