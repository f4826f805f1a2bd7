//! Redis → MQTT (spec §7): republish pub/sub messages and stream entries to the broker.
//!
//! The message path runs backwards here: `pubsub.rs` and `stream.rs` read Redis, render each
//! message with the rule's templates (compiled at load, `config.rs`), and publish it through
//! an [`MqttPublisher`]. What a reader needs to know:
//!
//! - **Its own MQTT connection.** The daemon gives the republisher a connection of its own
//!   (client id `<client_id>-republish`, see [`RepublishService`]), shared with the routes'
//!   forwards: knowing which PUBACK answers which publish needs every publish on the
//!   connection to be tracked (see `mqtt::source`), and it never pauses reading.
//! - **Pub/sub** rules share one subscriber connection (`redis::pubsub`, which resubscribes
//!   after every Redis reconnect). Messages wait in a bounded queue per rule while MQTT is
//!   down (`max_pending`; the oldest are dropped as `overflow`); a publish lost with the
//!   broker's session is queued again.
//! - **Stream** rules each read on a dedicated connection (blocking XREADGROUP never meets
//!   the manager's response timeout), XACK an entry only once the broker acknowledged its
//!   publish (QoS 1/2), re-read their own pending entries after a failure, and claim entries
//!   other consumers left pending longer than `claim_idle` (XAUTOCLAIM). An entry that can
//!   never be published (no payload field, a topic that fails validation) is XACKed and
//!   dead-lettered in one MULTI/EXEC — never retried forever.
//! - Every outcome goes through [`Stats::record`], which counts it for callers and emits
//!   `republished_total{rule,outcome}` via [`crate::events`].
//!
//! Rule sets are swappable: [`Republisher::reload`] stops the running workers and starts
//! the new ones (SIGHUP). Stream entries in flight stay pending and are read again.

pub mod channel;
pub mod config;
mod pubsub;
mod stream;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use config::{read_republish, warn_pubsub_in_share_group, RepublishRule, Source};

use crate::dead_letter::DeadLetter;
use crate::mqtt::client::OptionsError;
use crate::mqtt::publisher::MqttPublisher;
use crate::mqtt::wire::OutProperties;
use crate::mqtt::{MqttConfig, MqttSource};
use crate::outcome::Reason;
use crate::redis::pubsub::Monitor;
use crate::redis::{Error as RedisError, RedisManager};
use crate::router::pattern::filter_covers;
use crate::template::Context;

/// Outcome labels of `republished_total`.
pub const PUBLISHED: &str = "published";
pub const INVALID: &str = "invalid";
pub const OVERFLOW: &str = "overflow";
pub const FAILED: &str = "failed";

/// Counts of outcomes per rule, for tests and status lines; the metrics go out with them.
#[derive(Debug, Default)]
pub struct Stats {
    counts: Mutex<HashMap<(String, &'static str), u64>>,
}

impl Stats {
    /// How many messages of `rule` ended with `outcome` since start.
    pub fn count(&self, rule: &str, outcome: &str) -> u64 {
        let counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        counts
            .iter()
            .filter(|((r, o), _)| r == rule && *o == outcome)
            .map(|(_, n)| *n)
            .sum()
    }

