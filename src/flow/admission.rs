//! Connection admission (DESIGN.md §7): how many connections may be open in all, per subject,
//! and before authentication, so that unauthenticated or greedy clients never crowd out the
//! others. Each admitted connection holds a ticket; dropping it gives the place back.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use dashmap::DashMap;

use crate::config::LimitsConfig;

/// Why a connection was not admitted; also the `reason` label of the refusal metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Full {
    #[error("too many connections waiting to authenticate (limits.max_unauthenticated)")]
    Unauthenticated,
    #[error("the gateway has as many connections as it accepts (limits.max_connections)")]
    Connections,
    #[error("this subject has as many connections as it may (limits.max_connections_per_subject)")]
    Subject,
}

impl Full {
    pub fn as_str(self) -> &'static str {
        match self {
            Full::Unauthenticated => "max_unauthenticated",
            Full::Connections => "max_connections",
            Full::Subject => "max_connections_per_subject",
        }
    }
}

pub struct Admission {
    max_unauthenticated: usize,
    max_connections: usize,
    max_per_subject: usize,
    counts: Arc<Counts>,
}

#[derive(Default)]
struct Counts {
    unauthenticated: AtomicUsize,
    connections: AtomicUsize,
    /// Keyed by a name every place of that subject shares.
    subjects: DashMap<Arc<str>, usize>,
}

/// A place among the connections waiting to authenticate.
pub struct Unauthenticated(Arc<Counts>);

impl Drop for Unauthenticated {
    fn drop(&mut self) {
        self.0.unauthenticated.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A place among the authenticated connections, in all and for its subject.
pub struct Admitted {
    counts: Arc<Counts>,
    /// The counts' own key: a copy per connection was an allocation of every one.
    subject: Arc<str>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.counts.connections.fetch_sub(1, Ordering::Relaxed);
        self.counts.subjects.remove_if_mut(&self.subject, |_, n| {
            *n -= 1;
            *n == 0
        });
    }
}

/// Takes a place under `max` or says no; never overshoots under concurrency.
fn take(counter: &AtomicUsize, max: usize) -> bool {
    counter
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
            (n < max).then_some(n + 1)
        })
        .is_ok()
}

impl Admission {
    pub fn new(limits: &LimitsConfig) -> Admission {
        Admission {
            max_unauthenticated: limits.max_unauthenticated,
            max_connections: limits.max_connections,
            max_per_subject: limits.max_connections_per_subject,
            counts: Arc::default(),
        }
    }

    /// For a connection that has not authenticated yet; hold it until it has (or gave up).
    pub fn unauthenticated(&self) -> Result<Unauthenticated, Full> {
        if take(&self.counts.unauthenticated, self.max_unauthenticated) {
            Ok(Unauthenticated(self.counts.clone()))
        } else {
            Err(Full::Unauthenticated)
        }
    }

    /// For an authenticated connection of `subject`; hold it while the connection lives.
    pub fn admit(&self, subject: &str) -> Result<Admitted, Full> {
        if !take(&self.counts.connections, self.max_connections) {
            return Err(Full::Connections);
        }
        let subjects = &self.counts.subjects;
        let mut n = match subjects.get_mut(subject) {
            Some(n) => n,
            None => subjects.entry(Arc::from(subject)).or_insert(0),
        };
        if *n >= self.max_per_subject {
            drop(n);
            self.counts.connections.fetch_sub(1, Ordering::Relaxed);
            return Err(Full::Subject);
        }
        *n += 1;
        let subject = n.key().clone();
        drop(n);
        Ok(Admitted {
            counts: self.counts.clone(),
            subject,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission(unauth: usize, total: usize, per_subject: usize) -> Admission {
        Admission::new(&LimitsConfig {
            max_unauthenticated: unauth,
            max_connections: total,
            max_connections_per_subject: per_subject,
            ..LimitsConfig::default()
        })
    }

    #[test]
    fn places_come_back_when_dropped() {
        let a = admission(1, 3, 2);
        let first = a.unauthenticated().unwrap();
        assert_eq!(a.unauthenticated().err(), Some(Full::Unauthenticated));
        drop(first);
        assert!(a.unauthenticated().is_ok());

        let alice1 = a.admit("alice").unwrap();
        let _alice2 = a.admit("alice").unwrap();
        assert_eq!(a.admit("alice").err(), Some(Full::Subject));
        let _bob = a.admit("bob").unwrap();
        assert_eq!(a.admit("carol").err(), Some(Full::Connections));
        drop(alice1);
        assert!(a.admit("alice").is_ok(), "a subject refusal took no place");
        assert_eq!(a.counts.subjects.len(), 2);
    }

    #[test]
    fn subjects_are_forgotten_at_zero() {
        let a = admission(1, 10, 10);
        drop(a.admit("x").unwrap());
        assert!(a.counts.subjects.is_empty());
    }
}
