//! The `[redis]` table and the seed's `REDIS_*` / `ENABLE_REDIS` variables (spec §3, §4).

use std::time::Duration;

use crate::config::Secret;

/// How to reach Redis. Built from defaults < `[redis]` in the file < `REDIS_*` variables <
/// `ROUTEMQ_BRIDGE_REDIS__*` variables by [`crate::config`]; `Default` gives the seed's
/// defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct RedisConfig {
    /// `ENABLE_REDIS`. Unlike RouteMQ, where Redis is opt-in, the bridge needs it, so the
    /// default is `true`.
    pub enabled: bool,
    /// `REDIS_URL`: `redis://` or `rediss://` (TLS). When set, it wins over host/port/db;
    /// username and password given separately still apply. Kept secret: it may hold a
    /// password.
    pub url: Option<Secret>,
    pub host: String,
    pub port: u16,
    pub db: i64,
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// Upper bound on connections the manager holds open to Redis at once: one multiplexed
    /// command connection plus one per live subscriber or blocking reader.
    pub max_connections: usize,
    /// Response timeout of every command (`REDIS_SOCKET_TIMEOUT`).
    pub socket_timeout: Duration,
    /// Timeout of one connection attempt (`REDIS_SOCKET_CONNECT_TIMEOUT`).
    pub socket_connect_timeout: Duration,
    /// Redis Cluster seed nodes (`redis.cluster = ["redis://n1:7000", ...]`); empty for a
    /// single server.
    pub cluster: Vec<String>,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            enabled: true,
            url: None,
            host: "localhost".to_string(),
            port: 6379,
            db: 0,
            username: None,
            password: None,
            max_connections: 10,
            socket_timeout: Duration::from_secs(5),
            socket_connect_timeout: Duration::from_secs(5),
            cluster: Vec::new(),
        }
    }
}
