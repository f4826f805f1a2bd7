//! One test per promised behaviour of the loader (spec §3, §4).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tempfile::TempDir;

use super::*;
use crate::config::{read_seed_env, reader, ConfigError, LogFormat, Secret, CREDENTIALS_DIRECTORY};
use crate::mqtt::config::Protocol;

/// A config file in a fresh directory; the directory lives as long as the guard.
fn file(toml: &str) -> (TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("bridge.toml");
    std::fs::write(&path, toml).expect("write config");
    (dir, path)
}

fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn load(toml: &str, pairs: &[(&str, &str)]) -> BridgeConfig {
    let (_dir, path) = file(toml);
    match BridgeConfig::load_with_env(&path, &env(pairs)) {
        Ok(c) => c,
        Err(e) => panic!("expected a valid config, got:\n{e}"),
    }
}

/// The errors of a config that must not load, and the file's path for matching sources.
fn errors(toml: &str, pairs: &[(&str, &str)]) -> (Vec<ConfigError>, String) {
    let (_dir, path) = file(toml);
    match BridgeConfig::load_with_env(&path, &env(pairs)) {
        Ok(c) => panic!("expected errors, loaded {c:?}"),
        Err(e) => (e.into_vec(), path.display().to_string()),
    }
}

fn redis_env(pairs: &[(&str, &str)]) -> RedisConfig {
    RedisConfig::from_env_map(&env(pairs)).expect("valid environment")
}

// --- §3 variables ---------------------------------------------------------------------

#[test]
fn redis_host_variable_sets_host() {
    assert_eq!(
        load("", &[("REDIS_HOST", "redis.lan")]).redis.host,
        "redis.lan"
    );
}

#[test]
fn redis_port_variable_sets_port() {
    assert_eq!(load("", &[("REDIS_PORT", "6380")]).redis.port, 6380);
}

#[test]
fn redis_db_variable_sets_db() {
    assert_eq!(load("", &[("REDIS_DB", "3")]).redis.db, 3);
}

#[test]
fn redis_username_variable_sets_username() {
    let c = load("", &[("REDIS_USERNAME", "bridge")]);
    assert_eq!(c.redis.username.as_deref(), Some("bridge"));
}

#[test]
fn redis_password_variable_sets_password() {
    let c = load("", &[("REDIS_PASSWORD", "s3cret")]);
    assert_eq!(
        c.redis.password.as_ref().map(Secret::expose),
        Some("s3cret")
    );
}

#[test]
fn redis_password_of_digits_stays_a_string() {
    let c = load("", &[("REDIS_PASSWORD", "007123456")]);
    assert_eq!(
        c.redis.password.as_ref().map(Secret::expose),
        Some("007123456")
    );
}

#[test]
fn prefixed_password_of_digits_stays_a_string() {
    let c = load("", &[("ROUTEMQ_BRIDGE_MQTT__PASSWORD", "000123")]);
    assert_eq!(c.mqtt.password.as_ref().map(Secret::expose), Some("000123"));
}

#[test]
fn redis_max_connections_variable_sets_max_connections() {
    assert_eq!(
        load("", &[("REDIS_MAX_CONNECTIONS", "25")])
            .redis
            .max_connections,
        25
    );
}

#[test]
fn redis_socket_timeout_variable_is_seconds_with_fraction() {
    let c = load("", &[("REDIS_SOCKET_TIMEOUT", "2.5")]);
    assert_eq!(c.redis.socket_timeout, Duration::from_millis(2500));
    let c = load("", &[("REDIS_SOCKET_TIMEOUT", "5.0")]);
    assert_eq!(c.redis.socket_timeout, Duration::from_secs(5));
}

#[test]
fn redis_socket_connect_timeout_variable_sets_connect_timeout() {
    let c = load("", &[("REDIS_SOCKET_CONNECT_TIMEOUT", "1.5")]);
    assert_eq!(c.redis.socket_connect_timeout, Duration::from_millis(1500));
}

#[test]
fn redis_url_variable_sets_url() {
    let c = load("", &[("REDIS_URL", "rediss://:pw@redis.lan:6380/2")]);
    assert_eq!(
        c.redis.url.as_ref().map(Secret::expose),
        Some("rediss://:pw@redis.lan:6380/2")
    );
}

#[test]
fn enable_redis_yes_enables() {
    let c = load("[redis]\nenabled = false\n", &[("ENABLE_REDIS", "yes")]);
    assert!(c.redis.enabled);
}

#[test]
fn enable_redis_off_zero_no_false_disable_in_any_case() {
    for value in ["OFF", "0", "no", "False", "oFf"] {
        let c = load("", &[("ENABLE_REDIS", value)]);
        assert!(!c.redis.enabled, "ENABLE_REDIS={value} should disable");
    }
}

#[test]
fn enable_redis_garbage_is_an_error_naming_the_variable() {
    let (errs, _) = errors("", &[("ENABLE_REDIS", "maybe")]);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(errs[0].source, "environment variable ENABLE_REDIS");
    assert_eq!(errs[0].path, "redis.enabled");
    assert!(errs[0].message.contains("\"maybe\""), "{}", errs[0].message);
}

#[test]
fn empty_seed_variable_counts_as_unset() {
    let c = load(
        "[redis]\nport = 6390\n",
        &[("REDIS_PORT", ""), ("REDIS_PASSWORD", "")],
    );
    assert_eq!(c.redis.port, 6390);
    assert!(c.redis.password.is_none());
}

