//! What every stage of a route (spec §5.2: the middleware, the actions, the forwards) shares:
//! the verdict type [`Step`] — go on, or this outcome — and the [`Env`] a stage works in.
//! Redis trouble that waiting fixes (down, a timeout, a refusal) never becomes an outcome:
//! [`Env::until_redis`] waits it out, and the message stays unacked meanwhile.

use std::future::Future;

use crate::events;
use crate::mqtt::forward::Forwarder;
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
    /// (down, a timeout, a refusal) with the Redis crate's one retry loop, each retry an
    /// event for the route.
    pub async fn until_redis<T, F, Fut>(&self, step: F) -> Result<T, RedisError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        crate::redis::retry::until_ready(step, |e| events::redis_retry(self.route, e)).await
    }
}

/// A permanent Redis error as the message's outcome (`failed`, dead-lettered).
pub fn failed(e: RedisError) -> Outcome {
    Outcome::Failed {
        detail: e.to_string(),
    }
}
