//! Liveness of the daemon's long-running loops, for `/healthz` and the systemd watchdog.
//!
//! A process can be alive while one of its loops is stuck (a deadlock, a blocking call on
//! an async thread). So each loop that must keep turning owns a [`Heartbeat`] and bumps it
//! every round; [`Liveness`] knows how old each heartbeat may get before its loop counts as
//! stuck. `/healthz` answers 503 and the watchdog stops pinging systemd as soon as one is
//! stale, and systemd restarts the service.
//!
//! A heartbeat is one atomic store, so loops can beat on every round at no cost.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Milliseconds since a process-wide origin; 0 means "never beat".
fn now_ms() -> u64 {
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

struct Watched {
    name: &'static str,
    heartbeat: Heartbeat,
    max_age: Duration,
}

/// The loops that must keep turning, and how long each may stay silent.
#[derive(Clone, Default)]
pub struct Liveness {
    loops: Arc<Mutex<Vec<Watched>>>,
}

impl Liveness {
    pub fn new() -> Liveness {
        Liveness::default()
    }

    /// Watches `heartbeat` from now on; a loop that has not beaten yet counts as just
    /// started.
    pub fn watch(&self, name: &'static str, heartbeat: Heartbeat, max_age: Duration) {
        if heartbeat.age().is_none() {
            heartbeat.beat();
        }
        let mut loops = self.loops.lock().unwrap_or_else(|p| p.into_inner());
        loops.push(Watched {
            name,
            heartbeat,
            max_age,
        });
    }

    /// The loops whose heartbeat is older than allowed (empty: all alive).
    pub fn stuck(&self) -> Vec<&'static str> {
        let loops = self.loops.lock().unwrap_or_else(|p| p.into_inner());
        loops
            .iter()
            .filter(|w| w.heartbeat.age().is_none_or(|age| age > w.max_age))
            .map(|w| w.name)
            .collect()
    }
}

/// Resolves once `stop` turns true (or its sender is gone): the daemon's one stop signal,
/// as the tasks around the message path (HTTP, watchdog, metrics upkeep) wait for it.
pub async fn stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    // The borrow `wait_for` returns is dropped here, so callers' futures stay `Send`.
    let _ = stop.wait_for(|stopped| *stopped).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loop_that_stops_beating_is_reported_stuck() {
        let liveness = Liveness::new();
        let fresh = Heartbeat::new();
        let silent = Heartbeat::new();
        liveness.watch("fresh", fresh.clone(), Duration::from_secs(60));
        liveness.watch("silent", silent.clone(), Duration::ZERO);
        std::thread::sleep(Duration::from_millis(5));
        fresh.beat();
        assert_eq!(liveness.stuck(), vec!["silent"]);
    }
}
