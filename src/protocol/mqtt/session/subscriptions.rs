//! The session's subscriptions: topic filter → the options granted, in the order they were
//! made.
//!
//! A list, not a hash map: every delivery already walks all of them (which filters the topic
//! matched), a lookup by filter happens only at SUBSCRIBE, UNSUBSCRIBE and for a shared
//! subscription's delivery, and `limits.max_subscriptions` bounds the walk. Inline for one:
//! an idle device typically holds one subscription, which a `HashMap` kept in a 180-byte table
//! of every connection (docs/bench.md, "idle MQTT connection, fifth round").

use smallvec::SmallVec;

use super::SubOpts;

#[derive(Debug, Default)]
pub(super) struct Subscriptions(SmallVec<[(Box<str>, SubOpts); 1]>);

impl Subscriptions {
    fn position(&self, filter: &str) -> Option<usize> {
        self.0.iter().position(|(f, _)| &**f == filter)
    }

    pub fn get(&self, filter: &str) -> Option<&SubOpts> {
        self.position(filter).map(|i| &self.0[i].1)
    }

    pub fn contains_key(&self, filter: &str) -> bool {
        self.position(filter).is_some()
    }

    /// Sets `filter`'s options; a filter subscribed again keeps its place.
    pub fn insert(&mut self, filter: String, opts: SubOpts) {
        match self.position(&filter) {
            Some(i) => self.0[i].1 = opts,
            None => self.0.push((filter.into_boxed_str(), opts)),
        }
    }

    pub fn remove(&mut self, filter: &str) {
        if let Some(i) = self.position(filter) {
            self.0.remove(i);
        }
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &SubOpts)> {
        self.0.iter().map(|(f, o)| (&**f, o))
    }

    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|(f, _)| &**f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(granted: u8) -> SubOpts {
        SubOpts {
            granted,
            no_local: false,
            retain_as_published: false,
            id: None,
        }
    }

    #[test]
    fn a_filter_once_with_its_latest_options_in_the_order_made() {
        let mut subs = Subscriptions::default();
        subs.insert("a/#".into(), opts(0));
        subs.insert("b/+".into(), opts(1));
        subs.insert("a/#".into(), opts(2));
        assert_eq!(subs.len(), 2);
        assert_eq!(subs.get("a/#").map(|o| o.granted), Some(2));
        assert_eq!(subs.keys().collect::<Vec<_>>(), ["a/#", "b/+"]);
        subs.remove("a/#");
        subs.remove("never");
        assert!(!subs.contains_key("a/#"));
        assert_eq!(
            subs.iter().map(|(f, o)| (f, o.granted)).collect::<Vec<_>>(),
            [("b/+", 1)]
        );
        subs.remove("b/+");
        assert!(subs.is_empty());
    }
}
