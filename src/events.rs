//! Every observable event of the bridge, in one place: each function here writes the log
//! line and moves the metrics together, so logs and metrics never disagree (the Vector
//! model). Labels never carry topics, payloads or device ids (spec §8); logs may name the
//! topic at debug level.
//!
//! The metric names live here ([`names`]), their help texts in `crate::metrics`; connection gauges
//! (`redis_up`, `mqtt_connected`, `inflight_messages`) and reconnect counts are sampled from
//! the Redis manager and the MQTT source when scraped, since those already log their own
//! transitions.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex, OnceLock};
use std::time::{Duration, Instant};

use metrics::{counter, histogram, Counter, Histogram};

use crate::outcome::{Outcome, Reason};
use names as m;

/// The metric names of spec §8.
pub mod names {
    pub const MESSAGES_RECEIVED: &str = "routemq_bridge_messages_received_total";
    pub const MESSAGES: &str = "routemq_bridge_messages_total";
    pub const UNROUTED: &str = "routemq_bridge_unrouted_total";
    pub const MESSAGE_DURATION: &str = "routemq_bridge_message_duration_seconds";
    pub const REDIS_COMMAND_DURATION: &str = "routemq_bridge_redis_command_duration_seconds";
    pub const REDIS_ERRORS: &str = "routemq_bridge_redis_errors_total";
    pub const REDIS_UP: &str = "routemq_bridge_redis_up";
    pub const MQTT_CONNECTED: &str = "routemq_bridge_mqtt_connected";
    pub const RECONNECTS: &str = "routemq_bridge_reconnects_total";
    pub const REDIS_REPLICA_WAITS: &str = "routemq_bridge_redis_replica_waits_total";
    pub const INFLIGHT: &str = "routemq_bridge_inflight_messages";
    pub const REPUBLISHED: &str = "routemq_bridge_republished_total";
    pub const SESSION_CACHE: &str = "routemq_bridge_session_cache_requests_total";
    pub const DEAD_LETTERS: &str = "routemq_bridge_dead_letters_total";
    pub const CONFIG_RELOADS: &str = "routemq_bridge_config_reloads_total";
    pub const BUILD_INFO: &str = "routemq_bridge_build_info";
    pub const SPOOL_MESSAGES: &str = "routemq_bridge_spool_messages";
    pub const SPOOL_BYTES: &str = "routemq_bridge_spool_bytes";
    pub const SPOOL_DROPPED: &str = "routemq_bridge_spool_dropped_total";
    pub const SPOOL_REPLAYED: &str = "routemq_bridge_spool_replayed_total";
    pub const MQTT_REASON_CODES: &str = "routemq_bridge_mqtt_reason_codes_total";
}

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

/// A route's metric handles, registered on first use and then kept, so the per-message
/// path neither allocates labels nor looks the series up in the registry again (the
/// `counter!(…, "route" => name.to_string())` form does both for every message).
///
/// Taken lazily rather than when the route table is compiled because the table is compiled
/// before the daemon installs its recorder; a handle taken earlier would count into the
/// no-op recorder forever. Outcome counters are registered only when that outcome first
/// happens, so `/metrics` shows the same series as before.
#[derive(Debug, Default)]
pub struct RouteMetrics {
    received: OnceLock<Counter>,
    duration: OnceLock<Histogram>,
    /// One per [`Outcome::label`], indexed by [`outcome_index`].
    outcomes: [OnceLock<Counter>; OUTCOMES],
    /// When a refusal of each kind was last logged at `info` (`heartbeat::now_ms`; 0:
    /// never), so a newcomer sees why their first message went nowhere without a flood.
    noted: [AtomicU64; OUTCOMES],
}

/// How often one route logs one kind of refusal at `info`; the rest go to `debug`.
const NOTE_EVERY: Duration = Duration::from_secs(60);

/// Whether `route`'s refusal of this kind is due to be logged at `info` (the first, then at
/// most once per [`NOTE_EVERY`]).
fn note_due(handles: &RouteMetrics, outcome: &Outcome) -> bool {
    let slot = &handles.noted[outcome_index(outcome)];
    let now = routemq_redis::heartbeat::now_ms();
    let last = slot.load(Ordering::Relaxed);
    let every = u64::try_from(NOTE_EVERY.as_millis()).unwrap_or(u64::MAX);
    (last == 0 || now.saturating_sub(last) >= every)
        && slot
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
}

