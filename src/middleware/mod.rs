//! Middleware, in the order a message meets it (spec §5.2): session → rate limit → dedup.
//!
//! Each stage lives in its own file with its config (read from its `[routes.*]` table) and
//! one step the engine calls: the step takes the message's template [`Context`] and returns
//! [`Step`] — go on (with what the stage found), or the message's outcome on this route. The
//! engine (`router/engine.rs`) only states their order. Redis trouble that waiting fixes
//! (down, a timeout, a refusal) never becomes an outcome: [`Env::until_redis`] waits it out,
//! and the message stays unacked meanwhile.
//!
//! [`Context`]: crate::template::Context

pub mod dedup;
pub mod rate_limit;
pub mod session;

use std::future::Future;
use std::time::Duration;

use crate::actions::forward::Forwarder;
use crate::backoff::Backoff;
use crate::events;
use crate::outcome::Outcome;
use crate::redis::rate_limit::RateLimiter;
use crate::redis::{Error as RedisError, RedisManager};

/// A stage's verdict on a message: go on with `T`, or this outcome for the route.
pub type Step<T> = Result<T, Outcome>;

/// What the stages of one route share: the one door to Redis, the limiter on it, the
/// outgoing MQTT connection, and the route's name for logs.
pub struct Env<'a> {
    pub redis: &'a RedisManager,
    pub limiter: &'a RateLimiter,
    pub forwarder: &'a Forwarder,
    pub route: &'a str,
}

impl Env<'_> {
    /// Runs `step` until it succeeds or fails for good; waits out transient Redis trouble
    /// (down, a timeout, a refusal) with backoff.
    pub async fn until_redis<T, F, Fut>(&self, mut step: F) -> Result<T, RedisError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
        loop {
            match step().await {
                Err(e) if e.is_transient() => {
                    events::redis_retry(self.route, &e);
                    tokio::time::sleep(backoff.next_delay()).await;
                }
                other => return other,
            }
        }
    }
}

/// A permanent Redis error as the message's outcome (`failed`, dead-lettered).
pub fn failed(e: RedisError) -> Outcome {
    Outcome::Failed {
        detail: e.to_string(),
    }
}
