//! Loading and validating configuration values (spec §4): the layers, the typed reader that
//! names every error's key path, and the sections no component owns (`[http]`, `[limits]`,
//! `[log]`). It knows no component: each reads its own table with [`reader::Table`] beside
//! the code that uses it (`MqttConfig::read` in `mqtt`, `[redis]` in `redis.rs` here for the
//! Redis crate's `RedisConfig`, a route's stages in `middleware/` and `actions/`), and the
//! daemon assembles the whole (`daemon::config::BridgeConfig`).
//!
//! Layers, lowest first: built-in defaults (each config type's `Default`) < the TOML file <
//! RouteMQ's variables (`MQTT_*`, `REDIS_*`, `ENABLE_REDIS`) < `ROUTEMQ_BRIDGE_*`
//! variables. figment merges the layers and tags every value with the layer it came from;
//! our own [`reader`] then reads the merged values into typed configs, collecting *every*
//! error with the file or variable to blame, instead of stopping at the first as serde
//! would.

mod broker;
mod error;
mod layers;
pub mod reader;
pub mod redis;
mod sections;
mod value;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use figment::Figment;

pub use broker::BrokerAddress;
pub use error::{ConfigError, ConfigErrors, ConfigWarning};
pub use layers::{CONFIG_VAR, CREDENTIALS_DIRECTORY, PREFIX};
pub use reader::RawTable;
pub use routemq_redis::secret::{is_scheme, redact_url, Secret};
pub use sections::{HttpConfig, LimitsConfig, LogConfig, LogFormat};

use layers::FileLayer;
use reader::{Context, Errors, Table};

/// Loads `path` with `env` standing in for the process environment, and lets `read` read
/// the merged root table; every error `read` records is reported together. A TOML syntax
/// error is reported alone.
pub fn load<T>(
    path: &Path,
    env: &HashMap<String, String>,
    read: impl FnOnce(Table<'_>, &Errors) -> T,
) -> Result<T, ConfigErrors> {
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
    let value = read(root.reader(&errors), &errors);
    errors.finish(value)
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
