//! The MQTT source: one task that polls rumqttc's event loop and does nothing else.
//!
//! Keep-alive lives in that loop, so it must never wait on processing: each incoming publish
//! is registered with the ack sequencer and handed to the dispatcher through a channel the
//! loop never blocks on. The loop also owns reconnection (jittered exponential backoff up to
//! `reconnect_max_delay`) and resubscription: on the first connection, and on every ConnAck
//! without a session (the broker forgot our subscriptions), it subscribes to the cover again.
//!
//! Bounds: QoS 1/2 deliveries are bounded by the broker's in-flight window (Mosquitto's
//! `max_inflight_messages`); QoS 0 ones beyond `max_inflight` are dropped as `overflow`.
//! Subscribing and disconnecting go through the client from *other* tasks: awaiting the
//! client on this task could deadlock it against its own request channel.
//!
//! Reload (SIGHUP) changes the cover without dropping the session:
//! [`MqttSource::update_subscriptions`] subscribes the new filters first and then
//! unsubscribes the ones no route needs any more (in that order, so no message falls into
//! a gap), and hands the new set to the loop for later resubscriptions. The loop beats a
//! [`Heartbeat`] on every event, so a stuck loop can be noticed (systemd watchdog).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, EventLoop, Outgoing, Packet, Publish, QoS, SubscribeFilter};
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;

use super::acks::{AckSequencer, Ticket};
use super::client::{options, OptionsError};
use super::config::MqttConfig;
use crate::backoff::Backoff;
use crate::liveness::Heartbeat;
use crate::router::pattern::Subscription;

/// What the bridge knows about its broker connection, for `/readyz` and systemd.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MqttStatus {
    pub connected: bool,
    /// Every filter of the cover was granted by the broker.
    pub subscribed: bool,
}

/// Counters the source keeps; the metrics layer reads them.
#[derive(Debug, Default)]
pub struct MqttStats {
    pub reconnects: AtomicU64,
    pub overflow: AtomicU64,
    inflight: AtomicUsize,
}

impl MqttStats {
    /// Messages received and not yet finished, all routes together.
    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Relaxed)
    }
}

/// One received message on its way through the bridge. Finishing it releases its in-flight
/// slot and lets its ack go out (in arrival order); dropping it unfinished leaves it unacked,
/// so the broker redelivers it.
pub struct Inbound {
    pub publish: Publish,
    pub received: Instant,
    ticket: Option<Ticket>,
    _slot: InflightSlot,
}

impl Inbound {
    /// Every matched route reached its outcome.
    pub fn finish(self) {
        if let Some(ticket) = self.ticket {
            ticket.done();
        }
    }
}

struct InflightSlot(Arc<MqttStats>);