#[test]
fn defaults_apply_to_an_empty_file() {
    let c = load("", &[]);
    assert!(c.redis.enabled);
    assert_eq!(c.redis.host, "localhost");
    assert_eq!(c.redis.port, 6379);
    assert_eq!(c.redis.max_connections, 10);
    assert_eq!(c.redis.socket_timeout, Duration::from_secs(5));
    assert_eq!(c.mqtt.url, "mqtt://127.0.0.1:1883");
    assert_eq!(c.http.listen.to_string(), "127.0.0.1:9883");
    assert_eq!(c.limits.max_inflight, 1000);
    assert_eq!(c.limits.max_payload, 256 * 1024);
    assert_eq!(c.limits.shutdown_timeout, Duration::from_secs(10));
    assert_eq!(c.log.level, "info");
    assert_eq!(c.log.format, LogFormat::Auto);
    assert_eq!(c.dead_letter.redis_list, "routemq-bridge:dead_letter");
    assert_eq!(c.dead_letter.max_len, 10_000);
    assert!(c.routes.is_empty() && c.republish.is_empty());
}

// --- precedence -----------------------------------------------------------------------

#[test]
fn precedence_is_file_then_redis_variables_then_prefixed_variables() {
    let toml = "[redis]\nhost = \"from-file\"\nport = 7000\ndb = 1\n";
    let c = load(toml, &[]);
    assert_eq!(
        (c.redis.host.as_str(), c.redis.port, c.redis.db),
        ("from-file", 7000, 1)
    );

    let c = load(toml, &[("REDIS_HOST", "from-seed"), ("REDIS_PORT", "7001")]);
    assert_eq!(
        (c.redis.host.as_str(), c.redis.port, c.redis.db),
        ("from-seed", 7001, 1)
    );

    let c = load(
        toml,
        &[
            ("REDIS_HOST", "from-seed"),
            ("REDIS_PORT", "7001"),
            ("ROUTEMQ_BRIDGE_REDIS__HOST", "from-prefix"),
        ],
    );
    assert_eq!(
        (c.redis.host.as_str(), c.redis.port, c.redis.db),
        ("from-prefix", 7001, 1)
    );
}

#[test]
fn prefixed_variable_with_underscores_in_key_nests_on_double_underscore() {
    let c = load("", &[("ROUTEMQ_BRIDGE_LIMITS__MAX_INFLIGHT", "42")]);
    assert_eq!(c.limits.max_inflight, 42);
}

#[test]
fn mqtt_broker_and_port_replace_host_and_port_keeping_the_scheme() {
    let c = load(
        "[mqtt]\nurl = \"mqtts://old:8883\"\n",
        &[("MQTT_BROKER", "broker.lan"), ("MQTT_PORT", "9883")],
    );
    assert_eq!(c.mqtt.url, "mqtts://broker.lan:9883");
    let c = load("", &[("MQTT_BROKER", "broker.lan")]);
    assert_eq!(c.mqtt.url, "mqtt://broker.lan:1883");
    let c = load("", &[("MQTT_PORT", "1884")]);
    assert_eq!(c.mqtt.url, "mqtt://127.0.0.1:1884");
}

#[test]
fn mqtt_seed_variables_set_credentials_client_id_and_share_group() {
    let c = load(
        "",
        &[
            ("MQTT_USERNAME", "gw"),
            ("MQTT_PASSWORD", "123456"),
            ("MQTT_CLIENT_ID", "gw-7"),
            ("MQTT_GROUP_NAME", "bridges"),
        ],
    );
    assert_eq!(c.mqtt.username.as_deref(), Some("gw"));
    assert_eq!(c.mqtt.password.as_ref().map(Secret::expose), Some("123456"));
    assert_eq!(c.mqtt.client_id, "gw-7");
    assert_eq!(c.mqtt.share_group, "bridges");
}

#[test]
fn prefixed_mqtt_url_beats_mqtt_broker() {
    let c = load(
        "",
        &[
            ("MQTT_BROKER", "seed-host"),
            ("ROUTEMQ_BRIDGE_MQTT__URL", "mqtts://prefix-host:8884"),
        ],
    );
    assert_eq!(c.mqtt.url, "mqtts://prefix-host:8884");
}

#[test]
fn bad_mqtt_port_variable_is_an_error_naming_it() {
    let (errs, _) = errors("", &[("MQTT_PORT", "eighty")]);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(errs[0].source, "environment variable MQTT_PORT");
    assert_eq!(errs[0].path, "mqtt.url");
}

#[test]
fn config_path_variable_is_not_a_key() {
    let c = load(
        "",
        &[("ROUTEMQ_BRIDGE_CONFIG", "/etc/routemq-bridge/bridge.toml")],
    );
    assert_eq!(c.mqtt.url, "mqtt://127.0.0.1:1883");
}

// --- errors ---------------------------------------------------------------------------

#[test]
fn unknown_key_in_file_names_key_path_and_file_with_a_suggestion() {
    let (errs, path) = errors("[limits]\nmax_inflihgt = 5\n", &[]);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(errs[0].source, path);
    assert_eq!(errs[0].path, "limits.max_inflihgt");
    assert!(
        errs[0].message.contains("unknown key"),
        "{}",
        errs[0].message
    );
    assert!(
        errs[0].message.contains("max_inflight"),
        "{}",
        errs[0].message
    );
}

#[test]
fn unknown_top_level_section_is_an_error() {
    let (errs, path) = errors("[mqqt]\nurl = \"mqtt://x\"\n", &[]);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(
        (errs[0].source.as_str(), errs[0].path.as_str()),
        (path.as_str(), "mqqt")
    );
    assert!(errs[0].message.contains("`mqtt`"), "{}", errs[0].message);
}

