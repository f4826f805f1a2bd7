//! Rate limiting (spec §5.2): three strategies, each checked by ONE Lua script so concurrent
//! checks from any number of bridge instances sharing Redis never over-admit, plus an
//! in-process fallback for when Redis does not answer.
//!
//! - [`Strategy::SlidingWindow`] is exact: a sorted set with one member per admitted request
//!   (unlike RouteMQ's one member per second, which never limits).
//! - [`Strategy::FixedWindow`] is RouteMQ's `RateLimitMiddleware` scheme: `INCR` on every
//!   request (denied ones included) of `<key>:<unix_s / window_s>`, expiring after window +
//!   1 s, allowed while the count is at most `max`. Same key, same counting: a RouteMQ app
//!   and the bridge share one budget. The window index comes from the caller's clock (as in
//!   RouteMQ) so that Redis Cluster sees the key; keep gateways on NTP.
//! - [`Strategy::TokenBucket`] is GCRA: `max` per `window` on average, bursts up to `burst`
//!   (default `max`), one key holding a theoretical arrival time.
//!
//! Sliding window and token bucket take the time from Redis (`TIME` inside the script), so
//! all instances share one clock. Every check touches exactly one key, so Redis Cluster hash
//! slots need no hash tags here.
//!
//! When Redis is unavailable (a transient error, or Redis disabled), [`RateLimiter::check`]
//! decides by its [`Fallback`]: a local per-key limiter (default; it counts only what this
//! process saw, independent of Redis's count), allow all, or deny all. The local limiter keeps
//! O(1) state per key, forgets idle keys, and holds at most a fixed number of keys.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ::redis::Script;

use super::error::{Error, Result};
use super::manager::RedisManager;

static SLIDING_WINDOW: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/rate_limit_sliding.lua")));
static FIXED_WINDOW: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/rate_limit_fixed.lua")));
static TOKEN_BUCKET: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/rate_limit_gcra.lua")));

/// How many keys the local fallback limiter remembers at most; a gateway has a bounded
/// number of devices, and a flood of new keys must not grow memory without bound.
pub const DEFAULT_LOCAL_CAPACITY: usize = 10_000;

/// How often the local limiter sweeps keys whose window has passed.
const LOCAL_SWEEP_INTERVAL: Duration = Duration::from_secs(60);

/// The counting scheme of a limit (`strategy` in a route's `[routes.rate_limit]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Strategy {
    SlidingWindow,
    FixedWindow,
    TokenBucket,
}

/// A limit: at most `max` requests per `window`, counted by `strategy`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limit {
    pub strategy: Strategy,
    pub max: u32,
    pub window: Duration,
    /// Token bucket only: requests admitted back to back from an idle key. `None` = `max`.
    pub burst: Option<u32>,
}

impl Limit {
    pub fn new(strategy: Strategy, max: u32, window: Duration) -> Limit {
        Limit {
            strategy,
            max,
            window,
            burst: None,
        }
    }

    pub fn with_burst(mut self, burst: u32) -> Limit {
        self.burst = Some(burst);
        self
    }

    fn burst(&self) -> u32 {
        self.burst.unwrap_or(self.max)
    }

    /// Whole milliseconds of the window, at least 1 (Redis expiries are in ms).
    fn window_ms(&self) -> u64 {
        u64::try_from(self.window.as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    fn validate(&self) -> Result<()> {
        if self.max == 0 {
            return Err(Error::Invalid("rate limit max must be at least 1".into()));
        }
        if self.window.is_zero() {
            return Err(Error::Invalid("rate limit window must be positive".into()));
        }
        if self.strategy == Strategy::TokenBucket && self.burst() == 0 {
            return Err(Error::Invalid("rate limit burst must be at least 1".into()));
        }
        Ok(())
    }
}

/// What to do when Redis cannot decide (`fallback` in a route's rate limit).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Fallback {
    /// An in-process limiter per key, counting only this process's requests.
    #[default]
    Local,
    /// Admit everything while Redis is unavailable.
    Allow,
    /// Refuse everything while Redis is unavailable.
    Deny,
}

/// The answer to one check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// Requests still admitted in the current window after this one (0 when denied).
    pub remaining: u64,
    /// When denied: how long until a request would be admitted (zero when allowed).
    pub retry_after: Duration,
    /// The limit's `max`.
    pub limit: u64,
    /// The limit's `window`.
    pub window: Duration,
    /// `None` when Redis decided; the fallback used when it could not.
    pub fallback: Option<Fallback>,
}

