//! The hook through which an application sees every call the manager makes to Redis.
//!
//! The crate keeps no metrics of its own: which names, labels and recorder an application
//! uses is its business (the daemon keeps `redis_command_duration_seconds{command}` and
//! `redis_errors_total{kind}`). So every call through the manager's primitives is reported,
//! once, to a process-wide [`CommandObserver`] the application installs at start-up.
//!
//! A plain `fn` in a [`OnceLock`], not a boxed closure behind a lock: every Redis call
//! passes here, so the cost when installed is one atomic load and one indirect call, and
//! nothing when not. Process-wide because the `metrics` facade it usually feeds is too.

use std::sync::OnceLock;
use std::time::Duration;

use crate::error::Error;

/// Sees one call: `command` is the command name in lower case (`set`, `evalsha`, `multi`
/// for a transaction, `pipeline`; anything unusual is `other`, so the names form a small
/// bounded set), `elapsed` its round trip, `error` how it failed. A call refused before it
/// reached Redis (Redis down, disabled, not initialized) has no `elapsed`.
///
/// Called on the caller's task, on every call: keep it cheap and never block.
pub type CommandObserver = fn(command: &str, elapsed: Option<Duration>, error: Option<&Error>);

static OBSERVER: OnceLock<CommandObserver> = OnceLock::new();

/// Installs `observer` for the whole process. Only the first call installs; it returns
/// `false` when an observer was already installed (which then stays).
pub fn set_command_observer(observer: CommandObserver) -> bool {
    OBSERVER.set(observer).is_ok()
}

/// Reports one call to the observer, if any.
pub(crate) fn command(command: &str, elapsed: Option<Duration>, error: Option<&Error>) {
    if let Some(observer) = OBSERVER.get() {
        observer(command, elapsed, error);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::{RedisConfig, RedisManager};

    static SEEN: Mutex<Vec<(String, bool, Option<Error>)>> = Mutex::new(Vec::new());

    fn record(command: &str, elapsed: Option<Duration>, error: Option<&Error>) {
        let mut seen = SEEN.lock().unwrap_or_else(|p| p.into_inner());
        seen.push((command.to_string(), elapsed.is_some(), error.cloned()));
    }

    #[tokio::test]
    async fn a_call_refused_before_redis_is_reported_as_an_error_without_a_round_trip() {
        assert!(set_command_observer(record));
        assert!(!set_command_observer(record), "only the first installs");
        // Never initialized: the call fails fast without reaching Redis.
        let manager = RedisManager::new(RedisConfig::default());
        assert!(manager.try_get("k").await.is_err());
        let seen = SEEN.lock().unwrap_or_else(|p| p.into_inner());
        // Other tests in this binary report here too: look for this call among theirs.
        assert!(
            seen.iter()
                .any(|(command, round_trip, error)| command == "get"
                    && !round_trip
                    && matches!(error, Some(Error::Unavailable(_)))),
            "{seen:?}"
        );
    }
}
