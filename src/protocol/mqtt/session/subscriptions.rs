//! The session's subscriptions: topic filter → the options granted, in the order they were
//! made; and the verdict on what a delivery's routing key matched among them.
//!
//! A list, not a hash map: a verdict walks all of them anyway (which filters the topic
//! matched), a lookup by filter happens only at SUBSCRIBE, UNSUBSCRIBE and for a shared
//! subscription's delivery, and `limits.max_subscriptions` bounds the walk. Inline for one:
//! an idle device typically holds one subscription, which a `HashMap` kept in a 180-byte table
//! of every connection (docs/bench.md, "idle MQTT connection, fifth round").

use std::sync::Arc;

use smallvec::SmallVec;

use super::SubOpts;
use super::topic;
use crate::config::TopicMapping;

#[derive(Debug, Default)]
pub(super) struct Subscriptions(SmallVec<[(Box<str>, SubOpts); 1]>);

/// What a delivery's routing key meets among the subscriptions.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    /// No topic name for it (a wildcard or NUL in the key), or a `$`-topic that only a filter
    /// starting with a wildcard would match.
    Invisible,
    /// Queued for subscriptions that are gone: no filter matches it at any level.
    Unsubscribed,
    /// The subscriptions of the queue's level it matched (none: a resumed session that knows
    /// no filters, whose queue's level then stands).
    Matched(SmallVec<[SubOpts; 2]>),
}

/// The verdict on the last routing key and queue level of one batch of deliveries
/// (`Session::deliver_batch`), during which the subscriptions cannot change: the batch holds
/// the session. Not kept in the session: 8 bytes more took every connection's state past its
/// allocator size class (`a_live_session_stays_in_its_size_class`), and a verdict kept
/// between batches would have to be forgotten at every SUBSCRIBE and UNSUBSCRIBE. The key is
/// held, not only its address, which a freed key's successor could take.
#[derive(Debug, Default)]
pub(super) struct LastVerdict(Option<(Arc<str>, u8, Verdict)>);

impl Verdict {
    /// A copy: the options copied at once (`SmallVec`'s `clone` collects them one by one).
    fn again(&self) -> Verdict {
        match self {
            Verdict::Invisible => Verdict::Invisible,
            Verdict::Unsubscribed => Verdict::Unsubscribed,
            Verdict::Matched(m) => Verdict::Matched(SmallVec::from_slice(m)),
        }
    }
}

impl Subscriptions {
    /// What `key`, delivered from the session queue of `level`, meets. A publisher's messages
    /// share its routing key, so the verdict on the batch's last key and level is given again
    /// while they are the same: walking every filter for each delivery, a byte at a time,
    /// was 5 % of a QoS 0 message's instructions and 12 % of a fanned-out one's
    /// (docs/bench.md, 2026-12-06 "evening").
    pub fn verdict(
        &self,
        key: &Arc<str>,
        level: u8,
        mapping: TopicMapping,
        last: &mut LastVerdict,
    ) -> Verdict {
        if let Some((last_key, last_level, verdict)) = &last.0
            && Arc::ptr_eq(last_key, key)
            && *last_level == level
        {
            return verdict.again();
        }
        let verdict = self.judge(key, level, mapping);
        last.0 = Some((key.clone(), level, verdict.again()));
        verdict
    }

    /// [`Self::verdict`], walking the filters.
    fn judge(&self, key: &str, level: u8, mapping: TopicMapping) -> Verdict {
        let matches = |f: &str| topic::key_matches(f, key, mapping);
        // `$`-topics reach only filters that do not start with a wildcard; a resumed session
        // that does not know its filters lets them through.
        let visible = topic::key_is_mappable(key)
            && (!key.starts_with('$') || self.is_empty() || self.keys().any(matches));
        if !visible {
            return Verdict::Invisible;
        }
        let matched: SmallVec<[SubOpts; 2]> = self
            .iter()
            .filter(|(f, o)| (o.granted.min(1) == level) && matches(f))
            .map(|(_, o)| *o)
            .collect();
        // Only when nothing at this level matched is there a second look (at any level).
        if matched.is_empty() && !self.is_empty() && !self.keys().any(matches) {
            return Verdict::Unsubscribed;
        }
        Verdict::Matched(matched)
    }

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

    fn is_empty(&self) -> bool {
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

    #[test]
    fn a_verdict_is_given_again_for_the_same_key_and_level() {
        let mapping = TopicMapping::Swap;
        let mut subs = Subscriptions::default();
        subs.insert("a/+".into(), opts(0));
        let key: Arc<str> = "a.b".into();
        let matched = |o: SubOpts| Verdict::Matched(SmallVec::from_slice(&[o]));
        let mut last = LastVerdict::default();
        assert_eq!(subs.verdict(&key, 0, mapping, &mut last), matched(opts(0)));
        assert_eq!(subs.verdict(&key, 0, mapping, &mut last), matched(opts(0)));
        // The same key at the other level: queued for a subscription of level 0 only.
        let none = Verdict::Matched(SmallVec::new());
        assert_eq!(subs.verdict(&key, 1, mapping, &mut last), none);
        // The same text in another allocation is judged anew, and alike.
        let again: Arc<str> = "a.b".into();
        assert_eq!(
            subs.verdict(&again, 0, mapping, &mut last),
            matched(opts(0))
        );
        // A new batch after the subscriptions changed.
        subs.remove("a/+");
        subs.insert("x".into(), opts(0));
        let mut last = LastVerdict::default();
        assert_eq!(
            subs.verdict(&key, 1, mapping, &mut last),
            Verdict::Unsubscribed
        );
        let wildcard: Arc<str> = "a.#".into();
        assert_eq!(
            subs.verdict(&wildcard, 0, mapping, &mut last),
            Verdict::Invisible,
            "a wildcard has no topic name"
        );
        subs.insert("+/x".into(), opts(0));
        let sys: Arc<str> = "$SYS.x".into();
        assert_eq!(
            subs.verdict(&sys, 0, mapping, &mut LastVerdict::default()),
            Verdict::Invisible
        );
        subs.remove("+/x");
        subs.remove("x");
        // A resumed session that knows no filters: its queue's level stands.
        let mut last = LastVerdict::default();
        assert_eq!(subs.verdict(&key, 1, mapping, &mut last), none);
    }
}
