//! How to reach Redis: [`RedisConfig`], the seed's defaults, and the seed's `REDIS_*` /
//! `ENABLE_REDIS` variables (spec §3).
//!
//! [`RedisConfig::from_env`] is for library users who configure from a RouteMQ
//! environment, with nothing else: it reads the seed's variables only. An application with
//! a config file of its own (the daemon's `[redis]` table, under the same variables) reads
//! it itself and checks what it read with [`check_url`] and [`RedisConfig::validate`], so
//! both ways refuse the same values with the same messages.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::time::Duration;

pub use crate::secret::Secret;
/// How to reach Redis. `Default` gives the seed's defaults; [`RedisConfig::from_env`] puts
/// the seed's variables over them. (The daemon builds it from defaults < `[redis]` in its
/// file < `REDIS_*` variables < `ROUTEMQ_BRIDGE_REDIS__*` variables.)
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
    /// Redis Sentinel (`[redis.sentinel]`): when set, the data node is the master the
    /// sentinels name, and `host` / `port` / `url`'s address are not used for data
    /// connections (`url`'s scheme, database and credentials still are).
    pub sentinel: Option<SentinelConfig>,
}

/// `[redis.sentinel]`: which master to follow and which sentinels to ask (spec §10).
#[derive(Clone, Debug, PartialEq)]
pub struct SentinelConfig {
    /// The master's name in the sentinels' configuration (`sentinel monitor <name> …`).
    pub master: String,
    /// Sentinel URLs (`redis://host:26379`), asked in turn. Secret: a URL may hold a password.
    pub nodes: Vec<Secret>,
    /// Credentials for the sentinels (the data nodes use `[redis]`'s).
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// After each route write, `WAIT` until this many replicas acknowledged it before the
    /// message counts as written (0: do not wait). Default [`DEFAULT_WAIT_REPLICAS`].
    pub wait_replicas: u32,
}

/// Default of `[redis.sentinel] wait_replicas`: a write is acked to MQTT only once one
/// replica has it, so a failover (which promotes a replica) cannot lose it.
pub const DEFAULT_WAIT_REPLICAS: u32 = 1;

/// Largest `[redis.sentinel] wait_replicas`. `WAIT` counts replicas that exist and are
/// connected: asking for more than a master has never completes, so every message would
/// wait unacked forever. 16 is far above any Sentinel deployment's replica count while still
/// catching a typo (or a negative number gone through a cast).
pub const MAX_WAIT_REPLICAS: u32 = 16;

impl SentinelConfig {
    /// Why this table cannot work, naming the key (`master`, `nodes`), or `None`.
    pub fn problem(&self) -> Option<(&'static str, String)> {
        if self.master.trim().is_empty() {
            return Some(("master", "must name the master (e.g. \"mymaster\")".into()));
        }
        if self.nodes.is_empty() {
            return Some((
                "nodes",
                "must list at least one sentinel (e.g. [\"redis://127.0.0.1:26379\"])".into(),
            ));
        }
        for (i, node) in self.nodes.iter().enumerate() {
            if let Err(e) = check_url(node.expose()) {
                return Some(("nodes", format!("node {i}: {e}")));
            }
        }
        if self.wait_replicas > MAX_WAIT_REPLICAS {
            return Some(("wait_replicas", wait_replicas_range()));
        }
        None
    }
}

/// The error of a `wait_replicas` out of range.
pub fn wait_replicas_range() -> String {
    format!(
        "must be 0..={MAX_WAIT_REPLICAS} (replicas that must have a write before its message \
         is acked; more than the master has would hold every message forever)"
    )
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
            sentinel: None,
        }
    }
}

impl RedisConfig {
    /// From the process environment: defaults < the seed's `REDIS_*` / `ENABLE_REDIS`
    /// variables. This is what the process-wide default manager uses.
    pub fn from_env() -> Result<RedisConfig, EnvErrors> {
        let env = std::env::vars_os()
            .map(|(k, v)| {
                (
                    k.to_string_lossy().into_owned(),
                    v.to_string_lossy().into_owned(),
                )
            })
            .collect();
        RedisConfig::from_env_map(&env)
    }

