//! The whole configuration, assembled where the daemon is wired: every section read by the
//! component that owns it (`config` only knows how to read values and report errors), routes
//! and republish rules compiled in the same pass, so `check` lists every error at once.

use std::collections::HashMap;
use std::path::Path;

use crate::config::reader::{Errors, Table};
use crate::config::{
    self, ConfigErrors, ConfigWarning, HttpConfig, LimitsConfig, LogConfig, RawTable,
};
use crate::dead_letter::DeadLetterConfig;
use crate::mqtt::config::Protocol;
use crate::mqtt::MqttConfig;
use crate::redis::RedisConfig;
use crate::republish::{read_republish, warn_pubsub_in_share_group, RepublishRule};
use crate::router::config::{read_routes, RouteEnv};
use crate::router::route::RouteTable;
use crate::spool::SpoolConfig;

pub use crate::config::process_env;

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
    /// `[spool]`: `None` when the section is absent (no spool, spec §6.2).
    pub spool: Option<SpoolConfig>,
    /// `[[routes]]`, not yet read: the route code reads each with [`RawTable::reader`], so
    /// its errors carry paths like `routes[3].actions[0].key`.
    pub routes: Vec<RawTable>,
    /// `[[republish]]`, not yet read, like `routes`.
    pub republish: Vec<RawTable>,
    /// `[[republish]]` compiled: filled by [`BridgeConfig::compile`] (empty after `load`).
    pub republish_rules: Vec<RepublishRule>,
    /// Settings that load but are likely mistakes: `check` prints them, the daemon logs
    /// them at start-up.
    pub warnings: Vec<ConfigWarning>,
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
            let env = RouteEnv {
                redis_enabled: config.redis.enabled,
                cluster: !config.redis.cluster.is_empty(),
                mqtt5: config.mqtt.protocol == Protocol::V5,
            };
            let routes = read_routes(&config.routes, env, errors);
            let rules = read_republish(&config.republish, config.redis.enabled, env.mqtt5, errors);
            if !config.mqtt.share_group.is_empty() {
                warn_pubsub_in_share_group(&config.republish, &rules, errors);
            }
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
        config::load(path, env, |root, errors| {
            let state_directory = env.get("STATE_DIRECTORY").map(String::as_str);
            let mut config = BridgeConfig::read(root, state_directory);
            let extra = more(&config, errors);
            config.warnings = errors.take_warnings();
            (config, extra)
        })
    }

    fn read(mut t: Table<'_>, state_directory: Option<&str>) -> BridgeConfig {
        let mqtt = MqttConfig::read(t.table("mqtt"));
        let redis = config::redis::read(t.table("redis"));
        let http = HttpConfig::read(t.table("http"));
        let limits = LimitsConfig::read(t.table("limits"));
        let log = LogConfig::read(t.table("log"));
        let dead_letter = DeadLetterConfig::read(t.table("dead_letter"));
        let spool = t
            .opt_table("spool")
            .and_then(|s| SpoolConfig::read(s, state_directory));
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
            spool,
            routes,
            republish,
            republish_rules: Vec::new(),
            warnings: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests;