    /// Counts one outcome and emits its log line and metric.
    pub(crate) fn record(&self, rule: &str, outcome: &'static str, detail: &str) {
        *self
            .counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((rule.to_string(), outcome))
            .or_default() += 1;
        crate::events::republished(rule, outcome, detail);
    }
}

/// A message rendered for MQTT.
#[derive(Clone, Debug)]
pub(crate) struct Rendered {
    pub topic: String,
    pub payload: Vec<u8>,
    /// MQTT 5 publish properties.
    pub properties: Option<Box<OutProperties>>,
}

/// What every worker shares.
pub(crate) struct Shared {
    pub redis: RedisManager,
    pub mqtt: MqttPublisher,
    /// Consumer name in stream groups: the bridge's MQTT client id.
    pub consumer: String,
    pub dead_letter: DeadLetter,
    pub max_packet_size: usize,
    pub stats: Arc<Stats>,
}

impl Shared {
    /// Renders `rule`'s topic and payload and validates the topic (spec §5.1, §7): no `$`
    /// prefix, no wildcard or NUL (also not from `{topic}`, which is exempt from the
    /// per-value checks), inside `allow_topics`, and a packet the broker can take.
    pub fn render(
        &self,
        rule: &RepublishRule,
        ctx: &Context<'_>,
    ) -> Result<Rendered, (Reason, String)> {
        let topic = rule
            .topic
            .render(ctx)
            .map_err(|e| (Reason::from_render(&e), format!("topic: {e}")))?;
        if topic.is_empty() || topic.contains(['+', '#', '\0']) || topic.len() > 65_535 {
            return Err((
                Reason::InvalidParam,
                format!("rendered topic {topic:?} is not a valid topic name"),
            ));
        }
        if !rule.allow_topics.is_empty()
            && !rule.allow_topics.iter().any(|f| filter_covers(f, &topic))
        {
            return Err((
                Reason::InvalidParam,
                format!("rendered topic {topic:?} is outside allow_topics"),
            ));
        }
        let payload = rule
            .payload
            .render_bytes(ctx)
            .map_err(|e| (Reason::from_render(&e), format!("payload: {e}")))?
            .into_owned();
        // Fixed header (≤ 5) + topic length (2) + topic + packet id (2) + payload.
        if 9 + topic.len() + payload.len() > self.max_packet_size {
            return Err((
                Reason::PayloadTooLarge,
                format!(
                    "{} bytes exceed mqtt.max_packet_size ({})",
                    payload.len(),
                    self.max_packet_size
                ),
            ));
        }
        let properties = match &rule.properties {
            Some(p) => {
                Some(Box::new(p.render(ctx).map_err(|e| {
                    (Reason::from_render(&e), format!("properties: {e}"))
                })?))
            }
            None => None,
        };
        Ok(Rendered {
            topic,
            payload,
            properties,
        })
    }
}

/// Runs `step` until it succeeds or fails for good, waiting out transient Redis trouble
/// with the Redis crate's one retry loop; `None` when `stop` fired meanwhile.
pub(crate) async fn until_redis<T, F, Fut>(
    stop: &mut watch::Receiver<bool>,
    step: F,
) -> Option<Result<T, RedisError>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, RedisError>>,
{
    crate::redis::retry::until_ready_or(stop.wait_for(|s| *s), step, |e| {
        tracing::debug!(error = %e, "redis unavailable; republish waits");
    })
    .await
}

/// Sleeps `delay`; false when `stop` fired first.
pub(crate) async fn pause(stop: &mut watch::Receiver<bool>, delay: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(delay) => true,
        _ = stop.wait_for(|s| *s) => false,
    }
}

/// Runs a rule set against Redis and one MQTT connection; swappable with
/// [`Republisher::reload`].
pub struct Republisher {
    redis: RedisManager,
    mqtt: MqttPublisher,
    consumer: String,
    max_packet_size: usize,
    stats: Arc<Stats>,
    running: Option<Workers>,
}

/// The workers of the rule set started last, and how to stop them.
struct Workers {
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    pubsub: Option<Monitor>,
}

/// How long [`Republisher::stop`] lets the workers (all together) finish their current step.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

impl Republisher {
    /// A republisher publishing through `mqtt` (every publish on that connection must go
    /// through it, see `mqtt::publisher`). `consumer` names it in stream groups (the bridge's
    /// client id); `max_packet_size` is the broker connection's limit.
    pub fn new(
        redis: RedisManager,
        mqtt: MqttPublisher,
        consumer: &str,
        max_packet_size: usize,
    ) -> Republisher {
        Republisher {
            redis,
            mqtt,
            consumer: consumer.to_string(),
            max_packet_size,
            stats: Arc::default(),
            running: None,
        }
    }

    /// Starts workers for `rules` (a running set is stopped first, see
    /// [`Republisher::reload`] to wait for it). Must be called within a Tokio runtime.
    pub fn start(&mut self, rules: &[RepublishRule], dead_letter: DeadLetter) {
        if let Some(old) = self.running.take() {
            let _ = old.stop.send(true);
        }
        if rules.is_empty() {
            return;
        }
        let shared = Arc::new(Shared {
            redis: self.redis.clone(),
            mqtt: self.mqtt.clone(),
            consumer: self.consumer.clone(),
            dead_letter,
            max_packet_size: self.max_packet_size,
            stats: self.stats.clone(),
        });
        let (stop, stop_rx) = watch::channel(false);
        let mut tasks = Vec::new();
        let pubsub_rules: Vec<Arc<RepublishRule>> = rules
            .iter()
            .filter(|r| matches!(r.source, Source::PubSub { .. }))
            .cloned()
            .map(Arc::new)
            .collect();
        let pubsub = if pubsub_rules.is_empty() {
            None
        } else {
            let (handles, monitor) = pubsub::spawn(shared.clone(), pubsub_rules, stop_rx.clone());
            tasks.extend(handles);
            Some(monitor)
        };
        for rule in rules {
            if matches!(rule.source, Source::Stream { .. }) {
                tasks.push(tokio::spawn(stream::run(
                    shared.clone(),
                    Arc::new(rule.clone()),
                    stop_rx.clone(),
                )));
            }
        }
        tracing::info!(rules = rules.len(), "republish started");
        self.running = Some(Workers {
            stop,
            tasks,
            pubsub,
        });
    }

