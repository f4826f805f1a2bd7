//! The precedence layers as figment providers: the file, RouteMQ's variables, ours.
//!
//! The file is parsed here rather than by figment's `Toml` provider so a syntax error can
//! be reported with the file and line before anything else is read.
//!
//! figment's own `Env` provider guesses types ("123456" becomes a number, "007" becomes 7),
//! which breaks digit-only passwords and makes errors name a key instead of the variable the
//! operator actually set. These providers keep every value a string (the typed reader parses
//! it, and says which variable was wrong) and remember, per key path, the exact variable
//! name, which [`figment::Metadata::interpolate`] hands back when an error is reported.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use figment::providers::{Format, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Metadata, Profile, Provider, Source};

use super::error::ConfigError;
use super::reader::Errors;
use super::BrokerAddress;

/// Prefix of the bridge's own variables; `__` separates nested keys.
pub const PREFIX: &str = "ROUTEMQ_BRIDGE_";
/// The config file path: read by the command line, not a key.
pub const CONFIG_VAR: &str = "ROUTEMQ_BRIDGE_CONFIG";
/// systemd's `LoadCredential=` directory.
pub const CREDENTIALS_DIRECTORY: &str = "CREDENTIALS_DIRECTORY";

/// Provider names; [`super::reader::Context`] ranks values by them.
pub(crate) const FILE_LAYER: &str = "config file";
pub(crate) const SEED_LAYER: &str = "RouteMQ environment variables";
pub(crate) const PREFIX_LAYER: &str = "ROUTEMQ_BRIDGE_ environment variables";

/// The seed's variables (spec §3, §4) and the key each one sets. `MQTT_BROKER`/`MQTT_PORT`
/// are handled apart: together they build `mqtt.url`.
const SEED_VARS: &[(&str, &str)] = &[
    ("ENABLE_REDIS", "redis.enabled"),
    ("REDIS_HOST", "redis.host"),
    ("REDIS_PORT", "redis.port"),
    ("REDIS_DB", "redis.db"),
    ("REDIS_USERNAME", "redis.username"),
    ("REDIS_PASSWORD", "redis.password"),
    ("REDIS_MAX_CONNECTIONS", "redis.max_connections"),
    ("REDIS_SOCKET_TIMEOUT", "redis.socket_timeout"),
    (
        "REDIS_SOCKET_CONNECT_TIMEOUT",
        "redis.socket_connect_timeout",
    ),
    ("REDIS_URL", "redis.url"),
    ("MQTT_USERNAME", "mqtt.username"),
    ("MQTT_PASSWORD", "mqtt.password"),
    ("MQTT_CLIENT_ID", "mqtt.client_id"),
    ("MQTT_GROUP_NAME", "mqtt.share_group"),
];

/// One layer of variables as a nested dict of strings.
#[derive(Clone, Debug)]
pub(crate) struct EnvLayer {
    name: &'static str,
    dict: Dict,
    /// Key path (`redis.port`) → the variable(s) that set it.
    vars: Arc<BTreeMap<String, String>>,
}

impl EnvLayer {
    fn new(name: &'static str) -> Self {
        EnvLayer {
            name,
            dict: Dict::new(),
            vars: Arc::new(BTreeMap::new()),
        }
    }

    /// Sets `path` to `value`; `Err` names the variable that already set `path` or a parent.
    fn insert(&mut self, path: &[String], value: &str, var: &str) -> Result<(), String> {
        let mut dict = &mut self.dict;
        for (i, key) in path.iter().enumerate() {
            let here = path[..=i].join(".");
            if i + 1 == path.len() {
                if dict.contains_key(key) {
                    return Err(self.conflict(&here));
                }
                dict.insert(key.clone(), Value::from(value.to_string()));
            } else {
                let entry = dict
                    .entry(key.clone())
                    .or_insert_with(|| Value::from(Dict::new()));
                match entry {
                    Value::Dict(_, d) => dict = d,
                    _ => return Err(self.conflict(&here)),
                }
            }
        }
        let vars = Arc::make_mut(&mut self.vars);
        vars.insert(path.join("."), var.to_string());
        Ok(())
    }

    fn conflict(&self, path: &str) -> String {
        let other = self
            .vars
            .iter()
            .find(|(p, _)| *p == path || p.starts_with(&format!("{path}.")))
            .map(|(_, v)| v.as_str())
            .unwrap_or("another variable");
        format!("conflicts with {other}, which sets the same key")
    }
}

impl Provider for EnvLayer {
    fn metadata(&self) -> Metadata {
        let vars = self.vars.clone();
        Metadata::named(self.name).interpolater(move |_: &Profile, keys: &[&str]| {
            let path = keys.join(".");
            if let Some(var) = vars.get(&path) {
                return var.clone();
            }
            // A table made of variables (`ROUTEMQ_BRIDGE_FOO__BAR` makes `foo`): name one.
            let below = format!("{path}.");
            vars.iter()
                .find(|(p, _)| p.starts_with(&below))
                .map_or(path, |(_, var)| var.clone())
        })
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Ok(Profile::Default.collect(self.dict.clone()))
    }
}

/// The config file, parsed.
#[derive(Clone, Debug)]
pub(crate) struct FileLayer {
    path: PathBuf,
    dict: Dict,
}

