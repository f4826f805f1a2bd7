//! The router: route topic patterns, the subscription cover, and templates (spec §5.1).

pub mod dispatch;
pub mod pattern;
pub mod template;