#[test]
fn bad_port_in_file_names_key_path_and_file() {
    let (errs, path) = errors("[redis]\nport = 70000\n", &[]);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(errs[0].source, path);
    assert_eq!(errs[0].path, "redis.port");
    assert!(errs[0].message.contains("70000"), "{}", errs[0].message);
}

#[test]
fn bad_redis_port_variable_names_the_variable() {
    let (errs, _) = errors("", &[("REDIS_PORT", "0")]);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(errs[0].source, "environment variable REDIS_PORT");
    assert_eq!(errs[0].path, "redis.port");
}

#[test]
fn unknown_prefixed_variable_is_an_error_naming_it() {
    let (errs, _) = errors("", &[("ROUTEMQ_BRIDGE_REDIS__HOSTNAME", "x")]);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(
        errs[0].source,
        "environment variable ROUTEMQ_BRIDGE_REDIS__HOSTNAME"
    );
    assert_eq!(errs[0].path, "redis.hostname");
    assert!(
        errs[0].message.contains("unknown key"),
        "{}",
        errs[0].message
    );
}

#[test]
fn unknown_prefixed_section_names_the_variable() {
    let (errs, _) = errors("", &[("ROUTEMQ_BRIDGE_METRICS__PORT", "1")]);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(
        errs[0].source,
        "environment variable ROUTEMQ_BRIDGE_METRICS__PORT"
    );
    assert_eq!(errs[0].path, "metrics");
}

#[test]
fn bad_prefixed_variable_value_names_the_variable() {
    let (errs, _) = errors("", &[("ROUTEMQ_BRIDGE_REDIS__PORT", "http")]);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(
        errs[0].source,
        "environment variable ROUTEMQ_BRIDGE_REDIS__PORT"
    );
    assert_eq!(errs[0].path, "redis.port");
}

#[test]
fn all_type_key_and_range_errors_are_reported_together() {
    let toml = r#"
        [mqtt]
        url = "http://broker"
        keep_alive = "soon"
        [redis]
        port = "x"
        colour = "blue"
        [limits]
        max_payload = "lots"
        [log]
        format = "xml"
    "#;
    let (errs, _) = errors(toml, &[("REDIS_DB", "-1"), ("ROUTEMQ_BRIDGE_NOPE", "1")]);
    let paths: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
    for expected in [
        "mqtt.url",
        "mqtt.keep_alive",
        "redis.port",
        "redis.colour",
        "redis.db",
        "limits.max_payload",
        "log.format",
        "nope",
    ] {
        assert!(
            paths.contains(&expected),
            "{expected} missing from {paths:?}"
        );
    }
    assert_eq!(errs.len(), 8, "{errs:#?}");
}

#[test]
fn errors_display_one_per_line_as_source_path_message() {
    let (_dir, path) = file("[redis]\nport = 0\n");
    let err =
        BridgeConfig::load_with_env(&path, &env(&[("REDIS_DB", "x")])).expect_err("two errors");
    let text = err.to_string();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    // In reading order: [redis] reads port before db.
    assert!(
        lines[0].starts_with(&format!("{}: redis.port: ", path.display())),
        "{text}"
    );
    assert!(
        lines[1].starts_with("environment variable REDIS_DB: redis.db: "),
        "{text}"
    );
}

#[test]
fn toml_syntax_error_stops_with_file_and_line() {
    let (errs, path) = errors("[redis]\nport = 6379\nhost = \n", &[("REDIS_PORT", "x")]);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(errs[0].source, path);
    assert!(errs[0].message.contains("line 3"), "{}", errs[0].message);
    assert!(
        !errs[0].message.contains('\n'),
        "one line: {}",
        errs[0].message
    );
}

#[test]
fn missing_file_is_an_error_naming_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("absent.toml");
    let err = BridgeConfig::load_with_env(&path, &HashMap::new()).expect_err("missing file");
    let errs = err.into_vec();
    assert_eq!(errs[0].source, path.display().to_string());
    assert!(
        errs[0].message.contains("cannot read"),
        "{}",
        errs[0].message
    );
}

#[test]
fn mqtt_url_must_be_mqtt_or_mqtts() {
    let (errs, _) = errors("[mqtt]\nurl = \"tcp://broker:1883\"\n", &[]);
    assert_eq!(errs[0].path, "mqtt.url");
    assert!(errs[0].message.contains("mqtt://"), "{}", errs[0].message);
}

#[test]
fn redis_url_must_be_redis_or_rediss_and_error_hides_it() {
    let (errs, _) = errors("", &[("REDIS_URL", "http://:hunter2@redis:6379")]);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(errs[0].path, "redis.url");
    assert!(!errs[0].message.contains("hunter2"), "{}", errs[0].message);
}

#[test]
fn max_packet_size_must_exceed_max_payload() {
    let (errs, path) = errors("[mqtt]\nmax_packet_size = \"64KiB\"\n", &[]);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(
        (errs[0].source.as_str(), errs[0].path.as_str()),
        (path.as_str(), "mqtt.max_packet_size")
    );
}

#[test]
fn tls_files_need_an_mqtts_url() {
    let (errs, _) = errors("[mqtt]\nca_file = \"ca.pem\"\n", &[]);
    assert_eq!(errs[0].path, "mqtt.ca_file");
}

#[test]
fn share_group_may_not_hold_topic_separators() {
    let (errs, _) = errors("", &[("MQTT_GROUP_NAME", "a/b")]);
    assert_eq!(errs[0].source, "environment variable MQTT_GROUP_NAME");
    assert_eq!(errs[0].path, "mqtt.share_group");
}