impl Decision {
    fn new(limit: &Limit, allowed: bool, remaining: u64, retry_after: Duration) -> Decision {
        Decision {
            allowed,
            remaining,
            retry_after,
            limit: u64::from(limit.max),
            window: limit.window,
            fallback: None,
        }
    }

    fn from_script(limit: &Limit, reply: &[i64]) -> Result<Decision> {
        match reply {
            [allowed, remaining, retry_ms] => Ok(Decision::new(
                limit,
                *allowed == 1,
                u64::try_from(*remaining).unwrap_or(0),
                Duration::from_millis(u64::try_from(*retry_ms).unwrap_or(0)),
            )),
            other => Err(Error::Decode(format!(
                "rate limit script returned {other:?}, expected 3 integers"
            ))),
        }
    }
}

/// The fixed-window key RouteMQ's `RateLimitMiddleware` uses: `<key>:<unix_s // window_s>`.
/// Computed in milliseconds, which gives the same index for whole-second windows and still
/// works for sub-second ones.
pub fn fixed_window_key(key: &str, window: Duration, now: SystemTime) -> String {
    let now_ms = now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let window_ms = window.as_millis().max(1);
    format!("{key}:{}", now_ms / window_ms)
}

/// Checks limits in Redis, falling back to a local limiter. Clone-free: share it by `Arc`
/// or keep one per route; the local state belongs to this value.
///
/// ```no_run
/// use std::time::Duration;
/// use routemq_redis::rate_limit::{Fallback, Limit, RateLimiter, Strategy};
/// # async fn example(redis: routemq_redis::RedisManager) -> routemq_redis::Result<()> {
/// let limiter = RateLimiter::new(redis);
/// // RouteMQ's scheme: 100 per minute, sharing the budget with a RouteMQ app.
/// let limit = Limit::new(Strategy::FixedWindow, 100, Duration::from_secs(60));
/// let decision = limiter.check("rate_limit:device-42", &limit, Fallback::Local).await?;
/// if !decision.allowed {
///     println!("over the limit; retry in {:?}", decision.retry_after);
/// }
/// # Ok(())
/// # }
/// ```
///
/// While Redis cannot answer, the fallback decides; with Redis disabled this runs as is:
///
/// ```
/// use std::time::Duration;
/// use routemq_redis::rate_limit::{Fallback, Limit, RateLimiter, Strategy};
/// use routemq_redis::{RedisConfig, RedisManager};
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> routemq_redis::Result<()> {
/// let redis = RedisManager::new(RedisConfig { enabled: false, ..RedisConfig::default() });
/// let limiter = RateLimiter::new(redis);
/// let limit = Limit::new(Strategy::SlidingWindow, 2, Duration::from_secs(60));
/// let mut admitted = 0;
/// for _ in 0..3 {
///     let decision = limiter.check("k", &limit, Fallback::Local).await?;
///     assert_eq!(decision.fallback, Some(Fallback::Local));
///     admitted += u32::from(decision.allowed);
/// }
/// assert_eq!(admitted, 2);
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct RateLimiter {
    manager: RedisManager,
    local: LocalLimiter,
}

impl RateLimiter {
    pub fn new(manager: RedisManager) -> RateLimiter {
        Self::with_local_capacity(manager, DEFAULT_LOCAL_CAPACITY)
    }

    /// Like [`RateLimiter::new`], remembering at most `capacity` keys locally.
    pub fn with_local_capacity(manager: RedisManager, capacity: usize) -> RateLimiter {
        RateLimiter {
            manager,
            local: LocalLimiter::new(capacity),
        }
    }

    /// Checks `key` against `limit` in Redis; the caller sees every error.
    pub async fn try_check(&self, key: &str, limit: &Limit) -> Result<Decision> {
        let check = PreparedCheck::new(key, limit)?;
        let reply: ::redis::Value = self.manager.run_script(&check.invocation).await?;
        check.decision(reply)
    }

    /// Checks `key` against `limit`: Redis decides when it answers; on a transient error
    /// (or with Redis disabled) `fallback` decides. Errors that retrying will not fix (e.g.
    /// `WRONGTYPE` because the key holds something else) are returned.
    pub async fn check(&self, key: &str, limit: &Limit, fallback: Fallback) -> Result<Decision> {
        match self.try_check(key, limit).await {
            Ok(decision) => Ok(decision),
            Err(e) if e.is_transient() || e == Error::Disabled => {
                tracing::debug!(error = %e, ?fallback, "rate limit: redis unavailable, using fallback");
                let mut decision = match fallback {
                    Fallback::Local => self.local.check(key, limit, Instant::now()),
                    Fallback::Allow => {
                        Decision::new(limit, true, u64::from(limit.max), Duration::ZERO)
                    }
                    Fallback::Deny => Decision::new(limit, false, 0, limit.window),
                };
                decision.fallback = Some(fallback);
                Ok(decision)
            }
            Err(e) => Err(e),
        }
    }
}

/// One Redis check, built but not sent, so a caller can put it into a pipeline with its own
/// commands (one round trip instead of two: the engine sends it with the dedup claim).
/// [`RateLimiter::try_check`] is this sent on its own.
///
/// In a pipeline the script goes as a plain `EVALSHA`: after a Redis restart (scripts
/// flushed) it fails with `NOSCRIPT`, and the caller should then use
/// [`RateLimiter::check`], which loads the script.
pub struct PreparedCheck {
    invocation: ::redis::ScriptInvocation<'static>,
    limit: Limit,
    /// Fixed window only: the caller's clock, for `retry_after`.
    now: SystemTime,
}

impl PreparedCheck {
    pub fn new(key: &str, limit: &Limit) -> Result<PreparedCheck> {
        limit.validate()?;
        let now = SystemTime::now();
        let invocation = match limit.strategy {
            Strategy::SlidingWindow => {
                let window_us = limit.window_ms().saturating_mul(1000);
                let nonce: u64 = rand::random();
                let mut invocation = SLIDING_WINDOW.key(key);
                invocation.arg(limit.max).arg(window_us).arg(nonce);
                invocation
            }
            Strategy::FixedWindow => {
                let window_key = fixed_window_key(key, limit.window, now);
                let mut invocation = FIXED_WINDOW.key(&window_key);
                invocation.arg(limit.window_ms().saturating_add(1000));
                invocation
            }
            Strategy::TokenBucket => {
                let window_us = limit.window_ms().saturating_mul(1000);
                let interval_us = (window_us / u64::from(limit.max)).max(1);
                let mut invocation = TOKEN_BUCKET.key(key);
                invocation.arg(interval_us).arg(limit.burst());
                invocation
            }
        };
        Ok(PreparedCheck {
            invocation,
            limit: limit.clone(),
            now,
        })
    }

    /// Appends the check (one `EVALSHA`) to `pipe`; its reply goes to [`PreparedCheck::decision`].
    pub fn add_to(&self, pipe: &mut ::redis::Pipeline) {
        pipe.invoke_script(&self.invocation);
    }

    /// The decision from the script's reply.
    pub fn decision(&self, reply: ::redis::Value) -> Result<Decision> {
        let limit = &self.limit;
        let decode =
            |e: ::redis::ParsingError| Error::Decode(format!("rate limit script reply: {e}"));
        match limit.strategy {
            Strategy::SlidingWindow | Strategy::TokenBucket => {
                let reply: Vec<i64> = ::redis::from_redis_value(reply).map_err(decode)?;
                Decision::from_script(limit, &reply)
            }
            Strategy::FixedWindow => {
                let count: i64 = ::redis::from_redis_value(reply).map_err(decode)?;
                let count = u64::try_from(count).unwrap_or(0);
                let max = u64::from(limit.max);
                let allowed = count <= max;
                let retry_after = if allowed {
                    Duration::ZERO
                } else {
                    fixed_window_remaining(limit.window, self.now)
                };
                Ok(Decision::new(
                    limit,
                    allowed,
                    max.saturating_sub(count),
                    retry_after,
                ))
            }
        }
    }
}

/// Time left in the fixed window containing `now`.
fn fixed_window_remaining(window: Duration, now: SystemTime) -> Duration {
    let now_ms = now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let window_ms = window.as_millis().max(1);
    let left = window_ms - now_ms % window_ms;
    Duration::from_millis(u64::try_from(left).unwrap_or(u64::MAX))
}

/// The in-process fallback: one small state per key, same strategy as the limit. Windows
/// are anchored at this process's first request, which is all a fallback needs.
#[derive(Debug)]
struct LocalLimiter {
    capacity: usize,
    state: Mutex<LocalState>,
}

#[derive(Debug)]
struct LocalState {
    keys: HashMap<String, LocalEntry>,
    last_sweep: Instant,
}

#[derive(Debug)]
struct LocalEntry {
    strategy: Strategy,
    /// Until when this entry matters; afterwards it is as good as absent.
    expires: Instant,
    counter: LocalCounter,
}

#[derive(Debug)]
enum LocalCounter {
    /// Fixed window (and, with `previous`, the sliding-window approximation that weights the
    /// previous window by how much of it still overlaps the sliding window).
    Windows {
        start: Instant,
        current: u64,
        previous: u64,
    },
    /// GCRA's theoretical arrival time.
    Tat(Instant),
}

impl LocalLimiter {
    fn new(capacity: usize) -> LocalLimiter {
        LocalLimiter {
            capacity: capacity.max(1),
            state: Mutex::new(LocalState {
                keys: HashMap::new(),
                last_sweep: Instant::now(),
            }),
        }
    }

    /// How many keys it remembers; the capacity tests read it.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().keys.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LocalState> {
        // The state stays consistent even if a holder panicked: every update is one assignment.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn check(&self, key: &str, limit: &Limit, now: Instant) -> Decision {
        let mut state = self.lock();
        if now.duration_since(state.last_sweep) >= LOCAL_SWEEP_INTERVAL {
            state.keys.retain(|_, entry| entry.expires > now);
            state.last_sweep = now;
        }
        if !state.keys.contains_key(key) && state.keys.len() >= self.capacity {
            state.keys.retain(|_, entry| entry.expires > now);
            state.last_sweep = now;
            if state.keys.len() >= self.capacity {
                // Still full of live keys: forget the one closest to expiry, the cheapest loss.
                if let Some(victim) = state
                    .keys
                    .iter()
                    .min_by_key(|(_, entry)| entry.expires)
                    .map(|(k, _)| k.clone())
                {
                    state.keys.remove(&victim);
                }
            }
        }
        let entry = state
            .keys
            .entry(key.to_string())
            .or_insert_with(|| LocalEntry::new(limit.strategy, now));
        if entry.strategy != limit.strategy || entry.expires <= now {
            *entry = LocalEntry::new(limit.strategy, now);
        }
        entry.check(limit, now)
    }
}

