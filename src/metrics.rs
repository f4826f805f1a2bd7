//! Prometheus metrics (spec §8): the help texts, the recorder and the sampled gauges (the
//! names live with the events that move them, `events::names`).
//!
//! Events ([`crate::events`]) move counters and histograms as things happen. Connection
//! state — `redis_up`, `mqtt_connected`, `inflight_messages`, `reconnects_total` — is not an
//! event stream but a state the Redis manager and the MQTT source already keep, so it is
//! read from them ([`Observed`]) when Prometheus scrapes, and is never stale.
//!
//! The recorder is `metrics-exporter-prometheus` without its HTTP listener: `/metrics` is
//! served by [`crate::http`] next to the health endpoints, and [`Metrics::render`] produces
//! the text. Histogram buckets start at 100 µs, since most of what we time (a Redis round
//! trip on the gateway, a whole message) takes well under a millisecond.

use std::sync::Arc;
use std::time::Duration;

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, Unit};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::sync::watch;

use crate::mqtt::source::MqttStats;
use crate::mqtt::MqttStatus;
use crate::outcome::Reason;
use crate::redis::{ConnectionState, RedisManager};
use crate::router::route::RouteTable;

pub use crate::events::names::*;

/// Upper bounds of the histogram buckets, in seconds: 100 µs to 10 s.
pub const BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// How often histogram samples are folded into their buckets when nobody scrapes.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

fn describe() {
    describe_counter!(
        MESSAGES_RECEIVED,
        "Messages that matched a route, per route (a message matching two routes counts twice)."
    );
    describe_counter!(
        MESSAGES,
        "Messages finished, per route and outcome (written, rate_limited, duplicate, \
         unauthorized, invalid, failed, overflow)."
    );
    describe_counter!(
        UNROUTED,
        "Messages delivered by the subscription cover that no route matched."
    );
    describe_histogram!(
        MESSAGE_DURATION,
        Unit::Seconds,
        "Time from receiving a message to its outcome on a route, per route."
    );
    describe_histogram!(
        REDIS_COMMAND_DURATION,
        Unit::Seconds,
        "Round trip of one Redis command, pipeline or transaction, per command."
    );
    describe_counter!(
        REDIS_ERRORS,
        "Failed Redis calls, per kind (connection, timeout, response, script)."
    );
    describe_gauge!(
        REDIS_UP,
        "1 while Redis is connected and answering, else 0 (absent when Redis is disabled)."
    );
    describe_gauge!(
        MQTT_CONNECTED,
        "1 while connected to the MQTT broker, else 0."
    );
    describe_counter!(
        RECONNECTS,
        "Connections lost and re-established, per target (mqtt, redis)."
    );
    describe_counter!(
        REDIS_REPLICA_WAITS,
        "Sentinel: WAITs after a route write that came back with fewer replicas than \
         redis.sentinel.wait_replicas (the message waited, unacked)."
    );
    describe_gauge!(
        INFLIGHT,
        "Messages received and not yet finished (acked), all routes together."
    );
    describe_counter!(
        REPUBLISHED,
        "Redis pub/sub messages and stream entries republished to MQTT, per rule and outcome."
    );
    describe_counter!(
        SESSION_CACHE,
        "Session lookups by the local cache, per result (hit, miss, negative_hit)."
    );
    describe_counter!(
        DEAD_LETTERS,
        "Records written to the dead letter, per reason."
    );
    describe_counter!(
        CONFIG_RELOADS,
        "Configuration reloads (SIGHUP), per result (applied, rejected)."
    );
    describe_counter!(
        MQTT_REASON_CODES,
        "Failure reason codes the MQTT broker answered (MQTT 5), per packet and code."
    );
    describe_gauge!(
        SPOOL_MESSAGES,
        "Messages in the local spool, waiting for Redis (absent without [spool])."
    );
    describe_gauge!(
        SPOOL_BYTES,
        Unit::Bytes,
        "Bytes of the messages in the local spool, as spool.max_size counts them."
    );
    describe_counter!(
        SPOOL_DROPPED,
        "Spooled messages dropped to make room (spool.on_full = \"drop_oldest\")."
    );
    describe_counter!(
        SPOOL_REPLAYED,
        "Spooled messages replayed through their routes once Redis was back."
    );
    describe_gauge!(
        BUILD_INFO,
        "Always 1; the version label says which build runs."
    );
}

