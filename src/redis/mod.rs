//! Redis out: the manager of spec §3 and the patterns built on it.
//!
//! [`RedisManager`] is the one door to Redis: middleware, actions and republish all go
//! through it, so timeouts, reconnection, metrics and rate-limited warnings live in one place.

pub mod cache;
pub mod config;
pub mod error;
pub mod lock;
pub mod manager;
pub mod pubsub;
pub mod rate_limit;
pub mod session;

pub use config::RedisConfig;
pub use error::{Error, Result};
pub use manager::RedisManager;