// --- value syntax ---------------------------------------------------------------------

#[test]
fn durations_are_humane_strings_or_seconds() {
    let c = load(
        r#"
        [mqtt]
        keep_alive = 45
        reconnect_max_delay = "250ms"
        [redis]
        socket_timeout = 1.5
        socket_connect_timeout = "1h 30m"
        [limits]
        shutdown_timeout = "24h"
        "#,
        &[],
    );
    assert_eq!(c.mqtt.keep_alive, Duration::from_secs(45));
    assert_eq!(c.mqtt.reconnect_max_delay, Duration::from_millis(250));
    assert_eq!(c.redis.socket_timeout, Duration::from_millis(1500));
    assert_eq!(c.redis.socket_connect_timeout, Duration::from_secs(5400));
    assert_eq!(c.limits.shutdown_timeout, Duration::from_secs(86_400));
}

#[test]
fn a_duration_beyond_ten_years_is_an_error_naming_its_key() {
    for (toml, path) in [
        (
            "[limits]\nshutdown_timeout = \"11y\"\n",
            "limits.shutdown_timeout",
        ),
        ("[redis]\nsocket_timeout = 1e12\n", "redis.socket_timeout"),
        (
            "[mqtt]\nreconnect_max_delay = \"100000d\"\n",
            "mqtt.reconnect_max_delay",
        ),
    ] {
        let (errs, _) = errors(toml, &[]);
        assert_eq!(errs.len(), 1, "{toml}: {errs:?}");
        assert_eq!(errs[0].path, path);
        assert!(
            errs[0].message.contains("at most 10 years"),
            "{}",
            errs[0].message
        );
    }
    let c = load("[limits]\nshutdown_timeout = \"3650d\"\n", &[]);
    assert_eq!(
        c.limits.shutdown_timeout,
        crate::config::reader::MAX_DURATION,
        "the cap itself is allowed"
    );
}

#[test]
fn a_dedup_lease_beyond_the_cap_is_an_error_naming_its_key() {
    let (_dir, path) = file(
        r#"
[[routes]]
name = "r"
topic = "t/{id}"
[routes.dedup]
key = "d:{id}"
lease = "20y"
[[routes.actions]]
op = "set"
key = "k:{id}"
"#,
    );
    let errs = match BridgeConfig::compile(&path, &env(&[])) {
        Ok(_) => panic!("a 20-year lease compiled"),
        Err(e) => e.into_vec(),
    };
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(errs[0].path.ends_with("dedup.lease"), "{}", errs[0].path);
    assert!(
        errs[0].message.contains("at most 10 years"),
        "{}",
        errs[0].message
    );
}

#[test]
fn cluster_nodes_the_client_would_refuse_are_a_config_error() {
    let (errs, _) = errors(
        "[redis]\ncluster = [\"redis://n1:7000\", \"rediss://n2:7000\"]\n",
        &[],
    );
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(errs[0].path, "redis.cluster");
    assert!(errs[0].message.contains("TLS"), "{}", errs[0].message);
}

/// The (path, message) of every error of a config whose routes and rules are compiled.
fn compile_errors(toml: &str) -> Vec<(String, String)> {
    let (_dir, path) = file(toml);
    match BridgeConfig::compile(&path, &env(&[])) {
        Ok(_) => panic!("expected errors, compiled:\n{toml}"),
        Err(e) => e
            .into_vec()
            .into_iter()
            .map(|e| (e.path, e.message))
            .collect(),
    }
}

#[test]
fn mqtt_5_is_chosen_by_protocol_in_the_file_or_the_environment() {
    for (toml, env) in [
        ("[mqtt]\nprotocol = \"5\"\n", &[][..]),
        ("", &[("ROUTEMQ_BRIDGE_MQTT__PROTOCOL", "5")][..]),
    ] {
        let c = load(toml, env);
        assert_eq!(c.mqtt.protocol, Protocol::V5);
        assert_eq!(c.mqtt.session_expiry, Duration::from_secs(7 * 24 * 3600));
    }
    let c = load("[mqtt]\nprotocol = \"5\"\nsession_expiry = \"1h\"\n", &[]);
    assert_eq!(c.mqtt.session_expiry, Duration::from_secs(3600));
}

/// A route and a republish rule using every MQTT 5 key (spec §6.1).
const MQTT5_KEYS: &str = r#"
[[routes]]
name = "r"
topic = "t/{id}"
honor_expiry = false
params."user.tenant" = "[a-z]+"
[[routes.actions]]
op = "hset"
key = "k:{user.tenant}:{id}"
fields = { ct = "{prop.content_type}", rt = "{prop.response_topic}", cd = "{prop.correlation_data}" }
[[routes.actions]]
op = "mqtt_publish"
topic = "out/{id}"
content_type = "application/json"
message_expiry = "30s"
user_properties = { tenant = "{user.tenant}" }
response_topic = "reply/{id}"
correlation_data = "{prop.correlation_data}"

[[republish]]
name = "s"
source = "stream"
stream = "out"
topic = "cmd/{field.site}"
content_type = "text/plain"
user_properties = { site = "{field.site}" }
"#;

#[test]
fn every_mqtt_5_key_compiles_with_protocol_5() {
    let (_dir, path) = file(&format!("[mqtt]\nprotocol = \"5\"\n{MQTT5_KEYS}"));
    if let Err(e) = BridgeConfig::compile(&path, &env(&[])) {
        panic!("expected a valid config, got:\n{e}");
    }
}