    /// Like [`RedisConfig::from_env`], from the given variables. Empty values count as
    /// unset, as they do for RouteMQ (`REDIS_PASSWORD=` means no password). Without
    /// `REDIS_PASSWORD`, the systemd credential `redis_password` in
    /// `$CREDENTIALS_DIRECTORY` is used when there is one. Every bad variable is reported,
    /// not only the first.
    pub fn from_env_map(env: &HashMap<String, String>) -> Result<RedisConfig, EnvErrors> {
        let mut r = EnvReader {
            env,
            errors: Vec::new(),
        };
        let d = RedisConfig::default();
        let enabled = r
            .read("ENABLE_REDIS", "redis.enabled", |v| {
                parse_bool(v).ok_or_else(|| {
                    format!("expected a boolean (true/false, yes/no, on/off, 1/0), found {v:?}")
                })
            })
            .unwrap_or(d.enabled);
        let url = r.read("REDIS_URL", "redis.url", |v| {
            check_url(v).map(|()| Secret::new(v))
        });
        let host = r
            .read("REDIS_HOST", "redis.host", |v| {
                if v.trim().is_empty() {
                    Err("must not be empty".to_string())
                } else {
                    Ok(v.to_string())
                }
            })
            .unwrap_or(d.host);
        let port = r
            .read("REDIS_PORT", "redis.port", |v| {
                let n = integer(v)?;
                match u16::try_from(n) {
                    Ok(p) if p > 0 => Ok(p),
                    _ => Err(format!("expected a port number 1..=65535, found {n}")),
                }
            })
            .unwrap_or(d.port);
        let db = r
            .read("REDIS_DB", "redis.db", |v| {
                at_least(v, 0, (i64::MIN, i64::MAX))
            })
            .unwrap_or(d.db);
        let username = r.read("REDIS_USERNAME", "redis.username", |v| Ok(v.to_string()));
        let password = r
            .read("REDIS_PASSWORD", "redis.password", |v| Ok(Secret::new(v)))
            .or_else(|| r.credential("redis_password", "redis.password"));
        let max_connections = r
            .read("REDIS_MAX_CONNECTIONS", "redis.max_connections", |v| {
                at_least(v, 1, (usize::MIN, usize::MAX))
            })
            .unwrap_or(d.max_connections);
        let socket_timeout = r
            .read(
                "REDIS_SOCKET_TIMEOUT",
                "redis.socket_timeout",
                positive_duration,
            )
            .unwrap_or(d.socket_timeout);
        let socket_connect_timeout = r
            .read(
                "REDIS_SOCKET_CONNECT_TIMEOUT",
                "redis.socket_connect_timeout",
                positive_duration,
            )
            .unwrap_or(d.socket_connect_timeout);
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
            cluster: d.cluster,
            sentinel: d.sentinel,
        };
        if config.enabled {
            if let Err(message) = config.validate() {
                r.errors.push(EnvError {
                    source: "environment variable REDIS_URL".to_string(),
                    path: "redis.url".to_string(),
                    message,
                });
            }
        }
        if r.errors.is_empty() {
            Ok(config)
        } else {
            Err(EnvErrors(r.errors))
        }
    }

    /// Builds what the manager builds its client from, without connecting, so a
    /// combination the client refuses (cluster nodes with different TLS modes, users or
    /// databases) is found when the config is read, not by a manager that never connects.
    /// The message never quotes a URL or password.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(sentinel) = &self.sentinel {
            if !self.cluster.is_empty() {
                return Err("set either redis.sentinel or redis.cluster, not both".to_string());
            }
            if let Some((key, message)) = sentinel.problem() {
                return Err(format!("redis.sentinel.{key}: {message}"));
            }
        }
        match super::connection::Target::from_config(self) {
            Ok(_) => Ok(()),
            Err(super::Error::Invalid(message)) => Err(message),
            Err(other) => Err(other.to_string()),
        }
    }
}

