//! The `[redis]` table and the seed's `REDIS_*` / `ENABLE_REDIS` variables (spec §3, §4).

use std::collections::HashMap;
use std::time::Duration;

use crate::config::reader::Table;
use crate::config::{ConfigErrors, Secret};

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
    /// single server. Kept secret like `url`: a node URL may hold a password.
    pub cluster: Vec<Secret>,
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

impl RedisConfig {
    /// From the process environment: defaults < the seed's `REDIS_*` / `ENABLE_REDIS`
    /// variables. This is what the library's process-wide default manager uses.
    pub fn from_env() -> Result<RedisConfig, ConfigErrors> {
        RedisConfig::from_env_map(&crate::config::process_env())
    }

    /// Like [`RedisConfig::from_env`], from the given variables.
    pub fn from_env_map(env: &HashMap<String, String>) -> Result<RedisConfig, ConfigErrors> {
        crate::config::read_seed_env(env, |root| RedisConfig::read(root.table("redis")))
    }

    /// Reads the `[redis]` table; `Default` fills what it does not set.
    pub(crate) fn read(mut t: Table<'_>) -> RedisConfig {
        let d = RedisConfig::default();
        let enabled = t.bool("enabled", d.enabled);
        let url = t
            .parse("url", |url: Secret| check_url(url.expose()).map(|()| url))
            .filter(|u| !u.expose().is_empty());
        let host = t.non_empty_string("host", &d.host);
        let port = t.port("port", d.port);
        let db = t.at_least("db", 0, d.db);
        let username = t.opt_string("username").filter(|u| !u.is_empty());
        let password = t.password("redis_password");
        let max_connections = t.at_least("max_connections", 1, d.max_connections);
        let socket_timeout = t.positive_duration("socket_timeout", d.socket_timeout);
        let socket_connect_timeout =
            t.positive_duration("socket_connect_timeout", d.socket_connect_timeout);
        let cluster = t
            .parse("cluster", |nodes: Vec<String>| {
                for (i, node) in nodes.iter().enumerate() {
                    check_url(node).map_err(|e| format!("node {i}: {e}"))?;
                }
                Ok(nodes.into_iter().map(Secret::new).collect())
            })
            .unwrap_or(d.cluster);
        let config = RedisConfig {
            enabled,
            url,
            host,
            port,
            db,
            username,
            password,
            max_connections,
            socket_timeout,
            socket_connect_timeout,
            cluster,
        };
        // What the manager builds its client from, built once here without connecting: a
        // combination the client refuses (cluster nodes with different TLS modes, users or
        // databases) is a config error `check` finds, not a daemon that starts and never
        // connects. The messages never quote a URL or password.
        if config.enabled {
            if let Err(e) = super::connection::Target::from_config(&config) {
                let key = if config.cluster.is_empty() {
                    "url"
                } else {
                    "cluster"
                };
                let message = match e {
                    super::Error::Invalid(message) => message,
                    other => other.to_string(),
                };
                t.error(key, message);
            }
        }
        t.finish();
        config
    }
}

/// A Redis URL must be `redis://` or `rediss://` and parse. The message never quotes the
/// URL: it may hold a password.
fn check_url(url: &str) -> Result<(), String> {
    if url.is_empty() {
        return Ok(());
    }
    match url.split_once("://") {
        Some(("redis" | "rediss", _)) => {}
        // Only a scheme is quoted: what stands before a stray `://` may be a password.
        Some((scheme, _)) if crate::config::is_scheme(scheme) => {
            return Err(format!(
                "expected a URL starting with redis:// or rediss://, found scheme {scheme:?}"
            ))
        }
        _ => return Err("expected a URL starting with redis:// or rediss://".to_string()),
    }
    ::redis::IntoConnectionInfo::into_connection_info(url)
        .map(|_| ())
        .map_err(|e| format!("not a valid Redis URL ({e})"))
}
