//! The router: route topic patterns, the subscription cover, and templates (spec §5.1).

pub mod config;
pub mod dispatch;
pub mod engine;
pub mod json;
pub mod pattern;
pub mod route;
pub mod template;