/// Reads the seed's variables, collecting every error.
struct EnvReader<'a> {
    env: &'a HashMap<String, String>,
    errors: Vec<EnvError>,
}

impl EnvReader<'_> {
    /// `var` converted by `parse`; `None` when unset or empty, or wrong (recorded).
    fn read<T>(
        &mut self,
        var: &str,
        path: &str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Option<T> {
        let value = self.env.get(var).filter(|v| !v.is_empty())?;
        match parse(value) {
            Ok(v) => Some(v),
            Err(message) => {
                self.errors.push(EnvError {
                    source: format!("environment variable {var}"),
                    path: path.to_string(),
                    message,
                });
                None
            }
        }
    }

    /// The systemd credential `name` (`LoadCredential=`), if `$CREDENTIALS_DIRECTORY`
    /// holds one: its content, trailing newlines trimmed (editors and `echo` add one).
    fn credential(&mut self, name: &str, path: &str) -> Option<Secret> {
        let dir = self
            .env
            .get("CREDENTIALS_DIRECTORY")
            .filter(|d| !d.is_empty())?;
        let file = Path::new(dir).join(name);
        if !file.is_file() {
            return None;
        }
        let read = std::fs::read_to_string(&file)
            .map_err(|e| format!("cannot read {}: {e}", file.display()))
            .and_then(|text| {
                let secret = text.trim_end_matches(['\r', '\n']);
                if secret.is_empty() {
                    Err(format!("{} is empty", file.display()))
                } else {
                    Ok(Secret::new(secret))
                }
            });
        match read {
            Ok(secret) => Some(secret),
            Err(message) => {
                self.errors.push(EnvError {
                    source: file.display().to_string(),
                    path: path.to_string(),
                    message,
                });
                None
            }
        }
    }
}

/// `true/false/1/0/yes/no/on/off` in any case, as the seed's `ENABLE_REDIS` accepts.
pub fn parse_bool(text: &str) -> Option<bool> {
    match text.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Some(true),
        "false" | "0" | "no" | "off" => Some(false),
        _ => None,
    }
}

fn integer(text: &str) -> Result<i128, String> {
    text.trim()
        .parse::<i128>()
        .map_err(|_| format!("expected an integer, found {text:?}"))
}

/// An integer of type `T` (whose range is `lo..=hi`) that must be at least `min`.
fn at_least<T>(text: &str, min: T, (lo, hi): (T, T)) -> Result<T, String>
where
    T: TryFrom<i128> + PartialOrd + fmt::Display + Copy,
{
    let n = integer(text)?;
    let n =
        T::try_from(n).map_err(|_| format!("expected an integer from {lo} to {hi}, found {n}"))?;
    if n >= min {
        Ok(n)
    } else {
        Err(format!("must be at least {min}, found {n}"))
    }
}

/// The longest duration a timeout takes: far beyond any sane one, far below what
/// overflows where durations are used (added to `Instant`s, doubled in backoff).
pub const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// A timeout: `"250ms"`, `"30s"`, `"1h 30m"`, or a number of seconds (`5.0`, as the seed
/// writes them); not zero, at most [`MAX_DURATION`].
fn positive_duration(text: &str) -> Result<Duration, String> {
    let expected = || {
        format!(
            "expected a duration such as \"250ms\", \"30s\", \"1h 30m\" or a number of \
             seconds, found {text:?}"
        )
    };
    let trimmed = text.trim();
    let duration = match trimmed.parse::<f64>() {
        Ok(seconds) => Duration::try_from_secs_f64(seconds).map_err(|_| expected())?,
        Err(_) => humantime::parse_duration(trimmed).map_err(|_| expected())?,
    };
    if duration > MAX_DURATION {
        return Err(format!(
            "must be at most 10 years ({}), found {}",
            humantime::format_duration(MAX_DURATION),
            humantime::format_duration(duration)
        ));
    }
    if duration.is_zero() {
        return Err("must be longer than zero".to_string());
    }
    Ok(duration)
}