#[test]
fn every_mqtt_5_key_under_3_1_1_is_an_error_saying_why() {
    let errs = compile_errors(MQTT5_KEYS);
    for path in [
        "routes[0].honor_expiry",
        "routes[0].params.user.tenant",
        "routes[0].actions[0].key",
        "routes[0].actions[0].fields.ct",
        "routes[0].actions[1].content_type",
        "routes[0].actions[1].message_expiry",
        "routes[0].actions[1].user_properties",
        "routes[0].actions[1].response_topic",
        "routes[0].actions[1].correlation_data",
        "republish[0].content_type",
        "republish[0].user_properties",
    ] {
        let found = errs.iter().find(|(p, _)| p.starts_with(path));
        let Some((_, message)) = found else {
            panic!("no error at {path}: {errs:?}");
        };
        assert!(
            message.contains("MQTT 5") || message.contains("protocol = \"5\""),
            "{path}: {message}"
        );
    }
}

#[test]
fn session_expiry_and_clean_session_each_belong_to_one_protocol() {
    let (errs, _) = errors("[mqtt]\nsession_expiry = \"1h\"\n", &[]);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(errs[0].path, "mqtt.session_expiry");
    assert!(errs[0].message.contains("MQTT 5"), "{}", errs[0].message);
    let (errs, _) = errors("[mqtt]\nprotocol = \"5\"\nclean_session = true\n", &[]);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(errs[0].path, "mqtt.clean_session");
    assert!(
        errs[0].message.contains("session_expiry"),
        "{}",
        errs[0].message
    );
}

#[test]
fn sizes_are_unit_strings_or_bytes() {
    let c = load(
        "[mqtt]\nmax_packet_size = \"2MiB\"\n[limits]\nmax_payload = \"256KiB\"\n",
        &[],
    );
    assert_eq!(c.mqtt.max_packet_size, 2 * 1024 * 1024);
    assert_eq!(c.limits.max_payload, 256 * 1024);
    let c = load(
        "[limits]\nmax_payload = 1000\n",
        &[("ROUTEMQ_BRIDGE_MQTT__MAX_PACKET_SIZE", "1MB")],
    );
    assert_eq!(c.limits.max_payload, 1000);
    assert_eq!(c.mqtt.max_packet_size, 1_000_000);
}

#[test]
fn booleans_in_the_file_accept_strings_too() {
    let c = load("[mqtt]\nclean_session = \"On\"\n", &[]);
    assert!(c.mqtt.clean_session);
}

#[test]
fn numbers_from_prefixed_variables_parse() {
    let c = load(
        "",
        &[
            ("ROUTEMQ_BRIDGE_DEAD_LETTER__MAX_LEN", "500"),
            ("ROUTEMQ_BRIDGE_HTTP__LISTEN", "[::]:9000"),
            ("ROUTEMQ_BRIDGE_LOG__FORMAT", "json"),
            ("ROUTEMQ_BRIDGE_MQTT__PROTOCOL", "4"),
        ],
    );
    assert_eq!(c.dead_letter.max_len, 500);
    assert_eq!(c.http.listen.to_string(), "[::]:9000");
    assert_eq!(c.log.format, LogFormat::Json);
    assert_eq!(c.mqtt.protocol, Protocol::V311);
}

#[test]
fn cluster_nodes_come_from_an_array_or_a_comma_list() {
    let c = load(
        "[redis]\ncluster = [\"redis://n1:7000\", \"redis://n2:7000\"]\n",
        &[],
    );
    assert_eq!(c.redis.cluster.len(), 2);
    let c = load(
        "",
        &[(
            "ROUTEMQ_BRIDGE_REDIS__CLUSTER",
            "redis://n1:7000, redis://n2:7000",
        )],
    );
    let nodes: Vec<&str> = c.redis.cluster.iter().map(|n| n.expose()).collect();
    assert_eq!(nodes, ["redis://n1:7000", "redis://n2:7000"]);
}

// --- secrets --------------------------------------------------------------------------

#[test]
fn password_file_is_read_and_its_trailing_newline_trimmed() {
    let (dir, path) = file("[redis]\npassword_file = \"redis.pw\"\n");
    std::fs::write(dir.path().join("redis.pw"), "123456\n").expect("write secret");
    let c = BridgeConfig::load_with_env(&path, &HashMap::new()).expect("valid");
    assert_eq!(
        c.redis.password.as_ref().map(Secret::expose),
        Some("123456")
    );
}

#[test]
fn unreadable_password_file_is_an_error_naming_the_key() {
    let (errs, path) = errors("[mqtt]\npassword_file = \"/nonexistent/pw\"\n", &[]);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(
        (errs[0].source.as_str(), errs[0].path.as_str()),
        (path.as_str(), "mqtt.password_file")
    );
}

#[test]
fn password_and_password_file_in_one_place_is_an_error() {
    let (errs, _) = errors("[redis]\npassword = \"a\"\npassword_file = \"b\"\n", &[]);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(errs[0].path, "redis.password_file");
}

#[test]
fn password_variable_overrides_password_file_from_the_file() {
    let c = load(
        "[redis]\npassword_file = \"/nonexistent\"\n",
        &[("REDIS_PASSWORD", "from-env")],
    );
    assert_eq!(
        c.redis.password.as_ref().map(Secret::expose),
        Some("from-env")
    );
}

#[test]
fn relative_password_file_resolves_in_credentials_directory() {
    let creds = tempfile::tempdir().expect("temp dir");
    std::fs::write(creds.path().join("mqtt.pw"), "cred-pw\n").expect("write secret");
    let c = load(
        "[mqtt]\npassword_file = \"mqtt.pw\"\n",
        &[(CREDENTIALS_DIRECTORY, creds.path().to_str().expect("utf-8"))],
    );
    assert_eq!(
        c.mqtt.password.as_ref().map(Secret::expose),
        Some("cred-pw")
    );
}

