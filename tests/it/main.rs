//! Integration tests against real Redis and Mosquitto, started by [`harness`] on free loopback
//! ports. One binary with one module per area keeps linking cheap.

mod alive;
mod bridge;
mod bridge_actions;
mod bridge_cli;
mod bridge_decoding;
mod bridge_delivery;
mod bridge_middleware;
mod bridge_mqtt;
mod bridge_outcomes;
mod bridge_smoke;
mod cache;
mod cluster;
mod cluster_faults;
mod cluster_republish;
mod forwards;
mod harness;
mod harness_selftest;
mod lock;
mod module_graph;
mod newcomer;
mod ops;
mod pubsub;
mod rate_limit;
mod redis_manager;
mod redis_refusals;
mod redis_tls;
mod republish;
mod scale_out;
mod secrets;
mod sentinel;
mod session;
mod silent_redis;
mod stages;
mod vendored_rumqttc;
mod vendored_rumqttc_v5;
