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
#[derive(Clone, Copy)]
pub struct Env<'a> {
    pub redis: &'a RedisManager,
    pub limiter: &'a RateLimiter,
    pub forwarder: &'a Forwarder,
    pub route: &'a str,
    /// When the message expires (MQTT 5 Message Expiry Interval, on a route that honours
    /// it): waiting for Redis stops there, and the message is `invalid` (`expired`).
    pub deadline: Option<std::time::Instant>,
}

impl Env<'_> {
    /// This env for work that must finish whatever the message's expiry (giving back a
    /// dedup claim, a dead-letter record).
    pub fn without_deadline(&self) -> Self {
        Env {
            deadline: None,
            ..*self
        }
    }

    /// Runs `step` until it succeeds or fails for good; waits out transient Redis trouble
    /// (down, a timeout, a refusal) with the Redis crate's one retry loop, each retry an
    /// event for the route.
    pub async fn until_redis<T, F, Fut>(&self, step: F) -> Result<T, RedisError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        crate::redis::retry::until_ready_by(self.deadline, step, |e| {
            events::redis_retry(self.route, e)
        })
        .await
    }
}

/// A permanent Redis error as the message's outcome (`failed`, dead-lettered); the
/// message's expiry passing while it waited makes it `invalid` (`expired`, spec §6.1).
pub fn failed(e: RedisError) -> Outcome {
    match e {
        RedisError::DeadlinePassed => expired(),
        e => Outcome::Failed {
            detail: e.to_string(),
        },
    }
}

/// A message whose Message Expiry Interval passed before it could be written.
pub fn expired() -> Outcome {
    Outcome::invalid(
        crate::outcome::Reason::Expired,
        "the message's expiry interval passed before it could be written",
    )
}
