//! The router: route topic patterns, the subscription cover, the route table, and the engine
//! that runs one message through the stages of its routes (spec §5).

pub mod config;
pub mod dispatch;
pub mod engine;
pub mod pattern;
pub mod route;
