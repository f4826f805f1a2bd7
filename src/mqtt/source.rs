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
    max_inflight: usize,
    backoff: Backoff,
    pending_subacks: usize,
    /// `[mqtt] max_packet_size`, in bytes (rumqttc's incoming and outgoing limit).
    max_packet_size: usize,
    /// The incoming limit was raised to read one oversized message (see `oversized`).
    limit_raised: bool,
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
        let filters = subscriptions
            .iter()
            .map(|s| {
                let path = if config.share_group.is_empty() {
                    s.filter.clone()
                } else {
                    format!("$share/{}/{}", config.share_group, s.filter)
                };
                SubscribeFilter::new(path, qos(s.qos))
            })
            .collect();
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
            max_inflight,
            backoff: Backoff::new(Duration::from_millis(100), config.reconnect_max_delay),
            pending_subacks: 0,
            max_packet_size: usize::try_from(config.max_packet_size).unwrap_or(usize::MAX),
            limit_raised: false,
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
            },
            rx,
        ))
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

    fn receive(&mut self, publish: Publish) {
        if !self.receiving.load(Ordering::Relaxed) {
            return; // shutting down: unacked, redelivered later
        }
        if publish.qos == QoS::AtMostOnce && self.stats.inflight() >= self.max_inflight {
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
