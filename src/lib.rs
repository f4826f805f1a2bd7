//! routemq-bridge: an MQTT ⇄ Redis bridge for IoT gateways, the companion of RouteMQ.
//!
//! A message walks forward through the modules: [`mqtt`] in → router → middleware (session,
//! rate limit, dedup) → actions → [`redis`] out; republish goes the other way. [`config`]
//! loads and validates everything the daemon reads at start-up and on reload. Around them:
//! [`events`] (each observable event's log line and metrics), [`metrics`], [`http`]
//! (`/metrics`, `/healthz`, `/readyz`), [`systemd`] and [`liveness`] (notify, watchdog),
//! [`daemon`] (wiring, signals, reload).
//!
//! The library half is the Redis manager of spec §3 ([`redis::RedisManager`]) and the
//! patterns built on it (cache-aside, sessions, rate limiters, locks, pub/sub); the daemon is
//! built from the same library.

pub mod actions;
pub use routemq_redis::backoff;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod dead_letter;
pub mod events;
pub mod fault;
pub mod http;
pub mod liveness;
pub mod logging;
pub mod message;
pub mod metrics;
pub mod middleware;
pub mod mqtt;
pub mod outcome;
/// The Redis manager of spec §3, a crate of its own (`crates/routemq-redis`) so it can be
/// used without the daemon; re-exported so `routemq_bridge::redis::…` paths keep working.
pub use routemq_redis as redis;
pub mod republish;
pub mod router;
pub mod spool;
pub mod stage;
pub mod systemd;
pub mod template;
pub use routemq_redis::tls;

/// `routemq-bridge X.Y.Z`, as `--version` prints it and `build_info` reports it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