impl Drop for InflightSlot {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A running MQTT source.
pub struct MqttSource {
    client: AsyncClient,
    status: watch::Receiver<MqttStatus>,
    stats: Arc<MqttStats>,
    receiving: Arc<AtomicBool>,
    stop: Arc<Notify>,
    task: JoinHandle<()>,
    share_group: String,
    updates: watch::Sender<SubscriptionSet>,
    max_inflight: Arc<AtomicUsize>,
    /// What `max_inflight` may grow to on reload: the inbound channel's size is fixed.
    max_inflight_cap: usize,
    heartbeat: Heartbeat,
}

/// The cover after a reload, for the loop's later resubscriptions; `subacks` is how many
/// SUBACKs the reload's own SUBSCRIBE will bring (0 or 1).
#[derive(Clone, Default)]
struct SubscriptionSet {
    filters: Vec<SubscribeFilter>,
    subacks: usize,
}

struct Loop {
    eventloop: EventLoop,
    client: AsyncClient,
    sequencer: AckSequencer,
    inbound: mpsc::Sender<Inbound>,
    subscriptions: Vec<SubscribeFilter>,
    status: watch::Sender<MqttStatus>,
    stats: Arc<MqttStats>,
    receiving: Arc<AtomicBool>,
    stop: Arc<Notify>,
    max_inflight: Arc<AtomicUsize>,
    backoff: Backoff,
    pending_subacks: usize,
    /// `[mqtt] max_packet_size`, in bytes (rumqttc's incoming and outgoing limit).
    max_packet_size: usize,
    /// The incoming limit was raised to read one oversized message (see `oversized`).
    limit_raised: bool,
    updates: watch::Receiver<SubscriptionSet>,
    heartbeat: Heartbeat,
}

/// The largest packet MQTT can carry: the remaining length is at most 268,435,455 bytes.
const MQTT_MAX_PACKET: usize = 268_435_455;

/// The size of an incoming packet rumqttc refused for exceeding the incoming limit.
fn oversized(error: &rumqttc::ConnectionError) -> Option<usize> {
    match error {
        rumqttc::ConnectionError::MqttState(rumqttc::StateError::Deserialization(
            rumqttc::Error::PayloadSizeLimitExceeded(size),
        )) => Some(*size),
        _ => None,
    }
}

fn qos(level: u8) -> QoS {
    match level {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

/// The cover as SUBSCRIBE filters, with `$share/<group>/` when scaling out.
fn filters(subscriptions: &[Subscription], share_group: &str) -> Vec<SubscribeFilter> {
    subscriptions
        .iter()
        .map(|s| {
            let path = if share_group.is_empty() {
                s.filter.clone()
            } else {
                format!("$share/{share_group}/{}", s.filter)
            };
            SubscribeFilter::new(path, qos(s.qos))
        })
        .collect()
}

impl MqttSource {
    /// Connects (in the background) and subscribes to `subscriptions`, prefixed with
    /// `$share/<group>/` when `share_group` is set. Messages arrive on the returned channel.
    pub fn start(
        config: &MqttConfig,
        subscriptions: &[Subscription],
        max_inflight: usize,
    ) -> Result<(MqttSource, mpsc::Receiver<Inbound>), OptionsError> {
        let options = options(config)?;
        let (client, eventloop) = AsyncClient::new(options, 4096);
        // Big enough for everything the bounds allow (QoS 0 up to max_inflight, QoS 1/2 up
        // to the broker's window, at most 65535 packet ids), so the loop never finds it full.
        let (tx, rx) = mpsc::channel(max_inflight.max(1) + usize::from(u16::MAX));
        let (status_tx, status_rx) = watch::channel(MqttStatus::default());
        let stats = Arc::new(MqttStats::default());
        let receiving = Arc::new(AtomicBool::new(true));
        let stop = Arc::new(Notify::new());
        let filters = filters(subscriptions, &config.share_group);
        let (updates_tx, updates_rx) = watch::channel(SubscriptionSet {
            filters: filters.clone(),
            subacks: 0,
        });
        let max_inflight = Arc::new(AtomicUsize::new(max_inflight));
        let heartbeat = Heartbeat::new();
        let sink: Arc<dyn super::acks::AckSink> = Arc::new(client.clone());
        let run = Loop {
            eventloop,
            client: client.clone(),
            sequencer: AckSequencer::new(sink),
            inbound: tx,
            subscriptions: filters,
            status: status_tx,
            stats: stats.clone(),
            receiving: receiving.clone(),
            stop: stop.clone(),
            max_inflight: max_inflight.clone(),
            backoff: Backoff::new(Duration::from_millis(100), config.reconnect_max_delay),
            pending_subacks: 0,
            max_packet_size: usize::try_from(config.max_packet_size).unwrap_or(usize::MAX),
            limit_raised: false,
            updates: updates_rx,
            heartbeat: heartbeat.clone(),
        };
        let task = tokio::spawn(run.run());
        Ok((
            MqttSource {
                client,
                status: status_rx,
                stats,
                receiving,
                stop,
                task,
                share_group: config.share_group.clone(),
                updates: updates_tx,
                max_inflight_cap: max_inflight
                    .load(Ordering::Relaxed)
                    .max(1)
                    .saturating_add(usize::from(u16::MAX) / 2),
                max_inflight,
                heartbeat,
            },
            rx,
        ))
    }

    /// The event loop's heartbeat: it beats on every event, which comes at least once per
    /// `keep_alive` while connected, and once per connection attempt otherwise.
    pub fn heartbeat(&self) -> Heartbeat {
        self.heartbeat.clone()
    }

    /// Reload: makes `subscriptions` the cover, keeping the session. New filters (or new
    /// QoS levels) are subscribed before filters no longer needed are unsubscribed, so no
    /// message falls into a gap; the loop logs "subscribed" when the broker granted them.
    /// Returns how many filters were added and removed.
    pub fn update_subscriptions(&self, subscriptions: &[Subscription]) -> (usize, usize) {
        let new = filters(subscriptions, &self.share_group);
        let old = self.updates.borrow().filters.clone();
        let added: Vec<SubscribeFilter> =
            new.iter().filter(|f| !old.contains(f)).cloned().collect();
        let removed: Vec<String> = old
            .iter()
            .filter(|f| !new.iter().any(|n| n.path == f.path))
            .map(|f| f.path.clone())
            .collect();
        if added.is_empty() && removed.is_empty() {
            return (0, 0);
        }
        let counts = (added.len(), removed.len());
        // The loop learns of the set before the SUBSCRIBE goes out, so it expects its SUBACK.
        self.updates.send_replace(SubscriptionSet {
            filters: new,
            subacks: usize::from(!added.is_empty()),
        });
        let client = self.client.clone();
        tokio::spawn(async move {
            if !added.is_empty() {
                if let Err(e) = client.subscribe_many(added).await {
                    tracing::warn!(error = %e, "could not queue the new MQTT subscriptions");
                }
            }
            for path in removed {
                if let Err(e) = client.unsubscribe(path).await {
                    tracing::warn!(error = %e, "could not queue an MQTT unsubscribe");
                }
            }
        });
        counts
    }

    /// Reload: the new `[limits] max_inflight` (bounded by what the inbound channel, sized
    /// at start, can hold).
    pub fn set_max_inflight(&self, max_inflight: usize) {
        let capped = max_inflight.clamp(1, self.max_inflight_cap);
        if capped != max_inflight {
            tracing::warn!(
                max_inflight,
                capped,
                "limits.max_inflight can grow this far only after a restart"
            );
        }
        self.max_inflight.store(capped, Ordering::Relaxed);
    }

    /// The client, for publishing (`mqtt_publish`, republish). Never await it on the loop.
    pub fn client(&self) -> &AsyncClient {
        &self.client
    }

    pub fn status(&self) -> watch::Receiver<MqttStatus> {
        self.status.clone()
    }

    pub fn stats(&self) -> &Arc<MqttStats> {
        &self.stats
    }

    /// SIGTERM, first step: take no new messages. What arrives from now on stays unacked and
    /// the broker redelivers it after we are back; the connection (and its acks) goes on.
    pub fn stop_receiving(&self) {
        self.receiving.store(false, Ordering::Relaxed);
    }

    /// Sends DISCONNECT after every queued ack and waits (bounded) for the loop to end.
    pub async fn disconnect(self, timeout: Duration) {
        self.stop_receiving();
        if self.client.disconnect().await.is_err() {
            self.stop.notify_one();
        }
        let abort = self.task.abort_handle();
        if tokio::time::timeout(timeout, self.task).await.is_err() {
            abort.abort();
        }
    }
}

impl Loop {
    async fn run(mut self) {
        let mut first_connection = true;
        loop {
            let event = tokio::select! {
                _ = self.stop.notified() => return,
                event = self.eventloop.poll() => event,
            };
            self.heartbeat.beat();
            self.take_subscription_update();
            match event {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    self.backoff.reset();
                    if self.limit_raised {
                        // This connection reads with the raised limit (rumqttc takes it at
                        // connect); the next one goes back to the configured limit.
                        self.limit_raised = false;
                        self.eventloop
                            .mqtt_options
                            .set_max_packet_size(self.max_packet_size, self.max_packet_size);
                    }
                    tracing::info!(
                        session_present = ack.session_present,
                        "connected to the MQTT broker"
                    );
                    // Subscribe on the first connection too: the broker's stored session may
                    // hold another route set than this config's.
                    let subscribe = first_connection || !ack.session_present;
                    first_connection = false;
                    self.status.send_modify(|s| {
                        s.connected = true;
                        s.subscribed = !subscribe || self.subscriptions.is_empty();
                    });
                    if subscribe && !self.subscriptions.is_empty() {
                        self.pending_subacks = 1;
                        let client = self.client.clone();
                        let filters = self.subscriptions.clone();
                        tokio::spawn(async move {
                            if let Err(e) = client.subscribe_many(filters).await {
                                tracing::warn!(error = %e, "could not queue the MQTT subscription");
                            }
                        });
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(suback))) => {
                    let refused = suback
                        .return_codes
                        .iter()
                        .filter(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
                        .count();
                    if refused > 0 {
                        tracing::error!(
                            refused,
                            "the broker refused subscriptions (check its ACL)"
                        );
                    } else if self.pending_subacks > 0 {
                        self.pending_subacks -= 1;
                        if self.pending_subacks == 0 {
                            tracing::info!(filters = self.subscriptions.len(), "subscribed");
                            self.status.send_modify(|s| s.subscribed = true);
                        }
                    }
                }
                Ok(Event::Incoming(Packet::Publish(publish))) => self.receive(publish),
                Ok(Event::Outgoing(Outgoing::Disconnect)) => return,
                Ok(_) => {}
                Err(e) => {
                    let was_connected = self.status.borrow().connected;
                    self.status.send_modify(|s| {
                        s.connected = false;
                        s.subscribed = false;
                    });
                    // Acks of the old connection would confirm redelivered copies unseen.
                    self.sequencer.reset();
                    if !self.receiving.load(Ordering::Relaxed) && !was_connected {
                        return;
                    }
                    if let Some(size) = oversized(&e) {
                        self.raise_limit_for(size);
                    }
                    let delay = self.backoff.next_delay();
                    tracing::warn!(error = %e, retry_in = ?delay, "MQTT connection lost");
                    self.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                    tokio::select! {
                        _ = self.stop.notified() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    /// A message larger than `max_packet_size` arrived. rumqttc cannot skip it, and under
    /// MQTT 3.1.1 the broker cannot be told our limit, so it would redeliver that message
    /// first on every reconnect and wedge the session for good. Instead the next connection
    /// reads packets up to its size, once: the engine refuses the message as
    /// `payload_too_large` (it exceeds `max_payload` too), dead-letters it and acks it.
    fn raise_limit_for(&mut self, size: usize) {
        tracing::error!(
            size,
            max_packet_size = self.max_packet_size,
            "the broker sent a message larger than mqtt.max_packet_size; reading it once to \
             refuse it as payload_too_large (limit the broker's max_packet_size / \
             message_size_limit to avoid this)"
        );
        let incoming = size.min(MQTT_MAX_PACKET).max(self.max_packet_size);
        self.eventloop
            .mqtt_options
            .set_max_packet_size(incoming, self.max_packet_size);
        self.limit_raised = true;
    }

    /// A reload changed the cover: resubscribe to the new set from now on, and count the
    /// reload's SUBACK so "subscribed" is logged when the broker granted it.
    fn take_subscription_update(&mut self) {
        if !self.updates.has_changed().unwrap_or(false) {
            return;
        }
        let update = self.updates.borrow_and_update().clone();
        self.subscriptions = update.filters;
        self.pending_subacks += update.subacks;
    }

    fn receive(&mut self, publish: Publish) {
        if !self.receiving.load(Ordering::Relaxed) {
            return; // shutting down: unacked, redelivered later
        }
        if publish.qos == QoS::AtMostOnce
            && self.stats.inflight() >= self.max_inflight.load(Ordering::Relaxed)
        {
            self.stats.overflow.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.stats.inflight.fetch_add(1, Ordering::Relaxed);
        let slot = InflightSlot(self.stats.clone());
        let ticket = (publish.qos != QoS::AtMostOnce).then(|| {
            // The ack needs only the packet id and QoS: don't keep topic and payload twice.
            let mut ack = Publish::new("", publish.qos, Vec::new());
            ack.pkid = publish.pkid;
            self.sequencer.register(ack)
        });
        let inbound = Inbound {
            publish,
            received: Instant::now(),
            ticket,
            _slot: slot,
        };
        if let Err(e) = self.inbound.try_send(inbound) {
            // Only when the dispatcher is gone (shutdown): the message stays unacked.
            tracing::debug!(error = %e, "dispatcher not taking messages");
        }
    }
}