#[test]
fn credential_named_redis_password_is_used_when_none_is_configured() {
    let creds = tempfile::tempdir().expect("temp dir");
    std::fs::write(creds.path().join("redis_password"), "from-systemd\n").expect("write");
    let dir = creds.path().to_str().expect("utf-8");
    let c = load("", &[(CREDENTIALS_DIRECTORY, dir)]);
    assert_eq!(
        c.redis.password.as_ref().map(Secret::expose),
        Some("from-systemd")
    );
    assert!(c.mqtt.password.is_none());
    let c = load(
        "",
        &[(CREDENTIALS_DIRECTORY, dir), ("REDIS_PASSWORD", "explicit")],
    );
    assert_eq!(
        c.redis.password.as_ref().map(Secret::expose),
        Some("explicit")
    );
}

#[test]
fn debug_output_never_contains_passwords() {
    let c = load(
        "",
        &[
            ("REDIS_PASSWORD", "hunter2-redis"),
            ("REDIS_URL", "redis://:hunter2-url@localhost:6379"),
            ("MQTT_PASSWORD", "hunter2-mqtt"),
        ],
    );
    let debug = format!("{c:?}");
    assert!(!debug.contains("hunter2"), "{debug}");
}

#[test]
fn cluster_node_urls_print_redacted() {
    let c = load("[redis]\ncluster = [\"redis://:hunter2@n1:7000\"]\n", &[]);
    let debug = format!("{:?}", c.redis);
    assert!(
        debug.contains("<redacted>") && !debug.contains("hunter2"),
        "{debug}"
    );
}

/// Every error about a URL that carries a password, from every place a URL comes from.
#[test]
fn url_errors_never_print_the_password() {
    let bad_file = [
        "[mqtt]\nurl = \"mqtt://u:hunter2@h:notaport\"\n",
        "[mqtt]\nurl = \"mqtts://u:hunter2@h:8883\"\n",
        "[mqtt]\nurl = \"u:hunter2@h:1883\"\n",
        "[redis]\nurl = \"redis://:hunter2@h:notaport\"\n",
        "[redis]\nurl = \"redis:hunter2@h://x\"\n",
        "[redis]\ncluster = [\"redis://:hunter2@h:notaport\"]\n",
        "[redis]\ncluster = [\"redis:hunter2@h://x\"]\n",
    ];
    let bad_env = [
        ("MQTT_BROKER", "mqtt://u:hunter2@h"),
        ("MQTT_BROKER", "u:hunter2@h"),
        ("ROUTEMQ_BRIDGE_MQTT__URL", "mqtt://u:hunter2@h:notaport"),
        ("REDIS_URL", "redis://:hunter2@h:notaport"),
        ("ROUTEMQ_BRIDGE_REDIS__URL", "redis://:hunter2@h:notaport"),
        (
            "ROUTEMQ_BRIDGE_REDIS__CLUSTER",
            "redis://:hunter2@h:notaport",
        ),
    ];
    let cases = bad_file
        .iter()
        .map(|toml| errors(toml, &[]))
        .chain(bad_env.iter().map(|var| errors("", &[*var])));
    for (errs, _) in cases {
        let text = format!("{errs:?}");
        assert!(!text.contains("hunter2"), "{text}");
    }
    // The operator still learns which URL it was, and what to do.
    let (errs, _) = errors("[mqtt]\nurl = \"mqtt://u:hunter2@h:1883\"\n", &[]);
    assert!(
        errs[0].message.contains("\"mqtt://<redacted>@h:1883\"")
            && errs[0].message.contains("mqtt.username"),
        "{}",
        errs[0].message
    );
}

// --- routes and the example ------------------------------------------------------------

#[test]
fn routes_and_republish_are_kept_raw_with_their_index_paths() {
    let c = load(
        r#"
        [[routes]]
        name = "a"
        anything = { goes = 1 }
        [[routes]]
        name = "b"
        [[republish]]
        name = "r"
        "#,
        &[],
    );
    let paths: Vec<&str> = c.routes.iter().map(RawTable::path).collect();
    assert_eq!(paths, ["routes[0]", "routes[1]"]);
    assert_eq!(c.republish[0].path(), "republish[0]");

    // The route code reads them with the same reader, and its errors carry the path.
    let errs = reader::Errors::new();
    let mut t = c.routes[1].reader(&errs);
    assert_eq!(t.string("name", ""), "b");
    let _ = t.get::<u16>("qos");
    t.ignore("name");
    let mut actions = t.tables("actions");
    assert!(actions.is_empty());
    actions.clear();
    t.finish();
    assert!(errs.is_empty());

    let errs = reader::Errors::new();
    let mut t = c.routes[0].reader(&errs);
    let _ = t.get::<u16>("name");
    t.finish();
    let errs = errs.finish(()).expect_err("two errors").into_vec();
    assert_eq!(errs[0].path, "routes[0].name");
    assert_eq!(errs[1].path, "routes[0].anything");
}

#[test]
fn routes_cannot_come_from_the_environment() {
    let (errs, _) = errors("", &[("ROUTEMQ_BRIDGE_ROUTES__NAME", "x")]);
    assert_eq!(
        errs[0].source,
        "environment variable ROUTEMQ_BRIDGE_ROUTES__NAME"
    );
}