/// Series with known, bounded label values start at zero, so `rate()` and alerts see them
/// before the first event.
fn register_fixed_series() {
    gauge!(BUILD_INFO, "version" => crate::VERSION).set(1.0);
    counter!(UNROUTED).absolute(0);
    counter!(REDIS_REPLICA_WAITS).absolute(0);
    for target in ["mqtt", "redis"] {
        counter!(RECONNECTS, "target" => target).absolute(0);
    }
    for result in ["applied", "rejected"] {
        counter!(CONFIG_RELOADS, "result" => result).absolute(0);
    }
    for kind in ["connection", "timeout", "response", "script"] {
        counter!(REDIS_ERRORS, "kind" => kind).absolute(0);
    }
    for reason in [
        Reason::InvalidJson,
        Reason::InvalidUtf8,
        Reason::PayloadTooLarge,
        Reason::InvalidParam,
        Reason::MissingField,
        Reason::RedisError,
        Reason::Expired,
    ] {
        counter!(DEAD_LETTERS, "reason" => reason.as_str()).absolute(0);
    }
}

/// Starts every route's `messages_received_total` at zero (at start-up and after a reload
/// that adds routes).
pub fn register_routes(table: &RouteTable) {
    for route in &table.routes {
        counter!(MESSAGES_RECEIVED, "route" => route.name.clone()).absolute(0);
    }
}

/// What the bridge's state is read from: the Redis manager and the MQTT source.
#[derive(Clone)]
pub struct Observed {
    pub redis: RedisManager,
    pub mqtt_status: watch::Receiver<MqttStatus>,
    pub mqtt_stats: Arc<MqttStats>,
    /// The local spool, when `[spool]` is configured.
    pub spool: Option<crate::spool::SpoolStatus>,
}

impl Observed {
    pub fn redis_state(&self) -> ConnectionState {
        *self.redis.state().borrow()
    }

    pub fn mqtt(&self) -> MqttStatus {
        self.mqtt_status.borrow().clone()
    }

    /// Sets the gauges and reconnect counts from the current state.
    fn sample(&self) {
        match self.redis_state() {
            ConnectionState::Disabled => {}
            state => gauge!(REDIS_UP).set(f64::from(u8::from(state == ConnectionState::Up))),
        }
        gauge!(MQTT_CONNECTED).set(f64::from(u8::from(self.mqtt().connected)));
        gauge!(INFLIGHT).set(self.mqtt_stats.inflight() as f64);
        let mqtt_reconnects = self
            .mqtt_stats
            .reconnects
            .load(std::sync::atomic::Ordering::Relaxed);
        counter!(RECONNECTS, "target" => "mqtt").absolute(mqtt_reconnects);
        counter!(RECONNECTS, "target" => "redis").absolute(self.redis.reconnects());
        counter!(REDIS_REPLICA_WAITS).absolute(self.redis.replica_waits());
        if let Some(spool) = &self.spool {
            let (messages, bytes) = spool.size();
            gauge!(SPOOL_MESSAGES).set(messages as f64);
            gauge!(SPOOL_BYTES).set(bytes as f64);
        }
    }
}

/// The installed recorder and what its gauges are sampled from.
#[derive(Clone)]
pub struct Metrics {
    handle: PrometheusHandle,
    observed: Observed,
}

/// Builds the Prometheus recorder and installs it as the process's `metrics` recorder.
/// `None` when another recorder is already installed (a library user's own); the daemon
/// then serves no `/metrics` body of its own.
pub fn install() -> Option<PrometheusHandle> {
    let builder = match PrometheusBuilder::new().set_buckets(BUCKETS) {
        Ok(builder) => builder,
        Err(e) => {
            tracing::error!(error = %e, "metrics: bad histogram buckets; histograms become summaries");
            PrometheusBuilder::new()
        }
    };
    let recorder = builder.build_recorder();
    let handle = recorder.handle();
    if metrics::set_global_recorder(recorder).is_err() {
        tracing::warn!("a metrics recorder is already installed; /metrics will be empty");
        return None;
    }
    describe();
    register_fixed_series();
    Some(handle)
}

impl Metrics {
    pub fn new(handle: PrometheusHandle, observed: Observed) -> Metrics {
        Metrics { handle, observed }
    }

    /// The Prometheus text exposition of every metric, gauges sampled now.
    pub fn render(&self) -> String {
        self.observed.sample();
        self.handle.run_upkeep();
        self.handle.render()
    }

    /// Folds histogram samples into buckets periodically, so memory stays flat when
    /// nobody scrapes. Ends when `stop` fires.
    pub async fn upkeep(self, mut stop: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(UPKEEP_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => self.handle.run_upkeep(),
                _ = crate::liveness::stopped(&mut stop) => return,
            }
        }
    }
}