/// Why a message was refused, in words for the first `info` line of its kind.
fn refusal_hint(outcome: &Outcome) -> &'static str {
    match outcome {
        Outcome::Unauthorized => {
            "the route requires a session ([routes.session] required = true) and none is stored \
             at its key"
        }
        Outcome::RateLimited => "over the route's rate limit ([routes.rate_limit])",
        Outcome::Duplicate => "its dedup key ([routes.dedup]) already marks it as processed",
        _ => "it does not fit the route (see the dead-letter list for each one)",
    }
}

const OUTCOMES: usize = 7;

fn outcome_index(outcome: &Outcome) -> usize {
    match outcome {
        Outcome::Written => 0,
        Outcome::RateLimited => 1,
        Outcome::Duplicate => 2,
        Outcome::Unauthorized => 3,
        Outcome::Invalid { .. } => 4,
        // Both are labelled `failed`: one counter.
        Outcome::Failed { .. } | Outcome::Internal { .. } => 5,
        Outcome::Overflow => 6,
    }
}

/// A message matched the route `route` (whose handles are `handles`).
pub fn message_received(route: &str, handles: &RouteMetrics) {
    TOTALS.received.fetch_add(1, Ordering::Relaxed);
    handles
        .received
        .get_or_init(|| counter!(m::MESSAGES_RECEIVED, "route" => route.to_string()))
        .increment(1);
}

/// The route `route` finished with `outcome`; `received` is when the message arrived.
pub fn message_outcome(
    route: &str,
    handles: &RouteMetrics,
    topic: &str,
    outcome: &Outcome,
    received: Instant,
) {
    if *outcome == Outcome::Written {
        TOTALS.written.fetch_add(1, Ordering::Relaxed);
    }
    handles.outcomes[outcome_index(outcome)]
        .get_or_init(|| {
            counter!(
                m::MESSAGES,
                "route" => route.to_string(),
                "outcome" => outcome.label()
            )
        })
        .increment(1);
    handles
        .duration
        .get_or_init(|| histogram!(m::MESSAGE_DURATION, "route" => route.to_string()))
        .record(received.elapsed().as_secs_f64());
    match outcome {
        Outcome::Failed { .. } => tracing::warn!(route, topic, %outcome, "message failed"),
        Outcome::Internal { .. } => {
            tracing::error!(route, topic, %outcome, "BUG: handling this message panicked; it is dead-lettered and the next one goes on")
        }
        Outcome::Invalid { .. }
        | Outcome::Unauthorized
        | Outcome::RateLimited
        | Outcome::Duplicate => {
            if note_due(handles, outcome) {
                let why = refusal_hint(outcome);
                tracing::info!(route, topic, %outcome, why, "message refused (the next refusals of this kind on this route for a minute are logged at debug)");
            } else {
                tracing::debug!(route, topic, %outcome, "message refused");
            }
        }
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
    // Three possible labels, one handle each, taken once (see [`RouteMetrics`]).
    static HANDLES: [OnceLock<Counter>; 3] = [OnceLock::new(), OnceLock::new(), OnceLock::new()];
    let index = match result {
        "hit" => 0,
        "miss" => 1,
        "negative_hit" => 2,
        other => {
            counter!(m::SESSION_CACHE, "result" => other).increment(1);
            return;
        }
    };
    HANDLES[index]
        .get_or_init(|| counter!(m::SESSION_CACHE, "result" => result))
        .increment(1);
}

/// A Redis step failed in a way that waiting fixes; the message waits and retries.
pub fn redis_retry(route: &str, error: &crate::redis::Error) {
    tracing::debug!(route, %error, "redis unavailable; message waits and retries");
}

/// A forward (`mqtt_publish`) was lost with the broker's session and is sent again.
pub fn forward_retry(topic: &str) {
    tracing::debug!(
        topic,
        "forward lost with the broker's session; sending it again"
    );
}

/// The broker answered with a failure reason code (MQTT 5, spec §6.1): counted by packet
/// (`suback`, `puback`, `pubrec`) and code (`not_authorized`, …).
pub fn mqtt_reason_code(packet: &'static str, code: &str) {
    counter!(m::MQTT_REASON_CODES, "packet" => packet, "code" => code.to_string()).increment(1);
}

/// The broker refused a subscription: an error naming the filter (the route behind it gets
/// nothing; `/readyz` says so), counted as [`mqtt_reason_code`].
pub fn mqtt_refused(packet: &'static str, code: &str, filter: &str, client_id: &str) {
    mqtt_reason_code(packet, code);
    tracing::error!(
        client_id,
        filter,
        code,
        "the MQTT broker refused the subscription (check its ACL); the other routes run"
    );
}

/// The broker refused a publish (a forward or a republish) with a failure reason code.
/// `packet` and `code` as [`mqtt_reason_code`], which the connection's loop counted.
pub fn mqtt_publish_refused(topic: &str, packet: &str, code: &str) {
    tracing::error!(topic, packet, code, "the MQTT broker refused a publish");
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

/// One call through the Redis manager's primitives, as the Redis crate's command observer
/// reports it (installed by the daemon at start): `command` is the command name in lower
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
        redis_command_histogram(command).record(elapsed.as_secs_f64());
    }
    if let Some(kind) = error.and_then(crate::redis::Error::metric_kind) {
        counter!(m::REDIS_ERRORS, "kind" => kind).increment(1);
    }
}

