//! Loading and validating the configuration (spec §4): one loader for the whole daemon.
//!
//! Layers, lowest first: built-in defaults (each config type's `Default`) < the TOML file <
//! RouteMQ's variables (`MQTT_*`, `REDIS_*`, `ENABLE_REDIS`) < `ROUTEMQ_BRIDGE_*`
//! variables. figment merges the layers and tags every value with the layer it came from;
//! our own [`reader`] then reads the merged values into typed configs, collecting *every*
//! error with the file or variable to blame, instead of stopping at the first as serde
//! would. Each config type reads its own table beside the code that uses it
//! (`MqttConfig::read` in `mqtt`); the Redis crate's `RedisConfig` is read in `config/redis.rs`,
//! since that crate knows nothing of this loader.

mod error;
mod layers;
pub mod reader;
mod redis;
mod sections;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use figment::Figment;

pub use error::{ConfigError, ConfigErrors};
pub use layers::{CONFIG_VAR, CREDENTIALS_DIRECTORY, PREFIX};
pub use reader::RawTable;
pub use routemq_redis::secret::{is_scheme, redact_url, Secret};
pub use sections::{DeadLetterConfig, HttpConfig, LimitsConfig, LogConfig, LogFormat};

use crate::mqtt::MqttConfig;
use crate::redis::RedisConfig;
use crate::republish::{read_republish, RepublishRule};
use crate::router::config::read_routes;
use crate::router::route::RouteTable;
use layers::FileLayer;
use reader::{Context, Errors, Table};

/// Where the daemon looks for its config when neither `--config` nor
/// `ROUTEMQ_BRIDGE_CONFIG` says otherwise.
pub const DEFAULT_PATH: &str = "/etc/routemq-bridge/bridge.toml";

/// Everything the daemon reads at start-up and on reload.
#[derive(Clone, Debug)]
pub struct BridgeConfig {
    pub mqtt: MqttConfig,
    pub redis: RedisConfig,
    pub http: HttpConfig,
    pub limits: LimitsConfig,
    pub log: LogConfig,
    pub dead_letter: DeadLetterConfig,
    /// `[[routes]]`, not yet read: the route code reads each with [`RawTable::reader`], so
    /// its errors carry paths like `routes[3].actions[0].key`.
    pub routes: Vec<RawTable>,
    /// `[[republish]]`, not yet read, like `routes`.
    pub republish: Vec<RawTable>,
    /// `[[republish]]` compiled: filled by [`BridgeConfig::compile`] (empty after `load`).
    pub republish_rules: Vec<RepublishRule>,
}

impl BridgeConfig {
    /// Loads `path`, with the process environment on top.
    pub fn load(path: &Path) -> Result<BridgeConfig, ConfigErrors> {
        BridgeConfig::load_with_env(path, &process_env())
    }

    /// Loads `path` with `env` standing in for the process environment (tests, reloads).
    /// A TOML syntax error is reported alone; every other error is reported together.
    pub fn load_with_env(
        path: &Path,
        env: &HashMap<String, String>,
    ) -> Result<BridgeConfig, ConfigErrors> {
        Self::load_and(path, env, |_, _| ()).map(|(config, ())| config)
    }

    /// Loads `path` and compiles its routes and republish rules in the same pass, so every
    /// error — section, route, action, rule or template — is reported together. What the
    /// daemon and `check` use.
    pub fn compile(
        path: &Path,
        env: &HashMap<String, String>,
    ) -> Result<(BridgeConfig, RouteTable), ConfigErrors> {
        Self::load_and(path, env, |config, errors| {
            let routes = read_routes(&config.routes, config.redis.enabled, errors);
            let rules = read_republish(&config.republish, config.redis.enabled, errors);
            (routes, rules)
        })
        .map(|(mut config, (routes, rules))| {
            config.republish_rules = rules;
            (config, routes)
        })
    }

    /// Loads the sections, then lets `more` read what builds on them, into the same errors.
    fn load_and<T>(
        path: &Path,
        env: &HashMap<String, String>,
        more: impl FnOnce(&BridgeConfig, &Errors) -> T,
    ) -> Result<(BridgeConfig, T), ConfigErrors> {
        let file = FileLayer::read(path).map_err(|e| ConfigErrors::new(vec![e]))?;
        let errors = Errors::new();
        let seed = layers::seed_layer(env, file.mqtt_url(), &errors);
        let prefix = layers::prefix_layer(env, &errors);
        let figment = Figment::new().merge(file).merge(seed).merge(prefix);
        let base_dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
            _ => ".".into(),
        };
        let cx = Arc::new(Context::new(figment, base_dir, credentials_dir(env)));
        let root = cx.root();
        let config = BridgeConfig::read(root.reader(&errors));
        let extra = more(&config, &errors);
        errors.finish((config, extra))
    }

    fn read(mut t: Table<'_>) -> BridgeConfig {
        let mqtt = MqttConfig::read(t.table("mqtt"));
        let redis = redis::read(t.table("redis"));
        let http = HttpConfig::read(t.table("http"));
        let limits = LimitsConfig::read(t.table("limits"));
        let log = LogConfig::read(t.table("log"));
        let dead_letter = DeadLetterConfig::read(t.table("dead_letter"));
        let routes = t.raw_tables("routes");
        let republish = t.raw_tables("republish");
        if mqtt.max_packet_size <= limits.max_payload {
            let message = format!(
                "must exceed limits.max_payload ({} bytes), found {} bytes",
                limits.max_payload, mqtt.max_packet_size
            );
            t.error_at(&["mqtt", "max_packet_size"], message);
        }
        t.finish();
        BridgeConfig {
            mqtt,
            redis,
            http,
            limits,
            log,
            dead_letter,
            routes,
            republish,
            republish_rules: Vec::new(),
        }
    }
}

/// The process environment as a map. Variables that are not UTF-8 are converted lossily:
/// a mangled value then fails validation with its name, instead of vanishing.
pub fn process_env() -> HashMap<String, String> {
    std::env::vars_os()
        .map(|(k, v)| {
            (
                k.to_string_lossy().into_owned(),
                v.to_string_lossy().into_owned(),
            )
        })
        .collect()
}

fn credentials_dir(env: &HashMap<String, String>) -> Option<std::path::PathBuf> {
    env.get(CREDENTIALS_DIRECTORY)
        .filter(|d| !d.is_empty())
        .map(Into::into)
}

/// Reads the seed's variables alone (no file, no `ROUTEMQ_BRIDGE_*`); `read` picks the
/// tables it wants. The tests hold the Redis crate's own reading of these variables
/// (`RedisConfig::from_env_map`) to this one.
#[cfg(test)]
pub(crate) fn read_seed_env<T>(
    env: &HashMap<String, String>,
    read: impl FnOnce(&mut Table<'_>) -> T,
) -> Result<T, ConfigErrors> {
    let errors = Errors::new();
    let seed = layers::seed_layer(env, None, &errors);
    let cx = Arc::new(Context::new(
        Figment::from(seed),
        ".".into(),
        credentials_dir(env),
    ));
    let root = cx.root();
    let mut t = root.reader(&errors);
    let value = read(&mut t);
    // The other tables belong to other readers; nothing here can be unknown.
    drop(t);
    errors.finish(value)
}

#[cfg(test)]
mod tests;