/// One bad variable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnvError {
    /// Who set the value: `environment variable REDIS_PORT`, or the credential file.
    pub source: String,
    /// The key it sets, e.g. `redis.port`.
    pub path: String,
    /// What is wrong, and what was found (never a secret).
    pub message: String,
}

impl fmt::Display for EnvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.source, self.path, self.message)
    }
}

/// Every bad variable found; never empty when returned as an `Err`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnvErrors(Vec<EnvError>);

impl EnvErrors {
    pub fn iter(&self) -> std::slice::Iter<'_, EnvError> {
        self.0.iter()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn into_vec(self) -> Vec<EnvError> {
        self.0
    }
}

impl fmt::Display for EnvErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for EnvErrors {}

/// A Redis URL must be `redis://` or `rediss://` and parse (empty is fine: unset). The
/// message never quotes the URL: it may hold a password.
pub fn check_url(url: &str) -> Result<(), String> {
    if url.is_empty() {
        return Ok(());
    }
    match url.split_once("://") {
        Some(("redis" | "rediss", _)) => {}
        // Only a scheme is quoted: what stands before a stray `://` may be a password.
        Some((scheme, _)) if crate::secret::is_scheme(scheme) => {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn errors(pairs: &[(&str, &str)]) -> Vec<String> {
        match RedisConfig::from_env_map(&env(pairs)) {
            Ok(c) => panic!("expected errors, read {c:?}"),
            Err(e) => e.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn without_variables_the_seed_defaults_apply() {
        assert_eq!(
            RedisConfig::from_env_map(&env(&[])),
            Ok(RedisConfig::default())
        );
        let d = RedisConfig::default();
        assert_eq!(
            (d.host.as_str(), d.port, d.db, d.max_connections),
            ("localhost", 6379, 0, 10)
        );
        assert_eq!(d.socket_timeout, Duration::from_secs(5));
        assert_eq!(d.socket_connect_timeout, Duration::from_secs(5));
    }

    #[test]
    fn the_seed_variables_set_their_keys() {
        let c = RedisConfig::from_env_map(&env(&[
            ("REDIS_HOST", "redis.lan"),
            ("REDIS_PORT", "6380"),
            ("REDIS_DB", "2"),
            ("REDIS_USERNAME", "bridge"),
            ("REDIS_PASSWORD", "007"),
            ("REDIS_MAX_CONNECTIONS", "4"),
            ("REDIS_SOCKET_TIMEOUT", "2.5"),
            ("REDIS_SOCKET_CONNECT_TIMEOUT", "250ms"),
            ("REDIS_URL", "rediss://redis.lan:6380/2"),
        ]))
        .expect("valid");
        assert_eq!((c.host.as_str(), c.port, c.db), ("redis.lan", 6380, 2));
        assert_eq!(c.username.as_deref(), Some("bridge"));
        // A password of digits stays a string, leading zero and all.
        assert_eq!(c.password.as_ref().map(Secret::expose), Some("007"));
        assert_eq!(c.max_connections, 4);
        assert_eq!(c.socket_timeout, Duration::from_millis(2500));
        assert_eq!(c.socket_connect_timeout, Duration::from_millis(250));
        assert_eq!(
            c.url.as_ref().map(Secret::expose),
            Some("rediss://redis.lan:6380/2")
        );
    }

    fn sentinel(master: &str, nodes: &[&str]) -> SentinelConfig {
        SentinelConfig {
            master: master.into(),
            nodes: nodes.iter().map(|n| Secret::new(*n)).collect(),
            username: None,
            password: None,
            wait_replicas: DEFAULT_WAIT_REPLICAS,
        }
    }

    #[test]
    fn a_sentinel_table_needs_a_master_and_nodes_and_excludes_cluster() {
        let ok = sentinel("mymaster", &["redis://127.0.0.1:26379"]);
        assert_eq!(ok.problem(), None);
        assert_eq!(
            sentinel("", &["redis://h:1"]).problem().map(|p| p.0),
            Some("master")
        );
        assert_eq!(sentinel("m", &[]).problem().map(|p| p.0), Some("nodes"));
        let bad = sentinel("m", &["redis://:hunter2@h:notaport"]).problem();
        assert_eq!(bad.as_ref().map(|p| p.0), Some("nodes"));
        assert!(!format!("{bad:?}").contains("hunter2"), "{bad:?}");
        let config = RedisConfig {
            sentinel: Some(ok.clone()),
            ..RedisConfig::default()
        };
        assert_eq!(config.validate(), Ok(()));
        let both = RedisConfig {
            sentinel: Some(ok),
            cluster: vec![Secret::new("redis://127.0.0.1:7000")],
            ..RedisConfig::default()
        };
        assert!(both.validate().is_err_and(|e| e.contains("not both")));
    }

    #[test]
    fn enable_redis_accepts_the_seed_booleans_in_any_case() {
        for (text, enabled) in [
            ("true", true),
            ("1", true),
            ("YES", true),
            ("On", true),
            ("false", false),
            ("0", false),
            ("no", false),
            ("OFF", false),
        ] {
            let c = RedisConfig::from_env_map(&env(&[("ENABLE_REDIS", text)])).expect(text);
            assert_eq!(c.enabled, enabled, "{text}");
        }
    }

    #[test]
    fn empty_variables_count_as_unset() {
        let c = RedisConfig::from_env_map(&env(&[("REDIS_PASSWORD", ""), ("REDIS_HOST", "")]))
            .expect("valid");
        assert_eq!(c, RedisConfig::default());
    }

    #[test]
    fn every_bad_variable_is_reported_with_its_name() {
        assert_eq!(
            errors(&[
                ("ENABLE_REDIS", "maybe"),
                ("REDIS_PORT", "0"),
                ("REDIS_MAX_CONNECTIONS", "0"),
                ("REDIS_SOCKET_TIMEOUT", "soon"),
            ]),
            [
                "environment variable ENABLE_REDIS: redis.enabled: expected a boolean \
                 (true/false, yes/no, on/off, 1/0), found \"maybe\"",
                "environment variable REDIS_PORT: redis.port: expected a port number \
                 1..=65535, found 0",
                "environment variable REDIS_MAX_CONNECTIONS: redis.max_connections: must be \
                 at least 1, found 0",
                "environment variable REDIS_SOCKET_TIMEOUT: redis.socket_timeout: expected a \
                 duration such as \"250ms\", \"30s\", \"1h 30m\" or a number of seconds, \
                 found \"soon\"",
            ]
        );
    }

    #[test]
    fn a_bad_url_is_refused_without_quoting_it() {
        let errors = errors(&[("REDIS_URL", "http://user:hunter2@h")]);
        assert_eq!(
            errors,
            [
                "environment variable REDIS_URL: redis.url: expected a URL starting with \
              redis:// or rediss://, found scheme \"http\""
            ]
        );
        let errors = self::errors(&[("REDIS_URL", "hunter2@h://x")]);
        assert!(!errors[0].contains("hunter2"), "{errors:?}");
    }

    #[test]
    fn the_password_comes_from_the_systemd_credential_when_no_variable_sets_it() {
        let dir = std::env::temp_dir().join(format!("routemq-redis-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        std::fs::write(dir.join("redis_password"), "s3cret\n").expect("write");
        let credentials = dir.display().to_string();
        let c = RedisConfig::from_env_map(&env(&[("CREDENTIALS_DIRECTORY", &credentials)]))
            .expect("valid");
        assert_eq!(c.password.as_ref().map(Secret::expose), Some("s3cret"));
        let c = RedisConfig::from_env_map(&env(&[
            ("CREDENTIALS_DIRECTORY", &credentials),
            ("REDIS_PASSWORD", "pw"),
        ]))
        .expect("valid");
        assert_eq!(c.password.as_ref().map(Secret::expose), Some("pw"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
