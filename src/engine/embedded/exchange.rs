//! An exchange and its bindings: the routing tables for direct (hash map), fanout (list), topic
//! (trie) and headers (list of matchers). Each exchange has its own lock, so declaring or binding
//! on one exchange never blocks publishers of another, and publishers of one exchange share a
//! read lock.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::{RwLock, RwLockWriteGuard};

use super::queue::Queue;
use crate::engine::topic::TopicTrie;
use crate::engine::{
    BindingInfo, EngineError, ExchangeKind, ExchangeSpec, FieldTable, FieldValue, Headers,
};

/// Where routing collects destination queues; four inline slots cover most publishes without
/// allocating.
pub(super) type Targets = smallvec::SmallVec<[Arc<Queue>; 4]>;

pub(super) struct Exchange {
    pub name: Arc<str>,
    pub spec: ExchangeSpec,
    router: RwLock<Router>,
    /// Counts changes to the bindings and the exchange's deletion: a route remembered at one
    /// count holds while the count is the same ([`super::broker::LastRoute`]).
    changes: AtomicU64,
}

#[derive(Clone)]
struct Binding {
    queue: Arc<Queue>,
    key: Arc<str>,
    arguments: FieldTable,
}

impl Binding {
    fn is(&self, queue: &Arc<Queue>, key: &str, arguments: &FieldTable) -> bool {
        Arc::ptr_eq(&self.queue, queue) && &*self.key == key && &self.arguments == arguments
    }
}

enum Router {
    Direct(HashMap<Arc<str>, Vec<Binding>, foldhash::fast::RandomState>),
    Fanout(Vec<Binding>),
    Topic(TopicTrie<Binding>),
    Headers(Vec<(Binding, HeadersMatch)>),
}

/// `x-match` of a headers binding (RabbitMQ semantics, including the `-with-x` variants).
struct HeadersMatch {
    any: bool,
    with_x: bool,
}

impl HeadersMatch {
    fn parse(arguments: &FieldTable) -> Result<Self, EngineError> {
        let mode = match arguments.get("x-match") {
            None => "all",
            Some(v) => v
                .as_str()
                .ok_or_else(|| EngineError::InvalidArgument("x-match must be a string".into()))?,
        };
        let (any, with_x) = match mode {
            "all" => (false, false),
            "any" => (true, false),
            "all-with-x" => (false, true),
            "any-with-x" => (true, true),
            other => {
                return Err(EngineError::InvalidArgument(format!(
                    "x-match must be all, any, all-with-x or any-with-x, not '{other}'"
                )));
            }
        };
        Ok(HeadersMatch { any, with_x })
    }

    fn matches(&self, arguments: &FieldTable, headers: &Headers) -> bool {
        let mut considered = arguments
            .iter()
            .filter(|(k, _)| *k != "x-match" && (self.with_x || !k.starts_with("x-")));
        // A binding value of void asks only that the header be present.
        let hit = |(k, v): (&str, &FieldValue)| {
            headers
                .get(k)
                .is_some_and(|h| matches!(v, FieldValue::Void) || h.loosely_equals(v))
        };
        if self.any {
            considered.any(hit)
        } else {
            considered.all(hit)
        }
    }
}

impl Exchange {
    pub fn new(name: Arc<str>, spec: ExchangeSpec) -> Self {
        let router = match spec.kind {
            ExchangeKind::Direct => Router::Direct(HashMap::default()),
            ExchangeKind::Fanout => Router::Fanout(Vec::new()),
            ExchangeKind::Topic => Router::Topic(TopicTrie::default()),
            ExchangeKind::Headers => Router::Headers(Vec::new()),
        };
        Exchange {
            name,
            spec,
            router: RwLock::new(router),
            changes: AtomicU64::new(0),
        }
    }

    pub fn mark_deleted(&self) {
        self.changes.fetch_add(1, Ordering::AcqRel);
    }

    /// The count of changes so far. Read before routing: a change made meanwhile shows as a
    /// later count, and the route is taken again next time.
    pub fn changes(&self) -> u64 {
        self.changes.load(Ordering::Acquire)
    }

