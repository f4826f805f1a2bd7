//! The `[redis]` table (spec §3, §4), read into the Redis crate's [`RedisConfig`].
//!
//! The crate knows nothing of this loader (it stands alone, spec §1), so the daemon reads
//! the table here, under the same layers as every other table: defaults < the file < the
//! seed's `REDIS_*` variables < `ROUTEMQ_BRIDGE_REDIS__*`. The checks that are the crate's
//! business — what a Redis URL is, which combinations its client refuses — are the crate's
//! ([`check_url`], [`RedisConfig::validate`]), so this reading and the crate's own
//! [`RedisConfig::from_env`] refuse the same values with the same messages.

use routemq_redis::config::{
    check_url, wait_replicas_range, SentinelConfig, DEFAULT_WAIT_REPLICAS, MAX_WAIT_REPLICAS,
};
use routemq_redis::RedisConfig;

use super::reader::Table;
use super::Secret;

/// The keys that address a single Redis server.
const SINGLE_SERVER_KEYS: [&str; 3] = ["url", "host", "port"];

/// With a topology that finds its own data nodes (`redis.cluster`'s seed list, or
/// Sentinel's master), `host`, `port` and `url` are not used for data connections: warns
/// about each one the operator set anyway (file or `REDIS_*` variable), so a config that
/// looks like it points at one server does not silently point elsewhere (spec §10).
/// `topology` is the key path that is used instead, e.g. `redis.cluster`; `still` what of
/// them still applies, if anything.
pub(crate) fn warn_unused_address(t: &Table<'_>, topology: &str, still: &str) {
    for key in SINGLE_SERVER_KEYS {
        if t.has(key) {
            t.warn(
                key,
                format!(
                    "is set but {topology} is used for data connections: redis.url, \
                     redis.host and redis.port (and REDIS_URL, REDIS_HOST, REDIS_PORT) are \
                     not used to find them{still}"
                ),
            );
        }
    }
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
    let sentinel = t.opt_table("sentinel").map(read_sentinel);
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
        sentinel,
    };
    if !config.cluster.is_empty() {
        warn_unused_address(&t, "redis.cluster", "; remove it");
    } else if config.sentinel.is_some() {
        warn_unused_address(
            &t,
            "redis.sentinel",
            " (the sentinels name the master; url's scheme, database and credentials still \
             apply)",
        );
    }
    // Checked here, once, without connecting: a combination the client refuses is a config
    // error `check` finds, not a daemon that starts and never connects. The messages never
    // quote a URL or password.
    let sentinel_problem = match &config.sentinel {
        Some(_) if !config.cluster.is_empty() => {
            t.error(
                "sentinel",
                "set either redis.sentinel or redis.cluster, not both",
            );
            true
        }
        // Reported by read_sentinel, naming its key.
        Some(s) => s.problem().is_some(),
        None => false,
    };
    if config.enabled && !sentinel_problem {
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

/// `[redis.sentinel]`.
fn read_sentinel(mut t: Table<'_>) -> SentinelConfig {
    let master = t.string("master", "");
    let nodes: Vec<String> = t.string_list("nodes");
    let username = t.opt_string("username").filter(|u| !u.is_empty());
    let password = t.password("redis_sentinel_password");
    let wait_replicas = t
        .parse("wait_replicas", |n: u64| {
            u32::try_from(n)
                .ok()
                .filter(|n| *n <= MAX_WAIT_REPLICAS)
                .ok_or_else(wait_replicas_range)
        })
        .unwrap_or(DEFAULT_WAIT_REPLICAS);
    let sentinel = SentinelConfig {
        master,
        nodes: nodes.into_iter().map(Secret::new).collect(),
        username,
        password,
        wait_replicas,
    };
    if let Some((key, message)) = sentinel.problem() {
        t.error(key, message);
    }
    t.finish();
    sentinel
}
