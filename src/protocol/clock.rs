//! The one timer a connection's loop keeps for all of its clocks (the token's expiry, and each
//! adapter's own: the keep-alive, a write's deadline, unacked deliveries' timeout), and the
//! expiry clock the adapters share.
//!
//! One timer kept across turns of the loop and set again only when the soonest clock moves: a
//! timer made every turn costs a timer-wheel entry per message and, read with the wall clock
//! for the expiry, two clock reads; a timer kept per clock is 112 bytes of every idle
//! connection's state (docs/bench.md, idle connections).

use std::pin::Pin;
use std::time::{Duration, Instant};

use tokio::time::Sleep;

/// The instant a connection's compact clocks count from, one for the process: an `Instant`
/// is 16 bytes where milliseconds from here are 8.
static EPOCH: std::sync::LazyLock<Instant> = std::sync::LazyLock::new(Instant::now);

/// `at` in milliseconds from the process's clock epoch (0 for an instant before it).
pub fn since_epoch(at: Instant) -> u64 {
    let ms = at.saturating_duration_since(*EPOCH).as_millis();
    u64::try_from(ms).unwrap_or(u64::MAX)
}

/// The instant `ms` milliseconds from the process's clock epoch.
pub fn from_epoch(ms: u64) -> Instant {
    *EPOCH + Duration::from_millis(ms)
}

/// A timer that waits for nothing yet: [`crate::auth::NEVER`] off.
pub fn idle_timer() -> Sleep {
    tokio::time::sleep(crate::auth::NEVER)
}

/// Sets `timer` to `wake` when that is sooner than it is set for, or it has fired; returns
/// whether anything is due at all. A timer left on a later deadline only wakes the loop once to
/// find nothing due, which is cheaper than setting it again every time a clock moves later
/// (a write clock starts and stops with every batch).
pub fn set_sooner(timer: Pin<&mut Sleep>, wake: Option<Instant>) -> bool {
    let Some(at) = wake.map(tokio::time::Instant::from_std) else {
        return false;
    };
    if at < timer.deadline() || timer.is_elapsed() {
        timer.reset(at);
    }
    true
}

/// When the token's expiry (its `exp` plus the leeway) closes the connection, worked out again
/// only when the expiry moves (a refreshed token).
#[derive(Default)]
pub struct Expiry {
    set: Option<u64>,
    due: Option<Instant>,
}

impl Expiry {
    /// When a connection whose token expires at `expires_at` (seconds since the epoch) ends;
    /// `None` for a token without one.
    pub fn due(&mut self, expires_at: Option<u64>, leeway: Duration) -> Option<Instant> {
        if expires_at != self.set {
            self.set = expires_at;
            self.due = expires_at.map(|exp| Instant::now() + crate::auth::time_left(exp, leeway));
        }
        self.due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_is_worked_out_again_only_when_it_moves() {
        let leeway = Duration::from_secs(30);
        let mut expiry = Expiry::default();
        assert_eq!(expiry.due(None, leeway), None);
        let exp = crate::auth::now_secs() + 60;
        let first = expiry.due(Some(exp), leeway).expect("a deadline");
        let left = first.saturating_duration_since(Instant::now());
        assert!((88..=90).contains(&left.as_secs()), "{left:?}");
        // Asked again, the same instant: not read from the clock a second time.
        assert_eq!(expiry.due(Some(exp), leeway), Some(first));
        let later = expiry.due(Some(exp + 60), leeway).expect("a deadline");
        assert!(later > first);
        assert_eq!(expiry.due(None, leeway), None);
    }

    #[tokio::test(start_paused = true)]
    async fn the_timer_is_set_only_sooner_or_once_fired() {
        let timer = idle_timer();
        tokio::pin!(timer);
        assert!(!set_sooner(timer.as_mut(), None));
        let soon = Instant::now() + Duration::from_secs(5);
        assert!(set_sooner(timer.as_mut(), Some(soon)));
        assert_eq!(timer.deadline(), tokio::time::Instant::from_std(soon));
        // Later: left where it is, to fire once and be set again.
        assert!(set_sooner(
            timer.as_mut(),
            Some(soon + Duration::from_secs(5))
        ));
        assert_eq!(timer.deadline(), tokio::time::Instant::from_std(soon));
        timer.as_mut().await;
        let next = soon + Duration::from_secs(10);
        assert!(set_sooner(timer.as_mut(), Some(next)));
        assert_eq!(timer.deadline(), tokio::time::Instant::from_std(next));
    }
}
