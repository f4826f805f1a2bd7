//! The `[redis]` table (spec §3, §4), read into the Redis crate's [`RedisConfig`].
//!
//! The crate knows nothing of this loader (it stands alone, spec §1), so the daemon reads
//! the table here, under the same layers as every other table: defaults < the file < the
//! seed's `REDIS_*` variables < `ROUTEMQ_BRIDGE_REDIS__*`. The checks that are the crate's
//! business — what a Redis URL is, which combinations its client refuses — are the crate's
//! ([`check_url`], [`RedisConfig::validate`]), so this reading and the crate's own
//! [`RedisConfig::from_env`] refuse the same values with the same messages.

use routemq_redis::config::check_url;
use routemq_redis::RedisConfig;

use super::reader::Table;
use super::Secret;

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
    // Checked here, once, without connecting: a combination the client refuses is a config
    // error `check` finds, not a daemon that starts and never connects. The messages never
    // quote a URL or password.
    if config.enabled {
        if let Err(message) = config.validate() {
            let key = if config.cluster.is_empty() {
                "url"
            } else {
                "cluster"
            };
            t.error(key, message);
        }
    }
    t.finish();
    config
}
