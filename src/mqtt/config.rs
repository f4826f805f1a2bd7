//! The `[mqtt]` table and RouteMQ's `MQTT_*` variables (spec §4).

use std::path::PathBuf;
use std::time::Duration;

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
