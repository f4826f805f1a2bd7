//! RouteMQ's Redis manager in Rust (spec §3): the seed's API, the patterns built on it, and
//! a connection that recovers.
//!
//! [`RedisManager`] is the one door to Redis: everything an application does with Redis
//! goes through it, so timeouts, reconnection, rate-limited warnings and the command
//! observer ([`observe`]) live in one place. `manager` holds the connection, its recovery
//! and the primitives; `commands` the seed's methods (each in a sentinel form and a
//! `try_` form returning [`Result`]); `connection` how a config becomes a (single or
//! cluster) connection. The patterns: [`cache`] (cache-aside), [`session`], [`rate_limit`],
//! [`lock`], [`pubsub`]; [`retry`] waits out what waiting fixes.
//!
//! The crate stands alone: it knows nothing of the bridge daemon built on it. What the
//! daemon needs from it besides Redis — [`backoff`], [`heartbeat`], [`secret`], [`tls`] —
//! lives here because the manager needs it first.
//!
//! # Examples
//!
//! The seed's methods answer with sentinels (`None`, `false`, `0`, `-2`) when Redis is
//! down or disabled, and log a rate-limited warning; the `try_` forms say why:
//!
//! ```no_run
//! use routemq_redis::{RedisConfig, RedisManager, SetOptions};
//!
//! # async fn example() -> routemq_redis::Result<()> {
//! let redis = RedisManager::new(RedisConfig::default());
//! // false when Redis is down now; the manager keeps reconnecting in the background.
//! redis.initialize().await;
//!
//! redis.set("greeting", "hello", SetOptions::new()).await;
//! assert_eq!(redis.get("greeting").await.as_deref(), Some("hello"));
//!
//! // "missing" (Ok(None)) and "failed" (Err) told apart:
//! match redis.try_get("greeting").await? {
//!     Some(value) => println!("greeting is {value}"),
//!     None => println!("no greeting"),
//! }
//! // NX refused (Ok(false)) is not an error:
//! let ttl = std::time::Duration::from_secs(60);
//! let first = redis.try_set("once", "1", SetOptions::new().ex(ttl).nx()).await?;
//! # let _ = first;
//! # Ok(())
//! # }
//! ```

pub mod backoff;
pub mod cache;
mod commands;
pub mod config;
pub mod connection;
pub mod error;
pub mod heartbeat;
pub mod lock;
pub mod manager;
pub mod observe;
pub mod pubsub;
pub mod rate_limit;
pub mod retry;
pub mod secret;
pub mod session;
pub mod tls;
pub mod warn;

/// The README's examples, compiled with the doc tests so they stay true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

pub use commands::SetOptions;
pub use config::RedisConfig;
pub use connection::RedisConnection;
pub use error::{Error, Result};
pub use manager::{ConnectionPermit, ConnectionState, RedisManager};
