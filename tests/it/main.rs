//! Integration tests against real Redis and Mosquitto, started by [`harness`] on free loopback
//! ports. One binary with one module per area keeps linking cheap.

mod bridge;
mod bridge_smoke;
mod harness;
mod harness_selftest;
mod redis_manager;
mod republish;