#[test]
fn example_config_loads_cleanly() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/bridge.toml");
    let c = match BridgeConfig::load_with_env(&path, &HashMap::new()) {
        Ok(c) => c,
        Err(e) => panic!("config/bridge.toml:\n{e}"),
    };
    assert_eq!(c.mqtt.client_id, "routemq-bridge-gw1");
    assert_eq!(c.redis.host, "127.0.0.1");
}

#[test]
fn bridge_config_can_be_shared_across_tasks() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<BridgeConfig>();
}

// --- RedisConfig::from_env_map ----------------------------------------------------------

#[test]
fn redis_config_from_env_map_uses_seed_variables_over_defaults() {
    assert_eq!(redis_env(&[]), RedisConfig::default());
    let c = redis_env(&[
        ("REDIS_HOST", "h"),
        ("REDIS_PORT", "6400"),
        ("ENABLE_REDIS", "no"),
        ("MQTT_BROKER", "ignored"),
    ]);
    assert_eq!((c.host.as_str(), c.port, c.enabled), ("h", 6400, false));
}

#[test]
fn redis_config_from_env_map_reports_bad_variables() {
    let err = RedisConfig::from_env_map(&env(&[("REDIS_MAX_CONNECTIONS", "0")]))
        .expect_err("zero connections");
    assert_eq!(
        err.iter().next().map(|e| e.source.as_str()),
        Some("environment variable REDIS_MAX_CONNECTIONS")
    );
}

#[test]
fn the_redis_crate_reads_the_seed_variables_as_the_loader_does() {
    let credentials = tempfile::tempdir().expect("temp dir");
    std::fs::write(credentials.path().join("redis_password"), "s3cret\n").expect("write");
    let credentials = credentials.path().display().to_string();
    let cases: &[&[(&str, &str)]] = &[
        &[],
        &[("ENABLE_REDIS", "Off")],
        &[("ENABLE_REDIS", "maybe")],
        &[
            ("REDIS_HOST", "h"),
            ("REDIS_PORT", "6380"),
            ("REDIS_DB", "3"),
        ],
        &[("REDIS_HOST", "  ")],
        &[("REDIS_PORT", "0")],
        &[("REDIS_PORT", "x")],
        &[("REDIS_PORT", " 70000")],
        &[("REDIS_DB", "-1")],
        &[("REDIS_DB", "99999999999999999999")],
        &[("REDIS_USERNAME", "u"), ("REDIS_PASSWORD", "007")],
        &[("REDIS_PASSWORD", "")],
        &[("CREDENTIALS_DIRECTORY", &credentials)],
        &[
            ("CREDENTIALS_DIRECTORY", &credentials),
            ("REDIS_PASSWORD", "pw"),
        ],
        &[("REDIS_MAX_CONNECTIONS", "0")],
        &[("REDIS_MAX_CONNECTIONS", "-3")],
        &[
            ("REDIS_SOCKET_TIMEOUT", "5.0"),
            ("REDIS_SOCKET_CONNECT_TIMEOUT", "250ms"),
        ],
        &[("REDIS_SOCKET_TIMEOUT", "0")],
        &[("REDIS_SOCKET_TIMEOUT", "-1")],
        &[("REDIS_SOCKET_TIMEOUT", "100y")],
        &[("REDIS_SOCKET_CONNECT_TIMEOUT", "soon")],
        &[("REDIS_URL", "rediss://:pw@h:6380/2")],
        &[("REDIS_URL", "http://h")],
        &[("REDIS_URL", "pw@h://x")],
        &[("REDIS_URL", "redis://h:notaport")],
        &[
            ("REDIS_PORT", "1"),
            ("REDIS_DB", "x"),
            ("ENABLE_REDIS", "2"),
        ],
    ];
    for pairs in cases {
        let env = env(pairs);
        let loader = read_seed_env(&env, |root| crate::config::redis::read(root.table("redis")));
        let library = RedisConfig::from_env_map(&env);
        match (loader, library) {
            (Ok(a), Ok(b)) => assert_eq!(a, b, "{pairs:?}"),
            (Err(a), Err(b)) => {
                let a: Vec<String> = a.iter().map(ToString::to_string).collect();
                let b: Vec<String> = b.iter().map(ToString::to_string).collect();
                assert_eq!(a, b, "{pairs:?}");
            }
            (a, b) => panic!("{pairs:?}: the loader read {a:?}, the crate {b:?}"),
        }
    }
}

// --- warnings (spec §10) ---------------------------------------------------------------

/// The warnings of a config that loads: (key path, message) each.
fn warnings(toml: &str, pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    load(toml, pairs)
        .warnings
        .into_iter()
        .map(|w| (w.path, w.message))
        .collect()
}

#[test]
fn a_share_group_with_the_default_client_id_is_a_warning_naming_how_to_set_one() {
    for (toml, pairs) in [
        ("[mqtt]\nshare_group = \"bridges\"\n", &[][..]),
        ("", &[("MQTT_GROUP_NAME", "bridges")][..]),
        // Set explicitly to the default: every instance would still share it.
        (
            "[mqtt]\nshare_group = \"bridges\"\nclient_id = \"routemq-bridge\"\n",
            &[][..],
        ),
    ] {
        let found = warnings(toml, pairs);
        assert_eq!(found.len(), 1, "{toml:?} {pairs:?}: {found:?}");
        let (path, message) = &found[0];
        assert_eq!(path, "mqtt.client_id");
        for part in [
            "share_group",
            "MQTT_CLIENT_ID",
            "[mqtt] client_id",
            "operator",
        ] {
            assert!(message.contains(part), "{part:?} missing from {message:?}");
        }
    }
}