impl FileLayer {
    /// Reads and parses `path`. A syntax error stops the load: nothing after it can be
    /// trusted, so it is the one error reported alone.
    pub(crate) fn read(path: &Path) -> Result<FileLayer, ConfigError> {
        let source = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::new(&source, "", format!("cannot read config file: {e}")))?;
        let dict = Toml::from_str::<Dict>(&text).map_err(|e| {
            // toml's message may span lines; errors print one per line.
            let message: Vec<&str> = e.message().lines().map(str::trim).collect();
            let message = message.join("; ");
            let at = match e.span() {
                Some(span) => {
                    let before = &text[..span.start.min(text.len())];
                    let line = before.matches('\n').count() + 1;
                    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
                    format!(" at line {line}, column {column}")
                }
                None => String::new(),
            };
            ConfigError::new(&source, "", format!("TOML syntax error{at}: {message}"))
        })?;
        Ok(FileLayer {
            path: path.to_path_buf(),
            dict,
        })
    }

    /// `mqtt.url` as the file sets it, which `MQTT_BROKER`/`MQTT_PORT` amend.
    pub(crate) fn mqtt_url(&self) -> Option<&str> {
        self.dict.get("mqtt")?.as_dict()?.get("url")?.as_str()
    }
}

impl Provider for FileLayer {
    fn metadata(&self) -> Metadata {
        Metadata::from(FILE_LAYER, Source::File(self.path.clone()))
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Ok(Profile::Default.collect(self.dict.clone()))
    }
}

fn var_error(var: &str, path: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::new(format!("environment variable {var}"), path, message)
}

/// The seed's variables (RouteMQ's `.env`). Empty values count as unset, as they do for
/// RouteMQ (`REDIS_PASSWORD=` means no password). `file_mqtt_url` is the URL the lower
/// layers chose: `MQTT_BROKER`/`MQTT_PORT` replace its host and port, keeping its scheme.
pub(crate) fn seed_layer(
    env: &HashMap<String, String>,
    file_mqtt_url: Option<&str>,
    errors: &Errors,
) -> EnvLayer {
    let mut layer = EnvLayer::new(SEED_LAYER);
    let set = |var: &str| env.get(var).filter(|v| !v.is_empty());
    for (var, path) in SEED_VARS {
        if let Some(value) = set(var) {
            let path: Vec<String> = path.split('.').map(str::to_string).collect();
            if let Err(e) = layer.insert(&path, value, var) {
                errors.push(var_error(var, &path.join("."), e));
            }
        }
    }

    let broker = set("MQTT_BROKER");
    let port = set("MQTT_PORT");
    if broker.is_none() && port.is_none() {
        return layer;
    }
    let base = file_mqtt_url
        .and_then(|u| BrokerAddress::parse(u).ok())
        .unwrap_or_default();
    let mut ok = true;
    let host = match broker {
        Some(b) if b.contains("://") => {
            // Redacted: a URL may carry a password (spec §8).
            errors.push(var_error(
                "MQTT_BROKER",
                "mqtt.url",
                format!(
                    "expected a host name, found a URL {:?}; put URLs in {PREFIX}MQTT__URL",
                    super::redact_url(b)
                ),
            ));
            ok = false;
            String::new()
        }
        Some(b) if b.contains('@') => {
            errors.push(var_error(
                "MQTT_BROKER",
                "mqtt.url",
                format!(
                    "expected a host name, found user info {:?}; set MQTT_USERNAME and \
                     MQTT_PASSWORD instead",
                    super::redact_url(b)
                ),
            ));
            ok = false;
            String::new()
        }
        Some(b) => b.trim().to_string(),
        None => base.host.clone(),
    };
    let port = match port {
        Some(p) => match p.trim().parse::<u16>() {
            Ok(n) if n > 0 => n,
            _ => {
                errors.push(var_error(
                    "MQTT_PORT",
                    "mqtt.url",
                    format!("expected a port number 1..=65535, found {p:?}"),
                ));
                ok = false;
                0
            }
        },
        None => base.port,
    };
    if ok {
        let address = BrokerAddress {
            tls: base.tls,
            host,
            port,
        };
        let vars: Vec<&str> = [("MQTT_BROKER", broker), ("MQTT_PORT", set("MQTT_PORT"))]
            .iter()
            .filter(|(_, v)| v.is_some())
            .map(|(n, _)| *n)
            .collect();
        let vars = vars.join("/");
        let path = ["mqtt".to_string(), "url".to_string()];
        if let Err(e) = layer.insert(&path, &address.to_url(), &vars) {
            errors.push(var_error(&vars, "mqtt.url", e));
        }
    }
    layer
}

/// `ROUTEMQ_BRIDGE_<KEY>[__<KEY>...]`: the highest layer. Keys are lower-cased; single `_`
/// stays part of a key (`ROUTEMQ_BRIDGE_MQTT__KEEP_ALIVE` → `mqtt.keep_alive`). Unlike the
/// seed's variables, an empty value is a value (`share_group = ""`).
pub(crate) fn prefix_layer(env: &HashMap<String, String>, errors: &Errors) -> EnvLayer {
    let mut layer = EnvLayer::new(PREFIX_LAYER);
    // Sorted, so errors come out in the same order on every run.
    let mut vars: Vec<(&String, &String)> = env
        .iter()
        .filter(|(k, _)| k.starts_with(PREFIX) && k.as_str() != CONFIG_VAR)
        .collect();
    vars.sort();
    for (var, value) in vars {
        let path: Vec<String> = var[PREFIX.len()..]
            .split("__")
            .map(str::to_ascii_lowercase)
            .collect();
        let dotted = path.join(".");
        if path.iter().any(String::is_empty) {
            errors.push(var_error(
                var,
                &dotted,
                format!("malformed name: separate nested keys with `__`, e.g. {PREFIX}MQTT__URL"),
            ));
            continue;
        }
        if path[0] == "routes" || path[0] == "republish" {
            errors.push(var_error(
                var,
                &dotted,
                "routes and republish rules can only be defined in the config file",
            ));
            continue;
        }
        if let Err(e) = layer.insert(&path, value, var) {
            errors.push(var_error(var, &dotted, e));
        }
    }
    layer
}
