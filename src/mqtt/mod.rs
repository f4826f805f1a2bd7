//! MQTT in: the broker connection (rumqttc), subscriptions and acknowledgements.

pub mod acks;
pub mod client;
pub mod config;
pub mod publisher;
pub mod source;

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
    /// Every filter of the cover was granted by the broker.
    pub subscribed: bool,
}

/// One subscription of the route table's cover: the filter and the highest QoS among the
/// routes it serves (`router::pattern::cover` computes it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subscription {
    pub filter: String,
    pub qos: u8,
}
