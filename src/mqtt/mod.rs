//! MQTT in: the broker connection (rumqttc), subscriptions and acknowledgements.

pub mod acks;
pub mod client;
pub mod config;
pub mod properties;
pub mod publisher;
pub mod source;
pub mod wire;

pub mod forward;

pub use config::MqttConfig;
pub use source::{Inbound, MqttSource};

/// A config QoS level as rumqttc's. Levels are checked to be 0, 1 or 2 when the config is
/// loaded, so anything above 1 means 2.
pub fn qos(level: u8) -> rumqttc::QoS {
    match level {
        0 => rumqttc::QoS::AtMostOnce,
        1 => rumqttc::QoS::AtLeastOnce,
        _ => rumqttc::QoS::ExactlyOnce,
    }
}

/// What the bridge knows about its broker connection, for `/readyz` and systemd. Here, not
/// in `source`, because the source writes it and the publisher reads it: neither file
/// imports the other for it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MqttStatus {
    pub connected: bool,
    /// Every SUBSCRIBE of the cover was answered by the broker.
    pub subscribed: bool,
    /// Filters the broker refused (a SUBACK failure code, e.g. not authorized): the other
    /// routes run, `/readyz` answers 503 naming these.
    pub refused: Vec<String>,
}

/// One subscription of the route table's cover: the filter and the highest QoS among the
/// routes it serves (`router::pattern::cover` computes it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subscription {
    pub filter: String,
    pub qos: u8,
}
