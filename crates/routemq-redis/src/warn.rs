//! Rate-limited warnings: when Redis is down, every call fails, and one log line per call
//! would flood the journal of a gateway handling thousands of messages a second.
//!
//! [`WarnLimiter`] lets one warning per kind through per interval, counts the ones it held
//! back, and reports them with the next one it lets through ("N similar warnings
//! suppressed"), so the log stays readable and still says how bad it was.

use std::collections::HashMap;
use std::fmt::Display;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often one kind of Redis warning may reach the log.
pub const WARN_INTERVAL: Duration = Duration::from_secs(10);

/// One warning per kind per interval. Cheap to call on the hot path: a short, never-awaited
/// mutex around a tiny map.
#[derive(Debug)]
pub struct WarnLimiter {
    interval: Duration,
    kinds: Mutex<HashMap<&'static str, Window>>,
}

#[derive(Debug)]
struct Window {
    last_logged: Instant,
    suppressed: u64,
}

impl Default for WarnLimiter {
    fn default() -> Self {
        WarnLimiter::new(WARN_INTERVAL)
    }
}

impl WarnLimiter {
    pub fn new(interval: Duration) -> Self {
        WarnLimiter {
            interval,
            kinds: Mutex::new(HashMap::new()),
        }
    }

    /// `Some(n)` when a warning of `kind` may be logged now, `n` being how many were held back
    /// since the last one; `None` when it must be suppressed (and is counted).
    pub fn allow(&self, kind: &'static str) -> Option<u64> {
        let now = Instant::now();
        // A poisoned lock only means another thread panicked while counting: the counts are
        // still usable.
        let mut kinds = self.kinds.lock().unwrap_or_else(|e| e.into_inner());
        match kinds.get_mut(kind) {
            Some(w) if now.duration_since(w.last_logged) < self.interval => {
                w.suppressed += 1;
                None
            }
            Some(w) => {
                let held_back = w.suppressed;
                w.last_logged = now;
                w.suppressed = 0;
                Some(held_back)
            }
            None => {
                kinds.insert(
                    kind,
                    Window {
                        last_logged: now,
                        suppressed: 0,
                    },
                );
                Some(0)
            }
        }
    }

    /// Logs `message` at WARN unless a warning of `kind` was logged within the interval.
    pub fn warn(&self, kind: &'static str, message: impl Display) {
        match self.allow(kind) {
            Some(0) => tracing::warn!(kind, "{message}"),
            Some(suppressed) => tracing::warn!(
                kind,
                suppressed,
                "{message} ({suppressed} similar warnings suppressed)"
            ),
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_warning_per_kind_per_interval_and_the_rest_are_counted() {
        let limiter = WarnLimiter::new(Duration::from_millis(50));
        assert_eq!(limiter.allow("timeout"), Some(0));
        assert_eq!(limiter.allow("timeout"), None);
        assert_eq!(limiter.allow("timeout"), None);
        // Another kind has its own window.
        assert_eq!(limiter.allow("connection"), Some(0));
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(limiter.allow("timeout"), Some(2));
        assert_eq!(limiter.allow("timeout"), None);
    }
}
