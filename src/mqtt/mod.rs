//! MQTT in: the broker connection (rumqttc), subscriptions and acknowledgements.

pub mod acks;
pub mod client;
pub mod config;
pub mod source;

pub use config::MqttConfig;
pub use source::{Inbound, MqttSource, MqttStatus};
