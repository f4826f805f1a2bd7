//! Every observable event of the message path, in one place: each function here writes the
//! log line and moves the metrics together, so logs and metrics never disagree (the Vector
//! model). Labels never carry topics, payloads or device ids (spec §8); logs may name the
//! topic at debug level.

use std::time::Instant;

use metrics::{counter, histogram};

use crate::outcome::{Outcome, Reason};

/// A message matched `route`.
pub fn message_received(route: &str) {
    counter!("routemq_bridge_messages_received_total", "route" => route.to_string()).increment(1);
}

/// `route` finished with `outcome`; `received` is when the message arrived.
pub fn message_outcome(route: &str, topic: &str, outcome: &Outcome, received: Instant) {
    counter!(
        "routemq_bridge_messages_total",
        "route" => route.to_string(),
        "outcome" => outcome.label()
    )
    .increment(1);
    histogram!("routemq_bridge_message_duration_seconds", "route" => route.to_string())
        .record(received.elapsed().as_secs_f64());
    match outcome {
        Outcome::Failed { .. } => tracing::warn!(route, topic, %outcome, "message failed"),
        Outcome::Invalid { .. } => tracing::info!(route, topic, %outcome, "message refused"),
        _ => tracing::trace!(route, topic, %outcome, "message done"),
    }
}

/// The cover delivered a message no route matches.
pub fn unrouted(topic: &str) {
    counter!("routemq_bridge_unrouted_total").increment(1);
    tracing::debug!(topic, "no route matches");
}

/// A record went to the dead letter.
pub fn dead_lettered(reason: Reason) {
    counter!("routemq_bridge_dead_letters_total", "reason" => reason.as_str()).increment(1);
}

/// The session cache answered (`hit`, `miss`, `negative_hit`).
pub fn session_cache(result: &'static str) {
    counter!("routemq_bridge_session_cache_requests_total", "result" => result).increment(1);
}

/// A Redis step failed in a way that waiting fixes; the message waits and retries.
pub fn redis_retry(route: &str, error: &crate::redis::Error) {
    tracing::debug!(route, %error, "redis unavailable; message waits and retries");
}

/// A republish rule (spec §7) finished with one Redis message or stream entry: `outcome` is
/// `published`, `invalid`, `overflow` or `failed`; `detail` says why for the last three.
pub fn republished(rule: &str, outcome: &'static str, detail: &str) {
    counter!(
        "routemq_bridge_republished_total",
        "rule" => rule.to_string(),
        "outcome" => outcome
    )
    .increment(1);
    match outcome {
        "published" => tracing::trace!(rule, "republished"),
        "failed" => tracing::warn!(rule, detail, "republish failed"),
        // One line per dropped message would flood the journal while the broker is away.
        "overflow" => tracing::debug!(rule, detail, "republish dropped"),
        _ => tracing::info!(rule, outcome, detail, "republish refused"),
    }
}
