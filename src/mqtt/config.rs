//! The `[mqtt]` table and RouteMQ's `MQTT_*` variables (spec §4).

use std::path::PathBuf;
use std::time::Duration;

use figment::value::Value;

use crate::config::reader::{found, FromValue, Table};
pub use crate::config::BrokerAddress;
use crate::config::Secret;

/// MQTT protocol version spoken to the broker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Protocol {
    #[default]
    V311,
    V5,
}

/// How to reach the broker and keep our session there.
#[derive(Clone, Debug, PartialEq)]
pub struct MqttConfig {
    /// `mqtt://host:port` or `mqtts://host:port` (TLS). `MQTT_BROKER`/`MQTT_PORT` build it.
    pub url: String,
    /// Stable, so the broker keeps our persistent session across restarts.
    pub client_id: String,
    pub clean_session: bool,
    /// MQTT 5: how long the broker keeps our session after a disconnect (replaces
    /// `clean_session`; 0 = the session ends with the connection).
    pub session_expiry: Duration,
    pub keep_alive: Duration,
    /// Incoming and outgoing packet limit, in bytes.
    pub max_packet_size: u64,
    /// When non-empty, every filter becomes `$share/<group>/<filter>`.
    pub share_group: String,
    pub reconnect_max_delay: Duration,
    pub protocol: Protocol,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            url: "mqtt://127.0.0.1:1883".to_string(),
            client_id: "routemq-bridge".to_string(),
            clean_session: false,
            session_expiry: Duration::from_secs(7 * 24 * 3600),
            keep_alive: Duration::from_secs(30),
            max_packet_size: 1024 * 1024,
            share_group: String::new(),
            reconnect_max_delay: Duration::from_secs(10),
            protocol: Protocol::V311,
            username: None,
            password: None,
            ca_file: None,
            cert_file: None,
            key_file: None,
        }
    }
}

impl MqttConfig {
    /// Reads the `[mqtt]` table; `Default` fills what it does not set.
    pub(crate) fn read(mut t: Table<'_>) -> MqttConfig {
        let d = MqttConfig::default();
        let url = t
            .parse("url", |url: String| BrokerAddress::parse(&url).map(|_| url))
            .unwrap_or(d.url);
        let tls = BrokerAddress::parse(&url).is_ok_and(|a| a.tls);
        let client_id = t.non_empty_string("client_id", &d.client_id);
        let clean_session = t.bool("clean_session", d.clean_session);
        let keep_alive = t
            .parse("keep_alive", |k: Duration| {
                // MQTT carries whole seconds in 16 bits; rumqttc refuses anything else.
                if k.subsec_nanos() != 0 || k.as_secs() > u64::from(u16::MAX) {
                    Err(format!(
                        "must be whole seconds from 0 (off) to 65535, found {}",
                        humantime::format_duration(k)
                    ))
                } else {
                    Ok(k)
                }
            })
            .unwrap_or(d.keep_alive);
        // Must exceed limits.max_payload: checked by the loader, which sees both.
        let max_packet_size = t.size("max_packet_size", d.max_packet_size);
        let share_group = t
            .parse("share_group", |g: String| {
                if g.contains(['/', '+', '#']) {
                    Err(format!(
                        "a share group name may not contain '/', '+' or '#', found {g:?}"
                    ))
                } else {
                    Ok(g)
                }
            })
            .unwrap_or(d.share_group);
        let reconnect_max_delay = t.positive_duration("reconnect_max_delay", d.reconnect_max_delay);
        let protocol = t.get("protocol").unwrap_or(d.protocol);
        let session_expiry = t.duration("session_expiry", d.session_expiry);
        match protocol {
            Protocol::V311 if t.has("session_expiry") => t.error(
                "session_expiry",
                "exists only in MQTT 5 (protocol = \"5\"); under 3.1.1 use clean_session",
            ),
            Protocol::V5 if t.has("clean_session") => t.error(
                "clean_session",
                "under MQTT 5 the session is kept for session_expiry (default \"7d\"; \"0\" \
                 ends it with the connection): remove clean_session",
            ),
            Protocol::V5 if session_expiry.as_secs() > u64::from(u32::MAX) => t.error(
                "session_expiry",
                "MQTT 5 carries at most 4294967295 seconds (about 136 years)",
            ),
            _ => {}
        }
        let username = t.opt_string("username").filter(|u| !u.is_empty());
        let password = t.password("mqtt_password");
        let ca_file = t.path_buf("ca_file");
        let cert_file = t.path_buf("cert_file");
        let key_file = t.path_buf("key_file");

        for key in ["ca_file", "cert_file", "key_file"] {
            if t.has(key) && !tls {
                t.error(key, "is set but url is mqtt:// (no TLS); use mqtts://");
            }
        }
        if cert_file.is_some() != key_file.is_some() {
            let missing = if cert_file.is_some() {
                "key_file"
            } else {
                "cert_file"
            };
            let given = if cert_file.is_some() {
                "cert_file"
            } else {
                "key_file"
            };
            t.error(
                given,
                format!(
                    "a client certificate needs both cert_file and key_file; {missing} is missing"
                ),
            );
        }

        if !share_group.is_empty() && client_id == d.client_id {
            t.warn(
                "client_id",
                format!(
                    "is the default {:?} while share_group is set: every instance of the \
                     group needs a client id of its own, or the broker disconnects one \
                     instance whenever another connects with the same id (they keep kicking \
                     each other off). Distinct client ids are the operator's job: set \
                     MQTT_CLIENT_ID or [mqtt] client_id per instance (e.g. \
                     \"routemq-bridge-gw1\")",
                    d.client_id
                ),
            );
        }
        let config = MqttConfig {
            url,
            client_id,
            clean_session,
            session_expiry,
            keep_alive,
            max_packet_size,
            share_group,
            reconnect_max_delay,
            protocol,
            username,
            password,
            ca_file,
            cert_file,
            key_file,
        };
        if tls {
            for (key, message) in super::client::check_tls_files(&config) {
                t.error(key, message);
            }
        }
        t.finish();
        config
    }

    /// The broker's address, parsed from [`MqttConfig::url`] (validated at load).
    pub fn broker(&self) -> Result<BrokerAddress, String> {
        BrokerAddress::parse(&self.url)
    }
}

impl FromValue for Protocol {
    fn from_value(value: &Value) -> Result<Self, String> {
        let text = match value {
            Value::String(_, s) => s.trim().to_string(),
            Value::Num(..) => found(value).trim_start_matches("number ").to_string(),
            _ => String::new(),
        };
        match text.as_str() {
            "3.1.1" | "4" => Ok(Protocol::V311),
            "5" | "5.0" => Ok(Protocol::V5),
            _ => Err(format!(
                "expected \"3.1.1\" or \"5\", found {}",
                found(value)
            )),
        }
    }
}
