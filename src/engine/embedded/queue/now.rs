//! The time of one queue operation, read from the clock only when something asks for it.

use std::cell::Cell;
use std::time::Instant;

/// Only messages with a TTL need the time (their deadline, their expiry at dispatch), and
/// most have none: a publish or an ack read the clock for nothing, a tenth of a microsecond
/// of `clock_gettime` per message in `perf` that callgrind does not show. The first ask reads
/// it, and every later one in the same operation gets that reading.
#[derive(Default)]
pub(in crate::engine::embedded) struct Now(Cell<Option<Instant>>);

impl Now {
    /// A time the caller already read.
    pub fn at(instant: Instant) -> Now {
        Now(Cell::new(Some(instant)))
    }

    pub fn get(&self) -> Instant {
        match self.0.get() {
            Some(instant) => instant,
            None => {
                let instant = Instant::now();
                self.0.set(Some(instant));
                instant
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_reading_per_operation() {
        let now = Now::default();
        let first = now.get();
        std::thread::sleep(std::time::Duration::from_millis(2));
        assert_eq!(now.get(), first, "the first reading stands");
        let given = Instant::now();
        assert_eq!(Now::at(given).get(), given);
    }
}
