//! The MQTT source: one task that polls rumqttc's event loop and does nothing else.
//!
//! Keep-alive lives in that loop, so it must never wait on processing: each incoming publish
//! is registered with the ack sequencer and handed to the dispatcher through a channel whose
//! reader (the daemon's main loop) never waits on Redis. The loop also owns reconnection
//! (jittered exponential backoff up to `reconnect_max_delay`) and resubscription: on the
//! first connection, and on every ConnAck without a session (the broker forgot our
//! subscriptions), it subscribes to the cover again.
//!
//! Bounds: QoS 1/2 deliveries are bounded by the broker's in-flight window (Mosquitto's
//! `max_inflight_messages`); QoS 0 ones beyond `max_inflight` are dropped as `overflow`.
//! Not every broker honours its window: Mosquitto 2.0.11 sends a persistent session's whole
//! queue at once. So while `max_inflight` QoS 1/2 messages are unacked ("held back") the
//! loop tells rumqttc to read nothing (our patch, `EventLoop::pause_reading`): the rest waits
//! in the socket and the broker (TCP backpressure) instead of in our memory, while acks,
//! forwards and keep-alive pings still go out. The loop keeps polling all along; the acks
//! that make room are requests, so they wake it. At most one read batch (9 packets) beyond
//! the bound is taken. A QoS 1/2 message is never dropped for want of room. QoS 0 messages
//! behind the held-back ones wait in the broker too (which may drop them as its queue limits
//! say), rather than reaching us as `overflow`.
//! Subscribing and disconnecting go through the client from *other* tasks: awaiting the
//! client on this task could deadlock it against its own request channel.
//!
//! Publishing with acknowledgement tracking (the republisher's) is
//! [`publisher`](super::publisher); this loop feeds its tracker every event.
//!
//! Reload (SIGHUP) changes the cover without dropping the session:
//! [`MqttSource::update_subscriptions`] subscribes the new filters first and then
//! unsubscribes the ones no route needs any more (in that order, so no message falls into
//! a gap), and hands the new set to the loop for later resubscriptions. The loop beats a
//! [`Heartbeat`] on every event, so a stuck loop can be noticed (systemd watchdog).
//!
//! # Packets the decoder cannot take as they are
//!
//! To upstream rumqttc, a publish over `max_packet_size`, or with a topic that is not UTF-8,
//! is a decode error: the connection drops, and the broker sends the same packet first
//! again after every reconnect (MQTT 3.1.1 cannot tell it our limit), for ever. Our
//! rumqttc patches (vendor/rumqttc/PATCHED.md, Changes 5 and 6) deliver such a publish
//! marked instead: an oversized one with only its first 1 KiB, the rest dropped as it
//! streams in, so it never sits in memory whole; one with a bad topic under a lossy
//! rendering of it (U+FFFD; the levels stay as they were, so it matches the routes the
//! broker delivered it for). It goes the way of every message (its in-flight slot, its ack
//! in arrival order), carrying its [`Inbound::refusal`]: every route it matches ends
//! `invalid` without running, with a dead-letter record, and then it is acked.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;

use super::acks::{AckForwarder, AckSequencer, Ticket};
use super::client::{connect, OptionsError};
use super::config::MqttConfig;
use super::publisher::{lock, MqttPublisher, Tracker};
use super::wire::{Client, Event, EventLoop, Filter, Received, RequestError};
use super::{MqttStatus, Subscription};
use crate::backoff::Backoff;
use crate::events;
use crate::liveness::Heartbeat;
use crate::message::Message;
use crate::outcome::Reason;

/// Counters the source keeps; the metrics layer reads them.
#[derive(Debug, Default)]
pub struct MqttStats {
    pub reconnects: AtomicU64,
    inflight: AtomicUsize,
    /// The QoS 1/2 part of `inflight`: what reading holds back on.
    unacked: AtomicUsize,
}

