//! Redis out: the manager of spec §3 and the patterns built on it.
//!
//! [`RedisManager`] is the one door to Redis: middleware, actions and republish all go
//! through it, so timeouts, reconnection, metrics and rate-limited warnings live in one place.
//! `manager` holds the connection, its recovery and the primitives; `commands` the seed's
//! methods; `connection` how a config becomes a (single or cluster) connection.

pub mod cache;
mod commands;
pub mod config;
pub mod connection;
pub mod error;
pub mod lock;
pub mod manager;
pub mod pubsub;
pub mod rate_limit;
pub mod session;
pub mod warn;

pub use commands::SetOptions;
pub use config::RedisConfig;
pub use connection::RedisConnection;
pub use error::{Error, Result};
pub use manager::{ConnectionPermit, ConnectionState, RedisManager};
