//! Rate-limit middleware (spec §5.2): one atomic Lua check per message through the
//! manager's [`RateLimiter`](crate::redis::rate_limit::RateLimiter); over the limit the
//! message is `rate_limited`, and with `on_exceed = "reply"` the device is told why.

use std::time::Duration;

use crate::config::reader::Table;
use crate::redis::rate_limit::{Decision, Fallback, Limit, Strategy};
use crate::template::{read as template, Scope, Target, Template};

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

impl RateLimitRule {
    /// Reads `[routes.rate_limit]`; `None` (errors recorded) when it is unusable.
    pub(crate) fn read(mut r: Table<'_>, scope: &Scope<'_>) -> Option<RateLimitRule> {
        // RouteMQ's default key, so both share one budget.
        let key = template(
            &mut r,
            "key",
            Target::Key,
            scope,
            Some("rate_limit:topic:{topic}"),
        );
        let strategy = r.choice(
            "strategy",
            &[
                ("sliding_window", Strategy::SlidingWindow),
                ("fixed_window", Strategy::FixedWindow),
                ("token_bucket", Strategy::TokenBucket),
            ],
            Strategy::SlidingWindow,
        );
        let max = if r.has("max") {
            r.parse::<u64, _>("max", |m| {
                u32::try_from(m)
                    .ok()
                    .filter(|m| *m >= 1)
                    .ok_or_else(|| format!("expected 1 to {}, found {m}", u32::MAX))
            })
        } else {
            r.error("max", "is required");
            None
        };
        let window = if r.has("window") {
            Some(r.positive_duration("window", Duration::from_secs(60)))
        } else {
            r.error("window", "is required");
            None
        };
        let burst = if r.has("burst") {
            if strategy != Strategy::TokenBucket {
                r.error("burst", "only token_bucket has a burst");
            }
            r.parse::<u64, _>("burst", |b| {
                u32::try_from(b)
                    .ok()
                    .filter(|b| *b >= 1)
                    .ok_or_else(|| format!("expected at least 1, found {b}"))
            })
        } else {
            None
        };
        let on_exceed_reply = r.choice("on_exceed", &[("drop", false), ("reply", true)], false);
        let on_exceed = if on_exceed_reply {
            let topic = template(&mut r, "reply_topic", Target::Topic, scope, None);
            let reply_qos = r.qos("reply_qos", 0);
            topic.map(|topic| OnExceed::Reply {
                topic,
                qos: reply_qos,
            })
        } else {
            for key in ["reply_topic", "reply_qos"] {
                if r.has(key) {
                    r.ignore(key);
                    r.error(key, "only used with on_exceed = \"reply\"");
                }
            }
            Some(OnExceed::Drop)
        };
        let fallback = r.choice(
            "fallback",
            &[
                ("local", Fallback::Local),
                ("allow", Fallback::Allow),
                ("deny", Fallback::Deny),
            ],
            Fallback::Local,
        );
        r.finish();
        let mut limit = Limit::new(strategy, max?, window?);
        if let Some(b) = burst {
            limit = limit.with_burst(b);
        }
        Some(RateLimitRule {
            key: key?,
            limit,
            on_exceed: on_exceed?,
            fallback,
        })
    }
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