impl LocalEntry {
    fn new(strategy: Strategy, now: Instant) -> LocalEntry {
        let counter = match strategy {
            Strategy::TokenBucket => LocalCounter::Tat(now),
            Strategy::SlidingWindow | Strategy::FixedWindow => LocalCounter::Windows {
                start: now,
                current: 0,
                previous: 0,
            },
        };
        LocalEntry {
            strategy,
            expires: now,
            counter,
        }
    }

    fn check(&mut self, limit: &Limit, now: Instant) -> Decision {
        let max = u64::from(limit.max);
        let window = limit.window;
        match &mut self.counter {
            LocalCounter::Windows {
                start,
                current,
                previous,
            } => {
                let elapsed = now.duration_since(*start);
                if elapsed >= window {
                    // Whole windows passed: roll forward, keeping the last one's count only
                    // when it is the window right before this one.
                    let windows = elapsed.as_nanos() / window.as_nanos().max(1);
                    *previous = if windows == 1 { *current } else { 0 };
                    *current = 0;
                    let advance = window.saturating_mul(u32::try_from(windows).unwrap_or(u32::MAX));
                    *start += advance;
                }
                let into = now.duration_since(*start);
                let weighted_previous = if self.strategy == Strategy::SlidingWindow {
                    let overlap = 1.0 - into.as_secs_f64() / window.as_secs_f64();
                    (*previous as f64 * overlap).floor() as u64
                } else {
                    0
                };
                let used = *current + weighted_previous;
                self.expires = *start + window.saturating_mul(2);
                if used < max {
                    *current += 1;
                    Decision::new(limit, true, max - used - 1, Duration::ZERO)
                } else {
                    Decision::new(limit, false, 0, window.saturating_sub(into))
                }
            }
            LocalCounter::Tat(tat) => {
                let interval = (window / limit.max).max(Duration::from_nanos(1));
                let burst = limit.burst();
                let base = if *tat < now { now } else { *tat };
                let new_tat = base + interval;
                let tolerance = interval.saturating_mul(burst);
                let allow_at = new_tat.checked_sub(tolerance).unwrap_or(now);
                if now < allow_at {
                    Decision::new(limit, false, 0, allow_at - now)
                } else {
                    *tat = new_tat;
                    self.expires = new_tat;
                    let spare = now.duration_since(allow_at);
                    let remaining = spare.as_nanos() / interval.as_nanos().max(1);
                    Decision::new(
                        limit,
                        true,
                        u64::try_from(remaining).unwrap_or(u64::MAX),
                        Duration::ZERO,
                    )
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(strategy: Strategy) -> Limit {
        Limit::new(strategy, 5, Duration::from_secs(60))
    }

    #[test]
    fn fixed_window_key_is_routemq_key() {
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_123);
        assert_eq!(
            fixed_window_key("rate_limit:topic:a/b", Duration::from_secs(60), now),
            format!("rate_limit:topic:a/b:{}", 1_700_000_123u64 / 60)
        );
    }

    #[test]
    fn local_limiter_admits_max_per_window_for_every_strategy() {
        for strategy in [
            Strategy::SlidingWindow,
            Strategy::FixedWindow,
            Strategy::TokenBucket,
        ] {
            let local = LocalLimiter::new(100);
            let now = Instant::now();
            let allowed = (0..50)
                .filter(|_| local.check("k", &limit(strategy), now).allowed)
                .count();
            assert_eq!(allowed, 5, "{strategy:?}");
        }
    }

    #[test]
    fn local_limiter_admits_again_after_the_window() {
        let local = LocalLimiter::new(100);
        let lim = Limit::new(Strategy::FixedWindow, 2, Duration::from_secs(1));
        let t0 = Instant::now();
        assert!(local.check("k", &lim, t0).allowed);
        assert!(local.check("k", &lim, t0).allowed);
        assert!(!local.check("k", &lim, t0).allowed);
        assert!(local.check("k", &lim, t0 + Duration::from_secs(3)).allowed);
    }

    #[test]
    fn local_limiter_never_holds_more_than_its_capacity() {
        let local = LocalLimiter::new(10);
        let now = Instant::now();
        for i in 0..1000 {
            local.check(&format!("k{i}"), &limit(Strategy::FixedWindow), now);
        }
        assert_eq!(local.len(), 10);
    }

    #[test]
    fn local_limiter_forgets_idle_keys() {
        let local = LocalLimiter::new(10);
        let lim = Limit::new(Strategy::TokenBucket, 5, Duration::from_secs(1));
        let t0 = Instant::now();
        for i in 0..10 {
            local.check(&format!("k{i}"), &lim, t0);
        }
        // All ten are idle by now; a new key evicts expired ones, not live ones.
        local.check("new", &lim, t0 + Duration::from_secs(5));
        assert_eq!(local.len(), 1);
    }
}
