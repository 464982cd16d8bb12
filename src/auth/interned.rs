//! Permissions shared by every client whose token grants the same: a fleet of devices with
//! one role holds them once, where each connection held its own parse (docs/bench.md, "idle
//! MQTT connection, fifth round").

use std::collections::HashMap;
use std::sync::{Arc, Weak};

use parking_lot::Mutex;

use super::Permissions;

/// Permissions by what they were made from. Weak: when the last client holding them goes, so
/// do they; their entries are swept once the map has doubled since the last sweep.
#[derive(Default)]
pub(super) struct Interned(Mutex<State>);

#[derive(Default)]
struct State {
    by_source: HashMap<Box<str>, Weak<Permissions>>,
    sweep_at: usize,
}

/// Below this many entries there is nothing worth sweeping.
const MIN_SWEEP: usize = 64;

impl Interned {
    /// The permissions made from `source` (everything they depend on), made by `make` unless
    /// a live client already holds them.
    pub fn get_or_make(
        &self,
        source: &str,
        make: impl FnOnce() -> Permissions,
    ) -> Arc<Permissions> {
        let mut state = self.0.lock();
        if let Some(live) = state.by_source.get(source).and_then(Weak::upgrade) {
            return live;
        }
        if state.by_source.len() >= state.sweep_at {
            state.by_source.retain(|_, p| p.strong_count() > 0);
            state.sweep_at = (state.by_source.len() * 2).max(MIN_SWEEP);
        }
        let made = Arc::new(make());
        state.by_source.insert(source.into(), Arc::downgrade(&made));
        made
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.0.lock().by_source.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_source_one_permissions_while_held_and_gone_ones_swept() {
        let interned = Interned::default();
        let a = interned.get_or_make("x", Permissions::administrator);
        let b = interned.get_or_make("x", || unreachable!("x is held"));
        assert!(Arc::ptr_eq(&a, &b));
        drop((a, b));
        let again = interned.get_or_make("x", Permissions::default);
        assert!(!again.is_administrator(), "made anew once nobody held it");
        for i in 0..MIN_SWEEP {
            drop(interned.get_or_make(&i.to_string(), Permissions::default));
        }
        drop(interned.get_or_make("last", Permissions::default));
        // `x` (still held), and the two made after the sweep at 64.
        assert_eq!(interned.len(), 3, "the dead entries were swept");
    }
}