    /// The bindings, to change: counted as a change (bumped under the lock, so a publisher that
    /// reads the new count routes on the new bindings).
    fn router_mut(&self) -> RwLockWriteGuard<'_, Router> {
        let router = self.router.write();
        self.changes.fetch_add(1, Ordering::AcqRel);
        router
    }

    /// Whether routing looks only at the routing key (every kind but headers): only such a
    /// route may be remembered for a key.
    pub fn routes_by_key(&self) -> bool {
        self.spec.kind != ExchangeKind::Headers
    }

    /// Checks binding arguments before anything changes (headers `x-match`).
    pub fn validate_binding(&self, arguments: &FieldTable) -> Result<(), EngineError> {
        if self.spec.kind == ExchangeKind::Headers {
            HeadersMatch::parse(arguments)?;
        }
        Ok(())
    }

    /// Adds a binding; `Ok(false)` when it already existed.
    /// `key` is shared with the queue's own list of what it is bound from: one copy of it
    /// for every idle subscriber, not two.
    pub fn bind(
        &self,
        queue: &Arc<Queue>,
        key: &Arc<str>,
        arguments: &FieldTable,
    ) -> Result<bool, EngineError> {
        let binding = Binding {
            queue: queue.clone(),
            key: key.clone(),
            arguments: arguments.clone(),
        };
        let key = &**key;
        let mut router = self.router_mut();
        Ok(match &mut *router {
            Router::Direct(map) => {
                let list = map.entry(binding.key.clone()).or_default();
                if list.iter().any(|b| b.is(queue, key, arguments)) {
                    false
                } else {
                    list.push(binding);
                    true
                }
            }
            Router::Fanout(list) => {
                if list.iter().any(|b| b.is(queue, key, arguments)) {
                    false
                } else {
                    list.push(binding);
                    true
                }
            }
            Router::Topic(trie) => trie.insert(key, binding, |b| b.is(queue, key, arguments)),
            Router::Headers(list) => {
                if list.iter().any(|(b, _)| b.is(queue, key, arguments)) {
                    false
                } else {
                    let matcher = HeadersMatch::parse(arguments)?;
                    list.push((binding, matcher));
                    true
                }
            }
        })
    }

    /// Removes one binding; returns whether it existed.
    pub fn unbind(&self, queue: &Arc<Queue>, key: &str, arguments: &FieldTable) -> bool {
        let mut router = self.router_mut();
        match &mut *router {
            Router::Direct(map) => {
                let Some(list) = map.get_mut(key) else {
                    return false;
                };
                let before = list.len();
                list.retain(|b| !b.is(queue, key, arguments));
                let removed = list.len() != before;
                if list.is_empty() {
                    map.remove(key);
                }
                removed
            }
            Router::Fanout(list) => {
                let before = list.len();
                list.retain(|b| !b.is(queue, key, arguments));
                list.len() != before
            }
            Router::Topic(trie) => trie.remove(key, |b| b.is(queue, key, arguments)).is_some(),
            Router::Headers(list) => {
                let before = list.len();
                list.retain(|(b, _)| !b.is(queue, key, arguments));
                list.len() != before
            }
        }
    }

    /// Removes every binding to `queue` (the queue is going away).
    pub fn unbind_queue(&self, queue: &Arc<Queue>) {
        let other = |b: &Binding| !Arc::ptr_eq(&b.queue, queue);
        match &mut *self.router_mut() {
            Router::Direct(map) => map.retain(|_, list| {
                list.retain(other);
                !list.is_empty()
            }),
            Router::Fanout(list) => list.retain(other),
            Router::Topic(trie) => trie.retain(other),
            Router::Headers(list) => list.retain(|(b, _)| other(b)),
        }
    }

    pub fn binding_count(&self) -> usize {
        match &*self.router.read() {
            Router::Direct(map) => map.values().map(Vec::len).sum(),
            Router::Fanout(list) => list.len(),
            Router::Topic(trie) => trie.len(),
            Router::Headers(list) => list.len(),
        }
    }

    pub fn bindings(&self) -> Vec<BindingInfo> {
        let info = |b: &Binding| BindingInfo {
            exchange: self.name.to_string(),
            queue: b.queue.name.to_string(),
            routing_key: b.key.to_string(),
            arguments: b.arguments.clone(),
        };
        match &*self.router.read() {
            Router::Direct(map) => map.values().flatten().map(info).collect(),
            Router::Fanout(list) => list.iter().map(info).collect(),
            Router::Topic(trie) => trie.values().map(info).collect(),
            Router::Headers(list) => list.iter().map(|(b, _)| info(b)).collect(),
        }
    }

    /// Adds every queue the message goes to; may add a queue twice (the caller deduplicates).
    pub fn route(&self, key: &str, headers: &Headers, out: &mut Targets) {
        match &*self.router.read() {
            Router::Direct(map) => {
                if let Some(list) = map.get(key) {
                    out.extend(list.iter().map(|b| b.queue.clone()));
                }
            }
            Router::Fanout(list) => out.extend(list.iter().map(|b| b.queue.clone())),
            Router::Topic(trie) => trie.matches(key, |b| out.push(b.queue.clone())),
            Router::Headers(list) => out.extend(
                list.iter()
                    .filter(|(b, m)| m.matches(&b.arguments, headers))
                    .map(|(b, _)| b.queue.clone()),
            ),
        }
    }
}
