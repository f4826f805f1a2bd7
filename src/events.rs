//! Every observable event of the bridge, in one place: each function here writes the log
//! line and moves the metrics together, so logs and metrics never disagree (the Vector
//! model). Labels never carry topics, payloads or device ids (spec §8); logs may name the
//! topic at debug level.
//!
//! The metric names and their help texts live in [`crate::metrics`]; connection gauges
//! (`redis_up`, `mqtt_connected`, `inflight_messages`) and reconnect counts are sampled from
//! the Redis manager and the MQTT source when scraped, since those already log their own
//! transitions.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use metrics::{counter, histogram};

use crate::metrics as m;
use crate::outcome::{Outcome, Reason};

/// Process-wide totals for the systemd `STATUS=` line (the metrics keep the labelled detail).
#[derive(Debug, Default)]
pub struct Totals {
    pub received: AtomicU64,
    pub written: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub unrouted: AtomicU64,
}

pub static TOTALS: Totals = Totals {
    received: AtomicU64::new(0),
    written: AtomicU64::new(0),
    dead_lettered: AtomicU64::new(0),
    unrouted: AtomicU64::new(0),
};

/// A message matched `route`.
pub fn message_received(route: &str) {
    TOTALS.received.fetch_add(1, Ordering::Relaxed);
    counter!(m::MESSAGES_RECEIVED, "route" => route.to_string()).increment(1);
}

/// `route` finished with `outcome`; `received` is when the message arrived.
pub fn message_outcome(route: &str, topic: &str, outcome: &Outcome, received: Instant) {
    if *outcome == Outcome::Written {
        TOTALS.written.fetch_add(1, Ordering::Relaxed);
    }
    counter!(
        m::MESSAGES,
        "route" => route.to_string(),
        "outcome" => outcome.label()
    )
    .increment(1);
    histogram!(m::MESSAGE_DURATION, "route" => route.to_string())
        .record(received.elapsed().as_secs_f64());
    match outcome {
        Outcome::Failed { .. } => tracing::warn!(route, topic, %outcome, "message failed"),
        Outcome::Invalid { .. } => tracing::info!(route, topic, %outcome, "message refused"),
        _ => tracing::trace!(route, topic, %outcome, "message done"),
    }
}

/// The cover delivered a message no route matches.
pub fn unrouted(topic: &str) {
    TOTALS.unrouted.fetch_add(1, Ordering::Relaxed);
    counter!(m::UNROUTED).increment(1);
    tracing::debug!(topic, "no route matches");
}

/// A record went to the dead letter.
pub fn dead_lettered(reason: Reason) {
    TOTALS.dead_lettered.fetch_add(1, Ordering::Relaxed);
    counter!(m::DEAD_LETTERS, "reason" => reason.as_str()).increment(1);
}

/// The session cache answered (`hit`, `miss`, `negative_hit`).
pub fn session_cache(result: &'static str) {
    counter!(m::SESSION_CACHE, "result" => result).increment(1);
}

/// A Redis step failed in a way that waiting fixes; the message waits and retries.
pub fn redis_retry(route: &str, error: &crate::redis::Error) {
    tracing::debug!(route, %error, "redis unavailable; message waits and retries");
}

/// A republish rule (spec §7) finished with one Redis message or stream entry: `outcome` is
/// `published`, `invalid`, `overflow` or `failed`; `detail` says why for the last three.
pub fn republished(rule: &str, outcome: &'static str, detail: &str) {
    counter!(
        m::REPUBLISHED,
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

/// One call through the Redis manager's primitives: `command` is the command name in lower
/// case (`set`, `evalsha`, `multi` for a transaction, `pipeline`), `elapsed` its round trip.
/// Calls refused before reaching Redis (`elapsed` is `None`) count only as errors. The
/// caller logs the error where it knows what it meant (the manager's rate-limited warnings,
/// the engine's retries), so this only counts.
pub fn redis_command(
    command: &str,
    elapsed: Option<Duration>,
    error: Option<&crate::redis::Error>,
) {
    if let Some(elapsed) = elapsed {
        histogram!(m::REDIS_COMMAND_DURATION, "command" => command.to_string())
            .record(elapsed.as_secs_f64());
    }
    if let Some(kind) = error.and_then(crate::redis::Error::metric_kind) {
        counter!(m::REDIS_ERRORS, "kind" => kind).increment(1);
    }
}

/// The HTTP endpoint is serving.
pub fn http_listening(addr: std::net::SocketAddr) {
    tracing::info!("http listening on {addr} (/metrics, /healthz, /readyz)");
}

/// SIGHUP: the new configuration is running. `changes` says what changed, for the log.
pub fn config_reload_applied(changes: &str) {
    counter!(m::CONFIG_RELOADS, "result" => "applied").increment(1);
    tracing::info!("configuration reloaded: {changes}");
}

/// SIGHUP: the new configuration was refused; the old one keeps running. Every error is
/// logged, one line each, so the journal shows all of them.
pub fn config_reload_rejected(path: &std::path::Path, errors: &crate::config::ConfigErrors) {
    counter!(m::CONFIG_RELOADS, "result" => "rejected").increment(1);
    for error in errors.iter() {
        tracing::error!(path = %path.display(), "config error: {error}");
    }
    tracing::error!(
        path = %path.display(),
        errors = errors.len(),
        "configuration reload refused; the running configuration stays in effect"
    );
}

/// SIGHUP: a setting that cannot change without a restart (`[mqtt]`, `[redis]`, `[http]`,
/// `[log] format`) differs in the new file; the running one stays in effect.
pub fn config_needs_restart(what: &'static str) {
    tracing::warn!(
        "{what} changed; it takes effect only after a restart (the running {what} stays in \
         effect)"
    );
}
