//! Rate-limit middleware (spec §5.2): one atomic Lua check per message through the
//! manager's [`RateLimiter`](crate::redis::rate_limit::RateLimiter); over the limit the
//! message is `rate_limited`, and with `on_exceed = "reply"` the device is told why.

use crate::redis::rate_limit::{Decision, Fallback, Limit};
use crate::router::template::Template;

/// What happens to a message over the limit.
#[derive(Clone, Debug)]
pub enum OnExceed {
    Drop,
    /// Publish the JSON error to `topic` at `qos`.
    Reply {
        topic: Template,
        qos: u8,
    },
}

/// A route's `[routes.rate_limit]`.
#[derive(Clone, Debug)]
pub struct RateLimitRule {
    pub key: Template,
    pub limit: Limit,
    pub on_exceed: OnExceed,
    pub fallback: Fallback,
}

/// The reply of spec §5.2:
/// `{"error":"rate_limit_exceeded","limit":…,"window_s":…,"retry_after_ms":…}`.
pub fn reply_payload(decision: &Decision) -> String {
    serde_json::json!({
        "error": "rate_limit_exceeded",
        "limit": decision.limit,
        "window_s": decision.window.as_secs_f64(),
        "retry_after_ms": decision.retry_after.as_millis() as u64,
    })
    .to_string()
}