    /// Stops the running rules (waiting, bounded, for their tasks) and starts `rules`.
    pub async fn reload(&mut self, rules: &[RepublishRule], dead_letter: DeadLetter) {
        self.stop().await;
        self.start(rules, dead_letter);
    }

    /// Stops every worker. Stream entries not yet acknowledged stay pending in their group
    /// and are read again on the next start; pub/sub messages still held are dropped.
    pub async fn stop(&mut self) {
        let Some(running) = self.running.take() else {
            return;
        };
        let _ = running.stop.send(true);
        // All at once, within one STOP_TIMEOUT: one after the other, a reload (on the main
        // loop) could take STOP_TIMEOUT per worker and starve the watchdog.
        let aborts: Vec<_> = running.tasks.iter().map(|t| t.abort_handle()).collect();
        let all = futures_util::future::join_all(running.tasks);
        if tokio::time::timeout(STOP_TIMEOUT, all).await.is_err() {
            for abort in aborts {
                abort.abort();
            }
        }
    }

    /// Outcome counts per rule.
    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    /// The pub/sub subscription's state (subscribed, reconnects), when pub/sub rules run.
    pub fn pubsub(&self) -> Option<&Monitor> {
        self.running.as_ref().and_then(|r| r.pubsub.as_ref())
    }
}

/// The daemon's outgoing MQTT connection (client id `<client_id>-republish`, opened when
/// the first republish rule or publishing route needs it, so a bridge that publishes
/// nothing opens none) and the [`Republisher`] on it. The routes' forwards and rate-limit
/// replies go out on it too: every publish on it is tracked, and it never pauses reading,
/// so a PUBACK is read as soon as it arrives (the route connection pauses at
/// `max_inflight`, and a forward waiting there for its PUBACK could wait forever).
pub struct RepublishService {
    mqtt: MqttConfig,
    redis: RedisManager,
    running: Option<(MqttSource, Republisher)>,
}

impl RepublishService {
    pub fn new(mqtt: &MqttConfig, redis: &RedisManager) -> RepublishService {
        RepublishService {
            mqtt: mqtt.clone(),
            redis: redis.clone(),
            running: None,
        }
    }

    /// The outgoing connection's publisher, opening the connection if it is not open yet.
    pub fn publisher(&mut self) -> Result<MqttPublisher, OptionsError> {
        if self.running.is_none() {
            let mut config = self.mqtt.clone();
            config.client_id = format!("{}-republish", self.mqtt.client_id);
            // No subscriptions: nothing arrives on the inbound channel.
            let (source, _inbound) = MqttSource::start(&config, &[], 1)?;
            let max_packet_size = usize::try_from(config.max_packet_size).unwrap_or(usize::MAX);
            let republisher = Republisher::new(
                self.redis.clone(),
                source.publisher(),
                &self.mqtt.client_id,
                max_packet_size,
            );
            self.running = Some((source, republisher));
        }
        match &self.running {
            Some((source, _)) => Ok(source.publisher()),
            None => unreachable!("opened above"),
        }
    }

    /// Runs `rules` (at start-up, and again on SIGHUP with the new set).
    pub async fn apply(
        &mut self,
        rules: &[RepublishRule],
        dead_letter: DeadLetter,
    ) -> Result<(), OptionsError> {
        if self.running.is_none() && rules.is_empty() {
            return Ok(());
        }
        self.publisher()?;
        if let Some((_, republisher)) = &mut self.running {
            republisher.reload(rules, dead_letter).await;
        }
        Ok(())
    }

    /// The running republisher, once a rule started it.
    pub fn republisher(&self) -> Option<&Republisher> {
        self.running.as_ref().map(|(_, r)| r)
    }

    /// Stops the rules (their unacked stream entries stay pending); the connection stays
    /// open for the forwards of messages still in flight.
    pub async fn stop_rules(&mut self) {
        if let Some((_, republisher)) = &mut self.running {
            republisher.stop().await;
        }
    }

    /// Stops the rules, then disconnects cleanly (publishes already queued go out first).
    pub async fn shutdown(mut self) {
        self.stop_rules().await;
        if let Some((source, _)) = self.running {
            source.disconnect(Duration::from_secs(5)).await;
        }
    }
}