impl MqttStats {
    /// Messages received and not yet finished, all routes together.
    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Relaxed)
    }

    /// QoS 1/2 messages received and not yet finished, from any connection.
    fn unacked(&self) -> usize {
        self.unacked.load(Ordering::Relaxed)
    }
}

/// One received message on its way through the bridge. Finishing it releases its in-flight
/// slot and lets its ack go out (in arrival order); dropping it unfinished leaves it unacked,
/// so the broker redelivers it.
pub struct Inbound {
    pub message: Message,
    pub received: Instant,
    ticket: Option<Ticket>,
    /// `None` for an overflowed message: it holds no in-flight slot.
    slot: Option<InflightSlot>,
    /// See [`Inbound::refusal`].
    refusal: Option<(Reason, String)>,
}

impl Inbound {
    /// Every matched route reached its outcome.
    pub fn finish(self) {
        if let Some(ticket) = self.ticket {
            ticket.done();
        }
    }

    /// A QoS 0 message beyond `max_inflight`, passed on without its payload only so that
    /// its routes can count outcome `overflow` (spec §5.3); it must not be processed.
    pub fn is_overflow(&self) -> bool {
        self.slot.is_none()
    }

    /// The message is `invalid` before any route sees it, and why (dead-letter reason and
    /// detail): the decoder could not take it as it is (see the module doc). Its payload
    /// is then at most the first 1 KiB, and its topic possibly a lossy rendering.
    pub fn refusal(&self) -> Option<(Reason, &str)> {
        self.refusal
            .as_ref()
            .map(|(reason, detail)| (*reason, detail.as_str()))
    }
}

/// What [`Inbound::refusal`] says of `publish`, as our rumqttc patches marked it.
fn refusal(publish: &Received, max_packet_size: usize) -> Option<(Reason, String)> {
    if let Some(size) = publish.oversized {
        tracing::warn!(
            topic = %publish.message.topic,
            size,
            max_packet_size,
            "the broker sent a message larger than mqtt.max_packet_size; skipped as it \
             arrived, refused as payload_too_large (limit the broker's message_size_limit \
             to spare the network)"
        );
        return Some((
            Reason::PayloadTooLarge,
            format!(
                "{size} bytes, over mqtt.max_packet_size ({max_packet_size}); skipped as it \
                 arrived, only the first {} kept",
                publish.message.payload.len()
            ),
        ));
    }
    let raw = publish.raw_topic.as_ref()?;
    let raw = base64::engine::general_purpose::STANDARD.encode(raw);
    tracing::warn!(topic_b64 = %raw, "the broker sent a topic that is not UTF-8; refused");
    Some((
        Reason::InvalidUtf8,
        format!("the topic is not UTF-8 (shown with U+FFFD); as received, in base64: {raw}"),
    ))
}

/// A held message's place in the counts; `true` for QoS 1/2.
struct InflightSlot(Arc<MqttStats>, bool);

impl InflightSlot {
    fn take(stats: &Arc<MqttStats>, acked: bool) -> InflightSlot {
        stats.inflight.fetch_add(1, Ordering::Relaxed);
        if acked {
            stats.unacked.fetch_add(1, Ordering::Relaxed);
        }
        InflightSlot(stats.clone(), acked)
    }
}