/// The duration histogram of `command`, registered once per command name: the names are
/// a small bounded set (the manager maps anything unusual to `other`), and every Redis call
/// passes here, so a lookup by `&str` replaces a label allocation and a registry lookup.
fn redis_command_histogram(command: &str) -> Histogram {
    static HANDLES: LazyLock<Mutex<HashMap<Box<str>, Histogram>>> =
        LazyLock::new(|| Mutex::new(HashMap::new()));
    let mut handles = HANDLES.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(h) = handles.get(command) {
        return h.clone();
    }
    let h = histogram!(m::REDIS_COMMAND_DURATION, "command" => command.to_string());
    handles.insert(command.into(), h.clone());
    h
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

/// Start-up: settings that loaded but are likely mistakes (`check` prints the same), one
/// line each.
pub fn config_warnings(warnings: &[crate::config::ConfigWarning]) {
    for warning in warnings {
        tracing::warn!("config warning: {warning}");
    }
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

// The local spool (spec §6.2). Its gauges (`spool_messages`, `spool_bytes`) are sampled from
// its ledger when scraped, like the connection gauges.

/// Redis has not taken writes for `after`: messages that need it now go to the spool.
pub fn spool_spilling(after: Duration, path: &std::path::Path) {
    tracing::warn!(
        after = %humantime::format_duration(after),
        spool = %path.display(),
        "Redis cannot take writes: messages that need Redis are spooled to local disk and \
         acked once durable; they are replayed when Redis is back"
    );
}

/// Redis is back: the spool drains (if it holds anything).
pub fn spool_draining(messages: u64) {
    tracing::info!(messages, "Redis is back: replaying the spool");
}

/// The spool drained completely.
pub fn spool_drained() {
    tracing::info!("the spool is empty; every message goes straight to Redis again");
}

/// `count` records replayed through their routes.
pub fn spool_replayed(count: u64) {
    counter!(m::SPOOL_REPLAYED).increment(count);
}

/// `count` records dropped to make room (`on_full = "drop_oldest"`).
pub fn spool_dropped(count: u64) {
    counter!(m::SPOOL_DROPPED).increment(count);
    tracing::warn!(
        count,
        "the spool is full (spool.max_size): dropped its oldest messages \
         (spool.on_full = \"drop_oldest\"); their topic and time go to the dead letter once \
         Redis is back"
    );
}

/// The spool's file was found damaged at start-up and repaired (the rest is replayed).
pub fn spool_damage(path: &std::path::Path, what: &str) {
    tracing::warn!(spool = %path.display(), "the spool was damaged and is repaired: {what}");
}

/// The spool's file could not be read as a database at all: moved aside, starting empty.
pub fn spool_set_aside(path: &std::path::Path, aside: &std::path::Path, problem: &str) {
    tracing::error!(
        spool = %path.display(),
        moved_to = %aside.display(),
        "the spool's file is not a readable database ({problem}); it was moved aside and the \
         spool starts empty"
    );
}

/// A spooled record could not be decoded (its topic is not UTF-8, a column's type changed):
/// it was moved to the kept dead letters (`internal_error`) instead of being replayed.
pub fn spool_record_unreadable(id: i64, topic: &str) {
    tracing::warn!(
        id,
        topic,
        "spool: a record could not be decoded (damaged on disk); it goes to the dead letters \
         (internal_error) instead of being replayed"
    );
}

/// Kept dead letters (drops of `drop_oldest`, messages refused while Redis was down) past
/// their budget in the spool: the oldest were discarded.
pub fn spool_letters_evicted(count: u64, budget: u64) {
    tracing::warn!(
        count,
        budget_bytes = budget,
        "spool: the kept dead letters are over their budget (spool.max_size, apart from the messages); the oldest \
         were discarded without reaching Redis"
    );
}

/// The spool's store failed an operation (a full disk, an I/O error).
pub fn spool_store_error(what: &'static str, error: &str) {
    tracing::error!(operation = what, error, "spool: the store failed");
}