#[test]
fn a_share_group_with_a_client_id_of_its_own_is_no_warning() {
    assert_eq!(
        warnings("[mqtt]\nshare_group = \"g\"\nclient_id = \"gw-1\"\n", &[]),
        vec![]
    );
    assert_eq!(
        warnings(
            "[mqtt]\nshare_group = \"g\"\n",
            &[("MQTT_CLIENT_ID", "gw-2")]
        ),
        vec![]
    );
    // Without a share group the default id is what one bridge should use.
    assert_eq!(warnings("", &[]), vec![]);
}

#[test]
fn host_port_or_url_beside_a_cluster_is_a_warning_for_each() {
    let cluster = "[redis]\ncluster = [\"redis://n1:7000\", \"redis://n2:7000\"]\n";
    assert_eq!(warnings(cluster, &[]), vec![], "the seed list alone");

    let c = load(
        &format!("{cluster}host = \"redis.lan\"\nport = 6380\n"),
        &[("REDIS_URL", "redis://:hunter2@single:6379")],
    );
    let found: Vec<(&str, &str)> = c
        .warnings
        .iter()
        .map(|w| (w.path.as_str(), w.source.as_str()))
        .collect();
    assert_eq!(found.len(), 3, "{:?}", c.warnings);
    for key in ["redis.url", "redis.host", "redis.port"] {
        assert!(
            found.iter().any(|(path, _)| *path == key),
            "no warning for {key}: {found:?}"
        );
    }
    assert!(
        found.contains(&("redis.url", "environment variable REDIS_URL")),
        "blamed on the variable: {found:?}"
    );
    for w in &c.warnings {
        assert!(
            w.message
                .contains("is set but redis.cluster is used for data connections"),
            "{w}"
        );
        assert!(!w.to_string().contains("hunter2"), "no secret: {w}");
    }
}

#[test]
fn host_or_url_without_a_cluster_is_no_warning() {
    assert_eq!(
        warnings("[redis]\nhost = \"redis.lan\"\nport = 6380\n", &[]),
        vec![]
    );
    assert_eq!(
        warnings("", &[("REDIS_URL", "redis://single:6379")]),
        vec![]
    );
}

/// The warnings of a config whose routes and republish rules compile: (key path, message).
fn compiled_warnings(toml: &str) -> Vec<(String, String)> {
    let (_dir, path) = file(toml);
    match BridgeConfig::compile(&path, &env(&[])) {
        Ok((c, _)) => c
            .warnings
            .into_iter()
            .map(|w| (w.path, w.message))
            .collect(),
        Err(e) => panic!("expected a valid config, got:\n{e}"),
    }
}

#[test]
fn a_pubsub_republish_rule_in_a_share_group_is_a_warning_a_stream_rule_is_not() {
    let rules = r#"
[[republish]]
name = "commands"
source = "pubsub"
channel = "commands:{device_id}"
topic = "devices/{device_id}/commands"

[[republish]]
name = "alerts"
source = "stream"
stream = "alerts:out"
topic = "alerts/all"
"#;
    let found = compiled_warnings(&format!(
        "[mqtt]\nshare_group = \"g\"\nclient_id = \"gw-1\"\n{rules}"
    ));
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].0, "republish[0].source");
    assert!(
        found[0].1.contains("once per instance") && found[0].1.contains("stream"),
        "{}",
        found[0].1
    );
    // One bridge alone republishes each message once.
    assert_eq!(compiled_warnings(rules), vec![]);
}

// --- [spool] (spec §6.2) --------------------------------------------------------------

#[test]
fn no_spool_section_means_no_spool() {
    assert_eq!(load("", &[]).spool, None);
}

#[test]
fn the_spool_defaults_to_the_state_directory_and_the_spec_values() {
    let spool = load(
        "[spool]\n",
        &[("STATE_DIRECTORY", "/var/lib/routemq-bridge")],
    )
    .spool
    .expect("a spool");
    assert_eq!(spool.path, Path::new("/var/lib/routemq-bridge/spool.db"));
    assert_eq!(spool.max_size, 256 * 1024 * 1024);
    assert_eq!(spool.on_full, crate::spool::config::OnFull::Backpressure);
    assert_eq!(spool.fsync, crate::spool::config::Fsync::Batch);
    assert_eq!(spool.batch_window, Duration::from_millis(50));
    assert_eq!(spool.after, Duration::from_secs(5));
}

#[test]
fn spool_variables_override_the_file_and_can_turn_it_on() {
    let spool = load(
        "",
        &[
            ("ROUTEMQ_BRIDGE_SPOOL__PATH", "/data/spool.db"),
            ("ROUTEMQ_BRIDGE_SPOOL__ON_FULL", "drop_oldest"),
            ("ROUTEMQ_BRIDGE_SPOOL__MAX_SIZE", "1MiB"),
            ("ROUTEMQ_BRIDGE_SPOOL__AFTER", "30s"),
        ],
    )
    .spool
    .expect("a spool from the environment alone");
    assert_eq!(spool.path, Path::new("/data/spool.db"));
    assert_eq!(spool.on_full, crate::spool::config::OnFull::DropOldest);
    assert_eq!(spool.max_size, 1024 * 1024);
    assert_eq!(spool.after, Duration::from_secs(30));
}

#[test]
fn spool_errors_name_their_key_path() {
    let (errors, _) = errors(
        "[spool]\nmax_size = 100\nfsync = \"never\"\nbatch_window = \"0s\"\nwhat = 1\n",
        &[],
    );
    let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
    for key in [
        "spool.path",
        "spool.max_size",
        "spool.fsync",
        "spool.batch_window",
        "spool.what",
    ] {
        assert!(paths.contains(&key), "{key} in {paths:?}");
    }
}