impl Drop for InflightSlot {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::Relaxed);
        if self.1 {
            self.0.unacked.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// A running MQTT source.
pub struct MqttSource {
    client: Client,
    status: watch::Receiver<MqttStatus>,
    stats: Arc<MqttStats>,
    receiving: Arc<AtomicBool>,
    stop: Arc<Notify>,
    task: JoinHandle<()>,
    tracker: Arc<Mutex<Tracker>>,
    acks: Arc<AckForwarder>,
    broker_max: Arc<std::sync::atomic::AtomicU32>,
    subscribes: Subscribes,
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
    filters: Vec<Filter>,
    subacks: usize,
}

struct Loop {
    eventloop: EventLoop,
    client: Client,
    sequencer: AckSequencer,
    inbound: mpsc::Sender<Inbound>,
    subscriptions: Vec<Filter>,
    /// SUBSCRIBEs queued and not yet written, with their filters in order, and those
    /// written, by packet id: a SUBACK's reason codes name the filters they refuse.
    subscribes: Subscribes,
    status: watch::Sender<MqttStatus>,
    stats: Arc<MqttStats>,
    receiving: Arc<AtomicBool>,
    stop: Arc<Notify>,
    max_inflight: Arc<AtomicUsize>,
    backoff: Backoff,
    pending_subacks: usize,
    /// `[mqtt] max_packet_size`, in bytes (rumqttc's incoming and outgoing limit).
    max_packet_size: usize,
    tracker: Arc<Mutex<Tracker>>,
    /// The broker's Maximum Packet Size from its CONNACK (0 = none), for the publisher.
    broker_max: Arc<std::sync::atomic::AtomicU32>,
    updates: watch::Receiver<SubscriptionSet>,
    heartbeat: Heartbeat,
    /// Until the first connection: the broker's URL (`mqtt.url`, which holds no
    /// credentials), to say once what the bridge is waiting for.
    waiting_for: Option<String>,
    /// This connection's client id, in its log lines: the route connection and the
    /// outgoing one (`<client_id>-republish`) fail separately (an ACL may refuse only one).
    client_id: String,
}

/// SUBSCRIBEs on their way, to name the filters a SUBACK refuses (spec §6.1). Each is
/// queued to rumqttc under the same lock that records its filters, so the records are in
/// the request channel's order and each `Outgoing::Subscribe` belongs to the oldest.
#[derive(Clone, Default)]
struct Subscribes(Arc<Mutex<SubscribesState>>);

#[derive(Default)]
struct SubscribesState {
    queued: std::collections::VecDeque<Vec<String>>,
    written: std::collections::HashMap<u16, Vec<String>>,
}

impl Subscribes {
    fn state(&self) -> std::sync::MutexGuard<'_, SubscribesState> {
        lock(&self.0)
    }

    /// Queues a SUBSCRIBE of `filters` on `client`, remembering their paths. Never awaits
    /// the client under the lock: a full request channel is tried again shortly.
    async fn send(&self, client: &Client, filters: Vec<Filter>) -> Result<(), String> {
        // rumqttc 3.1.1 also says "full" for filters it finds invalid: bounded, not for ever.
        for _ in 0..500 {
            {
                let mut state = self.state();
                match client.try_subscribe_many(filters.clone()) {
                    Ok(()) => {
                        state
                            .queued
                            .push_back(filters.iter().map(|f| f.path.clone()).collect());
                        return Ok(());
                    }
                    Err(RequestError::Full) => {}
                    Err(RequestError::Refused(why)) => return Err(why),
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Err("the MQTT request queue stayed full (or rumqttc found a filter invalid)".into())
    }

    fn written(&self, pkid: u16) {
        let mut state = self.state();
        if let Some(paths) = state.queued.pop_front() {
            state.written.insert(pkid, paths);
        }
    }

    /// The filters of the SUBSCRIBE answered by the SUBACK `pkid`.
    fn answered(&self, pkid: u16) -> Vec<String> {
        self.state().written.remove(&pkid).unwrap_or_default()
    }

    /// A new connection: forget the packet ids of the old one.
    fn reset(&self) {
        self.state().written.clear();
    }
}

/// The cover as SUBSCRIBE filters, with `$share/<group>/` when scaling out.
fn filters(subscriptions: &[Subscription], share_group: &str) -> Vec<Filter> {
    subscriptions
        .iter()
        .map(|s| {
            let path = if share_group.is_empty() {
                s.filter.clone()
            } else {
                format!("$share/{share_group}/{}", s.filter)
            };
            Filter { path, qos: s.qos }
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
        let (client, eventloop) = connect(config, max_inflight)?;
        // Big enough for everything the bounds allow (QoS 0 up to max_inflight, QoS 1/2 up
        // to the broker's window, at most 65535 packet ids), so the loop never finds it full.
        let capacity = max_inflight.max(1) + usize::from(u16::MAX);
        let (tx, rx) = mpsc::channel(capacity);
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
        let acks = Arc::new(AckForwarder::spawn(client.clone(), capacity));
        let subscribes = Subscribes::default();
        let sink: Arc<dyn super::acks::AckSink> = acks.clone();
        let tracker = Arc::new(Mutex::new(Tracker::default()));
        let broker_max = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let run = Loop {
            eventloop,
            client: client.clone(),
            sequencer: AckSequencer::new(sink),
            inbound: tx,
            subscriptions: filters,
            subscribes: subscribes.clone(),
            status: status_tx,
            stats: stats.clone(),
            receiving: receiving.clone(),
            stop: stop.clone(),
            max_inflight: max_inflight.clone(),
            backoff: Backoff::new(Duration::from_millis(100), config.reconnect_max_delay),
            pending_subacks: 0,
            max_packet_size: usize::try_from(config.max_packet_size).unwrap_or(usize::MAX),
            tracker: tracker.clone(),
            broker_max: broker_max.clone(),
            updates: updates_rx,
            heartbeat: heartbeat.clone(),
            waiting_for: Some(config.url.clone()),
            client_id: config.client_id.clone(),
        };
        let task = tokio::spawn(async move {
            let _lifeline = crate::liveness::Lifeline::new("MQTT loop");
            let tracker = run.tracker.clone();
            run.run().await;
            // Nothing will be acked any more: waiters see an error instead of hanging.
            lock(&tracker).clear();
        });
        Ok((
            MqttSource {
                client,
                status: status_rx,
                stats,
                receiving,
                stop,
                task,
                tracker,
                broker_max,
                acks,
                subscribes,
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

    /// The ack path's [`Busy`](crate::liveness::Busy), for the watchdog.
    pub fn ack_path(&self) -> crate::liveness::Busy {
        self.acks.busy()
    }

    /// Reload: makes `subscriptions` the cover, keeping the session. New filters (or new
    /// QoS levels) are subscribed before filters no longer needed are unsubscribed, so no
    /// message falls into a gap; the loop logs "subscribed" when the broker granted them.
    /// Returns how many filters were added and removed.
    pub fn update_subscriptions(&self, subscriptions: &[Subscription]) -> (usize, usize) {
        let new = filters(subscriptions, &self.share_group);
        let old = self.updates.borrow().filters.clone();
        let added: Vec<Filter> = new.iter().filter(|f| !old.contains(f)).cloned().collect();
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
        let subscribes = self.subscribes.clone();
        tokio::spawn(async move {
            if !added.is_empty() {
                if let Err(e) = subscribes.send(&client, added).await {
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

    pub fn status(&self) -> watch::Receiver<MqttStatus> {
        self.status.clone()
    }

    pub fn stats(&self) -> &Arc<MqttStats> {
        &self.stats
    }

    /// A handle for tracked publishing (see the module doc), cheap to clone.
    pub fn publisher(&self) -> MqttPublisher {
        MqttPublisher::new(
            self.client.clone(),
            self.tracker.clone(),
            self.status.clone(),
            self.broker_max.clone(),
        )
    }

    /// SIGTERM, first step: take no new messages. What arrives from now on stays unacked and
    /// the broker redelivers it after we are back; the connection (and its acks) goes on.
    pub fn stop_receiving(&self) {
        self.receiving.store(false, Ordering::Relaxed);
    }

    /// Sends DISCONNECT after every queued ack and waits (bounded) for the loop to end.
    pub async fn disconnect(self, timeout: Duration) {
        self.stop_receiving();
        // The acks of what finished go out before the DISCONNECT.
        let _ = tokio::time::timeout(timeout, self.acks.flush()).await;
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
            let held_back = self.held_back();
            self.eventloop.pause_reading(held_back);
            if held_back && self.pending_subacks > 0 && !self.status.borrow().subscribed {
                // Our SUBACK sits unread behind the session's backlog (e.g. Redis is down at
                // start-up). The broker is delivering to us: that is ready enough, and
                // waiting would keep us unready until Redis is back.
                tracing::info!("ready: the SUBACK waits behind messages held back");
                self.status.send_modify(|s| s.subscribed = true);
            }
            let event = tokio::select! {
                _ = self.stop.notified() => return,
                event = self.eventloop.poll() => event,
            };
            let pending_new = match &event {
                Err(_) => self.eventloop.pending_new_publishes(),
                Ok(_) => 0,
            };
            lock(&self.tracker).observe(&event, pending_new);
            self.heartbeat.beat();
            self.take_subscription_update();
            match event {
                Ok(Event::ConnAck {
                    session_present,
                    max_packet_size,
                }) => {
                    self.broker_max
                        .store(max_packet_size.unwrap_or(0), Ordering::Relaxed);
                    self.backoff.reset();
                    self.waiting_for = None;
                    tracing::info!(
                        client_id = %self.client_id,
                        session_present,
                        "connected to the MQTT broker"
                    );
                    // Subscribe on the first connection too: the broker's stored session may
                    // hold another route set than this config's.
                    let subscribe = first_connection || !session_present;
                    first_connection = false;
                    self.status.send_modify(|s| {
                        s.connected = true;
                        s.subscribed = !subscribe || self.subscriptions.is_empty();
                        if subscribe {
                            s.refused.clear(); // asked again: the SUBACK will tell
                        }
                    });
                    if subscribe && !self.subscriptions.is_empty() {
                        self.pending_subacks = 1;
                        let client = self.client.clone();
                        let filters = self.subscriptions.clone();
                        let subscribes = self.subscribes.clone();
                        tokio::spawn(async move {
                            if let Err(e) = subscribes.send(&client, filters).await {
                                tracing::warn!(error = %e, "could not queue the MQTT subscription");
                            }
                        });
                    }
                }
                Ok(Event::OutgoingSubscribe(pkid)) => self.subscribes.written(pkid),
                Ok(Event::SubAck { pkid, codes }) => {
                    let paths = self.subscribes.answered(pkid);
                    let mut refused = Vec::new();
                    for (i, code) in codes.iter().enumerate() {
                        if let Some(code) = code {
                            let filter = paths.get(i).map_or("(unknown filter)", String::as_str);
                            events::mqtt_refused("suback", &code.0, filter, &self.client_id);
                            refused.push(filter.to_string());
                        }
                    }
                    let answered = self.pending_subacks > 0;
                    self.pending_subacks = self.pending_subacks.saturating_sub(1);
                    let done = answered && self.pending_subacks == 0;
                    self.status.send_modify(|s| {
                        for filter in refused {
                            if !s.refused.contains(&filter) {
                                s.refused.push(filter);
                            }
                        }
                        if done {
                            tracing::info!(
                                filters = self.subscriptions.len(),
                                refused = s.refused.len(),
                                "subscribed"
                            );
                            s.subscribed = true;
                        }
                    });
                }
                Ok(Event::Publish(publish)) => self.receive(*publish).await,
                Ok(Event::PubAck {
                    packet,
                    refused: Some(code),
                    ..
                }) => {
                    // The publish's topic is known to whoever waits for it (the tracker
                    // hands them the refusal), which logs it; here it is counted.
                    events::mqtt_reason_code(packet, &code.0);
                }
                Ok(Event::Disconnect { reason }) => {
                    tracing::warn!(
                        client_id = %self.client_id,
                        reason = %reason,
                        "the MQTT broker disconnected us"
                    );
                }
                Ok(Event::OutgoingDisconnect) => return,
                Ok(_) => {}
                Err(e) => {
                    let was_connected = self.status.borrow().connected;
                    self.status.send_modify(|s| {
                        s.connected = false;
                        s.subscribed = false;
                    });
                    // Acks of the old connection would confirm redelivered copies unseen.
                    self.sequencer.reset();
                    self.subscribes.reset();
                    if !self.receiving.load(Ordering::Relaxed) && !was_connected {
                        return;
                    }
                    let delay = self.backoff.next_delay();
                    if let Some(url) = self.waiting_for.take() {
                        // Once, so a newcomer whose broker is not running yet sees why
                        // nothing happens.
                        tracing::warn!(
                            broker = %url,
                            client_id = %self.client_id,
                            error = %e,
                            "waiting for the MQTT broker (mqtt.url): it does not answer yet; \
                             is it running and reachable? Retrying with backoff up to \
                             mqtt.reconnect_max_delay"
                        );
                    }
                    tracing::warn!(
                        client_id = %self.client_id,
                        error = %e,
                        retry_in = ?delay,
                        "MQTT connection lost"
                    );
                    self.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                    tokio::select! {
                        _ = self.stop.notified() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
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
        // Filters the broker refused and no route needs any more no longer count.
        let kept = &self.subscriptions;
        self.status.send_if_modified(|s| {
            let before = s.refused.len();
            s.refused.retain(|f| kept.iter().any(|k| k.path == *f));
            before != s.refused.len()
        });
    }

    /// The bridge holds `max_inflight` QoS 1/2 messages: read nothing more until some are
    /// finished (see the module doc; QoS 0 beyond the bound is read and dropped as
    /// `overflow`). Counted over every message held, from this connection or an earlier one (a message still in its lane after a reconnect holds memory all the
    /// same, and the broker redelivers it on top). Not while shutting down (what arrives
    /// then is not taken anyway), nor while our own publishes fill rumqttc's outgoing
    /// window or collide: only reading their PUBACKs lets rumqttc write requests — our acks
    /// among them — again.
    fn held_back(&self) -> bool {
        self.receiving.load(Ordering::Relaxed)
            && self.eventloop.can_write()
            && self.stats.unacked() >= self.max_inflight.load(Ordering::Relaxed).max(1)
    }

    async fn receive(&mut self, publish: Received) {
        crate::fault::in_mqtt_loop(&publish.message.payload);
        if !self.receiving.load(Ordering::Relaxed) {
            return; // shutting down: unacked, redelivered later
        }
        if publish.ack.is_none()
            && self.stats.inflight() >= self.max_inflight.load(Ordering::Relaxed)
        {
            // Only the router knows which routes to count `overflow` on: hand it the
            // topic, without the payload this bound exists to not hold.
            let mut message = publish.message;
            message.payload = Default::default();
            message.properties = None;
            let _ = self.inbound.try_send(Inbound {
                message,
                received: Instant::now(),
                ticket: None,
                slot: None,
                refusal: None,
            });
            return;
        }
        let slot = Some(InflightSlot::take(&self.stats, publish.ack.is_some()));
        // The ack needs only the packet id and QoS: topic and payload are not kept twice.
        let ticket = publish.ack.map(|id| self.sequencer.register(id));
        let inbound = Inbound {
            refusal: refusal(&publish, self.max_packet_size),
            message: publish.message,
            received: Instant::now(),
            ticket,
            slot,
        };
        // Waits only when the channel is full, which `held_back` makes rare: its
        // reader never waits on Redis, so room comes soon. Never dropped: a QoS 1/2 message
        // dropped here would hold back every later ack until a reconnect.
        if self.inbound.send(inbound).await.is_err() {
            // Only when the dispatcher is gone (shutdown): the message stays unacked.
            tracing::debug!("dispatcher not taking messages");
        }
    }
}
