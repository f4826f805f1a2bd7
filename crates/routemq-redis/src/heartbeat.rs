//! A heartbeat: how a long-running loop shows it still turns.
//!
//! The manager's health task beats on every round, so an application's watchdog can tell
//! a stuck task from a quiet one ([`crate::RedisManager::heartbeat`]). The daemon's
//! liveness watches this same type for its own loops. A beat is one atomic store, so a loop
//! can beat on every round at no cost.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// Milliseconds since a process-wide origin, never 0 (0 means "never beat"); the daemon's
/// liveness stamps its own work with it too.
pub fn now_ms() -> u64 {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    let origin = *ORIGIN.get_or_init(Instant::now);
    // +1 so a beat in the very first millisecond is not mistaken for "never".
    u64::try_from(origin.elapsed().as_millis())
        .unwrap_or(u64::MAX)
        .saturating_add(1)
}

/// Bumped by one loop on every round. Clones share the same beat.
#[derive(Clone, Debug, Default)]
pub struct Heartbeat(Arc<AtomicU64>);

impl Heartbeat {
    pub fn new() -> Heartbeat {
        Heartbeat::default()
    }

    /// The loop is alive now.
    pub fn beat(&self) {
        self.0.store(now_ms(), Ordering::Relaxed);
    }

    /// Time since the last beat; `None` if it never beat.
    pub fn age(&self) -> Option<Duration> {
        match self.0.load(Ordering::Relaxed) {
            0 => None,
            last => Some(Duration::from_millis(now_ms().saturating_sub(last))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_heartbeat_has_no_age_until_it_beats_and_clones_share_it() {
        let heartbeat = Heartbeat::new();
        assert_eq!(heartbeat.age(), None);
        heartbeat.clone().beat();
        assert!(heartbeat
            .age()
            .is_some_and(|age| age < Duration::from_secs(5)));
    }
}
