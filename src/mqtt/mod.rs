//! MQTT in: the broker connection (rumqttc), subscriptions and acknowledgements.

pub mod config;

pub use config::MqttConfig;
